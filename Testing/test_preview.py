"""The preview picture's layout: a whole scan's three views side by side; a slab's thin coronal
and sagittal views under its axial one instead of as strips above a black field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import REPO_DIR

from CascadeSegLib.io import read_image
from CascadeSegLib.packaging.model import load_model
from CascadeSegLib.preview import render_preview


def _picture(ct: sitk.Image, labels: sitk.Image, path: Path) -> np.ndarray:
    on_grid = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = render_preview(ct, on_grid, load_model().labels, path)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


def test_a_whole_scan_is_shown_side_by_side(sample_ct_path: Path, tmp_path: Path) -> None:
    ct = read_image(sample_ct_path)
    labels = sitk.ReadImage(str(REPO_DIR / "Resources/SampleData/abdomen_ct_3mm_totalseg.nii.gz"))
    picture = _picture(ct, labels, tmp_path / "scan.png")
    assert picture.shape[1] > 2 * picture.shape[0]


def test_a_slab_is_shown_stacked_with_no_black_field(dicom_slab_dir: Path, dicom_slab_seg_path: Path,
                                                     tmp_path: Path) -> None:
    ct = read_image(dicom_slab_dir)
    picture = _picture(ct, sitk.ReadImage(str(dicom_slab_seg_path)), tmp_path / "slab.png")
    assert picture.shape[0] > picture.shape[1]
    # Side by side, the two thin views would sit above ~90 % black rows of their columns.
    right_half = picture[:, picture.shape[1] // 2:].max(axis=2)
    assert (right_half.max(axis=1) == 0).mean() < 0.5
