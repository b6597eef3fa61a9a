"""Memory estimates, so a huge CT is refused with a number instead of killed by the OOM killer.

The cascade holds the input as stored (e.g. int16), float32 copies on the two model grids, the
class probabilities on those grids and uint8 label maps on the input grid. `estimate_peak_bytes`
adds these up per phase from the image *header* (size, spacing, pixel type), so the check runs
before a single voxel is read. The bytes-per-voxel factors below were measured with
`benchmarks/memory_estimate.py` and round up; the estimate is meant to be an upper bound.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

GIB = 1 << 30
#: RSS of the interpreter with torch, SimpleITK, scipy and CascadeSegLib imported (measured
#: ~330 MB; rounded up for allocator slack and thread stacks).
BASE_BYTES = 450 * (1 << 20)
#: Fraction of the available memory a run may plan to use (the rest: page cache, other programs,
#: estimate error).
USABLE_FRACTION = 0.85

_PIXEL_BYTES = {
    "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8,
    "int64": 8, "float32": 4, "float64": 8, "float": 4, "double": 8,
}


def pixel_bytes(pixel_type: Any) -> int:
    """Bytes of one component of a voxel: a SimpleITK pixel id, numpy dtype or a name."""
    if isinstance(pixel_type, (int, np.integer)) and not isinstance(pixel_type, bool):
        import SimpleITK as sitk

        name = sitk.GetPixelIDValueAsString(int(pixel_type)).lower()
        for key, n in (("8-bit", 1), ("16-bit", 2), ("32-bit float", 4), ("64-bit float", 8),
                       ("32-bit", 4), ("64-bit", 8)):
            if key in name:
                return n * (2 if "complex" in name else 1)
        raise ValueError(f"unknown SimpleITK pixel id {pixel_type}")
    try:
        return int(np.dtype(pixel_type).itemsize)
    except TypeError:
        key = str(pixel_type).lower().replace(" ", "")
        if key in _PIXEL_BYTES:
            return _PIXEL_BYTES[key]
        raise ValueError(f"unknown pixel type {pixel_type!r}") from None


def grid_voxels(size_xyz: Sequence[int], spacing_xyz: Sequence[float], target_xyz: Sequence[float]) -> int:
    """Voxels of the model grid covering the image (same rounding as preprocess.grid_for_spacing)."""
    n = 1
    for size, s, t in zip(size_xyz, spacing_xyz, target_xyz):
        n *= max(1, int(round(int(size) * float(s) / float(t))))
    return n


def network_bytes(cfg: Any, tile_xyz: Sequence[int], batch_size: int) -> int:
    """Activations of one batch of tiles on the CPU (inference: only live tensors count).

    The decoder's top level holds the skip, the upsampled and the concatenated tensors and a
    convolution output at once: about 12 x base_channels floats per tile voxel.
    """
    vox = int(np.prod([int(t) for t in tile_xyz]))
    if getattr(cfg, "kind", "padded") == "padded":  # a candidate box may run as one larger tile
        from .tiling import DEFAULT_BOX_TILE_VOXELS

        vox = max(vox, DEFAULT_BOX_TILE_VOXELS)
    base = int(getattr(cfg, "base_channels", 32))
    weights = 4 * _parameter_count(cfg)
    return int(batch_size * vox * 4 * (12 * base + 4)) + 2 * weights


def _parameter_count(cfg: Any) -> int:
    depth, base = int(getattr(cfg, "depth", 4)), int(getattr(cfg, "base_channels", 32))
    cap = int(getattr(cfg, "max_channels", 512))
    total, cin = 0, int(getattr(cfg, "in_channels", 1))
    for level in range(depth):
        c = min(base * 2 ** level, cap)
        total += 27 * (cin * c + c * 2 * c)
        cin = 2 * c
    return 3 * total  # decoder ~ twice the encoder


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident memory of one `segment` run, with the phase that sets it."""

    total: int
    phase: str
    parts: dict[str, int]

    def describe(self) -> str:
        return f"about {format_bytes(self.total)} (peak in {self.phase})"


def estimate_memory(size_xyz: Sequence[int], pixel_type: Any, model: Any,
                    spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0), components: int = 1,
                    stage1_only: bool = False, overlap: float = 0.0, keep_probabilities: bool = False,
                    keep_candidates: bool = False, batch_size: int = 1, device: str = "cpu") -> MemoryEstimate:
    """Per-phase host-memory estimate of `Segmenter.segment` plus writing the outputs.

    Factors per voxel (bytes): stage grids hold the float32 resampled image (sitk + torch copy),
    the normalised and padded network input, K float32 probabilities, argmax (int64) and masks;
    the input grid holds the input itself plus ~4 uint8 label-map copies while resampling back
    and writing. On a GPU the network activations are not host memory.
    """
    n_in = int(np.prod([int(s) for s in size_xyz]))
    in_bytes = n_in * pixel_bytes(pixel_type) * max(1, int(components))
    k = int(model.labels.num_classes)
    stages = list(model.stages)
    n1 = grid_voxels(size_xyz, spacing_xyz, stages[0].spacing)
    two_stage = len(stages) > 1 and not stage1_only
    n2 = grid_voxels(size_xyz, spacing_xyz, stages[1].spacing) if two_stage else 0
    on_cpu = str(device).startswith("cpu")
    net1 = network_bytes(stages[0].network, stages[0].tile, batch_size) if on_cpu else 0
    net2 = network_bytes(stages[1].network, stages[1].tile, batch_size) if (two_stage and on_cpu) else 0

    stage1 = n1 * (34 + 4 * k) + net1
    left1 = n1 * 10  # grid1 + hu1 + c1 + stage-1 labels stay alive during stage 2
    stage2 = (n2 * (36 + 4 * k + (4 if overlap > 0 else 0)) + net2 + left1) if two_stage else 0
    # model-grid copy + the linear resampling onto (a box of) the input grid, float32 per class
    probs_out = (8 * k * n2 + 4 * k * n_in) if (keep_probabilities and two_stage) else 0
    final_grid = n2 if two_stage else n1
    post = n_in * (4 + (2 if keep_candidates else 0)) + final_grid * 10 + left1 + probs_out
    phases = {"stage 1": stage1, "stage 2": stage2, "writing the outputs": post}
    phase = max(phases, key=lambda p: phases[p])
    parts = {"base": BASE_BYTES, "input": in_bytes, **phases}
    return MemoryEstimate(total=BASE_BYTES + in_bytes + phases[phase], phase=phase, parts=parts)


def estimate_peak_bytes(size_xyz: Sequence[int], pixel_type: Any, model: Any, **kwargs: Any) -> int:
    """Peak resident bytes of segmenting an image of this size/type (see `estimate_memory`)."""
    return estimate_memory(size_xyz, pixel_type, model, **kwargs).total


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup (v2 or v1) memory limit, None if unlimited."""
    candidates = [(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
                  (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
                   Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))]
    for limit_path, usage_path in candidates:
        try:
            text = limit_path.read_text(encoding="utf-8").strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 1 << 60:  # v1 "unlimited"
                return None
            return max(0, limit - int(usage_path.read_text(encoding="utf-8").strip()))
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int:
    """Memory a new allocation can get without swapping or the OOM killer.

    /proc/meminfo MemAvailable (Linux), else free physical pages (os.sysconf); a container's
    cgroup limit caps either.
    """
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            avail = None
    if avail is None:  # pragma: no cover - e.g. Windows without psutil: do not block the run
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001
            return 1 << 62
    cg = _cgroup_available()
    return min(avail, cg) if cg is not None else avail


def format_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.1f} GB"
    return f"{n / (1 << 20):.0f} MB"


def check_memory(size_xyz: Sequence[int], pixel_type: Any, model: Any, available: int | None = None,
                 **kwargs: Any) -> MemoryEstimate:
    """Refuse (UserError, one line with the estimate and what to do) what would not fit in memory.

    `kwargs` go to `estimate_memory` (spacing_xyz, stage1_only, device, ...). Returns the estimate.
    """
    est = estimate_memory(size_xyz, pixel_type, model, **kwargs)
    avail = available_bytes() if available is None else int(available)
    if est.total > USABLE_FRACTION * avail:
        size = "x".join(str(int(s)) for s in size_xyz)
        hint = ""
        if not kwargs.get("stage1_only") and len(model.stages) > 1:
            quick = estimate_memory(size_xyz, pixel_type, model, **{**kwargs, "stage1_only": True})
            if quick.total <= USABLE_FRACTION * avail:
                hint = ", use --stage1-only"
        raise UserError(
            f"segmenting this {size} image needs {est.describe()} but only {format_bytes(avail)} of memory is "
            f"available; close other programs, crop the CT to the abdomen or resample it to a coarser spacing"
            f"{hint}, or run on a machine with more memory (--no-memory-check to try anyway)")
    return est


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a GPU (CUDA/MPS) out-of-memory error, whichever torch version raised it."""
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Give cached GPU blocks back after an OOM so the retry starts from a clean pool."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
