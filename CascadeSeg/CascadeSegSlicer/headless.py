"""A MRML scene with the module logics Slicer registers, for use without the Slicer app.

Tests (and batch scripts) use `make_scene()` to get what the app normally provides:
application logic plus the Colors, Volumes, Terminologies and Segmentations logics, the
Segmentations logic registered before any segmentation node exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class HeadlessSlicer:
    scene: Any
    app_logic: Any
    colors: Any
    volumes: Any
    terminologies: Any
    segmentations: Any

    def load_volume(self, path: str, name: str, labelmap: bool = False) -> Any:
        node = self.volumes.AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
        if node is None:
            raise OSError(f"could not load {path}")
        return node


def make_scene() -> HeadlessSlicer:
    import slicer
    import vtk
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())

    def register(logic: Any, name: str) -> Any:
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        return logic

    # Without the app's home and share folders the colour and terminology logics complain that
    # their default files are missing; segments carry their own colours and terminology strings.
    was = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        colors = register(slicer.vtkSlicerColorLogic(), "Colors")
        terminologies = register(slicer.vtkSlicerTerminologiesModuleLogic(), "Terminologies")
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(was)
    volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    return HeadlessSlicer(scene, app, colors, volumes, terminologies, segmentations)
