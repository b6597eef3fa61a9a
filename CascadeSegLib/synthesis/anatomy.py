"""New anatomy from a label map: one backward displacement field, then nearest-neighbour warping.

The field composes a global affine (scale, rotation about the anatomy's centre), a smooth
elastic field, and per-organ size changes: organ k is scaled about its centroid, with a weight
that is 1 inside it and falls off over `follow_mm`, so its neighbours are pushed or pulled
with it instead of overlapping. Everything is in millimetres of physical space, so the result
does not depend on the label map's voxel size or orientation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..io.images import index_to_physical


@dataclass(frozen=True)
class AnatomySettings:
    scale: float = 0.2                 # global scale factor in [1 - s, 1 + s], per axis (correlated)
    rotation_deg: float = 15.0         # about the longitudinal axis
    tilt_deg: float = 7.0              # about the two other axes
    elastic_mm: float = 8.0            # largest elastic displacement
    elastic_grid_mm: float = 60.0      # control-point spacing of the elastic field
    organ_scale: float = 0.2           # per-organ size factor in [1 - s, 1 + s]
    organs_per_sample: int = 4
    follow_mm: float = 25.0            # how far neighbours follow an organ's size change
    resizable: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas",
                                  "gallbladder", "urinary_bladder", "heart", "colon", "small_bowel")

    @classmethod
    def none(cls) -> AnatomySettings:
        return cls(scale=0.0, rotation_deg=0.0, tilt_deg=0.0, elastic_mm=0.0, organ_scale=0.0, organs_per_sample=0)


def physical_grid(ref: sitk.Image) -> torch.Tensor:
    """Physical (x, y, z) of every voxel centre of `ref`, shape (Z, Y, X, 3), float32."""
    size = ref.GetSize()
    idx = [torch.arange(n, dtype=torch.float32) for n in size]
    zz, yy, xx = torch.meshgrid(idx[2], idx[1], idx[0], indexing="ij")
    ijk = torch.stack([xx, yy, zz], -1)
    m, origin = index_to_physical(ref)
    return ijk @ torch.tensor(m, dtype=torch.float32).T + torch.tensor(origin, dtype=torch.float32)


def _to_input_grid(points: torch.Tensor, image: sitk.Image) -> torch.Tensor:
    """Physical points -> grid_sample coordinates of `image` (align_corners=True)."""
    m, origin = index_to_physical(image)
    inv = torch.tensor(np.linalg.inv(m), dtype=torch.float32)
    ijk = (points - torch.tensor(origin, dtype=torch.float32)) @ inv.T
    size = torch.tensor([max(n - 1, 1) for n in image.GetSize()], dtype=torch.float32)
    return ijk / size * 2.0 - 1.0


def sample_labels(labels: sitk.Image, points: torch.Tensor) -> np.ndarray:
    """Nearest-neighbour label values of `labels` at physical `points` (Z, Y, X, 3); 0 outside."""
    arr = torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.float32))[None, None]
    grid = _to_input_grid(points, labels)[None]
    out = F.grid_sample(arr, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0].round().to(torch.int32).numpy()


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _smooth_field(shape: Sequence[int], spacing_zyx: Sequence[float], grid_mm: float, amplitude: float,
                  rng: np.random.Generator, channels: int = 3) -> torch.Tensor:
    """Random field, smooth over `grid_mm`, max |value| about `amplitude`; shape (*shape, channels)."""
    coarse = [max(2, int(math.ceil(n * s / grid_mm)) + 1) for n, s in zip(shape, spacing_zyx)]
    ctrl = torch.from_numpy(rng.uniform(-1, 1, size=(1, channels, *coarse)).astype(np.float32))
    up = F.interpolate(ctrl, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=True)
    return (up[0] * amplitude).permute(1, 2, 3, 0)


def _organ_weight(mask: np.ndarray, spacing_zyx: Sequence[float], follow_mm: float) -> np.ndarray:
    """1 inside the organ, exp(-d^2 / 2 L^2) at distance d (mm) outside it."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
    return np.exp(-0.5 * (d / max(follow_mm, 1e-3)) ** 2).astype(np.float32)


def warp_labels(labels: sitk.Image, ref: sitk.Image, names: dict[int, str], settings: AnatomySettings,
                rng: np.random.Generator) -> np.ndarray:
    """The label map deformed at random and sampled on `ref`'s grid (array z, y, x)."""
    points = physical_grid(ref)
    arr = sitk.GetArrayViewFromImage(labels)
    fg = np.argwhere(arr > 0)
    if fg.size == 0:
        return sample_labels(labels, points)
    centre_idx = fg.mean(0)[::-1]
    centre = torch.tensor(labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_idx]),
                          dtype=torch.float32)
    s = settings
    q = points
    if s.scale > 0 or s.rotation_deg > 0 or s.tilt_deg > 0:
        base = rng.uniform(1 - s.scale, 1 + s.scale)
        scales = np.clip(base * rng.uniform(1 - s.scale / 4, 1 + s.scale / 4, 3), 1 - s.scale, 1 + s.scale)
        rot = _rotation(*(math.radians(rng.uniform(-a, a)) for a in (s.tilt_deg, s.tilt_deg, s.rotation_deg)))
        # Backward map: output point -> input point = centre + (R S)^-1 (p - centre)
        inv = torch.tensor(np.linalg.inv(rot @ np.diag(scales)), dtype=torch.float32)
        q = (q - centre) @ inv.T + centre
    if s.elastic_mm > 0:
        q = q + _smooth_field(points.shape[:3], ref.GetSpacing()[::-1], s.elastic_grid_mm, s.elastic_mm, rng)
    if s.organ_scale > 0 and s.organs_per_sample > 0:
        q = _resize_organs(labels, q, names, s, rng)
    return sample_labels(labels, q)


def _resize_organs(labels: sitk.Image, q: torch.Tensor, names: dict[int, str], s: AnatomySettings,
                   rng: np.random.Generator) -> torch.Tensor:
    """Scale a few organs about their centroids; the weight field makes neighbours follow."""
    arr = sitk.GetArrayViewFromImage(labels)
    present = {int(v) for v in np.unique(arr)} - {0}
    choices = [v for v, n in names.items() if v in present and n in s.resizable]
    if not choices:
        return q
    picked = rng.choice(choices, size=min(len(choices), s.organs_per_sample), replace=False)
    # Weights on a coarse (~6 mm) copy of the input grid keep the distance maps cheap.
    factor = [max(1, int(round(6.0 / sp))) for sp in labels.GetSpacing()]
    coarse = sitk.BinShrink(sitk.Cast(labels, sitk.sitkUInt8) * 0, factor)  # geometry of the coarse grid
    spacing_zyx = list(coarse.GetSpacing())[::-1]
    grid = _to_input_grid(q, coarse)[None]
    offset = torch.zeros_like(q)
    for v in picked:
        mask = sitk.BinShrink(sitk.Cast(labels == int(v), sitk.sitkFloat32), factor)
        m = sitk.GetArrayFromImage(mask) > 0.25
        if not m.any():
            continue
        w = torch.from_numpy(_organ_weight(m, spacing_zyx, s.follow_mm))[None, None]
        w_at_q = F.grid_sample(w, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        idx = np.argwhere(sitk.GetArrayViewFromImage(labels) == v).mean(0)[::-1]
        c = torch.tensor(labels.TransformContinuousIndexToPhysicalPoint([float(x) for x in idx]), dtype=torch.float32)
        k = float(rng.uniform(1 - s.organ_scale, 1 + s.organ_scale))
        # Scaling the organ by k about c means sampling the input at c + (q - c) / k.
        offset += w_at_q[..., None] * (q - c) * (1.0 / k - 1.0)
    return q + offset
