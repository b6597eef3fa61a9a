"""configs/compare_bundled.py (the comparison table of docs/comparison.md): its Dice, reference remapping and messages.

The script itself runs for minutes; these check its pieces on tiny arrays in well under a second.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("compare_bundled", REPO / "configs" / "compare_bundled.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod              # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    return img


def test_missing_2d_model_fails_with_one_line_saying_how_to_train(tmp_path, capsys):
    rc = _script().main(["--model2d", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cascadeseg baseline2d train configs/baseline2d-abdomen-ct-demo.json" in err
    assert not (tmp_path / "out").exists()


def test_dice_per_organ_absent_organs_and_false_positives():
    mod = _script()
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1                    # liver: 32 voxels, 16 of them predicted
    pred[:1] = 1
    pred[3, 0, 0] = 2              # spleen predicted, not in the reference
    dice, fp = mod.dice_per_organ(_image(pred), _image(ref), {"liver": 1, "spleen": 2, "aorta": 3})
    assert dice["liver"] == 2 * 16 / (32 + 16)
    assert dice["spleen"] is None and dice["aorta"] is None
    assert dice["mean"] == dice["liver"] and fp == ["spleen"]
    cell = mod.fmt(dice["spleen"], "spleen" in fp)
    assert cell.startswith(mod.NOT_IN_IMAGE) and cell != mod.NOT_IN_IMAGE


def test_reference_is_remapped_to_model_values_on_the_ct_grid(tmp_path):
    mod = _script()
    ts = np.zeros((3, 4, 5), np.uint8)
    ts[0] = 5                      # TotalSegmentator liver
    ts[1] = 52                     # aorta
    ts[2, 0, 0] = 99               # a structure the models do not have
    path = tmp_path / "ref.nii.gz"
    sitk.WriteImage(_image(ts), str(path))
    ct = _image(np.zeros((3, 4, 5), np.int16))
    out = mod.reference_on_grid(path, ct, ["liver", "aorta"], {"liver": 1, "aorta": 8})
    arr = sitk.GetArrayFromImage(out)
    assert out.GetSize() == ct.GetSize() and out.GetSpacing() == ct.GetSpacing()
    assert (arr[0] == 1).all() and (arr[1] == 8).all() and not arr[2].any()


def test_iteration_cells():
    cell = _script().iteration_cell
    assert [cell(0, False, 10), cell(3, True, 10), cell(10, False, 10), cell(1, False, 10)] == ["0", "3c", "10m", "1x"]
    assert cell(4, False, 10, cycled=True) == "4r"
