"""What a stored correction adds as an atlas (`cascadeseg improve --iterations 0 --atlases`), measured.

A parent package (a leave-one-out fold package: networks and atlases that never saw the patient)
gets one correction, a labelled CT, through `improve_model` exactly as a user's would; parent and
improved package then segment a target and are scored against its reference:

- `--rescan SEED`: the target is the corrected patient scanned again, simulated: the correction's
  CT and labels moved (rotation up to 5 degrees, 15 mm, scale 5 %), bent by a smooth field (about
  8 mm), resampled to 3 mm slices and given 15 HU of noise. What a follow-up CT of a patient whose
  first CT was corrected would get;
- `--ct/--labels`: another patient (what the site's next patient would get).

    python configs/correction_atlas_check.py --model runs/qa/f9-demo \\
        --correction-ct CT --correction-labels LABELS (--rescan 1 | --ct CT2 --labels LABELS2) [--json OUT]

References are TotalSegmentator ids (or the model's values). Works in a temporary models folder;
writes only the optional --json file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

from compare_bundled import dice_per_organ, reference_on_grid  # noqa: E402 - same folder
from fold_check import RegisterOnce, with_settings  # noqa: E402

from CascadeSegLib.corrections import add_correction  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402
from CascadeSegLib.train.improve import ImproveOptions, improve_model  # noqa: E402

RESCAN_SLICE_MM = 3.0
RESCAN_NOISE_HU = 15.0


def rescan(ct: sitk.Image, labels: sitk.Image, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """`ct` and `labels` (on one grid) as a second scan of the same patient: moved, scaled, bent,
    resampled to RESCAN_SLICE_MM slices, with RESCAN_NOISE_HU of white noise; the same mapping
    for both, so the labels stay the reference."""
    rng = np.random.default_rng(seed)
    centre = ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()])
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*(float(v) for v in rng.uniform(-1, 1, 3) * np.deg2rad(5.0)))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix([float(v) for v in np.asarray(euler.GetMatrix()) * rng.uniform(0.95, 1.05)])
    affine.SetTranslation([float(v) for v in rng.uniform(-15.0, 15.0, 3)])
    bend = sitk.BSplineTransformInitializer(ct, [4, 4, 4], 3)
    params = np.asarray(bend.GetParameters())
    bend.SetParameters([float(v) for v in rng.normal(0.0, 8.0, params.size)])
    moved = sitk.CompositeTransform([affine, bend])
    spacing = list(ct.GetSpacing()[:2]) + [RESCAN_SLICE_MM]
    size = [int(round(n * s / t)) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetDirection(ct.GetDirection())
    grid.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    grid.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    new_ct = sitk.Resample(ct, grid, moved, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(new_ct) + rng.normal(0.0, RESCAN_NOISE_HU, new_ct.GetSize()[::-1])
    noisy = sitk.GetImageFromArray(np.clip(np.round(arr), -1024, 3071).astype(np.int16))
    noisy.CopyInformation(grid)
    return noisy, sitk.Resample(labels, grid, moved, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def install(package: Path, settings: list[str], root: Path, name: str) -> ModelPackage:
    """`package` copied into models folder `root` as `name`, with atlas_prior `settings` applied."""
    target = root / name
    shutil.copytree(package, target)
    model = ModelPackage.load(target)
    if settings:
        model = with_settings(model, settings)
    model.name = name
    model.save(target)
    return ModelPackage.load(target)


def scores(model: ModelPackage, ct: sitk.Image, ref: sitk.Image) -> dict[str, dict[str, float | None]]:
    """Dice of the package's result and of its atlases alone (the prior's argmax, no network)."""
    values = {o: model.labels.by_name(o).value for o in model.labels.names}
    seg = RegisterOnce(model)
    fused = dice_per_organ(seg.segment(ct).labels, ref, values)[0]
    alone = seg.prior_labels(ct)
    return {"fused": fused, "atlases alone": dice_per_organ(alone, ref, values)[0] if alone is not None else {}}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / "models"
    os.environ["CASCADESEG_MODELS"] = str(root)
    parent = install(Path(args.model), args.set, root, "parent")
    organs = parent.labels.names
    values = {o: parent.labels.by_name(o).value for o in organs}
    ct = read_image(args.correction_ct)
    truth = reference_on_grid(Path(args.correction_labels), ct, organs, values)
    sitk.WriteImage(truth, str(work / "correction.nii.gz"), True)
    add_correction("parent", parent.labels, args.correction_ct, work / "correction.nii.gz", case_id="baseline",
                   root=root)
    result = improve_model("parent", "with-atlas", ImproveOptions(iterations=0, atlases=True, device="cpu",
                                                                  left_out=0), root=root)
    improved = ModelPackage.load(result.path)
    if args.rescan is not None:
        target, ref = rescan(ct, truth, args.rescan)
        what = f"the corrected patient rescanned (simulated, seed {args.rescan})"
    else:
        target = read_image(args.ct)
        ref = reference_on_grid(Path(args.labels), target, organs, values)
        what = f"another patient ({Path(args.ct).name})"
    atlases = len(improved.atlas_prior.atlases) if improved.atlas_prior else 0
    return {"target": what, "parent": str(args.model), "settings": args.set, "seconds_to_add": result.seconds,
            "atlases": atlases,
            "before": scores(parent, target, ref), "after": scores(improved, target, ref)}


def markdown(res: dict[str, Any]) -> str:
    organs = [o for o in res["before"]["fused"] if o != "mean"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{res['target']}; parent {res['parent']}; the correction added as atlas {res['atlases']} "
             f"in {res['seconds_to_add']:.1f} s", "",
             "| | mean | " + " | ".join(organs) + " |", "|---|---:|" + "---:|" * len(organs)]
    for what in ("fused", "atlases alone"):
        for key in ("before", "after"):
            row = res[key][what]
            lines.append(f"| {what}, {key} | {cell(row.get('mean'))} | "
                         + " | ".join(cell(row.get(o)) for o in organs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the parent package (a fold package: never saw the patients)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON", help="atlas_prior settings for the parent")
    ap.add_argument("--correction-ct", required=True)
    ap.add_argument("--correction-labels", required=True, help="its reference labels (TotalSegmentator ids)")
    ap.add_argument("--rescan", type=int, default=None, metavar="SEED",
                    help="target: the corrected patient rescanned (simulated)")
    ap.add_argument("--ct", help="target: another patient's CT")
    ap.add_argument("--labels", help="its reference labels")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if (args.rescan is None) == (args.ct is None) or (args.ct is None) != (args.labels is None):
        print("error: give --rescan SEED, or --ct and --labels", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="correction-atlas-") as tmp:
        res = run(args, Path(tmp))
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
