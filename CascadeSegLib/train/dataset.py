"""Training data: case lists, label remapping, splits, and a resampled on-disk cache.

Cases come from (a) an explicit list of {"name", "image", "label"} entries, (b) a folder of
images and a folder of label maps matched by case name, or (c) an nnU-Net v2 or Medical
Segmentation Decathlon `dataset.json`. Label maps are remapped to the model's label values
with a table (e.g. TotalSegmentator ids -> ours) and resampled onto the image's stage grid in
physical space, so a label map stored with another orientation (flipped axes) still fits.

Each case is resampled once per stage spacing and stored as .npy files that training
memory-maps, so epochs neither re-read nor re-resample the CTs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import UserError
from ..inference import preprocess
from ..labels import UNKNOWN_LABEL, LabelSet

# TotalSegmentator v2 ("total" task) ids of the abdominal structures the paper targets.
TOTALSEGMENTATOR_IDS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
                        6: "stomach", 7: "pancreas", 52: "aorta", 63: "inferior_vena_cava",
                        64: "portal_vein_and_splenic_vein"}
CACHE_VERSION = 2                  # 2: grids in the model orientation (preprocess.MODEL_DIRECTION)


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


def _read_image(path: Path) -> sitk.Image:
    from ..io import read_image

    return read_image(path)


def _case_name(path: Path) -> str:
    from ..io import case_name, without_channel

    return without_channel(case_name(path))


# --------------------------------------------------------------------------- case lists


def _cases_from_dataset_json(path: Path) -> tuple[list[Case], dict[int, str]]:
    """nnU-Net v2 (labels: name -> id, imagesTr/<case>_0000<ending>) or MSD (training list)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); pass an nnU-Net or Decathlon dataset.json") from None
    root = path.parent
    names: dict[int, str] = {}
    labels = meta.get("labels", {})
    for k, v in labels.items():
        if isinstance(v, (int, float)) or (isinstance(v, str) and v.isdigit() and not k.isdigit()):
            names[int(v)] = str(k)           # nnU-Net v2: {"liver": 1}
        elif str(k).isdigit():
            names[int(k)] = str(v)           # MSD: {"1": "liver"}
    names.pop(0, None)
    cases = []
    if isinstance(meta.get("training"), list):
        for entry in meta["training"]:
            img, lab = root / entry["image"], root / entry["label"]
            cases.append(Case(_case_name(img), img, lab))
    else:
        ending = meta.get("file_ending", ".nii.gz")
        for lab in sorted((root / "labelsTr").glob(f"*{ending}")):
            name = lab.name[: -len(ending)]
            cases.append(Case(name, root / "imagesTr" / f"{name}_0000{ending}", lab))
    if not cases:
        raise UserError(f"{path} lists no training cases")
    return cases, names


def _cases_from_folders(images: Path, labels: Path) -> list[Case]:
    from ..io import find_images

    if not images.is_dir() or not labels.is_dir():
        raise UserError(f"data.images ({images}) and data.labels ({labels}) must both be folders")
    label_files = {_case_name(p): p for p in find_images(labels)}
    cases = []
    for img in find_images(images):
        name = _case_name(img)
        if name in label_files:
            cases.append(Case(name, img, label_files[name]))
    if not cases:
        raise UserError(f"no image in {images} has a label map of the same case name in {labels}")
    return cases


def discover_cases(data: dict[str, Any], resolve) -> tuple[list[Case], dict[int, str]]:
    """Cases of the config's `data` section, plus source label names (from dataset.json)."""
    if "cases" in data:
        cases = []
        for c in data["cases"]:
            img = resolve(c["image"])
            cases.append(Case(str(c.get("name") or _case_name(img)), img, resolve(c["label"])))
        names: dict[int, str] = {}
    elif "dataset_json" in data:
        cases, names = _cases_from_dataset_json(resolve(data["dataset_json"]))
    elif "images" in data and "labels" in data:
        cases, names = _cases_from_folders(resolve(data["images"]), resolve(data["labels"])), {}
    else:
        raise UserError("config data needs 'cases', 'dataset_json', or 'images' + 'labels' folders")
    seen = set()
    for c in cases:
        if c.name in seen:
            raise UserError(f"case name {c.name!r} appears twice; give each case a unique name")
        seen.add(c.name)
        for p in (c.image, c.label):
            if not p.exists():
                raise UserError(f"case {c.name}: {p} does not exist")
    return cases, names


def without_unknown(mask: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`mask` (a candidate region) without the voxels labelled `UNKNOWN_LABEL`."""
    mask = np.asarray(mask, dtype=bool)
    unknown = np.asarray(label) == UNKNOWN_LABEL
    return mask & ~unknown if unknown.any() else mask


def label_lookup(label_set: LabelSet, label_map: dict[Any, Any] | None, source_names: dict[int, str] | None = None,
                 preset: str | None = None) -> np.ndarray:
    """A uint8 table source id -> model label value (unmapped ids -> 0 background; 255, the
    conventional "unknown", stays 255 unless the map names it: `UNKNOWN_LABEL`).

    `label_map` maps source ids to our label names or values. Without it, source names from
    dataset.json are matched to ours by name, and otherwise ids are taken as they are.
    """
    if preset == "totalsegmentator":
        mapping: dict[int, Any] = dict(TOTALSEGMENTATOR_IDS)
    elif preset:
        raise UserError(f"unknown label_map preset {preset!r}; the one known is 'totalsegmentator'")
    else:
        mapping = {}
    if label_map:
        mapping.update({int(k): v for k, v in label_map.items()})
    if not mapping and source_names:
        ours = set(label_set.names)
        mapping = {k: v for k, v in source_names.items() if v in ours}
        if not mapping:
            raise UserError("none of the dataset's label names match the config's labels; add data.label_map")
    if not mapping:
        mapping = {lab.value: lab.value for lab in label_set}
    size = max(256, max(mapping) + 1)
    table = np.zeros(size, dtype=np.uint8)
    for src, dst in mapping.items():
        if isinstance(dst, str):
            try:
                dst = label_set.by_name(dst).value
            except KeyError:
                raise UserError(f"label_map maps {src} to {dst!r}, which is not in the config's labels "
                                f"({', '.join(label_set.names)})") from None
        table[int(src)] = int(dst)
    if UNKNOWN_LABEL not in mapping:
        table[UNKNOWN_LABEL] = UNKNOWN_LABEL
    return table


def read_split(data: dict[str, Any], resolve, cases: Sequence[Case]) -> tuple[list[Case], list[Case]]:
    """(train, validation) cases from data.split: a dict or a JSON file with 'train'/'val' lists
    (or nnU-Net's splits_final.json with data.fold); without a split every case trains."""
    split = data.get("split")
    by_name = {c.name: c for c in cases}
    if split is None:
        return list(cases), []
    if isinstance(split, str):
        path = Path(resolve(split))
        try:
            split = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read split file {path} ({exc})") from None
    if isinstance(split, list):
        split = split[int(data.get("fold", 0))]
    train = split.get("train")
    val = split.get("val", [])
    if train is None:
        train = [n for n in by_name if n not in set(val)]
    missing = [n for n in list(train) + list(val) if n not in by_name]
    if missing:
        raise UserError(f"split names unknown case(s) {missing}; known: {', '.join(by_name)}")
    if set(train) & set(val):
        raise UserError(f"case(s) {sorted(set(train) & set(val))} are in both train and val")
    return [by_name[n] for n in train], [by_name[n] for n in val]


# --------------------------------------------------------------------------- cache


@dataclass
class CachedCase:
    """One case on one stage grid: memory-mapped arrays (z, y, x) plus the grid geometry."""

    name: str
    folder: Path
    image: np.ndarray        # float16, normalised
    label: np.ndarray        # uint8, model label values
    c1: np.ndarray           # bool body mask
    geometry: dict[str, Any]

    def reference(self) -> sitk.Image:
        g = self.geometry
        ref = sitk.Image([int(v) for v in g["size"]], sitk.sitkUInt8)
        ref.SetSpacing(g["spacing"])
        ref.SetOrigin(g["origin"])
        ref.SetDirection(g["direction"])
        return ref

    def to_image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.CopyInformation(self.reference())
        return img


def _file_stamp(path: Path) -> list[Any]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
    st = path.stat()
    return [str(path.resolve()), st.st_size, int(st.st_mtime)]


def cache_key(case: Case, spacing: Sequence[float], window: Sequence[float], normalization: str,
              threshold: float, table: np.ndarray) -> str:
    blob = json.dumps([CACHE_VERSION, _file_stamp(case.image), _file_stamp(case.label), list(spacing),
                       list(window), normalization, threshold, hashlib.sha1(table.tobytes()).hexdigest()])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def build_cached_case(case: Case, cache_dir: Path, spacing: Sequence[float], window: Sequence[float],
                      normalization: str, threshold: float, table: np.ndarray) -> CachedCase:
    """Resample a case onto its stage grid once and store it; later calls memory-map it."""
    key = cache_key(case, spacing, window, normalization, threshold, table)
    folder = cache_dir / f"{case.name}-{key}"
    if not (folder / "meta.json").is_file():
        image = _read_image(case.image)
        label = _read_image(case.label)
        if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
            raise UserError(f"case {case.name}: the label map {case.label} is not a 3D scalar image")
        image_f = sitk.Cast(image, sitk.sitkFloat32)
        ref = preprocess.grid_for_spacing(image_f, spacing)
        hu = preprocess.resample(image_f, ref, "linear", -1024.0, sitk.sitkFloat32)
        # Nearest neighbour in physical space: the label's own grid/orientation does not matter.
        lab = preprocess.resample(sitk.Cast(label, sitk.sitkUInt32), ref, "nearest", 0, sitk.sitkUInt32)
        lab_arr = sitk.GetArrayFromImage(lab)
        if lab_arr.max(initial=0) >= table.size:
            raise UserError(f"case {case.name}: label value {int(lab_arr.max())} is outside the label_map table")
        lab_arr = table[lab_arr]
        hu_t = torch.from_numpy(sitk.GetArrayFromImage(hu))
        c1 = preprocess.body_mask(hu_t, threshold).numpy()
        norm = preprocess.normalize(hu_t, window, normalization).numpy().astype(np.float16)
        tmp = cache_dir / f".tmp-{case.name}-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "image.npy", norm)
        np.save(tmp / "label.npy", lab_arr)
        np.save(tmp / "c1.npy", c1)
        meta = {"case": case.name, "image": str(case.image), "label": str(case.label),
                "size": list(ref.GetSize()), "spacing": list(ref.GetSpacing()), "origin": list(ref.GetOrigin()),
                "direction": list(ref.GetDirection()), "label_counts": np.bincount(lab_arr.ravel()).tolist()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:                      # another process (DDP rank) finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_cached_case(folder)


def load_cached_case(folder: Path) -> CachedCase:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return CachedCase(meta["case"], folder, np.load(folder / "image.npy", mmap_mode="r"),
                      np.load(folder / "label.npy", mmap_mode="r"), np.load(folder / "c1.npy", mmap_mode="r"),
                      meta)
