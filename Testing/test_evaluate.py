"""Evaluation reports (docs/method.md section 7): parsing of radii and labels, matching prediction and
reference cases, and the evaluate/compare/candidates/experiment commands end to end on the real
sample CT's TotalSegmentator labels, a phantom, and the cascade engine's output. The metrics
themselves are checked in test_evaluate_metrics.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from evaluate_samples import SAMPLE_CT, SAMPLE_SEG, STD, TS_IDS, image, shifted

# the fixture sample_ref, imported so that pytest finds it here
from evaluate_samples import sample_ref_fixture as sample_ref_fixture
from scipy import ndimage, stats

from CascadeSegLib import evaluate as ev
from CascadeSegLib.commands import evaluate as cmd
from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import DEFAULT_ORGANS

# --------------------------------------------------------------------------- helpers

def run_cli(argv: list[str]) -> int:
    """Through the real dispatcher (cli.main) so registration and exit codes are covered."""
    from CascadeSegLib.cli import main
    return main(argv)



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
    sitk.WriteImage(p2img, str(pred_dir / "case3.nrrd"))     # no reference: reported, not scored
    out = tmp_path / "report"
    rc = run_cli(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out),
                  "--ref-labels", "totalsegmentator", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "cascadeseg: warning: 1 predictions without reference: case3\n" in printed.err
    doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert doc["unmatched_predictions"] == ["case3"] and doc["unmatched_references"] == []
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
    # where the voxels go: case1's shifted liver lies partly outside the reference liver, and
    # confusion.csv holds the same ml as metrics.json
    assert "### Where the voxels go [ml]" in md
    conf = cases["case1"]["confusion_ml"]
    assert conf["liver"]["liver"] == pytest.approx((p & r).sum() * 27.0 / 1000)
    crow = [r for r in csv.DictReader((out / "confusion.csv").open())
            if r["case"] == "case1" and r["predicted"] == "liver" and r["reference"] == "liver"]
    assert float(crow[0]["ml"]) == pytest.approx(conf["liver"]["liver"])
    for f in ("boxplot_dice.png", "boxplot_hd95.png", "boxplot_assd.png", "volumes.png", "confusion.csv"):
        assert f in doc["files"]
    px = _png_ok(out / "boxplot_dice.png")
    # single method: the boxes take the organ colours (alpha 0.85 over white)
    liver_rgb = np.array(STD.by_name("liver").color_float)
    assert _has_color(px, 0.85 * liver_rgb + 0.15)
    _png_ok(out / "volumes.png")
    assert "liver" in printed.out


def test_a_plot_warning_is_added_to_the_callers_warnings(tmp_path: Path, sample_ref: sitk.Image,
                                                       monkeypatch) -> None:
    """Without matplotlib the report says so beside the warnings the caller brought (label check),
    instead of replacing them."""
    from CascadeSegLib import report_plots

    def no_matplotlib() -> None:
        raise ImportError("matplotlib")

    monkeypatch.setattr(report_plots, "require_matplotlib", no_matplotlib)
    sitk.WriteImage(sample_ref, str(tmp_path / "case1.nii.gz"))
    cases = ev.evaluate_pairs([("case1", tmp_path / "case1.nii.gz", tmp_path / "case1.nii.gz")], STD,
                              distances=False, progress=False)
    doc = ev.write_evaluation_report(tmp_path / "rep", {"pred": cases}, STD,
                                     extra={"warnings": ["spleen: 1 ml predicted vs 200 ml"]})
    assert doc["warnings"] == ["spleen: 1 ml predicted vs 200 ml",
                               "matplotlib is not installed: no plots (pip install cascadeseg[eval])"]
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["warnings"] == doc["warnings"] and not any(f.endswith(".png") for f in saved["files"])
    assert saved["methods"]["pred"]["cases"]["case1"]["organs"]["liver"]["dice"] == 1.0


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


def test_candidates_command_report(tmp_path: Path, sample_ref: sitk.Image, capsys) -> None:
    arr = sitk.GetArrayFromImage(sample_ref)
    s1 = np.where(ndimage.grey_erosion(arr, size=(3, 3, 3)) == arr, arr, 0)
    (tmp_path / "s1").mkdir()
    sitk.WriteImage(image(s1, sample_ref), str(tmp_path / "s1" / "case.nii.gz"))
    out = tmp_path / "cand"
    # The reference's other TotalSegmentator structures are values this list does not name: refused,
    # as `evaluate` refuses them, before anything is written.
    assert run_cli(["candidates", str(tmp_path / "s1" / "case.nii.gz"), str(SAMPLE_SEG),
                    "-o", str(out), "--quiet", "--ref-labels",
                    json.dumps([{"value": v, "name": n} for n, v in TS_IDS.items()])]) == 2
    assert "the reference holds label values that --ref-labels" in capsys.readouterr().err
    assert not out.exists()
    assert run_cli(["candidates", str(tmp_path / "s1" / "case.nii.gz"), str(SAMPLE_SEG),
                    "-o", str(out), "--radii", "0..10", "--quiet", "--ref-labels", "totalsegmentator"]) == 0
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
