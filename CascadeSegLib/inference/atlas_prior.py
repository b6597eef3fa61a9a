"""Anatomy from atlases: labelled CTs registered onto the patient, fused with the network.

A network trained on a handful of CTs knows texture but not where organs lie in a new patient;
registered atlases know where organs lie but not their exact borders. A model package may carry
atlases (`"atlas_prior"` in model.json). Each is registered onto the patient (affine on mutual
information, then symmetric-forces demons, both on soft-tissue HU at a coarse spacing, 8 mm), its label
map warped onto stage 2's grid, and the atlases averaged into a smoothed class prior (with
`local_weight_power`, abdomen-ct 2.3.0 on, each atlas's vote weighted per voxel by how well its
warped CT matches the patient's there: `local_weights`; with `intensity_weight`, abdomen-ct
2.11.0 on, the prior is then weighted by each class's HU histogram in this patient, taken where
the atlases are sure of the class: `intensity_refined`). Inside C2
the label is argmax(w * p_network + (1 - w) * prior). With `candidates` (abdomen-ct 2.1.0 on)
the prior's organs join C2 before its dilation, so stage 2 also looks where stage 1 missed an
organ the atlases know, and outside C2 is background; without it, outside C2 (where the
network never looked) the label is the prior's argmax. Each organ then keeps its largest piece
among those near where the atlases put it (`GridPrior.plausible`), counting only the voxels stage
1 also gives that organ where any piece has some (`cascade.keep_largest_components`).

A scan may cover another part of the body than the atlases (a chest CT down to the upper
abdomen, a whole body): centres of mass then line up chest with abdomen. With `placement`
"search" (abdomen-ct 2.12.0 on; the recipe's seventeenth and eighteenth rounds) each atlas is
also placed where it correlates best with the scan, sliding along the body so that the two may
overlap only in part (`best_translation`), and that placement is registered too where it lies far
(`PLACEMENT_TOLERANCE_MM`) from the centres of mass', and kept where its organs agree clearly
better with stage 1's (`PLACEMENT_MIN_AGREEMENT_GAIN`).

A slab (a scan shorter than `min_extent_mm`, 100 mm) gives the moments initialiser too little
anatomy: where the package allows it (`slabs`, abdomen-ct 2.2.0 on) each atlas is registered by
`register_slab`, which first searches every translation of the slab along the atlas.

On a stage-2 grid finer than 3 mm the prior is built at 3 mm (`PRIOR_SPACING_MM`) and never
interpolated over the whole fine grid (K floats per voxel): `GridPrior` interpolates the K-class
prior only over the boxes stage 2 computes, where it is fused box by box, and outside C2 takes
the argmax on the 3 mm grid, interpolating only along the borders between its labels.

The smoothing and registration settings were chosen for 1.0.0 on one leave-one-out fold; the
candidates rule and the weight of 2.1.0 on both folds, each reported with the weight the other
fold chose; see the bundled model's card.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from ..checksum import sha256_file
from ..errors import ModelError
from ..io.images import axis_aligned_indices, index_to_physical, same_geometry
from ..jsonkinds import wrong_kind
from ..labels import UNKNOWN_LABEL
from . import preprocess
from .warping import warp_onto_grid

#: the finest grid the prior is built on (finer stage-2 grids get it interpolated box by box)
PRIOR_SPACING_MM = 3.0
#: where the atlases put an organ, grown by this much, is where a piece of it may lie (see
#: `GridPrior.plausible`): a gross-misplacement veto, wide enough for a misregistered atlas
PLAUSIBLE_MARGIN_MM = 30.0
#: prior probability below which no atlas (after smoothing) puts the organ; uncovered voxels
#: hold 1/K, above this, so where no atlas reaches every organ is plausible
PLAUSIBLE_MIN_PRIOR = 0.01
#: scans shorter than this get no prior even where the package registers slabs: at the slab
#: spacing (4 mm) fewer than six slices leave a similarity transform and demons too little to fit
SLAB_MIN_EXTENT_MM = 24.0
#: the local mean squared HU difference at which an atlas's vote halves, per unit of power
#: ((10 HU)^2: within-organ noise); see `local_weights`
LOCAL_WEIGHT_SCALE_HU2 = 100.0
#: weights stay above float32's smallest normal number up to this power (the window's largest
#: squared difference, 500^2 HU^2, gives 2500^-power)
MAX_LOCAL_WEIGHT_POWER = 9.0
#: most affine / similarity optimiser iterations per level of packages that do not say
#: (`AtlasPriorSpec.linear_iterations`; abdomen-ct 2.5.0 says 50)
LEGACY_LINEAR_ITERATIONS = 200
#: most exponent of the patient's class HU likelihoods (`AtlasPriorSpec.intensity_weight`)
MAX_INTENSITY_WEIGHT = 4.0
#: HU bin width of the class histograms (`intensity_refined`), and their Gaussian smoothing in bins
INTENSITY_BIN_HU = 5.0
INTENSITY_SMOOTH_BINS = 2.0
#: a class's core also holds the voxels where its prior reaches this share of its own highest prior
INTENSITY_CORE_OF_MAX = 0.8
#: a class with fewer core voxels than this has no intensity evidence and keeps its prior
INTENSITY_MIN_CORE = 50
#: with `placement` "search", a scan and an atlas may share as little as this share of the shorter
#: one's length along the body (a chest CT that reaches only the upper abdomen)
MIN_PLACEMENT_OVERLAP = 0.3
#: with `placement` "search", the search's placement replaces the centres of mass where the two lie
#: further apart than this along the body: scan and atlas then cover different parts of it (on
#: the abdominal CTs of the folds they lay at most 35 mm apart; on a chest CT, 130-150 mm)
PLACEMENT_TOLERANCE_MM = 60.0
#: ... and only where the organs it places agree with stage 1's by at least this much more Dice
#: (`organ_agreement`): on a synthetic chest CT reaching the upper abdomen the searched starts won
#: by 0.13-0.48 where they helped; on one above the abdomen, where stage 1 finds only specks, by
#: under 0.05, and took 51 ml of lung base for liver
PLACEMENT_MIN_AGREEMENT_GAIN = 0.1
#: how a whole scan's atlases are first placed (`AtlasPriorSpec.placement`)
PLACEMENTS = ("moments", "search")
#: Gaussian std (registration-grid voxels) of the demons displacement field, for packages that do
#: not say (`AtlasPriorSpec.demons_smoothing`, `slab_demons_smoothing`; abdomen-ct 2.9.0 says 0.75
#: for whole scans, 2.0 for slabs)
LEGACY_DEMONS_SMOOTHING = 2.0


@dataclass
class AtlasSpec:
    """One atlas: a CT (HU) and its label map in the model's values, files inside the package."""
    name: str
    image: str
    labels: str
    sha256: dict[str, str] = field(default_factory=dict)   # file name -> sha256

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, "labels": self.labels, "sha256": dict(self.sha256)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> AtlasSpec:
        return AtlasSpec(name=str(d["name"]), image=str(d["image"]), labels=str(d["labels"]),
                         sha256={str(k): str(v) for k, v in d.get("sha256", {}).items()})


@dataclass
class AtlasPriorSpec:
    """How a package's atlases are registered and fused (the `"atlas_prior"` block of model.json)."""
    atlases: list[AtlasSpec]
    spacing_mm: float = 8.0              # isotropic grid the registration runs on
    window_hu: tuple[float, float] = (-200.0, 300.0)
    network_weight: float = 0.5          # w in w * p_network + (1 - w) * prior inside C2
    smoothing_mm: float = 4.0            # Gaussian sigma applied to the averaged atlas labels
    min_extent_mm: float = 100.0         # shorter scans are slabs: skipped, or see `slabs`
    demons_iterations: int = 30
    # True: the atlases' organs join C2 (dilated like stage 1's), so stage 2 looks wherever
    # either stage 1 or the atlases put an organ and the prior never labels a voxel alone.
    # False (packages before abdomen-ct 2.1.0): outside C2 the prior's argmax is the label.
    candidates: bool = False
    # True: slabs (shorter than min_extent_mm, at least SLAB_MIN_EXTENT_MM) are registered by
    # `register_slab` on a `slab_spacing_mm` grid. False (packages before abdomen-ct 2.2.0):
    # slabs get the network alone.
    slabs: bool = False
    slab_spacing_mm: float = 4.0
    # > 0: each atlas votes per voxel with weight (1 + local MSE / (10 HU)^2) ** -power, its
    # warped CT compared with the patient's (soft-tissue window, Gaussian window of
    # `local_weight_sigma_mm`), so where one atlas's anatomy matches better it counts more.
    # 0 (packages before abdomen-ct 2.3.0): every atlas counts the same.
    local_weight_power: float = 0.0
    local_weight_sigma_mm: float = 2.0
    # Most iterations of the affine (or, on slabs, similarity) optimiser per resolution level.
    # 200 (packages before abdomen-ct 2.5.0) rarely converged before the cap and cost a third of
    # each registration; 50 was as good or better on the atlases-alone folds (recipe doc).
    linear_iterations: int = LEGACY_LINEAR_ITERATIONS
    # Gaussian std, in voxels of the registration grid, of the demons displacement field after each
    # iteration: the deformation's stiffness, for whole scans and for slabs. On whole scans 2.0
    # (packages before abdomen-ct 2.9.0) was stiffer than the atlases-alone folds liked; on slabs
    # (4 mm grid, a few centimetres of anatomy) softer fields lost. See the recipe's fourteenth round.
    demons_smoothing: float = LEGACY_DEMONS_SMOOTHING
    slab_demons_smoothing: float = LEGACY_DEMONS_SMOOTHING
    # > 0: organ identity from the atlases. A voxel the fused result gives to one of
    # `mixup_organs` where at least this share of the atlases' vote goes to another of them
    # takes the atlases' organ (a spleen labelled left kidney); borders stay the fused result's.
    # A voxel stage 1 gives the same organ as the fused result keeps it (library, abdomen-ct 2.12.0
    # on): the atlases overrule stage 2 where it strays from stage 1, not both networks.
    # 0 (packages before abdomen-ct 2.10.0, and since 2.13.1, whose GPU-trained networks the step
    # cost organs on every scan measured): the result is kept; only the atlas check reports them.
    mixup_share: float = 0.0
    mixup_organs: tuple[str, ...] = ()
    # > 0: the prior is weighted by how each class's HU look in this patient (`intensity_refined`):
    # prior * p(HU | class) ** intensity_weight, each class's histogram taken over its core (where it
    # is the most likely class with at least `intensity_core_share` of the vote, or 0.8 of its own
    # highest prior). 0 (packages before abdomen-ct 2.11.0): the prior is the atlases' vote alone.
    intensity_weight: float = 0.0
    intensity_core_share: float = 0.7
    # How each atlas is first placed on a whole scan: "moments" (packages before abdomen-ct 2.12.0)
    # lines up centres of mass, right only where scan and atlas cover the same part of the body;
    # "search" (2.12.0) also tries the translation at which they correlate best, also in part
    # (`best_translation`), where it lies more than PLACEMENT_TOLERANCE_MM head to feet away.
    placement: str = "moments"
    # > 0: on a whole scan where no registered atlas's organs agree with stage 1's by this Dice
    # (`organ_agreement`; the atlas check flags the same scans at MIN_SCAN_AGREEMENT), the atlases
    # found no abdomen (a pelvic or chest CT): their organs do not join C2 and do not label
    # anything outside it, while inside C2 the prior is still fused, its background vote holding
    # down the networks' false organs. 0 (packages before abdomen-ct 2.13.2): used as anywhere.
    min_scan_agreement: float = 0.0

    def to_json(self) -> dict[str, Any]:
        mixups = {"mixup_share": self.mixup_share, "mixup_organs": list(self.mixup_organs)} if self.mixup_share else {}
        intensity = {"intensity_weight": self.intensity_weight,
                     "intensity_core_share": self.intensity_core_share} if self.intensity_weight else {}
        placement: dict[str, Any] = {"placement": self.placement} if self.placement != "moments" else {}
        if self.min_scan_agreement:
            placement["min_scan_agreement"] = self.min_scan_agreement
        return {"atlases": [a.to_json() for a in self.atlases], "spacing_mm": self.spacing_mm,
                "window_hu": list(self.window_hu), "network_weight": self.network_weight,
                "smoothing_mm": self.smoothing_mm, "min_extent_mm": self.min_extent_mm,
                "demons_iterations": self.demons_iterations, "candidates": self.candidates,
                "slabs": self.slabs, "slab_spacing_mm": self.slab_spacing_mm,
                "local_weight_power": self.local_weight_power, "local_weight_sigma_mm": self.local_weight_sigma_mm,
                "linear_iterations": self.linear_iterations, "demons_smoothing": self.demons_smoothing,
                "slab_demons_smoothing": self.slab_demons_smoothing} | mixups | intensity | placement

    @staticmethod
    def from_json(d: dict[str, Any]) -> AtlasPriorSpec:
        problem = wrong_kind(AtlasPriorSpec, d, "atlas_prior")   # "false" would read as True
        if problem:
            raise ValueError(problem)
        lo, hi = (float(v) for v in d.get("window_hu", (-200.0, 300.0)))
        spec = AtlasPriorSpec(atlases=[AtlasSpec.from_json(a) for a in d["atlases"]],
                              spacing_mm=float(d.get("spacing_mm", 8.0)), window_hu=(lo, hi),
                              network_weight=float(d.get("network_weight", 0.5)),
                              smoothing_mm=float(d.get("smoothing_mm", 4.0)),
                              min_extent_mm=float(d.get("min_extent_mm", 100.0)),
                              demons_iterations=int(d.get("demons_iterations", 30)),
                              candidates=bool(d.get("candidates", False)),
                              slabs=bool(d.get("slabs", False)),
                              slab_spacing_mm=float(d.get("slab_spacing_mm", 4.0)),
                              local_weight_power=float(d.get("local_weight_power", 0.0)),
                              local_weight_sigma_mm=float(d.get("local_weight_sigma_mm", 2.0)),
                              linear_iterations=int(d.get("linear_iterations", LEGACY_LINEAR_ITERATIONS)),
                              demons_smoothing=float(d.get("demons_smoothing", LEGACY_DEMONS_SMOOTHING)),
                              slab_demons_smoothing=float(d.get("slab_demons_smoothing", LEGACY_DEMONS_SMOOTHING)),
                              mixup_share=float(d.get("mixup_share", 0.0)),
                              mixup_organs=tuple(str(o) for o in d.get("mixup_organs", ())),
                              intensity_weight=float(d.get("intensity_weight", 0.0)),
                              intensity_core_share=float(d.get("intensity_core_share", 0.7)),
                              placement=str(d.get("placement", "moments")),
                              min_scan_agreement=float(d.get("min_scan_agreement", 0.0)))
        if not spec.atlases:
            raise ValueError("atlas_prior lists no atlases")
        if not 0.0 <= spec.network_weight <= 1.0:
            raise ValueError(f"atlas_prior network_weight {spec.network_weight} is outside [0, 1]")
        if spec.spacing_mm <= 0 or spec.slab_spacing_mm <= 0 or hi <= lo:
            raise ValueError("atlas_prior needs spacing_mm > 0, slab_spacing_mm > 0 and window_hu low < high")
        if not 0.0 <= spec.local_weight_power <= MAX_LOCAL_WEIGHT_POWER or spec.local_weight_sigma_mm <= 0:
            raise ValueError(f"atlas_prior needs local_weight_power in [0, {MAX_LOCAL_WEIGHT_POWER:g}] "
                             "and local_weight_sigma_mm > 0")
        if spec.linear_iterations < 1 or spec.demons_iterations < 0 or not spec.demons_smoothing > 0 \
                or not spec.slab_demons_smoothing > 0:
            raise ValueError("atlas_prior needs linear_iterations >= 1, demons_iterations >= 0 and "
                             "demons_smoothing, slab_demons_smoothing > 0")
        if spec.mixup_share and not (0.5 < spec.mixup_share <= 1.0 and len(spec.mixup_organs) >= 2):
            raise ValueError("atlas_prior mixup_share must lie in (0.5, 1] (a majority) and name at least two "
                             "mixup_organs, or be 0")
        if not 0.0 <= spec.intensity_weight <= MAX_INTENSITY_WEIGHT or not 0.5 < spec.intensity_core_share <= 1.0:
            raise ValueError(f"atlas_prior needs intensity_weight in [0, {MAX_INTENSITY_WEIGHT:g}] and "
                             "intensity_core_share in (0.5, 1]")
        if not 0.0 <= spec.min_scan_agreement < 1.0:
            raise ValueError(f"atlas_prior min_scan_agreement {spec.min_scan_agreement} is outside [0, 1)")
        if spec.placement not in PLACEMENTS:
            raise ValueError(f"atlas_prior placement {spec.placement!r} is not one of {', '.join(PLACEMENTS)}")
        return spec

    def check_organs(self, names: Sequence[str]) -> None:
        """ValueError unless every organ the settings name (`mixup_organs`) is one of the model's
        label `names`: a check against the model, which the settings alone cannot make."""
        unknown = set(self.mixup_organs) - set(names)
        if unknown:
            raise ValueError(f"atlas_prior mixup_organs names unknown organs {sorted(unknown)}")

    def files(self) -> list[tuple[str, str]]:
        """(file name, recorded sha256) of every atlas file."""
        return [(f, a.sha256.get(f, "")) for a in self.atlases for f in (a.image, a.labels)]


def soft_tissue(ct: sitk.Image, spacing_mm: float = 3.0,
                window_hu: tuple[float, float] = (-200.0, 300.0)) -> sitk.Image:
    """HU clipped to the soft-tissue window and shifted to start at 0, on an isotropic grid: what
    the registration compares (non-negative, so the moments initialiser finds the body, not air)."""
    img = preprocess.resample_to_spacing(ct, [spacing_mm] * 3, "linear", -1024.0, sitk.sitkFloat32)
    lo, hi = window_hu
    return sitk.Clamp(img, sitk.sitkFloat32, lo, hi) - lo


def register(fixed_ct: sitk.Image, moving_ct: sitk.Image, spacing_mm: float = 3.0,
             window_hu: tuple[float, float] = (-200.0, 300.0), demons_iterations: int = 60,
             fixed_soft: sitk.Image | None = None, threads: int = 0,
             linear_iterations: int = LEGACY_LINEAR_ITERATIONS,
             demons_smoothing: float = LEGACY_DEMONS_SMOOTHING, placement: str = "moments",
             choose: Callable[[list[sitk.Transform]], int] | None = None) -> sitk.Transform:
    """The transform mapping `fixed_ct`'s physical points into `moving_ct`: an affine on Mattes
    mutual information (3 levels, at most `linear_iterations` each), then fast symmetric demons on
    the affinely aligned images (the field smoothed by `demons_smoothing` voxels each iteration).
    The affine starts from the centres of mass lined up; with `placement` "search", from the
    translation at which the images correlate best (`best_translation`, also where they overlap
    only in part along the body) instead, where the two lie more than `PLACEMENT_TOLERANCE_MM`
    apart head to feet: then the scans cover different parts of the body. There, with `choose`,
    both starts are registered and `choose` picks between the two results (moments' first).
    `fixed_soft` reuses the fixed image's soft-tissue grid when several atlases are registered;
    `threads` > 0 caps SimpleITK's threads (for registrations running side by side)."""
    fixed = fixed_soft if fixed_soft is not None else soft_tissue(fixed_ct, spacing_mm, window_hu)
    moving = soft_tissue(moving_ct, spacing_mm, window_hu)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)

    def from_start(start: sitk.Transform) -> sitk.Transform:
        return _linear_then_demons(fixed, moving, start, [4, 2, 1], [2, 1, 0], demons_iterations, threads,
                                   linear_iterations, demons_smoothing)

    if placement == "search":
        found = best_translation(fixed, moving, partial=True)
        if abs(found[2] - init.GetTranslation()[2]) > PLACEMENT_TOLERANCE_MM:     # head-feet (LPS z)
            searched = sitk.AffineTransform(3)
            searched.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
            searched.SetTranslation(found)
            if choose is None:
                init = searched
            else:
                both = [from_start(start) for start in (init, searched)]
                return both[choose(both)]
    return from_start(init)


def register_slab(fixed_ct: sitk.Image, moving_ct: sitk.Image, spacing_mm: float = 4.0,
                  window_hu: tuple[float, float] = (-200.0, 300.0), demons_iterations: int = 30,
                  fixed_soft: sitk.Image | None = None, threads: int = 0,
                  linear_iterations: int = LEGACY_LINEAR_ITERATIONS,
                  demons_smoothing: float = LEGACY_DEMONS_SMOOTHING) -> sitk.Transform:
    """`register` for a slab (a few centimetres of a patient, a whole atlas): the moments
    initialiser would put the slab at the atlas's centre of mass, so the slab is first placed
    where it correlates best (`best_translation`, every voxel shift at once), then a similarity
    (rotation, one scale: an affine's scale along the slab is unconstrained) on mutual
    information, then demons. Both at `spacing_mm` without shrinking: a slab has few slices."""
    fixed = body_box(fixed_soft if fixed_soft is not None else soft_tissue(fixed_ct, spacing_mm, window_hu))
    moving = soft_tissue(moving_ct, spacing_mm, window_hu)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    similarity.SetTranslation(best_translation(fixed, moving))
    return _linear_then_demons(fixed, moving, similarity, [1, 1], [1, 0], demons_iterations, threads,
                               linear_iterations, demons_smoothing)


def _linear_then_demons(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, shrink: list[int],
                        sigmas: list[float], demons_iterations: int, threads: int,
                        linear_iterations: int, demons_smoothing: float) -> sitk.Transform:
    """`initial` optimised on Mattes mutual information (20 % of the voxels, one level per
    `shrink` factor), then fast symmetric demons on the images it aligns: the two
    registrations' common tail."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, linear_iterations, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SetInitialTransform(initial, inPlace=False)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(demons_iterations)
    demons.SetStandardDeviations(demons_smoothing)
    if threads > 0:
        reg.SetNumberOfThreads(threads)
        demons.SetNumberOfThreads(threads)
    # The metric's threads follow SimpleITK's global default, not the method's own setting: with
    # more than one its sums (and so the affine) change from run to run in the last digits.
    with itk_threads(threads):
        linear = reg.Execute(fixed, moving)
        aligned = sitk.Resample(moving, fixed, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        displacement = demons.Execute(fixed, aligned)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([linear, disp])


@contextmanager
def itk_threads(threads: int) -> Iterator[None]:
    """SimpleITK's global default number of threads set to `threads` (> 0) inside the block and
    restored after; 0 leaves it alone."""
    if threads <= 0:
        yield
        return
    saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved)


def body_box(soft: sitk.Image, margin: int = 2) -> sitk.Image:
    """`soft` (a `soft_tissue` image) cropped in-plane to the body (above -150 HU) and `margin`
    voxels: the air around a slab's body only slows its registration (a 500 mm field of view
    holds a 350 mm body). The whole image when nothing is body."""
    body = sitk.GetArrayViewFromImage(soft) > 50.0
    rows, cols = np.nonzero(body.any(2).any(0))[0], np.nonzero(body.any(1).any(0))[0]
    if rows.size == 0:
        return soft
    y0, y1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, body.shape[1])
    x0, x1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, body.shape[2])
    return soft[x0:x1, y0:y1, :]


def best_translation(fixed: sitk.Image, moving: sitk.Image, partial: bool = False) -> tuple[float, float, float]:
    """The physical translation (fixed point -> moving point) of the voxel shift at which
    `fixed` correlates best (normalised cross-correlation, all shifts by FFT) with `moving`.

    `moving` is first resampled onto `fixed`'s axes and spacing, over its own bounding box and
    padded across the slab by half the fixed image (air), so the slab may lie anywhere along
    the atlas and partly past its sides, but not past its ends. `partial`: `fixed` is a whole
    scan, padded along the body (its axis nearest head-feet) so that the two may share as little
    as `MIN_PLACEMENT_OVERLAP` of the shorter one's length there (a chest CT, an abdominal atlas)."""
    from scipy import fft

    axes, origin = index_to_physical(fixed)
    corners = [moving.TransformContinuousIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, moving.GetSize())])
               for corner in itertools.product((0, 1), repeat=3)]
    index = np.linalg.solve(axes, (np.array(corners) - origin).T).T       # in fixed's continuous index
    lo, hi = np.floor(index.min(0)), np.ceil(index.max(0))
    box = sitk.Image([int(n) for n in hi - lo + 1], sitk.sitkFloat32)
    box.SetSpacing(fixed.GetSpacing())
    box.SetDirection(fixed.GetDirection())
    box.SetOrigin(tuple(origin + axes @ lo))
    m = sitk.GetArrayFromImage(sitk.Resample(moving, box, sitk.Transform(), sitk.sitkLinear, 0.0))
    f = sitk.GetArrayFromImage(fixed).astype(np.float64)
    # Padded by half the slab across it; along it (its shortest physical axis) only as far as a
    # slab longer than the atlas there needs (a slab across the body, longer than the atlas).
    pad = [n // 2 for n in f.shape]                                       # z, y, x
    if partial:
        along = int(np.argmax(np.abs(axes[2])))                           # x, y, z: nearest head-feet
        f_n, m_n = f.shape[2 - along], m.shape[2 - along]
        pad[2 - along] = max(0, f_n - m_n) + int((1.0 - MIN_PLACEMENT_OVERLAP) * min(f_n, m_n))
    else:
        along = int(np.argmin(np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())))   # x, y, z
        pad[2 - along] = max(0, -(-(f.shape[2 - along] - m.shape[2 - along]) // 2))
    m = np.pad(m, [(p, p) for p in pad]).astype(np.float64)
    f -= f.mean()
    # Correlations by FFT, each transform computed once (the box of ones serves two): valid
    # shifts only.
    shape = [fft.next_fast_len(int(a), real=True) for a in m.shape]
    valid = tuple(slice(b - 1, a) for a, b in zip(m.shape, f.shape))

    def correlate(spectrum: np.ndarray, mirrored_kernel_hat: np.ndarray) -> np.ndarray:
        return np.asarray(fft.irfftn(spectrum * mirrored_kernel_hat, shape)[valid])

    m_hat, m2_hat = fft.rfftn(m, shape), fft.rfftn(m * m, shape)
    ones_hat = fft.rfftn(np.ones_like(f), shape)          # a box of ones is its own mirror image
    local_sum = correlate(m_hat, ones_hat)
    local_var = correlate(m2_hat, ones_hat) - local_sum ** 2 / f.size
    ncc = correlate(m_hat, fft.rfftn(f[::-1, ::-1, ::-1], shape)) / np.sqrt(
        np.maximum(local_var, 1e-6) * max(float((f * f).sum()), 1e-6))
    shift = np.array(np.unravel_index(int(np.argmax(ncc)), ncc.shape)) - np.array(pad)   # z, y, x
    return tuple(float(v) for v in axes @ (lo + shift[::-1]))  # type: ignore[return-value]


def body_extent_mm(image: sitk.Image) -> float:
    """The scan's physical length along its slice axis (the axis a slab is short in)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    return float(min(n * s for n, s in zip(size, spacing)))


def atlas_prior(image: sitk.Image, grid: sitk.Image, spec: AtlasPriorSpec, root: Path, num_classes: int,
                device: torch.device,
                progress: Callable[[float, str], None] | None = None,
                check_cancel: Callable[[], None] | None = None,
                slab: bool = False,
                network_labels: torch.Tensor | None = None,
                agreement: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The smoothed class prior (K, z, y, x) on `grid` from the package's atlases registered onto
    `image`, rows summing to 1 (uniform where no atlas reaches), and per-atlas seconds. `slab`:
    register with `register_slab` at `spec.slab_spacing_mm` (the caller decides what is a slab).
    `network_labels` (z, y, x on `grid`, stage 1's organs): where an atlas's searched placement
    differs from its centres of mass' (`placement` "search"), both are registered and the searched
    one is kept only where its organs agree with the network's by `PLACEMENT_MIN_AGREEMENT_GAIN`
    more Dice (`organ_agreement`). `agreement`, with `network_labels` on a whole scan: filled with
    each atlas's `organ_agreement` with them as registered (atlas name -> Dice), for the atlas
    check's look at the scan as a whole (atlas_check.scan_conflict)."""
    spacing = spec.slab_spacing_mm if slab else spec.spacing_mm
    smoothing = spec.slab_demons_smoothing if slab else spec.demons_smoothing
    method: Callable[..., sitk.Transform] = register_slab if slab else partial(register, placement=spec.placement)
    reference = network_labels.to(device) if network_labels is not None else None
    fixed_soft = soft_tissue(image, spacing, spec.window_hu)
    shape = tuple(grid.GetSize()[::-1])
    counts = torch.zeros((num_classes,) + shape, dtype=torch.float32, device=device)
    covered = torch.zeros(shape, dtype=torch.float32, device=device)
    seconds: dict[str, float] = {}
    # Registrations of small coarse images use few threads well: two side by side, one thread
    # each, finish sooner than one after the other with all the cores.
    workers = max(1, min(2, len(spec.atlases), os.cpu_count() or 1))

    weighted = spec.local_weight_power > 0
    target = _soft_on_grid(image, grid, spec.window_hu, device) \
        if weighted or spec.intensity_weight > 0 else None
    sigma_vox = [spec.local_weight_sigma_mm / s for s in grid.GetSpacing()[::-1]]

    def warp(atlas: AtlasSpec) -> tuple[AtlasSpec, torch.Tensor, torch.Tensor | None, float]:
        t0 = time.perf_counter()
        moving = _read(root / atlas.image, atlas.sha256.get(atlas.image, ""))
        labels = _read(root / atlas.labels, atlas.sha256.get(atlas.labels, ""))
        chooser: dict[str, Callable[[list[sitk.Transform]], int]] = {}
        if not slab and reference is not None:
            network = reference

            def closer_to_the_network(transforms: list[sitk.Transform]) -> int:
                """1 (the searched start) only where its organs agree clearly better with the network's."""
                moments, searched = (organ_agreement(warp_onto_grid(tx, grid, labels, None, UNKNOWN_LABEL,
                                                                    spec.window_hu[0], device)[0], network)
                                     for tx in transforms)
                return int(searched >= moments + PLACEMENT_MIN_AGREEMENT_GAIN)

            chooser["choose"] = closer_to_the_network
        transform = method(image, moving, spacing, spec.window_hu, spec.demons_iterations, fixed_soft,
                           linear_iterations=spec.linear_iterations, demons_smoothing=smoothing, **chooser)
        # UNKNOWN_LABEL (255) marks voxels the atlas does not reach: such an atlas neither votes for an organ nor
        # for background there, so a short atlas never vetoes a longer one. Labels and CT are read
        # through one mapping of the grid (what sitk.Resample gives, in a third less time).
        warped, moved = warp_onto_grid(transform, grid, labels, moving if weighted else None,
                                       UNKNOWN_LABEL, spec.window_hu[0], device)
        if agreement is not None and reference is not None and not slab:
            agreement[atlas.name] = organ_agreement(warped, reference)
        weights = None
        if weighted and target is not None and moved is not None:
            weights = local_weights(moved.clamp(*spec.window_hu), target, sigma_vox, spec.local_weight_power)
        return atlas, warped, weights, time.perf_counter() - t0

    if progress is not None:
        progress(0.0, f"registering {len(spec.atlases)} atlas(es)")
    # ITK's multi-threaded metric sums its samples in whatever order threads finish: with more
    # than one thread per registration the answer changes from run to run. One thread each,
    # and the registrations side by side, is both reproducible and faster.
    with itk_threads(1):
        _register_all(spec, warp, workers, num_classes, counts, covered, seconds, progress, check_cancel)
    reached = covered > 0
    prior = torch.where(reached, counts / torch.where(reached, covered, 1.0),
                        torch.full_like(counts, 1.0 / num_classes))
    prior = gaussian_smooth(prior, [spec.smoothing_mm / s for s in grid.GetSpacing()[::-1]])
    prior /= prior.sum(0, keepdim=True).clamp(min=1e-6)
    if spec.intensity_weight > 0 and target is not None:
        prior = intensity_refined(prior, target, spec.window_hu, spec.intensity_weight, spec.intensity_core_share)
    if progress is not None:
        progress(1.0, "atlases registered")
    return prior, seconds


def organ_agreement(warped: torch.Tensor, reference: torch.Tensor) -> float:
    """Dice of the organ voxels two label maps on one grid give the same organ (any organ, label by
    label: 2 |a = r > 0| / (|a > 0| + |r > 0|)), the atlas's voxels beyond its reach not counted:
    how well a warped atlas's anatomy agrees with the network's."""
    mine = (warped > 0) & (warped != UNKNOWN_LABEL)
    theirs = reference > 0
    total = int(mine.sum()) + int(theirs.sum())
    return 2.0 * float((mine & (warped == reference)).sum()) / total if total else 0.0


def intensity_refined(prior: torch.Tensor, hu: torch.Tensor, window_hu: tuple[float, float], weight: float,
                      core_share: float) -> torch.Tensor:
    """`prior` (K, z, y, x) weighted by each class's HU likelihood in this patient, to the power
    `weight`: the atlases say roughly where an organ is, the patient's own image says where its
    HU are (an atlas-guided classifier, as in atlas-based EM segmentation).

    The likelihood p(HU | k) is the histogram (`INTENSITY_BIN_HU` bins over `window_hu`, Gaussian
    smoothed) of `hu` (z, y, x, clipped to the window) over class k's core: the voxels where k
    is the prior's most likely class and its prior reaches `core_share`, or
    `INTENSITY_CORE_OF_MAX` of its own highest prior where that is lower (thin or variable
    structures the atlases never quite agree on, such as the pancreas). Cores, not smeared
    borders, so a contrast phase or scanner the atlases never saw sets its own intensities. A
    class with fewer than `INTENSITY_MIN_CORE` core voxels has no evidence and keeps its prior;
    the classes with cores share the rest of each voxel's prior in proportion to prior *
    likelihood ** weight. One pass, no EM iterations: nothing feeds back."""
    lo, hi = window_hu
    bins = max(2, int(np.ceil((hi - lo) / INTENSITY_BIN_HU)))
    index = ((hu - lo) / INTENSITY_BIN_HU).long().clamp(0, bins - 1).flatten()
    k = prior.shape[0]
    flat = prior.reshape(k, -1)
    share, top = flat.max(0)
    threshold = (INTENSITY_CORE_OF_MAX * flat.max(1).values).clamp(max=core_share)
    # Each voxel is in at most one core, its most likely class's: one histogram pass for all.
    in_core = share >= threshold[top]
    hist = torch.bincount(top[in_core] * bins + index[in_core], minlength=k * bins).view(k, bins).float()
    evidence = hist.sum(1) >= INTENSITY_MIN_CORE
    if not bool(evidence.any()):
        return prior
    hist = gaussian_smooth(hist[evidence][:, None, None, :], [0.0, 0.0, INTENSITY_SMOOTH_BINS])[:, 0, 0, :]
    likelihood = (hist / hist.sum(1, keepdim=True)).clamp(min=1e-6).pow(weight)
    weighted = flat[evidence] * likelihood[:, index]
    out = flat.clone()
    out[evidence] = weighted * (flat[evidence].sum(0) / weighted.sum(0).clamp(min=1e-30))
    return out.view(prior.shape)


def _soft_tensor(image: sitk.Image, window_hu: tuple[float, float], device: torch.device) -> torch.Tensor:
    """HU of `image` clipped to the soft-tissue window, as a (z, y, x) float tensor."""
    return preprocess.to_device(sitk.GetArrayViewFromImage(image), device).float().clamp(*window_hu)


def _soft_on_grid(image: sitk.Image, grid: sitk.Image, window_hu: tuple[float, float],
                  device: torch.device) -> torch.Tensor:
    """The patient's soft-tissue HU on the prior's grid: what each warped atlas CT is compared with."""
    return _soft_tensor(preprocess.resample(image, grid, "linear", window_hu[0], sitk.sitkFloat32), window_hu, device)


def local_weights(moved: torch.Tensor, target: torch.Tensor, sigma_vox: list[float], power: float) -> torch.Tensor:
    """Per-voxel vote of one warped atlas: (1 + local MSE / LOCAL_WEIGHT_SCALE_HU2) ** -power.

    Locally weighted voting: an atlas whose warped CT looks like the patient around a voxel was
    probably registered well there, so its label counts more than that of an atlas that looks
    different (another organ, or air, where it should be liver). The local MSE is the squared HU
    difference under a Gaussian window. Weights lie in (0, 1]; only their ratios matter.
    """
    mse = gaussian_smooth(((moved - target) ** 2)[None], sigma_vox)[0]
    return (1.0 + mse / LOCAL_WEIGHT_SCALE_HU2).pow(-power)


def _register_all(spec: AtlasPriorSpec,
                  warp: Callable[[AtlasSpec], tuple[AtlasSpec, torch.Tensor, torch.Tensor | None, float]],
                  workers: int, num_classes: int, counts: torch.Tensor, covered: torch.Tensor,
                  seconds: dict[str, float], progress: Callable[[float, str], None] | None,
                  check_cancel: Callable[[], None] | None) -> None:
    """Register and warp every atlas (`workers` at a time) and add its votes to `counts`: one
    per voxel it reaches, or its local weights there. Votes are added in the package's atlas
    order whatever order the registrations finish in: float weights summed in another order
    could tip an argmax, and the same CT must always get the same labels."""
    finished: dict[int, tuple[AtlasSpec, torch.Tensor, torch.Tensor | None]] = {}
    next_to_add = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(warp, a) for a in spec.atlases]
        order = {future: i for i, future in enumerate(pending)}
        try:
            for done, future in enumerate(as_completed(pending), start=1):
                atlas, warped, weights, took = future.result()
                finished[order[future]] = (atlas, warped, weights)
                while next_to_add in finished:       # later ones wait (a label grid each) for an earlier one
                    _add_votes(*finished.pop(next_to_add), num_classes, counts, covered)
                    next_to_add += 1
                seconds[atlas.name] = took
                if progress is not None:
                    progress(done / len(spec.atlases), f"registered atlas {done}/{len(spec.atlases)} ({atlas.name})")
                if check_cancel is not None:
                    check_cancel()
        except BaseException:
            for future in pending:        # a cancel or an error: start no further registration
                future.cancel()
            raise


def _add_votes(atlas: AtlasSpec, warped: torch.Tensor, weights: torch.Tensor | None, num_classes: int,
               counts: torch.Tensor, covered: torch.Tensor) -> None:
    """Add one warped atlas's votes (`weights`, or one each) where it has a label (not `UNKNOWN_LABEL`:
    beyond its reach, or mended to unknown)."""
    arr = warped.to(counts.device).long()
    inside = arr != UNKNOWN_LABEL
    if bool((arr[inside] >= num_classes).any()):
        raise ModelError(f"atlas {atlas.name} has label values outside 0..{num_classes - 1}; fix the package")
    vote = inside.float() if weights is None else weights * inside
    counts.scatter_add_(0, torch.where(inside, arr, 0)[None], vote[None])
    covered += vote


class GridPrior:
    """The atlas prior of stage 2's grid `target`, held on the grid `source` it was built on.

    `prior` is (K, z, y, x) on `source`: stage 2's grid itself, or the 3 mm grid when stage 2 is
    finer. Nothing K-channel is made on a finer `target` as a whole: `region(lo, hi)`
    interpolates the prior linearly onto `target`'s voxels [lo, hi) only (one stage-2 box),
    where `fused_labels` mixes it with the network, and `labels()` (the label outside C2) is the
    interpolated prior's argmax, interpolated only where the source labels change. Index ranges
    are (z, y, x) voxels of `target`; both grids are placed in physical space by their own
    geometry.
    """

    def __init__(self, prior: torch.Tensor, source: sitk.Image, target: sitk.Image, network_weight: float) -> None:
        if tuple(prior.shape[1:]) != tuple(source.GetSize()[::-1]):
            raise ValueError(f"prior of shape {tuple(prior.shape)} is not on its grid of size {source.GetSize()}")
        self.prior, self.source, self.target = prior, source, target
        self.network_weight = float(network_weight)
        self.shape: tuple[int, int, int] = tuple(int(n) for n in target.GetSize()[::-1])  # type: ignore[assignment]
        self.same_grid = same_geometry(source, target)
        # Per target axis (z, y, x): the two source neighbours and their weights, when the grids
        # share their axes (the model grids do); otherwise SimpleITK resamples each region.
        self._maps = None if self.same_grid else _linear_maps(source, target, prior.device)
        self._vector: sitk.Image | None = None
        self._support: dict[int, np.ndarray] = {}
        self._agreed_at: dict[float, np.ndarray] = {}
        self._labels: torch.Tensor | None = None

    def plausible(self, value: int, index: np.ndarray) -> np.ndarray:
        """bool (N,): whether target voxels `index` (N, 3: z, y, x) lie within
        `PLAUSIBLE_MARGIN_MM` (a box, per axis) of where the atlases put label `value`.

        The atlases know roughly where an organ is even where they miss its borders; a piece
        of it the network finds a hand's width away from every atlas (a spleen in the pelvis)
        is implausible. Voxels past the prior's grid count as plausible (nothing is known there).
        """
        support = self._support.get(value)
        if support is None:
            near = (self.prior[value] > PLAUSIBLE_MIN_PRIOR).float()[None, None]
            for dim, spacing in enumerate(self.source.GetSpacing()[::-1]):
                r = int(np.ceil(PLAUSIBLE_MARGIN_MM / spacing))
                kernel = [1, 1, 1]
                kernel[dim] = 2 * r + 1
                pad = [0, 0, 0, 0, 0, 0]
                pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
                near = torch.nn.functional.max_pool3d(torch.nn.functional.pad(near, pad), kernel, stride=1)
            support = self._support[value] = near[0, 0].bool().cpu().numpy()
        return _lookup(support, self.source, self.target, index)

    def consensus(self, labels: torch.Tensor, min_share: float) -> tuple[np.ndarray, np.ndarray]:
        """For every organ voxel of `labels` (uint8 on `target`): its label and the organ that at
        least `min_share` of the atlases' vote puts there (at the nearest prior voxel; 0 where no
        organ has that share, or past the prior's grid). Two (N,) int arrays."""
        agreed = self._agreed(min_share)
        arr = labels.cpu().numpy()
        index = np.argwhere(arr > 0)
        return (arr[tuple(index.T)].astype(np.int64),
                _lookup(agreed, self.source, self.target, index, fill=0).astype(np.int64))

    def agreed_regions(self, labels: torch.Tensor, min_share: float) -> tuple[np.ndarray, np.ndarray]:
        """For every voxel of the prior's own grid where at least `min_share` of the atlases' vote
        goes to one organ: that organ and the label of `labels` (uint8 on `target`) at the
        nearest target voxel (0 past the target grid). Two (N,) int arrays; N voxels of the
        prior's grid (`source`)."""
        agreed = self._agreed(min_share)
        index = np.argwhere(agreed > 0)
        return (agreed[tuple(index.T)].astype(np.int64),
                _lookup(labels.cpu().numpy(), self.target, self.source, index, fill=0).astype(np.int64))

    def relabel_mixups(self, labels: torch.Tensor, min_share: float, organs: Sequence[int],
                       stage1: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` (uint8 on `target`) where each voxel of one of `organs` that at least `min_share`
        of the atlases' vote gives to another of `organs` (at the nearest prior voxel) takes that
        organ: the atlases decide which organ, the labels where (AtlasPriorSpec.mixup_share).

        With `stage1` (stage 1's labels on `target`), a voxel both stages give the same organ keeps
        it: the atlases overrule stage 2 where it strays from stage 1 (a spleen stage 1 found and
        stage 2 called left kidney), not both networks at once, which on scans the atlases fit
        badly (a whole body, a chest CT) are the ones that are right."""
        arr = labels.cpu().numpy().copy()
        allowed = np.zeros(256, bool)
        allowed[list(organs)] = True
        index = np.argwhere(allowed[arr])
        if index.size == 0:
            return labels
        agreed = _lookup(self._agreed(min_share), self.source, self.target, index, fill=0)
        own = arr[tuple(index.T)]
        switch = allowed[agreed] & (agreed != own)
        if stage1 is not None:
            switch &= stage1.cpu().numpy()[tuple(index.T)] != own
        arr[tuple(index[switch].T)] = agreed[switch]
        return torch.from_numpy(arr).to(labels.device)

    def _agreed(self, min_share: float) -> np.ndarray:
        """uint8 (z, y, x) on `source`: the organ that gets at least `min_share` of the vote, else 0
        (made once per share: the mix-up and the missed-region checks both read it)."""
        if min_share not in self._agreed_at:
            share, top = self.prior.max(0)
            self._agreed_at[min_share] = torch.where(share >= min_share, top, 0).to(torch.uint8).cpu().numpy()
        return self._agreed_at[min_share]

    def labels(self) -> torch.Tensor:
        """uint8 (z, y, x) on `target`: the argmax of the prior interpolated linearly onto it,
        the label outside C2, without a K-channel volume of `target`.

        Where the (up to 8) source voxels a target voxel interpolates from share their argmax,
        that is the argmax of any weighted mean of them, so only target voxels whose source
        cell holds more than one label (along the prior's label borders, ~2% of a 1.5 mm grid)
        are interpolated. Past `source`'s last voxel centres the edge voxels reach one voxel
        further, as labels from model grids do (`resample_labels_to(..., edge=1)`), where
        `region` is 0. Grids that do not share their axes get the argmax resampled nearest.
        """
        if self._labels is None:
            self._labels = self._argmax_on_target()
        return self._labels

    def _argmax_on_target(self) -> torch.Tensor:
        coarse = self.prior.argmax(0).to(torch.uint8)
        if self.same_grid:
            return coarse
        if self._maps is None:
            from .cascade import resample_labels_to  # cascade imports this module

            img = sitk.GetImageFromArray(coarse.cpu().numpy())
            img.CopyInformation(self.source)
            nearest = resample_labels_to(img, self.target, edge=1)
            return preprocess.to_device(sitk.GetArrayViewFromImage(nearest), self.prior.device)
        maps = self._maps

        def lower_corner(volume: torch.Tensor) -> torch.Tensor:   # source (z, y, x) -> target grid
            for dim in (2, 1, 0):
                volume = volume.index_select(dim, maps[dim].lower)
            return volume

        out = lower_corner(coarse)
        border = lower_corner(_mixed_cells(coarse)).nonzero()
        for chunk in border.split(1 << 20):
            out[chunk[:, 0], chunk[:, 1], chunk[:, 2]] = self._interpolated_argmax(chunk)
        reach = [m.reach for m in maps]
        if not all(bool(r.all()) for r in reach):
            out *= reach[0][:, None, None] & reach[1][None, :, None] & reach[2][None, None, :]
        return out

    def _interpolated_argmax(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 argmax of the prior interpolated at target voxels `index` (N, 3: z, y, x), the
        edge voxels extended (the weights `labels` uses)."""
        corners = []
        for dim, m in enumerate(self._maps or []):
            i = index[:, dim]
            frac = m.frac[i]
            corners.append(((m.lower[i], 1.0 - frac), (m.upper[i], frac)))
        scores = torch.zeros((self.prior.shape[0], index.shape[0]), dtype=self.prior.dtype, device=self.prior.device)
        for (z, wz), (y, wy), (x, wx) in itertools.product(*corners):
            scores += self.prior[:, z, y, x] * (wz * wy * wx)
        return scores.argmax(0).to(torch.uint8)

    def region(self, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        """The prior (K, z, y, x) on `target`'s voxels [lo, hi) (z, y, x): linear interpolation
        of `source`'s prior as SimpleITK's (edge voxels reach half a voxel out, 0 beyond)."""
        lo, hi = [int(v) for v in lo], [int(v) for v in hi]
        if any(h <= a for a, h in zip(lo, hi)) or any(a < 0 or h > n for a, h, n in zip(lo, hi, self.shape)):
            raise ValueError(f"region {lo}..{hi} is empty or outside the grid {self.shape}")
        if self.same_grid:
            return self.prior[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        if self._maps is None:
            return self._resampled(lo, hi)
        out = self.prior
        picks = []
        for dim, m in enumerate(self._maps, start=1):
            a, b = lo[dim - 1], hi[dim - 1]
            first, last = int(m.lower[a:b].min()), int(m.upper[a:b].max())
            out = out.narrow(dim, first, last - first + 1)   # only the source voxels the region reads
            frac, inside = m.frac[a:b], m.inside[a:b]
            picks.append((m.lower[a:b] - first, m.upper[a:b] - first, (1.0 - frac) * inside, frac * inside))
        for dim in (3, 2, 1):                                  # x, y, z: the cheap axes first
            i0, i1, w0, w1 = picks[dim - 1]
            shape = [1, 1, 1, 1]
            shape[dim] = -1
            out = out.index_select(dim, i0) * w0.view(shape) + out.index_select(dim, i1) * w1.view(shape)
        return out

    def fused_labels(self, lo: Sequence[int], hi: Sequence[int], network: torch.Tensor) -> torch.Tensor:
        """uint8 labels of `target`'s voxels [lo, hi): argmax(w * network + (1 - w) * prior), with
        `network` the stage-2 probabilities (K, z, y, x) of that region. The label inside C2."""
        return fused_scores(network, self.region(lo, hi), self.network_weight).argmax(0).to(torch.uint8)

    def fuse_into(self, probs: torch.Tensor, inside: torch.Tensor, slab: int = 16,
                  prior_outside: bool = True) -> torch.Tensor:
        """Stage 2's whole-grid probabilities (K, z, y, x on `target`) turned, in place and slab by
        slab, into the scores the labels are the argmax of: fused inside C2 (`inside`), the
        interpolated prior outside it (stage 2's own there without `prior_outside`: a scan the
        atlases found no abdomen in, `AtlasPriorSpec.min_scan_agreement`). What
        `--save-probabilities` writes for an atlas model."""
        z_n, y_n, x_n = self.shape
        for z0 in range(0, z_n, slab):
            z1 = min(z0 + slab, z_n)
            prior = self.region((z0, 0, 0), (z1, y_n, x_n)).to(probs.dtype)
            outside = prior if prior_outside else probs[:, z0:z1]
            probs[:, z0:z1] = torch.where(inside[z0:z1], fused_scores(probs[:, z0:z1], prior, self.network_weight),
                                          outside)
        return probs

    def _resampled(self, lo: list[int], hi: list[int]) -> torch.Tensor:
        """`region` for grids that do not share their axes: SimpleITK over the region's sub-grid."""
        if self._vector is None:
            self._vector = sitk.GetImageFromArray(self.prior.permute(1, 2, 3, 0).contiguous().cpu().numpy(),
                                                  isVector=True)
            self._vector.CopyInformation(self.source)
        sub = preprocess.subgrid(self.target, lo[::-1], [h - a for a, h in zip(lo[::-1], hi[::-1])])
        out = sitk.Resample(self._vector, sub, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
        arr = torch.from_numpy(sitk.GetArrayFromImage(out)).to(self.prior.device)
        return arr.permute(3, 0, 1, 2).contiguous()


def _lookup(volume: np.ndarray, source: sitk.Image, target: sitk.Image, index: np.ndarray,
            fill: Any = True) -> np.ndarray:
    """`volume` (on `source`, z, y, x) at the nearest source voxel of each target voxel
    `index` (N, 3: z, y, x); `fill` past the source grid."""
    m_tgt, o_tgt = index_to_physical(target)
    m_src, o_src = index_to_physical(source)
    xyz = index[:, ::-1].astype(np.float64)
    physical = xyz @ m_tgt.T + o_tgt
    continuous = np.linalg.solve(m_src, (physical - o_src).T).T
    nearest = np.floor(continuous + 0.5).astype(np.int64)[:, ::-1]          # back to z, y, x
    inside = np.all((nearest >= 0) & (nearest < np.array(volume.shape)), axis=1)
    out = np.full(len(index), fill, dtype=volume.dtype)
    z, y, x = nearest[inside].T
    out[inside] = volume[z, y, x]
    return out


class AxisMap(NamedTuple):
    """Along one axis, per target index: where its centre falls between the source's voxels."""
    lower: torch.Tensor    # int64 source index below (clamped to the grid)
    upper: torch.Tensor    # int64 source index above (clamped to the grid)
    frac: torch.Tensor     # float32 weight of `upper` (1 - frac: of `lower`)
    inside: torch.Tensor   # bool: SimpleITK interpolates here (continuous index in [-0.5, n - 0.5))
    reach: torch.Tensor    # bool: the nearest source index is at most one voxel past the grid


def _mixed_cells(labels: torch.Tensor) -> torch.Tensor:
    """bool (z, y, x): whether the voxel and its +1 neighbours along each axis (the cell a
    target voxel interpolates from; the last voxel stands in past the far edge) differ."""
    padded = labels
    for dim in range(3):
        padded = torch.cat([padded, padded.narrow(dim, padded.shape[dim] - 1, 1)], dim)
    z, y, x = labels.shape
    mixed = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for dz, dy, dx in itertools.product((0, 1), repeat=3):
        mixed |= padded[dz:dz + z, dy:dy + y, dx:dx + x] != labels
    return mixed


def _linear_maps(source: sitk.Image, target: sitk.Image, device: torch.device) -> list[AxisMap] | None:
    """Per target array axis (z, y, x): for each target index, the source neighbours and weights
    SimpleITK's linear interpolator takes (continuous index j; neighbours floor(j) and
    floor(j) + 1 clamped to the grid; 0 outside [-0.5, n - 0.5)); None unless the grids' axes
    align (`axis_aligned_indices`), so that trilinear interpolation is separable."""
    indices = axis_aligned_indices(source, target)
    if indices is None:
        return None
    maps: list[AxisMap] = []
    for axis in (2, 1, 0):
        j, n_src = indices[axis], source.GetSize()[axis]
        base = np.floor(j)
        nearest = np.floor(j + 0.5)
        arrays = (np.clip(base, 0, n_src - 1).astype(np.int64), np.clip(base + 1, 0, n_src - 1).astype(np.int64),
                  (j - base).astype(np.float32), (j >= -0.5) & (j < n_src - 0.5), (nearest >= -1) & (nearest <= n_src))
        maps.append(AxisMap(*(torch.from_numpy(a).to(device) for a in arrays)))
    return maps


def fused_scores(network: torch.Tensor, prior: torch.Tensor, network_weight: float) -> torch.Tensor:
    """Class scores inside C2: the weighted mean w * network + (1 - w) * prior of the stage-2
    probabilities and the prior on the same voxels; their argmax is the label there."""
    return network_weight * network + (1.0 - network_weight) * prior


def gaussian_smooth(volume: torch.Tensor, sigma_vox: list[float]) -> torch.Tensor:
    """Separable Gaussian blur of each channel of (C, z, y, x), edges replicated."""
    out = volume[None]
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        radius = max(1, int(3 * sigma + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel /= kernel.sum()
        c = out.shape[1]
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = torch.nn.functional.conv3d(torch.nn.functional.pad(out, pad, mode="replicate"), weight, groups=c)
    return out[0]


#: one image read at a time: SimpleITK's readers are not safe to run in parallel threads (its issues
#: 74 and 805: rare "double free or corruption" crashes), and the registrations run side by side
_READ_LOCK = threading.Lock()


def _read(path: Path, sha256: str) -> sitk.Image:
    """An atlas image, read only after its bytes match the sha256 model.json records."""
    if not path.is_file():
        raise ModelError(f"atlas file {path.name} is missing from {path.parent}; re-install the model")
    digest = sha256_file(path)
    if digest != sha256.lower():
        raise ModelError(f"atlas file {path.name} fails its sha256 check (got {digest[:12]}..., expected "
                         f"{sha256[:12] or 'nothing'}...); re-install the model")
    with _READ_LOCK:
        return sitk.ReadImage(str(path))
