"""Model packages: everything needed to run a cascade, so prediction never guesses.

A package is a folder (or a .zip of one) holding `model.json` and one weight file per stage.
The weights' sha256 is recorded in model.json and checked before `torch.load`, which runs with
`weights_only=True` so a model file can never execute code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..atomic import atomic_path, atomic_write
from ..checksum import sha256_file
from ..errors import ModelError
from ..inference.atlas_prior import AtlasPriorSpec
from ..inference.preprocess import package_problem
from ..jsonkinds import kind_problem
from ..labels import LabelSet
from ..network import NetConfig, UNet3D, build_network
from ..resources import DEFAULT_MODEL, bundled_models_dir, models_dir

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

FORMAT_VERSION = 1


@dataclass
class StageSpec:
    name: str
    spacing: tuple[float, float, float]          # (x, y, z) mm
    tile: tuple[int, int, int]                   # network input tile (x, y, z) voxels
    network: NetConfig
    weights: str                                 # file name inside the package
    sha256: str = ""

    @property
    def tile_zyx(self) -> tuple[int, int, int]:
        return (self.tile[2], self.tile[1], self.tile[0])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spacing": list(self.spacing), "tile": list(self.tile),
                "network": self.network.to_json(), "weights": self.weights, "sha256": self.sha256}

    @staticmethod
    def from_json(d: dict[str, Any]) -> StageSpec:
        name = str(d["name"])
        for key, kind, unit in (("spacing", float, "mm"), ("tile", int, "voxels")):
            values = d[key]
            # a zero, negative or two-value spacing failed deep inside resampling; a 64.5 tile was cut to 64
            if not isinstance(values, list) or len(values) != 3 \
                    or any(kind_problem(v, kind, key) or not 0 < v < math.inf for v in values):
                what = "numbers" if kind is float else "whole numbers"
                raise ValueError(f"stage {name}: {key} must be three positive {what} (x, y, z) in {unit}, "
                                 f"got {json.dumps(values)}")
        return StageSpec(name=name, spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
                         tile=tuple(d["tile"]),
                         network=NetConfig.from_json(d["network"]), weights=str(d["weights"]),
                         sha256=str(d.get("sha256", "")))


def _whole(value: Any, what: str) -> int:
    """`value` if it is a JSON whole number; int() would cut 2.5 to 2 without a word."""
    problem = kind_problem(value, int, what)
    if problem:
        raise ValueError(problem)
    return int(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    """`value` if it is a JSON object: dict() took a list of pairs and failed on a string with
    'dictionary update sequence element #0 has length 1'."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object ({{...}}), got {json.dumps(value)[:60]}")
    return dict(value)


@dataclass
class ModelPackage:
    name: str
    version: str
    labels: LabelSet
    stages: list[StageSpec]
    window: tuple[float, float] = (-200.0, 300.0)
    normalization: str = "window01"
    body_threshold_hu: float = -500.0
    dilation_radius: int = 3
    description: str = ""
    license: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    root: Path | None = None
    largest_component: list[str] = field(default_factory=list)  # organs kept as one connected piece
    architecture: str = "3d-cascade"             # or "2d-three-view" (baselines/zhou2016/three_view.py)
    architecture_options: dict[str, Any] = field(default_factory=dict)
    atlas_prior: AtlasPriorSpec | None = None    # registered atlases fused with stage 2 (atlas_prior.py)

    # --- (de)serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "description": self.description, "license": self.license,
            "labels": self.labels.to_json(),
            "intensity": {"window": list(self.window), "normalization": self.normalization},
            "body_mask": {"threshold_hu": self.body_threshold_hu},
            "dilation_radius": self.dilation_radius,
            "postprocess": {"largest_component": list(self.largest_component)},
            "stages": [s.to_json() for s in self.stages],
            "provenance": self.provenance,
        }
        if self.architecture != "3d-cascade":
            d["architecture"] = self.architecture
            d["three_view"] = self.architecture_options
        if self.atlas_prior is not None:
            d["atlas_prior"] = self.atlas_prior.to_json()
        return d

    @staticmethod
    def from_json(d: dict[str, Any], root: Path | None = None) -> ModelPackage:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(f"model format version {version!r} is not supported (this CascadeSeg reads "
                             f"version {FORMAT_VERSION}); update CascadeSeg or re-export the model")
        try:
            pkg = ModelPackage(
                name=str(d["name"]), version=str(d["version"]),
                labels=LabelSet.from_json(d["labels"]),
                stages=[StageSpec.from_json(s) for s in d["stages"]],
                window=tuple(float(w) for w in d["intensity"]["window"]),  # type: ignore[arg-type]
                normalization=str(d["intensity"].get("normalization", "window01")),
                body_threshold_hu=float(d.get("body_mask", {}).get("threshold_hu", -500.0)),
                dilation_radius=_whole(d.get("dilation_radius", 3), "dilation_radius"),
                largest_component=[str(n) for n in d.get("postprocess", {}).get("largest_component", [])],
                description=str(d.get("description", "")), license=str(d.get("license", "")),
                provenance=_object(d.get("provenance", {}), "provenance"), format_version=int(version),
                root=root, architecture=str(d.get("architecture", "3d-cascade")),
                architecture_options=_object(d.get("three_view", {}), "three_view"),
                atlas_prior=AtlasPriorSpec.from_json(d["atlas_prior"]) if "atlas_prior" in d else None)
        except (KeyError, TypeError, ValueError) as exc:
            where = f" in {root / 'model.json'}" if root else ""
            raise ModelError(f"model.json{where} is invalid ({type(exc).__name__}: {exc}); "
                             "re-export or re-install the model") from None
        problem = package_problem(pkg.window, pkg.normalization, pkg.dilation_radius)
        if problem:
            raise ModelError(f"model {pkg.name}: {problem}; fix model.json")
        unknown = set(pkg.largest_component) - set(pkg.labels.names)
        if unknown:
            raise ModelError(f"model {pkg.name}: postprocess names unknown organs {sorted(unknown)}; fix model.json")
        try:
            if pkg.atlas_prior is not None:
                pkg.atlas_prior.check_organs(pkg.labels.names)
        except ValueError as exc:
            raise ModelError(f"model {pkg.name}: {exc}; fix model.json") from None
        if not 1 <= len(pkg.stages) <= 2:
            raise ModelError(f"model {pkg.name} has {len(pkg.stages)} stages; a cascade has 1 or 2")
        for stage in pkg.stages:
            if stage.network.num_classes != pkg.labels.num_classes:
                raise ModelError(f"model {pkg.name}: stage {stage.name} predicts {stage.network.num_classes} "
                                 f"classes but the label list needs {pkg.labels.num_classes}; fix model.json")
        return pkg

    @staticmethod
    def load(path: str | Path) -> ModelPackage:
        """Read a package from a folder, a model.json, or a .zip (extracted safely to a cache)."""
        p = Path(path).expanduser()
        if p.is_file() and p.suffix.lower() == ".zip":
            p = _extract_cached(p)
        if p.is_file() and p.name == "model.json":
            p = p.parent
        meta = p / "model.json"
        if not meta.is_file():
            raise ModelError(f"no model.json in {p}; pass a model folder, a model .zip, or an installed "
                             "model name (see `cascadeseg models list`)")
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read {meta} ({exc}); re-install the model") from None
        return ModelPackage.from_json(data, root=p.resolve())

    def save(self, folder: str | Path, state_dicts: Sequence[dict[str, torch.Tensor]] | None = None,
             files_from: Path | None = None) -> Path:
        """Write model.json (and weights, if given) into `folder`; sha256s are recomputed.
        `files_from`: a package folder to copy the atlas files from when `folder` lacks them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, _ in self.atlas_prior.files() if self.atlas_prior else []:
            target = folder / name
            if files_from is not None and not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(files_from) / name, target)
        if state_dicts is not None:
            if len(state_dicts) != len(self.stages):
                raise ValueError("one state_dict per stage is needed")
            for stage, sd in zip(self.stages, state_dicts):
                target = folder / stage.weights
                _atomic_torch_save({k: v.detach().cpu() for k, v in sd.items()}, target)
        for stage in self.stages:
            stage.sha256 = sha256_file(folder / stage.weights)
        for atlas in self.atlas_prior.atlases if self.atlas_prior else []:
            atlas.sha256 = {f: sha256_file(folder / f) for f in (atlas.image, atlas.labels)}
        atomic_write(folder / "model.json", json.dumps(self.to_json(), indent=2) + "\n")
        self.root = folder.resolve()
        return folder

    # --- checks and loading ------------------------------------------------------------------
    def weight_path(self, stage: StageSpec) -> Path:
        if self.root is None:
            raise ModelError(f"model {self.name} has no folder; save it first")
        return self.root / stage.weights

    def verify(self) -> dict[str, str]:
        """Check every weight and atlas file's sha256 against model.json; return {file: sha256}."""
        if self.root is None:
            raise ModelError(f"model {self.name} has no folder; save it first")
        files = [("weight file", s.weights, s.sha256) for s in self.stages]
        if self.atlas_prior is not None:
            files += [("atlas file", name, digest) for name, digest in self.atlas_prior.files()]
        result = {}
        for kind, name, expected in files:
            path = self.root / name
            if not path.is_file():
                raise ModelError(f"model {self.name}: {kind} {name} is missing from {self.root}; re-install the model")
            digest = sha256_file(path)
            if not expected or digest != expected.lower():
                raise ModelError(f"model {self.name}: {kind} {name} has sha256 {digest[:12]}..., model.json says "
                                 f"{expected[:12] or 'nothing'}...; the file is damaged or was altered: "
                                 "re-install the model")
            result[name] = digest
        return result

    def load_weights(self, stage_index: int) -> dict[str, torch.Tensor]:
        """A stage's state_dict, only after its sha256 matched, unpickled with weights_only=True."""
        stage = self.stages[stage_index]
        path = self.weight_path(stage)
        if not path.is_file():
            raise ModelError(f"model {self.name}: weight file {stage.weights} is missing; re-install the model")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != stage.sha256.lower():
            raise ModelError(f"model {self.name}: {stage.weights} fails its sha256 check (got {digest[:12]}..., "
                             f"expected {stage.sha256[:12] or 'nothing'}...); re-install the model")
        import io as _io

        try:
            return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem is a damaged model
            raise ModelError(f"model {self.name}: cannot load {stage.weights} ({type(exc).__name__}); "
                             "re-install the model") from None

    def fill_network(self, stage_index: int, net: ModuleT, what: str = "network") -> ModuleT:
        """Load the stage's checked weights into `net`; a mismatch names the layer (eval mode)."""
        try:
            net.load_state_dict(self.load_weights(stage_index))
        except RuntimeError as exc:
            # torch's first line is a heading; the reason ("size mismatch for head.weight ...") follows.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            reason = lines[1] if len(lines) > 1 else lines[0]
            raise ModelError(f"model {self.name}: {self.stages[stage_index].weights} does not fit its {what} config "
                             f"({reason[:200]}); re-export the model") from None
        return net.eval()

    def load_network(self, stage_index: int, device: str | torch.device = "cpu") -> UNet3D:
        """Build the stage's network and load its checksum-verified weights (eval mode)."""
        if self.architecture != "3d-cascade":
            raise ModelError(f"model {self.name} is a {self.architecture} package; run it through "
                             "baseline2d.make_segmenter (cascadeseg segment does this)")
        net = self.fill_network(stage_index, build_network(self.stages[stage_index].network))
        return net.to(device).eval()


def _atomic_torch_save(obj: Any, target: Path) -> None:
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def _extract_cached(zip_path: Path) -> Path:
    """The zip's extraction in the models cache, extracted once even when many processes start at once.

    The extraction appears with one rename, so a reader never sees half of it; the lock makes
    concurrent processes wait for the first extraction instead of racing it.
    """
    from ..locking import file_lock
    from .archive import safe_extract_zip

    digest = sha256_file(zip_path)[:16]
    cache = models_dir() / ".cache" / f"{zip_path.stem}-{digest}"

    def extracted() -> Path | None:
        if (cache / "model.json").is_file():
            return cache
        for found in cache.glob("*/model.json") if cache.is_dir() else []:
            return found.parent
        return None

    done = extracted()
    if done is not None:
        return done
    try:
        with file_lock(cache.parent / f".{cache.name}.lock"):
            done = extracted()
            if done is not None:
                return done
            if cache.is_dir() and not any(cache.iterdir()):
                cache.rmdir()
            return safe_extract_zip(zip_path, cache)
    except PermissionError as exc:
        raise ModelError(f"cannot extract {zip_path.name} into {cache.parent}: {exc.strerror}; set "
                         "CASCADESEG_MODELS to a writable folder") from None




def find_model(name_or_path: str | Path | None = None) -> Path:
    """Resolve a model given as a path, an installed name, or a bundled name."""
    name = str(name_or_path or DEFAULT_MODEL)
    p = Path(name).expanduser()
    if p.exists():
        return p
    for base in (models_dir(), bundled_models_dir()):
        candidate = base / name
        if (candidate / "model.json").is_file():
            return candidate
    raise ModelError(f"model {name!r} not found (looked in {models_dir()} and {bundled_models_dir()}); "
                     "see `cascadeseg models list`, or pass a model folder or .zip")


def load_model(name_or_path: str | Path | None = None) -> ModelPackage:
    return ModelPackage.load(find_model(name_or_path))
