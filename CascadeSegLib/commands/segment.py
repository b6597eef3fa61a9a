"""`cascadeseg segment`: segment one CT, a DICOM folder, or a folder of CTs (batch, sharded).

Read top to bottom: the flags; `SegmentJob`, what one run does (what to segment, where to write,
which outputs, options), decided before any work; `run`, which skips finished cases, loads the
model once and hands each case to a `CaseWriter`: check, read, segment, then write every output
of the case together (`StagedOutputs`) or none of them.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Cancelled, UserError
from ..io import OUTPUT_SUFFIXES, same_file
from ..resources import DEFAULT_MODEL

DEVICE_HELP = ("where the networks run: auto (default) takes a CUDA GPU, then Apple's MPS, else the CPU; "
               "cuda or mps fail with a one-line error when that device is missing")
# A name ending like a file type (".png", ".nii.zip"), as opposed to a folder such as "out" or "run_2".
_LOOKS_LIKE_FILE = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("segment", help="segment CT images with a cascade model",
                              description="Segment a CT (file or DICOM folder) or every CT in a folder.")
    p.add_argument("input", help="CT file (.nii.gz, .nrrd, .mha), DICOM folder, or a folder of CTs")
    p.add_argument("-o", "--output", required=True,
                   help="output folder, or a file (.seg.nrrd, .nii.gz, .nrrd, .mha) for a single input")
    p.add_argument("--model", default=None, help="installed model name, model folder or .zip "
                   f"(default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help=DEVICE_HELP)
    p.add_argument("--overlap", nargs="?", type=float, const=0.37, default=0.0, metavar="FRACTION",
                   help="overlap stage-2 tiles and average (bare flag: 0.37, each voxel ~4 times)")
    p.add_argument("--stage1-only", action="store_true", help="quick mode: stop after stage 1")
    p.add_argument("--save-probabilities", action="store_true", help="also write class probabilities")
    p.add_argument("--save-candidates", action="store_true", help="also write the C1 and C2 masks")
    p.add_argument("--progress-json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--series-uid", default=None, help="DICOM series to read when a folder holds several")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="batch mode: process only cases i, i+n, ... (0 <= i < n) for job arrays")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (re-segment every case)")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=None,
                   help="skip cases whose outputs all exist (default for an input folder; a single input "
                   "with existing outputs is an error unless this is given)")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="segment even when the image does not look like CT in Hounsfield units")
    p.add_argument("--fusion", default=None, choices=["mean", "vote"],
                   help="2D three-view packages: fuse the views by mean probability or majority vote "
                   "(default: the package's)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call")
    p.add_argument("--no-report", action="store_true", help="skip the report and preview picture")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the memory estimate says the image will not fit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from ..baselines.zhou2016.refine import add_refine_arguments

    add_refine_arguments(p)  # --refine [ORGANS] ...: Zhou et al. refinement (the Slicer module passes it)
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
    return output.name.lower().endswith(OUTPUT_SUFFIXES)


def check_output_name(output: Path) -> None:
    """Refuse `-o out.png` before any work: it is neither a folder nor a segmentation file type."""
    if _output_is_file(output) or output.is_dir() or not _LOOKS_LIKE_FILE.search(output.name):
        return
    raise UserError(f"cannot write {output}: {output.suffix} is not an output type; give a folder, or a file "
                    f"ending in {', '.join(OUTPUT_SUFFIXES)}")


@dataclass(frozen=True)
class SegmentJob:
    """One `cascadeseg segment` run, decided from the command line before any work is done."""

    # What to segment.
    source: str                     # INPUT as given
    inputs: tuple[Path, ...]        # this shard's cases: image files and DICOM folders
    batch: bool                     # INPUT is a folder of CTs: a failed case does not stop the run
    shard: tuple[int, int]          # (i, n) of --shard
    # Where to write.
    output: Path                    # a folder, or one file (single input only)
    single_file: bool
    # Which outputs, besides the label map and the segmentation.
    probabilities: bool             # --save-probabilities
    candidates: bool                # --save-candidates (C1, and C2 for two-stage runs)
    report: bool                    # report and preview, into output folders only (not --no-report)
    # Options.
    skip_existing: bool             # cases whose outputs all exist are skipped
    overwrite: bool                 # --overwrite
    stage1_only: bool
    overlap: float
    series_uid: str | None
    allow_non_ct: bool
    memory_check: bool              # not --no-memory-check
    flags: argparse.Namespace       # as parsed: model, device, fusion, batch size, --refine

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SegmentJob:
        """The job, or a UserError for an output that cannot be written (checked before the inputs)."""
        from .. import io

        output = Path(args.output).expanduser()
        check_output_name(output)
        cases, batch = io.collect_inputs(args.input)
        shard_i, shard_n = parse_shard(args.shard)
        cases = cases[shard_i::shard_n]
        single_file = _output_is_file(output)
        if single_file and len(cases) != 1:
            raise UserError(f"{output} is a file name but there are {len(cases)} inputs; give an output folder")
        if not single_file and output.exists() and not output.is_dir():
            raise UserError(f"output {output} exists and is not a folder; choose a folder or a "
                            ".nii.gz/.seg.nrrd file")
        skip_existing = (batch if args.skip_existing is None else args.skip_existing) and not args.overwrite
        return cls(source=str(args.input), inputs=tuple(cases), batch=batch, shard=(shard_i, shard_n),
                   output=output, single_file=single_file, probabilities=args.save_probabilities,
                   candidates=args.save_candidates, report=not args.no_report, skip_existing=skip_existing,
                   overwrite=args.overwrite, stage1_only=args.stage1_only, overlap=args.overlap,
                   series_uid=args.series_uid, allow_non_ct=args.allow_non_ct,
                   memory_check=not args.no_memory_check, flags=args)

    @property
    def replace_existing(self) -> bool:
        """Outputs may be written over: --overwrite, or --skip-existing redoing a case left incomplete."""
        return self.overwrite or self.skip_existing

    def case_outputs(self, case: str, stage1_only_model: bool = False) -> dict[str, Path]:
        """Every file a case will write, by done-event key."""
        outputs: dict[str, Path] = {}
        if self.single_file:
            key = "segmentation" if self.output.name.lower().endswith(".seg.nrrd") else "labels"
            outputs[key] = self.output
            folder = self.output.parent
        else:
            folder = self.output
            outputs["labels"] = folder / f"{case}_labels.nii.gz"
            outputs["segmentation"] = folder / f"{case}.seg.nrrd"
        if self.probabilities:
            outputs["probabilities"] = folder / f"{case}_probabilities.nii.gz"
        if self.candidates:
            outputs["c1"] = folder / f"{case}_c1.nii.gz"
            if not (self.stage1_only or stage1_only_model):
                outputs["c2"] = folder / f"{case}_c2.nii.gz"
        if self.report and not self.single_file:
            outputs["preview"] = folder / f"{case}_preview.png"
            outputs["report"] = folder / f"{case}_report.json"
            outputs["report_md"] = folder / f"{case}_report.md"
        return outputs

    def outputs_complete(self, case: str) -> bool:
        """Every output this run would write for `case` exists (written together, so complete)."""
        finals = self.case_outputs(case)
        finals.pop("c2", None)  # absent for one-stage models; its presence is not needed to skip
        return all(p.is_file() for p in finals.values())


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..packaging.model import load_model
    from ..progress import BarProgress, JsonProgress

    reporter = JsonProgress() if args.progress_json else BarProgress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        try:
            return _run(args, io, load_model, reporter)
        except MemoryError:
            raise UserError("ran out of memory; close other programs, crop the CT to the abdomen or resample "
                            "it to a coarser spacing, or use a machine with more memory") from None
        except RuntimeError as exc:
            from ..inference.memory import is_out_of_memory

            if not is_out_of_memory(exc):
                raise
            raise UserError("the GPU ran out of memory even with its smallest tiles; use --device cpu, or close "
                            "other programs using the GPU") from None
    except UserError as exc:
        if args.progress_json:
            reporter.emit("error", message=one_line(str(exc)), exit_code=2)
        raise
    except (KeyboardInterrupt, Cancelled):
        reporter.close()  # the bar's line is cleared before main() prints its line
        reporter.emit("cancelled", message="cancelled; no output was written for the unfinished case",
                      exit_code=130)
        raise
    finally:
        reporter.close()


def one_line(text: str) -> str:
    return " ".join(text.split())


def _run(args, io, load_model, reporter) -> int:  # noqa: ANN001 - internal
    from ..batch import BatchSummary

    job = SegmentJob.from_args(args)

    def say(line: str) -> None:  # a line of its own, never glued to a progress bar
        reporter.close()
        print(line, file=sys.stderr)

    def warn(message: str, case: str | None = None) -> None:
        say(f"cascadeseg: warning: {message}")
        reporter.emit("warning", message=message, **({"case": case} if case else {}))

    summary = BatchSummary(shard=job.shard, input=job.source)
    todo = []
    for case_path in job.inputs:
        case = io.case_name(case_path)
        if job.skip_existing and job.outputs_complete(case):
            summary.record(case, "skipped")
            reporter.emit("skipped", case=case, message="outputs exist")
        else:
            todo.append((case_path, case))
    if todo:  # a re-run with every output in place needs no model
        model, segmenter = _load(job, load_model, reporter, warn)
        writer = CaseWriter(job, model, segmenter, reporter, warn)
    timings_of = []
    for case_path, case in todo:
        t0 = time.perf_counter()
        try:
            timings_of.append((case, writer.write(case_path, case)))
            summary.record(case, "done", seconds=time.perf_counter() - t0)
        except UserError as exc:
            if not job.batch:
                raise
            summary.record(case, "failed", one_line(str(exc)), time.perf_counter() - t0)
            say(f"cascadeseg: error: {case}: {one_line(str(exc))}")
            reporter.emit("error", case=case, message=one_line(str(exc)), exit_code=2)
    reporter.close()
    if not args.quiet and not args.progress_json:
        for case, timings in timings_of:
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
            print(f"{case}: {timings['total']:.1f} s ({steps})", file=sys.stderr)
    if not job.batch:
        if summary.count("skipped"):
            print(f"cascadeseg: skipped {job.inputs[0]}: its outputs exist (--overwrite replaces them)",
                  file=sys.stderr)
        return 0
    summary.write(job.output)
    reporter.emit("summary", counts=summary.to_json()["counts"], failures=summary.failed)
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 2 if summary.count("failed") else 0


def _load(job: SegmentJob, load_model, reporter, warn):  # noqa: ANN001, ANN202 - internal
    """The model and the predictor its architecture registered (predictor.py: 3D cascade, 2D three-view)."""
    from ..inference.predictor import make_predictor

    args = job.flags
    model = load_model(args.model)
    extra: dict[str, str] = {}
    if args.fusion is not None:
        if model.architecture != "2d-three-view":
            raise UserError(f"--fusion applies to 2D three-view packages; model {model.name} is a "
                            f"{model.architecture} package (drop --fusion)")
        extra["fusion"] = args.fusion
    segmenter = make_predictor(model, args.device, overlap=job.overlap, stage1_only=job.stage1_only,
                               keep_probabilities=job.probabilities, keep_candidates=job.candidates,
                               batch_size=args.batch_size, progress=reporter, on_warning=warn, **extra)
    return model, segmenter


def check_outputs(outputs: dict[str, Path], case_path: Path, overwrite: bool) -> None:
    """Before any work: never write over the input, existing outputs need --overwrite, the
    destination folder must be writable (the first existing parent, if it does not exist yet)."""
    import os

    for path in outputs.values():
        if same_file(path, case_path):
            raise UserError(f"refusing to write over the input {case_path}; choose another output path")
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a folder; choose another output path")
    existing = [p for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}; pass --overwrite to replace it")
    folder = next(iter(outputs.values())).parent
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write into {folder}: {parent} is not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {folder}: permission denied; choose a writable output folder")


class StagedOutputs:
    """Outputs are written under hidden temporary names and renamed into place together.

    A failure (disk full, an exception, Ctrl-C) while writing any of them deletes the
    temporary files and leaves every existing output exactly as it was.
    """

    def __init__(self, finals: dict[str, Path]) -> None:
        import secrets

        self.token = secrets.token_hex(4)
        self.finals = finals
        self.staged = {k: p.parent / f".tmp-{self.token}-{p.name}" for k, p in finals.items()}

    def __enter__(self) -> StagedOutputs:
        return self

    def commit(self) -> None:
        import os

        for key, tmp in self.staged.items():
            if tmp.exists():
                os.replace(tmp, self.finals[key])

    def __exit__(self, *exc: object) -> None:
        # Our staged files, and the writers' own temporaries of them (".tmp-.tmp-<token>-...").
        folders = {p.parent for p in self.staged.values()}
        leftovers = [p for f in folders if f.is_dir() for p in f.glob(f".tmp-*{self.token}-*")]
        for tmp in set(self.staged.values()) | set(leftovers):
            try:
                tmp.unlink()
            except (FileNotFoundError, IsADirectoryError):
                pass


class CaseWriter:
    """Segments the cases of one job with one loaded model, and writes each case's outputs.

    `write` runs one case start to end: the checks that need no voxel (outputs, header, memory),
    reading, segmenting (and --refine), then every output staged and renamed into place together.
    """

    def __init__(self, job: SegmentJob, model: Any, segmenter: Any, reporter: Any, warn: Any) -> None:
        self.job, self.model, self.segmenter = job, model, segmenter
        self.reporter, self.warn = reporter, warn

    def write(self, case_path: Path, case: str) -> dict[str, float]:
        """Segment `case_path`, write its outputs; the step timings in seconds."""
        from ..baselines.zhou2016.refine import refine_from_args

        t_start = time.perf_counter()
        if len(self.job.inputs) > 1:
            self.reporter.emit("case", case=case, path=str(case_path))
        finals = self.job.case_outputs(case, len(self.model.stages) == 1)
        check_outputs(finals, case_path, self.job.replace_existing)
        image = self._read(case_path, case)
        timings = {"read": time.perf_counter() - t_start}
        result = self.segmenter.segment(image)
        result = refine_from_args(self.job.flags, self.segmenter, image, result)  # no-op without --refine
        timings.update((k, v) for k, v in result.timings.items() if k != "total")
        t_write = time.perf_counter()
        folder = next(iter(finals.values())).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {folder}: {exc.strerror or exc}; choose a writable "
                            "folder") from None
        try:
            self._write_outputs(case, case_path, image, result, finals, timings, t_start, t_write)
        except OSError as exc:  # report/preview writers, os.replace: disk full, permissions, ...
            raise UserError(f"cannot write the outputs to {folder}: {exc.strerror or exc}; check free disk "
                            "space and write permission (existing outputs were left as they were)") from None
        return timings

    def _read(self, case_path: Path, case: str) -> Any:
        """The CT, refused from its header first (not a 3D scalar image, or too big for memory)
        before a single voxel is read."""
        from .. import io
        from ..inference.validation import validate_ct

        job = self.job
        info = io.read_image_info(case_path, series_uid=job.series_uid)
        validate_ct(info, case_path)
        if job.memory_check and _estimable(self.model):
            from ..inference.memory import check_memory

            check_memory(info.size, info.pixel_id, self.model, spacing_xyz=info.spacing, components=info.components,
                         stage1_only=job.stage1_only, overlap=job.overlap, keep_probabilities=job.probabilities,
                         keep_candidates=job.candidates, batch_size=self.segmenter.batch_size,
                         device=str(self.segmenter.device))
        image = io.read_image(case_path, series_uid=job.series_uid, on_warning=lambda m: self.warn(m, case))
        warning = validate_ct(image, allow_non_ct=job.allow_non_ct)
        if warning:
            self.warn(warning, case)
        return image

    def _write_outputs(self, case: str, case_path: Path, image: Any, result: Any, finals: dict[str, Path],
                       timings: dict[str, float], t_start: float, t_write: float) -> None:
        """Write every output under a temporary name, rename them all into place, report `done`."""
        from .. import io

        labelset = self.model.labels
        protect = [case_path]
        outputs = {k: str(v) for k, v in finals.items() if k != "report_md"}  # paths in the done event
        staged = StagedOutputs(finals)
        try:
            with staged:
                tmp = staged.staged
                if "labels" in tmp:
                    io.write_image(result.labels, tmp["labels"], protect=protect)
                if "segmentation" in tmp:
                    io.write_segmentation_nrrd(result.labels, labelset, tmp["segmentation"], protect=protect)
                if "probabilities" in tmp:
                    if result.probabilities is None:
                        raise UserError("probabilities are only kept for two-stage runs; drop --stage1-only")
                    io.write_image(result.probabilities, tmp["probabilities"], protect=protect)
                for key, img in (("c1", result.c1), ("c2", result.c2)):
                    if key in tmp and img is not None:
                        io.write_image(img, tmp[key], protect=protect)
                    elif key in tmp:
                        outputs.pop(key, None)
                timings["write"] = time.perf_counter() - t_write
                if "report" in tmp:
                    self._write_report(case, image, result, outputs, timings, t_start, tmp)
                staged.commit()
        except UserError as exc:  # name the output the user asked for, not our temporary file
            text = str(exc)
            for key, path in staged.staged.items():
                text = text.replace(str(path), str(finals[key]))
            raise UserError(text) from None
        timings["total"] = time.perf_counter() - t_start
        self.reporter.emit("done", case=case, outputs=outputs, labels=labelset.to_json(),
                           timings={k: round(v, 3) for k, v in timings.items()}, stats=result.stats)

    def _write_report(self, case: str, image: Any, result: Any, outputs: dict[str, str],
                      timings: dict[str, float], t_start: float, tmp: dict[str, Path]) -> None:
        from ..preview import render_preview
        from ..report import build_report, write_report

        model, labelset = self.model, self.model.labels
        render_preview(image, result.labels, labelset, tmp["preview"])
        timings["total"] = time.perf_counter() - t_start
        info_model = {"name": model.name, "version": model.version, "path": str(model.root)}
        checked = result.stats.get("atlas_prior_used")
        report = build_report(case, image, result.labels, labelset, timings, info_model, outputs,
                              result.stats, str(self.segmenter.device),
                              [c.to_json() for c in result.atlas_conflicts] if checked else None)
        report["outputs"] = outputs
        write_report(report, labelset, tmp["report"], tmp["report_md"])


def _estimable(model) -> bool:  # noqa: ANN001
    """The memory estimate knows 3D cascades (3 spacings, 3D tiles); other package kinds skip it."""
    try:
        return all(len(s.spacing) == 3 and len(s.tile) == 3 for s in model.stages)
    except (AttributeError, TypeError):
        return False
