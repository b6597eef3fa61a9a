"""Shared benchmark helpers: the 512x512x400 CT, child-process runs with peak memory, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def large_ct(size=(512, 512, 400), cache_dir: Path | None = None) -> Path:
    """The bundled sample CT (real anatomy) resampled to `size` voxels over the same extent.

    That is a 512x512x400 CT with ~0.6-0.8 mm voxels, the size of a clinical abdominal scan.
    """
    cache_dir = Path(cache_dir or tempfile.gettempdir()) / "cascadeseg-bench"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"ct_{size[0]}x{size[1]}x{size[2]}.nii.gz"
    if path.is_file():
        return path
    src = sitk.ReadImage(str(REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"))
    extent = [n * s for n, s in zip(src.GetSize(), src.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    ref = sitk.Image([int(v) for v in size], sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetDirection(src.GetDirection())
    # Keep the physical corner: the first voxel centre moves by half the change of voxel size.
    corner = src.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5])
    ref.SetOrigin(corner)
    ref.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    big = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(big, str(tmp), True)
    tmp.replace(path)
    return path


def long_ct(slices: int, cache_dir: Path | None = None) -> Path:
    """A longer scan: the 512x512x400 CT's slices continued by mirror images of itself to
    `slices` slices at the same 0.84 mm spacing, so body, organs and candidate regions grow
    with the volume (a whole-body-length scan at 1000 slices)."""
    import numpy as np

    base = sitk.ReadImage(str(large_ct((512, 512, 400), cache_dir)))
    cache_dir = Path(cache_dir or tempfile.gettempdir()) / "cascadeseg-bench"
    path = cache_dir / f"ct_512x512x{slices}_long.nii.gz"
    if path.is_file():
        return path
    arr = sitk.GetArrayViewFromImage(base)
    reps = -(-slices // arr.shape[0])
    stack = np.concatenate([arr if i % 2 == 0 else arr[::-1] for i in range(reps)])[:slices]
    img = sitk.GetImageFromArray(stack)
    img.SetSpacing(base.GetSpacing())
    img.SetOrigin(base.GetOrigin())
    img.SetDirection(base.GetDirection())
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(img, str(tmp), True)
    tmp.replace(path)
    return path


def run_child(args: list[str], env: dict | None = None) -> tuple[float, int, str, str]:
    """Run a Python child; return (wall seconds, peak RSS bytes, stdout, stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # communicate() reaped the child; RUSAGE_CHILDREN holds the max over children so far, so
    # each measured run goes in its own wrapper process that reports its own peak.
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {err.strip()[-2000:]}")
    return wall, 0, out, err


MEASURE_WRAPPER = r"""
import json, resource, runpy, sys, time
t0 = time.perf_counter()
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code or 0
# VmHWM belongs to this program's own address space; ru_maxrss would also count the pages
# of the benchmark process it was forked from (Linux carries the high-water mark over exec).
peak = 0
with open("/proc/self/status") as status:
    for line in status:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
if not peak:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sys.stderr.write("\n" + json.dumps({"peak_rss": peak, "wall": time.perf_counter() - t0, "code": code}) + "\n")
sys.exit(code)
"""


def measure_module(module: str, args: list[str], code: Path | None = None) -> dict:
    """Run `python -m module args` in a child (importing the package from the checkout `code`,
    default this one); wall time, peak RSS and its JSON-lines stdout."""
    env = {"PYTHONPATH": str(code)} if code is not None else None
    wall, _, out, err = run_child(["-c", MEASURE_WRAPPER, module, *args], env)
    stats = json.loads(err.strip().splitlines()[-1])
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"wall": wall, "peak_rss": stats["peak_rss"], "events": events, "stderr": err}


def median(values):
    return statistics.median(values)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(key, "")) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
