"""CascadeSeg: abdominal organ segmentation in CT with the cascaded 3D U-Net (Roth et al. 2018).

Thin Slicer module: the work is in CascadeSegSlicer (logic, process wrapper, widget controller)
and CascadeSegLib (the engine, run in a separate process). Slicer-only imports are guarded so
the logic and the self-test also run headless with slicer-core (pytest).
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from CascadeSegSlicer.i18n import tr as _  # noqa: E402
from CascadeSegSlicer.i18n import translate  # noqa: E402
from CascadeSegSlicer.logic import CascadeSegLogic as _Logic  # noqa: E402
from CascadeSegSlicer.parameters import SegmentParameters  # noqa: E402

try:  # inside the Slicer application
    import qt
    import slicer
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin
    IN_SLICER = hasattr(slicer, "app")
except ImportError:  # slicer-core only: minimal stand-ins so this file imports and tests run
    IN_SLICER = False
    ScriptedLoadableModule = ScriptedLoadableModuleLogic = object

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            print(message)


class CascadeSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = _("CascadeSeg")
        parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        parent.dependencies = []
        parent.contributors = ["CascadeSeg developers"]
        parent.helpText = _("Segments abdominal organs and vessels in a CT with a two-stage cascaded 3D U-Net "
                            "(Roth et al. 2018). Pick the CT and a model, click Segment; the result is an "
                            "editable segmentation with standard terminology. See the "
                            "<a href='https://github.com/cascadeseg/CascadeSeg'>documentation</a>.")
        parent.acknowledgementText = _("Method: Roth HR et al., An application of cascaded 3D fully convolutional "
                                       "networks for medical image segmentation, CMIG 2018.")


class CascadeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from CascadeSegSlicer.widget import CascadeSegController, SlicerGui

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/CascadeSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)

        def make_timer(callback):
            timer = qt.QTimer()
            timer.timeout.connect(callback)
            return timer

        self.logic = CascadeSegLogic(slicer.mrmlScene)
        self.controller = CascadeSegController(self.ui, self.logic, SlicerGui(ui_widget), make_timer)
        self.controller.setup()  # binds the panel to the scene's parameter node
        # the parameter node is part of the scene: a closed scene takes it along, the next one gets a new one
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.controller.show_devices()
        self.controller.prestart_worker()  # torch imported, model loaded before the first Segment
        self.layout.addStretch(1)

    def onReload(self):
        """Reload the CascadeSegSlicer submodules (dependency order), then this module as Slicer does."""
        import importlib

        import CascadeSegSlicer

        importlib.reload(CascadeSegSlicer).reload_submodules()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.controller.initialize_parameter_node()

    def onSceneStartClose(self, caller, event):
        self.controller.set_parameter_node(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.controller.initialize_parameter_node()

    def cleanup(self):
        self.removeObservers()
        if getattr(self, "controller", None):
            self.controller.cleanup()


class CascadeSegLogic(_Logic, ScriptedLoadableModuleLogic):
    """The module's logic (CascadeSegSlicer.logic); scene defaults to slicer.mrmlScene."""

    def __init__(self, scene=None, **kwargs):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        if scene is None and IN_SLICER:
            scene = slicer.mrmlScene
        _Logic.__init__(self, scene, **kwargs)

    def getParameterNode(self):
        """The scene's parameter node, wrapped (CascadeSegSlicer.parameter_node)."""
        from CascadeSegSlicer.parameter_node import parameter_node

        return parameter_node(self.scene)


class CascadeSegTest(ScriptedLoadableModuleTest):
    """Self-test: the bundled sample CT through the bundled model, then the segments' checks."""

    scene = None

    def setUp(self):
        if IN_SLICER:
            slicer.mrmlScene.Clear(0)
            self.scene = slicer.mrmlScene
        else:
            from CascadeSegSlicer.headless import make_scene

            self.headless = make_scene()
            self.scene = self.headless.scene

    def runTest(self):
        self.setUp()
        self.test_sample_ct_with_bundled_model()

    def load_sample(self):
        from CascadeSegLib.resources import sample_ct

        if IN_SLICER:
            return slicer.util.loadVolume(str(sample_ct()))
        return self.headless.load_volume(str(sample_ct()), "abdomen_ct_3mm")

    def test_sample_ct_with_bundled_model(self):
        from CascadeSegLib.errors import ModelError
        from CascadeSegLib.packaging.catalog import read_model_json
        from CascadeSegLib.packaging.model import find_model
        from CascadeSegLib.resources import DEFAULT_MODEL

        try:
            model_path = find_model(DEFAULT_MODEL)
        except ModelError as exc:
            raise unittest.SkipTest(f"bundled model not available: {exc}") from None
        label_names = [lab["name"] for lab in read_model_json(model_path)["labels"]]
        self.delayDisplay("Loading the sample CT")
        volume = self.load_sample()
        self.delayDisplay(f"Segmenting with {model_path}")
        logic = CascadeSegLogic(self.scene)
        seg_node = logic.run(volume, SegmentParameters(model=str(model_path), device="cpu"), timeout_s=1800)
        seg = seg_node.GetSegmentation()
        self.assertEqual(list(seg.GetSegmentIDs()), label_names)
        self.assertEqual(seg_node.GetName(), f"{volume.GetName()} segmentation")
        non_empty = [sid for sid in label_names
                     if seg_node.GetClosedSurfaceInternalRepresentation(sid) is not None
                     and seg_node.GetClosedSurfaceInternalRepresentation(sid).GetNumberOfPoints() > 0]
        # the large organs of the sample must be found (small ones may be missed by the demo model)
        for organ in ("liver", "spleen"):
            if organ in label_names:
                self.assertIn(organ, non_empty)
        self.assertGreaterEqual(len(non_empty), len(label_names) // 2)
        rep = seg.GetSegment(label_names[0]).GetRepresentation("Binary labelmap")
        import vtk

        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(a)
        volume.GetIJKToRASMatrix(b)
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(a.GetElement(i, j), b.GetElement(i, j), places=4)
        self.delayDisplay("Test passed")
