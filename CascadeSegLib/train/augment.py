"""Sub-volume extraction with on-device augmentation: one grid_sample per sample.

A random affine (rotation, isotropic scaling) plus a smooth elastic field are composed into
one sampling grid, so the image is interpolated once (trilinear) and the label and the
candidate mask C are read at exactly the same points (nearest). Translation moves the
sub-volume's centre by whole voxels. Intensity changes (scale/shift, contrast, gamma, blur,
low resolution, noise) act on the resampled patch afterwards. Left-right mirroring is never
done: left and right organs carry different labels.

Arrays are (z, y, x); every offset and displacement here is in voxels of the stage grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..jsonkinds import wrong_kind


@dataclass
class AugmentConfig:
    enabled: bool = True
    # spatial (Roth et al. 2018: elastic grid 32 vox, +-4 vox; rotation +-5 deg; translation +-20 vox)
    elastic_prob: float = 1.0
    elastic_grid: int = 32
    elastic_max: float = 4.0
    rotation_deg: float = 5.0
    translation_vox: float = 20.0
    scale: float = 0.0              # isotropic zoom within +-scale (e.g. 0.15)
    # intensity, on normalised values (the prototxt's +-5-20 %)
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    # beyond the paper (each applied with probability extra_prob)
    extra_prob: float = 0.0
    contrast: float = 0.0           # contrast factor within 1 +- contrast
    gamma: float = 0.0              # gamma within [1/(1+g), 1+g]
    noise_std: float = 0.0          # Gaussian noise sd up to this (normalised units)
    blur_sigma: float = 0.0         # Gaussian blur sd up to this (voxels)
    lowres: float = 0.0             # simulate a grid up to (1+lowres) times coarser

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any] | None) -> AugmentConfig:
        d = dict(d or {})
        known = {f.name for f in fields(AugmentConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation settings {sorted(unknown)} (known: {sorted(known)})")
        problem = wrong_kind(AugmentConfig, d, "augment")
        if problem:
            raise ValueError(problem)
        return AugmentConfig(**d)

    @staticmethod
    def off() -> AugmentConfig:
        return AugmentConfig(enabled=False)


def _uniform(gen: torch.Generator, lo: float, hi: float, shape: Sequence[int] = ()) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _rotation_zyx(angles_rad: torch.Tensor) -> torch.Tensor:
    """3x3 rotation acting on (z, y, x) vectors, composed of rotations about each axis."""
    mats = []
    for axis, a in enumerate(angles_rad.tolist()):
        c, s = math.cos(a), math.sin(a)
        i, j = [b for b in range(3) if b != axis]
        m = torch.eye(3, dtype=torch.float64)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


@dataclass
class SpatialParams:
    matrix: torch.Tensor            # (3, 3) float64, output offset -> input offset (z, y, x)
    shift: tuple[int, int, int]     # whole-voxel translation of the centre
    elastic: torch.Tensor | None    # (3, gz, gy, gx) control-point displacements (voxels) or None


def random_spatial(cfg: AugmentConfig, patch: Sequence[int], gen: torch.Generator) -> SpatialParams:
    """Draw one sample's spatial transform (identity when augmentation is off)."""
    if not cfg.enabled:
        return SpatialParams(torch.eye(3, dtype=torch.float64), (0, 0, 0), None)
    rot = math.radians(cfg.rotation_deg)
    angles = _uniform(gen, -rot, rot, (3,))
    scale = float(_uniform(gen, 1.0 - cfg.scale, 1.0 + cfg.scale)) if cfg.scale > 0 else 1.0
    matrix = _rotation_zyx(angles) * scale
    t = cfg.translation_vox
    shift = tuple(int(v) for v in torch.round(_uniform(gen, -t, t, (3,))).tolist()) if t > 0 else (0, 0, 0)
    elastic = None
    if cfg.elastic_max > 0 and float(_uniform(gen, 0, 1)) < cfg.elastic_prob:
        g = max(1, int(cfg.elastic_grid))
        ctrl = [max(2, math.ceil(p / g) + 1) for p in patch]
        elastic = _uniform(gen, -cfg.elastic_max, cfg.elastic_max, (3, *ctrl)).float()
    return SpatialParams(matrix, shift, elastic)  # type: ignore[arg-type]


def sample_points(params: SpatialParams, patch: Sequence[int], device: torch.device) -> torch.Tensor:
    """(pz, py, px, 3) input offsets (z, y, x, voxels) from the sub-volume centre."""
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p // 2) for p in patch]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)          # output offsets
    pts = grid @ params.matrix.to(device=device, dtype=torch.float32).T
    if params.elastic is not None:
        disp = F.interpolate(params.elastic[None].to(device), size=tuple(patch), mode="trilinear",
                             align_corners=True)[0]
        pts = pts + disp.permute(1, 2, 3, 0)
    return pts


def _crop_padded(arr: np.ndarray | torch.Tensor, lo: Sequence[int], hi: Sequence[int], fill: float,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """arr[lo:hi] with out-of-volume voxels set to `fill` (works on memory-mapped arrays)."""
    shape = arr.shape
    src = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, shape))
    out = torch.full(tuple(b - a for a, b in zip(lo, hi)), fill, dtype=dtype, device=device)
    if all(s.stop > s.start for s in src):
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
        piece = arr[src]
        if isinstance(piece, np.ndarray):     # a read-only memory map: copy (torch wants writable memory)
            piece = torch.from_numpy(np.array(piece, order="C", copy=True))
        out[dst] = piece.to(device=device, dtype=dtype)
    return out


def extract(image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor, cmask: np.ndarray | torch.Tensor,
            center: Sequence[int], patch: Sequence[int], params: SpatialParams, pad_value: float,
            device: torch.device | str = "cpu", image_mode: str = "bilinear"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample one sub-volume: image (1, pz, py, px) float, label (pz, py, px) long, C mask bool.

    `image`, `label` and `cmask` are (z, y, x) arrays of one volume (memory-mapped is fine);
    only the box the transformed patch can reach is read and sent to the device.
    """
    device = torch.device(device)
    pts = sample_points(params, patch, device)
    c = [int(v) + int(s) for v, s in zip(center, params.shift)]
    lo_f = pts.reshape(-1, 3).amin(0)
    hi_f = pts.reshape(-1, 3).amax(0)
    lo = [c[a] + int(math.floor(float(lo_f[a]))) - 1 for a in range(3)]
    hi = [c[a] + int(math.ceil(float(hi_f[a]))) + 2 for a in range(3)]
    img = _crop_padded(image, lo, hi, pad_value, device, torch.float32)
    lab = _crop_padded(label, lo, hi, 0, device, torch.float32)
    cm = _crop_padded(cmask, lo, hi, 0, device, torch.float32)
    size = torch.tensor([h - l_ for l_, h in zip(lo, hi)], device=device, dtype=torch.float32)
    idx = pts + torch.tensor([c[a] - lo[a] for a in range(3)], device=device, dtype=torch.float32)
    norm = idx / (size - 1).clamp_min(1) * 2.0 - 1.0                       # align_corners=True
    grid = norm.flip(-1)[None]                                            # (1, pz, py, px, [x, y, z])
    out_img = F.grid_sample(img[None, None], grid, mode=image_mode, padding_mode="border", align_corners=True)[0]
    both = torch.stack([lab, cm])[None]
    nearest = F.grid_sample(both, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
    return out_img, nearest[0].round().long(), nearest[1] > 0.5


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None]                                                           # (1, 1, z, y, x)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.reshape(shape))
    return y[0]


def augment_intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, value_range: tuple[float, float]
                      ) -> torch.Tensor:
    """Random intensity changes of one (1, z, y, x) normalised patch."""
    if not cfg.enabled:
        return x
    lo, hi = value_range

    def chance() -> bool:
        return cfg.extra_prob > 0 and float(_uniform(gen, 0, 1)) < cfg.extra_prob

    if cfg.gamma > 0 and chance():
        g = float(torch.exp(_uniform(gen, -math.log1p(cfg.gamma), math.log1p(cfg.gamma))))
        u = ((x - lo) / (hi - lo)).clamp(0, 1)
        x = u.pow(g) * (hi - lo) + lo
    if cfg.contrast > 0 and chance():
        f = float(_uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast))
        m = x.mean()
        x = (x - m) * f + m
    if cfg.intensity_scale > 0 or cfg.intensity_shift > 0:
        s = float(_uniform(gen, 1 - cfg.intensity_scale, 1 + cfg.intensity_scale))
        b = float(_uniform(gen, -cfg.intensity_shift, cfg.intensity_shift)) * (hi - lo)
        x = x * s + b
    if cfg.blur_sigma > 0 and chance():
        x = _gaussian_blur(x, float(_uniform(gen, 0.5, max(0.5, cfg.blur_sigma))))
    if cfg.lowres > 0 and chance():
        f = float(_uniform(gen, 1.0, 1.0 + cfg.lowres))
        size = x.shape[-3:]
        small = [max(2, int(round(n / f))) for n in size]
        x = F.interpolate(F.interpolate(x[None], size=small, mode="trilinear", align_corners=False),
                          size=size, mode="trilinear", align_corners=False)[0]
    if cfg.noise_std > 0 and chance():
        sd = float(_uniform(gen, 0, cfg.noise_std)) * (hi - lo)
        noise = torch.randn(tuple(x.shape), generator=gen).to(x.device)
        x = x + noise * sd
    return x
