"""The scripts in configs/ (not a package) imported as modules, for their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_config_script(name: str) -> ModuleType:
    """configs/`name`.py as a module, registered under `name` (dataclasses and pickling look it up)."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
