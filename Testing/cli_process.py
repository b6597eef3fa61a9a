"""Run `cascadeseg` as a real process, as a user or a job array does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_TS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "CascadeSegLib", *map(str, args)]


def cascadeseg(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run one command to its end; stdout and stderr as text."""
    return subprocess.run(command(*args), capture_output=True, text=True, env=child_env(**env), timeout=timeout,
                          cwd=REPO)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split()[2] != "Z"
    except FileNotFoundError:
        return False
