"""Slicer module conventions, headless (slicer-core, real MRML): the parameter node, reloading
the CascadeSegSlicer submodules, device detection and model install in a child process, the
dependency check's versions, and translatable strings."""

from __future__ import annotations

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


def add_volume(scene, name: str, cls: str = "vtkMRMLScalarVolumeNode"):
    return scene.AddNewNodeByClass(cls, name)


# ----------------------------------------------------------------------------- parameter node
def test_parameter_node_is_saved_with_the_scene_in_parameter_node_wrapper_format(tmp_path):
    app = make_scene()
    ct = add_volume(app.scene, "ct")
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct segmentation")
    values = parameter_node(app.scene)
    assert (values.model, values.device, values.overlap, values.inputVolume) == ("abdomen-ct-demo", "auto", False, None)
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
    assert values.overlap and values.device == "cpu" and values.model == "abdomen-ct-demo"
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
    import os
    import shutil
    import subprocess

    copy = tmp_path / "CascadeSeg"
    shutil.copytree(REPO / "CascadeSeg", copy, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(copy)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr
