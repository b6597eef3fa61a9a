"""The candidate region C2 as a function of the dilation radius (Roth et al. 2018 Fig. 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..labels import LabelSet
from .cases import progress_iter
from .images import as_label_map, read_label_map, to_reference_grid
from .metrics import label_boxes, union_box

DEFAULT_RADII = tuple(range(11))


def spacing_grid(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """Empty grid with `spacing` (x, y, z) over `image`'s extent (same rule as the engine's
    preprocess.grid_for_spacing: origin and direction kept, size rounded)."""
    spacing = [float(v) for v in spacing]
    size = [max(1, int(round(n * s / t)))
            for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def candidate_curves(stage1: sitk.Image, ref: sitk.Image, labels: LabelSet,
                     ref_labels: LabelSet | None = None,
                     radii: Sequence[int] = DEFAULT_RADII,
                     spacing: Sequence[float] | None = None) -> dict[str, Any]:
    """Recall, FPR and FDR of the dilated stage-1 prediction vs the reference, per organ.

    Radii are in voxels of the reference grid, or of a grid with `spacing` (x, y, z; e.g. the
    model's stage-2 spacing, where the engine dilates) onto which both are resampled (nearest).
    One Euclidean distance map (in voxels) per organ gives every radius at once: a voxel lies
    in the ball dilation of radius r exactly when its distance to the mask is <= r.
    """
    radii = sorted({int(r) for r in radii})
    if not radii or radii[0] < 0:
        raise UserError("dilation radii must be integers >= 0, e.g. 0..10")
    ref = as_label_map(ref, "reference")
    if spacing is not None:
        if len(spacing) != 3 or min(float(v) for v in spacing) <= 0:
            raise UserError(f"grid spacing must be three positive numbers (x,y,z), got {spacing}")
        ref = sitk.Resample(ref, spacing_grid(ref, spacing), sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0, ref.GetPixelID())
    stage1, _ = to_reference_grid(as_label_map(stage1, "stage-1 prediction"), ref)
    ref_labels = ref_labels or labels
    s_arr = sitk.GetArrayViewFromImage(stage1)
    r_arr = sitk.GetArrayViewFromImage(ref)
    total = int(s_arr.size)
    rmax = radii[-1]
    out: dict[str, Any] = {}
    s_boxes, r_boxes = label_boxes(s_arr), label_boxes(r_arr)
    shape = s_arr.shape
    organs: list[tuple[str, Any, Any]] = []  # (name, stage-1 test, reference test)
    ref_values: list[int] = []
    for lab in labels:
        try:
            rv = ref_labels.by_name(lab.name).value
        except KeyError:
            continue
        ref_values.append(rv)
        organs.append((lab.name, (lambda a, v=lab.value: a == v), (lambda a, v=rv: a == v)))
    organs.append(("all", lambda a: a > 0, lambda a: np.isin(a, ref_values)))
    for name, s_test, r_test in organs:
        if name == "all":
            s_box = union_box(s_boxes.values(), shape, pad=0)
            r_box = union_box([r_boxes.get(v) for v in ref_values], shape, pad=0)
        else:
            s_box = s_boxes.get(labels.by_name(name).value)
            r_box = r_boxes.get(ref_labels.by_name(name).value)
        n_ref = int(np.count_nonzero(r_test(r_arr[r_box]))) if r_box else 0
        n_s = int(np.count_nonzero(s_test(s_arr[s_box]))) if s_box else 0
        rec: list[float | None] = []
        fpr: list[float] = []
        fdr: list[float | None] = []
        frac: list[float] = []
        # Voxels farther than rmax from stage 1 are never covered: work in its grown box.
        box = union_box([s_box], shape, pad=rmax + 1) if n_s else None
        if box is None:
            rec = [0.0 if n_ref else None] * len(radii)
            fpr = [0.0] * len(radii)
            fdr = [None] * len(radii)
            frac = [0.0] * len(radii)
        else:
            s, r = s_test(s_arr[box]), r_test(r_arr[box])
            # Smallest integer radius reaching each voxel (dist <= r), capped at rmax + 1;
            # cumulative counts then give every radius in one pass.
            # Squared voxel distances to stage 1 (SimpleITK's Maurer map: multi-threaded and
            # ~3x faster than scipy's EDT; squared values are integers, so no rounding).
            d2 = sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(s.astype(np.uint8)),
                                              insideIsPositive=False, squaredDistance=True,
                                              useImageSpacing=False)
            d2 = np.maximum(np.rint(sitk.GetArrayFromImage(d2)), 0.0)
            reach = np.minimum(np.ceil(np.sqrt(d2) - 1e-9), rmax + 1).astype(np.int64)
            cum_all = np.cumsum(np.bincount(reach.ravel(), minlength=rmax + 2))
            cum_ref = np.cumsum(np.bincount(reach[r], minlength=rmax + 2))
            for rad in radii:
                covered, tp = int(cum_all[rad]), int(cum_ref[rad])
                fp = covered - tp
                rec.append(tp / n_ref if n_ref else None)
                fpr.append(fp / (total - n_ref) if total > n_ref else 0.0)
                fdr.append(fp / covered if covered else None)
                frac.append(covered / total)
        out[name] = {"radii": radii, "recall": rec, "fpr": fpr, "fdr": fdr,
                     "c2_fraction": frac, "ref_voxels": n_ref, "stage1_voxels": n_s,
                     "grid_spacing": list(ref.GetSpacing())}
    return out


def candidate_pairs(pairs: Sequence[tuple[str, Path, Path]], labels: LabelSet,
                    ref_labels: LabelSet | None = None, radii: Sequence[int] = DEFAULT_RADII,
                    spacing: Sequence[float] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """candidate_curves over cases, and their per-radius means (the curves of Fig. 6)."""
    cases = {}
    for case, p, r in progress_iter(pairs, len(pairs), "candidates", progress):
        cases[case] = candidate_curves(read_label_map(p), read_label_map(r), labels,
                                       ref_labels, radii, spacing)
    return {"cases": cases, "mean": mean_curves(cases)}


def mean_curves(cases: Mapping[str, Any]) -> dict[str, Any]:
    """Per organ and radius, the mean over cases of recall/FPR/FDR/C2 fraction."""
    out: dict[str, Any] = {}
    names: list[str] = []
    for c in cases.values():
        names += [n for n in c if n not in names]
    for name in names:
        curves = [c[name] for c in cases.values() if name in c]
        radii = curves[0]["radii"]
        entry: dict[str, Any] = {"radii": radii}
        for key in ("recall", "fpr", "fdr", "c2_fraction"):
            col = []
            for i in range(len(radii)):
                v = [cv[key][i] for cv in curves if cv[key][i] is not None]
                col.append(float(np.mean(v)) if v else None)
            entry[key] = col
        entry["n_cases"] = len(curves)
        out[name] = entry
    return out
