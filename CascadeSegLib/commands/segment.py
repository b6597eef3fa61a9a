"""`cascadeseg segment`: segment one CT, a DICOM folder, or a folder of CTs (batch, sharded)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import UserError

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("segment", help="segment CT images with a cascade model",
                              description="Segment a CT (file or DICOM folder) or every CT in a folder.")
    p.add_argument("input", help="CT file (.nii.gz, .nrrd, .mha), DICOM folder, or a folder of CTs")
    p.add_argument("-o", "--output", required=True,
                   help="output folder, or a file (.seg.nrrd, .nii.gz, .nrrd, .mha) for a single input")
    p.add_argument("--model", default=None, help="installed model name, model folder or .zip "
                   "(default: the bundled abdomen-ct-demo)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--overlap", nargs="?", type=float, const=0.37, default=0.0, metavar="FRACTION",
                   help="overlap stage-2 tiles and average (bare flag: 0.37, each voxel ~4 times)")
    p.add_argument("--stage1-only", action="store_true", help="quick mode: stop after stage 1")
    p.add_argument("--save-probabilities", action="store_true", help="also write class probabilities")
    p.add_argument("--save-candidates", action="store_true", help="also write the C1 and C2 masks")
    p.add_argument("--progress-json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--series-uid", default=None, help="DICOM series to read when a folder holds several")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="batch mode: process only cases i, i+n, ... (0 <= i < n) for job arrays")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="segment even when the image does not look like CT in Hounsfield units")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call")
    p.add_argument("--no-report", action="store_true", help="skip the report and preview picture")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _output_is_file(output: Path) -> bool:
    return output.name.lower().endswith(IMAGE_SUFFIXES)


def check_looks_like_ct(image: sitk.Image, allow: bool) -> str | None:
    """A one-line warning when the intensities do not look like CT in HU (None if they do)."""
    arr = sitk.GetArrayViewFromImage(image)
    step = max(1, arr.size // 2_000_000)
    sample = np.asarray(arr).ravel()[::step]
    lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 0.0)
    reason = None
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        reason = "it is 8-bit data"
    elif float(sample.max(initial=0)) == float(sample.min(initial=0)):
        reason = "every voxel has the same value"
    elif lo > -300:
        reason = f"it has no air (1st percentile {lo:.0f}, CT air is about -1000 HU)"
    elif hi < 0:
        reason = f"it has no soft tissue (99th percentile {hi:.0f} HU)"
    if reason is None:
        return None
    message = f"the image does not look like CT in Hounsfield units: {reason}"
    if not allow:
        raise UserError(message + "; pass --allow-non-ct to segment it anyway")
    return message


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..cascade import Segmenter
    from ..model import load_model
    from ..progress import BarProgress, JsonProgress

    reporter = JsonProgress() if args.progress_json else BarProgress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        return _run(args, io, Segmenter, load_model, reporter)
    except UserError as exc:
        if args.progress_json:
            reporter.emit("error", message=str(exc), exit_code=2)
        raise
    finally:
        reporter.close()


def _run(args, io, Segmenter, load_model, reporter) -> int:  # noqa: ANN001 - internal
    source = Path(args.input).expanduser()
    output = Path(args.output).expanduser()
    if not source.exists():
        raise UserError(f"input {source} does not exist; give a CT file, a DICOM folder or a folder of CTs")
    batch = source.is_dir() and not io.is_dicom_folder(source)
    cases = io.find_images(source) if batch else [source]
    if batch and not cases:
        raise UserError(f"no CT images (.nii.gz, .nrrd, .mha or DICOM folders) found in {source}")
    shard_i, shard_n = parse_shard(args.shard)
    cases = cases[shard_i::shard_n]
    single_file = _output_is_file(output)
    if single_file and len(cases) != 1:
        raise UserError(f"{output} is a file name but there are {len(cases)} inputs; give an output folder")
    if not single_file and output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder; choose a folder or a .nii.gz/.seg.nrrd file")

    model = load_model(args.model)
    segmenter = Segmenter(model, args.device, overlap=args.overlap, stage1_only=args.stage1_only,
                          keep_probabilities=args.save_probabilities, keep_candidates=args.save_candidates,
                          batch_size=args.batch_size, progress=reporter)
    failures = 0
    summary = []
    for case_path in cases:
        case = io.case_name(case_path)
        try:
            summary.append(_segment_case(args, io, segmenter, model, case_path, case, output, single_file,
                                         reporter, len(cases) > 1))
        except UserError as exc:
            if len(cases) == 1:
                raise
            failures += 1
            print(f"cascadeseg: error: {case}: {exc}", file=sys.stderr)
            reporter.emit("error", case=case, message=str(exc), exit_code=2)
    if not args.quiet and not args.progress_json:
        for case, timings in summary:
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
            print(f"{case}: {timings['total']:.1f} s ({steps})", file=sys.stderr)
    if failures:
        print(f"cascadeseg: {failures} of {len(cases)} cases failed", file=sys.stderr)
        return 2
    return 0


def _segment_case(args, io, segmenter, model, case_path: Path, case: str, output: Path, single_file: bool,
                  reporter, announce: bool) -> tuple[str, dict[str, float]]:  # noqa: ANN001
    t_start = time.perf_counter()
    if announce:
        reporter.emit("case", case=case, path=str(case_path))
    image = io.read_image(case_path, series_uid=args.series_uid)
    from ..cascade import check_ct

    check_ct(image)
    warning = check_looks_like_ct(image, args.allow_non_ct)
    if warning:
        print(f"cascadeseg: warning: {warning}", file=sys.stderr)
    t_read = time.perf_counter() - t_start
    result = segmenter.segment(image)
    t_write0 = time.perf_counter()
    protect = [case_path]
    outputs: dict[str, str] = {}
    labelset = model.labels
    if single_file:
        if output.name.lower().endswith(".seg.nrrd"):
            io.write_segmentation_nrrd(result.labels, labelset, output, overwrite=args.overwrite, protect=protect)
            outputs["segmentation"] = str(output)
        else:
            io.write_image(result.labels, output, overwrite=args.overwrite, protect=protect)
            outputs["labels"] = str(output)
        folder, stem = output.parent, case
    else:
        folder, stem = output, case
        folder.mkdir(parents=True, exist_ok=True)
        outputs["labels"] = str(io.write_image(result.labels, folder / f"{stem}_labels.nii.gz",
                                               overwrite=args.overwrite, protect=protect))
        outputs["segmentation"] = str(io.write_segmentation_nrrd(result.labels, labelset, folder / f"{stem}.seg.nrrd",
                                                                 overwrite=args.overwrite, protect=protect))
    if result.probabilities is not None:
        outputs["probabilities"] = str(io.write_image(result.probabilities, folder / f"{stem}_probabilities.nii.gz",
                                                      overwrite=args.overwrite, protect=protect))
    if result.c1 is not None:
        outputs["c1"] = str(io.write_image(result.c1, folder / f"{stem}_c1.nii.gz", overwrite=args.overwrite,
                                           protect=protect))
    if result.c2 is not None:
        outputs["c2"] = str(io.write_image(result.c2, folder / f"{stem}_c2.nii.gz", overwrite=args.overwrite,
                                           protect=protect))
    timings = {"read": t_read, **{k: v for k, v in result.timings.items() if k != "total"}}
    timings["write"] = time.perf_counter() - t_write0
    if not args.no_report and not single_file:
        from ..preview import render_preview
        from ..report import build_report, write_report

        outputs["preview"] = str(render_preview(image, result.labels, labelset, folder / f"{stem}_preview.png"))
        timings["total"] = time.perf_counter() - t_start
        info = {"name": model.name, "version": model.version, "path": str(model.root)}
        report = build_report(case, image, result.labels, labelset, timings, info, outputs, result.stats,
                              str(segmenter.device))
        outputs["report"] = str(folder / f"{stem}_report.json")
        report["outputs"] = outputs
        write_report(report, labelset, folder / f"{stem}_report.json", folder / f"{stem}_report.md")
    timings["total"] = time.perf_counter() - t_start
    reporter.emit("done", case=case, outputs=outputs, labels=labelset.to_json(),
                  timings={k: round(v, 3) for k, v in timings.items()}, stats=result.stats)
    return case, timings
