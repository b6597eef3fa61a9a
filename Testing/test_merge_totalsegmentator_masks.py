"""configs/merge_totalsegmentator_masks.py: a TotalSegmentator case's per-structure masks become one
label map in v2 ids on the masks' own grid (how s0327 and s0328 came into Resources/TrainingData)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
TS = REPO / "Resources" / "TrainingData" / "totalsegmentator"


def _script():
    spec = importlib.util.spec_from_file_location("merge_masks", REPO / "configs" / "merge_totalsegmentator_masks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)   # type: ignore[union-attr]
    return mod


def _mask(arr: np.ndarray, origin=(10.5, -3.25, 7.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing((1.5, 1.25, 2.0))
    img.SetOrigin(origin)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def _case(folder: Path) -> dict[str, np.ndarray]:
    """Three masks: liver and spleen apart, the aorta overlapping the liver by two voxels."""
    folder.mkdir()
    shape = (6, 7, 8)
    masks = {name: np.zeros(shape, bool) for name in ("liver", "spleen", "aorta")}
    masks["liver"][1:3, 1:4, 1:4] = True
    masks["spleen"][4:6, 2:5, 5:8] = True
    masks["aorta"][2, 3, 3:6] = True                 # (2, 3, 3) is liver too
    for name, m in masks.items():
        sitk.WriteImage(_mask(m), str(folder / f"{name}.nii.gz"), True)
    return masks


def test_masks_merge_into_v2_ids_on_the_masks_grid(tmp_path, capsys):
    ids = {n: int(i) for i, n in json.loads((TS / "classes.json").read_text(encoding="utf-8")).items()}
    masks = _case(tmp_path / "segmentations")
    out = tmp_path / "case_label.nii.gz"
    assert _script().main([str(tmp_path / "segmentations"), "-o", str(out)]) == 0
    img = sitk.ReadImage(str(out))
    ref = _mask(np.zeros((6, 7, 8)))
    assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
    assert img.GetOrigin() == ref.GetOrigin() and img.GetDirection() == ref.GetDirection()
    arr = sitk.GetArrayFromImage(img)
    assert ids["aorta"] > ids["liver"]                      # so the overlap voxel is aorta
    expected = np.zeros(arr.shape, np.uint8)
    for name in ("liver", "spleen", "aorta"):
        expected[masks[name]] = ids[name]
    assert np.array_equal(arr, expected)
    assert "1 voxels were in two masks" in capsys.readouterr().out


def test_bad_inputs_get_one_line_and_exit_2_and_nothing_is_overwritten(tmp_path, capsys):
    script = _script()
    folder = tmp_path / "segmentations"
    _case(folder)
    out = tmp_path / "label.nii.gz"
    out.write_bytes(b"keep me")
    assert script.main([str(folder), "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"

    sitk.WriteImage(_mask(np.ones((6, 7, 8)), origin=(0.0, 0.0, 0.0)), str(folder / "stomach.nii.gz"), True)
    assert script.main([str(folder), "-o", str(tmp_path / "a.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another grid" in err and not (tmp_path / "a.nii.gz").exists()

    (folder / "stomach.nii.gz").unlink()
    sitk.WriteImage(_mask(np.ones((6, 7, 8))), str(folder / "not_a_structure.nii.gz"), True)
    assert script.main([str(folder), "-o", str(tmp_path / "b.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_a_structure" in err


def test_the_committed_label_maps_hold_all_ten_organs():
    """s0327, s0328 and s0011 (merged by the script) carry every organ of the default model."""
    organs = (1, 2, 3, 4, 5, 6, 7, 52, 63, 64)       # v2 ids of our ten structures
    for case in ("s0327", "s0328", "s0011"):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(TS / f"{case}_label.nii.gz")))
        present = set(np.unique(arr).tolist())
        assert set(organs) <= present, case
