"""Measured peak memory of `cascadeseg segment` vs CascadeSegLib.inference.memory's estimate.

A 512x512x400 int16 phantom (0.78 x 0.78 x 1.0 mm) is segmented through the CLI in a child
process per configuration; the child's peak RSS comes from
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss in a wrapper process that only runs it. The
estimate is what `segment` checks before reading the voxels (memory.estimate_memory).

    python benchmarks/memory_estimate.py [--size 512,512,400] [--fine]

`--fine` adds a model with a 2 mm stage-2 grid (stage 2 dominates, like a real model); the
default random test model (8 mm / 5 mm) is dominated by the input-grid work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))

import SimpleITK as sitk  # noqa: E402

from CascadeSegLib.inference import memory  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402
from CascadeSegLib.phantom import make_phantom  # noqa: E402

WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024   # Linux: KiB
print(json.dumps({"peak_rss": peak, "wall": time.perf_counter() - t0, "code": proc.returncode,
                  "stderr": proc.stderr[-1500:]}))
"""


def measure(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "CascadeSegLib", *args],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    from model_factory import make_random_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512,512,400")
    ap.add_argument("--fine", action="store_true", help="also a model with a 2 mm stage-2 grid")
    opts = ap.parse_args()
    size = tuple(int(v) for v in opts.size.split(","))
    spacing = (400.0 / size[0], 400.0 / size[1], 1.0)
    work = Path(tempfile.mkdtemp(prefix="cascadeseg-mem-"))
    t0 = time.perf_counter()
    ct, _ = make_phantom(size=size, spacing=spacing, seed=0)
    ct_path = work / "ct.nrrd"
    sitk.WriteImage(ct, str(ct_path), False)
    del ct
    print(f"phantom {'x'.join(map(str, size))} int16 written in {time.perf_counter() - t0:.1f} s ({ct_path})")

    models = {"random 8/5 mm": make_random_model(work / "coarse")}
    if opts.fine:
        models["random 8/2 mm"] = make_random_model(work / "fine", spacing2=(2.0, 2.0, 2.0))
    configs = [("default", []), ("--stage1-only", ["--stage1-only"]),
               ("--save-probabilities --save-candidates", ["--save-probabilities", "--save-candidates"])]
    rows = []
    for mname, model in models.items():
        model = ModelPackage.load(model.root)
        for cname, extra in configs:
            est = memory.estimate_memory(size, sitk.sitkInt16, model, spacing_xyz=spacing,
                                         stage1_only="--stage1-only" in extra,
                                         keep_probabilities="--save-probabilities" in extra,
                                         keep_candidates="--save-candidates" in extra, device="cpu")
            out = work / f"out-{len(rows)}"
            res = measure(["segment", str(ct_path), "-o", str(out), "--model", str(model.root), "--device", "cpu",
                           "--no-report", "--quiet", *extra])
            if res["code"] != 0:
                print(f"{mname} {cname}: failed: {res['stderr']}")
                continue
            rows.append((mname, cname, res["peak_rss"], est.total, est.phase, res["wall"]))
    print()
    print(f"{'model':<15} {'options':<40} {'peak RSS':>9} {'estimate':>9} {'est/peak':>8}  "
          f"{'peak phase (est.)':<20} {'wall':>6}")
    for mname, cname, peak, est, phase, wall in rows:
        print(f"{mname:<15} {cname:<40} {memory.format_bytes(peak):>9} {memory.format_bytes(est):>9} "
              f"{est / peak:>8.2f}  {phase:<20} {wall:>5.1f}s")
    huge = memory.estimate_peak_bytes((1024, 1024, 2000), "int16", next(iter(models.values())),
                                      spacing_xyz=(0.7, 0.7, 0.5))
    print(f"\navailable now: {memory.format_bytes(memory.available_bytes())}; a 1024x1024x2000 int16 CT at "
          f"0.7/0.7/0.5 mm would need {memory.format_bytes(huge)}"
          " with the coarse model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
