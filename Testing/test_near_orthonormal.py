"""Real-world headers: near-orthonormal directions are read with one warning, shears refused,
and ITK/GDCM never prints its raw multi-line warnings (real `cascadeseg` processes)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_process import SAMPLE_CT, cascadeseg, error_lines

from CascadeSegLib import io
from CascadeSegLib.orientation import deviation


def _sample_nii(path: Path) -> Path:
    """The sample CT as an uncompressed NIfTI (sform code 2, qform code 0, like the original)."""
    sitk.WriteImage(io.read_image(SAMPLE_CT), str(path), False)
    head = path.read_bytes()[:348]
    qcode, scode = struct.unpack("<hh", head[252:256])
    if qcode:  # keep only the sform, as in the TotalSegmentator file: ITK then needs it orthonormal
        _patch(path, 252, struct.pack("<h", 0))
    assert struct.unpack("<h", path.read_bytes()[254:256])[0] > 0
    return path


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _shear_sform(path: Path, amount: float) -> None:
    """Add `amount` x (spacing) of the y axis into srow_x: axes then meet at ~90 deg - amount rad."""
    srow = np.frombuffer(path.read_bytes()[280:328], "<f4").reshape(3, 4).copy()
    srow[0, 1] += amount * np.linalg.norm(srow[:, 1])
    _patch(path, 280, srow.astype("<f4").tobytes())


def test_near_orthonormal_nifti_is_segmented_with_one_warning(tmp_path):
    ct = _sample_nii(tmp_path / "near.nii")
    _shear_sform(ct, 1e-3)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(ct))  # what ITK alone does with it
    out = tmp_path / "out.nii.gz"
    res = cascadeseg("segment", ct, "-o", out, "--stage1-only", "--quiet")
    assert res.returncode == 0, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("cascadeseg: warning: ")
    assert "orthonormal only to 1.0e-03" in lines[0]
    read = io.read_image(ct, on_warning=lambda m: None)
    labels = sitk.ReadImage(str(out))
    assert deviation(read.GetDirection()) < 1e-12
    # The labels carry the CT's geometry as read (exactly, through a NIfTI round trip of float32).
    assert labels.GetSize() == read.GetSize()
    np.testing.assert_array_equal(np.float32(labels.GetSpacing()), np.float32(read.GetSpacing()))
    np.testing.assert_array_equal(np.float32(labels.GetOrigin()), np.float32(read.GetOrigin()))
    np.testing.assert_allclose(labels.GetDirection(), read.GetDirection(), atol=1e-6)
    # ...and the organs are where they are in the original sample CT's segmentation.
    ref = cascadeseg("segment", SAMPLE_CT, "-o", tmp_path / "ref.nii.gz", "--stage1-only", "--quiet")
    assert ref.returncode == 0, ref.stderr
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref.nii.gz"))))


def test_an_oblique_near_orthonormal_nifti_keeps_its_sforms_rotation(tmp_path):
    """An oblique scan (18 degrees about z, 4 about y, 2 about x; TotalSegmentator s0000's masks are
    18 degrees about z) whose float32 sform is orthonormal only to ~3e-4 and which has no qform:
    ITK refuses it, its permissive mode turns the rotation the other way (the sform's transpose),
    read_image places every voxel where the sform says (RAS -> LPS), to the perturbation's size."""
    def rot(axis: int, deg: float) -> np.ndarray:
        c, s, (i, j) = np.cos(np.radians(deg)), np.sin(np.radians(deg)), [(1, 2), (0, 2), (0, 1)][axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m
    rotation = rot(2, 18.35) @ rot(1, 4.0) @ rot(0, 2.0)
    spacing = np.array([0.8, 0.8, 1.5])
    sform = np.zeros((3, 4), np.float32)
    sform[:, :3] = rotation * spacing
    sform[:, 3] = (-251.3, 82.6, 93.1)
    sform[0, 1] += 3e-4 * spacing[1]                      # float32 export of a resampled header
    img = sitk.Image(30, 20, 10, sitk.sitkInt16)
    img.SetSpacing(spacing.tolist())                      # pixdim as the sform's column lengths
    path = tmp_path / "oblique.nii"
    sitk.WriteImage(img, str(path))
    _patch(path, 252, struct.pack("<hh", 0, 2))           # no qform, a scanner sform
    _patch(path, 280, sform.astype("<f4").tobytes())
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))
    warnings: list[str] = []
    read = io.read_image(path, on_warning=warnings.append)
    assert len(warnings) == 1 and "orthonormal only to" in warnings[0]
    assert deviation(read.GetDirection()) < 1e-6
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.reshape(read.GetDirection(), (3, 3)), lps @ rotation, atol=5e-4)
    for corner in [(0, 0, 0), (29, 0, 0), (0, 19, 0), (0, 0, 9), (29, 19, 9)]:
        expected = lps @ (sform[:, :3].astype(float) @ np.array(corner, float) + sform[:, 3])
        np.testing.assert_allclose(read.TransformIndexToPhysicalPoint(corner), expected, atol=0.02)


def test_nifti_without_orientation_is_refused_in_one_line(tmp_path):
    """qform_code and sform_code both 0: ITK would read the sample CT LPS-aligned, its patient
    mirrored (the default model then calls 680 ml of it spleen and finds 254 ml of liver): refused
    in one line, nothing written. With its sform code back it reads as the original."""
    ct = _sample_nii(tmp_path / "no_orientation.nii")
    _patch(ct, 252, struct.pack("<hh", 0, 0))
    out = tmp_path / "out"
    res = cascadeseg("segment", ct, "-o", out, "--quiet")
    assert res.returncode == 2 and not out.exists()
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0] == (
        f"cascadeseg: error: {ct} has no orientation in its NIfTI header (qform_code and sform_code are both 0), so "
        "the patient's left and right are unknown and organs could be swapped; write the orientation into the file "
        "(convert the DICOM series again, e.g. with dcm2niix, or check it in Slicer and save it), then use that file")
    _patch(ct, 252, struct.pack("<hh", 0, 2))
    read, original = io.read_image(ct), io.read_image(SAMPLE_CT)
    assert (read.GetOrigin(), read.GetDirection()) == (original.GetOrigin(), original.GetDirection())
    # a NRRD with spacings but no "space directions" is refused the same way
    voxels = sitk.GetArrayFromImage(original).astype("<i2")
    nrrd = tmp_path / "no_space.nrrd"
    nrrd.write_bytes(("NRRD0004\ntype: short\ndimension: 3\nsizes: " + " ".join(map(str, original.GetSize()))
                      + "\nspacings: 3 3 3\nendian: little\nencoding: raw\n\n").encode() + voxels.tobytes())
    res = cascadeseg("segment", nrrd, "-o", out, "--quiet")
    assert res.returncode == 2 and not out.exists()
    assert error_lines(res.stderr) == [
        f"cascadeseg: error: {nrrd} has no orientation in its NRRD header (no \"space directions\" field), so the "
        "patient's left and right are unknown and organs could be swapped; write the orientation into the file "
        "(convert the DICOM series again, e.g. with dcm2niix, or check it in Slicer and save it), then use that file"]


def test_sheared_nifti_is_refused_in_one_line(tmp_path):
    ct = _sample_nii(tmp_path / "sheared.nii")
    _shear_sform(ct, 0.2)
    res = cascadeseg("segment", ct, "-o", tmp_path / "out", "--quiet")
    assert res.returncode == 2
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("cascadeseg: error: ") and "not orthonormal" in lines[0]
    assert "sheared or its header is damaged" in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_near_orthonormal_nrrd_and_mha(tmp_path, suffix):
    img = io.read_image(SAMPLE_CT)
    d = np.array(img.GetDirection()).reshape(3, 3)
    d[0, 1] += 1e-3  # what a float32 export of a resampled direction looks like
    img.SetDirection(d.ravel().tolist())
    ct = tmp_path / f"near{suffix}"
    sitk.WriteImage(img, str(ct))
    assert deviation(sitk.ReadImage(str(ct)).GetDirection()) > 5e-4  # ITK passes it through as it is
    caught: list[str] = []
    read = io.read_image(ct, on_warning=caught.append)
    assert len(caught) == 1 and "orthonormal only to 1.0e-03" in caught[0]
    assert deviation(read.GetDirection()) < 1e-12
    np.testing.assert_allclose(read.GetDirection(), d.ravel(), atol=1e-3)
    assert read.GetOrigin() == img.GetOrigin() and read.GetSize() == img.GetSize()
    out = tmp_path / "out.nii.gz"
    res = cascadeseg("segment", ct, "-o", out, "--stage1-only", "--quiet")
    assert res.returncode == 0, res.stderr
    assert [ln for ln in error_lines(res.stderr)] == [f"cascadeseg: warning: {caught[0]}"]
    labels = sitk.ReadImage(str(out))
    np.testing.assert_allclose(labels.GetDirection(), read.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), read.GetOrigin(), atol=1e-4)


def test_folders_without_ct_give_one_line_and_no_itk_blocks(tmp_path, dicom_slab_dir):
    empty = tmp_path / "notes"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("not a CT")
    (empty / "sub" / "data.bin").write_bytes(b"\0" * 300)
    for target in (empty, empty / "sub"):
        res = cascadeseg("segment", target, "-o", tmp_path / "out", "--quiet")
        assert res.returncode == 2
        lines = error_lines(res.stderr)
        assert len(lines) == 1 and lines[0].startswith("cascadeseg: error: "), res.stderr
        assert "WARNING" not in res.stderr and ".cxx" not in res.stderr
    # A DICOM series with one slice missing: refused in one line (ITK would stack the rest evenly).
    slab = tmp_path / "slab"
    shutil.copytree(dicom_slab_dir, slab)
    sorted(slab.iterdir())[10].unlink()
    res = cascadeseg("segment", slab, "-o", tmp_path / "slab_out", "--stage1-only", "--quiet")
    assert ".cxx" not in res.stderr and "WARNING: In" not in res.stderr
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr
    assert error_lines(res.stderr)[0].startswith("cascadeseg: error: ") and "not evenly spaced" in res.stderr
