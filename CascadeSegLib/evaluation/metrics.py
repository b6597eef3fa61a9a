"""Overlap and surface metrics of one organ; the one Dice of the engine.

Dice, one convention for every caller (evaluation tables, training validation, refinement,
the measurement scripts): `2 |P & R| / (|P| + |R|)`; 0 when exactly one mask is empty;
**None when both are empty** - the structure is absent from both, so there is no overlap to
measure. Callers decide what an absent structure means to them (evaluation reports it as
"absent", training validation as NaN, refinement's convergence test as "unchanged").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..labels import LabelSet
from .images import as_label_map, to_reference_grid

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


METRICS = ("dice", "hd95_mm", "assd_mm", "hd_mm", "ref_ml", "pred_ml")


TABLE_METRICS = ("dice", "hd95_mm", "assd_mm", "ref_ml", "pred_ml")


METRIC_TITLES = {"dice": "Dice [%]", "hd95_mm": "HD95 [mm]", "assd_mm": "ASSD [mm]",
                 "hd_mm": "Hausdorff [mm]", "ref_ml": "Reference volume [ml]",
                 "pred_ml": "Predicted volume [ml]"}


DEFINITIONS = {
    "dice": "2|P&R|/(|P|+|R|), fraction in [0, 1] (tables show percent)",
    "hd95_mm": "95th percentile of the pooled surface-to-surface distances of both directions, mm",
    "assd_mm": "mean of the pooled surface-to-surface distances of both directions, mm",
    "hd_mm": "maximum surface-to-surface distance, mm",
    "surfaces": "object voxels with a background face neighbour (SimpleITK LabelContour); "
                "distance to the other surface from SimpleITK SignedMaurerDistanceMap of that "
                "surface, with image spacing",
    "ref_ml": "reference volume, voxels x voxel volume / 1000",
    "pred_ml": "predicted volume on the reference grid",
    "missing": "empty prediction (reference present): Dice 0, no distances; empty reference "
               "(prediction present): Dice 0; absent in both: no values",
    "std": "sample standard deviation (ddof=1), 0 for one case",
    "confusion_ml": "{predicted class: {reference class: ml}} over the whole reference grid, non-zero "
                    "entries only; 'other' is background or a structure the label set does not name, on "
                    "either side; the diagonal is the overlap, a row sums to pred_ml, a column to ref_ml",
    "resampling": "predictions on another grid are resampled onto the reference (nearest)",
    "c2": "C2_k(r) = stage-1 organ k dilated by a ball of radius r voxels; recall=|C2&R|/|R|, "
          "fpr=|C2\\R|/|not R| over the image, fdr=|C2\\R|/|C2|; 'all' = all stage-1 "
          "foreground vs all listed reference organs",
}


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    sl = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return sl[0] if sl else None


def label_boxes(arr: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """value -> bounding box (slices) of every label present in an integer array."""
    if arr.size == 0 or int(arr.max()) == 0:
        return {}
    return {i + 1: sl for i, sl in enumerate(ndimage.find_objects(arr)) if sl is not None}


def union_box(boxes: Iterable[tuple[slice, ...] | None], shape: Sequence[int],
               pad: int) -> tuple[slice, ...] | None:
    found = [b for b in boxes if b is not None]
    if not found:
        return None
    return tuple(slice(max(0, min(b[i].start for b in found) - pad),
                       min(int(shape[i]), max(b[i].stop for b in found) + pad))
                 for i in range(len(shape)))


def surface_distances(a: np.ndarray, b: np.ndarray,
                      spacing_xyz: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(distances from A's surface voxels to B's surface, and B's to A's), in mm.

    `a`, `b`: non-empty boolean arrays (z, y, x) on the same grid; spacing in SimpleITK order.
    """
    def prepare(mask: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.SetSpacing(tuple(float(s) for s in spacing_xyz))
        return img

    def surface(mask: np.ndarray) -> sitk.Image:
        # Face-connected contour: object voxels with a background face neighbour.
        return sitk.LabelContour(prepare(mask), fullyConnected=False)

    def distance_to(surf: sitk.Image) -> np.ndarray:
        # Maurer's map of the surface image is the exact distance to the nearest surface
        # voxel everywhere off the surface (it measures inside distances to a thicker contour,
        # so the object itself is not used); on the surface the distance is 0.
        dm = sitk.SignedMaurerDistanceMap(surf, insideIsPositive=False, squaredDistance=False,
                                          useImageSpacing=True)
        out = np.abs(sitk.GetArrayFromImage(dm))
        out[sitk.GetArrayFromImage(surf) > 0] = 0.0
        return out

    sa, sb = surface(a), surface(b)
    on_a = sitk.GetArrayFromImage(sa) > 0
    on_b = sitk.GetArrayFromImage(sb) > 0
    d_ab = distance_to(sb)[on_a]
    d_ba = distance_to(sa)[on_b]
    return d_ab.astype(np.float64), d_ba.astype(np.float64)


def organ_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz: Sequence[float],
                  distances: bool = True) -> dict[str, Any]:
    """Dice, HD95, ASSD, HD and volumes for one organ: boolean masks (z, y, x) on one grid."""
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    out: dict[str, Any] = {"dice": None, "hd95_mm": None, "assd_mm": None, "hd_mm": None,
                           "ref_ml": n_r * voxel_ml, "pred_ml": n_p * voxel_ml}
    if n_p == 0 and n_r == 0:
        out["status"] = "absent"
        return out
    if n_p == 0 or n_r == 0:
        out["dice"] = dice_from_counts(0, n_p, n_r)
        out["status"] = "missing_in_prediction" if n_p == 0 else "missing_in_reference"
        return out
    box = union_box([_bbox(pred), _bbox(ref)], pred.shape, pad=1)
    p, r = pred[box], ref[box]
    out["dice"] = dice_from_counts(count(p & r), n_p, n_r)   # the overlap lies in the box
    out["status"] = "ok"
    if distances:
        d_pr, d_rp = surface_distances(p, r, spacing_xyz)
        pooled = np.concatenate([d_pr, d_rp])
        out["hd95_mm"] = float(np.percentile(pooled, 95))
        out["assd_mm"] = float(pooled.mean())
        out["hd_mm"] = float(pooled.max())
    return out


OTHER = "other"

# voxels per bincount call: each int64 temporary stays at 32 MB whatever the image size
_CHUNK = 1 << 22


def confusion_ml(pred: np.ndarray, ref: np.ndarray, pred_values: Mapping[str, int],
                 ref_values: Mapping[str, int], voxel_ml: float) -> dict[str, dict[str, float]]:
    """Where each predicted class lies in the reference, in ml: {predicted: {reference: ml}}.

    Dice says how much an organ is wrong, not into what: this says that a liver's extra 96 ml lie
    in the aorta and the vena cava, or that a kidney's missing part was called spleen. `pred`,
    `ref`: integer label arrays of one grid; `*_values`: class name -> label value. Values no
    name maps to, and 0, count as `OTHER`. Only non-zero entries are returned."""
    names = [OTHER] + [n for n in dict.fromkeys([*pred_values, *ref_values]) if n != OTHER]
    index = {n: i for i, n in enumerate(names)}
    k = len(names)

    def lut(arr: np.ndarray, values: Mapping[str, int]) -> np.ndarray:
        top = max([int(arr.max()) if arr.size else 0, *values.values()])
        table = np.zeros(top + 1, np.int64)           # unnamed values -> OTHER (index 0)
        for name, value in values.items():
            if value > 0:
                table[value] = index[name]
        return table

    p_lut, r_lut = lut(pred, pred_values), lut(ref, ref_values)
    p_flat, r_flat = pred.reshape(-1), ref.reshape(-1)
    counts = np.zeros(k * k, np.int64)
    for start in range(0, p_flat.size, _CHUNK):
        stop = start + _CHUNK
        pair = p_lut[p_flat[start:stop]] * k + r_lut[r_flat[start:stop]]
        counts += np.bincount(pair, minlength=k * k)
    grid = counts.reshape(k, k)
    return {names[i]: {names[j]: float(grid[i, j]) * voxel_ml for j in range(k) if grid[i, j]}
            for i in range(k) if grid[i].any()}


def evaluate_images(pred: sitk.Image, ref: sitk.Image, labels: LabelSet,
                    ref_labels: LabelSet | None = None,
                    distances: bool = True) -> dict[str, Any]:
    """Metrics of every organ of `labels` for one case: {"organs": {name: {...}}, ...}.

    `ref_labels` maps organ names to the reference's values when they differ from the
    prediction's (e.g. a TotalSegmentator reference); organs it lacks are skipped, and
    `confusion_ml` counts their reference voxels as `OTHER`.
    """
    ref = as_label_map(ref, "reference")
    pred = as_label_map(pred, "prediction")
    pred, resampled = to_reference_grid(pred, ref)
    ref_labels = ref_labels or labels
    p_arr = sitk.GetArrayViewFromImage(pred)
    r_arr = sitk.GetArrayViewFromImage(ref)
    spacing = ref.GetSpacing()
    # One pass per image finds every label's box; each organ is then measured in its box
    # (grown by one voxel, so surfaces and distances are those of the whole image).
    p_boxes, r_boxes = label_boxes(p_arr), label_boxes(r_arr)
    ref_values: dict[str, int] = {}
    organs: dict[str, Any] = {}
    for lab in labels:
        try:
            rv = ref_values[lab.name] = ref_labels.by_name(lab.name).value
        except KeyError:
            continue
        box = union_box([p_boxes.get(lab.value), r_boxes.get(rv)], p_arr.shape, pad=1)
        if box is None:
            box = (slice(0, 0),) * 3
        organs[lab.name] = organ_metrics(p_arr[box] == lab.value, r_arr[box] == rv, spacing,
                                         distances)
    where = confusion_ml(p_arr, r_arr, {lab.name: lab.value for lab in labels}, ref_values,
                         float(np.prod(spacing)) / 1000.0)
    return {"organs": organs, "confusion_ml": where, "resampled": resampled,
            "grid": {"size": list(ref.GetSize()), "spacing": list(spacing)}}
