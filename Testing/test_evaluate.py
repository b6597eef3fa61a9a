"""Evaluation (docs/method.md section 7): metrics against hand-computed values, statistics against
scipy, C2 curves against explicit dilations, and the report commands end to end on the real
sample CT's TotalSegmentator labels, a phantom, and the cascade engine's output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from CascadeSegLib import evaluate as ev
from CascadeSegLib.commands import evaluate as cmd
from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SEG = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
# TotalSegmentator id -> our standard value (DEFAULT_ORGANS order, 1..10)
TS_IDS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4,
          "stomach": 6, "pancreas": 7, "aorta": 52, "inferior_vena_cava": 63,
          "portal_vein_and_splenic_vein": 64}
STD = LabelSet.from_names(DEFAULT_ORGANS)


# --------------------------------------------------------------------------- helpers

def run_cli(argv: list[str]) -> int:
    """Through the real dispatcher (cli.main) so registration and exit codes are covered."""
    from CascadeSegLib.cli import main
    return main(argv)


def image(arr: np.ndarray, like: sitk.Image | None = None, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    if like is not None:
        img.CopyInformation(like)
    else:
        img.SetSpacing(spacing)
    return img


@pytest.fixture(scope="module")
def sample_ref() -> sitk.Image:
    """The sample CT's TotalSegmentator labels remapped to our 10 standard organ values."""
    ts = sitk.ReadImage(str(SAMPLE_SEG))
    lut = np.zeros(256, np.uint8)
    for lab in STD:
        lut[TS_IDS[lab.name]] = lab.value
    return image(lut[sitk.GetArrayFromImage(ts)], like=ts)


def shifted(arr: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Shift by n voxels without wrap-around (np.roll would wrap organs to the far side)."""
    out = np.zeros_like(arr)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, arr.shape[axis] - n), slice(n, None)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def face_contour(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(3, 1),
                                       border_value=1)


def brute_surface_distances(a: np.ndarray, b: np.ndarray, spacing_xyz) -> np.ndarray:
    """Independent reference: KD-tree over the surface voxels' physical coordinates."""
    s = np.asarray(spacing_xyz[::-1], float)
    pa, pb = np.argwhere(face_contour(a)) * s, np.argwhere(face_contour(b)) * s
    return np.concatenate([cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]])


# --------------------------------------------------------------------------- metrics

def test_parallel_plates_distances_equal_offset_in_mm() -> None:
    """Two one-voxel plates d slices apart: every surface voxel is exactly d*sz from the other."""
    a = np.zeros((20, 12, 14), bool)
    b = np.zeros_like(a)
    a[5, 2:10, 3:12] = True
    b[9, 2:10, 3:12] = True
    m = ev.organ_metrics(b, a, (0.7, 0.8, 2.5))
    assert m["dice"] == 0.0 and m["status"] == "ok"
    assert m["hd95_mm"] == pytest.approx(4 * 2.5, abs=1e-5)
    assert m["assd_mm"] == pytest.approx(4 * 2.5, abs=1e-5)
    assert m["ref_ml"] == pytest.approx(8 * 9 * 0.7 * 0.8 * 2.5 / 1000)


def test_offset_boxes_match_hand_computation() -> None:
    """Dice is exact; HD95/ASSD equal a KD-tree computation over the face-connected surfaces."""
    a = np.zeros((24, 30, 36), bool)
    b = np.zeros_like(a)
    a[4:14, 5:15, 6:16] = True          # 10x10x10
    b[4:14, 5:15, 8:18] = True          # shifted by 2 voxels along x
    spacing = (0.8, 1.0, 2.0)
    m = ev.organ_metrics(b, a, spacing)
    assert m["dice"] == pytest.approx(0.8, abs=1e-12)   # 2 * 800 / 2000
    d = brute_surface_distances(b, a, spacing)
    assert m["hd95_mm"] == pytest.approx(np.percentile(d, 95), abs=1e-4)
    assert m["assd_mm"] == pytest.approx(d.mean(), abs=1e-4)
    assert m["hd_mm"] == pytest.approx(2 * 0.8, abs=1e-5)   # the x faces are 2 voxels apart


def test_irregular_shapes_match_brute_force() -> None:
    """Blobs with holes and concavities, anisotropic voxels: exact agreement with brute force."""
    rng = np.random.default_rng(3)
    a = ndimage.binary_dilation(rng.random((26, 30, 34)) > 0.996, iterations=3)
    b = ndimage.binary_dilation(rng.random((26, 30, 34)) > 0.996, iterations=2)
    spacing = (0.7, 0.9, 2.5)
    m = ev.organ_metrics(b, a, spacing)
    d = brute_surface_distances(b, a, spacing)
    assert m["hd95_mm"] == pytest.approx(np.percentile(d, 95), abs=1e-4)
    assert m["assd_mm"] == pytest.approx(d.mean(), abs=1e-4)
    assert m["hd_mm"] == pytest.approx(d.max(), abs=1e-4)


@pytest.mark.parametrize("radius,offset", [(12, 3), (10, 2)])
def test_offset_spheres_match_analytic_values(radius: int, offset: int) -> None:
    """Spheres of radius R offset by d: Dice = lens volume / sphere volume; surface distance
    ~ d|cos t| with |cos t| uniform on the sphere, so ASSD ~ d/2, HD95 ~ 0.95 d, HD = d."""
    n = 40
    z, y, x = np.mgrid[:n, :n, :n].astype(float)
    c = 19.5
    ref = (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= radius ** 2
    pred = (x - c - offset) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= radius ** 2
    m = ev.organ_metrics(pred, ref, (1.0, 1.0, 1.0))
    lens = np.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12
    assert m["dice"] == pytest.approx(lens / (4 / 3 * np.pi * radius ** 3), abs=2e-3)
    assert m["assd_mm"] == pytest.approx(offset / 2, abs=0.1)
    assert m["hd95_mm"] == pytest.approx(0.95 * offset, abs=0.2)
    assert m["hd_mm"] == pytest.approx(offset, abs=1e-6)


def test_perfect_prediction_on_sample_labels(sample_ref: sitk.Image) -> None:
    res = ev.evaluate_images(sample_ref, sample_ref, STD)
    assert list(res["organs"]) == list(DEFAULT_ORGANS)
    arr = sitk.GetArrayViewFromImage(sample_ref)
    for lab in STD:
        m = res["organs"][lab.name]
        assert m["status"] == "ok"
        assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0
        assert m["ref_ml"] == m["pred_ml"] == pytest.approx(
            np.count_nonzero(arr == lab.value) * 27.0 / 1000)
    assert res["resampled"] is False


def test_empty_and_absent_organs_are_reported(sample_ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(sample_ref)
    pred = arr.copy()
    pred[pred == STD.by_name("pancreas").value] = 0          # missed organ
    ref = arr.copy()
    ref[ref == STD.by_name("gallbladder").value] = 0           # e.g. cholecystectomy
    res = ev.evaluate_images(image(pred, sample_ref), image(ref, sample_ref), STD)
    panc, gb = res["organs"]["pancreas"], res["organs"]["gallbladder"]
    assert panc["dice"] == 0.0 and panc["status"] == "missing_in_prediction"
    assert panc["hd95_mm"] is None and panc["assd_mm"] is None and panc["pred_ml"] == 0.0
    assert gb["dice"] == 0.0 and gb["status"] == "missing_in_reference" and gb["ref_ml"] == 0.0
    empty = ev.evaluate_images(image(np.zeros_like(arr), sample_ref), sample_ref, STD)
    assert all(m["dice"] == 0.0 and m["status"] == "missing_in_prediction"
               for m in empty["organs"].values())
    both = ev.organ_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert both["status"] == "absent" and both["dice"] is None
    # Dice zeros count in the statistics; missing distances do not.
    s = ev.summarize({"c1": res, "c2": ev.evaluate_images(sample_ref, sample_ref, STD)})
    assert s["pancreas"]["dice"]["mean"] == pytest.approx(0.5)
    assert s["pancreas"]["hd95_mm"]["n"] == 1
    assert s["pancreas"]["status"] == {"missing_in_prediction": 1, "ok": 1}


def test_prediction_on_another_grid_is_resampled_nearest(sample_ref: sitk.Image) -> None:
    """A 1.5 mm copy of the reference (nearest) maps back onto the 3 mm grid exactly."""
    fine = ev.spacing_grid(sample_ref, (1.5, 1.5, 1.5))
    pred = sitk.Resample(sample_ref, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert pred.GetSize() == tuple(2 * s for s in sample_ref.GetSize())
    back, resampled = ev.to_reference_grid(pred, sample_ref)
    assert resampled
    assert back.GetOrigin() == sample_ref.GetOrigin()
    assert back.GetSpacing() == sample_ref.GetSpacing()
    assert back.GetDirection() == sample_ref.GetDirection()
    res = ev.evaluate_images(pred, sample_ref, STD)
    assert res["resampled"] is True
    assert all(m["dice"] == 1.0 for m in res["organs"].values())
    # Float noise in the header is not a different grid (no resampling, reference geometry).
    noisy = sitk.Image(sample_ref)
    noisy.SetOrigin(tuple(o + 1e-6 for o in sample_ref.GetOrigin()))
    same, resampled = ev.to_reference_grid(noisy, sample_ref)
    assert not resampled and same.GetOrigin() == sample_ref.GetOrigin()


def test_label_maps_are_checked() -> None:
    prob = sitk.GetImageFromArray(np.full((4, 5, 6), 0.3, np.float32))
    with pytest.raises(UserError, match="probability"):
        ev.as_label_map(prob, "x.nii.gz")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), np.uint8), isVector=True)
    with pytest.raises(UserError, match="3D single-component"):
        ev.as_label_map(vec)
    assert ev.as_label_map(sitk.GetImageFromArray(np.full((2, 2, 2), 3.0, np.float32))) \
        .GetPixelID() == sitk.sitkUInt16


# --------------------------------------------------------------------------- statistics

def test_describe_and_difference_table() -> None:
    d = ev.describe([0.5, None, 0.7, 0.9, float("nan")])
    assert d == {"n": 3, "mean": pytest.approx(0.7), "std": pytest.approx(0.2),
                 "median": pytest.approx(0.7), "min": 0.5, "max": 0.9}
    a = {f"c{i}": {"organs": {"liver": {"dice": v}}} for i, v in enumerate([0.8, 0.85, 0.9])}
    b = {f"c{i}": {"organs": {"liver": {"dice": v}}} for i, v in enumerate([0.9, 0.9, 0.88])}
    diff = ev.difference_table(a, b)
    assert diff["liver"]["mean"] == pytest.approx((0.1 + 0.05 - 0.02) / 3)
    assert diff["liver"]["min"] == pytest.approx(-0.02)
    assert diff["liver"]["max"] == pytest.approx(0.1)


def test_wilcoxon_equals_scipy_on_known_example() -> None:
    """The classic paired example (Wikipedia, Wilcoxon signed-rank test) with one tie."""
    x = [125, 115, 130, 140, 140, 115, 140, 125, 140, 135]
    y = [110, 122, 125, 120, 140, 124, 123, 137, 135, 145]
    got = ev.wilcoxon_test(x, y)
    ref = stats.wilcoxon(x, y)
    assert got["statistic"] == pytest.approx(float(ref.statistic))
    assert got["p_value"] == pytest.approx(float(ref.pvalue))
    assert got["statistic"] == 18.0             # min(W+, W-) after dropping the zero
    # And through compare_methods on per-case Dice, with significance marks.
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, 12)
    a = {f"c{i}": {"organs": {"liver": {"dice": float(v)}, "spleen": {"dice": float(v)}}}
         for i, v in enumerate(base)}
    b = {f"c{i}": {"organs": {"liver": {"dice": float(v + 0.05 + 0.01 * (i % 3))},
                              "spleen": {"dice": float(v + (0.01 if i % 2 else -0.01))}}}
         for i, v in enumerate(base)}
    res = ev.compare_methods(a, b)
    liver_ref = stats.wilcoxon(base, [b[f"c{i}"]["organs"]["liver"]["dice"] for i in range(12)])
    assert res["liver"]["p_value"] == pytest.approx(float(liver_ref.pvalue))
    assert res["liver"]["significant"] and res["liver"]["mark"] == "*"
    assert res["liver"]["better"] == "B"
    assert not res["spleen"]["significant"] and res["spleen"]["mark"] == ""
    assert ev.wilcoxon_test([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0
    # Mostly ties: the median difference is 0, but the test (zeros dropped) is significant and
    # every nonzero difference favours B, so B is named the better method.
    tied = {f"c{i}": {"organs": {"liver": {"dice": 0.8}}} for i in range(20)}
    up = {f"c{i}": {"organs": {"liver": {"dice": 0.8 + (0.01 * (i + 1) if i < 7 else 0.0)}}} for i in range(20)}
    res = ev.compare_methods(tied, up)
    assert res["liver"]["median_diff"] == 0.0 and res["liver"]["significant"]
    assert res["liver"]["better"] == "B"
    assert ev.compare_methods(up, tied)["liver"]["better"] == "A"


# --------------------------------------------------------------------------- C2 analysis

def test_candidate_curves_on_synthetic_box() -> None:
    """Reference box, stage-1 = the box shrunk by 2 voxels per side: C2 stays inside the box up
    to r = 2 (FPR 0), covers it from r = 4 (corner distance sqrt(12) = 3.46), FPR then grows."""
    ref = np.zeros((30, 32, 34), np.uint8)
    ref[5:25, 6:26, 7:27] = 1
    s1 = np.zeros_like(ref)
    s1[7:23, 8:24, 9:25] = 1
    labels = LabelSet.from_names(["liver"])
    res = ev.candidate_curves(image(s1), image(ref), labels, radii=range(11))
    liv = res["liver"]
    assert liv["radii"] == list(range(11))
    rec, fpr = np.array(liv["recall"]), np.array(liv["fpr"])
    assert rec[0] == pytest.approx(16 ** 3 / 20 ** 3)
    assert np.all(np.diff(rec) >= 0) and np.all(np.diff(fpr) >= 0)
    assert np.all(rec[:4] < 1) and np.all(rec[4:] == 1.0)
    assert np.all(fpr[:3] == 0) and np.all(np.diff(fpr[3:]) > 0)
    # Identical to explicit dilations with the engine's ball (|offset| <= r) and scipy.
    import torch

    from CascadeSegLib.inference.preprocess import dilate
    n_neg = ref.size - ref.sum()
    for r in (1, 2, 3, 5):
        ball = np.linalg.norm(np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1], axis=0) <= r
        dil = ndimage.binary_dilation(s1 > 0, structure=ball)
        eng = dilate(torch.from_numpy(s1 > 0), r).numpy()
        assert np.array_equal(dil, eng)
        assert rec[r] == pytest.approx((dil & (ref > 0)).sum() / ref.sum())
        assert fpr[r] == pytest.approx((dil & (ref == 0)).sum() / n_neg)
    assert res["all"]["recall"] == liv["recall"]


def test_candidate_curves_on_sample_labels(sample_ref: sitk.Image) -> None:
    """An eroded + shifted copy of the real labels as stage 1: recall rises to ~1 with r."""
    arr = sitk.GetArrayFromImage(sample_ref)
    eroded = np.where(ndimage.grey_erosion(arr, size=(3, 3, 3)) == arr, arr, 0)
    s1 = shifted(eroded, 2, 1)
    res = ev.candidate_curves(image(s1, sample_ref), sample_ref, STD, radii=[0, 1, 3, 6])
    for organ in DEFAULT_ORGANS + ("all",):
        rec = res[organ]["recall"]
        assert rec == sorted(rec) and rec[0] < 0.95 and rec[-1] > rec[0], organ
        if rec[0] > 0.3:  # thin organs (pancreas) nearly vanish under the erosion
            assert rec[-1] > 0.99, organ
    assert res["all"]["c2_fraction"][2] > res["all"]["c2_fraction"][0]
    # On a coarser grid (where the engine dilates) the same radius reaches farther in mm.
    coarse = ev.candidate_curves(image(s1, sample_ref), sample_ref, STD, radii=[1],
                                 spacing=(6.0, 6.0, 6.0))
    assert coarse["all"]["grid_spacing"] == [6.0, 6.0, 6.0]
    assert coarse["all"]["ref_voxels"] < res["all"]["ref_voxels"] / 6


def test_parse_radii_and_labels(tmp_path: Path) -> None:
    assert cmd.parse_radii("0..10") == list(range(11))
    assert cmd.parse_radii("0..3,5,8") == [0, 1, 2, 3, 5, 8]
    for bad in ("3..1", "a", "-1", ""):
        with pytest.raises(UserError):
            cmd.parse_radii(bad)
    assert ev.resolve_labels(None).names == list(DEFAULT_ORGANS)
    assert [(lab.value, lab.name) for lab in ev.resolve_labels("spleen,liver")] == \
        [(1, "spleen"), (2, "liver")]
    inline = ev.resolve_labels('[{"value": 5, "name": "liver"}]')
    assert inline.by_name("liver").value == 5
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"labels": [{"value": 7, "name": "pancreas"}]}))
    assert ev.resolve_labels(str(f)).by_name("pancreas").value == 7
    with pytest.raises(UserError):
        ev.resolve_labels("no-such-model-or-organ")


def test_case_matching(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    img = image(np.zeros((2, 2, 2)))
    for name in ("a_labels.nii.gz", "a.seg.nrrd", "a_c2.nii.gz", "b.nii.gz", "c.nii.gz"):
        sitk.WriteImage(img, str(tmp_path / "p" / name))
    for name in ("a_seg.nii.gz", "b.nrrd", "d.nii.gz"):
        sitk.WriteImage(img, str(tmp_path / "r" / name))
    pairs, extra_p, extra_r = ev.match_cases(tmp_path / "p", tmp_path / "r")
    assert [(c, p.name, r.name) for c, p, r in pairs] == [("a", "a_labels.nii.gz", "a_seg.nii.gz"),
                                                         ("b", "b.nii.gz", "b.nrrd")]
    assert extra_p == ["c"] and extra_r == ["d"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no case"):
        ev.match_cases(tmp_path / "p", tmp_path / "empty")
    with pytest.raises(UserError, match="file and a folder"):
        ev.match_cases(tmp_path / "p" / "b.nii.gz", tmp_path / "r")


# --------------------------------------------------------------------------- commands

def _png_ok(path: Path, min_size=(300, 300)) -> np.ndarray:
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    px = mpimg.imread(str(path))
    assert px.shape[0] >= min_size[1] and px.shape[1] >= min_size[0]
    assert px[..., :3].std() > 0.05  # not a blank canvas
    return px


def _has_color(px: np.ndarray, rgb, tol=0.06) -> bool:
    c = np.asarray(rgb, float)
    return bool((np.abs(px[..., :3] - c).max(axis=-1) < tol).any())


def test_evaluate_command_on_sample_labels(tmp_path: Path, sample_ref: sitk.Image,
                                           capsys) -> None:
    """Folders of predictions (one on another grid, one missing an organ) vs TotalSegmentator
    references with their own ids (--ref-labels): metrics.json, tables and plots."""
    ts = sitk.ReadImage(str(SAMPLE_SEG))
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    arr = sitk.GetArrayFromImage(sample_ref)
    sitk.WriteImage(ts, str(ref_dir / "case1.nii.gz"))
    sitk.WriteImage(ts, str(ref_dir / "case2_seg.nii.gz"))
    sitk.WriteImage(image(shifted(arr, 2, 1), sample_ref), str(pred_dir / "case1_labels.nii.gz"))
    p2 = arr.copy()
    p2[p2 == STD.by_name("gallbladder").value] = 0
    p2img = sitk.Resample(image(p2, sample_ref), ev.spacing_grid(sample_ref, (1.5, 1.5, 1.5)),
                          sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(p2img, str(pred_dir / "case2.nrrd"))
    out = tmp_path / "report"
    rc = run_cli(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out),
                  "--ref-labels", "totalsegmentator", "--quiet"])
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert doc["kind"] == "evaluation" and list(doc["methods"]) == ["pred"]
    cases = doc["methods"]["pred"]["cases"]
    assert sorted(cases) == ["case1", "case2"]
    assert list(cases["case1"]["organs"]) == list(DEFAULT_ORGANS)
    assert cases["case2"]["resampled"] is True and cases["case1"]["resampled"] is False
    gb = cases["case2"]["organs"]["gallbladder"]
    assert gb["dice"] == 0.0 and gb["status"] == "missing_in_prediction"
    assert all(m["dice"] == 1.0 for o, m in cases["case2"]["organs"].items() if o != "gallbladder")
    # case1: a 1-voxel (3 mm) shift along x; Dice equals a direct numpy computation.
    liver = STD.by_name("liver").value
    p, r = shifted(arr, 2, 1) == liver, arr == liver
    assert cases["case1"]["organs"]["liver"]["dice"] == pytest.approx(
        2 * (p & r).sum() / (p.sum() + r.sum()))
    assert cases["case1"]["organs"]["liver"]["hd_mm"] == pytest.approx(3.0, abs=1e-5)
    assert cases["case1"]["organs"]["liver"]["hd95_mm"] == pytest.approx(3.0, abs=1e-5)
    summary = doc["methods"]["pred"]["summary"]
    assert summary["gallbladder"]["dice"]["min"] == 0.0
    assert summary["liver"]["dice"]["n"] == 2
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "### Dice [%]" in md and "### HD95 [mm]" in md and "missing_in_prediction" in md
    assert "| gallbladder |" in md and "case2" in md
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 20 and {r["organ"] for r in rows} == set(DEFAULT_ORGANS)
    srows = list(csv.DictReader((out / "summary.csv").open()))
    liver_dice = [r for r in srows if r["organ"] == "liver" and r["metric"] == "dice"][0]
    assert float(liver_dice["mean"]) == pytest.approx(summary["liver"]["dice"]["mean"])
    for f in ("boxplot_dice.png", "boxplot_hd95.png", "boxplot_assd.png", "volumes.png"):
        assert f in doc["files"]
    px = _png_ok(out / "boxplot_dice.png")
    # single method: the boxes take the organ colours (alpha 0.85 over white)
    liver_rgb = np.array(STD.by_name("liver").color_float)
    assert _has_color(px, 0.85 * liver_rgb + 0.15)
    _png_ok(out / "volumes.png")
    assert "liver" in capsys.readouterr().out


def test_compare_command_equals_scipy(tmp_path: Path, sample_ref: sitk.Image) -> None:
    """Two methods on six cases: better (1-voxel shift) vs worse (2-voxel shift)."""
    arr = sitk.GetArrayFromImage(sample_ref)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reports = []
    for name, shift in (("good", 1), ("bad", 2)):
        d = tmp_path / name
        d.mkdir()
        for i in range(6):
            sitk.WriteImage(image(shifted(arr, i % 3, shift), sample_ref),
                            str(d / f"case{i}.nii.gz"))
            if name == "good":
                sitk.WriteImage(sample_ref, str(ref_dir / f"case{i}.nii.gz"))
        out = tmp_path / f"rep_{name}"
        # Scoring 3 of the 10 organs: the other values are known to be there (--no-label-check).
        assert run_cli(["evaluate", str(d), str(ref_dir), "-o", str(out), "--quiet", "--no-label-check",
                        "--no-plots", "--labels", "liver,spleen,kidney_right"]) == 0
        reports.append(out)
    cmp_dir = tmp_path / "cmp"
    assert run_cli(["compare", str(reports[1]), str(reports[0] / "metrics.json"),
                    "-o", str(cmp_dir)]) == 0
    doc = json.loads((cmp_dir / "metrics.json").read_text(encoding="utf-8"))
    assert doc["method_a"] == "bad" and doc["method_b"] == "good"
    ma = json.loads((reports[1] / "metrics.json").read_text(encoding="utf-8"))["methods"]["bad"]["cases"]
    mb = json.loads((reports[0] / "metrics.json").read_text(encoding="utf-8"))["methods"]["good"]["cases"]
    for organ in ("liver", "spleen", "kidney_right"):
        xa = [ma[f"case{i}"]["organs"][organ]["dice"] for i in range(6)]
        xb = [mb[f"case{i}"]["organs"][organ]["dice"] for i in range(6)]
        ref = stats.wilcoxon(xa, xb)
        w = doc["wilcoxon"][organ]
        assert w["p_value"] == pytest.approx(float(ref.pvalue))
        assert w["statistic"] == pytest.approx(float(ref.statistic))
        assert w["mean_b"] > w["mean_a"] and w["n"] == 6
        assert w["significant"] == (ref.pvalue < 0.05)
        assert doc["difference"][organ]["mean"] == pytest.approx(np.mean(np.subtract(xb, xa)))
    # six cases, all better: the exact two-sided p is 2/64 = 0.03125 -> significant, marked.
    assert doc["wilcoxon"]["liver"]["p_value"] == pytest.approx(0.03125)
    assert doc["wilcoxon"]["liver"]["mark"] == "*"
    md = (cmp_dir / "compare.md").read_text(encoding="utf-8")
    assert "| liver |" in md and "**" in md and "Wilcoxon" in md
    _png_ok(cmp_dir / "boxplot_dice.png")
    # Table 5 command: the same tables with fixed names.
    ft = tmp_path / "ft"
    assert run_cli(["experiment", "finetune", str(reports[1]), str(reports[0]), "-o",
                    str(ft), "--no-plots"]) == 0
    fdoc = json.loads((ft / "metrics.json").read_text(encoding="utf-8"))
    assert fdoc["kind"] == "experiment-finetune" and list(fdoc["methods"]) == ["scratch",
                                                                               "fine-tuned"]
    assert fdoc["wilcoxon"]["liver"]["p_value"] == pytest.approx(0.03125)


def test_candidates_command_report(tmp_path: Path, sample_ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(sample_ref)
    s1 = np.where(ndimage.grey_erosion(arr, size=(3, 3, 3)) == arr, arr, 0)
    (tmp_path / "s1").mkdir()
    sitk.WriteImage(image(s1, sample_ref), str(tmp_path / "s1" / "case.nii.gz"))
    out = tmp_path / "cand"
    assert run_cli(["candidates", str(tmp_path / "s1" / "case.nii.gz"), str(SAMPLE_SEG),
                    "-o", str(out), "--radii", "0..10", "--quiet", "--ref-labels",
                    json.dumps([{"value": v, "name": n} for n, v in TS_IDS.items()])]) == 0
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    mean = doc["mean"]
    assert set(mean) == set(DEFAULT_ORGANS) | {"all"}
    assert mean["all"]["radii"] == list(range(11))
    assert mean["liver"]["recall"][0] < mean["liver"]["recall"][1] <= mean["liver"]["recall"][3]
    assert mean["all"]["recall"][3] > 0.99 and mean["all"]["recall"][10] == 1.0
    assert mean["all"]["fpr"] == sorted(mean["all"]["fpr"])
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    assert len(rows) == 11 * 11
    px = _png_ok(out / "candidates.png", (800, 350))
    assert _has_color(px, STD.by_name("spleen").color_float, 0.03)
    assert "Recall" in (out / "candidates.md").read_text(encoding="utf-8")


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sitk.WriteImage(image(np.zeros((2, 2, 2))), str(tmp_path / "a" / "x.nii.gz"))
    sitk.WriteImage(image(np.zeros((2, 2, 2))), str(tmp_path / "b" / "y.nii.gz"))
    assert run_cli(["evaluate", str(tmp_path / "a"), str(tmp_path / "b"), "-o",
                    str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no case" in err[0]
    assert run_cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert run_cli(["experiment"]) == 2


# --------------------------------------------------------------------------- engine output

def _tiny_model(folder: Path):
    """A real two-stage package with small random networks (fast on CPU)."""
    import torch

    from CascadeSegLib.network import NetConfig, build_network
    from CascadeSegLib.packaging.model import ModelPackage
    torch.manual_seed(0)
    cfg = NetConfig(kind="padded", base_channels=4, depth=2, num_classes=STD.num_classes)
    meta = {"format_version": 1, "name": "tiny-eval", "version": "0.0.1", "labels": STD.to_json(),
            "intensity": {"window": [-200, 300], "normalization": "window01"},
            "dilation_radius": 2,
            "stages": [{"name": "stage1", "spacing": [12, 12, 12], "tile": [16, 16, 16],
                        "network": cfg.to_json(), "weights": "stage1.pt"},
                       {"name": "stage2", "spacing": [6, 6, 6], "tile": [32, 32, 32],
                        "network": cfg.to_json(), "weights": "stage2.pt"}]}
    pkg = ModelPackage.from_json(meta)
    pkg.save(folder, [build_network(cfg).state_dict(), build_network(cfg).state_dict()])
    return folder


def test_experiments_on_engine_output(tmp_path: Path) -> None:
    """stages + overlap experiments run the engine on a phantom and the sample CT; the numbers
    in the report equal `cascadeseg evaluate` on the label maps the engine wrote."""
    pytest.importorskip("CascadeSegLib.inference.cascade")
    from CascadeSegLib.phantom import make_phantom
    model = _tiny_model(tmp_path / "model")
    ct_dir, ref_dir = tmp_path / "ct", tmp_path / "ref"
    ct_dir.mkdir()
    ref_dir.mkdir()
    ct, lab = make_phantom(size=(48, 40, 32), spacing=(6.0, 6.0, 6.0), origin=(-140, -120, 0))
    sitk.WriteImage(ct, str(ct_dir / "phantom.nii.gz"))
    sitk.WriteImage(lab, str(ref_dir / "phantom.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_CT)), str(ct_dir / "sample.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE_SEG)), str(ref_dir / "sample.nii.gz"))
    # The sample's reference uses TotalSegmentator ids; the phantom's our values: evaluate the
    # phantom with standard labels and the sample with --ref-labels in separate runs.
    out = tmp_path / "stages"
    assert run_cli(["experiment", "stages", str(ct_dir / "phantom.nii.gz"),
                    str(ref_dir / "phantom.nii.gz"), "-o", str(out), "--model", str(model),
                    "--device", "cpu", "--radii", "0..4", "--save-predictions", "--quiet"]) == 0
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert doc["kind"] == "experiment-stages" and set(doc["methods"]) == {"stage1", "stage2"}
    assert doc["model"]["name"] == "tiny-eval" and doc["mean_timings"]["stage2"] > 0
    assert doc["candidates"]["mean"]["all"]["radii"] == [0, 1, 2, 3, 4]
    assert doc["candidates"]["cases"]["phantom"]["all"]["grid_spacing"] == [6.0, 6.0, 6.0]
    for stage, fname in (("stage1", "phantom_stage1_labels.nii.gz"),
                         ("stage2", "phantom_labels.nii.gz")):
        pred = out / "predictions" / fname
        saved = sitk.ReadImage(str(pred))
        assert saved.GetOrigin() == lab.GetOrigin() and saved.GetSpacing() == lab.GetSpacing()
        check = tmp_path / f"check_{stage}"
        # A random-weights model's organs are 10x off on purpose; score them anyway.
        assert run_cli(["evaluate", str(pred), str(ref_dir / "phantom.nii.gz"), "-o",
                        str(check), "--quiet", "--no-plots", "--no-label-check"]) == 0
        direct = json.loads((check / "metrics.json").read_text(encoding="utf-8"))["methods"]
        direct_case = next(iter(next(iter(direct.values()))["cases"].values()))
        for organ in DEFAULT_ORGANS:
            assert doc["methods"][stage]["cases"]["phantom"]["organs"][organ] == \
                direct_case["organs"][organ], (stage, organ)
    for f in ("compare.md", "compare.csv", "difference.csv", "candidates.csv",
              "boxplot_dice.png", "candidates.png"):
        assert (out / f).is_file(), f
    assert "stage2 minus stage1" in (out / "compare.md").read_text(encoding="utf-8")

    out2 = tmp_path / "overlap"
    assert run_cli(["experiment", "overlap", str(ct_dir / "sample.nii.gz"),
                    str(ref_dir / "sample.nii.gz"), "-o", str(out2), "--model", str(model),
                    "--device", "cpu", "--overlap", "0.5", "--quiet", "--ref-labels",
                    json.dumps([{"value": v, "name": n} for n, v in TS_IDS.items()])]) == 0
    doc2 = json.loads((out2 / "metrics.json").read_text(encoding="utf-8"))
    assert set(doc2["methods"]) == {"non-overlapping", "overlapping"}
    assert doc2["overlap"] == 0.5
    t = doc2["mean_timings"]
    assert doc2["time_ratio"]["total"] == pytest.approx(t["overlapping"]["total"]
                                                        / t["non-overlapping"]["total"])
    assert set(doc2["wilcoxon"]) == set(DEFAULT_ORGANS) | {"all"}
    _png_ok(out2 / "timings.png")
    _png_ok(out2 / "boxplot_dice.png")
