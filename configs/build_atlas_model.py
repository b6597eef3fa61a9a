"""Build a model package whose network is fused with registered atlases (inference/atlas_prior.py).

The atlases are the real labelled CTs of configs/abdomen-ct.json (`data.synthetic.atlases`) and
each of them warped onto every other label map of `data.synthetic.label_maps` (the registration
route of docs/synthesis.md: real texture on a label-only anatomy). `--exclude CASE` leaves a
patient out everywhere (not an atlas, not a label map, not a CT of the intensity table), which is
how the leave-one-out folds of the model card were built.

    python configs/build_atlas_model.py -o runs/abdomen-ct-atlas                 # everything
    python configs/build_atlas_model.py -o runs/fold-s0009 --exclude s0009       # a held-out fold

Atlases are stored at 3 mm (CT as int16 HU, labels in the model's values); the warped CTs are
cached under --work. Nothing tracked is written unless -o points there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CascadeSegLib.inference.atlas_prior import PLACEMENTS, AtlasPriorSpec, AtlasSpec  # noqa: E402
from CascadeSegLib.inference.preprocess import grid_for_spacing, resample  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.labels import UNKNOWN_LABEL  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402
from CascadeSegLib.synthesis.source import synthetic_cases  # noqa: E402
from CascadeSegLib.synthesis.transfer import mend_misregistered  # noqa: E402
from CascadeSegLib.train.dataset import Case, label_lookup  # noqa: E402

MAIN = REPO / "configs" / "abdomen-ct.json"
ATLAS_SPACING = (3.0, 3.0, 3.0)
#: the organs whose identity the atlases may decide when --mixup-share is given (abdomen-ct 2.10.0-2.13.0)
MIXUP_ORGANS = ["liver", "spleen", "kidney_right", "kidney_left", "stomach"]


def _resolve(path: str) -> Path:
    return (MAIN.parent / path).resolve()


def atlas_cases(raw: dict, exclude: set[str], work: Path) -> list[Case]:
    """The real atlases and their warps onto every label map, none of them from `exclude`."""
    spec = dict(raw["data"]["synthetic"])
    by_name = {c["name"]: c for c in raw["data"]["cases"]}
    names = [n for n in spec["atlases"] if n not in exclude]
    real = [Case(n, _resolve(by_name[n]["image"]), _resolve(by_name[n]["label"])) for n in names]
    excluded_labels = {_resolve(by_name[n]["label"]) for n in exclude if n in by_name}
    # a label-only anatomy is left out by its case name too (s0004: .../s0004_label.nii.gz)
    maps = [m for m in spec["label_maps"]
            if _resolve(m) not in excluded_labels and Path(m).name.split("_label")[0] not in exclude]
    synth = {"label_maps": maps, "atlases": names, "per_label_map": 0, "seed": spec.get("seed", 0),
             "spacing": spec.get("spacing"), "table": {"measure": names}}
    warped = synthetic_cases(synth, lambda p: _resolve(str(p)), real, work,
                             progress=lambda done, total: print(f"  warped atlases {done}/{total}", flush=True))
    return real + warped


def in_model_values(path: Path, lookup: np.ndarray) -> sitk.Image:
    """A TotalSegmentator-id label map in the model's label values."""
    labels = sitk.ReadImage(str(path))
    ours = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(labels)])
    ours.CopyInformation(labels)
    return ours


def write_atlas(case: Case, lookup: np.ndarray, folder: Path, name: str, misregistered: str = "keep",
                margin_mm: float = 6.0) -> AtlasSpec:
    """The case's CT (int16 HU) and labels (model values) on a 3 mm grid, inside `folder`. A warped
    case (registration route) is mended where its labels contradict the label map it was warped onto
    by more than `margin_mm` (`mend_misregistered`): `misregistered` "target" takes that map's
    labels there, "unknown" marks 255 (no vote), "keep" leaves the warped labels."""
    ct = read_image(case.image)
    grid = grid_for_spacing(ct, ATLAS_SPACING)
    ct3 = resample(ct, grid, "linear", -1024.0, sitk.sitkInt16)
    lab3 = resample(in_model_values(case.label, lookup), grid, "nearest", 0, sitk.sitkUInt8)
    info_path = case.label.parent / "info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    if misregistered != "keep" and info.get("route") == "registration":
        target = in_model_values(Path(info["label_map"]), lookup)
        lab3, mended = mend_misregistered(lab3, target, range(1, int(lookup[lookup != UNKNOWN_LABEL].max()) + 1),
                                          margin_mm,
                                          None if misregistered == "target" else UNKNOWN_LABEL)
        print(f"  {name}: {sum(mended.values()):.0f} ml mended (" +
              ", ".join(f"{v}: {ml:.0f}" for v, ml in mended.items() if ml >= 1) + ")", flush=True)
    (folder / "atlases").mkdir(parents=True, exist_ok=True)
    spec = AtlasSpec(name=name, image=f"atlases/{name}_ct.nii.gz", labels=f"atlases/{name}_labels.nii.gz")
    sitk.WriteImage(ct3, str(folder / spec.image), True)
    sitk.WriteImage(lab3, str(folder / spec.labels), True)
    return spec


def prior_settings(args: argparse.Namespace) -> dict:
    """The `"atlas_prior"` block the options ask for, without its atlases."""
    settings = {"spacing_mm": args.spacing_mm, "network_weight": args.network_weight,
                "demons_iterations": args.demons_iterations, "candidates": args.candidates, "slabs": args.slabs,
                "local_weight_power": args.local_weight_power, "local_weight_sigma_mm": args.local_weight_sigma_mm,
                "linear_iterations": args.linear_iterations, "demons_smoothing": args.demons_smoothing,
                "slab_demons_smoothing": args.slab_demons_smoothing, "intensity_weight": args.intensity_weight,
                "intensity_core_share": args.intensity_core_share, "placement": args.placement,
                "min_scan_agreement": args.min_scan_agreement}
    if args.mixup_share:
        settings |= {"mixup_share": args.mixup_share, "mixup_organs": list(args.mixup_organs)}
    elif args.mixup_organs != MIXUP_ORGANS:
        raise ValueError("--mixup-organs needs --mixup-share (the step is off without it)")
    return settings


def parser() -> argparse.ArgumentParser:
    """The options; their defaults build the shipped package's atlas settings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True, help="the package folder to write")
    ap.add_argument("--base", default=str(REPO / "Resources" / "Models" / "abdomen-ct-demo"),
                    help="the model package whose networks are used")
    ap.add_argument("--exclude", default="", help="comma-separated cases to leave out (a held-out fold): real "
                    "cases, or label-only anatomies by name (s0004)")
    ap.add_argument("--work", default=str(REPO / "runs" / "atlas-work"), help="cache of the warped atlases")
    ap.add_argument("--name", default="abdomen-ct", help="the package's name")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--spacing-mm", type=float, default=8.0, help="registration grid spacing")
    ap.add_argument("--demons-iterations", type=int, default=30)
    ap.add_argument("--demons-smoothing", type=float, default=0.75,
                    help="Gaussian std (registration-grid voxels) of the demons field on whole scans (abdomen-ct "
                         "2.9.0: 0.75, chosen on the prior alone across the folds; 2.0 before)")
    ap.add_argument("--slab-demons-smoothing", type=float, default=2.0,
                    help="the same on slabs (2.0: softer fields lost on the folds' cut slabs)")
    ap.add_argument("--network-weight", type=float, default=0.5,
                    help="w in w * network + (1 - w) * prior inside C2 (abdomen-ct 2.8.0: 0.5, chosen across "
                         "both leave-one-out folds with the mended atlases; 2.1.0-2.7.0: 0.9; 2.0.0: 0.5)")
    ap.add_argument("--no-candidates", dest="candidates", action="store_false",
                    help="the atlases' organs do not join C2: outside C2 the prior labels alone (before 2.1.0)")
    ap.add_argument("--no-slabs", dest="slabs", action="store_false",
                    help="scans shorter than 100 mm get the networks alone (before 2.2.0); by default the "
                         "atlases are registered onto them by a translation search first")
    ap.add_argument("--local-weight-power", type=float, default=3.0,
                    help="each atlas votes with (1 + local MSE / 100 HU^2) ** -power (abdomen-ct 2.3.0: 3, chosen "
                         "on the prior alone across the folds); 0 counts every atlas alike (before 2.3.0)")
    ap.add_argument("--local-weight-sigma-mm", type=float, default=2.0,
                    help="Gaussian window of the local MSE")
    ap.add_argument("--linear-iterations", type=int, default=50,
                    help="most affine (slabs: similarity) optimiser iterations per level (abdomen-ct 2.5.0: 50, "
                         "chosen on the atlases alone across the folds; 200 before)")
    ap.add_argument("--misregistered", choices=("target", "unknown", "keep"), default="target",
                    help="a warped atlas's labels that contradict the label map it was warped onto (by more than "
                         "--misregistered-margin-mm): take that map's labels there (abdomen-ct 2.7.0), mark them "
                         "255, no vote, or keep them (before 2.7.0)")
    ap.add_argument("--misregistered-margin-mm", type=float, default=6.0,
                    help="disagreement within this distance is a boundary, kept")
    ap.add_argument("--mixup-share", type=float, default=0.0,
                    help="where at least this share of the atlases' vote goes to one of --mixup-organs, a voxel "
                         "the result gives to another of them takes the atlases' organ (abdomen-ct 2.10.0-2.13.0: "
                         "0.7, the atlas check's consensus, for networks that mixed up neighbouring organs); 0: off "
                         "(before 2.10.0 and since 2.13.1, whose GPU-trained networks it cost organs)")
    ap.add_argument("--mixup-organs", nargs="+", default=MIXUP_ORGANS,
                    help="the organs whose identity the atlases may decide (not vessels, gallbladder or pancreas)")
    ap.add_argument("--min-scan-agreement", type=float, default=0.1,
                    help="on a whole scan where no atlas's organs agree with stage 1's by this Dice, the atlases' "
                         "organs are not stage-2 candidates and label nothing outside them (abdomen-ct 2.13.2: 0.1, "
                         "the atlas check's threshold); 0: off (before 2.13.2)")
    ap.add_argument("--placement", choices=PLACEMENTS, default="search",
                    help="how each atlas is first placed on a whole scan: search (abdomen-ct 2.12.0: also where "
                         "it correlates best, taken where that lies over 60 mm away and agrees better with stage "
                         "1's organs: a scan of another part of the body), or moments (centres of mass only; "
                         "packages before 2.12.0)")
    ap.add_argument("--intensity-weight", type=float, default=0.5,
                    help="the prior times each class's HU likelihood in the patient to this power (abdomen-ct "
                         "2.11.0: 0.5, chosen on the atlases alone across the folds); 0: the atlases' vote alone")
    ap.add_argument("--intensity-core-share", type=float, default=0.7,
                    help="a class's HU histogram comes from where its prior reaches this share (or 0.8 of its "
                         "own highest prior)")
    return ap


def main() -> int:
    args = parser().parse_args()

    raw = json.loads(MAIN.read_text(encoding="utf-8"))
    exclude = {e for e in args.exclude.split(",") if e}
    base = ModelPackage.load(args.base)
    base.verify()
    try:       # checked as model.json is read, before minutes of registrations
        settings = prior_settings(args)
        AtlasPriorSpec.from_json({**settings, "atlases": [{"name": "-", "image": "-", "labels": "-"}]}
                                 ).check_organs(base.labels.names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lookup = label_lookup(base.labels, None, None, "totalsegmentator")
    work = Path(args.work) / ("all" if not exclude else "without-" + "-".join(sorted(exclude)))
    cases = atlas_cases(raw, exclude, work)
    atlases = []
    for case in cases:
        name = case.name.rsplit("-", 1)[0] if case.name.startswith("reg-") else case.name
        atlases.append(write_atlas(case, lookup, out, name.replace("_label", ""), args.misregistered,
                                   args.misregistered_margin_mm))
        print(f"  atlas {atlases[-1].name}", flush=True)
    for stage in base.stages:
        shutil.copy2(base.weight_path(stage), out / stage.weights)
    network = f"{base.name} {base.version}"
    base.name, base.version = args.name, args.version
    base.atlas_prior = AtlasPriorSpec.from_json({**settings, "atlases": [a.to_json() for a in atlases]})
    base.description = (f"Cascade (Roth et al. 2018) for 10 abdominal structures: the {network} networks fused "
                        f"with {len(atlases)} registered atlases; research use, not for clinical decisions.")
    base.license = (f"networks: {base.license or 'see the base model'}; atlases: CC-BY-4.0, derived from the "
                    "TotalSegmentator dataset (Wasserthal et al. 2023) and its Apache-2.0 example CT")
    base.provenance = {"network": {"model": network, **base.provenance}, "atlas_prior": {
        "built_by": "python configs/build_atlas_model.py" + (f" --exclude {args.exclude}" if exclude else "")
        + f" --misregistered {args.misregistered} --misregistered-margin-mm {args.misregistered_margin_mm:g}",
        "excluded": sorted(exclude), "atlases": [c.name for c in cases],
        "data": "TotalSegmentator dataset (Wasserthal et al. 2023, CC-BY 4.0) and its Apache-2.0 example CT"}}
    base.save(out)
    print(f"wrote {out} with {len(atlases)} atlases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
