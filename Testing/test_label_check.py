"""`cascadeseg evaluate` checks label schemes before scoring; dataset presets (real processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_process import SAMPLE_CT, SAMPLE_TS, cascadeseg, error_lines

from CascadeSegLib.label_presets import PRESETS, preset_labels
from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet

STD = LabelSet.from_names(DEFAULT_ORGANS)


@pytest.fixture(scope="module")
def prediction(tmp_path_factory) -> Path:
    """The bundled model's segmentation of the sample CT, as the README makes it."""
    out = tmp_path_factory.mktemp("pred") / "abdomen_ct_3mm_labels.nii.gz"
    res = cascadeseg("segment", SAMPLE_CT, "-o", out, "--quiet")
    assert res.returncode == 0, res.stderr
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _metrics(folder: Path) -> dict:
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return next(iter(next(iter(doc["methods"].values()))["cases"].values()))["organs"]


def keep_a_corner(arr: np.ndarray, value: int) -> None:
    """Leave a 2x2x2 block of `value`: a volume far below a tenth of the organ."""
    idx = np.argwhere(arr == value)
    z, y, x = idx[0]
    block = arr[z:z + 2, y:y + 2, x:x + 2] == value
    arr[arr == value] = 0
    arr[z:z + 2, y:y + 2, x:x + 2][block] = value


def test_totalsegmentator_reference_is_refused_without_preset_and_scored_with_it(prediction, tmp_path):
    res = cascadeseg("evaluate", prediction, SAMPLE_TS, "-o", tmp_path / "bad", "--quiet", "--no-plots")
    assert res.returncode == 2 and not (tmp_path / "bad").exists()
    (line,) = error_lines(res.stderr)
    assert line.startswith("cascadeseg: error: the reference holds label values that --ref-labels (not given")
    assert "11, 14, 18, 19, 20" in line and "--ref-labels (totalsegmentator|btcv|amos|" in line
    res = cascadeseg("evaluate", prediction, SAMPLE_TS, "-o", tmp_path / "good", "--ref-labels", "totalsegmentator",
                     "--quiet", "--no-plots", "--no-distances")
    assert res.returncode == 0, res.stderr
    organs = _metrics(tmp_path / "good")
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_TS)))
    ts_value = {name: value for value, name in PRESETS["totalsegmentator"].items()}
    for organ in DEFAULT_ORGANS:
        assert organs[organ]["dice"] == pytest.approx(_dice(pred == STD.by_name(organ).value, ref == ts_value[organ]))
    assert organs["liver"]["dice"] > 0.8  # the model was trained on this CT


def test_swapped_organ_values_are_caught_by_their_volumes(prediction, tmp_path):
    """Values all named, but liver and gallbladder swapped: only the volumes can tell."""
    ts = sitk.ReadImage(str(SAMPLE_TS))
    arr = sitk.GetArrayFromImage(ts)
    lut = np.zeros(arr.max() + 1, np.uint8)
    ts_value = {name: value for value, name in PRESETS["totalsegmentator"].items()}
    for organ in DEFAULT_ORGANS:
        lut[ts_value[organ]] = STD.by_name(organ).value
    liver, gb = STD.by_name("liver").value, STD.by_name("gallbladder").value
    lut[ts_value["liver"]], lut[ts_value["gallbladder"]] = gb, liver
    swapped = sitk.GetImageFromArray(lut[arr])
    swapped.CopyInformation(ts)
    ref = tmp_path / "ref.nii.gz"
    sitk.WriteImage(swapped, str(ref))
    res = cascadeseg("evaluate", prediction, ref, "-o", tmp_path / "rep", "--quiet", "--no-plots")
    assert res.returncode == 2 and not (tmp_path / "rep").exists()
    (line,) = error_lines(res.stderr)
    assert "organ volumes differ by more than 10x between prediction and reference: liver" in line
    assert "gallbladder" in line and "--no-label-check" in line and "label values that" not in line
    res = cascadeseg("evaluate", prediction, ref, "-o", tmp_path / "rep", "--quiet", "--no-plots", "--no-distances",
                     "--no-label-check")
    assert res.returncode == 0 and _metrics(tmp_path / "rep")["liver"]["dice"] < 0.01  # scored as asked


def test_compare_checks_prediction_folders_as_evaluate_does(prediction, tmp_path):
    """`compare A B --ref REF` scores prediction folders itself, so the same label check runs first:
    an unnamed reference scheme is refused, a lone missed organ is scored with a warning."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "a" / prediction.name).write_bytes(prediction.read_bytes())
    (tmp_path / "ref" / "abdomen_ct_3mm.nii.gz").write_bytes(SAMPLE_TS.read_bytes())
    pred_img = sitk.ReadImage(str(prediction))
    missed = sitk.GetArrayFromImage(pred_img)
    keep_a_corner(missed, STD.by_name("spleen").value)
    one = sitk.GetImageFromArray(missed)
    one.CopyInformation(pred_img)
    sitk.WriteImage(one, str(tmp_path / "b" / prediction.name))

    res = cascadeseg("compare", tmp_path / "a", tmp_path / "b", "--ref", tmp_path / "ref", "-o", tmp_path / "bad",
                     "--quiet", "--no-plots")
    assert res.returncode == 2 and not (tmp_path / "bad").exists()
    (line,) = error_lines(res.stderr)
    assert line.startswith("cascadeseg: error: the reference holds label values that --ref-labels (not given")

    res = cascadeseg("compare", tmp_path / "a", tmp_path / "b", "--ref", tmp_path / "ref", "-o", tmp_path / "rep",
                     "--ref-labels", "totalsegmentator", "--quiet", "--no-plots")
    assert res.returncode == 0, res.stderr
    (line,) = error_lines(res.stderr)
    assert line.startswith(f"cascadeseg: warning: {tmp_path / 'b'}: spleen ") and "other organs agree" in line
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    assert doc["warnings"] == doc["label_check_warnings"] == [line.removeprefix("cascadeseg: warning: ")]
    assert f"### Label check\n\n- {doc['warnings'][0]}\n" in (tmp_path / "rep" / "compare.md").read_text("utf-8")
    spleen = doc["methods"]["b"]["cases"]["abdomen_ct_3mm"]["organs"]["spleen"]["dice"]
    assert spleen < 0.05 and doc["methods"]["a"]["cases"]["abdomen_ct_3mm"]["organs"]["spleen"]["dice"] > 0.8


def test_ircadb_mask_named_after_its_organ(prediction, tmp_path):
    ts = sitk.ReadImage(str(SAMPLE_TS))
    mask = sitk.Cast(sitk.BinaryThreshold(ts, 5, 5, 255, 0), sitk.sitkUInt8)  # TotalSegmentator liver
    (tmp_path / "MASKS").mkdir()
    sitk.WriteImage(mask, str(tmp_path / "MASKS" / "liver.nrrd"))
    res = cascadeseg("evaluate", prediction, tmp_path / "MASKS" / "liver.nrrd", "-o", tmp_path / "rep",
                     "--ref-labels", "ircadb", "--labels", "abdomen-ct-demo", "--quiet", "--no-plots",
                     "--no-distances", "--no-label-check")
    assert res.returncode == 0, res.stderr
    organs = _metrics(tmp_path / "rep")
    assert list(organs) == ["liver"]
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    assert organs["liver"]["dice"] == pytest.approx(_dice(pred == 1, sitk.GetArrayFromImage(mask) == 255))
    res = cascadeseg("evaluate", prediction, SAMPLE_TS, "-o", tmp_path / "rep2", "--ref-labels", "ircadb")
    assert res.returncode == 2 and "--ref-labels ircadb needs one 3D-IRCADb-01 mask" in res.stderr


def test_presets_follow_the_published_label_lists():
    """Spot checks against each dataset's documentation (ids that are easy to get wrong)."""
    ts = PRESETS["totalsegmentator"]
    assert len(ts) == 117 and (ts[1], ts[5], ts[7], ts[52], ts[63], ts[64]) == (
        "spleen", "liver", "pancreas", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein")
    assert (ts[26], ts[50], ts[92], ts[115], ts[117]) == ("vertebrae_S1", "vertebrae_C1", "rib_left_1",
                                                          "rib_right_12", "costal_cartilages")
    btcv, amos = PRESETS["btcv"], PRESETS["amos"]
    assert len(btcv) == 13 and (btcv[6], btcv[10], btcv[11]) == ("liver", "portal_vein_and_splenic_vein", "pancreas")
    assert len(amos) == 15 and (amos[9], amos[10], amos[13], amos[14]) == (
        "inferior_vena_cava", "pancreas", "duodenum", "urinary_bladder")
    assert PRESETS["msd-liver"] == {1: "liver", 2: "liver_tumor"} and PRESETS["msd-spleen"] == {1: "spleen"}
    assert PRESETS["msd-pancreas"] == {1: "pancreas", 2: "pancreas_tumor"}
    # Every preset is a valid label set whose organs the standard table colours and codes.
    for name in PRESETS:
        labels = preset_labels(name)
        assert [lab.value for lab in labels] == sorted(PRESETS[name])
    assert preset_labels("btcv").by_name("liver").type_code == STD.by_name("liver").type_code


def test_one_missed_organ_is_scored_with_a_warning_two_are_refused(prediction, tmp_path):
    """A weak model's real miss (one organ almost absent) is scored; a second such organ is a mix-up."""
    ts = sitk.ReadImage(str(SAMPLE_TS))
    ts_value = {name: value for value, name in PRESETS["totalsegmentator"].items()}
    pred_img = sitk.ReadImage(str(prediction))
    pred = sitk.GetArrayFromImage(pred_img)
    ref = sitk.GetArrayFromImage(ts)

    spleen = STD.by_name("spleen").value
    assert (ref == ts_value["spleen"]).sum() > 100 * 8 and (pred == spleen).sum() > 100 * 8
    missed = pred.copy()
    keep_a_corner(missed, spleen)
    one = sitk.GetImageFromArray(missed)
    one.CopyInformation(pred_img)
    sitk.WriteImage(one, str(tmp_path / "one.nii.gz"))
    res = cascadeseg("evaluate", tmp_path / "one.nii.gz", SAMPLE_TS, "-o", tmp_path / "rep1", "--ref-labels",
                     "totalsegmentator", "--quiet", "--no-plots", "--no-distances")
    assert res.returncode == 0, res.stderr
    (line,) = error_lines(res.stderr)
    assert line.startswith("cascadeseg: warning: spleen ") and "other organs agree" in line
    doc = json.loads((tmp_path / "rep1" / "metrics.json").read_text(encoding="utf-8"))
    assert doc["label_check_warnings"] == [line.removeprefix("cascadeseg: warning: ")]
    assert doc["warnings"] == doc["label_check_warnings"]  # printed once, with the report line
    summary = (tmp_path / "rep1" / "summary.md").read_text(encoding="utf-8")
    assert f"### Label check\n\n- {doc['label_check_warnings'][0]}\n" in summary
    organs = _metrics(tmp_path / "rep1")
    assert organs["spleen"]["dice"] == pytest.approx(_dice(missed == spleen, ref == ts_value["spleen"]))
    assert organs["spleen"]["dice"] < 0.05

    keep_a_corner(missed, STD.by_name("liver").value)
    two = sitk.GetImageFromArray(missed)
    two.CopyInformation(pred_img)
    sitk.WriteImage(two, str(tmp_path / "two.nii.gz"))
    res = cascadeseg("evaluate", tmp_path / "two.nii.gz", SAMPLE_TS, "-o", tmp_path / "rep2", "--ref-labels",
                     "totalsegmentator", "--quiet", "--no-plots", "--no-distances")
    assert res.returncode == 2 and not (tmp_path / "rep2").exists()
    (line,) = error_lines(res.stderr)
    assert "organ volumes differ by more than 10x" in line and "liver" in line and "spleen" in line
