"""Checkpoints with sha256 sidecars: a damaged file is detected and an older one used.

`ckpt_0001200.pt` is written to a temporary file and renamed into place, then
`ckpt_0001200.pt.sha256` ("<hex>  <name>", sha256sum format) is written the same way. Loading
checks the digest first and unpickles with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write

log = logging.getLogger(__name__)


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> str:
    """Save `obj` at `path` plus a `.sha256` sidecar; returns the digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write(path, data, fsync=True)
    atomic_write(sidecar(path), f"{digest}  {path.name}\n", fsync=True)
    return digest


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class CheckpointError(Exception):
    pass


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint whose sha256 matches its sidecar; CheckpointError otherwise."""
    path = Path(path)
    side = sidecar(path)
    if not path.is_file() or not side.is_file():
        raise CheckpointError(f"{path.name}: file or sha256 sidecar missing")
    data = path.read_bytes()
    expected = side.read_text(encoding="utf-8").split()[0] if side.read_text(encoding="utf-8").split() else ""
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.lower():
        raise CheckpointError(f"{path.name}: sha256 {digest[:12]}... does not match its sidecar {expected[:12]}...")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path.name}: cannot be loaded ({type(exc).__name__})") from None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Iteration checkpoints in `folder`, newest first."""
    folder = Path(folder)
    return sorted(folder.glob("ckpt_*.pt"), reverse=True) if folder.is_dir() else []


def latest_valid(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes its sha256 check (damaged ones are skipped, with a warning)."""
    for path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None


def prune(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` iteration checkpoints."""
    if keep <= 0:
        return
    for path in list_checkpoints(folder)[keep:]:
        for p in (path, sidecar(path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
