"""The panel's "Learn from corrections" section: Add to training cases, Improve model.

Driven by CascadeSegController (which owns the ui, the gui facade and the model selector);
like it, no Qt import here, so tests use fakes. Runs are polled from a timer, never waited on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        ui.improveButton.text = "Cancel improving" if busy and self.kind == "improve" else "Improve model…"
        ui.reviewedLineEdit.enabled = not busy
        ui.trainingProgressBar.visible = busy and self.kind == "improve"

    # ------------------------------------------------------------------ buttons
    def on_add_clicked(self) -> None:
        model, volume = self.ctl.current_model(), self.ui.inputVolumeSelector.currentNode()
        seg = self.segmentation_node()
        if model is None or volume is None or seg is None:
            self.ctl.gui.error("Select the CT, its corrected segmentation and the model that made it.")
            return
        case_id = case_id_for(volume)
        replace = self.logic.case_exists(model.name, case_id)
        if replace and not self.ctl.gui.confirm(f"{model.name} already has a training case '{case_id}'. Replace it?"):
            return
        reviewed = [n.strip() for n in str(self.ui.reviewedLineEdit.text or "").split(",") if n.strip()]
        try:
            self._begin("add", self.logic.start_add_case(volume, seg, model.name, case_id, reviewed, replace))
        except RunError as exc:
            self.ctl.gui.error(exc.message, exc.details)
            return
        self.ui.trainingStatusLabel.text = f"Storing '{case_id}' for {model.name}..."

    def on_improve_clicked(self) -> None:
        if self.run is not None:
            self.cancel()
            return
        model = self.ctl.current_model()
        if model is None:
            return
        name = self.ctl.gui.ask_text("Improve model", f"Fine-tune {model.name} on its training cases.\n"
                                     "Name of the improved model:", f"{model.name}-improved")
        if not name:
            return
        device = self.ui.deviceComboBox.currentData or "auto"
        try:
            self._begin("improve", self.logic.start_improve(model.name, name.strip(), device))
        except RunError as exc:
            self.ctl.gui.error(exc.message, exc.details)
            return
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingStatusLabel.text = f"Improving {model.name} as {name.strip()}..."

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
            self.ui.trainingStatusLabel.text = f"{p.text() or 'Working'} ({run.elapsed_s:.0f} s)"
        if run.is_running():
            return
        self.timer.stop()
        kind, self.run, self.kind = self.kind, None, ""
        try:
            done = self.logic.finish(run)
        except RunCancelled:
            self.ui.trainingStatusLabel.text = "Cancelled; no model or training case was changed."
        except RunError as exc:
            self.ui.trainingStatusLabel.text = f"Failed: {exc.message}"
            self.ctl.gui.error(exc.message, exc.details)
        else:
            self._done(kind, done)
        finally:
            self.ctl.update_buttons()

    def _done(self, kind: str, done: dict[str, Any]) -> None:
        if kind == "add":
            self.ui.trainingStatusLabel.text = (f"Stored training case '{done.get('id')}' for {done.get('model')} "
                                                f"(reviewed: {', '.join(done.get('reviewed', []))}).")
            return
        self.ctl.refresh_models(select=str(done.get("model")))
        self.ui.trainingStatusLabel.text = str(done.get("summary", "Done."))
        reports = [Path(p) for p in done.get("report", []) if str(p).endswith(".md")]
        text = reports[0].read_text(encoding="utf-8") if reports and reports[0].is_file() else ""
        self.ctl.gui.show_report(f"Model {done.get('model')} is installed and selected.", text)

    def cancel(self) -> None:
        run, self.run, self.kind = self.run, None, ""
        self.timer.stop()
        if run is not None:
            self.logic.cancel(run)
        self.ui.trainingStatusLabel.text = "Cancelled; no model or training case was changed."
        self.ctl.update_buttons()

    def cleanup(self) -> None:
        if self.run is not None:
            self.cancel()
