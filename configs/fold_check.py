"""The fold checks behind every atlas and fusion choice since abdomen-ct 2.1.0, in one command.

A leave-one-out fold package (networks trained without patient P: `train_prepared.py all ...
--exclude P`; atlases built without P: `build_atlas_model.py --exclude P`) segments P's CT,
scored against P's reference labels (TotalSegmentator ids or the model's values):
- fused, at each network weight asked for: the whole held-out scan, and up to five 40 mm slabs
  cut from it where it holds both liver and spleen (the "cut slabs": what the DICOM slab is, on
  a patient with a reference; `slab_starts`); mean Dice of the organs each reference holds;
- the atlas prior alone (its argmax, no network): the same whole scan and cut slabs;
- false organs: ml labelled as organs that a slab's reference does not hold at all, on five
  40 mm slabs spread over the whole scan length (lower-abdomen slabs show what a network
  without context invents), and (`--negative`) on whole CTs that hold none of the organs, such
  as TotalSegmentator s0003: the check a weight that favours the atlases can fail (abdomen-ct
  at w 0.4 labelled 8.1 ml there, 2.0 at 0.5; recipe, twenty-sixth round).
The atlases are registered once per image: a weight changes only the fusion. Slabs are cut
along the image's third index axis (slices).

    python configs/fold_check.py --model PKG --ct CT --labels LABELS [--weights 0.5 0.9]
        [--negative ORGAN_FREE_CT ...] [--json OUT]

Prints one row per weight (and one for the atlases alone) with per-organ Dice (whole / cut
slabs); writes only the optional --json file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

from compare_bundled import dice_per_organ, reference_on_grid  # noqa: E402 - same folder

from CascadeSegLib.inference import atlas_prior  # noqa: E402
from CascadeSegLib.inference.cascade import Segmenter, resample_labels_to  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage  # noqa: E402

SLAB_MM = 40.0
#: the atlas_prior settings --set may change (every field but the atlas list)
KNOWN_SETTINGS = {f.name for f in dataclasses.fields(atlas_prior.AtlasPriorSpec)} - {"atlases"}
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _geometry(image: sitk.Image) -> tuple:
    """What identifies an image here: stage 2's grid, and so its prior, follow from it."""
    return image.GetSize() + image.GetOrigin() + image.GetSpacing()


class RegisterOnce(Segmenter):
    """A Segmenter that keeps each image's registered atlases (keyed by the image's geometry) and
    fuses them with the package's current network weight: `spec.network_weight` may change
    between calls."""

    def __init__(self, model: ModelPackage) -> None:
        super().__init__(model, device="cpu")
        self.priors: dict[tuple, atlas_prior.GridPrior | None] = {}
        self.agreements: dict[tuple, float] = {}

    def _atlas_prior(self, image: sitk.Image, grid: sitk.Image, t: dict[str, float],
                     stage1: sitk.Image | None = None) -> atlas_prior.GridPrior | None:
        key = _geometry(image)
        if key not in self.priors:     # stage 1 does not change with the weight: one prior per image
            self.priors[key] = super()._atlas_prior(image, grid, t, stage1)
            if "atlas_prior_agreement" in self._stats:
                self.agreements[key] = self._stats["atlas_prior_agreement"]
        elif key in self.agreements:   # what the scan check and min_scan_agreement read, as registered
            self._stats["atlas_prior_agreement"] = self.agreements[key]
        cached = self.priors[key]
        if cached is None or self.model.atlas_prior is None:
            return None
        return atlas_prior.GridPrior(cached.prior, cached.source, cached.target, self.model.atlas_prior.network_weight)

    def prior_labels(self, image: sitk.Image) -> sitk.Image | None:
        """The atlas prior's own labels (its argmax, no network) on `image`'s grid, from the
        registrations `segment(image)` made; None where the atlases were skipped."""
        if _geometry(image) not in self.priors:
            raise KeyError("segment the image first")
        fusion = self.priors[_geometry(image)]
        if fusion is None:
            return None
        labels = sitk.GetImageFromArray(fusion.labels().cpu().numpy())
        labels.CopyInformation(fusion.target)
        return resample_labels_to(labels, image, edge=1)


def slab_starts(ref: np.ndarray, liver: int, spleen: int, slices: int) -> list[int]:
    """First slices of the cut slabs (`slices` long, inside the (z, y, x) `ref`): five placed
    evenly among the slabs that hold the most slices with both liver and spleen, duplicates
    dropped. Where that range is longer than a slab, the slabs lie within it (the first starts at
    its lowest slice, the last ends at its highest); where shorter, each slab holds all of it;
    where it ends at the scan's edge, fewer (s0009: its liver and spleen share the top 14 slices
    of its scan, and one 40 mm slab holds them)."""
    both = np.nonzero((ref == liver).any((1, 2)) & (ref == spleen).any((1, 2)))[0]
    if both.size == 0:
        raise ValueError("the reference holds no slice with both liver and spleen: no cut slabs")
    if slices > ref.shape[0]:
        raise ValueError(f"the scan has {ref.shape[0]} slices, fewer than one {slices}-slice slab")
    lo, hi = sorted((int(both[0]), int(both[-1]) - slices + 1))
    lo, hi = min(max(lo, 0), ref.shape[0] - slices), min(max(hi, 0), ref.shape[0] - slices)
    return sorted({int(lo + f * (hi - lo)) for f in FRACTIONS})


def span_starts(depth: int, slices: int) -> list[int]:
    """First slices of five slabs spread over the whole scan length."""
    return [int(f * (depth - slices)) for f in FRACTIONS]


def false_organ_ml(pred: sitk.Image, ref: sitk.Image | None, values: dict[str, int]) -> float:
    """ml of `pred` labelled as organs that `ref` does not hold at all (`ref` None: a CT that holds
    none of them, where every organ voxel is false)."""
    p = sitk.GetArrayViewFromImage(pred)
    r = sitk.GetArrayViewFromImage(ref) if ref is not None else None
    voxel_ml = float(np.prod(pred.GetSpacing())) / 1000.0
    return sum(float(np.count_nonzero(p == v)) * voxel_ml for v in values.values()
               if r is None or not (r == v).any())


def _summary(whole: dict[str, float | None], slabs: list[dict[str, float | None]], organs: list[str]) -> dict[str, Any]:
    """Whole-scan and mean-over-cut-slabs Dice, per organ and overall."""
    def mean_over_slabs(key: str) -> float | None:
        found = [v for v in (d.get(key) for d in slabs) if v is not None]
        return float(np.mean(found)) if found else None

    per_organ = {o: {"whole": whole.get(o), "slabs": mean_over_slabs(o)} for o in organs}
    return {"whole": whole["mean"], "slabs": mean_over_slabs("mean"), "organs": per_organ}


def check(model: ModelPackage, ct: sitk.Image, ref: sitk.Image, weights: list[float],
          negatives: list[sitk.Image] | None = None) -> dict[str, Any]:
    """Every number of the fold check for one held-out CT (see the module docstring)."""
    organs = model.labels.names
    values = {o: model.labels.by_name(o).value for o in organs}
    arr = sitk.GetArrayViewFromImage(ref)
    slices = int(round(SLAB_MM / ct.GetSpacing()[2]))
    cut = slab_starts(arr, values["liver"], values["spleen"], slices)
    span = span_starts(ct.GetSize()[2], slices)
    seg = RegisterOnce(model)
    out: dict[str, Any] = {"model": f"{model.name} {model.version}", "slab_slices": slices,
                           "cut_slabs": cut, "spread_slabs": span, "fused": {}}

    def score(images: list[sitk.Image], refs: list[sitk.Image]) -> list[dict[str, float | None]]:
        return [dice_per_organ(seg.segment(i).labels, r, values)[0] for i, r in zip(images, refs)]

    whole_img, cut_imgs = [ct], [ct[:, :, k:k + slices] for k in cut]
    whole_ref, cut_refs = [ref], [ref[:, :, k:k + slices] for k in cut]
    span_imgs, span_refs = [ct[:, :, k:k + slices] for k in span], [ref[:, :, k:k + slices] for k in span]
    spec = model.atlas_prior
    for w in weights:
        if spec is not None:
            spec.network_weight = w
        whole = score(whole_img, whole_ref)[0]
        row = _summary(whole, score(cut_imgs, cut_refs), organs)
        row["false_ml"] = [round(false_organ_ml(seg.segment(i).labels, r, values), 1)
                           for i, r in zip(span_imgs, span_refs)]
        if negatives:
            row["negative_ml"] = [round(false_organ_ml(seg.segment(i).labels, None, values), 1) for i in negatives]
        out["fused"][f"{w:g}"] = row
    if spec is not None:
        alone = []
        for image, r in zip(whole_img + cut_imgs, whole_ref + cut_refs):
            labels = seg.prior_labels(image)
            if labels is None:                # atlases skipped (too little body): they give nothing
                labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
                labels.CopyInformation(image)
            alone.append(dice_per_organ(labels, r, values)[0])
        out["atlases_alone"] = _summary(alone[0], alone[1:], organs)
    return out


def markdown(result: dict[str, Any], organs: list[str]) -> str:
    """One row per weight and one for the atlases alone: means and per-organ Dice, whole / cut slabs."""
    negatives = any("negative_ml" in row for row in result["fused"].values())

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    def short(v: float | None) -> str:        # two places, rounded (0.878 is 0.88, not 0.87)
        return "-" if v is None else f"{v:.2f}"

    def organ_cells(row: dict[str, Any]) -> list[str]:
        return [f"{short(row['organs'][o]['whole'])} / {short(row['organs'][o]['slabs'])}" for o in organs]

    lines = [f"{result['model']}: whole held-out scan / {len(result['cut_slabs'])} cut {SLAB_MM:g} mm slab(s) "
             "(mean Dice of the organs each reference holds)", "",
             "| | whole | cut slabs | " + " | ".join(organs) + " | false organs on spread slabs (ml) |"
             + (" organs on organ-free CTs (ml) |" if negatives else ""),
             "|---|---:|---:|" + "---:|" * len(organs) + "---|" + ("---|" if negatives else "")]
    for w, row in result["fused"].items():
        lines.append(f"| fused, w {w} | {cell(row['whole'])} | {cell(row['slabs'])} | " + " | ".join(organ_cells(row))
                     + " | " + " / ".join(f"{v:g}" for v in row["false_ml"]) + " |"
                     + (" " + " / ".join(f"{v:g}" for v in row["negative_ml"]) + " |" if negatives else ""))
    if "atlases_alone" in result:
        row = result["atlases_alone"]
        lines.append(f"| atlases alone | {cell(row['whole'])} | {cell(row['slabs'])} | "
                     + " | ".join(organ_cells(row)) + " | |" + (" |" if negatives else ""))
    return "\n".join(lines)


def with_settings(model: ModelPackage, settings: list[str]) -> ModelPackage:
    """`model` with its atlas_prior settings changed (KEY=JSON each), checked as model.json is."""
    if model.atlas_prior is None:
        raise ValueError("the model has no atlas_prior")
    raw = model.atlas_prior.to_json()
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in KNOWN_SETTINGS:
            raise ValueError(f"{item!r} is not KEY=VALUE with a known atlas_prior KEY")
        try:
            raw[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{item!r}: the value is not JSON") from None
    model.atlas_prior = atlas_prior.AtlasPriorSpec.from_json(raw)
    model.atlas_prior.check_organs(model.labels.names)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the fold's package: networks and atlases without the patient")
    ap.add_argument("--ct", required=True, help="the held-out patient's CT")
    ap.add_argument("--labels", required=True, help="its reference labels (TotalSegmentator ids)")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="network weights to fuse with (default: the package's own)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                    help="change atlas_prior settings for this check, e.g. mixup_share=0.7 "
                         "'mixup_organs=[\"liver\", \"spleen\"]'")
    ap.add_argument("--negative", nargs="+", default=[], metavar="CT",
                    help="CTs with none of the organs (e.g. TotalSegmentator s0003): ml labelled there")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    model = ModelPackage.load(args.model)
    if args.set:
        try:
            model = with_settings(model, args.set)
        except ValueError as exc:
            print(f"error: --set: {exc}", file=sys.stderr)
            return 2
    weights = args.weights or [model.atlas_prior.network_weight if model.atlas_prior is not None else 1.0]
    if any(not 0.0 <= w <= 1.0 for w in weights):
        print("error: --weights must lie in [0, 1]", file=sys.stderr)
        return 2
    organs = model.labels.names
    values = {o: model.labels.by_name(o).value for o in organs}
    ct = read_image(args.ct)
    result = check(model, ct, reference_on_grid(Path(args.labels), ct, organs, values), weights,
                   [read_image(n) for n in args.negative])
    print(markdown(result, organs))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
