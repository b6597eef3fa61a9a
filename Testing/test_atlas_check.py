"""The atlas check: organs labelled where the atlases agree on another organ are measured,
listed and, when large, flagged (a warning line, the report) without changing a label.

On real data: the default model whose stage-2 network has the spleen's and the left kidney's
outputs swapped (the mix-up the check exists for) is flagged on the sample CT, both ways; the
default model as shipped flags nothing there, and flags the sample CT's pelvis (none of the ten
organs) as a scan no atlas agrees with. The thresholds are checked on a hand-made prior
voxel for voxel."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CascadeSegLib.cli import main
from CascadeSegLib.inference import atlas_check
from CascadeSegLib.inference.atlas_prior import GridPrior
from CascadeSegLib.inference.cascade import Segmenter
from CascadeSegLib.io import read_image
from CascadeSegLib.labels import LabelSet
from CascadeSegLib.packaging.model import ModelPackage, load_model

#: the organs abdomen-ct 2.10.0-2.13.0 let the atlases decide among (`mixup_share` 0.7)
MIXUP_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach")


def _grid(size: tuple[int, int, int], spacing: float) -> sitk.Image:
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing([spacing] * 3)
    img.SetOrigin((-40.0, 12.5, 300.0))
    return img


def test_conflicts_are_measured_listed_and_flagged_by_the_thresholds() -> None:
    """10 mm voxels (1 ml each). The atlases say spleen at share 0.8 on the first 40 slices'
    lower rows (800 ml), left kidney at 0.6 (under the 0.7 consensus) from slice 40 on,
    background elsewhere; the prior's grid ends 10 slices before the labels' does."""
    labels = LabelSet.from_names(["liver", "spleen", "kidney_left"])   # 1, 2, 3
    grid = _grid((4, 10, 60), 10.0)                                   # x, y, z
    prior = torch.zeros((4, 50, 10, 4))
    prior[0] = 1.0
    prior[:, :40, :5] = torch.tensor([0.1, 0.0, 0.8, 0.1])[:, None, None, None]
    prior[:, 40:] = torch.tensor([0.2, 0.2, 0.0, 0.6])[:, None, None, None]
    fused = GridPrior(prior, _grid((4, 10, 50), 10.0), grid, 0.9)
    lab = torch.zeros((60, 10, 4), dtype=torch.uint8)
    lab[:30, 0, 0] = 1                    # 30 ml of liver where the atlases say spleen
    lab[30:40, 5:, :] = 1                 # 200 ml where they say background
    lab[45:50, 0, 0] = 1                  # 5 ml where no organ has 0.7 of the vote
    lab[52:, :, :] = 1                    # 320 ml past the prior's grid: nothing is known there
    lab[:5, 1, 0] = 3                     # 5 ml of left kidney where they say spleen
    out = atlas_check.atlas_conflicts(lab, fused, labels)
    # 30 of 555 ml of liver: a border-sized share, listed; 5 ml of kidney: under 10 ml, listed;
    # the spleen the atlases agree on (800 ml) holds 35 ml of organs: 765 ml missed, flagged
    assert out == [atlas_check.AtlasConflict("no organ", "spleen", 765.0, 0.956, True, "missed"),
                   atlas_check.AtlasConflict("liver", "spleen", 30.0, 0.054, False),
                   atlas_check.AtlasConflict("left kidney", "spleen", 5.0, 1.0, False)]
    assert out[0].message() == ("atlas check: most atlases put the spleen on 765 ml that the result leaves "
                                "unlabelled (96% of where they agree on it); review that region")
    lab[30:40] = 0
    lab[52:] = 0
    lab[:40, 2:5, :] = 2                   # 480 of the 800 ml labelled spleen: 285 ml missed, 36 %
    out = atlas_check.atlas_conflicts(lab, fused, labels)
    assert out == [atlas_check.AtlasConflict("no organ", "spleen", 285.0, 0.356, True, "missed"),
                   atlas_check.AtlasConflict("liver", "spleen", 30.0, 0.857, True),     # 30 of 35 ml
                   atlas_check.AtlasConflict("left kidney", "spleen", 5.0, 1.0, False)]
    assert out[1].message() == ("atlas check: 30 ml of the liver (86% of it) lies where most atlases put the "
                                "spleen; review that region")
    assert json.loads(json.dumps(out[1].to_json()))["flagged"] is True
    # on a slab the same conflicts are listed and none is flagged
    assert atlas_check.atlas_conflicts(lab, fused, labels, slab=True) == [replace(c, flagged=False) for c in out]
    lab[:40, :5, :] = 2                    # all of it: nothing missed, nothing mixed up
    assert atlas_check.atlas_conflicts(lab, fused, labels) == []


def test_a_scan_no_atlas_agrees_with_is_flagged_as_a_whole() -> None:
    """Best agreement under `MIN_SCAN_AGREEMENT` with at least `LISTED_ML` labelled: one flagged
    "scan" conflict carrying the best agreement and every labelled ml; otherwise none."""
    lab = torch.zeros((10, 10, 10), dtype=torch.uint8)
    lab[:4, :5, :] = 3                     # 200 voxels of 0.5 ml: 100 ml
    lab[8, 0, 0] = 1                       # and 0.5 ml more
    low = atlas_check.MIN_SCAN_AGREEMENT - 0.01
    out = atlas_check.scan_conflict(low, lab, 0.5)
    assert out == atlas_check.AtlasConflict("every organ", "", 100.5, round(low, 3), True, "scan")
    assert out.message() == (f"atlas check: no atlas's organs agree with the network's (best Dice {low:.2f}, under "
                             f"{atlas_check.MIN_SCAN_AGREEMENT:g}): the scan may hold none of the abdomen's organs "
                             "(a pelvic or chest CT) and its 100 ml of segments may be false; review every segment")
    assert atlas_check.scan_conflict(atlas_check.MIN_SCAN_AGREEMENT, lab, 0.5) is None
    assert atlas_check.scan_conflict(None, lab, 0.5) is None             # not measured: a slab, no stage 1
    lab[:] = 0
    lab[0, 0, 0] = 1                       # 0.5 ml: under LISTED_ML, nothing to review
    assert atlas_check.scan_conflict(0.0, lab, 0.5) is None


def _with_prior(model: ModelPackage, **changes: Any) -> ModelPackage:
    """`model` with these atlas_prior settings changed, checked as model.json is."""
    from CascadeSegLib.inference.atlas_prior import AtlasPriorSpec

    assert model.atlas_prior is not None
    model.atlas_prior = AtlasPriorSpec.from_json({**model.atlas_prior.to_json(), **changes})
    return model


@pytest.fixture(scope="module")
def swapped_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with stage 2's spleen and left-kidney outputs swapped, the atlases'
    organ-identity step off (what the check is for is seeing such a mix-up)."""
    model = _with_prior(load_model(), mixup_share=0.0)
    folder = tmp_path_factory.mktemp("swapped")
    spleen, kidney = model.labels.by_name("spleen").value, model.labels.by_name("kidney_left").value
    states = [model.load_weights(i) for i in range(len(model.stages))]
    order = list(range(model.labels.num_classes))
    order[spleen], order[kidney] = kidney, spleen
    for key in ("head.weight", "head.bias"):
        states[1][key] = states[1][key][order].clone()
    model.save(folder, states, files_from=model.root)
    return folder


@pytest.fixture(scope="module")
def swapped_run(swapped_model: Path, sample_ct_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cascadeseg segment` of the sample CT with the swapped model: its output folder (stderr
    saved beside it)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("swapped-run")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["segment", str(sample_ct_path), "-o", str(out), "--model", str(swapped_model)]) == 0
    (out / "stderr.txt").write_text(err.getvalue())
    return out


def test_a_network_that_mixes_up_two_organs_is_flagged(swapped_run: Path) -> None:
    """Stage 2 swaps spleen and left kidney, stage 1 does not. The spleen stage 2 calls left kidney
    is flagged as lying where the atlases put the spleen, and the left kidney it calls spleen as
    lying where they put the left kidney: that "spleen" is the organ's one large piece (stage 1
    confirms only specks elsewhere, which do not outweigh it), so both halves of the swap are
    reported."""
    err = (swapped_run / "stderr.txt").read_text()
    report = json.loads(next(swapped_run.glob("*_report.json")).read_text())
    flagged = {(c["organ"], c["atlases_say"]): c for c in report["atlas_check"] if c["flagged"]}
    markdown = next(swapped_run.glob("*_report.md")).read_text()
    assert set(flagged) == {("left kidney", "spleen"), ("spleen", "left kidney")}
    for (organ, atlases_say), conflict in flagged.items():
        assert conflict["kind"] == "mix-up" and conflict["fraction"] > 0.5 and conflict["ml"] > 50, conflict
        assert f"cascadeseg: warning: atlas check: {conflict['ml']:.0f} ml of the {organ}" in err
        assert f"lies where most atlases put the {atlases_say}" in markdown
    assert "**Atlas check: review these regions.**" in markdown


def test_on_a_slab_the_mix_up_is_listed_not_flagged(swapped_model: Path, sample_ct_path: Path, tmp_path: Path) -> None:
    """The swapped network on a 39 mm slab of the sample CT through spleen and left kidney: the
    atlases, placed by the slab search, are often centimetres off on slabs (14 flags on held-out
    slabs, 4 right), so the mix-up is listed in the report, with no warning and nothing flagged."""
    import contextlib
    import io

    slab = tmp_path / "slab.nii.gz"
    sitk.WriteImage(read_image(sample_ct_path)[:, :, 82:95], str(slab))
    out, err = tmp_path / "out", io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["segment", str(slab), "-o", str(out), "--model", str(swapped_model)]) == 0
    report = json.loads(next(out.glob("*_report.json")).read_text())
    assert report["candidate_regions"]["atlas_prior_slab"] == 1.0
    listed = {(c["organ"], c["atlases_say"]) for c in report["atlas_check"]}
    assert ("left kidney", "spleen") in listed and not [c for c in report["atlas_check"] if c["flagged"]]
    assert "atlas check" not in err.getvalue()
    text = next(out.glob("*_report.md")).read_text()
    assert "Atlas check on a slab, listed but not flagged (atlases registered onto a slab are often centimetres " \
           "off): " in text and "review these regions" not in text


def test_the_check_changes_no_label(swapped_model: Path, swapped_run: Path, sample_ct_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from CascadeSegLib.inference import cascade

    monkeypatch.setattr(cascade, "atlas_conflicts", lambda *args, **kwargs: [])
    unchecked = Segmenter(ModelPackage.load(swapped_model), device="cpu").segment(read_image(sample_ct_path))
    assert unchecked.atlas_conflicts == []
    checked = sitk.ReadImage(str(next(swapped_run.glob("*_labels.nii.gz"))))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(unchecked.labels), sitk.GetArrayFromImage(checked))


def test_a_network_that_never_finds_the_spleen_is_flagged(sample_ct_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage 2 with the spleen's output pushed to -1000. With the network weighted 0.9 (2.1.0-2.7.0)
    the fused labels lose the spleen, and the region the atlases agree is spleen is reported
    missed (the liver, found, is not); at the shipped equal weight the atlases give part of it back."""
    model = _with_prior(load_model(), mixup_share=0.0)
    states = [model.load_weights(i) for i in range(len(model.stages))]
    states[1]["head.bias"] = states[1]["head.bias"].clone()
    states[1]["head.bias"][model.labels.by_name("spleen").value] = -1000.0
    spleen = model.labels.by_name("spleen").value
    ct = read_image(sample_ct_path)
    assert model.atlas_prior is not None and model.atlas_prior.network_weight == 0.5
    folder = tmp_path_factory.mktemp("no-spleen-equal")
    model.save(folder, states, files_from=model.root)
    restored = Segmenter(ModelPackage.load(folder), device="cpu").segment(ct)
    assert int((sitk.GetArrayViewFromImage(restored.labels) == spleen).sum()) > 1000      # > 27 ml

    model.atlas_prior.network_weight = 0.9
    folder = tmp_path_factory.mktemp("no-spleen")
    model.save(folder, states, files_from=model.root)
    warnings: list[str] = []
    result = Segmenter(ModelPackage.load(folder), device="cpu", on_warning=warnings.append).segment(ct)
    assert int((sitk.GetArrayViewFromImage(result.labels) == spleen).sum()) == 0
    missed = {c.atlases_say: c for c in result.atlas_conflicts if c.kind == "missed"}
    assert missed["spleen"].flagged and missed["spleen"].ml > 100 and missed["spleen"].fraction > 0.9
    assert not missed.get("liver") or not missed["liver"].flagged
    assert [w for w in warnings if w.startswith("atlas check: most atlases put the spleen on ")]


def test_the_shipped_model_flags_nothing_on_the_sample_ct(sample_ct_path: Path) -> None:
    warnings: list[str] = []
    result = Segmenter(load_model(), device="cpu", on_warning=warnings.append).segment(read_image(sample_ct_path))
    assert not [w for w in warnings if "atlas check" in w]
    assert not [c for c in result.atlas_conflicts if c.flagged]
    assert result.stats["atlas_prior_agreement"] >= atlas_check.MIN_SCAN_AGREEMENT       # 0.80 measured


def test_the_sample_cts_pelvis_is_flagged_as_a_scan_without_our_organs(sample_ct_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample CT's lower half (sacrum, hips, bladder: none of the ten organs) with the shipped
    model: the networks label some ml anyway, no atlas agrees with stage 1, and the scan is flagged
    as a whole (warning, conflict) without a label changing."""
    from CascadeSegLib.inference import cascade

    pelvis = read_image(sample_ct_path)[:, :, :56]
    warnings: list[str] = []
    result = Segmenter(load_model(), device="cpu", on_warning=warnings.append).segment(pelvis)
    labelled_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(result.labels))) * float(
        np.prod(pelvis.GetSpacing())) / 1000.0
    assert result.stats["atlas_prior_agreement"] < atlas_check.MIN_SCAN_AGREEMENT
    scan = [c for c in result.atlas_conflicts if c.kind == "scan"]
    assert len(scan) == 1 and scan[0].flagged and scan[0] is result.atlas_conflicts[0]
    assert scan[0].fraction == round(result.stats["atlas_prior_agreement"], 3)
    assert scan[0].ml == pytest.approx(labelled_ml, abs=0.05) and labelled_ml >= atlas_check.LISTED_ML
    assert scan[0].message() in warnings
    monkeypatch.setattr(cascade, "scan_conflict", lambda *args: None)
    unchecked = Segmenter(load_model(), device="cpu").segment(pelvis)
    assert not [c for c in unchecked.atlas_conflicts if c.kind == "scan"]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(unchecked.labels),
                                  sitk.GetArrayViewFromImage(result.labels))


def test_on_a_scan_without_the_abdomen_no_organ_is_checked_against_the_atlases(tmp_path: Path) -> None:
    """s0003 (neck and chest, none of the ten organs) with the shipped model: the atlases, registered
    onto anatomy they do not hold, agree on a kidney or the IVC somewhere (2.13.2 listed "6 ml where
    most atlases put the inferior vena cava is unlabelled"); no such per-organ line is given there,
    and the report says why. An abdomen is still checked organ by organ
    (test_a_network_that_never_finds_the_spleen_is_flagged)."""
    ct = Path(__file__).resolve().parent.parent / "Resources" / "TrainingData" / "totalsegmentator" / "s0003_ct.nii.gz"
    out = tmp_path / "out"
    assert main(["segment", str(ct), "-o", str(out), "--quiet"]) == 0
    report = json.loads(next(out.glob("*_report.json")).read_text())
    stats = report["candidate_regions"]
    assert stats["atlas_prior_agreement"] < atlas_check.MIN_SCAN_AGREEMENT       # 0.025 measured
    assert sum(o["ml"] for o in report["organs"].values()) < atlas_check.LISTED_ML     # 0 ml measured
    assert report["atlas_check"] == [] and stats["atlas_check_per_organ"] == 0.0
    text = next(out.glob("*_report.md")).read_text()
    assert "Small disagreements" not in text and "where most atlases put" not in text
    assert ("Atlas check: no atlas's organs agree with the network's, so the scan seems to hold none of the "
            "abdomen's organs; the result labels next to nothing, and no organ is checked against the atlases.") in text


def _with_min_agreement(share: float) -> ModelPackage:
    return _with_prior(load_model(), min_scan_agreement=share)


def test_where_no_atlas_agrees_their_organs_are_not_candidates(sample_ct_path: Path) -> None:
    """`min_scan_agreement` (abdomen-ct 2.13.2): on the sample CT's pelvis, where no atlas agrees
    with stage 1, the atlases' organs neither join C2 nor label anything outside it (fewer false
    organs; said in a warning; the scan still flagged); the whole sample CT, where they agree, is
    segmented exactly as without the setting."""
    from CascadeSegLib.inference.atlas_prior import AtlasPriorSpec

    ct = read_image(sample_ct_path)
    pelvis = ct[:, :, :56]
    warnings: list[str] = []
    kept = Segmenter(_with_min_agreement(0.1), device="cpu", on_warning=warnings.append).segment(pelvis)
    used = Segmenter(_with_min_agreement(0.0), device="cpu").segment(pelvis)
    assert kept.stats["atlas_prior_candidates"] == 0.0 and kept.stats["atlas_prior_agreement"] < 0.1
    assert "atlas_prior_candidates" not in used.stats
    assert any(w.startswith("atlas prior: no atlas's organs agree with the networks'") for w in warnings)
    assert [c.kind for c in kept.atlas_conflicts][:1] == ["scan"]      # flagged, as with the candidates
    assert np.count_nonzero(sitk.GetArrayViewFromImage(kept.labels)) < np.count_nonzero(
        sitk.GetArrayViewFromImage(used.labels))
    # the path that keeps the scores gives the same labels, and its scores' argmax is them
    scored = Segmenter(_with_min_agreement(0.1), device="cpu", keep_probabilities=True).segment(pelvis)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(scored.labels), sitk.GetArrayViewFromImage(kept.labels))
    probs = scored.probabilities
    assert probs is not None
    start = pelvis.TransformPhysicalPointToIndex(probs.GetOrigin())
    box = tuple(slice(a, a + n) for a, n in zip(start[::-1], probs.GetSize()[::-1]))
    in_box = sitk.GetArrayFromImage(kept.labels)[box]
    assert (sitk.GetArrayFromImage(probs).argmax(-1) == in_box).mean() > 0.98
    whole = [sitk.GetArrayFromImage(Segmenter(_with_min_agreement(v), device="cpu").segment(ct).labels)
             for v in (0.0, 0.1)]
    np.testing.assert_array_equal(whole[0], whole[1])
    spec = _with_min_agreement(0.1).atlas_prior
    assert spec is not None and AtlasPriorSpec.from_json(spec.to_json()) == spec     # written and read back
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_scan_agreement"):
            AtlasPriorSpec.from_json({**spec.to_json(), "min_scan_agreement": bad})


def test_a_model_without_atlases_reports_no_check(sample_ct_path: Path, tmp_path: Path) -> None:
    model = ModelPackage.load(load_model().root)
    folder = tmp_path / "no-atlases"
    model.atlas_prior = None
    for stage in model.stages:
        folder.mkdir(exist_ok=True)
        shutil.copy2(model.weight_path(stage), folder / stage.weights)
    model.save(folder)
    out = tmp_path / "out"
    assert main(["segment", str(sample_ct_path), "-o", str(out), "--model", str(folder), "--quiet"]) == 0
    report = json.loads(next(out.glob("*_report.json")).read_text())
    assert "atlas_check" not in report and "Atlas check" not in next(out.glob("*_report.md")).read_text()
    assert np.isfinite(report["organs"]["liver"]["ml"])


def test_the_report_says_what_to_review_and_what_the_check_was_of() -> None:
    from CascadeSegLib.report import report_markdown

    labels = load_model().labels
    conflicts = [atlas_check.AtlasConflict("no organ", "spleen", 120.0, 0.6, True, "missed").to_json(),
                 atlas_check.AtlasConflict("liver", "right kidney", 14.9, 0.009, False).to_json()]
    base = {"case": "c", "model": {"name": "m", "version": "1"}, "device": "cpu",
            "input": {"size": [1, 1, 1], "spacing": [1.0, 1.0, 1.0]}, "timings_s": {},
            "organs": {lab.name: {"ml": 0.0, "voxels": 0} for lab in labels}}
    whole = atlas_check.AtlasConflict("every organ", "", 79.5, 0.003, True, "scan").to_json()
    assert ("**Atlas check: review these regions.**\n- no atlas's organs agree with the network's (best Dice "
            "0.00): the scan may hold none of the abdomen's organs (a pelvic or chest CT), and all 80 ml of "
            "segments may be false") in report_markdown({**base, "atlas_check": [whole], "candidate_regions": {}},
                                                         labels)
    text = report_markdown({**base, "atlas_check": conflicts, "candidate_regions": {}}, labels)
    assert ("**Atlas check: review these regions.**\n- 120 ml where most atlases put the spleen is unlabelled "
            "(60% of where they agree on it)\nSmall disagreements (borders): 15 ml of the liver (1% of it) lies "
            "where most atlases put the right kidney") in text
    refined = report_markdown({**base, "atlas_check": conflicts,
                               "candidate_regions": {"refine_iterations_liver": 3.0}}, labels)
    assert "(The atlas check below is of the cascade's labels, before --refine.)" in refined
    assert "Atlas check" not in report_markdown({**base, "candidate_regions": {}}, labels)
    on_slab = report_markdown({**base, "atlas_check": [{**c, "flagged": False} for c in conflicts],
                               "candidate_regions": {"atlas_prior_slab": 1.0}}, labels)
    assert ("Atlas check on a slab, listed but not flagged (atlases registered onto a slab are often centimetres "
            "off): 120 ml where most atlases put the spleen is unlabelled (60% of where they agree on it); 15 ml of "
            "the liver (1% of it) lies where most atlases put the right kidney") in on_slab
    assert "Atlas check on a slab: no organ lies where most atlases put another organ or none." in report_markdown(
        {**base, "atlas_check": [], "candidate_regions": {"atlas_prior_slab": 1.0}}, labels)


def test_mixup_relabel_takes_the_atlases_organ_where_they_agree_among_the_named_organs() -> None:
    """10 mm voxels. The atlases say spleen at 0.8 on slices 0-19, left kidney at 0.6 (under the
    share) on slices 20-39, aorta at 0.9 on slices 40-49; the prior's grid ends at slice 50."""
    grid = _grid((4, 10, 60), 10.0)
    prior = torch.zeros((5, 50, 10, 4))                               # background, liver, spleen, kidney_left, aorta
    prior[:, :20] = torch.tensor([0.1, 0.0, 0.8, 0.1, 0.0])[:, None, None, None]
    prior[:, 20:40] = torch.tensor([0.2, 0.2, 0.0, 0.6, 0.0])[:, None, None, None]
    prior[:, 40:] = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.9])[:, None, None, None]
    fused = GridPrior(prior, _grid((4, 10, 50), 10.0), grid, 0.5)
    lab = torch.zeros((60, 10, 4), dtype=torch.uint8)
    lab[:10, :5] = 3                      # left kidney where the atlases agree on spleen: -> spleen
    lab[10:20, :5] = 4                    # aorta there: not one of the organs, kept
    lab[20:40] = 2                        # spleen where no organ has the share: kept
    lab[40:50, :5] = 1                    # liver where they agree on the aorta (not named): kept
    lab[50:] = 3                          # past the prior's grid: kept
    out = fused.relabel_mixups(lab, 0.7, [1, 2, 3])
    expected = lab.clone()
    expected[:10, :5] = 2
    assert torch.equal(out, expected)
    assert torch.equal(fused.relabel_mixups(lab, 0.85, [1, 2, 3]), lab)        # 0.8 is under the share
    assert torch.equal(fused.relabel_mixups(lab, 0.7, [1, 3]), lab)            # spleen not named
    # stage 1 gives half of the mixed-up kidney voxels the same organ: those keep it
    stage1 = torch.zeros_like(lab)
    stage1[:5, :5] = 3
    stage1[5:10, :5] = 2
    expected[:5, :5] = 3
    assert torch.equal(fused.relabel_mixups(lab, 0.7, [1, 2, 3], stage1), expected)


@pytest.fixture(scope="module")
def shipped_labels(sample_ct_path: Path) -> np.ndarray:
    """The shipped model's labels of the sample CT."""
    return sitk.GetArrayFromImage(Segmenter(load_model(), device="cpu").segment(read_image(sample_ct_path)).labels)


@pytest.mark.parametrize("stages", [(1,), (0, 1)])
def test_the_atlases_fix_a_mixup_of_stage_2_but_not_of_both_stages(sample_ct_path: Path, tmp_path: Path,
                                                                   shipped_labels: np.ndarray,
                                                                   stages: tuple[int, ...]) -> None:
    """The shipped model with the spleen and left-kidney outputs swapped in stage 2 only: stage 1
    finds the spleen, stage 2 calls it left kidney, and the atlases (which agree on the spleen)
    give it back. Swapped in both stages, the networks agree with each other against the atlases
    and keep their labels (on scans the atlases fit badly, the networks are the ones that are right)."""
    # the step is off in the shipped package since 2.13.1: turned on here
    model = _with_prior(load_model(), mixup_share=0.7, mixup_organs=list(MIXUP_ORGANS))
    spleen, kidney = model.labels.by_name("spleen").value, model.labels.by_name("kidney_left").value
    ct, reference = read_image(sample_ct_path), shipped_labels
    states = [model.load_weights(i) for i in range(len(model.stages))]
    order = list(range(model.labels.num_classes))
    order[spleen], order[kidney] = kidney, spleen
    for i in stages:
        for key in ("head.weight", "head.bias"):
            states[i][key] = states[i][key][order].clone()
    model.save(tmp_path / "swapped", states, files_from=model.root)
    got = sitk.GetArrayFromImage(Segmenter(ModelPackage.load(tmp_path / "swapped"), device="cpu").segment(ct).labels)
    kept = float(((got == spleen) & (reference == spleen)).sum() / (reference == spleen).sum())
    if stages == (1,):
        assert kept > 0.8, kept
    else:
        assert kept < 0.2 and float(((got == kidney) & (reference == spleen)).sum() / (reference == spleen).sum()) > 0.5


def test_mixup_settings_default_off_round_trip_and_are_checked() -> None:
    from CascadeSegLib.errors import ModelError
    from CascadeSegLib.inference.atlas_prior import AtlasPriorSpec

    shipped = load_model()
    assert shipped.atlas_prior is not None
    assert shipped.atlas_prior.mixup_share == 0.0 and shipped.atlas_prior.mixup_organs == ()   # off since 2.13.1
    raw = shipped.atlas_prior.to_json()
    assert not [k for k in raw if k.startswith("mixup")]                # a package that does not name it
    assert AtlasPriorSpec.from_json(raw).to_json() == raw               # ... is written as before
    on = AtlasPriorSpec.from_json({**raw, "mixup_share": 0.7, "mixup_organs": ["spleen", "kidney_left"]})
    assert on.to_json()["mixup_organs"] == ["spleen", "kidney_left"]
    assert AtlasPriorSpec.from_json(on.to_json()) == on
    for bad in ({"mixup_share": 0.4, "mixup_organs": ["spleen", "liver"]},
                {"mixup_share": 1.5, "mixup_organs": ["spleen", "liver"]},
                {"mixup_share": 0.7, "mixup_organs": ["spleen"]}):
        with pytest.raises(ValueError, match="mixup_share must lie in"):
            AtlasPriorSpec.from_json({**raw, **bad})
    shipped.atlas_prior = AtlasPriorSpec.from_json({**raw, "mixup_share": 0.7, "mixup_organs": ["spleen", "lung"]})
    with pytest.raises(ModelError, match=r"mixup_organs names unknown organs \['lung'\]"):
        ModelPackage.from_json(json.loads(json.dumps(shipped.to_json())))


def test_mixup_relabel_gives_a_swapped_network_its_organs_back(swapped_model: Path, sample_ct_path: Path) -> None:
    """The network that calls the spleen left kidney and back: with the atlases deciding which
    organ among liver, spleen, kidneys and stomach, both organs come back on the sample CT."""
    reference = Path(__file__).resolve().parent.parent / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"
    model = ModelPackage.load(swapped_model)
    ct = read_image(sample_ct_path)
    names = list(MIXUP_ORGANS)
    ts_ids = {"spleen": 1, "kidney_left": 3}                          # TotalSegmentator v2 ids
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(reference)), ct, sitk.Transform(),
                                               sitk.sitkNearestNeighbor, 0))

    def dice(labels: sitk.Image, organ: str) -> float:
        a, b = sitk.GetArrayViewFromImage(labels) == model.labels.by_name(organ).value, ref == ts_ids[organ]
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    before = Segmenter(model, device="cpu").segment(ct)
    model = _with_prior(model, mixup_share=0.7, mixup_organs=names)
    after = Segmenter(model, device="cpu").segment(ct)
    for organ in ("spleen", "kidney_left"):
        assert dice(before.labels, organ) < 0.3 < 0.7 < dice(after.labels, organ)
    assert not [c for c in after.atlas_conflicts if c.flagged]
