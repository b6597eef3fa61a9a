"""What a change to a package's atlas prior costs, against the package without it, in one run.

The same package twice: as shipped, and a baseline copy, otherwise identical:
`--baseline equal-votes` (default): every atlas counts the same (`local_weight_power` 0, as
before abdomen-ct 2.3.0); `--baseline without:s0327,s0328`: the atlases whose names contain any
of these left out (abdomen-ct 2.4.0 against 2.3.0's ten); `--baseline set:linear_iterations=200`:
one setting of the `"atlas_prior"` block changed (2.5.0 against 2.4.0's optimiser cap);
`--baseline package:PATH`: another package as it is (2.6.0's fine-tuned networks against 2.5.0's,
same atlases); `--baseline code:PATH`: the same package run by the library of another checkout
(`git worktree add /tmp/base REV`: a change to the library's registration or warping). Each
segments the 512x512x400 CT through the CLI in a child process, alternating so both see the same
machine load; medians of
`--repeats` runs of the whole read-to-write time and of the atlas step, the peak RSS, the ratio
shipped / baseline, and how many voxels the two label maps disagree on.

    python benchmarks/bench_atlas_prior.py [--model PATH] [--baseline B] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import REPO, large_ct, measure_module, median, table

sys.path.insert(0, str(REPO))

from CascadeSegLib.inference.atlas_prior import AtlasPriorSpec  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage, load_model  # noqa: E402


def baseline_copy(model: ModelPackage, baseline: str, folder: Path) -> tuple[Path, str]:
    """`model` copied into `folder` as `baseline` says (or another package, as it is, or the same
    one for another checkout's code), and the baseline's name for the table."""
    if baseline.startswith("code:"):
        return model.root, f"the same package, library of {baseline.removeprefix('code:')} (baseline code)"
    if baseline.startswith("package:"):
        other = ModelPackage.load(Path(baseline.removeprefix("package:")))
        return other.root, f"{other.name} {other.version} (baseline package)"
    shutil.copytree(model.root, folder, dirs_exist_ok=True)
    copy = ModelPackage.load(folder)
    assert copy.atlas_prior is not None
    if baseline == "equal-votes":
        copy.atlas_prior.local_weight_power = 0.0
        name = "equal votes"
    elif baseline.startswith("set:"):
        key, _, value = baseline.removeprefix("set:").partition("=")
        settings = copy.atlas_prior.to_json()
        if key not in settings or key == "atlases" or not value:
            raise SystemExit(f"error: --baseline {baseline}: give set:KEY=VALUE, KEY a setting of the atlas_prior "
                             "block")
        try:
            settings[key] = json.loads(value)
            copy.atlas_prior = AtlasPriorSpec.from_json(settings)
        except ValueError as e:              # not JSON, or a value the block refuses
            raise SystemExit(f"error: --baseline {baseline}: {e}") from None
        name = f"{key} = {value}"
    else:
        drop = [s for s in baseline.removeprefix("without:").split(",") if s]
        kept = [a for a in copy.atlas_prior.atlases if not any(s in a.name for s in drop)]
        if not drop or not kept or len(kept) == len(copy.atlas_prior.atlases):
            raise SystemExit(f"error: --baseline {baseline} leaves out no atlas or all of them")
        copy.atlas_prior.atlases = kept
        name = f"{len(kept)} atlases (without {', '.join(drop)})"
    copy.save(folder)
    return folder, name


def segment(ct: Path, model: Path, out: Path, code: Path | None = None) -> dict:
    r = measure_module("CascadeSegLib", ["segment", str(ct), "-o", str(out), "--progress-json", "--no-report",
                                         "--overwrite", "--model", str(model)], code)
    done = [e for e in r["events"] if e["event"] == "done"][-1]
    return {"wall": r["wall"], "peak": r["peak_rss"], "atlas": done["timings"].get("atlas_prior", 0.0),
            "total": done["timings"]["total"], "labels": done["outputs"]["labels"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a package with atlases (default: the default model)")
    ap.add_argument("--baseline", default="equal-votes",
                    help="equal-votes, without:NAME,... (the atlases whose names contain one left out), or "
                         "set:KEY=VALUE (one setting of the atlas_prior block), package:PATH (another "
                         "package), or code:PATH (the same package, the library of another checkout)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    model = ModelPackage.load(args.model) if args.model else load_model()
    if model.atlas_prior is None or (args.baseline == "equal-votes" and model.atlas_prior.local_weight_power <= 0):
        print(f"{model.name} {model.version} has no atlas prior, or no weighted votes, to compare", file=sys.stderr)
        return 2
    if args.baseline != "equal-votes" and not args.baseline.startswith(("without:", "set:", "package:", "code:")):
        print(f"--baseline {args.baseline}: give equal-votes, without:NAME,..., set:KEY=VALUE, package:PATH or "
              "code:PATH", file=sys.stderr)
        return 2
    baseline_code = Path(args.baseline.removeprefix("code:")).resolve() if args.baseline.startswith("code:") else None
    if baseline_code is not None and not (baseline_code / "CascadeSegLib" / "__init__.py").is_file():
        print(f"--baseline {args.baseline}: no CascadeSegLib there; give a checkout (git worktree add PATH REV)",
              file=sys.stderr)
        return 2
    if args.baseline.startswith("package:") and not (Path(args.baseline.removeprefix("package:")) /
                                                     "model.json").is_file():
        print(f"--baseline {args.baseline}: no model.json there; give a model package folder", file=sys.stderr)
        return 2
    ct = large_ct()
    with tempfile.TemporaryDirectory(prefix="cascadeseg-atlas-prior-") as tmp:
        base_path, base_name = baseline_copy(model, args.baseline, Path(tmp) / "baseline")
        shipped_name = (f"{len(model.atlas_prior.atlases)} atlases, "
                        f"{'weighted' if model.atlas_prior.local_weight_power > 0 else 'equal'} votes "
                        f"({'this checkout' if baseline_code is not None else 'shipped'})")
        variants = {"shipped": model.root, "baseline": base_path}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.repeats):
            for name, path in variants.items():
                runs[name].append(segment(ct, path, Path(tmp) / f"out-{name}",
                                          baseline_code if name == "baseline" else None))
                if i == 0:
                    kept = Path(tmp) / f"{name}.nii.gz"
                    shutil.copy2(runs[name][-1]["labels"], kept)
                    runs[name][-1]["labels"] = str(kept)
                r = runs[name][-1]
                print(f"  {name} run {i + 1}/{args.repeats}: {r['wall']:.1f} s wall, atlases {r['atlas']:.1f} s, "
                      f"peak {r['peak'] / 2**30:.2f} GiB", file=sys.stderr)
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(runs[n][0]["labels"])) for n in ("shipped", "baseline"))
        differ = float(np.mean(a != b))
    rows = []
    for name, rs in runs.items():
        rows.append({"variant": shipped_name if name == "shipped" else base_name,
                     "wall": f"{median([r['wall'] for r in rs]):.2f}",
                     "atlas": f"{median([r['atlas'] for r in rs]):.2f}",
                     "peak": f"{max(r['peak'] for r in rs) / 2**30:.2f}"})
    ratio = median([r["wall"] for r in runs["shipped"]]) / median([r["wall"] for r in runs["baseline"]])
    text = "\n".join([
        f"{model.name} {model.version}, {'x'.join(map(str, sitk.ReadImage(str(ct)).GetSize()))} CT, read -> segment "
        f"-> write through the CLI, medians of {args.repeats} alternating runs",
        "",
        table(rows, [("variant", "atlas prior"), ("wall", "end to end (s)"), ("atlas", "atlas step (s)"),
                     ("peak", "peak RSS (GiB)")]),
        "",
        f"shipped / baseline end to end: {ratio:.2f}x; labels differ on {100 * differ:.2f} % of the voxels",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
