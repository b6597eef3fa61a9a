"""`cascadeseg synth LABELMAP... -o OUT [--n N] [--seed S]`: synthetic CTs from label maps.

Each label map gives N CTs in HU (`<case>_synth<i>.nii.gz`) with their deformed label maps
(`<case>_synth<i>_label.nii.gz`, same values, same grid as the CT) and `<case>_synth<i>.json`
(seed, contrast phase, crop). TotalSegmentator label maps work as they are; any other label
map needs `--structures FILE`, a JSON object {"value": "structure name or tissue"} (tissues:
see `CascadeSegLib.synthesis.TISSUES`). The same seed always gives the same images.

`--atlas CT LABELS` takes the registration route instead: the real labelled CT is warped onto
each label map's anatomy (`<case>_from_<atlas>.nii.gz` and `_label.nii.gz`, the atlas's labels
warped; the JSON gives their Dice against the label map). Real texture, new anatomy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="make synthetic CTs (HU) from label maps, for training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labelmaps", nargs="+", metavar="LABELMAP", help="label map files (.nii.gz, .nrrd, .mha)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1, help="CTs per label map (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="output grid spacing in mm (default: the label map's grid)")
    p.add_argument("--phase", choices=("native", "arterial", "portal", "delayed"),
                   help="contrast phase (default: drawn at random per CT)")
    p.add_argument("--structures", default=None, help="JSON {value: structure name or tissue} for label maps "
                                                      "that are not TotalSegmentator's")
    p.add_argument("--table", default=None, help="intensity table JSON (default: the shipped one, measured on "
                                                 "the sample CT and TotalSegmentator s0009)")
    p.add_argument("--atlas", nargs=2, metavar=("CT", "LABELS"), default=None,
                   help="registration route: warp this real CT and its label map onto each LABELMAP")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import SimpleITK as sitk

    from ..errors import UserError
    from ..io import case_name, read_image, write_image
    from ..synthesis import (
        IntensityTable,
        SynthSettings,
        default_table_path,
        structure_names,
        synthesize,
        with_phase,
    )
    from ..synthesis.tissues import require_known_structures

    if args.n < 1:
        raise UserError("--n must be at least 1")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; -o takes a folder")
    table_path = Path(args.table) if args.table else default_table_path()
    try:
        table = IntensityTable.load(table_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the intensity table {table_path} ({exc})") from None
    names = structure_names(args.structures)
    settings = SynthSettings(spacing=tuple(args.spacing) if args.spacing else None)
    if args.phase:
        settings = with_phase(settings, args.phase)
    jobs = []
    for lm in args.labelmaps:
        path = Path(lm)
        labels = read_image(path)
        if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
            raise UserError(f"{path} is not a 3D label map; give one scalar 3D label image per file")
        if labels.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                       sitk.sitkUInt32, sitk.sitkInt32):
            raise UserError(f"{path} holds {labels.GetPixelIDTypeAsString()} values; a label map holds integers")
        values = np.unique(sitk.GetArrayViewFromImage(labels)).tolist()
        require_known_structures(names, values, path,
                                 "pass --structures with a JSON {value: structure name or tissue}")
        if len(values) < 2:
            raise UserError(f"{path} is empty (no labelled voxel); give a label map with structures")
        jobs.append((path, labels))
    if args.atlas:
        return _transfer(args, jobs, names, table, out)
    targets = [(path, labels, i, out / f"{case_name(path)}_synth{i}") for path, labels in jobs for i in range(args.n)]
    existing = [str(t[3]) + ".nii.gz" for t in targets if Path(str(t[3]) + ".nii.gz").exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists (and {len(existing) - 1} more); pass --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    for k, (path, labels, _, stem) in enumerate(targets):
        seed = args.seed * 100003 + k
        result = synthesize(labels, names, table, seed=seed, settings=settings)
        write_image(result.ct, Path(str(stem) + ".nii.gz"), overwrite=True)
        write_image(result.labels, Path(str(stem) + "_label.nii.gz"), overwrite=True)
        atomic_write(Path(str(stem) + ".json"), json.dumps({"label_map": str(path), **result.info}, indent=1) + "\n")
        print(f"{stem}.nii.gz: {result.info['phase']} phase, size {'x'.join(map(str, result.ct.GetSize()))}")
    return 0


def _transfer(args, jobs, names, table, out: Path) -> int:
    """The registration route: one warped atlas per label map."""
    import numpy as np
    import SimpleITK as sitk

    from ..errors import UserError
    from ..io import case_name, read_image, write_image
    from ..synthesis.tissues import require_known_structures
    from ..synthesis.transfer import TransferSettings, transfer

    ct_path, lab_path = (Path(p) for p in args.atlas)
    atlas_ct, atlas_lab = read_image(ct_path), read_image(lab_path)
    if atlas_ct.GetSize() != atlas_lab.GetSize():
        raise UserError(f"--atlas: {ct_path} and {lab_path} have different sizes; give a CT and its own label map")
    require_known_structures(names, np.unique(sitk.GetArrayViewFromImage(atlas_lab)).tolist(), lab_path,
                             "pass --structures with a JSON {value: structure name or tissue}")
    settings = TransferSettings(spacing=tuple(args.spacing)) if args.spacing else TransferSettings()
    stems = [out / f"{case_name(path)}_from_{case_name(ct_path)}" for path, _ in jobs]
    existing = [str(s) + ".nii.gz" for s in stems if Path(str(s) + ".nii.gz").exists()]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists (and {len(existing) - 1} more); pass --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    for (path, labels), stem in zip(jobs, stems):
        result = transfer(atlas_ct, atlas_lab, labels, names, table, settings)
        write_image(result.ct, Path(str(stem) + ".nii.gz"), overwrite=True)
        write_image(result.labels, Path(str(stem) + "_label.nii.gz"), overwrite=True)
        atomic_write(Path(str(stem) + ".json"), json.dumps({"label_map": str(path), "atlas": str(ct_path),
                                                           **result.info}, indent=1) + "\n")
        dice = result.info["dice_to_target"]
        shown = ", ".join(f"{k} {dice[k]:.2f}" for k in ("liver", "spleen", "kidney_right", "kidney_left") if k in dice)
        print(f"{stem}.nii.gz: size {'x'.join(map(str, result.ct.GetSize()))}; Dice to the label map: {shown}")
    return 0
