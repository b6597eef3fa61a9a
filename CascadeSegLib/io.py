"""Reading and writing CT images and segmentations (SimpleITK only).

Every reader turns SimpleITK's multi-line RuntimeErrors into a one-line `UserError`, because a
bad input path or a damaged file is the user's problem to fix, not a bug. Every writer goes
through a temporary file in the destination folder and `os.replace`, so an interrupted or failed
write never leaves a half-written output or destroys the previous one. Geometry (origin,
spacing, direction) is passed through untouched: no resampling or re-orientation happens here.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import UserError
from .itkwarnings import captured_itk_messages
from .labels import LabelSet
from .orientation import (
    MAX_DEVIATION,
    WARN_DEVIATION,
    deviation,
    nearest_orthonormal,
    nifti_sform,
    orthonormalize,
    permissive_nifti,
)

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File endings read as images (plus DICOM folders)."""
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
"""File endings that can be written atomically (single-file formats only)."""
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".seg.nhdr")
"""Slicer segmentations: NRRD files with segment names, colours and terminology."""
NAME_SUFFIXES = SEGMENTATION_SUFFIXES + READ_SUFFIXES
"""Endings removed from a file name to name its case (a longer ending before one it ends with)."""
OUTPUT_SUFFIXES = (".seg.nrrd", *WRITE_SUFFIXES)
"""Output names that are one file (a label map or a segmentation); any other output is a folder."""
_NAME_SUFFIXES = NAME_SUFFIXES

_OUTPUT_TAILS = ("_labels", "_probabilities", "_c1", "_c2")  # `cascadeseg segment` outputs
SEG_REPRESENTATION = "Binary labelmap"
_SEG_CONTAINED = "Binary labelmap|Closed surface|"
_SEG_STATUS_TAG = "Segmentation.Status:inprogress"


# --------------------------------------------------------------------------- helpers

Warn = Callable[[str], None]
# ITK messages that our own error or warning already says better.
_SAID_BETTER = ("No Series were found", "non-orthogonal sform", "orthonormal")


def print_warning(message: str) -> None:
    """The default `on_warning`: one `cascadeseg: warning:` line on stderr."""
    print(f"cascadeseg: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _itk_messages(on_warning: Warn | None) -> Iterator[None]:
    """Run ITK calls with their raw warnings caught; each becomes one warning line.

    On an exception the caught messages are dropped: the one-line error says what went wrong.
    """
    with captured_itk_messages() as caught:
        yield
    for message in caught:
        if not any(s in message for s in _SAID_BETTER):
            (on_warning or print_warning)(message)


def _suffix(path: Path, choices: Sequence[str]) -> str | None:
    """The (possibly compound) ending of `path` among `choices`, lower-case, or None."""
    name = path.name.lower()
    for s in sorted(choices, key=len, reverse=True):
        if name.endswith(s) and len(name) > len(s):
            return s
    return None


def _itk_reason(err: BaseException) -> str:
    """The informative line of a (multi-line) ITK exception message, shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "ERROR" in ln or "error" in ln.lower() or "expected" in ln]
    text = (keep or lines or [type(err).__name__])[-1]
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1].strip()
    # "ImageFileReader(0x55..): msg" -> "msg"
    if "): " in text and text.index("): ") < 60:
        text = text.split("): ", 1)[1]
    for prefix in ("sitk::ERROR:", "ERROR:"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = " ".join(text.split()).rstrip(".;: ")
    return text[:200]


# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder; `files` are sorted by slice position (GDCM)."""

    uid: str
    files: tuple[str, ...] = field(repr=False)
    description: str
    n_slices: int


def _dicom_tag(path: str, tag: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    if reader.HasMetaDataKey(tag):
        return reader.GetMetaData(tag).strip()
    return ""


def list_dicom_series(folder: str | os.PathLike[str], on_warning: Warn | None = None) -> list[DicomSeries]:
    """All DICOM series directly inside `folder` (not recursive), sorted by UID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"DICOM folder not found: {folder}; pass an existing folder")
    with _itk_messages(on_warning):
        try:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError as e:  # pragma: no cover - GDCM rarely throws here
            raise UserError(f"cannot scan DICOM folder {folder}: {_itk_reason(e)}") from None
        series = []
        for uid in sorted(uids):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            if not files:
                continue
            desc = _dicom_tag(files[0], "0008|103e")
            series.append(DicomSeries(uid=uid, files=files, description=desc, n_slices=len(files)))
    return series


def is_dicom_folder(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a folder that directly contains at least one DICOM series."""
    path = Path(path)
    if not path.is_dir():
        return False
    with _itk_messages(lambda message: None):  # only a question: GDCM's complaints are no news
        try:
            return len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))) > 0
        except RuntimeError:  # pragma: no cover
            return False


def _pick_series(folder: Path, series_uid: str | None, on_warning: Warn | None = None) -> DicomSeries:
    """The series to read: the only one, or `series_uid`; UserError listing the choices."""
    series = list_dicom_series(folder, on_warning)
    if not series:
        raise UserError(f"no DICOM series found in {folder}; pass a folder of DICOM files "
                        f"or an image file ({', '.join(READ_SUFFIXES)})")
    listing = "; ".join(f"{s.uid} ({s.n_slices} slices, '{s.description}')" for s in series)
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise UserError(f"series {series_uid} is not in {folder}; it holds: {listing}")
        picked = chosen[0]
    elif len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series: {listing}; "
                        f"pass --series-uid UID to choose one")
    else:
        picked = series[0]
    return picked


def _read_dicom(folder: Path, series_uid: str | None, on_warning: Warn | None) -> sitk.Image:
    picked = _pick_series(folder, series_uid, on_warning)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(picked.files))
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise UserError(f"cannot read DICOM series {picked.uid} in {folder}: "
                        f"{_itk_reason(e)}; check that the files are complete") from None


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
    return UserError(f"cannot read image {path}: {_itk_reason(err)}; check that it is a "
                     f"complete image file ({', '.join(READ_SUFFIXES)}) or a DICOM folder")


def _sheared(path: Path, dev: float, what: str = "direction cosines") -> UserError:
    return UserError(f"{path} has {what} that are not orthonormal (axes off by {dev:.2g}, more than "
                     f"{MAX_DEVIATION:g}): the image is sheared or its header is damaged; resample it "
                     f"onto an orthonormal grid or export it again")


def _is_nifti(path: Path) -> bool:
    return _suffix(path, READ_SUFFIXES) in (".nii", ".nii.gz")


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
            return call()
        except RuntimeError as e:
            raise _cannot_read(path, e) from None


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
        nearest = np.asarray(nearest_orthonormal(header[2].ravel())).reshape(3, 3)
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
    with _itk_messages(on_warning):
        if path.is_dir():
            image = _read_dicom(path, series_uid, on_warning)
        else:
            suffix = _suffix(path, READ_SUFFIXES)
            if suffix in (".nii", ".nii.gz"):
                _check_nifti_complete(path, gz=suffix == ".nii.gz")
            image = _itk_read(path, lambda: sitk.ReadImage(str(path)))
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
        picked = _pick_series(path, series_uid)
        reader.SetFileName(picked.files[0])
        n_files = len(picked.files)
    else:
        reader.SetFileName(str(path))
        n_files = 0
    with _itk_messages(lambda message: None):  # read_image reports them; say each once
        _itk_read(path, reader.ReadImageInformation)
    size = tuple(int(v) for v in reader.GetSize())
    spacing = tuple(float(v) for v in reader.GetSpacing())
    dim = int(reader.GetDimension())
    if n_files:
        # A DICOM file is one slice (size z 1) of a 3D series.
        size = size[:2] + (n_files,)
        spacing = spacing[:2] + (_dicom_slice_step(picked.files, reader.GetOrigin()) or
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


def _dicom_slice_step(files: Sequence[str], first_origin: Sequence[float]) -> float | None:
    """Mean distance between slice positions (first to last file), from the headers only."""
    if len(files) < 2:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[-1])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dist = float(np.linalg.norm(np.subtract(reader.GetOrigin(), first_origin)))
    return dist / (len(files) - 1) if dist > 0 else None


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """CT inputs of a folder for batch mode: image files and sub-folders holding DICOM.

    Our own outputs (`*.seg.nrrd`, `*_labels.*`, and `*_probabilities.*`, `*_c1.*`, `*_c2.*`
    of `--save-probabilities/--save-candidates`) and hidden (temporary) files are skipped, so
    a folder can be re-processed in place without segmenting its outputs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"input folder not found: {folder}; pass an existing folder")
    found = []
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        if name.startswith("."):
            continue
        if p.is_dir():
            if is_dicom_folder(p):
                found.append(p)
            continue
        if _suffix(p, READ_SUFFIXES) is None:
            continue
        if name.endswith((".seg.nrrd", ".seg.nhdr")) or case_name(p).lower().endswith(_OUTPUT_TAILS):
            continue
        found.append(p)
    return found


def case_name(path: str | os.PathLike[str]) -> str:
    """Name of a case: the file name without its image ending, or the DICOM folder name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name if path.name in ("", ".", "..") else path.name
    suffix = _suffix(path, _NAME_SUFFIXES)
    if suffix:
        return path.name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------- geometry


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    """Exactly the same voxel grid (size, origin, spacing, direction; no tolerance)."""
    return (a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
            and a.GetSpacing() == b.GetSpacing() and a.GetDirection() == b.GetDirection())


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


_same_file = same_file   # the name before it was public


def _prepare_output(path: Path, overwrite: bool, protect: Iterable[str | os.PathLike[str]] | None,
                    suffixes: Sequence[str]) -> str:
    """Check the destination; returns the ending to give the temporary file."""
    suffix = _suffix(path, suffixes)
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


def _atomic_write(image: sitk.Image, path: Path, suffix: str, compress: bool) -> None:
    """Write to `.tmp-XXXX<suffix>` beside `path`, then os.replace; never a partial file."""
    try:
        # The temporary file is removed on any error, and on Ctrl-C.
        with atomic_path(path, suffix=suffix) as tmp:
            sitk.WriteImage(image, str(tmp), compress)
    except RuntimeError as e:
        raise UserError(f"cannot write {path}: {_itk_reason(e)}; check free disk space "
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
    suffix = _prepare_output(path, overwrite, protect, WRITE_SUFFIXES)
    _atomic_write(image, path, ".nrrd" if suffix.endswith(".nrrd") else suffix, compress)
    return path


# --------------------------------------------------------------------------- Slicer .seg.nrrd


def _ijk_to_ras(img: sitk.Image) -> np.ndarray:
    """4x4 voxel-index -> RAS matrix of a 3D image (SimpleITK geometry is LPS)."""
    d = np.array(img.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(img.GetSpacing(), dtype=float)[None, :]
    m[:3, 3] = img.GetOrigin()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return lps_to_ras @ m


def _conversion_parameters(img: sitk.Image) -> str:
    """Slicer's 'name|value|description&...' string; the reference geometry is the grid."""
    m = _ijk_to_ras(img)
    sx, sy, sz = img.GetSize()
    geometry = ";".join(f"{v:.17g}" for v in m.ravel()) + f";0;{sx - 1};0;{sy - 1};0;{sz - 1};"
    params = [
        ("Collapse labelmaps", "1", "Merge the labelmaps into as few shared labelmaps as possible"),
        ("Compute surface normals", "1", "Compute surface normals"),
        ("Conversion method", "0", "Closed surface algorithm; 0 = flying edges"),
        ("Crop to reference image geometry", "0", "Crop the model to the reference geometry"),
        ("Decimation factor", "0.0", "Desired reduction in the total number of polygons"),
        ("Fractional labelmap oversampling factor", "1", "Oversampling of fractional labelmaps"),
        ("Joint smoothing", "0", "Perform joint smoothing"),
        ("Oversampling factor", "1", "Oversampling of the reference image geometry"),
        ("Reference image geometry", geometry, "Image geometry of the labelmap (IJK to RAS matrix; extent)"),
        ("Smoothing factor", "0.5", "Smoothing factor from 0 (none) to 1 (strong)"),
        ("Threshold fraction", "0.5", "Closed surface threshold as a fraction"),
    ]
    return "&".join(f"{n}|{v}|{d}" for n, v, d in params) + "&"


def _extent_string(sl: tuple[slice, ...] | None) -> str:
    """'x0 x1 y0 y1 z0 z1' (inclusive voxel indices) from numpy (z, y, x) slices."""
    if sl is None:
        return "0 -1 0 -1 0 -1"
    z, y, x = sl
    return f"{x.start} {x.stop - 1} {y.start} {y.stop - 1} {z.start} {z.stop - 1}"


def _nonzero_box(array: np.ndarray) -> list[tuple[int, int]] | None:
    """[(start, stop), ...] per axis of the nonzero voxels, from axis projections (no labelling
    pass); None if there are none."""
    nz = array != 0
    box = []
    for axis in range(array.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(a for a in range(array.ndim) if a != axis)))
        if idx.size == 0:
            return None
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def write_segmentation_nrrd(labelmap: sitk.Image, labels: LabelSet,
                            path: str | os.PathLike[str], compress: bool = True,
                            overwrite: bool = True,
                            protect: Iterable[str | os.PathLike[str]] | None = None) -> Path:
    """Write a label map as a 3D Slicer segmentation (`.seg.nrrd`, one shared layer).

    The voxel grid is the label map's, unchanged; every label of `labels` becomes a segment
    (also when empty) with its display name, colour and terminology, so Slicer shows the
    organs with standard names and colours.
    """
    path = Path(path)
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"a segmentation needs a 3D scalar label map, got {describe_geometry(labelmap)}")
    if any(lab.value > 255 for lab in labels):
        raise ValueError("label values above 255 do not fit a uint8 .seg.nrrd")
    _prepare_output(path, overwrite, protect, (".seg.nrrd", ".nrrd"))

    arr = sitk.GetArrayViewFromImage(labelmap)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        raise ValueError("label map has non-integer values")
    known = {lab.value for lab in labels}
    unknown: list[int] = []
    if arr.size:
        low, top = float(arr.min()), float(arr.max())
        # Values within [0, top] with every 1..top a label cannot hold an unknown value; only
        # otherwise pay for np.unique (~1 s on a 512x512x400 map, min/max take 0.02 s).
        if not (low >= 0 and top.is_integer() and set(range(1, int(top) + 1)) <= known):
            unknown = sorted(set(int(v) for v in np.unique(arr)) - {0} - known)
    if unknown:
        raise ValueError(f"label map holds values {unknown} that are not in the label set")
    arr8 = np.ascontiguousarray(arr, dtype=np.uint8)
    seg = sitk.GetImageFromArray(arr8)
    seg.CopyInformation(labelmap)
    del arr

    # Slicer reads one labelmap per layer and crops it to the Extent of the *first* segment of
    # that layer, so a per-label box would cut the other organs off. Like Slicer's own writer,
    # every segment of the shared layer therefore carries the extent of the union of all
    # labels ('0 -1 0 -1 0 -1' when the whole map is empty).
    box = _nonzero_box(arr8)
    union = _extent_string(tuple(slice(a, b) for a, b in box) if box else None)

    meta: dict[str, str] = {
        "Segmentation_MasterRepresentation": SEG_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": _SEG_CONTAINED,
        "Segmentation_ConversionParameters": _conversion_parameters(seg),
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, lab in enumerate(labels):
        key = f"Segment{i}_"
        meta[key + "ID"] = lab.name
        meta[key + "Name"] = lab.display
        meta[key + "NameAutoGenerated"] = "0"
        meta[key + "Color"] = " ".join(f"{c:.6g}" for c in lab.color_float)
        meta[key + "ColorAutoGenerated"] = "0"
        meta[key + "Layer"] = "0"
        meta[key + "LabelValue"] = str(lab.value)
        meta[key + "Extent"] = union
        meta[key + "Tags"] = f"{_SEG_STATUS_TAG}|TerminologyEntry:{lab.terminology()}|"
    for k, v in meta.items():
        seg.SetMetaData(k, v)
    _atomic_write(seg, path, ".nrrd", compress)
    return path


def _parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split("|"):
        if ":" in item:
            k, v = item.split(":", 1)
            tags[k] = v
    return tags


def read_segmentation_nrrd(path: str | os.PathLike[str]) -> tuple[sitk.Image, list[dict[str, Any]]]:
    """Read a single-layer Slicer `.seg.nrrd`: the label map and one dict per segment.

    Segment dicts hold id, name, color (floats 0-1), label_value, layer, extent, terminology
    and tags. Multi-layer (overlapping) segmentations are refused: they are no label map.
    """
    path = Path(path)
    img = read_image(path)
    keys = set(img.GetMetaDataKeys())

    def get(key: str, default: str = "") -> str:
        return img.GetMetaData(key) if key in keys else default

    segments: list[dict[str, Any]] = []
    i = 0
    while f"Segment{i}_ID" in keys:
        p = f"Segment{i}_"
        tags = _parse_tags(get(p + "Tags"))
        color = get(p + "Color")
        segments.append({
            "id": get(p + "ID"),
            "name": get(p + "Name"),
            "color": tuple(float(c) for c in color.split()) if color else None,
            "label_value": int(get(p + "LabelValue", "1")),
            "layer": int(get(p + "Layer", str(i))),
            "extent": tuple(int(v) for v in get(p + "Extent", "0 -1 0 -1 0 -1").split()),
            "terminology": tags.get("TerminologyEntry", ""),
            "tags": tags,
        })
        i += 1
    if img.GetNumberOfComponentsPerPixel() > 1 or any(s["layer"] != 0 for s in segments):
        raise UserError(f"{path} has overlapping segments in several layers; export it from "
                        f"Slicer as a label map volume or a single-layer segmentation")
    for k in keys:  # the returned label map is plain data; its Slicer header is in `segments`
        img.EraseMetaData(k)
    return img, segments


def collect_inputs(path: str | os.PathLike[str]) -> tuple[list[Path], bool]:
    """(cases, is_batch) for a command's INPUT: one image or DICOM folder, or every CT in a folder."""
    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"input {source} does not exist; give a CT file, a DICOM folder or a folder of CTs")
    batch = source.is_dir() and not is_dicom_folder(source)
    cases = find_images(source) if batch else [source]
    if batch and not cases:
        raise UserError(f"no CT images (.nii.gz, .nrrd, .mha or DICOM folders) found in {source}")
    return cases, batch
