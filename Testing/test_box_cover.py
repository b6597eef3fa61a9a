"""Candidate-aware box covers (stage 2's fast path), window-only resampling and the oneDNN
convolution switch: same answers as the plain way, with less work."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from CascadeSegLib.inference import preprocess
from CascadeSegLib.inference.tiling import (
    fit_tile,
    labels_over,
    plan_boxes,
    plan_tiles,
    predict_boxes,
    tile_geometry,
)
from CascadeSegLib.network import NetConfig, OneDnnConv3d, build_network, prefer_onednn

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData"


@pytest.fixture(scope="module")
def organ_candidates() -> torch.Tensor:
    """A real C2: the sample CT's 10 abdominal organs on its 3 mm grid, dilated by 3 voxels."""
    from CascadeSegLib.train.dataset import TOTALSEGMENTATOR_IDS

    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "abdomen_ct_3mm_totalseg.nii.gz")))
    organs = torch.from_numpy(np.isin(ref, list(TOTALSEGMENTATOR_IDS)))
    return preprocess.dilate(organs, 3)


def _paste(shape, boxes, which="out"):
    cover = torch.zeros(shape, dtype=torch.int32)
    for b in boxes:
        lo, hi = (b.out_lo, b.out_hi) if which == "out" else (b.in_lo, tuple(a + n for a, n in zip(b.in_lo, b.in_size)))
        lo = [max(0, v) for v in lo]
        cover[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += 1
    return cover


def test_box_cover_holds_every_candidate_once_and_computes_less_than_tiles(organ_candidates):
    mask = organ_candidates
    cfg = NetConfig(kind="padded", num_classes=11, base_channels=4, depth=4)
    boxes = plan_boxes(mask, cfg, max_voxels=400_000, halo=4)
    out = _paste(mask.shape, boxes)
    assert int(out.max()) == 1                        # output boxes are disjoint
    assert not bool((mask & (out == 0)).any())        # and hold every candidate voxel
    for b in boxes:
        assert all(n % 8 == 0 for n in b.in_size)     # sizes a depth-4 network takes
        assert b.voxels <= 400_000
        for lo, hi, s, n in zip(b.out_lo, b.out_hi, b.in_lo, b.in_size):
            assert s <= lo and hi <= s + n            # the window contains its output box ...
        assert all(0 <= s and s + n <= dim for s, n, dim in zip(b.in_lo, b.in_size, mask.shape))  # ... inside the grid
    # Less work than the regular 64^3 tile grid over the same candidates ...
    tile_in = fit_tile(cfg, (64, 64, 64), tuple(mask.shape))
    tiles = plan_tiles(mask, tile_geometry(cfg, tile_in)[0], tile_in)
    assert sum(b.voxels for b in boxes) < 0.75 * len(tiles) * np.prod(tile_in)
    # ... and, where no size limit forces splits, never more than one window over the whole box.
    free = plan_boxes(mask, cfg, max_voxels=10**9, halo=4)
    one_window = np.prod([-(-(hi - lo + 8) // 8) * 8 for lo, hi in preprocess.bounding_box(mask)])
    assert sum(b.voxels for b in free) <= one_window


def test_box_cover_of_nothing_is_empty_and_valid_networks_are_refused():
    cfg = NetConfig(kind="padded", num_classes=3, base_channels=2, depth=2)
    assert plan_boxes(torch.zeros(20, 20, 20, dtype=torch.bool), cfg) == []
    with pytest.raises(ValueError, match="padded"):
        plan_boxes(torch.ones(8, 8, 8, dtype=torch.bool), NetConfig.paper(3))


def test_box_predictions_equal_one_whole_volume_pass_when_the_halo_covers_the_receptive_field(organ_candidates):
    # One level, two 3x3x3 convolutions: a receptive radius of 2 voxels. With a halo of 2 every
    # kept voxel sees exactly the input a whole-volume pass gives it.
    torch.manual_seed(0)
    net = build_network(NetConfig(kind="padded", num_classes=4, base_channels=3, depth=1, norm="none")).eval()
    mask = organ_candidates
    volume = torch.rand((1,) + tuple(mask.shape))
    boxes = plan_boxes(mask, net.cfg, max_voxels=60_000, halo=2, min_edge=4, pass_cost=5_000)
    assert len(boxes) > 4                             # several boxes, so seams are exercised
    got = predict_boxes(net, volume, boxes, 4)
    with torch.inference_mode():
        whole = torch.softmax(net(volume[None])[0], dim=0)
    inside = _paste(mask.shape, boxes) > 0
    torch.testing.assert_close(got[:, inside], whole[:, inside], atol=1e-5, rtol=1e-5)
    assert float(got[:, ~inside].abs().sum()) == 0.0  # nothing written outside the output boxes
    labels = predict_boxes(net, volume, boxes, 4, labels_only=True)
    assert labels.dtype == torch.uint8
    assert torch.equal(labels[inside], whole.argmax(0).to(torch.uint8)[inside])

    # A caller's labelling (the atlas fusion) gets each output box and its softmax probabilities.
    seen = []

    def shifted(lo, hi, probs):
        seen.append((lo, hi, tuple(probs.shape)))
        return probs.argmax(0).to(torch.uint8) + 1           # visibly not the plain argmax

    def shifted_softmax(lo, hi, probs):
        torch.testing.assert_close(probs.sum(0), torch.ones(probs.shape[1:]))
        return shifted(lo, hi, probs)

    fused = predict_boxes(net, volume, boxes, 4, labels_only=True, to_labels=shifted_softmax)
    assert sorted(seen) == sorted((b.out_lo, b.out_hi, (4,) + tuple(h - l for l, h in zip(b.out_lo, b.out_hi)))
                                  for b in boxes)
    assert torch.equal(fused[inside], labels[inside] + 1) and not bool(fused[~inside].any())
    # The same over whole-grid probabilities, slab by slab across the mask's bounding box.
    seen.clear()
    slabs = labels_over(got, mask, shifted, slab=7)
    assert len(seen) > 1 and torch.equal(slabs[mask], labels[mask] + 1)
    box = preprocess.bounding_box(mask)
    outside_box = torch.ones_like(mask)
    outside_box[tuple(slice(lo, hi) for lo, hi in box)] = False
    assert not bool(slabs[outside_box].any())


def test_out_of_memory_splits_the_box_and_gives_the_same_answer():
    torch.manual_seed(1)
    net = build_network(NetConfig(kind="padded", num_classes=3, base_channels=2, depth=1, norm="none")).eval()
    mask = torch.zeros(40, 40, 40, dtype=torch.bool)
    mask[4:36, 6:30, 8:32] = True
    volume = torch.rand(1, 40, 40, 40)
    boxes = plan_boxes(mask, net.cfg, halo=2, min_edge=4)
    expected = predict_boxes(net, volume, boxes, 3)

    class OOMAbove(torch.nn.Module):
        def __init__(self, limit):
            super().__init__()
            self.net, self.cfg, self.limit, self.sizes = net, net.cfg, limit, []

        def forward(self, x):
            if x[0, 0].numel() > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            self.sizes.append(x[0, 0].numel())
            return self.net(x)

    assert len(boxes) == 1
    limit = boxes[0].voxels // 3
    fake = OOMAbove(limit)
    told = []
    got = predict_boxes(fake, volume, boxes, 3, on_oom=told.append, min_split_voxels=1000)
    assert told and all(v < boxes[0].voxels for v in told)
    assert len(fake.sizes) >= 4 and max(fake.sizes) <= limit    # split until the windows fit
    torch.testing.assert_close(got, expected)
    # A device that fails even small windows is full: no endless splitting, the error goes up.
    told.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict_boxes(OOMAbove(0), volume, boxes, 3, on_oom=told.append, min_split_voxels=boxes[0].voxels - 1)
    assert len(told) == 1


def test_grid_windows_equal_crops_of_the_full_resampling(sample_ct_path):
    image = sitk.ReadImage(str(sample_ct_path))
    ref = preprocess.grid_for_spacing(image, (4.0, 4.5, 5.0))
    full = torch.from_numpy(sitk.GetArrayFromImage(preprocess.resample(image, ref, "linear", -1024.0,
                                                                       sitk.sitkFloat32)))
    windows = preprocess.GridWindows(image, ref)
    assert windows.shape == tuple(full.shape)
    start, size = (3, 10, 7), (16, 24, 20)
    crop = full[3:19, 10:34, 7:27]
    torch.testing.assert_close(windows.window(start, size), crop, atol=1e-3, rtol=0)
    # A window hanging over the grid's edge is padded with air, like a padded full grid.
    start = (-4, full.shape[1] - 10, 5)
    got = windows.window(start, (12, 16, 8))
    padded = F.pad(full, (0, 0, 0, 6, 4, 0), value=-1024.0)[0:12, full.shape[1] - 10:full.shape[1] + 6, 5:13]
    torch.testing.assert_close(got, padded, atol=1e-3, rtol=0)
    torch.testing.assert_close(windows.full(), full, atol=1e-3, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_onednn_convolutions_give_the_stock_answer_and_leave_training_alone():
    torch.manual_seed(2)
    cfg = NetConfig(kind="padded", num_classes=5, base_channels=4, depth=3, norm="instance")
    stock = build_network(cfg).eval()
    fast = build_network(cfg).eval()
    fast.load_state_dict(stock.state_dict())
    prefer_onednn(fast)
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv3d)]
    assert sum(isinstance(m, OneDnnConv3d) for m in convs) == len(convs) - 1   # all but the 1x1x1 head
    assert fast.state_dict().keys() == stock.state_dict().keys()
    x = torch.rand(1, 1, 24, 32, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), stock(x), atol=1e-4, rtol=1e-4)
    # With gradients on, the stock kernel runs and backpropagation works.
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in fast.parameters())
