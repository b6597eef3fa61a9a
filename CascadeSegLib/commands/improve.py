"""`cascadeseg improve NAME -o NEW_NAME`: fine-tune NAME on its stored corrections.

NEW_NAME is installed in the models folder as a verified package (sha256 of every weight
file, provenance naming the parent and the corrections) with IMPROVE_REPORT.md: Dice of the
reviewed organs before and after on each correction case, and, with two or more cases, on a
case a check model did not see. NAME stays unchanged. To keep what it knew, training also
replays NAME's own predictions on the bundled sample CT (or on --replay CTs).

With --atlases every correction also joins NAME's registered atlases (reviewed organs and the
background near them vote; the rest does not): later scans of the same site, scanner or
patient are registered onto it. `--iterations 0 --atlases` only adds the atlases (seconds).
The new package then holds the corrected CTs at 3 mm: share it only where they may go.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..train.improve import DEFAULT_ITERATIONS

    p = subparsers.add_parser("improve", help="fine-tune a model on its stored corrections",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="NAME", help="the model the corrections were added for")
    p.add_argument("-o", "--output", required=True, metavar="NEW_NAME", help="name of the improved model")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"training iterations per stage (default {DEFAULT_ITERATIONS}: minutes on a CPU)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--replay", action="append", type=Path, metavar="CT",
                   help="CT whose predictions by NAME are replayed (repeatable; default: the bundled sample CT)")
    p.add_argument("--no-replay", action="store_true", help="train on the corrections only")
    p.add_argument("--left-out", type=int, default=1, metavar="K",
                   help="with >= 2 cases, hold out the K newest once to measure Dice on unseen cases (0: skip)")
    p.add_argument("--stage", action="append", dest="stages", metavar="NAME", help="train only this stage")
    p.add_argument("--atlases", action="store_true",
                   help="also keep each correction as a registered atlas (needs a model with atlases; the new "
                        "package then holds the corrected CTs at 3 mm). With --iterations 0: atlases only, seconds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--float32", action="store_true",
                   help="train in float32 also where the CPU computes bfloat16 natively (default: bfloat16 "
                        "autocast there, as the recipes train; weights stay float32 either way)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an installed NEW_NAME")
    p.add_argument("--progress-json", action="store_true", help="one JSON event per line on stdout (Slicer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..progress import BarProgress, JsonProgress
    from ..train.improve import ImproveOptions, improve_model
    from ..train.improve_report import summary_line

    opts = ImproveOptions(iterations=args.iterations, lr=args.lr, left_out=args.left_out, stages=args.stages,
                          device=args.device, threads=args.threads, atlases=args.atlases,
                          cpu_bf16=not args.float32,
                          replay=[] if args.no_replay else args.replay)
    progress = JsonProgress() if args.progress_json else BarProgress(sys.stderr.isatty())
    try:
        result = improve_model(args.model, args.output, opts, progress=progress, overwrite=args.overwrite)
    finally:
        progress.close()
    if args.progress_json:
        progress.emit("done", model=result.report["model"], path=str(result.path),
                      report=[str(f) for f in result.files], summary=summary_line(result.report),
                      seconds=round(result.seconds, 1))
    else:
        print(summary_line(result.report))
        print(f"installed {result.report['model']} in {result.path}; report: {result.files[-1]}")
        kept = result.report.get("atlases") or []
        if kept:
            print(f"note: {result.report['model']} holds the {len(kept)} corrected CT(s) as atlases (3 mm); "
                  "share it only where those images may go")
    return 0
