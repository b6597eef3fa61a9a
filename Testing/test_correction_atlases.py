"""`cascadeseg improve --iterations 0 --atlases` on real CTs: corrections join the registered atlases.

The bundled model with its atlases cut to two made from another patient (s0009), their vote
alone deciding (network weight 0: the bundled networks were trained on the sample CT), gets two
corrections: the sample CT (liver and spleen reviewed) and the DICOM slab (liver only). Without
any training the improved package must segment the sample CT's liver and spleen much better, on
the corrected CT and on a simulated second scan of that patient, while unreviewed organs cast no
vote, the atlas files sit on the exact 3 mm grid, and the parent and the corrections store stay
as they were.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CascadeSegLib.cli import main
from CascadeSegLib.corrections import add_correction
from CascadeSegLib.errors import UserError
from CascadeSegLib.inference import preprocess
from CascadeSegLib.io import read_image
from CascadeSegLib.labels import UNKNOWN_LABEL
from CascadeSegLib.packaging.model import ModelPackage, load_model, sha256_file
from CascadeSegLib.train.correction_atlases import ATLAS_SPACING_MM
from CascadeSegLib.train.improve import ImproveOptions, improve_model, predict, reviewed_dice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from correction_atlas_check import rescan  # noqa: E402 - the measurement script's simulated second scan

TS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}
ANOTHER_PATIENT = ("s0009", "reg-s0001-s0009")      # the parent's atlases: none made from the sample CT
ATLASES_ONLY = dict(iterations=0, atlases=True, device="cpu", left_out=0)


def in_model_values(ts_path: Path, pkg: ModelPackage, out: Path) -> Path:
    img = sitk.ReadImage(str(ts_path))
    a = sitk.GetArrayFromImage(img)
    lut = np.zeros(int(a.max()) + 1, np.uint8)
    for ts_id, name in TS.items():
        lut[ts_id] = pkg.labels.by_name(name).value
    res = sitk.GetImageFromArray(lut[a])
    res.CopyInformation(img)
    sitk.WriteImage(res, str(out))
    return out


def _parent(src: ModelPackage, folder: Path, atlases: tuple[str, ...], rename: dict[str, str] | None = None,
            with_atlases: bool = True) -> ModelPackage:
    """`src` with only `atlases` (renamed by `rename`), their vote alone deciding inside the
    candidate regions (network weight 0): the bundled networks were trained on the sample CT
    and would hide what the atlases add."""
    states = [src.load_network(i).state_dict() for i in range(len(src.stages))]
    assert src.atlas_prior is not None
    kept = [dataclasses.replace(a, name=(rename or {}).get(a.name, a.name)) for a in src.atlas_prior.atlases
            if a.name in atlases]
    prior = dataclasses.replace(src.atlas_prior, atlases=kept, network_weight=0.0) if with_atlases else None
    pkg = ModelPackage(**{**src.__dict__, "name": folder.name, "root": None, "atlas_prior": prior,
                          "stages": [type(s)(s.name, s.spacing, s.tile, s.network, s.weights) for s in src.stages]})
    pkg.save(folder, states, files_from=src.root)
    return ModelPackage.load(folder)


@pytest.fixture()
def site(tmp_path, monkeypatch, sample_ct_path, dicom_slab_dir, dicom_slab_seg_path):
    root = tmp_path / "models"
    monkeypatch.setenv("CASCADESEG_MODELS", str(root))
    src = load_model()
    if src.atlas_prior is None or not set(ANOTHER_PATIENT) <= {a.name for a in src.atlas_prior.atlases}:
        pytest.skip("the bundled model has no atlases made from s0009")
    pkg = _parent(src, root / "parent", ANOTHER_PATIENT)
    truth = in_model_values(sample_ct_path.parent / "abdomen_ct_3mm_totalseg.nii.gz", pkg, tmp_path / "sample.nii.gz")
    add_correction("parent", pkg.labels, sample_ct_path, truth, case_id="sample", reviewed=["liver", "spleen"])
    slab = in_model_values(dicom_slab_seg_path, pkg, tmp_path / "slab.nii.gz")
    add_correction("parent", pkg.labels, dicom_slab_dir, slab, case_id="slab", reviewed=["liver"])
    return src, pkg, root, truth


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrections_join_the_atlases(site, sample_ct_path, capsys):
    src, pkg, root, truth = site
    parent, store = _snapshot(pkg.root), _snapshot(root / ".corrections")
    assert main(["improve", "parent", "-o", "site", "--iterations", "0", "--atlases", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: site holds the 2 corrected CT(s) as atlases" in out, out
    report = json.loads((root / "site" / "improve_report.json").read_text(encoding="utf-8"))
    held = report["left_out"]["slab"]      # the newest case, checked with the other one's atlas only
    assert held["before"].keys() == held["after"].keys() == {"liver"} and 0.0 < held["after"]["liver"] <= 1.0
    assert report["iterations"] == 0 and report["atlases"] == ["correction-sample", "correction-slab"]
    assert report["replay"] == []            # nothing trained, nothing replayed
    # the corrected CT's own spleen, lost by the network, is found again
    before, after = report["cases"]["sample"]["before"], report["cases"]["sample"]["after"]
    for organ in ("liver", "spleen"):        # measured: 0.71 / 0.69 -> 0.96 / 0.96
        assert after[organ] > before[organ] + 0.15, (organ, before, after)

    new = load_model("site")
    assert new.verify() and new.atlas_prior is not None and pkg.atlas_prior is not None
    assert [a.name for a in new.atlas_prior.atlases] == list(ANOTHER_PATIENT) + ["correction-sample", "correction-slab"]
    assert dataclasses.replace(new.atlas_prior, atlases=[]) == dataclasses.replace(pkg.atlas_prior, atlases=[])
    for i in range(len(pkg.stages)):         # the networks are the parent's
        ours, theirs = new.load_network(i).state_dict(), pkg.load_network(i).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert new.provenance["atlases_from_corrections"] == ["correction-sample", "correction-slab"]
    assert "--iterations 0 --atlases" in new.provenance["command"]
    markdown = (new.root / "IMPROVE_REPORT.md").read_text()
    assert "holds their CTs" in markdown and "## Correction cases (kept as atlases)" in markdown

    # the atlas files: the CT on the exact 3 mm grid, labels on the same grid in the model's values;
    # only the reviewed organs (and background near them) vote
    values = {name: new.labels.by_name(name).value for name in TS.values()}
    grid = preprocess.grid_for_spacing(read_image(sample_ct_path), [ATLAS_SPACING_MM] * 3)
    by_name = {a.name: a for a in new.atlas_prior.atlases}
    for name in ("correction-sample", "correction-slab"):
        ct = sitk.ReadImage(str(new.root / by_name[name].image))
        lab = sitk.ReadImage(str(new.root / by_name[name].labels))
        assert ct.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
        assert lab.GetSize() == ct.GetSize() and lab.GetOrigin() == ct.GetOrigin()
        assert lab.GetSpacing() == ct.GetSpacing() and lab.GetDirection() == ct.GetDirection()
    ct = sitk.ReadImage(str(new.root / by_name["correction-sample"].image))
    assert ct.GetSize() == grid.GetSize() and ct.GetSpacing() == grid.GetSpacing()
    assert ct.GetOrigin() == grid.GetOrigin() and ct.GetDirection() == grid.GetDirection()
    sample = sitk.GetArrayFromImage(sitk.ReadImage(str(new.root / by_name["correction-sample"].labels)))
    slab = sitk.GetArrayFromImage(sitk.ReadImage(str(new.root / by_name["correction-slab"].labels)))
    assert set(np.unique(sample)) <= {0, values["liver"], values["spleen"], UNKNOWN_LABEL}
    assert (sample == UNKNOWN_LABEL).any() and (sample == 0).any()
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))
    for organ in ("liver", "spleen"):        # the sample CT is already 3 mm: its organs keep their voxels
        kept, reference = int((sample == values[organ]).sum()), int((ref == values[organ]).sum())
        assert abs(kept - reference) <= 0.02 * reference, (organ, kept, reference)
    assert (slab == values["liver"]).any() and not (slab == values["spleen"]).any()

    # a second scan of the corrected patient (moved, bent, 3 mm slices, noise): its spleen is found
    scan, scan_ref = rescan(read_image(sample_ct_path), read_image(truth), seed=1)
    ct_path, ref_path = root.parent / "rescan.nii.gz", root.parent / "rescan_ref.nii.gz"
    sitk.WriteImage(scan, str(ct_path))
    sitk.WriteImage(scan_ref, str(ref_path))
    dice = {m.name: reviewed_dice(predict(m, ct_path, "cpu", None), m.labels, read_image(ref_path), pkg.labels,
                                  ["liver", "spleen"]) for m in (pkg, new)}
    for organ in ("liver", "spleen"):        # measured: 0.71 / 0.72 -> 0.91 / 0.91
        assert dice["site"][organ] > dice["parent"][organ] + 0.1, (organ, dice)
    assert _snapshot(pkg.root) == parent and _snapshot(root / ".corrections") == store
    assert sorted(p.name for p in root.iterdir()) == [".corrections", "parent", "site"]


def test_atlas_requests_that_cannot_work_are_refused(site, capsys, sample_ct_path):
    src, pkg, root, truth = site
    with pytest.raises(UserError, match="--iterations must be at least 1"):
        improve_model("parent", "site", ImproveOptions(iterations=0, device="cpu"), root=root)
    assert main(["improve", "parent", "-o", "site", "--iterations", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadeseg: error: --iterations must be at least 1 (0 only with --atlases")
    assert "\n" not in err
    # a parent without atlases has no vote for the corrections to join
    _parent(src, root / "plain", ANOTHER_PATIENT, with_atlases=False)
    add_correction("plain", pkg.labels, sample_ct_path, truth, case_id="sample")
    with pytest.raises(UserError, match="model plain has no registered atlases"):
        improve_model("plain", "site", ImproveOptions(**ATLASES_ONLY), root=root)
    # a correction whose atlas name the parent already uses is refused before any work
    _parent(src, root / "again", ANOTHER_PATIENT, rename={"s0009": "correction-sample"})
    add_correction("again", pkg.labels, sample_ct_path, truth, case_id="sample")
    assert main(["improve", "again", "-o", "site", "--iterations", "0", "--atlases", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already has atlas(es) correction-sample" in err and "\n" not in err
    assert sorted(p.name for p in root.iterdir()) == [".corrections", "again", "parent", "plain"]
