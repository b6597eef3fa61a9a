"""Measure an abdomen-ct model on the three real labelled CTs and on the negative case.

Each column says whether the model saw that CT, read from its model.json provenance (networks'
`trained_on`, atlases' names): a seen CT shows what the model learned, not how it generalises
(held-out numbers come from leave-one-out folds). TotalSegmentator s0003 has none of the ten
organs in view: every millilitre predicted there is a false positive.

    python configs/measure_abdomen_ct.py [--model runs/abdomen-ct/model] [--json out.json]

Prints Markdown tables; writes only the optional --json file.
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

from compare_bundled import dice_per_organ, reference_on_grid  # noqa: E402 - same folder

from CascadeSegLib.inference.cascade import Segmenter  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402

TS = REPO / "Resources" / "TrainingData" / "totalsegmentator"
TRAINING = {
    "abdomen_ct_3mm": (REPO / "Resources/SampleData/abdomen_ct_3mm.nii.gz",
                       REPO / "Resources/SampleData/abdomen_ct_3mm_totalseg.nii.gz"),
    "s0009": (TS / "s0009_ct.nii.gz", TS / "s0009_label.nii.gz"),
    "dicom_slab": (REPO / "Testing/Data/dicom_slab", REPO / "Testing/Data/dicom_slab_seg.nii.gz"),
}
NEGATIVE = TS / "s0003_ct.nii.gz"


def seen_or_not(model: ModelPackage, case: str) -> str:
    """'TRAINED ON', 'held out', or 'unknown' when the package does not record its training cases."""
    network = model.provenance.get("network", {})
    atlases = model.provenance.get("atlas_prior", {}).get("atlases", [])
    if "trained_on" not in network and not atlases:
        return "training cases unknown"
    seen = set(network.get("trained_on", [])) | set(atlases)
    return "TRAINED ON" if case in seen else "held out"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "abdomen-ct" / "model"))
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    model = ModelPackage.load(args.model)
    organs = model.labels.names
    values = {o: model.labels.by_name(o).value for o in organs}
    out: dict = {"model": f"{model.name} {model.version}", "training_cts": {}, "negative": {}}
    for case, (ct_path, lab_path) in TRAINING.items():
        ct = read_image(ct_path)
        t0 = time.perf_counter()
        pred = Segmenter(model, device="cpu").segment(ct).labels
        seconds = time.perf_counter() - t0
        dice, _ = dice_per_organ(pred, reference_on_grid(lab_path, ct, organs, values), values)
        dice.pop("mean")
        out["training_cts"][case] = {"dice": dice, "seconds": round(seconds, 1)}
    ct = read_image(NEGATIVE)
    pred = sitk.GetArrayFromImage(Segmenter(model, device="cpu").segment(ct).labels)
    ml = float(np.prod(ct.GetSpacing())) / 1000.0
    out["negative"] = {o: round(np.count_nonzero(pred == model.labels.by_name(o).value) * ml, 1) for o in organs}

    print("| organ | " + " | ".join(f"{c} ({seen_or_not(model, c)})" for c in TRAINING) + " |")
    print("|---|" + "---:|" * len(TRAINING))
    for o in organs:
        cells = []
        for c in TRAINING:
            d = out["training_cts"][c]["dice"][o]
            cells.append("not in the image" if d is None else f"{d:.2f}")
        print(f"| {o} | " + " | ".join(cells) + " |")
    means = []
    for c in TRAINING:
        vals = [d for d in out["training_cts"][c]["dice"].values() if d is not None]
        means.append(f"{np.mean(vals):.2f}")
    print("| mean | " + " | ".join(means) + " |")
    print()
    total = sum(out["negative"].values())
    print(f"Negative case s0003 (no abdominal organ in view): {total:.1f} ml predicted in all; "
          + ", ".join(f"{o} {v:.1f} ml" for o, v in out["negative"].items() if v > 0))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
