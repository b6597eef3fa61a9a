"""Issues 7 and 16: CascadeSeg vs MONAI's sliding window, nnU-Net v2's predictor and the paper.

Same 512x512x400 CT, same network weights (the model's stage-2 network for the peers), each in
its own child process (peak RSS measured), medians over repeats for CascadeSeg. Also prints
the achieved GFLOP/s of the network part against this machine's measured matmul peak, and
(--scaling) time and memory against the number of slices.

Peers (`--peers`, comma-separated; default monai,paper):
- monai: MONAI's `sliding_window_inference` over the whole volume (`monai_peer.py`);
- nnunet: nnU-Net v2's `nnUNetPredictor`, manually initialised with the same stage-2 network
  and weights, TotalSegmentator's fast settings (tile step 0.5, Gaussian, no mirroring), with
  nnU-Net's own reading, preprocessing and export (`nnunet_peer.py`). What TotalSegmentator,
  SlicerNNUNet and Auto3DSeg's nnU-Net run. Without `--stage2-spacing` it sets 1.5 mm (the
  issue's comparison: stage 2 at half the resolution of the 0.7 mm CT, for both sides).
  The run ends with the line `speedup over nnU-Net v2 predictor: N.Nx`;
- paper: the paper's 3D U-Net timed on sample tiles, extrapolated to its tile plan.
A peer whose package is not installed is skipped with a one-line message.

Benchmark-only dependencies, in the benchmark's own environment (naming the CPU torch in the
same pip command keeps pip from replacing it with a CUDA build):

    pip install monai
    python3 -m venv /work/venv-bench && . /work/venv-bench/bin/activate
    pip install torch==2.13.0 nnunetv2 -e .      # from the repository root
    python benchmarks/bench_peers.py --peers nnunet --repeats 1
    python benchmarks/bench_peers.py [--model NAME] [--repeats 3] [--stage2-spacing 1.5] [--peers monai,nnunet,paper]
                                     [--scaling 100,200,400,700,1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import MEASURE_WRAPPER, large_ct, long_ct, measure_module, run_child, table
from flops import conv_flops, matmul_peak_gflops

HERE = Path(__file__).resolve().parent


def cascade_runs(ct: Path, model: str | None, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            args = ["segment", str(ct), "-o", out, "--progress-json", "--no-report"]
            if model:
                args += ["--model", model]
            r = measure_module("CascadeSegLib", args)
            done = [e for e in r["events"] if e["event"] == "done"][-1]
            runs.append({"wall": r["wall"], "peak": r["peak_rss"], "t": done["timings"], "stats": done["stats"]})
    med = {k: statistics.median(r["t"].get(k, 0.0) for r in runs) for k in runs[0]["t"]}
    return {"timings": med, "wall": statistics.median(r["wall"] for r in runs),
            "peak": max(r["peak"] for r in runs), "stats": runs[0]["stats"], "n": len(runs)}


def monai_run(ct: Path, model: str | None, overlap: float) -> dict:
    return peer_run("monai_peer.py", ct, model, ["--overlap", str(overlap)])


def peer_run(script: str, ct: Path, model: str | None, extra: list[str] | None = None) -> dict:
    """One run of a peer script in its own measured child: its JSON timings, wall and peak RSS."""
    with tempfile.TemporaryDirectory() as out:
        args = [str(HERE / script), str(ct), str(Path(out) / "labels.nii.gz"), *(extra or [])]
        if model:
            args += ["--model", model]
        by_path = MEASURE_WRAPPER.replace("runpy.run_module(sys.argv[0], run_name=\"__main__\")",
                                          "runpy.run_path(sys.argv[0], run_name=\"__main__\")")
        wall, _, stdout, err = run_child(["-c", by_path,
                                          *args], env={"PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])})
    stats = json.loads(err.strip().splitlines()[-1])
    done = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    return {**done, "timings": done["timings"], "wall": wall, "peak": stats["peak_rss"], "grid": done["grid"]}


PEER_PACKAGES = {"monai": ("monai", "pip install monai"),
                 "nnunet": ("nnunetv2", "pip install torch==<this torch> nnunetv2 in the benchmark's environment")}


def available(peer: str) -> bool:
    """True when the peer's package imports here; otherwise one line on stdout, and False."""
    import importlib.util

    if peer not in PEER_PACKAGES:
        return True
    package, how = PEER_PACKAGES[peer]
    if importlib.util.find_spec(package) is None:
        print(f"{peer} peer skipped: {package} is not installed ({how})")
        return False
    return True


def respaced_model(name: str | None, spacing: float) -> Path:
    """A copy of the model whose stage 2 runs at `spacing` mm (same weights, same C2 from stage 1)."""
    import shutil

    from CascadeSegLib.packaging.model import ModelPackage, find_model

    src = find_model(name)
    dst = Path(tempfile.mkdtemp(prefix="cascadeseg-bench-")) / f"{src.name}-stage2-{spacing:g}mm"
    shutil.copytree(src, dst)
    pkg = ModelPackage.load(dst)
    pkg.stages[-1].spacing = (spacing, spacing, spacing)
    pkg.name = dst.name
    pkg.save(dst)
    return dst


def windows(grid_xyz, roi_zyx, overlap: float) -> int:
    n = 1
    for size, roi in zip(grid_xyz[::-1], roi_zyx):
        interval = max(int(roi * (1 - overlap)), 1)
        n *= 1 if size <= roi else math.ceil((size - roi) / interval) + 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--paper-tiles", type=int, default=2)
    ap.add_argument("--scaling", default="", help="comma-separated slice counts for the cost-scaling table")
    ap.add_argument("--size", default="512,512,400",
                    help="CT size x,y,z (the sample CT resampled; default 512,512,400)")
    ap.add_argument("--peers", default="monai,paper",
                    help="comma-separated peers: monai, nnunet, paper (default monai,paper)")
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument("--stage2-spacing", type=float, default=None,
                    help="run the model's stage-2 network (same weights) on this finer grid, e.g. 1.5 mm = half "
                         "the resolution of a 0.7 mm CT, where whole-volume inference is what peers pay for "
                         "(default with the nnunet peer: 1.5)")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - {"monai", "nnunet", "paper"}
    if unknown:
        ap.error(f"unknown peers: {', '.join(sorted(unknown))} (choose from monai, nnunet, paper)")
    if args.skip_monai and "monai" in peers:
        peers.remove("monai")
    peers = [p for p in peers if available(p)]
    if "nnunet" in peers and args.stage2_spacing is None:
        args.stage2_spacing = 1.5
        print("stage 2 at 1.5 mm for CascadeSeg and nnU-Net (same weights; --stage2-spacing to change)",
              file=sys.stderr)
    if args.stage2_spacing:
        args.model = str(respaced_model(args.model, args.stage2_spacing))

    from CascadeSegLib.network import fold_batchnorm
    from CascadeSegLib.packaging.model import load_model

    model = load_model(args.model)
    size = tuple(int(v) for v in args.size.split(","))
    ct = large_ct(size)
    n_vox = int(np.prod(size))
    peak_gflops = matmul_peak_gflops()
    print(f"model {model.name} {model.version}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak {peak_gflops:.0f} GFLOP/s", file=sys.stderr)

    ours = cascade_runs(ct, args.model, args.repeats)
    flops_ours = 0
    for i, stage in enumerate(model.stages):
        key = f"stage{i + 1}"
        tiles = ours["stats"].get(f"{key}_tiles", 0)
        if tiles:
            net = fold_batchnorm(model.load_network(i))
            # A padded network's FLOPs are proportional to the voxels it computes.
            per_voxel = conv_flops(net, tuple(stage.tile_zyx)) / int(np.prod(stage.tile_zyx))
            flops_ours += per_voxel * ours["stats"][f"{key}_computed_voxels"]
    t = ours["timings"]
    net_time = t.get("stage1", 0) + t.get("stage2", 0)
    rows = [{"cfg": "CascadeSeg cascade", "s1": f"{t.get('stage1', 0):.1f}", "s2": f"{t.get('stage2', 0):.1f}",
             "total": f"{t['total']:.1f}", "vps": f"{n_vox / t['total'] / 1e6:.1f}",
             "peak": f"{ours['peak'] / 2**30:.2f}",
             "gf": f"{flops_ours / net_time / 1e9:.0f} ({flops_ours / net_time / 1e9 / peak_gflops:.0%})",
             "how": f"median of {ours['n']}; tiles {ours['stats'].get('stage1_tiles')}"
                    f"+{ours['stats'].get('stage2_tiles')}"}]
    result = {"ours": ours, "peak_gflops": peak_gflops}
    if "monai" in peers:
        peer = monai_run(ct, args.model, args.overlap)
        stage = model.stages[-1]
        net = fold_batchnorm(model.load_network(len(model.stages) - 1))
        n_win = windows(peer["grid"], stage.tile_zyx, args.overlap)
        flops_peer = n_win * conv_flops(net, stage.tile_zyx)
        pt = peer["timings"]
        rows.append({"cfg": f"MONAI sliding window ({args.overlap} overlap)", "s1": "-", "s2": f"{pt['network']:.1f}",
                     "total": f"{pt['total']:.1f}", "vps": f"{n_vox / pt['total'] / 1e6:.1f}",
                     "peak": f"{peer['peak'] / 2**30:.2f}",
                     "gf": f"{flops_peer / pt['network'] / 1e9:.0f} "
                           f"({flops_peer / pt['network'] / 1e9 / peak_gflops:.0%})",
                     "how": f"1 run; {n_win} windows over the whole {peer['grid']} grid"})
        result["monai"] = peer
    if "nnunet" in peers:
        peer = peer_run("nnunet_peer.py", ct, args.model)
        stage = model.stages[-1]
        net = fold_batchnorm(model.load_network(len(model.stages) - 1))
        flops_peer = peer["windows"] * conv_flops(net, stage.tile_zyx)
        pt = peer["timings"]
        gflops = flops_peer / pt["network"] / 1e9
        rows.append({"cfg": "nnU-Net v2 predictor (step 0.5, Gaussian, no mirroring)", "s1": "-",
                     "s2": f"{pt['network']:.1f}", "total": f"{pt['total']:.1f}",
                     "vps": f"{n_vox / pt['total'] / 1e6:.1f}", "peak": f"{peer['peak'] / 2**30:.2f}",
                     "gf": f"{gflops:.0f} ({gflops / peak_gflops:.0%})",
                     "how": f"1 run; {peer['windows']} windows over the whole {peer['grid']} grid; read "
                            f"{pt['read']:.1f}, preprocess {pt['preprocess']:.1f}, export {pt['export']:.1f} s"})
        result["nnunet"] = peer
    paper_total = None
    if "paper" in peers:
        from bench_cascade import paper_estimate

        with tempfile.TemporaryDirectory() as out:
            r = measure_module("CascadeSegLib", ["segment", str(ct), "-o", str(Path(out) / "l.nii.gz"), "--quiet"]
                               + (["--model", args.model] if args.model else []))
            labels_ct = sitk.ReadImage(str(Path(out) / "l.nii.gz"))
        paper = paper_estimate(ct, labels_ct, args.paper_tiles)
        other = t["total"] - net_time
        paper_total = paper["stage1"] + paper["stage2"] + other
        rows.append({"cfg": "paper 3D U-Net (Roth 2018)", "s1": f"{paper['stage1']:.0f}",
                     "s2": f"{paper['stage2']:.0f}",
                     "total": f"{paper_total:.0f}", "vps": f"{n_vox / paper_total / 1e6:.2f}", "peak": "-", "gf": "-",
                     "how": f"{paper['per_tile']:.1f} s/tile x {paper['tiles1']}+{paper['tiles2']} tiles "
                            "(extrapolated)"})
    print()
    print(f"{size[0]}x{size[1]}x{size[2]} CT, read -> segment -> write, seconds ({os.cpu_count()}-core CPU; "
          f"stage 2 at {model.stages[-1].spacing[0]:g} mm)")
    print(table(rows, [("cfg", "configuration"), ("s1", "stage 1"), ("s2", "stage 2 / network"),
                       ("total", "end to end"),
                       ("vps", "M input voxels/s"), ("peak", "peak RSS GiB"), ("gf", "network GFLOP/s (of peak)"),
                       ("how", "how measured")]))
    print()
    if "monai" in result:
        print(f"ratio MONAI / CascadeSeg (end to end): {result['monai']['timings']['total'] / t['total']:.1f}x")
    if paper_total is not None:
        print(f"ratio paper / CascadeSeg (end to end): {paper_total / t['total']:.1f}x")
    print("CascadeSeg steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))

    if args.scaling:
        for title, make in (("longer scans: 512x512xN at 0.84 mm, the CT continued by its mirror image, so "
                             "anatomy and candidate regions grow with N", long_ct),
                            ("same anatomy stretched over N slices (network work constant)",
                             lambda n: large_ct((512, 512, n)))):
            srows = []
            for n in [int(v) for v in args.scaling.split(",")]:
                path = make(n)
                r = cascade_runs(path, args.model, 1)
                st = r["stats"]
                computed = st.get("stage1_computed_voxels", 0) + st.get("stage2_computed_voxels", 0)
                srows.append({"n": n, "vox": f"{512 * 512 * n / 1e6:.0f}", "t": f"{r['timings']['total']:.1f}",
                              "per": f"{r['timings']['total'] / (512 * 512 * n / 1e6) * 1000:.0f}",
                              "net": f"{computed / 1e6:.1f}",
                              "peak": f"{r['peak'] / 2**30:.2f}"})
                if path.name != "ct_512x512x400.nii.gz":
                    path.unlink()
            print()
            print(f"Cost scaling, {title}")
            print(table(srows, [("n", "slices"), ("vox", "M voxels"), ("t", "end to end s"),
                                ("per", "ms per M voxels"), ("net", "M voxels through the networks"),
                                ("peak", "peak RSS GiB")]))
    if "nnunet" in result:
        print(f"speedup over nnU-Net v2 predictor: {result['nnunet']['timings']['total'] / t['total']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
