"""The 2D three-view baseline: view axes, fusion, package format, training and `segment`-style runs.

One small three-view model (coarse + fine stage, 6 mm phantom, 4 organs) is trained once per
session (`trained_2d`, also used by test_refine.py); training runs single-threaded because
the test machine's two cores are shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CascadeSegLib.baselines.zhou2016 import three_view as B
from CascadeSegLib.baselines.zhou2016 import three_view_train as BT
from CascadeSegLib.cli import main
from CascadeSegLib.errors import ModelError, UserError
from CascadeSegLib.evaluate import evaluate_images
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.packaging.model import ModelPackage
from CascadeSegLib.phantom import make_phantom

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")
GRID = dict(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0))


class one_thread:
    """Run a block single-threaded (shared 2-core machine), restoring torch's setting after."""

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


def write_phantom(folder: Path, seed: int, **grid) -> tuple[Path, Path]:
    ct, lab = make_phantom(organs=ORGANS, seed=seed, **{**GRID, **grid})
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, lab_path = folder / f"case{seed}.nii.gz", folder / f"case{seed}_seg.nii.gz"
    sitk.WriteImage(ct, str(ct_path))
    sitk.WriteImage(lab, str(lab_path))
    return ct_path, lab_path


def baseline_config(iterations: int = 120) -> dict:
    net = {"base_channels": 8, "depth": 3, "norm": "batch"}
    return {
        "name": "phantom-2d", "labels": list(ORGANS),
        "data": {"cases": [{"name": "case0", "image": "data/case0.nii.gz", "label": "data/case0_seg.nii.gz"}]},
        "three_view": {"views": ["axial", "coronal", "sagittal"], "fusion": "mean", "context": 1},
        "train": {"optimizer": "adamw", "lr": 0.01, "weight_decay": 1e-4, "loss": "wce+dice", "batch_size": 8,
                  "foreground_fraction": 0.5, "iterations": iterations, "warmup": 5, "threads": 1, "seed": 0},
        "stages": [{"name": "coarse", "spacing": [6, 6, 6], "patch": [32, 32], "network": net},
                   {"name": "fine", "spacing": [6, 6, 6], "patch": [32, 32], "network": net, "margin": [10, 20]}],
    }


_TRAINED: dict[str, ModelPackage] = {}


@pytest.fixture(scope="session")
def trained_2d(tmp_path_factory) -> ModelPackage:
    """A coarse + fine three-view package trained on phantom seed 0 (about 20-40 s), trained
    once per session even though test_refine.py imports this fixture too."""
    if "pkg" not in _TRAINED:
        root = tmp_path_factory.mktemp("baseline2d")
        write_phantom(root / "data", 0)
        cfg = BT.parse_baseline_config(baseline_config(), root)
        _TRAINED["pkg"] = BT.train_baseline(cfg, root / "run", progress=False)
    return _TRAINED["pkg"]


# --------------------------------------------------------------------------- views


def test_views_extract_the_right_axes_and_put_back_exactly():
    vol = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7)   # (z, y, x), all sizes differ
    expected = {"axial": lambda i: vol[i], "coronal": lambda i: vol[:, i, :], "sagittal": lambda i: vol[:, :, i]}
    shapes = {"axial": (5, 3, 6, 7), "coronal": (6, 3, 5, 7), "sagittal": (7, 3, 5, 6)}
    for view in B.VIEWS:
        s = B.extract_view(vol, view, context=1, pad_value=-1.0)
        assert tuple(s.shape) == shapes[view], view            # in-plane axes in volume order, not transposed
        n = s.shape[0]
        for i in range(n):
            assert torch.equal(s[i, 1], expected[view](i)), view
            prev = expected[view](i - 1) if i > 0 else torch.full_like(s[i, 0], -1.0)
            nxt = expected[view](i + 1) if i < n - 1 else torch.full_like(s[i, 2], -1.0)
            assert torch.equal(s[i, 0], prev) and torch.equal(s[i, 2], nxt), view
        back = B.put_back(s[:, 1:2], view)                      # middle channel as a 1-class output
        assert tuple(back.shape) == (1, 5, 6, 7)
        assert torch.equal(back[0], vol), view
        # A per-slice output that is wrongly transposed does not survive the put-back.
        if view != "axial":
            with pytest.raises(AssertionError):
                assert torch.equal(B.put_back(s[:, 1:2].transpose(-1, -2).contiguous(), view)[0], vol)


def test_predict_view_maps_every_slice_back_to_its_voxels():
    """A network that outputs its middle input channel must reproduce the volume in every view,
    including the padding to a multiple of the pooling factor."""

    class MiddleChannel(torch.nn.Module):
        multiple = 4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.zeros_like(x[:, 1]), x[:, 1] * 50.0], dim=1)  # softmax ~ one-hot of > 0

    vol = (torch.rand(9, 10, 11) > 0.5).float()
    for view in B.VIEWS:
        p = B.predict_view(MiddleChannel(), vol, view, context=1, pad_value=0.0, batch_size=4)
        assert tuple(p.shape) == (2, 9, 10, 11)
        assert torch.equal(p.argmax(0).float(), vol), view


def test_fusion_mean_and_majority_vote():
    # One voxel: two views say class 1 weakly, one says class 2 strongly.
    p_a = torch.tensor([0.0, 0.51, 0.49]).reshape(3, 1)
    p_c = torch.tensor([0.0, 0.0, 1.0]).reshape(3, 1)
    mean, lab = B.fuse([p_a, p_a, p_c], "mean")
    assert lab.item() == 2 and torch.allclose(mean[:, 0], torch.tensor([0.0, 0.34, 0.66]))
    probs, lab = B.fuse([p_a, p_a, p_c], "vote")
    assert lab.item() == 1                                       # two of three votes
    assert torch.allclose(probs.sum(0), torch.ones(1))
    # Three different labels: no majority, the mean decides among them.
    q = [torch.tensor([0.6, 0.3, 0.1]).reshape(3, 1), torch.tensor([0.1, 0.5, 0.4]).reshape(3, 1),
         torch.tensor([0.05, 0.4, 0.55]).reshape(3, 1)]
    assert B.fuse(q, "vote")[1].item() == B.fuse(q, "mean")[1].item() == 1
    with pytest.raises(UserError):
        B.fuse(q, "max")


def test_extract_patch_matches_view_slicing():
    rng = np.random.default_rng(0)
    img = rng.random((12, 14, 16)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    w = np.ones_like(img)
    centre = (5, 6, 7)
    for view in B.VIEWS:
        x, y, ww = BT.extract_patch(img, lab, w, view, centre, (8, 8), context=1, pad_value=-1.0)
        full = B.extract_view(torch.from_numpy(img), view, 1, -1.0).numpy()
        axis = B.VIEW_AXIS[view]
        in_plane = [c for a, c in enumerate(centre) if a != axis]
        sl = full[centre[axis], :, in_plane[0] - 4:in_plane[0] + 4, in_plane[1] - 4:in_plane[1] + 4]
        assert np.array_equal(x, sl), view
        lab_view = np.moveaxis(lab, axis, 0)[centre[axis]]
        assert np.array_equal(y, lab_view[in_plane[0] - 4:in_plane[0] + 4, in_plane[1] - 4:in_plane[1] + 4])
    # Near the edge, outside the volume is padding with zero weight.
    x, y, ww = BT.extract_patch(img, lab, w, "axial", (0, 0, 0), (8, 8), 1, -1.0)
    assert np.all(x[0] == -1.0) and ww[:4].sum() == 0 and ww[4:, 4:].all()


def test_config_errors_are_one_line_user_errors(tmp_path):
    cfg = baseline_config()
    with pytest.raises(UserError, match="unknown view"):
        BT.parse_baseline_config({**cfg, "three_view": {"views": ["axial", "oblique"]}}, tmp_path)
    with pytest.raises(UserError, match="multiples of 8"):
        BT.parse_baseline_config({**cfg, "stages": [{"name": "coarse", "patch": [30, 32]}]}, tmp_path)
    with pytest.raises(UserError, match="architecture"):
        BT.parse_baseline_config({**cfg, "architecture": "3d-cascade"}, tmp_path)
    parsed = BT.parse_baseline_config(cfg, tmp_path)
    assert parsed.stages[0].margin is None and parsed.stages[1].margin == (10, 20)
    assert parsed.stages[0].network.in_channels == 3 and parsed.stages[0].network.num_classes == 5


def test_bundled_configs_parse():
    repo = Path(__file__).resolve().parent.parent
    paths = sorted((repo / "configs").glob("baseline2d*.json"))
    assert paths, "configs/baseline2d*.json missing"
    for path in paths:
        cfg = BT.load_baseline_config(path)
        assert [s.name for s in cfg.stages] == ["coarse", "fine"] and cfg.stages[1].margin == (10, 20)


# --------------------------------------------------------------------------- trained model


def test_trained_three_view_model_segments_unseen_phantom(trained_2d, tmp_path):
    meta = json.loads((trained_2d.root / "model.json").read_text(encoding="utf-8"))
    assert meta["architecture"] == "2d-three-view" and meta["three_view"]["views"] == list(B.VIEWS)
    assert [s.name for s in trained_2d.stages] == ["coarse", "fine"]
    trained_2d.verify()                                          # sha256 recorded like any package
    # Another anatomy instance on another grid origin (same field of view).
    ct, ref = make_phantom(organs=ORGANS, seed=1, origin=(-140.0, -120.0, 30.0), **GRID)
    with one_thread():
        seg = B.make_segmenter(trained_2d, "cpu", keep_stage1=True)
        assert isinstance(seg, B.ThreeViewSegmenter)
        res = seg.segment(ct)
        vote = B.make_segmenter(trained_2d, "cpu", fusion="vote").segment(ct)
    for img in (res.labels, res.stage1_labels, vote.labels):
        assert img.GetSize() == ct.GetSize() and img.GetOrigin() == ct.GetOrigin()
        assert img.GetSpacing() == ct.GetSpacing() and img.GetDirection() == ct.GetDirection()
    for name, r in (("mean", res), ("vote", vote)):
        organs = evaluate_images(r.labels, ref, trained_2d.labels, distances=False)["organs"]
        dice = {k: v["dice"] for k, v in organs.items()}
        assert np.mean(list(dice.values())) > 0.8 and min(dice.values()) > 0.6, (name, dice)
    assert {"stage1", "stage2", "total"} <= set(res.timings)


def test_plain_segmenter_refuses_a_2d_package(trained_2d):
    with pytest.raises(ModelError, match="2d-three-view package"):
        Segmenter(trained_2d, "cpu").network(0)
    assert not B.is_three_view(ModelPackage(trained_2d.name, "0", trained_2d.labels, trained_2d.stages))


def test_cli_segment_and_compare_mean_vs_vote(trained_2d, tmp_path, capsys):
    cts, refs = tmp_path / "ct", tmp_path / "ref"
    for seed in (1, 2):
        ct_path, lab_path = write_phantom(cts, seed)
        refs.mkdir(exist_ok=True)
        lab_path.rename(refs / f"case{seed}.nii.gz")
    with one_thread():
        for fusion in ("mean", "vote"):
            assert main(["segment", str(cts), "-o", str(tmp_path / fusion), "--model", str(trained_2d.root),
                         "--fusion", fusion, "--device", "cpu", "--no-report", "--quiet"]) == 0
    out = sitk.ReadImage(str(tmp_path / "mean" / "case1_labels.nii.gz"))
    ct = sitk.ReadImage(str(cts / "case1.nii.gz"))
    assert out.GetSize() == ct.GetSize() and out.GetOrigin() == ct.GetOrigin() and out.GetSpacing() == ct.GetSpacing()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "mean"), str(tmp_path / "vote"), "--ref", str(refs), "--labels",
                 ",".join(ORGANS), "-o", str(tmp_path / "cmp"), "--no-plots", "--quiet"]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    for organ in ORGANS:
        assert organ in table
    doc = json.loads((tmp_path / "cmp" / "metrics.json").read_text(encoding="utf-8"))
    assert doc["wilcoxon"]["liver"]["n"] == 2
    # A mistake is one line and exit 2.
    assert main(["segment", str(cts), "-o", str(tmp_path / "x.nii.gz"), "--model", str(trained_2d.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "file name but there are 2 inputs" in err[0]
    # The second segment command is gone; --fusion means nothing to a 3D cascade.
    assert main(["baseline2d", "segment", str(cts), "-o", str(tmp_path / "y"), "--model", str(trained_2d.root)]) == 2
    capsys.readouterr()
    assert main(["segment", str(cts), "-o", str(tmp_path / "z"), "--fusion", "vote"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fusion applies to 2D three-view packages" in err[0], err
