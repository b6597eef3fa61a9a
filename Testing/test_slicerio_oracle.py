"""slicerio (Slicer's own .seg.nrrd reader on PyPI) reads back every .seg.nrrd we write.

An independent reader catches what our own reader would miss by sharing our mistakes: the
segment names, colours, terminology codes and label values, the voxels and the geometry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_process import REPO, SAMPLE_CT, cascadeseg

from CascadeSegLib.labels import Label, LabelSet
from CascadeSegLib.packaging.model import load_model

slicerio = pytest.importorskip("slicerio")


def _ijk_to_lps(img: sitk.Image) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    m[:3, 3] = img.GetOrigin()
    return m


def _code(entry: dict, key: str):
    """A code triple, or None where the file has none (Slicer writes an empty one as '^^')."""
    value = entry.get(key)
    return tuple(value) if value and any(value) else None


def check_segments(path: Path, labels: LabelSet, label_map: np.ndarray, geometry: sitk.Image) -> None:
    """slicerio's view of `path` equals the label set, the label map (z, y, x) and the grid."""
    seg = slicerio.read_segmentation(str(path))
    by_value = {s["labelValue"]: s for s in seg["segments"]}
    assert sorted(by_value) == sorted(lab.value for lab in labels)
    for lab in labels:
        s: dict = by_value[lab.value]
        assert s["name"] == lab.display
        np.testing.assert_allclose(s["color"], lab.color_float, atol=1e-5)
        term = s["terminology"]
        assert term["contextName"] == "Segmentation category and type - 3D Slicer General Anatomy list"
        assert _code(term, "category") == lab.category_code and _code(term, "type") == lab.type_code
        assert _code(term, "typeModifier") == lab.modifier_code
        assert term["anatomicContextName"] == "Anatomic codes - DICOM master list"
    # Voxels: slicerio gives (i, j, k), cropped to the stored extent; place them on the full grid.
    voxels = np.asarray(seg["voxels"])
    offset = [int(v) for v in seg.get("referenceImageExtentOffset", [0, 0, 0])]
    full = np.zeros(label_map.shape[::-1], voxels.dtype)
    full[offset[0]:offset[0] + voxels.shape[0], offset[1]:offset[1] + voxels.shape[1],
         offset[2]:offset[2] + voxels.shape[2]] = voxels
    np.testing.assert_array_equal(full.transpose(2, 1, 0), label_map)
    ijk = np.asarray(seg["ijkToLPS"], float)
    expected = _ijk_to_lps(geometry)
    expected[:3, 3] += expected[:3, :3] @ np.array(offset, float)
    np.testing.assert_allclose(ijk, expected, atol=1e-4)


def test_cli_seg_nrrd_reads_back_in_slicerio(tmp_path):
    res = cascadeseg("segment", SAMPLE_CT, "-o", tmp_path / "out", "--quiet", "--no-report")
    assert res.returncode == 0, res.stderr
    labels_img = sitk.ReadImage(str(tmp_path / "out" / "abdomen_ct_3mm_labels.nii.gz"))
    arr = sitk.GetArrayFromImage(labels_img)
    assert len(np.unique(arr)) > 5
    check_segments(tmp_path / "out" / "abdomen_ct_3mm.seg.nrrd", load_model().labels, arr,
                   sitk.ReadImage(str(SAMPLE_CT)))


def test_cli_seg_nrrd_with_unusual_labels_reads_back(tmp_path):
    """Labels beyond the standard table (fallback colours, no codes) and gaps in the values."""
    from CascadeSegLib.io import write_segmentation_nrrd

    ct = sitk.ReadImage(str(SAMPLE_CT))
    arr = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    arr[10:20, 30:40, 50:60] = 3
    arr[40:45, 30:40, 50:60] = 200
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    labels = LabelSet((Label.from_json({"value": 3, "name": "liver"}),
                       Label.from_json({"value": 200, "name": "my_lesion", "color": [10, 20, 30]}),
                       Label.from_json({"value": 7, "name": "kidney_left"})))  # empty segment
    path = write_segmentation_nrrd(img, labels, tmp_path / "x.seg.nrrd")
    check_segments(path, labels, arr, ct)


def test_slicer_module_seg_nrrd_reads_back_in_slicerio(tmp_path):
    """The module's own writer (Segment Editor's storage node) on an imported result."""
    pytest.importorskip("slicer")
    sys.path.insert(0, str(REPO / "CascadeSeg"))
    from CascadeSegSlicer.headless import make_scene
    from CascadeSegSlicer.logic import CascadeSegLogic
    from CascadeSegSlicer.training import write_segmentation

    res = cascadeseg("segment", SAMPLE_CT, "-o", tmp_path / "labels.nii.gz", "--quiet")
    assert res.returncode == 0, res.stderr
    labels = load_model().labels
    app = make_scene()
    volume = app.load_volume(str(SAMPLE_CT), "abdomen_ct_3mm")
    event = {"event": "done", "case": "abdomen_ct_3mm", "outputs": {"labels": str(tmp_path / "labels.nii.gz")},
             "labels": labels.to_json(), "timings": {"total": 1.0}}
    node = CascadeSegLogic(app.scene).import_result(volume, event)
    path = tmp_path / "module.seg.nrrd"
    write_segmentation(node, path)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    check_segments(path, labels, arr, sitk.ReadImage(str(SAMPLE_CT)))
