"""Where a training run stands, read from its folder alone: a CPU run goes on over several sittings,
and between them the researcher wants to know how far each stage got and how long the rest takes."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import checkpoint as ckpt
from .run_folder import load_run_config

RATE_ROWS = 50
"""Seconds per iteration: the median step over this many of the log's last rows."""


@dataclass
class StageStatus:
    name: str
    planned: int                       # iterations the stage trains to (config, --iterations, --minutes fit)
    logged: int                        # the last iteration in log.csv (flushed every ten)
    checkpoint: int | None             # the newest checkpoint's iteration (a resume starts there)
    finished: bool                     # done.json written: the stage is complete
    loss: float | None                 # mean loss of the last ten logged iterations
    seconds_per_iteration: float | None

    @property
    def remaining_seconds(self) -> float | None:
        if self.finished:
            return 0.0
        if self.seconds_per_iteration is None:
            return None
        return max(0, self.planned - self.logged) * self.seconds_per_iteration

    def to_json(self) -> dict[str, Any]:
        doc = {**asdict(self), "remaining_seconds": self.remaining_seconds}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in doc.items()}


def resolve_run_dir(path: str | Path) -> Path:
    """The training folder itself, or the `networks/` folder of a `configs/train_prepared.py all` run."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "networks" / "config.json").is_file():
        return p / "networks"
    raise UserError(f"{p} is not a training run folder (no config.json in it or in {p / 'networks'}); "
                    "pass the --run-dir the run was started with")


def read_log_rows(path: Path) -> list[dict[str, str]]:
    """A stage's log.csv rows; a row cut short by a power cut mid-write (no seconds field) is left out,
    so neither this report nor a resume reads a wrong iteration from it."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if (r.get("iteration") or "").isdigit() and r.get("seconds")]


def _rate(rows: list[dict[str, str]]) -> float | None:
    """Median seconds per iteration between consecutive rows of one sitting (the clock restarts at a
    resume, and a pause shows as one long step, which the median ignores)."""
    steps = []
    tail = rows[-(RATE_ROWS + 1):]
    for a, b in zip(tail, tail[1:]):
        try:
            di, ds = int(b["iteration"]) - int(a["iteration"]), float(b["seconds"]) - float(a["seconds"])
        except (KeyError, TypeError, ValueError):    # a field missing from a row cut short
            continue
        if di > 0 and ds > 0:
            steps.append(ds / di)
    return statistics.median(steps) if steps else None


def _number(text: str | None) -> bool:
    try:
        return text is not None and float(text) == float(text)       # not empty, not NaN
    except ValueError:
        return False


def stage_status(run_dir: Path, name: str, configured: int, fitted: dict[str, Any]) -> StageStatus:
    folder = run_dir / name
    rows = read_log_rows(folder / "log.csv")
    done_path = folder / "done.json"
    done = json.loads(done_path.read_text(encoding="utf-8")) if done_path.is_file() else None
    planned = int(done["iterations"]) if done else int(fitted.get(name, configured))
    saved = ckpt.list_checkpoints(folder / "checkpoints")
    losses = [float(r["loss"]) for r in rows[-10:] if _number(r.get("loss"))]
    return StageStatus(name=name, planned=planned, logged=int(rows[-1]["iteration"]) if rows else 0,
                       checkpoint=int(saved[0].stem.split("_")[1]) if saved else None, finished=done is not None,
                       loss=statistics.fmean(losses) if losses else None, seconds_per_iteration=_rate(rows))


def run_status(path: str | Path) -> tuple[Path, list[StageStatus]]:
    run_dir = resolve_run_dir(path)
    cfg, _ = load_run_config(run_dir)
    fitted_path = run_dir / "fitted.json"
    fitted = json.loads(fitted_path.read_text(encoding="utf-8")) if fitted_path.is_file() else {}
    return run_dir, [stage_status(run_dir, s.name, s.train.iterations, fitted) for s in cfg.stages]


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def status_line(s: StageStatus) -> str:
    if s.finished:
        return f"{s.name}: done, {s.planned} iterations"
    if s.logged == 0 and s.checkpoint is None:
        return f"{s.name}: not started, {s.planned} iterations to train"
    saved = "no checkpoint yet (a resume starts at 0)" if s.checkpoint is None else \
        f"checkpoint at {s.checkpoint} (a resume starts there)"
    text = f"{s.name}: {s.logged} of {s.planned} iterations ({100 * s.logged / max(1, s.planned):.0f} %), {saved}"
    if s.loss is not None:
        text += f", loss {s.loss:.3f}"
    if s.seconds_per_iteration is not None and s.remaining_seconds is not None:
        text += (f", {s.seconds_per_iteration:.1f} s an iteration: about {_duration(s.remaining_seconds)} to go "
                 "at that speed")
    return text
