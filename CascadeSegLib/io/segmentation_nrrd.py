"""3D Slicer segmentations (`.seg.nrrd`): a label map plus segment names, colours and terminology."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..labels import LabelSet
from .images import atomic_write_image, describe_geometry, index_to_physical, prepare_output, read_image

SEG_REPRESENTATION = "Binary labelmap"
_SEG_CONTAINED = "Binary labelmap|Closed surface|"
_SEG_STATUS_TAG = "Segmentation.Status:inprogress"


def _ijk_to_ras(img: sitk.Image) -> np.ndarray:
    """4x4 voxel-index -> RAS matrix of a 3D image (SimpleITK geometry is LPS)."""
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = index_to_physical(img)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return lps_to_ras @ m


def _conversion_parameters(img: sitk.Image) -> str:
    """Slicer's 'name|value|description&...' string; the reference geometry is the grid."""
    m = _ijk_to_ras(img)
    sx, sy, sz = img.GetSize()
    geometry = ";".join(f"{v:.17g}" for v in m.ravel()) + f";0;{sx - 1};0;{sy - 1};0;{sz - 1};"
    params = [
        ("Collapse labelmaps", "1", "Merge the labelmaps into as few shared labelmaps as possible"),
        ("Compute surface normals", "1", "Compute surface normals"),
        ("Conversion method", "0", "Closed surface algorithm; 0 = flying edges"),
        ("Crop to reference image geometry", "0", "Crop the model to the reference geometry"),
        ("Decimation factor", "0.0", "Desired reduction in the total number of polygons"),
        ("Fractional labelmap oversampling factor", "1", "Oversampling of fractional labelmaps"),
        ("Joint smoothing", "0", "Perform joint smoothing"),
        ("Oversampling factor", "1", "Oversampling of the reference image geometry"),
        ("Reference image geometry", geometry, "Image geometry of the labelmap (IJK to RAS matrix; extent)"),
        ("Smoothing factor", "0.5", "Smoothing factor from 0 (none) to 1 (strong)"),
        ("Threshold fraction", "0.5", "Closed surface threshold as a fraction"),
    ]
    return "&".join(f"{n}|{v}|{d}" for n, v, d in params) + "&"


def _extent_string(sl: tuple[slice, ...] | None) -> str:
    """'x0 x1 y0 y1 z0 z1' (inclusive voxel indices) from numpy (z, y, x) slices."""
    if sl is None:
        return "0 -1 0 -1 0 -1"
    z, y, x = sl
    return f"{x.start} {x.stop - 1} {y.start} {y.stop - 1} {z.start} {z.stop - 1}"


def _nonzero_box(array: np.ndarray) -> list[tuple[int, int]] | None:
    """[(start, stop), ...] per axis of the nonzero voxels, from axis projections (no labelling
    pass); None if there are none."""
    nz = array != 0
    box = []
    for axis in range(array.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(a for a in range(array.ndim) if a != axis)))
        if idx.size == 0:
            return None
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def write_segmentation_nrrd(labelmap: sitk.Image, labels: LabelSet,
                            path: str | os.PathLike[str], compress: bool = True,
                            overwrite: bool = True,
                            protect: Iterable[str | os.PathLike[str]] | None = None) -> Path:
    """Write a label map as a 3D Slicer segmentation (`.seg.nrrd`, one shared layer).

    The voxel grid is the label map's, unchanged; every label of `labels` becomes a segment
    (also when empty) with its display name, colour and terminology, so Slicer shows the
    organs with standard names and colours.
    """
    path = Path(path)
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"a segmentation needs a 3D scalar label map, got {describe_geometry(labelmap)}")
    if any(lab.value > 255 for lab in labels):
        raise ValueError("label values above 255 do not fit a uint8 .seg.nrrd")
    prepare_output(path, overwrite, protect, (".seg.nrrd", ".nrrd"))

    arr = sitk.GetArrayViewFromImage(labelmap)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        raise ValueError("label map has non-integer values")
    known = {lab.value for lab in labels}
    unknown: list[int] = []
    if arr.size:
        low, top = float(arr.min()), float(arr.max())
        # Values within [0, top] with every 1..top a label cannot hold an unknown value; only
        # otherwise pay for np.unique (~1 s on a 512x512x400 map, min/max take 0.02 s).
        if not (low >= 0 and top.is_integer() and set(range(1, int(top) + 1)) <= known):
            unknown = sorted(set(int(v) for v in np.unique(arr)) - {0} - known)
    if unknown:
        raise ValueError(f"label map holds values {unknown} that are not in the label set")
    arr8 = np.ascontiguousarray(arr, dtype=np.uint8)
    seg = sitk.GetImageFromArray(arr8)
    seg.CopyInformation(labelmap)
    del arr

    # Slicer reads one labelmap per layer and crops it to the Extent of the *first* segment of
    # that layer, so a per-label box would cut the other organs off. Like Slicer's own writer,
    # every segment of the shared layer therefore carries the extent of the union of all
    # labels ('0 -1 0 -1 0 -1' when the whole map is empty).
    box = _nonzero_box(arr8)
    union = _extent_string(tuple(slice(a, b) for a, b in box) if box else None)

    meta: dict[str, str] = {
        "Segmentation_MasterRepresentation": SEG_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": _SEG_CONTAINED,
        "Segmentation_ConversionParameters": _conversion_parameters(seg),
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, lab in enumerate(labels):
        key = f"Segment{i}_"
        meta[key + "ID"] = lab.name
        meta[key + "Name"] = lab.display
        meta[key + "NameAutoGenerated"] = "0"
        meta[key + "Color"] = " ".join(f"{c:.6g}" for c in lab.color_float)
        meta[key + "ColorAutoGenerated"] = "0"
        meta[key + "Layer"] = "0"
        meta[key + "LabelValue"] = str(lab.value)
        meta[key + "Extent"] = union
        meta[key + "Tags"] = f"{_SEG_STATUS_TAG}|TerminologyEntry:{lab.terminology()}|"
    for k, v in meta.items():
        seg.SetMetaData(k, v)
    atomic_write_image(seg, path, ".nrrd", compress)
    return path


def _parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split("|"):
        if ":" in item:
            k, v = item.split(":", 1)
            tags[k] = v
    return tags


def read_segmentation_nrrd(path: str | os.PathLike[str]) -> tuple[sitk.Image, list[dict[str, Any]]]:
    """Read a single-layer Slicer `.seg.nrrd`: the label map and one dict per segment.

    Segment dicts hold id, name, color (floats 0-1), label_value, layer, extent, terminology
    and tags. Multi-layer (overlapping) segmentations are refused: they are no label map.
    """
    path = Path(path)
    img = read_image(path)
    keys = set(img.GetMetaDataKeys())

    def get(key: str, default: str = "") -> str:
        return img.GetMetaData(key) if key in keys else default

    segments: list[dict[str, Any]] = []
    i = 0
    while f"Segment{i}_ID" in keys:
        p = f"Segment{i}_"
        tags = _parse_tags(get(p + "Tags"))
        color = get(p + "Color")
        segments.append({
            "id": get(p + "ID"),
            "name": get(p + "Name"),
            "color": tuple(float(c) for c in color.split()) if color else None,
            "label_value": int(get(p + "LabelValue", "1")),
            "layer": int(get(p + "Layer", str(i))),
            "extent": tuple(int(v) for v in get(p + "Extent", "0 -1 0 -1 0 -1").split()),
            "terminology": tags.get("TerminologyEntry", ""),
            "tags": tags,
        })
        i += 1
    if img.GetNumberOfComponentsPerPixel() > 1 or any(s["layer"] != 0 for s in segments):
        raise UserError(f"{path} has overlapping segments in several layers; export it from "
                        f"Slicer as a label map volume or a single-layer segmentation")
    for k in keys:  # the returned label map is plain data; its Slicer header is in `segments`
        img.EraseMetaData(k)
    return img, segments
