"""Fields of view the folds never show, in one command (the recipe's seventeenth round).

The folds' CTs all cover the abdomen. A clinician's scan may be a chest CT that reaches the upper
abdomen, a whole body, a pelvis, or a chest without abdominal organs. With no such real CT here,
a label-only anatomy (TotalSegmentator ids) is turned into one synthetic CT (portal phase, no
crop or truncation, 10 HU noise, fixed seed: `synthesis.render.synthesize`) and cropped along the
body:
- wholebody: all of it;
- chest: from 40 mm below the lungs to 20 mm above them (lungs needed);
- abdomen_pelvis: from 30 mm below the sacrum to 20 mm above the liver;
- lower: from 30 mm below the sacrum to mid-kidney;
- thorax_only: from 10 mm above the highest abdominal organ to 20 mm above the lungs (a negative:
  nothing but vessels may be labelled; lungs needed);
- pelvis_only: from 30 mm below the sacrum to 10 mm below the lowest abdominal organ (a pelvic
  CT: another negative, where it is at least 60 mm long).
Each model segments each crop; Dice of the organs each crop holds (mean of those), and the ml of
organs labelled that the crop does not hold. Models that share networks but differ in their
atlases or settings show what the atlases do; leave the anatomy out of the atlases
(`build_atlas_model.py --exclude s0004`) for a fair check.

    python configs/fov_check.py --labels LABELMAP --models PKG [PKG ...] [--crops chest lower]
        [--seeds 7 8 ...] [--phase portal|random] [--json OUT]

With several seeds (and `--phase random`: contrast phase, noise and resolution drawn per seed), it
also prints each model's mean over crops and seeds: the thirtieth round's check of the held-out
patients' anatomies is `--labels THEIR_LABELS --crops wholebody --seeds 11 12 13 --phase random`.

Writes only the optional --json file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

from compare_bundled import dice_per_organ  # noqa: E402 - same folder

from CascadeSegLib.inference.cascade import Segmenter  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage, find_model  # noqa: E402
from CascadeSegLib.synthesis.render import SynthSettings, synthesize, with_phase  # noqa: E402
from CascadeSegLib.synthesis.tissues import IntensityTable, default_table_path, structure_names  # noqa: E402
from CascadeSegLib.train.dataset import label_lookup  # noqa: E402

CROPS = ("wholebody", "chest", "abdomen_pelvis", "lower", "thorax_only", "pelvis_only")
LUNGS = (10, 11, 12, 13, 14)
SACRUM = 25
KIDNEYS = (2, 3)
#: the solid organs (not vessels: the thoracic aorta is TotalSegmentator's "aorta" too)
ORGANS = (1, 2, 3, 4, 5, 6, 7)


def synthetic_ct(label_path: Path, seed: int, phase: str = "portal") -> tuple[sitk.Image, sitk.Image]:
    """One synthetic CT of the whole label map and its (deformed) labels, same grid. "portal": the
    portal phase at 10 HU noise (the fields-of-view check); "random": the synthesis defaults
    (contrast phase, noise, resolution drawn per seed), never cropped or truncated (the thirtieth
    round's check on the held-out patients' anatomies)."""
    labels = read_image(label_path)
    settings = SynthSettings()
    if phase == "portal":
        settings = with_phase(settings, "portal")
        settings = replace(settings, scan=replace(settings.scan, noise_hu=(10.0, 10.0)))
    elif phase != "random":
        raise ValueError(f"phase {phase!r} is not portal or random")
    settings = replace(settings, scan=replace(settings.scan, crop_prob=0.0, truncate_prob=0.0))
    result = synthesize(labels, structure_names(None), IntensityTable.load(default_table_path()), seed=seed,
                        settings=settings)
    return result.ct, result.labels


def slices_of(arr: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    """The slices (third index axis) that hold any of `ids`."""
    return np.nonzero(np.isin(arr, ids).any((1, 2)))[0]


def crop_ranges(arr: np.ndarray, spacing_mm: float) -> dict[str, tuple[int, int]]:
    """[first, last) slice of each crop the anatomy allows (slices along the third index axis,
    assumed to run feet to head as TotalSegmentator's files do)."""
    n = arr.shape[0]

    def mm(x: float) -> int:
        return int(round(x / spacing_mm))

    out = {"wholebody": (0, n)}
    lungs, sacrum, kidneys = slices_of(arr, LUNGS), slices_of(arr, SACRUM), slices_of(arr, KIDNEYS)
    liver, organs = slices_of(arr, (5,)), slices_of(arr, ORGANS)
    if lungs.size:
        out["chest"] = (max(0, int(lungs.min()) - mm(40)), min(n, int(lungs.max()) + mm(20)))
        if organs.size and int(lungs.max()) > int(organs.max()) + mm(60):
            out["thorax_only"] = (int(organs.max()) + mm(10), min(n, int(lungs.max()) + mm(20)))
    if sacrum.size and liver.size:
        out["abdomen_pelvis"] = (max(0, int(sacrum.min()) - mm(30)), min(n, int(liver.max()) + mm(20)))
    if sacrum.size and kidneys.size:
        out["lower"] = (max(0, int(sacrum.min()) - mm(30)), int((kidneys.min() + kidneys.max()) // 2))
    if sacrum.size and organs.size and int(organs.min()) - mm(10) - max(0, int(sacrum.min()) - mm(30)) >= mm(60):
        out["pelvis_only"] = (max(0, int(sacrum.min()) - mm(30)), int(organs.min()) - mm(10))
    return out


def check_crops(ct: sitk.Image, labels: sitk.Image, models: list[tuple[str, ModelPackage]], crops: list[str],
                means: dict[str, list[float]]) -> dict[str, Any]:
    """Each model on each crop of one synthetic CT (printed as it goes); each crop's mean Dice is
    added to `means[model argument]` where the crop holds organs."""
    arr = sitk.GetArrayFromImage(labels).astype(np.int64)
    ranges = {k: v for k, v in crop_ranges(arr, ct.GetSpacing()[2]).items() if k in crops}
    out: dict[str, Any] = {}
    # per model: its segmenter, its label values, and the reference in them (all crops cut from it)
    runs = [(arg, model, Segmenter(model, device="cpu"), {o: model.labels.by_name(o).value for o in model.labels.names},
             label_lookup(model.labels, None, None, "totalsegmentator")[arr]) for arg, model in models]
    for name, (a, b) in ranges.items():
        image = ct[:, :, a:b]
        out[name] = {"slices": [a, b], "mm": round((b - a) * ct.GetSpacing()[2]), "models": {}}
        for model_arg, model, segmenter, values, reference in runs:
            ref = sitk.GetImageFromArray(reference[a:b])
            ref.CopyInformation(image)
            pred = segmenter.segment(image).labels
            dice, absent = dice_per_organ(pred, ref, values)
            got = sitk.GetArrayViewFromImage(pred)
            ml = float(np.prod(image.GetSpacing())) / 1000.0
            false_ml = {o: round(float(np.count_nonzero(got == values[o])) * ml, 1) for o in absent}
            out[name]["models"][f"{model.name} {model.version} ({model_arg})"] = {"dice": dice,
                                                                               "absent_but_labelled_ml": false_ml}
            if dice["mean"] is not None:
                means[model_arg].append(float(dice["mean"]))
            present = " ".join(f"{o} {d:.2f}" for o, d in dice.items() if o != "mean" and d is not None)
            print(f"{name} ({(b - a) * ct.GetSpacing()[2]:.0f} mm) {model_arg}: mean {dice['mean'] or 0:.3f} | "
                  f"{present} | labelled but absent (ml) {false_ml}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="a label map in TotalSegmentator ids (a whole body is best)")
    ap.add_argument("--models", nargs="+", required=True, help="model folders or installed names")
    ap.add_argument("--crops", nargs="+", choices=CROPS, default=list(CROPS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[7], help="one synthetic CT per seed")
    ap.add_argument("--phase", choices=("portal", "random"), default="portal",
                    help="portal: one phase at 10 HU noise (as before); random: phase, noise and resolution "
                         "drawn per seed")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    results: dict[str, Any] = {"labels": args.labels, "phase": args.phase, "seeds": {}}
    models = [(arg, ModelPackage.load(find_model(arg))) for arg in args.models]
    means: dict[str, list[float]] = {arg: [] for arg, _ in models}
    for seed in args.seeds:
        ct, labels = synthetic_ct(Path(args.labels), seed, args.phase)
        results["seeds"][seed] = check_crops(ct, labels, models, args.crops, means)
    if len(args.seeds) > 1:
        for arg, values in means.items():
            print(f"{arg}: mean over {len(values)} crop(s) and seeds {float(np.mean(values)):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
