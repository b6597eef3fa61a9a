"""What storing 3D tensors channels-last (`torch.channels_last_3d`) does to a training step, in one run.

A CPU trains the default model's networks over several sittings (about 16 s a stage-2 step on two
cores), so a faster step is hours saved. For each stage of a training config: that stage's
network, batch and sub-volume, one step (forward, the config's loss, backward, the config's optimiser) on
a fixed random batch, and the inference forward pass on one tile; the default memory layout and
channels-last alternate so both see the same machine load. Medians of `--repeats` timings after
one warm-up each, the ratio channels-last / default (below 1: channels-last is faster), and the
largest difference of the two layouts' logits (the same arithmetic, reordered: float rounding only).

    python benchmarks/bench_train_step.py [--config configs/abdomen-ct-networks.json] [--repeats 5]
        [--threads 2] [--stages stage2] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import REPO, median, table

from CascadeSegLib.network import build_network
from CascadeSegLib.train.config import parse_config, read_config_file
from CascadeSegLib.train.losses import make_loss

LAYOUTS = {"default": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def _batch(stage, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, shape = stage.train.batch_size, stage.patch_zyx
    x = torch.randn((n, 1, *shape), generator=g)
    y = torch.randint(0, num_classes, (n, *shape), generator=g)
    return x, y, torch.ones((n, *shape), dtype=torch.bool)


class Runner:
    """One network and optimiser per layout, started from the same weights."""

    def __init__(self, stage, num_classes: int, layout: torch.memory_format) -> None:
        torch.manual_seed(0)
        self.layout = layout
        self.net = build_network(stage.network).to(memory_format=layout)
        s = stage.train
        self.opt: torch.optim.Optimizer = (
            torch.optim.AdamW(self.net.parameters(), lr=1e-5, weight_decay=s.weight_decay) if s.optimizer == "adamw"
            else torch.optim.SGD(self.net.parameters(), lr=1e-5, momentum=s.momentum, nesterov=s.momentum > 0))
        self.loss = make_loss(s.loss)
        x, self.y, self.w = _batch(stage, num_classes, seed=1)
        self.x = x.contiguous(memory_format=layout)
        self.tile = torch.randn((1, 1, *stage.tile_zyx),
                                generator=torch.Generator().manual_seed(2)).contiguous(memory_format=layout)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.net.train()
        logits = self.net(self.x)
        loss = self.loss(logits.float(), self.y, self.w, None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0

    def infer(self) -> tuple[float, torch.Tensor]:
        self.net.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.net(self.tile)
        return time.perf_counter() - t0, out


def bench_stage(stage, num_classes: int, repeats: int) -> dict:
    runners = {name: Runner(stage, num_classes, fmt) for name, fmt in LAYOUTS.items()}
    # Same weights before any step: the inference outputs of the two layouts are comparable.
    _, out_a = runners["default"].infer()
    _, out_b = runners["channels_last_3d"].infer()
    diff = float((out_a.float() - out_b.float()).abs().max())
    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "infer": []} for n in runners}
    for r in runners.values():               # warm-up (oneDNN picks its kernels on the first call)
        r.step()
    for i in range(repeats):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name]["step"].append(runners[name].step())
            times[name]["infer"].append(runners[name].infer()[0])
        print(f"  {stage.name} repeat {i + 1}/{repeats}: " + ", ".join(
            f"{n} step {times[n]['step'][-1]:.2f} s" for n in runners), file=sys.stderr, flush=True)
    med = {n: {k: median(v) for k, v in t.items()} for n, t in times.items()}
    return {"stage": stage.name, "batch": f"{stage.train.batch_size} x {'x'.join(map(str, stage.patch))}",
            "tile": "x".join(map(str, stage.tile)),
            "step_default": f"{med['default']['step']:.2f}", "step_cl": f"{med['channels_last_3d']['step']:.2f}",
            "step_ratio": f"{med['channels_last_3d']['step'] / med['default']['step']:.2f}",
            "infer_default": f"{med['default']['infer']:.2f}", "infer_cl": f"{med['channels_last_3d']['infer']:.2f}",
            "infer_ratio": f"{med['channels_last_3d']['infer'] / med['default']['infer']:.2f}",
            "max_logit_diff": f"{diff:.1e}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "abdomen-ct-networks.json"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the 2-core machine: 2)")
    p.add_argument("--stages", nargs="*", help="only these stages (default: all)")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = parse_config(read_config_file(args.config), Path(args.config).resolve().parent)
    num_classes = cfg.label_set().num_classes
    rows = [bench_stage(st, num_classes, args.repeats) for st in cfg.stages
            if not args.stages or st.name in args.stages]
    text = (f"Training step and inference tile, default layout vs channels_last_3d; torch {torch.__version__}, "
            f"{args.threads} threads, medians of {args.repeats} (after one warm-up), {Path(args.config).name}\n\n"
            + table(rows, [("stage", "stage"), ("batch", "batch x sub-volume"), ("step_default", "step default (s)"),
                           ("step_cl", "step channels-last (s)"), ("step_ratio", "ratio"),
                           ("tile", "tile"), ("infer_default", "tile default (s)"),
                           ("infer_cl", "tile channels-last (s)"), ("infer_ratio", "ratio"),
                           ("max_logit_diff", "max logit difference")]) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
