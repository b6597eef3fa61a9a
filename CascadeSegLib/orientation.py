"""Direction cosines that are orthonormal only to ~1e-3: read them, warn, refuse real shears.

Public datasets and exports often store NIfTI sforms (or NRRD/MHA directions) in float32 after
a resampling, so their axes are orthogonal only to about 1e-3. ITK refuses such NIfTI sforms and
passes such NRRD/MHA directions through unchanged (then NIfTI output cannot be written). Within
`MAX_DEVIATION` the nearest orthonormal direction is used, as ITK's permissive NIfTI mode and
nibabel do; beyond it the header is sheared or damaged and the image is refused.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

WARN_DEVIATION = 1e-4
"""Deviations above this get a warning (float32 round-off stays near 1e-7)."""
MAX_DEVIATION = 1e-2
"""Above this the axes are sheared by more than ~0.6 degrees: refused, not silently fixed."""
PERMISSIVE_ENV = "ITK_NIFTI_SFORM_PERMISSIVE"


def deviation(direction: npt.ArrayLike, dim: int = 3) -> float:
    """Largest |cosine| between two axes, or |1 - length| of an axis (0 for orthonormal)."""
    d = np.asarray(direction, dtype=float).reshape(dim, dim)
    if not np.all(np.isfinite(d)):
        return float("inf")
    return float(np.abs(d.T @ d - np.eye(dim)).max())


def nearest_orthonormal(direction: npt.ArrayLike, dim: int = 3) -> tuple[float, ...]:
    """The orthonormal matrix closest to `direction` (polar decomposition, U V^T of the SVD)."""
    d = np.asarray(direction, dtype=float).reshape(dim, dim)
    u, _, vt = np.linalg.svd(d)
    return tuple(float(v) for v in (u @ vt).ravel())


def sform_direction(sform: np.ndarray) -> tuple[float, ...]:
    """ITK's (LPS) direction of a NIfTI sform's 3x3 part (RAS, unit columns): its nearest
    orthonormal matrix with x and y negated."""
    return nearest_orthonormal(np.diag([-1.0, -1.0, 1.0]) @ np.asarray(sform, dtype=float).reshape(3, 3))


def nifti_sform(path: Path) -> tuple[int, int, np.ndarray] | None:
    """(qform_code, sform_code, 3x3 sform with unit columns) from a NIfTI-1/2 header, or None."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(544)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            qcode, scode = struct.unpack(endian + "hh", head[252:256])
            srow = np.array(struct.unpack(endian + "12f", head[280:328]), dtype=float)
            break
        if len(head) >= 544 and struct.unpack(endian + "i", head[:4])[0] == 540:
            qcode, scode = struct.unpack(endian + "ii", head[344:352])
            srow = np.array(struct.unpack(endian + "12d", head[400:496]), dtype=float)
            break
    else:
        return None
    m = srow.reshape(3, 4)[:, :3]
    norms = np.linalg.norm(m, axis=0)
    if not np.all(np.isfinite(m)) or np.any(norms == 0):
        return int(qcode), int(scode), np.full((3, 3), np.nan)
    return int(qcode), int(scode), m / norms


class permissive_nifti:
    """Within the block ITK reads non-orthonormal NIfTI sforms (their nearest orthonormal)."""

    def __enter__(self) -> permissive_nifti:
        self._old = os.environ.get(PERMISSIVE_ENV)
        os.environ[PERMISSIVE_ENV] = "1"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is None:
            os.environ.pop(PERMISSIVE_ENV, None)
        else:
            os.environ[PERMISSIVE_ENV] = self._old


def orthonormalize(image: sitk.Image) -> float:
    """Replace a near-orthonormal direction by its nearest orthonormal one; returns the deviation.

    The origin and spacing stay as read; only the rotation part changes (by at most ~1e-2).
    """
    dim = image.GetDimension()
    dev = deviation(image.GetDirection(), dim)
    if WARN_DEVIATION < dev <= MAX_DEVIATION:
        image.SetDirection(nearest_orthonormal(image.GetDirection(), dim))
    return dev
