"""torchrun / DDP plumbing: one process per GPU (NCCL) or per CPU worker (gloo).

`torchrun --nproc_per_node N [--nnodes M ...] -m CascadeSegLib.train CONFIG` sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; without them training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local, owns_group=owns)


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Make BatchNorm running statistics identical on every rank (rank 0's)."""
    if not ctx.active:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
