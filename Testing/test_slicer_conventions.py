"""Slicer module conventions, headless (slicer-core, real MRML): the parameter node, reloading
the CascadeSegSlicer submodules, device detection and model install in a child process, the
dependency check's versions, and translatable strings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "CascadeSeg"))

from CascadeSegSlicer.headless import make_scene  # noqa: E402
from CascadeSegSlicer.logic import CascadeSegLogic  # noqa: E402
from CascadeSegSlicer.parameter_node import parameter_node  # noqa: E402
from test_slicer_logic import FakeGui, make_controller  # noqa: E402

from CascadeSegLib.resources import DEFAULT_MODEL  # noqa: E402


def add_volume(scene, name: str, cls: str = "vtkMRMLScalarVolumeNode"):
    return scene.AddNewNodeByClass(cls, name)


# ----------------------------------------------------------------------------- parameter node
def test_parameter_node_is_saved_with_the_scene_in_parameter_node_wrapper_format(tmp_path):
    app = make_scene()
    ct = add_volume(app.scene, "ct")
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct segmentation")
    values = parameter_node(app.scene)
    assert (values.model, values.device, values.overlap, values.inputVolume) == (DEFAULT_MODEL, "auto", False, None)
    values.inputVolume, values.outputSegmentation = ct, seg
    values.model, values.device, values.overlap, values.refine = "my-model", "cpu", True, True
    with pytest.raises(ValueError):
        values.device = "gpu"
    with pytest.raises(TypeError):
        values.inputVolume = seg
    # one singleton node, found again (what ScriptedLoadableModuleLogic.getParameterNode looks up)
    assert parameter_node(app.scene).parameterNode is values.parameterNode
    node = app.scene.GetSingletonNode("CascadeSeg", "vtkMRMLScriptedModuleNode")
    assert node is values.parameterNode and node.GetModuleName() == "CascadeSeg"
    # stored as slicer.parameterNodeWrapper stores them: text, "True"/"False", node references
    assert node.GetParameter("model") == "my-model" and node.GetParameter("overlap") == "True"
    assert node.GetParameter("stage1Only") == "False" and node.GetNodeReferenceID("inputVolume") == ct.GetID()

    app.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert app.scene.Commit()
    loaded = make_scene()
    loaded.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.scene.Connect()
    again = parameter_node(loaded.scene)
    assert loaded.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    assert (again.model, again.device, again.overlap, again.refine, again.stage1Only) == \
        ("my-model", "cpu", True, True, False)
    assert again.inputVolume.GetName() == "ct" and again.outputSegmentation.GetName() == "ct segmentation"


def test_panel_edits_and_shows_the_parameter_node(tmp_path):
    app = make_scene()
    add_volume(app.scene, "labels", "vtkMRMLLabelMapVolumeNode")
    ct = add_volume(app.scene, "ct")
    logic = CascadeSegLogic(app.scene, use_worker=False)
    ui, ctl = make_controller(logic, FakeGui())
    values = ctl.values
    assert values is not None and values.parameterNode is parameter_node(app.scene).parameterNode
    # module entered: an empty input gets the first CT-like volume (not the label map)
    ctl.initialize_parameter_node()
    assert values.inputVolume is ct and ui.inputVolumeSelector.currentNode() is ct
    # panel -> node
    ui.overlapCheckBox.checked = True
    ui.overlapCheckBox.toggled.emit(True)
    ui.deviceComboBox.setCurrentIndex([d for _, d in ui.deviceComboBox.items].index("cpu"))
    assert values.overlap and values.device == "cpu" and values.model == DEFAULT_MODEL
    params = ctl.parameters()
    assert params.overlap and params.device == "cpu" and params.create_new_segmentation
    # node -> panel (a script, or a loaded scene)
    values.stage1Only, values.device = True, "cuda"
    assert ui.stage1OnlyCheckBox.checked and ui.deviceComboBox.currentData == "cuda"
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    values.outputSegmentation = seg
    assert ui.outputSegmentationSelector.currentNode() is seg and not ctl.parameters().create_new_segmentation
    # a new panel on the same scene (module reopened) shows what was chosen
    ui2, ctl2 = make_controller(CascadeSegLogic(app.scene, use_worker=False), FakeGui())
    assert ui2.overlapCheckBox.checked and ui2.stage1OnlyCheckBox.checked
    assert ui2.deviceComboBox.currentData == "cuda" and ui2.inputVolumeSelector.currentNode() is ct
    # closing the panel stops observing: later edits no longer reach its widgets
    ctl.cleanup()
    values.overlap = False
    assert ui.overlapCheckBox.checked and not ui2.overlapCheckBox.checked


def test_module_logic_gives_the_wrapped_parameter_node():
    import importlib.util

    spec = importlib.util.spec_from_file_location("CascadeSeg", REPO / "CascadeSeg" / "CascadeSeg.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    app = make_scene()
    values = mod.CascadeSegLogic(app.scene).getParameterNode()
    values.keepCandidates = True
    assert parameter_node(app.scene).keepCandidates


# ----------------------------------------------------------------------------- Reload
def test_reload_order_lists_every_submodule_after_its_imports():
    import ast

    import CascadeSegSlicer

    package = REPO / "CascadeSeg" / "CascadeSegSlicer"
    order = list(CascadeSegSlicer.SUBMODULES)
    assert sorted(order) == sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    for name in order:
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        for node in tree.body:  # module-level imports bind names at (re)load time
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                assert order.index(node.module) < order.index(name), f"{name} imports {node.module}"


RELOAD_SCRIPT = r'''
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("CascadeSeg", sys.argv[1] + "/CascadeSeg.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
import CascadeSegSlicer.widget as widget, CascadeSegSlicer.logic as logic, CascadeSegSlicer.training as training
old_logic = logic.CascadeSegLogic
# a developer edits logic.py and runs.py, then presses Reload
path = sys.argv[1] + "/CascadeSegSlicer/logic.py"
open(path, "a").write("\nCascadeSegLogic.EDITED = True\n")
open(sys.argv[1] + "/CascadeSegSlicer/runs.py", "a").write("\nSegmentRun.EDITED = True\n")
calls = []
mod.ScriptedLoadableModuleWidget.onReload = lambda self: calls.append("module reloaded")
mod.CascadeSegWidget.onReload(object.__new__(mod.CascadeSegWidget))
assert calls == ["module reloaded"], calls
assert logic.CascadeSegLogic is not old_logic and logic.CascadeSegLogic.EDITED
assert widget.CascadeSegLogic is logic.CascadeSegLogic, "widget holds the old logic class"
assert training.SegmentRun.EDITED and widget.SegmentRun is training.SegmentRun
print("reloaded")
'''


def test_module_reload_picks_up_edited_submodules(tmp_path):
    """Module panel Reload after editing logic.py/runs.py: every module sees the new classes."""
    import shutil
    import subprocess

    copy = tmp_path / "CascadeSeg"
    shutil.copytree(REPO / "CascadeSeg", copy, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(copy)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr


# ----------------------------------------------------------------------------- child processes
def drive_poller(poller, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while poller.running and time.monotonic() < deadline:
        poller.on_timer()
        time.sleep(0.05)
    assert not poller.running, "the child process did not finish in time"


def test_device_detection_runs_in_a_child_process():
    """The panel asks `cascadeseg devices --json` (the real CLI) and shows what auto uses."""
    from CascadeSegSlicer.dependencies import device_summary

    from CascadeSegLib.commands.devices import detect

    app = make_scene()
    ui, ctl = make_controller(CascadeSegLogic(app.scene, use_worker=False), FakeGui())
    ctl.show_devices()
    assert ctl.devices.running and ui.deviceInfoLabel.text == "Detecting devices..."
    child = ctl.devices.run.process.pid
    drive_poller(ctl.devices)
    assert child != os.getpid()
    assert ui.deviceInfoLabel.text == device_summary(detect()) and "auto" in ui.deviceInfoLabel.text


TORCH_FREE_SCRIPT = r'''
import sys
sys.path.insert(0, sys.argv[1])
import CascadeSegSlicer.widget, CascadeSegSlicer.training_widget
from CascadeSegSlicer.dependencies import missing_packages, device_summary
from CascadeSegSlicer.logic import CascadeSegLogic
from CascadeSegSlicer.models import list_models
missing_packages(); list_models()
logic = CascadeSegLogic(None, use_worker=False)
run = logic.start_device_detection()
done = logic.finish_command(run)
print(device_summary(done))
heavy = sorted(m for m in ("torch", "scipy", "SimpleITK") if m in sys.modules)
assert not heavy, heavy
'''


def test_panel_side_of_devices_models_and_dependencies_never_imports_torch():
    import subprocess

    done = subprocess.run([sys.executable, "-c", TORCH_FREE_SCRIPT, str(REPO / "CascadeSeg")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "auto" in done.stdout


class SlowZipServer:
    """Loopback HTTP: /model.zip served whole, /stall.zip half then nothing (a dead network)."""

    def __init__(self, blob: bytes) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requested, self.release = threading.Event(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                if self.path == "/model.zip":
                    self.wfile.write(blob)
                    return
                self.wfile.write(blob[: len(blob) // 2])
                self.wfile.flush()
                outer.requested.set()
                outer.release.wait(60)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture()
def zip_server(tmp_path, monkeypatch):
    from packaging_helpers import make_package

    from CascadeSegLib.packaging.archive import make_zip

    monkeypatch.setenv("CASCADESEG_MODELS", str(tmp_path / "models"))
    blob = make_zip(make_package(tmp_path / "pkg" / "tiny-organs"), tmp_path / "tiny.zip",
                    prefix="tiny-organs").read_bytes()
    server = SlowZipServer(blob)
    yield server
    server.close()


class AskingGui(FakeGui):
    def __init__(self, answer: str) -> None:
        super().__init__()
        self.text_answer = answer

    def ask_text(self, title, label, default=""):
        return self.text_answer


def test_model_install_runs_in_a_child_process_with_progress(zip_server, tmp_path):
    from CascadeSegLib.packaging.catalog import installed_models

    app = make_scene()
    gui = AskingGui(zip_server.url("/model.zip"))
    ui, ctl = make_controller(CascadeSegLogic(app.scene, use_worker=False), gui)
    ui.installModelButton.clicked.emit()
    assert ctl.installing.running and ui.installModelButton.text == "Cancel install"
    assert not ui.segmentButton.enabled and ui.progressBar.visible
    run = ctl.installing.run
    drive_poller(ctl.installing)
    assert not gui.errors, gui.errors
    assert (run.progress.stage, run.progress.fraction) == ("download", 1.0)  # the child's last progress event
    assert ui.progressBar.value == 100 and "MB" in ui.progressBar.format
    assert ui.statusLabel.text == "Installed tiny-organs 1.0.0."
    assert ctl.current_model().name == "tiny-organs" and ctl.values.model == "tiny-organs"
    assert [m.name for m in installed_models() if m.source == "installed"] == ["tiny-organs"]
    assert ui.installModelButton.text == "Install…"


def test_model_install_cancel_kills_the_child_and_installs_nothing(zip_server, tmp_path):
    from cli_process import process_alive

    from CascadeSegLib.packaging.catalog import installed_models

    app = make_scene()
    ui, ctl = make_controller(CascadeSegLogic(app.scene, use_worker=False), AskingGui(zip_server.url("/stall.zip")))
    ui.installModelButton.clicked.emit()
    run = ctl.installing.run
    assert zip_server.requested.wait(120), "the child never asked for the model"
    ui.installModelButton.clicked.emit()  # the button is Cancel now
    assert not ctl.installing.running and not process_alive(run.process.pid) and not run.temp_dir.exists()
    assert ui.statusLabel.text == "Install cancelled; no model was changed."
    assert ui.installModelButton.text == "Install…"
    assert not [m for m in installed_models() if m.source == "installed"]


# ----------------------------------------------------------------------------- dependency versions
def test_dependency_check_compares_versions_and_names_what_to_install():
    from CascadeSegSlicer import dependencies as deps

    assert deps.version_tuple("2.1.0+cu121") == (2, 1, 0) and deps.version_tuple("2.0.0rc1") == (2, 0, 0)
    assert deps.version_tuple("1.24") < deps.version_tuple("1.24.4") < deps.version_tuple("2.0")
    installed = {"torch": "1.13.1", "SimpleITK": "2.3.1", "scipy": "1.9.3", "numpy": "1.26.4", "tqdm": "4.66.1"}
    required = {"torch": "torch>=2.1", "SimpleITK": "SimpleITK>=2.3", "scipy": "scipy>=1.10", "numpy": "numpy>=1.24",
                "tqdm": "tqdm>=4.60"}
    missing = deps.missing_packages(required, installed.get)
    assert missing == ["torch", "scipy"]  # too old; the rest are new enough
    message = deps.requirements_message(missing, required, installed.get)
    assert message == ("CascadeSeg needs torch>=2.1 (1.13.1 is installed), scipy>=1.10 (1.9.3 is installed): "
                       "install torch>=2.1 scipy>=1.10")
    assert "\n" not in message
    gone = deps.missing_packages(required, {**installed, "torch": None, "scipy": "1.10.0"}.get)
    assert gone == ["torch"]
    assert deps.requirements_message(gone, required, {"torch": None}.get) == \
        "CascadeSeg needs torch>=2.1 (not installed): install torch>=2.1"
    # this environment runs the engine, so it meets the real requirements (read from metadata)
    assert deps.missing_packages() == []


def test_dependency_install_asks_for_the_required_versions():
    from CascadeSegSlicer import dependencies as deps

    pip, torch_calls = [], []

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):  # noqa: N802 - PyTorch Utils' name
            torch_calls.append(kwargs)

    deps.install_missing(["scipy", "torch"], pip.append, PyTorchUtilsLogic())
    assert pip == [deps.REQUIRED["scipy"]]
    assert torch_calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]
    deps.install_missing(["torch"], pip.append)
    assert pip[-1] == "torch>=2.1"


def test_module_requirements_match_pyproject():
    """One list: the module's REQUIRED says exactly what pyproject.toml's dependencies say."""
    import tomllib
    from CascadeSegSlicer.dependencies import REQUIRED

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(project["dependencies"]) == sorted(REQUIRED.values())


# ----------------------------------------------------------------------------- translatable strings
TRANSLATED_SCRIPT = r'''
import sys, types
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import slicer
contexts = set()
i18n = types.ModuleType("slicer.i18n")
def tr(text):  # what slicer.i18n.tr does: the context is the calling file
    contexts.add(sys._getframe(1).f_globals["__name__"])
    return "«" + text + "»"
i18n.tr, i18n.translate = tr, lambda context, text: "«" + text + "»"
sys.modules["slicer.i18n"] = slicer.i18n = i18n
from test_slicer_logic import FakeGui, make_controller
from CascadeSegSlicer.dependencies import requirements_message
from CascadeSegSlicer.headless import make_scene
from CascadeSegSlicer.logic import CascadeSegLogic, RunError
class Gui(FakeGui):
    def ask_text(self, title, label, default=""):
        self.asked = (title, label)
        return ""
app = make_scene()
gui = Gui()
ui, ctl = make_controller(CascadeSegLogic(app.scene, use_worker=False), gui)
assert ui.segmentButton.text == "«Segment»", ui.segmentButton.text
assert ui.installModelButton.text == "«Install…»" and ui.deviceComboBox.items[0] == ("«Auto»", "auto")
assert ui.modelInfoLabel.text.startswith("«10 labels: liver") and "{" not in ui.modelInfoLabel.text
ui.installModelButton.clicked.emit()
assert gui.asked == ("«Install a model»", "«Catalog name, URL or path of a model .zip:»"), gui.asked
ctl.cancel()
assert ui.statusLabel.text == "«Cancelled; the scene was not changed.»"
assert requirements_message(["torch"], version_of=lambda d: None).startswith("«CascadeSeg needs «torch>=2.1 (not")
try:
    ctl.logic.start(None, ctl.parameters())
except RunError as exc:
    assert exc.message == "«select a CT volume as input»", exc.message
assert {"CascadeSegSlicer.widget", "CascadeSegSlicer.models", "CascadeSegSlicer.dependencies",
        "CascadeSegSlicer.logic"} <= contexts and "CascadeSegSlicer.i18n" not in contexts, contexts
print("translated")
'''


def test_panel_strings_go_through_slicer_tr():
    """With a slicer.i18n present, the panel shows translated strings, each in its own file's context."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", TRANSLATED_SCRIPT, str(REPO / "CascadeSeg"), str(REPO / "Testing")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "translated" in done.stdout, done.stderr


def test_no_untranslated_literal_reaches_the_panel():
    """Static check of the panel modules: no string literal or f-string is shown as a label or button
    text, or passed to a message box, without `_()` (an f-string cannot be translated at all)."""
    import ast

    shown = {"error", "confirm", "ask_text", "show_report"}
    for name in ("widget", "training_widget", "models", "dependencies"):
        tree = ast.parse((REPO / "CascadeSeg" / "CascadeSegSlicer" / f"{name}.py").read_text(encoding="utf-8"))

        def literal(node) -> bool:
            if isinstance(node, ast.IfExp):
                return literal(node.body) or literal(node.orelse)
            if isinstance(node, ast.BinOp):
                return literal(node.left) or literal(node.right)
            return isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and any(c.isalpha() for c in node.value))

        bad = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "text"
                                                    for t in node.targets) and literal(node.value):
                bad.append(node.lineno)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in shown
                    and node.args and literal(node.args[0])):
                bad.append(node.lineno)
            if isinstance(node, ast.Return) and isinstance(node.value, ast.JoinedStr) and any(
                    isinstance(part, ast.Constant) and any(c.isalpha() for c in part.value)
                    for part in node.value.values):  # a sentence built in an f-string and returned
                bad.append(node.lineno)
            if (isinstance(node, ast.arg) and node.arg == "_") or (
                    isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store)):
                bad.append(node.lineno)  # `_` rebound: a later `_("...")` there would call something else
        assert not bad, f"{name}.py shows untranslated text at lines {bad}"
