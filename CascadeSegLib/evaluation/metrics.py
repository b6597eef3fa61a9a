"""Overlap and surface metrics of one organ; the one Dice of the engine.

Dice, one convention for every caller (evaluation tables, training validation, refinement,
the measurement scripts): `2 |P & R| / (|P| + |R|)`; 0 when exactly one mask is empty;
**None when both are empty** - the structure is absent from both, so there is no overlap to
measure. Callers decide what an absent structure means to them (evaluation reports it as
"absent", training validation as NaN, refinement's convergence test as "unchanged").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    Mask = np.ndarray | torch.Tensor
else:
    Mask = Any


def count(mask: Mask) -> int:
    """Number of True (non-zero) voxels of a numpy array or torch tensor."""
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(mask.sum())


def dice_from_counts(intersection: int, n_pred: int, n_ref: int) -> float | None:
    """Dice from voxel counts; None when both masks are empty (see the module docstring)."""
    total = n_pred + n_ref
    return None if total == 0 else 2.0 * intersection / total


def dice(pred: Mask, ref: Mask) -> float | None:
    """Dice of two boolean masks of one shape (numpy or torch); None when both are empty."""
    return dice_from_counts(count(pred & ref), count(pred), count(ref))
