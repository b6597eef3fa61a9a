"""Evaluation as in Roth et al. 2018 (METHOD.md section 7): the numbers behind the paper's tables.

Per case and organ: Dice, 95th-percentile Hausdorff distance (HD95), average symmetric
surface distance (ASSD) in mm, and reference/predicted volumes in ml. Over cases: mean, std,
median, min, max per organ and method (Tables 1-2), paired differences (Table 3), the Wilcoxon
signed-rank test between two methods (Table 4), and the recall/false-positive rate of the
stage-2 candidate region C2 as a function of the dilation radius (Fig. 6).

Definitions (also written into every metrics.json so a report explains itself):
- Surfaces are the object voxels with a background face neighbour (SimpleITK `LabelContour`,
  not fully connected); the distance from a surface voxel of A to B is the distance (mm) to
  the nearest surface voxel of B, from SimpleITK's Maurer distance map of B's surface. HD95
  is the 95th percentile and ASSD the mean of the pooled distances of both directions
  (Heimann et al. 2009); HD is their maximum.
- An organ missing from the prediction but present in the reference has Dice 0 and no
  distances; one missing from the reference but predicted has Dice 0; one absent from both
  has no values. Dice zeros count in the statistics, missing distances do not.
- Standard deviations are sample standard deviations (ddof=1; 0 for a single case).
- C2 analysis: C2_k(r) = stage-1 organ k dilated with a ball of radius r voxels (|offset| <= r,
  the engine's ball); recall = |C2_k & R_k| / |R_k|, FPR = |C2_k \\ R_k| / |not R_k| over the
  image, FDR = |C2_k \\ R_k| / |C2_k|. "all" is the engine's C2 (all stage-1 foreground)
  against the reference foreground of all listed organs.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_write
from .errors import UserError
from .evaluation.metrics import count, dice_from_counts
from .io import NAME_SUFFIXES
from .labels import DEFAULT_ORGANS, LabelSet, standard_labels

FORMAT_VERSION = 1
METRICS = ("dice", "hd95_mm", "assd_mm", "hd_mm", "ref_ml", "pred_ml")
TABLE_METRICS = ("dice", "hd95_mm", "assd_mm", "ref_ml", "pred_ml")
METRIC_TITLES = {"dice": "Dice [%]", "hd95_mm": "HD95 [mm]", "assd_mm": "ASSD [mm]",
                 "hd_mm": "Hausdorff [mm]", "ref_ml": "Reference volume [ml]",
                 "pred_ml": "Predicted volume [ml]"}
DEFAULT_RADII = tuple(range(11))
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
    "resampling": "predictions on another grid are resampled onto the reference (nearest)",
    "c2": "C2_k(r) = stage-1 organ k dilated by a ball of radius r voxels; recall=|C2&R|/|R|, "
          "fpr=|C2\\R|/|not R| over the image, fdr=|C2\\R|/|C2|; 'all' = all stage-1 "
          "foreground vs all listed reference organs",
}

_IMAGE_SUFFIXES = NAME_SUFFIXES   # images and Slicer segmentations, as io names cases
_CASE_SUFFIXES = ("_labels", "_label", "_seg", "_segmentation", "_pred", "_prediction", "_gt",
                  "_ref", "_mask")
_IGNORED_SUFFIXES = ("_c1", "_c2", "_probabilities", "_preview")


# --------------------------------------------------------------------------- labels

def resolve_labels(spec: str | None) -> LabelSet:
    """A label set from a CLI option: JSON list (inline or file), model name/path, or names.

    None gives the standard organs (DEFAULT_ORGANS, values 1..10).
    """
    if spec is None or not str(spec).strip():
        return LabelSet.from_names(DEFAULT_ORGANS)
    spec = str(spec).strip()
    from .label_presets import PRESETS  # dataset presets: totalsegmentator, btcv, amos, msd-*

    if spec.lower() in PRESETS:
        from .label_presets import preset_labels

        return preset_labels(spec.lower())
    try:
        if spec.startswith("["):
            return LabelSet.from_json(json.loads(spec))
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return LabelSet.from_json(data["labels"] if isinstance(data, dict) else data)
        if path.is_dir() and (path / "model.json").is_file():
            return LabelSet.from_json(json.loads((path / "model.json").read_text(encoding="utf-8"))["labels"])
        if path.is_file() and path.suffix.lower() == ".zip":
            import zipfile
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "model.json"),
                            None)
                if name is None:
                    raise UserError(f"{path} holds no model.json; pass a model, a JSON label "
                                    "list or comma-separated organ names to --labels")
                return LabelSet.from_json(json.loads(zf.read(name))["labels"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read labels from {spec!r} ({exc}); give a JSON list of "
                        '{"value": .., "name": ..} items, a model, or organ names') from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if "," in spec or all(n in standard_labels() for n in names):
        try:
            return LabelSet.from_names(names)
        except ValueError as exc:
            raise UserError(f"bad --labels {spec!r}: {exc}") from None
    from .model import load_model  # lazy: only needed for model names
    try:
        return load_model(spec).labels
    except UserError:
        raise UserError(f"unknown labels {spec!r}: not a model, a JSON label list or known "
                        "organ names; use e.g. --labels liver,spleen or a model name") from None


# --------------------------------------------------------------------------- images

def read_label_map(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D label map as an unsigned integer image; refuse probability maps and 4D."""
    from .io import read_image  # lazy: keeps `import evaluate` light
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; a label map must be an image file")
    return as_label_map(read_image(path), str(path))


def as_label_map(img: sitk.Image, what: str = "label map") -> sitk.Image:
    """Check that `img` is a 3D integer label map and return it as UInt16 (or UInt32)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{what} is not a 3D single-component label map (dimension "
                        f"{img.GetDimension()}, {img.GetNumberOfComponentsPerPixel()} "
                        "components); export a plain label map (e.g. <case>_labels.nii.gz)")
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UserError(f"{what} has non-integer values (a probability map?); "
                            "pass a label map")
    lo = float(arr.min()) if arr.size else 0.0
    hi = float(arr.max()) if arr.size else 0.0
    if lo < 0:
        raise UserError(f"{what} has negative label values; pass a label map with values >= 0")
    target = sitk.sitkUInt16 if hi < 65536 else sitk.sitkUInt32
    return img if img.GetPixelID() == target else sitk.Cast(img, target)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when `a` and `b` share size, spacing, origin and direction (within float noise)."""
    if a.GetSize() != b.GetSize():
        return False
    sp = np.asarray(b.GetSpacing())
    return (np.allclose(a.GetSpacing(), sp, rtol=1e-5, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4 * float(sp.min()))
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5))


def to_reference_grid(pred: sitk.Image, ref: sitk.Image) -> tuple[sitk.Image, bool]:
    """`pred` on `ref`'s grid (nearest-neighbour resampling when needed); (image, resampled)."""
    if same_grid(pred, ref):
        if pred.GetOrigin() != ref.GetOrigin() or pred.GetSpacing() != ref.GetSpacing() \
                or pred.GetDirection() != ref.GetDirection():
            pred = sitk.Image(pred)
            pred.CopyInformation(ref)
        return pred, False
    out = sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        pred.GetPixelID())
    return out, True


# --------------------------------------------------------------------------- metrics

def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    sl = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return sl[0] if sl else None


def label_boxes(arr: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """value -> bounding box (slices) of every label present in an integer array."""
    if arr.size == 0 or int(arr.max()) == 0:
        return {}
    return {i + 1: sl for i, sl in enumerate(ndimage.find_objects(arr)) if sl is not None}


def _union_box(boxes: Iterable[tuple[slice, ...] | None], shape: Sequence[int],
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
    box = _union_box([_bbox(pred), _bbox(ref)], pred.shape, pad=1)
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


def evaluate_images(pred: sitk.Image, ref: sitk.Image, labels: LabelSet,
                    ref_labels: LabelSet | None = None,
                    distances: bool = True) -> dict[str, Any]:
    """Metrics of every organ of `labels` for one case: {"organs": {name: {...}}, ...}.

    `ref_labels` maps organ names to the reference's values when they differ from the
    prediction's (e.g. a TotalSegmentator reference); organs it lacks are skipped.
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
    organs: dict[str, Any] = {}
    for lab in labels:
        try:
            rv = ref_labels.by_name(lab.name).value
        except KeyError:
            continue
        box = _union_box([p_boxes.get(lab.value), r_boxes.get(rv)], p_arr.shape, pad=1)
        if box is None:
            box = (slice(0, 0),) * 3
        organs[lab.name] = organ_metrics(p_arr[box] == lab.value, r_arr[box] == rv, spacing,
                                         distances)
    return {"organs": organs, "resampled": resampled,
            "grid": {"size": list(ref.GetSize()), "spacing": list(spacing)}}


# --------------------------------------------------------------------------- cases

def case_key(path: str | os.PathLike) -> str:
    """Case name used to match predictions and references: the file name without image
    extension and without one trailing _labels/_seg/_pred/_gt/... suffix."""
    name = Path(path).name
    low = name.lower()
    for suf in _IMAGE_SUFFIXES:
        if low.endswith(suf):
            name = name[: -len(suf)]
            break
    for suf in _CASE_SUFFIXES:
        if name.lower().endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_IMAGE_SUFFIXES)


def _rank(path: Path) -> int:
    """Preference when several files of one folder map to one case (lower wins)."""
    low = path.name.lower()
    if low.endswith(".seg.nrrd"):
        return 3
    stem = low
    for suf in _IMAGE_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    if stem.endswith("_labels"):
        return 0
    if case_key(path).lower() == stem:
        return 1
    return 2


def list_cases(folder: Path) -> dict[str, Path]:
    """case name -> label-map file of a folder (candidate masks, probabilities ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not _is_image_file(path):
            continue
        stem = path.name
        for suf in _IMAGE_SUFFIXES:
            if stem.lower().endswith(suf):
                stem = stem[: -len(suf)]
                break
        if stem.lower().endswith(_IGNORED_SUFFIXES):
            continue
        key = case_key(path)
        if key not in found or _rank(path) < _rank(found[key]):
            found[key] = path
    return found


def match_cases(pred: str | os.PathLike, ref: str | os.PathLike
                ) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair predictions with references by case name.

    Returns (pairs [(case, pred_path, ref_path)], unmatched prediction cases, unmatched
    reference cases). Two files are one pair whatever their names.
    """
    pred, ref = Path(pred), Path(ref)
    for p in (pred, ref):
        if not p.exists():
            raise UserError(f"not found: {p}")
    if pred.is_file() and ref.is_file():
        return [(case_key(ref), pred, ref)], [], []
    if pred.is_file() != ref.is_file():
        raise UserError("give two label-map files or two folders of them (got a file and a "
                        "folder)")
    p_cases, r_cases = list_cases(pred), list_cases(ref)
    pairs = [(c, p_cases[c], r_cases[c]) for c in sorted(r_cases) if c in p_cases]
    if not pairs:
        raise UserError(f"no case of {pred} matches a reference in {ref} by file name "
                        f"({len(p_cases)} predictions, {len(r_cases)} references); name them "
                        "<case>.nii.gz or <case>_labels.nii.gz on both sides")
    return (pairs, sorted(set(p_cases) - set(r_cases)), sorted(set(r_cases) - set(p_cases)))


def _progress(iterable, total: int, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="case", disable=None)


def evaluate_pairs(pairs: Sequence[tuple[str, Path, Path]], labels: LabelSet,
                   ref_labels: LabelSet | None = None, distances: bool = True,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate matched files: {case: {"prediction", "reference", "organs", ...}}."""
    cases: dict[str, Any] = {}
    for case, p, r in _progress(pairs, len(pairs), "evaluate", progress):
        res = evaluate_images(read_label_map(p), read_label_map(r), labels, ref_labels,
                              distances)
        cases[case] = {"prediction": str(p), "reference": str(r), **res}
    return cases


# --------------------------------------------------------------------------- statistics

def describe(values: Iterable[float | None]) -> dict[str, Any]:
    """n, mean, std (ddof=1), median, min, max of the non-missing values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def organ_names(cases: Mapping[str, Any]) -> list[str]:
    """Organs in first-seen order over the cases."""
    names: list[str] = []
    for c in cases.values():
        for n in c["organs"]:
            if n not in names:
                names.append(n)
    return names


def values(cases: Mapping[str, Any], organ: str, metric: str) -> dict[str, float | None]:
    """case -> value of `metric` for `organ` (None where missing)."""
    return {case: c["organs"].get(organ, {}).get(metric) for case, c in cases.items()}


def summarize(cases: Mapping[str, Any], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """{organ: {metric: describe(...), "status": {status: count}}}, plus "all" (pooled)."""
    out: dict[str, Any] = {}
    organs = organ_names(cases)
    for organ in organs:
        entry: dict[str, Any] = {m: describe(values(cases, organ, m).values()) for m in metrics}
        status: dict[str, int] = {}
        for c in cases.values():
            s = c["organs"].get(organ, {}).get("status")
            if s:
                status[s] = status.get(s, 0) + 1
        entry["status"] = status
        out[organ] = entry
    out["all"] = {m: describe(v for o in organs for v in values(cases, o, m).values())
                  for m in metrics}
    return out


def paired(a: Mapping[str, Any], b: Mapping[str, Any], organ: str,
           metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Cases where both methods have a value for `organ`; (cases, values A, values B)."""
    va, vb = values(a, organ, metric), values(b, organ, metric)
    cases = [c for c in va if c in vb and va[c] is not None and vb[c] is not None]
    return (cases, np.asarray([va[c] for c in cases], np.float64),
            np.asarray([vb[c] for c in cases], np.float64))


def difference_table(a: Mapping[str, Any], b: Mapping[str, Any],
                     metric: str = "dice") -> dict[str, Any]:
    """Per organ statistics of the paired differences B - A (e.g. stage 2 - stage 1)."""
    organs = [o for o in organ_names(a) if o in organ_names(b)]
    diffs = {}
    for o in organs:
        _, xa, xb = paired(a, b, o, metric)
        diffs[o] = (xb - xa).tolist()
    out = {o: describe(d) for o, d in diffs.items()}
    out["all"] = describe(v for d in diffs.values() for v in d)
    return out


def wilcoxon_test(xs: npt.ArrayLike, ys: npt.ArrayLike) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired samples (scipy defaults)."""
    from scipy.stats import wilcoxon
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size == 0:
        return {"n": 0, "statistic": None, "p_value": None, "note": "no paired cases"}
    if np.all(x == y):
        return {"n": int(x.size), "statistic": 0.0, "p_value": 1.0,
                "note": "all differences are zero"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = wilcoxon(x, y)
    p = float(res.pvalue)
    return {"n": int(x.size), "statistic": float(res.statistic),
            "p_value": None if math.isnan(p) else p}


def compare_methods(a: Mapping[str, Any], b: Mapping[str, Any], metric: str = "dice",
                    alpha: float = 0.05) -> dict[str, Any]:
    """Per organ: means, paired difference and Wilcoxon p-value of B vs A (paper Table 4)."""
    out: dict[str, Any] = {}
    organs = [o for o in organ_names(a) if o in organ_names(b)]
    for organ in organs + ["all"]:
        if organ == "all":
            xa = np.concatenate([paired(a, b, o, metric)[1] for o in organs] or [np.zeros(0)])
            xb = np.concatenate([paired(a, b, o, metric)[2] for o in organs] or [np.zeros(0)])
        else:
            _, xa, xb = paired(a, b, organ, metric)
        test = wilcoxon_test(xa, xb)
        p = test["p_value"]
        sig = p is not None and p < alpha
        better = None
        if sig:
            from scipy.stats import rankdata

            higher_is_better = metric == "dice"
            # The test ranks only the nonzero differences (scipy's default zero_method), so the
            # winner is the side of the larger signed-rank sum, never "none" when it is significant.
            diff = (xb - xa)[(xb - xa) != 0]
            ranks = rankdata(np.abs(diff))
            d = float(ranks[diff > 0].sum() - ranks[diff < 0].sum())
            better = ("B" if (d > 0) == higher_is_better else "A") if d != 0 else None
        out[organ] = {**test, "mean_a": float(xa.mean()) if xa.size else None,
                      "mean_b": float(xb.mean()) if xb.size else None,
                      "median_diff": float(np.median(xb - xa)) if xa.size else None,
                      "significant": bool(sig), "mark": "*" if sig else "",
                      "better": better}
    return out


# --------------------------------------------------------------------------- C2 analysis

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
            s_box = _union_box(s_boxes.values(), shape, pad=0)
            r_box = _union_box([r_boxes.get(v) for v in ref_values], shape, pad=0)
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
        box = _union_box([s_box], shape, pad=rmax + 1) if n_s else None
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
    for case, p, r in _progress(pairs, len(pairs), "candidates", progress):
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


# --------------------------------------------------------------------------- tables

def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "dice":
        return f"{100.0 * value:.1f}"
    if metric in ("p_value",):
        return f"{value:.3g}"
    return f"{value:.2f}" if metric.endswith("_mm") else f"{value:.1f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


STAT_KEYS = ("mean", "std", "median", "min", "max")


def stats_markdown(methods: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """Tables 1-2 of the paper: organs x (mean, std, median, min, max) for each method.

    `methods`: name -> summary (from `summarize`).
    """
    organs: list[str] = []
    for s in methods.values():
        organs += [o for o in s if o not in organs and o != "all"]
    organs.append("all")
    header = ["Organ"]
    for name in methods:
        prefix = f"{name} " if len(methods) > 1 else ""
        header += [prefix + k.capitalize() for k in STAT_KEYS] + [prefix + "n"]
    rows = []
    for organ in organs:
        row = [organ if organ != "all" else "**all (pooled)**"]
        for s in methods.values():
            d = s.get(organ, {}).get(metric) or describe([])
            row += [_fmt(d[k], metric) for k in STAT_KEYS] + [str(d["n"])]
        rows.append(row)
    return f"### {METRIC_TITLES.get(metric, metric)}\n\n" + _md_table(header, rows)


def difference_markdown(diff: Mapping[str, Any], metric: str, a: str, b: str) -> str:
    """Table 3: statistics of the per-case differences B - A."""
    header = ["Organ"] + [k.capitalize() for k in STAT_KEYS] + ["n"]
    rows = [[o if o != "all" else "**all (pooled)**"] + [_fmt(d[k], metric) for k in STAT_KEYS]
            + [str(d["n"])] for o, d in diff.items()]
    return (f"### {METRIC_TITLES.get(metric, metric)}: {b} minus {a}\n\n"
            + _md_table(header, rows))


def compare_markdown(result: Mapping[str, Any], metric: str, a: str, b: str,
                     alpha: float) -> str:
    """Table 4: means of both methods, Wilcoxon p-values; the significantly better in bold."""
    header = ["Organ", f"{a} mean", f"{b} mean", "median diff (B-A)", "n", "W", "p", "sig"]
    rows = []
    for organ, r in result.items():
        ma, mb = _fmt(r["mean_a"], metric), _fmt(r["mean_b"], metric)
        if r["better"] == "A":
            ma = f"**{ma}**"
        elif r["better"] == "B":
            mb = f"**{mb}**"
        rows.append([organ if organ != "all" else "**all (pooled)**", ma, mb,
                     _fmt(r["median_diff"], metric), str(r["n"]),
                     "-" if r["statistic"] is None else f"{r['statistic']:g}",
                     _fmt(r["p_value"], "p_value"), r["mark"]])
    return (f"### {METRIC_TITLES.get(metric, metric)}: {a} vs {b} (Wilcoxon signed-rank, "
            f"two-sided; * p < {alpha:g}, better method in bold)\n\n" + _md_table(header, rows))


def candidates_markdown(mean: Mapping[str, Any]) -> str:
    """Fig. 6 as a table: recall / FPR per organ (rows) and radius (columns), percent."""
    parts = []
    for key, title in (("recall", "Recall [%]"), ("fpr", "False-positive rate [%]"),
                       ("fdr", "False-discovery rate [%] (share of C2 outside the organ)")):
        radii = next(iter(mean.values()))["radii"] if mean else []
        header = ["Organ"] + [f"r={r}" for r in radii]
        rows = [[o] + ["-" if v is None else f"{100 * v:.2f}" for v in e[key]]
                for o, e in mean.items()]
        parts.append(f"### {title}\n\n" + _md_table(header, rows))
    return "\n".join(parts)


def per_case_csv(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Long CSV: method, case, organ, status and every metric."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "case", "organ", "status", *METRICS])
    for mname, cases in methods.items():
        for case, c in cases.items():
            for organ, m in c["organs"].items():
                w.writerow([mname, case, organ, m.get("status", "")]
                           + ["" if m.get(k) is None else repr(float(m[k])) for k in METRICS])
    return buf.getvalue()


def summary_csv(summaries: Mapping[str, Mapping[str, Any]],
                metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Long CSV: method, organ, metric, n, mean, std, median, min, max."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "organ", "metric", "n", *STAT_KEYS])
    for mname, s in summaries.items():
        for organ, e in s.items():
            for metric in metrics:
                d = e.get(metric)
                if d is None:
                    continue
                w.writerow([mname, organ, metric, d["n"]]
                           + ["" if d[k] is None else repr(d[k]) for k in STAT_KEYS])
    return buf.getvalue()


def rows_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def difference_csv(diff: Mapping[str, Any]) -> str:
    return rows_csv(["organ", "n", *STAT_KEYS],
                    ([o, d["n"], *[d[k] for k in STAT_KEYS]] for o, d in diff.items()))


def compare_csv(result: Mapping[str, Any]) -> str:
    keys = ["n", "mean_a", "mean_b", "median_diff", "statistic", "p_value", "significant",
            "better"]
    return rows_csv(["organ", *keys], ([o, *[r[k] for k in keys]] for o, r in result.items()))


def candidates_csv(mean: Mapping[str, Any]) -> str:
    rows = []
    for organ, e in mean.items():
        for i, r in enumerate(e["radii"]):
            rows.append([organ, r, e["recall"][i], e["fpr"][i], e["fdr"][i],
                         e["c2_fraction"][i]])
    return rows_csv(["organ", "radius", "recall", "fpr", "fdr", "c2_fraction"], rows)


# --------------------------------------------------------------------------- reports

def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, paths to str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(_clean(obj), indent=1) + "\n")


def _header(kind: str, labels: LabelSet, **extra: Any) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labels": labels.to_json(),
            "definitions": DEFINITIONS, **extra}


def _finish_report(report_dir: Path, markdown_name: str, doc: dict[str, Any], md: list[str], files: list[str],
                   make: Callable[[Any], list[str]] | None) -> dict[str, Any]:
    """Draw the plots (if asked and possible), then write the Markdown and metrics.json."""
    if make is not None:
        written, warn = _plots(report_dir, make)
        files += written
        if warn:
            doc["warnings"] = [warn]
        md += [f"![{f}]({f})\n" for f in written]
    doc["files"] = files
    atomic_write(report_dir / markdown_name, "\n".join(md))
    write_json(report_dir / "metrics.json", doc)
    return doc


def _plots(report_dir: Path, make: Callable[[Any], list[str]]) -> tuple[list[str], str | None]:
    """Run plotting code when matplotlib is installed; (written files, warning)."""
    try:
        from . import report_plots
        report_plots.require_matplotlib()
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install cascadeseg[eval])"
    return make(report_plots), None


def organ_colors(labels: LabelSet) -> dict[str, tuple[float, float, float]]:
    return {lab.name: lab.color_float for lab in labels}


def write_evaluation_report(report_dir: str | os.PathLike, methods: Mapping[str, Any],
                            labels: LabelSet, *, kind: str = "evaluation",
                            extra: Mapping[str, Any] | None = None,
                            extra_markdown: str = "",
                            plots: bool = True) -> dict[str, Any]:
    """metrics.json, summary.md/.csv, per_case.csv and box plots for one or more methods.

    `methods`: name -> cases (from `evaluate_pairs`). Returns the metrics.json object.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(cases) for name, cases in methods.items()}
    doc = _header(kind, labels, **(extra or {}))
    doc["methods"] = {name: {"cases": cases, "summary": summaries[name]}
                      for name, cases in methods.items()}
    md = [f"# CascadeSeg {kind} report\n",
          f"Cases: {', '.join(f'{n}: {len(c)}' for n, c in methods.items())}. "
          "Dice in percent; distances in mm; volumes in ml. Definitions in metrics.json.\n"]
    for metric in TABLE_METRICS:
        md.append(stats_markdown(summaries, metric))
    missing = [(n, case, organ, m["status"]) for n, cases in methods.items()
               for case, c in cases.items() for organ, m in c["organs"].items()
               if m.get("status") in ("missing_in_prediction", "missing_in_reference")]
    if missing:
        md.append("### Missing organs\n\n" + _md_table(
            ["Method", "Case", "Organ", "Status"], [list(r) for r in missing]))
    resampled = [case for cases in methods.values() for case, c in cases.items()
                 if c.get("resampled")]
    if resampled:
        md.append("Resampled onto the reference grid (nearest neighbour): "
                  + ", ".join(sorted(set(resampled))) + "\n")
    if extra_markdown:
        md.append(extra_markdown)
    files = ["metrics.json", "summary.md", "summary.csv", "per_case.csv"]
    atomic_write(report_dir / "summary.csv", summary_csv(summaries))
    atomic_write(report_dir / "per_case.csv", per_case_csv(methods))
    colors = organ_colors(labels)

    def make(rp: Any) -> list[str]:
        out = []
        for metric in ("dice", "hd95_mm", "assd_mm"):
            data = {name: {o: [v for v in values(cases, o, metric).values() if v is not None]
                           for o in organ_names(cases)} for name, cases in methods.items()}
            if not any(v for d in data.values() for v in d.values()):
                continue
            scale = 100.0 if metric == "dice" else 1.0
            data = {n: {o: [scale * x for x in v] for o, v in d.items()}
                    for n, d in data.items()}
            fname = f"boxplot_{metric.replace('_mm', '')}.png"
            rp.boxplot_by_organ(data, report_dir / fname, ylabel=METRIC_TITLES[metric],
                                title=f"{METRIC_TITLES[metric]} per organ", colors=colors)
            out.append(fname)
        vol = {name: [(o, c["organs"][o]["ref_ml"], c["organs"][o]["pred_ml"])
                      for c in cases.values() for o in c["organs"]]
               for name, cases in methods.items()}
        rp.volume_scatter(vol, report_dir / "volumes.png", colors=colors)
        out.append("volumes.png")
        return out

    return _finish_report(report_dir, "summary.md", doc, md, files, make if plots else None)


def load_method(spec: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(method name, cases) from `metrics.json`, a report folder, or `PATH#METHOD`."""
    text = str(spec)
    method = None
    if "#" in text and not Path(text).exists():
        text, method = text.rsplit("#", 1)
    path = Path(text)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise UserError(f"no metrics.json at {text}; run `cascadeseg evaluate` first or pass "
                        "--ref to evaluate prediction folders")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        methods = doc["methods"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a CascadeSeg metrics.json") from None
    if method is None:
        if len(methods) != 1:
            raise UserError(f"{path} holds methods {', '.join(methods)}; choose one with "
                            f"{path}#<method>")
        method = next(iter(methods))
    if method not in methods:
        raise UserError(f"{path} has no method {method!r} (it has {', '.join(methods)})")
    return method, methods[method]["cases"]


def write_comparison_report(report_dir: str | os.PathLike, a: tuple[str, Mapping[str, Any]],
                            b: tuple[str, Mapping[str, Any]], labels: LabelSet | None = None,
                            metric: str = "dice", alpha: float = 0.05,
                            kind: str = "comparison", extra: Mapping[str, Any] | None = None,
                            extra_markdown: str = "", plots: bool = True,
                            extra_plots: Callable[[Any], list[str]] | None = None
                            ) -> dict[str, Any]:
    """Wilcoxon table (Table 4), differences (Table 3) and paired box plots for A vs B."""
    report_dir = Path(report_dir)
    (na, ca), (nb, cb) = a, b
    if na == nb:
        na, nb = f"A:{na}", f"B:{nb}"
    organs = [o for o in organ_names(ca) if o in organ_names(cb)]
    if labels is None:
        labels = LabelSet.from_json([{"value": i + 1, "name": o} for i, o in enumerate(organs)])
    result = compare_methods(ca, cb, metric, alpha)
    diff = difference_table(ca, cb, metric)
    doc = _header(kind, labels, metric=metric, alpha=alpha, method_a=na, method_b=nb,
                  test="scipy.stats.wilcoxon two-sided, zero_method='wilcox'",
                  **(extra or {}))
    doc["wilcoxon"] = result
    doc["difference"] = diff
    doc["methods"] = {na: {"cases": ca, "summary": summarize(ca)},
                      nb: {"cases": cb, "summary": summarize(cb)}}
    md = [f"# CascadeSeg {kind}: {na} vs {nb}\n",
          compare_markdown(result, metric, na, nb, alpha),
          difference_markdown(diff, metric, na, nb),
          stats_markdown({na: doc["methods"][na]["summary"],
                          nb: doc["methods"][nb]["summary"]}, metric)]
    if extra_markdown:
        md.append(extra_markdown)
    atomic_write(report_dir / "compare.csv", compare_csv(result))
    atomic_write(report_dir / "difference.csv", difference_csv(diff))
    atomic_write(report_dir / "per_case.csv", per_case_csv({na: ca, nb: cb}))
    files = ["metrics.json", "compare.md", "compare.csv", "difference.csv", "per_case.csv"]

    def make(rp: Any) -> list[str]:
        scale = 100.0 if metric == "dice" else 1.0
        data = {n: {o: [scale * v for v in values(c, o, metric).values() if v is not None]
                    for o in organs} for n, c in ((na, ca), (nb, cb))}
        marks = {o: result[o]["mark"] for o in organs}
        fname = f"boxplot_{metric.replace('_mm', '')}.png"
        rp.boxplot_by_organ(data, report_dir / fname, ylabel=METRIC_TITLES.get(metric, metric),
                            title=f"{na} vs {nb} (* p < {alpha:g}, Wilcoxon)", marks=marks)
        return [fname] + (extra_plots(rp) if extra_plots else [])

    return _finish_report(report_dir, "compare.md", doc, md, files, make if plots else None)


def write_candidates_report(report_dir: str | os.PathLike, result: Mapping[str, Any],
                            labels: LabelSet, mark_radius: int | None = 3,
                            extra: Mapping[str, Any] | None = None,
                            plots: bool = True) -> dict[str, Any]:
    """Fig. 6: candidates.json-style metrics.json, tables and recall/FPR curves."""
    report_dir = Path(report_dir)
    doc = _header("candidates", labels, **(extra or {}))
    doc.update(result)
    md = ["# CascadeSeg candidate-region analysis (C2 vs dilation radius)\n",
          f"Cases: {len(result['cases'])}. Mean over cases.\n",
          candidates_markdown(result["mean"])]
    atomic_write(report_dir / "candidates.csv", candidates_csv(result["mean"]))
    files = ["metrics.json", "candidates.md", "candidates.csv"]
    colors = organ_colors(labels)

    def make(rp: Any) -> list[str]:
        rp.candidate_curves(result["mean"], report_dir / "candidates.png", colors=colors,
                            mark_radius=mark_radius)
        return ["candidates.png"]

    return _finish_report(report_dir, "candidates.md", doc, md, files, make if plots else None)


# --------------------------------------------------------------------------- experiments

def match_ct_cases(ct: str | os.PathLike, ref: str | os.PathLike
                   ) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair CTs (files or DICOM folders) with reference label maps by case name.

    CT and references may share one folder (`<case>.nii.gz` + `<case>_seg.nii.gz`).
    """
    from .io import case_name, find_images, is_dicom_folder
    ct, ref = Path(ct), Path(ref)
    if not ct.exists() or not ref.exists():
        raise UserError(f"not found: {ct if not ct.exists() else ref}")
    if ref.is_file() or ct.is_file():
        if not ref.is_file() or (ct.is_dir() and not is_dicom_folder(ct)):
            raise UserError("give a CT (file or DICOM folder) with one reference label map, or "
                            "a folder of CTs with a folder of label maps")
        return [(case_key(ref), ct, ref)], [], []
    cts = {case_name(p): p for p in find_images(ct)}
    refs = list_cases(ref)
    if ct.resolve() == ref.resolve():  # one folder: references carry a label suffix
        refs = {}
        for p in sorted(ref.iterdir()):
            if p.name.startswith(".") or not _is_image_file(p):
                continue
            key = case_key(p)
            if key != case_name(p) and key in cts:
                refs.setdefault(key, p)
        cts = {k: v for k, v in cts.items() if k in refs or k not in
               {case_name(p) for p in refs.values()}}
    pairs = [(c, cts[c], refs[c]) for c in sorted(refs) if c in cts and cts[c] != refs[c]]
    if not pairs:
        raise UserError(f"no CT in {ct} matches a reference label map in {ref} by name; name "
                        "them <case>.nii.gz and <case>.nii.gz (or <case>_seg.nii.gz)")
    paired_cases = {c for c, _, _ in pairs}
    return (pairs, sorted(set(cts) - paired_cases - {case_name(p) for p in refs.values()}),
            sorted(set(refs) - paired_cases))


def _mean_timings(timings: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys: list[str] = []
    for t in timings.values():
        keys += [k for k in t if k not in keys]
    return {k: float(np.mean([t[k] for t in timings.values() if k in t])) for k in keys}


def _timing_markdown(methods: Mapping[str, Mapping[str, float]]) -> str:
    keys: list[str] = []
    for t in methods.values():
        keys += [k for k in t if k not in keys]
    rows = [[m] + [f"{t[k]:.2f}" if k in t else "-" for k in keys] for m, t in methods.items()]
    return "### Mean time per case [s]\n\n" + _md_table(["Run", *keys], rows)


def _preload(segmenters: Iterable[Any], n_stages: int) -> None:
    """Load the networks before timing, so the first case does not pay for it."""
    for seg in segmenters:
        for i in range(n_stages):
            seg.network(i)


def _save_prediction(folder: Path, name: str, image: sitk.Image) -> None:
    from .io import write_image
    folder.mkdir(parents=True, exist_ok=True)
    write_image(image, folder / f"{name}.nii.gz", overwrite=True)


def run_stages_experiment(model: Any, ct: str | os.PathLike, ref: str | os.PathLike,
                          report_dir: str | os.PathLike, device: str = "auto",
                          overlap: float = 0.0, ref_labels: LabelSet | None = None,
                          radii: Sequence[int] = DEFAULT_RADII, alpha: float = 0.05,
                          save_predictions: bool = False, progress: bool = True,
                          plots: bool = True) -> dict[str, Any]:
    """Stage 1 vs stage 2 on CT/reference pairs (Tables 1-3, Fig. 5) and the C2 curves of
    the same stage-1 results on the stage-2 grid (Fig. 6), in one report."""
    from .cascade import Segmenter
    from .io import read_image
    if len(model.stages) < 2:
        raise UserError(f"model {model.name} has one stage; stage 1 vs stage 2 needs a cascade")
    pairs, _, missing = match_ct_cases(ct, ref)
    report_dir = Path(report_dir)
    labels = model.labels
    seg = Segmenter(model, device, overlap=overlap, keep_stage1=True)
    _preload([seg], len(model.stages))
    s1: dict[str, Any] = {}
    s2: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    timings: dict[str, dict[str, float]] = {}
    for case, ct_path, ref_path in _progress(pairs, len(pairs), "stages", progress):
        ref_img = read_label_map(ref_path)
        res = seg.segment(read_image(ct_path))
        stage1 = res.stage1_labels
        if stage1 is None:
            raise RuntimeError("the segmenter kept no stage-1 labels (keep_stage1)")
        for store, img in ((s1, stage1), (s2, res.labels)):
            store[case] = {"prediction": str(ct_path), "reference": str(ref_path),
                           **evaluate_images(img, ref_img, labels, ref_labels)}
        curves[case] = candidate_curves(stage1, ref_img, labels, ref_labels, radii,
                                        spacing=model.stages[1].spacing)
        timings[case] = dict(res.timings)
        if save_predictions:
            _save_prediction(report_dir / "predictions", f"{case}_stage1_labels", stage1)
            _save_prediction(report_dir / "predictions", f"{case}_labels", res.labels)
    cand: dict[str, Any] = {"cases": curves, "mean": mean_curves(curves), "radii": sorted(set(radii))}
    summaries = {"stage1": summarize(s1), "stage2": summarize(s2)}
    md = ["## Tables 1-2: all metrics per stage\n"]
    md += [stats_markdown(summaries, m) for m in TABLE_METRICS if m != "dice"]
    md.append(f"## Fig. 6: C2 of stage 1 on the stage-2 grid "
              f"({'x'.join(f'{v:g}' for v in model.stages[1].spacing)} mm), model radius "
              f"r = {model.dilation_radius}\n")
    md.append(candidates_markdown(cand["mean"]))
    md.append(_timing_markdown({"cascade": _mean_timings(timings)}))
    atomic_write(report_dir / "candidates.csv", candidates_csv(cand["mean"]))
    colors = organ_colors(labels)

    def extra_plots(rp: Any) -> list[str]:
        rp.candidate_curves(cand["mean"], report_dir / "candidates.png", colors=colors,
                            mark_radius=model.dilation_radius)
        return ["candidates.png"]

    extra = {"model": {"name": model.name, "version": model.version,
                       "dilation_radius": model.dilation_radius},
             "device": str(seg.device), "overlap": overlap, "timings": timings,
             "mean_timings": _mean_timings(timings), "candidates": cand,
             "unmatched_references": missing}
    return write_comparison_report(report_dir, ("stage1", s1), ("stage2", s2), labels,
                                   "dice", alpha, kind="experiment-stages", extra=extra,
                                   extra_markdown="\n".join(md), plots=plots,
                                   extra_plots=extra_plots)


def run_overlap_experiment(model: Any, ct: str | os.PathLike, ref: str | os.PathLike,
                           report_dir: str | os.PathLike, device: str = "auto",
                           overlap: float = 0.37, ref_labels: LabelSet | None = None,
                           alpha: float = 0.05, save_predictions: bool = False,
                           progress: bool = True, plots: bool = True) -> dict[str, Any]:
    """Non-overlapping vs overlapping stage-2 tiles: Dice, Wilcoxon and time (paper: +1 Dice
    on pancreas/spleen at ~1.2x the time)."""
    from .cascade import Segmenter
    from .io import read_image
    if overlap <= 0:
        raise UserError("--overlap must be > 0 (e.g. 0.37: each voxel covered ~4 times)")
    pairs, _, missing = match_ct_cases(ct, ref)
    report_dir = Path(report_dir)
    labels = model.labels
    runs = {"non-overlapping": Segmenter(model, device, overlap=0.0),
            "overlapping": Segmenter(model, device, overlap=overlap)}
    results: dict[str, dict[str, Any]] = {k: {} for k in runs}
    timings: dict[str, dict[str, dict[str, float]]] = {k: {} for k in runs}
    _preload(runs.values(), len(model.stages))
    for i, (case, ct_path, ref_path) in enumerate(
            _progress(pairs, len(pairs), "overlap", progress)):
        ref_img = read_label_map(ref_path)
        image = read_image(ct_path)
        order = list(runs.items())
        for name, seg in (order if i % 2 == 0 else order[::-1]):  # alternate: fair caches
            res = seg.segment(image)
            results[name][case] = {"prediction": str(ct_path), "reference": str(ref_path),
                                   **evaluate_images(res.labels, ref_img, labels, ref_labels)}
            timings[name][case] = dict(res.timings)
            if save_predictions:
                _save_prediction(report_dir / "predictions", f"{case}_{name}_labels",
                                 res.labels)
    mean_t = {k: _mean_timings(v) for k, v in timings.items()}
    ratio = {}
    for key in ("stage2", "total"):
        a, b = mean_t["non-overlapping"].get(key), mean_t["overlapping"].get(key)
        ratio[key] = b / a if a and b else None
    md = [_timing_markdown(mean_t),
          "Time ratio overlapping / non-overlapping: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items() if v) + "\n"]

    def extra_plots(rp: Any) -> list[str]:
        rp.bar_chart({k: {s: v for s, v in t.items() if s in ("stage1", "stage2", "total")}
                      for k, t in mean_t.items()}, report_dir / "timings.png",
                     ylabel="seconds per case", title="Time per case")
        return ["timings.png"]

    extra = {"model": {"name": model.name, "version": model.version},
             "device": str(runs["overlapping"].device), "overlap": overlap,
             "timings": timings, "mean_timings": mean_t, "time_ratio": ratio,
             "unmatched_references": missing}
    return write_comparison_report(report_dir, ("non-overlapping", results["non-overlapping"]),
                                   ("overlapping", results["overlapping"]), labels, "dice",
                                   alpha, kind="experiment-overlap", extra=extra,
                                   extra_markdown="\n".join(md), plots=plots,
                                   extra_plots=extra_plots)
