"""Python packages the engine needs inside Slicer: check, and install only when asked.

Nothing here installs at import time; the widget calls `missing_packages()` on first use and
`install_missing()` after the user confirmed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

# import name -> pip requirement
REQUIRED = {"torch": "torch>=2.1", "SimpleITK": "SimpleITK>=2.3", "scipy": "scipy>=1.10",
            "numpy": "numpy>=1.24", "tqdm": "tqdm>=4.60"}


def missing_packages(required: dict[str, str] = REQUIRED) -> list[str]:
    """Import names from `required` that cannot be imported (plus CascadeSegLib itself)."""
    missing = [name for name in required if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("CascadeSegLib") is None:
        missing.append("CascadeSegLib")
    return missing


def install_missing(missing: list[str], pip_install: Callable[[str], Any],
                    pytorch_logic: Any = None, progress: Callable[[str], None] | None = None) -> None:
    """Install `missing` with Slicer's pip; torch through PyTorch Utils when it is present.

    PyTorch Utils picks the CUDA build that matches the driver, which plain pip does not.
    """
    for name in missing:
        if name == "CascadeSegLib":
            raise RuntimeError("the CascadeSegLib library is missing from the extension; reinstall "
                               "CascadeSeg from the Extensions Manager")
        if progress:
            progress(f"Installing {name} (this can take a few minutes)...")
        if name == "torch" and pytorch_logic is not None:
            pytorch_logic.installTorch(askConfirmation=False)
        else:
            pip_install(REQUIRED[name])


def detect_devices() -> dict[str, str | None]:
    """What `--device auto` would find: {'cuda': GPU name or None, 'mps': 'Apple GPU' or None}."""
    found: dict[str, str | None] = {"cuda": None, "mps": None}
    if importlib.util.find_spec("torch") is None:
        return found
    import torch

    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found["mps"] = "Apple GPU (MPS)"
    return found


def device_summary(found: dict[str, str | None]) -> str:
    """One line for the panel: what 'auto' will use."""
    if found.get("cuda"):
        return f"auto uses the GPU: {found['cuda']}"
    if found.get("mps"):
        return f"auto uses the {found['mps']}"
    return "no GPU found: auto uses the CPU (a few minutes per CT)"
