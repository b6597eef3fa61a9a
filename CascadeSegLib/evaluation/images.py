"""Label maps for evaluation: label-set resolution, reading, and putting a label map on a reference grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import UserError
from ..labels import DEFAULT_ORGANS, LabelSet, standard_labels


def resolve_labels(spec: str | None) -> LabelSet:
    """A label set from a CLI option: JSON list (inline or file), model name/path, or names.

    None gives the standard organs (DEFAULT_ORGANS, values 1..10).
    """
    if spec is None or not str(spec).strip():
        return LabelSet.from_names(DEFAULT_ORGANS)
    spec = str(spec).strip()
    from ..label_presets import PRESETS  # dataset presets: totalsegmentator, btcv, amos, msd-*

    if spec.lower() in PRESETS:
        from ..label_presets import preset_labels

        return preset_labels(spec.lower())
    try:
        if spec.startswith("["):
            return LabelSet.from_json(json.loads(spec))
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return LabelSet.from_json(data["labels"] if isinstance(data, dict) else data)
        if path.is_dir() and (path / "model.json").is_file():
            return LabelSet.from_json(json.loads((path / "model.json").read_text(encoding="utf-8"))["labels"])
        if path.is_file() and path.suffix.lower() == ".zip":
            import zipfile
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "model.json"),
                            None)
                if name is None:
                    raise UserError(f"{path} holds no model.json; pass a model, a JSON label "
                                    "list or comma-separated organ names to --labels")
                return LabelSet.from_json(json.loads(zf.read(name))["labels"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read labels from {spec!r} ({exc}); give a JSON list of "
                        '{"value": .., "name": ..} items, a model, or organ names') from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if "," in spec or all(n in standard_labels() for n in names):
        try:
            return LabelSet.from_names(names)
        except ValueError as exc:
            raise UserError(f"bad --labels {spec!r}: {exc}") from None
    from ..packaging.model import load_model  # lazy: only needed for model names
    try:
        return load_model(spec).labels
    except UserError:
        raise UserError(f"unknown labels {spec!r}: not a model, a JSON label list or known "
                        "organ names; use e.g. --labels liver,spleen or a model name") from None


def read_label_map(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D label map as an unsigned integer image; refuse probability maps and 4D."""
    from ..io import read_image  # lazy: keeps `import evaluate` light
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; a label map must be an image file")
    return as_label_map(read_image(path), str(path))


def as_label_map(img: sitk.Image, what: str = "label map") -> sitk.Image:
    """Check that `img` is a 3D integer label map and return it as UInt16 (or UInt32)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{what} is not a 3D single-component label map (dimension "
                        f"{img.GetDimension()}, {img.GetNumberOfComponentsPerPixel()} "
                        "components); export a plain label map (e.g. <case>_labels.nii.gz)")
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UserError(f"{what} has non-integer values (a probability map?); "
                            "pass a label map")
    lo = float(arr.min()) if arr.size else 0.0
    hi = float(arr.max()) if arr.size else 0.0
    if lo < 0:
        raise UserError(f"{what} has negative label values; pass a label map with values >= 0")
    target = sitk.sitkUInt16 if hi < 65536 else sitk.sitkUInt32
    return img if img.GetPixelID() == target else sitk.Cast(img, target)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when `a` and `b` share size, spacing, origin and direction (within float noise)."""
    if a.GetSize() != b.GetSize():
        return False
    sp = np.asarray(b.GetSpacing())
    return (np.allclose(a.GetSpacing(), sp, rtol=1e-5, atol=0)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4 * float(sp.min()))
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-5))


def to_reference_grid(pred: sitk.Image, ref: sitk.Image) -> tuple[sitk.Image, bool]:
    """`pred` on `ref`'s grid (nearest-neighbour resampling when needed); (image, resampled)."""
    if same_grid(pred, ref):
        if pred.GetOrigin() != ref.GetOrigin() or pred.GetSpacing() != ref.GetSpacing() \
                or pred.GetDirection() != ref.GetDirection():
            pred = sitk.Image(pred)
            pred.CopyInformation(ref)
        return pred, False
    out = sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        pred.GetPixelID())
    return out, True
