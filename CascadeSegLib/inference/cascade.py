"""The two-stage cascade of Roth et al. 2018: C1 -> stage 1 -> C2 -> stage 2 -> labels.

`Segmenter.segment(image)` takes a CT on any grid (HU, any orientation) and returns labels on
exactly that grid. Stage 1 runs on a coarse grid inside the body mask C1; its dilated
foreground C2 (~10% of the voxels) is all that stage 2 looks at, on a finer grid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, UserError
from ..io.images import axis_aligned_indices
from ..network import ConfiguredNetwork, fold_batchnorm, prefer_onednn
from ..packaging.model import ModelPackage
from . import atlas_prior, preprocess
from .atlas_check import AtlasConflict, atlas_conflicts, per_organ_check, scan_conflict
from .memory import free_accelerator_memory, is_out_of_memory
from .tiling import (
    BOX_HALO,
    DEFAULT_BOX_TILE_VOXELS,
    Box,
    LabelsFn,
    box_tile,
    fit_tile,
    labels_over,
    plan_boxes,
    plan_tiles,
    predict_boxes,
    predict_volume,
    tile_geometry,
)
from .validation import validate_ct

ProgressCallback = Callable[[str, float, str], None]


class CancelToken:
    """Thread-safe flag checked between tiles; `cancel()` makes the running segment() stop."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class SegmentationResult:
    labels: sitk.Image                          # uint8 on the input grid
    timings: dict[str, float] = field(default_factory=dict)
    stage1_labels: sitk.Image | None = None     # on the input grid (keep_stage1)
    probabilities: sitk.Image | None = None     # float32 vector image, input grid cropped to stage 2's box
    c1: sitk.Image | None = None                # uint8 masks on the input grid (keep_candidates)
    c2: sitk.Image | None = None
    stats: dict[str, float] = field(default_factory=dict)
    # where the result and the registered atlases disagree on the organ (atlas_check.py)
    atlas_conflicts: list[AtlasConflict] = field(default_factory=list)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; asking for a missing GPU is an error."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError("--device mps was requested but Apple MPS is not available; use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


class Segmenter:
    """Runs a model package's cascade on CT images (a `predictor.Predictor`, architecture "3d-cascade").

    `overlap` is the fraction by which stage-2 tiles overlap (0: abutting tiles; 0.37 covers
    each voxel about 4 times, the paper's setting). `progress(stage, fraction, message)` is
    called as tiles finish; `cancel()` returning True stops the run with `Cancelled`.
    """

    def __init__(self, model: ModelPackage, device: str | torch.device = "auto", overlap: float = 0.0,
                 stage1_only: bool = False, keep_stage1: bool = False, keep_probabilities: bool = False,
                 keep_candidates: bool = False, batch_size: int | None = None,
                 progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
                 max_tile_voxels: int = DEFAULT_BOX_TILE_VOXELS,
                 largest_component: bool = True, tiling: str = "boxes", box_halo: int = BOX_HALO,
                 on_warning: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.device = resolve_device(device)
        self.overlap = float(overlap)
        self.stage1_only = stage1_only or len(model.stages) == 1
        self.keep_stage1 = keep_stage1
        self.keep_probabilities = keep_probabilities
        self.keep_candidates = keep_candidates
        self.batch_size = batch_size or (4 if self.device.type == "cuda" else 1)
        # A candidate box up to this size is one tile (no tile seams, far less padding work).
        self.max_tile_voxels = max_tile_voxels
        # "boxes": cover stage 2's candidates with a few tight boxes (padded networks, no overlap);
        # "tiles": the model's regular tile grid (the paper's way; always used with overlap).
        if tiling not in ("boxes", "tiles"):
            raise ValueError(f"tiling must be 'boxes' or 'tiles', got {tiling!r}")
        self.tiling = tiling
        self.box_halo = int(box_halo)
        # Organs the model lists as one connected structure lose stray islands (False: keep all).
        names = model.largest_component if largest_component else []
        self.largest_component_values = [model.labels.by_name(n).value for n in names]
        self.progress = progress
        self.cancel = cancel
        self.on_warning = on_warning
        # Where to go when the GPU runs out of memory even at one tile per batch (None: nowhere).
        self.fallback_device: torch.device | None = torch.device("cpu") if self.device.type != "cpu" else None
        self._nets: dict[int, ConfiguredNetwork] = {}
        self._stats: dict[str, float] = {}

    # --- helpers ------------------------------------------------------------------------------
    def network(self, index: int) -> ConfiguredNetwork:
        if index not in self._nets:
            net = self.model.load_network(index, "cpu")
            prefer_onednn(fold_batchnorm(net))
            self._nets[index] = net.to(self.device).eval()
        return self._nets[index]

    def _report(self, stage: str, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(stage, float(fraction), message)

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # --- the StagePredictor interface (predictor.py) ----------------------------------------------
    def check_cancel(self) -> None:
        """Raise `Cancelled` if the cancel callback says so (checked between steps and tiles)."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled")

    def to_tensor(self, image: sitk.Image) -> torch.Tensor:
        """An image's voxels (z, y, x) on this segmenter's device."""
        return preprocess.to_device(sitk.GetArrayViewFromImage(image), self.device)

    def predict_stage(self, index: int, hu: torch.Tensor | preprocess.GridWindows, mask: torch.Tensor, overlap: float,
                 stage: str, labels_only: bool = False, to_labels: LabelsFn | None = None) -> torch.Tensor:
        """Class probabilities (K, z, y, x) of stage `index` over `mask`, or (`labels_only`) the
        uint8 argmax. `hu` is the grid in HU, or a `GridWindows` resampled box by box. With
        `labels_only` and `to_labels(lo, hi, probabilities of the voxels [lo, hi))`, the labels
        are what that gives, region by region over the mask's cover (box by box for box covers)."""
        spec = self.model.stages[index]
        net = self.network(index)
        k = self.model.labels.num_classes
        window, mode = self.model.window, self.model.normalization
        pad_value = float(preprocess.normalize(torch.tensor(-1024.0), window, mode))
        progress = lambda f, msg: self._report(stage, f, msg)  # noqa: E731
        self._stats[f"{stage}_grid_voxels"] = int(mask.numel())
        # Boxes are for the fine stage's sparse C2. Stage 1's C1 is most of its coarse grid: one
        # box or tiles over it cost no more, and a split there only narrows instance-norm context
        # (a phantom model's held-out Dice fell from > 0.9 to 0.87 with C1 split into boxes).
        if self.tiling == "boxes" and overlap == 0 and net.cfg.kind == "padded" and index > 0:
            boxes = plan_boxes(mask, net.cfg, self.max_tile_voxels, self.box_halo)
            self._stats[f"{stage}_tiles"] = len(boxes)
            self._stats[f"{stage}_computed_voxels"] = sum(b.voxels for b in boxes)
            fetch: torch.Tensor | Callable[[Box], torch.Tensor]
            if isinstance(hu, preprocess.GridWindows):
                source = hu

                def windows(box: Box) -> torch.Tensor:
                    return preprocess.normalize(source.window(box.in_lo, box.in_size), window, mode)[None]

                fetch = windows
            else:
                fetch = preprocess.normalize(hu, window, mode)[None]
            return predict_boxes(net, fetch, boxes, k, pad_value=pad_value, progress=progress, cancel=self.cancel,
                                 on_oom=self._smaller_boxes, labels_only=labels_only, shape=tuple(mask.shape),
                                 to_labels=to_labels)
        if isinstance(hu, preprocess.GridWindows):
            hu = hu.full()
        volume = preprocess.normalize(hu, window, mode)[None]
        tile_in = (box_tile(net.cfg, spec.tile_zyx, mask, self.max_tile_voxels) if overlap == 0
                   else fit_tile(net.cfg, spec.tile_zyx, tuple(hu.shape)))
        plan = plan_tiles(mask, tile_geometry(net.cfg, tile_in)[0], tile_in, overlap)
        self._stats[f"{stage}_tiles"] = len(plan)
        self._stats[f"{stage}_computed_voxels"] = len(plan) * int(np.prod(plan.tile_in))
        probs = predict_volume(net, volume, mask, spec.tile_zyx, k, overlap=overlap, batch_size=self.batch_size,
                               pad_value=pad_value, progress=progress, cancel=self.cancel, plan=plan,
                               on_oom=self._smaller_batches)
        if labels_only and to_labels is not None:
            return labels_over(probs, mask, to_labels)
        return probs.argmax(0).to(torch.uint8) if labels_only else probs

    def _atlas_prior(self, image: sitk.Image, grid: sitk.Image, t: dict[str, float],
                     stage1: sitk.Image | None = None) -> atlas_prior.GridPrior | None:
        """The package's registered-atlas prior for stage 2's grid, with the network's weight in
        the fusion, or None (no atlases, or a scan too short to register: a slab holds too
        little anatomy for an affine to lock on, unless the package registers slabs)."""
        spec = self.model.atlas_prior
        if spec is None or self.model.root is None:
            return None
        extent = atlas_prior.body_extent_mm(image)
        slab = extent < spec.min_extent_mm
        if slab and (not spec.slabs or extent < atlas_prior.SLAB_MIN_EXTENT_MM):
            shortest = atlas_prior.SLAB_MIN_EXTENT_MM if spec.slabs else spec.min_extent_mm
            self._stats["atlas_prior_used"] = 0.0
            self._warn(f"atlas prior skipped: the scan is {extent:.0f} mm long along its shortest axis, under the "
                       f"{shortest:.0f} mm atlases need to register; the network alone segmented it")
            return None
        t0 = time.perf_counter()
        self._report("atlases", 0.0, "registering atlases")
        # The prior is smooth (sigma 4 mm): on a stage-2 grid finer than 3 mm it is built at 3 mm,
        # not warped and smoothed ten times over eight times the voxels, and GridPrior
        # interpolates it only inside stage 2's boxes (its argmax, resampled, serves outside C2).
        coarse = min(grid.GetSpacing()) < atlas_prior.PRIOR_SPACING_MM
        prior_grid = preprocess.grid_for_spacing(image, [atlas_prior.PRIOR_SPACING_MM] * 3) if coarse else grid
        # Stage 1's organs on the prior's grid: where an atlas could start from two placements, the
        # one that agrees better with them is kept (a scan of another part of the body), and how
        # well each registered atlas agrees with them tells whether the scan shows an abdomen at
        # all (atlas_check.scan_conflict). Placement "moments" never reads them to register.
        network = None
        agreement: dict[str, float] = {}
        if stage1 is not None and not slab:
            network = self.to_tensor(preprocess.resample(stage1, prior_grid, "nearest", 0, sitk.sitkUInt8))
        prior, seconds = atlas_prior.atlas_prior(
            image, prior_grid, spec, self.model.root, self.model.labels.num_classes, self.device,
            progress=lambda f, msg: self._report("atlases", f, msg), check_cancel=self.check_cancel, slab=slab,
            network_labels=network, agreement=agreement)
        fusion = atlas_prior.GridPrior(prior, prior_grid, grid, spec.network_weight)
        if agreement:
            self._stats["atlas_prior_agreement"] = max(agreement.values())
        t["atlas_prior"] = time.perf_counter() - t0
        self._stats["atlas_prior_used"] = 1.0
        self._stats["atlas_prior_slab"] = float(slab)
        self._stats["atlas_prior_atlases"] = float(len(seconds))
        self._stats["atlas_prior_weighted"] = float(spec.local_weight_power > 0)
        self._stats["atlas_prior_intensity"] = float(spec.intensity_weight > 0)
        self._stats["atlas_prior_search"] = float(spec.placement == "search" and not slab)
        return fusion

    def _smaller_boxes(self, voxels: int) -> None:
        self.max_tile_voxels = min(self.max_tile_voxels, voxels)  # keep what fits for the next stage and case
        self._warn(f"{self.device.type.upper()} out of memory; retrying with smaller boxes ({voxels} voxels)")

    def _smaller_batches(self, batch_size: int) -> None:
        self.batch_size = batch_size  # keep the size that fits for the next stage and case
        self._warn(f"{self.device.type.upper()} out of memory; retrying with {batch_size} tile(s) per batch")

    # --- the cascade --------------------------------------------------------------------------
    def segment(self, image: sitk.Image) -> SegmentationResult:
        """Labels for `image` on its grid; falls back to the CPU if the GPU runs out of memory."""
        try:
            return self._segment(image)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory falls back
            if self.fallback_device is None or not is_out_of_memory(exc):
                raise
        self._warn(f"{self.device.type.upper()} ran out of memory even with its smallest tiles; continuing on the "
                   f"{self.fallback_device.type.upper()} (slower)")
        self.device, self.fallback_device = self.fallback_device, None
        self._nets.clear()
        free_accelerator_memory()
        return self._segment(image)

    def _segment(self, image: sitk.Image) -> SegmentationResult:
        validate_ct(image, check_intensities=False)   # the CLI also checks the intensities look like CT
        t: dict[str, float] = {}
        stats: dict[str, float] = {}
        self._stats = stats
        start = time.perf_counter()
        model, s1 = self.model, self.model.stages[0]

        # Stage 1 grid, body mask C1 and the stage-1 network over C1.
        self._report("preprocess", 0.0, "resampling to the stage-1 grid")
        # Resample straight from the stored pixel type: no full-size float copy of the input.
        grid1 = preprocess.resample_to_spacing(image, s1.spacing, "linear", -1024.0, sitk.sitkFloat32)
        hu1 = self.to_tensor(grid1)
        c1 = preprocess.body_mask(hu1, model.body_threshold_hu)
        t["preprocess"] = time.perf_counter() - start
        stats["c1_fraction"] = float(c1.float().mean())
        if not bool(c1.any()):
            raise UserError(f"no body found: no voxel is above {model.body_threshold_hu:g} HU; is this a CT in "
                            "Hounsfield units?")
        self.check_cancel()
        t0 = time.perf_counter()
        self._report("stage1", 0.0, "stage 1")
        labels1 = self.predict_stage(0, hu1, c1, 0.0, "stage1", labels_only=True) * c1
        t["stage1"] = time.perf_counter() - t0
        stage1_img = _from_tensor(labels1, grid1)
        c1_img = _from_tensor(c1.to(torch.uint8), grid1)     # the body: no organ lies outside it

        conflicts: list[AtlasConflict] = []
        if self.stage1_only:
            final_grid, final = grid1, labels1
            probs = None
            c2_img = None
        else:
            # C2: stage-1 foreground on the stage-2 grid, dilated by r voxels.
            t0 = time.perf_counter()
            s2 = model.stages[1]
            ref2 = preprocess.grid_for_spacing(image, s2.spacing)
            fg1 = preprocess.resample(stage1_img, ref2, "nearest", 0, sitk.sitkUInt8)
            stage1_on_grid2 = self.to_tensor(fg1)       # stage 1's organs where stage 2 labels
            c2 = preprocess.dilate(stage1_on_grid2 > 0, model.dilation_radius)
            stats["c2_fraction"] = float(c2.float().mean())
            hu2 = preprocess.GridWindows(image, ref2, self.device)   # resampled only where stage 2 looks
            t["c2"] = time.perf_counter() - t0
            self.check_cancel()
            atlas = self._atlas_prior(image, ref2, t, stage1_img)        # GridPrior or None
            agreement = stats.get("atlas_prior_agreement")
            least = model.atlas_prior.min_scan_agreement if model.atlas_prior is not None else 0.0
            unanchored = atlas is not None and agreement is not None and agreement < least
            if unanchored:
                stats["atlas_prior_candidates"] = 0.0
                self._warn(f"atlas prior: no atlas's organs agree with the networks' (best Dice {agreement:.2f}, "
                           f"under {least:g}); their organs are not candidates, only their vote inside the "
                           "networks' candidates counts")
            elif atlas is not None and model.atlas_prior is not None and model.atlas_prior.candidates:
                # The atlases' organs are candidates too, dilated like stage 1's: stage 2 looks
                # wherever either puts an organ (an organ stage 1 missed is segmented by the
                # network, not copied from the atlases), and outside C2 the prior says background.
                c2 |= preprocess.dilate(atlas.labels() > 0, model.dilation_radius)
                stats["c2_fraction"] = float(c2.float().mean())
            t0 = time.perf_counter()
            self._report("stage2", 0.0, "stage 2")
            probs = None
            if self.keep_probabilities:
                probs = (self.predict_stage(1, hu2, c2, self.overlap, "stage2") if bool(c2.any())
                         else torch.zeros((model.labels.num_classes,) + tuple(c2.shape), device=self.device))
                final = (labels_over(probs, c2, atlas.fused_labels) if atlas is not None
                         else probs.argmax(0).to(torch.uint8) * c2)
            elif atlas is not None:
                # Fused box by box: the prior is interpolated over stage 2's boxes only, and no
                # K-channel volume of the grid is made.
                final = (self.predict_stage(1, hu2, c2, self.overlap, "stage2", labels_only=True,
                                            to_labels=atlas.fused_labels) if bool(c2.any())
                         else torch.zeros(c2.shape, dtype=torch.uint8, device=self.device))
            elif bool(c2.any()):
                final = self.predict_stage(1, hu2, c2, self.overlap, "stage2", labels_only=True) * c2
            else:
                final = torch.zeros(c2.shape, dtype=torch.uint8, device=self.device)
            if atlas is not None:
                # Inside C2 the fused label, outside it (where the network never looked) the prior's,
                # unless the atlases found no abdomen: background there.
                final = final * c2 if unanchored else torch.where(c2, final, atlas.labels())
                if probs is not None:                        # saved scores = what the labels came from
                    probs = atlas.fuse_into(probs, c2, prior_outside=not unanchored)
            # No organ lies outside the body mask C1, and the output drops anything there; drop it
            # before the steps that choose by counting voxels, or a piece in the air around the body
            # (the atlases' organs dilated past the skin into C2) can win as an organ's largest
            # piece and the real organ be lost with it (recipe, twenty-ninth round: s0011's aorta).
            # (C1 reaches stage 2's grid as it reaches the output: nearest, edge voxels extended)
            final = final * self.to_tensor(resample_labels_to(c1_img, ref2, edge=1)).bool()
            if atlas is not None:
                spec = model.atlas_prior
                if spec is not None and spec.mixup_share > 0:
                    final = atlas.relabel_mixups(final, spec.mixup_share,
                                                 [model.labels.by_name(o).value for o in spec.mixup_organs],
                                                 stage1_on_grid2)
            if self.largest_component_values:
                final = keep_largest_components(final, self.largest_component_values,
                                                atlas.plausible if atlas is not None else None,
                                                stage1_on_grid2 if atlas is not None else None)
            if atlas is not None:
                if per_organ_check(agreement):
                    conflicts = atlas_conflicts(final, atlas, model.labels, slab=bool(stats.get("atlas_prior_slab")))
                else:
                    stats["atlas_check_per_organ"] = 0.0     # the report says why nothing is listed
                for conflict in conflicts:
                    if conflict.flagged:
                        self._warn(conflict.message())
            atlas = None                                     # the prior is not needed any more
            t["stage2"] = time.perf_counter() - t0
            final_grid = ref2
            c2_img = _from_tensor(c2.to(torch.uint8), ref2) if self.keep_candidates else None

        # Back to the input grid (nearest neighbour for labels).
        self.check_cancel()
        t0 = time.perf_counter()
        self._report("postprocess", 0.0, "resampling labels to the input grid")
        # C2's dilation reaches past the skin; no organ lies outside the body mask C1.
        labels = resample_labels_to(_from_tensor(final, final_grid), image, mask=c1_img, edge=1)
        # The scan as a whole, in the ml the report's organ table gives (the input's voxels).
        whole = scan_conflict(stats.get("atlas_prior_agreement"), sitk.GetArrayViewFromImage(labels),
                              float(np.prod(image.GetSpacing())) / 1000.0)
        if whole is not None:
            conflicts.insert(0, whole)
            self._warn(whole.message())
        result = SegmentationResult(labels=labels, timings=t, stats=stats, atlas_conflicts=conflicts)
        if self.keep_stage1 or self.stage1_only:
            result.stage1_labels = labels if self.stage1_only else resample_labels_to(stage1_img, image, edge=1)
        if self.keep_candidates:
            result.c1 = resample_labels_to(c1_img, image, edge=1)
            if c2_img is not None:
                result.c2 = resample_labels_to(c2_img, image, edge=1)
        if self.keep_probabilities:
            if probs is None:
                raise UserError("probabilities are only kept for two-stage runs; drop --stage1-only")
            result.probabilities = resample_probabilities_to(probs, final_grid, image)
        t["postprocess"] = time.perf_counter() - t0
        t["total"] = time.perf_counter() - start
        self._report("done", 1.0, "done")
        return result


#: a piece of an organ is chosen by stage 1's agreement (`keep_largest_components`) only where its
#: allowed voxels reach this share of the largest piece's: the two livers it was made for measured
#: 57,911 and 56,888 voxels; a weak stage 1 kept an 81-voxel aorta over the 1,332-voxel one
COMPARABLE_PIECE_SHARE = 0.5


def keep_largest_components(labels: torch.Tensor, values: list[int],
                            plausible: Callable[[int, np.ndarray], np.ndarray] | None = None,
                            evidence: torch.Tensor | None = None) -> torch.Tensor:
    """Keep only the largest 26-connected component of each label in `values` (rest: background).

    With `plausible(value, index)` (the atlas prior's veto, `GridPrior.plausible`), a component
    is measured by its voxels where the atlases allow the organ: a large piece far from every
    atlas (a spleen in the pelvis) loses to the organ where the atlases put it. With `evidence`
    too (stage 1's labels on the same grid), only those of them that stage 1 also gives the
    organ count, among the pieces at least `COMPARABLE_PIECE_SHARE` of the largest allowed one:
    where misplaced atlases put a second liver into the chest of a scan that shows the upper
    abdomen, the piece the network found as well wins, but a speck of aorta a weak stage 1 found
    does not beat the aorta it missed. Where no such piece has such voxels, the plausible ones
    decide, and where none is plausible at all, plain size, as without atlases.
    """
    from scipy import ndimage

    arr = labels.cpu().numpy()
    out = arr.copy()
    evidence_arr = evidence.cpu().numpy() if evidence is not None else None
    structure = np.ones((3, 3, 3), bool)
    boxes = ndimage.find_objects(arr, max_label=max(values, default=0))  # one pass for every label
    for value in sorted(set(values)):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        mask = arr[box] == value
        comp, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            if plausible is not None:
                where = np.argwhere(comp > 0)
                allowed = plausible(value, where + np.array([s.start for s in box]))
                scores = np.bincount(comp[tuple(where[allowed].T)], minlength=n + 1)
                if evidence_arr is not None:
                    found = allowed & (evidence_arr[box][comp > 0] == value)   # the order of `where`
                    agreed = np.bincount(comp[tuple(where[found].T)], minlength=n + 1)
                    # stage 1 chooses only among pieces of comparable size: a speck it also found
                    # must not beat the organ's body it missed (a weak stage 1)
                    agreed[scores < COMPARABLE_PIECE_SHARE * scores.max()] = 0
                    scores = agreed if agreed.max() > 0 else scores
                if scores.max() > 0:
                    sizes = scores
            out[box][(comp > 0) & (comp != int(sizes.argmax()))] = 0
    return torch.from_numpy(out).to(labels.device)


def _from_tensor(t: torch.Tensor, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(t.cpu().numpy())
    img.CopyInformation(reference)
    return img


def resample_labels_to(labels: sitk.Image, reference: sitk.Image, mask: sitk.Image | None = None,
                       edge: int = 0) -> sitk.Image:
    """Nearest-neighbour resampling of a label map onto `reference`'s exact grid; with `mask`
    (a binary map on any grid), voxels whose nearest mask voxel is 0 become background.

    When the grids share their axes, up to flips (the case for the cascade's model grids unless
    the input's axes are permuted), nearest neighbour is separable: one index gather per axis,
    done only over the labels' bounding box. Otherwise only the foreground's bounding
    box is resampled by SimpleITK.

    `edge=1` is for model grids from `grid_for_spacing`, which cover their input only up to
    half a model voxel at the far end (the voxel count is rounded): their edge voxels reach one
    voxel further, or the last millimetres of a scan (the top of the liver) came back empty.
    """
    arr = _separable_nearest(labels, reference, mask, edge)
    if arr is None:
        arr = _boxed_nearest(labels, reference)
        if mask is not None:
            arr *= _boxed_nearest(mask, reference) != 0
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def _index_maps(src: sitk.Image, reference: sitk.Image, edge: int = 0) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per axis (x, y, z): the source index nearest to each reference index, and whether it is
    inside the source; None unless each axis of one grid is an axis of the other, same order,
    possibly flipped (the model grids are the input's axes flipped into the model orientation).
    `edge`: how many voxels past its border the source's edge voxels reach."""
    indices = axis_aligned_indices(src, reference)
    if indices is None:
        return None
    maps = []
    for j, n_src in zip(indices, src.GetSize()):
        idx = np.floor(j + 0.5).astype(np.int64)
        maps.append((np.clip(idx, 0, n_src - 1), (idx >= -edge) & (idx < n_src + edge)))
    return maps


def _separable_nearest(labels: sitk.Image, reference: sitk.Image, mask: sitk.Image | None = None,
                       edge: int = 0) -> np.ndarray | None:
    maps = _index_maps(labels, reference, edge)
    mask_maps = _index_maps(mask, reference, edge) if mask is not None else None
    if maps is None or (mask is not None and mask_maps is None):
        return None
    src = np.asarray(sitk.GetArrayViewFromImage(labels))
    out = np.zeros(reference.GetSize()[::-1], dtype=src.dtype)
    box = preprocess.bounding_box(src != 0)   # (z, y, x) ranges on the source grid
    if box is None:
        return out
    # Reference indices whose nearest source voxel lies in the box: one contiguous range per
    # axis, since the index maps are monotone.
    ranges = []
    for axis in range(3):
        idx, ok = maps[axis]
        lo, hi = box[2 - axis]
        hit = np.flatnonzero(ok & (idx >= lo) & (idx < hi))
        ranges.append((int(hit[0]), int(hit[-1]) + 1))
    block = _gather(src, maps, ranges)
    if mask is not None and mask_maps is not None:
        block *= _gather(np.asarray(sitk.GetArrayViewFromImage(mask)), mask_maps, ranges) != 0
    (x0, x1), (y0, y1), (z0, z1) = ranges
    out[z0:z1, y0:y1, x0:x1] = block
    return out


def _gather(src: np.ndarray, maps: list[tuple[np.ndarray, np.ndarray]], ranges: list[tuple[int, int]]) -> np.ndarray:
    """src's nearest voxels for the reference block `ranges` (x, y, z); 0 outside the source."""
    bad_planes = []
    for axis in range(3):  # numpy's take copies whole rows/planes (torch's is slow on uint8)
        idx, ok = maps[axis]
        lo, hi = ranges[axis]
        dim = 2 - axis
        src = np.take(src, np.clip(idx[lo:hi], 0, src.shape[dim] - 1), axis=dim)
        bad_planes.append((dim, ~ok[lo:hi]))
    for dim, bad in bad_planes:
        if bad.any():
            index: list[slice | np.ndarray] = [slice(None)] * 3
            index[dim] = bad
            src[tuple(index)] = 0
    return src


def _reference_box(source: sitk.Image, box: list[tuple[int, int]], reference: sitk.Image) -> sitk.Image | None:
    """An empty sub-grid of `reference` covering `box` (z, y, x index ranges) of `source`."""
    corners = []
    for cz in box[0]:
        for cy in box[1]:
            for cx in box[2]:
                pt = source.TransformContinuousIndexToPhysicalPoint((cx - 0.5, cy - 0.5, cz - 0.5))
                corners.append(reference.TransformPhysicalPointToContinuousIndex(pt))
    c = np.array(corners)
    lo = np.maximum(np.floor(c.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(c.max(0)).astype(int) + 2, np.array(reference.GetSize()))
    if not np.all(hi > lo):
        return None
    return preprocess.subgrid(reference, lo, hi - lo)


def _boxed_nearest(labels: sitk.Image, reference: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(labels)
    out = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    box = preprocess.bounding_box(torch.from_numpy(np.asarray(arr) > 0), pad=1, shape=arr.shape)
    sub = _reference_box(labels, box, reference) if box is not None else None
    if sub is not None:
        lo = np.array(reference.TransformPhysicalPointToIndex(sub.GetOrigin()))
        hi = lo + np.array(sub.GetSize())
        res = sitk.Resample(labels, sub, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = sitk.GetArrayViewFromImage(res)
    return out


def resample_probabilities_to(probs: torch.Tensor, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Class probabilities (K, z, y, x) on a model grid -> linear interpolation on the input grid.

    Only the box where any organ has a score is returned (same spacing and direction as the
    input, origin at the box's first voxel), since everything outside it is background: a
    full-size float copy per class would dwarf the CT itself.
    """
    covered = probs[1:].sum(0) > 0          # any organ score: a prior's background alone spans the grid
    box = preprocess.bounding_box(covered, pad=1, shape=tuple(covered.shape))
    arr = probs.permute(1, 2, 3, 0).contiguous().cpu().numpy()
    pimg = sitk.GetImageFromArray(arr, isVector=True)
    pimg.CopyInformation(grid)
    sub = _reference_box(grid, box, reference) if box is not None else None
    if sub is None:
        sub = preprocess.subgrid(reference, (0, 0, 0), (1, 1, 1))
    return sitk.Resample(pimg, sub, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
