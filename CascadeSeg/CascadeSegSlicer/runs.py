"""One child-process run as the panel sees it: its events, progress, outcome and temp folder.

Shared by every run the module starts (Segment, device detection, model install, corrections,
Improve), so each reads the CLI's JSON events and turns its exit into the same one-line
`RunError`/`RunCancelled`. No Qt, no MRML.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parameters import SegmentParameters

#: exit codes of a run that was interrupted (Ctrl-C, SIGTERM, SIGKILL) rather than failed
CANCEL_CODES = (130, -2, -15, -9)


@contextmanager
def timed(timings: dict[str, float] | None, key: str):
    """Add the seconds the block took to `timings[key]` (no-op without a dict)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


class RunError(Exception):
    """A run failed: `message` is one line for a message box, `details` the full log."""

    def __init__(self, message: str, details: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.exit_code = exit_code


class RunCancelled(Exception):
    """The user pressed Cancel; nothing in the scene changed."""


@dataclass
class Progress:
    stage: str = ""
    fraction: float = 0.0
    message: str = ""

    def text(self) -> str:
        return " - ".join(p for p in (self.stage, self.message) if p)


@dataclass
class SegmentRun:
    """One running `cascadeseg` command: its process, temp folder and what it will produce."""

    process: Any
    temp_dir: Path
    volume_id: str
    output_id: str | None
    params: SegmentParameters | None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None      # when is_running() first saw the process (or job) end
    progress: Progress = field(default_factory=Progress)
    done_events: list[dict[str, Any]] = field(default_factory=list)
    error_event: dict[str, Any] | None = None
    log_lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # the run's warning events (shown with its result)
    what: str = "segmentation"      # names the run in messages ("model install", ...)
    history: list[Progress] = field(default_factory=list)   # every progress event, in order

    def poll(self) -> Progress:
        """Read what the process printed; the latest progress (cheap, never blocks)."""
        for ev in self.process.poll_events():
            kind = ev.get("event")
            if kind == "progress":
                self.progress = Progress(str(ev.get("stage", "")), float(ev.get("fraction", 0.0)),
                                         str(ev.get("message", "")))
                self.history.append(self.progress)
            elif kind == "done":
                self.done_events.append(ev)
            elif kind == "error":
                self.error_event = ev
            elif kind == "warning":
                self.warnings.append(str(ev.get("message", "")))
                self.log_lines.append(self.warnings[-1])
            else:
                self.log_lines.append(str(ev.get("message", ev)))
        return self.progress

    def new_progress(self) -> list[Progress]:
        """Poll; every progress event since the last call (the latest one if none is new)."""
        seen = len(self.history)
        self.poll()
        return self.history[seen:] or [self.progress]

    def is_running(self) -> bool:
        running = bool(self.process.is_running())
        if not running and self.ended is None:
            self.ended = time.monotonic()
        return running

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def raise_if_failed(self, rc: int | None, cancelled_message: str = "cancelled") -> dict[str, Any]:
        """The last `done` event of a run that ended with `rc`; RunCancelled or RunError otherwise."""
        if self.process.cancelled or rc in CANCEL_CODES:
            raise RunCancelled(cancelled_message)
        if rc != 0 or self.error_event is not None or not self.done_events:
            raise self.error(rc)
        return self.done_events[-1]

    def error(self, rc: int | None) -> RunError:
        """The failure as one line (the CLI's error event, else its last `error:` line) plus the log."""
        stderr = self.process.stderr_text
        details = "\n".join(filter(None, [stderr, *self.log_lines]))
        if self.error_event is not None:
            return RunError(str(self.error_event.get("message", f"{self.what} failed")), details,
                            self.error_event.get("exit_code", rc))
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln]
        msg = (errors or lines or [f"{self.what} process exited with code {rc}"])[-1]
        msg = msg.split("error:", 1)[-1].strip() if "error:" in msg else msg.strip()
        if rc == 0 and not self.done_events:
            msg = f"the {self.what} process ended without a result; see the details"
        return RunError(msg, details, rc)
