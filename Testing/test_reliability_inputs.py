"""Reliability: inputs that are not what the model expects.

Every refusal goes through the real CLI (`cli.main`): exit code 2, exactly one
`cascadeseg: error:` line naming the problem and the fix, the input untouched and nothing
(not even a temporary file) left in the output folder. Inputs the cascade can take although
they are unusual (tiny, anisotropic, oblique) must give labels on exactly the input grid.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from model_factory import make_random_model

from CascadeSegLib import io as cio
from CascadeSegLib.cli import main
from CascadeSegLib.errors import UserError
from CascadeSegLib.inference import memory
from CascadeSegLib.packaging.model import ModelPackage
from CascadeSegLib.phantom import make_phantom


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    make_random_model(folder)
    return folder


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[sitk.Image, Path]:
    ct, _ = make_phantom(size=(48, 40, 24), spacing=(4.0, 4.0, 5.0), seed=1)
    path = tmp_path_factory.mktemp("ct") / "phantom.nrrd"
    sitk.WriteImage(ct, str(path))
    return ct, path


def digest(path: Path) -> str:
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "".join(digest(p) for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def assert_refused(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, err
    errors = [ln for ln in err if ln.startswith("cascadeseg: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in errors[0], errors[0]


def segment_refused(path: Path, out: Path, model_dir: Path, capsys, *needles: str, extra=()) -> None:
    before = digest(path)
    code, err, _ = run_cli(["segment", str(path), "-o", str(out), "--model", str(model_dir), "--quiet",
                            "--no-report", *extra], capsys)
    assert_refused(code, err, *needles)
    assert digest(path) == before
    assert not out.exists() or list(out.iterdir()) == []


def write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path))
    return path


# ----------------------------------------------------------------------------- wrong shapes


def test_2d_image_refused(tmp_path, model_dir, capsys):
    img = sitk.GetImageFromArray(np.full((40, 48), -500, np.int16))
    segment_refused(write(img, tmp_path / "slice.nrrd"), tmp_path / "out", model_dir, capsys, "2D", "3D CT")


def test_single_slice_refused(tmp_path, model_dir, capsys):
    ct, _ = make_phantom(size=(48, 40, 1), spacing=(4.0, 4.0, 5.0))
    segment_refused(write(ct, tmp_path / "one.nii.gz"), tmp_path / "out", model_dir, capsys,
                    "48x40x1", "single slice", "at least 2 slices")


def test_4d_image_refused(tmp_path, model_dir, capsys):
    vol = sitk.JoinSeries([sitk.GetImageFromArray(np.full((6, 8, 8), v, np.int16)) for v in (-1000, 40, 60)])
    assert vol.GetDimension() == 4
    segment_refused(write(vol, tmp_path / "series.nii.gz"), tmp_path / "out", model_dir, capsys, "4D",
                    "split")


@pytest.mark.parametrize("components", [3, 2])
def test_rgb_and_vector_images_refused(tmp_path, model_dir, capsys, components):
    arr = np.random.default_rng(0).integers(0, 255, (8, 16, 16, components)).astype(np.uint8)
    img = sitk.GetImageFromArray(arr, isVector=True)
    segment_refused(write(img, tmp_path / "rgb.nrrd"), tmp_path / "out", model_dir, capsys,
                    f"{components} components", "single-channel")


# ----------------------------------------------------------------------------- not CT


def _mr_like(ct: sitk.Image) -> sitk.Image:
    """MR-like intensities: no negative values, air ~0, tissue a few hundred."""
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    mr = np.clip((arr + 1000.0) * 0.6, 0, 1500).astype(np.int16)
    img = sitk.GetImageFromArray(mr)
    img.CopyInformation(ct)
    return img


def test_mr_like_image_warns_and_runs_only_when_asked(tmp_path, model_dir, phantom, capsys):
    ct, _ = phantom
    path = write(_mr_like(ct), tmp_path / "mr.nrrd")
    segment_refused(path, tmp_path / "out", model_dir, capsys, "does not look like CT", "no air",
                    "--allow-non-ct")
    out = tmp_path / "forced.nii.gz"
    code, err, _ = run_cli(["segment", str(path), "-o", str(out), "--model", str(model_dir), "--quiet",
                            "--allow-non-ct"], capsys)
    assert code == 0, err
    assert [ln for ln in err if ln.startswith("cascadeseg: warning:")] == [
        "cascadeseg: warning: the image does not look like CT in Hounsfield units: it has no air (1st "
        f"percentile {np.percentile(sitk.GetArrayViewFromImage(_mr_like(ct)), 1):.0f}, CT air is about -1000 HU)"]
    assert cio.same_geometry(sitk.ReadImage(str(out)), ct)


def test_ct_saved_without_its_rescale_intercept_is_refused_with_the_fix(tmp_path, model_dir, phantom, capsys):
    """Unsigned CT with air at 0 (a DICOM series exported without its rescale intercept of -1024):
    refused with what to do; the same CT in HU is segmented, and MR-like data gets no such hint."""
    ct, _ = phantom
    shifted = sitk.Cast(sitk.Clamp(ct, lowerBound=-1024) + 1024, sitk.sitkUInt16)
    hi = np.percentile(sitk.GetArrayViewFromImage(shifted), 99)
    segment_refused(write(shifted, tmp_path / "plus1024.nrrd"), tmp_path / "out", model_dir, capsys,
                    "no air", f"saved without its rescale intercept (air at 0, 99th percentile {hi:.0f}), "
                    "subtract 1024 from it or export it again in HU", "--allow-non-ct")
    code, err, _ = run_cli(["segment", str(write(ct, tmp_path / "hu.nrrd")), "-o", str(tmp_path / "hu-out.nrrd"),
                            "--model", str(model_dir), "--quiet"], capsys)
    assert code == 0, err
    code, err, _ = run_cli(["segment", str(write(_mr_like(ct), tmp_path / "mr.nrrd")), "-o",
                            str(tmp_path / "mr-out.nrrd"), "--model", str(model_dir), "--quiet"], capsys)
    assert code == 2 and not any("rescale intercept" in ln for ln in err), err


def test_normalised_ct_is_refused_with_what_it_looks_like(tmp_path, model_dir, phantom, capsys):
    """A CT scaled to about -1..1 for a network (HU / 1000): refused, saying its values are
    normalised; a CT saved with an offset does not get this hint, nor the MR-like image."""
    ct, _ = phantom
    scaled = sitk.Cast(ct, sitk.sitkFloat32) / 1000.0
    lo, hi = np.percentile(sitk.GetArrayViewFromImage(scaled), [1, 99])
    segment_refused(write(scaled, tmp_path / "scaled.nrrd"), tmp_path / "out", model_dir, capsys, "no air",
                    f"its values span only {lo:.3g} to {hi:.3g} (1st to 99th percentile), as normalised data do; "
                    "give the CT in HU (air about -1000, soft tissue 0 to 100)")
    code, err, _ = run_cli(["segment", str(write(_mr_like(ct), tmp_path / "mr.nrrd")), "-o",
                            str(tmp_path / "mr-out.nrrd"), "--model", str(model_dir), "--quiet"], capsys)
    assert code == 2 and not any("normalised" in ln for ln in err), err


def test_8bit_image_needs_allow_non_ct(tmp_path, model_dir, phantom, capsys):
    ct, _ = phantom
    arr = np.clip((sitk.GetArrayFromImage(ct) + 1000) // 8, 0, 255).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    path = write(img, tmp_path / "photo.nrrd")
    segment_refused(path, tmp_path / "out", model_dir, capsys, "8-bit", "--allow-non-ct")
    code, err, _ = run_cli(["segment", str(path), "-o", str(tmp_path / "o.nrrd"), "--model", str(model_dir),
                            "--quiet", "--allow-non-ct"], capsys)
    assert code == 0 and any("8-bit" in ln and "warning" in ln for ln in err), err


@pytest.mark.parametrize("value", [0, -1024, 40])
def test_empty_or_constant_volume_refused_even_when_forced(tmp_path, model_dir, capsys, value):
    img = sitk.GetImageFromArray(np.full((10, 20, 24), value, np.int16))
    img.SetSpacing((4.0, 4.0, 5.0))
    path = write(img, tmp_path / "flat.nii.gz")
    for extra in ([], ["--allow-non-ct"]):
        segment_refused(path, tmp_path / "out", model_dir, capsys, "empty", f"same value ({value})",
                        "right file", extra=extra)


def test_no_body_when_forced_is_a_clear_error(tmp_path, model_dir, capsys):
    arr = np.random.default_rng(0).normal(-1000, 20, (10, 20, 24)).astype(np.int16)  # air only
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 5.0))
    path = write(img, tmp_path / "air.nii.gz")
    segment_refused(path, tmp_path / "out", model_dir, capsys, "no soft tissue", "--allow-non-ct")
    segment_refused(path, tmp_path / "out", model_dir, capsys, "no body found", "Hounsfield",
                    extra=["--allow-non-ct"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels_refused(tmp_path, model_dir, phantom, capsys, bad):
    ct, _ = phantom
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[3, 5, 7] = bad
    arr[10, 20, 30] = bad
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    segment_refused(write(img, tmp_path / "nan.nrrd"), tmp_path / "out", model_dir, capsys,
                    "2 NaN or infinite voxels")


# ----------------------------------------------------------------------------- unusual grids that work


@pytest.mark.parametrize("size,spacing,direction", [
    ((9, 7, 3), (4.0, 4.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),             # smaller than any tile
    ((40, 36, 4), (0.9, 0.9, 12.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),          # very anisotropic
    ((6, 5, 4), (60.0, 60.0, 60.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),          # extreme (huge) spacing
    ((30, 26, 90), (10.0, 10.0, 0.35), (0, 1, 0, 0, 0, 1, 1, 0, 0)),       # permuted axes, thin slices
    ((28, 24, 16), (4.0, 4.5, 5.0), tuple(sitk.VersorTransform((1.0, 2.0, 0.5), 0.6).GetMatrix())),  # oblique
])
def test_unusual_grids_give_labels_on_the_input_grid(tmp_path, model_dir, capsys, size, spacing, direction):
    ct, _ = make_phantom(size=size, spacing=spacing, direction=direction, origin=(-13.5, 7.25, 100.0), seed=3)
    path = write(ct, tmp_path / "ct.nrrd")
    out = tmp_path / "labels.nii.gz"
    code, err, _ = run_cli(["segment", str(path), "-o", str(out), "--model", str(model_dir), "--quiet",
                            "--allow-non-ct"], capsys)
    assert code == 0, err
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == ct.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2, 3}


# ----------------------------------------------------------------------------- huge volumes


def _huge_header(folder: Path, size=(1024, 1024, 2000), spacing=(0.7, 0.7, 0.5)) -> Path:
    """A MetaImage header declaring a huge CT whose data file holds only a few bytes."""
    (folder / "huge.raw").write_bytes(b"\0" * 64)
    path = folder / "huge.mha"
    path.write_text("ObjectType = Image\nNDims = 3\n"
                    f"DimSize = {' '.join(map(str, size))}\nElementSpacing = {' '.join(map(str, spacing))}\n"
                    "ElementType = MET_SHORT\nElementDataFile = huge.raw\n")
    return path


def test_huge_volume_refused_from_its_header_before_reading(tmp_path, model_dir, capsys, monkeypatch):
    path = _huge_header(tmp_path)
    info = cio.read_image_info(path)
    assert info.size == (1024, 1024, 2000) and info.pixel_id == sitk.sitkInt16 and info.components == 1
    model = ModelPackage.load(model_dir)
    est = memory.estimate_memory(info.size, info.pixel_id, model, spacing_xyz=info.spacing)
    # At least the input itself (4 GiB of int16) plus the uint8 label map on the input grid.
    assert est.total > 1024 * 1024 * 2000 * 3
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 << 30)

    def no_voxels(*a, **k):
        raise AssertionError("voxels were read before the memory check")

    monkeypatch.setattr(cio, "read_image", no_voxels)
    segment_refused(path, tmp_path / "out", model_dir, capsys, "1024x1024x2000",
                    memory.format_bytes(est.total), "8.0 GB", "available", "crop", "--no-memory-check")
    # With enough memory the check passes, and the missing voxel data is a one-line read error.
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 42)
    segment_refused(path, tmp_path / "out", model_dir, capsys, "cannot read image", "huge.mha")


def test_memory_estimate_scales_and_reads_real_numbers(model_dir):
    model = ModelPackage.load(model_dir)
    small = memory.estimate_peak_bytes((256, 256, 100), "int16", model, spacing_xyz=(1.0, 1.0, 2.0))
    big = memory.estimate_peak_bytes((512, 512, 400), "int16", model, spacing_xyz=(0.7, 0.7, 1.0))
    as_float = memory.estimate_peak_bytes((512, 512, 400), "float32", model, spacing_xyz=(0.7, 0.7, 1.0))
    assert memory.BASE_BYTES < small < big < as_float
    assert as_float - big == 512 * 512 * 400 * 2  # the input is held as stored, nothing else changes
    with_probs = memory.estimate_peak_bytes((512, 512, 400), "int16", model, spacing_xyz=(0.7, 0.7, 1.0),
                                            keep_probabilities=True)
    assert with_probs >= big
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < memory.available_bytes() <= total
    with pytest.raises(UserError) as err:
        memory.check_memory((1024, 1024, 2000), sitk.sitkInt16, model, available=2 << 30,
                            spacing_xyz=(0.7, 0.7, 0.5))
    assert "\n" not in str(err.value) and "2.0 GB" in str(err.value)
    assert memory.check_memory((64, 64, 32), sitk.sitkInt16, model, available=8 << 30).total < 8 << 30


# ----------------------------------------------------------------------------- damaged files, folders, paths


def test_truncated_and_corrupted_files(tmp_path, model_dir, phantom, capsys):
    ct, _ = phantom
    good = write(ct, tmp_path / "ct.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    segment_refused(cut, tmp_path / "out", model_dir, capsys, "truncated or damaged")
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\n\n" + bytes(range(256)))
    segment_refused(junk, tmp_path / "out", model_dir, capsys, "cannot read image")
    raw = tmp_path / "noise.mha"
    raw.write_bytes(np.random.default_rng(0).bytes(5000))
    segment_refused(raw, tmp_path / "out", model_dir, capsys, "cannot read image")


def _write_dicom_series(folder: Path, uid: str, n: int, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vol = np.random.default_rng(0).integers(-1000, 200, (n, 16, 16)).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        sl = sitk.GetImageFromArray(vol[k])
        sl.SetSpacing((0.5, 0.5))
        tags = {"0008|0060": "CT", "0020|000d": uid + ".0", "0020|000e": uid, "0008|103e": description,
                "0020|0013": str(k + 1), "0020|0032": f"10\\20\\{30 + 2.5 * k}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{uid}.{k + 1}", "0028|0030": "0.5\\0.5"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"syn{k}.dcm"))
        writer.Execute(sl)


def test_dicom_folder_with_several_series_or_none(tmp_path, model_dir, dicom_slab_dir, capsys):
    folder = tmp_path / "two"
    shutil.copytree(dicom_slab_dir, folder)
    _write_dicom_series(folder, "1.2.826.0.1.3680043.8.498.77", 3, "scout")
    segment_refused(folder, tmp_path / "out", model_dir, capsys, "2 DICOM series", "--series-uid",
                    "1.2.826.0.1.3680043.8.498.77", "20 slices")
    segment_refused(folder, tmp_path / "out", model_dir, capsys, "is not in", extra=["--series-uid", "9.9"])
    # The header check sees the chosen series: 512x512x20 with its real slice spacing.
    slab_uid = next(s.uid for s in cio.list_dicom_series(folder) if s.n_slices == 20)
    info = cio.read_image_info(folder, series_uid=slab_uid)
    real = cio.read_image(folder, series_uid=slab_uid)
    assert info.size == real.GetSize() and np.allclose(info.spacing, real.GetSpacing(), atol=1e-6)

    empty = tmp_path / "empty"
    empty.mkdir()
    segment_refused(empty, tmp_path / "out", model_dir, capsys, "no CT images")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a CT")
    (notes / "image.dcm").write_bytes(b"\0" * 200)
    segment_refused(notes, tmp_path / "out", model_dir, capsys, "no CT images")


def test_missing_and_unreadable_paths(tmp_path, model_dir, phantom, capsys, monkeypatch):
    segment_refused(tmp_path / "nope.nii.gz", tmp_path / "out", model_dir, capsys, "does not exist")
    _, src = phantom
    locked = tmp_path / "locked.nrrd"
    shutil.copy(src, locked)
    locked.chmod(0)
    try:
        import os

        if os.geteuid() == 0:  # root reads anything: simulate the permission check failing
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == locked else real(p, m))
        segment_refused(locked, tmp_path / "out", model_dir, capsys, "permission denied", str(locked))
    finally:
        locked.chmod(0o644)
    folder_as_file = tmp_path / "dir.nii.gz"
    folder_as_file.mkdir()
    segment_refused(folder_as_file, tmp_path / "out", model_dir, capsys, "no CT images")
