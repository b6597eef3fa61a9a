"""One case-naming rule, `io.case_name`: every place that names a case after its input file or
DICOM folder gives the same name for the same input, on real files of each kind.

The places: `segment` (one input, and a folder of them in batch mode, with its summary),
`evaluate`'s case matching (`case_key`, `list_cases`, `match_ct_cases`), the corrections store
and the training case lists. Dots inside a name stay (`ct.v2.nii.gz` is case `ct.v2`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from CascadeSegLib import io
from CascadeSegLib.cli import main
from CascadeSegLib.corrections import add_correction
from CascadeSegLib.evaluation import case_key, list_cases, match_ct_cases
from CascadeSegLib.labels import LabelSet
from CascadeSegLib.train.dataset import discover_cases

FILES = {"ct.v2.nii.gz": "ct.v2", "patient_3.nii": "patient_3", "Scan.B.nrrd": "Scan.B", "case01.mha": "case01"}
SEGMENTATION = ("edited.seg.nrrd", "edited")   # a Slicer segmentation: a reference, never a CT input
DICOM = ("dicom.case7", "dicom.case7")          # a DICOM folder is named as it is, dots and all
LABELS = LabelSet.from_names(["liver"])


def small_ct() -> sitk.Image:
    arr = np.linspace(-200, 300, 6 * 7 * 8).reshape(6, 7, 8).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    return img


def label_map_on(ct: sitk.Image) -> sitk.Image:
    lab = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(ct)
    lab[1:3, 1:3, 1:2] = 1
    return lab


def make_inputs(tmp_path: Path, dicom_slab_dir: Path) -> tuple[Path, dict[Path, str]]:
    """A folder of CTs (every file kind and a DICOM folder); {path: expected case name}."""
    cts = tmp_path / "cts"
    cts.mkdir()
    expected = {}
    for name, case in FILES.items():
        sitk.WriteImage(small_ct(), str(cts / name))
        expected[cts / name] = case
    shutil.copytree(dicom_slab_dir, cts / DICOM[0])
    expected[cts / DICOM[0]] = DICOM[1]
    return cts, expected


def test_one_rule_names_each_input_alike_everywhere(tmp_path, dicom_slab_dir, capsys, monkeypatch):
    monkeypatch.setenv("CASCADESEG_MODELS", str(tmp_path / "models"))
    cts, expected = make_inputs(tmp_path, dicom_slab_dir)
    seg = tmp_path / "refs_seg" / SEGMENTATION[0]
    seg.parent.mkdir()
    io.write_segmentation_nrrd(label_map_on(small_ct()), LABELS, seg)

    # The rule itself, on every kind of input.
    assert {p: io.case_name(p) for p in expected} == expected
    assert io.case_name(seg) == SEGMENTATION[1] == case_key(seg)
    assert sorted(io.case_name(p) for p in io.find_images(cts)) == sorted(expected.values())

    # segment: the outputs it looks for are named after the case (all present, so it skips
    # without a model, and says which case it skipped).
    out = tmp_path / "out"
    out.mkdir()
    for case in expected.values():
        (out / f"{case}_labels.nii.gz").touch()
        (out / f"{case}.seg.nrrd").touch()
    for path, case in expected.items():
        assert main(["segment", str(path), "-o", str(out), "--skip-existing", "--no-report", "--progress-json"]) == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["case"] for e in events if e["event"] == "skipped"] == [case]
    assert main(["segment", str(cts), "-o", str(out), "--no-report", "--progress-json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(e["case"] for e in events if e["event"] == "skipped") == sorted(expected.values())
    summary = json.loads(next(out.glob("cascadeseg-summary-*.json")).read_text())
    assert sorted(summary["cases"]) == sorted(expected.values())

    # evaluate: predictions/references by file name, and CTs paired with their references.
    refs = tmp_path / "refs"
    refs.mkdir()
    for path, case in expected.items():
        assert case_key(path) == case
        sitk.WriteImage(label_map_on(io.read_image(path)), str(refs / f"{case}.nii.gz"))
    assert set(list_cases(cts)) == set(FILES.values())
    assert list_cases(seg.parent) == {SEGMENTATION[1]: seg}
    pairs, extra_ct, extra_ref = match_ct_cases(cts, refs)
    assert {c: ct for c, ct, _ in pairs} == {case: path for path, case in expected.items()}
    assert extra_ct == extra_ref == []

    # training: images and label maps paired by case name.
    found, _ = discover_cases({"images": str(cts), "labels": str(refs)}, Path)
    assert {c.name: c.image for c in found} == {case: path for path, case in expected.items()}

    # the corrections store: a correction is stored under its CT's case name.
    for path, case in expected.items():
        ct = io.read_image(path)
        lab = tmp_path / f"corr-{case}.nii.gz"
        sitk.WriteImage(label_map_on(ct), str(lab))
        assert add_correction("m", LABELS, path, lab, root=tmp_path / "store").id == case


def test_nnunet_channel_ending_is_dropped_where_training_data_is_named(tmp_path):
    """`<case>_0000.nii.gz` (nnU-Net's first channel) is case `<case>_0000` for segment and
    evaluate, but `<case>` in training and in the corrections store, which feed training."""
    ct = tmp_path / "img_0000.nii.gz"
    sitk.WriteImage(small_ct(), str(ct))
    lab = tmp_path / "lab.nii.gz"
    sitk.WriteImage(label_map_on(small_ct()), str(lab))
    assert io.case_name(ct) == case_key(ct) == "img_0000"
    assert add_correction("m", LABELS, ct, lab, root=tmp_path / "store").id == "img"
