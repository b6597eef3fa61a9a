"""Synthetic abdominal CT: exact geometry, plausible anatomy in millimetres, determinism."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CascadeSegLib.labels import DEFAULT_ORGANS
from CascadeSegLib.phantom import HU, make_phantom, organ_volumes_ml, phantom_labelset

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# a reference-sized field of view: 360 x 258 x 222 mm
REF_SIZE, REF_SPACING = (120, 86, 74), (3.0, 3.0, 3.0)


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = math.radians(deg_z), math.radians(deg_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


OBLIQUE = tuple(_rotation(12.0, 6.0).ravel())


@pytest.fixture(scope="module")
def reference_phantom():
    return make_phantom(size=REF_SIZE, spacing=REF_SPACING)


@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_geometry_exactly_as_requested(direction):
    size, spacing, origin = (40, 36, 30), (2.5, 3.5, 4.25), (-101.3, 57.7, -812.1)
    ct, lab = make_phantom(size=size, spacing=spacing, origin=origin, direction=direction)
    for img in (ct, lab):
        assert img.GetSize() == size
        assert img.GetSpacing() == spacing
        assert img.GetOrigin() == origin
        assert img.GetDirection() == direction
    assert ct.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(lab))) == set(range(11))


def test_every_organ_present_with_plausible_volume(reference_phantom):
    _, lab = reference_phantom
    vol = organ_volumes_ml(lab, phantom_labelset(DEFAULT_ORGANS))
    plausible = {  # ml, adult abdomen
        "liver": (1200, 1900), "spleen": (120, 350), "kidney_right": (100, 250),
        "kidney_left": (100, 250), "gallbladder": (15, 80), "stomach": (150, 600),
        "pancreas": (40, 120), "aorta": (50, 200), "inferior_vena_cava": (40, 200),
        "portal_vein_and_splenic_vein": (5, 40),
    }
    for name, (lo, hi) in plausible.items():
        assert lo <= vol[name] <= hi, (name, vol[name])
    assert vol["liver"] == max(vol.values())


def test_same_seed_same_images_other_seed_differs():
    a_ct, a_lab = make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), seed=7)
    b_ct, b_lab = make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), seed=7)
    c_ct, c_lab = make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), seed=8)
    arr = sitk.GetArrayFromImage
    np.testing.assert_array_equal(arr(a_ct), arr(b_ct))
    np.testing.assert_array_equal(arr(a_lab), arr(b_lab))
    assert not np.array_equal(arr(a_ct), arr(c_ct))
    assert not np.array_equal(arr(a_lab), arr(c_lab))


def test_labels_lie_inside_the_body(reference_phantom):
    ct, lab = reference_phantom
    hu = sitk.GetArrayViewFromImage(ct)
    labels = sitk.GetArrayViewFromImage(lab)
    body = ndimage.binary_fill_holes(hu > -500)
    assert body.mean() < 0.8 and hu[~body].mean() < -950  # air around an elliptical body
    assert np.all(body[labels > 0])
    stomach = phantom_labelset(DEFAULT_ORGANS).by_name("stomach").value
    solid = (labels > 0) & (labels != stomach)
    assert np.all(hu[solid] > -500)
    gas = (hu[labels == stomach] < -500).mean()
    assert 0.03 < gas < 0.3  # the stomach holds some air, anteriorly
    stomach_y = np.nonzero(labels == stomach)[1]
    gas_y = np.nonzero((labels == stomach) & (hu < -500))[1]
    assert gas_y.mean() < stomach_y.mean()  # y index grows posteriorly (identity LPS)


def test_hu_statistics(reference_phantom):
    ct, lab = reference_phantom
    hu = sitk.GetArrayViewFromImage(ct).astype(np.float32)
    labels = sitk.GetArrayViewFromImage(lab)
    for label in phantom_labelset(DEFAULT_ORGANS):
        values = hu[labels == label.value]
        if label.name == "stomach":
            values = values[values > -500]
        assert abs(values.mean() - HU[label.name]) < 3, label.name
        assert 8 < values.std() < 12, label.name  # Gaussian noise of 10 HU
    assert (hu > 300).sum() * 27 / 1000 > 20  # > 20 ml of bone (spine)
    assert abs(hu[0, 0, :5].mean() + 1000) < 20  # air in the corner
    quiet, _ = make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), noise_hu=0.0)
    values = set(np.unique(sitk.GetArrayViewFromImage(quiet)).tolist())
    assert {-1000, -100, 45, 100, 110, 160, 10, 30, 90, 200, 130, 150, 400, 700} <= values


def test_different_spacing_same_anatomy_in_mm():
    """Same field of view at 3 mm and 2 mm voxels: organ volumes and centroids agree."""
    labelset = phantom_labelset(DEFAULT_ORGANS)
    a_ct, a = make_phantom(size=(96, 80, 64), spacing=(3.0, 3.0, 3.0))
    b_ct, b = make_phantom(size=(144, 120, 96), spacing=(2.0, 2.0, 2.0), origin=(-0.5, -0.5, -0.5))
    va, vb = organ_volumes_ml(a, labelset), organ_volumes_ml(b, labelset)
    for name in labelset.names:
        assert abs(va[name] - vb[name]) <= 0.1 * vb[name], (name, va[name], vb[name])
    sa, sb = sitk.LabelShapeStatisticsImageFilter(), sitk.LabelShapeStatisticsImageFilter()
    sa.Execute(a)
    sb.Execute(b)
    for label in labelset:
        dist = np.linalg.norm(np.subtract(sa.GetCentroid(label.value), sb.GetCentroid(label.value)))
        assert dist < 2.0, (label.name, dist)


def test_flipped_direction_gives_same_physical_anatomy():
    """A grid with x and y reversed over the same voxel centres holds the same organs."""
    size, spacing = (64, 52, 40), (4.5, 4.5, 5.0)
    _, a = make_phantom(size=size, spacing=spacing, origin=(0.0, 0.0, 0.0), noise_hu=0)
    far = ((size[0] - 1) * spacing[0], (size[1] - 1) * spacing[1], 0.0)
    _, b = make_phantom(size=size, spacing=spacing, origin=far, direction=FLIPPED, noise_hu=0)
    arr_a, arr_b = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    assert not np.array_equal(arr_a, arr_b)
    assert (np.flip(arr_b, axis=(1, 2)) == arr_a).mean() > 0.9995
    on_a = sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert (sitk.GetArrayViewFromImage(on_a) == arr_a).mean() > 0.9995


def test_oblique_direction_gives_same_physical_anatomy():
    size, spacing = (72, 60, 48), (4.0, 4.0, 4.0)
    labelset = phantom_labelset(DEFAULT_ORGANS)
    _, a = make_phantom(size=size, spacing=spacing, noise_hu=0)
    half = (np.array(size) - 1) * np.array(spacing) / 2
    centre = half  # origin 0, identity
    rot = np.reshape(OBLIQUE, (3, 3))
    origin = tuple(centre - rot @ half)
    _, b = make_phantom(size=size, spacing=spacing, origin=origin, direction=OBLIQUE, noise_hu=0)
    sa, sb = sitk.LabelShapeStatisticsImageFilter(), sitk.LabelShapeStatisticsImageFilter()
    sa.Execute(a)
    sb.Execute(b)
    for label in labelset:
        dist = np.linalg.norm(np.subtract(sa.GetCentroid(label.value), sb.GetCentroid(label.value)))
        ratio = sb.GetPhysicalSize(label.value) / sa.GetPhysicalSize(label.value)
        if label.name in ("aorta", "inferior_vena_cava"):
            continue  # long tubes are cut differently by the tilted field of view
        assert dist < 4.0, (label.name, dist)
        assert 0.9 < ratio < 1.1, (label.name, ratio)
    # and the liver sits to the patient's right (LPS -x), the spleen to the left
    liver, spleen = sb.GetCentroid(1), sb.GetCentroid(2)
    assert liver[0] < centre[0] < spleen[0]


def test_subset_of_organs_relabels_the_same_anatomy():
    kw = dict(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), seed=2)
    full_ct, full = make_phantom(**kw)
    sub_ct, sub = make_phantom(organs=("spleen", "liver"), **kw)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(full_ct), sitk.GetArrayViewFromImage(sub_ct))
    f, s = sitk.GetArrayViewFromImage(full), sitk.GetArrayViewFromImage(sub)
    assert set(np.unique(s)) == {0, 1, 2}
    np.testing.assert_array_equal(s == 1, f == 2)  # spleen is label 1 now
    np.testing.assert_array_equal(s == 2, f == 1)
    assert phantom_labelset(("spleen", "liver")).by_name("spleen").value == 1
    with pytest.raises(ValueError):
        make_phantom(organs=("liver", "brain"))


def test_large_phantom_is_fast_and_compact():
    t0 = time.perf_counter()
    ct, lab = make_phantom(size=(256, 256, 160), spacing=(1.5, 1.5, 2.0))
    elapsed = time.perf_counter() - t0
    assert ct.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
    assert elapsed < 15.0, elapsed  # about 1 s on one idle core; 512x512x400 takes ~5-10 s
