"""Training of the 2D three-view baseline (three_view.py): config, patches, the loop, the package.

`cascadeseg baseline2d train CONFIG` runs `train_baseline(load_baseline_config(CONFIG), run_dir)`;
the package it writes runs with `cascadeseg segment --model` like any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import atomic_write
from ...errors import ModelError, UserError
from ...network import NetConfig
from ...packaging.model import ModelPackage, StageSpec
from ...train.config import ConfigPaths, package_settings, with_checked_labels
from .three_view import ARCHITECTURE, ThreeViewNet, ThreeViewOptions, check_view, save_three_view_package


@dataclass
class Stage2DConfig:
    name: str
    spacing: tuple[float, float, float]
    patch: tuple[int, int]                 # in-plane training patch (width, height) voxels
    network: NetConfig
    train: Any                             # train.config.TrainSettings
    margin: tuple[int, int] | None = None  # fine stage: random box margin (Zhou: 10-20 voxels)


@dataclass
class Baseline2DConfig(ConfigPaths):
    name: str
    labels: list[str]
    data: dict[str, Any]
    stages: list[Stage2DConfig]
    options: ThreeViewOptions = field(default_factory=ThreeViewOptions)
    window: tuple[float, float] = (-200.0, 300.0)
    normalization: str = "window01"
    body_threshold_hu: float = -500.0
    dilation_radius: int = 3
    version: str = "1.0.0"
    description: str = ""
    license: str = ""
    base_dir: Path = Path(".")
    intensity_aug: float = 0.1
    raw: dict[str, Any] = field(default_factory=dict)



_KEYS = {"name", "version", "description", "license", "labels", "data", "intensity", "body_threshold_hu",
         "dilation_radius", "stages", "train", "architecture", "three_view", "augment", "comment", "$schema"}


def parse_baseline_config(data: dict[str, Any], base_dir: str | Path = ".") -> Baseline2DConfig:
    """Validate a 2D baseline config (the trainer's format plus `three_view`; stages coarse, fine)."""
    from ...train.config import TrainSettings

    unknown = set(data) - _KEYS
    if unknown:
        raise UserError(f"unknown config key(s) {sorted(unknown)}; known: {', '.join(sorted(_KEYS))}")
    if data.get("architecture", ARCHITECTURE) != ARCHITECTURE:
        raise UserError(f"this is not a 2D baseline config (architecture {data.get('architecture')!r}); "
                        "train it with `cascadeseg train`")
    for key in ("name", "labels", "data", "stages"):
        if key not in data:
            raise UserError(f"the config has no {key!r}; see configs/baseline2d-phantom.json for an example")
    labels = [str(n) for n in data["labels"]]
    try:
        options = ThreeViewOptions(**(data.get("three_view") or {}))
    except (TypeError, ModelError) as exc:
        raise UserError(f"bad three_view settings: {exc}") from None
    defaults = dict(data.get("train") or {})
    stages = []
    for i, s in enumerate(data["stages"]):
        s = dict(s)
        name = str(s.pop("name", ("coarse", "fine")[min(i, 1)]))
        try:
            net = NetConfig.from_json({"kind": "padded", "base_channels": 16, "depth": 4, "norm": "batch",
                                       **s.pop("network", {}), "in_channels": 2 * options.context + 1,
                                       "num_classes": len(labels) + 1})
        except (TypeError, ValueError) as exc:
            raise UserError(f"stage {name}: bad network settings ({exc})") from None
        if net.kind != "padded":
            raise UserError(f"stage {name}: the 2D baseline needs network.kind 'padded'")
        patch = s.pop("patch", [64, 64])
        if isinstance(patch, int):
            patch = [patch, patch]
        if len(patch) != 2 or min(int(p) for p in patch) < 8 or any(int(p) % 2 ** (net.depth - 1) for p in patch):
            raise UserError(f"stage {name}: patch must be two sizes (width, height), multiples of "
                            f"{2 ** (net.depth - 1)}, got {patch}")
        spacing = s.pop("spacing", [3, 3, 3])
        if isinstance(spacing, (int, float)):
            spacing = [spacing] * 3
        if len(spacing) != 3 or min(float(v) for v in spacing) <= 0:
            raise UserError(f"stage {name}: spacing must be three positive mm values, got {spacing}")
        margin = s.pop("margin", None if i == 0 else [10, 20])
        if margin is not None:
            if isinstance(margin, int):
                margin = [margin, margin]
            if len(margin) != 2 or not 0 <= int(margin[0]) <= int(margin[1]):
                raise UserError(f"stage {name}: margin must be [min, max] voxels, got {margin}")
            margin = (int(margin[0]), int(margin[1]))
        try:
            train = TrainSettings(**{**defaults, **s.pop("train", {})})
        except TypeError as exc:
            raise UserError(f"stage {name}: bad train settings ({exc})") from None
        if s:
            raise UserError(f"stage {name}: unknown setting(s) {sorted(s)}")
        stages.append(Stage2DConfig(name, tuple(float(v) for v in spacing), (int(patch[0]), int(patch[1])),  # type: ignore[arg-type]
                                    net, train, margin))
    if not 1 <= len(stages) <= 2:
        raise UserError(f"a 2D baseline has a coarse and optionally a fine stage; the config lists {len(stages)}")
    cfg = Baseline2DConfig(
        name=str(data["name"]), labels=labels, data=dict(data["data"]), stages=stages, options=options,
        **package_settings(data), base_dir=Path(base_dir),
        intensity_aug=float((data.get("augment") or {}).get("intensity", 0.1)), raw=data)
    return with_checked_labels(cfg)


def load_baseline_config(path: str | Path) -> Baseline2DConfig:
    from ...train.config import read_config_file

    p = Path(path).expanduser().resolve()
    return parse_baseline_config(read_config_file(p), p.parent)


def fine_region(label: np.ndarray, rng: np.random.Generator, margin: tuple[int, int]) -> np.ndarray:
    """Training region of the fine stage: each organ's box grown by a random margin (Zhou: 10-20)."""
    from scipy import ndimage

    region = np.zeros(label.shape, dtype=bool)
    for sl in ndimage.find_objects(np.asarray(label)):
        if sl is None:
            continue
        m = int(rng.integers(margin[0], margin[1] + 1))
        grown = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, n in zip(sl, label.shape))
        region[grown] = True
    return region


def extract_patch(image: np.ndarray, label: np.ndarray, weight: np.ndarray, view: str, centre: Sequence[int],
                  size_hw: Sequence[int], context: int, pad_value: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2D training patch in `view` around `centre` (z, y, x): ((2c+1, H, W), (H, W), (H, W)).

    Uses the same slicing as `extract_view` (neighbours along the view's axis as channels);
    beyond the volume the image is `pad_value` and the label/weight 0.
    """
    axis = check_view(view)
    shape = image.shape
    lo = [int(c) - int(s) // 2 for c, s in zip(np.delete(np.asarray(centre), axis), size_hw)]
    lo.insert(axis, int(centre[axis]) - context)
    size = list(size_hw)
    size.insert(axis, 2 * context + 1)
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, shape))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, lo))
    img = np.full(size, pad_value, dtype=np.float32)
    img[dst] = image[src]
    lab = np.zeros(size, dtype=np.int64)
    lab[dst] = label[src]
    w = np.zeros(size, dtype=np.float32)
    w[dst] = weight[src]
    mid = [slice(None)] * 3
    mid[axis] = context                                # type: ignore[call-overload]
    x = np.moveaxis(img, axis, 0)
    return x, lab[tuple(mid)], w[tuple(mid)]


def train_baseline(cfg: Baseline2DConfig, run_dir: str | Path, out: str | Path | None = None,
                   device: str | None = None, progress: bool = True, overwrite: bool = False,
                   log: Callable[[str], None] | None = None) -> ModelPackage:
    """Train the coarse and fine three-view FCNs and export a package `cascadeseg segment` runs.

    A small dedicated loop on the trainer's pieces: its data discovery, resampled case cache,
    candidate sampler, losses (`train.loss`: wce, dice or wce+dice) and learning-rate schedule.
    The coarse stage samples slices centred in the body mask C1; the fine stage samples in each
    organ's reference box grown by a random margin and counts only voxels inside that box.
    """
    threads = cfg.stages[0].train.threads
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)            # this run only; restored below
    try:
        return _train_baseline(cfg, Path(run_dir), out, device, progress, overwrite, log)
    finally:
        torch.set_num_threads(previous)


def _train_baseline(cfg: Baseline2DConfig, run_dir: Path, out: str | Path | None, device: str | None,
                    progress: bool, overwrite: bool, log: Callable[[str], None] | None) -> ModelPackage:
    from ...train.candidates import pad_value_for
    from ...train.dataset import build_cached_case, discover_cases, label_lookup, read_split
    from ...train.losses import make_loss
    from ...train.sampling import CandidateSampler
    from ...train.trainer import lr_factor, resolve_train_device

    if overwrite and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.json", json.dumps({"config": cfg.raw, "base_dir": str(cfg.base_dir)}, indent=2))
    dev = resolve_train_device(device or cfg.stages[0].train.device)
    labels = cfg.label_set()
    cases, source_names = discover_cases(cfg.data, cfg.resolve)
    table = label_lookup(labels, cfg.data.get("label_map"), source_names, cfg.data.get("label_map_preset"))
    train_cases, _ = read_split(cfg.data, cfg.resolve, cases)
    cache_dir = cfg.resolve(cfg.data["cache_dir"]) if cfg.data.get("cache_dir") else run_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    pad_value = pad_value_for(cfg)  # type: ignore[arg-type]
    ctx = cfg.options.context
    states, specs, metrics = [], [], {}
    for stage in cfg.stages:
        s = stage.train
        torch.manual_seed(s.seed)
        rng = np.random.default_rng(s.seed)
        cached = [build_cached_case(c, cache_dir, stage.spacing, cfg.window, cfg.normalization,
                                    cfg.body_threshold_hu, table) for c in train_cases]
        images = [np.asarray(c.image, dtype=np.float32) for c in cached]
        labs = [np.asarray(c.label) for c in cached]
        if stage.margin is None:
            regions = [np.asarray(c.c1, dtype=bool) for c in cached]
        else:
            regions = [fine_region(lab, rng, stage.margin) for lab in labs]
        if not any(r.any() for r in regions):
            raise UserError(f"stage {stage.name}: no training voxel (no body / no labelled organ in the cases)")
        sampler = CandidateSampler(regions, labs, s.foreground_fraction)
        net = ThreeViewNet(stage.network, cfg.options.views).to(dev)
        loss_fn = make_loss(s.loss)
        log_rows = []
        t0 = time.perf_counter()
        for view in cfg.options.views:
            vnet = net.nets[view]
            params = list(vnet.parameters())
            if s.optimizer == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                                             nesterov=s.nesterov and s.momentum > 0,
                                                             weight_decay=s.weight_decay)
            else:
                opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
            vnet.train()
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=s.iterations, desc=f"{stage.name}/{view}", unit="it", dynamic_ncols=True,
                           disable=None)
            for it in range(s.iterations):
                for g in opt.param_groups:
                    g["lr"] = s.lr * lr_factor(it, s.iterations, s.schedule, s.warmup)
                xs, ys, ws = [], [], []
                for _ in range(s.batch_size):
                    ci, centre = sampler.sample(rng)
                    x, y, w = extract_patch(images[ci], labs[ci], regions[ci], view, centre, stage.patch[::-1],
                                            ctx, pad_value)
                    if cfg.intensity_aug > 0:
                        a = cfg.intensity_aug
                        x = x * np.float32(1 + rng.uniform(-a, a)) + np.float32(rng.uniform(-a, a) / 2)
                    xs.append(x)
                    ys.append(y)
                    ws.append(w)
                x_t = torch.from_numpy(np.stack(xs)).to(dev)
                y_t = torch.from_numpy(np.stack(ys))[:, None].to(dev)
                w_t = torch.from_numpy(np.stack(ws))[:, None].to(dev)
                logits = vnet(x_t)[:, :, None]                # (N, K, 1, H, W) for the 3D losses
                loss = loss_fn(logits.float(), y_t, w_t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                opt.step()
                value = float(loss.detach())
                if it % 10 == 0 or it == s.iterations - 1:
                    log_rows.append({"view": view, "iteration": it + 1, "loss": round(value, 5)})
                if bar is not None:
                    bar.set_postfix({"loss": f"{value:.3f}"}, refresh=False)
                    bar.update(1)
            if bar is not None:
                bar.close()
            vnet.eval()
        seconds = time.perf_counter() - t0
        folder = run_dir / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "log.json", json.dumps(log_rows))
        metrics[stage.name] = {"iterations_per_view": s.iterations, "seconds": round(seconds, 1),
                               "final_loss": {r["view"]: r["loss"] for r in log_rows}}
        if log is not None:
            log(f"{stage.name}: {s.iterations} iterations per view in {seconds:.0f} s")
        states.append({kk: v.detach().cpu() for kk, v in net.state_dict().items()})
        specs.append(StageSpec(stage.name, stage.spacing, (stage.patch[0], stage.patch[1], 2 * ctx + 1),
                               stage.network, f"{stage.name}.pt"))
    pkg = ModelPackage(name=cfg.name, version=cfg.version, labels=labels, stages=specs, window=cfg.window,
                       normalization=cfg.normalization, body_threshold_hu=cfg.body_threshold_hu,
                       dilation_radius=cfg.dilation_radius,
                       description=cfg.description or "2D three-view FCN baseline (Zhou et al. 2016)",
                       license=cfg.license,
                       provenance={"trained_on": [c.name for c in train_cases],
                                   "command": "cascadeseg baseline2d train CONFIG",
                                   "method": "Zhou et al. 2016 three-view 2D FCN, 3-slice input",
                                   "training": {st.name: {"spacing": list(st.spacing), "patch": list(st.patch),
                                                          "margin": list(st.margin) if st.margin else None,
                                                          **asdict(st.train)} for st in cfg.stages},
                                   "metrics": metrics})
    target = Path(out) if out is not None else run_dir / "model"
    return save_three_view_package(pkg, target, states, cfg.options)
