"""`cascadeseg train CONFIG`, `cascadeseg finetune MODEL CONFIG`, `cascadeseg export RUN_DIR -o OUT`,
`cascadeseg train-status RUN_DIR`.

Training runs both stages of the config in a run folder and exports the model package to
`RUN_DIR/model`; running the same command again resumes after a crash or Ctrl-C. For several
GPUs or nodes start it with torchrun:
`torchrun --nproc_per_node 4 -m CascadeSegLib.train CONFIG --run-dir runs/x`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", help="run folder (default: the config's run_dir, else runs/<name>)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (default: the config's, auto)")
    p.add_argument("--stage", action="append", dest="stages", metavar="NAME",
                   help="train only this stage (repeatable); the others must be trained already")
    p.add_argument("--overwrite", action="store_true", help="discard the run folder's checkpoints and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is still written)")
    p.add_argument("--no-export", action="store_true", help="do not export RUN_DIR/model at the end")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a cascade from a config file (resumes an interrupted run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config (JSON, or YAML with PyYAML installed)")
    _common(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("finetune", help="fine-tune a model package on new data or a new label set",
                              description="Start from MODEL's weights; the output layer is replaced when the "
                                          "label set changes; learning rate 10x smaller unless the config's "
                                          "finetune.lr_factor says otherwise.")
    p.add_argument("model", help="model package folder, .zip, or installed model name")
    p.add_argument("config", help="training config; stages may be omitted (taken from the model)")
    p.add_argument("--freeze-encoder", action="store_true", help="keep the encoder's weights fixed")
    p.add_argument("--lr-factor", type=float, default=None, help="learning-rate multiplier (default 0.1)")
    _common(p)
    p.set_defaults(func=run_finetune)

    p = subparsers.add_parser("export", help="write a training run's best weights as a model package")
    p.add_argument("run_dir", help="training run folder")
    p.add_argument("-o", "--output", required=True, help="model folder, or a .zip file")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("train-status",
                              help="how far each stage of a training run got, and how long the rest takes",
                              description="Read a run folder (also while it trains, or between sittings): per "
                                          "stage the iterations saved of those planned, the recent loss and "
                                          "speed, and the time left at that speed.")
    p.add_argument("run_dir", help="training run folder (or a configs/train_prepared.py run folder)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per stage")
    p.set_defaults(func=run_status)


def _run_dir(args, cfg) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    return cfg.run_dir or Path("runs") / cfg.name


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_train(args) -> int:
    from ..train.config import load_config
    from ..train.trainer import train_run

    _logging()
    cfg = load_config(args.config)
    run_dir = _run_dir(args, cfg)
    train_run(cfg, run_dir, overwrite=args.overwrite, stages=args.stages, device=args.device,
              progress=not args.no_progress, export=not args.no_export)
    _report(run_dir, not args.no_export)
    return 0


def run_finetune(args) -> int:
    from ..train.finetune import finetune_run

    _logging()
    run_dir = finetune_run(args.model, args.config, run_dir=args.run_dir, freeze_encoder=args.freeze_encoder or None,
                           lr_factor=args.lr_factor, overwrite=args.overwrite, stages=args.stages,
                           device=args.device, progress=not args.no_progress, export=not args.no_export)
    _report(run_dir, not args.no_export)
    return 0


def run_export(args) -> int:
    from ..train.run_folder import export_run

    out = export_run(args.run_dir, args.output)
    print(f"model written to {out}")
    return 0


def run_status(args) -> int:
    import json

    from ..train.status import run_status as read_status
    from ..train.status import status_line

    run_dir, stages = read_status(args.run_dir)
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "stages": [s.to_json() for s in stages]}, indent=1))
    else:
        print(f"run folder: {run_dir}")
        for s in stages:
            print(status_line(s))
    return 0


def _report(run_dir: Path, exported: bool) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    model = run_dir / "model"
    if exported and (model / "model.json").is_file():
        print(f"run folder: {run_dir}\nmodel: {model}")
    else:
        print(f"run folder: {run_dir}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (used by `python -m CascadeSegLib.train` under torchrun)."""
    import sys

    from ..errors import UserError

    parser = argparse.ArgumentParser(prog="cascadeseg")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("train", "finetune", "export", "train-status"):
        argv = ["train"] + argv
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"cascadeseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
