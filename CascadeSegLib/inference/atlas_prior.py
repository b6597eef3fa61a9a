"""Anatomy from atlases: labelled CTs registered onto the patient, fused with the network.

A network trained on a handful of CTs knows texture but not where organs lie in a new patient;
registered atlases know where organs lie but not their exact borders. A model package may carry
atlases (`"atlas_prior"` in model.json). Each is registered onto the patient (affine on mutual
information, then diffeomorphic demons, both on soft-tissue HU at a coarse spacing, 8 mm), its label
map warped onto stage 2's grid, and the atlases averaged into a smoothed class prior. Inside C2
the label is argmax(w * p_network + (1 - w) * prior); outside C2 (where the network never
looked) it is the prior's argmax, so organs stage 1 missed are still found.

The rule and its weights were chosen on one leave-one-out fold (sample CT held out) and
reported on another (s0009 held out); see the bundled model's card.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from ..errors import ModelError
from . import preprocess

#: the finest grid the prior is built on (finer stage-2 grids get it interpolated)
PRIOR_SPACING_MM = 3.0


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
    min_extent_mm: float = 100.0         # shorter scans (slabs) are not registered: too little anatomy
    demons_iterations: int = 30

    def to_json(self) -> dict[str, Any]:
        return {"atlases": [a.to_json() for a in self.atlases], "spacing_mm": self.spacing_mm,
                "window_hu": list(self.window_hu), "network_weight": self.network_weight,
                "smoothing_mm": self.smoothing_mm, "min_extent_mm": self.min_extent_mm,
                "demons_iterations": self.demons_iterations}

    @staticmethod
    def from_json(d: dict[str, Any]) -> AtlasPriorSpec:
        lo, hi = (float(v) for v in d.get("window_hu", (-200.0, 300.0)))
        spec = AtlasPriorSpec(atlases=[AtlasSpec.from_json(a) for a in d["atlases"]],
                              spacing_mm=float(d.get("spacing_mm", 8.0)), window_hu=(lo, hi),
                              network_weight=float(d.get("network_weight", 0.5)),
                              smoothing_mm=float(d.get("smoothing_mm", 4.0)),
                              min_extent_mm=float(d.get("min_extent_mm", 100.0)),
                              demons_iterations=int(d.get("demons_iterations", 30)))
        if not spec.atlases:
            raise ValueError("atlas_prior lists no atlases")
        if not 0.0 <= spec.network_weight <= 1.0:
            raise ValueError(f"atlas_prior network_weight {spec.network_weight} is outside [0, 1]")
        if spec.spacing_mm <= 0 or hi <= lo:
            raise ValueError("atlas_prior needs spacing_mm > 0 and window_hu low < high")
        return spec

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
             fixed_soft: sitk.Image | None = None, threads: int = 0) -> sitk.Transform:
    """The transform mapping `fixed_ct`'s physical points into `moving_ct`: an affine on Mattes
    mutual information (3 levels), then fast symmetric demons on the affinely aligned images.
    `fixed_soft` reuses the fixed image's soft-tissue grid when several atlases are registered;
    `threads` > 0 caps SimpleITK's threads (for registrations running side by side)."""
    fixed = fixed_soft if fixed_soft is not None else soft_tissue(fixed_ct, spacing_mm, window_hu)
    moving = soft_tissue(moving_ct, spacing_mm, window_hu)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 200, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    if threads > 0:
        reg.SetNumberOfThreads(threads)
        demons.SetNumberOfThreads(threads)
    affine = reg.Execute(fixed, moving)
    aligned = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    demons.SetNumberOfIterations(demons_iterations)
    demons.SetStandardDeviations(2.0)
    displacement = demons.Execute(fixed, aligned)
    disp = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, disp])


def body_extent_mm(image: sitk.Image) -> float:
    """The scan's physical length along its slice axis (the axis a slab is short in)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    return float(min(n * s for n, s in zip(size, spacing)))


def atlas_prior(image: sitk.Image, grid: sitk.Image, spec: AtlasPriorSpec, root: Path, num_classes: int,
                device: torch.device,
                progress: Callable[[float, str], None] | None = None,
                check_cancel: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The smoothed class prior (K, z, y, x) on `grid` from the package's atlases registered onto
    `image`, rows summing to 1 (uniform where no atlas reaches), and per-atlas seconds."""
    fixed_soft = soft_tissue(image, spec.spacing_mm, spec.window_hu)
    shape = tuple(grid.GetSize()[::-1])
    counts = torch.zeros((num_classes,) + shape, dtype=torch.float32, device=device)
    covered = torch.zeros(shape, dtype=torch.float32, device=device)
    seconds: dict[str, float] = {}
    # Registrations of small coarse images use few threads well: two side by side, one thread
    # each, finish sooner than one after the other with all the cores.
    workers = max(1, min(2, len(spec.atlases), os.cpu_count() or 1))

    def warp(atlas: AtlasSpec) -> tuple[AtlasSpec, sitk.Image, float]:
        t0 = time.perf_counter()
        moving = _read(root / atlas.image, atlas.sha256.get(atlas.image, ""))
        labels = _read(root / atlas.labels, atlas.sha256.get(atlas.labels, ""))
        transform = register(image, moving, spec.spacing_mm, spec.window_hu, spec.demons_iterations, fixed_soft)
        # 255 marks voxels the atlas does not reach: such an atlas neither votes for an organ nor
        # for background there, so a short atlas never vetoes a longer one.
        warped = sitk.Resample(labels, grid, transform, sitk.sitkNearestNeighbor, 255, sitk.sitkUInt8)
        return atlas, warped, time.perf_counter() - t0

    if progress is not None:
        progress(0.0, f"registering {len(spec.atlases)} atlas(es)")
    # ITK's multi-threaded metric sums its samples in whatever order threads finish: with more
    # than one thread per registration the answer changes from run to run. One thread each,
    # and the registrations side by side, is both reproducible and faster.
    saved_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        _register_all(spec, warp, workers, num_classes, counts, covered, seconds, progress, check_cancel)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_threads)
    prior = torch.where(covered > 0, counts / covered.clamp(min=1), torch.full_like(counts, 1.0 / num_classes))
    prior = gaussian_smooth(prior, [spec.smoothing_mm / s for s in grid.GetSpacing()[::-1]])
    prior /= prior.sum(0, keepdim=True).clamp(min=1e-6)
    if progress is not None:
        progress(1.0, "atlases registered")
    return prior, seconds


def _register_all(spec: AtlasPriorSpec, warp: Callable[[AtlasSpec], tuple[AtlasSpec, sitk.Image, float]],
                  workers: int, num_classes: int, counts: torch.Tensor, covered: torch.Tensor,
                  seconds: dict[str, float], progress: Callable[[float, str], None] | None,
                  check_cancel: Callable[[], None] | None) -> None:
    """Register and warp every atlas (`workers` at a time) and add its votes to `counts`."""
    device = counts.device
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(warp, a) for a in spec.atlases]
        try:
            for done, future in enumerate(as_completed(pending), start=1):
                atlas, warped, took = future.result()
                arr = preprocess.to_device(sitk.GetArrayViewFromImage(warped), device).long()
                inside = arr != 255
                if bool((arr[inside] >= num_classes).any()):
                    raise ModelError(f"atlas {atlas.name} has label values outside 0..{num_classes - 1}; "
                                     "fix the package")
                counts.scatter_add_(0, torch.where(inside, arr, 0)[None], inside[None].float())
                covered += inside
                seconds[atlas.name] = took
                if progress is not None:
                    progress(done / len(spec.atlases), f"registered atlas {done}/{len(spec.atlases)} ({atlas.name})")
                if check_cancel is not None:
                    check_cancel()
        except BaseException:
            for future in pending:        # a cancel or an error: start no further registration
                future.cancel()
            raise


def resample_prior(prior: torch.Tensor, source: sitk.Image, target: sitk.Image) -> torch.Tensor:
    """The prior (K, z, y, x on `source`) interpolated linearly onto `target`'s grid; 0 outside."""
    img = sitk.GetImageFromArray(prior.permute(1, 2, 3, 0).contiguous().cpu().numpy(), isVector=True)
    img.CopyInformation(source)
    out = sitk.Resample(img, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
    arr = torch.from_numpy(sitk.GetArrayFromImage(out)).to(prior.device)
    return arr.permute(3, 0, 1, 2).contiguous()


def fused_scores(network: torch.Tensor, prior: torch.Tensor, c2: torch.Tensor, network_weight: float) -> torch.Tensor:
    """Class scores (K, z, y, x): the weighted mean of network and prior inside C2, the prior
    alone outside it (where the network never looked); their argmax is the label."""
    mixed = network_weight * network + (1.0 - network_weight) * prior
    return torch.where(c2[None], mixed, prior)


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


def _read(path: Path, sha256: str) -> sitk.Image:
    """An atlas image, read only after its bytes match the sha256 model.json records."""
    import hashlib

    if not path.is_file():
        raise ModelError(f"atlas file {path.name} is missing from {path.parent}; re-install the model")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256.lower():
        raise ModelError(f"atlas file {path.name} fails its sha256 check (got {digest[:12]}..., expected "
                         f"{sha256[:12] or 'nothing'}...); re-install the model")
    return sitk.ReadImage(str(path))
