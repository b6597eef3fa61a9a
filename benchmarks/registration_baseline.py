"""Atlas registration as a baseline for the leave-one-out folds of configs/leave_one_out.py.

For each left-out real CT, every other real labelled CT (the fold's training CTs, used as atlases)
is registered onto it with SimpleITK: a multi-resolution affine on Mattes mutual information,
then diffeomorphic demons on HU clipped to soft tissue. Each atlas' labels are warped (nearest
neighbour) and the atlases are fused by per-voxel majority over one-hot maps. The result is
written where `configs/leave_one_out.py evaluate` looks for a variant's predictions, so
`cascadeseg evaluate` scores it the same way:

    python benchmarks/registration_baseline.py [--out runs/loo]
    python configs/leave_one_out.py table --variants registration,both

Only label maps in the model's values are compared (TotalSegmentator ids are remapped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CascadeSegLib.inference.atlas_prior import register, soft_tissue  # noqa: E402 - the model's own registration
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.labels import LabelSet  # noqa: E402
from CascadeSegLib.train.dataset import label_lookup  # noqa: E402


def fuse(label_maps: list[np.ndarray], coverage: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-voxel majority among the atlases that cover the voxel; ties go to the organ, so an
    atlas that ends before the test scan does not veto the others."""
    votes = np.zeros((num_classes,) + label_maps[0].shape, np.float32)
    for lab, cov in zip(label_maps, coverage):
        for k in range(num_classes):
            votes[k] += (lab == k) & cov
    votes[0] *= 0.99
    return votes.argmax(0).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "loo"))
    ap.add_argument("--folds", default=None, help="comma-separated left-out cases (default: every real case)")
    args = ap.parse_args()
    raw = json.loads((REPO / "configs" / "abdomen-ct.json").read_text(encoding="utf-8"))
    labels = LabelSet.from_names(raw["labels"])
    table = label_lookup(labels, None, None, "totalsegmentator")
    base = REPO / "configs"
    cases = {c["name"]: ((base / c["image"]).resolve(), (base / c["label"]).resolve()) for c in raw["data"]["cases"]}
    pred_dir = Path(args.out) / "registration" / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for test, (ct_path, _) in cases.items():
        if args.folds and test not in args.folds.split(","):
            continue
        fixed = read_image(ct_path)
        t0 = time.perf_counter()
        fixed_soft = soft_tissue(fixed)                  # the patient's registration grid, made once
        warped, coverage = [], []
        for atlas, (a_ct, a_lab) in cases.items():
            if atlas == test:
                continue
            tx = register(fixed, read_image(a_ct), fixed_soft=fixed_soft)
            lab = sitk.ReadImage(str(a_lab))
            ours = sitk.GetImageFromArray(table[sitk.GetArrayFromImage(lab)])
            ours.CopyInformation(lab)
            warped.append(sitk.GetArrayFromImage(sitk.Resample(ours, fixed, tx, sitk.sitkNearestNeighbor, 0,
                                                               sitk.sitkUInt8)))
            ones = sitk.Image(lab.GetSize(), sitk.sitkUInt8) + 1
            ones.CopyInformation(lab)
            coverage.append(sitk.GetArrayFromImage(sitk.Resample(ones, fixed, tx, sitk.sitkNearestNeighbor, 0)) > 0)
        out = sitk.GetImageFromArray(fuse(warped, coverage, labels.num_classes))
        out.CopyInformation(fixed)
        sitk.WriteImage(out, str(pred_dir / f"{test}.nii.gz"), True)
        print(f"{test}: {len(warped)} atlases, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
