"""Train a cascade on a machine that has a GPU but not the data or SimpleITK: pack, then train.

    python configs/train_prepared.py pack CONFIG -o PACK [--exclude CASE] [--work DIR]
    python configs/train_prepared.py train PACK --run-dir RUN [--device cuda] [--minutes M M]
    python configs/train_prepared.py export RUN -o MODEL
    python configs/train_prepared.py all CONFIG --run-dir RUN [--exclude CASE] [--device cuda] [--minutes M M]

`pack` runs here, where the data and SimpleITK are: it generates the config's synthetic cases,
resamples every case onto both stage grids (the trainer's own cache) and writes one xz-compressed
.npz per case (the window-normalised image quantised to 8 bits: 2 HU steps over [-200, 300],
labels, body mask C1, grid geometry) plus pack.json (config and sampling weights). A few MB
travel instead of the raw CTs. `--exclude CASE` packs the leave-one-out fold of
configs/leave_one_out.py without CASE (not a training case, label map, table CT or atlas).

`train` needs only torch and numpy: stage 1 on C1, then stage 2 on C2 = (stage-1 foreground
on the stage-2 grid, united with the labelled voxels) dilated by the model's radius; the union
makes every organ voxel a training candidate even where a young stage 1 still misses it.
`--minutes` caps each stage's wall time: the iteration count is set from the measured speed
(recorded in the run's config.json), so the poly schedule still ends at zero. Resumable.

`--init MODEL` starts both stages from a model package's weights instead of from scratch (fine-tuning
a trained cascade on a new pack, e.g. one with more label maps), with the learning rate times
`--lr-factor` (0.1); `--iterations N N` and `--warmup N` replace the pack config's counts. The
package must have the pack's stages (spacing, tile, network) and labels; a run started from one
package is never resumed from another. `all --keep-init-stage stage1` exports the starting
package's stage-1 weights in place of the fine-tuned ones (stage 2 still trained on the fine-tuned
stage 1's candidates): abdomen-ct 2.6.1's networks.

`--seed N` replaces the pack config's training seed (network initialisation, sub-volume sampling,
augmentation): a second run of the same recipe, to see how far two runs differ. A run keeps the
seed it started with (RUN/seed.json).

`export` writes the model package (here, with SimpleITK) from the run folder.

`all` is the one command that retrains a default model: pack (RUN/pack), train (RUN/networks),
export (RUN/networks/model), then add the atlases with configs/build_atlas_model.py (RUN/model).
Run it again after a stop and it goes on where it stopped: a finished pack (its pack.json) and
finished atlases (RUN/model/model.json) are kept, training resumes from its checkpoints. On a CPU
leave out --minutes (a stage whose wall time runs out counts as finished) and stop with Ctrl-C or
`kill PID` (SIGTERM; a job started in the background of a script ignores Ctrl-C): the stage saves a
checkpoint at the iteration it reached, and the exit status is 130.

A finished run trains further in a later sitting: give `--iterations N N` (without --minutes)
above the counts it finished with, and each such stage goes on from its last checkpoint (the poly schedule runs over
the new total, so the learning rate rises again where the stage stopped; the shorter run's
done.json is kept as done-<count>.json). `all` then re-exports and, because the networks changed,
rebuilds RUN/model (the old one is kept as RUN/model.stale until the new one is complete).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CascadeSegLib.atomic import atomic_write  # noqa: E402  (stdlib only)
from CascadeSegLib.cli import sigterm_to_interrupt  # noqa: E402  (stdlib only: no torch to load)
from CascadeSegLib.errors import UserError  # noqa: E402  (the library needs no SimpleITK for this)


def _stub_simpleitk() -> None:
    """Let the library import where SimpleITK is missing; any real use fails loudly."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        stub = types.ModuleType("SimpleITK")

        class _Missing:
            def __init__(self, *a, **k):
                raise RuntimeError("SimpleITK is not installed on this machine")

        def __getattr__(name: str):  # noqa: N807
            if name.startswith("__"):
                raise AttributeError(name)
            return _Missing

        stub.__getattr__ = __getattr__  # type: ignore[attr-defined]
        sys.modules["SimpleITK"] = stub


# --------------------------------------------------------------------------- pack (here)


def pack(args: argparse.Namespace) -> int:
    from CascadeSegLib.train.config import parse_config, read_config_file
    from CascadeSegLib.train.dataset import build_cached_case, discover_cases, label_lookup, read_split
    from CascadeSegLib.train.ddp import DistContext
    from CascadeSegLib.train.trainer import _with_synthetic

    config = Path(args.config).resolve()
    raw = read_config_file(config)
    if args.exclude:
        sys.path.insert(0, str(REPO / "configs"))
        from leave_one_out import fold_config

        raw = fold_config(raw, args.exclude, "both", 0)
        raw.pop("finetune", None)
    cfg = parse_config(raw, config.parent)
    work = Path(args.work or f"runs/pack-work/{cfg.name}").resolve()
    cases, source_names = discover_cases(cfg.data, cfg.resolve)
    table = label_lookup(cfg.label_set(), cfg.data.get("label_map"), source_names, cfg.data.get("label_map_preset"))
    train, val = read_split(cfg.data, cfg.resolve, cases)
    weights = [1.0 / len(train)] * len(train)
    if cfg.data.get("synthetic"):
        measurable = [c for c in cases if c not in val]
        train, weights = _with_synthetic(cfg, train, measurable, work / "synthetic", DistContext(), True, table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in train:
        arrays: dict[str, np.ndarray] = {}
        geometry = {}
        for s in cfg.stages:
            c = build_cached_case(case, work / "cache", s.spacing, cfg.window, cfg.normalization,
                                  cfg.body_threshold_hu, table)
            image = np.asarray(c.image, dtype=np.float32)
            arrays[f"{s.name}_image"] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
            arrays[f"{s.name}_label"] = np.asarray(c.label, dtype=np.uint8)
            arrays[f"{s.name}_c1"] = np.packbits(np.asarray(c.c1, dtype=bool))
            geometry[s.name] = {k: c.geometry[k] for k in ("size", "spacing", "origin", "direction")}
        buf = io.BytesIO()
        np.savez(buf, **arrays)          # then xz: 15% smaller than the npz's own zip compression
        (out / f"{case.name}.npz.xz").write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
        entries.append({"name": case.name, "geometry": geometry})
    if cfg.normalization != "window01":
        raise SystemExit("pack stores window01 images only")
    meta = {"config": cfg.raw, "cases": entries, "weights": weights}
    atomic_write(out / "pack.json", json.dumps(meta, indent=1))
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"{out}: {len(entries)} cases, {size:.1f} MB")
    return 0


# --------------------------------------------------------------------------- train (anywhere)


def _load(pack_dir: Path, stage: str, entry: dict):
    from CascadeSegLib.train.dataset import CachedCase

    z = np.load(io.BytesIO(lzma.decompress((pack_dir / f"{entry['name']}.npz.xz").read_bytes())))
    g = entry["geometry"][stage]
    shape = tuple(int(v) for v in reversed(g["size"]))
    image = (z[f"{stage}_image"].astype(np.float32) / 255.0).astype(np.float16)
    c1 = np.unpackbits(z[f"{stage}_c1"])[: int(np.prod(shape))].reshape(shape).astype(bool)
    return CachedCase(entry["name"], pack_dir, image.reshape(shape), z[f"{stage}_label"].reshape(shape), c1, g)


def _nearest_index(g_from: dict, g_to: dict) -> list[np.ndarray]:
    """Per axis (z, y, x): the index on grid `g_from` nearest to each index of `g_to` (same directions)."""
    out = []
    for axis in (2, 1, 0):
        pos = g_to["origin"][axis] + g_to["spacing"][axis] * np.arange(g_to["size"][axis])
        i = np.rint((pos - g_from["origin"][axis]) / g_from["spacing"][axis]).astype(np.int64)
        out.append(np.clip(i, 0, g_from["size"][axis] - 1))
    return out


class _Deadline(KeyboardInterrupt):
    """Raised inside a step when the stage's wall time is up; the trainer checkpoints on it."""


def _trainer_class(deadline: list[float]):
    from CascadeSegLib.train.trainer import StageTrainer

    class Timed(StageTrainer):
        def step(self) -> float:
            if time.monotonic() > deadline[0]:
                raise _Deadline()
            return super().step()

    return Timed


def _iterations_for(trainer, minutes: float, wanted: int) -> int:
    """Iterations that fit in `minutes`, from the speed of a few steps after warm-up."""
    for _ in range(5):
        trainer.make_batch()
    state = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    opt = trainer.opt.state_dict()
    trainer.step()
    t0 = time.perf_counter()
    n = 15
    for _ in range(n):
        trainer.step()
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    trainer.net.load_state_dict(state)
    trainer.opt.load_state_dict(opt)
    trainer.iteration = 0
    fit = int(rate * minutes * 60 * 0.93)
    print(f"{trainer.stage.name}: {rate:.2f} it/s -> {min(wanted, fit)} iterations in {minutes} min", flush=True)
    return max(50, min(wanted, fit))


def train(args: argparse.Namespace) -> int:
    _stub_simpleitk()
    import torch

    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.ddp import DistContext
    from CascadeSegLib.train.trainer import resolve_train_device

    pack_dir = Path(args.pack).resolve()
    meta = json.loads((pack_dir / "pack.json").read_text(encoding="utf-8"))
    if args.only:                       # the ablation: real cases only, or synthetic ones only
        keep = [(e, w) for e, w in zip(meta["cases"], meta["weights"])
                if e["name"].startswith(("synth-", "reg-")) == (args.only == "synthetic")]
        meta["cases"] = [e for e, _ in keep]
        meta["weights"] = [1.0 / len(keep)] * len(keep)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fitted_path = run_dir / "fitted.json"
    fitted = json.loads(fitted_path.read_text()) if fitted_path.is_file() else {}
    raw = json.loads(json.dumps(meta["config"]))
    dev = resolve_train_device(args.device)
    torch.set_num_threads(args.threads)
    ctx = DistContext()
    minutes = list(args.minutes or [])
    _override_counts(raw, args.iterations, args.warmup)
    _override_seed(raw, getattr(args, "seed", None), run_dir)
    inits: list = [None] * len(raw["stages"])
    origin, lr_scale = None, 1.0
    if args.init:
        from CascadeSegLib.train.finetune import DEFAULT_LR_FACTOR

        inits, origin = _init_states(args.init, raw, pack_dir, run_dir)
        lr_scale = DEFAULT_LR_FACTOR if args.lr_factor is None else float(args.lr_factor)
        if lr_scale <= 0:
            raise UserError(f"--lr-factor must be > 0, got {lr_scale}")
    elif args.lr_factor is not None:
        raise UserError("--lr-factor scales the learning rate of a fine-tune; give --init MODEL with it")
    elif (run_dir / "init.json").is_file():
        raise UserError(f"{run_dir} was started from a model ({run_dir / 'init.json'}); give the same --init "
                        "to resume it")
    for index in range(len(raw["stages"])):
        name = raw["stages"][index]["name"]
        folder = run_dir / name
        done = (folder / "done.json").is_file()
        if minutes and not done and name not in fitted:
            cfg0 = parse_config(raw, pack_dir)
            data = _stage_data(cfg0, index, pack_dir, meta, run_dir, dev)
            probe = _trainer_class([float("inf")])(cfg0, cfg0.stages[index], run_dir / "probe", *data, ctx, dev,
                                                   None, 1.0, False, meta["weights"])
            fitted[name] = _iterations_for(probe, minutes[index], cfg0.stages[index].train.iterations)
            del probe, data
            atomic_write(fitted_path, json.dumps(fitted, indent=1))
        if done and args.iterations and not minutes:        # with --minutes the speed fit chose the count
            done = _extend(folder, name, int(args.iterations[index]), fitted, fitted_path)
        for s in raw["stages"]:
            if s["name"] in fitted:
                s.setdefault("train", {})["iterations"] = fitted[s["name"]]
        cfg = parse_config(raw, pack_dir)
        # config.json as prepare_run_dir writes it, with the iteration counts actually trained
        dump = {"config": raw, "base_dir": str(REPO / "configs")}
        if origin:
            dump["finetuned_from"] = {**origin, "lr_factor": lr_scale}
        atomic_write(run_dir / "config.json", json.dumps(dump, indent=2))
        if done:
            continue
        stage = cfg.stages[index]
        budget = minutes[index] * 60 + 20 if minutes else float("inf")
        deadline = [time.monotonic() + budget]
        data = _stage_data(cfg, index, pack_dir, meta, run_dir, dev)
        trainer = _trainer_class(deadline)(cfg, stage, folder, *data, ctx, dev, inits[index], lr_scale,
                                           args.progress, meta["weights"])
        t0 = time.perf_counter()
        try:
            result = trainer.run()
        except _Deadline:
            trainer._save_best({})
            result = {"iterations": trainer.iteration, "stopped": "wall time"}
            atomic_write(folder / "done.json", json.dumps(result, indent=2))
        print(f"{stage.name}: {result.get('iterations')} iterations in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _extend(folder: Path, name: str, wanted: int, fitted: dict, fitted_path: Path) -> bool:
    """A finished stage asked for more iterations goes on from its last checkpoint (returns False:
    not done); the poly schedule then runs over the new total, so the learning rate rises again
    where the stage stopped. Asked for as many, it stays done (True); for fewer, an error."""
    trained = int(json.loads((folder / "done.json").read_text(encoding="utf-8"))["iterations"])
    if wanted < trained:
        raise UserError(f"{name} has trained {trained} iterations; --iterations {wanted} cannot undo them "
                        "(give at least as many, or a new --run-dir)")
    if wanted == trained:
        return True
    from CascadeSegLib.train.checkpoint import latest_valid

    if latest_valid(folder / "checkpoints") is None:      # what the trainer would resume from
        raise UserError(f"{name} has no valid checkpoint in {folder / 'checkpoints'} to go on from; "
                        "use a new --run-dir")
    print(f"{name}: extending from {trained} to {wanted} iterations", flush=True)
    (folder / "done.json").replace(folder / f"done-{trained}.json")      # kept: what the shorter run was
    fitted[name] = wanted
    atomic_write(fitted_path, json.dumps(fitted, indent=1))
    return False


def _override_seed(raw: dict, seed: int | None, run_dir: Path) -> None:
    """`--seed`: the training seed (network initialisation, sub-volume sampling, augmentation) in
    place of the pack config's, for a second run of the same recipe. A run keeps the seed it
    started with (`seed.json`): resumed without `--seed` it takes it from there, with another one
    it is refused."""
    record = run_dir / "seed.json"
    started = json.loads(record.read_text(encoding="utf-8"))["seed"] if record.is_file() else None
    if started is None and any((run_dir / s["name"]).is_dir() for s in raw["stages"]):
        started = int(raw.get("train", {}).get("seed", 0))       # begun before with the config's seed
    if seed is not None and started is not None and seed != started:
        raise UserError(f"{run_dir} was started with --seed {started}; give the same seed to resume it, "
                        "or a new --run-dir")
    if seed is None:
        seed = started
    if seed is None:
        return
    raw.setdefault("train", {})["seed"] = int(seed)
    for stage in raw["stages"]:
        if "seed" in stage.get("train", {}):
            stage["train"]["seed"] = int(seed)
    if started is None:
        atomic_write(record, json.dumps({"seed": int(seed)}))


def _override_counts(raw: dict, iterations: list[int] | None, warmup: int | None) -> None:
    """Put `--iterations` (one per stage) and `--warmup` into the pack's config."""
    if iterations:
        if len(iterations) != len(raw["stages"]) or min(iterations) < 1:
            raise UserError(f"--iterations needs one count >= 1 per stage ({len(raw['stages'])}), got {iterations}")
        for s, n in zip(raw["stages"], iterations):
            s.setdefault("train", {})["iterations"] = int(n)
    if warmup is not None:
        if warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {warmup}")
        raw.setdefault("train", {})["warmup"] = int(warmup)


def _init_states(model: str, raw: dict, pack_dir: Path, run_dir: Path) -> tuple[list, dict]:
    """Each stage's starting weights from a model package that has the pack's stages and labels."""
    from CascadeSegLib.packaging.model import ModelPackage, find_model
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.finetune import same_labels, transfer_state

    pkg = ModelPackage.load(find_model(model))
    pkg.verify()
    cfg = parse_config(raw, pack_dir)
    if not same_labels(pkg.labels, cfg.label_set()):
        raise UserError(f"model {pkg.name} has other labels than the pack ({', '.join(pkg.labels.names)}); "
                        "fine-tune it with `cascadeseg finetune`, which maps labels by name")
    mine = [(s.name, tuple(s.spacing), tuple(s.tile_zyx), s.network.to_json()) for s in cfg.stages]
    theirs = [(s.name, tuple(s.spacing), tuple(s.tile_zyx), s.network.to_json()) for s in pkg.stages]
    if mine != theirs:
        raise UserError(f"model {pkg.name}'s stages (spacing, tile, network) differ from the pack's; "
                        "start from a model trained with the same recipe")
    origin = {"name": pkg.name, "version": pkg.version, "sha256": {s.name: s.sha256 for s in pkg.stages}}
    record = run_dir / "init.json"
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")) != origin:
        raise UserError(f"{run_dir} was started from another model ({record}); use a new --run-dir")
    atomic_write(record, json.dumps(origin, indent=1))
    states = [transfer_state(pkg.load_network(i).state_dict(), pkg.labels, stage.network, cfg.label_set(),
                             stage.train.seed) for i, stage in enumerate(cfg.stages)]
    return states, origin


def _stage_data(cfg, index: int, pack_dir: Path, meta: dict, run_dir: Path, dev):
    """(train cases, candidate masks, val cases, val masks) of one stage."""
    import torch

    from CascadeSegLib.inference import preprocess
    from CascadeSegLib.train.candidates import load_best, pad_value_for, predict_labels

    stage = cfg.stages[index]
    cases = [_load(pack_dir, stage.name, e) for e in meta["cases"]]
    if index == 0:
        return cases, [np.asarray(c.c1) for c in cases], [], []
    s1 = cfg.stages[0]
    net = load_best(run_dir / s1.name, s1, dev)
    masks = []
    for entry, c2 in zip(meta["cases"], cases):
        c1 = _load(pack_dir, s1.name, entry)
        with torch.no_grad():
            lab1 = predict_labels(net, c1, c1.c1, s1.tile_zyx, len(cfg.labels) + 1, pad_value_for(cfg), dev).numpy()
        iz, iy, ix = _nearest_index(entry["geometry"][s1.name], entry["geometry"][stage.name])
        fg = (lab1[np.ix_(iz, iy, ix)] > 0) | (np.asarray(c2.label) > 0)
        masks.append(preprocess.dilate(torch.from_numpy(fg), cfg.dilation_radius).numpy())
    return cases, masks, [], []


def export(args: argparse.Namespace) -> int:
    from CascadeSegLib.train.run_folder import export_run

    print(export_run(Path(args.run_dir), Path(args.output)))
    return 0


def _init_stage_names(init: str, names: list[str]) -> None:
    """Refuse, before any packing or training, a --keep-init-stage the --init package lacks."""
    from CascadeSegLib.packaging.model import ModelPackage, find_model

    start = ModelPackage.load(find_model(init))
    missing = [n for n in names if n not in [s.name for s in start.stages]]
    if missing:
        raise UserError(f"--keep-init-stage {' '.join(missing)}: model {start.name} has the stages "
                        f"{', '.join(s.name for s in start.stages)}")


def keep_init_stages(model_dir: Path, init: str, names: list[str]) -> None:
    """Put the starting package's weight files of the named stages into the exported package.
    Both have the same stages in the same order (`_init_states` refused any other start)."""
    from CascadeSegLib.packaging.model import ModelPackage, find_model

    pkg, start = ModelPackage.load(model_dir), ModelPackage.load(find_model(init))
    for mine, theirs in zip(pkg.stages, start.stages):
        if mine.name in names:
            shutil.copy2(start.weight_path(theirs), model_dir / mine.weights)
    pkg.provenance["stages_from_init"] = {s.name: s.sha256 for s in start.stages if s.name in names}
    pkg.save(model_dir)                 # model.json with the copied files' sha256


def all_steps(args: argparse.Namespace) -> int:
    """Pack, train, export and add the atlases; each finished step is kept when run again."""
    import subprocess

    if args.keep_init_stage and not args.init:
        raise UserError("--keep-init-stage needs --init MODEL (the package whose stage is kept)")
    if args.keep_init_stage:
        _init_stage_names(args.init, args.keep_init_stage)
    run = Path(args.run_dir)
    pack_dir, networks = run / "pack", run / "networks"
    if (pack_dir / "pack.json").is_file():
        print(f"pack: {pack_dir} is complete, kept", flush=True)
    else:
        pack(argparse.Namespace(config=args.config, output=str(pack_dir), exclude=args.exclude, work=args.work))
    train(argparse.Namespace(pack=str(pack_dir), run_dir=str(networks), device=args.device, minutes=args.minutes,
                             threads=args.threads, progress=args.progress, only=None, init=args.init,
                             lr_factor=args.lr_factor, iterations=args.iterations, warmup=args.warmup,
                             seed=args.seed))
    export(argparse.Namespace(run_dir=str(networks), output=str(networks / "model")))
    if args.keep_init_stage:
        keep_init_stages(networks / "model", args.init, args.keep_init_stage)
    if args.no_atlases:
        return 0
    if (run / "model" / "model.json").is_file():
        if _same_networks(run / "model", networks / "model"):
            print(f"atlases: {run / 'model'} is complete, kept (delete it to rebuild)", flush=True)
            return 0
        stale = run / "model.stale"
        if stale.exists():
            raise UserError(f"{stale} is in the way of rebuilding {run / 'model'}; move or delete it")
        print(f"atlases: the networks changed since {run / 'model'} was built; rebuilding it (the old one "
              f"stays in {stale} until the new one is complete)", flush=True)
        (run / "model").replace(stale)
    raw = json.loads((pack_dir / "pack.json").read_text(encoding="utf-8"))["config"]
    cmd = [sys.executable, str(REPO / "configs" / "build_atlas_model.py"), "-o", str(run / "model"),
           "--base", str(networks / "model"), "--name", str(args.name or raw.get("name", "abdomen-ct")),
           "--version", str(raw.get("version", "1.0.0"))]
    if args.exclude:
        cmd += ["--exclude", args.exclude]
    if (run / "model").exists() and not (run / "model" / "model.json").is_file():
        shutil.rmtree(run / "model")      # a build that stopped half way
    rc = subprocess.call(cmd)
    if rc == 0 and (run / "model.stale").exists():
        shutil.rmtree(run / "model.stale")
    return rc


def _same_networks(fused: Path, networks: Path) -> bool:
    """Whether the fused package carries the networks package's weights. Tensors are compared,
    not files: exporting the same run twice writes different bytes (torch.save is not
    byte-stable), and re-running `all` must not rebuild the atlases for that."""
    import torch

    from CascadeSegLib.packaging.model import ModelPackage

    a, b = ModelPackage.load(fused), ModelPackage.load(networks)
    if [s.name for s in a.stages] != [s.name for s in b.stages]:
        return False
    for i in range(len(a.stages)):
        sa, sb = a.load_network(i).state_dict(), b.load_network(i).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def _finetune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", metavar="MODEL", help="start from this model package's weights (same stages and labels)")
    p.add_argument("--lr-factor", type=float, help="learning rate x this with --init (default 0.1)")
    p.add_argument("--iterations", type=int, nargs="+", metavar="N", help="iterations per stage (replace the config's)")
    p.add_argument("--warmup", type=int, help="warm-up iterations (replace the config's)")
    p.add_argument("--seed", type=int, help="training seed (replaces the config's: a second run of the same "
                                            "recipe); a run keeps the seed it started with")


def main() -> int:
    signal.signal(signal.SIGTERM, sigterm_to_interrupt)  # `kill`: the stage saves a checkpoint first
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("config")
    a.add_argument("-o", "--output", required=True)
    a.add_argument("--exclude")
    a.add_argument("--work")
    a.set_defaults(func=pack)
    b = sub.add_parser("train")
    b.add_argument("pack")
    b.add_argument("--run-dir", required=True)
    b.add_argument("--device", default="auto")
    b.add_argument("--minutes", type=float, nargs="*")
    b.add_argument("--threads", type=int, default=4)
    b.add_argument("--progress", action="store_true")
    b.add_argument("--only", choices=("real", "synthetic"), help="train on the pack's real or synthetic cases only")
    _finetune_options(b)
    b.set_defaults(func=train)
    c = sub.add_parser("export")
    c.add_argument("run_dir")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=export)
    d = sub.add_parser("all", help="pack, train, export and add the atlases; run again to resume")
    d.add_argument("config")
    d.add_argument("--run-dir", required=True)
    d.add_argument("--exclude", help="leave this case out everywhere (a held-out fold)")
    d.add_argument("--work")
    d.add_argument("--device", default="auto")
    d.add_argument("--minutes", type=float, nargs="*")
    d.add_argument("--threads", type=int, default=4)
    d.add_argument("--progress", action="store_true")
    d.add_argument("--name", help="the package's name (default: the config's)")
    d.add_argument("--no-atlases", action="store_true", help="stop after exporting the networks")
    d.add_argument("--keep-init-stage", nargs="+", metavar="STAGE",
                   help="export these stages with --init's weights (the others fine-tuned)")
    _finetune_options(d)
    d.set_defaults(func=all_steps)
    args = p.parse_args()
    try:
        return int(args.func(args))
    except UserError as exc:        # what the user can mend: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to go on (a stage in training saved a "
              "checkpoint first)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
