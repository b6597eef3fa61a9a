"""The corrections store on real CTs: matching Segment Editor files, geometry, safety.

The sample CT with its TotalSegmentator labels and the DICOM slab with its (y-flipped) label
map stand in for a clinician's corrections; the model is a small random package, since only
its label list matters here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from model_factory import make_random_model

from CascadeSegLib.cli import main
from CascadeSegLib.corrections import add_correction, list_corrections, remove_correction, store_dir
from CascadeSegLib.errors import UserError
from CascadeSegLib.io import read_image
from CascadeSegLib.labels import LabelSet

ORGANS = ("liver", "spleen", "kidney_right")
TS = {5: "liver", 1: "spleen", 2: "kidney_right"}


@pytest.fixture(autouse=True)
def models_root(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("CASCADESEG_MODELS", str(root))
    return root


@pytest.fixture()
def model(tmp_path: Path):
    return make_random_model(tmp_path / "pkg", organs=ORGANS)


def model_values(ts_path: Path, labels: LabelSet) -> sitk.Image:
    """A TotalSegmentator label map in the model's values (other structures dropped)."""
    from CascadeSegLib.train.dataset import label_lookup

    img = sitk.ReadImage(str(ts_path))
    out = sitk.GetImageFromArray(label_lookup(labels, TS)[sitk.GetArrayFromImage(img)])
    out.CopyInformation(img)
    return out


def cropped_seg_nrrd(labels_img: sitk.Image, path: Path, segments: list[tuple[str, str, str, int]]) -> np.ndarray:
    """A .seg.nrrd like Slicer writes: cropped to the labelled box, own IDs/names/label values.

    `segments` are (ID, name, terminology, model value); the file stores value i + 1 for the
    i-th segment. Returns what the model-valued array should be on the CT grid.
    """
    a = sitk.GetArrayFromImage(labels_img)
    nz = np.argwhere(a > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    sub = a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    file_values = np.zeros_like(sub)
    expected = np.zeros_like(a)
    for i, (_, _, _, value) in enumerate(segments):
        file_values[sub == value] = i + 1
        expected[a == value] = value
    img = sitk.GetImageFromArray(file_values.astype(np.uint8))
    img.SetSpacing(labels_img.GetSpacing())
    img.SetDirection(labels_img.GetDirection())
    img.SetOrigin(labels_img.TransformIndexToPhysicalPoint([int(lo[2]), int(lo[1]), int(lo[0])]))
    for i, (sid, name, term, _) in enumerate(segments):
        for key, val in (("ID", sid), ("Name", name), ("LabelValue", str(i + 1)), ("Layer", "0"),
                         ("Tags", f"TerminologyEntry:{term}|" if term else "")):
            img.SetMetaData(f"Segment{i}_{key}", val)
    sitk.WriteImage(img, str(path), True)
    return expected


def test_seg_nrrd_segments_are_matched_by_id_name_and_terminology(model, sample_ct_path, tmp_path):
    labels = model.labels
    truth = model_values(sample_ct_path.parent / "abdomen_ct_3mm_totalseg.nii.gz", labels)
    liver, spleen, kidney = (labels.by_name(n) for n in ORGANS)
    seg = tmp_path / "corrected.seg.nrrd"
    expected = cropped_seg_nrrd(truth, seg, [
        ("Segment_1", "Segment_1", liver.terminology(), liver.value),         # terminology only
        ("Segment_2", "SPLEEN", "", spleen.value),                            # name, other case
        ("kidney_right", "my kidney", "", kidney.value)])                     # ID
    case = add_correction(model.name, labels, sample_ct_path, seg)
    assert case.id == "abdomen_ct_3mm" and case.reviewed == ORGANS
    stored = sitk.ReadImage(str(case.labels))
    ct = sitk.ReadImage(str(sample_ct_path))
    assert stored.GetSize() == ct.GetSize() and stored.GetOrigin() == ct.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(case.ct)), sitk.GetArrayFromImage(ct))
    assert case.voxels["liver"] == int((expected == liver.value).sum()) > 1000
    assert [c.id for c in list_corrections(model.name)] == ["abdomen_ct_3mm"]


def test_flipped_label_map_of_a_dicom_series_lands_on_the_ct_grid(model, dicom_slab_dir, dicom_slab_seg_path, tmp_path):
    labels = model.labels
    lab = model_values(dicom_slab_seg_path, labels)
    path = tmp_path / "slab_labels.nii.gz"
    sitk.WriteImage(lab, str(path))
    case = add_correction(model.name, labels, dicom_slab_dir, path, case_id="slab", reviewed=["liver"])
    assert case.reviewed == ("liver",)
    stored = sitk.ReadImage(str(case.labels))
    ct = read_image(dicom_slab_dir)
    assert stored.GetDirection() == ct.GetDirection() and stored.GetOrigin() == ct.GetOrigin()
    # same voxels, y flipped back: the file's rows in reverse order
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(lab)[:, ::-1, :])


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadeseg: error: ") and "\n" not in err
    return err


def test_bad_corrections_get_one_line_errors_and_store_nothing(model, sample_ct_path, tmp_path, capsys):
    ts = sample_ct_path.parent / "abdomen_ct_3mm_totalseg.nii.gz"
    truth = model_values(ts, model.labels)
    seg = tmp_path / "extra.seg.nrrd"
    cropped_seg_nrrd(truth, seg, [("liver", "Liver", "", 1), ("Segment_7", "Tumour", "", 2)])
    m = str(model.root)
    err = _cli_error(capsys, ["corrections", "add", str(sample_ct_path), str(seg), "--model", m])
    assert "'Tumour'" in err and "liver, spleen, kidney_right" in err
    # a label map in TotalSegmentator ids is not in the model's values (5 = liver there)
    err = _cli_error(capsys, ["corrections", "add", str(sample_ct_path), str(ts), "--model", m])
    assert "label value(s) [4, 5, 6" in err
    # geometry: half a voxel off, or another spacing
    shifted = sitk.Image(truth)
    shifted.SetOrigin([o + 1.5 for o in truth.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    err = _cli_error(capsys, ["corrections", "add", str(sample_ct_path), str(tmp_path / "shifted.nii.gz"),
                              "--model", m])
    assert "not on the CT's voxel grid" in err
    # empty, and reviewed organs that are not labelled
    empty = sitk.Image(truth) * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    err = _cli_error(capsys, ["corrections", "add", str(sample_ct_path), str(tmp_path / "empty.nii.gz"), "--model", m])
    assert "empty" in err
    sitk.WriteImage(truth, str(tmp_path / "ok.nii.gz"))
    err = _cli_error(capsys, ["corrections", "add", str(sample_ct_path), str(tmp_path / "ok.nii.gz"), "--model", m,
                              "--reviewed", "pancreas"])
    assert "pancreas" in err
    assert list_corrections(model.name) == []
    assert not store_dir(model.name).exists() or not any(store_dir(model.name).iterdir())


def test_cli_add_list_remove_and_replace(model, sample_ct_path, tmp_path, capsys):
    truth = model_values(sample_ct_path.parent / "abdomen_ct_3mm_totalseg.nii.gz", model.labels)
    sitk.WriteImage(truth, str(tmp_path / "ok.nii.gz"))
    m = str(model.root)
    add = ["corrections", "add", str(sample_ct_path), str(tmp_path / "ok.nii.gz"), "--model", m, "--case", "c1"]
    assert main(add + ["--reviewed", "liver,spleen", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["id"] == "c1" and row["reviewed"] == ["liver", "spleen"]
    err = _cli_error(capsys, add)
    assert "already has a correction 'c1'" in err
    assert main(add + ["--replace"]) == 0
    capsys.readouterr()
    assert main(["corrections", "list", "--model", m, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["c1"] and rows[0]["reviewed"] == list(ORGANS)
    err = _cli_error(capsys, ["corrections", "remove", "nope", "--model", m])
    assert "(stored: c1)" in err
    assert main(["corrections", "remove", "c1", "--model", m]) == 0
    assert list_corrections(model.name) == [] and list(store_dir(model.name).iterdir()) == []


def test_a_failed_write_leaves_the_store_as_it_was(model, sample_ct_path, tmp_path, monkeypatch):
    import CascadeSegLib.io as io

    truth = model_values(sample_ct_path.parent / "abdomen_ct_3mm_totalseg.nii.gz", model.labels)
    sitk.WriteImage(truth, str(tmp_path / "ok.nii.gz"))
    first = add_correction(model.name, model.labels, sample_ct_path, tmp_path / "ok.nii.gz", case_id="c1",
                           reviewed=["liver"])
    before = {p.name: p.read_bytes() for p in first.folder.iterdir()}
    real = io.write_image

    def failing(image, path, *a, **k):
        if Path(path).name == "labels.nii.gz":
            raise OSError("disk full")
        return real(image, path, *a, **k)

    monkeypatch.setattr(io, "write_image", failing)
    for case_id in ("c1", "c2"):
        with pytest.raises(OSError, match="disk full"):
            add_correction(model.name, model.labels, sample_ct_path, tmp_path / "ok.nii.gz", case_id=case_id,
                           replace=True)
    assert sorted(p.name for p in store_dir(model.name).iterdir()) == ["c1"]
    assert {p.name: p.read_bytes() for p in first.folder.iterdir()} == before
    remove_correction(model.name, "c1")
    with pytest.raises(UserError, match="no correction 'c1'"):
        remove_correction(model.name, "c1")
