"""Reading and writing CT images and segmentations (SimpleITK only).

Every reader turns SimpleITK's multi-line RuntimeErrors into a one-line `UserError`, because a
bad input path or a damaged file is the user's problem to fix, not a bug. Every writer goes
through a temporary file in the destination folder and `os.replace`, so an interrupted or failed
write never leaves a half-written output or destroys the previous one. Geometry (origin,
spacing, direction) is passed through untouched: no resampling or re-orientation happens here.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path
from ..errors import UserError
from ..orientation import (
    MAX_DEVIATION,
    WARN_DEVIATION,
    deviation,
    nifti_sform,
    orthonormalize,
    permissive_nifti,
    sform_direction,
)
from .common import READ_SUFFIXES, WRITE_SUFFIXES, Warn, file_suffix, itk_messages, itk_reason, print_warning
from .dicom import dicom_slice_step, pick_series, read_dicom

# --------------------------------------------------------------------------- NIfTI checks


def _nifti_expected_size(header: bytes) -> int | None:
    """Bytes a complete single-file NIfTI-1/2 must hold (header + voxels), None if unknown."""
    if len(header) < 348:
        return None
    for endian in "<>":
        (hdr_size,) = struct.unpack(endian + "i", header[:4])
        if hdr_size == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (vox_offset,) = struct.unpack(endian + "f", header[108:112])
            min_offset = 352
            break
        if hdr_size == 540 and len(header) >= 544:
            (bitpix,) = struct.unpack(endian + "h", header[14:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            (vox_offset,) = struct.unpack(endian + "q", header[168:176])
            min_offset = 544
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(vox_offset):
        return None
    n_vox = 1
    for d in dims[1:ndim + 1]:
        n_vox *= max(int(d), 1)
    return max(int(vox_offset), min_offset) + n_vox * bitpix // 8


def _check_nifti_complete(path: Path, gz: bool) -> None:
    """ITK reads truncated NIfTI files without complaint (zero-filled); catch that here."""
    damaged = UserError(f"{path} is truncated or damaged; copy or export it again")
    try:
        if not gz:
            with open(path, "rb") as f:
                expected = _nifti_expected_size(f.read(544))
            if expected is not None and path.stat().st_size < expected:
                raise damaged
            return
        with gzip.open(path, "rb") as f:
            expected = _nifti_expected_size(f.read(544))
        if expected is None:
            return  # let ITK judge the header
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize == expected % 2**32:
            return  # gzip trailer agrees with the header: complete (the common, O(1) case)
        total = 0  # trailer disagrees (multi-member gzip, or damage): decompress to be sure
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
        if total < expected:
            raise damaged
    except (EOFError, OSError, zlib.error, struct.error):
        raise damaged from None


# --------------------------------------------------------------------------- reading


def _cannot_read(path: Path, err: RuntimeError) -> UserError:
    return UserError(f"cannot read image {path}: {itk_reason(err)}; check that it is a "
                     f"complete image file ({', '.join(READ_SUFFIXES)}) or a DICOM folder")


def _sheared(path: Path, dev: float, what: str = "direction cosines") -> UserError:
    return UserError(f"{path} has {what} that are not orthonormal (axes off by {dev:.2g}, more than "
                     f"{MAX_DEVIATION:g}): the image is sheared or its header is damaged; resample it "
                     f"onto an orthonormal grid or export it again")


def _is_nifti(path: Path) -> bool:
    return file_suffix(path, READ_SUFFIXES) in (".nii", ".nii.gz")


def _itk_read(path: Path, call: Callable[[], Any]) -> Any:
    """`call()` (an ITK read of `path`); a near-orthonormal NIfTI sform is read permissively."""
    try:
        return call()
    except RuntimeError as e:
        header = nifti_sform(path) if _is_nifti(path) and "orthonormal" in str(e) else None
        if header is None:
            raise _cannot_read(path, e) from None
    dev = deviation(header[2].ravel())
    if dev > MAX_DEVIATION:
        raise _sheared(path, dev, "a NIfTI sform whose axes")
    with permissive_nifti():
        try:
            result = call()
        except RuntimeError as e:
            raise _cannot_read(path, e) from None
    if isinstance(result, sitk.Image) and result.GetDimension() == 3:
        # ITK's permissive mode gives the sform's rotation transposed, i.e. turned the other way
        # (SimpleITK 2.5; TotalSegmentator s0000's masks, rotated 18 degrees, came out 37 degrees
        # off): the sform itself is the direction
        result.SetDirection(sform_direction(header[2]))
    return result


_NO_ORIENTATION = ("so the patient's left and right are unknown and organs could be swapped; write the orientation "
                   "into the file (convert the DICOM series again, e.g. with dcm2niix, or check it in Slicer and "
                   "save it), then use that file")


def _nrrd_fields(path: Path) -> set[str] | None:
    """The field names of a NRRD header (before its first blank line), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if not head.startswith(b"NRRD"):
        return None
    text = head.split(b"\n\n", 1)[0].decode("latin-1")
    return {line.split(":", 1)[0].strip().lower() for line in text.splitlines()[1:] if ":" in line}


def _check_orientation_known(path: Path) -> None:
    """A NIfTI whose qform and sform codes are both 0, or a NRRD without "space directions", says
    nothing of where the patient's left is (ITK reads it LPS-aligned, nibabel a NIfTI RAS-aligned):
    refused, since a left-right swap of a CT turns its liver into "spleen" (the sample CT so saved:
    liver 254 ml, spleen 680 ml, no error)."""
    if not path.is_file():
        return
    if _is_nifti(path):
        header = nifti_sform(path)
        if header is not None and header[0] <= 0 and header[1] <= 0:
            raise UserError(f"{path} has no orientation in its NIfTI header (qform_code and sform_code are both 0), "
                            + _NO_ORIENTATION)
    elif file_suffix(path, READ_SUFFIXES) in (".nrrd", ".nhdr"):
        fields = _nrrd_fields(path)
        if fields is not None and "space directions" not in fields:
            raise UserError(f"{path} has no orientation in its NRRD header (no \"space directions\" field), "
                            + _NO_ORIENTATION)


def _check_direction(image: sitk.Image, path: Path, on_warning: Warn | None) -> None:
    """Near-orthonormal directions -> the nearest orthonormal one and a warning; shears -> error."""
    dev = orthonormalize(image)
    if dev > MAX_DEVIATION:
        raise _sheared(path, dev)
    header = nifti_sform(path) if path.is_file() and _is_nifti(path) else None
    sform_dev = deviation(header[2].ravel()) if header and header[1] > 0 else 0.0
    worst = max(dev, sform_dev)
    if worst <= WARN_DEVIATION:
        return
    how = "the nearest orthonormal direction"
    if header is not None and sform_dev > WARN_DEVIATION and header[0] > 0 and image.GetDimension() == 3:
        # ITK falls back to the qform when it has one; say which direction was used.
        nearest = np.asarray(sform_direction(header[2])).reshape(3, 3)
        if not np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), nearest, atol=1e-5):
            how = "the qform's direction"
    what = "NIfTI sform" if sform_dev > WARN_DEVIATION else "direction"
    (on_warning or print_warning)(f"{path}: the {what} is orthonormal only to {worst:.1e}; read with {how}, "
                                  "which the outputs carry")


def read_image(path: str | os.PathLike[str], series_uid: str | None = None,
               on_warning: Warn | None = None) -> sitk.Image:
    """Read a CT from an image file or a DICOM folder, geometry and pixel type as read.

    A DICOM folder with several series needs `series_uid`; the error lists the choices.
    Vector images are returned as read; checking dimensions is the caller's job. Axes that are
    orthogonal only to ~1e-3 (float32 headers of public data) get their nearest orthonormal
    direction and one warning; ITK's own warnings become `on_warning` lines, never raw text.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}; check the path")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied; check the file's permissions")
    with itk_messages(on_warning):
        if path.is_dir():
            image = read_dicom(path, series_uid, on_warning)
        else:
            suffix = file_suffix(path, READ_SUFFIXES)
            if suffix in (".nii", ".nii.gz"):
                _check_nifti_complete(path, gz=suffix == ".nii.gz")
            image = _itk_read(path, lambda: sitk.ReadImage(str(path)))
            _check_orientation_known(path)          # after the read: an unreadable file says so first
    _check_direction(image, path, on_warning)
    return image


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image: enough to check it before reading any voxel."""

    size: tuple[int, ...]           # (x, y, z), SimpleITK order
    spacing: tuple[float, ...]
    pixel_id: int                   # SimpleITK pixel id of one component
    components: int
    dimension: int

    @property
    def pixel_type(self) -> str:
        return sitk.GetPixelIDValueAsString(self.pixel_id)


def read_image_info(path: str | os.PathLike[str], series_uid: str | None = None) -> ImageInfo:
    """Size, spacing and pixel type from the header only (no voxels read), as `read_image` sees it.

    For a DICOM folder the size along z is the number of files of the chosen series. Used to
    refuse images that would not fit in memory before reading them.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}; check the path")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied; check the file's permissions")
    reader = sitk.ImageFileReader()
    if path.is_dir():
        picked = pick_series(path, series_uid)
        reader.SetFileName(picked.files[0])
        n_files = len(picked.files)
    else:
        reader.SetFileName(str(path))
        n_files = 0
    with itk_messages(lambda message: None):  # read_image reports them; say each once
        _itk_read(path, reader.ReadImageInformation)
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    dim = int(reader.GetDimension())
    if n_files:
        # A DICOM file is one slice (size z 1) of a 3D series.
        size = size[:2] + (n_files,)
        spacing = spacing[:2] + (dicom_slice_step(picked.files, reader.GetOrigin()) or
                                 (spacing[2] if len(spacing) > 2 else 1.0),)
        dim = 3
    pixel_id = int(reader.GetPixelID())
    comps = int(reader.GetNumberOfComponents())
    if comps > 1:
        # Vector pixel ids ("vector of 16-bit signed integer") -> the scalar id of one component.
        scalar = {sitk.sitkVectorUInt8: sitk.sitkUInt8, sitk.sitkVectorInt8: sitk.sitkInt8,
                  sitk.sitkVectorUInt16: sitk.sitkUInt16, sitk.sitkVectorInt16: sitk.sitkInt16,
                  sitk.sitkVectorUInt32: sitk.sitkUInt32, sitk.sitkVectorInt32: sitk.sitkInt32,
                  sitk.sitkVectorFloat32: sitk.sitkFloat32, sitk.sitkVectorFloat64: sitk.sitkFloat64}
        pixel_id = scalar.get(pixel_id, pixel_id)
    return ImageInfo(size=size, spacing=spacing, pixel_id=pixel_id, components=comps, dimension=dim)


# --------------------------------------------------------------------------- geometry


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    """Exactly the same voxel grid (size, origin, spacing, direction; no tolerance)."""
    return (a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
            and a.GetSpacing() == b.GetSpacing() and a.GetDirection() == b.GetDirection())


def index_to_physical(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, o), float64: the physical point of continuous index (x, y, z) is A @ index + o
    (A = direction x spacing; the one place this matrix is spelled out)."""
    axes = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(img.GetSpacing(), dtype=np.float64)
    return axes, np.array(img.GetOrigin(), dtype=np.float64)


def axis_aligned_indices(source: sitk.Image, target: sitk.Image) -> list[np.ndarray] | None:
    """Per axis (x, y, z), float64: the continuous index in `source` of each of `target`'s voxel
    centres along that axis; None unless each axis of one grid is an axis of the other, same
    order, possibly flipped (then any resampling between them is separable, axis by axis). The
    one place that check and mapping are written; nearest and linear lookups build on it."""
    d_src = np.array(source.GetDirection(), dtype=np.float64).reshape(3, 3)
    d_tgt = np.array(target.GetDirection(), dtype=np.float64).reshape(3, 3)
    signs = np.sign(np.einsum("ij,ij->j", d_src, d_tgt))
    if not np.all(signs != 0) or not np.allclose(d_src * signs, d_tgt, atol=1e-9, rtol=0):
        return None
    offset = d_src.T @ (np.array(target.GetOrigin()) - np.array(source.GetOrigin()))
    return [(offset[axis] + np.arange(target.GetSize()[axis]) * signs[axis] * target.GetSpacing()[axis])
            / source.GetSpacing()[axis] for axis in range(3)]


def describe_geometry(img: sitk.Image) -> str:
    """One line describing the grid, for error messages and reports."""
    def fmt(values: Iterable[float]) -> str:
        return ", ".join(f"{v:.6g}" for v in values)

    size = "x".join(str(s) for s in img.GetSize())
    d = img.GetDirection()
    n = img.GetDimension()
    rows = "; ".join(" ".join(f"{d[r * n + c]:.6g}" for c in range(n)) for r in range(n))
    comps = img.GetNumberOfComponentsPerPixel()
    ptype = img.GetPixelIDTypeAsString() + (f" ({comps} components)" if comps > 1 else "")
    return (f"size {size}, spacing ({fmt(img.GetSpacing())}) mm, origin ({fmt(img.GetOrigin())}) "
            f"mm, direction [{rows}], {ptype}")


# --------------------------------------------------------------------------- writing


def same_file(a: Path, b: Path) -> bool:
    """`a` and `b` are the same file (or, when either does not exist yet, the same path)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)



def prepare_output(path: Path, overwrite: bool, protect: Iterable[str | os.PathLike[str]] | None,
                    suffixes: Sequence[str]) -> str:
    """Check the destination; returns the ending to give the temporary file."""
    suffix = file_suffix(path, suffixes)
    if suffix is None:
        raise UserError(f"cannot write {path}: use one of {', '.join(suffixes)}")
    for p in protect or ():
        if same_file(path, Path(p)):
            raise UserError(f"refusing to write over the input {p}; choose another output path")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path.parent}: {e.strerror}") from None
    return suffix


def atomic_write_image(image: sitk.Image, path: Path, suffix: str, compress: bool) -> None:
    """Write to `.tmp-XXXX<suffix>` beside `path`, then os.replace; never a partial file."""
    try:
        # The temporary file is removed on any error, and on Ctrl-C.
        with atomic_path(path, suffix=suffix) as tmp:
            sitk.WriteImage(image, str(tmp), compress)
    except RuntimeError as e:
        raise UserError(f"cannot write {path}: {itk_reason(e)}; check free disk space "
                        f"and write permission") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; check free disk space "
                        f"and write permission") from None


def write_image(image: sitk.Image, path: str | os.PathLike[str], compress: bool = True,
                overwrite: bool = True,
                protect: Iterable[str | os.PathLike[str]] | None = None) -> Path:
    """Atomically write an image (.nii, .nii.gz, .nrrd, .mha); returns the path written.

    `protect` lists input paths that must never be overwritten (output == input mistakes).
    """
    path = Path(path)
    suffix = prepare_output(path, overwrite, protect, WRITE_SUFFIXES)
    atomic_write_image(image, path, ".nrrd" if suffix.endswith(".nrrd") else suffix, compress)
    return path


# --------------------------------------------------------------------------- Slicer .seg.nrrd
