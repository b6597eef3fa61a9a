"""Issue 16 benchmark: the clinician's wait, from Segment to a segmentation node with closed surfaces.

Runs the Slicer module's own logic (`CascadeSegSlicer.logic.CascadeSegLogic.run`, what the
Segment button starts) headless with slicer-core's real MRML on a 512x512x400 CT (the sample
CT's anatomy resampled, as `bench_peers.py`), and in the same run, interleaved, the CLI on the
same file with the same arguments the module passes. Prints a markdown table with the steps of
the handoff:

- write volume: the scene's volume to an uncompressed NRRD in a temp folder (in Slicer);
- child: the handoff to the child and back (child wall time minus the CLI's own read-to-write
  time; includes up to 0.1 s until the poll sees the end). With the warm worker (the module's
  default) that is sending the job and parsing its arguments; the worker is started when the
  logic is made, right before the first Segment, so the first run waits for Python and torch
  to start and the model to load, as it would without the worker. `--no-worker`: every run
  starts a one-shot process (start Python, import torch and CascadeSegLib, load the model, exit);
- child: read, segment, write: the CLI's own timings (`done` event);
- read labels back, build segments, segmentation node, closed surfaces: in Slicer;
- other: polling, temp folder, whatever the listed steps do not cover.

The first run (right after the module's process started: cold caches) is reported separately;
the median is over the runs after it (over the one run when `--repeats 1`). The CLI's
read-to-write is the `total` of its `done` event, the same number `bench_peers.py` reports.

    pip install slicer-core   # benchmark and test dependency: MRML without the Slicer app
    python benchmarks/bench_slicer.py [--repeats 3] [--size 512,512,400] [--model NAME] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, large_ct, measure_module, table  # noqa: E402

sys.path.insert(0, str(REPO / "CascadeSeg"))
sys.path.insert(0, str(REPO))

from CascadeSegLib.resources import DEFAULT_MODEL  # noqa: E402 - no torch import

STEPS = [
    ("write volume", "write volume to temp NRRD (Slicer)"),
    ("child startup", "child: start (one-shot) or job handoff (warm worker), model load, exit"),
    ("cli read", "child: read the NRRD"),
    ("cli segment", "child: segment (resample, stage 1, C2, atlases, stage 2, labels to input grid)"),
    ("cli write", "child: write labels (.nii.gz + .seg.nrrd)"),
    ("read labels", "read labels back (Slicer)"),
    ("build segments", "build segments (Slicer)"),
    ("segmentation node", "segmentation node: copy, geometry (Slicer)"),
    ("closed surfaces", "build closed surfaces (Slicer)"),
    ("other", "other: polling, temp folder, process start"),
]


def slicer_run(logic, volume, params) -> dict:
    """One Segment: the module logic's blocking run; steps in seconds plus the node."""
    t0 = time.perf_counter()
    node = logic.run(volume, params, timeout_s=3600)
    total = time.perf_counter() - t0
    t = logic.timings
    cli_total = t["cli total"]
    steps = {
        "write volume": t["write volume"],
        "child startup": t["child"] - cli_total,
        "cli read": t.get("cli read", 0.0),
        "cli segment": sum(t.get(f"cli {k}", 0.0) for k in ("preprocess", "stage1", "c2", "atlas_prior", "stage2",
                                                             "refine", "postprocess")),
        "cli write": t.get("cli write", 0.0),
        "read labels": t["read labels"],
        "build segments": t["build segments"],
        "segmentation node": t["segmentation node"],
        "closed surfaces": t["closed surfaces"],
    }
    steps["other"] = total - sum(steps.values())
    return {"steps": steps, "total": total, "cli_total": cli_total, "node": node}


def cli_run(ct: Path, params) -> dict:
    """The CLI on the same file with the module's arguments, in its own process."""
    with tempfile.TemporaryDirectory() as out:
        r = measure_module("CascadeSegLib", params.cli_args(ct, out))
    done = [e for e in r["events"] if e.get("event") == "done"][-1]
    return {"total": float(done["timings"]["total"]), "wall": r["wall"], "timings": done["timings"]}


def segments_of(node) -> dict[str, int]:
    """Segment id -> number of voxels with its label value (the shared labelmap)."""
    import numpy as np
    import slicer
    from vtk.util import numpy_support

    seg = node.GetSegmentation()
    rep = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    out = {}
    for sid in seg.GetSegmentIDs():
        segment = seg.GetSegment(sid)
        image = segment.GetRepresentation(rep)
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        out[sid] = int(np.count_nonzero(arr == segment.GetLabelValue()))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="Segment runs (the first is reported apart; default 3)")
    ap.add_argument("--size", default="512,512,400",
                    help="CT size x,y,z (the sample CT resampled; default 512,512,400)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None, help="where the resampled CT is kept (default: the temp folder)")
    ap.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True,
                    help="Segment in the module's warm worker (default, as in Slicer); --no-worker: a one-shot "
                    "process per run")
    ap.add_argument("--note", default="", help="one line printed under the table (e.g. the machine's load)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    if len(size) != 3 or args.repeats < 1:
        ap.error("--size takes x,y,z and --repeats at least 1")

    import torch
    from CascadeSegSlicer.headless import make_scene
    from CascadeSegSlicer.logic import CascadeSegLogic
    from CascadeSegSlicer.parameters import SegmentParameters

    ct = large_ct(size, Path(args.cache_dir) if args.cache_dir else None)
    params = SegmentParameters(model=args.model, device=args.device)
    app = make_scene()
    volume = app.load_volume(str(ct), "ct")
    logic = CascadeSegLogic(app.scene, use_worker=args.worker)  # the module opens: the worker starts
    logic.prestart_worker()

    slicer_runs, cli_runs = [], []
    node = None
    for i in range(args.repeats):
        if node is not None:  # every run makes a new node (a new CT), not a rerun's replacement
            app.scene.RemoveNode(node)
        r = slicer_run(logic, volume, params)
        node = r.pop("node")
        slicer_runs.append(r)
        cli_runs.append(cli_run(ct, params))
        print(f"run {i + 1}/{args.repeats}: Segment -> closed surfaces {r['total']:.2f} s, "
              f"CLI read -> write {cli_runs[-1]['total']:.2f} s", file=sys.stderr)
    segments = segments_of(node)
    logic.shutdown_worker()

    first = slicer_runs[0]
    later = slicer_runs[1:] or slicer_runs
    med = {k: statistics.median(r["steps"][k] for r in later) for k in first["steps"]}
    med_total = statistics.median(r["total"] for r in later)
    cli_total = statistics.median(c["total"] for c in cli_runs)
    cli_wall = statistics.median(c["wall"] for c in cli_runs)
    n_med = len(later)
    med_title = f"median of runs 2-{args.repeats} (s)" if args.repeats > 1 else "median of 1 run (s)"
    rows = [{"step": title, "first": f"{first['steps'][key]:.2f}", "med": f"{med[key]:.2f}",
             "share": f"{med[key] / med_total:.0%}"} for key, title in STEPS]
    rows.append({"step": "**Segment -> segmentation node with closed surfaces**", "first": f"**{first['total']:.2f}**",
                 "med": f"**{med_total:.2f}**", "share": "100%"})
    rows.append({"step": f"CLI read -> write, same CT, same run (median of {len(cli_runs)})", "first": "",
                 "med": f"{cli_total:.2f}", "share": ""})
    rows.append({"step": "CLI process start -> exit (same runs)", "first": "", "med": f"{cli_wall:.2f}", "share": ""})
    ratio = med_total / cli_total
    ratio_first = first["total"] / cli_total
    lines = [
        f"{size[0]}x{size[1]}x{size[2]} CT, model {args.model}, device {args.device}, "
        f"{'warm worker' if args.worker else 'one-shot process per run'}; "
        f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{date.today().isoformat()}",
        "",
        table(rows, [("step", "step"), ("first", "first run (s)"), ("med", med_title), ("share", "share")]),
        "",
        f"slicer/cli: {ratio:.2f}x (first run: {ratio_first:.2f}x)",
        f"segments: {len(segments)} ({', '.join(f'{k} {v}' for k, v in segments.items())} voxels)",
    ]
    if args.note:
        lines.append(f"note: {args.note}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return {"text": text, "ratio": ratio, "ratio_first": ratio_first, "first": first, "median": med,
            "median_total": med_total, "median_runs": n_med, "cli_total": cli_total, "cli_wall": cli_wall,
            "segments": segments}


if __name__ == "__main__":
    main()
    sys.exit(0)
