"""Shared pytest fixtures: paths of the real test data and a fresh output folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pyproject.toml runs the suite in two workers; with torch's default two threads each, four
    # threads fought over CI's two cores (the suite took 583 s, 479 s with one thread each).
    # Set before any test module imports torch; the CLI processes tests start inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTING_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTING_DIR / "Data"
REPO_DIR = TESTING_DIR.parent


@pytest.fixture(scope="session")
def sample_ct_path() -> Path:
    """The bundled TotalSegmentator abdomen CT (3 mm, int32 HU, flipped x/y direction)."""
    path = REPO_DIR / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
    assert path.is_file(), f"sample CT missing: {path}"
    return path


@pytest.fixture(scope="session")
def dicom_slab_dir() -> Path:
    """A real 20-slice 512x512 CT DICOM series (one series, int16 HU)."""
    path = DATA_DIR / "dicom_slab"
    assert path.is_dir() and len(list(path.iterdir())) == 20, f"DICOM slab missing: {path}"
    return path


@pytest.fixture(scope="session")
def dicom_slab_seg_path() -> Path:
    """Label map of the DICOM slab; same voxels but stored with a flipped y axis."""
    path = DATA_DIR / "dicom_slab_seg.nii.gz"
    assert path.is_file(), f"DICOM slab label map missing: {path}"
    return path


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    """An empty output folder, unique to the test."""
    out = tmp_path / "out"
    out.mkdir()
    return out
