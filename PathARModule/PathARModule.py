"""PathAR: sample lesion masks with matching images in every MRI modality (3D Slicer scripted module; thin glue).

The work is in PathARModuleLib: logic.py (Qt-free: samples -> nodes, linked layout, mask placement),
parameters.py, offscreen.py (figure export without a GUI) and widget.py (GUI).
"""
from __future__ import annotations

import importlib
import logging
import sys

import numpy as np
import slicer
from PathARModuleLib.logic import PathARModuleLogic  # noqa: F401 - the module's logic
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

LIB_SUBMODULES = ("parameters", "logic", "offscreen", "widget")  # reloaded by Reload


class PathARModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PathAR"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["PathoSynSlicer"]
        self.parent.contributors = ["PathoSyn contributors"]
        self.parent.helpText = """
Generate lesion masks together with matching images (T1, T1c, T2, FLAIR) with PathAR, a structure-first
autoregressive model: each sample's structure is drawn once and rendered in every ticked modality. Samples are shown
in a row of linked 3D views next to the PathoSyn result. <b>Use this mask in PathoSyn</b> places a sample's mask at a
clicked point of a healthy scan and hands it to the PathoSyn module.
Python: <code>from PathARModuleLib.logic import PathARModuleLogic</code>. For research and teaching only.
"""
        self.parent.acknowledgementText = """
PathAR (structure-first autoregressive synthesis) applied to MRI lesion patches. The bundled weights are for research
use only (CC BY-NC-SA 3.0 training data; see their model cards).
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        slicer.app.connect("startupCompleted()", registerLayouts)


def registerLayouts():
    """The PathAR layouts, registered at startup so that a scene saved while one is shown reopens with its views."""
    try:
        from PathARModuleLib.logic import registerLayouts as register

        register(slicer.app.layoutManager().layoutLogic().GetLayoutNode())
    except Exception:  # noqa: BLE001 - must not break the application start
        logging.exception("PathAR: registering the layouts failed")


class PathARModuleWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.controller = None
        self.isEntered = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PathARModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from PathARModuleLib.widget import PathARWidget

        self.logic = PathARModuleLogic()
        self.controller = PathARWidget(self.ui, self.logic, parent=self)

    def enter(self):
        self.isEntered = True
        if self.controller is not None:
            self.controller.initializeParameterNode()

    def exit(self):
        self.isEntered = False
        if self.controller is not None:
            self.controller.disconnectGui()

    def cleanup(self):
        if self.controller is not None:
            self.controller.cleanup()

    def onReload(self):
        """Reload also re-reads PathARModuleLib (the default reloads only this file)."""
        for name in LIB_SUBMODULES:
            module = sys.modules.get(f"PathARModuleLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


class PathARModuleTest(ScriptedLoadableModuleTest):
    """Self-test (Slicer's Reload and Test): two samples, the linked layout, and a mask placed in a volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from PathoSynSlicerLib.logic import dependencyMessage, dependencyProblems

        problems = dependencyProblems()
        if problems:  # the factory machines have no torch/monai: skip, do not fail
            self.delayDisplay(f"PathAR self-test skipped: {dependencyMessage(problems)}")
            logging.warning("PathAR self-test skipped: %s", dependencyMessage(problems))
            return
        self.setUp()
        self.test_samples_layout_and_placement()

    def test_samples_layout_and_placement(self):
        from scripted_models.volume import Volume

        logic = PathARModuleLogic()
        self.delayDisplay("Sampling 2 lesions in T1c and FLAIR")
        run = logic.generateSamples(["t1c", "flair"], n=2, seed=0)
        self.assertEqual(len(run.samples), 2)
        layout = logic.createLinkedLayout(run)
        self.assertEqual(len(layout.viewNodes), 2)
        self.assertTrue(all(v.GetLinkedControl() for v in layout.viewNodes))
        self.delayDisplay("Placing sample 1 in a synthetic volume")
        target = logic._pathoSyn.addVolumeNode(Volume(np.full((80, 90, 100), 100, np.int16), (1.0, 1.0, 1.0)),
                                               "target")
        bounds = [0.0] * 6
        target.GetRASBounds(bounds)
        centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
        placed = logic.placeMask(run.samples[0].segmentation, target, centre)
        self.assertGreater(placed.GetSegmentation().GetNumberOfSegments(), 0)
        self.assertEqual(logic.lastPlacement["lost_fraction"], 0.0)
        self.delayDisplay("Test passed")
