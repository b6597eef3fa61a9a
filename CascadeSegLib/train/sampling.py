"""Centres of training sub-volumes: random voxels of the candidate region C.

Stage 1 samples C1 (the body mask), stage 2 samples C2 (the dilated stage-1 foreground), as
in the paper. A share `foreground_fraction` of centres is drawn from labelled voxels of C,
class by class, so small organs (gallbladder, pancreas) are seen often even in few images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class CandidateSampler:
    """Draws (case index, centre (z, y, x)) pairs; every draw comes from `rng` (repeatable)."""

    def __init__(self, candidates: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 foreground_fraction: float = 0.0, case_weights: Sequence[float] | None = None) -> None:
        self.shapes = [c.shape for c in candidates]
        self.c_index = []
        self.class_index: list[dict[int, np.ndarray]] = []
        for cm, lab in zip(candidates, labels):
            cm = np.asarray(cm, dtype=bool)
            flat = np.flatnonzero(cm)
            self.c_index.append(flat)
            values = np.asarray(lab).ravel()[flat]
            per_class = {}
            if foreground_fraction > 0:
                order = np.argsort(values, kind="stable")
                sorted_vals = values[order]
                classes, starts = np.unique(sorted_vals, return_index=True)
                ends = np.append(starts[1:], sorted_vals.size)
                for k, a, b in zip(classes.tolist(), starts.tolist(), ends.tolist()):
                    if k > 0:
                        per_class[int(k)] = flat[order[a:b]]
            self.class_index.append(per_class)
        self.usable = [i for i, f in enumerate(self.c_index) if f.size > 0]
        if not self.usable:
            raise ValueError("no case has any voxel in its candidate region")
        self.foreground_fraction = float(foreground_fraction)
        # Cases are drawn uniformly unless weighted (e.g. real vs synthetic shares).
        self.weights: np.ndarray | None = None
        if case_weights is not None:
            w = np.array([float(case_weights[i]) for i in self.usable])
            self.weights = w / w.sum() if w.sum() > 0 else None

    def sample(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        if self.weights is None:
            case = int(self.usable[rng.integers(len(self.usable))])
        else:
            case = int(self.usable[int(rng.choice(len(self.usable), p=self.weights))])
        pool = self.c_index[case]
        classes = self.class_index[case]
        if classes and rng.random() < self.foreground_fraction:
            keys = sorted(classes)
            pool = classes[keys[int(rng.integers(len(keys)))]]
        flat = int(pool[rng.integers(pool.size)])
        z, y, x = np.unravel_index(flat, self.shapes[case])
        return case, (int(z), int(y), int(x))
