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
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write
from .cascade import Segmenter
from .errors import Cancelled, ModelError, UserError
from .model import ModelPackage, StageSpec
from .network import ConfiguredNetwork, NetConfig, fold_batchnorm, make_norm
from .predictor import Predictor, make_predictor
from .preprocess import GridWindows
from .train.config import ConfigPaths

ARCHITECTURE = "2d-three-view"
VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}
"""Array axis (z, y, x) along which a view's slices run."""
FUSIONS = ("mean", "vote")


# --------------------------------------------------------------------------- views


def _check_view(view: str) -> int:
    if view not in VIEW_AXIS:
        raise ValueError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
    return VIEW_AXIS[view]


def extract_view(volume: torch.Tensor, view: str, context: int = 1, pad_value: float = 0.0) -> torch.Tensor:
    """Slices of a (z, y, x) volume in one view with neighbours as channels: (S, 2c+1, H, W).

    Channel `context` is the slice itself, channel 0 the slice `context` before it along the
    view's axis; beyond the volume's ends the neighbours are `pad_value`.
    """
    axis = _check_view(view)
    v = volume.movedim(axis, 0)                       # (S, H, W), in-plane order kept
    if context <= 0:
        return v[:, None]
    padded = F.pad(v, (0, 0, 0, 0, context, context), value=float(pad_value))
    n = v.shape[0]
    return torch.stack([padded[i:i + n] for i in range(2 * context + 1)], dim=1)


def put_back(slices: torch.Tensor, view: str) -> torch.Tensor:
    """Inverse of `extract_view` for per-slice outputs (S, K, H, W) -> (K, z, y, x)."""
    axis = _check_view(view)
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
            _check_view(v)
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
    from .preprocess import bounding_box

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
                      stage: str, labels_only: bool = False) -> torch.Tensor:
        """The StagePredictor step: the stage's views over the mask's box, fused; `overlap` is unused."""
        from . import preprocess

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
        return labels.to(torch.uint8) if labels_only else probs


def make_segmenter(model: ModelPackage, *args: Any, **kwargs: Any) -> Predictor:
    """`predictor.make_predictor`, where `fusion` is dropped for packages that have no views."""
    if not is_three_view(model):
        kwargs.pop("fusion", None)
    return make_predictor(model, *args, **kwargs)


# --------------------------------------------------------------------------- training


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
    from .train.config import TrainSettings

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
    intensity = data.get("intensity") or {}
    cfg = Baseline2DConfig(
        name=str(data["name"]), labels=labels, data=dict(data["data"]), stages=stages, options=options,
        window=tuple(float(w) for w in intensity.get("window", (-200.0, 300.0))),  # type: ignore[arg-type]
        normalization=str(intensity.get("normalization", "window01")),
        body_threshold_hu=float(data.get("body_threshold_hu", -500.0)),
        dilation_radius=int(data.get("dilation_radius", 3)), version=str(data.get("version", "1.0.0")),
        description=str(data.get("description", "")), license=str(data.get("license", "")),
        base_dir=Path(base_dir), intensity_aug=float((data.get("augment") or {}).get("intensity", 0.1)), raw=data)
    try:
        cfg.label_set()
    except (ValueError, KeyError) as exc:
        raise UserError(f"bad label list: {exc}") from None
    return cfg


def load_baseline_config(path: str | Path) -> Baseline2DConfig:
    from .train.config import read_config_file

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
    axis = _check_view(view)
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
    from .train.dataset import build_cached_case, discover_cases, label_lookup, read_split
    from .train.losses import make_loss
    from .train.sampling import CandidateSampler
    from .train.trainer import lr_factor, pad_value_for, resolve_train_device

    if overwrite and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": cfg.raw, "base_dir": str(cfg.base_dir)}, indent=2))
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
        (folder / "log.json").write_text(json.dumps(log_rows))
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
