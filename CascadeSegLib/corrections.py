"""The corrections store: CTs with clinician-corrected labels, one folder per model.

`cascadeseg improve` fine-tunes a model on them. The store lives in the models folder
(`$CASCADESEG_MODELS/.corrections/<model name>/<case id>/`), so it follows the models it
belongs to and is not itself listed as a model. A case folder holds `ct.nii.gz`,
`labels.nii.gz` (the model's label values, on the CT's exact grid) and `case.json`. It is built
in a hidden temporary folder and renamed into place, so a reader never sees half a case.

Which organs count: `reviewed` lists the organs the user checked. `improve` trains those (and
the background between them) and gives every voxel near an unreviewed organ weight 0 in the
loss, so an organ nobody looked at is neither learned nor unlearned from this case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .labels import Label, LabelSet
from .resources import models_dir

STORE_FOLDER = ".corrections"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class CorrectionCase:
    """One stored correction (read from its case.json)."""

    id: str
    folder: Path
    model: str
    reviewed: tuple[str, ...]
    created: str
    source: dict[str, str]
    voxels: dict[str, int]

    @property
    def ct(self) -> Path:
        return self.folder / "ct.nii.gz"

    @property
    def labels(self) -> Path:
        return self.folder / "labels.nii.gz"


def store_dir(model: str, root: str | os.PathLike | None = None) -> Path:
    """The folder holding `model`'s corrections (it may not exist yet)."""
    if not _SAFE_ID.match(model):
        raise UserError(f"model name {model!r} cannot name a folder; use letters, digits, '.', '_' and '-'")
    return Path(root if root is not None else models_dir()) / STORE_FOLDER / model


# --------------------------------------------------------------------------- matching segments


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def _codes(terminology: str) -> tuple[str, str]:
    """(type code, modifier code) of a Slicer terminology string ('ctx~cat~type~modifier~...')."""
    parts = terminology.split("~")

    def value(i: int) -> str:
        fields = parts[i].split("^") if len(parts) > i else []
        return fields[1] if len(fields) > 1 else ""

    return value(2), value(3)


def match_segment(segment: dict[str, Any], labels: LabelSet) -> Label | None:
    """The model label a .seg.nrrd segment stands for: by ID, by name, then by SNOMED codes."""
    for lab in labels:
        if segment.get("id") == lab.name:
            return lab
    name = _norm(str(segment.get("name", "")))
    for lab in labels:
        if name and name in (_norm(lab.name), _norm(lab.display)):
            return lab
    type_code, modifier = _codes(str(segment.get("terminology", "")))
    if type_code:
        for lab in labels:
            if lab.type_code and lab.type_code[1] == type_code and \
                    (lab.modifier_code[1] if lab.modifier_code else "") == modifier:
                return lab
    return None


def _seg_nrrd_to_model_values(path: Path, labels: LabelSet) -> sitk.Image:
    from .io import read_segmentation_nrrd

    img, segments = read_segmentation_nrrd(path)
    table: dict[int, int] = {}
    unknown = []
    for seg in segments:
        lab = match_segment(seg, labels)
        if lab is None:
            unknown.append(seg.get("name") or seg.get("id"))
        elif seg["label_value"] in table and table[seg["label_value"]] != lab.value:
            raise UserError(f"{path}: two segments share label value {seg['label_value']}; save the "
                            "segmentation again from Segment Editor")
        else:
            table[seg["label_value"]] = lab.value
    if unknown:
        raise UserError(f"{path}: segment(s) {', '.join(map(repr, unknown))} match none of the model's labels "
                        f"({', '.join(labels.names)}); rename them to an organ name, or delete them")
    arr = sitk.GetArrayFromImage(img).astype(np.int64)
    lut = np.zeros(max([int(arr.max(initial=0))] + list(table)) + 1, dtype=np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    out = sitk.GetImageFromArray(lut[arr])
    out.CopyInformation(img)
    return out


def _label_map_in_model_values(path: Path, labels: LabelSet) -> sitk.Image:
    from .evaluate import read_label_map

    img = read_label_map(path)
    values = set(np.unique(sitk.GetArrayViewFromImage(img)).tolist()) - {0}
    unknown = sorted(values - {lab.value for lab in labels})
    if unknown:
        raise UserError(f"{path} holds label value(s) {unknown} that the model does not have "
                        f"({', '.join(f'{l.value} {l.name}' for l in labels)}); save the label map in the "
                        "model's values or as a .seg.nrrd with organ names")
    return sitk.Cast(img, sitk.sitkUInt8)


def read_correction(segmentation: str | os.PathLike, labels: LabelSet) -> sitk.Image:
    """A corrected segmentation (.seg.nrrd or label map) as a uint8 image in the model's values."""
    path = Path(segmentation).expanduser()
    if not path.is_file():
        raise UserError(f"segmentation {path} not found; pass a .seg.nrrd or a label map file")
    if path.name.lower().endswith((".seg.nrrd", ".seg.nhdr")):
        return _seg_nrrd_to_model_values(path, labels)
    return _label_map_in_model_values(path, labels)


# --------------------------------------------------------------------------- geometry


def onto_ct_grid(seg: sitk.Image, ct: sitk.Image, what: str = "the segmentation") -> sitk.Image:
    """`seg` on the CT's exact grid: the same voxels, maybe cropped or stored with flipped axes.

    Every voxel centre of `seg` must be a voxel centre of the CT (no interpolation happens);
    otherwise the correction was drawn on another image and is refused.
    """
    from .io import describe_geometry
    from .io.images import index_to_physical

    if seg.GetDimension() != 3:
        raise UserError(f"{what} is {seg.GetDimension()}D; a correction is a 3D label map of the CT")
    m_ct, o_ct = index_to_physical(ct)
    m_seg, o_seg = index_to_physical(seg)
    inv = np.linalg.inv(m_ct)
    axes = inv @ m_seg
    shift = inv @ (o_seg - o_ct)
    lattice = np.allclose(np.abs(axes).sum(0), 1.0, atol=1e-3) and np.allclose(
        np.abs(axes), np.round(np.abs(axes)), atol=1e-3) and np.allclose(shift, np.round(shift), atol=1e-3)
    if not lattice:
        raise UserError(f"{what} is not on the CT's voxel grid (segmentation: {describe_geometry(seg)}; CT: "
                        f"{describe_geometry(ct)}); segment with this CT as the source volume, or resample the "
                        "label map onto the CT")
    out = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    before = np.bincount(sitk.GetArrayViewFromImage(seg).ravel(), minlength=256)
    after = np.bincount(sitk.GetArrayViewFromImage(out).ravel(), minlength=256)
    if (before[1:] != after[1:]).any():
        raise UserError(f"{what} reaches outside the CT ({int(before[1:].sum() - after[1:].sum())} labelled "
                        "voxels); segment with this CT as the source volume")
    return out


# --------------------------------------------------------------------------- the store


def _reviewed(requested: Sequence[str] | None, voxels: dict[str, int], labels: LabelSet) -> tuple[str, ...]:
    if requested:
        unknown = [n for n in requested if n not in labels.names]
        if unknown:
            raise UserError(f"--reviewed names organ(s) {unknown} that the model does not have "
                            f"({', '.join(labels.names)})")
        if not any(voxels[n] for n in requested):
            raise UserError(f"the correction labels none of the reviewed organs ({', '.join(requested)}); "
                            "correct at least one of them, or name the organs you corrected with --reviewed")
        return tuple(n for n in labels.names if n in requested)
    present = tuple(n for n in labels.names if voxels[n])
    if not present:
        raise UserError("the correction is empty (no voxel of any of the model's organs); correct the "
                        "segmentation first, then add it")
    return present


def add_correction(model: str, labels: LabelSet, ct_path: str | os.PathLike, segmentation: str | os.PathLike,
                   case_id: str | None = None, reviewed: Sequence[str] | None = None, replace: bool = False,
                   root: str | os.PathLike | None = None, series_uid: str | None = None) -> CorrectionCase:
    """Check a correction against its CT and the model's labels, then store it atomically."""
    from .io import case_name, read_image, without_channel, write_image

    ct = read_image(ct_path, series_uid)
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{ct_path} is not a 3D single-channel CT")
    seg = onto_ct_grid(read_correction(segmentation, labels), ct)
    counts = np.bincount(sitk.GetArrayViewFromImage(seg).ravel(), minlength=256)
    voxels = {lab.name: int(counts[lab.value]) for lab in labels}
    organs = _reviewed(reviewed, voxels, labels)
    case_id = case_id or case_name(Path(ct_path))
    case_id = without_channel(case_id)      # nnU-Net's channel ending is no part of the case
    if not _SAFE_ID.match(case_id):
        raise UserError(f"case id {case_id!r} cannot name a folder; pass --case with letters, digits, '.', '_', '-'")
    folder = store_dir(model, root)
    target = folder / case_id
    if target.exists() and not replace:
        raise UserError(f"model {model} already has a correction {case_id!r}; pass --case NEW_ID, or --replace")
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".add-{case_id}-", dir=folder))
    try:
        work.chmod(0o755)                  # mkdtemp's 0700 would hide the case from other users
        write_image(sitk.Cast(ct, sitk.sitkInt16) if _fits_int16(ct) else ct, work / "ct.nii.gz")
        write_image(seg, work / "labels.nii.gz")
        meta = {"format_version": 1, "id": case_id, "model": model, "reviewed": list(organs),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": {"ct": str(Path(ct_path).resolve()), "segmentation": str(Path(segmentation).resolve())},
                "voxels": {n: v for n, v in voxels.items() if v}, "labels": labels.to_json()}
        (work / "case.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        replace_folder(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_case(target)


def _fits_int16(ct: sitk.Image) -> bool:
    if ct.GetPixelID() in (sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkInt8):
        return True
    arr = sitk.GetArrayViewFromImage(ct)
    return bool(np.issubdtype(arr.dtype, np.integer) and arr.min() >= -32768 and arr.max() <= 32767)


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = new.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_case(folder: Path) -> CorrectionCase:
    try:
        meta = json.loads((folder / "case.json").read_text(encoding="utf-8"))
        return CorrectionCase(id=str(meta["id"]), folder=folder, model=str(meta["model"]),
                              reviewed=tuple(meta["reviewed"]), created=str(meta.get("created", "")),
                              source=dict(meta.get("source", {})), voxels=dict(meta.get("voxels", {})))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{folder} is not a readable correction ({exc}); remove it with "
                        "`cascadeseg corrections remove`") from None


def list_corrections(model: str, root: str | os.PathLike | None = None) -> list[CorrectionCase]:
    """The stored cases of `model`, by id (hidden, unfinished folders are skipped)."""
    folder = store_dir(model, root)
    if not folder.is_dir():
        return []
    return [load_case(p) for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "case.json").is_file()]


def remove_correction(model: str, case_id: str, root: str | os.PathLike | None = None) -> None:
    """Delete one case: renamed away first, so the store never shows half of it."""
    folder = store_dir(model, root)
    target = folder / case_id
    if not _SAFE_ID.match(case_id) or not (target / "case.json").is_file():
        known = ", ".join(c.id for c in list_corrections(model, root)) or "none"
        raise UserError(f"model {model} has no correction {case_id!r} (stored: {known})")
    gone = folder / f".removed-{case_id}-{os.getpid()}"
    os.replace(target, gone)
    shutil.rmtree(gone, ignore_errors=True)
