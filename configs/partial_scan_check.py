"""Real CTs cut to part of their length, in one command (the recipe's eighteenth round).

A scan of the upper abdomen (a liver or pancreas protocol) or of the pelvis covers part of what the
atlases cover. A fold package (networks and atlases built without the patient) segments the
patient's CT cut to its upper or lower half and its upper or lower 120 mm (slices along the third
index axis, the last ones being the upper end as in TotalSegmentator's files), once per atlas
placement asked for: mean Dice of the organs each crop holds, and the ml of organs labelled that
the crop does not hold.

    python configs/partial_scan_check.py --model FOLD --ct CT --labels LABELS [--placements moments search]
        [--set intensity_weight=0.5]

Prints one line per crop and placement; writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

from compare_bundled import dice_per_organ, reference_on_grid  # noqa: E402 - same folder
from fold_check import with_settings  # noqa: E402 - same folder

from CascadeSegLib.inference.atlas_prior import PLACEMENTS  # noqa: E402
from CascadeSegLib.inference.cascade import Segmenter  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402

CROP_MM = 120.0


def crops(slices: int, spacing_mm: float) -> dict[str, tuple[int, int]]:
    """[first, last) slice of each crop."""
    k = min(slices, int(round(CROP_MM / spacing_mm)))
    return {"upper_half": (slices // 2, slices), "lower_half": (0, slices // 2),
            "upper_120mm": (slices - k, slices), "lower_120mm": (0, k)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a fold package (built without this patient)")
    ap.add_argument("--ct", required=True)
    ap.add_argument("--labels", required=True, help="the patient's labels (TotalSegmentator ids or the model's)")
    ap.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                    help="other atlas_prior settings for this check (as fold_check.py's), e.g. intensity_weight=0.5")
    args = ap.parse_args()
    base = ModelPackage.load(args.model)
    if base.atlas_prior is None:
        ap.error("the package has no atlases: nothing to place")
    try:
        base = with_settings(base, args.set)
    except ValueError as exc:
        ap.error(str(exc))
    values = {o: base.labels.by_name(o).value for o in base.labels.names}
    ct = read_image(args.ct)
    ref = reference_on_grid(args.labels, ct, base.labels.names, values)
    ml = float(np.prod(ct.GetSpacing())) / 1000.0
    for placement in args.placements:
        model = dataclasses.replace(base, atlas_prior=dataclasses.replace(base.atlas_prior, placement=placement))
        segmenter = Segmenter(model, device="cpu")
        for name, (a, b) in crops(ct.GetSize()[2], ct.GetSpacing()[2]).items():
            pred = segmenter.segment(ct[:, :, a:b]).labels
            dice, absent = dice_per_organ(pred, ref[:, :, a:b], values)
            got = sitk.GetArrayViewFromImage(pred)
            false_ml = {o: round(float(np.count_nonzero(got == values[o])) * ml, 1) for o in absent
                        if np.count_nonzero(got == values[o])}
            present = " ".join(f"{o} {d:.2f}" for o, d in dice.items() if o != "mean" and d is not None)
            print(f"{name} ({(b - a) * ct.GetSpacing()[2]:.0f} mm) {placement}: mean {dice['mean'] or 0:.3f} | "
                  f"{present} | labelled but absent (ml) {false_ml}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
