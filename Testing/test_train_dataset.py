"""Training data: label remapping, dataset.json / folders / splits, and the resampled cache.

The DICOM slab's label map has its y axis flipped relative to the DICOM series; the cache
must put the labels on the image's own stage grid in physical space.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from CascadeSegLib.errors import UserError
from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet


def test_totalsegmentator_table_maps_ids_to_our_labels():
    from CascadeSegLib.train.dataset import label_lookup

    ours = LabelSet.from_names(DEFAULT_ORGANS)
    table = label_lookup(ours, None, None, "totalsegmentator")
    expected = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 6: "stomach",
                7: "pancreas", 52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"}
    for src, name in expected.items():
        assert table[src] == ours.by_name(name).value
    assert table[0] == 0 and table[117] == 0 and table[10] == 0         # lungs etc. become background
    with pytest.raises(UserError, match="not in the config's labels"):
        label_lookup(ours, {"9": "brain"})


def test_dicom_slab_labels_land_on_the_image_grid_in_physical_space(tmp_path, dicom_slab_dir, dicom_slab_seg_path):
    from CascadeSegLib.inference import preprocess
    from CascadeSegLib.io import read_image
    from CascadeSegLib.train.dataset import Case, build_cached_case, label_lookup

    ours = LabelSet.from_names(DEFAULT_ORGANS)
    table = label_lookup(ours, None, None, "totalsegmentator")
    case = Case("slab", dicom_slab_dir, dicom_slab_seg_path)
    cached = build_cached_case(case, tmp_path, (3.0, 3.0, 3.0), (-200, 300), "window01", -500.0, table)
    image = read_image(dicom_slab_dir)
    ref = preprocess.grid_for_spacing(image, (3.0, 3.0, 3.0))
    g = cached.geometry
    assert tuple(g["size"]) == ref.GetSize() == (167, 167, 13)
    assert tuple(g["origin"]) == ref.GetOrigin() and tuple(g["spacing"]) == ref.GetSpacing()
    # The DICOM series (identity direction) is trained on in the model orientation, like NIfTI CTs.
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert tuple(g["direction"]) == ref.GetDirection() == preprocess.MODEL_DIRECTION
    seg = sitk.ReadImage(str(dicom_slab_seg_path))
    assert seg.GetDirection() != image.GetDirection()                  # the flipped y axis
    expected = table[sitk.GetArrayFromImage(sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))]
    assert np.array_equal(np.asarray(cached.label), expected)
    # Labels sit on the right tissue: the contrast-filled aorta is bright, the liver soft tissue.
    img = np.asarray(cached.image, dtype=np.float32) * 500 - 200        # back to HU (window01)
    lab = np.asarray(cached.label)
    assert img[lab == ours.by_name("aorta").value].mean() > 120
    assert 40 < img[lab == ours.by_name("liver").value].mean() < 160
    flipped = lab[:, ::-1, :]                                           # what ignoring the geometry would give
    assert img[flipped == ours.by_name("aorta").value].mean() < 100
    # The body mask C1 covers the organs; the cache is reused and memory-mapped.
    assert np.asarray(cached.c1)[lab > 0].mean() > 0.99
    stamp = (cached.folder / "image.npy").stat().st_mtime_ns
    again = build_cached_case(case, tmp_path, (3.0, 3.0, 3.0), (-200, 300), "window01", -500.0, table)
    assert again.folder == cached.folder and (again.folder / "image.npy").stat().st_mtime_ns == stamp
    assert isinstance(again.image, np.memmap) and again.image.dtype == np.float16


def _tiny_case(folder, name, value=1):
    img = sitk.Image([8, 8, 4], sitk.sitkInt16)
    lab = sitk.Image([8, 8, 4], sitk.sitkUInt8)
    lab[2, 2, 1] = value
    folder.mkdir(parents=True, exist_ok=True)
    return img, lab


def test_nnunet_and_decathlon_dataset_json(tmp_path):
    from CascadeSegLib.train.dataset import discover_cases, label_lookup, read_split

    ours = LabelSet.from_names(["liver", "spleen"])
    nn = tmp_path / "nnunet"
    for sub in ("imagesTr", "labelsTr"):
        (nn / sub).mkdir(parents=True)
    for name in ("a_001", "a_002"):
        img, lab = _tiny_case(nn, name)
        sitk.WriteImage(img, str(nn / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(lab, str(nn / "labelsTr" / f"{name}.nii.gz"))
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                 "labels": {"background": 0, "spleen": 1, "liver": 2},
                                                 "numTraining": 2}))
    cases, names = discover_cases({"dataset_json": str(nn / "dataset.json")}, lambda p: tmp_path / p)
    assert [c.name for c in cases] == ["a_001", "a_002"] and names == {1: "spleen", 2: "liver"}
    table = label_lookup(ours, None, names)
    assert table[1] == 2 and table[2] == 1                      # matched by name, not by number
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a_001"], "val": ["a_002"]}, {"train": ["a_002"], "val": ["a_001"]}]))
    tr, va = read_split({"split": str(splits), "fold": 1}, lambda p: p, cases)
    assert [c.name for c in tr] == ["a_002"] and [c.name for c in va] == ["a_001"]
    with pytest.raises(UserError, match="both train and val"):
        read_split({"split": {"train": ["a_001"], "val": ["a_001"]}}, lambda p: p, cases)

    msd = tmp_path / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr"):
        (msd / sub).mkdir(parents=True)
    img, lab = _tiny_case(msd, "spleen_1")
    sitk.WriteImage(img, str(msd / "imagesTr" / "spleen_1.nii.gz"))
    sitk.WriteImage(lab, str(msd / "labelsTr" / "spleen_1.nii.gz"))
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}, "training": [
        {"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}]}))
    cases, names = discover_cases({"dataset_json": str(msd / "dataset.json")}, lambda p: tmp_path / p)
    assert [c.name for c in cases] == ["spleen_1"] and names == {1: "spleen"}
    assert label_lookup(ours, None, names)[1] == 2


def test_folder_pairs_and_config_errors(tmp_path):
    from CascadeSegLib.train.config import parse_config
    from CascadeSegLib.train.dataset import discover_cases

    for sub in ("img", "lab"):
        (tmp_path / sub).mkdir()
    img, lab = _tiny_case(tmp_path, "c1")
    sitk.WriteImage(img, str(tmp_path / "img" / "c1_0000.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "lab" / "c1.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "img" / "unlabelled.nii.gz"))
    cases, _ = discover_cases({"images": "img", "labels": "lab"}, lambda p: tmp_path / p)
    assert [c.name for c in cases] == ["c1"]
    base = {"name": "x", "labels": ["liver"], "data": {"images": "img", "labels": "lab"},
            "stages": [{"name": "stage1", "spacing": 6, "tile": 48, "patch": 32,
                        "network": {"base_channels": 4, "depth": 3}}]}
    cfg = parse_config(base, tmp_path)
    assert cfg.stages[0].patch_zyx == (32, 32, 32) and cfg.stages[0].network.num_classes == 2
    with pytest.raises(UserError, match="unknown config key"):
        parse_config({**base, "epochs": 3}, tmp_path)
    bad = json.loads(json.dumps(base))
    bad["stages"][0]["patch"] = [30, 32, 32]
    with pytest.raises(UserError, match="does not fit the network"):
        parse_config(bad, tmp_path)
    bad = json.loads(json.dumps(base))
    bad["train"] = {"loss": "focal"}
    with pytest.raises(UserError, match="train.loss"):
        parse_config(bad, tmp_path)
    # a value of the wrong JSON kind is named with the key, before any training starts
    for setting, value, kind in (("lr", "0.01", "a number"), ("iterations", 2.5, "a whole number"),
                                 ("amp", 1, "true or false"), ("checkpoint_minutes", None, "a number"),
                                 ("batch_size", True, "a whole number"), ("optimizer", 3, "a string")):
        bad["train"] = {setting: value}
        with pytest.raises(UserError, match=f"^train.{setting} must be {kind}, got {json.dumps(value)}; fix it"):
            parse_config(bad, tmp_path)
    bad["train"] = {"lr": 1, "weight_decay": 0, "amp": False}       # a whole number is a number
    assert parse_config(bad, tmp_path).stages[0].train.lr == 1
    bad["augment"] = {"enabled": True, "noise_std": "0.1"}
    with pytest.raises(UserError, match='^stage stage1: augment.noise_std must be a number, got "0.1"$'):
        parse_config(bad, tmp_path)
    bad["augment"] = {}
    bad["stages"][0]["network"]["base_channels"] = "4"
    with pytest.raises(UserError, match=r'network.base_channels must be a whole number, got "4"\)$'):
        parse_config(bad, tmp_path)
    # the package settings every model carries: refused at reading, not when the first case is cached
    bad["stages"][0]["network"]["base_channels"] = 4
    for top, message in (({"intensity": {"window": [300, -200]}}, "the intensity window must be two finite HU values"),
                         ({"intensity": {"window": ["-200", 300]}}, 'intensity.window must be a number, got "-200"'),
                         ({"intensity": {"window": "-200,300"}}, "intensity.window must be two HU values"),
                         ({"intensity": {"normalization": "zscore"}}, "unknown intensity normalization 'zscore'"),
                         ({"intensity": 5}, '"intensity" must be an object'),
                         ({"body_threshold_hu": "-500"}, 'body_threshold_hu must be a number, got "-500"'),
                         ({"dilation_radius": 2.5}, "dilation_radius must be a whole number, got 2.5"),
                         ({"dilation_radius": -1}, "dilation_radius must be 0 or more voxels")):
        with pytest.raises(UserError, match=f"^{message}.*; fix it in the config$"):
            parse_config({**bad, **top}, tmp_path)
    good = parse_config({**bad, "intensity": {"window": [-100, 200.5], "normalization": "window11"},
                         "dilation_radius": 0}, tmp_path)
    assert (good.window, good.normalization, good.dilation_radius) == ((-100.0, 200.5), "window11", 0)
