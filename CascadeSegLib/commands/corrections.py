"""`cascadeseg corrections add|list|remove`: the corrected cases a model learns from.

`add` stores a CT with its corrected segmentation (a Segment Editor .seg.nrrd, segments matched
to the model's organs by name or terminology, or a label map in the model's values) under the
models folder; `cascadeseg improve MODEL -o NEW` then fine-tunes on every stored case.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("corrections", help="store corrected segmentations for `cascadeseg improve`",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="corrections_command", metavar="{add,list,remove}")
    sub.required = True

    q = sub.add_parser("add", help="store a CT and its corrected segmentation")
    q.add_argument("ct", help="the CT (image file or DICOM folder) the segmentation was drawn on")
    q.add_argument("segmentation", help="corrected .seg.nrrd (Segment Editor) or label map in the model's values")
    q.add_argument("--model", required=True, help="the model whose mistakes were corrected (name or folder)")
    q.add_argument("--case", dest="case_id", default=None, help="case id (default: the CT's file name)")
    q.add_argument("--reviewed", default=None, metavar="ORGANS",
                   help="comma-separated organs you checked (default: every organ the correction labels); "
                        "the others are left out of the loss")
    q.add_argument("--replace", action="store_true", help="replace a stored case of the same id")
    q.add_argument("--series-uid", default=None, help="DICOM series to read when the folder holds several")
    q.add_argument("--json", action="store_true", help="print the stored case as one JSON line")
    q.set_defaults(func=cmd_add)

    q = sub.add_parser("list", help="the stored corrections of a model")
    q.add_argument("--model", required=True, help="model name or folder")
    q.add_argument("--json", action="store_true", help="print one JSON array")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("remove", help="delete a stored correction")
    q.add_argument("case_id", metavar="CASE", help="case id (see `corrections list`)")
    q.add_argument("--model", required=True, help="model name or folder")
    q.set_defaults(func=cmd_remove)


def _model(name: str):
    from ..packaging.model import load_model

    return load_model(name)


def _row(case) -> dict:
    return {"id": case.id, "model": case.model, "reviewed": list(case.reviewed), "created": case.created,
            "voxels": case.voxels, "folder": str(case.folder), "source": case.source}


def cmd_add(args: argparse.Namespace) -> int:
    from ..corrections import add_correction

    pkg = _model(args.model)
    reviewed = [n.strip() for n in args.reviewed.split(",") if n.strip()] if args.reviewed else None
    case = add_correction(pkg.name, pkg.labels, args.ct, args.segmentation, case_id=args.case_id,
                          reviewed=reviewed, replace=args.replace, series_uid=args.series_uid)
    if args.json:
        print(json.dumps({"event": "done", **_row(case)}))
    else:
        print(f"stored correction {case.id} for {case.model} (reviewed: {', '.join(case.reviewed)}) in {case.folder}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..corrections import list_corrections

    cases = list_corrections(_model(args.model).name)
    if args.json:
        print(json.dumps([_row(c) for c in cases]))
    elif not cases:
        print("no corrections stored; add one with `cascadeseg corrections add CT SEGMENTATION --model NAME`")
    else:
        for c in cases:
            print(f"{c.id}  {c.created}  reviewed: {', '.join(c.reviewed)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from ..corrections import remove_correction

    name = _model(args.model).name
    remove_correction(name, args.case_id)
    print(f"removed correction {args.case_id} of {name}")
    return 0
