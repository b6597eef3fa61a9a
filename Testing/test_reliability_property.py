"""Property-based reliability test: any grid in, the same grid out, organs only inside the body.

Hypothesis draws sizes, spacings (isotropic to very anisotropic), origins and directions
(rotations, with and without a flipped axis); the phantom lives in physical millimetres so
every draw holds a body. A random-weights model on coarse grids keeps each example well under a
second. Examples are derandomised and not shrunk so the run time is fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from model_factory import make_random_model
from scipy import ndimage

from CascadeSegLib.inference import preprocess
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.packaging.model import ModelPackage
from CascadeSegLib.phantom import make_phantom

STAGE1 = (20.0, 20.0, 20.0)
STAGE2 = (14.0, 14.0, 14.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelPackage:
    return make_random_model(tmp_path_factory.mktemp("model"), spacing1=STAGE1, spacing2=STAGE2)


def _direction(angles: tuple[float, float, float], flip: int) -> tuple[float, ...]:
    """Row-major 3x3 rotation (Euler angles), optionally with one axis reversed (det -1)."""
    rot = sitk.Euler3DTransform((0, 0, 0), *angles)
    m = np.array(rot.GetMatrix()).reshape(3, 3)
    if flip >= 0:
        m[:, flip] *= -1.0
    return tuple(float(v) for v in m.ravel())


grids = st.fixed_dictionaries({
    "size": st.tuples(st.integers(6, 44), st.integers(6, 44), st.integers(2, 28)),
    # Field of view in mm (a body needs a few stage-1 voxels); spacing = fov / size, so spacings
    # run from ~2 to ~75 mm and are often very anisotropic.
    "fov": st.tuples(st.floats(90.0, 450.0), st.floats(90.0, 450.0), st.floats(36.0, 320.0)),
    "origin": st.tuples(*[st.floats(-400.0, 400.0, allow_nan=False)] * 3),
    "angles": st.one_of(st.just((0.0, 0.0, 0.0)),
                        st.sampled_from([(0.0, 0.0, math.pi), (math.pi / 2, 0.0, 0.0), (0.0, math.pi / 2, 0.0)]),
                        st.tuples(*[st.floats(-math.pi, math.pi)] * 3)),
    "flip": st.integers(-1, 2),
})

SETTINGS = dict(deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _segment(model: ModelPackage, g: dict) -> tuple[sitk.Image, object]:
    spacing = tuple(f / n for f, n in zip(g["fov"], g["size"]))
    ct, _ = make_phantom(size=g["size"], spacing=spacing, origin=g["origin"],
                         direction=_direction(g["angles"], g["flip"]), seed=7, noise_hu=5.0)
    return ct, Segmenter(model, "cpu", keep_candidates=True).segment(ct)


@settings(max_examples=15, **SETTINGS)
@given(g=grids)
def test_output_has_exactly_the_input_geometry(model, g):
    ct, result = _segment(model, g)
    for out in (result.labels, result.c1, result.c2):
        assert out.GetSize() == ct.GetSize()
        assert out.GetOrigin() == ct.GetOrigin()
        assert out.GetSpacing() == ct.GetSpacing()
        assert out.GetDirection() == ct.GetDirection()
        assert out.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayViewFromImage(result.labels)).tolist())
    assert values <= {0} | {lab.value for lab in model.labels}
    # C1 is the body: every C1 voxel is within one stage-1 voxel of the body seen at full resolution.
    hu = torch.from_numpy(sitk.GetArrayFromImage(ct).astype(np.float32))
    body = preprocess.body_mask(hu, model.body_threshold_hu).numpy()
    c1 = sitk.GetArrayViewFromImage(result.c1) > 0
    assert c1.any() and body.any()
    dist = ndimage.distance_transform_edt(~body, sampling=ct.GetSpacing()[::-1])
    tolerance = float(np.linalg.norm(STAGE1)) / 2 + float(np.linalg.norm(ct.GetSpacing())) / 2
    assert float(dist[c1].max(initial=0.0)) <= tolerance


@settings(max_examples=10, **SETTINGS)
@given(g=grids)
def test_labels_stay_inside_the_body_mask(model, g):
    ct, result = _segment(model, g)
    labels = sitk.GetArrayViewFromImage(result.labels) > 0
    c1 = sitk.GetArrayViewFromImage(result.c1) > 0
    assert labels.any()
    assert not (labels & ~c1).any(), f"{int((labels & ~c1).sum())} labelled voxels outside the body"
