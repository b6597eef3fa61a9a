"""Which tissue each labelled structure is, and what it looks like in CT (HU), per contrast phase.

Two sources of numbers, kept apart so nobody mistakes one for the other:

- `IntensityTable`: per-structure mean and spread **measured** on real, labelled CTs
  (`measure_table`). Only native (non-contrast) CTs set the baseline, so a contrast CT in the
  training set cannot shift the synthetic non-contrast look.
- `TISSUES`: textbook priors for what the table cannot give: the baseline of structures no
  measured CT shows, and how much each tissue enhances in the arterial, portal-venous and
  delayed phases (typical adult abdominal protocols; ranges, drawn per sample).

Structures are mapped to tissues by name (TotalSegmentator v2 names work out of the box; any
other label map needs a small {value: name or tissue} table).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

PHASES = ("native", "arterial", "portal", "delayed")


@dataclass(frozen=True)
class Tissue:
    """Priors for one tissue: native HU range and enhancement (HU added) per phase."""

    native: tuple[float, float]
    enhance: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    texture: float = 12.0       # HU of within-tissue variation when nothing was measured


def _t(native: tuple[float, float], arterial=(0.0, 0.0), portal=(0.0, 0.0), delayed=(0.0, 0.0),
       texture: float = 12.0) -> Tissue:
    return Tissue(native, {"arterial": arterial, "portal": portal, "delayed": delayed}, texture)


TISSUES: dict[str, Tissue] = {
    "liver": _t((45, 65), (5, 25), (40, 70), (25, 45), 12),
    "spleen": _t((40, 55), (40, 90), (60, 85), (35, 55), 12),
    "kidney": _t((25, 40), (90, 160), (110, 170), (90, 140), 15),
    "pancreas": _t((30, 50), (50, 90), (40, 70), (25, 45), 15),
    "adrenal": _t((20, 40), (30, 60), (30, 50), (20, 35), 15),
    "bile": _t((0, 20), texture=6),
    "urine": _t((0, 15), delayed=(0, 300), texture=6),
    "cyst": _t((0, 15), texture=6),
    "bowel": _t((20, 40), (20, 50), (30, 60), (20, 40), 20),     # wall and fluid contents
    "soft_tissue": _t((30, 50), (15, 40), (20, 50), (15, 30), 15),
    "thyroid": _t((90, 120), (60, 120), (50, 90), (30, 60), 15),
    "muscle": _t((40, 60), (5, 20), (10, 25), (5, 20), 12),
    "artery": _t((35, 50), (200, 380), (110, 170), (70, 110), 10),
    "heart": _t((35, 50), (180, 340), (110, 170), (70, 110), 15),
    "vein": _t((35, 50), (10, 60), (110, 170), (70, 110), 10),
    "portal": _t((35, 50), (40, 110), (130, 190), (80, 120), 10),
    "bone": _t((150, 330), texture=60),
    "cartilage": _t((80, 130), texture=20),
    "lung": _t((-900, -820), texture=40),
    "airway": _t((-1000, -950), texture=10),
    "brain": _t((25, 40), (0, 10), (5, 15), (5, 10), 6),
    "cord": _t((20, 40), texture=10),
}
"""Textbook priors (HU). Bone's range is the cancellous bone; the cortex is added separately."""

_NAME_RULES: list[tuple[str, str]] = [
    (r"^liver", "liver"), (r"^spleen", "spleen"), (r"^kidney_cyst", "cyst"), (r"^kidney", "kidney"),
    (r"^pancreas", "pancreas"), (r"^adrenal", "adrenal"), (r"^gallbladder", "bile"),
    (r"^urinary_bladder", "urine"), (r"^(stomach|duodenum|small_bowel|colon|esophagus)", "bowel"),
    (r"^(prostate)", "soft_tissue"), (r"^thyroid", "thyroid"), (r"^lung", "lung"),
    (r"^trachea", "airway"), (r"^(heart|atrial_appendage)", "heart"),
    (r"^(aorta|brachiocephalic_trunk|subclavian_artery|common_carotid|iliac_artery|pulmonary_vein)", "artery"),
    (r"^(inferior_vena_cava|superior_vena_cava|brachiocephalic_vein|iliac_vena)", "vein"),
    (r"^portal_vein", "portal"), (r"^costal_cartilages", "cartilage"),
    (r"^(vertebrae|sacrum|rib_|hip_|femur|humerus|scapula|clavicula|skull|sternum)", "bone"),
    (r"^(gluteus|autochthon|iliopsoas)", "muscle"), (r"^spinal_cord", "cord"), (r"^brain", "brain"),
]
BOWEL_GAS_SHARE = {"stomach": (0.0, 0.35), "duodenum": (0.0, 0.2), "small_bowel": (0.0, 0.1), "colon": (0.05, 0.5),
                   "esophagus": (0.0, 0.3)}
"""Share of each hollow organ's volume that is gas, drawn per sample."""


def tissue_of(name: str) -> str | None:
    """The tissue of a structure name (TotalSegmentator style), or None when unknown."""
    if name in TISSUES:
        return name
    for pattern, tissue in _NAME_RULES:
        if re.match(pattern, name):
            return tissue
    return None


def totalsegmentator_names() -> dict[int, str]:
    """TotalSegmentator v2 'total' ids -> names (from the shipped classes.json)."""
    from ..resources import resources_dir

    path = resources_dir() / "TrainingData" / "totalsegmentator" / "classes.json"
    return {int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}


def structure_names(table: Mapping[Any, str] | str | Path | None = None) -> dict[int, str]:
    """Label value -> structure name: TotalSegmentator's by default, or a user's table/JSON file."""
    if table is None or table == "totalsegmentator":
        return totalsegmentator_names()
    if isinstance(table, (str, Path)):
        from ..errors import UserError

        try:
            table = json.loads(Path(table).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the structure table {table} ({exc}); give a JSON object "
                            "{\"value\": \"name or tissue\"}") from None
    assert not isinstance(table, (str, Path))
    return {int(k): str(v) for k, v in table.items()}


def require_known_structures(names: Mapping[int, str], values: Iterable[int], source: Any, hint: str) -> None:
    """Refuse a label map holding values without a tissue, naming them and `hint` (how to map them)."""
    from ..errors import UserError

    bad = unknown_structures(names, values)
    if bad:
        raise UserError(f"{source}: label value(s) {', '.join(bad[:8])} have no known tissue; {hint}")


def unknown_structures(names: Mapping[int, str], values: Iterable[int]) -> list[str]:
    """Values present in a label map whose structure has no tissue (named for the error message)."""
    out = []
    for v in values:
        if v == 0:
            continue
        name = names.get(int(v))
        if name is None or tissue_of(name) is None:
            out.append(f"{v} ({name})" if name else str(v))
    return out


# --------------------------------------------------------------------------- measured table


@dataclass
class IntensityTable:
    """Measured HU per structure name from native CTs: {"mean", "sd", "voxels", "cases"}, where
    "mean" is the median and "sd" the MAD-based spread (see `measure_table`)."""

    structures: dict[str, dict[str, float]]
    sources: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"comment": "HU per structure measured on native (non-contrast) labelled CTs by "
                           "CascadeSegLib.synthesis.measure_table: median and 1.4826 x MAD of interior voxels.",
                "sources": self.sources, "structures": self.structures}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IntensityTable:
        return cls({str(k): dict(v) for k, v in data.get("structures", {}).items()}, list(data.get("sources", [])))

    def save(self, path: str | Path) -> None:
        from ..atomic import atomic_write

        atomic_write(path, json.dumps(self.to_json(), indent=1) + "\n", make_parents=False)

    @classmethod
    def load(cls, path: str | Path) -> IntensityTable:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def default_table_path() -> Path:
    from ..resources import resources_dir

    return resources_dir() / "Synthesis" / "intensity_table.json"


def measure_table(cases: Iterable[tuple[str, sitk.Image, sitk.Image]], names: Mapping[int, str] | None = None,
                  min_voxels: int = 30) -> IntensityTable:
    """Per-structure HU of (case name, CT, label map) triples of native CTs, pooled.

    Robust statistics (median, and 1.4826 x the median absolute deviation as "sd") so that gas
    in bowel and calcified plaque in the aorta do not pull a structure's soft-tissue value; the
    synthesis adds gas and bone cortex itself. The label map is resampled onto the CT (nearest
    neighbour, physical space) and eroded by one voxel to keep partial-volume edges out.
    """
    from scipy import ndimage

    names = dict(names or totalsegmentator_names())
    values: dict[str, list[np.ndarray]] = {}
    sources = []
    for case, ct, lab in cases:
        sources.append(case)
        lab_r = sitk.Resample(lab, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
        hu = sitk.GetArrayFromImage(ct).astype(np.float32)
        la = sitk.GetArrayFromImage(lab_r)
        for v in np.unique(la):
            if v == 0 or int(v) not in names:
                continue
            m = ndimage.binary_erosion(la == v)
            if int(m.sum()) >= min_voxels:
                values.setdefault(names[int(v)], []).append(hu[m])
    out = {}
    for name, parts in sorted(values.items()):
        x = np.concatenate(parts)
        med = float(np.median(x))
        out[name] = {"mean": round(med, 2), "sd": round(1.4826 * float(np.median(np.abs(x - med))), 2),
                     "voxels": int(x.size), "cases": len(parts)}
    return IntensityTable(out, sources)
