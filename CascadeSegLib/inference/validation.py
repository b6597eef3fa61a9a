"""`validate_ct`: the one check of what CascadeSeg accepts as a CT, for the CLI, the library and Slicer.

Each refusal is a `UserError` with one line saying what is wrong and what to do (README,
"When something goes wrong"). The shape checks need only the header, so `cascadeseg segment`
runs them on `io.read_image_info` before reading a voxel, then again on the image it read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..io import ImageInfo


def validate_ct(image: sitk.Image | ImageInfo, source: str | Path | None = None, allow_non_ct: bool = False,
                check_intensities: bool = True) -> str | None:
    """Refuse what CascadeSeg cannot segment; return a one-line warning, or None.

    Always (header alone for an `ImageInfo`): a 3D, single-channel volume with at least 2 voxels
    along every axis. For an image also: no NaN or infinite voxels, and with `check_intensities`
    not constant and looking like CT in HU (air, soft tissue, not 8-bit); an image that does not
    is refused, or with `allow_non_ct` passed with the warning returned. `source` (a path) names
    the image in the messages ("the input" without it).
    """
    subject = str(source) if source is not None else "the input"
    if isinstance(image, ImageInfo):
        _check_shape(image.dimension, image.components, tuple(image.size), subject)
        return None
    _check_shape(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), tuple(image.GetSize()), subject)
    _check_finite(image)
    return _check_intensities(image, allow_non_ct) if check_intensities else None


def _check_shape(dimension: int, components: int, size: tuple[int, ...], subject: str) -> None:
    if dimension != 3:
        what = {2: "a 2D image (one slice)", 4: "4D (a time series or several volumes)"}.get(dimension, f"{dimension}D")
        raise UserError(f"{subject} is {what}; CascadeSeg needs a 3D CT volume (export the whole series, "
                        "or split a 4D image into 3D volumes)")
    if components != 1:
        raise UserError(f"{subject} has {components} components per voxel (RGB or vector data); "
                        "CascadeSeg needs a single-channel CT in HU")
    if min(size) < 2:
        raise UserError(f"{subject} has size {'x'.join(map(str, size))}: a single slice; CascadeSeg needs "
                        "a 3D volume with at least 2 slices along every axis")


def _check_finite(image: sitk.Image) -> None:
    """NaN/Inf voxels would spread through resampling; refuse them with a count."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return  # integer voxels are always finite
    arr = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise UserError(f"the input has {bad} NaN or infinite voxels; replace them (e.g. by -1024) or crop "
                        "them away before segmenting")


def _check_intensities(image: sitk.Image, allow: bool) -> str | None:
    """A constant image is refused; one that does not look like CT in HU is refused, or (allow) warned about."""
    arr = sitk.GetArrayViewFromImage(image)
    step = max(1, arr.size // 2_000_000)
    sample = np.asarray(arr).ravel()[::step]
    lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 0.0)
    reason = None
    if sample.size == 0 or float(sample.max()) == float(sample.min()):
        mm = sitk.MinimumMaximumImageFilter()
        mm.Execute(image)
        if mm.GetMinimum() == mm.GetMaximum():
            # Nothing to segment, whatever the modality: refused even with --allow-non-ct.
            raise UserError(f"the image is empty: every voxel has the same value ({mm.GetMinimum():g}); check "
                            "that the right file or series was exported")
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        reason = "it is 8-bit data"
    elif lo > -300:
        reason = f"it has no air (1st percentile {lo:.0f}, CT air is about -1000 HU)"
        if abs(lo) < 100 and hi > 1000:
            # air at 0 and tissue above 1000: a CT saved without the series' rescale intercept
            reason += (f"; if it is CT saved without its rescale intercept (air at 0, 99th percentile {hi:.0f}), "
                       "subtract 1024 from it or export it again in HU")
        elif hi - lo < 20:
            # a whole CT within a few units: intensities normalised for a network, not HU
            reason += (f"; its values span only {lo:.3g} to {hi:.3g} (1st to 99th percentile), as normalised data "
                       "do; give the CT in HU (air about -1000, soft tissue 0 to 100)")
    elif hi < 0:
        reason = f"it has no soft tissue (99th percentile {hi:.0f} HU)"
    if reason is None:
        return None
    message = f"the image does not look like CT in Hounsfield units: {reason}"
    if not allow:
        raise UserError(message + "; pass --allow-non-ct to segment it anyway")
    return message
