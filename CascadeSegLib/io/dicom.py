"""DICOM folders: list the series of a folder, pick one, read it (SimpleITK/GDCM)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from .common import READ_SUFFIXES, Warn, itk_messages, itk_reason


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
    with itk_messages(on_warning):
        try:
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError as e:  # pragma: no cover - GDCM rarely throws here
            raise UserError(f"cannot scan DICOM folder {folder}: {itk_reason(e)}") from None
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
    with itk_messages(lambda message: None):  # only a question: GDCM's complaints are no news
        try:
            return len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))) > 0
        except RuntimeError:  # pragma: no cover
            return False


def pick_series(folder: Path, series_uid: str | None, on_warning: Warn | None = None) -> DicomSeries:
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


#: a step between two slices that differs from the series' median step by more than this share
#: is a gap (missing files) or a mixed series: ITK would stack the slices evenly, misplacing them
MAX_STEP_DEVIATION = 0.1
#: in-plane drift of the last slice against the first, in pixels, below which the slices are taken
#: as square to their normal (header rounding, table sag); above it the series has a gantry tilt,
#: which ITK ignores. Also how far the drift may stray from a straight line.
TILT_TOLERANCE_PIXELS = 0.25


@dataclass(frozen=True)
class SliceGeometry:
    """Where a series' slices really lie: `step` (mm) between slices along their normal and the
    in-plane `drift` (LPS mm per mm along the normal; zero unless the gantry was tilted)."""

    step: float
    drift: tuple[float, float, float]

    @property
    def tilt_degrees(self) -> float:
        return float(np.degrees(np.arctan(np.linalg.norm(self.drift))))


def _series_name(folder: Path, uid: str) -> str:
    return f"DICOM series {uid} in {folder}" if uid else f"the DICOM series in {folder}"


def slice_geometry(files: Sequence[str], folder: Path, uid: str) -> SliceGeometry | None:
    """The slices' positions from their headers (ImagePositionPatient, ImageOrientationPatient),
    before any pixel is read. UserError where the steps are uneven (a missing file: ITK only
    warns and stacks the rest evenly) or slices share a position; None for fewer than two files."""
    if len(files) < 2:
        return None
    origins: list[tuple[float, ...]] = []
    first, normal, tolerance = np.eye(3), np.zeros(3), 0.0
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise UserError(f"cannot read DICOM file {f}: {itk_reason(e)}; check that the files are complete") from None
        origins.append(reader.GetOrigin()[:3])
        direction = np.reshape(reader.GetDirection(), (3, 3))
        if len(origins) == 1:                           # the slices' normal, from the first file
            first, normal = direction, direction[:, 2]
            tolerance = TILT_TOLERANCE_PIXELS * min(reader.GetSpacing()[:2])
        elif np.abs(direction - first).max() > 1e-3:
            raise UserError(f"{_series_name(folder, uid)}: its slices lie in different orientations (file {f} is "
                            "turned against the first); the folder mixes a localizer or another reconstruction into "
                            "the series: export the axial series alone into an empty folder")
    rel = np.asarray(origins, dtype=float) - origins[0]
    along = rel @ normal
    steps = np.diff(along)
    med = float(np.median(steps))
    if abs(med) < 1e-6 or np.any(steps * np.sign(med) < 1e-6):
        raise UserError(f"{_series_name(folder, uid)}: two or more files lie at one slice position; "
                        "the folder mixes series or copies of a file: export the series again into an empty folder")
    worst = int(np.argmax(np.abs(steps - med)))
    if abs(steps[worst] - med) > MAX_STEP_DEVIATION * abs(med):
        raise UserError(f"{_series_name(folder, uid)}: its slices are not evenly spaced ({abs(steps[worst]):.2f} mm "
                        f"between slices {worst + 1} and {worst + 2}, {abs(med):.2f} mm elsewhere): files are missing "
                        "or reconstructions are mixed; export the complete series again")
    drift = rel - along[:, None] * normal[None, :]
    if float(np.linalg.norm(drift[-1])) <= tolerance:
        return SliceGeometry(abs(med), (0.0, 0.0, 0.0))
    per_mm = np.linalg.lstsq(along[:, None], drift, rcond=None)[0][0]
    uneven = float(np.abs(drift - along[:, None] * per_mm[None, :]).max())
    if med < 0 or uneven > tolerance:
        raise UserError(f"{_series_name(folder, uid)}: its slices are shifted sideways unevenly or stacked "
                        f"downwards ({uneven:.2f} mm off a straight tilt); resample it first (Slicer's DICOM "
                        "module regularizes such series, dcm2niix corrects gantry tilt)")
    return SliceGeometry(abs(med), (float(per_mm[0]), float(per_mm[1]), float(per_mm[2])))


def untilt(image: sitk.Image, geometry: SliceGeometry) -> sitk.Image:
    """A tilted series (as ITK stacks it: each slice square above the first) resampled onto a grid
    square to the slices, each slice where its header puts it; the in-plane grid grows to hold the
    drift, filled with the image's minimum (air outside the field of view). `image`'s spacing is
    set to the true step on the way."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    origin = np.asarray(image.GetOrigin())
    spacing = np.array([*image.GetSpacing()[:2], geometry.step])
    size = np.array(image.GetSize())
    drift = np.asarray(geometry.drift)
    image.SetSpacing(spacing.tolist())                   # ITK's step was the tilted distance
    # A point q of the true grid shows what the stacked image has at q - ((q - o).n) drift.
    matrix = np.eye(3) - np.outer(drift, direction[:, 2])
    back = sitk.AffineTransform(3)
    back.SetMatrix(matrix.ravel().tolist())
    back.SetCenter(origin.tolist())
    # Grow the in-plane grid to where the last slice drifted (in row and column voxels).
    shift = (drift * (size[2] - 1) * geometry.step) @ direction[:, :2] / spacing[:2]
    low = np.minimum(shift, 0.0)
    grown = size.copy()
    grown[:2] = size[:2] + np.ceil(np.abs(shift) - 1e-6).astype(int)
    out_origin = origin + direction[:, :2] @ (low * spacing[:2])
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Resample(image, [int(v) for v in grown], back, sitk.sitkLinear, out_origin.tolist(),
                         spacing.tolist(), direction.ravel().tolist(), stats.GetMinimum(), image.GetPixelID())


def read_dicom(folder: Path, series_uid: str | None, on_warning: Warn | None) -> sitk.Image:
    picked = pick_series(folder, series_uid, on_warning)
    geometry = slice_geometry(picked.files, folder, picked.uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(picked.files))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise UserError(f"cannot read DICOM series {picked.uid} in {folder}: "
                        f"{itk_reason(e)}; check that the files are complete") from None
    if geometry is None or not any(geometry.drift) or image.GetDimension() != 3:
        return image
    if on_warning is not None:
        on_warning(f"{folder}: DICOM series with a gantry tilt of {geometry.tilt_degrees:.1f} degrees: resampled "
                   "onto a grid square to its slices, each slice where its header puts it (the outputs are on "
                   "that grid)")
    return untilt(image, geometry)


def dicom_slice_step(files: Sequence[str], first_origin: Sequence[float]) -> float | None:
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
