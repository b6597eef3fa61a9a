"""The bundled demonstration model: intact, small, documented, retrainable from its config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "Resources" / "Models" / "abdomen-ct-demo"
CONFIG = REPO / "configs" / "abdomen-ct-demo.json"


def test_bundled_model_is_intact_small_and_documented():
    from CascadeSegLib.labels import DEFAULT_ORGANS
    from CascadeSegLib.packaging.model import ModelPackage

    pkg = ModelPackage.load(MODEL)
    pkg.verify()
    assert pkg.labels.names == list(DEFAULT_ORGANS)
    assert [s.spacing for s in pkg.stages] == [(6.0, 6.0, 6.0), (3.0, 3.0, 3.0)]
    assert pkg.window == (-200.0, 300.0) and pkg.normalization == "window01"
    assert pkg.body_threshold_hu == -500.0 and pkg.dilation_radius == 3
    size = sum(p.stat().st_size for p in MODEL.iterdir() if p.is_file())
    assert size < 25 * 1024 * 1024
    prov = pkg.provenance
    assert "configs/abdomen-ct-demo.json" in prov["command"]
    held_out = prov["held_out_dice"]
    assert held_out["case"] == "dicom_slab" and 0.0 <= held_out["dice"]["liver"] <= 1.0
    card = (MODEL / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needle in ("demonstration", "cascadeseg train configs/abdomen-ct-demo.json", "dicom_slab", "BTCV", "AMOS",
                   "TotalSegmentator", "Pancreas-CT", "training data"):
        assert needle in card, needle


def test_training_config_describes_the_bundled_model():
    from CascadeSegLib.packaging.model import ModelPackage
    from CascadeSegLib.train.config import load_config

    cfg = load_config(CONFIG)
    pkg = ModelPackage.load(MODEL)
    assert cfg.name == pkg.name and cfg.labels == pkg.labels.names
    for stage, spec in zip(cfg.stages, pkg.stages):
        assert stage.spacing == spec.spacing and stage.tile == spec.tile and stage.network == spec.network
    # The slab is held out: never trained on, and not used to pick checkpoints either.
    assert "dicom_slab" in [c["name"] for c in cfg.data["cases"]]
    assert "dicom_slab" not in cfg.data["split"]["train"] and "dicom_slab" not in cfg.data["split"].get("val", [])


def test_bundled_model_segments_the_held_out_dicom_slab(dicom_slab_dir, dicom_slab_seg_path):
    from CascadeSegLib.inference.cascade import Segmenter
    from CascadeSegLib.io import read_image
    from CascadeSegLib.packaging.model import ModelPackage

    image = read_image(dicom_slab_dir)
    result = Segmenter(ModelPackage.load(MODEL), device="cpu").segment(image)
    labels = result.labels
    assert labels.GetSize() == image.GetSize() and labels.GetOrigin() == image.GetOrigin()
    assert labels.GetSpacing() == image.GetSpacing() and labels.GetDirection() == image.GetDirection()
    seg = sitk.Resample(sitk.ReadImage(str(dicom_slab_seg_path)), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    truth_liver = sitk.GetArrayFromImage(seg) == 5                      # TotalSegmentator's liver id
    pred_liver = sitk.GetArrayFromImage(labels) == 1
    dice = 2 * np.sum(truth_liver & pred_liver) / (truth_liver.sum() + pred_liver.sum())
    provenance = json.loads((MODEL / "model.json").read_text(encoding="utf-8"))["provenance"]
    recorded = provenance["held_out_dice"]["dice"]["liver"]
    assert abs(dice - recorded) < 0.02                                  # the model card's number is reproducible
