"""Shared helpers of the training tests: phantom cases on disk and small configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import SimpleITK as sitk

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")


def write_phantom_cases(folder: Path, seeds: Sequence[int], size=(48, 40, 32), spacing=(6.0, 6.0, 6.0),
                        organs: Sequence[str] = ORGANS) -> list[dict[str, str]]:
    from CascadeSegLib.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed in seeds:
        ct, lab = make_phantom(size=size, spacing=spacing, organs=organs, seed=seed)
        img_path, lab_path = folder / f"ph{seed}.nii.gz", folder / f"ph{seed}_seg.nii.gz"
        sitk.WriteImage(ct, str(img_path))
        sitk.WriteImage(lab, str(lab_path))
        cases.append({"name": f"ph{seed}", "image": str(img_path), "label": str(lab_path)})
    return cases


def small_config(cases: list[dict[str, str]], train: Sequence[str], val: Sequence[str], iterations: int = 4,
                 organs: Sequence[str] = ORGANS, patch=(24, 24, 24), spacing=(6.0, 6.0, 6.0), base: int = 4,
                 norm: str = "batch", **train_overrides: Any) -> dict[str, Any]:
    return {
        "name": "phantom-test", "labels": list(organs),
        "data": {"cases": cases, "split": {"train": list(train), "val": list(val)}},
        "intensity": {"window": [-200, 300], "normalization": "window01"},
        "train": {"iterations": iterations, "batch_size": 2, "optimizer": "adamw", "lr": 3e-3,
                  "checkpoint_every": 2, "val_every": max(2, iterations), "seed": 0, "device": "cpu", "threads": 1,
                  **train_overrides},
        "augment": {"enabled": False},
        "stages": [{"name": "stage1", "spacing": list(spacing), "tile": [48, 40, 32], "patch": list(patch),
                    "network": {"kind": "padded", "base_channels": base, "depth": 3, "norm": norm}}],
    }
