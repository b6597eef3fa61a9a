"""Case matching: prediction and reference files paired by case name, and evaluation of the pairs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import NAME_SUFFIXES, case_name
from ..labels import LabelSet
from .images import read_label_map
from .metrics import evaluate_images

_CASE_SUFFIXES = ("_labels", "_label", "_seg", "_segmentation", "_pred", "_prediction", "_gt",
                  "_ref", "_mask")


_IGNORED_SUFFIXES = ("_c1", "_c2", "_probabilities", "_preview")


def case_key(path: str | os.PathLike) -> str:
    """Case name used to match predictions and references: `io.case_name`, less one trailing
    _labels/_seg/_pred/_gt/... suffix (references and predictions carry one; CTs do not)."""
    path = Path(path)
    # A file type outside NAME_SUFFIXES keeps its ending here, as it always has (case_name drops it).
    name = case_name(path) if path.name.lower().endswith(NAME_SUFFIXES) else path.name
    for suf in _CASE_SUFFIXES:
        if name.lower().endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NAME_SUFFIXES)


def _rank(path: Path) -> int:
    """Preference when several files of one folder map to one case (lower wins)."""
    low = path.name.lower()
    if low.endswith(".seg.nrrd"):
        return 3
    stem = case_name(path).lower()
    if stem.endswith("_labels"):
        return 0
    if case_key(path).lower() == stem:
        return 1
    return 2


def list_cases(folder: Path) -> dict[str, Path]:
    """case name -> label-map file of a folder (candidate masks, probabilities ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not _is_image_file(path):
            continue
        if case_name(path).lower().endswith(_IGNORED_SUFFIXES):
            continue
        key = case_key(path)
        if key not in found or _rank(path) < _rank(found[key]):
            found[key] = path
    return found


def match_cases(pred: str | os.PathLike, ref: str | os.PathLike
                ) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair predictions with references by case name.

    Returns (pairs [(case, pred_path, ref_path)], unmatched prediction cases, unmatched
    reference cases). Two files are one pair whatever their names.
    """
    pred, ref = Path(pred), Path(ref)
    for p in (pred, ref):
        if not p.exists():
            raise UserError(f"not found: {p}")
    if pred.is_file() and ref.is_file():
        return [(case_key(ref), pred, ref)], [], []
    if pred.is_file() != ref.is_file():
        raise UserError("give two label-map files or two folders of them (got a file and a "
                        "folder)")
    p_cases, r_cases = list_cases(pred), list_cases(ref)
    pairs = [(c, p_cases[c], r_cases[c]) for c in sorted(r_cases) if c in p_cases]
    if not pairs:
        raise UserError(f"no case of {pred} matches a reference in {ref} by file name "
                        f"({len(p_cases)} predictions, {len(r_cases)} references); name them "
                        "<case>.nii.gz or <case>_labels.nii.gz on both sides")
    return (pairs, sorted(set(p_cases) - set(r_cases)), sorted(set(r_cases) - set(p_cases)))


def progress_iter(iterable, total: int, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="case", disable=None)


def evaluate_pairs(pairs: Sequence[tuple[str, Path, Path]], labels: LabelSet,
                   ref_labels: LabelSet | None = None, distances: bool = True,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate matched files: {case: {"prediction", "reference", "organs", ...}}."""
    cases: dict[str, Any] = {}
    for case, p, r in progress_iter(pairs, len(pairs), "evaluate", progress):
        res = evaluate_images(read_label_map(p), read_label_map(r), labels, ref_labels,
                              distances)
        cases[case] = {"prediction": str(p), "reference": str(r), **res}
    return cases


def match_ct_cases(ct: str | os.PathLike, ref: str | os.PathLike
                   ) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair CTs (files or DICOM folders) with reference label maps by case name.

    CT and references may share one folder (`<case>.nii.gz` + `<case>_seg.nii.gz`).
    """
    from ..io import find_images, is_dicom_folder
    ct, ref = Path(ct), Path(ref)
    if not ct.exists() or not ref.exists():
        raise UserError(f"not found: {ct if not ct.exists() else ref}")
    if ref.is_file() or ct.is_file():
        if not ref.is_file() or (ct.is_dir() and not is_dicom_folder(ct)):
            raise UserError("give a CT (file or DICOM folder) with one reference label map, or "
                            "a folder of CTs with a folder of label maps")
        return [(case_key(ref), ct, ref)], [], []
    cts = {case_name(p): p for p in find_images(ct)}
    refs = list_cases(ref)
    if ct.resolve() == ref.resolve():  # one folder: references carry a label suffix
        refs = {}
        for p in sorted(ref.iterdir()):
            if p.name.startswith(".") or not _is_image_file(p):
                continue
            key = case_key(p)
            if key != case_name(p) and key in cts:
                refs.setdefault(key, p)
        cts = {k: v for k, v in cts.items() if k in refs or k not in
               {case_name(p) for p in refs.values()}}
    pairs = [(c, cts[c], refs[c]) for c in sorted(refs) if c in cts and cts[c] != refs[c]]
    if not pairs:
        raise UserError(f"no CT in {ct} matches a reference label map in {ref} by name; name "
                        "them <case>.nii.gz and <case>.nii.gz (or <case>_seg.nii.gz)")
    paired_cases = {c for c, _, _ in pairs}
    return (pairs, sorted(set(cts) - paired_cases - {case_name(p) for p in refs.values()}),
            sorted(set(refs) - paired_cases))
