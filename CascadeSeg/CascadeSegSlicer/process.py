"""Run `cascadeseg segment --progress-json` in a child process without blocking the caller.

Plain subprocess + reader threads (no Qt), so it is tested with a fake CLI script. The GUI
polls `poll_events()` from a QTimer; `cancel()` kills the whole process tree (the CLI may
start workers), which the CLI's own temp-file handling then cannot leave half-written
outputs in our temp folder, because the logic deletes that folder anyway.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class SegmentProcess:
    """One child process whose stdout carries one JSON event per line."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self._proc: subprocess.Popen | None = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        self.cancelled = False

    def start(self) -> SegmentProcess:
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # own process group: kill the whole tree
        self._proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
            **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            event = parse_event(line)
            if event is not None:
                self._events.put(event)

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line.rstrip("\n"))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code once the process ended and its output was read completely."""
        if self._proc is None or self._proc.poll() is None:
            return None
        for t in self._threads:
            t.join(timeout=5)
        return self._proc.returncode

    def poll_events(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call (never blocks)."""
        return drain(self._events)

    @property
    def stderr_text(self) -> str:
        return "\n".join(self._stderr)

    def wait(self, timeout: float | None = None) -> int:
        assert self._proc is not None
        self._proc.wait(timeout=timeout)
        rc = self.returncode
        assert rc is not None
        return rc

    def cancel(self, grace_s: float = 3.0) -> None:
        """Stop the process and its children: terminate, then kill after `grace_s`."""
        self.cancelled = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        kill_tree(proc, grace_s)
        for t in self._threads:
            t.join(timeout=5)


def parse_event(line: str) -> dict[str, Any] | None:
    """One stdout line of the CLI as an event: its JSON object, or a log event for any other
    text; None for a blank line."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
        if not isinstance(event, dict) or "event" not in event:
            raise ValueError
    except ValueError:
        event = {"event": "log", "message": line}
    return event


def drain(events: queue.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything queued so far, without blocking."""
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


def kill_tree(proc: subprocess.Popen, grace_s: float, alive: Callable[[], bool] | None = None) -> None:
    """Terminate `proc` and its process group, kill what is left after `grace_s`, reap it.
    `alive` says whether it still runs (default: `proc.poll() is None`)."""
    running = alive or (lambda: proc.poll() is None)
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    else:
        signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_executable() -> str:
    """Slicer's own Python: `PythonSlicer` inside the app, else the running interpreter."""
    import shutil

    exe = shutil.which("PythonSlicer")
    if exe:
        return exe
    return sys.executable
