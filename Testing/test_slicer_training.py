"""Learning from corrections in the Slicer module, headless (slicer-core, real MRML).

"Add to training cases" goes through the real CLI: a segmentation node as Segment Editor
saves it (.seg.nrrd, cropped, with names and terminology) must land in the corrections store
on the CT's grid with the model's values. "Improve model" is driven through the panel with a
fake `improve` CLI: progress, Cancel, and the new model appearing in the selector.
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

slicer = pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "CascadeSeg"))

from CascadeSegSlicer.headless import make_scene  # noqa: E402
from CascadeSegSlicer.logic import CascadeSegLogic, RunCancelled  # noqa: E402
from CascadeSegSlicer.training import TrainingLogic  # noqa: E402
from model_factory import make_random_model  # noqa: E402
from slicer_scene import LABELS, done_event, remap_totalseg, scene_snapshot  # noqa: E402
from test_slicer_logic import FakeGui, make_controller  # noqa: E402

from CascadeSegLib.corrections import list_corrections  # noqa: E402
from CascadeSegLib.labels import DEFAULT_ORGANS  # noqa: E402
from CascadeSegLib.resources import DEFAULT_MODEL  # noqa: E402

SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_TS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"


@pytest.fixture()
def models_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("CASCADESEG_MODELS", str(root))
    return root


def wait(logic: TrainingLogic, run, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while run.is_running() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    return logic.finish(run)


def test_add_to_training_cases_stores_the_segmentation_with_its_ct(models_root, tmp_path):
    app = make_scene()
    volume = app.load_volume(str(SAMPLE_CT), "abdomen ct 3mm")
    truth = remap_totalseg(SAMPLE_TS, tmp_path / "labels.nii.gz")
    seg_node = CascadeSegLogic(app.scene).import_result(volume, done_event(tmp_path / "labels.nii.gz"))
    seg_node.GetSegmentation().GetSegment("spleen").SetName("Segment_1")      # renamed; ID and terminology say spleen
    model = make_random_model(tmp_path / "model", organs=DEFAULT_ORGANS)
    before = scene_snapshot(app.scene)
    training = TrainingLogic(CascadeSegLogic(app.scene))
    run = training.start_add_case(volume, seg_node, str(model.root), reviewed=["liver", "spleen"])
    done = wait(training, run)
    assert done["id"] == "abdomen_ct_3mm" and done["reviewed"] == ["liver", "spleen"]
    assert not run.temp_dir.exists() and scene_snapshot(app.scene) == before
    (case,) = list_corrections(model.name)
    stored = sitk.ReadImage(str(case.labels))
    ct = sitk.ReadImage(str(SAMPLE_CT))
    assert stored.GetSize() == ct.GetSize()
    np.testing.assert_allclose(stored.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(stored.GetDirection(), ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), truth)
    assert case.voxels["spleen"] == int((truth == LABELS.by_name("spleen").value).sum()) > 0
    # a second add of the same volume is refused unless replacing; the store keeps the first
    run = training.start_add_case(volume, seg_node, str(model.root))
    with pytest.raises(Exception, match="already has a correction 'abdomen_ct_3mm'"):
        wait(training, run)
    assert [c.reviewed for c in list_corrections(model.name)] == [("liver", "spleen")]
    assert training.case_exists(model.name, "abdomen_ct_3mm")


FAKE_IMPROVE = textwrap.dedent(r'''
    import json, os, sys, time
    args = sys.argv[1:]
    assert args[0] == "improve" and "--progress-json" in args, args
    new = args[args.index("-o") + 1]
    with open(os.path.join(os.environ["FAKE_LOG"], "improve_args.json"), "w") as f:
        json.dump(args, f)
    def say(**ev):
        print(json.dumps(ev), flush=True)
    for i in range(4):
        say(event="progress", stage="training", fraction=(i + 1) / 8, message=f"stage1 iteration {i + 1}/4")
        time.sleep(0.05)
    if os.environ["FAKE_MODE"] == "hang":
        time.sleep(600)
    folder = os.path.join(os.environ["CASCADESEG_MODELS"], new)
    os.makedirs(folder)
    src = json.load(open(os.environ["FAKE_MODEL_JSON"]))
    json.dump({**src, "name": new}, open(os.path.join(folder, "model.json"), "w"))
    open(os.path.join(folder, "IMPROVE_REPORT.md"), "w").write("# report\n| liver | 63.3 | 91.0 |\n")
    say(event="done", model=new, path=folder, report=[os.path.join(folder, "IMPROVE_REPORT.md")],
        summary=f"{new}: reviewed-organ Dice on the corrections 63.3% -> 91.0%")
''')


class ReportGui(FakeGui):
    def __init__(self, name: str):
        super().__init__()
        self.name, self.reports = name, []

    def ask_text(self, title, label, default=""):
        self.asked, self.label = default, label
        return self.name

    def show_report(self, message, markdown):
        self.reports.append((message, markdown))


def test_improve_from_the_panel_shows_progress_cancels_and_selects_the_new_model(models_root, tmp_path,
                                                                                 monkeypatch):
    from test_slicer_logic import drive

    app = make_scene()
    model = make_random_model(tmp_path / "model", organs=DEFAULT_ORGANS)
    script = tmp_path / "fake_improve.py"
    script.write_text(FAKE_IMPROVE)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path))
    monkeypatch.setenv("FAKE_MODEL_JSON", str(model.root / "model.json"))
    logic = CascadeSegLogic(app.scene, command_prefix=[sys.executable, str(script)])
    gui = ReportGui("demo-improved")
    ui, ctl = make_controller(logic, gui)
    panel = ctl.training
    assert ui.improveButton.enabled and not ui.addCaseButton.enabled       # no CT / segmentation yet
    # Cancel while training: the process goes, nothing is installed, the panel is usable again
    monkeypatch.setenv("FAKE_MODE", "hang")
    ui.improveButton.clicked.emit()
    assert gui.asked == f"{DEFAULT_MODEL}-improved" and ui.improveButton.text == "Cancel improving"
    deadline = time.monotonic() + 30
    while panel.run.progress.fraction < 0.5 and time.monotonic() < deadline:
        panel.on_timer()
        time.sleep(0.05)
    assert ui.trainingProgressBar.visible and ui.trainingProgressBar.value == 50
    run = panel.run
    ui.improveButton.clicked.emit()
    assert panel.run is None and not run.is_running() and not run.temp_dir.exists()
    assert "Cancelled" in ui.trainingStatusLabel.text and not (models_root / "demo-improved").exists()
    with pytest.raises(RunCancelled):
        panel.logic.finish(run)
    # a finished run: the new model is listed, selected, and its report shown
    monkeypatch.setenv("FAKE_MODE", "ok")
    ui.improveButton.clicked.emit()
    drive(panel, timeout=30)
    args = json.loads((tmp_path / "improve_args.json").read_text(encoding="utf-8"))
    assert args[:4] == ["improve", DEFAULT_MODEL, "-o", "demo-improved"]
    assert not gui.errors, gui.errors
    assert ctl.current_model().name == "demo-improved"
    assert ui.trainingStatusLabel.text.endswith("63.3% -> 91.0%")
    assert gui.reports and "91.0" in gui.reports[0][1]
    assert ui.improveButton.text == "Improve model…" and not ui.trainingProgressBar.visible
    assert "--atlases" not in args
    # "Also keep the cases as atlases": the same run with --atlases, and the question says so
    ui.improveAtlasesCheckBox.checked = True
    gui.name = "demo-atlases"
    ui.improveButton.clicked.emit()
    assert not ui.improveAtlasesCheckBox.enabled          # not changed while a run is going
    drive(panel, timeout=30)
    args = json.loads((tmp_path / "improve_args.json").read_text(encoding="utf-8"))
    assert args[:4] == ["improve", "demo-improved", "-o", "demo-atlases"] and "--atlases" in args
    assert "keep them as atlases" in gui.label and not gui.errors, gui.errors
    assert ctl.current_model().name == "demo-atlases" and ui.improveAtlasesCheckBox.enabled
    assert "--iterations" not in args                      # fine-tuned as well
    # "Atlases only": no fine-tuning, --iterations 0 --atlases
    ui.improveAtlasesCheckBox.checked, ui.improveAtlasesOnlyCheckBox.checked = False, True
    gui.name = "demo-atlases-only"
    ui.improveButton.clicked.emit()
    drive(panel, timeout=30)
    args = json.loads((tmp_path / "improve_args.json").read_text(encoding="utf-8"))
    assert args[args.index("--iterations") + 1] == "0" and "--atlases" in args, args
    assert "no fine-tuning" in gui.label and not gui.errors, gui.errors
