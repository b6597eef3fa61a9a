"""Issue 3 benchmark: a 512x512x400 CT, the fast cascade vs the paper's network, in one run.

Fast: the model (default: bundled abdomen-ct-demo) end to end through the CLI in a child
process (read, both stages, write), repeated; medians reported with the peak RSS.
Paper: Roth et al.'s valid-convolution 3D U-Net (32-64 ... 256-512, 132x132x116 -> 44x44x28
tiles) on the paper's half-resolution grid, over the tiles that touch the same C1 and C2.
A full paper run takes tens of minutes on a 2-core CPU, so its network time is measured on a
sample of tiles and multiplied by the exact number of tiles its plan needs (said in the table).

    python benchmarks/bench_cascade.py [--model NAME] [--repeats 3] [--paper-tiles 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import large_ct, measure_module, table


def fast_runs(ct: Path, model: str | None, repeats: int, extra: list[str]) -> list[dict]:
    runs = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            args = ["segment", str(ct), "-o", out, "--progress-json", "--no-report"] + extra
            if model:
                args += ["--model", model]
            r = measure_module("CascadeSegLib", args)
            done = [e for e in r["events"] if e["event"] == "done"][-1]
            labels = sitk.ReadImage(done["outputs"]["labels"]) if i == 0 else None
            runs.append({"wall": r["wall"], "peak": r["peak_rss"], "timings": done["timings"], "labels": labels})
            print(f"  fast run {i + 1}/{repeats}: {r['wall']:.1f} s wall, peak {r['peak_rss'] / 2**30:.2f} GiB",
                  file=sys.stderr)
    return runs


def paper_estimate(ct: Path, labels: sitk.Image, sample_tiles: int) -> dict:
    """Time the paper's network on sample tiles; extrapolate to the tiles C1 and C2 need.

    C1 and C2 are made the paper's way on its half-resolution grid: the body mask, and the
    fast cascade's foreground dilated by 3 voxels.
    """
    from CascadeSegLib.inference.preprocess import body_mask, dilate, grid_for_spacing, resample
    from CascadeSegLib.inference.tiling import plan_tiles, tile_geometry
    from CascadeSegLib.network import NetConfig, build_network, fold_batchnorm

    image = sitk.ReadImage(str(ct))
    half = [2 * s for s in image.GetSpacing()]           # the paper: downsample by 2
    ref = grid_for_spacing(image, half)
    hu = torch.from_numpy(sitk.GetArrayFromImage(resample(image, ref, "linear", -1024, sitk.sitkFloat32)))
    fg = torch.from_numpy(sitk.GetArrayFromImage(resample(labels, ref, "nearest", 0)) > 0)
    masks = {"c1": body_mask(hu), "c2": dilate(fg, 3)}
    cfg = NetConfig.paper(num_classes=11)
    net = fold_batchnorm(build_network(cfg).eval())
    tile_in = (116, 132, 132)
    tile_out, _ = tile_geometry(cfg, tile_in)
    plans = {name: plan_tiles(m, tile_out, tile_in) for name, m in masks.items()}
    x = torch.randn(1, 1, *tile_in)
    times = []
    with torch.inference_mode():
        net(x)  # warm-up
        for _ in range(sample_tiles):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    per_tile = statistics.median(times)
    return {"grid": ref.GetSize(), "per_tile": per_tile, "tiles1": len(plans["c1"]), "tiles2": len(plans["c2"]),
            "stage1": per_tile * len(plans["c1"]), "stage2": per_tile * len(plans["c2"]),
            "voxels_per_tile": int(np.prod(tile_out))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paper-tiles", type=int, default=3)
    ap.add_argument("--size", default="512x512x400")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    ct = large_ct(size)
    n_vox = int(np.prod(size))
    print(f"CT: {ct} ({args.size}), torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    runs = fast_runs(ct, args.model, args.repeats, [])
    med = {k: statistics.median(r["timings"].get(k, 0.0) for r in runs) for k in runs[0]["timings"]}
    wall = statistics.median(r["wall"] for r in runs)
    peak = max(r["peak"] for r in runs)
    paper = paper_estimate(ct, runs[0]["labels"], args.paper_tiles)
    other = med["total"] - med.get("stage1", 0) - med.get("stage2", 0)
    paper_total = paper["stage1"] + paper["stage2"] + other
    rows = [
        {"config": "fast (model)", "stage1": f"{med.get('stage1', 0):.1f}", "stage2": f"{med.get('stage2', 0):.1f}",
         "other": f"{other:.1f}", "total": f"{med['total']:.1f}", "wall": f"{wall:.1f}",
         "vps": f"{n_vox / med['total'] / 1e6:.1f} M", "peak": f"{peak / 2**30:.2f}",
         "how": f"median of {len(runs)} runs"},
        {"config": "paper 3D U-Net", "stage1": f"{paper['stage1']:.0f}", "stage2": f"{paper['stage2']:.0f}",
         "other": f"{other:.1f}", "total": f"{paper_total:.0f}", "wall": "-",
         "vps": f"{n_vox / paper_total / 1e6:.2f} M", "peak": "-",
         "how": f"{paper['per_tile']:.2f} s/tile x {paper['tiles1']}+{paper['tiles2']} tiles (median of "
                f"{args.paper_tiles}), half-res grid {paper['grid']}"},
    ]
    print()
    print(f"512x512x400 CT, end to end (read -> both stages -> write), seconds; "
          f"{torch.get_num_threads()} CPU threads")
    print(table(rows, [("config", "configuration"), ("stage1", "stage 1"), ("stage2", "stage 2"),
                       ("other", "read+resample+write"), ("total", "end to end"), ("wall", "process wall"),
                       ("vps", "input voxels/s"), ("peak", "peak RSS GiB"), ("how", "how measured")]))
    print()
    print("fast steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    print(f"ratio paper / fast (end to end): {paper_total / med['total']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"fast": med, "fast_wall": wall, "fast_peak_rss": peak,
                                               "paper": paper, "paper_total": paper_total}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
