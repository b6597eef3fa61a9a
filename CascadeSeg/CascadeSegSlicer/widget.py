"""The module panel's behaviour: wires the .ui widgets to SegmentParameters and the logic.

`CascadeSegController` never imports Qt itself: the `ui` object (widgets by objectName), the
logic, a `gui` facade (message boxes, views, dependency installer) and a timer factory are
injected, so tests drive it with fakes. `SlicerGui` is the real facade used inside Slicer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from CascadeSegLib.progress import WHOLE_SCAN_WARNING
from CascadeSegLib.resources import DEFAULT_MODEL

from .background import RunPoller
from .i18n import tr as _
from .logic import CascadeSegLogic
from .parameter_node import parameter_node, segment_parameters
from .parameters import SegmentParameters
from .runs import RunCancelled, RunError, SegmentRun

log = logging.getLogger(__name__)

#: device key -> label (translated when the combo box is filled)
DEVICE_ITEMS = [("auto", "Auto"), ("cuda", "GPU (CUDA)"), ("cpu", "CPU")]
POLL_MS = 200
#: check box -> parameter node field (parameter_node.CascadeSegParameters)
CHECK_BOXES = {"overlapCheckBox": "overlap", "stage1OnlyCheckBox": "stage1Only",
               "keepProbabilitiesCheckBox": "keepProbabilities", "keepCandidatesCheckBox": "keepCandidates",
               "refineCheckBox": "refine"}


class CascadeSegController:
    def __init__(self, ui: Any, logic: CascadeSegLogic, gui: Any,
                 timer_factory: Callable[[Callable[[], None]], Any]) -> None:
        self.ui = ui
        self.logic = logic
        self.gui = gui
        self.timer = timer_factory(self.on_timer)
        self.run: SegmentRun | None = None
        self.result_node: Any = None
        self.models: list[Any] = []
        self._install_thread: threading.Thread | None = None
        self._deps_checked = False
        #: the scene's parameter node (parameter_node.CascadeSegParameterNode) the panel shows and edits
        self.values: Any = None
        self._observed: tuple[Any, int] | None = None
        self._syncing = False
        #: side runs in child processes (torch is never imported here): device detection, model install
        self.devices = RunPoller(logic, timer_factory)
        self.installing = RunPoller(logic, timer_factory)
        from .training_widget import TrainingPanel

        self.training = TrainingPanel(self, timer_factory)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ui = self.ui
        ui.segmentButton.clicked.connect(self.on_segment_clicked)
        ui.installModelButton.clicked.connect(self.on_install_clicked)
        ui.show3DButton.clicked.connect(self.on_show_3d)
        ui.editButton.clicked.connect(self.on_edit)
        ui.modelComboBox.currentIndexChanged.connect(self.on_model_changed)
        ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.on_gui_changed)
        ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.on_gui_changed)
        ui.deviceComboBox.currentIndexChanged.connect(self.on_gui_changed)
        for name in CHECK_BOXES:
            getattr(ui, name).toggled.connect(self.on_gui_changed)
        self.training.setup()
        for key, text in DEVICE_ITEMS:
            ui.deviceComboBox.addItem(_(text), key)
        self.refresh_models()
        if self.logic.scene is not None:
            self.set_parameter_node(parameter_node(self.logic.scene))
        self.update_buttons()

    # ------------------------------------------------------------------ parameter node
    def set_parameter_node(self, values: Any) -> None:
        """Show and edit `values` (a wrapped parameter node; None: none, e.g. while the scene closes)."""
        if self._observed is not None:
            node, tag = self._observed
            node.RemoveObserver(tag)
            self._observed = None
        self.values = values
        if values is not None:
            import vtk

            node = values.parameterNode
            self._observed = (node, node.AddObserver(vtk.vtkCommand.ModifiedEvent, self.update_gui_from_parameters))
            self.update_gui_from_parameters()

    def initialize_parameter_node(self) -> None:
        """Module entered or scene closed: show the scene's parameter node; an empty input gets the
        scene's first CT-like volume, as Slicer's module template does."""
        values = parameter_node(self.logic.scene)
        if values.inputVolume is None:
            volumes = self.logic.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
            for i in range(volumes.GetNumberOfItems()):
                volume = volumes.GetItemAsObject(i)
                if not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                    values.inputVolume = volume
                    break
        self.set_parameter_node(values)

    def update_gui_from_parameters(self, *_args: Any) -> None:
        """The parameter node changed (scene loaded, a script, another view): show its values."""
        values, ui = self.values, self.ui
        if values is None or self._syncing:
            return
        self._syncing = True
        try:
            ui.inputVolumeSelector.setCurrentNode(values.inputVolume)
            ui.outputSegmentationSelector.setCurrentNode(values.outputSegmentation)
            for name, field in CHECK_BOXES.items():
                getattr(ui, name).checked = bool(getattr(values, field))
            devices = [key for key, _label in DEVICE_ITEMS]
            if values.device in devices:
                ui.deviceComboBox.setCurrentIndex(devices.index(values.device))
            names = [m.name for m in self.models]
            if values.model in names:
                ui.modelComboBox.setCurrentIndex(names.index(values.model))
        finally:
            self._syncing = False
        if self.current_model() is not None and values.model != self.current_model().name:
            values.model = self.current_model().name  # a model no longer offered: what the panel shows
        self.on_model_changed()

    def on_gui_changed(self, *_args: Any) -> None:
        """The user changed a widget: store every value in the parameter node (one Modified event)."""
        values, ui = self.values, self.ui
        if values is not None and not self._syncing:
            self._syncing = True
            node = values.parameterNode
            was = node.StartModify()
            try:
                values.inputVolume = ui.inputVolumeSelector.currentNode()
                values.outputSegmentation = ui.outputSegmentationSelector.currentNode()
                for name, field in CHECK_BOXES.items():
                    setattr(values, field, bool(getattr(ui, name).checked))
                values.device = ui.deviceComboBox.currentData or "auto"
                model = self.current_model()
                if model is not None:
                    values.model = model.name
            finally:
                node.EndModify(was)
                self._syncing = False
        self.update_buttons()

    def refresh_models(self, select: str | None = None) -> None:
        from .models import list_models

        try:
            self.models = list_models()
        except Exception as exc:  # noqa: BLE001 - the panel must open even with a broken catalog
            self.models = []
            self.ui.modelInfoLabel.text = _("Could not list models: {error}").format(error=exc)
        combo = self.ui.modelComboBox
        combo.clear()
        for m in self.models:
            combo.addItem(m.title(), m.name)
        if select:
            names = [m.name for m in self.models]
            if select in names:
                combo.setCurrentIndex(names.index(select))
        self.on_model_changed()

    def show_devices(self) -> None:
        """Ask `cascadeseg devices` in a child process what 'auto' will use (shown when it answers)."""
        from .dependencies import device_summary

        label = self.ui.deviceInfoLabel
        if self.devices.running:
            return
        try:
            run = self.logic.start_device_detection()
        except (OSError, RunError) as exc:
            label.text = _("Could not detect the devices: {error}").format(error=exc)
            return
        label.text = _("Detecting devices...")

        def failed(exc: RunError | None) -> None:
            label.text = _("Could not detect the devices: {error}").format(error=exc.message) if exc else ""

        self.devices.start(run, lambda done: setattr(label, "text", device_summary(done)), failed)

    def prestart_worker(self) -> None:
        """Module opened: start the warm worker in the background (only with its packages present)."""
        from .dependencies import missing_packages

        if not missing_packages():
            self.logic.prestart_worker()

    # ------------------------------------------------------------------ state
    def current_model(self) -> Any:
        i = self.ui.modelComboBox.currentIndex
        return self.models[i] if 0 <= i < len(self.models) else None

    def parameters(self) -> SegmentParameters:
        if self.values is not None:
            return segment_parameters(self.values)
        ui = self.ui
        model = self.current_model()
        return SegmentParameters(
            model=model.name if model else DEFAULT_MODEL,
            device=ui.deviceComboBox.currentData or "auto",
            overlap=ui.overlapCheckBox.checked,
            stage1_only=ui.stage1OnlyCheckBox.checked,
            keep_probabilities=ui.keepProbabilitiesCheckBox.checked,
            keep_candidates=ui.keepCandidatesCheckBox.checked,
            refine=ui.refineCheckBox.checked,
            create_new_segmentation=ui.outputSegmentationSelector.currentNode() is None,
        )

    def update_buttons(self, *_args: Any) -> None:
        ui = self.ui
        running, installing = self.run is not None, self.installing.running
        model = self.current_model()
        ui.segmentButton.text = _("Cancel") if running else _("Segment")
        ui.segmentButton.enabled = running or (ui.inputVolumeSelector.currentNode() is not None and not installing
                                               and model is not None and model.installed)
        for name in ("inputVolumeSelector", "modelComboBox", "deviceComboBox",
                     "overlapCheckBox", "stage1OnlyCheckBox", "keepProbabilitiesCheckBox",
                     "keepCandidatesCheckBox", "refineCheckBox", "outputSegmentationSelector"):
            getattr(ui, name).enabled = not running and not installing
        ui.installModelButton.enabled = not running
        ui.installModelButton.text = _("Cancel install") if installing else _("Install…")
        ui.progressBar.visible = running or installing
        has_result = self.result_node is not None and self.result_node.GetScene() is not None
        ui.show3DButton.enabled = has_result and not running
        ui.editButton.enabled = has_result and not running
        self.training.update_buttons()

    def on_model_changed(self, *_args: Any) -> None:
        model = self.current_model()
        self.ui.modelInfoLabel.text = model.info() if model else _("No model installed: use Install…")
        if model is not None and self.values is not None and not self._syncing and self.values.model != model.name:
            self.values.model = model.name
        self.update_buttons()

    # ------------------------------------------------------------------ run
    def on_segment_clicked(self) -> None:
        if self.run is not None:
            self.cancel()
            return
        if not self._deps_checked:
            if not self.gui.ensure_dependencies():
                return
            self._deps_checked = True
        volume = self.ui.inputVolumeSelector.currentNode()
        output = self.ui.outputSegmentationSelector.currentNode()
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not self.gui.confirm(_("Replace the {count} segments of '{name}' with the new result?").format(
                    count=output.GetSegmentation().GetNumberOfSegments(), name=output.GetName())):
                return
        params = self.parameters()
        try:
            self.run = self.logic.start(volume, params, output)
        except RunError as exc:
            self.gui.error(exc.message, exc.details)
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting {model} on {volume}...").format(model=params.model,
                                                                               volume=volume.GetName())
        self.timer.start(POLL_MS)
        self.update_buttons()

    def on_timer(self) -> None:
        run = self.run
        if run is None:
            self.timer.stop()
            return
        self._show_progress(run, run.poll())
        if run.is_running():
            return
        self.timer.stop()
        self.run = None
        try:
            node = self.logic.finish(run)
        except RunCancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        except RunError as exc:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=exc.message)
            self.gui.error(exc.message, exc.details)
        else:
            self.result_node = node
            self.ui.outputSegmentationSelector.setCurrentNode(node)
            if self.values is not None:
                self.values.outputSegmentation = node
            self.ui.statusLabel.text = "\n".join([timing_text(run)] + [
                _("Warning: {message}").format(message=w) for w in run.warnings])
            for warning in run.warnings:
                log.warning("%s", warning)
            self.gui.show_result(node, self.ui.inputVolumeSelector.currentNode())
            whole = [w for w in run.warnings if w.startswith(WHOLE_SCAN_WARNING)]
            if whole:                          # every segment in doubt: not only a status line
                self.gui.warn(whole[0])
        finally:
            self.update_buttons()

    def cancel(self) -> None:
        run, self.run = self.run, None
        self.timer.stop()
        if run is not None:
            self.logic.cancel(run)
        self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        self.update_buttons()

    # ------------------------------------------------------------------ other buttons
    def on_install_clicked(self) -> None:
        """Install a model in a child process (`cascadeseg models install`), with progress; the button
        cancels while it runs."""
        if self.installing.running:
            self.installing.cancel()
            return
        model = self.current_model()
        default = model.name if model is not None and not model.installed else ""
        source = (self.gui.ask_text(_("Install a model"), _("Catalog name, URL or path of a model .zip:"), default)
                  or "").strip()
        if not source:
            return
        try:
            run = self.logic.start_model_install(source)
        except (OSError, RunError) as exc:
            self.gui.error(str(exc), repr(exc))
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Installing {source}...").format(source=source)
        self.installing.start(run, self._installed, self._install_failed, self._show_progress)
        self.update_buttons()

    def _show_progress(self, run: SegmentRun, p: Any) -> None:
        self.ui.progressBar.value = int(round(100 * p.fraction))
        self.ui.progressBar.format = (p.text() or _("working")) + "  %p%"
        self.ui.statusLabel.text = _("{step} ({seconds} s)").format(step=p.text() or _("Working"),
                                                                    seconds=f"{run.elapsed_s:.0f}")

    def _installed(self, done: dict[str, Any]) -> None:
        self.ui.statusLabel.text = _("Installed {model} {version}.").format(model=done.get("model"),
                                                                            version=done.get("version"))
        self.refresh_models(select=str(done.get("model")))

    def _install_failed(self, exc: RunError | None) -> None:
        if exc is None:
            self.ui.statusLabel.text = _("Install cancelled; no model was changed.")
        else:
            self.ui.statusLabel.text = _("Install failed: {error}").format(error=exc.message)
            self.gui.error(exc.message, exc.details)
        self.update_buttons()

    def on_show_3d(self) -> None:
        if self.result_node is not None:
            self.gui.show_result(self.result_node, self.ui.inputVolumeSelector.currentNode())

    def on_edit(self) -> None:
        if self.result_node is not None:
            self.gui.edit_in_segment_editor(self.result_node, self.ui.inputVolumeSelector.currentNode())

    def cleanup(self) -> None:
        """Module panel closed/reloaded: do not leave a process running."""
        if self.run is not None:
            self.cancel()
        self.installing.cancel()
        self.devices.cancel()
        self.logic.shutdown_worker()
        self.training.cleanup()
        self.set_parameter_node(None)


def timing_text(run: SegmentRun) -> str:
    done = run.done_events[-1] if run.done_events else {}
    timings = done.get("timings") or {}
    parts = [_("{step} {seconds} s").format(step=k, seconds=f"{float(v):.1f}") for k, v in timings.items()
             if isinstance(v, (int, float)) and k != "total"]
    total = timings.get("total", run.elapsed_s)
    done_in = _("Done in {seconds} s").format(seconds=f"{float(total):.1f}")
    return done_in + (" (" + ", ".join(parts) + ")" if parts else "")


class SlicerGui:
    """The real facade: Slicer message boxes, views and pip (only imported inside Slicer)."""

    def __init__(self, parent: Any = None) -> None:
        self.parent = parent

    def confirm(self, text: str) -> bool:
        import slicer

        return slicer.util.confirmOkCancelDisplay(text, windowTitle="CascadeSeg")

    def error(self, message: str, details: str = "") -> None:
        import slicer

        slicer.util.errorDisplay(message, windowTitle="CascadeSeg", detailedText=details or None)

    def warn(self, message: str) -> None:
        import slicer

        slicer.util.warningDisplay(message, windowTitle="CascadeSeg")

    def show_report(self, message: str, markdown: str) -> None:
        import slicer

        slicer.util.infoDisplay(message, windowTitle="CascadeSeg", detailedText=markdown or None)

    def ask_text(self, title: str, label: str, default: str = "") -> str:
        import qt

        return qt.QInputDialog.getText(self.parent, title, label, qt.QLineEdit.Normal, default) or ""

    def ensure_dependencies(self) -> bool:
        import slicer

        from .dependencies import install_missing, missing_packages, requirements_message

        missing = missing_packages()
        if not missing:
            return True
        if "CascadeSegLib" in missing:
            self.error(requirements_message(missing))
            return False
        if not slicer.util.confirmOkCancelDisplay(
                requirements_message(missing) + ".\n" + _("Install them now? (Slicer may need a restart afterwards)"),
                windowTitle="CascadeSeg"):
            return False
        torch_logic = None
        if "torch" in missing:
            try:
                import PyTorchUtils  # noqa: F401  (PyTorch Utils extension, when installed)

                torch_logic = slicer.util.getModuleLogic("PyTorchUtils")
            except ImportError:
                torch_logic = None
        try:
            with slicer.util.WaitCursor():
                install_missing(missing, slicer.util.pip_install, torch_logic,
                                progress=lambda m: (slicer.util.showStatusMessage(m), slicer.app.processEvents()))
        except Exception as exc:  # noqa: BLE001
            self.error(_("Installing {packages} failed: {error}").format(packages=", ".join(missing), error=exc),
                       repr(exc))
            return False
        still = missing_packages()
        if still:
            self.error(requirements_message(still) + " " + _("(restart Slicer if it was just installed)"))
        return not still

    def show_result(self, seg_node: Any, volume_node: Any) -> None:
        import slicer

        if volume_node is not None:
            slicer.util.setSliceViewerLayers(background=volume_node, fit=True)
        seg_node.GetDisplayNode().SetVisibility3D(True)
        lm = slicer.app.layoutManager()
        if lm is not None and lm.threeDViewCount > 0:
            view = lm.threeDWidget(0).threeDView()
            view.resetFocalPoint()
            view.resetCamera()

    def edit_in_segment_editor(self, seg_node: Any, volume_node: Any) -> None:
        import slicer

        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg_node)
        if volume_node is not None:
            editor.setSourceVolumeNode(volume_node) if hasattr(editor, "setSourceVolumeNode") \
                else editor.setMasterVolumeNode(volume_node)
