"""Where the result and the atlases disagree on which organ lies where: a check on every result.

Inside C2 the network's vote weighs as much as the atlases' (abdomen-ct 2.8.0; 0.9 against 0.1
before): a confident network that mistakes one organ for another (the lower pole of a spleen
labelled left kidney), or misses part of one, is not overruled by atlases that agree otherwise.
Such errors are what a reader most needs to see, so a result segmented with atlases is checked
where at least `MIN_SHARE` of the atlases' vote goes to one organ:
- mix-ups: how much of each organ lies where the atlases agree on another organ; flagged from
  `MIN_ML` and `MIN_FRACTION` of the organ's labelled volume;
- missed: how much of the region where the atlases agree on an organ the result leaves
  unlabelled; flagged from `MIN_ML` and `MIN_MISSED_FRACTION` of that region.
Flagged conflicts become a warning line and the report's "review these regions"; smaller ones
(borders where a registration is off by a few millimetres) are only listed in the report. The
check changes no label. Its thresholds were set on 2026-12-01 before it was run on any scan.
A whole scan is also checked as a whole (`scan_conflict`): where no registered atlas's organs agree
with stage 1's (a pelvic or chest CT that holds none of the ten organs, where the networks invent
some and the atlases, registered onto anatomy they do not hold, put theirs elsewhere), every
segment is suspect, and one flagged "scan" conflict says so; the per-organ checks are not made there.
On slabs conflicts are listed, not flagged (the atlases' placement there is too loose to ask for a review).
A package with `mixup_share` (abdomen-ct 2.10.0-2.13.0) has already given the atlases' organ to mixed-up
voxels of its `mixup_organs` (`GridPrior.relabel_mixups`): the check reports what is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..labels import LabelSet
from ..progress import WHOLE_SCAN_WARNING
from .atlas_prior import GridPrior

#: the share of the atlases' (smoothed, weighted) vote one other organ needs for "the atlases say"
MIN_SHARE = 0.7
#: a conflict this large (ml) ...
MIN_ML = 10.0
#: ... that is also this share of the organ's labelled volume is flagged
MIN_FRACTION = 0.2
#: ... or, for a missed region, this share of where the atlases agree on the organ
MIN_MISSED_FRACTION = 0.3
#: smaller conflicts than this are not listed at all
LISTED_ML = 1.0
#: a whole scan where no atlas's organs agree with stage 1's by this Dice (`organ_agreement`) is
#: flagged as a whole. Set on 2026-12-03 from fold packages (networks and atlases that never saw the
#: patient): abdominal scans and their upper or lower halves 0.125 and more (0.125-0.13 only with the
#: weakest networks, trained on one CT; 0.25-0.64 otherwise); pelvis-level scans and chests above the
#: organs 0.070 and less (recipe, nineteenth round)
MIN_SCAN_AGREEMENT = 0.1


@dataclass(frozen=True)
class AtlasConflict:
    """A mix-up: `ml` of `organ` (that `fraction` of its labelled volume) lies where the atlases
    put `atlases_say`. Missed (`organ` "no organ"): `ml` where the atlases agree on `atlases_say`
    (that `fraction` of the region where they do) is unlabelled.
    Scan (`kind` "scan", `organ` "every organ"): no atlas's organs agree with stage 1's by
    `MIN_SCAN_AGREEMENT`; `fraction` is the best atlas's agreement, `ml` all the result labels."""
    organ: str
    atlases_say: str
    ml: float
    fraction: float
    flagged: bool
    kind: str = "mix-up"

    def message(self) -> str:
        if self.kind == "scan":
            return (f"{WHOLE_SCAN_WARNING} (best Dice {self.fraction:.2f}, under "
                    f"{MIN_SCAN_AGREEMENT:g}): the scan may hold none of the abdomen's organs (a pelvic or chest CT) "
                    f"and its {self.ml:.0f} ml of segments may be false; review every segment")
        if self.kind == "missed":
            return (f"atlas check: most atlases put the {self.atlases_say} on {self.ml:.0f} ml that the result "
                    f"leaves unlabelled ({self.fraction:.0%} of where they agree on it); review that region")
        return (f"atlas check: {self.ml:.0f} ml of the {self.organ} ({self.fraction:.0%} of it) lies where most "
                f"atlases put the {self.atlases_say}; review that region")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def atlas_conflicts(labels: torch.Tensor, prior: GridPrior, labelset: LabelSet,
                    slab: bool = False) -> list[AtlasConflict]:
    """The conflicts of `labels` (uint8 on the prior's target grid, stage 2's) with the atlases,
    largest first. Only meaningful where some atlas agrees with stage 1 (`per_organ_check`): the
    caller asks that first. On a `slab` every conflict is listed and none flagged: registered onto
    40 mm the atlases are often centimetres off (of 14 flags on 40 mm slabs of the held-out scans,
    4 were right; recipe, thirty-second round)."""
    out = _mix_ups(labels, prior, labelset) + _missed(labels, prior, labelset)
    if slab:
        out = [replace(c, flagged=False) for c in out]
    return sorted(out, key=lambda c: -c.ml)


def per_organ_check(best: float | None) -> bool:
    """Whether the atlases may speak organ by organ: not where no atlas agrees with stage 1 (`best`,
    the highest `organ_agreement`, under `MIN_SCAN_AGREEMENT`): atlases registered onto a head or a
    chest put their organs somewhere, and "the result leaves the right kidney unlabelled" there is
    false; `scan_conflict` speaks for such a scan. True where nothing was measured (a slab)."""
    return best is None or best >= MIN_SCAN_AGREEMENT


def scan_conflict(best: float | None, labels: torch.Tensor | np.ndarray, voxel_ml: float) -> AtlasConflict | None:
    """The scan as a whole: flagged where the best atlas agrees with stage 1 by less than
    `MIN_SCAN_AGREEMENT` (`best`: the highest `organ_agreement` of the registered atlases, from
    `atlas_prior`) and the result `labels` (voxels of `voxel_ml`) hold at least `LISTED_ML` of
    organs; None otherwise, and where nothing was measured (`best` None: a slab, a package without
    atlases)."""
    if best is None or per_organ_check(best):
        return None
    ml = float((labels > 0).sum()) * voxel_ml
    if ml < LISTED_ML:
        return None
    return AtlasConflict("every organ", "", round(ml, 1), round(best, 3), True, "scan")


def _name(labelset: LabelSet, value: int) -> str:
    return labelset.by_value(value).display.lower()


def _mix_ups(labels: torch.Tensor, prior: GridPrior, labelset: LabelSet) -> list[AtlasConflict]:
    organ, agreed = prior.consensus(labels, MIN_SHARE)
    k = labelset.num_classes
    voxel_ml = float(np.prod(prior.target.GetSpacing())) / 1000.0
    volume = np.bincount(organ, minlength=k) * voxel_ml
    clash = (agreed > 0) & (agreed != organ)
    pairs, counts = np.unique(organ[clash] * k + agreed[clash], return_counts=True)
    out = []
    for pair, n in zip(pairs.tolist(), counts.tolist()):
        value, other = divmod(pair, k)
        ml = n * voxel_ml
        if ml < LISTED_ML:
            continue
        fraction = ml / volume[value]
        flagged = bool(ml >= MIN_ML and fraction >= MIN_FRACTION)
        out.append(AtlasConflict(_name(labelset, value), _name(labelset, other), round(ml, 1),
                                 round(float(fraction), 3), flagged))
    return out


def _missed(labels: torch.Tensor, prior: GridPrior, labelset: LabelSet) -> list[AtlasConflict]:
    agreed, got = prior.agreed_regions(labels, MIN_SHARE)
    voxel_ml = float(np.prod(prior.source.GetSpacing())) / 1000.0
    out = []
    for value in np.unique(agreed).tolist():
        region = agreed == value
        missed = int((got[region] == 0).sum())
        ml = missed * voxel_ml
        if ml < LISTED_ML:
            continue
        fraction = missed / int(region.sum())
        flagged = bool(ml >= MIN_ML and fraction >= MIN_MISSED_FRACTION)
        out.append(AtlasConflict("no organ", _name(labelset, value), round(ml, 1), round(fraction, 3), flagged,
                                 "missed"))
    return out
