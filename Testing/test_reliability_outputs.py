"""Reliability: outputs, cancellation, exit codes.

Outputs appear only complete (temporary file + rename, all outputs of a case together), the
input is never written, existing outputs need --overwrite, a full disk leaves the old outputs
byte-identical, and Ctrl-C (CLI) or Cancel (Slicer's SegmentProcess) stops within one tile with
exit code 130 and no temporary files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from model_factory import make_random_model

from CascadeSegLib.cli import main
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CascadeSeg"))


def default_sigint() -> None:
    """Ctrl-C must reach the child even when this test runs in a background job (which starts
    with SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    make_random_model(folder)
    return folder


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory) -> Path:
    ct, _ = make_phantom(size=(48, 40, 24), spacing=(4.0, 4.0, 5.0), seed=4)
    path = tmp_path_factory.mktemp("ct") / "case.nrrd"
    sitk.WriteImage(ct, str(path))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """{name: sha256} of every file in a folder (hidden temporary files included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if ln.startswith("cascadeseg: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def seg_args(ct_path: Path, out: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["segment", str(ct_path), "-o", str(out), "--model", str(model_dir), "--quiet", *extra]


# ----------------------------------------------------------------------------- atomic, overwrite, input


def test_outputs_are_written_to_temporaries_and_renamed(ct_path, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    written: list[Path] = []
    real = sitk.WriteImage

    def spy(image, name, *args, **kwargs):
        written.append(Path(name))
        # While a file is being written no final output name exists yet.
        assert not [p for p in out.iterdir() if not p.name.startswith(".tmp-")]
        return real(image, name, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", spy)
    assert main(seg_args(ct_path, out, model_dir, "--save-candidates")) == 0
    assert written and all(p.parent == out and p.name.startswith(".tmp-") for p in written)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["case.seg.nrrd", "case_c1.nii.gz", "case_c2.nii.gz", "case_labels.nii.gz",
                     "case_preview.png", "case_report.json", "case_report.md"]


def test_existing_outputs_need_overwrite_and_are_checked_before_work(ct_path, model_dir, tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "out"
    assert main(seg_args(ct_path, out, model_dir, "--no-report")) == 0
    before = snapshot(out)
    calls = []
    real_segment = Segmenter.segment
    monkeypatch.setattr(Segmenter, "segment", lambda self, img: calls.append(1) or real_segment(self, img))
    capsys.readouterr()
    assert main(seg_args(ct_path, out, model_dir, "--no-report")) == 2
    line = one_error(capsys)
    assert "already exists" in line and "--overwrite" in line
    assert calls == [] and snapshot(out) == before  # refused before segmenting, nothing touched
    assert main(seg_args(ct_path, out, model_dir, "--no-report", "--overwrite")) == 0
    assert calls == [1] and set(snapshot(out)) == set(before)


def test_input_is_never_overwritten(ct_path, model_dir, tmp_path, capsys):
    target = tmp_path / "ct.nrrd"
    target.write_bytes(ct_path.read_bytes())
    before = target.read_bytes()
    for out in (target, tmp_path / "." / "ct.nrrd"):
        assert main(seg_args(target, out, model_dir, "--overwrite")) == 2
        assert "refusing to write over the input" in one_error(capsys)
        assert target.read_bytes() == before
    # Folder mode in the input's own folder writes beside the input, never over it.
    assert main(seg_args(target, tmp_path, model_dir, "--no-report")) == 0
    assert target.read_bytes() == before
    assert (tmp_path / "ct_labels.nii.gz").is_file()


@pytest.mark.parametrize("fail_at", [1, 2, "report"])
def test_full_disk_leaves_old_outputs_intact(ct_path, model_dir, tmp_path, capsys, monkeypatch, fail_at):
    out = tmp_path / "out"
    assert main(seg_args(ct_path, out, model_dir)) == 0
    before = snapshot(out)
    assert len(before) == 5
    calls = {"n": 0}
    real = sitk.WriteImage

    def full_disk(image, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            Path(name).write_bytes(b"half a file")  # the writer got this far, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
        return real(image, name, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    if fail_at == "report":
        def no_space(self, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Path, "write_text", no_space)
    capsys.readouterr()
    assert main(seg_args(ct_path, out, model_dir, "--overwrite")) == 2
    line = one_error(capsys)
    assert "No space left on device" in line and "disk space" in line and ".tmp-" not in line
    if fail_at != "report":
        assert f"cannot write {out / 'case_labels.nii.gz' if fail_at == 1 else out / 'case.seg.nrrd'}:" in line
    assert snapshot(out) == before  # every old output byte-identical, no temporary file left


# ----------------------------------------------------------------------------- exit codes and log files


def test_unexpected_error_exits_1_with_a_log_file(ct_path, model_dir, tmp_path, capsys, monkeypatch):
    def boom(self, image):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(Segmenter, "segment", boom)
    assert main(seg_args(ct_path, tmp_path / "o", model_dir)) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "internal error (ZeroDivisionError)" in err[0] and "Traceback" not in err[0]
    log = Path(err[0].split("details in ", 1)[1].split("; please report")[0])
    text = log.read_text(encoding="utf-8")
    assert "Traceback" in text and "simulated bug" in text and "segment" in text
    log.unlink()
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("name,expect", [("SimpleITK", 2), ("scipy.fft", 2), ("CascadeSegLib.gone", 1)])
def test_a_missing_package_says_how_to_install_it(ct_path, model_dir, tmp_path, capsys, monkeypatch, name, expect):
    """A third-party package missing from the Python that runs cascadeseg (the venv not activated)
    is the installation's fault: exit 2 and one line naming it and the mend; a module of our own
    missing stays an internal error with a log."""
    def missing(self, image):
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    monkeypatch.setattr(Segmenter, "segment", missing)
    assert main(seg_args(ct_path, tmp_path / "o", model_dir)) == expect
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    if expect == 2:
        top = name.split(".")[0]
        assert err[0].startswith(f"cascadeseg: error: the Python package '{top}' is not installed") \
            and "pip install -r requirements.txt" in err[0]
    else:
        assert "internal error (ModuleNotFoundError)" in err[0]
        Path(err[0].split("details in ", 1)[1].split("; please report")[0]).unlink()


def test_user_error_messages_are_always_one_line(ct_path, model_dir, tmp_path, capsys, monkeypatch):
    from CascadeSegLib.errors import UserError

    def multi(self, image):
        raise UserError("first line\nsecond line")

    monkeypatch.setattr(Segmenter, "segment", multi)
    assert main(seg_args(ct_path, tmp_path / "o", model_dir, "--progress-json")) == 2
    cap = capsys.readouterr()
    assert [ln for ln in cap.err.splitlines() if ln] == ["cascadeseg: error: first line second line"]
    events = [json.loads(ln) for ln in cap.out.splitlines()]
    assert events[-1] == {"event": "error", "message": "first line second line", "exit_code": 2}


def test_memory_error_is_a_user_error(ct_path, model_dir, tmp_path, capsys, monkeypatch):
    def no_memory(self, image):
        raise MemoryError

    monkeypatch.setattr(Segmenter, "segment", no_memory)
    assert main(seg_args(ct_path, tmp_path / "o", model_dir)) == 2
    assert "ran out of memory" in one_error(capsys)


# ----------------------------------------------------------------------------- cancel


@pytest.fixture(scope="module")
def slow_case(tmp_path_factory) -> tuple[Path, Path]:
    """A model and CT with ~100 stage-1 tiles of batch 1: several seconds of stage 1."""
    folder = tmp_path_factory.mktemp("slow")
    make_random_model(folder / "model", spacing1=(2.0, 2.0, 2.0), spacing2=(1.5, 1.5, 1.5))
    ct, _ = make_phantom(size=(128, 112, 64), spacing=(3.0, 3.0, 3.0), seed=5)
    path = folder / "slow.nrrd"
    sitk.WriteImage(ct, str(path))
    return folder / "model", path


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_stage1(lines_iter, deadline: float) -> list[dict]:
    events = []
    for line in lines_iter:
        ev = json.loads(line)
        events.append(ev)
        if ev.get("event") == "progress" and ev.get("stage") == "stage1" and ev.get("fraction", 0) > 0:
            return events
        assert time.monotonic() < deadline, events
    raise AssertionError(f"no stage-1 progress: {events}")


def test_ctrl_c_stops_within_a_tile_and_leaves_files_as_they_were(slow_case, tmp_path):
    model, ct = slow_case
    out = tmp_path / "out"
    out.mkdir()
    (out / "slow_labels.nii.gz").write_bytes(b"previous result")
    (out / "notes.txt").write_text("user file")
    before = snapshot(out)
    ct_before = hashlib.sha256(ct.read_bytes()).hexdigest()
    proc = subprocess.Popen([sys.executable, "-m", "CascadeSegLib", "segment", str(ct), "-o", str(out),
                             "--model", str(model), "--progress-json", "--overwrite", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                            cwd=tmp_path, preexec_fn=default_sigint)
    try:
        events = _wait_for_stage1(proc.stdout, time.monotonic() + 120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    events += [json.loads(ln) for ln in rest.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "cascadeseg: cancelled; no output was written for the unfinished case"]
    # It stopped in stage 1: at most one more tile finished after the signal, no stage 2, no result.
    stage1 = [e["fraction"] for e in events if e.get("event") == "progress" and e["stage"] == "stage1"
              and e["fraction"] > 0]
    n_tiles = int(events[-1]["message"].split("/")[-1]) if "/" in events[-1].get("message", "") else None
    assert n_tiles is None or n_tiles > 20
    tile = stage1[0]  # the signal came right after the first tile: its fraction is one tile
    assert stage1[-1] <= 3 * tile + 1e-6, stage1  # the tile in flight (+ one line in the pipe), no more
    assert not any(e.get("stage") == "stage2" or e["event"] == "done" for e in events)
    assert stop_s < 10, stop_s
    assert snapshot(out) == before  # same files, same bytes, no .tmp-*
    assert hashlib.sha256(ct.read_bytes()).hexdigest() == ct_before


def test_slicer_cancel_stops_the_real_cli_and_removes_its_folder(slow_case, tmp_path):
    from CascadeSegSlicer.logic import CascadeSegLogic, SegmentRun
    from CascadeSegSlicer.parameters import SegmentParameters
    from CascadeSegSlicer.process import SegmentProcess

    model, ct = slow_case
    temp_dir = tmp_path / "CascadeSeg-run"
    (temp_dir / "out").mkdir(parents=True)
    params = SegmentParameters(model=str(model), device="cpu")
    command = [sys.executable, "-m", "CascadeSegLib.cli"] + params.cli_args(ct, temp_dir / "out") + [
        "--batch-size", "1"]
    process = SegmentProcess(command, env=_child_env(), cwd=str(temp_dir)).start()
    run = SegmentRun(process, temp_dir, "vtkMRMLScalarVolumeNode1", None, params)
    deadline = time.monotonic() + 120
    while not any(e.get("stage") == "stage1" and e.get("fraction", 0) > 0 for e in run.process.poll_events()):
        assert process.is_running() and time.monotonic() < deadline, process.stderr_text
        time.sleep(0.05)
    t0 = time.monotonic()
    CascadeSegLogic(scene=None, python=sys.executable).cancel(run)
    stop_s = time.monotonic() - t0
    # SIGTERM became a clean Ctrl-C inside the CLI (130), long before the SIGKILL fallback.
    assert process.returncode == 130, process.stderr_text
    assert "cancelled" in process.stderr_text
    assert stop_s < 3.0
    assert not temp_dir.exists()


def test_segment_accepts_every_flag_the_slicer_module_passes(tmp_path):
    """The Slicer module and the CLI are released together; a flag one sends and the other does
    not know would fail every run with that option ticked."""
    import dataclasses

    from CascadeSegSlicer.parameters import SegmentParameters

    from CascadeSegLib.cli import build_parser

    flags = {f.name: True for f in dataclasses.fields(SegmentParameters) if f.type in (bool, "bool")}
    for stage1_only in (True, False):  # some options are only sent without --stage1-only
        params = SegmentParameters(**{**flags, "stage1_only": stage1_only})
        args = build_parser().parse_args(params.cli_args(tmp_path / "in.nrrd", tmp_path / "out"))
        assert args.stage1_only == stage1_only
    assert getattr(args, "refine", None) is not None or "refine" not in flags
    assert args.func is not None and args.progress_json and args.no_report and args.overwrite
    for name in ("overlap", "save_probabilities", "save_candidates"):
        assert getattr(args, name), name
