"""The cascade end to end: exact input geometry, C1 > C2 > labels, options, cancel, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_factory import make_random_model

from CascadeSegLib.errors import Cancelled, ModelError, UserError
from CascadeSegLib.inference.cascade import CancelToken, Segmenter, resample_labels_to, resolve_device
from CascadeSegLib.packaging.model import ModelPackage
from CascadeSegLib.phantom import make_phantom


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("model"))


def _rotation(deg_z: float, deg_x: float) -> tuple[float, ...]:
    cz, sz = math.cos(math.radians(deg_z)), math.sin(math.radians(deg_z))
    cx, sx = math.cos(math.radians(deg_x)), math.sin(math.radians(deg_x))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return tuple((rz @ rx).ravel().tolist())


def _assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetDirection() == b.GetDirection()


def test_sample_ct_keeps_geometry_and_nests_regions(model, sample_ct_path):
    image = sitk.ReadImage(str(sample_ct_path))
    result = Segmenter(model, "cpu", keep_candidates=True, keep_stage1=True).segment(image)
    for out in (result.labels, result.c1, result.c2, result.stage1_labels):
        _assert_same_grid(out, image)
        assert out.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(result.labels)
    c1 = sitk.GetArrayFromImage(result.c1).astype(bool)
    c2 = sitk.GetArrayFromImage(result.c2).astype(bool)
    assert labels.any()
    # Labels only where stage 2 looked; stage 2 only looked near stage-1 foreground.
    assert not (labels > 0)[~c2].any()
    # C1 is the body: it excludes the air around the patient.
    hu = sitk.GetArrayFromImage(image)
    assert c1.mean() < 0.9 and (hu[c1] > -500).mean() > 0.85
    assert set(np.unique(labels)) <= {0, *[lab.value for lab in model.labels]}
    assert set(result.timings) >= {"preprocess", "stage1", "c2", "stage2", "postprocess", "total"}


@pytest.mark.parametrize("direction,spacing", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), (2.5, 2.5, 4.0)),
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), (3.0, 3.0, 3.0)),
    (_rotation(30, 10), (2.8, 3.1, 3.5)),
])
def test_any_orientation_returns_input_grid_and_consistent_anatomy(model, direction, spacing):
    ct, _ = make_phantom(size=(64, 56, 40), spacing=spacing, origin=(-90.0, 20.0, 300.0), direction=direction,
                         seed=3)
    result = Segmenter(model, "cpu").segment(ct)
    _assert_same_grid(result.labels, ct)


def test_labels_are_resampled_to_the_same_physical_place():
    # A label box on a coarse oblique grid must land at the same physical points on a fine grid.
    coarse = sitk.Image([20, 20, 20], sitk.sitkUInt8)
    coarse.SetSpacing([4.0, 4.0, 4.0])
    coarse.SetOrigin([10.0, -5.0, 3.0])
    coarse.SetDirection(_rotation(20, 0))
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[5:12, 6:14, 4:10] = 3
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(coarse)
    fine = sitk.Image([70, 70, 70], sitk.sitkInt16)
    fine.SetSpacing([1.0, 1.2, 1.1])
    fine.SetOrigin([0.0, -10.0, 0.0])
    fine.SetDirection(_rotation(-15, 5))
    fast = resample_labels_to(lab, fine)
    full = sitk.Resample(lab, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fast), sitk.GetArrayFromImage(full))
    assert sitk.GetArrayFromImage(fast).any()


def test_stage1_only_and_probabilities(model, sample_ct_path):
    image = sitk.ReadImage(str(sample_ct_path))
    quick = Segmenter(model, "cpu", stage1_only=True).segment(image)
    assert "stage2" not in quick.timings
    _assert_same_grid(quick.labels, image)
    full = Segmenter(model, "cpu", keep_probabilities=True).segment(image)
    probs = full.probabilities
    assert probs.GetNumberOfComponentsPerPixel() == model.labels.num_classes
    p = sitk.GetArrayViewFromImage(probs)
    sums = p.sum(-1)
    assert np.allclose(sums[sums > 0], 1.0, atol=1e-4)


def test_overlap_mode_computes_more_than_the_box_cover(model):
    image, _ = make_phantom(size=(112, 96, 72), spacing=(3.0, 3.0, 3.0), seed=1)
    work = {}
    for overlap in (0.0, 0.5):
        seen: list[str] = []
        result = Segmenter(model, "cpu", overlap=overlap,
                           progress=lambda s, f, m, seen=seen: seen.append(m) if s == "stage2" else None).segment(image)
        work[overlap] = result.stats["stage2_computed_voxels"]
        assert seen[-1].startswith("box" if overlap == 0 else "tile")
    # Overlapping tiles (each voxel ~8x) cost more than a cover of disjoint output boxes.
    assert work[0.5] > 2 * work[0.0]


def test_cancel_token_stops_and_progress_reports_stages(model, sample_ct_path):
    image = sitk.ReadImage(str(sample_ct_path))
    token = CancelToken()
    stages = []

    def progress(stage, fraction, message):
        stages.append(stage)
        if stage == "stage2":
            token.cancel()

    with pytest.raises(Cancelled):
        Segmenter(model, "cpu", progress=progress, cancel=token).segment(image)
    assert "stage1" in stages and stages[-1] == "stage2"


def test_bad_images_are_refused_with_a_message(model):
    with pytest.raises(UserError, match="2D"):
        Segmenter(model, "cpu").segment(sitk.Image([32, 32], sitk.sitkInt16))
    with pytest.raises(UserError, match="components"):
        Segmenter(model, "cpu").segment(sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3))
    nan = sitk.GetImageFromArray(np.full((16, 16, 16), np.nan, np.float32))
    with pytest.raises(UserError, match="NaN"):
        Segmenter(model, "cpu").segment(nan)
    air = sitk.GetImageFromArray(np.full((16, 16, 16), -1000, np.int16))
    with pytest.raises(UserError, match="no body"):
        Segmenter(model, "cpu").segment(air)


def test_missing_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")


def test_tampered_weights_are_refused(tmp_path):
    make_random_model(tmp_path)
    weights = tmp_path / "stage2.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        ModelPackage.load(tmp_path).verify()
    with pytest.raises(ModelError, match="sha256"):
        ModelPackage.load(tmp_path).load_network(1)
    # Stage 1 is intact and still loads.
    assert ModelPackage.load(tmp_path).load_network(0) is not None


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), _rotation(25, 15)])
def test_separable_nearest_matches_simpleitk_on_shared_direction(direction):
    rng = np.random.default_rng(0)
    coarse = sitk.GetImageFromArray(rng.integers(0, 5, (23, 19, 17)).astype(np.uint8))
    coarse.SetSpacing([3.1, 2.9, 3.7])
    coarse.SetOrigin([12.3, -40.1, 7.7])
    coarse.SetDirection(direction)
    fine = sitk.Image([61, 57, 80], sitk.sitkInt16)
    fine.SetSpacing([0.93, 1.07, 0.81])
    fine.SetDirection(direction)
    # Origin a little off the coarse grid and partly outside it.
    fine.SetOrigin(coarse.TransformContinuousIndexToPhysicalPoint([-1.37, 0.41, 2.13]))
    fast = sitk.GetArrayFromImage(resample_labels_to(coarse, fine))
    full = sitk.GetArrayFromImage(sitk.Resample(coarse, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))
    assert (fast == full).mean() > 0.999   # ties at exactly half a voxel may round either way
    assert (full > 0).sum() > 1000


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), _rotation(25, 15)])
def test_masked_nearest_resampling_equals_simpleitk_resample_then_mask(direction):
    # What the cascade does last: stage-2 labels (a small blob: only its box is gathered) onto
    # the input grid, cleared where the nearest voxel of the stage-1 body mask C1 is 0.
    labels = np.zeros((23, 19, 17), np.uint8)
    labels[6:15, 4:12, 3:9] = np.random.default_rng(1).integers(0, 4, (9, 8, 6))
    coarse = sitk.GetImageFromArray(labels)
    coarse.SetSpacing([3.1, 2.9, 3.7])
    coarse.SetOrigin([12.3, -40.1, 7.7])
    coarse.SetDirection(direction)
    body = np.zeros((12, 10, 9), np.uint8)
    body[2:9, 3:10, 1:7] = 1
    c1 = sitk.GetImageFromArray(body)
    c1.SetSpacing([6.2, 5.8, 7.4])
    c1.SetOrigin(coarse.TransformContinuousIndexToPhysicalPoint([0.37, 0.41, 0.29]))
    c1.SetDirection(direction)
    fine = sitk.Image([61, 57, 80], sitk.sitkInt16)
    fine.SetSpacing([0.93, 1.07, 0.81])
    fine.SetDirection(direction)
    fine.SetOrigin(coarse.TransformContinuousIndexToPhysicalPoint([-1.37, 0.41, 2.13]))
    got = resample_labels_to(coarse, fine, mask=c1)
    assert got.GetSize() == fine.GetSize() and got.GetOrigin() == fine.GetOrigin()
    assert got.GetSpacing() == fine.GetSpacing() and got.GetDirection() == fine.GetDirection()
    nearest = dict(referenceImage=fine, transform=sitk.Transform(), interpolator=sitk.sitkNearestNeighbor,
                   defaultPixelValue=0, outputPixelType=sitk.sitkUInt8)
    want = sitk.GetArrayFromImage(sitk.Mask(sitk.Resample(coarse, **nearest), sitk.Resample(c1, **nearest)))
    got = sitk.GetArrayFromImage(got)
    assert (got == want).mean() > 0.999
    assert (want > 0).sum() > 1000 and (want == 0).sum() > 1000


def test_probabilities_are_resampled_linearly_onto_the_input_grid(model, sample_ct_path):
    image = sitk.ReadImage(str(sample_ct_path))
    result = Segmenter(model, "cpu", keep_probabilities=True).segment(image)
    probs = result.probabilities
    # Same spacing and direction as the input; the origin is an input voxel centre (a box of the grid).
    assert probs.GetSpacing() == image.GetSpacing() and probs.GetDirection() == image.GetDirection()
    start = image.TransformPhysicalPointToContinuousIndex(probs.GetOrigin())
    assert np.allclose(start, np.round(start), atol=1e-6)
    assert all(0 <= s and s + n <= m for s, n, m in zip(np.round(start), probs.GetSize(), image.GetSize()))
    # Inside the box, the argmax of the resampled probabilities agrees with the labels almost everywhere.
    lo = [int(v) for v in np.round(start)]
    labels = sitk.GetArrayViewFromImage(result.labels)[lo[2]:lo[2] + probs.GetSize()[2],
                                                        lo[1]:lo[1] + probs.GetSize()[1],
                                                        lo[0]:lo[0] + probs.GetSize()[0]]
    p = sitk.GetArrayViewFromImage(probs)
    fg = labels > 0
    assert fg.sum() > 1000
    assert (p.argmax(-1)[fg] == labels[fg]).mean() > 0.9


def test_largest_component_removes_islands_only_for_listed_organs():
    from CascadeSegLib.inference.cascade import keep_largest_components

    labels = torch.zeros(30, 30, 30, dtype=torch.uint8)
    labels[2:12, 2:12, 2:12] = 1          # liver body
    labels[20:22, 20:22, 20:22] = 1       # liver island
    labels[15:18, 2:6, 2:6] = 2           # spleen: two pieces, not listed
    labels[25:27, 2:6, 2:6] = 2
    out = keep_largest_components(labels, [1])
    assert int((out == 1).sum()) == 1000 and int(out[21, 21, 21]) == 0
    assert torch.equal(out == 2, labels == 2)


def test_largest_component_prefers_the_piece_where_the_atlases_allow_it():
    from CascadeSegLib.inference.cascade import keep_largest_components

    labels = torch.zeros(30, 30, 30, dtype=torch.uint8)
    labels[2:12, 2:12, 2:12] = 2          # a big spleen where the atlases put none
    labels[20:25, 20:25, 20:25] = 2       # a smaller one where they put it
    labels[20:25, 2:4, 2:4] = 3           # two kidney pieces, neither allowed: size decides
    labels[2:4, 20:22, 20:22] = 3
    asked: list[int] = []

    def plausible(value: int, index: np.ndarray) -> np.ndarray:
        asked.append(value)
        return (index[:, 0] >= 15) & (value == 2)

    out = keep_largest_components(labels, [2, 3], plausible)
    assert int((out == 2).sum()) == 125 and int(out[5, 5, 5]) == 0 and int(out[22, 22, 22]) == 2
    assert int((out == 3).sum()) == 20 and int(out[2, 20, 20]) == 0
    assert asked == [2, 3]


def test_largest_component_prefers_the_allowed_piece_stage1_also_found():
    """Misplaced atlases allow a liver in two places (one of them in the chest of a scan of the
    upper abdomen): the piece stage 1 also calls liver wins over a bigger one it does not, only
    plausible voxels count, and without any such voxel the plausible ones decide as before. A
    speck stage 1 found (under half the largest piece) does not beat the body it missed."""
    from CascadeSegLib.inference.cascade import COMPARABLE_PIECE_SHARE, keep_largest_components

    labels = torch.zeros(30, 30, 30, dtype=torch.uint8)
    labels[2:12, 2:12, 2:12] = 1          # 1000 voxels the atlases allow, stage 1 calls background
    labels[18:27, 18:27, 18:27] = 1       # 729 voxels the atlases allow, stage 1 calls liver
    assert 729 >= COMPARABLE_PIECE_SHARE * 1000
    stage1 = torch.zeros_like(labels)
    stage1[21:24, 21:24, 21:24] = 1

    def everywhere(value: int, index: np.ndarray) -> np.ndarray:
        return np.ones(len(index), bool)

    def upper_only(value: int, index: np.ndarray) -> np.ndarray:
        return index[:, 0] < 15

    kept = keep_largest_components(labels, [1], everywhere, stage1)
    assert int((kept == 1).sum()) == 729 and int(kept[22, 22, 22]) == 1 and int(kept[5, 5, 5]) == 0
    unsupported = keep_largest_components(labels, [1], everywhere, torch.zeros_like(labels))
    assert int((unsupported == 1).sum()) == 1000
    # stage 1's liver lies where the atlases allow none: its piece gets no credit for it
    outside = keep_largest_components(labels, [1], upper_only, stage1)
    assert int((outside == 1).sum()) == 1000 and int(outside[22, 22, 22]) == 0
    # a speck stage 1 found (125 voxels, under half of 1000) does not beat the organ it missed
    speck = torch.zeros_like(labels)
    speck[2:12, 2:12, 2:12] = 1
    speck[20:25, 20:25, 20:25] = 1
    assert 125 < COMPARABLE_PIECE_SHARE * 1000
    body = keep_largest_components(speck, [1], everywhere, stage1)
    assert int((body == 1).sum()) == 1000 and int(body[22, 22, 22]) == 0
    assert torch.equal(keep_largest_components(labels, [1], everywhere, stage1 * 2), unsupported)
