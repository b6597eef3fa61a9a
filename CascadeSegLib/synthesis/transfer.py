"""The registration route of synthesis: a real labelled CT warped onto a label-only anatomy.

Rendering (`render.synthesize`) invents the texture; this route keeps a real CT's texture,
noise, contrast and unlabelled tissue, and moves them onto another body's anatomy. Both label
maps are drawn as clean mean-HU images from the same table, so the two images share their
intensities, which is what demons registration assumes. Structures found in both label maps
give an affine start (least squares on their centroids); demons then follows the shapes. The
real CT and its own labels go through the same transform, so image and labels stay consistent:
the result's labels are the atlas's labels, warped, not the target's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import UserError
from ..inference.preprocess import grid_for_spacing
from ..io.images import index_to_physical
from ..labels import UNKNOWN_LABEL
from .render import SynthResult, image_on, structure_hu
from .tissues import IntensityTable

AIR_HU = -1000.0


@dataclass(frozen=True)
class TransferSettings:
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)   # working and output grid, mm
    demons_iterations: int = 80
    demons_sigma_vox: float = 1.5          # smoothing of the displacement field (voxels)
    min_common: int = 6                    # structures both label maps must share


def _centroids(lab: np.ndarray, ref: sitk.Image, values: list[int]) -> dict[int, np.ndarray]:
    """Physical centroid of each label value present in `lab` (a z, y, x array on `ref`'s grid)."""
    out: dict[int, np.ndarray] = {}
    m, origin = index_to_physical(ref)
    flat = lab.ravel()
    counts = np.bincount(flat, minlength=max(values) + 1)
    zz, yy, xx = np.indices(lab.shape).reshape(3, -1)
    for axis_sum, key in ((xx, 0), (yy, 1), (zz, 2)):
        sums = np.bincount(flat, weights=axis_sum, minlength=counts.size)
        for v in values:
            if v < counts.size and counts[v] > 0:
                out.setdefault(v, np.zeros(3))[key] = sums[v] / counts[v]
    return {v: origin + m @ ijk for v, ijk in out.items()}


def render_mean(lab: np.ndarray, names: Mapping[int, str], table: IntensityTable) -> np.ndarray:
    """Clean native-phase mean HU of each structure; unlabelled voxels get 0 HU."""
    present = [int(v) for v in np.unique(lab) if v > 0]
    mean, _ = structure_hu({v: names[v] for v in present if v in names}, table, "native", 0.0, 0.0,
                           np.random.default_rng(0))
    lut = np.zeros(int(max(present, default=0)) + 1, np.float32)
    for v, hu in mean.items():
        lut[v] = hu
    return lut[lab]


def transfer(atlas_ct: sitk.Image, atlas_labels: sitk.Image, target_labels: sitk.Image,
             names: Mapping[int, str], table: IntensityTable,
             settings: TransferSettings = TransferSettings()) -> SynthResult:
    """Warp (atlas CT, atlas labels) onto the anatomy of `target_labels`.

    Output grid: the target's grid at `settings.spacing`, cropped to the part the atlas covers.
    `info` holds the Dice of the warped atlas labels against the target's for the structures
    both have (how closely the new anatomy follows the target).
    """
    nn = sitk.sitkNearestNeighbor
    fixed_ref = grid_for_spacing(target_labels, settings.spacing)
    tlab = sitk.GetArrayFromImage(sitk.Resample(target_labels, fixed_ref, sitk.Transform(), nn, 0)).astype(np.int64)
    moving_ref = grid_for_spacing(atlas_labels, settings.spacing)
    alab_img = sitk.Resample(atlas_labels, moving_ref, sitk.Transform(), nn, 0)
    alab = sitk.GetArrayFromImage(alab_img).astype(np.int64)

    common = sorted((set(np.unique(tlab)) & set(np.unique(alab))) - {0})
    common = [int(v) for v in common if v in names]
    if len(common) < settings.min_common:
        raise UserError(f"the atlas and the target label map share {len(common)} structure(s); the registration "
                        f"route needs at least {settings.min_common} (same label scheme, overlapping body region)")
    c_fixed = _centroids(tlab, fixed_ref, common)
    c_moving = _centroids(alab, moving_ref, common)
    fixed_pts = [float(x) for v in common for x in c_fixed[v]]
    moving_pts = [float(x) for v in common for x in c_moving[v]]
    affine = sitk.LandmarkBasedTransformInitializer(sitk.AffineTransform(3), fixed_pts, moving_pts)

    # Crop the target to what the atlas covers, so demons never pulls at structures it lacks.
    cover = sitk.Resample(sitk.Cast(alab_img * 0 + 1, sitk.sitkUInt8), fixed_ref, affine, nn, 0)
    cov = sitk.GetArrayFromImage(cover).astype(bool)
    if not cov.any():
        raise UserError("the atlas does not overlap the target after alignment; check the label maps' body regions")
    lo = [int(np.flatnonzero(cov.any(axis=tuple(a for a in range(3) if a != k))).min()) for k in range(3)]
    hi = [int(np.flatnonzero(cov.any(axis=tuple(a for a in range(3) if a != k))).max()) + 1 for k in range(3)]
    tlab = tlab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    fixed_ref = sitk.RegionOfInterest(fixed_ref, [hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]], [lo[2], lo[1], lo[0]])

    fixed = image_on(render_mean(tlab, names, table), fixed_ref)
    moving_full = image_on(render_mean(alab, names, table), moving_ref)
    moving = sitk.Resample(moving_full, fixed_ref, affine, sitk.sitkLinear, 0.0)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(settings.demons_iterations)
    demons.SetStandardDeviations(settings.demons_sigma_vox)
    shrink = [2, 2, 2]
    coarse = demons.Execute(sitk.Shrink(fixed, shrink), sitk.Shrink(moving, shrink))
    init = sitk.Resample(coarse, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    field = demons.Execute(fixed, moving, init)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    full = sitk.CompositeTransform(affine)
    full.AddTransform(disp)                     # applied first: fixed -> affine-aligned atlas -> atlas

    ct = sitk.Resample(atlas_ct, fixed_ref, full, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    ct_arr = np.clip(np.rint(sitk.GetArrayFromImage(ct)), -1024, 3071).astype(np.int16)
    lab_dtype = np.uint16 if int(np.max(alab)) > 255 else np.uint8
    warped = sitk.GetArrayFromImage(sitk.Resample(atlas_labels, fixed_ref, full, nn, 0)).astype(lab_dtype)
    dice = {}
    for v in common:
        a, b = warped == v, tlab == v
        denom = int(a.sum()) + int(b.sum())
        if denom:
            dice[names[v]] = round(2.0 * int((a & b).sum()) / denom, 3)
    info = {"route": "registration", "structures_shared": len(common), "dice_to_target": dice}
    return SynthResult(image_on(ct_arr, fixed_ref), image_on(warped, fixed_ref), info)


def mend_misregistered(warped: sitk.Image, target: sitk.Image, values: Iterable[int], margin_mm: float,
                       fill: int | None = None) -> tuple[sitk.Image, dict[int, float]]:
    """`warped` (a transferred atlas's labels) mended wherever it contradicts the anatomy it was
    warped onto (`target`, the same label values) by more than `margin_mm`: those voxels get the
    target's label (`fill` None) or `fill` (e.g. `UNKNOWN_LABEL`); and the ml mended per value.
    The result has a pixel type that holds both maps' values and `fill`.

    Demons follows shapes only where both label maps have them: where the atlas lacks an organ the
    target has (s0009's field of view cuts off its spleen), a neighbour is stretched into its place
    (s0009's left kidney warped onto s0004's spleen: 603 ml of "kidney" there). A voxel is mended
    when it is labelled v farther than `margin_mm` from the target's v, or is the target's v farther
    than `margin_mm` from the warped v. Disagreement within the margin (the ordinary few millimetres
    of a boundary) is kept, so the labels still follow the warped CT's edges.
    """
    ref = sitk.Resample(target, warped, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    w0, t0 = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(ref)
    dtype = np.promote_types(np.promote_types(w0.dtype, t0.dtype), np.min_scalar_type(UNKNOWN_LABEL))
    w, t = w0.astype(dtype), t0.astype(dtype)
    sampling = tuple(float(s) for s in warped.GetSpacing()[::-1])
    bad = np.zeros(w.shape, dtype=bool)
    mended: dict[int, float] = {}
    voxel_ml = float(np.prod(warped.GetSpacing())) / 1000.0
    for v in values:
        in_w, in_t = w == v, t == v
        if not in_w.any() and not in_t.any():
            continue
        before = int(bad.sum())
        for here, there in ((in_w, in_t), (in_t, in_w)):
            if not there.any():
                bad |= here
            elif here.any():
                bad |= here & (ndimage.distance_transform_edt(~there, sampling=sampling) > margin_mm)
        mended[int(v)] = round((int(bad.sum()) - before) * voxel_ml, 2)
    out = sitk.GetImageFromArray(np.where(bad, t if fill is None else np.asarray(fill, dtype=dtype), w))
    out.CopyInformation(warped)
    return out, mended
