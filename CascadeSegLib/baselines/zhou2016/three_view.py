"""The 2D three-view baseline of Zhou et al. 2016 (docs/method.md section 8), packaged like a cascade.

One 2D FCN per view (axial, coronal, sagittal) sees three consecutive slices as channels
("3-slice" input) and predicts the middle slice; the three views' softmax probabilities are put
back into the volume and fused by averaging (Zhou et al.) or by majority vote of the per-view
labels (the 2D competitor of Roth et al. 2018, Table 4). A package has a coarse stage (over the
body mask C1) and a fine stage (over C2, the dilated coarse foreground), exactly like the 3D
cascade, so `Segmenter`'s whole pipeline (grids, C1/C2, resampling back, timings) is reused:
`ThreeViewSegmenter` only replaces how one stage predicts.

Package format: a normal model.json plus two top-level keys, ignored by older readers:
    "architecture": "2d-three-view",
    "three_view": {"views": ["axial", "coronal", "sagittal"], "fusion": "mean", "context": 1}
Each stage's `network` is a NetConfig read as a 2D U-Net (kind "padded", in_channels =
2*context+1); its weight file holds one state_dict with keys "<view>.<parameter>".

Axes: volumes are (z, y, x). The axial view slices along z (planes (y, x)), the coronal view
along y (planes (z, x)), the sagittal view along x (planes (z, y)); in-plane axes keep their
volume order, so a slice is never transposed.

Training (config, patches, the loop) is in three_view_train.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...atomic import atomic_write
from ...errors import Cancelled, ModelError, UserError
from ...inference.cascade import Segmenter
from ...inference.predictor import Predictor, make_predictor
from ...inference.preprocess import GridWindows
from ...inference.tiling import LabelsFn, labels_over
from ...network import ConfiguredNetwork, NetConfig, fold_batchnorm, make_norm
from ...packaging.model import ModelPackage

ARCHITECTURE = "2d-three-view"
VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
"""Array axis (z, y, x) along which a view's slices run."""
FUSIONS = ("mean", "vote")


# --------------------------------------------------------------------------- views


def check_view(view: str) -> int:
    """The array axis of `view`; a ValueError naming the views for anything else."""
    if view not in VIEW_AXIS:
        raise ValueError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
    return VIEW_AXIS[view]


def extract_view(volume: torch.Tensor, view: str, context: int = 1, pad_value: float = 0.0) -> torch.Tensor:
    """Slices of a (z, y, x) volume in one view with neighbours as channels: (S, 2c+1, H, W).

    Channel `context` is the slice itself, channel 0 the slice `context` before it along the
    view's axis; beyond the volume's ends the neighbours are `pad_value`.
    """
    axis = check_view(view)
    v = volume.movedim(axis, 0)                       # (S, H, W), in-plane order kept
    if context <= 0:
        return v[:, None]
    padded = F.pad(v, (0, 0, 0, 0, context, context), value=float(pad_value))
    n = v.shape[0]
    return torch.stack([padded[i:i + n] for i in range(2 * context + 1)], dim=1)


def put_back(slices: torch.Tensor, view: str) -> torch.Tensor:
    """Inverse of `extract_view` for per-slice outputs (S, K, H, W) -> (K, z, y, x)."""
    axis = check_view(view)
    return slices.movedim(1, 0).movedim(1, axis + 1)


def fuse(per_view: Sequence[torch.Tensor], method: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (K, ...), labels) fused from the views' probabilities (K, ...) each.

    'mean' averages the probabilities and takes the arg-max (Zhou et al.). 'vote' counts the
    views' arg-max labels per voxel and takes the label most views agree on, ties (e.g. three
    different labels) broken by the mean probability; its probabilities are the vote fractions
    (plus 1% of the mean, the tie-break), so their arg-max is the vote's label.
    """
    if method not in FUSIONS:
        raise UserError(f"unknown fusion {method!r}; use 'mean' or 'vote'")
    mean = torch.stack(list(per_view)).mean(0)
    if method == "mean":
        return mean, mean.argmax(0)
    votes = torch.zeros_like(mean)
    for p in per_view:
        votes.scatter_add_(0, p.argmax(0, keepdim=True), torch.ones_like(votes[:1]))
    n, eps = float(len(per_view)), 0.01
    probs = (votes + eps * mean) / (n + eps)
    return probs, probs.argmax(0)


# --------------------------------------------------------------------------- network


class _Block2d(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        bias = norm == "none"
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), make_norm(norm, cout, dims=2),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), make_norm(norm, cout, dims=2),
                         nn.ReLU(inplace=True))


class UNet2D(nn.Module):
    """A padded 2D U-Net (an FCN with skip connections) configured by a NetConfig."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        if cfg.kind != "padded":
            raise ValueError("the 2D baseline uses padded networks (network.kind 'padded')")
        self.cfg = cfg
        self.encoders = nn.ModuleList()
        chans = []
        cin = cfg.in_channels
        for level in range(cfg.depth):
            c = min(cfg.base_channels * 2 ** level, cfg.max_channels)
            self.encoders.append(_Block2d(cin, c, cfg.norm))
            chans.append(c)
            cin = c
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(cfg.depth - 1)):
            self.ups.append(nn.ConvTranspose2d(cin, chans[level], 2, stride=2))
            self.decoders.append(_Block2d(2 * chans[level], chans[level], cfg.norm))
            cin = chans[level]
        self.head = nn.Conv2d(cin, cfg.num_classes, 1)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.cfg.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


class ThreeViewNet(nn.Module):
    """One UNet2D per view; the state_dict keys are '<view>.<parameter>'."""

    def __init__(self, cfg: NetConfig, views: Sequence[str] = VIEWS) -> None:
        super().__init__()
        for v in views:
            check_view(v)
        self.cfg = cfg
        self.views = tuple(views)
        self.nets = nn.ModuleDict({v: UNet2D(cfg) for v in self.views})

    def view_net(self, view: str) -> UNet2D:
        """The UNet2D of one view ('axial', 'coronal' or 'sagittal')."""
        return cast(UNet2D, self.nets[view])

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        sd = super().state_dict(*args, **kwargs)
        return {k[len("nets."):] if k.startswith("nets.") else k: v for k, v in sd.items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return super().load_state_dict({f"nets.{k}": v for k, v in state.items()}, strict=strict, assign=assign)


# --------------------------------------------------------------------------- prediction


def _pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (h, w)


def predict_view(net: UNet2D, volume: torch.Tensor, view: str, context: int = 1, pad_value: float = 0.0,
                 batch_size: int = 16, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Softmax probabilities (K, z, y, x) of one view's network over every slice of `volume`."""
    slices = extract_view(volume, view, context, pad_value)
    slices, (h, w) = _pad_to_multiple(slices, net.multiple, pad_value)
    out = []
    with torch.inference_mode():
        for b in range(0, slices.shape[0], batch_size):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            logits = net(slices[b:b + batch_size].float())
            out.append(torch.softmax(logits.float(), dim=1)[..., :h, :w])
    return put_back(torch.cat(out), view)


def predict_three_view(nets: ThreeViewNet, volume: torch.Tensor, mask: torch.Tensor, num_classes: int,
                       fusion: str = "mean", context: int = 1, pad_value: float = 0.0, border: int = 8,
                       batch_size: int = 16, progress: Callable[[float, str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused probabilities (K, z, y, x), fused labels) over the bounding box of `mask`.

    Only the box of the mask plus `border` voxels of real image context is predicted; outside
    it the probabilities are 0 and the labels background. `volume` is normalised (z, y, x).
    """
    from ...inference.preprocess import bounding_box

    shape = tuple(volume.shape)
    probs = torch.zeros((num_classes,) + shape, dtype=torch.float32, device=volume.device)
    labels = torch.zeros(shape, dtype=torch.long, device=volume.device)
    box = bounding_box(mask, pad=border, shape=shape)
    if box is None:
        return probs, labels
    sl = tuple(slice(a, b) for a, b in box)
    crop = volume[sl]
    per_view = []
    for i, view in enumerate(nets.views):
        per_view.append(predict_view(nets.view_net(view), crop, view, context, pad_value, batch_size, cancel))
        if progress is not None:
            progress((i + 1) / len(nets.views), f"view {view} ({i + 1}/{len(nets.views)})")
    fused, lab = fuse(per_view, fusion)
    probs[(slice(None),) + sl] = fused
    labels[sl] = lab
    return probs, labels


# --------------------------------------------------------------------------- packages


@dataclass
class ThreeViewOptions:
    views: tuple[str, ...] = VIEWS
    fusion: str = "mean"
    context: int = 1

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        for v in self.views:
            if v not in VIEW_AXIS:
                raise ModelError(f"unknown view {v!r} in model.json three_view.views; use {', '.join(VIEWS)}")
        if not self.views:
            raise ModelError("model.json three_view.views is empty; list at least one view")
        if self.fusion not in FUSIONS:
            raise ModelError(f"unknown fusion {self.fusion!r} in model.json; use 'mean' or 'vote'")
        if not 0 <= int(self.context) <= 5:
            raise ModelError("three_view.context must be 0..5 slices")
        self.context = int(self.context)

    def to_json(self) -> dict[str, Any]:
        return {"views": list(self.views), "fusion": self.fusion, "context": self.context}


def _model_json(model: ModelPackage) -> dict[str, Any]:
    if model.root is None or not (model.root / "model.json").is_file():
        return {}
    try:
        return json.loads((model.root / "model.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def architecture(model: ModelPackage) -> str:
    """'2d-three-view' for baseline packages, '3d-cascade' otherwise."""
    arch = getattr(model, "architecture", None)      # a future ModelPackage field
    if arch:
        return str(arch)
    return str(_model_json(model).get("architecture", "3d-cascade"))


def is_three_view(model: ModelPackage) -> bool:
    return architecture(model) == ARCHITECTURE


def three_view_options(model: ModelPackage) -> ThreeViewOptions:
    opts = getattr(model, "architecture_options", None) or _model_json(model).get("three_view", {})
    try:
        return ThreeViewOptions(**opts)
    except TypeError as exc:
        raise ModelError(f"model {model.name}: bad three_view settings ({exc}); fix model.json") from None


def save_three_view_package(pkg: ModelPackage, folder: str | Path, state_dicts: Sequence[dict[str, torch.Tensor]],
                            options: ThreeViewOptions) -> ModelPackage:
    """Write a 2D three-view package: the normal files plus the architecture keys in model.json."""
    folder = Path(folder)
    pkg.save(folder, state_dicts)
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta["architecture"] = ARCHITECTURE
    meta["three_view"] = options.to_json()
    atomic_write(folder / "model.json", json.dumps(meta, indent=2) + "\n")
    return ModelPackage.load(folder)


def load_three_view_network(model: ModelPackage, index: int, views: Sequence[str]) -> ThreeViewNet:
    """Build a stage's ThreeViewNet and load its sha256-checked weights (the package's checks)."""
    net = ThreeViewNet(model.stages[index].network, views)
    return model.fill_network(index, net, what="2D network")


class ThreeViewSegmenter(Segmenter):
    """The `predictor.Predictor` of 2D three-view packages: Segmenter's arguments, `segment()` and outputs.

    Only `predict_stage` differs (views fused instead of 3D tiles); `overlap` has no
    meaning here and is ignored. `fusion` overrides the package's fusion ('mean' or 'vote').
    """

    def __init__(self, model: ModelPackage, *args: Any, fusion: str | None = None, **kwargs: Any) -> None:
        if not is_three_view(model):
            raise ModelError(f"model {model.name} is not a 2D three-view package; use Segmenter")
        super().__init__(model, *args, **kwargs)
        self.options = three_view_options(model)
        if fusion is not None:
            if fusion not in FUSIONS:
                raise UserError(f"unknown fusion {fusion!r}; use 'mean' or 'vote'")
            self.options = ThreeViewOptions(self.options.views, fusion, self.options.context)
        if self.batch_size < 8:
            self.batch_size = 8 if self.device.type == "cpu" else 32   # slices, not 3D tiles

    def network(self, index: int) -> ConfiguredNetwork:
        if index not in self._nets:
            net = load_three_view_network(self.model, index, self.options.views)
            fold_batchnorm(net)
            self._nets[index] = net.to(self.device).eval()
        return self._nets[index]

    def predict_stage(self, index: int, hu: torch.Tensor | GridWindows, mask: torch.Tensor, overlap: float,
                      stage: str, labels_only: bool = False, to_labels: LabelsFn | None = None) -> torch.Tensor:
        """The StagePredictor step: the stage's views over the mask's box, fused; `overlap` is unused.
        `to_labels` as in Segmenter.predict_stage (applied slab by slab to the fused probabilities)."""
        from ...inference import preprocess

        if isinstance(hu, preprocess.GridWindows):
            hu = hu.full()                  # views need whole slices
        volume = preprocess.normalize(hu, self.model.window, self.model.normalization)
        pad_value = float(preprocess.normalize(torch.tensor(-1024.0), self.model.window, self.model.normalization))
        net = self.network(index)
        if not isinstance(net, ThreeViewNet):
            raise TypeError(f"stage {index} of a 2D three-view package is a {type(net).__name__}, not a ThreeViewNet")
        probs, labels = predict_three_view(
            net, volume, mask, self.model.labels.num_classes, self.options.fusion,
            self.options.context, pad_value, batch_size=self.batch_size,
            progress=lambda f, msg: self._report(stage, f, msg), cancel=self.cancel)
        if labels_only and to_labels is not None:
            return labels_over(probs, mask, to_labels)
        return labels.to(torch.uint8) if labels_only else probs


def make_segmenter(model: ModelPackage, *args: Any, **kwargs: Any) -> Predictor:
    """`predictor.make_predictor`, where `fusion` is dropped for packages that have no views."""
    if not is_three_view(model):
        kwargs.pop("fusion", None)
    return make_predictor(model, *args, **kwargs)
