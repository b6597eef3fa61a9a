"""configs/grid_check.py (the recipe's thirtieth round): the grids it makes keep the CT's place
in space, thicker slices average what they cover, and the whole check on the sample CT scores the
native grid exactly as a plain segmentation is scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from config_scripts import load_config_script

from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.io import read_image
from CascadeSegLib.packaging.model import load_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"


@pytest.fixture(scope="module")
def mod():
    return load_config_script("grid_check")


def test_grids_are_parsed_with_native_axes_and_bad_ones_refused(mod):
    native = (0.7, 0.7, 3.0)
    assert mod.parse_grid("native", native) is None
    assert mod.parse_grid("0.8,0.8,native", native) == (0.8, 0.8, 3.0)
    assert mod.parse_grid("native,native,5", native) == (0.7, 0.7, 5.0)
    for bad in ("0.8,0.8", "0.8,0,1", "a,1,1", "1,1,-2"):
        with pytest.raises(ValueError):
            mod.parse_grid(bad, native)


def test_regrid_keeps_origin_direction_and_extent_and_averages_thick_slices(mod):
    arr = np.full((20, 12, 10), -1000, np.int16)        # (z, y, x)
    arr[:, 4:8, 3:7] = 100                               # a column along z: constant along the slices
    arr[8, :, :] = 900                                   # one bright 1 mm slice, where a 4 mm slice's centre falls
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((-12.5, 30.25, 7.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = mod.regrid(img, (0.5, 0.5, 4.0))
    assert out.GetOrigin() == img.GetOrigin() and out.GetDirection() == img.GetDirection()
    assert out.GetSpacing() == (0.5, 0.5, 4.0) and out.GetSize() == (20, 24, 5)
    assert out.GetPixelID() == img.GetPixelID()
    got = sitk.GetArrayFromImage(out)
    assert got[0, 10, 8] == 100                          # inside the column, away from the bright slice
    # the bright slice, 1 mm of the 4 mm slice centred on it, is averaged down, not sampled at 900 HU
    assert -1000 < got[2, 0, 0] < 0
    same = mod.regrid(img, (1.0, 1.0, 1.0))              # the native spacing: voxels unchanged
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), arr)


def test_the_native_grid_is_scored_as_a_plain_segmentation_and_other_grids_beside_it(mod, sample_ct_path, tmp_path):
    out = tmp_path / "grid.json"
    code = mod.main(["--model", "abdomen-ct-demo", "--ct", str(sample_ct_path), "--labels", str(SAMPLE_LABELS),
                     "--grids", "native", "1.5,1.5,native", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    model = load_model("abdomen-ct-demo")
    ct = read_image(sample_ct_path)
    values = {o: model.labels.by_name(o).value for o in model.labels.names}
    plain = mod.dice_per_organ(Segmenter(model, device="cpu").segment(ct).labels,
                               mod.reference_on_grid(SAMPLE_LABELS, ct, model.labels.names, values), values)[0]
    assert result["grids"]["native"] == plain
    finer = result["grids"]["1.5,1.5,native"]
    assert set(finer) == set(plain) and finer["liver"] > 0.5       # the demo was trained on this CT
    for organ, spread in result["range"].items():
        both = (plain[organ], finer[organ])
        assert spread == pytest.approx(max(both) - min(both))
    # the reference through its own grid is itself; through a 1.5 mm grid (a 3 mm CT: every native
    # voxel centre is a finer grid's voxel corner region) nearly so, and never above 1
    assert all(d == 1.0 for d in result["ceiling"]["native"].values() if d is not None)
    assert all(0.9 < d <= 1.0 for d in result["ceiling"]["1.5,1.5,native"].values() if d is not None)


def test_a_bad_grid_is_a_one_line_error(mod, sample_ct_path, capsys):
    code = mod.main(["--model", "abdomen-ct-demo", "--ct", str(sample_ct_path), "--labels", str(SAMPLE_LABELS),
                     "--grids", "0.8,0.8"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --grids:")
