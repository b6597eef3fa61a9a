"""What a batch run did with each case, for people (summary lines) and for job arrays (JSON).

A cohort run keeps going after a failed case, so the end of the run must say which cases
failed and why. Each shard of a job array writes its own summary file (no two processes
share a file); `cascadeseg summarize OUT/` merges them and notices shards that never finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_write
from .errors import UserError

SUMMARY_GLOB = "cascadeseg-summary-shard*.json"
STATUSES = ("done", "skipped", "failed")


def summary_name(shard_i: int, shard_n: int) -> str:
    return f"cascadeseg-summary-shard{shard_i}of{shard_n}.json"


@dataclass
class BatchSummary:
    """Status of every case of one run (one shard): done, skipped (outputs exist) or failed."""

    shard: tuple[int, int] = (0, 1)
    input: str = ""
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, case: str, status: str, reason: str = "", seconds: float | None = None) -> None:
        assert status in STATUSES, status
        entry: dict[str, Any] = {"status": status}
        if reason:
            entry["reason"] = reason
        if seconds is not None:
            entry["seconds"] = round(seconds, 2)
        self.cases[case] = entry

    def count(self, status: str) -> int:
        return sum(1 for c in self.cases.values() if c["status"] == status)

    @property
    def failed(self) -> dict[str, str]:
        return {k: c.get("reason", "") for k, c in self.cases.items() if c["status"] == "failed"}

    def lines(self) -> list[str]:
        """'N cases: a done, b skipped (outputs exist), c failed' and one line per failure."""
        head = (f"cascadeseg: {len(self.cases)} case{'s' if len(self.cases) != 1 else ''}: {self.count('done')} "
                f"done, {self.count('skipped')} skipped (outputs exist), {self.count('failed')} failed")
        return [head] + [f"  failed {case}: {reason}" for case, reason in self.failed.items()]

    def to_json(self) -> dict[str, Any]:
        return {"cascadeseg": __version__, "shard": list(self.shard), "input": self.input,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "counts": {s: self.count(s) for s in STATUSES}, "cases": self.cases}

    def write(self, folder: Path) -> Path:
        """Atomically write this shard's summary file into `folder`."""
        path = folder / summary_name(*self.shard)
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, json.dumps(self.to_json(), indent=1) + "\n")


def merge_summaries(folder: Path) -> tuple[BatchSummary, list[int]]:
    """All shard summaries of `folder` merged; also the shard indices with no summary yet."""
    paths = sorted(folder.glob(SUMMARY_GLOB)) if folder.is_dir() else []
    if not paths:
        raise UserError(f"no {SUMMARY_GLOB} in {folder}; run `cascadeseg segment COHORT/ -o {folder}` "
                        "(with or without --shard) first")
    merged = BatchSummary()
    shards: dict[int, set[int]] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            i, n = (int(v) for v in data["shard"])
            cases = dict(data["cases"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot read {path} ({type(exc).__name__}); delete it and run that shard "
                            "again") from None
        shards.setdefault(n, set()).add(i)
        merged.input = merged.input or str(data.get("input", ""))
        for case, entry in cases.items():
            merged.cases.setdefault(case, entry)
            if entry.get("status") == "done" or merged.cases[case].get("status") == "failed":
                merged.cases[case] = entry  # a later success beats an earlier failure
    if len(shards) > 1:
        raise UserError(f"{folder} holds summaries of runs with different shard counts "
                        f"({', '.join(str(n) for n in sorted(shards))}); delete the stale "
                        f"{SUMMARY_GLOB} files and summarize again")
    (n, seen), = shards.items()
    merged.shard = (0, n)
    return merged, sorted(set(range(n)) - seen)
