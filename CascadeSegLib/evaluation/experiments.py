"""Experiment runners: stage 1 vs stage 2, and overlapping vs non-overlapping tiles."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write
from ..errors import UserError
from ..labels import LabelSet
from .candidates import DEFAULT_RADII, candidate_curves, mean_curves
from .cases import match_ct_cases, progress_iter
from .images import read_label_map
from .metrics import TABLE_METRICS, evaluate_images
from .reports import (
    candidates_csv,
    candidates_markdown,
    markdown_table,
    organ_colors,
    stats_markdown,
    write_comparison_report,
)
from .statistics import summarize


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
    return "### Mean time per case [s]\n\n" + markdown_table(["Run", *keys], rows)


def _preload(segmenters: Iterable[Any], n_stages: int) -> None:
    """Load the networks before timing, so the first case does not pay for it."""
    for seg in segmenters:
        for i in range(n_stages):
            seg.network(i)


def _save_prediction(folder: Path, name: str, image: sitk.Image) -> None:
    from ..io import write_image
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
    from ..inference.cascade import Segmenter
    from ..io import read_image
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
    for case, ct_path, ref_path in progress_iter(pairs, len(pairs), "stages", progress):
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
    from ..inference.cascade import Segmenter
    from ..io import read_image
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
            progress_iter(pairs, len(pairs), "overlap", progress)):
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
