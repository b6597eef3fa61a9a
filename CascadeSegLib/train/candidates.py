"""Where stage 2 trains: C2 from the trained stage 1, as at inference.

Stage 1 trains on C1 (the body mask, cached with each case). Stage 2 trains on C2: stage 1's
foreground, resampled onto the stage-2 grid and dilated by the model's radius. C2 masks are
cached in the run folder per stage-1 weights (`<case>-<sha256 of best.pt>.npy`, rank 0 computes),
so a resumed run or a second stage-2 pass never predicts them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..inference import preprocess
from ..network import UNet3D, build_network
from . import checkpoint as ckpt
from .config import RunConfig, StageConfig
from .dataset import CachedCase
from .ddp import DistContext


def pad_value_for(cfg: RunConfig) -> float:
    """The normalised value of air (-1024 HU): what tiles reaching past the image are padded with."""
    return float(preprocess.normalize(torch.tensor(-1024.0), cfg.window, cfg.normalization))


def predict_labels(net: UNet3D, case: CachedCase, mask: np.ndarray, tile_zyx: Sequence[int], num_classes: int,
                   pad_value: float, device: torch.device) -> torch.Tensor:
    """Arg-max labels of `net` over the tiles touching `mask` (zero outside it), on the case's grid."""
    from ..inference.tiling import predict_volume

    volume = torch.from_numpy(np.asarray(case.image, dtype=np.float32))[None].to(device)
    m = torch.from_numpy(np.array(mask, dtype=bool)).to(device)
    was_training = net.training
    net.eval()
    try:
        probs = predict_volume(net, volume, m, tile_zyx, num_classes, pad_value=pad_value,
                               batch_size=2 if device.type == "cuda" else 1)
    finally:
        net.train(was_training)
    return (probs.argmax(0) * m).to(torch.uint8).cpu()


def candidates_c2(stage1: UNet3D, case1: CachedCase, case2: CachedCase, cfg: RunConfig, stage1_cfg: StageConfig,
                  device: torch.device) -> np.ndarray:
    """C2 of one case: stage-1 foreground -> stage-2 grid (nearest) -> dilated by the radius."""
    import SimpleITK as sitk

    lab1 = predict_labels(stage1, case1, case1.c1, stage1_cfg.tile_zyx, len(cfg.labels) + 1, pad_value_for(cfg),
                          device)
    fg = preprocess.resample(case1.to_image(lab1.numpy()), case2.reference(), "nearest", 0, sitk.sitkUInt8)
    fg_t = torch.from_numpy(sitk.GetArrayFromImage(fg) > 0)
    return preprocess.dilate(fg_t, cfg.dilation_radius).numpy()


def load_best(folder: Path, stage: StageConfig, device: torch.device) -> UNet3D:
    """The stage's best checkpoint (`folder/best.pt`) as a network in eval mode on `device`."""
    try:
        state = ckpt.load_checkpoint(folder / "best.pt")
    except ckpt.CheckpointError as exc:
        raise UserError(f"stage {stage.name} has no usable best.pt in {folder} ({exc}); train it first") from None
    net = build_network(stage.network)
    net.load_state_dict(state["model"])
    return net.to(device).eval()


def c2_masks(stage1: UNet3D, tr1, tr2, va1, va2, cfg: RunConfig, s1: StageConfig, folder: Path,
             ctx: DistContext, dev: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """C2 of every case from the trained stage 1, cached per stage-1 weights (rank 0 computes)."""
    best = folder.parent.parent / s1.name / "best.pt"
    digest = ckpt.sidecar(best).read_text(encoding="utf-8").split()[0][:12]
    folder.mkdir(parents=True, exist_ok=True)

    def one(c1: CachedCase, c2: CachedCase) -> np.ndarray:
        path = folder / f"{c2.name}-{digest}.npy"
        if ctx.is_main and not path.is_file():
            mask = candidates_c2(stage1, c1, c2, cfg, s1, dev)
            tmp = folder / f".tmp-{c2.name}.npy"
            np.save(tmp, mask)
            tmp.replace(path)
        return path  # type: ignore[return-value]

    paths_tr = [one(a, b) for a, b in zip(tr1, tr2)]
    paths_va = [one(a, b) for a, b in zip(va1, va2)]
    ctx.barrier()
    return [np.load(p) for p in paths_tr], [np.load(p) for p in paths_va]  # type: ignore[arg-type]
