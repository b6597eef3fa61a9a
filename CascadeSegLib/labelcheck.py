"""Check that prediction and reference use the label values the label specs say, before scoring.

A reference written with another dataset's label ids is still a valid label map, so scoring it
gives numbers, just wrong ones (the sample CT's own segmentation scored 14% mean Dice against
its TotalSegmentator reference). Two symptoms give such a mix-up away: values that the label
spec does not name, and organs whose volumes differ by an order of magnitude. A swap moves at least
two values, so one such organ in a case whose other organs agree is a real miss (a weak model that
found 0.2 ml of an 11 ml vein), reported as a warning rather than refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .labels import LabelSet

VOLUME_RATIO = 10.0
"""Prediction and reference volumes of one organ further apart than this are flagged."""
_MAX_LISTED = 8


def label_volumes(image: sitk.Image) -> dict[int, float]:
    """{value: volume in ml} of every nonzero value of a label map."""
    arr = sitk.GetArrayViewFromImage(image)
    flat = np.asarray(arr).ravel()
    if flat.size and (flat.min() < 0 or flat.max() > 65535):
        values, counts = np.unique(flat, return_counts=True)
    else:
        counts = np.bincount(flat.astype(np.int64, copy=False)) if flat.size else np.zeros(1, np.int64)
        values = np.flatnonzero(counts)
        counts = counts[values]
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    return {int(v): float(c) * voxel_ml for v, c in zip(values, counts) if v != 0}


@dataclass
class LabelProblems:
    """What the check found, across all cases."""

    unnamed_pred: dict[int, list[str]] = field(default_factory=dict)   # value -> cases
    unnamed_ref: dict[int, list[str]] = field(default_factory=dict)
    volumes: list[tuple[str, str, float, float]] = field(default_factory=list)  # case, organ, pred, ref ml
    lone_volumes: list[tuple[str, str, float, float]] = field(default_factory=list)  # the only one in its case

    def __bool__(self) -> bool:
        """True when the label schemes look mixed up (lone volume differences do not count)."""
        return bool(self.unnamed_pred or self.unnamed_ref or self.volumes)

    def warnings(self) -> list[str]:
        """One line per case whose only problem is one organ's volume: scored, but worth a look."""
        return [f"{organ} {p:.1f} ml predicted vs {r:.1f} ml in the reference ({case}): more than "
                f"{VOLUME_RATIO:g}x apart, the case's other organs agree, so it is scored as a real miss"
                for case, organ, p, r in self.lone_volumes]

    def message(self, labels_hint: str, ref_hint: str, presets: Sequence[str]) -> str:
        """One line listing the problems and naming the fix."""
        parts = []
        for side, found, hint in (("prediction", self.unnamed_pred, labels_hint),
                                  ("reference", self.unnamed_ref, ref_hint)):
            if found:
                parts.append(f"the {side} holds label values that {hint} does not name: {_values(found)}")
        if self.volumes:
            shown = ", ".join(f"{organ} {p:.0f} ml vs {r:.0f} ml ({case})"
                              for case, organ, p, r in self.volumes[:_MAX_LISTED])
            more = f" and {len(self.volumes) - _MAX_LISTED} more" if len(self.volumes) > _MAX_LISTED else ""
            parts.append(f"organ volumes differ by more than {VOLUME_RATIO:g}x between prediction and "
                         f"reference: {shown}{more}")
        return ("; ".join(parts) + "; the label values probably mean different organs: pass --ref-labels "
                f"({'|'.join(presets)}, a model, or a JSON label list) and --labels to match how each map "
                "was made, or --no-label-check if these are real results")


def _values(found: dict[int, list[str]]) -> str:
    values = sorted(found)
    text = ", ".join(str(v) for v in values[:_MAX_LISTED * 2])
    if len(values) > _MAX_LISTED * 2:
        text += f" and {len(values) - _MAX_LISTED * 2} more"
    cases = sorted({c for cs in found.values() for c in cs})
    return f"{text} (in {', '.join(cases[:3])}{' ...' if len(cases) > 3 else ''})"


def check_pair(case: str, pred: sitk.Image, ref: sitk.Image, labels: LabelSet, ref_labels: LabelSet,
               problems: LabelProblems) -> None:
    """Add this case's unnamed values and order-of-magnitude volume differences to `problems`.

    Volume differences count as a mix-up when two or more organs of the case show one; a lone one
    goes to `problems.lone_volumes`.
    """
    pv, rv = label_volumes(pred), label_volumes(ref)
    named_p = {lab.value for lab in labels}
    named_r = {lab.value for lab in ref_labels}
    apart: list[tuple[str, str, float, float]] = []
    for v in sorted(set(pv) - named_p):
        problems.unnamed_pred.setdefault(v, []).append(case)
    for v in sorted(set(rv) - named_r):
        problems.unnamed_ref.setdefault(v, []).append(case)
    for lab in labels:
        try:
            ref_value = ref_labels.by_name(lab.name).value
        except KeyError:
            continue
        p, r = pv.get(lab.value, 0.0), rv.get(ref_value, 0.0)
        if p > 0 and r > 0 and max(p, r) / min(p, r) > VOLUME_RATIO:
            apart.append((case, lab.name, p, r))
    (problems.volumes if len(apart) > 1 else problems.lone_volumes).extend(apart)


def check_pairs(pairs: Sequence[tuple[str, Path, Path]], labels: LabelSet,
                ref_labels: LabelSet | None) -> LabelProblems:
    """Run `check_pair` over (case, prediction path, reference path) triples."""
    from .evaluate import read_label_map

    problems = LabelProblems()
    for case, p, r in pairs:
        check_pair(case, read_label_map(p), read_label_map(r), labels, ref_labels or labels, problems)
    return problems
