"""The panel's "Learn from corrections" section: Add to training cases, Improve model.

Driven by CascadeSegController (which owns the ui, the gui facade and the model selector);
like it, no Qt import here, so tests use fakes. Runs are polled from a timer, never waited on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .i18n import tr as _
from .runs import RunCancelled, RunError, SegmentRun
from .training import TrainingLogic, case_id_for

POLL_MS = 250


class TrainingPanel:
    def __init__(self, controller: Any, timer_factory: Callable[[Callable[[], None]], Any]) -> None:
        self.ctl = controller
        self.logic = TrainingLogic(controller.logic)
        self.timer = timer_factory(self.on_timer)
        self.run: SegmentRun | None = None
        self.kind = ""

    @property
    def ui(self) -> Any:
        return self.ctl.ui

    def setup(self) -> None:
        self.ui.addCaseButton.clicked.connect(self.on_add_clicked)
        self.ui.improveButton.clicked.connect(self.on_improve_clicked)

    def segmentation_node(self) -> Any:
        node = self.ui.outputSegmentationSelector.currentNode()
        return node if node is not None else self.ctl.result_node

    def update_buttons(self) -> None:
        ui, model = self.ui, self.ctl.current_model()
        usable = model is not None and model.installed
        busy = self.run is not None
        ui.addCaseButton.enabled = not busy and usable and ui.inputVolumeSelector.currentNode() is not None \
            and self.segmentation_node() is not None
        ui.improveButton.enabled = usable and (not busy or self.kind == "improve")
        ui.improveButton.text = _("Cancel improving") if busy and self.kind == "improve" else _("Improve model…")
        ui.reviewedLineEdit.enabled = not busy
        ui.improveAtlasesCheckBox.enabled = not busy
        ui.improveAtlasesOnlyCheckBox.enabled = not busy
        ui.trainingProgressBar.visible = busy and self.kind == "improve"

    # ------------------------------------------------------------------ buttons
    def on_add_clicked(self) -> None:
        model, volume = self.ctl.current_model(), self.ui.inputVolumeSelector.currentNode()
        seg = self.segmentation_node()
        if model is None or volume is None or seg is None:
            self.ctl.gui.error(_("Select the CT, its corrected segmentation and the model that made it."))
            return
        case_id = case_id_for(volume)
        replace = self.logic.case_exists(model.name, case_id)
        if replace and not self.ctl.gui.confirm(_("{model} already has a training case '{case}'. Replace it?").format(
                model=model.name, case=case_id)):
            return
        reviewed = [n.strip() for n in str(self.ui.reviewedLineEdit.text or "").split(",") if n.strip()]
        try:
            self._begin("add", self.logic.start_add_case(volume, seg, model.name, case_id, reviewed, replace))
        except RunError as exc:
            self.ctl.gui.error(exc.message, exc.details)
            return
        self.ui.trainingStatusLabel.text = _("Storing '{case}' for {model}...").format(case=case_id, model=model.name)

    def on_improve_clicked(self) -> None:
        if self.run is not None:
            self.cancel()
            return
        model = self.ctl.current_model()
        if model is None:
            return
        only = bool(self.ui.improveAtlasesOnlyCheckBox.checked)
        atlases = only or bool(self.ui.improveAtlasesCheckBox.checked)
        what = _("Add the training cases of {model} to its atlases (no fine-tuning).") if only else \
            _("Fine-tune {model} on its training cases and keep them as atlases.") if atlases \
            else _("Fine-tune {model} on its training cases.")
        name = self.ctl.gui.ask_text(_("Improve model"), (what + "\n" + _("Name of the improved model:")).format(
            model=model.name), f"{model.name}-improved")
        if not name:
            return
        device = self.ui.deviceComboBox.currentData or "auto"
        try:
            self._begin("improve", self.logic.start_improve(model.name, name.strip(), device, atlases=atlases,
                                                            iterations=0 if only else None))
        except RunError as exc:
            self.ctl.gui.error(exc.message, exc.details)
            return
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingStatusLabel.text = _("Improving {model} as {name}...").format(model=model.name,
                                                                                       name=name.strip())

    def _begin(self, kind: str, run: SegmentRun) -> None:
        self.run, self.kind = run, kind
        self.timer.start(POLL_MS)
        self.ctl.update_buttons()

    # ------------------------------------------------------------------ polling
    def on_timer(self) -> None:
        run = self.run
        if run is None:
            self.timer.stop()
            return
        p = run.poll()
        if self.kind == "improve":
            self.ui.trainingProgressBar.value = int(round(100 * p.fraction))
            self.ui.trainingStatusLabel.text = _("{step} ({seconds} s)").format(step=p.text() or _("Working"),
                                                                                seconds=f"{run.elapsed_s:.0f}")
        if run.is_running():
            return
        self.timer.stop()
        kind, self.run, self.kind = self.kind, None, ""
        try:
            done = self.logic.finish(run)
        except RunCancelled:
            self.ui.trainingStatusLabel.text = _("Cancelled; no model or training case was changed.")
        except RunError as exc:
            self.ui.trainingStatusLabel.text = _("Failed: {error}").format(error=exc.message)
            self.ctl.gui.error(exc.message, exc.details)
        else:
            self._done(kind, done)
        finally:
            self.ctl.update_buttons()

    def _done(self, kind: str, done: dict[str, Any]) -> None:
        if kind == "add":
            stored = _("Stored training case '{case}' for {model} (reviewed: {organs}).")
            self.ui.trainingStatusLabel.text = stored.format(case=done.get("id"), model=done.get("model"),
                                                             organs=", ".join(done.get("reviewed", [])))
            return
        self.ctl.refresh_models(select=str(done.get("model")))
        self.ui.trainingStatusLabel.text = str(done.get("summary", _("Done.")))
        reports = [Path(p) for p in done.get("report", []) if str(p).endswith(".md")]
        text = reports[0].read_text(encoding="utf-8") if reports and reports[0].is_file() else ""
        self.ctl.gui.show_report(_("Model {model} is installed and selected.").format(model=done.get("model")), text)

    def cancel(self) -> None:
        run, self.run, self.kind = self.run, None, ""
        self.timer.stop()
        if run is not None:
            self.logic.cancel(run)
        self.ui.trainingStatusLabel.text = _("Cancelled; no model or training case was changed.")
        self.ctl.update_buttons()

    def cleanup(self) -> None:
        if self.run is not None:
            self.cancel()
