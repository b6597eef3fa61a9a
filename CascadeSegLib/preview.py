"""A three-view overlay picture of a result (axial, coronal, sagittal), written as PNG.

Slices are resampled from physical space onto an axis-aligned LPS grid, so the picture is in
radiological convention whatever the input's orientation: axial with the patient's right on
the left and anterior up; coronal and sagittal with superior up.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .labels import LabelSet


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize())
    corners = []
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                idx = (np.array([i, j, k]) * (size - 1)).tolist()
                corners.append(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))
    pts = np.array(corners)
    return pts.min(0), pts.max(0)


def _slice(image: sitk.Image, origin: Sequence[float] | np.ndarray, size: Sequence[int] | np.ndarray, spacing: float,
           interpolator: int, default: float, pixel_type: int) -> np.ndarray:
    ref = sitk.Image([int(s) for s in size], pixel_type)
    ref.SetOrigin([float(o) for o in origin])
    ref.SetSpacing([spacing] * 3)
    return sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), interpolator, default, pixel_type))


def render_preview(ct: sitk.Image, labels: sitk.Image, labelset: LabelSet, path: str | Path,
                   window: tuple[float, float] = (-160.0, 240.0), pixel_mm: float | None = None,
                   alpha: float = 0.45) -> Path:
    """Write axial | coronal | sagittal slices through the labelled region's centre."""
    lo, hi = _physical_box(ct)
    extent = hi - lo
    spacing = pixel_mm or max(float(extent.max()) / 320.0, 0.5)
    n = np.maximum(np.ceil(extent / spacing).astype(int) + 1, 1)
    fg = sitk.GetArrayViewFromImage(labels) > 0
    if fg.any():
        # Centroid from per-axis projections: no list of foreground coordinates is built.
        idx = np.array([np.average(np.arange(fg.shape[a]), weights=fg.sum(axis=tuple(b for b in range(3) if b != a)))
                        for a in range(3)])[::-1]
        centre = np.array(labels.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    else:
        centre = (lo + hi) / 2
    views = []
    for axis in (2, 1, 0):  # axial (fixed z), coronal (fixed y), sagittal (fixed x)
        origin = lo.copy()
        origin[axis] = centre[axis]
        size = n.copy()
        size[axis] = 1
        hu = _slice(ct, origin, size, spacing, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        lb = _slice(labels, origin, size, spacing, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        hu, lb = np.squeeze(hu, axis=2 - axis), np.squeeze(lb, axis=2 - axis)
        if axis != 2:  # rows are z: superior (larger z in LPS) at the top
            hu, lb = hu[::-1], lb[::-1]
        views.append(_compose(hu, lb, labelset, window, alpha))
    picture = _layout(views)
    picture = _upscale(picture, 2 if picture.shape[1] < 700 else 1)
    out = sitk.GetImageFromArray(picture, isVector=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sitk.WriteImage(out, str(tmp))
    return path


def _layout(views: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """The views side by side; for a slab, whose coronal and sagittal views are a few rows
    of an axial view's height, one under the other, so they are not strips above a black field."""
    height, width = max(v.shape[0] for v in views), max(v.shape[1] for v in views)
    beside = 3 * min(v.shape[0] for v in views) >= height
    if beside:      # pad each view to the tallest, join along the width
        padded = [np.pad(v, ((0, height - v.shape[0]), (0, 0), (0, 0))) for v in views]
        spacer = np.zeros((height, gap, 3), np.uint8)
    else:           # pad each view to the widest, join along the height
        padded = [np.pad(v, ((0, 0), (0, width - v.shape[1]), (0, 0))) for v in views]
        spacer = np.zeros((gap, width, 3), np.uint8)
    parts = [padded[0]]
    for view in padded[1:]:
        parts += [spacer, view]
    return np.concatenate(parts, axis=1 if beside else 0)


def _compose(hu: np.ndarray, lb: np.ndarray, labelset: LabelSet, window: tuple[float, float],
             alpha: float) -> np.ndarray:
    lo, hi = window
    grey = (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lut = np.zeros((256, 3), np.float32)
    for label in labelset:
        lut[label.value] = label.color
    fg = lb > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * lut[lb[fg]]
    # Outline each label in its full colour so small structures stay visible.
    edge = np.zeros_like(fg)
    edge[1:, :] |= lb[1:, :] != lb[:-1, :]
    edge[:, 1:] |= lb[:, 1:] != lb[:, :-1]
    edge &= fg
    rgb[edge] = lut[lb[edge]]
    return rgb.clip(0, 255).astype(np.uint8)


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    return img.repeat(factor, axis=0).repeat(factor, axis=1)
