"""The run folder: its `config.json` (one config per folder, checked on resume) and the model
package exported from its best checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import UserError
from . import checkpoint as ckpt
from .config import RunConfig
from .dataset import discover_cases, read_split


def _dump_config(cfg: RunConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"config": cfg.raw, "base_dir": str(cfg.base_dir.resolve()), **(extra or {})}


def _read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's config.json, or one line saying it is damaged (a disk that filled up, an edit)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "config" not in data:
            raise ValueError("no 'config' entry")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); restore it from a copy, or start the run again in a new "
                        "--run-dir") from None


def prepare_run_dir(cfg: RunConfig, run_dir: Path, extra: dict[str, Any] | None = None,
                    overwrite: bool = False) -> None:
    """Create the run folder, or check that an existing one belongs to the same config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    new = _dump_config(cfg, extra)
    if path.is_file() and not overwrite:
        old = _read_run_json(path)
        if old.get("config") != new["config"]:
            raise UserError(f"{run_dir} holds a run of a different config; pass another --run-dir, or "
                            "--overwrite to start over there")
        return
    if overwrite:
        import shutil

        for sub in [run_dir / s.name for s in cfg.stages] + [run_dir / "model"]:
            shutil.rmtree(sub, ignore_errors=True)
    atomic_write(path, json.dumps(new, indent=2) + "\n")


def load_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    from .config import parse_config

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run folder (no config.json)")
    data = _read_run_json(path)
    raw = data["config"]
    if isinstance(raw, dict) and "three_view" in raw:
        raise UserError(f"{run_dir} is a 2D three-view baseline run (cascadeseg baseline2d), not a cascade run")
    return parse_config(raw, data.get("base_dir", ".")), data


def export_run(run_dir: str | Path, out: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the run's best weights as a model package folder (or .zip when `out` ends in .zip)."""
    from ..packaging.model import ModelPackage, StageSpec

    run_dir = Path(run_dir)
    cfg, meta = load_run_config(run_dir)
    states, specs, metrics = [], [], {}
    for stage in cfg.stages:
        folder = run_dir / stage.name
        try:
            best = ckpt.load_checkpoint(folder / "best.pt")
        except ckpt.CheckpointError as exc:
            raise UserError(f"{run_dir}: stage {stage.name} has no usable best.pt ({exc}); train it first") from None
        states.append(best["model"])
        specs.append(StageSpec(stage.name, stage.spacing, stage.tile, stage.network, f"{stage.name}.pt"))
        done = folder / "done.json"
        metrics[stage.name] = {"best_iteration": best.get("iteration"), "val_dice": best.get("val_dice", {}),
                               **({"done": json.loads(done.read_text(encoding="utf-8"))} if done.is_file() else {})}
    card = dict(cfg.model_card)
    prov: dict[str, Any] = {"trained_on": card.pop("trained_on", None) or _training_split_names(cfg),
                            "command": card.pop("command", None) or "cascadeseg train CONFIG",
                            "training": {s.name: {"spacing": list(s.spacing), "patch": list(s.patch),
                                                  **asdict(s.train), "augment": s.augment.to_json()}
                                         for s in cfg.stages},
                            "metrics": metrics}
    if meta.get("finetuned_from"):
        prov["finetuned_from"] = meta["finetuned_from"]
    prov.update(card)
    prov.update(provenance or {})
    atlas_prior, atlas_files = None, None
    if meta.get("atlas_prior_from"):          # fine-tuned from a model with atlases: they come along
        base = ModelPackage.load(run_dir / meta["atlas_prior_from"])
        atlas_prior, atlas_files = base.atlas_prior, base.root
    pkg = ModelPackage(name=cfg.name, version=cfg.version, labels=cfg.label_set(), stages=specs, window=cfg.window,
                       normalization=cfg.normalization, body_threshold_hu=cfg.body_threshold_hu,
                       dilation_radius=cfg.dilation_radius, description=cfg.description, license=cfg.license,
                       provenance=prov,
                       largest_component=list((cfg.raw.get("postprocess") or {}).get("largest_component", [])),
                       atlas_prior=atlas_prior)
    out = Path(out)
    if out.suffix.lower() == ".zip":
        import tempfile
        import zipfile

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            pkg.save(tmp, states, files_from=atlas_files)
            part = out.with_name(f".{out.name}.part")
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in sorted(Path(tmp).rglob("*")):
                    if p.is_file():
                        zf.write(p, p.relative_to(tmp).as_posix())
            part.replace(out)
        return out
    pkg.save(out, states, files_from=atlas_files)
    return out


def _training_split_names(cfg: RunConfig) -> list[str]:
    """Names of the cases the config trains on (its split's train list; validation cases are not)."""
    try:
        cases, _ = discover_cases(cfg.data, cfg.resolve)
        train, _ = read_split(cfg.data, cfg.resolve, cases)
    except UserError:   # data no longer where the config says: name what the config lists
        return [str(c.get("name", c.get("image"))) for c in cfg.data.get("cases", [])]
    return [c.name for c in train]
