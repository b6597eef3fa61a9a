"""Golden outputs of the default model: the sample CT and the DICOM slab, voxel for voxel.

`python Testing/make_golden.py` segments both cases with `cascadeseg segment` (default model,
CPU, no report) and prints what it measured next to what `Testing/Data/golden.json` holds;
`--write` stores the new values. Write only when a change of the outputs is intended and
explained in the commit; `Testing/test_golden.py` recomputes the same and compares exactly.

What is pinned per case, for the label map (`<case>_labels.nii.gz`) and the Slicer
segmentation (`<case>.seg.nrrd`) read back from disk: a sha256 of the voxels and the exact
geometry (size, spacing, origin, direction, pixel type), the voxel count of every label
value, and for the segmentation a sha256 of its segments' names, values, colours and
terminology.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
GOLDEN = TESTING / "Data" / "golden.json"
CASES = {
    "sample_ct": REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz",
    "dicom_slab": TESTING / "Data" / "dicom_slab",
}
# The command every case runs, as a user would type it (input and output are added).
ARGS = ["--device", "cpu", "--no-report", "--quiet"]


def image_digest(image: sitk.Image) -> dict[str, Any]:
    """sha256 of the voxels and the exact geometry, and the voxel count of each value."""
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    geometry = {
        "size": list(image.GetSize()),
        "spacing": [repr(float(v)) for v in image.GetSpacing()],
        "origin": [repr(float(v)) for v in image.GetOrigin()],
        "direction": [repr(float(v)) for v in image.GetDirection()],
        "pixel": image.GetPixelIDTypeAsString(),
    }
    h = hashlib.sha256(json.dumps(geometry, sort_keys=True).encode())
    h.update(array.tobytes())
    values, counts = np.unique(array, return_counts=True)
    return {"sha256": h.hexdigest(), "size": geometry["size"], "pixel": geometry["pixel"],
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts)}}


def segments_digest(segments: list[dict[str, Any]]) -> str:
    keep = [{"name": s["name"], "label_value": s["label_value"], "color": [round(c, 6) for c in s["color"] or ()],
             "terminology": s["terminology"]} for s in segments]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def segment_case(name: str, source: Path, folder: Path) -> dict[str, Any]:
    """Run `cascadeseg segment` in this process on one case; digests of what it wrote."""
    from CascadeSegLib.cli import main
    from CascadeSegLib.io import case_name, read_segmentation_nrrd

    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["segment", str(source), "-o", str(folder), *ARGS])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise RuntimeError(f"cascadeseg segment {source} exited with {code}")
    case = case_name(source)  # the name `segment` gives the outputs
    labels = sitk.ReadImage(str(folder / f"{case}_labels.nii.gz"))
    seg, segments = read_segmentation_nrrd(folder / f"{case}.seg.nrrd")
    # The segmentation's voxel counts are those of its sha256; only the hashes are kept.
    return {"labels": image_digest(labels),
            "segmentation": {"sha256": image_digest(seg)["sha256"], "segments_sha256": segments_digest(segments)}}


def measure(names: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cascadeseg-golden-") as tmp:
        for name in names or list(CASES):
            out[name] = segment_case(name, CASES[name], Path(tmp) / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"store the measured values in {GOLDEN.name}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    measured = measure()
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    text = json.dumps({"command": ["cascadeseg", "segment", "INPUT", "-o", "FOLDER", *ARGS], "cases": measured},
                      indent=1) + "\n"
    same = stored.get("cases") == measured
    print(text if not same else f"{GOLDEN} is up to date")
    if args.write and not same:
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    return 0 if same or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
