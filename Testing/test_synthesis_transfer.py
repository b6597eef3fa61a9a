"""The registration route of synthesis: a real CT warped onto another anatomy (real data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CascadeSegLib.labels import UNKNOWN_LABEL
from CascadeSegLib.synthesis import IntensityTable, default_table_path, totalsegmentator_names
from CascadeSegLib.synthesis.transfer import TransferSettings, mend_misregistered, transfer

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
LIVER = 5          # TotalSegmentator v2 id


def _target_anatomy(labels: sitk.Image) -> sitk.Image:
    """The sample's label map on a new body: shrunk by 12 % and turned 6 degrees about z."""
    centre = labels.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in labels.GetSize()])
    t = sitk.Similarity3DTransform()
    t.SetCenter(centre)
    t.SetScale(1.12)                      # resampling through it makes the anatomy 12 % smaller
    t.SetRotation((0, 0, 1), np.deg2rad(6))
    return sitk.Resample(labels, labels, t, sitk.sitkNearestNeighbor, 0)


@pytest.fixture(scope="module")
def result():
    ct, labels = sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(SAMPLE_LABELS))
    target = _target_anatomy(labels)
    out = transfer(ct, labels, target, totalsegmentator_names(), IntensityTable.load(default_table_path()),
                   TransferSettings(spacing=(6.0, 6.0, 6.0)))
    return ct, labels, target, out


def test_warped_atlas_follows_the_target_anatomy(result):
    _, labels, target, out = result
    dice = out.info["dice_to_target"]
    assert dice["liver"] > 0.85 and dice["spleen"] > 0.7 and dice["kidney_left"] > 0.7, dice
    # Without registration (the atlas as it is) the liver overlaps much less: the warp did the work.
    same_grid = sitk.Resample(labels, out.labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    tgt = sitk.GetArrayFromImage(sitk.Resample(target, out.labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    raw = sitk.GetArrayFromImage(same_grid)
    raw_dice = 2 * ((raw == LIVER) & (tgt == LIVER)).sum() / ((raw == LIVER).sum() + (tgt == LIVER).sum())
    assert dice["liver"] > raw_dice + 0.05


def test_real_texture_moves_with_the_labels_and_geometry_is_the_targets(result):
    ct, labels, target, out = result
    hu = sitk.GetArrayFromImage(out.ct)
    lab = sitk.GetArrayFromImage(out.labels)
    assert out.ct.GetPixelID() == sitk.sitkInt16 and np.isfinite(hu).all()
    atlas_liver = np.median(sitk.GetArrayFromImage(ct)[sitk.GetArrayFromImage(labels) == LIVER])
    assert abs(np.median(hu[lab == LIVER]) - atlas_liver) < 10
    # Same direction as the target, 6 mm spacing, voxel centres on a 6 mm lattice from the target's origin.
    assert out.ct.GetDirection() == target.GetDirection() == out.labels.GetDirection()
    assert out.ct.GetSpacing() == (6.0, 6.0, 6.0) and out.ct.GetOrigin() == out.labels.GetOrigin()
    assert out.ct.GetSize() == out.labels.GetSize()
    offset = np.array(out.ct.GetOrigin()) - np.array(target.GetOrigin())
    index = np.linalg.solve(np.array(target.GetDirection()).reshape(3, 3) * 6.0, offset)
    assert np.allclose(index, np.round(index), atol=1e-6)


def test_cli_atlas_route_and_its_errors(tmp_path):
    target = _target_anatomy(sitk.ReadImage(str(SAMPLE_LABELS)))
    lm = tmp_path / "target_label.nii.gz"
    sitk.WriteImage(target, str(lm))
    cmd = [sys.executable, "-m", "CascadeSegLib", "synth", str(lm), "-o", str(tmp_path / "out"),
           "--spacing", "6", "6", "6", "--atlas", str(SAMPLE_CT), str(SAMPLE_LABELS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "out" / "target_label_from_abdomen_ct_3mm.json").read_text(encoding="utf-8"))
    assert info["route"] == "registration" and info["dice_to_target"]["liver"] > 0.85
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(SAMPLE_LABELS)), [2, 2, 2]), str(small))
    bad = subprocess.run(cmd[:-2] + [str(SAMPLE_CT), str(small)], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "different sizes" in bad.stderr and "Traceback" not in bad.stderr


def test_training_source_adds_one_case_per_label_map_and_atlas_but_not_the_atlas_own(tmp_path):
    from CascadeSegLib.errors import UserError
    from CascadeSegLib.synthesis.source import synthetic_cases
    from CascadeSegLib.train.dataset import Case

    other = tmp_path / "other_label.nii.gz"
    sitk.WriteImage(_target_anatomy(sitk.ReadImage(str(SAMPLE_LABELS))), str(other))
    atlas = Case("sample", SAMPLE_CT, SAMPLE_LABELS)
    spec = {"label_maps": [str(SAMPLE_LABELS), str(other)], "per_label_map": 1, "spacing": [6, 6, 6],
            "table": "default", "atlases": ["sample"]}
    cases = synthetic_cases(spec, Path, [atlas], tmp_path / "syn")
    reg = [c for c in cases if c.name.startswith("reg-")]
    assert len(cases) == 3 and len(reg) == 1 and "other_label-sample" in reg[0].name
    info = json.loads((Path(reg[0].image).parent / "info.json").read_text(encoding="utf-8"))
    assert info["atlas"] == "sample" and info["dice_to_target"]["liver"] > 0.85
    with pytest.raises(UserError, match="atlases"):
        synthetic_cases(dict(spec, atlases=["nobody"]), Path, [atlas], tmp_path / "syn2")


SPLEEN, KIDNEY_LEFT = 1, 3          # TotalSegmentator v2 ids


def test_an_atlas_without_the_spleen_is_marked_unknown_where_the_target_has_one():
    """The s0009 case in small: an atlas whose field of view lacks the spleen, warped onto an
    anatomy that has one. Demons fills the spleen's place with neighbours; mending with
    `UNKNOWN_LABEL` turns all of that into 'no vote' and leaves what the warp got right (the liver)."""
    ct, labels = sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(SAMPLE_LABELS))
    no_spleen = sitk.Mask(labels, labels != SPLEEN)
    target = _target_anatomy(labels)
    out = transfer(ct, no_spleen, target, totalsegmentator_names(), IntensityTable.load(default_table_path()),
                   TransferSettings(spacing=(6.0, 6.0, 6.0)))
    marked, ml = mend_misregistered(out.labels, target, [SPLEEN, KIDNEY_LEFT, LIVER], margin_mm=6.0,
                                    fill=UNKNOWN_LABEL)
    assert (marked.GetOrigin(), marked.GetSpacing(), marked.GetDirection(), marked.GetSize()) == \
        (out.labels.GetOrigin(), out.labels.GetSpacing(), out.labels.GetDirection(), out.labels.GetSize())
    got, before = sitk.GetArrayFromImage(marked), sitk.GetArrayFromImage(out.labels)
    tgt = sitk.GetArrayFromImage(sitk.Resample(target, out.labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert (got[tgt == SPLEEN] == UNKNOWN_LABEL).all()               # every target spleen voxel: no vote
    assert ml[SPLEEN] == pytest.approx((tgt == SPLEEN).sum() * 0.216, abs=0.01)
    assert (got[before == LIVER] == LIVER).mean() > 0.97               # the warp's liver is kept
    changed = got != before
    assert (got[changed] == UNKNOWN_LABEL).all()                       # nothing is relabelled, only marked


def test_a_kidney_on_the_spleen_is_mended_and_a_boundary_shift_is_not():
    """Labels that put the left kidney where the target's spleen is (what 6 of abdomen-ct 2.6.1's 12
    warped atlases do) get the target's spleen back, or 255 when asked; the same labels shifted by
    one 3 mm voxel are left as they are."""
    target = sitk.ReadImage(str(SAMPLE_LABELS))
    arr = sitk.GetArrayFromImage(target)
    wrong = np.where(arr == SPLEEN, KIDNEY_LEFT, arr).astype(arr.dtype)
    wrong_img = sitk.GetImageFromArray(wrong)
    wrong_img.CopyInformation(target)
    mended, ml = mend_misregistered(wrong_img, target, [SPLEEN, KIDNEY_LEFT, LIVER], margin_mm=6.0)
    assert (sitk.GetArrayFromImage(mended) == arr).all()
    assert sum(ml.values()) == pytest.approx((arr == SPLEEN).sum() * 0.027, abs=0.01)
    marked, _ = mend_misregistered(wrong_img, target, [SPLEEN, KIDNEY_LEFT, LIVER], margin_mm=6.0, fill=UNKNOWN_LABEL)
    got = sitk.GetArrayFromImage(marked)
    assert (got[arr == SPLEEN] == UNKNOWN_LABEL).all() and (got[arr != SPLEEN] == arr[arr != SPLEEN]).all()
    shifted = sitk.GetImageFromArray(np.roll(arr, 1, axis=2))
    shifted.CopyInformation(target)
    kept, kept_ml = mend_misregistered(shifted, target, [SPLEEN, KIDNEY_LEFT, LIVER], margin_mm=6.0)
    assert (sitk.GetArrayFromImage(kept) == np.roll(arr, 1, axis=2)).all() and sum(kept_ml.values()) == 0
    # with no margin the same shift is mended: the margin is what spares boundaries
    _, strict = mend_misregistered(shifted, target, [SPLEEN], margin_mm=0.0)
    assert strict[SPLEEN] > 0
