"""3D U-Nets: the paper's valid-convolution network and a fast padded variant.

Tensors are (N, C, D, H, W) with D, H, W = z, y, x (SimpleITK array order). Shapes given to
and returned by the helpers here are in that order too.

- ``kind="valid"`` is Cicek et al.'s 3D U-Net as used by Roth et al. 2018: unpadded 3x3x3
  convolutions, channels 32-64 | 64-128 | 128-256 | 256-512, BatchNorm, so a 116x132x132
  (z, y, x) tile gives a 28x44x44 output (about 19 M parameters).
- ``kind="padded"`` keeps the output the size of the input (tiles can abut without margins)
  and has a configurable width, depth and normalisation; this is what runs fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
from torch import nn

from .jsonkinds import wrong_kind


@dataclass
class NetConfig:
    kind: str = "padded"          # "valid" (the paper's) or "padded"
    in_channels: int = 1
    num_classes: int = 2
    base_channels: int = 32       # channels of the first convolution
    depth: int = 4                # resolution levels (pooling steps = depth - 1)
    norm: str = "batch"           # "batch", "instance" or "none"
    max_channels: int = 512

    def __post_init__(self) -> None:
        if self.kind not in ("valid", "padded"):
            raise ValueError(f"network kind must be 'valid' or 'padded', got {self.kind!r}")
        if self.norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {self.norm!r}")
        if self.depth < 1:
            raise ValueError("depth must be >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> NetConfig:
        known = {f.name for f in fields(NetConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network settings {sorted(unknown)}")
        problem = wrong_kind(NetConfig, d, "network")
        if problem:
            raise ValueError(problem)
        return NetConfig(**d)

    @staticmethod
    def paper(num_classes: int, in_channels: int = 1) -> NetConfig:
        """Roth et al. 2018 / Cicek et al. 2016 configuration."""
        return NetConfig(kind="valid", in_channels=in_channels, num_classes=num_classes,
                         base_channels=32, depth=4, norm="batch", max_channels=512)


class ConfiguredNetwork(Protocol):
    """What tiling and the segmenters need of a network: its `NetConfig` (tile geometry, the
    number of classes) and a forward call. `UNet3D` and the 2D baseline's `ThreeViewNet` are."""

    cfg: NetConfig

    def __call__(self, x: torch.Tensor, /) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def make_norm(kind: str, channels: int, dims: int = 3) -> nn.Module:
    """The normalisation layer named in a NetConfig, for 3D (or, for the 2D baseline, 2D) maps."""
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by normalisation and ReLU."""

    def __init__(self, cin: int, cmid: int, cout: int, norm: str, padding: int) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv3d(cin, cmid, 3, padding=padding, bias=bias), make_norm(norm, cmid), nn.ReLU(inplace=True),
            nn.Conv3d(cmid, cout, 3, padding=padding, bias=bias), make_norm(norm, cout), nn.ReLU(inplace=True),
        )


def _center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    d, h, w = x.shape[-3:]
    oz, oy, ox = (d - shape[0]) // 2, (h - shape[1]) // 2, (w - shape[2]) // 2
    return x[..., oz:oz + shape[0], oy:oy + shape[1], ox:ox + shape[2]]


class UNet3D(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pad = 0 if cfg.kind == "valid" else 1
        cap = cfg.max_channels
        self.encoders = nn.ModuleList()
        skip_channels = []
        cin = cfg.in_channels
        for level in range(cfg.depth):
            c = min(cfg.base_channels * 2 ** level, cap)
            if cfg.kind == "valid":   # paper: 32 -> 64, 64 -> 128, ...
                cmid, cout = c, min(2 * c, cap)
            else:                     # padded: c -> c
                cmid, cout = c, c
            self.encoders.append(ConvBlock(cin, cmid, cout, cfg.norm, pad))
            skip_channels.append(cout)
            cin = cout
        self.pool = nn.MaxPool3d(2, 2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(cfg.depth - 1)):
            skip = skip_channels[level]
            if cfg.kind == "valid":   # up-convolution keeps channels (Cicek et al.)
                up_out = cin
                dec_out = min(cfg.base_channels * 2 ** (level + 1), cap)
            else:
                up_out = skip
                dec_out = skip
            self.ups.append(nn.ConvTranspose3d(cin, up_out, 2, stride=2))
            self.decoders.append(ConvBlock(up_out + skip, dec_out, dec_out, cfg.norm, pad))
            cin = dec_out
        self.head = nn.Conv3d(cin, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.ups, self.decoders):
            x = up(x)
            skip = skips.pop()
            if skip.shape[-3:] != x.shape[-3:]:
                skip = _center_crop(skip, x.shape[-3:])
            x = dec(torch.cat([skip, x], dim=1))
        return self.head(x)

    # --- geometry -------------------------------------------------------------------------
    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return output_shape(self.cfg, input_shape)


def build_network(cfg: NetConfig) -> UNet3D:
    return UNet3D(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_shape(cfg: NetConfig, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Output size of one axis-triple; raises ValueError for sizes the network cannot take."""
    out = []
    for n in input_shape:
        out.append(_axis_out(cfg, int(n)))
    return tuple(out)


def _axis_out(cfg: NetConfig, n: int) -> int:
    if cfg.kind == "padded":
        f = 2 ** (cfg.depth - 1)
        if n % f:
            raise ValueError(f"padded network input sizes must be multiples of {f}, got {n}")
        return n
    size = n
    for _ in range(cfg.depth - 1):
        size -= 4
        if size <= 0 or size % 2:
            raise ValueError(f"valid network cannot take input size {n}")
        size //= 2
    size -= 4
    for _ in range(cfg.depth - 1):
        size = size * 2 - 4
    if size <= 0:
        raise ValueError(f"valid network cannot take input size {n}")
    return size


def margin(cfg: NetConfig) -> int:
    """Voxels lost on each side of an axis by a valid network (0 for padded)."""
    if cfg.kind == "padded":
        return 0
    n = valid_input_size(cfg, 8)
    return (n - _axis_out(cfg, n)) // 2


def valid_input_size(cfg: NetConfig, at_least_output: int) -> int:
    """Smallest input size whose output is >= `at_least_output` along one axis."""
    if cfg.kind == "padded":
        f = 2 ** (cfg.depth - 1)
        return max(f, -(-at_least_output // f) * f)
    n = at_least_output
    while True:
        try:
            if _axis_out(cfg, n) >= at_least_output:
                return n
        except ValueError:
            pass
        n += 1


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding convolution (inference speed-up; 2D or 3D)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = ((nn.Conv3d, nn.BatchNorm3d), (nn.Conv2d, nn.BatchNorm2d))
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (name_a, a), (name_b, b) in zip(children, children[1:]):
                for conv, norm in pairs:
                    if isinstance(a, conv) and isinstance(b, norm):
                        setattr(module, name_a, fuse_conv_bn_eval(a.eval(), b.eval()))
                        setattr(module, name_b, nn.Identity())
    return model


class OneDnnConv3d(nn.Conv3d):
    """A Conv3d that always takes oneDNN (MKL-DNN) for CPU inference.

    PyTorch sends a one-sample 3D convolution with few channels x slices (N*C*D*H <= 20480,
    e.g. 16 channels on a 32^3 map) to its generic im2col kernel, which measured 2-8x slower
    than oneDNN on those layers here; a whole padded U-Net pass drops by about a quarter.
    Training, autograd, GPUs and other dtypes keep the stock path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


def prefer_onednn(model: nn.Module) -> nn.Module:
    """Switch a network's 3x3x3 convolutions to `OneDnnConv3d` (same parameters, in place)
    when this PyTorch has oneDNN; 1x1x1 heads stay (the stock kernel is faster there)."""
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Conv3d and max(module.kernel_size) > 1:
            module.__class__ = OneDnnConv3d
    return model
