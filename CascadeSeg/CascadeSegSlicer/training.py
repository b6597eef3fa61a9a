"""Learning from corrections in Slicer: store the corrected segmentation, run `improve`.

Both run `cascadeseg` in a child process (the same `SegmentProcess` as Segment), so the GUI
thread only writes the CT and the segmentation to a temporary folder. The scene is never
changed; a cancelled or failed run leaves the corrections store and the models as they were
(the CLI only renames finished work into place) and its temporary folder is removed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .logic import CascadeSegLogic, check_input_volume, write_volume
from .parameters import SegmentParameters
from .runs import RunError, SegmentRun


def case_id_for(volume_node: Any) -> str:
    """A store-safe case id from the volume's name ('CT chest 1' -> 'CT_chest_1')."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(volume_node.GetName() or "")).strip("._-")
    return text[:100] or "case"


def write_segmentation(segmentation_node: Any, path: Path) -> None:
    """Save a segmentation node as Segment Editor does (.seg.nrrd), without touching the scene."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node) or not path.is_file():
        raise RunError(f"could not write {segmentation_node.GetName()!r} to the temporary folder {path.parent}")


class TrainingLogic:
    """Start/finish `corrections add` and `improve` runs through a CascadeSegLogic's CLI."""

    def __init__(self, logic: CascadeSegLogic) -> None:
        self.logic = logic

    def start_add_case(self, volume_node: Any, segmentation_node: Any, model: str, case_id: str | None = None,
                       reviewed: Sequence[str] | None = None, replace: bool = False) -> SegmentRun:
        """Write the CT and its segmentation, start `cascadeseg corrections add` on them."""
        check_input_volume(volume_node)
        if segmentation_node is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
            raise RunError("select the corrected segmentation (it has no segments)")
        temp_dir = Path(tempfile.mkdtemp(prefix="CascadeSeg-add-"))
        try:
            ct, seg = temp_dir / "ct.nrrd", temp_dir / "correction.seg.nrrd"
            write_volume(volume_node, ct)
            write_segmentation(segmentation_node, seg)
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        args = ["corrections", "add", str(ct), str(seg), "--model", model, "--case",
                case_id or case_id_for(volume_node), "--json"]
        if reviewed:
            args += ["--reviewed", ",".join(reviewed)]
        if replace:
            args.append("--replace")
        return self.logic.start_cli(args, "storing the training case", temp_dir, volume_node.GetID(),
                                    SegmentParameters(model=model))

    def start_improve(self, model: str, new_name: str, device: str = "auto", iterations: int | None = None,
                      overwrite: bool = False, atlases: bool = False) -> SegmentRun:
        """Start `cascadeseg improve MODEL -o NEW_NAME --progress-json` (returns at once);
        `atlases`: the cases also join the model's registered atlases (`--atlases`)."""
        args = ["improve", model, "-o", new_name, "--device", device, "--progress-json"]
        if iterations is not None:
            args += ["--iterations", str(int(iterations))]
        if atlases:
            args.append("--atlases")
        if overwrite:
            args.append("--overwrite")
        return self.logic.start_cli(args, "improve", Path(tempfile.mkdtemp(prefix="CascadeSeg-improve-")),
                                    params=SegmentParameters(model=model))

    def finish(self, run: SegmentRun) -> dict[str, Any]:
        """The run's `done` event once the process ended (RunError/RunCancelled otherwise)."""
        return self.logic.finish_command(run, "cancelled; nothing was stored")

    def cancel(self, run: SegmentRun) -> None:
        self.logic.cancel(run)

    @staticmethod
    def case_exists(model: str, case_id: str) -> bool:
        """Whether the store already holds `case_id` for `model` (to ask before replacing)."""
        from CascadeSegLib.corrections import list_corrections
        from CascadeSegLib.errors import UserError

        try:
            return any(c.id == case_id for c in list_corrections(model))
        except UserError:
            return False
