"""The Slicer module's logic under slicer-core (real MRML, no Slicer app, no Qt): running the CLI.

Checks that a run reports progress and imports its result, that a cancelled or failed run
leaves the scene as it was and removes its temporary folder, the input checks, the widget's
controller on fake Qt widgets, the module's self-test and one run through the real CLI. The
process side is mostly driven by a fake CLI script, so these tests do not need a trained model.
Importing results into segmentation nodes (geometry, surfaces, .seg.nrrd) is in
test_slicer_import.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_process import process_alive
from slicer_scene import LABELS, REPO, done_event, ijk_to_ras, scene_snapshot, segment_array

# the fixtures app and sample, imported so that pytest finds them here
from slicer_scene import app_fixture as app_fixture
from slicer_scene import sample_fixture as sample_fixture

from CascadeSegLib.labels import DEFAULT_ORGANS

# isort: split
# slicer_scene put the Slicer module's folder on sys.path: CascadeSegSlicer imports from here on
from CascadeSegSlicer.logic import CascadeSegLogic, RunCancelled, RunError
from CascadeSegSlicer.parameters import SegmentParameters

# ----------------------------------------------------------------------------- process
FAKE_CLI = textwrap.dedent(r'''
    import json, os, shutil, subprocess, sys, time
    args = sys.argv[1:]
    assert args[0] == "segment" and "--progress-json" in args, args
    out = args[args.index("-o") + 1]
    mode = os.environ["FAKE_MODE"]
    with open(os.path.join(os.environ["FAKE_LOG"], "args.json"), "w") as f:
        json.dump({"args": args, "pid": os.getpid(), "input_exists": os.path.isfile(args[1])}, f)
    def say(**ev):
        print(json.dumps(ev), flush=True)
    for i in range(3):
        say(event="progress", stage="stage1", fraction=(i + 1) / 3, message=f"tile {i + 1}/3")
        time.sleep(0.05)
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.path.join(os.environ["FAKE_LOG"], "child.pid"), "w") as f:
            f.write(str(child.pid))
        open(os.path.join(out, "partial.tmp"), "w").write("x")
        time.sleep(600)
    if mode == "error":
        print("cascadeseg: error: input.nrrd is not a CT (values 0..1); load a CT in HU", file=sys.stderr)
        say(event="error", message="input.nrrd is not a CT (values 0..1); load a CT in HU", exit_code=2)
        sys.exit(2)
    if mode == "crash":
        print("Traceback (most recent call last):\n  boom\nRuntimeError: CUDA out of memory", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("FAKE_WARNING"):
        print("cascadeseg: warning: " + os.environ["FAKE_WARNING"], file=sys.stderr)
        say(event="warning", message=os.environ["FAKE_WARNING"])
    dst = os.path.join(out, "input_labels.nii.gz")
    shutil.copy(os.environ["FAKE_LABELS"], dst)
    say(event="done", case="input", outputs={"labels": dst}, labels=json.loads(os.environ["FAKE_LABELSET"]),
        timings={"read": 0.1, "stage1": 0.2, "total": 0.4})
''')


@pytest.fixture()
def fake_logic(app, tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path))
    monkeypatch.setenv("FAKE_LABELSET", json.dumps(LABELS.to_json()))
    return CascadeSegLogic(app.scene, command_prefix=[sys.executable, str(script)])


def test_run_through_fake_cli_reports_progress_and_imports(app, sample, fake_logic, tmp_path, monkeypatch):
    volume, labels_path, arr = sample
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_LABELS", str(labels_path))
    seen = []
    params = SegmentParameters(model="abdomen-ct-demo", device="cpu", overlap=True, keep_candidates=True)
    seg_node = fake_logic.run(volume, params, on_progress=lambda p: seen.append((p.stage, p.message)),
                              timeout_s=60)
    assert seg_node.GetSegmentation().GetNumberOfSegments() == len(LABELS)
    assert ("stage1", "tile 3/3") in seen
    call = json.loads((tmp_path / "args.json").read_text(encoding="utf-8"))
    assert call["input_exists"]
    for flag in ("--model", "abdomen-ct-demo", "--device", "cpu", "--overlap", "--save-candidates"):
        assert flag in call["args"]
    assert "--stage1-only" not in call["args"]
    assert not Path(call["args"][1]).parent.exists()  # temp folder removed


def test_cancel_kills_process_tree_and_leaves_scene(app, sample, fake_logic, tmp_path, monkeypatch):
    volume, _, _ = sample
    monkeypatch.setenv("FAKE_MODE", "hang")
    before = scene_snapshot(app.scene)
    run = fake_logic.start(volume, SegmentParameters())
    deadline = time.monotonic() + 30
    pid_file = tmp_path / "child.pid"  # the fake CLI creates it, then writes the pid: wait for both
    while not (pid_file.exists() and pid_file.read_text(encoding="utf-8").strip()) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    run.poll()
    assert run.progress.stage == "stage1" and run.is_running()
    child = int((tmp_path / "child.pid").read_text(encoding="utf-8"))
    parent = json.loads((tmp_path / "args.json").read_text(encoding="utf-8"))["pid"]
    t0 = time.monotonic()
    fake_logic.cancel(run)
    assert time.monotonic() - t0 < 10
    time.sleep(0.2)
    assert not process_alive(parent) and not process_alive(child)
    assert not run.temp_dir.exists()
    with pytest.raises(RunCancelled):
        fake_logic.finish(run)
    assert scene_snapshot(app.scene) == before


@pytest.mark.parametrize("mode,message", [
    ("error", "input.nrrd is not a CT (values 0..1); load a CT in HU"),
    ("crash", "RuntimeError: CUDA out of memory"),
])
def test_failed_run_gives_one_line_and_leaves_scene(app, sample, fake_logic, monkeypatch, mode, message):
    volume, labels_path, _ = sample
    logic = CascadeSegLogic(app.scene)
    logic.import_result(volume, done_event(labels_path))  # an earlier result must survive
    before = scene_snapshot(app.scene)
    seg_before = [s for s in app.scene.GetNodesByClass("vtkMRMLSegmentationNode")]
    ids_before = [list(s.GetSegmentation().GetSegmentIDs()) for s in seg_before]
    monkeypatch.setenv("FAKE_MODE", mode)
    run = fake_logic.start(volume, SegmentParameters())
    with pytest.raises(RunError) as info:
        fake_logic.finish(run)
    assert info.value.message == message and "\n" not in info.value.message
    assert info.value.exit_code == (2 if mode == "error" else 1)
    assert message.split(":")[0] in info.value.details
    assert not run.temp_dir.exists()
    assert scene_snapshot(app.scene) == before
    assert [list(s.GetSegmentation().GetSegmentIDs()) for s in seg_before] == ids_before


def test_input_checks(app, sample):
    volume, labels_path, _ = sample
    logic = CascadeSegLogic(app.scene)
    with pytest.raises(RunError, match="select a CT volume"):
        logic.start(None, SegmentParameters())
    lab = app.load_volume(str(labels_path), "labels", labelmap=True)
    with pytest.raises(RunError, match="select a CT volume"):
        logic.start(lab, SegmentParameters())
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(RunError, match="harden the transform"):
        logic.start(volume, SegmentParameters())


def test_parameters_cli_args():
    p = SegmentParameters(model="m", device="cuda", stage1_only=True, keep_probabilities=True)
    args = p.cli_args("in.nrrd", "out")
    assert args[:4] == ["segment", "in.nrrd", "-o", "out"]
    assert {"--stage1-only", "--save-probabilities", "--progress-json"} <= set(args)
    assert "--overlap" not in args and "--save-candidates" not in args
    with pytest.raises(ValueError):
        SegmentParameters(device="gpu")



# ----------------------------------------------------------------------------- widget (fakes)
class FakeSignal:
    def __init__(self):
        self.slots = []

    def connect(self, fn):
        self.slots.append(fn)

    def emit(self, *a):
        for fn in self.slots:
            fn(*a)


class FakeWidget:
    """Just enough of QPushButton/QCheckBox/QComboBox/QLabel/QProgressBar/qMRMLNodeComboBox."""

    def __init__(self):
        self.text, self.enabled, self.visible, self.checked = "", True, True, False
        self.value, self.format, self.items, self.currentIndex, self.node = 0, "", [], -1, None
        self.clicked, self.currentIndexChanged, self.toggled = FakeSignal(), FakeSignal(), FakeSignal()
        self.mrml_slots = []

    def connect(self, signature, fn):
        self.mrml_slots.append((signature, fn))

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self.items, self.currentIndex = [], -1

    def setCurrentIndex(self, i):  # like Qt: a change emits currentIndexChanged
        changed, self.currentIndex = i != self.currentIndex, i
        if changed:
            self.currentIndexChanged.emit(i)

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):  # like qMRMLNodeComboBox: a change emits currentNodeChanged
        changed, self.node = node is not self.node, node
        for signature, fn in self.mrml_slots if changed else ():
            if signature.startswith("currentNodeChanged"):
                fn(node)


class FakeTimer:
    def __init__(self, callback):
        self.callback, self.active = callback, False

    def start(self, ms):
        self.active = True

    def stop(self):
        self.active = False


class FakeGui:
    def __init__(self, confirm=True):
        self.errors, self.shown, self.confirms, self.answer = [], [], [], confirm
        self.warned = []

    def ensure_dependencies(self):
        return True

    def confirm(self, text):
        self.confirms.append(text)
        return self.answer

    def error(self, message, details=""):
        self.errors.append((message, details))

    def show_result(self, seg, volume):
        self.shown.append(seg)

    def warn(self, message):
        self.warned.append(message)


def ui_widget_names() -> set[str]:
    import xml.etree.ElementTree as ET

    tree = ET.parse(REPO / "CascadeSeg" / "Resources" / "UI" / "CascadeSeg.ui")
    return {w.get("name") for w in tree.iter("widget")}


def make_controller(logic, gui):
    from types import SimpleNamespace

    from CascadeSegSlicer.models import ModelChoice
    from CascadeSegSlicer.widget import CascadeSegController

    from CascadeSegLib.resources import DEFAULT_MODEL

    ui = SimpleNamespace(**{name: FakeWidget() for name in ui_widget_names()})
    ctl = CascadeSegController(ui, logic, gui, FakeTimer)
    ctl.setup()
    ctl.models = [ModelChoice(DEFAULT_MODEL, "1.0.0", "bundled", labels=tuple(DEFAULT_ORGANS),
                              license="Apache-2.0")]
    ui.modelComboBox.clear()
    ui.modelComboBox.addItem(f"{DEFAULT_MODEL} 1.0.0", DEFAULT_MODEL)
    ctl.on_model_changed()
    return ui, ctl


def drive(ctl, timeout=30):
    deadline = time.monotonic() + timeout
    while ctl.timer.active and time.monotonic() < deadline:
        ctl.on_timer()
        time.sleep(0.05)


def test_widget_segment_then_rerun_replaces_after_confirmation(app, sample, fake_logic, monkeypatch):
    volume, labels_path, _ = sample
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_LABELS", str(labels_path))
    gui = FakeGui()
    ui, ctl = make_controller(fake_logic, gui)
    assert not ui.segmentButton.enabled  # no input yet
    ui.inputVolumeSelector.setCurrentNode(volume)
    ctl.update_buttons()
    assert ui.segmentButton.enabled and ui.segmentButton.text == "Segment"
    assert "10 labels" in ui.modelInfoLabel.text and "Apache-2.0" in ui.modelInfoLabel.text
    ui.segmentButton.clicked.emit()
    assert ui.segmentButton.text == "Cancel" and not ui.inputVolumeSelector.enabled and ui.progressBar.visible
    drive(ctl)
    assert not gui.errors, gui.errors
    assert ui.segmentButton.text == "Segment" and ui.show3DButton.enabled and ui.editButton.enabled
    seg = ui.outputSegmentationSelector.currentNode()
    assert seg is not None and gui.shown == [seg]
    assert ui.statusLabel.text.startswith("Done in 0.4 s") and "stage1 0.2 s" in ui.statusLabel.text
    n = app.scene.GetNumberOfNodes()
    # second run: the result is selected, so it is replaced (after a confirmation), not duplicated
    gui.answer = False
    ui.segmentButton.clicked.emit()
    assert len(gui.confirms) == 1 and ctl.run is None
    gui.answer = True
    ui.segmentButton.clicked.emit()
    drive(ctl)
    assert ui.outputSegmentationSelector.currentNode() is seg and app.scene.GetNumberOfNodes() == n


def _segment_with_warning(sample, fake_logic, monkeypatch, message):
    """Segment with a fake CLI that emits `message` as a warning: the panel, its controller, the gui."""
    volume, labels_path, _ = sample
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("FAKE_LABELS", str(labels_path))
    monkeypatch.setenv("FAKE_WARNING", message)
    gui = FakeGui()
    ui, ctl = make_controller(fake_logic, gui)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ctl.update_buttons()
    ui.segmentButton.clicked.emit()
    drive(ctl)
    assert not gui.errors and gui.shown == [ui.outputSegmentationSelector.currentNode()]
    return ui, gui


def test_widget_shows_the_run_s_warnings_with_its_result(app, sample, fake_logic, monkeypatch):
    """A warning the CLI emits (the atlas check's, here) reaches the panel with the result, not
    only the log: the segmentation is still made and shown."""
    message = "atlas check: 71 ml of the left kidney (100% of it) lies where most atlases put the spleen; review"
    ui, gui = _segment_with_warning(sample, fake_logic, monkeypatch, message)
    first, second = ui.statusLabel.text.split("\n")
    assert first.startswith("Done in 0.4 s") and second == "Warning: " + message
    assert gui.warned == []                        # one region to review: the status line says it


def test_widget_shows_a_warning_on_the_whole_scan_in_a_message_box(app, sample, fake_logic, monkeypatch):
    """The atlas check's flag on a scan no atlas agrees with puts every segment in doubt: besides
    the status line, a message box says it, after the (still made) segmentation is shown."""
    from CascadeSegLib.inference.atlas_check import AtlasConflict

    message = AtlasConflict("every organ", "", 19.8, 0.006, True, "scan").message()
    ui, gui = _segment_with_warning(sample, fake_logic, monkeypatch, message)
    assert gui.warned == [message] and ui.statusLabel.text.split("\n")[1] == "Warning: " + message


def test_widget_cancel_and_failure(app, sample, fake_logic, monkeypatch):
    volume, labels_path, _ = sample
    gui = FakeGui()
    ui, ctl = make_controller(fake_logic, gui)
    ui.inputVolumeSelector.setCurrentNode(volume)
    before = scene_snapshot(app.scene)
    monkeypatch.setenv("FAKE_MODE", "hang")
    ui.segmentButton.clicked.emit()
    run = ctl.run
    ctl.on_timer()
    ui.segmentButton.clicked.emit()  # the button is Cancel now
    assert ctl.run is None and not run.is_running() and not run.temp_dir.exists()
    assert ui.segmentButton.text == "Segment" and "Cancelled" in ui.statusLabel.text
    monkeypatch.setenv("FAKE_MODE", "error")
    ui.segmentButton.clicked.emit()
    drive(ctl)
    assert gui.errors and gui.errors[-1][0].startswith("input.nrrd is not a CT")
    assert ui.statusLabel.text.startswith("Failed:")
    assert scene_snapshot(app.scene) == before


# ----------------------------------------------------------------------------- self-test class
def test_module_imports_headless_and_self_test_runs():
    import importlib.util
    import unittest

    spec = importlib.util.spec_from_file_location("CascadeSeg", REPO / "CascadeSeg" / "CascadeSeg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.IN_SLICER
    assert {"CascadeSeg", "CascadeSegWidget", "CascadeSegLogic", "CascadeSegTest"} <= set(vars(mod))
    assert "qt" not in sys.modules and "ctk" not in sys.modules
    result = unittest.TestResult()
    mod.CascadeSegTest("test_sample_ct_with_bundled_model").run(result)
    assert not result.errors and not result.failures, result.errors + result.failures
    # without a trained bundled model it can only skip; with one it must pass
    from CascadeSegLib.errors import ModelError
    from CascadeSegLib.packaging.model import find_model

    try:
        find_model("abdomen-ct-demo")
        assert result.testsRun == 1 and not result.skipped
    except ModelError:
        assert len(result.skipped) == 1


# ----------------------------------------------------------------------------- real CLI
def test_end_to_end_through_real_cli_with_small_model(app, tmp_path):
    """`python -m CascadeSegLib.cli segment --progress-json` on a phantom, random small model."""
    from model_factory import make_random_model

    from CascadeSegLib.phantom import make_phantom

    organs = ("liver", "spleen", "kidney_right")
    make_random_model(tmp_path / "model", organs=organs)
    ct, _ = make_phantom(size=(48, 40, 32), spacing=(4.0, 4.0, 4.0), origin=(10.0, -20.0, 5.0),
                         direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), organs=organs)
    sitk.WriteImage(ct, str(tmp_path / "phantom.nrrd"))
    volume = app.load_volume(str(tmp_path / "phantom.nrrd"), "phantom")
    logic = CascadeSegLogic(app.scene)
    seen = []
    seg_node = logic.run(volume, SegmentParameters(model=str(tmp_path / "model"), device="cpu",
                                                   keep_candidates=True),
                         on_progress=lambda p: seen.append(p.stage), timeout_s=300)
    seg = seg_node.GetSegmentation()
    assert list(seg.GetSegmentIDs()) == list(organs)
    assert [seg.GetSegment(o).GetLabelValue() for o in organs] == [1, 2, 3]
    # Every progress event of the child reaches the callback, however fast the stages pass.
    assert seen[-1] == "done" and {"preprocess", "stage1", "stage2", "postprocess"} <= set(seen)
    for o in organs:
        _, m, _ = segment_array(seg_node, o)
        np.testing.assert_allclose(m, ijk_to_ras(volume), atol=1e-4)
    # random weights biased to foreground: something was labelled
    assert sum(int(segment_array(seg_node, o)[0].sum()) for o in organs) > 0
    c1 = app.scene.GetFirstNodeByName("phantom C1")
    c2 = app.scene.GetFirstNodeByName("phantom C2")
    assert c1 is not None and c2 is not None and c1.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(ijk_to_ras(c1), ijk_to_ras(volume), atol=1e-4)
