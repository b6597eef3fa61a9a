"""Synthetic contrast-enhanced abdominal CT with organ labels, for tests and demos.

Real data cannot be shipped in every size, spacing and orientation the pipeline must handle,
so tests build phantoms instead. The anatomy lives in physical space: shapes are defined in
millimetres of a reference body (x to the patient's left, y posterior, z superior: DICOM LPS,
like SimpleITK), centred on the centre of the requested grid and stretched in-plane to fit the
field of view. The same field of view therefore gives the same organs in millimetres whatever
the voxel size, origin or direction (flipped or oblique), which is what geometry tests need.

Organs are smooth ellipsoids and tubes deformed by low-frequency sinusoids, at plausible
positions with typical portal-venous HU values; the whole image is built slab by slab in
int16/uint8 so that a 512x512x400 phantom needs a few hundred MB and seconds, not minutes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .labels import DEFAULT_ORGANS, LabelSet

REF_FOV_XY = (360.0, 256.0)
"""In-plane field of view (mm) at which the phantom has the reference body size."""
BODY_SEMI_AXES = (165.0, 115.0)
"""Body ellipse (mm, reference body): left-right and anterior-posterior half widths."""

HU = {
    "air": -1000.0, "fat": -100.0, "visceral": -85.0, "muscle": 45.0, "bowel": 25.0,
    "bowel_gas": -850.0, "bone_cortex": 700.0, "bone": 400.0, "csf": 15.0,
    "liver": 100.0, "spleen": 110.0, "kidney_right": 160.0, "kidney_left": 160.0,
    "gallbladder": 10.0, "stomach": 30.0, "stomach_gas": -900.0, "pancreas": 90.0,
    "aorta": 200.0, "inferior_vena_cava": 130.0, "portal_vein_and_splenic_vein": 150.0,
}
"""Mean intensity (HU) of each tissue before noise."""


@dataclass(frozen=True)
class _Shape:
    """An organ piece in reference mm: ellipsoid (b is None) or capsule from a to b."""

    a: tuple[float, float, float]
    radii: tuple[float, float, float]  # ellipsoid semi-axes, or (r, r, r) for a capsule
    b: tuple[float, float, float] | None = None
    rot_z_deg: float = 0.0  # ellipsoid rotation about the body's z axis
    taper: float = 0.0  # ellipsoid: y/z radii shrink by this fraction towards local +x
    wobble: float = 0.12  # amplitude of the low-frequency surface deformation


# Painting order matters: later organs win where shapes touch (e.g. the IVC runs through the
# liver, the gallbladder sits in the liver's underside).
_ORGANS: dict[str, tuple[_Shape, ...]] = {
    "liver": (_Shape((-48.0, -12.0, 30.0), (104.0, 86.0, 78.0), taper=0.5, wobble=0.08),),
    "stomach": (_Shape((55.0, -35.0, 38.0), (40.0, 36.0, 52.0), rot_z_deg=-20.0),),
    "spleen": (_Shape((82.0, 40.0, 40.0), (24.0, 44.0, 52.0), rot_z_deg=-25.0),),
    "pancreas": (_Shape((-38.0, -22.0, -8.0), (13.0, 13.0, 13.0), b=(72.0, 10.0, 12.0),
                        wobble=0.15),),
    "kidney_right": (_Shape((-62.0, 48.0, -25.0), (25.0, 27.0, 52.0), rot_z_deg=20.0),),
    "kidney_left": (_Shape((62.0, 48.0, -15.0), (25.0, 27.0, 52.0), rot_z_deg=-20.0),),
    "gallbladder": (_Shape((-40.0, -50.0, -15.0), (16.0, 16.0, 36.0), rot_z_deg=30.0,
                           wobble=0.05),),
    "portal_vein_and_splenic_vein": (
        _Shape((-32.0, -6.0, 22.0), (7.5, 7.5, 7.5), b=(0.0, 2.0, 2.0), wobble=0.05),
        _Shape((0.0, 2.0, 2.0), (4.5, 4.5, 4.5), b=(66.0, 22.0, 16.0), wobble=0.05),
    ),
    "inferior_vena_cava": (_Shape((-24.0, 22.0, -140.0), (12.0, 12.0, 12.0), b=(-26.0, 26.0, 140.0),
                                  wobble=0.06),),
    "aorta": (_Shape((15.0, 24.0, -140.0), (12.0, 12.0, 12.0), b=(12.0, 26.0, 140.0),
                     wobble=0.04),),
}
PAINT_ORDER = tuple(_ORGANS)
_STOMACH_GAS_DEPTH = 0.6  # anterior fraction of the stomach beyond which it holds gas


def phantom_labelset(organs: Iterable[str] = DEFAULT_ORGANS) -> LabelSet:
    """The labels of a phantom: values 1..N in the order given, standard names/colours."""
    organs = tuple(organs)
    unknown = [o for o in organs if o not in _ORGANS]
    if unknown:
        raise ValueError(f"the phantom has no organ {unknown}; choose from {list(_ORGANS)}")
    return LabelSet.from_names(organs)


class _Grid:
    """Voxel index -> reference-body millimetres, for sub-boxes of the grid."""

    def __init__(self, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                 direction: Sequence[float]) -> None:
        self.size = tuple(int(s) for s in size)
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        m = d * np.asarray(spacing, dtype=float)[None, :]  # index -> physical offset
        centre = np.asarray(origin, float) + m @ ((np.asarray(self.size, float) - 1) / 2)
        fov = np.asarray(self.size, float) * np.asarray(spacing, float)
        sx, sy = fov[0] / REF_FOV_XY[0], fov[1] / REF_FOV_XY[1]
        self.scale = np.array([sx, sy, math.sqrt(sx * sy)])  # physical mm per reference mm
        self.affine = m / self.scale[:, None]  # index -> reference mm
        self.offset = (np.asarray(origin, float) - centre) / self.scale
        self.inverse = np.linalg.inv(self.affine)

    def coords(self, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, ...]:
        """Reference-mm x, y, z of the voxels lo <= index < hi, as float32 arrays that
        broadcast to (z, y, x); on axis-aligned grids x and y stay 2D, which saves most work."""
        idx = [np.arange(lo[a], hi[a], dtype=np.float32) for a in range(3)]
        shape = [(1, 1, -1), (1, -1, 1), (-1, 1, 1)]
        out: list[np.ndarray] = []
        for r in range(3):
            v: np.floating | np.ndarray = np.float32(self.offset[r])
            for a in range(3):
                coef = np.float32(self.affine[r, a])
                if coef != 0:
                    v = v + coef * idx[a].reshape(shape[a])
            out.append(np.asarray(v, np.float32).reshape((1, 1, 1)) if np.ndim(v) == 0 else np.asarray(v))
        return tuple(out)

    def index_box(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[list[int], list[int]] | None:
        """Index sub-box (lo, hi exclusive, x/y/z) covering a reference-mm box; None if outside."""
        corners = np.array([[lo_mm[0] if i & 1 == 0 else hi_mm[0],
                             lo_mm[1] if i & 2 == 0 else hi_mm[1],
                             lo_mm[2] if i & 4 == 0 else hi_mm[2]] for i in range(8)])
        idx = (corners - self.offset) @ self.inverse.T
        lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, self.size)
        if np.any(hi <= lo):
            return None
        return lo.tolist(), hi.tolist()


def _wobble_terms(rng: np.random.Generator, amplitude: float) -> list[tuple[np.ndarray, float, float]]:
    """Three random low-frequency sinusoids (direction * frequency, phase, amplitude)."""
    terms = []
    for k in range(3):
        v = rng.normal(size=3)
        v *= rng.uniform(1.5, 3.0) / np.linalg.norm(v)
        terms.append((v.astype(np.float32), float(rng.uniform(0, 2 * math.pi)), amplitude / (k + 1)))
    return terms


_UNIT_DIRECTIONS = np.random.default_rng(12345).normal(size=(4096, 3))
_UNIT_DIRECTIONS /= np.linalg.norm(_UNIT_DIRECTIONS, axis=1, keepdims=True)


def _volume_factor(terms) -> float:
    """Mean of bound**3 over the unit sphere: how much the deformation grows a unit ball.

    Dividing the radial coordinate by its cube root keeps each organ's volume close to its
    undeformed volume, so organ sizes do not depend on the seed.
    """
    q = _UNIT_DIRECTIONS
    bound = np.ones(len(q))
    for v, phase, amp in terms:
        bound += amp * np.sin(q @ v + phase)
    return float(np.mean(bound ** 3))


def _shape_extent(s: _Shape) -> tuple[np.ndarray, np.ndarray]:
    """Reference-mm bounding box of a shape, with room for its deformation."""
    grow = 1.0 + 2.0 * s.wobble + 0.05
    a = np.array(s.a)
    if s.b is None:  # rotated about z only: z half-height is its own radius
        rxy = max(s.radii[:2]) * grow
        r = np.array([rxy, rxy, s.radii[2] * grow])
        return a - r, a + r
    b = np.array(s.b)
    rad = s.radii[0] * grow
    return np.minimum(a, b) - rad, np.maximum(a, b) + rad


def _inside(s: _Shape, terms, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Boolean mask of the deformed shape at reference-mm coordinates."""
    if s.b is None:
        c = math.cos(math.radians(s.rot_z_deg))
        sn = math.sin(math.radians(s.rot_z_deg))
        dx, dy, dz = x - np.float32(s.a[0]), y - np.float32(s.a[1]), z - np.float32(s.a[2])
        qx = (np.float32(c) * dx + np.float32(sn) * dy) / np.float32(s.radii[0])
        qy = (np.float32(-sn) * dx + np.float32(c) * dy) / np.float32(s.radii[1])
        qz = dz / np.float32(s.radii[2])
        if s.taper:
            t = np.float32(1.0 - s.taper / 2) - np.float32(s.taper / 2) * np.clip(qx, -1, 1)
            qy = qy / t
            qz = qz / t
        rho = np.sqrt(qx * qx + qy * qy + qz * qz)
        # shrink the deformed shape back to the volume of the plain ellipsoid
        scale = np.float32(_volume_factor(terms) ** (1 / 3))
        qx, qy, qz, rho = qx * scale, qy * scale, qz * scale, rho * scale
    else:
        a = np.array(s.a, np.float32)
        u = np.array(s.b, np.float32) - a
        length = float(np.linalg.norm(u))
        u = u / np.float32(length)
        dx, dy, dz = x - a[0], y - a[1], z - a[2]
        t = np.clip(dx * u[0] + dy * u[1] + dz * u[2], 0, length)
        r = np.float32(s.radii[0])
        qx, qy, qz = (dx - t * u[0]) / r, (dy - t * u[1]) / r, (dz - t * u[2]) / r
        rho = np.sqrt(qx * qx + qy * qy + qz * qz)
        # deform with the position along the tube too, so the tube bends and varies in width
        qz = qz + t / r * np.float32(0.35)
    bound = np.ones_like(rho)
    for v, phase, amp in terms:
        bound += np.float32(amp) * np.sin(v[0] * qx + v[1] * qy + v[2] * qz + np.float32(phase))
    return rho < bound


_BACK = (  # (cx, cy, rx, ry, tissue): columns along z, painted last, never part of an organ
    (-32.0, 88.0, 22.0, 13.0, "muscle"), (32.0, 88.0, 22.0, 13.0, "muscle"),  # paraspinal
    (0.0, 58.0, 22.0, 22.0, "bone_cortex"), (0.0, 58.0, 19.0, 19.0, "bone"),  # vertebral body
    (0.0, 96.0, 17.0, 4.5, "bone_cortex"), (0.0, 103.0, 4.0, 6.0, "bone_cortex"),  # lamina, spine
    (0.0, 87.0, 7.0, 7.0, "csf"),  # spinal canal
)


def _sub(a: np.ndarray, sl: tuple[slice, ...]) -> np.ndarray:
    """Slice a broadcastable (possibly size-1 along some axes) coordinate array."""
    return a[tuple(s if a.shape[d] > 1 else slice(None) for d, s in enumerate(sl))]


def _body(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """HU of air, fat, muscle wall and visceral fat; same shape as x and y broadcast."""
    ax, ay = BODY_SEMI_AXES
    r2 = (x / np.float32(ax)) ** 2 + (y / np.float32(ay)) ** 2
    texture = np.float32(12.0) * np.sin(x / np.float32(19.0)) * np.sin(y / np.float32(23.0))
    hu = np.where(r2 < np.float32(0.85 ** 2), np.float32(HU["visceral"]) + texture,
                  np.float32(HU["muscle"]))
    hu = np.where(r2 < np.float32(0.92 ** 2), hu, np.float32(HU["fat"]))
    return np.where(r2 < 1, hu, np.float32(HU["air"])).astype(np.float32)


def make_phantom(size: Sequence[int] = (96, 80, 64), spacing: Sequence[float] = (3.0, 3.0, 3.0),
                 origin: Sequence[float] = (0.0, 0.0, 0.0),
                 direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                 organs: Iterable[str] = DEFAULT_ORGANS, seed: int = 0,
                 noise_hu: float = 10.0) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic abdominal CT (int16 HU) and its uint8 label map on exactly the given grid.

    `size`, `spacing`, `origin` are in SimpleITK (x, y, z) order and `direction` is the
    row-major 3x3 matrix. Labels follow `phantom_labelset(organs)`; organs left out are still
    in the image, just not labelled. The same arguments always give the same images.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"need a 3D size and positive spacing, got {size}, {tuple(spacing)}")
    if len(direction) != 9 or abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
        raise ValueError(f"direction must be a non-singular row-major 3x3 matrix, got {direction}")
    organs = tuple(organs)
    labelset = phantom_labelset(organs)
    value_of = {lab.name: lab.value for lab in labelset}
    grid = _Grid(size, spacing, origin, direction)
    rng = np.random.default_rng(seed)

    # Random parts first, in a fixed order, so the anatomy does not depend on `organs`.
    wobbles = {name: [_wobble_terms(rng, s.wobble) for s in shapes] for name, shapes in _ORGANS.items()}
    bowel = []
    for _ in range(8):
        centre = np.array([rng.uniform(-70, 70), rng.uniform(-85, -20), rng.uniform(-110, -30)])
        bowel.append((centre, float(rng.uniform(12, 22)), bool(rng.random() < 0.4)))
    noise_rng = np.random.default_rng([seed, 1])

    # Index boxes of everything but the body, so each is evaluated only where it can be.
    corners = np.array([[(i & 1) * (size[0] - 1), (i >> 1 & 1) * (size[1] - 1),
                         (i >> 2 & 1) * (size[2] - 1)] for i in range(8)], float)
    ref_z = corners @ grid.affine[2] + grid.offset[2]
    z_lo, z_hi = float(ref_z.min()) - 1, float(ref_z.max()) + 1
    organ_boxes = []
    for name in PAINT_ORDER:
        for shape, terms in zip(_ORGANS[name], wobbles[name]):
            box = grid.index_box(*_shape_extent(shape))
            if box is not None:
                organ_boxes.append((name, shape, terms, box))
    bowel_boxes = [(c, r, gas, grid.index_box(c - r, c + r)) for c, r, gas in bowel]
    back_boxes = [(col, grid.index_box(np.array([col[0] - col[2], col[1] - col[3], z_lo]),
                                       np.array([col[0] + col[2], col[1] + col[3], z_hi])))
                  for col in _BACK]
    stomach = _ORGANS["stomach"][0]
    gas_y = np.float32(stomach.a[1] - _STOMACH_GAS_DEPTH * stomach.radii[1])

    nx, ny, nz = size
    ct = np.empty((nz, ny, nx), np.int16)
    lab = np.zeros((nz, ny, nx), np.uint8)
    chunk = max(1, 2_000_000 // (nx * ny))
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        x, y, z = grid.coords((0, 0, k0), (nx, ny, k1))  # broadcastable, not full arrays
        hu = np.empty((k1 - k0, ny, nx), np.float32)
        hu[...] = _body(x, y)
        lab_c = lab[k0:k1]

        def region(box, k0=k0, k1=k1):  # bound to this chunk
            """Chunk-relative slices of an index box, or None when it misses this chunk."""
            if box is None:
                return None
            lo, hi = box
            zlo, zhi = max(lo[2], k0), min(hi[2], k1)
            if zlo >= zhi:
                return None
            return (slice(zlo - k0, zhi - k0), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

        for c, r, gas, box in bowel_boxes:
            sl = region(box)
            if sl is None:
                continue
            d2 = ((_sub(x, sl) - np.float32(c[0])) ** 2 + (_sub(y, sl) - np.float32(c[1])) ** 2
                  + (_sub(z, sl) - np.float32(c[2])) ** 2)
            d2 = np.broadcast_to(d2, hu[sl].shape)
            sub = hu[sl]
            sub[d2 < np.float32(r * r)] = HU["bowel"]
            if gas:
                sub[d2 < np.float32((0.55 * r) ** 2)] = HU["bowel_gas"]

        for name, shape, terms, box in organ_boxes:
            sl = region(box)
            if sl is None:
                continue
            xs, ys, zs = _sub(x, sl), _sub(y, sl), _sub(z, sl)
            mask = np.broadcast_to(_inside(shape, terms, xs, ys, zs), hu[sl].shape)
            sub = hu[sl]
            sub[mask] = HU[name]
            if name == "stomach":  # gas collects anteriorly (patient supine): low y
                sub[mask & np.broadcast_to(ys < gas_y, mask.shape)] = HU["stomach_gas"]
            lab_c[sl][mask] = value_of.get(name, 0)

        for (cx, cy, rx, ry, tissue), box in back_boxes:  # organs end where the spine begins
            sl = region(box)
            if sl is None:
                continue
            m = ((_sub(x, sl) - np.float32(cx)) / np.float32(rx)) ** 2 \
                + ((_sub(y, sl) - np.float32(cy)) / np.float32(ry)) ** 2 < 1
            m = np.broadcast_to(m, hu[sl].shape)
            hu[sl][m] = HU[tissue]
            lab_c[sl][m] = 0

        if noise_hu > 0:
            hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
        np.rint(hu, out=hu)
        np.clip(hu, -1024, 3071, out=hu)
        ct[k0:k1] = hu

    geometry = (tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(d) for d in direction))

    def to_image(a: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(geometry[0])
        img.SetOrigin(geometry[1])
        img.SetDirection(geometry[2])
        return img

    ct_img = to_image(ct)
    del ct  # keep the peak at one copy of the CT plus the label map
    return ct_img, to_image(lab)


def organ_volumes_ml(labels: sitk.Image, labelset: LabelSet) -> dict[str, float]:
    """Volume of each label in millilitres (voxel count times voxel volume)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(),
                         minlength=labelset.num_classes)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {lab.name: float(counts[lab.value]) * voxel_ml for lab in labelset}
