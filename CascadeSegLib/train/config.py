"""One config file describes a training run (JSON; YAML when PyYAML is installed).

Relative paths in the config are relative to the config file's folder, so a config can be
moved together with its data. Sizes, spacings and tiles are (x, y, z) like model.json.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import UserError
from ..inference.preprocess import package_problem
from ..jsonkinds import kind_problem, wrong_kind
from ..network import NetConfig, output_shape
from .augment import AugmentConfig
from .losses import LOSSES


@dataclass
class TrainSettings:
    """Optimisation settings; a stage may override any of them."""

    iterations: int = 1000
    batch_size: int = 2
    optimizer: str = "sgd"            # "sgd" (momentum, the paper's Caffe) or "adamw"
    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    schedule: str = "poly"            # "poly", "cosine", "constant"
    warmup: int = 0                   # linear warm-up iterations
    grad_clip: float = 12.0           # 0 = off
    loss: str = "wce+dice"
    class_balance: str = "patch"      # lambda_k of the weighted CE from the "image" (paper) or the sub-volume
    amp: bool = True                  # mixed precision (CUDA only)
    cpu_bf16: bool = False            # bfloat16 autocast when training on a CPU that computes it natively
                                      # (AMX or AVX512-BF16; elsewhere ignored): README, Training
    compile_network: bool = False     # torch.compile the training forward (fixed sub-volume shape); falls
                                      # back to eager if compiling fails (e.g. no C++ compiler): README, Training
    foreground_fraction: float = 0.33 # share of sub-volumes centred on a labelled voxel of C
    checkpoint_every: int = 100
    checkpoint_minutes: float = 15.0  # also save once this long has passed since the last save (0 = off):
                                      # a CPU sitting that ends without warning loses at most this much
    keep_checkpoints: int = 3
    val_every: int = 100
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = False
    threads: int = 0                  # torch CPU threads for this run (0 = torch's default)
    freeze_encoder: bool = False      # fine-tuning: keep the encoder's weights fixed
    save_rank_weights: bool = False   # write every DDP rank's final weights (checks)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"train.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise UserError(f"train.schedule must be 'poly', 'cosine' or 'constant', got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise UserError(f"train.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.class_balance not in ("patch", "image"):
            raise UserError(f"train.class_balance must be 'patch' or 'image', got {self.class_balance!r}")
        if not self.checkpoint_minutes >= 0:
            raise UserError(f"train.checkpoint_minutes must be >= 0 (0 = off), got {self.checkpoint_minutes!r}")
        if self.iterations < 0 or self.batch_size < 1:
            raise UserError("train.iterations must be >= 0 and train.batch_size >= 1")


@dataclass
class StageConfig:
    name: str
    spacing: tuple[float, float, float]
    tile: tuple[int, int, int]          # inference tile (x, y, z), written to model.json
    patch: tuple[int, int, int]         # training sub-volume (x, y, z)
    network: NetConfig
    train: TrainSettings
    augment: AugmentConfig

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return (self.patch[2], self.patch[1], self.patch[0])

    @property
    def tile_zyx(self) -> tuple[int, int, int]:
        return (self.tile[2], self.tile[1], self.tile[0])


class ConfigPaths:
    """What every run config (3D cascade, 2D baseline) derives from `base_dir` and `labels`."""

    base_dir: Path
    labels: list[str]

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def label_set(self):
        from ..labels import LabelSet

        return LabelSet.from_names(self.labels)


@dataclass
class RunConfig(ConfigPaths):
    name: str
    labels: list[str]
    data: dict[str, Any]
    stages: list[StageConfig]
    window: tuple[float, float] = (-200.0, 300.0)
    normalization: str = "window01"
    body_threshold_hu: float = -500.0
    dilation_radius: int = 3
    version: str = "1.0.0"
    description: str = ""
    license: str = ""
    model_card: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    base_dir: Path = Path(".")
    raw: dict[str, Any] = field(default_factory=dict)



_TOP_KEYS = {"name", "version", "description", "license", "labels", "data", "intensity", "body_threshold_hu",
             "dilation_radius", "stages", "train", "augment", "run_dir", "model_card", "finetune", "$schema",
             "comment", "postprocess"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a JSON (or, with PyYAML, YAML) config file into a dict."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file {p} not found; pass the path of a training config (JSON)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"{p} is YAML but PyYAML is not installed; `pip install pyyaml` or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} must hold a JSON object")
    return data


def _triple(value: Any, what: str, kind: type) -> tuple:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if isinstance(value, str):
        value = value.lower().split("x")
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be three numbers (x, y, z), got {value!r}") from None
    if len(out) != 3 or any(v <= 0 for v in out):
        raise UserError(f"{what} must be three positive numbers (x, y, z), got {value!r}")
    return out


def _dataclass_from(cls: type, d: dict[str, Any], what: str):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"unknown {what} setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    problem = wrong_kind(cls, d, what)
    if problem:
        raise UserError(f"{problem}; fix it in the config")
    return cls(**d)


def parse_config(data: dict[str, Any], base_dir: str | Path = ".") -> RunConfig:
    """Validate a config dict; errors name the offending key."""
    data = copy.deepcopy(data)
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(f"unknown config key(s) {sorted(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "labels", "data", "stages"):
        if key not in data:
            raise UserError(f"the config has no {key!r}; see configs/abdomen-ct-demo.json for an example")
    labels = [str(n) for n in data["labels"]]
    num_classes = len(labels) + 1
    train_defaults = data.get("train", {}) or {}
    aug_defaults = data.get("augment", {}) or {}
    stages = []
    for i, s in enumerate(data["stages"]):
        s = dict(s)
        name = str(s.pop("name", f"stage{i + 1}"))
        try:
            net = NetConfig.from_json({**s.pop("network", {}), "num_classes": num_classes})
        except (TypeError, ValueError) as exc:
            raise UserError(f"stage {name}: bad network settings ({exc})") from None
        tile = _triple(s.pop("tile", [64, 64, 64]), f"stage {name} tile", int)
        patch = _triple(s.pop("patch", tile), f"stage {name} patch", int)
        spacing = _triple(s.pop("spacing", [3, 3, 3]), f"stage {name} spacing", float)
        train = _dataclass_from(TrainSettings, {**train_defaults, **s.pop("train", {})}, "train")
        try:
            aug = AugmentConfig.from_json({**aug_defaults, **s.pop("augment", {})})
        except ValueError as exc:
            raise UserError(f"stage {name}: {exc}") from None
        if s:
            raise UserError(f"stage {name}: unknown setting(s) {sorted(s)}")
        for what, size in (("patch", patch), ("tile", tile)):
            try:
                output_shape(net, size[::-1])
            except ValueError as exc:
                raise UserError(f"stage {name}: {what} {size} does not fit the network ({exc})") from None
        stages.append(StageConfig(name, spacing, tile, patch, net, train, aug))
    if not 1 <= len(stages) <= 2:
        raise UserError(f"a cascade has 1 or 2 stages, the config lists {len(stages)}")
    base = Path(base_dir)
    run_dir = data.get("run_dir")
    cfg = RunConfig(
        name=str(data["name"]), labels=labels, data=dict(data["data"]), stages=stages, **package_settings(data),
        model_card=dict(data.get("model_card", {}) or {}),
        run_dir=(Path(run_dir) if Path(run_dir).is_absolute() else base / run_dir) if run_dir else None,
        base_dir=base, raw=data)
    return with_checked_labels(cfg)


def package_settings(data: dict[str, Any]) -> dict[str, Any]:
    """What every model package carries besides its stages, with the defaults: the intensity window
    and normalisation, the body-mask threshold (C1), the C2 dilation, version, description, licence.
    One place for the cascade's and the 2D baseline's configs; a value that could not make a
    working package is refused here, before any training."""
    intensity = data.get("intensity", {}) or {}
    if not isinstance(intensity, dict):
        raise UserError(f'"intensity" must be an object such as {{"window": [-200, 300]}}, got '
                        f"{json.dumps(intensity)}; fix it in the config")
    window = intensity.get("window", [-200.0, 300.0])
    normalization = intensity.get("normalization", "window01")
    dilation_radius = data.get("dilation_radius", 3)
    problems = [kind_problem(w, float, "intensity.window") for w in window] \
        if isinstance(window, (list, tuple)) else \
        [f"intensity.window must be two HU values such as [-200, 300], got {json.dumps(window)}"]
    problems += [kind_problem(normalization, str, "intensity.normalization"),
                 kind_problem(data.get("body_threshold_hu", -500.0), float, "body_threshold_hu"),
                 kind_problem(dilation_radius, int, "dilation_radius")]
    # the kinds first: the package check compares and converts what they let through
    problem = next((p for p in problems if p), None) \
        or package_problem([float(w) for w in window], normalization, dilation_radius)
    if problem:
        raise UserError(f"{problem}; fix it in the config")
    return {"window": tuple(float(w) for w in window), "normalization": normalization,
            "body_threshold_hu": float(data.get("body_threshold_hu", -500.0)),
            "dilation_radius": dilation_radius, "version": str(data.get("version", "1.0.0")),
            "description": str(data.get("description", "")), "license": str(data.get("license", ""))}


class _HasLabels(Protocol):
    def label_set(self) -> Any: ...


ConfigT = TypeVar("ConfigT", bound=_HasLabels)


def with_checked_labels(cfg: ConfigT) -> ConfigT:
    """`cfg` once its label list makes a valid label set (a one-line error otherwise)."""
    try:
        cfg.label_set()
    except (ValueError, KeyError) as exc:
        raise UserError(f"bad label list: {exc}") from None
    return cfg


def load_config(path: str | Path) -> RunConfig:
    p = Path(path).expanduser().resolve()
    return parse_config(read_config_file(p), p.parent)


def stage_to_json(stage: StageConfig) -> dict[str, Any]:
    return {"name": stage.name, "spacing": list(stage.spacing), "tile": list(stage.tile), "patch": list(stage.patch),
            "network": stage.network.to_json(), "train": asdict(stage.train), "augment": stage.augment.to_json()}
