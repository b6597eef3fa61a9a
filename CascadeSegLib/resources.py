"""Where the shared resources (labels, catalog, sample data, bundled models) live."""

from __future__ import annotations

import os
from pathlib import Path

#: the model `segment` and the Slicer module use when none is named (one place; no torch import here)
DEFAULT_MODEL = "abdomen-ct"


def resources_dir() -> Path:
    """The top-level `Resources/` folder (override with CASCADESEG_RESOURCES)."""
    env = os.environ.get("CASCADESEG_RESOURCES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources"


def sample_ct() -> Path:
    return resources_dir() / "SampleData" / "abdomen_ct_3mm.nii.gz"


def models_dir() -> Path:
    """Where installed models go (override with CASCADESEG_MODELS)."""
    env = os.environ.get("CASCADESEG_MODELS")
    if env:
        return Path(env)
    return Path.home() / ".cascadeseg" / "models"


def bundled_models_dir() -> Path:
    return resources_dir() / "Models"
