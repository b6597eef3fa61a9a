"""What locally weighted atlas votes (abdomen-ct 2.3.0) cost against equal votes (2.2.0), in one run.

The same package twice: as shipped, and a copy whose `local_weight_power` is 0 (every atlas
counts the same; otherwise identical). Each segments the 512x512x400 CT through the CLI in a
child process, alternating so both see the same machine load; medians of `--repeats` runs of
the whole read-to-write time and of the atlas step, the peak RSS, the ratio weighted / equal,
and how many voxels the two label maps disagree on.

    python benchmarks/bench_atlas_votes.py [--model PATH] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import REPO, large_ct, measure_module, median, table

sys.path.insert(0, str(REPO))

from CascadeSegLib.packaging.model import ModelPackage, load_model  # noqa: E402


def equal_votes_copy(model: ModelPackage, folder: Path) -> Path:
    """`model` copied into `folder` with every atlas voting alike."""
    shutil.copytree(model.root, folder, dirs_exist_ok=True)
    copy = ModelPackage.load(folder)
    assert copy.atlas_prior is not None
    copy.atlas_prior.local_weight_power = 0.0
    copy.save(folder)
    return folder


def segment(ct: Path, model: Path, out: Path, extra: list[str]) -> dict:
    r = measure_module("CascadeSegLib", ["segment", str(ct), "-o", str(out), "--progress-json", "--no-report",
                                         "--overwrite", "--model", str(model), *extra])
    done = [e for e in r["events"] if e["event"] == "done"][-1]
    return {"wall": r["wall"], "peak": r["peak_rss"], "atlas": done["timings"].get("atlas_prior", 0.0),
            "total": done["timings"]["total"], "labels": done["outputs"]["labels"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a package with atlases (default: the default model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    model = ModelPackage.load(args.model) if args.model else load_model()
    if model.atlas_prior is None or model.atlas_prior.local_weight_power <= 0:
        print(f"{model.name} {model.version} has no locally weighted atlas votes to compare", file=sys.stderr)
        return 2
    ct = large_ct()
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cascadeseg-votes-") as tmp:
        variants = {"weighted": model.root, "equal": equal_votes_copy(model, Path(tmp) / "equal")}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.repeats):
            for name, path in variants.items():
                runs[name].append(segment(ct, path, Path(tmp) / f"out-{name}", extra))
                if i == 0:
                    kept = Path(tmp) / f"{name}.nii.gz"
                    shutil.copy2(runs[name][-1]["labels"], kept)
                    runs[name][-1]["labels"] = str(kept)
                r = runs[name][-1]
                print(f"  {name} run {i + 1}/{args.repeats}: {r['wall']:.1f} s wall, atlases {r['atlas']:.1f} s, "
                      f"peak {r['peak'] / 2**30:.2f} GiB", file=sys.stderr)
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(runs[n][0]["labels"])) for n in ("weighted", "equal"))
        differ = float(np.mean(a != b))
    rows = []
    for name, rs in runs.items():
        rows.append({"variant": f"{name} votes" + (" (shipped)" if name == "weighted" else ""),
                     "wall": f"{median([r['wall'] for r in rs]):.2f}",
                     "atlas": f"{median([r['atlas'] for r in rs]):.2f}",
                     "peak": f"{max(r['peak'] for r in rs) / 2**30:.2f}"})
    ratio = median([r["wall"] for r in runs["weighted"]]) / median([r["wall"] for r in runs["equal"]])
    text = "\n".join([
        f"{model.name} {model.version}, {'x'.join(map(str, sitk.ReadImage(str(ct)).GetSize()))} CT, read -> segment "
        f"-> write through the CLI, medians of {args.repeats} alternating runs",
        "",
        table(rows, [("variant", "atlas votes"), ("wall", "end to end (s)"), ("atlas", "atlas step (s)"),
                     ("peak", "peak RSS (GiB)")]),
        "",
        f"weighted / equal end to end: {ratio:.2f}x; labels differ on {100 * differ:.2f} % of the voxels",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
