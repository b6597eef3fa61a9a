"""Evaluation metrics (docs/method.md section 7): surface distances and overlaps against hand-computed,
analytic and brute-force values, statistics against scipy, and C2 curves against explicit dilations,
on synthetic shapes and the real sample CT's TotalSegmentator labels. The report commands, case
matching and the engine's output are in test_evaluate.py."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from evaluate_samples import SAMPLE_SEG, STD, TS_IDS, image, shifted

# the fixture sample_ref, imported so that pytest finds it here
from evaluate_samples import sample_ref_fixture as sample_ref_fixture
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from CascadeSegLib import evaluate as ev
from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet


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


def test_confusion_says_where_the_voxels_go(sample_ref: sitk.Image) -> None:
    """The aorta called liver and the left kidney shifted by one voxel: the liver's extra ml lie in
    the aorta, the aorta's ml are labelled liver, rows and columns add up to the organs' volumes;
    against the TotalSegmentator ids, structures we do not name count as `other`."""
    arr = sitk.GetArrayFromImage(sample_ref)
    v = {lab.name: lab.value for lab in STD}
    pred = arr.copy()
    pred[arr == v["aorta"]] = v["liver"]
    kidney = arr == v["kidney_left"]
    pred[kidney] = 0
    pred[shifted(kidney, 2, 1)] = v["kidney_left"]
    res = ev.evaluate_images(image(pred, sample_ref), sample_ref, STD, distances=False)
    conf, ml = res["confusion_ml"], 27.0 / 1000
    assert conf["liver"]["aorta"] == pytest.approx(np.count_nonzero(arr == v["aorta"]) * ml)
    assert conf["liver"]["liver"] == pytest.approx(np.count_nonzero(arr == v["liver"]) * ml)
    assert "aorta" not in conf                      # nothing is predicted aorta any more
    moved = shifted(kidney, 2, 1)
    for ref_name in {STD.by_value(int(x)).name if x else ev.OTHER for x in np.unique(arr[moved & ~kidney])}:
        ref_value = v.get(ref_name, 0)
        want = np.count_nonzero(moved & ~kidney & (arr == ref_value)) * ml
        assert conf["kidney_left"][ref_name] == pytest.approx(want)
    for name, m in res["organs"].items():
        assert sum(conf.get(name, {}).values()) == pytest.approx(m["pred_ml"])
        assert sum(r.get(name, 0.0) for r in conf.values()) == pytest.approx(m["ref_ml"])
    assert sum(sum(r.values()) for r in conf.values()) == pytest.approx(arr.size * ml)
    # TotalSegmentator reference: its duodenum, bones and so on are `other`, not a lost organ.
    ts = sitk.ReadImage(str(SAMPLE_SEG))
    ts_labels = LabelSet.from_json([{"value": TS_IDS[n], "name": n} for n in DEFAULT_ORGANS])
    res_ts = ev.evaluate_images(sample_ref, ts, STD, ts_labels, distances=False)
    diag = {n: r.get(n, 0.0) for n, r in res_ts["confusion_ml"].items() if n != ev.OTHER}
    assert diag == pytest.approx({n: m["ref_ml"] for n, m in res_ts["organs"].items()})
    assert all(set(r) <= {n, ev.OTHER} for n, r in res_ts["confusion_ml"].items() if n != ev.OTHER)
    ts_arr = sitk.GetArrayViewFromImage(ts)
    named = np.isin(ts_arr, list(TS_IDS.values()))
    assert res_ts["confusion_ml"][ev.OTHER][ev.OTHER] == pytest.approx(np.count_nonzero(~named) * ml)


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

