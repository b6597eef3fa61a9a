"""Theoretical FLOPs of a network pass (convolutions only) and the machine's matmul peak."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def conv_flops(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """2 x multiply-adds of every Conv3d / ConvTranspose3d for one input of `input_shape`."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = 1
        for v in module.kernel_size:
            k *= v
        if isinstance(module, nn.ConvTranspose3d):
            voxels = inputs[0][0, 0].numel()
        else:
            voxels = output[0, 0].numel()
        total += 2 * (module.in_channels // module.groups) * k * module.out_channels * voxels

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.inference_mode():
        net(torch.zeros(1, net.cfg.in_channels, *input_shape))
    for h in handles:
        h.remove()
    return total


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9
