"""`cascadeseg worker` (hidden): a warm process that runs `segment` jobs read from stdin.

The Slicer module starts one when it opens, so torch and the engine are imported once and the
model's checked weights stay in memory; each Segment then skips the 5-8 s a fresh process
spends starting Python, importing torch and loading the model. Protocol, one JSON object per
line:

- worker -> stdout, once started: `{"event": "ready", "pid": N}`;
- stdin -> worker, one job at a time: `{"job": "segment", "args": ["segment", INPUT, "-o", ...]}`
  (the arguments of a one-shot `cascadeseg segment --progress-json`);
- worker -> stdout: `{"event": "job"}` once it has read the job (a worker that dies before
  that never ran it), the job's own events, exactly as the one-shot command prints them
  (progress, warning, done, error, cancelled), then `{"event": "exit", "exit_code": rc}`;
- worker -> stderr: what the one-shot command would print there, then the line
  `JOB_END_MARKER` once the job's stderr is complete.

The worker exits at the end of stdin, on SIGTERM (Cancel: the caller kills the process group),
and after any job that did not end with 0 or 2 (cancelled, crashed, internal error): the next
job then gets a fresh process, as a one-shot run would.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

JOB_END_MARKER = "\x1ecascadeseg-worker: job end"
#: exit codes after which the worker keeps serving (done, or a user error such as a bad input)
KEEP_SERVING = (0, 2)


def register(subparsers: Any) -> None:
    # No help text: the command is for the Slicer module and is not listed in `cascadeseg --help`.
    p = subparsers.add_parser("worker", description="Serve segment jobs read from stdin as JSON lines "
                              "(used by the Slicer module; see CascadeSegLib/commands/worker.py).")
    p.set_defaults(func=run)


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _end_job(rc: int) -> None:
    sys.stderr.flush()
    sys.stderr.write(JOB_END_MARKER + "\n")
    sys.stderr.flush()
    _emit("exit", exit_code=rc)


def cached_load_model() -> Any:
    """`model.load_model` that keeps packages and their checked weights between jobs.

    A package is reused while its model.json and weight files keep their size and mtime;
    weights are read and sha256-checked once per file version, networks are still built
    fresh for every job (the segmenter folds and moves them).
    """
    from ..packaging import model as model_module

    plain = model_module.load_model
    cache: dict[tuple, Any] = {}

    def signature(root: Path, pkg: Any) -> tuple:
        files = [root / "model.json"] + [root / s.weights for s in pkg.stages]
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (str(f),) for f in files)

    def load(name_or_path: Any = None) -> Any:
        pkg = plain(name_or_path)
        if pkg.root is None:
            return pkg
        key = (str(pkg.root), signature(Path(pkg.root), pkg))
        if key not in cache:
            weights: dict[int, Any] = {}
            read = pkg.load_weights

            def load_weights(stage_index: int) -> Any:
                if stage_index not in weights:
                    weights[stage_index] = read(stage_index)
                return weights[stage_index]

            pkg.load_weights = load_weights  # type: ignore[method-assign]  # this package only
            cache.clear()  # one model at a time: a switch frees the previous one's weights
            cache[key] = pkg
        return cache[key]

    return load


def run(args: argparse.Namespace) -> int:
    # Import what a segment job needs before saying ready (the point of a warm worker).
    import torch  # noqa: F401

    from .. import cli, io  # noqa: F401
    from ..baselines.zhou2016 import refine  # noqa: F401
    from ..inference import cascade  # noqa: F401
    from ..packaging import model  # noqa: F401
    from . import segment  # noqa: F401

    model.load_model = cached_load_model()
    home = os.getcwd()
    _emit("ready", pid=os.getpid())
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            _emit("job")
            try:
                job = json.loads(line)
                argv = [str(a) for a in job["args"]]
                if job.get("job") != "segment" or not argv or argv[0] != "segment":
                    raise ValueError("not a segment job")
            except (ValueError, KeyError, TypeError) as exc:
                print(f"cascadeseg: error: worker: bad job line ({exc})", file=sys.stderr)
                _emit("error", message=f"worker: bad job line ({exc})", exit_code=2)
                _end_job(2)
                continue
            rc = cli.main(argv)
            os.chdir(home)
            gc.collect()
            _release_gpu_memory()
            _end_job(rc)
            if rc not in KEEP_SERVING:
                return rc
    except KeyboardInterrupt:  # SIGTERM while idle
        return 130
    return 0


def _release_gpu_memory() -> None:
    """Give the GPU memory the job cached back to other programs (Slicer renders on it too)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
