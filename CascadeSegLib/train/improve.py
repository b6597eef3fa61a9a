"""`cascadeseg improve`: fine-tune a model on its stored corrections, install it as a new model.

Each stage starts from the parent's weights (fine-tuning, Roth et al. 2017) and trains on
(a) every stored correction, with voxels near organs the user did not review weighted 0 in
the loss (see corrections.py), and (b) replayed predictions: the parent's own labels on replay
CTs (by default the bundled sample CT), so the model keeps what it knew while it learns the
corrections. Everything happens in a hidden folder of the models folder; only a finished,
verified package is renamed into place, so a crash or Cancel leaves the parent, the store and
any older NEW_NAME exactly as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, UserError
from ..inference import preprocess
from ..labels import LabelSet
from .correction_atlases import TRUSTED_BAND_MM, atlas_name, check_new_names, vouched, write_correction_atlas

if TYPE_CHECKING:
    from ..inference.atlas_prior import AtlasSpec
    from ..network import UNet3D

Progress = Callable[[str, float, str], None]
DEFAULT_ITERATIONS = 300          # per stage: about 6 minutes on one CPU core (measured in README)


@dataclass
class ImproveOptions:
    """How `improve` trains; the defaults suit a CPU (minutes)."""

    iterations: int = DEFAULT_ITERATIONS
    lr: float = 1e-3
    batch_size: int = 2
    replay: Sequence[Path] | None = None        # CTs whose parent labels are replayed; None: the sample CT
    left_out: int = 1                           # cases held out once for an honest check (>= 2 cases)
    stages: Sequence[str] | None = None         # train only these stages (the others keep the parent's)
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    patch: Sequence[int] | None = None          # training sub-volume (x, y, z); default: the parent's
    # Also keep every correction as one more registered atlas (correction_atlases.py); needs a
    # parent with atlases. With iterations 0 the networks stay the parent's: seconds, not minutes.
    atlases: bool = False
    # bfloat16 autocast where the CPU computes it natively (AMX, AVX512-BF16; elsewhere and on CUDA
    # ignored), as the recipes train: the trainer's steps 1.7-2x faster on such a CPU (README, Training)
    cpu_bf16: bool = True


@dataclass
class TrainItem:
    """One training image: CT, labels in the parent's values, and for a partly reviewed
    correction the parent's own labels (where it put each organ) and the reviewed organs."""

    name: str
    ct: Path
    labels: Path
    parent: Path | None = None
    reviewed: tuple[str, ...] = ()


@dataclass
class ImproveResult:
    path: Path
    report: dict[str, Any]
    seconds: float
    files: list[Path] = field(default_factory=list)


class _Steps:
    """Reports training progress over all stages and raises Cancelled when asked to stop."""

    def __init__(self, total: int, progress: Progress | None, cancel: Callable[[], bool] | None,
                 phase: str) -> None:
        self.total, self.done, self.progress, self.cancel, self.phase = max(1, total), 0, progress, cancel, phase

    def __call__(self, stage: str, it: int, n: int) -> None:
        self.done += 1
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        if self.progress is not None:
            self.progress(self.phase, self.done / self.total, f"{stage} iteration {it}/{n}")


def _trainer_class():
    from ..network import valid_input_size
    from .augment import augment_intensity, extract, random_spatial
    from .trainer import StageTrainer

    class ReportingTrainer(StageTrainer):
        """A StageTrainer that reports each step (progress, Cancel) and fits patches to thin cases.

        A padded network's tile shrinks to a thin volume at inference (no air around it), so a
        batch comes from one case, with the patch capped at that case's extent: a 40 mm slab
        trains on the same few slices the network later sees, a whole CT on full patches.
        """

        on_step: Callable[[str, int, int], None] | None = None

        def make_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            picks = [self.sampler.sample(self.rng)]
            while len(picks) < self.settings.batch_size:
                ci, centre = self.sampler.sample(self.rng)
                if ci == picks[0][0]:
                    picks.append((ci, centre))
            self.last_cases = [ci for ci, _ in picks]
            case = self.train_cases[picks[0][0]]
            patch = [min(p, valid_input_size(self.stage.network, n))
                     for p, n in zip(self.stage.patch_zyx, case.image.shape)]
            xs, ys, ws = [], [], []
            for ci, centre in picks:
                params = random_spatial(self.stage.augment, patch, self.gen)
                x, y, w = extract(case.image, case.label, self.train_masks[ci], centre, patch, params,
                                  self.pad_value, self.device)
                xs.append(augment_intensity(x, self.stage.augment, self.gen, self.vrange))
                ys.append(y)
                ws.append(w)
            return torch.stack(xs), torch.stack(ys), torch.stack(ws)

        def step(self) -> float:
            loss = super().step()
            if self.on_step is not None:
                self.on_step(self.stage.name, self.iteration, self.settings.iterations)
            return loss

    return ReportingTrainer


# --------------------------------------------------------------------------- config


def improve_config(pkg, name: str, opts: ImproveOptions):
    """A RunConfig with the parent's stages and fine-tuning settings for `opts`."""
    from .config import parse_config
    from .finetune import merge_with_package

    training = (pkg.provenance or {}).get("training", {}) or {}
    stages = []
    for spec in pkg.stages:
        patch = list(opts.patch) if opts.patch else list(training.get(spec.name, {}).get("patch") or spec.tile)
        stages.append({"name": spec.name, "patch": patch})
    iters = max(1, int(opts.iterations))       # 0 (atlases only) trains nothing; the config still needs a run
    data = {"name": name, "labels": list(pkg.labels.names), "data": {}, "stages": stages,
            "train": {"iterations": iters, "batch_size": opts.batch_size, "optimizer": "adamw", "lr": opts.lr,
                      "weight_decay": 1e-4, "schedule": "poly", "warmup": min(10, iters // 10),
                      "foreground_fraction": 0.5, "checkpoint_every": max(1, iters), "keep_checkpoints": 1,
                      "val_every": max(1, iters), "seed": opts.seed, "device": opts.device,
                      "threads": opts.threads, "cpu_bf16": bool(opts.cpu_bf16)},
            "augment": {"enabled": True, "elastic_prob": 0.0, "rotation_deg": 5.0, "translation_vox": 10.0,
                        "scale": 0.1}}
    return parse_config(merge_with_package(data, pkg, freeze_encoder=False), Path("."))


def _value_table(parent: LabelSet, ours: LabelSet) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for lab in parent:
        table[lab.value] = ours.by_name(lab.name).value
    return table


# --------------------------------------------------------------------------- training


def train_cascade(pkg, cfg, items: Sequence[TrainItem], folder: Path, opts: ImproveOptions,
                  steps: _Steps) -> list[dict[str, torch.Tensor]]:
    """Fine-tune every stage of `pkg` on `items`; returns one state_dict per stage."""
    from .candidates import candidates_c2
    from .dataset import Case, build_cached_case
    from .ddp import DistContext
    from .finetune import transfer_state
    from .trainer import resolve_train_device

    dev = resolve_train_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    labels = cfg.label_set()
    table = _value_table(pkg.labels, labels)
    cases = [Case(it.name, it.ct, it.labels) for it in items]
    states: list[dict[str, torch.Tensor]] = []
    stage1: UNet3D | None = None
    trainer_cls = _trainer_class()
    for index, stage in enumerate(cfg.stages):
        init = transfer_state(pkg.load_network(index).state_dict(), pkg.labels, stage.network, labels,
                              stage.train.seed)
        if opts.iterations == 0:                # the corrections only join the atlases
            states.append(init)
            continue
        cached = [build_cached_case(c, folder / "cache", stage.spacing, cfg.window, cfg.normalization,
                                    cfg.body_threshold_hu, table) for c in cases]
        masks = []
        for item, case in zip(items, cached):
            base = np.asarray(case.c1, dtype=bool)
            if index > 0:
                if stage1 is None:
                    raise RuntimeError("stage 2 is fine-tuned after stage 1; stage 1 has no network")
                s1 = cfg.stages[0]
                c1case = build_cached_case(Case(item.name, item.ct, item.labels), folder / "cache", s1.spacing,
                                           cfg.window, cfg.normalization, cfg.body_threshold_hu, table)
                truth = torch.from_numpy(np.asarray(case.label) > 0)
                base = candidates_c2(stage1, c1case, case, cfg, s1, dev) | \
                    preprocess.dilate(truth, cfg.dilation_radius).numpy()
            masks.append(base & _known(item, case, labels, table, stage.spacing))
        if opts.stages and stage.name not in opts.stages:
            states.append(init)
        else:
            trainer = trainer_cls(cfg, stage, folder / stage.name, cached, masks, [], [], DistContext(), dev, init,
                                  1.0, progress=False)
            trainer.on_step = steps
            trainer.run()
            states.append({k: v.detach().cpu() for k, v in trainer.net.state_dict().items()})
        if index == 0:
            from ..network import build_network

            stage1 = build_network(stage.network)
            stage1.load_state_dict(states[0])
            stage1 = stage1.to(dev).eval()
    return states


def _known(item: TrainItem, case, labels: LabelSet, table: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Voxels whose label a partly reviewed correction vouches for (weight 1 in the loss): see
    `correction_atlases.vouched`, on the stage's grid."""
    lab = np.asarray(case.label)
    unreviewed = [l.value for l in labels if l.name not in item.reviewed]
    if item.parent is None or not unreviewed:
        return np.ones(lab.shape, dtype=bool)
    from ..io import read_image

    par = preprocess.resample(read_image(item.parent), case.reference(), "nearest", 0, sitk.sitkUInt8)
    return vouched(lab, table[sitk.GetArrayFromImage(par)], [labels.by_name(n).value for n in item.reviewed],
                   unreviewed, spacing)


# --------------------------------------------------------------------------- predictions


def predict(pkg, ct: Path, device: str, cancel: Callable[[], bool] | None) -> sitk.Image:
    from ..inference.cascade import Segmenter
    from ..io import read_image

    return Segmenter(pkg, device=device, cancel=cancel).segment(read_image(ct)).labels


def reviewed_dice(pred: sitk.Image, pred_labels: LabelSet, truth: sitk.Image, truth_labels: LabelSet,
                  organs: Sequence[str]) -> dict[str, float | None]:
    """Dice of each reviewed organ (the corrected labels are the reference)."""
    from ..evaluate import evaluate_images

    wanted = LabelSet(tuple(lab for lab in pred_labels if lab.name in organs))
    res = evaluate_images(pred, truth, wanted, ref_labels=truth_labels, distances=False)
    return {name: res["organs"][name]["dice"] for name in organs if name in res["organs"]}


# --------------------------------------------------------------------------- the command


def new_package(pkg, cfg, name: str, states, provenance: dict[str, Any], folder: Path,
                atlases: Sequence[AtlasSpec] = ()):
    """Save the improved package (the parent's settings, labels by name, the parent's atlases and
    `atlases`, already written into `folder`) and check it loads."""
    from ..packaging.model import ModelPackage, StageSpec

    ours = cfg.label_set()
    labels = LabelSet(tuple(dataclasses.replace(pkg.labels.by_name(l.name), value=l.value) for l in ours))
    stages = [StageSpec(s.name, s.spacing, s.tile, c.network, s.weights) for s, c in zip(pkg.stages, cfg.stages)]
    prior = copy.deepcopy(pkg.atlas_prior)      # the parent's atlases come along unchanged
    if atlases:
        if prior is None:
            raise UserError(f"model {pkg.name} has no atlases for the corrections to join")
        prior.atlases += [copy.deepcopy(a) for a in atlases]
    trained = "fine-tuned" if provenance["training"]["iterations"] else "atlases from"
    new = ModelPackage(name=name, version=pkg.version, labels=labels, stages=stages, window=pkg.window,
                       normalization=pkg.normalization, body_threshold_hu=pkg.body_threshold_hu,
                       dilation_radius=pkg.dilation_radius,
                       description=f"{pkg.name} improved ({trained} {len(provenance['corrections'])} correction(s))"
                       if atlases else f"{pkg.name} improved on {len(provenance['corrections'])} correction(s)",
                       license=pkg.license, provenance=provenance, largest_component=list(pkg.largest_component),
                       atlas_prior=prior)
    new.save(folder, states, files_from=pkg.root)
    loaded = ModelPackage.load(folder)
    loaded.verify()
    return loaded


def _check_request(pkg, name: str, opts: ImproveOptions, target: Path, overwrite: bool) -> None:
    from ..packaging.download import SAFE_NAME

    if pkg.architecture != "3d-cascade":
        raise UserError(f"model {pkg.name} is a {pkg.architecture} model; improve fine-tunes 3D cascades only")
    if not SAFE_NAME.match(name) or name == pkg.name:
        raise UserError(f"-o {name!r} must be a new model name (letters, digits, '.', '_', '-'), not the parent's")
    if opts.iterations < 0 or (opts.iterations == 0 and not opts.atlases):
        raise UserError(f"--iterations must be at least 1 (0 only with --atlases: the corrections join the atlases, "
                        f"the networks stay as they are), got {opts.iterations}")
    if opts.atlases and pkg.atlas_prior is None:
        raise UserError(f"model {pkg.name} has no registered atlases for the corrections to join; "
                        "improve a model with atlases (such as abdomen-ct), or leave out --atlases")
    unknown = set(opts.stages or ()) - {s.name for s in pkg.stages}
    if unknown:
        raise UserError(f"model {pkg.name} has no stage(s) {sorted(unknown)}; it has "
                        f"{', '.join(s.name for s in pkg.stages)}")
    missing = [str(p) for p in opts.replay or () if not Path(p).exists()]
    if missing:
        raise UserError(f"--replay CT(s) {', '.join(missing)} not found; check the path(s)")
    if target.exists() and not overwrite:
        raise UserError(f"model {name} is already installed in {target}; choose another -o name, or --overwrite")


def _link_or_copy(source: Path, target: Path) -> None:
    import os
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _snapshot(case, folder: Path):
    """The case's files linked (or copied) into `folder`: a concurrent `remove` cannot pull them away."""
    folder.mkdir(parents=True)
    for f in (case.ct, case.labels):
        _link_or_copy(f, folder / f.name)
    return dataclasses.replace(case, folder=folder)


@dataclass
class _ParentPass:
    """What the parent model says about each correction, and the replayed cases."""

    items: list[TrainItem]
    replays: list[TrainItem]
    before: dict[str, dict[str, float | None]]
    truths: dict[str, sitk.Image]


def _parent_pass(pkg, cases, replay: Sequence[Path], work: Path, opts: ImproveOptions, say: Progress,
                 cancel: Callable[[], bool] | None) -> _ParentPass:
    from ..io import read_image, write_image

    out = _ParentPass([], [], {}, {})
    n = len(cases) + len(replay)
    for i, case in enumerate(cases):
        say("parent", i / n, f"segmenting {case.id} with {pkg.name}")
        pred = predict(pkg, case.ct, opts.device, cancel)
        out.truths[case.id] = read_image(case.labels)
        out.before[case.id] = reviewed_dice(pred, pkg.labels, out.truths[case.id], pkg.labels, case.reviewed)
        out.items.append(TrainItem(case.id, case.ct, case.labels, write_image(pred, work / f"parent-{case.id}.nii.gz"),
                                   case.reviewed))
    for j, ct in enumerate(replay):
        say("parent", (len(cases) + j) / n, f"replaying {ct.name}")
        lab = write_image(predict(pkg, ct, opts.device, cancel), work / f"replay-{j}.nii.gz")
        out.replays.append(TrainItem(f"replay-{j}", ct, lab))
    return out


def _provenance(pkg, name: str, cases, replay: Sequence[Path], opts: ImproveOptions) -> dict[str, Any]:
    from ..packaging.model import sha256_file

    return {"improved_from": {"name": pkg.name, "version": pkg.version,
                              "sha256": {s.name: s.sha256 for s in pkg.stages}},
            "corrections": [{"id": c.id, "reviewed": list(c.reviewed), "created": c.created,
                             "sha256": sha256_file(c.labels)} for c in cases],
            "replay": [str(p) for p in replay],
            "command": f"cascadeseg improve {pkg.name} -o {name} --iterations {opts.iterations}"
                       + (" --atlases" if opts.atlases else "") + ("" if opts.cpu_bf16 else " --float32"),
            "atlases_from_corrections": [atlas_name(c.id) for c in cases] if opts.atlases else [],
            "training": {"iterations": opts.iterations, "lr": opts.lr, "stages": list(opts.stages or []),
                         "cpu_bf16": bool(opts.cpu_bf16),
                         "unreviewed_organs": f"weight 0; background trusted within {TRUSTED_BAND_MM} mm "
                                              "of reviewed organs"},
            "trained_on": [c.id for c in cases] + list((pkg.provenance or {}).get("trained_on", []) or [])}


def improve_model(parent: str, name: str, opts: ImproveOptions | None = None, progress: Progress | None = None,
                  cancel: Callable[[], bool] | None = None, overwrite: bool = False,
                  root: str | Path | None = None) -> ImproveResult:
    """Fine-tune `parent` on its corrections and install the result as model `name`."""
    import shutil
    import tempfile

    from ..corrections import list_corrections, replace_folder
    from ..io import read_image
    from ..packaging.model import load_model
    from ..resources import models_dir, sample_ct
    from .improve_report import write_report

    opts = opts or ImproveOptions()
    t0 = time.perf_counter()
    pkg = load_model(parent)
    pkg.verify()
    base = Path(root) if root is not None else models_dir()
    target = base / name
    _check_request(pkg, name, opts, target, overwrite)
    cases = list_corrections(pkg.name, base)
    if not cases:
        raise UserError(f"model {pkg.name} has no stored corrections; add some with "
                        f"`cascadeseg corrections add CT SEGMENTATION --model {pkg.name}`")
    if opts.atlases and pkg.atlas_prior is not None:
        check_new_names(pkg.atlas_prior, [c.id for c in cases], pkg.name)
    replay = [Path(p) for p in opts.replay] if opts.replay is not None else [p for p in [sample_ct()] if p.exists()]
    if opts.iterations == 0:
        replay = []                             # nothing is trained, so nothing needs keeping
    say = progress or (lambda *a: None)
    work = Path(tempfile.mkdtemp(prefix=f".improve-{name}-", dir=base))
    try:
        cases = [_snapshot(c, work / "cases" / c.id) for c in cases]
        cfg = improve_config(pkg, name, opts)
        seen = _parent_pass(pkg, cases, replay, work, opts, say, cancel)
        held = [c.id for c in sorted(cases, key=lambda c: c.created)[-opts.left_out:]] \
            if len(cases) >= 2 and opts.left_out > 0 else []
        steps = _Steps(opts.iterations * len(opts.stages or cfg.stages) * (1 + len(held)), progress, cancel,
                       "training")
        states = train_cascade(pkg, cfg, seen.items + seen.replays, work / "run", opts, steps)
        prov = _provenance(pkg, name, cases, replay, opts)

        # Each correction's atlas is made once (staged) and linked into every package that keeps it.
        staged: dict[str, AtlasSpec] = {}
        if opts.atlases:
            say("atlases", 0.0, f"storing {len(cases)} correction(s) as atlases")
            ours, predicted = cfg.label_set(), {it.name: it.parent for it in seen.items}
            table = _value_table(pkg.labels, ours)
            for c in cases:
                by_parent = predicted[c.id]
                staged[c.id] = write_correction_atlas(c.id, read_image(c.ct), seen.truths[c.id],
                                                      read_image(by_parent) if by_parent is not None else None,
                                                      c.reviewed, ours, table, work / "staged")

        def atlases_of(some: Sequence[Any], folder: Path) -> list[AtlasSpec]:
            specs = [staged[c.id] for c in some if c.id in staged]
            for spec in specs:
                for f in (spec.image, spec.labels):
                    _link_or_copy(work / "staged" / f, folder / f)
            return specs

        new = new_package(pkg, cfg, name, states, prov, work / "model", atlases_of(cases, work / "model"))

        def dice_of(model, case) -> dict[str, float | None]:
            say("checking", 0.5, f"segmenting {case.id} with {model.name}")
            return reviewed_dice(predict(model, case.ct, opts.device, cancel), model.labels, seen.truths[case.id],
                                 pkg.labels, case.reviewed)

        report: dict[str, Any] = {
            "model": name, "parent": pkg.name, "iterations": opts.iterations, "replay": [str(p) for p in replay],
            "atlases": prov["atlases_from_corrections"],
            "cases": {c.id: {"reviewed": list(c.reviewed), "before": seen.before[c.id], "after": dice_of(new, c)}
                      for c in cases},
            "left_out": {}}
        for k, hid in enumerate(held):
            rest = [it for it in seen.items if it.name != hid]
            st = train_cascade(pkg, cfg, rest + seen.replays, work / f"run-without-{hid}", opts, steps)
            others = [c for c in cases if c.id != hid]
            check = new_package(pkg, cfg, f"{name}-check", st, prov, work / f"check-{k}",
                                atlases_of(others, work / f"check-{k}"))
            case = next(c for c in cases if c.id == hid)
            report["left_out"][hid] = {"before": seen.before[hid], "after": dice_of(check, case)}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        files = write_report(work / "model", report)
        if cancel is not None and cancel():
            raise Cancelled()
        replace_folder(work / "model", target)
        return ImproveResult(target, report, time.perf_counter() - t0, [target / f.name for f in files])
    finally:
        shutil.rmtree(work, ignore_errors=True)
