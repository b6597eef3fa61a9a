"""Organ labels: value, name, colour and SNOMED-CT terminology.

A model package lists its labels by name; names found in `Resources/labels.json` inherit
colour and codes from there, so every model shows the liver in the same colour with the same
code. The terminology string is the one 3D Slicer stores in `.seg.nrrd` files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .jsonkinds import kind_problem
from .resources import resources_dir

Code = tuple[str, str, str]  # (coding scheme, code value, meaning)
ANATOMY_CATEGORY: Code = ("SCT", "123037004", "Anatomical Structure")
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
# A label map's "nothing known here": an atlas casts no vote there (also where it does not reach),
# and training leaves such voxels out of the candidate region.
UNKNOWN_LABEL = 255


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    display: str
    color: tuple[int, int, int]
    type_code: Code | None = None
    modifier_code: Code | None = None
    category_code: Code = ANATOMY_CATEGORY

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def terminology(self) -> str:
        """Slicer's terminology entry string ('context~category~type~modifier~...')."""

        def fmt(code: Code | None) -> str:
            return "^".join(code) if code else "^^"

        parts = [TERMINOLOGY_CONTEXT, fmt(self.category_code), fmt(self.type_code),
                 fmt(self.modifier_code), ANATOMIC_CONTEXT, "^^", "^^"]
        return "~".join(parts)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"value": self.value, "name": self.name, "display": self.display,
                             "color": list(self.color)}
        snomed: dict[str, Any] = {"category": list(self.category_code)}
        if self.type_code:
            snomed["type"] = list(self.type_code)
        if self.modifier_code:
            snomed["modifier"] = list(self.modifier_code)
        d["snomed"] = snomed
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Label:
        """Build a label; missing display/colour/codes are filled from the standard table.

        The value must be a whole number in 1..255 (label maps are uint8; 3D-IRCADb masks are 255)
        and a colour three whole numbers in 0..255: int() cut a 2.5 to 2 and a value of 300 wrapped
        round in the uint8 label map, silently."""
        if not isinstance(d, dict):
            raise ValueError(f'a label must be {{"value": .., "name": ..}}, got {json.dumps(d)}')
        name, value = d.get("name"), d.get("value")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a label name must be a non-empty string, got {json.dumps(name)}")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 255:
            raise ValueError(f"label {name}: value must be a whole number from 1 to 255, "
                             f"got {json.dumps(value)}")
        std = standard_labels().get(name, {})
        snomed = d.get("snomed") or std.get("snomed") or {}
        color = d.get("color") or std.get("color") or _fallback_color(value)
        if not isinstance(color, (list, tuple)) or len(color) != 3 \
                or any(kind_problem(c, int, "color") or not 0 <= c <= 255 for c in color):
            raise ValueError(f"label {name}: color must be three whole numbers from 0 to 255 (red, green, "
                             f"blue), got {json.dumps(color)}")
        display = d.get("display") or std.get("display") or name.replace("_", " ").capitalize()
        if not isinstance(display, str):
            raise ValueError(f"label {name}: display must be a string, got {json.dumps(display)}")
        return Label(
            value=int(value),
            name=name,
            display=display,
            color=tuple(int(c) for c in color),  # type: ignore[arg-type]
            type_code=_code(snomed.get("type")),
            modifier_code=_code(snomed.get("modifier")),
            category_code=_code(snomed.get("category")) or ANATOMY_CATEGORY,
        )


@dataclass(frozen=True)
class LabelSet:
    """The foreground labels of a model (background 0 is implicit)."""

    labels: tuple[Label, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values) or any(v <= 0 for v in values):
            raise ValueError(f"label values must be unique and positive, got {values}")
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Network output channels: background + max label value."""
        return max((lab.value for lab in self.labels), default=0) + 1

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def by_name(self, name: str) -> Label:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise KeyError(name)

    def by_value(self, value: int) -> Label:
        for lab in self.labels:
            if lab.value == value:
                return lab
        raise KeyError(value)

    def to_json(self) -> list[dict[str, Any]]:
        return [lab.to_json() for lab in self.labels]

    @staticmethod
    def from_json(items: Iterable[dict[str, Any]]) -> LabelSet:
        return LabelSet(tuple(Label.from_json(d) for d in items))

    @staticmethod
    def from_names(names: Iterable[str]) -> LabelSet:
        """Labels 1..N in the given order, with standard colours and codes."""
        return LabelSet.from_json({"value": i + 1, "name": n} for i, n in enumerate(names))


def _code(value: Any) -> Code | None:
    if not value:
        return None
    return tuple(str(v) for v in value)  # type: ignore[return-value]


def _fallback_color(value: int) -> tuple[int, int, int]:
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]
    return palette[value % len(palette)]


@lru_cache(maxsize=1)
def standard_labels() -> dict[str, dict[str, Any]]:
    """name -> entry of Resources/labels.json."""
    path = resources_dir() / "labels.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {d["name"]: d for d in data["labels"]}


DEFAULT_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "gallbladder", "stomach",
                  "pancreas", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein")
