"""Image and segmentation I/O: geometry kept exactly, real DICOM, errors, atomic writes, Slicer."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CascadeSegLib import io
from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import LabelSet
from CascadeSegLib.phantom import make_phantom, phantom_labelset

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _oblique() -> tuple[float, ...]:
    a, b = 0.3, 0.2
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


OBLIQUE = _oblique()


def _image(dtype=np.int16, direction=IDENTITY, spacing=(0.75, 1.25, 2.5),
           origin=(-120.5, 33.25, -804.5)) -> sitk.Image:
    arr = (np.arange(7 * 6 * 5).reshape(7, 6, 5) * 37 % 2000 - 1000).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip(), repr(msg)
    return msg


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED], ids=["identity", "flipped"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_round_trip_axis_aligned_is_exact(tmp_out, ext, direction, dtype):
    img = _image(dtype, direction)
    path = io.write_image(img, tmp_out / f"img{ext}")
    back = io.read_image(path)
    assert back.GetPixelID() == img.GetPixelID()
    assert io.same_geometry(back, img), io.describe_geometry(back)
    assert back.GetDirection() == direction
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert sorted(p.name for p in tmp_out.iterdir()) == [f"img{ext}"]  # no temp file left


@pytest.mark.parametrize("ext, tol", [(".mha", 0.0), (".nrrd", 1e-12), (".nii.gz", 1e-6)])
def test_round_trip_oblique(tmp_out, ext, tol):
    """MetaImage is bit-exact; NRRD re-derives spacing from 'space directions' (1e-16);
    NIfTI stores geometry as float32, so an oblique direction comes back to ~1e-8."""
    img = _image(np.int16, OBLIQUE, spacing=(0.7, 1.3, 2.1), origin=(10.1, -20.3, 5.7))
    back = io.read_image(io.write_image(img, tmp_out / f"img{ext}"))
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetDirection(), OBLIQUE, rtol=0, atol=tol)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), rtol=tol, atol=0)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), rtol=tol, atol=0)
    if tol == 0.0:
        assert io.same_geometry(back, img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_index_to_physical_is_itks_mapping(dicom_slab_dir):
    """The matrix every module shares agrees with ITK on an oblique, anisotropic grid and on the
    DICOM slab's, at corners and inside."""
    from CascadeSegLib.io.images import index_to_physical

    oblique = sitk.Image([7, 5, 3], sitk.sitkInt16)
    oblique.SetSpacing((0.7, 1.3, 2.9))
    oblique.SetOrigin((-12.5, 40.25, 3.0))
    c, s = math.cos(0.4), math.sin(0.4)
    oblique.SetDirection((c, -s, 0.0, s * 0.8, c * 0.8, -0.6, s * 0.6, c * 0.6, 0.8))
    for img in (oblique, io.read_image(dicom_slab_dir)):
        axes, origin = index_to_physical(img)
        assert axes.dtype == np.float64 and origin.dtype == np.float64
        n = np.array(img.GetSize()) - 1
        for index in ([0, 0, 0], n, [n[0], 0, n[2]], [1.5, 2.25, 0.5]):
            expected = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
            np.testing.assert_allclose(axes @ np.asarray(index, dtype=float) + origin, expected, rtol=0, atol=1e-9)


def test_axis_aligned_indices_are_itks_continuous_indices(sample_ct_path):
    """Target voxel centres in the source's continuous index, axis by axis, equal ITK's for a
    target whose axes are the source's flipped (other spacing and origin); grids whose axes are
    not the other's (rotated, or permuted) get None."""
    from CascadeSegLib.io.images import axis_aligned_indices

    source = io.read_image(sample_ct_path)
    target = sitk.Image([9, 6, 4], sitk.sitkUInt8)
    target.SetSpacing((2.2, 4.5, 1.25))
    d = np.array(source.GetDirection()).reshape(3, 3) * np.array([-1.0, 1.0, -1.0])
    target.SetDirection(tuple(d.ravel()))
    target.SetOrigin((150.5, 20.0, 60.75))
    indices = axis_aligned_indices(source, target)
    assert indices is not None and [len(j) for j in indices] == [9, 6, 4]
    for index in ([0, 0, 0], [8, 5, 3], [3, 1, 2]):
        point = target.TransformIndexToPhysicalPoint(index)
        expected = source.TransformPhysicalPointToContinuousIndex(point)
        np.testing.assert_allclose([indices[a][index[a]] for a in range(3)], expected, rtol=0, atol=1e-9)
    rotated = sitk.Image(target)
    c, s = math.cos(0.2), math.sin(0.2)
    rotated.SetDirection(tuple((d @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])).ravel()))
    permuted = sitk.Image(target)
    permuted.SetDirection(tuple(d[:, [1, 0, 2]].ravel()))
    assert axis_aligned_indices(source, rotated) is None and axis_aligned_indices(source, permuted) is None


def test_sample_ct_read_as_is(sample_ct_path, tmp_out):
    img = io.read_image(sample_ct_path)
    assert img.GetSize() == (122, 101, 112)
    assert img.GetSpacing() == (3.0, 3.0, 3.0)
    assert img.GetDirection() == FLIPPED
    assert img.GetOrigin() == (177.95632934570312, -11.319000244140625, 94.3017578125)
    assert img.GetPixelID() == sitk.sitkInt32  # not cast
    back = io.read_image(io.write_image(img, tmp_out / "ct.nii.gz"))
    assert io.same_geometry(back, img)


def test_vector_image_returned(tmp_out):
    arr = np.arange(4 * 3 * 2 * 3, dtype=np.float32).reshape(4, 3, 2, 3)
    img = sitk.GetImageFromArray(arr, isVector=True)
    back = io.read_image(io.write_image(img, tmp_out / "v.mha"))
    assert back.GetNumberOfComponentsPerPixel() == 3 and back.GetSize() == (2, 3, 4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)


# ------------------------------------------------------------------ DICOM


def test_dicom_slab_geometry(dicom_slab_dir):
    img = io.read_image(dicom_slab_dir)
    assert img.GetSize() == (512, 512, 20)
    assert img.GetSpacing() == (0.9765625, 0.9765625, 2.0)
    assert img.GetOrigin() == (-249.51171875, -437.51171875, -804.5)
    assert img.GetDirection() == IDENTITY
    assert img.GetPixelID() == sitk.sitkInt16
    arr = sitk.GetArrayViewFromImage(img)
    assert arr.min() >= -1024 and arr.max() > 500  # HU (rescale applied): air and bone
    series = io.list_dicom_series(dicom_slab_dir)
    assert len(series) == 1 and series[0].n_slices == 20 and len(series[0].files) == 20


def test_dicom_slab_aligned_with_its_label_map(dicom_slab_dir, dicom_slab_seg_path):
    ct = io.read_image(dicom_slab_dir)
    seg = io.read_image(dicom_slab_seg_path)
    assert seg.GetDirection() == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # y flipped
    assert not io.same_geometry(ct, seg)
    on_ct = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
    assert io.same_geometry(on_ct, ct)
    hu = sitk.GetArrayViewFromImage(ct)
    lab = sitk.GetArrayViewFromImage(on_ct)
    raw = sitk.GetArrayViewFromImage(seg)
    # same voxel centres, only y reversed: resampling is an exact permutation
    np.testing.assert_array_equal(lab, np.flip(raw, axis=1))
    on_body = (hu[lab > 0] > -500).mean()
    naive = (hu[raw > 0] > -500).mean()
    assert on_body > 0.95
    assert naive < on_body - 0.1  # ignoring geometry puts labels on air
    assert not np.array_equal(lab, raw)


def _write_dicom_series(folder: Path, uid: str, n: int, description: str) -> None:
    """A tiny synthetic CT series written by SimpleITK (no pydicom needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = np.random.default_rng(0).integers(-100, 100, (n, 16, 16)).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        sl = sitk.GetImageFromArray(vol[k])
        sl.SetSpacing((0.5, 0.5))
        tags = {"0008|0060": "CT", "0020|000d": uid + ".0", "0020|000e": uid,
                "0008|103e": description, "0020|0013": str(k + 1),
                "0020|0032": f"10\\20\\{30 + 2.5 * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0008|0018": f"{uid}.{k + 1}", "0028|0030": "0.5\\0.5"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"syn{k}.dcm"))
        writer.Execute(sl)


def test_dicom_folder_with_two_series(dicom_slab_dir, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(dicom_slab_dir, folder)
    uid2 = "1.2.826.0.1.3680043.8.498.4242"
    _write_dicom_series(folder, uid2, 4, "synthetic scout")
    series = io.list_dicom_series(folder)
    assert len(series) == 2
    by_uid = {s.uid: s for s in series}
    slab_uid = next(u for u in by_uid if u != uid2)
    assert by_uid[uid2].n_slices == 4 and by_uid[uid2].description == "synthetic scout"
    assert by_uid[slab_uid].n_slices == 20

    with pytest.raises(UserError) as err:
        io.read_image(folder)
    msg = _one_line(err)
    assert uid2 in msg and slab_uid in msg and "--series-uid" in msg
    assert "20 slices" in msg and "4 slices" in msg and "synthetic scout" in msg

    small = io.read_image(folder, series_uid=uid2)
    assert small.GetSize() == (16, 16, 4) and small.GetSpacing() == (0.5, 0.5, 2.5)
    assert small.GetOrigin() == (10.0, 20.0, 30.0)
    big = io.read_image(folder, series_uid=slab_uid)
    assert big.GetSize() == (512, 512, 20)
    with pytest.raises(UserError) as err:
        io.read_image(folder, series_uid="1.2.3")
    assert "1.2.3" in _one_line(err) and uid2 in str(err.value)


def _rewrite_slab(src: Path, dst: Path, y_shift_per_mm: float = 0.0, drop: int | None = None,
                  copy_of: tuple[int, int] | None = None, gantry_degrees: float = 0.0) -> None:
    """The real DICOM slab rewritten (HU as int16) with each slice's ImagePositionPatient moved
    by `y_shift_per_mm` x its height above the first (a tilt), slice `drop` left out, slice
    copy_of[0]'s position given to slice copy_of[1] too, or its image planes turned by
    `gantry_degrees` about x while the table still moves along z (a scanner's gantry tilt)."""
    dst.mkdir(parents=True)
    readers = []
    for f in sorted(src.iterdir()):
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        r.ReadImageInformation()
        readers.append((r.GetOrigin()[2], f, r))
    readers.sort(key=lambda t: t[0])
    z0, uid = readers[0][0], readers[0][2].GetMetaData("0020|000e").strip()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (_z, f, r) in enumerate(readers):
        if k == drop:
            continue
        sl = sitk.Cast(sitk.ReadImage(str(f)), sitk.sitkInt16)
        for tag in ("0008|0060", "0020|000d", "0020|000e", "0020|0037", "0028|0030", "0018|0050", "0020|0013",
                    "0010|0020", "0020|0052"):
            if r.HasMetaDataKey(tag):
                sl.SetMetaData(tag, r.GetMetaData(tag))
        x, y, zz = (float(v) for v in r.GetMetaData("0020|0032").split("\\"))
        if copy_of is not None and k == copy_of[1]:
            zz = readers[copy_of[0]][0]
        sl.SetMetaData("0020|0032", f"{x}\\{y + (zz - z0) * y_shift_per_mm}\\{zz}")
        if gantry_degrees:
            c, s = math.cos(math.radians(gantry_degrees)), math.sin(math.radians(gantry_degrees))
            sl.SetMetaData("0020|0037", f"1\\0\\0\\0\\{c}\\{s}")
        sl.SetMetaData("0028|1052", "0")
        sl.SetMetaData("0028|1053", "1")
        sl.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        writer.SetFileName(str(dst / f"{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_gantry_tilt_is_resampled_square_to_the_slices(dicom_slab_dir, tmp_path):
    """The slab with a gantry tilt: each slice one row further along y than the one below (tan of
    the tilt = 0.9765625 mm / 2 mm, 26.0 degrees). ITK stacks such slices square above the first
    (2.2 mm apart, every slice misplaced by up to 18.6 mm); read_image puts each slice where its
    header says, on a grid square to the slices, with one warning."""
    slab = io.read_image(dicom_slab_dir)
    dy, dz = slab.GetSpacing()[1], slab.GetSpacing()[2]
    tilted = tmp_path / "tilted"
    _rewrite_slab(dicom_slab_dir, tilted, y_shift_per_mm=dy / dz)
    assert sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tilted))).GetSpacing()[2] > dz + 0.1
    warnings: list[str] = []
    read = io.read_image(tilted, on_warning=warnings.append)
    assert warnings == [f"{tilted}: DICOM series with a gantry tilt of 26.0 degrees: resampled onto a grid square "
                        "to its slices, each slice where its header puts it (the outputs are on that grid)"]
    assert read.GetSpacing() == slab.GetSpacing() and read.GetOrigin() == slab.GetOrigin()
    assert read.GetDirection() == slab.GetDirection() and read.GetSize() == (512, 512 + 19, 20)
    assert read.GetPixelID() == sitk.sitkInt16
    a, b = sitk.GetArrayFromImage(slab).astype(int), sitk.GetArrayFromImage(read).astype(int)
    for k in range(20):                  # slice k starts k rows further; linear weights 0/1 round to 1 HU
        assert np.abs(b[k, k:k + 512] - a[k]).max() <= 1
        assert (b[k, :k] == b.min()).all() and (b[k, k + 512:] == b.min()).all()
    # header rounding or table sag (0.1 mm over the slab, under a quarter pixel) is no tilt
    untilted = tmp_path / "untilted"
    _rewrite_slab(dicom_slab_dir, untilted, y_shift_per_mm=0.1 / 38.0)
    plain: list[str] = []
    assert sitk.GetArrayFromImage(io.read_image(untilted, on_warning=plain.append)).shape == a.shape and not plain


def test_dicom_gantry_tilt_of_a_scanner_puts_every_pixel_where_its_header_says(dicom_slab_dir, tmp_path):
    """A scanner's tilt: image planes turned 15 degrees about x, the table moving along z. The
    resampled grid is square to the planes (step 2 mm x cos 15), each file is one of its slices, and
    each grid voxel holds what its file has at that point (linear between rows, within 1 HU)."""
    tilted = tmp_path / "gantry"
    _rewrite_slab(dicom_slab_dir, tilted, gantry_degrees=15.0)
    warnings: list[str] = []
    read = io.read_image(tilted, on_warning=warnings.append)
    assert len(warnings) == 1 and "gantry tilt of 15.0 degrees" in warnings[0]
    assert read.GetSpacing()[2] == pytest.approx(2.0 * math.cos(math.radians(15.0)), abs=1e-9)
    np.testing.assert_allclose(np.reshape(read.GetDirection(), (3, 3))[:, 2],
                               (0.0, -math.sin(math.radians(15.0)), math.cos(math.radians(15.0))), atol=1e-9)
    arr = sitk.GetArrayFromImage(read).astype(float)
    files = sorted(tilted.iterdir())
    for k in (3, 9, 15):
        sl = sitk.ReadImage(str(files[k]))
        a = sitk.GetArrayFromImage(sl)[0].astype(float)
        for j in range(100, 400, 37):
            for i in range(100, 400, 41):
                x, y, z = sl.TransformPhysicalPointToContinuousIndex(read.TransformIndexToPhysicalPoint((i, j, k)))
                assert abs(z) < 1e-6 and abs(x - round(x)) < 1e-6      # on the file's plane and columns
                y0, f = int(math.floor(y)), y - math.floor(y)
                assert abs(arr[k, j, i] - ((1 - f) * a[y0, round(x)] + f * a[y0 + 1, round(x)])) <= 1.0


def test_dicom_series_with_a_missing_or_doubled_slice_is_refused(dicom_slab_dir, tmp_path):
    """ITK stacks what is left evenly (only a warning), so every slice above a gap would be placed
    one slice too low: refused in one line, before any pixel is read."""
    gap = tmp_path / "gap"
    _rewrite_slab(dicom_slab_dir, gap, drop=10)
    with pytest.raises(UserError) as err:
        io.read_image(gap)
    assert f" in {gap}: " in _one_line(err)
    assert ("its slices are not evenly spaced (4.00 mm between slices 10 and 11, 2.00 mm elsewhere): files are "
            "missing or reconstructions are mixed; export the complete series again") in _one_line(err)
    doubled = tmp_path / "doubled"
    _rewrite_slab(dicom_slab_dir, doubled, copy_of=(4, 5))
    with pytest.raises(UserError) as err:
        io.read_image(doubled)
    assert "two or more files lie at one slice position" in _one_line(err)
    # a slice of another orientation in the series (a localizer sharing its UID)
    mixed = tmp_path / "mixed"
    _rewrite_slab(dicom_slab_dir, mixed)
    turned = tmp_path / "turned"
    _rewrite_slab(dicom_slab_dir, turned, gantry_degrees=30.0)
    shutil.copy2(sorted(turned.iterdir())[7], sorted(mixed.iterdir())[7])
    with pytest.raises(UserError) as err:
        io.read_image(mixed)
    assert "its slices lie in different orientations" in _one_line(err) and "007.dcm" in _one_line(err)


# ------------------------------------------------------------------ errors


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(UserError) as err:
        io.read_image(tmp_path / "nope.nii.gz")
    assert "not found" in _one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        io.read_image(empty)
    assert "no DICOM series" in _one_line(err)
    with pytest.raises(UserError):
        io.find_images(tmp_path / "nope")


@pytest.mark.parametrize("ext, compress", [(".nii.gz", True), (".nii", False), (".nrrd", True),
                                           (".mha", True), (".mha", False)])
@pytest.mark.parametrize("fraction", [0.5, 0.995])
def test_truncated_files_raise_user_error(tmp_out, ext, compress, fraction):
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.integers(-1000, 1000, (20, 40, 40)).astype(np.int16))
    path = io.write_image(img, tmp_out / f"full{ext}", compress=compress)
    data = path.read_bytes()
    bad = tmp_out / f"cut{ext}"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(UserError) as err:
        io.read_image(bad)
    assert str(bad) in _one_line(err)


def test_garbage_file_raises_user_error(tmp_out):
    bad = tmp_out / "junk.nrrd"
    bad.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(UserError) as err:
        io.read_image(bad)
    assert "junk.nrrd" in _one_line(err)


def test_multi_member_gzip_nifti_is_accepted(tmp_out):
    """A valid .nii.gz whose gzip trailer does not hold the full size (two members)."""
    import gzip

    img = _image()
    raw = io.write_image(img, tmp_out / "a.nii", compress=False).read_bytes()
    path = tmp_out / "two_members.nii.gz"
    path.write_bytes(gzip.compress(raw[:400]) + gzip.compress(raw[400:]))
    back = io.read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


# ------------------------------------------------------------------ writing safely


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from CascadeSegLib.atomic import atomic_dir

    target = tmp_path / "atlas_source"
    with atomic_dir(target) as tmp:                      # a new folder
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and not target.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("one")
    assert (target / "sub" / "a.txt").read_text() == "one"
    with pytest.raises(KeyboardInterrupt):               # an interrupted refill: nothing changes
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas_source"]
    assert sorted(p.name for p in target.rglob("*")) == ["a.txt", "sub"]
    with atomic_dir(target) as tmp:                      # a finished refill replaces it whole
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.rglob("*")) == ["b.txt"]
    with atomic_dir(target) as first, atomic_dir(target) as second:   # two writers at once
        assert first != second
        (first / "c.txt").write_text("first")
        (second / "d.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) in (["c.txt"], ["d.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas_source"]

def test_atomic_write_keeps_old_file_on_failure(tmp_out, monkeypatch):
    path = io.write_image(_image(), tmp_out / "out.nii.gz")
    before = path.read_bytes()
    real_write = sitk.WriteImage

    def broken(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # a half-written temp file ...
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(UserError) as err:
        io.write_image(_image(np.uint8), path)
    assert "disk full" in _one_line(err)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_out.iterdir()] == ["out.nii.gz"]  # ... is removed

    def interrupted(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.write_segmentation_nrrd(sitk.Cast(_image() > 0, sitk.sitkUInt8),
                                   LabelSet.from_names(["liver"]), tmp_out / "s.seg.nrrd")
    assert [p.name for p in tmp_out.iterdir()] == ["out.nii.gz"]
    monkeypatch.setattr(sitk, "WriteImage", real_write)


def test_temp_file_keeps_format_extension(tmp_out, monkeypatch):
    seen = []
    real_write = sitk.WriteImage

    def spy(image, filename, *args, **kwargs):
        seen.append(Path(filename))
        return real_write(image, filename, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", spy)
    io.write_image(_image(), tmp_out / "a.nii.gz")
    io.write_segmentation_nrrd(sitk.Cast(_image() > 0, sitk.sitkUInt8),
                               LabelSet.from_names(["liver"]), tmp_out / "a.seg.nrrd")
    assert seen[0].parent == tmp_out and seen[0].name.startswith(".tmp-")
    assert seen[0].name.endswith(".nii.gz") and seen[1].name.endswith(".nrrd")


def test_overwrite_and_protect(tmp_out, sample_ct_path):
    path = io.write_image(_image(), tmp_out / "x.nrrd")
    with pytest.raises(UserError) as err:
        io.write_image(_image(), path, overwrite=False)
    assert "--overwrite" in _one_line(err)
    io.write_image(_image(np.uint8), path, overwrite=True)
    assert io.read_image(path).GetPixelID() == sitk.sitkUInt8

    before = sample_ct_path.stat().st_mtime_ns
    with pytest.raises(UserError) as err:
        io.write_image(_image(), sample_ct_path, protect=[sample_ct_path])
    assert "input" in _one_line(err)
    same_via_dots = sample_ct_path.parent / ".." / sample_ct_path.parent.name / sample_ct_path.name
    with pytest.raises(UserError):
        io.write_image(_image(), same_via_dots, protect=[str(sample_ct_path)])
    assert sample_ct_path.stat().st_mtime_ns == before
    with pytest.raises(UserError) as err:
        io.write_image(_image(), tmp_out / "x.mhd")
    assert ".nii.gz" in _one_line(err)


# ------------------------------------------------------------------ batch helpers


def test_find_images_and_case_names(tmp_path):
    img = _image()
    for name in ["b.nrrd", "a.nii.gz", "c.mha", "d.nii", "x.seg.nrrd", "y_labels.nii.gz",
                 "y_labels.nrrd", "y_probabilities.nii.gz", "y_c1.nii.gz", "y_c2.nii.gz",
                 ".tmp-1234.nii.gz"]:
        io.write_image(img, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    _write_dicom_series(tmp_path / "patient7", "1.2.826.0.1.3680043.8.498.77", 2, "s")
    found = io.find_images(tmp_path)
    assert [p.name for p in found] == ["a.nii.gz", "b.nrrd", "c.mha", "d.nii", "patient7"]
    assert [io.case_name(p) for p in found] == ["a", "b", "c", "d", "patient7"]
    assert io.case_name(tmp_path / "x.seg.nrrd") == "x"
    assert io.case_name("case.01.nii.gz") == "case.01"
    assert io.case_name("scan.MHD") == "scan"
    assert io.is_dicom_folder(tmp_path / "patient7") and not io.is_dicom_folder(tmp_path)


def test_same_and_describe_geometry():
    a, b = _image(), _image(np.uint8)
    assert io.same_geometry(a, b)
    b.SetOrigin((-120.5, 33.25, -804.5 + 1e-9))
    assert not io.same_geometry(a, b)
    text = io.describe_geometry(_image(direction=FLIPPED))
    assert "5x6x7" in text and "0.75, 1.25, 2.5" in text and "-120.5, 33.25, -804.5" in text
    assert "-1 0 0; 0 -1 0; 0 0 1" in text and "\n" not in text


# ------------------------------------------------------------------ Slicer segmentation


def _phantom_small(direction=IDENTITY, origin=(0.0, 0.0, 0.0)):
    return make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), origin=origin,
                        direction=direction, seed=3)


def _nrrd_header(path: Path) -> str:
    head = path.read_bytes()[:20000]
    return head.split(b"\n\n", 1)[0].decode("latin-1")


@pytest.mark.parametrize("direction", [FLIPPED, OBLIQUE], ids=["flipped", "oblique"])
def test_seg_nrrd_round_trip(tmp_out, direction):
    _, lab = _phantom_small(direction, origin=(12.5, -40.0, 7.25))
    labels = phantom_labelset(["liver", "spleen", "kidney_right", "kidney_left", "gallbladder",
                               "stomach", "pancreas", "aorta", "inferior_vena_cava",
                               "portal_vein_and_splenic_vein"])
    labels = LabelSet(labels.labels + LabelSet.from_json([{"value": 11, "name": "artery"}]).labels)
    path = io.write_segmentation_nrrd(lab, labels, tmp_out / "case.seg.nrrd")
    seg, segments = io.read_segmentation_nrrd(path)
    assert seg.GetPixelID() == sitk.sitkUInt8 and seg.GetSize() == lab.GetSize()
    assert seg.GetOrigin() == lab.GetOrigin() and seg.GetSpacing() == lab.GetSpacing()
    np.testing.assert_allclose(seg.GetDirection(), direction, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(lab))
    assert not seg.GetMetaDataKeys()
    assert [s["name"] for s in segments] == [lab_.display for lab_ in labels]
    assert [s["id"] for s in segments] == labels.names
    assert [s["label_value"] for s in segments] == [lab_.value for lab_ in labels]
    for s, lab_ in zip(segments, labels):
        np.testing.assert_allclose(s["color"], lab_.color_float, atol=1e-6)
        assert s["terminology"] == lab_.terminology()
        assert s["tags"]["Segmentation.Status"] == "inprogress"
    assert segments[-1]["name"] == "Artery"  # empty label still listed

    header = _nrrd_header(path)
    for line in ["type: unsigned char", "dimension: 3", "space: left-posterior-superior",
                 "Segmentation_MasterRepresentation:=Binary labelmap",
                 "Segmentation_ContainedRepresentationNames:=Binary labelmap|Closed surface|",
                 "Segmentation_ReferenceImageExtentOffset:=0 0 0",
                 "Segment0_ID:=liver", "Segment0_Name:=Liver", "Segment0_NameAutoGenerated:=0",
                 "Segment0_ColorAutoGenerated:=0", "Segment0_Layer:=0", "Segment0_LabelValue:=1",
                 "Segment10_Name:=Artery", "Segment10_LabelValue:=11"]:
        assert line in header.splitlines(), line
    assert "Segmentation_ConversionParameters:=" in header
    assert "Reference image geometry|" in header
    assert "Segment0_Tags:=Segmentation.Status:inprogress|TerminologyEntry:" in header


def test_seg_nrrd_extent_covers_all_labels(tmp_out):
    arr = np.zeros((10, 12, 14), np.uint8)
    arr[2:4, 3:5, 4:6] = 2
    arr[6:8, 8:10, 9:12] = 3
    lab = sitk.GetImageFromArray(arr)
    path = io.write_segmentation_nrrd(lab, LabelSet.from_names(["liver", "spleen", "aorta"]),
                                      tmp_out / "e.seg.nrrd")
    _, segments = io.read_segmentation_nrrd(path)
    # one shared layer: every segment carries the layer's extent (x0 x1 y0 y1 z0 z1)
    assert {s["extent"] for s in segments} == {(4, 11, 3, 9, 2, 7)}
    empty = io.write_segmentation_nrrd(sitk.GetImageFromArray(np.zeros_like(arr)),
                                       LabelSet.from_names(["liver"]), tmp_out / "z.seg.nrrd")
    assert io.read_segmentation_nrrd(empty)[1][0]["extent"] == (0, -1, 0, -1, 0, -1)
    with pytest.raises(ValueError):
        io.write_segmentation_nrrd(lab, LabelSet.from_names(["liver", "spleen"]), tmp_out / "f.seg.nrrd")


def _load_in_slicer(path: Path):
    """Read a .seg.nrrd with Slicer's own MRML storage node, as Slicer does."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()  # registers the converter rules
    logic.SetMRMLScene(scene)
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return slicer, node


def _slicer_segments(slicer, node) -> list[dict]:
    import vtk
    from vtk.util import numpy_support

    segmentation = node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        seg = segmentation.GetNthSegment(i)
        img = seg.GetRepresentation("Binary labelmap")
        scalars = img.GetPointData().GetScalars()
        values = numpy_support.vtk_to_numpy(scalars) if scalars is not None else np.zeros(0)
        matrix = vtk.vtkMatrix4x4()
        img.GetImageToWorldMatrix(matrix)
        out.append({
            "id": segmentation.GetNthSegmentID(i), "name": seg.GetName(),
            "color": seg.GetColor(), "value": seg.GetLabelValue(),
            "count": int((values == seg.GetLabelValue()).sum()),
            "ijk_to_ras": np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]),
            "extent": img.GetExtent(),
        })
    return out


@pytest.mark.parametrize("direction", [FLIPPED, OBLIQUE], ids=["flipped", "oblique"])
def test_seg_nrrd_loads_in_slicer_mrml(tmp_out, direction):
    pytest.importorskip("slicer")
    _, lab = _phantom_small(direction, origin=(12.5, -40.0, 7.25))
    labels = phantom_labelset(["liver", "spleen", "kidney_right", "kidney_left", "gallbladder",
                               "stomach", "pancreas", "aorta", "inferior_vena_cava",
                               "portal_vein_and_splenic_vein"])
    path = io.write_segmentation_nrrd(lab, labels, tmp_out / "case.seg.nrrd")
    slicer, node = _load_in_slicer(path)
    segments = _slicer_segments(slicer, node)
    counts = np.bincount(sitk.GetArrayViewFromImage(lab).ravel(), minlength=11)
    assert len(segments) == len(labels)
    assert [s["id"] for s in segments] == labels.names
    assert [s["name"] for s in segments] == [lab_.display for lab_ in labels]
    for s, lab_ in zip(segments, labels):
        np.testing.assert_allclose(s["color"], lab_.color_float, atol=1e-5)
        assert s["value"] == lab_.value
        assert s["count"] == counts[lab_.value] > 0, lab_.name
        # Slicer places the voxels where SimpleITK does (RAS = diag(-1,-1,1) LPS)
        lps = np.eye(4)
        lps[:3, :3] = np.reshape(lab.GetDirection(), (3, 3)) * np.array(lab.GetSpacing())
        lps[:3, 3] = lab.GetOrigin()
        np.testing.assert_allclose(s["ijk_to_ras"], np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)
    import vtk

    for i, lab_ in enumerate(labels):
        seg = node.GetSegmentation().GetNthSegment(i)
        status, entry = vtk.reference(""), vtk.reference("")
        assert seg.GetTag("Segmentation.Status", status) and str(status) == "inprogress"
        assert seg.GetTag("TerminologyEntry", entry) and str(entry) == lab_.terminology()


def test_seg_nrrd_first_label_empty_loads_in_slicer(tmp_out):
    """Slicer takes a shared layer's extent from its first segment: an empty first label
    must not make it drop the others."""
    pytest.importorskip("slicer")
    arr = np.zeros((10, 12, 14), np.uint8)
    arr[2:4, 3:5, 4:6] = 2
    arr[6:8, 8:10, 9:12] = 3
    lab = sitk.GetImageFromArray(arr)
    lab.SetSpacing((1.5, 2.0, 2.5))
    path = io.write_segmentation_nrrd(lab, LabelSet.from_names(["liver", "spleen", "aorta"]),
                                      tmp_out / "e.seg.nrrd")
    slicer, node = _load_in_slicer(path)
    segments = _slicer_segments(slicer, node)
    assert [(s["id"], s["count"]) for s in segments] == [("liver", 0), ("spleen", 8), ("aorta", 12)]
