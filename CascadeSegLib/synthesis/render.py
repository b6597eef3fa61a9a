"""A CT in HU from a label map: tissues, what label maps leave out, and the scanner.

One call of `synthesize` draws one patient and one scan:
1. anatomy (`anatomy.warp_labels`): affine, elastic, per-organ sizes;
2. a contrast phase, with one bolus strength shared by every enhancing tissue, so organs and
   vessels move together; each structure's HU = measured native mean + phase enhancement;
3. what label maps do not hold: body outline from the labelled anatomy's hull, abdominal wall
   muscle, subcutaneous and visceral fat, unlabelled soft tissue, bowel gas and contents, bone
   cortex, kidney cortex, the table and the air around;
4. the scanner: partial-volume blur for the slice thickness and in-plane resolution, correlated
   noise at a random dose, a reconstruction field of view that may truncate the body, and an
   axial crop (abdomen-only or whole-body scans).
Everything is vectorised over the grid (lookup tables, Gaussian filters, distance maps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..inference.preprocess import grid_for_spacing
from .anatomy import AnatomySettings, warp_labels
from .tissues import BOWEL_GAS_SHARE, PHASES, TISSUES, IntensityTable, tissue_of

AIR = -1000.0
TEXTURE_CAP = {"bowel": 40.0, "bone": 30.0, "lung": 40.0}
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class ScanSettings:
    phases: Mapping[str, float] = field(default_factory=lambda: {"native": 0.3, "arterial": 0.15,
                                                                  "portal": 0.45, "delayed": 0.1})
    bolus: tuple[float, float] = (0.6, 1.3)       # strength of enhancement, shared by all tissues
    jitter: float = 1.0                           # per-structure baseline spread, in units of its sd
    texture: float = 1.0                          # within-structure texture, in units of its sd
    noise_hu: tuple[float, float] = (4.0, 35.0)   # quantum noise sd (dose)
    slice_mm: tuple[float, float] = (0.6, 5.0)    # slice thickness (FWHM along the body axis)
    inplane_mm: tuple[float, float] = (0.6, 1.6)  # in-plane resolution (FWHM)
    fat_mm: tuple[float, float] = (5.0, 45.0)     # subcutaneous fat
    wall_mm: tuple[float, float] = (3.0, 12.0)    # abdominal wall muscle
    table_prob: float = 0.7
    oral_contrast_prob: float = 0.15
    truncate_prob: float = 0.15                   # reconstruction circle cuts into the body
    crop_prob: float = 0.5                        # keep only an abdominal slab of the scan
    crop_mm: tuple[float, float] = (180.0, 400.0)

    @classmethod
    def clean(cls, phase: str = "native") -> ScanSettings:
        """A deterministic look: one phase, table means, no jitter, noise, blur, crop or texture."""
        return cls(phases={phase: 1.0}, bolus=(1.0, 1.0), jitter=0.0, texture=0.0, noise_hu=(0.0, 0.0),
                   slice_mm=(0.0, 0.0), inplane_mm=(0.0, 0.0), table_prob=0.0, oral_contrast_prob=0.0,
                   truncate_prob=0.0, crop_prob=0.0)


@dataclass(frozen=True)
class SynthSettings:
    anatomy: AnatomySettings = AnatomySettings()
    scan: ScanSettings = ScanSettings()
    spacing: tuple[float, float, float] | None = None    # output grid; None = the label map's


@dataclass
class SynthResult:
    ct: sitk.Image          # int16 HU
    labels: sitk.Image      # the (deformed) label map, same values as the input, same grid as ct
    info: dict


def _axis_of(direction: np.ndarray, physical_axis: int) -> tuple[int, float]:
    """Array axis (z, y, x order) most aligned with a physical axis, and the sign of the alignment."""
    col = direction[physical_axis, :]          # row of the direction matrix: image axes' share
    k = int(np.argmax(np.abs(col)))            # image axis index in x, y, z order
    return 2 - k, float(np.sign(col[k]) or 1.0)


def _noise_field(shape, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _choose_phase(weights: Mapping[str, float], rng: np.random.Generator) -> str:
    names = [p for p in PHASES if weights.get(p, 0) > 0]
    w = np.array([weights[p] for p in names], dtype=float)
    return str(names[int(rng.choice(len(names), p=w / w.sum()))])


def structure_hu(names: Mapping[int, str], table: IntensityTable, phase: str, bolus: float, jitter: float,
                 rng: np.random.Generator) -> tuple[dict[int, float], dict[int, float]]:
    """Mean HU and texture amplitude (HU) of each structure for this sample.

    The native mean comes from the measured table when it has the structure, else from the
    tissue prior; enhancement is the tissue's phase range at this sample's bolus strength.
    Structures of one tissue get the same enhancement (one draw per tissue), so arteries move
    together, and so do veins.
    """
    enh_draw = {t: float(rng.uniform(0, 1)) for t in TISSUES}
    mean, tex = {}, {}
    for v, name in names.items():
        tissue = tissue_of(name)
        if tissue is None:
            continue
        prior = TISSUES[tissue]
        measured = table.structures.get(name)
        if measured is not None:
            base, sd = float(measured["mean"]), float(measured["sd"])
        else:
            base, sd = float(np.mean(prior.native)), prior.texture
        if jitter > 0:
            base += float(rng.normal(0, 0.5 * jitter * min(sd, 40.0)))
        lo, hi = prior.enhance.get(phase, (0.0, 0.0))
        mean[v] = base + bolus * (lo + enh_draw[tissue] * (hi - lo))
        # A measured spread includes cortex, gas or calcification the renderer adds itself:
        # texture is capped so bone and bowel do not turn blotchy.
        tex[v] = min(sd, TEXTURE_CAP.get(tissue, 25.0))
    return mean, tex


def synthesize(labels: sitk.Image, names: Mapping[int, str], table: IntensityTable, seed: int,
               settings: SynthSettings = SynthSettings()) -> SynthResult:
    """One synthetic CT for a label map (`names`: label value -> structure name)."""
    rng = np.random.default_rng(seed)
    scan = settings.scan
    ref = labels if settings.spacing is None else grid_for_spacing(labels, settings.spacing)
    lab = warp_labels(labels, ref, dict(names), settings.anatomy, rng)
    spacing_zyx = np.array(ref.GetSpacing()[::-1], dtype=float)
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    si_axis, _ = _axis_of(direction, 2)
    ap_axis, ap_sign = _axis_of(direction, 1)     # +y in LPS is posterior

    phase = _choose_phase(scan.phases, rng)
    bolus = float(rng.uniform(*scan.bolus)) if phase != "native" else 0.0
    present = {int(v) for v in np.unique(lab)} - {0}
    mean, tex = structure_hu({v: n for v, n in names.items() if v in present}, table, phase, bolus, scan.jitter, rng)
    lut_mean = np.zeros(int(max(present | {0})) + 1, np.float32)
    lut_tex = np.zeros_like(lut_mean)
    for v in present:
        lut_mean[v], lut_tex[v] = mean.get(v, 40.0), tex.get(v, 12.0)
    hu = lut_mean[lab]
    if scan.texture > 0:
        texture = 0.7 * _noise_field(lab.shape, 1.0, rng) + 0.3 * _noise_field(lab.shape, 2.5, rng)
        hu += scan.texture * 0.8 * lut_tex[lab] * texture
    tissue_of_value = {v: tissue_of(names[v]) for v in present if v in names}

    body, core, depth, d_core = _body(lab > 0, spacing_zyx, si_axis, scan, rng)
    background = (lab == 0)
    # Inside the labelled hull: visceral fat and unlabelled soft tissue, in smooth patches.
    soft_share = rng.uniform(0.03, 0.2)
    patches = _noise_field(lab.shape, max(1.0, 6.0 / spacing_zyx.mean()), rng)
    soft = patches > np.quantile(patches, 1 - soft_share)
    fat_hu = rng.uniform(-115, -85)
    soft_hu = rng.uniform(25, 50) + (bolus * 20 if phase != "native" else 0)
    muscle_hu = rng.uniform(40, 60) + (bolus * 12 if phase != "native" else 0)
    bg_core = background & core
    hu[bg_core] = np.where(soft[bg_core], soft_hu, fat_hu)
    wall = background & body & ~core & (d_core <= rng.uniform(*scan.wall_mm))
    hu[background & body & ~core] = fat_hu
    hu[wall] = muscle_hu
    hu[background & body & (depth < 2.0)] = soft_hu          # skin
    hu[~body & background] = AIR
    _hollow_organs(hu, lab, names, tissue_of_value, spacing_zyx, scan, rng)
    _cortex(hu, lab, tissue_of_value, spacing_zyx, phase, bolus, rng)
    if rng.random() < scan.table_prob:
        _table(hu, body, spacing_zyx, ap_axis, ap_sign, rng)
    hu = _scanner(hu, spacing_zyx, si_axis, scan, rng)
    info: dict = {"seed": int(seed), "phase": phase, "bolus": round(bolus, 3)}
    if rng.random() < scan.truncate_prob:
        info["truncated"] = _truncate(hu, lab, body, spacing_zyx, si_axis, rng)
    ct_arr = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    ct, out_lab = image_on(ct_arr, ref), image_on(lab.astype(np.uint16 if lab.max() > 255 else np.uint8), ref)
    if rng.random() < scan.crop_prob:
        ct, out_lab, info["crop_mm"] = _crop_axial(ct, out_lab, names, si_axis, scan, rng)
    return SynthResult(ct, out_lab, info)


def image_on(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """`arr` (z, y, x) as an image on `ref`'s grid."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.CopyInformation(ref)
    return img


def _body(fg: np.ndarray, spacing_zyx: np.ndarray, si_axis: int, scan: ScanSettings,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(body, labelled hull, depth below the skin, distance from the hull; mm): the hull is the
    closed, axially filled union of all labels; the body adds wall muscle and subcutaneous fat
    of random thickness."""
    closing_mm = 15.0
    d_out = ndimage.distance_transform_edt(~fg, sampling=spacing_zyx)
    grown = d_out <= closing_mm
    d_in = ndimage.distance_transform_edt(grown, sampling=spacing_zyx)
    core = d_in > closing_mm
    core |= fg
    structure = np.zeros((3, 3, 3), bool)
    plane: list[slice | int] = [slice(None)] * 3
    plane[si_axis] = 1
    structure[tuple(plane)] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_fill_holes(core, structure=structure)
    thickness = float(rng.uniform(*scan.fat_mm) + rng.uniform(*scan.wall_mm))
    # The fat layer varies around the body (thicker in front, thinner at the back, or not).
    vary = 1.0 + 0.3 * _noise_field(fg.shape, max(1.0, 40.0 / spacing_zyx.mean()), rng)
    d_core = ndimage.distance_transform_edt(~core, sampling=spacing_zyx)
    body = d_core <= thickness * vary
    body = ndimage.binary_fill_holes(body, structure=structure)
    depth = ndimage.distance_transform_edt(body, sampling=spacing_zyx)
    return body, core, depth, d_core


def _hollow_organs(hu: np.ndarray, lab: np.ndarray, names: Mapping[int, str], tissue_of_value: dict,
                   spacing_zyx: np.ndarray, scan: ScanSettings, rng: np.random.Generator) -> None:
    """Gas pockets, fluid and (colon) stool inside bowel and stomach; sometimes oral contrast."""
    oral = rng.random() < scan.oral_contrast_prob
    oral_hu = rng.uniform(150, 450)
    blobs = _noise_field(lab.shape, max(1.0, 8.0 / spacing_zyx.mean()), rng)
    mottle = _noise_field(lab.shape, max(0.7, 2.0 / spacing_zyx.mean()), rng)
    for v, tissue in tissue_of_value.items():
        if tissue != "bowel":
            continue
        m = lab == v
        if not m.any():
            continue
        name = names[v]
        key = next((k for k in BOWEL_GAS_SHARE if name.startswith(k)), "small_bowel")
        share = rng.uniform(*BOWEL_GAS_SHARE[key])
        b = blobs[m]
        gas = b > np.quantile(b, 1 - share) if share > 0 else np.zeros_like(b, bool)
        vals = hu[m]
        if name.startswith("colon"):
            stool = mottle[m] > 0.3
            vals = np.where(stool, rng.uniform(-350, -150) + 120 * mottle[m], vals)
        if oral and name.startswith(("small_bowel", "colon", "duodenum", "stomach")):
            fluid = (b < np.quantile(b, 0.6))
            vals = np.where(fluid & ~gas, oral_hu, vals)
        vals = np.where(gas, rng.uniform(-1000, -850), vals)
        hu[m] = vals


def _cortex(hu: np.ndarray, lab: np.ndarray, tissue_of_value: dict, spacing_zyx: np.ndarray, phase: str,
            bolus: float, rng: np.random.Generator) -> None:
    """Dense bone cortex; in the arterial phase, kidney cortex brighter than medulla."""
    bone = np.isin(lab, [v for v, t in tissue_of_value.items() if t == "bone"])
    if bone.any():
        d = ndimage.distance_transform_edt(bone, sampling=spacing_zyx)
        # A ~1.5 mm cortex; on grids coarser than that, the outer voxel layer holds its partial volume.
        rim = max(1.6, float(spacing_zyx.min()))
        cortex_hu = rng.uniform(500, 1100) * min(1.0, 1.6 / float(spacing_zyx.min()) + 0.3)
        hu[bone & (d <= rim)] = cortex_hu
    if phase == "arterial":
        for v, t in tissue_of_value.items():
            if t == "kidney":
                m = lab == v
                d = ndimage.distance_transform_edt(m, sampling=spacing_zyx)
                hu[m & (d > 6.0)] -= bolus * rng.uniform(40, 90)


def _table(hu: np.ndarray, body: np.ndarray, spacing_zyx: np.ndarray, ap_axis: int, ap_sign: float,
           rng: np.random.Generator) -> None:
    """A patient table: a dense plate a few mm behind the back, where the image reaches that far."""
    profile = body.any(axis=tuple(a for a in range(3) if a != ap_axis))
    idx = np.flatnonzero(profile)
    if idx.size == 0:
        return
    back = idx[-1] if ap_sign > 0 else idx[0]
    step = int(ap_sign)
    gap = int(round(rng.uniform(2, 15) / spacing_zyx[ap_axis]))
    thick = max(1, int(round(rng.uniform(4, 12) / spacing_zyx[ap_axis])))
    start = back + step * (gap + 1)
    rows = [start + step * i for i in range(thick)]
    rows = [r for r in rows if 0 <= r < hu.shape[ap_axis]]
    if not rows:
        return
    sl: list = [slice(None)] * 3
    sl[ap_axis] = rows
    hu[tuple(sl)] = rng.uniform(100, 400)


def _scanner(hu: np.ndarray, spacing_zyx: np.ndarray, si_axis: int, scan: ScanSettings,
             rng: np.random.Generator) -> np.ndarray:
    """Partial-volume blur (slice thickness, in-plane resolution) and correlated quantum noise."""
    fwhm = np.full(3, rng.uniform(*scan.inplane_mm))
    fwhm[si_axis] = rng.uniform(*scan.slice_mm)
    sigma = fwhm / 2.355 / spacing_zyx
    if (sigma > 0.05).any():
        hu = ndimage.gaussian_filter(hu, sigma)
    noise_sd = rng.uniform(*scan.noise_hu)
    if noise_sd > 0:
        hu = hu + noise_sd * _noise_field(hu.shape, rng.uniform(0.5, 1.0), rng)
    return hu


def _truncate(hu: np.ndarray, lab: np.ndarray, body: np.ndarray, spacing_zyx: np.ndarray, si_axis: int,
              rng: np.random.Generator) -> float:
    """Outside a reconstruction circle smaller than the body the scanner shows nothing (-1024),
    and the labels are cleared there too: a model is scored on what the scan shows."""
    axes = [a for a in range(3) if a != si_axis]
    coords = np.argwhere(body.any(axis=si_axis))
    if coords.size == 0:
        return 0.0
    centre = coords.mean(0)
    ext = (coords.max(0) - coords.min(0)) / 2 * spacing_zyx[axes]
    radius = float(np.max(ext) * rng.uniform(0.75, 0.95))
    yy, xx = np.meshgrid(np.arange(hu.shape[axes[0]]), np.arange(hu.shape[axes[1]]), indexing="ij")
    dy, dx = (yy - centre[0]) * spacing_zyx[axes[0]], (xx - centre[1]) * spacing_zyx[axes[1]]
    outside = dy ** 2 + dx ** 2 > radius ** 2
    sl: list = [slice(None)] * 3
    sl[si_axis] = None
    hu[np.broadcast_to(outside[tuple(sl)], hu.shape)] = HU_MIN
    lab[np.broadcast_to(outside[tuple(sl)], lab.shape)] = 0
    return round(radius, 1)


def _crop_axial(ct: sitk.Image, lab: sitk.Image, names: Mapping[int, str], si_axis: int, scan: ScanSettings,
                rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image, float]:
    """An abdominal slab of the scan, centred near the upper-abdominal organs (exact sub-grid)."""
    arr = sitk.GetArrayViewFromImage(lab)
    organs = [v for v, n in names.items() if n in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")]
    m = np.isin(arr, organs)
    if not m.any():
        return ct, lab, 0.0
    along = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != si_axis)))
    sp = ct.GetSpacing()[2 - si_axis]
    n = arr.shape[si_axis]
    length = int(round(rng.uniform(*scan.crop_mm) / sp))
    if length >= n:
        return ct, lab, 0.0
    centre = int(rng.integers(along.min(), along.max() + 1))
    lo = int(np.clip(centre - length // 2, 0, n - length))
    index = [0, 0, 0]
    size = list(ct.GetSize())
    index[2 - si_axis], size[2 - si_axis] = lo, length
    return (sitk.RegionOfInterest(ct, size, index), sitk.RegionOfInterest(lab, size, index),
            round(length * sp, 1))


def with_phase(settings: SynthSettings, phase: str) -> SynthSettings:
    """The same settings, forced to one contrast phase."""
    return replace(settings, scan=replace(settings.scan, phases={phase: 1.0}))
