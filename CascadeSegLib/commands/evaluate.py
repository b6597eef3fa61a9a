"""`cascadeseg evaluate | compare | candidates | experiment`: the paper's tables and curves.

evaluate    PRED REF -o DIR       Dice/HD95/ASSD/volumes per case and organ (Tables 1-2, Fig. 5)
compare     A B [-o DIR]          Wilcoxon signed-rank per organ between two methods (Table 4)
candidates  STAGE1 REF -o DIR     recall/FPR of C2 vs dilation radius (Fig. 6)
experiment  stages|overlap|finetune   the paper's reproduction experiments (Tables 3, 5)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .segment import DEVICE_HELP

_LABELS_HELP = ("label names/values of the predictions: a model name or path, a JSON label list "
                "(file or inline), or comma-separated organ names (values 1..N); default: the "
                "standard 10 organs")
_REF_LABELS_HELP = ("label values of the references when they differ: a dataset preset (totalsegmentator, btcv, "
                    "amos, msd-liver, msd-spleen, msd-pancreas, ircadb) or the same forms as --labels")


def parse_radii(text: str) -> list[int]:
    """'0..10' (inclusive), '0,1,2,3' or a mix such as '0..3,5,8'."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if ".." in part:
                lo, hi = (int(v) for v in part.split("..", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UserError(f"bad --radii {text!r}; use e.g. 0..10 or 0,1,2,3") from None
    if not out or min(out) < 0 or max(out) > 100:
        raise UserError(f"bad --radii {text!r}; radii must be integers in 0..100")
    return sorted(out)


def _spacing(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        vals = []
    if len(vals) != 3 or min(vals) <= 0:
        raise UserError(f"bad --grid-spacing {text!r}; give three positive mm values x,y,z")
    return vals


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", default=None, help=_LABELS_HELP)
    p.add_argument("--ref-labels", default=None, help=_REF_LABELS_HELP)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _label_check_option(p: argparse.ArgumentParser, volumes: bool = True) -> None:
    p.add_argument("--no-label-check", action="store_true",
                   help="score even when a map holds values its label spec does not name"
                   + (", or an organ's volumes differ 10x between prediction and reference" if volumes else "")
                   + " (checked by default)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice, HD95, ASSD and volumes of predictions vs references",
        description="Compare predicted label maps with references (two files or two folders, "
                    "cases matched by file name) and write metrics.json, Markdown/CSV tables "
                    "and box plots into REPORT_DIR.")
    p.add_argument("prediction", help="predicted label map, or a folder of them")
    p.add_argument("reference", help="reference label map, or a folder of them")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR")
    p.add_argument("--name", default=None, help="method name in the report (default: the "
                   "prediction's folder/file name)")
    p.add_argument("--no-distances", action="store_true",
                   help="Dice and volumes only (skip HD95/ASSD, faster)")
    _label_check_option(p)
    _common(p)
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser(
        "compare", help="Wilcoxon signed-rank test per organ between two methods",
        description="A and B are metrics.json files or report folders from `evaluate` "
                    "(PATH#METHOD picks one method of an experiment report), or prediction "
                    "folders together with --ref.")
    p.add_argument("a", help="method A: metrics.json, report folder, PATH#METHOD, or predictions")
    p.add_argument("b", help="method B (same forms)")
    p.add_argument("-o", "--output", default=None, metavar="REPORT_DIR",
                   help="write compare.md/.csv, metrics.json and box plots here")
    p.add_argument("--ref", default=None, help="reference folder, to evaluate prediction folders")
    p.add_argument("--names", nargs=2, default=None, metavar=("NAME_A", "NAME_B"))
    p.add_argument("--metric", default="dice", choices=["dice", "hd95_mm", "assd_mm", "hd_mm"])
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    _label_check_option(p)
    _common(p)
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser(
        "candidates", help="recall/FPR of the stage-2 candidate region C2 vs dilation radius",
        description="Dilate stage-1 predictions with balls of radius r voxels and measure how "
                    "much of each reference organ they cover (paper Fig. 6).")
    p.add_argument("stage1", help="stage-1 label map (cascadeseg segment --stage1-only), or folder")
    p.add_argument("reference", help="reference label map, or a folder of them")
    p.add_argument("-o", "--output", required=True, metavar="REPORT_DIR")
    p.add_argument("--radii", default="0..10", help="radii in voxels: 0..10 or 0,1,2,3")
    p.add_argument("--grid-spacing", default=None, metavar="X,Y,Z",
                   help="resample onto this spacing first (the model's stage-2 spacing, where "
                        "the engine dilates); default: the reference grid")
    p.add_argument("--mark-radius", type=int, default=3, help="radius marked in the plot (3)")
    _label_check_option(p, volumes=False)
    _common(p)
    p.set_defaults(func=run_candidates)

    p = subparsers.add_parser("experiment", help="the paper's reproduction experiments",
                              description="Reproduction experiments, each writing its tables.")
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    p.set_defaults(func=lambda args: _missing_experiment(p))
    for name, helptext in (("stages", "stage 1 vs stage 2 (Tables 1-3, Fig. 5) and C2 curves"),
                           ("overlap", "non-overlapping vs overlapping stage-2 tiles")):
        e = sub.add_parser(name, help=helptext, description=helptext)
        e.add_argument("ct", help="CT file or folder of CTs (files or DICOM folders)")
        e.add_argument("reference", help="reference label map or folder (matched by case name)")
        e.add_argument("-o", "--output", required=True, metavar="REPORT_DIR")
        e.add_argument("--model", default=None, help="model name, folder or .zip")
        e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help=DEVICE_HELP)
        e.add_argument("--overlap", type=float, default=0.0 if name == "stages" else 0.37,
                       metavar="FRACTION", help="stage-2 tile overlap" + (
                           " (0)" if name == "stages" else " of the overlapping run (0.37)"))
        if name == "stages":
            e.add_argument("--radii", default="0..10", help="C2 radii in voxels (0..10)")
        e.add_argument("--ref-labels", default=None, help=_REF_LABELS_HELP)
        e.add_argument("--alpha", type=float, default=0.05)
        e.add_argument("--save-predictions", action="store_true",
                       help="also write the label maps into REPORT_DIR/predictions")
        e.add_argument("--no-plots", action="store_true")
        e.add_argument("--quiet", action="store_true")
        e.set_defaults(func=run_experiment_stages if name == "stages" else run_experiment_overlap)
    e = sub.add_parser("finetune", help="training from scratch vs fine-tuning (Table 5)",
                       description="Tabulate two methods' Dice per organ side by side with the "
                                   "Wilcoxon test; inputs as for `compare`.")
    e.add_argument("scratch", help="scratch model's metrics.json/report, or predictions + --ref")
    e.add_argument("finetuned", help="fine-tuned model's (same forms)")
    e.add_argument("-o", "--output", required=True, metavar="REPORT_DIR")
    e.add_argument("--ref", default=None, help="reference folder, to evaluate prediction folders")
    e.add_argument("--alpha", type=float, default=0.05)
    _label_check_option(e)
    _common(e)
    e.set_defaults(func=run_experiment_finetune)


def _missing_experiment(p: argparse.ArgumentParser) -> int:
    raise UserError("choose an experiment: stages, overlap or finetune "
                    "(cascadeseg experiment --help)")


def _labels(args: argparse.Namespace):
    from ..evaluate import resolve_labels
    from ..label_presets import IRCADB, ircadb_labels

    labels = resolve_labels(getattr(args, "labels", None))
    ref_spec = getattr(args, "ref_labels", None)
    if ref_spec and ref_spec.strip().lower() == IRCADB:
        return labels, ircadb_labels(getattr(args, "reference", None) or getattr(args, "ref", None) or "")
    return labels, (resolve_labels(ref_spec) if ref_spec else None)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_labels(args: argparse.Namespace, pairs, labels, ref_labels,  # noqa: ANN001
                  volumes: bool = True) -> list[str]:
    """Stop before scoring when the label values cannot mean what the label specs say; the warnings.
    `volumes=False` checks the values only: a stage-1 map may miss most of a thin organ for real."""
    from ..label_presets import NAMES
    from ..labelcheck import check_pairs

    if getattr(args, "no_label_check", False):
        return []
    problems = check_pairs(pairs, labels, ref_labels)
    if not volumes:
        problems.volumes.clear()
        problems.lone_volumes.clear()
    if problems:
        labels_hint = f"--labels {_short(args.labels)}" if args.labels else "--labels (default: the standard 10 organs)"
        ref_hint = (f"--ref-labels {_short(args.ref_labels)}" if args.ref_labels
                    else "--ref-labels (not given: the same values as the prediction)")
        raise UserError(problems.message(labels_hint, ref_hint, NAMES))
    return problems.warnings()


def _label_check_markdown(warnings: list[str]) -> str:
    return "".join(["### Label check\n\n", *(f"- {w}\n" for w in warnings)]) if warnings else ""


def _warn(text: str) -> None:
    print(f"cascadeseg: warning: {text}", file=sys.stderr)


def _report_line(path: Path, doc: dict[str, Any]) -> None:
    for w in doc.get("warnings", []):
        _warn(w)
    print(f"report: {path}")


def run_evaluate(args: argparse.Namespace) -> int:
    from .. import evaluate as ev
    labels, ref_labels = _labels(args)
    pairs, extra_pred, extra_ref = ev.match_cases(args.prediction, args.reference)
    for kind, names in (("predictions without reference", extra_pred),
                        ("references without prediction", extra_ref)):
        if names:
            _warn(f"{len(names)} {kind}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    label_warnings = _check_labels(args, pairs, labels, ref_labels)
    cases = ev.evaluate_pairs(pairs, labels, ref_labels, distances=not args.no_distances,
                              progress=not args.quiet)
    # The method's column in the report, not a case name: the prediction's name up to its first dot.
    name = args.name or Path(args.prediction).name.split(".")[0] or "prediction"
    out = Path(args.output)
    doc = ev.write_evaluation_report(
        out, {name: cases}, labels, plots=not args.no_plots,
        extra={"prediction": str(args.prediction), "reference": str(args.reference),
               "unmatched_predictions": extra_pred, "unmatched_references": extra_ref,
               "label_check_warnings": label_warnings, "warnings": list(label_warnings)},
        extra_markdown=_label_check_markdown(label_warnings))
    summary = doc["methods"][name]["summary"]
    for organ, s in summary.items():
        d = s["dice"]
        if d["n"]:
            print(f"{organ:32s} Dice {100 * d['mean']:5.1f} +- {100 * d['std']:4.1f} "
                  f"(n={d['n']})")
    _report_line(out / "summary.md", doc)
    return 0


def _method(args: argparse.Namespace, spec: str, labels, ref_labels) -> tuple[tuple[str, Any], list[str]]:  # noqa: ANN001
    """((name, cases), label-check warnings) from a metrics.json/report, or by evaluating a prediction
    folder against --ref: label-checked first, as `evaluate` does."""
    from .. import evaluate as ev
    path = Path(spec)
    is_report = (path.is_file() and path.suffix == ".json") or (path / "metrics.json").is_file() \
        or ("#" in spec and not path.exists())
    if is_report or args.ref is None:
        return ev.load_method(spec), []
    pairs, _, _ = ev.match_cases(spec, args.ref)
    warnings = _check_labels(args, pairs, labels, ref_labels)
    return (path.name, ev.evaluate_pairs(pairs, labels, ref_labels, progress=not args.quiet)), warnings


def _compare(args: argparse.Namespace, a_spec: str, b_spec: str, names, kind: str) -> int:
    from .. import evaluate as ev
    labels, ref_labels = _labels(args)
    a, warn_a = _method(args, a_spec, labels, ref_labels)
    b, warn_b = _method(args, b_spec, labels, ref_labels)
    warnings = [f"{spec}: {w}" for spec, ws in ((a_spec, warn_a), (b_spec, warn_b)) for w in ws]
    if names:
        a, b = (names[0], a[1]), (names[1], b[1])
    if a[0] == b[0]:
        a, b = (f"A:{a[0]}", a[1]), (f"B:{b[0]}", b[1])
    common = set(a[1]) & set(b[1])
    if not common:
        raise UserError(f"{a[0]} and {b[0]} share no case; compare results on the same cases")
    metric = getattr(args, "metric", "dice")
    label_arg = labels if getattr(args, "labels", None) else None
    if args.output:
        out = Path(args.output)
        doc = ev.write_comparison_report(out, a, b, label_arg, metric, args.alpha, kind=kind,
                                         plots=not args.no_plots,
                                         extra={"label_check_warnings": warnings, "warnings": list(warnings)},
                                         extra_markdown=_label_check_markdown(warnings))
        result = doc["wilcoxon"]
    else:
        result = ev.compare_methods(a[1], b[1], metric, args.alpha)
        doc = None
    print(ev.compare_markdown(result, metric, a[0], b[0], args.alpha))
    if doc is not None:
        _report_line(out / "compare.md", doc)
    else:
        for w in warnings:
            _warn(w)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    return _compare(args, args.a, args.b, args.names, "comparison")


def run_experiment_finetune(args: argparse.Namespace) -> int:
    args.metric = "dice"
    return _compare(args, args.scratch, args.finetuned, ("scratch", "fine-tuned"),
                    "experiment-finetune")


def run_candidates(args: argparse.Namespace) -> int:
    from .. import evaluate as ev
    labels, ref_labels = _labels(args)
    radii = parse_radii(args.radii)
    pairs, _, _ = ev.match_cases(args.stage1, args.reference)
    _check_labels(args, pairs, labels, ref_labels, volumes=False)
    result = ev.candidate_pairs(pairs, labels, ref_labels, radii, _spacing(args.grid_spacing),
                                progress=not args.quiet)
    out = Path(args.output)
    doc = ev.write_candidates_report(out, result, labels, mark_radius=args.mark_radius,
                                     plots=not args.no_plots,
                                     extra={"stage1": str(args.stage1), "reference": str(args.reference)})
    print(ev.candidates_markdown({k: v for k, v in result["mean"].items() if k == "all"}))
    _report_line(out / "candidates.md", doc)
    return 0


def _model(args: argparse.Namespace):
    from ..packaging.model import load_model
    return load_model(args.model)


def run_experiment_stages(args: argparse.Namespace) -> int:
    from .. import evaluate as ev
    model = _model(args)
    ref_labels = ev.resolve_labels(args.ref_labels) if args.ref_labels else None
    out = Path(args.output)
    doc = ev.run_stages_experiment(model, args.ct, args.reference, out, args.device,
                                   args.overlap, ref_labels, parse_radii(args.radii), args.alpha,
                                   args.save_predictions, not args.quiet, not args.no_plots)
    print(ev.difference_markdown(doc["difference"], "dice", "stage1", "stage2"))
    _report_line(out / "compare.md", doc)
    return 0


def run_experiment_overlap(args: argparse.Namespace) -> int:
    from .. import evaluate as ev
    model = _model(args)
    ref_labels = ev.resolve_labels(args.ref_labels) if args.ref_labels else None
    out = Path(args.output)
    doc = ev.run_overlap_experiment(model, args.ct, args.reference, out, args.device,
                                    args.overlap, ref_labels, args.alpha, args.save_predictions,
                                    not args.quiet, not args.no_plots)
    print(ev.compare_markdown(doc["wilcoxon"], "dice", "non-overlapping", "overlapping",
                              args.alpha))
    ratio = doc["time_ratio"].get("total")
    if ratio:
        print(f"time ratio overlapping / non-overlapping (total): {ratio:.2f}x")
    _report_line(out / "compare.md", doc)
    return 0
