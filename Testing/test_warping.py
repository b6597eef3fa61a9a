"""The atlas warp in torch gives what `sitk.Resample` gives through the same registration: the
same labels voxel for voxel and HU within 0.02, on the sample CT and its label map, through a
real affine + demons registration and through hand-made transforms that probe the rules (a field
covering part of the grid, a grid turned against the field, linear steps only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO_DIR

from CascadeSegLib.inference import atlas_prior as ap
from CascadeSegLib.inference.preprocess import grid_for_spacing
from CascadeSegLib.inference.warping import warp_onto_grid
from CascadeSegLib.io import read_image

LABELS = REPO_DIR / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ct_and_labels(sample_ct_path: Path) -> tuple[sitk.Image, sitk.Image]:
    return read_image(sample_ct_path), sitk.Cast(sitk.ReadImage(str(LABELS)), sitk.sitkUInt8)


def _itk(transform: sitk.Transform, grid: sitk.Image, labels: sitk.Image,
         ct: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    lab = sitk.Resample(labels, grid, transform, sitk.sitkNearestNeighbor, 255, sitk.sitkUInt8)
    hu = sitk.Resample(ct, grid, transform, sitk.sitkLinear, -200.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(hu)


def _check(transform: sitk.Transform, grid: sitk.Image, labels: sitk.Image, ct: sitk.Image) -> np.ndarray:
    want_lab, want_hu = _itk(transform, grid, labels, ct)
    got_lab, got_hu = warp_onto_grid(transform, grid, labels, ct, 255, -200.0, CPU)
    assert got_lab.dtype == torch.uint8 and got_hu is not None and got_hu.dtype == torch.float32
    assert tuple(got_lab.shape) == tuple(grid.GetSize()[::-1])
    np.testing.assert_array_equal(got_lab.numpy(), want_lab)
    np.testing.assert_allclose(got_hu.numpy(), want_hu, rtol=0, atol=0.02)
    return want_lab


def _smooth_field(reference: sitk.Image, amplitude_mm: float, seed: int) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=tuple(reference.GetSize()[::-1]) + (3,))
    for axis in range(3):
        for _ in range(4):
            arr = (np.roll(arr, 1, axis) + arr + np.roll(arr, -1, axis)) / 3.0
    arr *= amplitude_mm / np.abs(arr).max()
    field = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def test_the_registration_s_warp_matches_itk(ct_and_labels: tuple[sitk.Image, sitk.Image]) -> None:
    """A real registration (the sample CT turned and scaled, registered back as `register`
    does for an atlas): the 3 mm prior grid gets ITK's labels and HU."""
    ct, labels = ct_and_labels
    turn = sitk.AffineTransform(3)
    turn.SetCenter(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    turn.Rotate(0, 1, 0.12)
    turn.Scale((1.08, 0.95, 1.0))
    moved_ct = sitk.Resample(ct, ct, turn, sitk.sitkLinear, -1024.0)
    transform = ap.register(moved_ct, ct, 8.0, demons_iterations=10, linear_iterations=20)
    assert transform.GetName() == "CompositeTransform"
    lab = _check(transform, grid_for_spacing(moved_ct, [3.0] * 3), labels, ct)
    assert 0 < (lab == 255).sum() < lab.size // 2 and len(np.unique(lab)) > 10


def test_a_field_over_part_of_the_grid_a_turned_grid_and_linear_steps(
        ct_and_labels: tuple[sitk.Image, sitk.Image]) -> None:
    """The displacement field covers the middle of the grid only (zero beyond it, linear up to
    half a voxel past its edge voxels); the same on a grid turned 20 degrees against the field
    (the per-voxel path); a label map on another grid than its CT, and without a CT; a
    similarity then an affine with no field."""
    ct, labels = ct_and_labels
    grid = grid_for_spacing(ct, [3.0] * 3)
    coarse = grid_for_spacing(ct, [8.0] * 3)
    part = coarse[4:-4, 3:-3, 5:-5]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.05, 0.0, -0.04, 0.97, 0.03, 0.0, 0.02, 1.05))
    affine.SetTranslation((3.3, -7.1, 4.4))
    affine.SetCenter(ct.TransformContinuousIndexToPhysicalPoint([40.0, 50.0, 30.0]))
    field = sitk.DisplacementFieldTransform(_smooth_field(part, 9.0, 0))
    composite = sitk.CompositeTransform([affine, field])
    _check(composite, grid, labels, ct)

    turned = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    turned.SetSpacing(grid.GetSpacing())
    rotation = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(20.0))
    turned.SetDirection(tuple((np.array(rotation.GetMatrix()).reshape(3, 3)
                               @ np.array(grid.GetDirection()).reshape(3, 3)).ravel()))
    turned.SetOrigin(grid.GetOrigin())
    _check(composite, turned, labels, ct)

    # a label map on its own grid (2.5 mm, shifted), the CT without: each read through its own index
    own = grid_for_spacing(ct, [2.5] * 3)
    own.SetOrigin(tuple(np.array(own.GetOrigin()) + 1.3))
    labels_elsewhere = sitk.Resample(labels, own, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    _check(composite, grid, labels_elsewhere, ct)
    only_labels, no_hu = warp_onto_grid(composite, grid, labels_elsewhere, None, 255, -200.0, CPU)
    assert no_hu is None
    np.testing.assert_array_equal(only_labels.numpy(), _itk(composite, grid, labels_elsewhere, ct)[0])

    similarity = sitk.Similarity3DTransform()
    similarity.SetScale(1.1)
    similarity.SetRotation((0.0, 1.0, 0.0), 0.2)
    similarity.SetTranslation((5.0, 0.0, -12.0))
    _check(sitk.CompositeTransform([affine, similarity]), grid, labels, ct)


def test_a_field_after_a_linear_step_is_refused(ct_and_labels: tuple[sitk.Image, sitk.Image]) -> None:
    ct, labels = ct_and_labels
    field = sitk.DisplacementFieldTransform(_smooth_field(grid_for_spacing(ct, [8.0] * 3), 5.0, 1))
    wrong_order = sitk.CompositeTransform([field, sitk.AffineTransform(3)])
    with pytest.raises(ValueError, match="at most one displacement field"):
        warp_onto_grid(wrong_order, grid_for_spacing(ct, [3.0] * 3), labels, ct, 255, -200.0, CPU)
