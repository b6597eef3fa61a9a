"""Merge a TotalSegmentator dataset case's per-structure masks into one label map (v2 ids).

The synthesis and the atlases read label maps in TotalSegmentator v2 "total" ids
(`Resources/TrainingData/totalsegmentator/classes.json`); the dataset ships one mask file per
structure:

    python configs/merge_totalsegmentator_masks.py DATA/s0327/segmentations -o s0327_label.nii.gz

The grid (size, spacing, origin, direction) is the source's, unchanged; only values change. A
voxel claimed by two TotalSegmentator masks (rare, at boundaries) keeps the higher id, and the
count is printed. Nothing is written over an existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CascadeSegLib.errors import UserError  # noqa: E402
from CascadeSegLib.io import read_image, write_image  # noqa: E402
from CascadeSegLib.io.images import WRITE_SUFFIXES, prepare_output  # noqa: E402

CLASSES = REPO / "Resources" / "TrainingData" / "totalsegmentator" / "classes.json"


def total_ids() -> dict[str, int]:
    """TotalSegmentator v2 name -> id."""
    return {name: int(i) for i, name in json.loads(CLASSES.read_text(encoding="utf-8")).items()}


def merge_totalsegmentator(folder: Path) -> tuple[sitk.Image, int]:
    """One label map from a case's per-structure masks; (image, voxels claimed twice)."""
    ids = total_ids()
    files = sorted(folder.glob("*.nii.gz"))
    unknown = [f.name for f in files if f.name[:-7] not in ids]
    if not files or unknown:
        raise UserError(f"{folder} holds no TotalSegmentator masks, or masks of unknown structures "
                        f"{unknown[:5]}; give a case's segmentations folder (<structure>.nii.gz files)")
    ordered = sorted(files, key=lambda p: ids[p.name[:-7]])     # higher ids written last
    # read_image: the dataset's headers are orthonormal only to ~1e-4 in some cases (s0000, s0002),
    # which a plain ITK read refuses; one warning for the case, not one per mask
    warned: list[str] = []
    first = read_image(ordered[0], on_warning=warned.append)
    out = np.zeros(sitk.GetArrayViewFromImage(first).shape, np.uint8)
    twice = 0
    for f in ordered:
        mask = first if f == ordered[0] else read_image(f, on_warning=warned.append)
        # One grid up to header noise: the dataset's masks differ by 3e-5 in direction cosines
        # (float32 headers), past evaluation.images.same_grid's 1e-5, so a looser check here only.
        if mask.GetSize() != first.GetSize() or not all(
                np.allclose(getattr(mask, g)(), getattr(first, g)(), atol=1e-4)
                for g in ("GetOrigin", "GetSpacing", "GetDirection")):
            raise UserError(f"{f.name} is on another grid than {ordered[0].name}; "
                            "the masks of one case share one grid: are they from one case?")
        m = sitk.GetArrayViewFromImage(mask) > 0
        twice += int((m & (out > 0)).sum())
        out[m] = ids[f.name[:-7]]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(first)
    if warned:
        more = f" (and {len(warned) - 1} more masks alike)" if len(warned) > 1 else ""
        print(f"warning: {warned[0]}{more}", file=sys.stderr)
    return img, twice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="the case's segmentations folder (<structure>.nii.gz files)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        prepare_output(args.out, args.overwrite, None, WRITE_SUFFIXES)   # refuse before reading 117 files
        img, twice = merge_totalsegmentator(args.source)
        write_image(img, args.out, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arr = sitk.GetArrayViewFromImage(img)
    print(f"{args.out}: {img.GetSize()} voxels of {tuple(round(s, 3) for s in img.GetSpacing())} mm, "
          f"{len(np.unique(arr)) - 1} structures; {twice} voxels were in two masks (the higher id kept)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
