"""`cascadeseg devices`: which compute devices torch sees, and what `--device auto` uses.

The Slicer module runs `cascadeseg devices --json` in a child process so that torch is never
imported into Slicer's own process; the one JSON line is a `done` event like every other
command's result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("devices", help="show the compute devices and what --device auto uses",
                              description="Show the CUDA GPU and Apple MPS device torch can use, and the "
                                          "device `--device auto` picks.")
    p.add_argument("--json", action="store_true", help="one JSON line ({\"event\": \"done\", ...}) instead of text")
    p.set_defaults(func=cmd_devices)


def detect() -> dict[str, Any]:
    """{'torch': version or None, 'cuda': GPU name or None, 'mps': name or None, 'auto': device}."""
    found: dict[str, Any] = {"torch": None, "cuda": None, "mps": None, "auto": "cpu"}
    if importlib.util.find_spec("torch") is None:
        return found
    import torch

    from ..inference.cascade import resolve_device

    found["torch"] = torch.__version__
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.get_device_name(0)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found["mps"] = "Apple GPU (MPS)"
    found["auto"] = resolve_device("auto").type
    return found


def cmd_devices(args: argparse.Namespace) -> int:
    found = detect()
    if args.json:
        print(json.dumps({"event": "done", **found}), flush=True)
        return 0
    if found["torch"] is None:
        print("torch is not installed: no device can be used")
        return 0
    print(f"torch {found['torch']}")
    print(f"cuda: {found['cuda'] or 'not available'}")
    print(f"mps:  {found['mps'] or 'not available'}")
    print(f"--device auto uses: {found['auto']}")
    return 0
