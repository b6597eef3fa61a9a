"""C2's ball dilation against SciPy's binary dilation with the same ball (an independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from CascadeSegLib.inference import preprocess


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("shape", [(20, 30, 25), (5, 40, 9), (48, 33, 40)])
def test_dilate_equals_scipy_ball_dilation(radius, shape):
    rng = np.random.default_rng(radius * 100 + shape[0])
    mask = rng.random(shape) > 0.995
    mask[0, 0, 0] = mask[-1, -1, -1] = True              # foreground on the borders too
    ball = preprocess.ball(radius).numpy()
    expected = ndimage.binary_dilation(mask, structure=ball)
    got = preprocess.dilate(torch.from_numpy(mask), radius).numpy()
    assert np.array_equal(got, expected)


def test_dilate_empty_and_zero_radius():
    empty = torch.zeros(8, 8, 8, dtype=torch.bool)
    assert not preprocess.dilate(empty, 3).any()
    one = empty.clone()
    one[4, 4, 4] = True
    assert torch.equal(preprocess.dilate(one, 0), one)
    assert int(preprocess.dilate(one, 1).sum()) == 7     # the 6-neighbourhood ball
