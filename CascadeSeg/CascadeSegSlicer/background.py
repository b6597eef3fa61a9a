"""A child-process run polled from a GUI timer: progress while it runs, one callback when it ends.

The panel's side runs (device detection, model install) use it; like the controller, no Qt
import here (the timer comes from a factory), so tests drive it with fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .runs import Progress, RunCancelled, RunError, SegmentRun


class RunPoller:
    """Polls one run at a time from a timer; `on_failed(None)` means it was cancelled."""

    def __init__(self, logic: Any, timer_factory: Callable[[Callable[[], None]], Any], poll_ms: int = 200) -> None:
        self.logic = logic
        self.timer = timer_factory(self.on_timer)
        self.poll_ms = poll_ms
        self.run: SegmentRun | None = None
        self._on_done: Callable[[dict[str, Any]], None] = lambda done: None
        self._on_failed: Callable[[RunError | None], None] = lambda exc: None
        self._on_progress: Callable[[SegmentRun, Progress], None] | None = None

    @property
    def running(self) -> bool:
        return self.run is not None

    def start(self, run: SegmentRun, on_done: Callable[[dict[str, Any]], None],
              on_failed: Callable[[RunError | None], None],
              on_progress: Callable[[SegmentRun, Progress], None] | None = None) -> None:
        self.run, self._on_done, self._on_failed, self._on_progress = run, on_done, on_failed, on_progress
        self.timer.start(self.poll_ms)

    def on_timer(self) -> None:
        run = self.run
        if run is None:
            self.timer.stop()
            return
        progress = run.poll()
        if self._on_progress is not None:
            self._on_progress(run, progress)
        if run.is_running():
            return
        self.timer.stop()
        self.run = None
        try:
            done = self.logic.finish_command(run)
        except RunCancelled:
            self._on_failed(None)
        except RunError as exc:
            self._on_failed(exc)
        else:
            self._on_done(done)

    def cancel(self) -> None:
        """Kill the run's process tree; `on_failed(None)` is called."""
        run, self.run = self.run, None
        self.timer.stop()
        if run is not None:
            self.logic.cancel(run)
            self._on_failed(None)
