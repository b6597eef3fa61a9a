"""How much of a per-organ Dice is the grid (the recipe's thirtieth round), in one command.

Clinical CTs come at 0.6-0.9 mm in-plane and 0.6-5 mm slices; the labelled CTs here at 1.5 and
3 mm. A model segments one CT resampled onto other grids that hold the same anatomy (linear
interpolation; where the new slices are thicker, the CT is first blurred along the slice axis by a
Gaussian whose FWHM is the new thickness, as a thicker slice averages what it covers), and each
result is brought back onto the native grid (nearest) and scored against the native reference.
The spread over grids is what re-gridding alone does to each organ's Dice: differences smaller
than it say nothing. "reference via GRID" rows score the reference itself sampled on that grid and
brought back: the most a result on that grid can reach (thick slices lose what they average).

    python configs/grid_check.py --model PKG --ct CT --labels LABELS \
        [--grids native 0.8,0.8,native 0.8,0.8,2.5] [--json OUT]

A grid is three spacings in mm (x, y, z of the image's axes); "native" keeps that axis's spacing.
Prints one row per grid and the range per organ; writes only the optional --json file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "configs"))

from compare_bundled import dice_per_organ, reference_on_grid  # noqa: E402 - same folder

from CascadeSegLib.inference.cascade import Segmenter  # noqa: E402
from CascadeSegLib.inference.preprocess import resample  # noqa: E402
from CascadeSegLib.io import read_image  # noqa: E402
from CascadeSegLib.packaging.model import ModelPackage, find_model  # noqa: E402

DEFAULT_GRIDS = ("native", "0.8,0.8,native", "0.8,0.8,2.5")
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def parse_grid(text: str, native: tuple[float, ...]) -> tuple[float, float, float] | None:
    """Spacings (x, y, z) for `text` ("native", or three numbers / "native" joined by commas);
    None for the native grid itself."""
    if text == "native":
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(f"grid {text!r} is not three spacings joined by commas (e.g. 0.8,0.8,native)")
    out = []
    for part, own in zip(parts, native):
        value = own if part == "native" else float(part)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"grid {text!r}: spacings must be positive millimetres")
        out.append(float(value))
    return out[0], out[1], out[2]


def regrid(ct: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """`ct` on a grid of `spacing` with its origin, direction and physical extent (voxel count
    rounded); thicker voxels along an axis first blur the CT there (FWHM = the new spacing)."""
    sigmas = [math.sqrt(max(new ** 2 - old ** 2, 0.0)) / FWHM_PER_SIGMA for new, old in zip(spacing, ct.GetSpacing())]
    source = ct
    if any(s > 0 for s in sigmas):
        source = sitk.SmoothingRecursiveGaussian(sitk.Cast(ct, sitk.sitkFloat32), [max(s, 1e-3) for s in sigmas])
    size = [max(1, int(round(n * old / new))) for n, old, new in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    out = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing,
                        ct.GetDirection(), -1024.0, sitk.sitkFloat32)
    if ct.GetPixelID() == sitk.sitkFloat32:
        return out
    rounded = sitk.GetImageFromArray(np.rint(sitk.GetArrayViewFromImage(out)))   # not truncated toward 0
    rounded.CopyInformation(out)
    return sitk.Cast(rounded, ct.GetPixelID())


def check(model: ModelPackage, ct: sitk.Image, reference: sitk.Image, grids: list[str]) -> dict[str, Any]:
    """Dice per organ (and "mean") on the native grid of `ct` for each of `grids`, and the range."""
    values = {o: model.labels.by_name(o).value for o in model.labels.names}
    segmenter = Segmenter(model, device="cpu")
    rows: dict[str, dict[str, float | None]] = {}
    ceiling: dict[str, dict[str, float | None]] = {}
    for text in grids:
        spacing = parse_grid(text, ct.GetSpacing())
        image = ct if spacing is None else regrid(ct, spacing)
        rows[text] = dice_per_organ(to_native(segmenter.segment(image).labels, ct), reference, values)[0]
        # the reference itself sampled on that grid and brought back: what a perfect result there scores
        ceiling[text] = dice_per_organ(to_native(to_native(reference, image), ct), reference, values)[0]
    scored = [k for k in next(iter(rows.values())) if all(r.get(k) is not None for r in rows.values())]
    spread = {k: max(float(r[k] or 0) for r in rows.values()) - min(float(r[k] or 0) for r in rows.values())
              for k in scored}
    return {"model": f"{model.name} {model.version}", "grids": rows, "range": spread, "ceiling": ceiling}


def to_native(labels: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """`labels` on `grid` (nearest: a label is never blended)."""
    return resample(labels, grid, "nearest")


def markdown(result: dict[str, Any]) -> str:
    organs = list(result["range"])
    lines = [f"{result['model']}: Dice on the native grid (mean of the organs the reference holds)", "",
             "| grid | " + " | ".join(organs) + " |", "|---|" + "---:|" * len(organs)]
    for grid, row in result["grids"].items():
        lines.append(f"| {grid} | " + " | ".join(f"{row[o]:.3f}" for o in organs) + " |")
    lines.append("| range | " + " | ".join(f"{result['range'][o]:.3f}" for o in organs) + " |")
    for grid, row in result["ceiling"].items():
        if grid != "native":
            lines.append(f"| reference via {grid} | " + " | ".join(f"{row[o]:.3f}" for o in organs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model folder or installed name")
    ap.add_argument("--ct", required=True, help="a CT with reference labels")
    ap.add_argument("--labels", required=True, help="its reference labels (TotalSegmentator ids)")
    ap.add_argument("--grids", nargs="+", default=list(DEFAULT_GRIDS), help="spacings x,y,z in mm, or native")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    ct = read_image(args.ct)
    try:
        for text in args.grids:
            parse_grid(text, ct.GetSpacing())
    except ValueError as exc:
        print(f"error: --grids: {exc}", file=sys.stderr)
        return 2
    model = ModelPackage.load(find_model(args.model))
    organs = model.labels.names
    values = {o: model.labels.by_name(o).value for o in organs}
    result = check(model, ct, reference_on_grid(Path(args.labels), ct, organs, values), args.grids)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
