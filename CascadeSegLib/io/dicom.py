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


def read_dicom(folder: Path, series_uid: str | None, on_warning: Warn | None) -> sitk.Image:
    picked = pick_series(folder, series_uid, on_warning)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(picked.files))
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise UserError(f"cannot read DICOM series {picked.uid} in {folder}: "
                        f"{itk_reason(e)}; check that the files are complete") from None


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
