"""The Slicer module's logic under slicer-core (real MRML, no Slicer app, no Qt): importing a result.

Checks that a `cascadeseg segment --progress-json` result becomes a segmentation node with
the model's names, colours, terminology and label values on the input's exact geometry
(flipped/oblique included), with surfaces on the labels, that it round-trips through .seg.nrrd,
that a re-run replaces the earlier result, that a bad result leaves the scene as it was and that
unknown label values are ignored. Runs, cancelling, failures and the widget are in
test_slicer_logic.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_scene import LABELS, done_event, ijk_to_ras, image_to_world, scene_snapshot, segment_array, slicer

# the fixtures app and sample, imported so that pytest finds them here
from slicer_scene import app_fixture as app_fixture
from slicer_scene import sample_fixture as sample_fixture
from vtk.util import numpy_support

from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet

# isort: split
# slicer_scene put the Slicer module's folder on sys.path: CascadeSegSlicer imports from here on
from CascadeSegSlicer.logic import ATTR_INPUT, CascadeSegLogic, RunError, build_segmentation
from CascadeSegSlicer.parameters import SegmentParameters


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
        mask, m, _ = segment_array(seg_node, name)  # on the volume's grid: index 0 = the volume's
        np.testing.assert_allclose(m, ijk_to_ras(volume), atol=1e-5)
        assert int(mask.sum()) == int((lab == lab_value).sum())
        # centroid in RAS from the segment == centroid in LPS from SimpleITK, flipped
        kk, jj, ii = np.nonzero(mask)
        ijk = np.stack([ii, jj, kk, np.ones_like(ii)]).mean(axis=1)
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
        # both on the reference grid, whatever extent each labelmap was cropped to
        ma, wa, _ = segment_array(seg_node, sid)
        mb, wb, _ = segment_array(loaded, sid)
        np.testing.assert_allclose(wb, wa, atol=1e-5)
        np.testing.assert_array_equal(mb, ma)
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
    assert set(np.unique(vals)) == {1} and (vals == 1).sum() == 2 * 64
    # the labelmap is cut to the known labels' box (slices 1-2), not the unknown value's
    assert rep.GetExtent() == (0, 7, 0, 7, 1, 2)
    del img


def test_empty_result_keeps_the_whole_grid(tmp_path):
    out = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8))
    sitk.WriteImage(out, str(tmp_path / "l.nii.gz"))
    seg = build_segmentation(tmp_path / "l.nii.gz", LabelSet.from_names(["liver"]).to_json())
    rep = seg.GetSegment("liver").GetRepresentation("Binary labelmap")
    assert rep.GetExtent() == (0, 6, 0, 5, 0, 4)
    assert not numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()).any()

