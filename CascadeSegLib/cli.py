"""`cascadeseg` command line: one dispatcher, one module per command in `commands/`.

User mistakes (`UserError`) print one line and exit 2; Ctrl-C exits 130 after temporary files
are removed; anything else is a bug: one line naming a log file with the traceback, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import traceback
from typing import NoReturn

from . import __version__
from .errors import Cancelled, UserError

COMMANDS = ("segment", "models", "devices", "evaluate", "train", "refine", "corrections", "improve", "summarize",
            "synth", "worker")  # worker: hidden, the Slicer module's warm process (commands/worker.py)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        self.print_usage(sys.stderr)
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cascadeseg", description="Cascaded 3D FCN segmentation of abdominal CT "
                     "(Roth et al. 2018).")
    parser.add_argument("--version", action="version", version=f"cascadeseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(f"{__package__}.commands"):
                continue  # a command not present in this build
            raise
        module.register(sub)
    return parser


def sigterm_to_interrupt(signum, frame):  # noqa: ANN001 - signal handler signature
    """`kill` (SIGTERM) stops a run like Ctrl-C, so the same cleanup and checkpointing run: a job
    started in a script's background ignores SIGINT, and SIGTERM is how it is stopped."""
    raise KeyboardInterrupt


def write_error_log() -> str:
    """Save the current traceback to a new log file; returns where it is (or the last line)."""
    text = traceback.format_exc()
    try:
        fd, name = tempfile.mkstemp(prefix="cascadeseg-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"cascadeseg {__version__}\n{' '.join(sys.argv)}\n\n{text}")
        return f"details in {name}"
    except OSError:
        return "details: " + text.strip().splitlines()[-1]


def _missing_package(exc: BaseException) -> str | None:
    """The top-level name of a third-party package an import could not find, else None (a module
    of our own missing is a broken installation of ours: an internal error)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != "CascadeSegLib":
        return exc.name.split(".")[0]
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    except ValueError:
        pass  # not in the main thread (e.g. called from tests in a worker thread)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"cascadeseg: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("cascadeseg: cancelled; no output was written for the unfinished case", file=sys.stderr)
        return 130
    except MemoryError:
        print("cascadeseg: error: ran out of memory; close other programs, crop the CT or resample it to a "
              "coarser spacing, or use a machine with more memory", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last resort: keep the traceback in a log, not on screen
        missing = _missing_package(exc)
        if missing:              # the installation's fault, not a bug: say how to mend it
            print(f"cascadeseg: error: the Python package {missing!r} is not installed in this Python "
                  f"({sys.executable}); install CascadeSeg's requirements into it (python -m pip install -r "
                  "requirements.txt) or activate the environment that has them", file=sys.stderr)
            return 2
        where = write_error_log()
        print(f"cascadeseg: internal error ({sys.exc_info()[1].__class__.__name__}); {where}; please report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
