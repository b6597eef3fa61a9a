"""Shared parts of the evaluation tests (test_evaluate_metrics.py, test_evaluate.py): the sample CT's
TotalSegmentator labels as our standard organ values, and label maps made from arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SEG = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
# TotalSegmentator id -> our standard value (DEFAULT_ORGANS order, 1..10)
TS_IDS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4,
          "stomach": 6, "pancreas": 7, "aorta": 52, "inferior_vena_cava": 63,
          "portal_vein_and_splenic_vein": 64}
STD = LabelSet.from_names(DEFAULT_ORGANS)


def image(arr: np.ndarray, like: sitk.Image | None = None, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    if like is not None:
        img.CopyInformation(like)
    else:
        img.SetSpacing(spacing)
    return img


@pytest.fixture(scope="module", name="sample_ref")
def sample_ref_fixture() -> sitk.Image:
    """The sample CT's TotalSegmentator labels remapped to our 10 standard organ values."""
    ts = sitk.ReadImage(str(SAMPLE_SEG))
    lut = np.zeros(256, np.uint8)
    for lab in STD:
        lut[TS_IDS[lab.name]] = lab.value
    return image(lut[sitk.GetArrayFromImage(ts)], like=ts)


def shifted(arr: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Shift by n voxels without wrap-around (np.roll would wrap organs to the far side)."""
    out = np.zeros_like(arr)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, arr.shape[axis] - n), slice(n, None)
    out[tuple(dst)] = arr[tuple(src)]
    return out
