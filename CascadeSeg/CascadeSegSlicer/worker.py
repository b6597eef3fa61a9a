"""A warm `cascadeseg worker` child process and its jobs (plain subprocess + threads, no Qt).

The worker imports torch and the engine once and keeps the model's weights, so a Segment
after the first skips the 5-8 s of starting Python, importing torch and loading the model.
A `WorkerJob` looks to the logic like a `SegmentProcess` (poll_events, is_running, wait,
cancel, stderr_text), so the rest of the logic does not know which one runs.

What stays as with a one-shot process: the worker is a separate process in its own process
group, so a crash there never takes Slicer down; Cancel kills the worker's whole process
group (a fresh worker is started afterwards); a worker that dies, or that never got ready
(an older CascadeSegLib, torch missing) or that died before it read the job, is replaced or
bypassed with a one-shot process.
Protocol: CascadeSegLib/commands/worker.py.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .process import drain, kill_tree, parse_event

#: the line the worker writes to stderr once a job's stderr is complete (commands/worker.py)
JOB_END_MARKER = "\x1ecascadeseg-worker: job end"
#: exit codes after which the worker keeps serving; after any other it exits (commands/worker.py)
KEEP_SERVING = (0, 2)


class WarmWorker:
    """One `cascadeseg worker` process; runs one job at a time."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.ready = threading.Event()
        self._closed = threading.Event()  # a pipe reached its end: the worker is gone or going
        self.job: WorkerJob | None = None
        self.jobs_served = 0
        #: a job ended with a code after which the worker exits by itself (see KEEP_SERVING)
        self.retiring = False
        self.preamble: list[str] = []  # stderr lines outside any job (startup warnings)

    def start(self) -> WarmWorker:
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # own process group: Cancel kills the whole tree
        self._proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        # The flag first: while a reader thread waits for the exit, poll() cannot reap and says None.
        return self._proc is not None and not self._closed.is_set() and self._proc.poll() is None

    def usable(self) -> bool:
        """Alive and not about to exit: it can take this and later jobs."""
        return self.alive() and not self.retiring

    def idle(self) -> bool:
        """Usable and not running a job: a new job can be sent."""
        return self.usable() and self.job is None

    # ------------------------------------------------------------------ jobs
    def submit(self, args: Sequence[str], fallback: Callable[[], Any] | None = None) -> WorkerJob:
        """Send one `segment` job (the arguments after `cascadeseg`); BrokenPipeError if dead."""
        with self._lock:
            if not self.idle():
                raise BrokenPipeError("the worker is not idle")
            job = WorkerJob(self, fallback)
            self.job = job
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"job": "segment", "args": [str(a) for a in args]}) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:  # died (BrokenPipe), or stdin already closed
            with self._lock:
                self.job = None
            raise BrokenPipeError(str(exc)) from None
        return job

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            event = parse_event(line)
            if event is None:
                continue
            kind = event.get("event")
            if kind == "ready":
                self.ready.set()
                continue
            job = self.job
            if job is None:
                continue
            if kind == "job":
                job.accepted = True
                continue
            if kind == "exit":
                rc = int(event.get("exit_code", 1))
                if rc not in KEEP_SERVING:
                    self.retiring = True
                job._stdout_done(rc)
            else:
                job._events.put(event)
        self._ended()

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            line = line.rstrip("\n")
            job = self.job
            if line == JOB_END_MARKER:
                if job is not None:
                    job._stderr_done()
            elif job is not None:
                job._stderr.append(line)
            else:
                self.preamble.append(line)
        self._ended()

    def _ended(self) -> None:
        """A pipe closed: the worker is gone; its running job ends with the exit code."""
        proc = self._proc
        if proc is None:
            return
        self._closed.set()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - closed its pipes but did not exit
            rc = -9
        job = self.job
        if job is not None:
            job._worker_died(rc)

    def _job_finished(self, job: WorkerJob) -> None:
        with self._lock:
            if self.job is job:
                self.job = None
                self.jobs_served += 1

    def stop(self, grace_s: float = 3.0) -> None:
        """Kill the worker and its children (terminate, then kill after `grace_s`)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        kill_tree(proc, grace_s, self.alive)
        for t in self._threads:
            t.join(timeout=5)

    def close(self) -> None:
        """Module closed: end of stdin lets an idle worker exit on its own; a busy one is killed."""
        proc = self._proc
        if proc is None:
            return
        if self.job is not None:
            self.stop()
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.stop()


class WorkerJob:
    """One segment job in a warm worker, with the interface of `SegmentProcess`."""

    def __init__(self, worker: WarmWorker, fallback: Callable[[], Any] | None = None) -> None:
        self.worker = worker
        self._fallback = fallback
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: list[str] = []
        self._rc: int | None = None
        self._got_exit = self._got_stderr = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.delegate: Any = None   # the one-shot process that took over (worker never got ready)
        self.cancelled = False
        self.accepted = False       # the worker read the job (it acknowledges with {"event": "job"})
        self.started = time.monotonic()

    # --- from the worker's reader threads
    def _stdout_done(self, rc: int) -> None:
        with self._lock:
            self._rc, self._got_exit = rc, True
            self._maybe_done()

    def _stderr_done(self) -> None:
        with self._lock:
            self._got_stderr = True
            self._maybe_done()

    def _worker_died(self, rc: int) -> None:
        with self._lock:
            if self._rc is None or not self._got_exit:
                self._rc = rc
            self._got_exit = self._got_stderr = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._got_exit and self._got_stderr and not self._done.is_set():
            self.worker._job_finished(self)
            self._done.set()

    # --- fallback: a worker that died before it read the job (never ready, or killed just
    # before the job arrived) never ran it: a one-shot process runs it instead
    def _check_fallback(self) -> None:
        if (self.delegate is None and self._fallback is not None and self._done.is_set() and not self.cancelled
                and not self.accepted):
            self.delegate = self._fallback()
            self._fallback = None

    @property
    def used_worker(self) -> bool:
        self._check_fallback()
        return self.delegate is None

    # --- the SegmentProcess interface
    @property
    def pid(self) -> int | None:
        return self.delegate.pid if self.delegate is not None else self.worker.pid

    def is_running(self) -> bool:
        self._check_fallback()
        if self.delegate is not None:
            return bool(self.delegate.is_running())
        return not self._done.is_set()

    def poll_events(self) -> list[dict[str, Any]]:
        self._check_fallback()
        if self.delegate is not None:
            return list(self.delegate.poll_events())
        return drain(self._events)

    @property
    def returncode(self) -> int | None:
        self._check_fallback()
        if self.delegate is not None:
            return self.delegate.returncode
        return self._rc if self._done.is_set() else None

    @property
    def stderr_text(self) -> str:
        if self.delegate is not None:
            return str(self.delegate.stderr_text)
        return "\n".join(self._stderr)

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.worker.command, timeout or 0)
        self._check_fallback()
        if self.delegate is not None:
            return int(self.delegate.wait(timeout))
        assert self._rc is not None
        return self._rc

    def cancel(self, grace_s: float = 3.0) -> None:
        """Kill the worker's process tree (a fresh worker is started by the logic)."""
        self.cancelled = True
        if self.delegate is not None:
            self.delegate.cancel(grace_s)
            return
        if not self._done.is_set():
            self.worker.stop(grace_s)
            self._done.wait(timeout=10)
