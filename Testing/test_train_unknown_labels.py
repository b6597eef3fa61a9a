"""Label 255 ("unknown") in a training label map: kept through the lookup, never trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from train_helpers import small_config, write_phantom_cases

from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import UNKNOWN_LABEL, LabelSet
from CascadeSegLib.train.dataset import label_lookup

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm.nii.gz"
SAMPLE_LABELS = REPO / "Resources" / "SampleData" / "abdomen_ct_3mm_totalseg.nii.gz"


def test_lookup_keeps_unknown_unless_the_map_names_255():
    labels = LabelSet.from_names(["liver", "spleen"])
    table = label_lookup(labels, {5: "liver", 1: "spleen"})
    assert table[5] == 1 and table[1] == 2 and table[UNKNOWN_LABEL] == UNKNOWN_LABEL and table[2] == 0
    assert label_lookup(labels, {255: "liver"})[UNKNOWN_LABEL] == 1     # a dataset whose 255 is an organ


def test_unknown_voxels_leave_the_candidate_region_and_the_batches(tmp_path, monkeypatch):
    """A phantom whose first organ is half unknown: the trainer's C1 loses exactly those voxels,
    no batch carries 255 or weighs a voxel that was unknown, and training still runs."""
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.trainer import StageTrainer, train_run

    cases = write_phantom_cases(tmp_path / "data", seeds=[3], size=(32, 32, 24), spacing=(8.0, 8.0, 8.0))
    lab = sitk.ReadImage(cases[0]["label"])
    arr = sitk.GetArrayFromImage(lab)
    organ = arr == 1
    unknown = organ & (np.indices(arr.shape)[2] < np.median(np.nonzero(organ)[2]))
    assert 0 < unknown.sum() < organ.sum()
    arr[unknown] = UNKNOWN_LABEL
    marked = sitk.GetImageFromArray(arr)
    marked.CopyInformation(lab)
    sitk.WriteImage(marked, cases[0]["label"])
    cfg = parse_config(small_config(cases, train=["ph3"], val=[], iterations=3, patch=(16, 16, 16)), tmp_path)
    seen: dict[str, list] = {"masks": [], "labels": [], "y": [], "w": []}
    real_init, real_batch = StageTrainer.__init__, StageTrainer.make_batch

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["masks"] += self.train_masks
        seen["labels"] += [np.asarray(c.label) for c in self.train_cases]
        seen["c1"] = [np.asarray(c.c1) for c in self.train_cases]

    def spy_batch(self):
        x, y, w = real_batch(self)
        seen["y"].append(y)
        seen["w"].append(w)
        return x, y, w

    monkeypatch.setattr(StageTrainer, "__init__", spy_init)
    monkeypatch.setattr(StageTrainer, "make_batch", spy_batch)
    train_run(cfg, tmp_path / "run", progress=False, export=False)
    mask, label, c1 = seen["masks"][0], seen["labels"][0], seen["c1"][0]
    assert (label == UNKNOWN_LABEL).sum() > 0                   # the lookup kept the unknown voxels
    assert not (mask & (label == UNKNOWN_LABEL)).any()
    assert mask.sum() == (c1 & (label != UNKNOWN_LABEL)).sum()
    assert all(int(y.max()) < cfg.label_set().num_classes for y in seen["y"])
    assert len(seen["w"]) == 3 and all(torch.is_tensor(w) and w.dtype == torch.bool for w in seen["w"])


def test_synthetic_source_marks_what_the_warp_could_not_follow(tmp_path):
    """The registration route with "misregistered": "unknown": an atlas without a spleen, warped onto
    an anatomy with one, gives a training case whose target spleen is 255; "keep" leaves it labelled."""
    from CascadeSegLib.synthesis.source import synthetic_cases
    from CascadeSegLib.train.dataset import Case

    labels = sitk.ReadImage(str(SAMPLE_LABELS))
    no_spleen = tmp_path / "no_spleen_label.nii.gz"
    sitk.WriteImage(sitk.Mask(labels, labels != 1), str(no_spleen))
    atlas = Case("nospleen", SAMPLE_CT, no_spleen)
    spec = {"label_maps": [str(SAMPLE_LABELS)], "per_label_map": 0, "spacing": [6, 6, 6], "table": "default",
            "atlases": ["nospleen"], "misregistered": "unknown"}
    spleen, kidney_l, liver = 1, 3, 5
    (case,) = synthetic_cases(spec, Path, [atlas], tmp_path / "syn", trained=[spleen, kidney_l, liver])
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    target = sitk.GetArrayFromImage(sitk.Resample(labels, sitk.ReadImage(str(case.label)), sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0))
    assert (got[target == spleen] == UNKNOWN_LABEL).all() and (got == liver).sum() > 0.9 * (target == liver).sum()
    (kept,) = synthetic_cases(dict(spec, misregistered="keep"), Path, [atlas], tmp_path / "syn")
    assert kept.label != case.label and not (sitk.GetArrayFromImage(sitk.ReadImage(str(kept.label))) == 255).any()
    with pytest.raises(UserError, match="misregistered"):
        synthetic_cases(dict(spec, misregistered="drop"), Path, [atlas], tmp_path / "syn2")
