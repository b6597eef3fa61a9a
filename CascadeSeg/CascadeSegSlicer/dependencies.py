"""Python packages the engine needs inside Slicer: check (with versions), and install only when asked.

Nothing here installs at import time, and nothing is imported to check it: versions come
from the installed distributions' metadata, so a check never loads torch into Slicer. The
widget calls `missing_packages()` on first use and `install_missing()` after the user confirmed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable
from typing import Any

from .i18n import tr as _

#: import name -> pip requirement: the one list the module checks and installs (pyproject.toml's
#: [project] dependencies say the same; a test keeps the two equal)
REQUIRED = {"torch": "torch>=2.1", "SimpleITK": "SimpleITK>=2.3", "scipy": "scipy>=1.10",
            "numpy": "numpy>=1.24", "tqdm": "tqdm>=4.60"}


def version_tuple(text: str) -> tuple[int, ...]:
    """The release numbers of a version: '2.1.0+cu121' -> (2, 1, 0), '2.0.0rc1' -> (2, 0, 0)."""
    parts = []
    for piece in re.split(r"[.+]", text.strip()):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def split_requirement(requirement: str) -> tuple[str, str]:
    """'torch>=2.1' -> ('torch', '2.1'): a distribution name and its minimum version (or '')."""
    name, _sep, minimum = requirement.partition(">=")
    return name.strip(), minimum.strip()


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, from its metadata (None: not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(required: dict[str, str] = REQUIRED,
                       version_of: Callable[[str], str | None] = installed_version) -> dict[str, str | None]:
    """Import name -> the version found (None: not installed) for each requirement not met."""
    unmet: dict[str, str | None] = {}
    for name, requirement in required.items():
        distribution, minimum = split_requirement(requirement)
        found = version_of(distribution) if importlib.util.find_spec(name) is not None else None
        if found is None or (minimum and version_tuple(found) < version_tuple(minimum)):
            unmet[name] = found
    return unmet


def missing_packages(required: dict[str, str] = REQUIRED,
                     version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """Import names from `required` that are missing or too old (plus CascadeSegLib itself)."""
    missing = list(unmet_requirements(required, version_of))
    if importlib.util.find_spec("CascadeSegLib") is None:
        missing.append("CascadeSegLib")
    return missing


def requirements_message(missing: list[str], required: dict[str, str] = REQUIRED,
                         version_of: Callable[[str], str | None] = installed_version) -> str:
    """One line naming what to install: 'CascadeSeg needs torch>=2.1 (1.13.1 is installed), ...'."""
    if "CascadeSegLib" in missing:
        return _("CascadeSeg's engine (CascadeSegLib) is missing: reinstall CascadeSeg from the Extensions Manager")
    parts = []
    for name in missing:
        found = version_of(split_requirement(required[name])[0])
        parts.append(_("{requirement} ({version} is installed)").format(requirement=required[name], version=found)
                     if found else _("{requirement} (not installed)").format(requirement=required[name]))
    return _("CascadeSeg needs {packages}: install {requirements}").format(
        packages=", ".join(parts), requirements=" ".join(required[n] for n in missing))


def install_missing(missing: list[str], pip_install: Callable[[str], Any],
                    pytorch_logic: Any = None, progress: Callable[[str], None] | None = None) -> None:
    """Install (or upgrade) `missing` with Slicer's pip; torch through PyTorch Utils when it is present.

    PyTorch Utils picks the CUDA build that matches the driver, which plain pip does not.
    """
    for name in missing:
        if name == "CascadeSegLib":
            raise RuntimeError("the CascadeSegLib library is missing from the extension; reinstall "
                               "CascadeSeg from the Extensions Manager")
        if progress:
            progress(_("Installing {requirement} (this can take a few minutes)...").format(requirement=REQUIRED[name]))
        if name == "torch" and pytorch_logic is not None:
            pytorch_logic.installTorch(askConfirmation=False,
                                       torchVersionRequirement=">=" + split_requirement(REQUIRED[name])[1])
        else:
            pip_install(REQUIRED[name])


def device_summary(found: dict[str, str | None]) -> str:
    """One line for the panel from `cascadeseg devices --json`: what 'auto' will use."""
    if not found.get("torch"):
        return _("torch is not installed yet: Segment offers to install it")
    if found.get("cuda"):
        return _("auto uses the GPU: {name}").format(name=found["cuda"])
    if found.get("mps"):
        return _("auto uses the {name}").format(name=found["mps"])
    return _("no GPU found: auto uses the CPU (a few minutes per CT)")
