"""`cascadeseg refine` (Zhou et al. iterative refinement) and `cascadeseg baseline2d train`.

refine      CT -o OUT [--model M] [--organs liver,spleen] [--oracle REF] [--labels SEG]
            segment (or take --labels) and refine organ boxes until successive masks agree
baseline2d  train CONFIG [--run-dir DIR] [-o MODEL]   train the 2D three-view baseline
            (a 2D package runs like any other: cascadeseg segment INPUT -o OUT --model M [--fusion vote])
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import OUTPUT_SUFFIXES
from .segment import DEVICE_HELP


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "refine", help="iterative coarse-to-fine refinement of organ boxes (Zhou et al. 2016)",
        description="Segment a CT (or take an existing label map with --labels), then re-run the model's "
                    "fine network on each organ's bounding box plus a margin until two successive masks "
                    "have Dice above --tol or --max-iter iterations ran.")
    p.add_argument("input", help="CT file or DICOM folder")
    p.add_argument("-o", "--output", required=True, help="refined label map (.nii.gz, .nrrd, .mha, .seg.nrrd)")
    p.add_argument("--model", default=None, help="model name, folder or .zip (3D cascade or 2D baseline)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                       help=DEVICE_HELP)
    p.add_argument("--labels", default=None, metavar="SEG",
                   help="start from this label map (on the CT's grid, model label values) instead of segmenting")
    p.add_argument("--organs", default=None, help="comma-separated organs to refine (default: all)")
    p.add_argument("--margin", type=int, default=15, help="box margin in stage-2 voxels (15)")
    p.add_argument("--max-iter", type=int, default=10, help="at most this many iterations per organ (10)")
    p.add_argument("--tol", type=float, default=0.95, help="stop when successive masks have Dice above this")
    p.add_argument("--oracle", default=None, metavar="REF",
                   help="reference label map: start each organ from its reference box (upper bound)")
    p.add_argument("--ref-labels", default=None,
                   help="label values of --oracle when they differ from the model's (model, JSON or names)")
    p.add_argument("--initial-output", default=None, metavar="PATH", help="also write the unrefined labels")
    p.add_argument("--report", default=None, metavar="JSON", help="write iterations, Dice history and times")
    p.add_argument("--series-uid", default=None, help="DICOM series to read when a folder holds several")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_refine)

    p = subparsers.add_parser("baseline2d", help="the 2D three-view FCN baseline (Zhou et al. 2016)",
                              description="Train the 2D three-view baseline model; segment with it by "
                              "`cascadeseg segment --model MODEL [--fusion mean|vote]`.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    p.set_defaults(func=lambda args: _missing_action())
    t = sub.add_parser("train", help="train a 2D baseline from a config (configs/baseline2d-*.json)")
    t.add_argument("config", help="2D baseline config (JSON)")
    t.add_argument("--run-dir", default=None, help="run folder (default: runs/<name>-2d)")
    t.add_argument("-o", "--output", default=None, metavar="MODEL_DIR",
                   help="model package folder (default: RUN_DIR/model)")
    t.add_argument("--device", default=None, help="auto, cpu or cuda (default: the config's)")
    t.add_argument("--overwrite", action="store_true", help="start the run folder afresh")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run_train)


def _missing_action() -> int:
    raise UserError("choose an action: cascadeseg baseline2d train CONFIG (segment with a 2D package by "
                    "cascadeseg segment INPUT -o OUT --model MODEL)")


def _write_labels(io: Any, labels: Any, model: Any, path: Path, overwrite: bool, protect: list[Path]) -> None:
    if path.name.lower().endswith(".seg.nrrd"):
        io.write_segmentation_nrrd(labels, model.labels, path, overwrite=overwrite, protect=protect)
    else:
        io.write_image(labels, path, overwrite=overwrite, protect=protect)


def _check_output(path: Path) -> None:
    if not path.name.lower().endswith(OUTPUT_SUFFIXES):
        raise UserError(f"{path} is not a label-map file name; end it in .nii.gz, .nrrd, .mha or .seg.nrrd")


def run_refine(args: argparse.Namespace) -> int:
    from .. import io
    from ..baselines.zhou2016.refine import refine, resolve_organs
    from ..evaluate import read_label_map, resolve_labels
    from ..inference.predictor import make_predictor
    from ..inference.validation import validate_ct
    from ..packaging.model import load_model

    source = Path(args.input).expanduser()
    output = Path(args.output).expanduser()
    if not source.exists():
        raise UserError(f"input {source} does not exist; give a CT file or a DICOM folder")
    _check_output(output)
    if args.initial_output:
        _check_output(Path(args.initial_output))
    model = load_model(args.model)
    organs = resolve_organs(args.organs, model.labels)
    oracle = read_label_map(args.oracle) if args.oracle else None
    oracle_labels = resolve_labels(args.ref_labels) if args.ref_labels else None
    image = io.read_image(source, series_uid=args.series_uid)
    validate_ct(image, check_intensities=False)
    segmenter = make_predictor(model, args.device)
    if args.labels:
        import SimpleITK as sitk

        initial = sitk.Cast(read_label_map(args.labels), sitk.sitkUInt8)
        seg_seconds = 0.0
    else:
        res = segmenter.segment(image)
        initial = res.labels
        seg_seconds = res.timings.get("total", 0.0)
    ref = refine(segmenter, image, initial, organs, args.margin, args.max_iter, args.tol, oracle, oracle_labels)
    protect = [source]
    if args.initial_output:
        _write_labels(io, initial, model, Path(args.initial_output).expanduser(), args.overwrite, protect)
    _write_labels(io, ref.labels, model, output, args.overwrite, protect)
    for name, n in ref.iterations.items():
        hist = ", ".join(f"{d:.3f}" for d in ref.dice_history[name])
        state = "converged" if ref.converged[name] else ("not found" if n == 0 else "stopped at max")
        print(f"{name:32s} {n:2d} iterations ({state}; Dice between iterations: {hist or '-'}) "
              f"{ref.seconds_per_organ[name]:.1f} s", file=sys.stderr)
    print(f"refinement: {ref.seconds:.1f} s (segmentation {seg_seconds:.1f} s); labels: {output}", file=sys.stderr)
    if args.report:
        from ..evaluate import write_json

        write_json(Path(args.report).expanduser(), {
            "input": str(source), "output": str(output), "model": {"name": model.name, "version": model.version},
            "margin": args.margin, "max_iter": args.max_iter, "tol": args.tol, "oracle": args.oracle,
            "segment_seconds": seg_seconds, **ref.to_json()})
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..baselines.zhou2016.three_view_train import load_baseline_config, train_baseline

    cfg = load_baseline_config(args.config)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{cfg.name}-2d"
    pkg = train_baseline(cfg, run_dir, args.output, args.device, progress=not args.quiet, overwrite=args.overwrite,
                         log=lambda m: print(m, file=sys.stderr))
    print(f"model: {pkg.root}")
    return 0
