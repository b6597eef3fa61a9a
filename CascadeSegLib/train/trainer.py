"""Training the cascade: stage 1 on C1, then stage 2 on C2 from the trained stage 1.

A run folder holds everything: `config.json` (the effective config), `cache/` (resampled
cases, memory-mapped), one folder per stage with `log.csv`, `checkpoints/` (every N
iterations, sha256 sidecars, the newest few kept), `best.pt` (highest validation Dice),
`done.json`, and finally `model/`, the exported model package. Running the same command again
resumes where it stopped (after a crash or Ctrl-C) with the same optimizer and RNG state.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError
from ..evaluation.metrics import dice
from ..inference import preprocess
from ..labels import UNKNOWN_LABEL, LabelSet
from ..network import build_network
from . import checkpoint as ckpt
from .augment import augment_intensity, extract, random_spatial
from .candidates import c2_masks, load_best, pad_value_for, predict_labels
from .config import RunConfig, StageConfig, stage_to_json
from .dataset import CachedCase, build_cached_case, discover_cases, label_lookup, read_split, without_unknown
from .ddp import DistContext, broadcast_buffers, init_distributed
from .losses import image_class_weights, make_loss
from .run_folder import export_run, prepare_run_dir
from .sampling import CandidateSampler
from .status import read_log_rows

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def resolve_train_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
    return dev


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AMX tiles or AVX512-BF16), where oneDNN runs a
    training step 1.7x (stage 2) to 2.0x (stage 1) faster than float32 on the 2-core AMX machine
    (docs/abdomen-ct-recipe.md, twenty-seventh round)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(check()) for check in checks if callable(check))
    except RuntimeError:
        return False


def lr_factor(it: int, total: int, schedule: str, warmup: int) -> float:
    """Learning-rate multiplier at iteration `it` (0-based) of `total`."""
    if warmup > 0 and it < warmup:
        return (it + 1) / warmup
    frac = min(1.0, (it - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return (1.0 - frac) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def value_range(cfg: RunConfig) -> tuple[float, float]:
    lo = float(preprocess.normalize(torch.tensor(cfg.window[0]), cfg.window, cfg.normalization))
    hi = float(preprocess.normalize(torch.tensor(cfg.window[1]), cfg.window, cfg.normalization))
    return lo, hi


def dice_per_label(pred: torch.Tensor, truth: torch.Tensor, labels: LabelSet) -> dict[str, float]:
    """Dice per organ (NaN where the organ is absent from both)."""
    out = {}
    for lab in labels:
        d = dice(pred == lab.value, truth == lab.value)
        out[lab.name] = float("nan") if d is None else d
    return out


# --------------------------------------------------------------------------- one stage


class StageTrainer:
    """Trains one stage's network on sub-volumes centred in its candidate region."""

    def __init__(self, cfg: RunConfig, stage: StageConfig, folder: Path, train_cases: list[CachedCase],
                 train_masks: list[np.ndarray], val_cases: list[CachedCase], val_masks: list[np.ndarray],
                 ctx: DistContext, device: torch.device, init_state: dict[str, torch.Tensor] | None = None,
                 lr_scale: float = 1.0, progress: bool = True, case_weights: Sequence[float] | None = None) -> None:
        self.cfg, self.stage, self.folder, self.ctx, self.device = cfg, stage, folder, ctx, device
        # A voxel labelled UNKNOWN_LABEL (unknown: e.g. where a warped atlas contradicts the anatomy it
        # was warped onto) leaves C: no loss, no class count, no sub-volume centred on it.
        self.train_cases = train_cases
        self.train_masks = [without_unknown(m, c.label) for c, m in zip(train_cases, train_masks)]
        self.val_cases, self.val_masks = val_cases, val_masks
        self.settings = stage.train
        self.lr_scale = lr_scale
        self.progress = progress
        self.labels = cfg.label_set()
        self.num_classes = self.labels.num_classes
        s = self.settings
        torch.manual_seed(s.seed)
        self.net = build_network(stage.network)
        if init_state is not None:
            self.net.load_state_dict(init_state)
        self.net.to(device)
        if ctx.active and device.type == "cuda" and stage.network.norm == "batch":
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        if s.freeze_encoder:
            for p in self.net.encoders.parameters():
                p.requires_grad_(False)
        params = [p for p in self.net.parameters() if p.requires_grad]
        base_lr = s.lr * lr_scale
        if s.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=base_lr, momentum=s.momentum,
                                                              nesterov=s.nesterov and s.momentum > 0,
                                                              weight_decay=s.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=s.weight_decay)
        self.base_lr = base_lr
        # None: float32 throughout. float16 on CUDA needs loss scaling; bfloat16 keeps float32's range
        # and is only used on a CPU that computes it natively (emulated elsewhere, so slower there)
        self.autocast_dtype: torch.dtype | None = None
        if s.amp and device.type == "cuda":
            self.autocast_dtype = torch.float16
        elif s.cpu_bf16 and device.type == "cpu" and cpu_computes_bf16():
            self.autocast_dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.model: nn.Module = self.net
        if ctx.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.eager_model, self.compiled_ok = self.model, False
        if s.compile_network:       # checkpoints keep self.net's plain state dict either way
            try:
                self.model = cast(nn.Module, torch.compile(self.model))     # an OptimizedModule
            except Exception as exc:    # e.g. inductor failing to import its templates in a C locale
                self._drop_compiled(exc)
        self.loss_fn = make_loss(s.loss)
        # The paper's lambda_k come from each training image's class counts inside its C.
        self.case_lam: torch.Tensor | None = None
        if s.class_balance == "image":
            counts = np.stack([np.bincount(np.asarray(c.label)[np.asarray(m, bool)].ravel().astype(np.int64),
                                           minlength=self.num_classes)[:self.num_classes]
                               for c, m in zip(train_cases, self.train_masks)])
            self.case_lam = image_class_weights(torch.from_numpy(counts))
        self.last_cases: list[int] = []
        self.sampler = CandidateSampler(self.train_masks, [c.label for c in train_cases], s.foreground_fraction,
                                        case_weights)
        self.rng = np.random.default_rng([s.seed, ctx.rank])
        self.gen = torch.Generator().manual_seed(s.seed * 1000 + ctx.rank)
        self.iteration = 0
        self.last_loss = float("nan")           # the latest step's loss (its log row may still be unwritten)
        self.best_metric = -1.0
        self.best_iteration = -1
        self.pad_value = pad_value_for(cfg)
        self.vrange = value_range(cfg)
        self.ckpt_dir = folder / "checkpoints"

    # --- state -------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {"numpy": self.rng.bit_generator.state, "torch": self.gen.get_state()}

    def state(self) -> dict[str, Any]:
        rngs = self.ctx.gather_objects(self._rng_state())
        return {"iteration": self.iteration, "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "best_metric": self.best_metric,
                "best_iteration": self.best_iteration, "rng": rngs, "world_size": self.ctx.world_size,
                "stage": stage_to_json(self.stage)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.best_metric = float(state.get("best_metric", -1.0))
        self.best_iteration = int(state.get("best_iteration", -1))
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            self.rng.bit_generator.state = rngs[self.ctx.rank]["numpy"]
            self.gen.set_state(rngs[self.ctx.rank]["torch"])

    def save(self) -> None:
        state = self.state()            # collective: every rank takes part
        if self.ctx.is_main:
            ckpt.save_checkpoint(state, self.ckpt_dir / f"ckpt_{self.iteration:07d}.pt")
            ckpt.prune(self.ckpt_dir, self.settings.keep_checkpoints)

    def _save_overdue(self, saved_at: float) -> bool:
        """`checkpoint_minutes` have passed since the last save. Rank 0's clock decides for all:
        saving is collective, and ranks whose clocks disagreed would wait for each other forever."""
        minutes = self.settings.checkpoint_minutes
        if minutes <= 0:
            return False
        overdue = time.perf_counter() - saved_at >= minutes * 60
        return bool(self.ctx.broadcast_object(overdue)) if self.ctx.active else overdue

    def try_resume(self) -> bool:
        latest = ckpt.latest_valid(self.ckpt_dir) if self.ctx.is_main else None
        state = latest[1] if latest else None
        found: dict[str, Any] | None = self.ctx.broadcast_object(state) if self.ctx.active else state
        if found is None:
            return False
        self.load_state(found)
        return True

    # --- batches -----------------------------------------------------------------------------
    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, ws = [], [], []
        aug = self.stage.augment
        self.last_cases = []
        for _ in range(self.settings.batch_size):
            ci, centre = self.sampler.sample(self.rng)
            self.last_cases.append(ci)
            case = self.train_cases[ci]
            params = random_spatial(aug, self.stage.patch_zyx, self.gen)
            x, y, w = extract(case.image, case.label, self.train_masks[ci], centre, self.stage.patch_zyx, params,
                              self.pad_value, self.device)
            y = torch.where(y == UNKNOWN_LABEL, 0, y)        # outside C (w False), so it teaches nothing
            x = augment_intensity(x, aug, self.gen, self.vrange)
            xs.append(x)
            ys.append(y)
            ws.append(w)
        return torch.stack(xs), torch.stack(ys), torch.stack(ws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward pass; a compiled network that fails on its first call (no C++
        compiler, an unsupported operator) is dropped for the eager one with a warning."""
        if self.model is self.eager_model or self.compiled_ok:
            return self.model(x)
        try:
            out = self.model(x)
        except Exception as exc:        # torch.compile raises many kinds, most lazily at the first call
            self._drop_compiled(exc)
            return self.model(x)
        self.compiled_ok = True
        return out

    def _drop_compiled(self, exc: Exception) -> None:
        log.warning("%s: torch.compile failed (%s); training goes on without it",
                    self.stage.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.model = self.eager_model

    def step(self) -> float:
        s = self.settings
        f = lr_factor(self.iteration, s.iterations, s.schedule, s.warmup)
        for g in self.opt.param_groups:
            g["lr"] = self.base_lr * f
        x, y, w = self.make_batch()
        self.model.train()
        if s.freeze_encoder:
            self.net.encoders.eval()          # frozen BatchNorm statistics stay frozen too
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = self.forward(x)
        lam = self.case_lam[self.last_cases] if self.case_lam is not None else None
        loss = self.loss_fn(logits.float(), y, w, lam)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if s.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.last_loss = float(loss.detach())
        self.iteration += 1
        return self.last_loss

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Whole-volume prediction over C of each validation case; Dice per organ and mean."""
        per_case = []
        for case, mask in zip(self.val_cases, self.val_masks):
            pred = predict_labels(self.net, case, mask, self.stage.tile_zyx, self.num_classes, self.pad_value,
                                  self.device)
            per_case.append(dice_per_label(pred, torch.from_numpy(np.array(case.label)), self.labels))
        result = {}
        for name in self.labels.names:
            vals = [d[name] for d in per_case if not math.isnan(d[name])]
            result[name] = float(np.mean(vals)) if vals else float("nan")
        present = [v for v in result.values() if not math.isnan(v)]
        result["mean"] = float(np.mean(present)) if present else float("nan")
        return result

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.settings
        folder = self.folder
        resumed = self.try_resume()
        if self.ctx.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "log.csv"
        columns = ["iteration", "loss", "lr", "seconds", "val_mean_dice"] + [f"dice_{n}" for n in self.labels.names]
        writer = None
        tb = None
        f_log = None
        if self.ctx.is_main:
            rows = []
            if resumed:
                rows = [r for r in read_log_rows(log_path) if int(r["iteration"]) <= self.iteration]
            # The kept rows replace the log in one rename, then new rows are appended: a kill at the
            # resume never leaves the log truncated (it holds the run's whole history).
            kept = io.StringIO(newline="")
            head = csv.DictWriter(kept, fieldnames=columns, extrasaction="ignore")
            head.writeheader()
            head.writerows(rows)
            atomic_write(log_path, kept.getvalue().encode("utf-8"))   # bytes: csv's \r\n kept as is on Windows
            f_log = open(log_path, "a", newline="", encoding="utf-8")
            writer = csv.DictWriter(f_log, fieldnames=columns)
            if s.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    tb = SummaryWriter(str(folder / "tensorboard"))
                except ImportError:
                    log.warning("TensorBoard is not installed; logging to log.csv only")
        bar = None
        if self.ctx.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=s.iterations, initial=self.iteration, desc=self.stage.name, unit="it",
                       dynamic_ncols=True)
        start = time.perf_counter()
        elapsed0 = 0.0
        last_val: dict[str, float] = {}
        logged = self.iteration
        saved_at = time.perf_counter()
        try:
            while self.iteration < s.iterations:
                loss = self.ctx.mean(self.step())
                it = self.iteration
                row: dict[str, Any] = {"iteration": it, "loss": f"{loss:.5f}",
                                       "lr": f"{self.opt.param_groups[0]['lr']:.3g}",
                                       "seconds": f"{elapsed0 + time.perf_counter() - start:.1f}"}
                if self.val_cases and (it % max(1, s.val_every) == 0 or it == s.iterations):
                    if self.ctx.is_main:
                        last_val = self.validate()
                    last_val = self.ctx.broadcast_object(last_val)
                    row["val_mean_dice"] = f"{last_val['mean']:.4f}"
                    row.update({f"dice_{n}": f"{last_val[n]:.4f}" for n in self.labels.names})
                    if not math.isnan(last_val["mean"]) and last_val["mean"] > self.best_metric:
                        self.best_metric, self.best_iteration = last_val["mean"], it
                        self._save_best(last_val)
                if writer is not None:
                    writer.writerow(row)
                    logged = it
                    if it % 10 == 0 or it == s.iterations:
                        f_log.flush()  # type: ignore[union-attr]
                if tb is not None:
                    tb.add_scalar("loss", loss, it)
                    if "val_mean_dice" in row:
                        tb.add_scalar("val/mean_dice", last_val["mean"], it)
                if bar is not None:
                    post = {"loss": f"{loss:.3f}"}
                    if last_val:
                        post["dice"] = f"{last_val['mean']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if it % max(1, s.checkpoint_every) == 0 or it == s.iterations or self._save_overdue(saved_at):
                    if f_log is not None:  # the log must reach the checkpoint even if we are killed next
                        f_log.flush()
                        os.fsync(f_log.fileno())
                    self.save()
                    saved_at = time.perf_counter()
        except KeyboardInterrupt:
            if writer is not None and self.iteration > logged:   # its step was done, its row not yet written
                writer.writerow({"iteration": self.iteration, "loss": f"{self.last_loss:.5f}",
                                 "lr": f"{self.opt.param_groups[0]['lr']:.3g}",
                                 "seconds": f"{elapsed0 + time.perf_counter() - start:.1f}"})
            if not self.ctx.active and self.iteration > 0:
                self.save()
                log.warning("interrupted: checkpoint saved at iteration %d; run the command again to resume",
                            self.iteration)
            raise
        finally:
            if bar is not None:
                bar.close()
            if f_log is not None:
                f_log.close()
            if tb is not None:
                tb.close()
        broadcast_buffers(self.net, self.ctx)
        if s.save_rank_weights:
            torch.save(self.net.state_dict(), folder / f"rank{self.ctx.rank}_final.pt")
        if self.ctx.is_main:
            if not self.val_cases or self.best_iteration < 0 or not (folder / "best.pt").is_file():
                self._save_best({})
            done = {"iterations": self.iteration, "best_iteration": self.best_iteration,
                    "best_val_mean_dice": self.best_metric if self.best_iteration >= 0 else None,
                    "seconds_this_session": round(time.perf_counter() - start, 1)}
            best = ckpt.load_checkpoint(folder / "best.pt")
            done["best_val_dice"] = best.get("val_dice", {})
            atomic_write(folder / "done.json", json.dumps(done, indent=2))   # a kill never leaves half of it
        self.ctx.barrier()
        return json.loads((folder / "done.json").read_text(encoding="utf-8"))

    def _save_best(self, val: dict[str, float]) -> None:
        if self.ctx.is_main:
            ckpt.save_checkpoint({"model": self.net.state_dict(), "iteration": self.iteration,
                                  "val_dice": {k: (None if math.isnan(v) else v) for k, v in val.items()}},
                                 self.folder / "best.pt")


# --------------------------------------------------------------------------- the run (run_folder.py: config, export)


def train_run(cfg: RunConfig, run_dir: Path, init_states: Sequence[dict[str, torch.Tensor] | None] | None = None,
              lr_scale: float = 1.0, extra: dict[str, Any] | None = None, overwrite: bool = False,
              stages: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
              export: bool = True) -> Path:
    """Train every stage of `cfg` in `run_dir` (resuming), then export the model package."""
    run_dir = Path(run_dir)
    dev = resolve_train_device(device or cfg.stages[0].train.device)
    ctx = init_distributed(dev.type)
    if ctx.active and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
    try:
        if cfg.stages[0].train.threads > 0:
            torch.set_num_threads(cfg.stages[0].train.threads)
        if ctx.is_main:
            prepare_run_dir(cfg, run_dir, extra, overwrite)
        ctx.barrier()
        labels = cfg.label_set()
        cases, source_names = discover_cases(cfg.data, cfg.resolve)
        table = label_lookup(labels, cfg.data.get("label_map"), source_names, cfg.data.get("label_map_preset"))
        train_cases, val_cases = read_split(cfg.data, cfg.resolve, cases)
        weights = None
        if cfg.data.get("synthetic"):
            measurable = [c for c in cases if c not in val_cases]     # never the validation cases' look
            train_cases, weights = _with_synthetic(cfg, train_cases, measurable, run_dir / "synthetic", ctx, progress,
                                                   table)
        cache_dir = cfg.resolve(cfg.data["cache_dir"]) if cfg.data.get("cache_dir") else run_dir / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)

        def cached(stage: StageConfig, group: list) -> list[CachedCase]:
            # Rank 0 builds the cache; the others then memory-map it.
            out = []
            if ctx.is_main:
                out = [build_cached_case(c, cache_dir, stage.spacing, cfg.window, cfg.normalization,
                                         cfg.body_threshold_hu, table) for c in group]
            ctx.barrier()
            if not ctx.is_main:
                out = [build_cached_case(c, cache_dir, stage.spacing, cfg.window, cfg.normalization,
                                         cfg.body_threshold_hu, table) for c in group]
            return out

        results: dict[str, Any] = {}
        stage1_net = None
        for index, stage in enumerate(cfg.stages):
            folder = run_dir / stage.name
            tr, va = cached(stage, train_cases), cached(stage, val_cases)
            for c in tr:
                if not np.asarray(c.label).any():
                    log.warning("case %s has no labelled voxel of the config's organs", c.name)
            if index == 0:
                tr_masks = [np.asarray(c.c1) for c in tr]
                va_masks = [np.asarray(c.c1) for c in va]
            else:
                s1 = cfg.stages[0]
                tr1, va1 = cached(s1, train_cases), cached(s1, val_cases)
                if stage1_net is None:
                    stage1_net = load_best(run_dir / s1.name, s1, dev)
                tr_masks, va_masks = c2_masks(stage1_net, tr1, tr, va1, va, cfg, s1, folder / "c2", ctx, dev)
                if not any(m.any() for m in tr_masks):
                    raise UserError("stage 1 finds no organ in any training image, so stage 2 has nothing to train "
                                    "on; train stage 1 longer")
            if stages and stage.name not in stages:
                continue
            if (folder / "done.json").is_file():
                results[stage.name] = json.loads((folder / "done.json").read_text(encoding="utf-8"))
                if index == 0:
                    stage1_net = None
                continue
            init = init_states[index] if init_states else None
            trainer = StageTrainer(cfg, stage, folder, tr, tr_masks, va, va_masks, ctx, dev, init, lr_scale, progress,
                                   weights)
            results[stage.name] = trainer.run()
            if index == 0:
                stage1_net = None
        if ctx.is_main:
            atomic_write(run_dir / "metrics.json", json.dumps(results, indent=2))
            if export and all((run_dir / s.name / "done.json").is_file() for s in cfg.stages):
                export_run(run_dir, run_dir / "model")
        ctx.barrier()
        return run_dir
    finally:
        ctx.close()


def _with_synthetic(cfg: RunConfig, real: list, measurable: list, out_dir: Path, ctx: DistContext,
                    progress: bool, table: np.ndarray | None = None) -> tuple[list, list[float]]:
    """Real training cases plus the config's synthetic ones, and each case's sampling weight:
    synthetic cases together get `share` of the sub-volumes, real ones the rest. `table` (label
    map value -> model value) says which structures the run learns."""
    from ..synthesis.source import synthetic_cases

    spec = dict(cfg.data["synthetic"])
    trained = None if table is None else [int(v) for v in np.flatnonzero((table > 0) & (table != UNKNOWN_LABEL))]
    bar = None
    if ctx.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(desc="synthesis", unit="CT", dynamic_ncols=True)

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    syn: list = []
    if ctx.is_main:
        syn = synthetic_cases(spec, cfg.resolve, measurable, out_dir, report, trained)
    ctx.barrier()
    if not ctx.is_main:
        syn = synthetic_cases(spec, cfg.resolve, measurable, out_dir, trained=trained)
    if bar is not None:
        bar.close()
    share = float(spec.get("share", 0.5)) if real else 1.0
    if not 0.0 <= share <= 1.0:
        raise UserError(f"data.synthetic.share must be between 0 and 1, got {share}")
    weights = [(1.0 - share) / max(1, len(real))] * len(real) + [share / len(syn)] * len(syn)
    return list(real) + syn, weights
