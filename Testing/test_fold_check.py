"""configs/fold_check.py (the leave-one-out checks of docs/abdomen-ct-recipe.md): where the slabs
are cut, what counts as a false organ, atlases registered once per image, and the whole check on
the sample CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from config_scripts import load_config_script

from CascadeSegLib.inference import atlas_prior
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.io import read_image
from CascadeSegLib.packaging.model import load_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
NEGATIVE_CT = REPO / "Resources" / "TrainingData" / "totalsegmentator" / "s0003_ct.nii.gz"   # none of the organs


@pytest.fixture(scope="module")
def mod():
    return load_config_script("fold_check")


def _reference(mod, ct: sitk.Image, model) -> tuple[sitk.Image, dict[str, int]]:
    values = {o: model.labels.by_name(o).value for o in model.labels.names}
    return mod.reference_on_grid(SAMPLE_LABELS, ct, model.labels.names, values), values


def test_cut_slabs_run_evenly_over_the_slices_holding_liver_and_spleen(mod, sample_ct_path):
    ct = read_image(sample_ct_path)
    ref, values = _reference(mod, ct, load_model("abdomen-ct-demo"))
    arr = sitk.GetArrayFromImage(ref)
    both = np.nonzero((arr == values["liver"]).any((1, 2)) & (arr == values["spleen"]).any((1, 2)))[0]
    slices = int(round(mod.SLAB_MM / ct.GetSpacing()[2]))
    starts = mod.slab_starts(arr, values["liver"], values["spleen"], slices)
    assert len(both) > slices
    assert starts[0] == both[0] and starts[-1] + slices - 1 == both[-1]
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert mod.span_starts(ct.GetSize()[2], slices) == [int(f * (ct.GetSize()[2] - slices)) for f in mod.FRACTIONS]
    with pytest.raises(ValueError, match="no slice with both liver and spleen"):
        mod.slab_starts(np.where(arr == values["spleen"], 0, arr), values["liver"], values["spleen"], slices)


@pytest.mark.parametrize("rows, expected", [
    (range(30, 35), [25, 26, 27, 28, 30]),      # 5 shared slices mid-scan: every 10-slice slab holds them all
    (range(45, 50), [40]),                      # at the scan's top edge: the one slab inside the scan
    (range(10, 30), [10, 12, 15, 17, 20]),      # 20 slices: the slabs lie within them
])
def test_cut_slabs_hold_liver_and_spleen_and_stay_inside_the_scan(mod, rows, expected):
    ref = np.zeros((50, 3, 3), np.uint8)
    ref[:, 0] = 1                               # liver on every slice
    ref[list(rows), 1] = 2                      # spleen on `rows`
    starts = mod.slab_starts(ref, 1, 2, 10)
    assert starts == expected
    assert all(0 <= k and k + 10 <= 50 for k in starts)
    with pytest.raises(ValueError, match="fewer than one 60-slice slab"):
        mod.slab_starts(ref, 1, 2, 60)


def test_false_organ_ml_counts_only_organs_the_reference_lacks(mod):
    ref = np.zeros((4, 5, 6), np.uint8)
    ref[:2] = 1                                   # liver in the reference
    pred = ref.copy()
    pred[2:] = 1                                  # too much liver: wrong, but not a false organ
    pred[3, 0, :5] = 2                            # 5 voxels of spleen, which the reference lacks
    images = []
    for arr in (pred, ref):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((2.0, 2.0, 3.0))           # 12 mm^3 a voxel
        images.append(img)
    assert mod.false_organ_ml(*images, {"liver": 1, "spleen": 2}) == pytest.approx(5 * 12 / 1000)


def test_atlases_are_registered_once_and_fused_as_a_fresh_segmenter_would(mod, sample_ct_path, monkeypatch):
    """Two weights on one 40 mm slab of the sample CT (bundled abdomen-ct, three of its atlases):
    one registration, and at each weight the labels of a Segmenter that registers anew."""
    model = load_model("abdomen-ct")
    model.atlas_prior.atlases = [a for a in model.atlas_prior.atlases
                                 if a.name in ("abdomen_ct_3mm", "s0009", "reg-s0001-s0009")]
    assert len(model.atlas_prior.atlases) == 3
    ct = read_image(sample_ct_path)
    ref, values = _reference(mod, ct, model)
    slices = int(round(mod.SLAB_MM / ct.GetSpacing()[2]))
    k = mod.slab_starts(sitk.GetArrayFromImage(ref), values["liver"], values["spleen"], slices)[2]
    slab, slab_ref = ct[:, :, k:k + slices], ref[:, :, k:k + slices]
    calls = []
    real = atlas_prior.atlas_prior

    def counted(image, *args, **kwargs):
        calls.append(image.GetSize())
        return real(image, *args, **kwargs)

    monkeypatch.setattr(atlas_prior, "atlas_prior", counted)
    once = mod.RegisterOnce(model)
    with pytest.raises(KeyError, match="segment the image first"):
        once.prior_labels(slab)
    for w in (0.5, 0.9):
        model.atlas_prior.network_weight = w
        cached = sitk.GetArrayFromImage(once.segment(slab).labels)
        fresh = sitk.GetArrayFromImage(Segmenter(model, device="cpu").segment(slab).labels)
        np.testing.assert_array_equal(cached, fresh)
    assert len(calls) == 3                        # RegisterOnce once, the two fresh Segmenters once each
    alone = once.prior_labels(slab)
    assert alone.GetSize() == slab.GetSize() and alone.GetOrigin() == slab.GetOrigin()
    assert alone.GetSpacing() == slab.GetSpacing() and alone.GetDirection() == slab.GetDirection()
    dice, _ = mod.dice_per_organ(alone, slab_ref, values)
    assert dice["liver"] > 0.8                    # the sample CT is one of the bundled atlases


def test_the_whole_check_on_the_sample_ct(mod, sample_ct_path, tmp_path, capsys):
    """The demo model (no atlases, trained on the sample CT): rows per weight, no atlases-alone
    row; bad weights exit 2 with one line."""
    out = tmp_path / "check.json"
    args = ["--model", str(REPO / "Resources" / "Models" / "abdomen-ct-demo"), "--ct", str(sample_ct_path),
            "--labels", str(SAMPLE_LABELS)]
    assert mod.main(args + ["--weights", "1.5"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert mod.main(args + ["--negative", str(NEGATIVE_CT), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert list(result["fused"]) == ["1"] and "atlases_alone" not in result
    row = result["fused"]["1"]
    assert row["whole"] > 0.5 and row["organs"]["liver"]["whole"] > 0.9
    assert len(result["cut_slabs"]) == 5 and len(row["false_ml"]) == 5
    assert f"| fused, w 1 | {row['whole']:.4f} | {row['slabs']:.4f} |" in table
    # the organ-free CT: every organ voxel a plain Segmenter labels there, in ml
    negative = read_image(NEGATIVE_CT)
    labels = sitk.GetArrayFromImage(Segmenter(load_model("abdomen-ct-demo"), device="cpu").segment(negative).labels)
    expected = round(float((labels > 0).sum()) * float(np.prod(negative.GetSpacing())) / 1000.0, 1)
    assert row["negative_ml"] == [expected]
    assert table.splitlines()[2].endswith("| organs on organ-free CTs (ml) |")
    assert table.splitlines()[4].endswith(f"| {expected:g} |")


def test_settings_are_changed_as_model_json_would_be_read(mod):
    model = mod.with_settings(load_model("abdomen-ct"), ["mixup_share=0.8", 'mixup_organs=["spleen", "kidney_left"]',
                                                         "network_weight=0.9", "intensity_weight=0.5"])
    assert model.atlas_prior.mixup_share == 0.8 and model.atlas_prior.network_weight == 0.9
    assert model.atlas_prior.intensity_weight == 0.5
    assert model.atlas_prior.mixup_organs == ("spleen", "kidney_left")
    for bad, message in ((["network_weight=1.5"], "outside"), (["no_such_key=1"], "known atlas_prior KEY"),
                         (['atlases=[]'], "known atlas_prior KEY"),
                         (["mixup_share=0.8", 'mixup_organs=["spleen", "lung"]'], "unknown organs"),
                         (["network_weight=0,5"], "not JSON")):
        with pytest.raises(ValueError, match=message):
            mod.with_settings(load_model("abdomen-ct"), bad)
    with pytest.raises(ValueError, match="no atlas_prior"):
        mod.with_settings(load_model("abdomen-ct-demo"), ["network_weight=0.5"])


def test_organ_cells_are_rounded(mod):
    """Per-organ Dice in the table is rounded to two places (0.8783 is 0.88; it was once cut to 0.87),
    a missing organ is '-', and the means keep four places."""
    organs = {"liver": {"whole": 0.8783, "slabs": 0.8749}, "spleen": {"whole": 1.0, "slabs": None}}
    row = {"whole": 0.72211, "slabs": 0.66251, "organs": organs, "false_ml": [0.0, 96.8]}
    table = mod.markdown({"model": "m 1", "cut_slabs": [0], "fused": {"0.5": row}}, ["liver", "spleen"])
    assert "| fused, w 0.5 | 0.7221 | 0.6625 | 0.88 / 0.87 | 1.00 / - | 0 / 96.8 |" in table.splitlines()
