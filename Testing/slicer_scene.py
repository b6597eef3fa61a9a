"""Shared parts of the Slicer module's tests (test_slicer_import.py, test_slicer_logic.py): a
slicer-core scene with the sample CT, its TotalSegmentator labels as our label values, and readers
of a segmentation node's geometry. Importing it skips the importing test module without slicer-core
and puts the Slicer module's folder (CascadeSegSlicer) on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "CascadeSeg"))
from CascadeSegSlicer.headless import make_scene  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet  # noqa: E402

SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_TS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
TOTALSEG_IDS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver",
                6: "stomach", 7: "pancreas", 52: "aorta", 63: "inferior_vena_cava",
                64: "portal_vein_and_splenic_vein"}
LABELS = LabelSet.from_names(DEFAULT_ORGANS)


def remap_totalseg(path: Path, out: Path) -> np.ndarray:
    """The TotalSegmentator label map at `path` in the model's values (the training table), written to `out`."""
    from CascadeSegLib.train.dataset import label_lookup

    img = sitk.ReadImage(str(path))
    remapped = label_lookup(LABELS, TOTALSEG_IDS)[sitk.GetArrayFromImage(img)]
    res = sitk.GetImageFromArray(remapped)
    res.CopyInformation(img)
    sitk.WriteImage(res, str(out))
    return remapped


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
    """(array in z,y,x of the segment's own labelmap == its label value, on the reference
    geometry's whole grid; image-to-world; the labelmap's own extent, which may be cropped)."""
    seg = seg_node.GetSegmentation()
    oriented = seg.GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    ext = oriented.GetExtent()
    dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
    a = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims[::-1])
    value = seg.GetSegment(segment_id).GetLabelValue()
    ref = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        seg.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()), ref)
    full_ext = ref.GetExtent()
    assert all(full_ext[2 * i] <= ext[2 * i] and ext[2 * i + 1] <= full_ext[2 * i + 1] for i in range(3)), \
        f"labelmap extent {ext} outside the reference grid {full_ext}"
    full = np.zeros(ref.GetDimensions()[::-1], bool)
    full[ext[4] - full_ext[4]:ext[5] - full_ext[4] + 1, ext[2] - full_ext[2]:ext[3] - full_ext[2] + 1,
         ext[0] - full_ext[0]:ext[1] - full_ext[0] + 1] = a == value
    return full, image_to_world(oriented), ext


def scene_snapshot(scene) -> list[tuple[str, str, int]]:
    out = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        out.append((n.GetID(), n.GetName() or "", n.GetMTime() if not n.IsA("vtkMRMLSegmentationNode") else 0))
    return out


@pytest.fixture(name="app")
def app_fixture():
    return make_scene()


@pytest.fixture(name="sample")
def sample_fixture(app, tmp_path):
    volume = app.load_volume(str(SAMPLE_CT), "abdomen_ct_3mm")
    labels_path = tmp_path / "labels.nii.gz"
    arr = remap_totalseg(SAMPLE_TS, labels_path)
    return volume, labels_path, arr
