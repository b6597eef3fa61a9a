"""The Slicer module's logic under slicer-core (real MRML, no Slicer app, no Qt).

Checks that a `cascadeseg segment --progress-json` result becomes a segmentation node with
the model's names, colours, terminology and label values on the input's exact geometry
(flipped/oblique included), that it round-trips through .seg.nrrd, and that a cancelled or
failed run leaves the scene as it was and removes its temporary folder. The process side
is driven by a fake CLI script, so these tests do not need a trained model.
"""

from __future__ import annotations

import json
import os
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
from CascadeSegSlicer.logic import ATTR_INPUT, CascadeSegLogic, RunCancelled, RunError, build_segmentation  # noqa: E402
from CascadeSegSlicer.parameters import SegmentParameters  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet  # noqa: E402

SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_TS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
TOTALSEG_IDS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
                6: "stomach", 7: "pancreas", 52: "aorta", 63: "inferior_vena_cava",
                64: "portal_vein_and_splenic_vein"}
LABELS = LabelSet.from_names(DEFAULT_ORGANS)


# ----------------------------------------------------------------------------- helpers
def remap_totalseg(path: Path, out: Path) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(img)
    lut = np.zeros(int(a.max()) + 1, np.uint8)
    for ts_id, name in TOTALSEG_IDS.items():
        lut[ts_id] = LABELS.by_name(name).value
    res = sitk.GetImageFromArray(lut[a])
    res.CopyInformation(img)
    sitk.WriteImage(res, str(out))
    return lut[a]


def done_event(labels_path: Path, labels: LabelSet = LABELS, **outputs) -> dict:
    return {"event": "done", "case": "input", "outputs": {"labels": str(labels_path), **outputs},
            "labels": labels.to_json(), "timings": {"read": 0.1, "total": 1.0}}


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def image_to_world(oriented) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def segment_array(seg_node, segment_id: str):
    """(array in z,y,x of the segment's own labelmap == its label value, image-to-world, extent)."""
    seg = seg_node.GetSegmentation()
    oriented = seg.GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    ext = oriented.GetExtent()
    dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
    a = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims[::-1])
    value = seg.GetSegment(segment_id).GetLabelValue()
    return a == value, image_to_world(oriented), ext


def scene_snapshot(scene) -> list[tuple[str, str, int]]:
    out = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        out.append((n.GetID(), n.GetName() or "", n.GetMTime() if not n.IsA("vtkMRMLSegmentationNode") else 0))
    return out


@pytest.fixture()
def app():
    return make_scene()


@pytest.fixture()
def sample(app, tmp_path):
    volume = app.load_volume(str(SAMPLE_CT), "abdomen_ct_3mm")
    labels_path = tmp_path / "labels.nii.gz"
    arr = remap_totalseg(SAMPLE_TS, labels_path)
    return volume, labels_path, arr


# ----------------------------------------------------------------------------- import
def test_import_gives_named_coloured_coded_segments_on_input_geometry(app, sample):
    volume, labels_path, arr = sample
    logic = CascadeSegLogic(app.scene)
    seg_node = logic.import_result(volume, done_event(labels_path))

    assert seg_node.GetScene() is app.scene
    assert seg_node.GetName() == "abdomen_ct_3mm segmentation"
    assert seg_node.GetAttribute(ATTR_INPUT) == volume.GetID()
    seg = seg_node.GetSegmentation()
    assert list(seg.GetSegmentIDs()) == list(DEFAULT_ORGANS)
    for lab in LABELS:
        s = seg.GetSegment(lab.name)
        assert s.GetName() == lab.display
        assert s.GetLabelValue() == lab.value
        np.testing.assert_allclose(s.GetColor(), lab.color_float, atol=1e-6)
        assert s.GetTerminology() == lab.terminology()
        mask, m, _ = segment_array(seg_node, lab.name)
        # same grid as the input volume, same voxels as the label map
        np.testing.assert_allclose(m, ijk_to_ras(volume), atol=1e-5)
        assert mask.shape == arr.shape
        assert int(mask.sum()) == int((arr == lab.value).sum()) > 0
        np.testing.assert_array_equal(mask, arr == lab.value)
        surface = seg_node.GetClosedSurfaceInternalRepresentation(lab.name)
        assert surface is not None and surface.GetNumberOfPoints() > 50
    # Slicer's terminology for the liver: the SNOMED code of the General Anatomy list
    assert "SCT^10200004^Liver" in seg.GetSegment("liver").GetTerminology()
    assert "SCT^24028007^Right" in seg.GetSegment("kidney_right").GetTerminology()
    # all segments share one labelmap layer (what Segment Editor produces itself)
    assert seg.GetNumberOfLayers() == 1
    # reference geometry = the input volume
    ref = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        seg.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()), ref)
    np.testing.assert_allclose(image_to_world(ref), ijk_to_ras(volume), atol=1e-5)
    assert ref.GetDimensions() == volume.GetImageData().GetDimensions()
    disp = seg_node.GetDisplayNode()
    assert disp.GetVisibility3D() and disp.GetPreferredDisplayRepresentationName3D() == "Closed surface"
    # surfaces by surface nets with its own smoothing, kept with the node for later rebuilds
    assert seg.GetConversionParameter("Conversion method") == "1"
    assert seg.GetConversionParameter("SurfaceNets smoothing") == "1"


def test_surfaces_follow_the_labels_within_a_voxel(app, sample):
    """Surface nets with their smoothing stay on the organs: every surface point of the liver
    lies within 2 voxels of the label map's liver boundary (3 mm voxels), and the enclosed
    volume matches the voxel count within 5 %."""
    import vtk
    from scipy import ndimage

    volume, labels_path, arr = sample
    seg_node = CascadeSegLogic(app.scene).import_result(volume, done_event(labels_path))
    liver = next(lab for lab in LABELS if lab.name == "liver")
    surface = seg_node.GetClosedSurfaceInternalRepresentation("liver")
    mass = vtk.vtkMassProperties()
    mass.SetInputData(surface)
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000.0
    label_ml = float((arr == liver.value).sum()) * voxel_ml
    assert mass.GetVolume() / 1000.0 == pytest.approx(label_ml, rel=0.05)
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume))
    pts = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
    ijk = (ras_to_ijk @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
    mask = arr == liver.value
    boundary = mask & ~ndimage.binary_erosion(mask)
    dist = ndimage.distance_transform_edt(~boundary)
    zyx = np.clip(np.rint(ijk[:, ::-1]).astype(int), 0, np.array(mask.shape) - 1)
    assert float(dist[tuple(zyx.T)].max()) <= 2.0


def test_flipped_oblique_volume_keeps_geometry(app, tmp_path):
    size = (40, 36, 30)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1, 1, -1])  # flipped x and z
    ct = sitk.Image(size, sitk.sitkInt16)
    ct.SetSpacing((1.5, 2.0, 2.5))
    ct.SetOrigin((12.0, -30.5, 7.25))
    ct.SetDirection(rot.ravel().tolist())
    z, y, x = np.mgrid[:size[2], :size[1], :size[0]]
    lab = np.zeros((size[2], size[1], size[0]), np.uint8)
    lab[((x - 10) ** 2 + (y - 12) ** 2 + (z - 8) ** 2) < 25] = 1      # liver blob, off-centre
    lab[((x - 28) ** 2 + (y - 20) ** 2 + (z - 20) ** 2) < 16] = 3     # right kidney blob
    ct_arr = np.where(lab > 0, 60, -1000).astype(np.int16)
    ct_img = sitk.GetImageFromArray(ct_arr)
    ct_img.CopyInformation(ct)
    lab_img = sitk.GetImageFromArray(lab)
    lab_img.CopyInformation(ct)
    sitk.WriteImage(ct_img, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(lab_img, str(tmp_path / "labels.nii.gz"))

    volume = app.load_volume(str(tmp_path / "ct.nrrd"), "oblique")
    logic = CascadeSegLogic(app.scene)
    seg_node = logic.import_result(volume, done_event(tmp_path / "labels.nii.gz"))
    for lab_value, name in ((1, "liver"), (3, "kidney_right")):
        mask, m, ext = segment_array(seg_node, name)
        np.testing.assert_allclose(m, ijk_to_ras(volume), atol=1e-5)
        assert int(mask.sum()) == int((lab == lab_value).sum())
        # centroid in RAS from the segment == centroid in LPS from SimpleITK, flipped
        kk, jj, ii = np.nonzero(mask)
        ijk = np.stack([ii + ext[0], jj + ext[2], kk + ext[4], np.ones_like(ii)]).mean(axis=1)
        ras = (m @ ijk)[:3]
        zz, yy, xx = np.nonzero(lab == lab_value)
        lps = lab_img.TransformContinuousIndexToPhysicalPoint([xx.mean(), yy.mean(), zz.mean()])
        np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert seg_node.GetSegmentation().GetSegment("spleen").GetLabelValue() == 2  # absent: empty
    assert segment_array(seg_node, "spleen")[0].sum() == 0


def test_seg_nrrd_round_trip_is_identical(app, sample, tmp_path):
    volume, labels_path, _ = sample
    seg_node = CascadeSegLogic(app.scene).import_result(volume, done_event(labels_path))
    path = tmp_path / "result.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(seg_node)
    loaded = slicer.vtkMRMLSegmentationNode()
    app.scene.AddNode(loaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    a, b = seg_node.GetSegmentation(), loaded.GetSegmentation()
    assert list(b.GetSegmentIDs()) == list(a.GetSegmentIDs())
    for sid in a.GetSegmentIDs():
        sa, sb = a.GetSegment(sid), b.GetSegment(sid)
        assert (sb.GetName(), sb.GetLabelValue(), sb.GetTerminology()) == \
               (sa.GetName(), sa.GetLabelValue(), sa.GetTerminology())
        np.testing.assert_allclose(sb.GetColor(), sa.GetColor(), atol=1e-6)
        ma, wa, ea = segment_array(seg_node, sid)
        mb, wb, eb = segment_array(loaded, sid)
        np.testing.assert_allclose(wb, wa, atol=1e-5)
        # the file may crop to the non-empty extent: compare in the original index space
        full = np.zeros_like(ma)
        full[eb[4] - ea[4]:eb[5] - ea[4] + 1, eb[2] - ea[2]:eb[3] - ea[2] + 1,
             eb[0] - ea[0]:eb[1] - ea[0] + 1] = mb
        np.testing.assert_array_equal(full, ma)
    # the library's own reader sees the same label values (names and geometry in the file)
    header = path.read_bytes()[:20000].decode("latin-1")
    assert "Segment0_LabelValue:=1" in header and "Segment0_Name:=Liver" in header


def test_rerun_replaces_instead_of_piling_up(app, sample):
    volume, labels_path, _ = sample
    logic = CascadeSegLogic(app.scene)
    first = logic.import_result(volume, done_event(labels_path))
    n = app.scene.GetNumberOfNodes()
    second = logic.import_result(volume, done_event(labels_path))
    assert second is first and app.scene.GetNumberOfNodes() == n
    assert first.GetSegmentation().GetNumberOfSegments() == len(LABELS)
    third = logic.import_result(volume, done_event(labels_path),
                                SegmentParameters(create_new_segmentation=True))
    assert third is not first and third.GetName() != first.GetName()
    # replacing a chosen node keeps its ID and drops its old segments
    chosen = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    chosen.GetSegmentation().AddEmptySegment("old", "Old")
    out = logic.import_result(volume, done_event(labels_path, LabelSet.from_names(["liver", "spleen"])),
                              output_node=chosen)
    assert out is chosen and list(out.GetSegmentation().GetSegmentIDs()) == ["liver", "spleen"]


def test_bad_result_raises_and_leaves_scene(app, sample, tmp_path):
    volume, labels_path, _ = sample
    before = scene_snapshot(app.scene)
    logic = CascadeSegLogic(app.scene)
    with pytest.raises(RunError, match="missing"):
        logic.import_result(volume, done_event(tmp_path / "nope.nii.gz"))
    with pytest.raises(RunError, match="no labels"):
        logic.import_result(volume, {**done_event(labels_path), "labels": []})
    assert scene_snapshot(app.scene) == before


def test_build_segmentation_ignores_unknown_values(tmp_path):
    img = sitk.Image((8, 8, 8), sitk.sitkUInt8)
    a = np.zeros((8, 8, 8), np.uint8)
    a[1:3] = 1
    a[4:6] = 7  # not a model label
    out = sitk.GetImageFromArray(a)
    sitk.WriteImage(out, str(tmp_path / "l.nii.gz"))
    seg = build_segmentation(tmp_path / "l.nii.gz", LabelSet.from_names(["liver"]).to_json())
    rep = seg.GetSegment("liver").GetRepresentation("Binary labelmap")
    vals = numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars())
    assert set(np.unique(vals)) == {0, 1} and (vals == 1).sum() == 2 * 64
    del img


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split()[2] != "Z"
    except FileNotFoundError:
        return False


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
    assert not _alive(parent) and not _alive(child)
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

    def ensure_dependencies(self):
        return True

    def confirm(self, text):
        self.confirms.append(text)
        return self.answer

    def error(self, message, details=""):
        self.errors.append((message, details))

    def show_result(self, seg, volume):
        self.shown.append(seg)


def ui_widget_names() -> set[str]:
    import xml.etree.ElementTree as ET

    tree = ET.parse(REPO / "CascadeSeg" / "Resources" / "UI" / "CascadeSeg.ui")
    return {w.get("name") for w in tree.iter("widget")}


def make_controller(logic, gui):
    from types import SimpleNamespace

    from CascadeSegSlicer.models import ModelChoice
    from CascadeSegSlicer.widget import CascadeSegController

    ui = SimpleNamespace(**{name: FakeWidget() for name in ui_widget_names()})
    ctl = CascadeSegController(ui, logic, gui, FakeTimer)
    ctl.setup()
    ctl.models = [ModelChoice("abdomen-ct-demo", "1.0.0", "bundled", labels=tuple(DEFAULT_ORGANS),
                              license="Apache-2.0")]
    ui.modelComboBox.clear()
    ui.modelComboBox.addItem("abdomen-ct-demo 1.0.0", "abdomen-ct-demo")
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
    assert {"stage1", "stage2"} & set(seen)
    for o in organs:
        _, m, _ = segment_array(seg_node, o)
        np.testing.assert_allclose(m, ijk_to_ras(volume), atol=1e-4)
    # random weights biased to foreground: something was labelled
    assert sum(int(segment_array(seg_node, o)[0].sum()) for o in organs) > 0
    c1 = app.scene.GetFirstNodeByName("phantom C1")
    c2 = app.scene.GetFirstNodeByName("phantom C2")
    assert c1 is not None and c2 is not None and c1.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(ijk_to_ras(c1), ijk_to_ras(volume), atol=1e-4)
