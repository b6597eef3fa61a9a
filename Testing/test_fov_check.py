"""configs/fov_check.py: its synthetic CT is the label map's grid, the same for the same seed and
phase setting, and "random" draws what "portal" fixes; crops fall where the anatomy says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from config_scripts import load_config_script

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"


@pytest.fixture(scope="module")
def mod():
    return load_config_script("fov_check")


def test_synthetic_ct_is_reproducible_on_the_label_maps_grid_and_random_draws_more(mod):
    labels = sitk.ReadImage(str(SAMPLE_LABELS))
    ct, lab = mod.synthetic_ct(SAMPLE_LABELS, 11, "portal")
    for image in (ct, lab):
        assert image.GetSize() == labels.GetSize() and image.GetSpacing() == labels.GetSpacing()
        assert image.GetOrigin() == labels.GetOrigin() and image.GetDirection() == labels.GetDirection()
    again, _ = mod.synthetic_ct(SAMPLE_LABELS, 11, "portal")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(again))
    drawn, drawn_lab = mod.synthetic_ct(SAMPLE_LABELS, 11, "random")
    assert drawn.GetSize() == labels.GetSize()                     # never cropped or truncated
    assert not np.array_equal(sitk.GetArrayViewFromImage(drawn), sitk.GetArrayViewFromImage(ct))
    liver = sitk.GetArrayViewFromImage(drawn_lab) == 5             # TotalSegmentator's liver
    assert liver.sum() > 1000 and np.isfinite(sitk.GetArrayViewFromImage(drawn)).all()
    with pytest.raises(ValueError, match="not portal or random"):
        mod.synthetic_ct(SAMPLE_LABELS, 11, "arterial")


def test_crops_follow_the_anatomy(mod):
    arr = np.zeros((100, 4, 4), np.int64)     # slices feet (0) to head (99), 3 mm each
    arr[5:20, 0, 0] = mod.SACRUM
    arr[30:40, 1, 1] = mod.KIDNEYS[0]
    arr[45:60, 2, 2] = 5                      # liver
    arr[50:95, 3, 3] = mod.LUNGS[0]
    ranges = mod.crop_ranges(arr, 3.0)
    assert ranges["wholebody"] == (0, 100)
    assert ranges["lower"] == (0, 34)                        # 30 mm below the sacrum to mid-kidney
    assert ranges["abdomen_pelvis"] == (0, 66)               # to 20 mm above the liver (last slice 59)
    assert ranges["chest"] == (37, 100)                      # 40 mm below the lungs to 20 mm above
    assert ranges["thorax_only"] == (62, 100)                # from 10 mm above the highest organ
    assert ranges["pelvis_only"] == (0, 27)                  # to 10 mm below the lowest organ (a kidney)
    arr[:30] = 0                                             # no sacrum: no crop that starts from it
    assert set(mod.crop_ranges(arr, 3.0)) == {"wholebody", "chest", "thorax_only"}
