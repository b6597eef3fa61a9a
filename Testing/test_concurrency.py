"""Many `cascadeseg` processes started together on one models folder, zip model and install."""

from __future__ import annotations

import subprocess

import numpy as np
import SimpleITK as sitk
from cli_process import SAMPLE_CT, child_env, command

from CascadeSegLib.packaging.archive import make_zip
from CascadeSegLib.resources import bundled_models_dir

N_PROCESSES = 4


def _start_together(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in commands]
    results = []
    for c, p in zip(commands, procs):
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return results


def test_concurrent_segment_with_one_zip_model_and_empty_models_folder(tmp_path):
    """A job array: every process extracts the same zip into the same (empty) cache at once."""
    zip_path = make_zip(bundled_models_dir() / "abdomen-ct-demo", tmp_path / "model.zip")
    models = tmp_path / "models"
    env = child_env(CASCADESEG_MODELS=str(models))
    runs = _start_together([command("segment", SAMPLE_CT, "-o", tmp_path / f"out{i}.nii.gz", "--model", zip_path,
                                    "--stage1-only", "--quiet") for i in range(N_PROCESSES)], env)
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
    cache = models / ".cache"
    extracted = [p for p in cache.iterdir() if p.is_dir()]
    assert len(extracted) == 1 and (extracted[0] / "model.json").is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".extract")]  # no temporary folder left
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out0.nii.gz")))
    for i in range(1, N_PROCESSES):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"out{i}.nii.gz"))),
                                      first)


def test_concurrent_installs_of_one_zip(tmp_path):
    """Installs racing for one models folder: one installs, the others say so in one line; the
    installed model is complete and verifies."""
    zip_path = make_zip(bundled_models_dir() / "abdomen-ct-demo", tmp_path / "model.zip")
    models = tmp_path / "models"
    env = child_env(CASCADESEG_MODELS=str(models))
    runs = _start_together([command("models", "install", zip_path) for _ in range(N_PROCESSES)], env)
    ok = [r for r in runs if r.returncode == 0]
    assert len(ok) == 1, [r.stderr for r in runs]
    for r in runs:
        if r.returncode != 0:
            assert r.returncode == 2
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and "is already installed" in lines[0], r.stderr
    assert sorted(p.name for p in models.iterdir()) == ["abdomen-ct-demo"]
    verify = subprocess.run(command("models", "verify", "abdomen-ct-demo"), capture_output=True, text=True,
                            env=env, timeout=300)
    assert verify.returncode == 0, verify.stderr
