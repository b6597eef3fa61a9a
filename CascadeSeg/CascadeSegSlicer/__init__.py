"""Slicer side of CascadeSeg: parameters, process wrapper, MRML logic and widget controller.

Only `widget.py` needs Qt; everything else runs with slicer-core (MRML without the app), so
the logic is tested headless with pytest.
"""

#: every submodule, each after the submodules it imports, so that reloading them in this order
#: leaves no module holding a class of an older copy (the module panel's Reload)
SUBMODULES = ("i18n", "parameters", "process", "worker", "runs", "background", "dependencies", "models", "headless",
              "logic", "parameter_node", "training", "training_widget", "widget")


def reload_submodules() -> list:
    """Reload the submodules already imported, in dependency order; their names."""
    import importlib
    import sys

    reloaded = []
    for name in SUBMODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            importlib.reload(module)
            reloaded.append(name)
    return reloaded
