"""Which files of a folder are CT inputs, and what each case is called."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .common import NAME_SUFFIXES, READ_SUFFIXES, file_suffix
from .dicom import is_dicom_folder

_OUTPUT_TAILS = ("_labels", "_probabilities", "_c1", "_c2")  # `cascadeseg segment` outputs


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
        if file_suffix(p, READ_SUFFIXES) is None:
            continue
        if name.endswith((".seg.nrrd", ".seg.nhdr")) or case_name(p).lower().endswith(_OUTPUT_TAILS):
            continue
        found.append(p)
    return found


def without_channel(name: str) -> str:
    """A case name without nnU-Net's channel ending `_0000` (image files of a training set carry it,
    their label maps do not), so an image and its labels name the same case."""
    return name[:-5] if name.endswith("_0000") else name


def case_name(path: str | os.PathLike[str]) -> str:
    """Name of a case: the file name without its image ending, or the DICOM folder name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name if path.name in ("", ".", "..") else path.name
    suffix = file_suffix(path, NAME_SUFFIXES)
    if suffix:
        return path.name[: -len(suffix)]
    return path.stem




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
