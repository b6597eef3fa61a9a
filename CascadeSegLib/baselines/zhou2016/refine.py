"""Iterative coarse-to-fine refinement of Zhou et al. 2016 (docs/method.md section 8) for any package.

Per organ: take the bounding box of the current mask plus a margin (15 voxels at test time),
re-run the fine (stage-2) network over that box only, take the organ's new mask inside the box,
and repeat until the Dice between two successive masks exceeds `tol` (0.95) or `max_iter` (10)
iterations ran. Unlike the cascade's stage 2, which only labels voxels inside C2 (stage-1
foreground dilated by r = 3), the box lets the organ grow where stage 1 missed it, and the
tiles are placed on the organ rather than on all organs' C2. A 3D cascade's stage 2 was trained
only inside C2, so with it each iteration trusts the network only within r voxels of the
current mask (the organ grows by at most r per iteration, up to the box): over whole boxes its
untrained output far from organs had taken the demo model's liver from Dice 0.91 to 0.43.

The box is a candidate mask for the stage's usual predictor, so the network sees real image
context around the box (a valid-convolution network needs it) and 2D three-view packages refine
with their fine FCNs in exactly the same way. "Oracle" mode starts from the reference organ's
box instead of the prediction's: the upper bound Zhou et al. report.

Geometry: the work happens on the stage-2 grid; only the refined organs are written back onto
the input grid, every other organ keeps its voxels exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ...errors import UserError
from ...evaluation.metrics import dice
from ...inference import preprocess
from ...inference.cascade import SegmentationResult, resample_labels_to
from ...inference.predictor import Predictor, StagePredictor, make_predictor
from ...labels import LabelSet
from ...packaging.model import ModelPackage

TEST_MARGIN = 15   # Zhou et al.: 15 voxels at test time (10-20 at random in training, see baseline2d)


@dataclass
class RefinementResult:
    """Refined labels on the input grid, with what each organ's iteration did."""

    labels: sitk.Image
    iterations: dict[str, int] = field(default_factory=dict)      # network runs per organ
    seconds: float = 0.0
    converged: dict[str, bool] = field(default_factory=dict)      # stopped by the Dice rule
    dice_history: dict[str, list[float]] = field(default_factory=dict)  # DSC(S_{t-1}, S_t)
    seconds_per_organ: dict[str, float] = field(default_factory=dict)
    boxes: dict[str, list[list[int]]] = field(default_factory=dict)     # final box, stage-2 grid (z, y, x)
    oracle: bool = False
    cycled: list[str] = field(default_factory=list)   # stopped early: the masks alternated between two

    def to_json(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "converged": self.converged, "seconds": round(self.seconds, 3),
                "seconds_per_organ": {k: round(v, 3) for k, v in self.seconds_per_organ.items()},
                "dice_history": {k: [round(d, 5) for d in v] for k, v in self.dice_history.items()},
                "boxes_zyx": self.boxes, "oracle": self.oracle, "cycled": self.cycled}


def box_mask(mask: torch.Tensor, margin: int) -> tuple[torch.Tensor, list[tuple[int, int]]] | None:
    """(boolean box of `mask` grown by `margin` voxels and clipped, [(start, stop)] per axis)."""
    box = preprocess.bounding_box(mask, pad=int(margin), shape=mask.shape)
    if box is None:
        return None
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[tuple(slice(a, b) for a, b in box)] = True
    return out, box


def _predictor(predictor_or_model: StagePredictor | ModelPackage, device: str | torch.device) -> StagePredictor:
    if isinstance(predictor_or_model, ModelPackage):
        return make_predictor(predictor_or_model, device)
    return predictor_or_model


def resolve_organs(organs: str | Sequence[str] | None, labels: LabelSet) -> list[str] | None:
    """Organ names from a list or 'liver,spleen' (None or 'all': every organ of the model)."""
    if organs is None:
        return None
    names = [n.strip() for n in organs.split(",")] if isinstance(organs, str) else [str(n).strip() for n in organs]
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return None
    unknown = [n for n in names if n not in labels.names]
    if unknown:
        raise UserError(f"unknown organ(s) {', '.join(unknown)} for this model; choose from {', '.join(labels.names)}")
    return names


def refine(segmenter_or_model: StagePredictor | ModelPackage, image: sitk.Image,
           result: SegmentationResult | sitk.Image, organs: str | Sequence[str] | None = None,
           margin: int = TEST_MARGIN, max_iter: int = 10, tol: float = 0.95,
           oracle: sitk.Image | None = None, oracle_labels: LabelSet | None = None,
           device: str | torch.device = "auto",
           progress: Callable[[str, float, str], None] | None = None) -> RefinementResult:
    """Refine a segmentation of `image` organ by organ with the package's fine network.

    `segmenter_or_model` is any `StagePredictor` (the one that segmented, so its device and
    settings are reused) or a package, for which `make_predictor` builds one on `device`.

    `result` is the cascade's result (or its label map on the input grid). `oracle` is a
    reference label map (any grid; values of `oracle_labels`, default the model's): each organ
    then starts from its reference box. Organs absent from the start mask are left as they are.
    """
    if max_iter < 1:
        raise UserError("--max-iter must be at least 1")
    if not 0.0 < tol <= 1.0:
        raise UserError("--tol must be in (0, 1], e.g. 0.95")
    if margin < 0:
        raise UserError("--margin must be >= 0 voxels")
    seg = _predictor(segmenter_or_model, device)
    model = seg.model
    if len(model.stages) < 2:
        raise UserError(f"model {model.name} has one stage; refinement re-runs the fine (stage-2) network, "
                        "so it needs a two-stage model")
    start = time.perf_counter()
    labels_in = result.labels if isinstance(result, SegmentationResult) else result
    if labels_in.GetSize() != image.GetSize():
        raise UserError(f"the segmentation ({labels_in.GetSize()}) is not on the CT's grid ({image.GetSize()}); "
                        "pass the label map cascadeseg segment wrote for this CT")
    names = resolve_organs(organs, model.labels) or model.labels.names

    # A 3D cascade's stage 2 learnt its labels only inside C2 (its loss is masked there), so its
    # output is trusted within the C2 radius of the current organ: the organ grows by at most r
    # voxels per iteration inside its box. The 2D fine stage learnt whole boxes (10-20 margins).
    from .three_view import is_three_view

    growth = None if is_three_view(model) else max(1, int(model.dilation_radius))
    ref2 = preprocess.grid_for_spacing(image, model.stages[1].spacing)
    hu2 = preprocess.GridWindows(image, ref2, seg.device)   # resampled only inside each organ's box
    cur = seg.to_tensor(preprocess.resample(labels_in, ref2, "nearest", 0, sitk.sitkUInt8))
    start_from = cur
    oracle_values: dict[str, int] = {}
    if oracle is not None:
        from ...evaluate import as_label_map

        oracle = as_label_map(oracle, "oracle reference")
        start_from = seg.to_tensor(preprocess.resample(oracle, ref2, "nearest", 0, sitk.sitkInt32)).long()
        ol = oracle_labels or model.labels
        for n in names:
            try:
                oracle_values[n] = ol.by_name(n).value
            except KeyError:
                oracle_values[n] = -1        # not in the reference: nothing to start from

    out = RefinementResult(labels=labels_in, oracle=oracle is not None)
    refined: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        value = model.labels.by_name(name).value
        initial = cur == value
        prev = start_from == (oracle_values[name] if oracle is not None else value)
        history: list[float] = []
        converged = False
        box = None
        older = None                                    # the mask two iterations back
        for t in range(max_iter):
            seg.check_cancel()
            grown = box_mask(prev, margin)
            if grown is None:
                break                                   # nothing (left) to refine
            region, box = grown
            if growth is not None:
                region = region & preprocess.dilate(prev, growth)
            if progress is not None:
                progress("refine", (i + t / max_iter) / len(names), f"{name}: iteration {t + 1}")
            new = (seg.predict_stage(1, hu2, region, seg.overlap, "refine", labels_only=True) == value) & region
            change = dice(prev, new)
            history.append(1.0 if change is None else change)   # two empty masks: nothing changed
            before, prev = prev, new
            if history[-1] > tol:
                converged = True
                break
            if older is not None and torch.equal(new, older):
                out.cycled.append(name)                 # alternating between two masks: more runs change nothing
                break
            older = before
        if history and not bool(prev.any()):
            prev = initial                              # the fine network lost the organ: keep stage 2's
        if history:
            refined[name] = prev
        out.iterations[name] = len(history)
        out.converged[name] = converged
        out.dice_history[name] = history
        out.seconds_per_organ[name] = time.perf_counter() - t0
        if box is not None:
            out.boxes[name] = [[a, b] for a, b in box]
    out.labels = _compose(labels_in, refined, model.labels, ref2)
    out.seconds = time.perf_counter() - start
    if progress is not None:
        progress("refine", 1.0, "done")
    return out


def _compose(labels_in: sitk.Image, refined: dict[str, torch.Tensor], labels: LabelSet,
             ref2: sitk.Image) -> sitk.Image:
    """Input-grid labels with each refined organ replaced; refined organs win over the others.

    Where two refined organs claim a voxel, the one listed first keeps it.
    """
    if not refined:
        return labels_in
    fine = torch.zeros(refined[next(iter(refined))].shape, dtype=torch.uint8)
    for name in reversed(list(refined)):               # first listed written last: it wins
        fine[refined[name].cpu()] = labels.by_name(name).value
    fine_img = sitk.GetImageFromArray(fine.numpy())
    fine_img.CopyInformation(ref2)
    back = sitk.GetArrayFromImage(resample_labels_to(fine_img, labels_in))
    arr = sitk.GetArrayFromImage(labels_in).astype(np.uint8)
    values = np.array([labels.by_name(n).value for n in refined], dtype=np.uint8)
    arr[np.isin(arr, values)] = 0
    arr = np.where(back > 0, back, arr).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(labels_in)
    return img


def apply_to_result(result: SegmentationResult, refinement: RefinementResult) -> SegmentationResult:
    """The segmentation result with refined labels, its time in timings['refine'] and
    iterations per organ in stats['refine_iterations_<organ>'] (what `segment` reports)."""
    result.labels = refinement.labels
    result.timings["refine"] = refinement.seconds
    if "total" in result.timings:
        result.timings["total"] += refinement.seconds
    for name, n in refinement.iterations.items():
        result.stats[f"refine_iterations_{name}"] = float(n)
    return result


def add_refine_arguments(p: Any) -> None:
    """`--refine [ORGANS]`, `--refine-margin`, `--refine-max-iter`, `--refine-tol` for `segment`."""
    p.add_argument("--refine", nargs="?", const="all", default=None, metavar="ORGANS",
                   help="iterative coarse-to-fine refinement (Zhou et al.) of all organs, or of "
                        "comma-separated ORGANS; adds its time and iterations to the report")
    p.add_argument("--refine-margin", type=int, default=TEST_MARGIN, metavar="VOXELS",
                   help=f"box margin in stage-2 voxels ({TEST_MARGIN})")
    p.add_argument("--refine-max-iter", type=int, default=10, metavar="N", help="at most N iterations (10)")
    p.add_argument("--refine-tol", type=float, default=0.95, metavar="DICE",
                   help="stop when successive masks have Dice above this (0.95)")


def refine_from_args(args: Any, segmenter: Predictor, image: sitk.Image,
                     result: SegmentationResult) -> SegmentationResult:
    """What `segment` calls after `segmenter.segment(image)` when --refine was given."""
    if getattr(args, "refine", None) is None or getattr(args, "stage1_only", False):
        return result
    ref = refine(segmenter, image, result, args.refine, args.refine_margin, args.refine_max_iter,
                 args.refine_tol, progress=segmenter.progress)
    return apply_to_result(result, ref)
