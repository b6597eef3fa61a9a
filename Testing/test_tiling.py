"""Tiling computes exactly the tiles that touch C, never writes outside them, and overlapping
tiles of a valid-convolution network reproduce one pass over the whole volume."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from CascadeSegLib.inference.tiling import plan_tiles, predict_volume, tile_geometry
from CascadeSegLib.network import NetConfig, build_network, margin, valid_input_size


def _mask(shape, boxes):
    m = torch.zeros(shape, dtype=torch.bool)
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        m[z0:z1, y0:y1, x0:x1] = True
    return m


def test_plan_keeps_exactly_the_tiles_touching_the_mask():
    # Two separate blobs at opposite corners: the box spans the volume but most tiles are empty.
    mask = _mask((64, 64, 64), [((2, 10), (2, 10), (2, 10)), ((50, 60), (52, 62), (49, 63))])
    plan = plan_tiles(mask, (16, 16, 16))
    assert plan.total_in_box > len(plan)
    touched = set(plan.starts)
    # Brute force: every tile of the full grid that has a mask voxel must be in the plan.
    all_starts = itertools.product(*_grid_axes(mask, 16))
    expected = {s for s in all_starts if mask[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16].any()}
    assert touched == expected
    # Coverage: the union of kept tiles contains every mask voxel.
    cover = torch.zeros_like(mask)
    for z, y, x in plan.starts:
        cover[z:z + 16, y:y + 16, x:x + 16] = True
    assert bool((mask & ~cover).sum() == 0)


def _grid_axes(mask, t):
    import math
    axes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(mask.any(dim=other)).flatten()
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        n = 1 if hi - lo <= t else 1 + math.ceil((hi - lo - t) / t)
        axes.append([lo + round(i * (hi - lo - t) / (n - 1)) for i in range(n)] if n > 1 else [lo])
    return axes


def test_empty_mask_computes_nothing():
    net = build_network(NetConfig(kind="padded", num_classes=3, base_channels=2, depth=2))
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    probs = predict_volume(net, torch.zeros(1, 20, 20, 20), torch.zeros(20, 20, 20, dtype=torch.bool),
                           (8, 8, 8), 3)
    assert calls == [] and float(probs.abs().sum()) == 0.0


def test_predictions_never_written_outside_the_touched_tiles():
    torch.manual_seed(0)
    net = build_network(NetConfig(kind="padded", num_classes=3, base_channels=4, depth=2)).eval()
    mask = _mask((40, 48, 40), [((5, 9), (30, 34), (3, 7))])
    probs = predict_volume(net, torch.randn(1, 40, 48, 40), mask, (8, 8, 8), 3)
    written = probs.sum(0) > 0
    plan = plan_tiles(mask, (8, 8, 8))
    allowed = torch.zeros_like(mask)
    for z, y, x in plan.starts:
        allowed[z:z + 8, y:y + 8, x:x + 8] = True
    assert bool(written[mask].all())
    assert bool((written & ~allowed).sum() == 0)
    torch.testing.assert_close(probs.sum(0)[written], torch.ones(int(written.sum())))


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_tiled_valid_network_equals_whole_volume_pass(overlap):
    torch.manual_seed(1)
    cfg = NetConfig(kind="valid", num_classes=3, base_channels=4, depth=3)
    net = build_network(cfg).eval()
    m = margin(cfg)
    shape = (36, 44, 40)      # sizes for which one whole-volume pass is valid
    vol = torch.randn(1, *shape)
    mask = _mask(shape, [((3, 33), (2, 42), (5, 35))])
    tile_in = (valid_input_size(cfg, 12),) * 3
    out, marg = tile_geometry(cfg, tile_in)
    assert marg == (m, m, m)
    probs = predict_volume(net, vol, mask, tile_in, 3, overlap=overlap, batch_size=3)
    with torch.inference_mode():
        full = torch.softmax(net(F.pad(vol[None], (m,) * 6)), 1)[0]
    covered = probs.sum(0) > 0
    assert bool(covered[mask].all())
    torch.testing.assert_close(probs[:, covered], full[:, covered], atol=1e-3, rtol=0)


def test_overlap_covers_voxels_several_times():
    mask = torch.ones(48, 48, 48, dtype=torch.bool)
    plain = plan_tiles(mask, (16, 16, 16), overlap=0.0)
    over = plan_tiles(mask, (16, 16, 16), overlap=0.37)
    count = torch.zeros(48, 48, 48)
    for z, y, x in over.starts:
        count[z:z + 16, y:y + 16, x:x + 16] += 1
    assert len(plain) == 27
    assert float(count.mean()) >= 3.0      # ~4x coverage, the paper's setting


def test_cancel_stops_between_tiles():
    from CascadeSegLib.errors import Cancelled

    net = build_network(NetConfig(kind="padded", num_classes=2, base_channels=2, depth=2)).eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    state = {"n": 0}

    def cancel():
        state["n"] += 1
        return state["n"] > 2

    with pytest.raises(Cancelled):
        predict_volume(net, torch.zeros(1, 32, 32, 32), torch.ones(32, 32, 32, dtype=torch.bool), (8, 8, 8), 2,
                       cancel=cancel)
    assert len(calls) == 2


def test_box_tile_covers_a_compact_candidate_region_in_one_tile():
    from CascadeSegLib.inference.tiling import box_tile

    cfg = NetConfig(kind="padded", num_classes=2, base_channels=2, depth=3)
    mask = _mask((80, 90, 100), [((10, 47), (20, 61), (5, 44))])     # box 37 x 41 x 39
    tile = box_tile(cfg, (32, 32, 32), mask, max_voxels=100_000)
    assert tile == (40, 44, 40)                                         # box rounded up to multiples of 4
    plan = plan_tiles(mask, tile)
    assert len(plan) == 1
    z, y, x = plan.starts[0]
    assert z <= 10 and z + 40 >= 47 and y <= 20 and y + 44 >= 61 and x <= 5 and x + 40 >= 44
    # Too large a box (or a valid network) keeps the nominal tile.
    assert box_tile(cfg, (32, 32, 32), mask, max_voxels=50_000) == (32, 32, 32)
    valid = NetConfig(kind="valid", num_classes=2, base_channels=2, depth=2)
    assert box_tile(valid, (28, 28, 28), mask, max_voxels=10**9) == (28, 28, 28)
