"""Measure the bundled demo model's Dice per organ; optionally write a model.json that records it.

Held out: the DICOM slab (never trained on, not used to pick checkpoints). Training data: the
3 mm sample CT, reported as such. Prints the Markdown table used in MODEL_CARD.md. A measurement
never edits tracked files: `-o` writes the model.json with the new provenance to another path
(copy it over the package's own model.json by hand when the numbers are meant to be published).

    python configs/measure_demo_model.py [--model Resources/Models/abdomen-ct-demo] [-o measured/model.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compare_bundled import dice_per_organ as organ_dice  # noqa: E402 - same folder
from compare_bundled import reference_on_grid  # noqa: E402 - same folder

from CascadeSegLib.inference.cascade import Segmenter  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402
from CascadeSegLib.train.dataset import TOTALSEGMENTATOR_IDS  # noqa: E402

CASES = {
    "dicom_slab": (REPO / "Testing/Data/dicom_slab", REPO / "Testing/Data/dicom_slab_seg.nii.gz"),
    "ts_example_3mm": (REPO / "Resources/SampleData/abdomen_ct_3mm.nii.gz",
                       REPO / "Resources/SampleData/abdomen_ct_3mm_totalseg.nii.gz"),
}


def dice_per_organ(model: ModelPackage, image_path: Path, label_path: Path) -> tuple[dict, float]:
    image = read_image(image_path)
    t0 = time.perf_counter()
    pred = Segmenter(model, device="cpu").segment(image).labels
    seconds = time.perf_counter() - t0
    values = {name: model.labels.by_name(name).value for name in TOTALSEGMENTATOR_IDS.values()}
    dice, _ = organ_dice(pred, reference_on_grid(label_path, image, list(values), values), values)
    out = {name: None if d is None else round(d, 3) for name, d in dice.items() if name != "mean"}
    present = [v for v in out.values() if v is not None]   # None: organ not in this image
    out["mean"] = round(float(np.mean(present)), 3)
    return out, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "Resources/Models/abdomen-ct-demo"))
    ap.add_argument("-o", "--output", default=None, type=Path,
                    help="write the model.json with the measured provenance here (never over the model's own)")
    args = ap.parse_args()
    source = Path(args.model) / "model.json"
    if args.output is not None and args.output.resolve() == source.resolve():
        ap.error(f"-o {args.output} is the model's own model.json; write the measurement elsewhere")
    model = ModelPackage.load(args.model)
    results = {case: dice_per_organ(model, *paths) for case, paths in CASES.items()}
    meta = json.loads(source.read_text(encoding="utf-8"))
    meta["provenance"]["held_out_dice"] = {"case": "dicom_slab", "dice": results["dicom_slab"][0],
                                           "seconds": round(results["dicom_slab"][1], 2)}
    meta["provenance"]["training_data_dice"] = {"case": "ts_example_3mm", "note": "TRAINED ON this CT",
                                                "dice": results["ts_example_3mm"][0],
                                                "seconds": round(results["ts_example_3mm"][1], 2)}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    print("| organ | held-out `dicom_slab` | training data `ts_example_3mm` (TRAINED ON) |")
    print("|---|---:|---:|")
    for name in [*TOTALSEGMENTATOR_IDS.values(), "mean"]:
        cells = []
        for case in CASES:
            v = results[case][0][name]
            cells.append("not in the image" if v is None else f"{v:.3f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print("\nseconds per case: " + ", ".join(f"{c} {results[c][1]:.1f}" for c in CASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
