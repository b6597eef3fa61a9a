"""Cohort runs, shard summaries, output names, cancel events and terminal lines (real processes)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_process import SAMPLE_CT, cascadeseg, child_env, command, error_lines


def default_sigint() -> None:
    """Ctrl-C must reach the child even when this test runs in a background job (which starts
    with SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Two real CTs, a truncated file and a constant volume: two must fail, with their reasons."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(SAMPLE_CT, folder / "a.nii.gz")
    shutil.copy(SAMPLE_CT, folder / "d.nii.gz")
    (folder / "b.nii.gz").write_bytes(SAMPLE_CT.read_bytes()[:5000])
    sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkInt16), str(folder / "c.nrrd"))
    return folder


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_batch_keeps_going_summarizes_fails_and_skips_on_rerun(cohort, tmp_path):
    out = tmp_path / "out"
    res = cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report")
    assert res.returncode == 2
    lines = error_lines(res.stderr)
    assert lines[-3:] == [
        "cascadeseg: 4 cases: 2 done, 0 skipped (outputs exist), 2 failed",
        f"  failed b: {cohort / 'b.nii.gz'} is truncated or damaged; copy or export it again",
        "  failed c: the image is empty: every voxel has the same value (0); check that the right file or series "
        "was exported"]
    for case in ("a", "d"):
        assert (out / f"{case}_labels.nii.gz").is_file() and (out / f"{case}.seg.nrrd").is_file()
    summary = json.loads((out / "cascadeseg-summary-shard0of1.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 2}
    assert {k: v["status"] for k, v in summary["cases"].items()} == {"a": "done", "b": "failed", "c": "failed",
                                                                      "d": "done"}
    # Re-run: complete cases are skipped (untouched), the failed ones are tried again.
    before = _mtimes(out)
    (out / "d.seg.nrrd").unlink()  # d is incomplete now: it is segmented again
    res = cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report")
    assert res.returncode == 2
    assert "cascadeseg: 4 cases: 1 done, 1 skipped (outputs exist), 2 failed" in res.stderr
    after = _mtimes(out)
    assert (out / "d.seg.nrrd").is_file() and after["d_labels.nii.gz"] != before["d_labels.nii.gz"]
    assert after["a_labels.nii.gz"] == before["a_labels.nii.gz"] and after["a.seg.nrrd"] == before["a.seg.nrrd"]
    # --overwrite forces every case.
    res = cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report", "--overwrite")
    assert "cascadeseg: 4 cases: 2 done, 0 skipped (outputs exist), 2 failed" in res.stderr
    assert _mtimes(out)["a.seg.nrrd"] != before["a.seg.nrrd"]


def test_shards_write_summaries_and_summarize_merges_them(cohort, tmp_path):
    out = tmp_path / "out"
    res = cascadeseg("summarize", out)
    assert res.returncode == 2 and error_lines(res.stderr)[0].startswith("cascadeseg: error: no cascadeseg-summary")
    for i in (0, 2):  # shard 1/3 has not run yet
        cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report", "--shard", f"{i}/3")
    res = cascadeseg("summarize", out)
    assert res.returncode == 2
    assert error_lines(res.stderr)[-1].startswith("cascadeseg: error: shard 1/3 wrote no summary")
    cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report", "--shard", "1/3")
    res = cascadeseg("summarize", out, "--json")
    assert res.returncode == 2  # two cases failed
    merged = json.loads(res.stdout)
    assert merged["counts"] == {"done": 2, "skipped": 0, "failed": 2} and merged["missing_shards"] == []
    assert sorted(merged["cases"]) == ["a", "b", "c", "d"]
    assert error_lines(res.stderr)[0] == "cascadeseg: 4 cases: 2 done, 0 skipped (outputs exist), 2 failed"
    # Once the failures are gone from the cohort and their shards re-run, all is well.
    (cohort / "b.nii.gz").unlink()
    (cohort / "c.nrrd").unlink()
    for i in range(3):
        (out / f"cascadeseg-summary-shard{i}of3.json").unlink()
        cascadeseg("segment", cohort, "-o", out, "--stage1-only", "--quiet", "--no-report", "--shard", f"{i}/3")
    res = cascadeseg("summarize", out)
    assert res.returncode == 0, res.stderr
    assert error_lines(res.stderr) == ["cascadeseg: 2 cases: 0 done, 2 skipped (outputs exist), 0 failed"]


def test_unknown_output_ending_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out.png"
    # A model that does not exist: the output name is checked first, so that is the error.
    res = cascadeseg("segment", SAMPLE_CT, "-o", out, "--model", tmp_path / "missing")
    assert res.returncode == 2
    assert error_lines(res.stderr) == [
        f"cascadeseg: error: cannot write {out}: .png is not an output type; give a folder, or a file ending in "
        ".seg.nrrd, .nii.gz, .nii, .nrrd, .mha"]
    assert list(tmp_path.iterdir()) == []
    # A folder with a dot that already exists is still a folder.
    (tmp_path / "run.v2").mkdir()
    res = cascadeseg("segment", SAMPLE_CT, "-o", tmp_path / "run.v2", "--stage1-only", "--quiet", "--no-report")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run.v2" / "abdomen_ct_3mm_labels.nii.gz").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cancel_gives_a_json_event(tmp_path, sig):
    proc = subprocess.Popen(command("segment", SAMPLE_CT, "-o", tmp_path / "out", "--progress-json",
                                    "--overlap", "0.75", "--batch-size", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=default_sigint)
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1].get("event") == "progress" and events[-1].get("fraction", 0) > 0:
                break
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    events += [json.loads(ln) for ln in rest.splitlines() if ln.strip()]
    assert proc.returncode == 130
    assert events[-1] == {"event": "cancelled", "message": "cancelled; no output was written for the unfinished "
                          "case", "exit_code": 130}
    assert not any(e["event"] == "done" for e in events)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _run_on_terminal(args: list[str], timeout: float = 300) -> tuple[int, bytes]:
    """Run with stderr (and stdout) on a pseudo-terminal, as in an interactive shell."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=child_env(COLUMNS="120"))
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks)


def test_progress_bar_and_timing_summary_never_share_a_line(tmp_path):
    code, text = _run_on_terminal(command("segment", SAMPLE_CT, "-o", tmp_path / "out", "--no-report",
                                          "--refine", "pancreas"))
    assert code == 0, text.decode(errors="replace")
    assert b"%" in text  # progress bars were drawn
    at = text.index(b"abdomen_ct_3mm: ")
    assert text[at - 1:at] in (b"\r", b"\n"), text[max(0, at - 200):at + 80]
    # On the summary's line nothing of a bar comes before it.
    line_start = max(text.rfind(b"\n", 0, at), text.rfind(b"\r", 0, at)) + 1
    assert text[line_start:at] == b""


def test_device_option_is_explained():
    res = cascadeseg("segment", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "--device {auto,cpu,cuda,mps}" in text
    assert "auto (default) takes a CUDA GPU, then Apple's MPS, else the CPU" in text


def test_output_grids_are_as_documented(tmp_path):
    """README/architecture.md: labels, .seg.nrrd, C1, C2 on the input grid; probabilities on the
    input's lattice (spacing, direction) cropped to stage 2's box, origin at the box's first voxel."""
    out = tmp_path / "out"
    res = cascadeseg("segment", SAMPLE_CT, "-o", out, "--save-probabilities", "--save-candidates", "--quiet",
                     "--no-report")
    assert res.returncode == 0, res.stderr
    ct = sitk.ReadImage(str(SAMPLE_CT))
    for name in ("abdomen_ct_3mm_labels.nii.gz", "abdomen_ct_3mm.seg.nrrd", "abdomen_ct_3mm_c1.nii.gz",
                 "abdomen_ct_3mm_c2.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert (img.GetSize(), img.GetSpacing(), img.GetDirection()) == (ct.GetSize(), ct.GetSpacing(),
                                                                         ct.GetDirection()), name
        assert img.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4), name
    probs = sitk.ReadImage(str(out / "abdomen_ct_3mm_probabilities.nii.gz"))
    assert probs.GetSpacing() == ct.GetSpacing() and probs.GetDirection() == ct.GetDirection()
    assert probs.GetNumberOfComponentsPerPixel() == 11  # background + 10 organs
    index = ct.TransformPhysicalPointToContinuousIndex(probs.GetOrigin())
    assert index == pytest.approx([round(v) for v in index], abs=1e-3)  # a voxel of the CT's lattice
    start = [round(v) for v in index]
    assert all(s >= 0 for s in start) and any(s > 0 for s in start)  # cropped: its origin is not the CT's
    assert all(s + n <= m for s, n, m in zip(start, probs.GetSize(), ct.GetSize()))
    # Outside the box nothing was labelled: every organ voxel of the labels lies inside it.
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "abdomen_ct_3mm_labels.nii.gz")))
    z, y, x = np.nonzero(labels)
    assert x.min() >= start[0] and x.max() < start[0] + probs.GetSize()[0]
    assert y.min() >= start[1] and y.max() < start[1] + probs.GetSize()[1]
    assert z.min() >= start[2] and z.max() < start[2] + probs.GetSize()[2]


def test_measurement_script_leaves_tracked_files_alone(tmp_path):
    """configs/measure_demo_model.py writes its model.json to -o, never over the bundled package."""
    import sys

    from CascadeSegLib.resources import bundled_models_dir

    source = bundled_models_dir() / "abdomen-ct-demo" / "model.json"
    before = source.read_bytes()
    out = tmp_path / "measured" / "model.json"
    script = Path(__file__).resolve().parents[1] / "configs" / "measure_demo_model.py"
    res = subprocess.run([sys.executable, str(script), "-o", str(out)], capture_output=True, text=True,
                         env=child_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    assert source.read_bytes() == before
    measured = json.loads(out.read_text(encoding="utf-8"))
    assert measured["provenance"]["held_out_dice"]["case"] == "dicom_slab"
    assert "| mean |" in res.stdout
    res = subprocess.run([sys.executable, str(script), "-o", str(source)], capture_output=True, text=True,
                         env=child_env(), timeout=600)
    assert res.returncode == 2 and "is the model's own model.json" in res.stderr
    assert source.read_bytes() == before
