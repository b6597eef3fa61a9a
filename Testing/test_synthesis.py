"""Label-map-driven CT synthesis on the real label maps shipped with the repository."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CascadeSegLib.inference.validation import validate_ct
from CascadeSegLib.synthesis import (
    AnatomySettings,
    IntensityTable,
    ScanSettings,
    SynthSettings,
    default_table_path,
    measure_table,
    synthesize,
    tissue_of,
    totalsegmentator_names,
)
from CascadeSegLib.synthesis.source import synthetic_cases

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
TS = REPO / "Resources" / "TrainingData" / "totalsegmentator"
SOFT_TISSUES = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "iliopsoas_left", "autochthon_right",
                "inferior_vena_cava")


@pytest.fixture(scope="module")
def labels() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLE_LABELS))


@pytest.fixture(scope="module")
def table() -> IntensityTable:
    return IntensityTable.load(default_table_path())


@pytest.fixture(scope="module")
def names() -> dict[int, str]:
    return totalsegmentator_names()


def _medians(ct: sitk.Image, lab: sitk.Image, names: dict[int, str]) -> dict[str, float]:
    hu, la = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(lab)
    out = {}
    for v in np.unique(la):
        m = ndimage.binary_erosion(la == v)
        if v and m.sum() >= 30:
            out[names[int(v)]] = float(np.median(hu[m]))
    return out


def test_every_totalsegmentator_structure_has_a_tissue(names):
    assert [n for n in names.values() if tissue_of(n) is None] == []


def test_shipped_table_is_what_measure_table_gives_on_the_shipped_native_cts(table):
    cases = [("abdomen_ct_3mm", sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(SAMPLE_LABELS))),
             ("s0009", sitk.ReadImage(str(TS / "s0009_ct.nii.gz")), sitk.ReadImage(str(TS / "s0009_label.nii.gz")))]
    again = measure_table(cases)
    assert again.sources == table.sources == ["abdomen_ct_3mm", "s0009"]
    assert again.structures == table.structures
    assert 40 <= table.structures["liver"]["mean"] <= 65            # native liver


def test_clean_native_image_reproduces_the_table_exactly(labels, table, names):
    """No jitter, texture, noise or blur: each soft-tissue structure's interior is its table value."""
    clean = SynthSettings(anatomy=AnatomySettings.none(), scan=ScanSettings.clean("native"))
    result = synthesize(labels, names, table, seed=0, settings=clean)
    med = _medians(result.ct, result.labels, names)
    for organ in SOFT_TISSUES:
        assert med[organ] == pytest.approx(round(table.structures[organ]["mean"]), abs=1.0), organ


def test_random_native_images_match_the_table_within_tolerance(labels, table, names):
    """Stated tolerance: with jitter, texture, noise and blur, a soft-tissue organ's interior
    median stays within 30 HU of the table (jitter sd is half the measured spread, <= 20 HU)."""
    settings = SynthSettings(scan=ScanSettings(phases={"native": 1.0}, crop_prob=0.0, truncate_prob=0.0))
    misses = []
    for seed in range(3):
        result = synthesize(labels, names, table, seed=seed, settings=settings)
        med = _medians(result.ct, result.labels, names)
        for organ in SOFT_TISSUES:
            if organ in med and abs(med[organ] - table.structures[organ]["mean"]) > 30:
                misses.append((seed, organ, med[organ], table.structures[organ]["mean"]))
    assert misses == []


def test_contrast_phases_enhance_arteries_and_organs_together(labels, table, names):
    med = {}
    for phase in ("native", "arterial", "portal"):
        result = synthesize(labels, names, table, seed=1,
                            settings=SynthSettings(anatomy=AnatomySettings.none(), scan=ScanSettings.clean(phase)))
        med[phase] = _medians(result.ct, result.labels, names)
    assert med["arterial"]["aorta"] > med["portal"]["aorta"] > med["native"]["aorta"] + 80
    assert med["portal"]["liver"] > med["arterial"]["liver"] >= med["native"]["liver"]
    assert med["portal"]["portal_vein_and_splenic_vein"] > med["native"]["portal_vein_and_splenic_vein"] + 100
    # one bolus, one draw per tissue: both iliac arteries enhance by the same amount
    d_left = med["arterial"]["iliac_artery_left"] - med["native"]["iliac_artery_left"]
    d_right = med["arterial"]["iliac_artery_right"] - med["native"]["iliac_artery_right"]
    assert d_left == pytest.approx(d_right, abs=2.0)
    # gallbladder bile does not enhance
    assert med["portal"]["gallbladder"] == pytest.approx(med["native"]["gallbladder"], abs=1.0)


def test_geometry_seed_and_values(labels, table, names):
    settings = SynthSettings(scan=ScanSettings(crop_prob=0.0))
    a = synthesize(labels, names, table, seed=7, settings=settings)
    b = synthesize(labels, names, table, seed=7, settings=settings)
    c = synthesize(labels, names, table, seed=8, settings=settings)
    for img in (a.ct, a.labels):
        assert img.GetSize() == labels.GetSize()
        assert img.GetOrigin() == labels.GetOrigin()
        assert img.GetSpacing() == labels.GetSpacing()
        assert img.GetDirection() == labels.GetDirection()
    assert a.ct.GetPixelID() == sitk.sitkInt16
    arr = sitk.GetArrayFromImage(a.ct)
    assert np.array_equal(arr, sitk.GetArrayFromImage(b.ct))
    assert np.array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(b.labels))
    assert not np.array_equal(arr, sitk.GetArrayFromImage(c.ct))
    assert arr.min() >= -1024 and arr.max() <= 3071
    # the deformed label map keeps the input's values and roughly its organ volumes
    assert set(np.unique(sitk.GetArrayFromImage(a.labels))) <= set(np.unique(sitk.GetArrayFromImage(labels)))
    liver_in = int((sitk.GetArrayFromImage(labels) == 5).sum())
    liver_out = int((sitk.GetArrayFromImage(a.labels) == 5).sum())
    assert 0.4 * liver_in < liver_out < 2.5 * liver_in
    # a synthetic CT passes the checks `cascadeseg segment` applies to its input
    assert validate_ct(a.ct) is None                       # 3D, finite, looks like CT in HU
    assert validate_ct(sitk.Cast(a.ct, sitk.sitkFloat32)) is None


def test_axial_crop_is_an_exact_subgrid_and_spacing_option(labels, table, names):
    settings = SynthSettings(scan=ScanSettings(crop_prob=1.0, crop_mm=(120.0, 150.0)))
    r = synthesize(labels, names, table, seed=3, settings=settings)
    assert r.ct.GetSize()[:2] == labels.GetSize()[:2] and r.ct.GetSize()[2] < labels.GetSize()[2]
    idx = labels.TransformPhysicalPointToContinuousIndex(r.ct.GetOrigin())
    assert idx[0] == pytest.approx(0, abs=1e-6) and idx[1] == pytest.approx(0, abs=1e-6)
    assert idx[2] == pytest.approx(round(idx[2]), abs=1e-6)
    assert r.ct.GetSpacing() == labels.GetSpacing() and r.ct.GetDirection() == labels.GetDirection()
    coarse = synthesize(labels, names, table, seed=3, settings=SynthSettings(spacing=(6.0, 6.0, 6.0),
                                                                           scan=ScanSettings(crop_prob=0.0)))
    assert coarse.ct.GetSpacing() == (6.0, 6.0, 6.0) and coarse.ct.GetOrigin() == labels.GetOrigin()


def test_synthetic_training_source_is_deterministic_and_cached(tmp_path):
    spec = {"label_maps": [str(SAMPLE_LABELS)], "per_label_map": 2, "seed": 5, "spacing": [6, 6, 6]}
    first = synthetic_cases(spec, Path, [], tmp_path / "a")
    second = synthetic_cases(spec, Path, [], tmp_path / "b")
    assert [c.name for c in first] == [c.name for c in second] and len(first) == 2
    for x, y in zip(first, second):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(x.image))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(y.image))))
    stamp = first[0].image.stat().st_mtime_ns
    again = synthetic_cases(spec, Path, [], tmp_path / "a")
    assert again[0].image.stat().st_mtime_ns == stamp          # found, not regenerated
    assert first[0].image != first[1].image


def test_leave_one_out_folds_never_see_the_test_patient():
    spec = importlib.util.spec_from_file_location("loo", REPO / "configs" / "leave_one_out.py")
    loo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loo)   # type: ignore[union-attr]
    raw = json.loads((REPO / "configs" / "abdomen-ct.json").read_text(encoding="utf-8"))
    raw["data"]["synthetic"]["atlases"] = [c["name"] for c in raw["data"]["cases"]]   # the registration route too
    for case in raw["data"]["cases"]:
        held = loo._abs(case["label"])
        for variant in loo.VARIANTS:
            cfg = loo.fold_config(raw, case["name"], variant, threads=1)
            text = json.dumps(cfg)
            assert case["name"] not in [c["name"] for c in cfg["data"]["cases"]]
            assert held not in text and loo._abs(case["image"]) not in text
            syn = cfg["data"].get("synthetic")
            if variant == "real":
                assert syn is None
            else:
                assert case["name"] not in syn["table"]["measure"]
                assert case["name"] not in syn["atlases"] and len(syn["atlases"]) == len(raw["data"]["cases"]) - 1
                assert set(syn["table"]["measure"]) <= loo.NATIVE
            assert cfg["data"]["split"]["val"] == []
    # the recipe fine-tunes the demo, which was trained on the sample CT: that fold cannot be held out
    assert loo._init_model(raw, "s0009") == str((REPO / "Resources" / "Models" / "abdomen-ct-demo").resolve())
    with pytest.raises(SystemExit, match="trained on abdomen_ct_3mm"):
        loo._init_model(raw, "abdomen_ct_3mm")
    assert "s0003" not in loo._folds(raw, None)             # organ-free: trained on, never scored


def test_cli_writes_ct_labels_and_info_and_refuses_unknown_values(tmp_path):
    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "CascadeSegLib", "synth", str(SAMPLE_LABELS), "-o", str(out), "--n", "2",
           "--seed", "4", "--spacing", "6", "6", "6", "--phase", "arterial"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ct = sitk.ReadImage(str(out / "abdomen_ct_3mm_totalseg_synth1.nii.gz"))
    lab = sitk.ReadImage(str(out / "abdomen_ct_3mm_totalseg_synth1_label.nii.gz"))
    assert ct.GetSpacing() == lab.GetSpacing() == (6.0, 6.0, 6.0) and ct.GetOrigin() == lab.GetOrigin()
    assert json.loads((out / "abdomen_ct_3mm_totalseg_synth0.json").read_text())["phase"] == "arterial"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1
    # a label map with a value no table names: refused with the value in the message
    odd = sitk.Image([8, 8, 8], sitk.sitkUInt8)
    odd[4, 4, 4] = 200
    sitk.WriteImage(odd, str(tmp_path / "odd.nii.gz"))
    bad = subprocess.run([sys.executable, "-m", "CascadeSegLib", "synth", str(tmp_path / "odd.nii.gz"), "-o",
                          str(tmp_path / "o2")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "200" in bad.stderr and "--structures" in bad.stderr
    structures = tmp_path / "structures.json"
    structures.write_text(json.dumps({"200": "liver"}))
    ok = subprocess.run([sys.executable, "-m", "CascadeSegLib", "synth", str(tmp_path / "odd.nii.gz"), "-o",
                         str(tmp_path / "o3"), "--structures", str(structures)], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
