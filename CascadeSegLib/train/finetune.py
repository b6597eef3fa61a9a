"""Fine-tuning / transfer learning (Roth et al. 2017; docs/method.md section 5).

Start from a model package: its stages (spacing, tile, network) and intensity settings are
kept, every weight is copied, and the 1x1x1 output layer is replaced when the label set
changes (rows of organs the old model knew by name are carried over, so background and
shared organs start trained). The learning rate is 10x smaller by default; the encoder can be
frozen.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..labels import LabelSet
from ..network import NetConfig, build_network
from .config import parse_config, read_config_file

_STAGE_OVERRIDES = {"name", "patch", "train", "augment"}
#: learning rate x this when a trained model is fine-tuned and the config does not say
DEFAULT_LR_FACTOR = 0.1
log = logging.getLogger(__name__)


def same_labels(a: LabelSet, b: LabelSet) -> bool:
    """Whether two label sets give the same names the same values: then the output layer and the
    atlases (labelled in those values) carry over unchanged."""
    return [(lab.value, lab.name) for lab in a] == [(lab.value, lab.name) for lab in b]


def merge_with_package(data: dict[str, Any], pkg, freeze_encoder: bool) -> dict[str, Any]:
    """The config with the package's stages, intensity window, body mask and dilation filled in."""
    data = copy.deepcopy(data)
    data.setdefault("labels", list(pkg.labels.names))
    data.setdefault("name", f"{pkg.name}-finetuned")
    own = {s.get("name"): s for s in data.get("stages", [])}
    stages = []
    for spec in pkg.stages:
        override = dict(own.pop(spec.name, {}))
        bad = set(override) - _STAGE_OVERRIDES
        if bad:
            raise UserError(f"stage {spec.name}: {sorted(bad)} come from the model when fine-tuning; remove them "
                            "from the config (only patch, train and augment may be set)")
        net = spec.network.to_json()
        net.pop("num_classes", None)
        stages.append({"name": spec.name, "spacing": list(spec.spacing), "tile": list(spec.tile), "network": net,
                       **{k: v for k, v in override.items() if k != "name"}})
    if own:
        raise UserError(f"the config names stage(s) {sorted(own)} that model {pkg.name} does not have "
                        f"({', '.join(s.name for s in pkg.stages)})")
    data["stages"] = stages
    data["intensity"] = {"window": list(pkg.window), "normalization": pkg.normalization}
    data["body_threshold_hu"] = pkg.body_threshold_hu
    data["dilation_radius"] = pkg.dilation_radius
    train = dict(data.get("train", {}))
    train["freeze_encoder"] = bool(freeze_encoder)
    data["train"] = train
    return data


def transfer_state(old_state: dict[str, torch.Tensor], old_labels: LabelSet, new_cfg: NetConfig,
                   new_labels: LabelSet, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for `new_cfg`: everything from `old_state`; a new output layer if the labels differ."""
    torch.manual_seed(seed)
    fresh = build_network(new_cfg).state_dict()
    out = {}
    for key, value in fresh.items():
        if key.startswith("head."):
            continue
        if key not in old_state or old_state[key].shape != value.shape:
            raise UserError(f"the model's weights do not fit its network config at {key}; re-export the model")
        out[key] = old_state[key].clone()
    if same_labels(old_labels, new_labels) and old_state["head.weight"].shape == fresh["head.weight"].shape:
        out["head.weight"] = old_state["head.weight"].clone()
        out["head.bias"] = old_state["head.bias"].clone()
        return out
    weight, bias = fresh["head.weight"].clone(), fresh["head.bias"].clone()
    old_by_name = {l.name: l.value for l in old_labels}
    rows = [(0, 0)] + [(l.value, old_by_name[l.name]) for l in new_labels if l.name in old_by_name]
    for new_row, old_row in rows:
        weight[new_row] = old_state["head.weight"][old_row]
        bias[new_row] = old_state["head.bias"][old_row]
    out["head.weight"], out["head.bias"] = weight, bias
    return out


def finetune_run(model: str | Path, config: str | Path, run_dir: str | Path | None = None,
                 freeze_encoder: bool | None = None, lr_factor: float | None = None, overwrite: bool = False,
                 stages: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
                 export: bool = True) -> Path:
    """Fine-tune `model` with the data and settings of `config`; returns the run folder."""
    from ..packaging.model import ModelPackage, find_model
    from .trainer import train_run

    pkg = ModelPackage.load(find_model(model))
    pkg.verify()
    cfg_path = Path(config).expanduser().resolve()
    data = read_config_file(cfg_path)
    ft = dict(data.get("finetune", {}) or {})
    if lr_factor is None:
        lr_factor = float(ft.get("lr_factor", DEFAULT_LR_FACTOR))
    if freeze_encoder is None:
        freeze_encoder = bool(ft.get("freeze_encoder", False))
    if lr_factor <= 0:
        raise UserError(f"the learning-rate factor must be > 0, got {lr_factor}")
    merged = merge_with_package(data, pkg, freeze_encoder)
    merged["finetune"] = {"lr_factor": lr_factor, "freeze_encoder": freeze_encoder,
                          "from": {"name": pkg.name, "version": pkg.version,
                                   "sha256": {s.name: s.sha256 for s in pkg.stages}}}
    cfg = parse_config(merged, cfg_path.parent)
    new_labels = cfg.label_set()
    init = [transfer_state(pkg.load_network(i).state_dict(), pkg.labels, stage.network, new_labels,
                           stage.train.seed) for i, stage in enumerate(cfg.stages)]
    rd = Path(run_dir) if run_dir else (cfg.run_dir or Path("runs") / cfg.name)
    extra: dict[str, Any] = {"finetuned_from": merged["finetune"]["from"]}
    if pkg.atlas_prior is not None:
        if same_labels(pkg.labels, new_labels):
            extra["atlas_prior_from"] = keep_atlases(pkg, rd)
        else:
            log.warning("model %s carries atlases for its own labels; the fine-tuned model has other labels, so "
                        "it is exported without them (networks only)", pkg.name)
    train_run(cfg, rd, init_states=init, lr_scale=lr_factor, overwrite=overwrite, stages=stages, device=device,
              progress=progress, export=export, extra=extra)
    return rd


def keep_atlases(pkg, run_dir: Path) -> str:
    """Copy the source package's model.json and atlas files into the run folder (once), so the
    export carries the atlases even if the source model is later moved or removed."""
    import shutil

    from ..atomic import atomic_dir

    base = Path(run_dir) / "atlas_source"
    if not (base / "model.json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(base) as tmp:
            shutil.copy2(pkg.root / "model.json", tmp / "model.json")
            for name, _ in pkg.atlas_prior.files():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pkg.root / name, tmp / name)
    return base.name
