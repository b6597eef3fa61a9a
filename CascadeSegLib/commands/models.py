"""`cascadeseg models list|install|verify`: see, fetch and check model packages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `models` command and its sub-commands to the top-level parser."""
    p = subparsers.add_parser(
        "models", help="list, install and verify model packages",
        description="List installed and catalog models, install one (from the catalog, a URL "
                    "or a .zip), or verify a package's weights against their sha256.")
    sub = p.add_subparsers(dest="models_command", metavar="{list,install,verify}")
    sub.required = True

    q = sub.add_parser("list", help="installed, bundled and catalog models")
    q.add_argument("--models-dir", type=Path, default=None,
                   help="where installed models live (default: $CASCADESEG_MODELS or "
                        "~/.cascadeseg/models)")
    q.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("install", help="install a model (catalog name, https URL or .zip)")
    q.add_argument("source", metavar="SOURCE",
                   help="a catalog model name, an https:// URL of a model zip, or a local .zip")
    q.add_argument("--sha256", default=None,
                   help="expected sha256 of the zip (taken from the catalog for catalog names)")
    q.add_argument("--models-dir", type=Path, default=None,
                   help="install here (default: $CASCADESEG_MODELS or ~/.cascadeseg/models)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an installed model of the same name and version")
    q.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    q.add_argument("--progress-json", action="store_true",
                   help="one JSON event per line on stdout: download progress, then done (the Slicer module)")
    q.set_defaults(func=cmd_install)

    q = sub.add_parser("verify", help="check a model's weight files against model.json")
    q.add_argument("model", metavar="NAME_OR_PATH",
                   help="an installed or bundled model name, a model folder or a model .zip")
    q.set_defaults(func=cmd_verify)


def model_rows(models_root: Path | None = None) -> list[dict[str, Any]]:
    """Installed and bundled models, then catalog models not installed in that version."""
    from ..packaging.catalog import installed_models, load_catalog

    rows: list[dict[str, Any]] = []
    have: set[tuple[str, str]] = set()
    for m in installed_models(models_root):
        rows.append({"name": m.name, "version": m.version, "source": m.source,
                     "labels": len(m.labels), "installed": True, "path": str(m.path),
                     "description": m.description})
        have.add((m.name, m.version))
    for e in load_catalog():
        if (e.name, e.version) in have:
            continue
        rows.append({"name": e.name, "version": e.version, "source": "catalog",
                     "labels": len(e.labels), "installed": False, "path": None,
                     "description": e.description})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["NAME", "VERSION", "SOURCE", "LABELS", "INSTALLED"]
    body = [[r["name"], r["version"], r["source"], str(r["labels"]),
             "yes" if r["installed"] else "no"] for r in rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header] + body]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    rows = model_rows(args.models_dir)
    if args.json:
        print(json.dumps(rows))
    elif rows:
        print(format_table(rows))
    else:
        print("no models installed and the catalog is empty")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    if getattr(args, "progress_json", False):
        return install_json(args)
    from tqdm import tqdm

    from ..packaging.catalog import read_model_json
    from ..packaging.download import install_model
    from ..resources import bundled_models_dir

    bar: tqdm | None = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, desc="download", leave=False)
        if total is not None and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        path = install_model(args.source, models_dir=args.models_dir, sha256=args.sha256,
                             progress=progress, overwrite=args.overwrite, timeout=args.timeout)
    finally:
        if bar is not None:
            bar.close()
    meta = read_model_json(path)
    if path.resolve().parent == bundled_models_dir().resolve():
        print(f"{meta.get('name')} {meta.get('version')} is bundled with CascadeSeg in {path}; "
              "nothing to install")
    else:
        print(f"installed {meta.get('name')} {meta.get('version')} in {path}")
    return 0


def install_json(args: argparse.Namespace) -> int:
    """`models install --progress-json`: progress events while downloading, then one `done` event."""
    import time

    from ..packaging.catalog import read_model_json
    from ..packaging.download import install_model
    from ..progress import JsonProgress

    events = JsonProgress()
    last = [-1.0, 0.0]  # fraction and time of the last event: at most one per percent or half second

    def progress(done: int, total: int | None) -> None:
        fraction, now = (min(done / total, 1.0) if total else 0.0), time.monotonic()
        if fraction - last[0] >= 0.01 or now - last[1] >= 0.5:
            last[:] = [fraction, now]
            size = f"{done / 1e6:.1f}" + (f" of {total / 1e6:.1f}" if total else "") + " MB"
            events("download", fraction, size)

    path = install_model(args.source, models_dir=args.models_dir, sha256=args.sha256,
                         progress=progress, overwrite=args.overwrite, timeout=args.timeout)
    meta = read_model_json(path)
    events.emit("done", model=meta.get("name"), version=meta.get("version"), path=str(path))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..packaging.model import ModelPackage, find_model

    path = find_model(args.model)
    pkg = ModelPackage.load(path)
    digests = pkg.verify() or {s.weights: s.sha256 for s in getattr(pkg, "stages", [])}
    if not digests:
        raise ModelError(f"model {pkg.name} lists no weight files; re-export the model")
    print(f"OK {pkg.name} {pkg.version} ({pkg.root})")
    for fname, digest in digests.items():
        print(f"  {fname}  sha256 {digest}")
    return 0
