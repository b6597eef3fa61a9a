"""The Slicer module's warm worker (`cascadeseg worker`) with real processes and real data.

A worker serves jobs one after another in one process and gives the same labels as the
one-shot CLI; Cancel kills it and a fresh one takes the next job; a worker killed from outside
is replaced; a bad input gives the one-shot's one-line error and the worker keeps serving; a
worker that cannot start (here: a CLI without the command) falls back to a one-shot process.
No timing is asserted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "CascadeSeg"))

from CascadeSegSlicer.headless import make_scene  # noqa: E402
from CascadeSegSlicer.logic import CascadeSegLogic, RunCancelled, RunError  # noqa: E402
from CascadeSegSlicer.parameters import SegmentParameters  # noqa: E402
from CascadeSegSlicer.process import SegmentProcess  # noqa: E402
from CascadeSegSlicer.worker import JOB_END_MARKER, WarmWorker  # noqa: E402
from cli_process import process_alive  # noqa: E402

from CascadeSegLib.commands import worker as worker_command  # noqa: E402

SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
CPU = SegmentParameters(model="abdomen-ct-demo", device="cpu")


def _wait_dead(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def _labels(path: str | Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _segment_counts(node) -> dict[str, int]:
    from vtk.util import numpy_support

    seg = node.GetSegmentation()
    rep = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    out = {}
    for sid in seg.GetSegmentIDs():
        s = seg.GetSegment(sid)
        arr = numpy_support.vtk_to_numpy(s.GetRepresentation(rep).GetPointData().GetScalars())
        out[sid] = int(np.count_nonzero(arr == s.GetLabelValue()))
    return out


@pytest.fixture()
def app():
    return make_scene()


@pytest.fixture()
def logic(app):
    lg = CascadeSegLogic(app.scene, use_worker=True)
    yield lg
    lg.shutdown_worker()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random 3-organ model and a phantom CT: a job that takes about a second."""
    from model_factory import make_random_model

    from CascadeSegLib.phantom import make_phantom

    folder = tmp_path_factory.mktemp("worker")
    organs = ("liver", "spleen", "kidney_right")
    make_random_model(folder / "model", organs=organs)
    ct, _ = make_phantom(size=(48, 40, 32), spacing=(4.0, 4.0, 4.0), organs=organs)
    sitk.WriteImage(ct, str(folder / "phantom.nrrd"))
    return folder / "model", folder / "phantom.nrrd"


def test_protocol_constants_agree():
    from CascadeSegSlicer.worker import KEEP_SERVING

    assert JOB_END_MARKER == worker_command.JOB_END_MARKER
    assert KEEP_SERVING == worker_command.KEEP_SERVING


@pytest.mark.slow
def test_worker_serves_two_jobs_in_one_process_with_the_one_shot_labels(logic, tmp_path):
    """Sample CT, bundled model: one-shot CLI vs two jobs in one worker, byte-identical labels."""
    def args(out: Path) -> list[str]:
        return CPU.cli_args(SAMPLE_CT, out)

    one_shot = SegmentProcess(logic.cli_command(args(tmp_path / "one")), env=logic.child_env()).start()
    assert one_shot.wait(timeout=900) == 0, one_shot.stderr_text
    reference = _labels(tmp_path / "one" / "abdomen_ct_3mm_labels.nii.gz")
    assert set(np.unique(reference)) > {0}

    worker = WarmWorker(logic.cli_command(["worker"]), env=logic.child_env()).start()
    try:
        pid = worker.pid
        for i in (1, 2):
            job = worker.submit(args(tmp_path / f"w{i}"))
            assert job.wait(timeout=900) == 0, job.stderr_text
            events = job.poll_events()
            done = [e for e in events if e["event"] == "done"]
            assert len(done) == 1 and any(e["event"] == "progress" for e in events)
            assert not any(e["event"] in ("exit", "ready", "error") for e in events)
            np.testing.assert_array_equal(_labels(done[0]["outputs"]["labels"]), reference)
            assert worker.alive() and worker.pid == pid and worker.ready.is_set()
        assert worker.jobs_served == 2 and job.used_worker
    finally:
        worker.close()
    assert _wait_dead(pid)


def test_logic_reuses_the_worker_and_imports_like_the_one_shot(app, logic, small_model):
    model, ct = small_model
    volume = app.load_volume(str(ct), "phantom")
    params = SegmentParameters(model=str(model), device="cpu", create_new_segmentation=True)
    assert logic.prestart_worker() is not None
    pid = logic.worker.pid
    nodes = []
    for _ in range(2):
        run = logic.start(volume, params)
        assert run.process.pid == pid
        nodes.append(_finish(logic, run))
        assert logic.timings["child"] > 0 and logic.timings["cli total"] > 0
    assert logic.worker.pid == pid and logic.worker.jobs_served == 2
    one_shot = CascadeSegLogic(app.scene, use_worker=False)
    nodes.append(one_shot.run(volume, params, timeout_s=300))
    counts = [_segment_counts(n) for n in nodes]
    assert counts[0] == counts[1] == counts[2] and list(counts[0]) == ["liver", "spleen", "kidney_right"]


def _finish(logic, run, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while run.is_running() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    return logic.finish(run)


@pytest.mark.slow
def test_cancel_kills_the_worker_and_the_next_job_gets_a_fresh_one(app, logic, small_model):
    volume = app.load_volume(str(SAMPLE_CT), "ct")
    logic.prestart_worker()
    old = logic.worker.pid
    before = app.scene.GetNumberOfNodes()
    run = logic.start(volume, CPU)
    deadline = time.monotonic() + 600
    while run.progress.stage not in ("stage1", "c2", "stage2") and run.is_running() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    assert run.is_running() and run.progress.stage, "the job ended before it could be cancelled"
    logic.cancel(run)
    assert _wait_dead(old) and not run.temp_dir.exists()
    with pytest.raises(RunCancelled):
        logic.finish(run)
    assert app.scene.GetNumberOfNodes() == before
    assert logic.worker is not None and logic.worker.pid != old  # started again in the background
    fresh = logic.worker.pid
    model, ct = small_model
    phantom = app.load_volume(str(ct), "phantom")
    run = logic.start(phantom, SegmentParameters(model=str(model), device="cpu"))
    assert run.process.pid == fresh
    node = _finish(logic, run)
    assert sum(_segment_counts(node).values()) > 0


def test_worker_killed_from_outside_is_replaced(app, logic, small_model):
    model, ct = small_model
    volume = app.load_volume(str(ct), "phantom")
    params = SegmentParameters(model=str(model), device="cpu")
    first = logic.prestart_worker()
    assert first is not None and first.ready.wait(300)
    os.kill(first.pid, signal.SIGKILL)
    assert _wait_dead(first.pid)
    # Its pipes can outlive the 'dead' state by a moment (a multi-threaded process), so the job
    # may still be written to it: a job the worker never acknowledged runs one-shot instead.
    run = logic.start(volume, params)
    try:
        node = _finish(logic, run)
    except (RunCancelled, RunError) as exc:  # say which process ran it, and how it ended
        job = run.process
        raise AssertionError(f"{exc!r}: pid {job.pid} (first {first.pid}), rc {job.returncode}, "
                             f"ready {job.worker.ready.is_set()}, stderr {job.stderr_text[-2000:]!r}") from None
    assert sum(_segment_counts(node).values()) > 0
    assert logic.worker is not None and logic.worker.pid != first.pid
    run = logic.start(volume, params)
    assert run.process.pid == logic.worker.pid and _finish(logic, run) is not None
    # killed while running a job: the run ends like a killed one-shot process (nothing imported,
    # the scene unchanged); the next run gets a fresh worker
    second = logic.worker
    assert second.ready.wait(300)
    ct_volume = app.load_volume(str(SAMPLE_CT), "ct")  # a job long enough to be killed in
    n_nodes = app.scene.GetNumberOfNodes()
    run = logic.start(ct_volume, CPU)
    deadline = time.monotonic() + 300
    while not run.process.accepted and time.monotonic() < deadline:  # the worker has the job
        time.sleep(0.02)
    assert run.process.accepted
    os.kill(second.pid, signal.SIGKILL)
    with pytest.raises((RunCancelled, RunError)):
        _finish(logic, run)
    assert app.scene.GetNumberOfNodes() == n_nodes and not run.temp_dir.exists()
    node = logic.run(volume, params, timeout_s=300)
    assert logic.worker.pid not in (first.pid, second.pid) and sum(_segment_counts(node).values()) > 0


def test_bad_input_gives_the_one_shot_error_and_the_worker_keeps_serving(app, logic, small_model, tmp_path):
    model, ct = small_model
    img = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 24, 28)) > 0.5).astype(np.uint8))
    sitk.WriteImage(img, str(tmp_path / "mask.nrrd"))
    bad = app.load_volume(str(tmp_path / "mask.nrrd"), "mask")
    params = SegmentParameters(model=str(model), device="cpu")
    one_shot = CascadeSegLogic(app.scene, use_worker=False)
    with pytest.raises(RunError) as expected:
        one_shot.run(bad, params, timeout_s=300)
    assert "\n" not in expected.value.message and expected.value.exit_code == 2
    pid = logic.prestart_worker().pid
    for _ in range(2):
        with pytest.raises(RunError) as got:
            logic.run(bad, params, timeout_s=300)
        assert got.value.message == expected.value.message and got.value.exit_code == 2
        assert "cascadeseg: error:" in got.value.details and JOB_END_MARKER not in got.value.details
    node = logic.run(app.load_volume(str(ct), "phantom"), params, timeout_s=300)
    assert sum(_segment_counts(node).values()) > 0
    assert logic.worker.pid == pid and logic.worker.jobs_served == 3


def test_worker_that_cannot_start_falls_back_to_one_shot(app, tmp_path, monkeypatch):
    """A CLI without the worker command (an older library): every run still works, one-shot."""
    from slicer_scene import LABELS, SAMPLE_TS, remap_totalseg
    from test_slicer_logic import FAKE_CLI

    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    labels_path = tmp_path / "labels.nii.gz"
    remap_totalseg(SAMPLE_TS, labels_path)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path))
    monkeypatch.setenv("FAKE_LABELSET", json.dumps(LABELS.to_json()))
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_LABELS", str(labels_path))
    logic = CascadeSegLogic(app.scene, command_prefix=[sys.executable, str(script)], use_worker=True)
    volume = app.load_volume(str(SAMPLE_CT), "ct")
    try:
        for _ in range(2):
            node = logic.run(volume, SegmentParameters(), timeout_s=120)
            assert node.GetSegmentation().GetNumberOfSegments() == len(LABELS)
            call = json.loads((tmp_path / "args.json").read_text(encoding="utf-8"))
            assert call["args"][0] == "segment" and call["input_exists"]
    finally:
        logic.shutdown_worker()


def test_worker_off_by_environment_or_custom_cli(app, monkeypatch):
    monkeypatch.setenv("CASCADESEG_WORKER", "0")
    assert not CascadeSegLogic(app.scene).use_worker
    assert CascadeSegLogic(app.scene).prestart_worker() is None
    monkeypatch.delenv("CASCADESEG_WORKER")
    assert CascadeSegLogic(app.scene).use_worker
    assert not CascadeSegLogic(app.scene, command_prefix=["python", "fake.py"]).use_worker
