"""The public predictor interface: what runs one stage of a model package, and which class runs
each package architecture.

A `StagePredictor` turns a CT grid (in HU) and a candidate mask into class probabilities or
labels for one stage of its package. Refinement (refine.py) needs nothing else. A `Predictor`
also runs the whole pipeline (`segment`), as `cascadeseg segment` and the Slicer module do.

Implementations: `cascade.Segmenter` ("3d-cascade": 3D tiles or boxes) and
`baseline2d.ThreeViewSegmenter` ("2d-three-view": three 2D FCNs fused). `make_predictor(model)`
picks by `model.architecture` (model.json's "architecture" key, "3d-cascade" when absent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import ModelError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..packaging.model import ModelPackage
    from .cascade import SegmentationResult
    from .preprocess import GridWindows


@runtime_checkable
class StagePredictor(Protocol):
    """Predicts one stage of `model` on `device`."""

    model: ModelPackage
    device: torch.device
    overlap: float                     # stage-2 tile overlap this predictor was made with (0: none)

    def predict_stage(self, index: int, hu: torch.Tensor | GridWindows, mask: torch.Tensor, overlap: float,
                      stage: str, labels_only: bool = False) -> torch.Tensor:
        """Stage `index`'s class probabilities (K, z, y, x) over `mask` (bool, z, y, x), or with
        `labels_only` the uint8 arg-max; 0 / background outside the mask's cover. `hu` is the
        stage's grid in HU, whole or as `GridWindows` (resampled where asked); `stage` names the
        step in progress reports and stats."""
        ...

    def to_tensor(self, image: sitk.Image) -> torch.Tensor:
        """An image's voxels (z, y, x) as a tensor on this predictor's device."""
        ...

    def check_cancel(self) -> None:
        """Raise `Cancelled` if the caller's cancel callback says so."""
        ...


@runtime_checkable
class Predictor(StagePredictor, Protocol):
    """A stage predictor that also runs the package's whole pipeline on a CT."""

    batch_size: int
    progress: Callable[[str, float, str], None] | None

    def segment(self, image: sitk.Image) -> SegmentationResult:
        """Labels for `image` on its own grid (see cascade.SegmentationResult)."""
        ...


PredictorFactory = Callable[..., Predictor]
_REGISTRY: dict[str, PredictorFactory] = {}


def register_predictor(architecture: str, factory: PredictorFactory) -> None:
    """Run packages of `architecture` with `factory(model, device, **options)`."""
    _REGISTRY[architecture] = factory


def _cascade(model: ModelPackage, *args: Any, **kwargs: Any) -> Predictor:
    from .cascade import Segmenter

    return Segmenter(model, *args, **kwargs)


def _three_view(model: ModelPackage, *args: Any, **kwargs: Any) -> Predictor:
    from ..baselines.zhou2016.three_view import ThreeViewSegmenter

    return ThreeViewSegmenter(model, *args, **kwargs)


register_predictor("3d-cascade", _cascade)
register_predictor("2d-three-view", _three_view)


def architectures() -> list[str]:
    """The package architectures `make_predictor` can run."""
    return sorted(_REGISTRY)


def make_predictor(model: ModelPackage, *args: Any, **kwargs: Any) -> Predictor:
    """The predictor for `model`'s architecture, built with the Segmenter's arguments (device,
    overlap, stage1_only, keep_*, batch_size, progress, cancel, ...) plus any the architecture
    adds (2d-three-view: `fusion`)."""
    factory = _REGISTRY.get(model.architecture)
    if factory is None:
        raise ModelError(f"model {model.name} has architecture {model.architecture!r}, which this version cannot "
                         f"run (known: {', '.join(architectures())}); update CascadeSeg")
    return factory(model, *args, **kwargs)
