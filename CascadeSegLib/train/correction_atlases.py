"""Stored corrections as registered atlases: what a site's own corrected CTs teach without training.

A corrected CT is a labelled CT of the site's own patients, scanner and protocol. Fine-tuning on
it takes minutes of CPU per few cases and moves the networks little; registered as one more atlas
it joins every later segmentation's atlas vote at once (`inference/atlas_prior.py`), about a
second per registration. Only what the user vouched for votes: the reviewed organs, and the
background near them (the same rule as the fine-tuning's loss, `vouched`); everything else is
`UNKNOWN_LABEL`, which casts no vote. The atlas is stored as the package's own atlases are:
the CT as int16 HU and the labels in the package's values, on a 3 mm grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import UserError
from ..inference import preprocess
from ..inference.atlas_prior import AtlasPriorSpec, AtlasSpec
from ..labels import UNKNOWN_LABEL, LabelSet

ATLAS_SPACING_MM = 3.0            # the grid the bundled atlases are stored on
UNREVIEWED_MARGIN = 2             # voxels around unreviewed organs left unvouched
TRUSTED_BAND_MM = 15.0            # background vouched for this close to a reviewed organ (or where the model put it)
PREFIX = "correction-"


def vouched(labels: np.ndarray, parent: np.ndarray | None, reviewed: Sequence[int], unreviewed: Sequence[int],
            spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels whose label a partly reviewed correction vouches for: the reviewed organs, and the
    background within TRUSTED_BAND_MM of them or of where the parent put them (the user fixed
    those boundaries), except near an unreviewed organ. A spleen nobody labelled must not be
    taken for background. With nothing unreviewed (or no parent labels), every voxel."""
    if parent is None or not len(unreviewed):
        return np.ones(labels.shape, dtype=bool)
    is_r = np.isin(labels, reviewed)
    band = max(1, round(TRUSTED_BAND_MM / min(spacing_mm)))
    near_r = preprocess.dilate(torch.from_numpy(is_r | np.isin(parent, reviewed)), band).numpy()
    near_u = preprocess.dilate(torch.from_numpy(np.isin(labels, unreviewed) | np.isin(parent, unreviewed)),
                               UNREVIEWED_MARGIN).numpy()
    return is_r | (near_r & ~near_u)


def atlas_name(case_id: str) -> str:
    return PREFIX + case_id


def check_new_names(prior: AtlasPriorSpec, case_ids: Sequence[str], model: str) -> None:
    """UserError if a correction's atlas name is already one of the parent's atlases."""
    taken = {a.name for a in prior.atlases} & {atlas_name(c) for c in case_ids}
    if taken:
        raise UserError(f"model {model} already has atlas(es) {', '.join(sorted(taken))}; store those corrections "
                        "under other case ids (`cascadeseg corrections add ... --case NEW_ID`) and try again")


def write_correction_atlas(case_id: str, ct: sitk.Image, labels: sitk.Image, parent: sitk.Image | None,
                           reviewed: Sequence[str], ours: LabelSet, table: np.ndarray, folder: Path) -> AtlasSpec:
    """One correction (`labels` on `ct`'s grid, in the parent model's values; `parent`: the parent
    model's labels on the same grid) written into package `folder` as an atlas in `ours`' values
    (`table`: parent value -> ours). Its sha256s are filled in when the package is saved."""
    grid = preprocess.grid_for_spacing(ct, [ATLAS_SPACING_MM] * 3)
    ct3 = preprocess.resample(ct, grid, "linear", -1024.0, sitk.sitkInt16)

    def on_grid(image: sitk.Image) -> np.ndarray:
        return table[sitk.GetArrayFromImage(preprocess.resample(image, grid, "nearest", 0, sitk.sitkUInt8))]

    lab3 = on_grid(labels)
    par3 = on_grid(parent) if parent is not None else None
    reviewed_values = [ours.by_name(n).value for n in reviewed]
    unreviewed_values = [lab.value for lab in ours if lab.name not in reviewed]
    known = vouched(lab3, par3, reviewed_values, unreviewed_values, [ATLAS_SPACING_MM] * 3)
    lab3 = np.where(known, lab3, np.uint8(UNKNOWN_LABEL)).astype(np.uint8)
    out = sitk.GetImageFromArray(lab3)
    out.CopyInformation(grid)
    name = atlas_name(case_id)
    spec = AtlasSpec(name=name, image=f"atlases/{name}_ct.nii.gz", labels=f"atlases/{name}_labels.nii.gz")
    (folder / "atlases").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct3, str(folder / spec.image), True)
    sitk.WriteImage(out, str(folder / spec.labels), True)
    return spec
