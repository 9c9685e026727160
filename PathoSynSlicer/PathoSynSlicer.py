"""PathoSyn: synthesise realistic brain lesions in healthy MRI (3D Slicer scripted module; thin glue).

The work is in PathoSynSlicerLib: logic.py (Qt-free, MRML nodes <-> engine), parameters.py, process.py (background
runner of the `pathosyn` command line) and widget.py (GUI).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import numpy as np
import slicer
from PathoSynSlicerLib.logic import (  # noqa: F401 - PathoSynSlicerLogic is the module's logic
    SAMPLE_CHECKSUMS,
    PathoSynSlicerLogic,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

LIB_SUBMODULES = ("logic", "parameters", "process", "widget")  # reloaded by Reload, in dependency order


class PathoSynSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PathoSyn"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PathoSyn contributors"]
        self.parent.helpText = """
Add a realistic synthetic lesion to healthy brain MRI (T1, T1c, T2, FLAIR) under a mask you draw or load.
Segments named <i>core</i>, <i>edema</i> and <i>enhancing</i> set the lesion's sub-regions; a single segment is the
whole lesion and the model invents its structure. Results are new nodes: the synthesized volume(s), the residual
(what the model added), the uncertainty (samples &gt; 1) and the lesion segmentation. <b>Pseudo-healthy</b> removes a
lesion instead. Python: <code>from PathoSynSlicerLib.logic import PathoSynSlicerLogic</code>.
For research and teaching only; not for clinical use.
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = """
PathoSyn (deviation diffusion on a pseudo-healthy anatomy base). The MNI152 ICBM 2009a template is distributed with
nilearn. The code is Apache-2.0; the bundled weights are for non-commercial research use only
(CC BY-NC-SA 3.0, BraTS 2013 training data; see their model cards).
"""
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    """Register the compare layout (so saved scenes that show it reopen with their views) and the sample data."""
    try:
        from PathoSynSlicerLib.logic import registerLayouts

        registerLayouts(slicer.app.layoutManager().layoutLogic().GetLayoutNode())
    except Exception:  # noqa: BLE001 - a failure here must not break the application start
        logging.exception("PathoSyn: registering the layouts failed")
    registerSampleData()


def registerSampleData():
    """The teaching sample (healthy MNI152 T1 + ready lesion mask) in the Sample Data module, if it is present.

    The MNI152 T1 is written from nilearn on first use (its bytes differ between nilearn/SimpleITK builds, so it has
    no fixed checksum); the module's own button and the Sample Data button go through `load` below. Scripts use
    `PathoSynSlicerLogic().loadSampleData()`: `SampleData.downloadSample(...)` only reads the cached file, which the
    first `load` creates."""
    try:
        import SampleData
    except ImportError:
        return
    t1 = PathoSynSlicerLogic.sampleDataCacheDir() / "mni152_t1_1mm.nii"  # written from nilearn on first use

    def load(*_args, **_kwargs):
        """Sample Data calls this bare from a button: errors are shown, and the volume is shown in the views."""
        with slicer.util.tryWithErrorDisplay("Loading the PathoSyn teaching sample failed.", waitCursor=True):
            if not _ensureSampleDependencies():
                return []
            t1Node, segNode = PathoSynSlicerLogic().loadSampleData()
            slicer.util.setSliceViewerLayers(background=t1Node, fit=True)
            return [t1Node, segNode]

    from PathoSynSlicerLib.logic import SAMPLE_LESION_FILE

    iconPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "PathoSynSlicer.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PathoSyn",
        sampleName="PathoSyn MNI152 T1 + lesion",
        uris=[t1.as_uri(), SAMPLE_LESION_FILE.as_uri()],
        fileNames=[t1.name, SAMPLE_LESION_FILE.name],
        nodeNames=["MNI152 T1", "MNI152 demo lesion"],
        checksums=[None, SAMPLE_CHECKSUMS[SAMPLE_LESION_FILE.name]],
        thumbnailFileName=iconPath,
        customDownloader=load,
    )


def _ensureSampleDependencies() -> bool:
    """nilearn (and the engine's packages) for the teaching sample, installed after the user confirms."""
    from PathoSynSlicerLib.logic import dependencyProblems
    from PathoSynSlicerLib.widget import installPythonPackages

    problems = {k: v for k, v in dependencyProblems(include_sample_data=True).items() if k == "nilearn"}
    if not problems:
        return True
    if not slicer.util.confirmOkCancelDisplay("The PathoSyn teaching sample needs the Python package 'nilearn' "
                                              "(MNI152 template). Install it now?", windowTitle="PathoSyn"):
        return False
    installPythonPackages(problems)
    return True


class PathoSynSlicerWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.controller = None
        self.isEntered = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PathoSynSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from PathoSynSlicerLib.widget import PathoSynWidget

        self.logic = PathoSynSlicerLogic()
        self.controller = PathoSynWidget(self.ui, self.logic, parent=self)

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
        """Reload also re-reads PathoSynSlicerLib (the default reloads only this file)."""
        for name in LIB_SUBMODULES:
            module = sys.modules.get(f"PathoSynSlicerLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)


class PathoSynSlicerTest(ScriptedLoadableModuleTest):
    """Self-test (Slicer's Reload and Test): a synthetic head with oblique geometry and a 3-segment mask."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from PathoSynSlicerLib.logic import dependencyMessage, dependencyProblems

        problems = dependencyProblems()
        if problems:  # the factory machines have no torch/monai: skip, do not fail
            self.delayDisplay(f"PathoSyn self-test skipped: {dependencyMessage(problems)}")
            logging.warning("PathoSyn self-test skipped: %s", dependencyMessage(problems))
            return
        self.setUp()
        self.test_synthesize_new_nodes_same_geometry()

    def test_synthesize_new_nodes_same_geometry(self):
        from PathoSynSlicerLib.logic import InputError, nodeIJKToRAS

        from scripted_models.volume import Volume

        self.delayDisplay("Building a synthetic head")
        logic = PathoSynSlicerLogic()
        shape = (40, 48, 44)
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        inside = zz ** 2 + yy ** 2 + xx ** 2 < 0.85
        rng = np.random.default_rng(0)
        arr = np.where(inside, 400 + 60 * np.sin(6 * xx) + rng.normal(0, 15, shape), 0).astype(np.int16)
        c, s = np.cos(0.3), np.sin(0.3)
        head = Volume(arr, (1.2, 1.0, 1.5), (10.0, -20.0, 5.0), (c, -s, 0, s, c, 0, 0, 0, 1))
        volumeNode = logic.addVolumeNode(head, "head")
        d = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
        labels = np.zeros(shape, np.uint8)
        labels[d < 0.3], labels[d < 0.2], labels[d < 0.1] = 2, 3, 1
        segNode = logic.addSegmentationNode(labels, head.ijk_to_ras(), "mask", wholeLesion=False)
        before = slicer.util.arrayFromVolume(volumeNode).copy()

        self.delayDisplay("Synthesizing (2 steps)")
        result = logic.synthesize(volumeNode, segNode, modality="t1", steps=2)
        after = slicer.util.arrayFromVolume(result.volumes["t1"])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volumeNode), before))
        self.assertEqual(after.shape, before.shape)
        self.assertTrue((after != before).any())
        self.assertTrue(np.array_equal(nodeIJKToRAS(volumeNode), nodeIJKToRAS(result.volumes["t1"])))
        self.assertEqual(result.segmentation.GetSegmentation().GetNumberOfSegments(), 3)
        with self.assertRaises(InputError):
            logic.synthesize(volumeNode, None)
        self.delayDisplay("Test passed")
