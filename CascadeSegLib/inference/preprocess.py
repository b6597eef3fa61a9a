"""Resampling, intensity windowing, the body mask C1 and the dilation that makes C2.

Resampling uses SimpleITK (multi-threaded, geometry-exact); masks and intensities are torch
tensors on the inference device. Arrays are (z, y, x); spacings are (x, y, z) like SimpleITK.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


MODEL_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
"""Axes of every model grid (columns: x, y, z in LPS): array x runs to the patient's right, y to
the front, z up - the orientation NIfTI files (RAS) are stored in, and so the one every model was
trained on. A DICOM series (identity direction) would otherwise reach the network mirrored left
to right and front to back, which it never saw."""


def model_axes(direction: Sequence[float]) -> list[tuple[int, float]]:
    """For each model axis (x, y, z): the image axis closest to it and the sign that aligns them."""
    d = np.array(direction, dtype=float).reshape(3, 3)
    c = np.array(MODEL_DIRECTION).reshape(3, 3)
    cos = c.T @ d                                   # cos[k, a]: model axis k . image axis a
    out: list[tuple[int, float]] = []
    for k in range(3):
        order = np.argsort(-np.abs(cos[k]))
        a = int(next(i for i in order if i not in [b for b, _ in out]))
        out.append((a, 1.0 if cos[k, a] >= 0 else -1.0))
    return out


def grid_for_spacing(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """An empty image with `spacing` covering the same physical extent as `image`, its axes in
    the model orientation (`MODEL_DIRECTION`: permuted and flipped, never rotated).

    The voxel centres are those of a grid that keeps `image`'s origin and direction, indexed in
    the model's axis order; an image already stored that way gets exactly that grid. The size is
    rounded so the extent changes by < 1 voxel.
    """
    spacing = [float(s) for s in spacing]
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    n_img, s_img = image.GetSize(), image.GetSpacing()
    axes = model_axes(image.GetDirection())
    size, columns = [], []
    origin = np.array(image.GetOrigin(), dtype=float)
    for k, (a, sign) in enumerate(axes):
        n = max(1, int(round(n_img[a] * s_img[a] / spacing[k])))
        size.append(n)
        columns.append(sign * d[:, a])
        if sign < 0:                    # index 0 at the far end of that axis
            origin = origin + (n - 1) * spacing[k] * d[:, a]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection([float(v) for v in np.stack(columns, axis=1).ravel()])
    return ref


def resample(image: sitk.Image, reference: sitk.Image, interpolator: str = "linear",
             default_value: float = 0.0, output_type: int | None = None) -> sitk.Image:
    """Resample `image` onto `reference`'s grid (identity transform, physical coordinates)."""
    if output_type is None:
        output_type = image.GetPixelID()
    return sitk.Resample(image, reference, sitk.Transform(), _INTERP[interpolator], float(default_value),
                         output_type)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], interpolator: str = "linear",
                        default_value: float = 0.0, output_type: int | None = None) -> sitk.Image:
    return resample(image, grid_for_spacing(image, spacing), interpolator, default_value, output_type)


def subgrid(reference: sitk.Image, start_xyz: Sequence[int], size_xyz: Sequence[int]) -> sitk.Image:
    """An empty image of `size_xyz` voxels on `reference`'s grid, starting at its voxel `start_xyz`
    (same spacing and direction; the index may lie outside the reference)."""
    sub = sitk.Image([int(n) for n in size_xyz], sitk.sitkUInt8)
    sub.SetSpacing(reference.GetSpacing())
    sub.SetDirection(reference.GetDirection())
    sub.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in start_xyz]))
    return sub


def clip_window(start: Sequence[int], size: Sequence[int],
                shape: Sequence[int]) -> tuple[list[int], list[int], tuple[int, ...]]:
    """The part [lo, hi) of the window [start, start + size) inside a grid of `shape` (z, y, x),
    and the F.pad widths (x first) that grow that part back to the whole window."""
    lo = [max(0, int(a)) for a in start]
    hi = [min(int(a) + int(n), int(dim)) for a, n, dim in zip(start, size, shape)]
    before = [l - int(a) for l, a in zip(lo, start)]
    after = [int(a) + int(n) - h for a, n, h in zip(start, size, hi)]
    return lo, hi, (before[2], after[2], before[1], after[1], before[0], after[0])


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of `array` on `device`; to a GPU through pinned memory (one DMA, no staging copy)."""
    t = torch.from_numpy(np.array(array, copy=True))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class GridWindows:
    """A CT on a model grid, resampled only inside the windows a network asks for.

    Stage 2 computes a few boxes covering ~30% of its grid; resampling the whole grid first
    would be most of its non-network time at fine spacings. Windows are resampled straight
    from the input at the grid's own voxel centres, so they equal crops of a full resampling;
    voxels beyond the grid get `default` (air), as padding of a full grid would.
    """

    def __init__(self, image: sitk.Image, reference: sitk.Image, device: torch.device | str = "cpu",
                 default: float = -1024.0) -> None:
        self.image, self.reference, self.device, self.default = image, reference, torch.device(device), default
        self.shape = tuple(int(n) for n in reversed(reference.GetSize()))  # (z, y, x)

    def window(self, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """HU (z, y, x) float32 of the grid voxels [start, start + size), padded beyond the grid."""
        lo, hi, pad = clip_window(start, size, self.shape)
        if any(h <= l for l, h in zip(lo, hi)):
            return torch.full(tuple(int(n) for n in size), self.default, dtype=torch.float32, device=self.device)
        sub = subgrid(self.reference, lo[::-1], [h - l for l, h in zip(lo[::-1], hi[::-1])])
        hu = resample(self.image, sub, "linear", self.default, sitk.sitkFloat32)
        out = to_device(sitk.GetArrayViewFromImage(hu), self.device)
        return F.pad(out, pad, value=self.default) if any(pad) else out

    def full(self) -> torch.Tensor:
        return self.window((0, 0, 0), self.shape)


NORMALIZATIONS = ("window01", "window11")


def package_problem(window: Sequence[float], normalization: str, dilation_radius: int) -> str | None:
    """Why a package with this window, normalisation and C2 dilation could not run (None when it
    can). One check for a training config when it is read and a model.json when it loads, not
    when the first case is cached hours later."""
    if len(window) != 2 or not all(math.isfinite(w) for w in window) or not window[0] < window[1]:
        return f"the intensity window must be two finite HU values, low then high, got {list(window)}"
    if normalization not in NORMALIZATIONS:
        return f"unknown intensity normalization {normalization!r} (expected {' or '.join(map(repr, NORMALIZATIONS))})"
    if dilation_radius < 0:
        return f"dilation_radius must be 0 or more voxels, got {dilation_radius}"
    return None


def normalize(hu: torch.Tensor, window: Sequence[float], mode: str = "window01") -> torch.Tensor:
    """Clip HU to the model's window and scale: 'window01' -> [0, 1], 'window11' -> [-1, 1]."""
    lo, hi = float(window[0]), float(window[1])
    x = hu.float().clamp(lo, hi)
    if mode == "window01":
        return (x - lo) / (hi - lo)
    if mode == "window11":
        return (x - lo) / (hi - lo) * 2.0 - 1.0
    raise ValueError(f"unknown normalization {mode!r} (expected 'window01' or 'window11')")


def body_mask(hu: torch.Tensor, threshold: float = -500.0) -> torch.Tensor:
    """C1: voxels above `threshold` HU, holes filled, largest connected component only.

    Holes are filled slice by slice (axial) and then in 3D so air inside lungs and bowel counts
    as body even where it reaches the top or bottom of the scan.
    """
    from scipy import ndimage

    mask = (hu > threshold).cpu().numpy()
    if not mask.any():
        return torch.zeros_like(hu, dtype=torch.bool)
    labels, n = ndimage.label(mask)
    if n > 1:
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        mask = labels == int(counts.argmax())
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_fill_holes(mask, structure=in_plane)
    mask = ndimage.binary_fill_holes(mask)
    return torch.from_numpy(mask).to(hu.device)


def ball(radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    r = int(radius)
    ax = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    return (zz ** 2 + yy ** 2 + xx ** 2) <= r * r + 1e-6


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation with a ball of `radius` voxels (the paper's C2 uses r = 3).

    The ball is a union of x-segments: for each (dz, dy) with dz^2 + dy^2 <= r^2 the segment's
    half-width is floor(sqrt(r^2 - dz^2 - dy^2)). So the dilation is one 1D max-pool along x per
    distinct half-width (r + 1 of them), then an OR of shifted copies - a few cheap passes instead
    of a float convolution with (2r + 1)^3 taps. Only the bounding box of the mask (plus the
    radius) is touched, which keeps this cheap when the foreground is ~10% of the volume.
    """
    r = int(radius)
    box = bounding_box(mask, pad=r, shape=mask.shape) if r > 0 else None
    if box is None:  # nothing to grow, or an empty mask
        return mask.clone()
    sl = tuple(slice(a, b) for a, b in box)
    sub = mask[sl]
    z, y, x = sub.shape
    padded = F.pad(sub.to(torch.float16 if sub.is_cuda else torch.float32)[None, None], [r] * 6)
    pooled: dict[int, torch.Tensor] = {}
    out = torch.zeros((z, y, x), dtype=torch.bool, device=mask.device)
    for dz in range(-r, r + 1):
        for dy in range(-r, r + 1):
            rest = r * r - dz * dz - dy * dy
            if rest < 0:
                continue
            w = math.isqrt(rest)
            if w not in pooled:
                wide = padded if w == 0 else F.max_pool3d(padded, (1, 1, 2 * w + 1), stride=1, padding=(0, 0, w))
                pooled[w] = wide[0, 0] > 0.5
            out |= pooled[w][r + dz:r + dz + z, r + dy:r + dy + y, r:r + x]
    result = torch.zeros_like(mask)
    result[sl] = out
    return result


def bounding_box(mask: torch.Tensor | np.ndarray, pad: int = 0,
                 shape: Sequence[int] | None = None) -> list[tuple[int, int]] | None:
    """[(start, stop), ...] per axis of the True voxels, grown by `pad` and clipped to `shape`."""
    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if not bool(m.any()):
        return None
    shape = shape or m.shape
    box = []
    for axis in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != axis)
        idx = torch.nonzero(m.any(dim=other) if other else m).flatten()
        lo, hi = int(idx[0]) - pad, int(idx[-1]) + 1 + pad
        box.append((max(0, lo), min(int(shape[axis]), hi)))
    return box
