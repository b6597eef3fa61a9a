"""3D cascade vs 2D three-view baseline vs iterative refinement on the bundled data.

Why: docs/comparison.md needs one side-by-side table, measured the same way for every method
(Dice per organ against the TotalSegmentator references, the same grid, the same threads).
How: train the 2D baseline once (see MISSING_2D below), then from the repository root

    OMP_NUM_THREADS=2 python configs/compare_bundled.py [--model2d runs/baseline2d-demo/model]
        [--out runs/compare-bundled] [--threads 2] [--repeat 3]

It runs, in-process on the CPU, for both bundled cases: the 3D cascade; the cascade + refinement
of all organs (margin 15, tol 0.95, at most 10 iterations); the cascade + oracle-box refinement;
the 2D baseline with mean fusion and with majority vote; the 2D baseline (mean) + refinement.
Times are wall seconds per case of `Segmenter.segment` (the fastest of --repeat runs) plus, for
the refined rows, one `refine` run: weights are loaded and one untimed warm-up run is done first;
reading the CT and writing labels are not counted.
It prints Markdown tables and writes OUT/pred/<method>/<case>_labels.nii.gz, OUT/refs/<case>.nii.gz
(references on the CT grid with the model's label values 1..10, so `cascadeseg compare
OUT/pred/A OUT/pred/B --ref OUT/refs` needs no label options) and OUT/results.json.
ts_example_3mm is the CT both models were TRAINED ON; dicom_slab is held out from both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES: dict[str, tuple[Path, Path, str]] = {
    "ts_example_3mm": (REPO / "Resources/SampleData/abdomen_ct_3mm.nii.gz",
                       REPO / "Resources/SampleData/abdomen_ct_3mm_totalseg.nii.gz", "TRAINED ON"),
    "dicom_slab": (REPO / "Testing/Data/dicom_slab", REPO / "Testing/Data/dicom_slab_seg.nii.gz", "held out"),
}
MISSING_2D = ("2D baseline model {path} not found; train it first (about 5 CPU minutes): cascadeseg baseline2d "
              "train configs/baseline2d-abdomen-ct-demo.json --run-dir runs/baseline2d-demo "
              "-o runs/baseline2d-demo/model")
MARGIN, MAX_ITER, TOL = 15, 10, 0.95                 # refinement: Zhou et al.'s test-time settings
SHORT = {"liver": "liver", "spleen": "spleen", "kidney_right": "kidney R", "kidney_left": "kidney L",
         "gallbladder": "gallbl.", "stomach": "stomach", "pancreas": "pancreas", "aorta": "aorta",
         "inferior_vena_cava": "IVC", "portal_vein_and_splenic_vein": "portal/spl. v."}
NOT_IN_IMAGE = "not in image"


@dataclass
class Run:
    """One method on one case: labels, Dice per organ (None: organ not in the reference) and times."""

    labels: sitk.Image
    dice: dict[str, float | None]
    false_positive: list[str]                        # organs not in the reference but labelled anyway
    seconds: float                                   # segmentation (+ refinement) wall seconds
    refine_seconds: float | None = None
    iterations: dict[str, int] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    cycled: list[str] = field(default_factory=list)   # stopped when the masks alternated


def reference_on_grid(label_path: Path, image: sitk.Image, organs: list[str], values: dict[str, int]) -> sitk.Image:
    """TotalSegmentator reference resampled (nearest) onto the CT grid, remapped to model values."""
    from CascadeSegLib.train.dataset import TOTALSEGMENTATOR_IDS

    ts = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(label_path)), image, sitk.Transform(),
                                              sitk.sitkNearestNeighbor, 0)).astype(np.int64)
    lut = np.zeros(max(int(ts.max()), max(TOTALSEGMENTATOR_IDS)) + 1, dtype=np.uint8)
    for ts_id, name in TOTALSEGMENTATOR_IDS.items():
        if name in organs:
            lut[ts_id] = values[name]
    out = sitk.GetImageFromArray(lut[ts])
    out.CopyInformation(image)
    return out


def dice_per_organ(pred: sitk.Image, ref: sitk.Image, values: dict[str, int]
                   ) -> tuple[dict[str, float | None], list[str]]:
    """(Dice of every organ, None where the reference lacks it, and "mean" over the present
    organs; the absent organs the prediction labels anyway)."""
    from CascadeSegLib.evaluation.metrics import count, dice

    p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
    out: dict[str, float | None] = {}
    false_positive = []
    for name, v in values.items():
        rm, pm = r == v, p == v
        n_ref, n_pred = count(rm), count(pm)
        # Organs the reference lacks are not scored (the engine's Dice would give 0 for a
        # prediction there); they are listed as false positives instead.
        out[name] = None if n_ref == 0 else dice(pm, rm)
        if n_ref == 0 and n_pred > 0:
            false_positive.append(name)
    present = [d for d in out.values() if d is not None]
    out["mean"] = float(np.mean(present)) if present else None
    return out, false_positive


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn(*args, **kwargs), its wall seconds)."""
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


def run_case(image: sitk.Image, ref: sitk.Image, segmenters: dict[str, Any], values: dict[str, int],
             repeat: int = 1) -> dict[str, Run]:
    """Every method of the comparison on one CT; segmentation times are the fastest of `repeat` runs
    (the least disturbed by other processes), refinement runs once."""
    from CascadeSegLib.baselines.zhou2016.refine import refine

    out: dict[str, Run] = {}
    base: dict[str, Any] = {}
    for key in ("3d", "2d-mean", "2d-vote"):
        res, sec = min((timed(segmenters[key].segment, image) for _ in range(max(1, repeat))), key=lambda r: r[1])
        base[key] = (res, sec)
        out[key] = Run(res.labels, *dice_per_organ(res.labels, ref, values), sec)
    refinements = {"3d-refined": ("3d", None), "3d-oracle": ("3d", ref), "2d-mean-refined": ("2d-mean", None)}
    for key, (start, oracle) in refinements.items():
        res, seg_sec = base[start]
        rr, sec = timed(refine, segmenters[start], image, res, None, MARGIN, MAX_ITER, TOL,
                        oracle=oracle)
        out[key] = Run(rr.labels, *dice_per_organ(rr.labels, ref, values), seg_sec + sec, sec,
                       dict(rr.iterations), dict(rr.converged), list(rr.cycled))
    return out


METHODS = {
    "3d": "3D cascade",
    "3d-refined": "3D cascade + refinement (all organs)",
    "3d-oracle": "3D cascade + oracle-box refinement",
    "2d-mean": "2D three-view, mean fusion",
    "2d-vote": "2D three-view, majority vote",
    "2d-mean-refined": "2D three-view (mean) + refinement (all organs)",
}


def fmt(v: float | None, false_positive: bool = False) -> str:
    """A Dice cell: 3 decimals, or 'not in image' (with a dagger where the method labelled it anyway)."""
    return (NOT_IN_IMAGE + ("\u2020" if false_positive else "")) if v is None else f"{v:.3f}"


def iteration_cell(n: int, converged: bool, max_iter: int, cycled: bool = False) -> str:
    """'3c' converged, '4r' masks alternated, '10m' stopped at max_iter, '1x' the organ vanished
    (start mask kept), '0' absent."""
    if n == 0:
        return "0"
    return f"{n}" + ("c" if converged else "r" if cycled else "m" if n >= max_iter else "x")


def markdown(results: dict[str, dict[str, Run]], organs: list[str]) -> str:
    """Dice and time per method for each case, then the refinement iterations per organ."""
    lines: list[str] = []
    for case, runs in results.items():
        lines += [f"**`{case}`** ({CASES[case][2]}): Dice per organ, seconds per case", "",
                  "| method | " + " | ".join(SHORT.get(o, o) for o in organs) + " | mean | seconds |",
                  "|---|" + "---:|" * (len(organs) + 2)]
        for key, run in runs.items():
            sec = f"{run.seconds:.1f}" if run.refine_seconds is None else \
                f"{run.seconds:.1f} ({run.seconds - run.refine_seconds:.1f} + {run.refine_seconds:.1f})"
            lines.append(f"| {METHODS[key]} | " + " | ".join(fmt(run.dice[o], o in run.false_positive) for o in organs)
                         + f" | {fmt(run.dice['mean'])} | {sec} |")
        lines.append("")
    lines += ["\u2020 not in the reference but labelled by the method (a false positive; `cascadeseg evaluate` "
              "and `compare` score it Dice 0, this table leaves it out of the mean).", "",
              f"Refinement iterations per organ (c: stopped by the Dice > {TOL} rule, m: stopped at "
              f"{MAX_ITER}, r: the masks alternated between two, x: the fine network lost the organ, its start mask "
              "was kept, "
              "0: absent from the start mask, left as it was)", "",
              "| case | method | " + " | ".join(SHORT.get(o, o) for o in organs) + " |",
              "|---|---|" + "---:|" * len(organs)]
    for case, runs in results.items():
        for key, run in runs.items():
            if run.refine_seconds is None:
                continue
            cells = [iteration_cell(run.iterations.get(o, 0), run.converged.get(o, False), MAX_ITER, o in run.cycled)
                     for o in organs]
            lines.append(f"| {case} | {METHODS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model3d", default="abdomen-ct-demo", help="3D cascade package (default: the bundled demo)")
    ap.add_argument("--model2d", default=str(REPO / "runs/baseline2d-demo/model"), help="2D baseline package")
    ap.add_argument("--out", default=str(REPO / "runs/compare-bundled"), help="predictions, references, JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    ap.add_argument("--repeat", type=int, default=3, help="time each segmentation this often, keep the fastest (3)")
    args = ap.parse_args(argv)
    model2d = Path(args.model2d)
    if not (model2d / "model.json").is_file():
        print(MISSING_2D.format(path=model2d), file=sys.stderr)
        return 2

    import torch

    from CascadeSegLib.baselines.zhou2016.three_view import make_segmenter
    from CascadeSegLib.io import read_image
    from CascadeSegLib.packaging.model import load_model

    torch.set_num_threads(args.threads)
    m3, m2 = load_model(args.model3d), load_model(str(model2d))
    organs = m3.labels.names
    if m2.labels.names != organs or any(m2.labels.by_name(o).value != m3.labels.by_name(o).value for o in organs):
        print(f"the 2D model's labels {m2.labels.names} differ from the 3D model's {organs}", file=sys.stderr)
        return 2
    values = {o: m3.labels.by_name(o).value for o in organs}
    segmenters = {"3d": make_segmenter(m3, "cpu"), "2d-mean": make_segmenter(m2, "cpu", fusion="mean"),
                  "2d-vote": make_segmenter(m2, "cpu", fusion="vote")}
    images = {case: read_image(ct) for case, (ct, _, _) in CASES.items()}
    refs = {case: reference_on_grid(lab, images[case], organs, values) for case, (_, lab, _) in CASES.items()}
    for seg in segmenters.values():                      # weights and first-call costs outside the timings
        seg.segment(images["dicom_slab"])
    load = os.getloadavg()
    results = {case: run_case(images[case], refs[case], segmenters, values, args.repeat) for case in CASES}

    out = Path(args.out)
    (out / "refs").mkdir(parents=True, exist_ok=True)
    for case, ref in refs.items():
        sitk.WriteImage(ref, str(out / "refs" / f"{case}.nii.gz"), True)
        for key, run in results[case].items():
            (out / "pred" / key).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(run.labels, str(out / "pred" / key / f"{case}_labels.nii.gz"), True)
    env = {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "cpu_count": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
           "timing": f"wall seconds per case: Segmenter.segment (fastest of {args.repeat}) + refine (one run); "
                     "model loading, one warm-up run, CT reading and label writing excluded"}
    (out / "results.json").write_text(json.dumps({
        "environment": env, "refine": {"margin": MARGIN, "max_iter": MAX_ITER, "tol": TOL},
        "cases": {case: {"note": CASES[case][2], "methods": {
            k: {"name": METHODS[k], "dice": r.dice, "false_positive_absent_organs": r.false_positive,
                "seconds": round(r.seconds, 3),
                "refine_seconds": None if r.refine_seconds is None else round(r.refine_seconds, 3),
                "iterations": r.iterations, "converged": r.converged, "cycled": r.cycled} for k, r in runs.items()}}
                  for case, runs in results.items()}}, indent=1) + "\n", encoding="utf-8")
    print(markdown(results, organs))
    print(f"\n{env['torch_threads']} torch threads, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
          f"{env['cpu_count']} CPUs, load average before {env['loadavg_before']} after {env['loadavg_after']}; "
          f"{env['timing']}.\nPredictions and references: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
