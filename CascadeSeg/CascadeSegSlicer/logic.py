"""The only place that knows both MRML and CascadeSegLib: run the CLI, import its result.

Importable with slicer-core alone (no qt, ctk or slicer.util). The scene is touched only
when a run finished successfully: a cancelled or failed run leaves every node as it was,
and the run's temporary folder is always removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .i18n import tr as _
from .parameters import SegmentParameters
from .process import SegmentProcess, python_executable
from .runs import Progress, RunCancelled, RunError, SegmentRun, timed
from .worker import WarmWorker, WorkerJob

__all__ = ["ATTR_INPUT", "ATTR_LABEL_NAME", "ATTR_MODEL", "CascadeSegLogic", "Progress", "RunCancelled",
           "RunError", "SegmentRun", "build_segmentation", "check_input_volume", "library_path",
           "read_labelmap", "release_segmentation", "write_volume"]

log = logging.getLogger(__name__)

#: set to 0 to run every Segment in a fresh one-shot process instead of the warm worker
WORKER_ENV = "CASCADESEG_WORKER"

#: node attributes that tie a result to its input (so a rerun replaces instead of piling up)
ATTR_INPUT = "CascadeSeg.InputVolumeID"
ATTR_MODEL = "CascadeSeg.Model"
ATTR_LABEL_NAME = "CascadeSeg.LabelName"


def library_path() -> Path:
    """Folder that holds the CascadeSegLib package (added to the child's PYTHONPATH)."""
    import importlib.util

    spec = importlib.util.find_spec("CascadeSegLib")
    if spec is None or not spec.origin:
        raise RunError("the CascadeSegLib library is not installed; reinstall the CascadeSeg extension")
    return Path(spec.origin).resolve().parent.parent


class CascadeSegLogic:
    """Start/poll/cancel a segmentation run and turn its result into a segmentation node."""

    def __init__(self, scene: Any = None, python: str | None = None,
                 process_factory: Callable[..., Any] = SegmentProcess,
                 command_prefix: list[str] | None = None, use_worker: bool | None = None) -> None:
        self.scene = scene
        self.python = python or python_executable()
        self.process_factory = process_factory
        # what runs the CLI; tests point this at a fake CLI script
        self.command_prefix = command_prefix
        #: run Segment in a warm `cascadeseg worker` (default, unless CASCADESEG_WORKER=0 or a
        #: custom command prefix, e.g. a fake CLI that does not speak the worker protocol)
        if use_worker is None:
            use_worker = command_prefix is None and os.environ.get(WORKER_ENV, "1").strip() not in ("0", "false", "no")
        self.use_worker = use_worker
        self.worker: WarmWorker | None = None
        #: seconds per handoff step of the latest run (write volume, start process, read labels,
        #: closed surfaces, ...) and the child's own steps as "cli <step>" (benchmarks, the log)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ warm worker
    def prestart_worker(self) -> WarmWorker | None:
        """Start the warm worker in the background unless one is alive (returns at once)."""
        if not self.use_worker:
            return None
        if self.worker is not None and self.worker.usable():
            return self.worker
        try:
            self.worker = WarmWorker(self.cli_command(["worker"]), env=self.child_env()).start()
        except OSError as exc:
            log.warning("could not start the CascadeSeg worker (%s); segmenting in one-shot processes", exc)
            self.worker = None
        return self.worker

    def shutdown_worker(self) -> None:
        """Module closed: let the worker exit (killed if it is running a job)."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()

    def _start_in_worker(self, args: list[str], one_shot: Callable[[], Any]) -> WorkerJob | None:
        """The job in the warm worker; None when there is none to use (then a one-shot runs)."""
        if not self.use_worker:
            return None
        if self.worker is not None and self.worker.usable() and not self.worker.idle():
            return None  # busy with another run (a script running two at once): one-shot
        for _attempt in range(2):  # a worker that died since the last run is replaced once
            worker = self.prestart_worker()
            if worker is None:
                return None
            try:
                return worker.submit(args, fallback=one_shot)
            except BrokenPipeError:
                log.info("the CascadeSeg worker (pid %s) is gone; starting a fresh one", worker.pid)
                self.worker = None
        return None

    def _after_run(self, run: SegmentRun) -> None:
        """A worker that died or was killed (Cancel, crash) is replaced in the background."""
        if isinstance(run.process, WorkerJob) and self.use_worker:
            if self.worker is run.process.worker and not run.process.worker.usable():
                self.worker = None
            self.prestart_worker()

    # ------------------------------------------------------------------ running
    def cli_command(self, args: list[str]) -> list[str]:
        prefix = self.command_prefix or [self.python, "-m", "CascadeSegLib.cli"]
        return list(prefix) + args

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        try:
            lib = str(library_path())
            env["PYTHONPATH"] = os.pathsep.join([lib] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        except RunError:
            pass
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, volume_node: Any, params: SegmentParameters,
              output_node: Any = None) -> SegmentRun:
        """Write the volume to a temp folder and start the CLI on it (returns at once)."""
        check_input_volume(volume_node)
        self.timings = {}
        temp_dir = Path(tempfile.mkdtemp(prefix="CascadeSeg-"))
        try:
            input_path = temp_dir / "input.nrrd"
            with timed(self.timings, "write volume"):
                write_volume(volume_node, input_path)
            out_dir = temp_dir / "out"
            out_dir.mkdir()
            args = params.cli_args(input_path, out_dir)
            command = self.cli_command(args)
            env = self.child_env()

            def one_shot() -> Any:
                log.info("running %s", " ".join(command))
                return self.process_factory(command, env=env, cwd=str(temp_dir)).start()

            t_process = time.monotonic()
            with timed(self.timings, "start process"):
                process = self._start_in_worker(args, one_shot)
                if process is not None:
                    log.info("running in the CascadeSeg worker (pid %s): %s", process.pid, " ".join(args))
                else:
                    process = one_shot()
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return SegmentRun(process, temp_dir, volume_node.GetID(),
                          output_node.GetID() if output_node is not None else None, params, started=t_process)

    def start_cli(self, args: list[str], what: str, temp_dir: Path | None = None, volume_id: str = "",
                  params: SegmentParameters | None = None) -> SegmentRun:
        """Start `cascadeseg ARGS` in a one-shot child process (returns at once); `temp_dir` is
        removed when the run ends (a fresh one without it). Everything the engine does that
        imports torch runs this way, never in Slicer's process."""
        temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="CascadeSeg-"))
        try:
            command = self.cli_command(args)
            log.info("running %s", " ".join(command))
            process = self.process_factory(command, env=self.child_env(), cwd=str(temp_dir)).start()
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return SegmentRun(process, temp_dir, volume_id, None, params, what=what)

    def start_device_detection(self) -> SegmentRun:
        """`cascadeseg devices --json`: its done event says what `--device auto` uses."""
        return self.start_cli(["devices", "--json"], "device detection")

    def start_model_install(self, source: str) -> SegmentRun:
        """`cascadeseg models install SOURCE --progress-json`: download progress, then the installed model."""
        return self.start_cli(["models", "install", source, "--progress-json"], "model install")

    def finish_command(self, run: SegmentRun, cancelled_message: str = "cancelled") -> dict[str, Any]:
        """The `done` event of a run from start_cli once it ended (RunError/RunCancelled otherwise)."""
        try:
            rc = run.process.wait()
            run.poll()
            return run.raise_if_failed(rc, cancelled_message)
        finally:
            run.cleanup()

    def cancel(self, run: SegmentRun) -> None:
        """Kill the process tree and delete the temp folder; the scene is not touched."""
        try:
            run.process.cancel()
        finally:
            run.cleanup()
            self._after_run(run)

    def finish(self, run: SegmentRun) -> Any:
        """After the process ended: import its result (RunError/RunCancelled otherwise)."""
        try:
            rc = run.process.wait()
            run.poll()
            run.is_running()  # notes when it ended, if the caller did not poll
            self.timings["child"] = (run.ended or time.monotonic()) - run.started
            run.raise_if_failed(rc, "segmentation cancelled")
            volume = self.scene.GetNodeByID(run.volume_id)
            if volume is None:
                raise RunError(_("the input volume was removed from the scene while segmenting; "
                                 "load it again and rerun"))
            output = self.scene.GetNodeByID(run.output_id) if run.output_id else None
            done = run.done_events[-1]
            self.timings.update({f"cli {k}": float(v) for k, v in (done.get("timings") or {}).items()})
            node = self.import_result(volume, done, run.params, output)
            log.info("timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
            return node
        finally:
            run.cleanup()
            self._after_run(run)

    def run(self, volume_node: Any, params: SegmentParameters, output_node: Any = None,
            on_progress: Callable[[Progress], None] | None = None,
            timeout_s: float | None = None) -> Any:
        """Blocking run (scripts, self-test): start, poll until done, import."""
        run = self.start(volume_node, params, output_node)
        notify = on_progress or (lambda _p: None)
        try:
            while run.is_running():
                for p in run.new_progress():        # every event: a script sees each stage
                    notify(p)
                if timeout_s is not None and run.elapsed_s > timeout_s:
                    self.cancel(run)
                    raise RunError(f"segmentation took longer than {timeout_s:.0f} s and was stopped")
                time.sleep(0.1)
            run.process.wait()  # also waits for the reader threads: the last events are queued
            for p in run.new_progress():
                notify(p)
        except BaseException:
            self.cancel(run)
            raise
        return self.finish(run)

    # ------------------------------------------------------------------ importing
    def find_previous_result(self, volume_node: Any) -> Any:
        """The segmentation an earlier run made for this volume (reused unless asked not to)."""
        nodes = self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
        found = None
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(ATTR_INPUT) == volume_node.GetID():
                found = node
        return found

    def import_result(self, volume_node: Any, done: dict[str, Any],
                      params: SegmentParameters | None = None, output_node: Any = None) -> Any:
        """Turn a `done` event (label map + label list) into a segmentation node.

        The new segmentation is built off-scene first; the scene changes only when it is
        complete. `output_node` is replaced in place; without it, the node a previous run made
        for this volume is reused unless `params.create_new_segmentation`.
        """
        params = params or SegmentParameters()
        outputs = done.get("outputs") or {}
        labels_path = outputs.get("labels") or outputs.get("segmentation")
        if not labels_path or not Path(labels_path).is_file():
            raise RunError(f"the segmentation result file is missing ({labels_path}); see the details",
                           json.dumps(done, indent=1))
        label_items = done.get("labels") or []
        timings = self.timings
        segmentation = build_segmentation(labels_path, label_items, timings)
        extras = self._read_extras(outputs, params)

        if output_node is None and not params.create_new_segmentation:
            output_node = self.find_previous_result(volume_node)
        scene = self.scene
        if output_node is None:
            import slicer

            output_node = slicer.vtkMRMLSegmentationNode()
            output_node.SetName(scene.GenerateUniqueName(f"{volume_node.GetName()} segmentation"))
            scene.AddNode(output_node)
        output_node.CreateDefaultDisplayNodes()
        t_node = time.perf_counter()
        was = output_node.StartModify()
        try:
            release_segmentation(output_node.GetSegmentation())  # a rerun's old segments: nothing to clear
            output_node.GetSegmentation().DeepCopy(segmentation)  # replaces conversion params too
            output_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            output_node.SetAttribute(ATTR_INPUT, volume_node.GetID())
            model = done.get("model")
            model_name = model.get("name") if isinstance(model, dict) else model or params.model
            output_node.SetAttribute(ATTR_MODEL, str(model_name))
        finally:
            output_node.EndModify(was)
            release_segmentation(segmentation)
        timings["segmentation node"] = time.perf_counter() - t_node
        with timed(timings, "closed surfaces"):
            use_surface_nets(output_node.GetSegmentation())
            output_node.CreateClosedSurfaceRepresentation()
        display = output_node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility3D(True)
            display.SetPreferredDisplayRepresentationName3D("Closed surface")
        for name, (path, labelmap) in extras.items():
            self._load_extra(volume_node, name, path, labelmap)
        return output_node

    def _read_extras(self, outputs: dict[str, Any], params: SegmentParameters) -> dict[str, tuple[str, bool]]:
        wanted: dict[str, tuple[str, bool]] = {}
        if params.keep_probabilities and outputs.get("probabilities"):
            wanted["probabilities"] = (outputs["probabilities"], False)
        if params.keep_candidates:
            for key in ("c1", "c2"):
                if outputs.get(key):
                    wanted[key.upper()] = (outputs[key], True)
        return {k: v for k, v in wanted.items() if Path(v[0]).is_file()}

    def _load_extra(self, volume_node: Any, name: str, path: str, labelmap: bool) -> Any:
        """Load a probability map or candidate mask as a volume named after the input."""
        import slicer

        node_name = f"{volume_node.GetName()} {name}"
        old = self.scene.GetFirstNodeByName(node_name)
        if old is not None:
            self.scene.RemoveNode(old)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if labelmap:
            node = slicer.vtkMRMLLabelMapVolumeNode()
        else:
            node = slicer.vtkMRMLVectorVolumeNode()
            storage.SetSingleFile(True)
        if not storage.ReadData(node):
            log.warning("could not read %s", path)
            return None
        node.SetName(node_name)
        self.scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        return node


# ---------------------------------------------------------------------- helpers (no scene)
def check_input_volume(volume_node: Any) -> None:
    if (volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode")
            or volume_node.IsA("vtkMRMLLabelMapVolumeNode")):
        raise RunError(_("select a CT volume as input"))
    image = volume_node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfPoints() < 8:
        raise RunError(_("volume '{name}' has no image data; load the CT again").format(name=volume_node.GetName()))
    if image.GetNumberOfScalarComponents() != 1:
        raise RunError(_("volume '{name}' is not a single-channel CT").format(name=volume_node.GetName()))
    if volume_node.GetParentTransformNode() is not None:
        raise RunError(_("volume '{name}' is under a transform; harden the transform (Data module, right-click) "
                         "and run again").format(name=volume_node.GetName()))


def write_volume(volume_node: Any, path: Path) -> None:
    """Write a volume (any direction, oblique included) to NRRD without touching the scene."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volume_node) or not path.is_file():
        raise RunError(f"could not write {volume_node.GetName()!r} to the temporary folder {path.parent}")


def read_labelmap(path: str | Path) -> Any:
    """A label map file as vtkOrientedImageData (geometry from the file, in RAS)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    node = slicer.vtkMRMLLabelMapVolumeNode()
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise RunError(f"could not read the result label map {path}")
    return slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(node)


#: Slicer's surface nets conversion with its own smoothing (Slicer 5.4 and later; older versions
#: keep flying edges): 40 % less CPU than flying edges + windowed-sinc smoothing + normals on a
#: 512x512x400 result (4.6 -> 2.7 CPU-s, docs/slicer.md), and the surfaces look the same.
SURFACE_NETS = {"Conversion method": "1", "SurfaceNets smoothing": "1"}


def use_surface_nets(segmentation: Any) -> None:
    """Build this segmentation's closed surfaces with surface nets where Slicer has them.

    The parameters are stored with the segmentation, so surfaces rebuilt after an edit look the
    same; the user can switch back in the Segmentations module.
    """
    known = segmentation.SerializeAllConversionParameters()
    for name, value in SURFACE_NETS.items():
        if f"{name}|" in known:
            segmentation.SetConversionParameter(name, value)


def release_segmentation(segmentation: Any) -> None:
    """Drop an off-scene segmentation's representations before it is deleted.

    Deleting a vtkSegmentation removes its segments one by one, and removing a segment from a
    shared labelmap clears that segment's voxels: ten passes over the whole image (5 s on a
    512x512x400 CT) for an image nobody uses any more. Without representations there is
    nothing to clear.
    """
    for segment_id in list(segmentation.GetSegmentIDs()):
        segmentation.GetSegment(segment_id).RemoveAllRepresentations()


def crop_to_labels(labels: Any, extent: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """The flat label array cut to the bounding box of its non-zero voxels, and that box's extent.

    Slicer converts each segment of a shared labelmap over the labelmap's whole extent, so on a
    512x512x400 CT the ten closed surfaces took 2.6 s over the full grid and 0.6 s over the
    organs' box (same points); copies and edits get cheaper too. The segmentation's reference
    geometry stays the volume's, so exports and the editor still see the CT's grid. An empty
    result keeps the full extent.
    """
    import numpy as np

    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    volume = labels.reshape(dims)
    spans = []
    for axis in range(3):
        hit = np.flatnonzero(volume.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return labels, tuple(extent)
        spans.append((int(hit[0]), int(hit[-1])))
    (z0, z1), (y0, y1), (x0, x1) = spans
    box = np.ascontiguousarray(volume[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1])
    return box.ravel(), (extent[0] + x0, extent[0] + x1, extent[2] + y0, extent[2] + y1,
                         extent[4] + z0, extent[4] + z1)


def build_segmentation(labels_path: str | Path, label_items: Iterable[dict[str, Any]],
                       timings: dict[str, float] | None = None) -> Any:
    """A vtkSegmentation with one segment per label (shared labelmap, model label values)."""
    import numpy as np
    import slicer
    from vtk.util import numpy_support

    from CascadeSegLib.labels import LabelSet

    labels = LabelSet.from_json(label_items)
    if len(labels) == 0:
        raise RunError("the model reported no labels; check the model package")
    with timed(timings, "read labels"):
        image = read_labelmap(labels_path)
    t_build = time.perf_counter()
    scalars = image.GetPointData().GetScalars()
    arr = numpy_support.vtk_to_numpy(scalars)
    values = np.array([lab.value for lab in labels])
    out_type = np.uint8 if values.max() < 256 else np.int16
    if arr.dtype == np.uint8:  # what the CLI writes: one table look-up instead of isin (1.3 s at 105 M voxels)
        lut = np.zeros(256, np.uint8)
        small = values[values < 256]
        lut[small] = small
        clean = lut[arr].astype(out_type, copy=False)
    else:
        clean = np.where(np.isin(arr, values), arr, 0).astype(out_type)
    shared = slicer.vtkOrientedImageData()
    shared.ShallowCopy(image)
    shared.CopyDirections(image)
    clean, extent = crop_to_labels(clean, image.GetExtent())
    shared.SetExtent(extent)
    vtk_arr = numpy_support.numpy_to_vtk(clean.ravel(), deep=True)
    vtk_arr.SetName("ImageScalars")
    shared.GetPointData().SetScalars(vtk_arr)

    segmentation = slicer.vtkSegmentation()
    rep = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.SetSourceRepresentationName(rep) if hasattr(segmentation, "SetSourceRepresentationName") \
        else segmentation.SetMasterRepresentationName(rep)
    for lab in labels:
        segment = slicer.vtkSegment()
        segment.SetName(lab.display)
        segment.SetColor(*lab.color_float)
        segment.SetLabelValue(lab.value)
        term = lab.terminology()
        if hasattr(segment, "SetTerminology"):
            segment.SetTerminology(term)
        else:  # Slicer < 5.7 keeps the terminology in a tag
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), term)
        segment.SetTag(ATTR_LABEL_NAME, lab.name)
        segment.AddRepresentation(rep, shared)
        segmentation.AddSegment(segment, lab.name)
    if timings is not None:
        timings["build segments"] = timings.get("build segments", 0.0) + time.perf_counter() - t_build
    return segmentation
