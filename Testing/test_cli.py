"""`cascadeseg segment`: outputs, exit codes, one-line errors, JSON progress, batch + shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from model_factory import make_random_model

from CascadeSegLib.cli import main
from CascadeSegLib.io import read_segmentation_nrrd
from CascadeSegLib.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    make_random_model(folder)
    return folder


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    ct, _ = make_phantom(size=(64, 56, 40), spacing=(3.0, 3.0, 3.5), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1),
                         origin=(120.0, 80.0, -50.0), seed=2)
    path = folder / "phantom.nrrd"
    sitk.WriteImage(ct, str(path))
    return path


def test_folder_output_has_segmentation_report_and_picture(model_dir, phantom_path, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(phantom_path), "-o", str(out), "--model", str(model_dir), "--save-candidates",
                 "--quiet"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"phantom.seg.nrrd", "phantom_c1.nii.gz", "phantom_c2.nii.gz", "phantom_labels.nii.gz",
                          "phantom_preview.png", "phantom_report.json", "phantom_report.md"}
    ct = sitk.ReadImage(str(phantom_path))
    labels = sitk.ReadImage(str(out / "phantom_labels.nii.gz"))
    assert labels.GetSize() == ct.GetSize()
    assert np.allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-5)
    assert np.allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-6)
    seg, segments = read_segmentation_nrrd(out / "phantom.seg.nrrd")
    assert seg.GetSize() == ct.GetSize() and seg.GetOrigin() == ct.GetOrigin()
    assert seg.GetDirection() == ct.GetDirection() and seg.GetSpacing() == ct.GetSpacing()
    assert [s["name"] for s in segments] == ["Liver", "Spleen", "Right kidney"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(labels))
    report = json.loads((out / "phantom_report.json").read_text(encoding="utf-8"))
    assert set(report["organs"]) == {"liver", "spleen", "kidney_right"}
    counts = np.bincount(sitk.GetArrayFromImage(labels).ravel(), minlength=4)
    assert report["organs"]["spleen"]["voxels"] == counts[2]
    png = sitk.ReadImage(str(out / "phantom_preview.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > 200


def test_single_file_outputs_and_overwrite(model_dir, phantom_path, tmp_path, capsys):
    target = tmp_path / "result.nii.gz"
    assert main(["segment", str(phantom_path), "-o", str(target), "--model", str(model_dir), "--quiet"]) == 0
    first = target.read_bytes()
    capsys.readouterr()
    assert main(["segment", str(phantom_path), "-o", str(target), "--model", str(model_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert target.read_bytes() == first
    seg = tmp_path / "result.seg.nrrd"
    assert main(["segment", str(phantom_path), "-o", str(seg), "--model", str(model_dir), "--quiet"]) == 0
    assert read_segmentation_nrrd(seg)[1][0]["name"] == "Liver"


def test_progress_json_lines(model_dir, phantom_path, tmp_path, capsys):
    assert main(["segment", str(phantom_path), "-o", str(tmp_path / "o"), "--model", str(model_dir),
                 "--progress-json", "--no-report"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    events = [e["event"] for e in lines]
    assert events[-1] == "done" and "progress" in events
    stages = {e["stage"] for e in lines if e["event"] == "progress"}
    assert {"stage1", "stage2"} <= stages
    done = lines[-1]
    assert Path(done["outputs"]["segmentation"]).is_file()
    assert [d["name"] for d in done["labels"]] == ["liver", "spleen", "kidney_right"]
    fractions = [e["fraction"] for e in lines if e["event"] == "progress" and e["stage"] == "stage2"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_batch_folder_with_shards(model_dir, phantom_path, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(phantom_path, cohort / f"{name}.nrrd")
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        assert main(["segment", str(cohort), "-o", str(out), "--model", str(model_dir), "--shard", shard,
                     "--no-report", "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*_labels.nii.gz")) == ["a_labels.nii.gz", "b_labels.nii.gz",
                                                                   "c_labels.nii.gz"]


@pytest.mark.parametrize("args,needle", [
    (["segment", "/no/such/ct.nii.gz", "-o", "OUT"], "does not exist"),
    (["segment", "PHANTOM", "-o", "OUT", "--model", "/no/such/model"], "not found"),
    (["segment", "PHANTOM", "-o", "OUT", "--shard", "3/2"], "--shard"),
    (["segment", "PHANTOM", "-o", "OUT", "--device", "tpu"], "invalid choice"),
    (["segment", "PHANTOM", "-o", "PHANTOM", "--overwrite"], "input"),
])
def test_user_errors_exit_2_with_one_line(args, needle, model_dir, phantom_path, tmp_path, capsys):
    args = [a.replace("PHANTOM", str(phantom_path)).replace("OUT", str(tmp_path / "o.nii.gz")) for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    before = phantom_path.read_bytes()
    assert main(args + ["--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadeseg: error")]
    assert len(err) == 1 and needle in err[0]
    assert phantom_path.read_bytes() == before


def test_non_ct_needs_permission(model_dir, tmp_path, capsys):
    mr = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 24, 24)) * 200).astype(np.uint8))
    path = tmp_path / "mr.nrrd"
    sitk.WriteImage(mr, str(path))
    assert main(["segment", str(path), "-o", str(tmp_path / "o"), "--model", str(model_dir), "--quiet"]) == 2
    assert "does not look like CT" in capsys.readouterr().err


def test_subprocess_exit_codes_and_no_traceback(model_dir, phantom_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "CascadeSegLib", "segment", str(tmp_path / "missing.nrrd"),
                          "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("cascadeseg: error:")
    ok = subprocess.run([sys.executable, "-m", "CascadeSegLib", "segment", str(phantom_path), "-o",
                         str(tmp_path / "o"), "--model", str(model_dir), "--no-report"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "phantom:" in ok.stderr  # timing summary
