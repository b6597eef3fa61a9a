"""The default model's outputs on the sample CT and the DICOM slab, pinned voxel for voxel.

Refactoring must not change what `cascadeseg segment` writes. `Testing/Data/golden.json`
holds sha256 digests and per-label voxel counts made by `Testing/make_golden.py`; this test
recomputes them the same way and compares exactly. If an output change is intended, run
`python Testing/make_golden.py --write` and say why in the commit.
"""

from __future__ import annotations

import json

import pytest
from make_golden import CASES, GOLDEN, measure


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_model_outputs_are_unchanged(case, golden):
    measured = measure([case])[case]
    expected = golden[case]
    # Counts first: a failure then says which labels moved, not only that a hash differs.
    assert measured["labels"]["counts"] == expected["labels"]["counts"]
    assert measured["labels"] == expected["labels"]
    assert measured["segmentation"] == expected["segmentation"]
