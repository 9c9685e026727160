"""PathAR module GUI (Qt; runs inside Slicer only). The work is done by logic.py; the background process is
PathoSyn's CLI runner (`pathosyn sample --progress jsonl`)."""
from __future__ import annotations

import qt
import slicer
from PathoSynSlicerLib.logic import dependencyMessage, dependencyProblems
from PathoSynSlicerLib.process import warmUpSharedWorker
from PathoSynSlicerLib.widget import JobPanel, reportErrors

from . import parameters as P
from .logic import PathARModuleLogic

PLACEMENT_NODE_NAME = "PathAR lesion centre"
INPUT_WIDGETS = ("renderT1CheckBox", "renderT1cCheckBox", "renderT2CheckBox", "renderFlairCheckBox",
                 "numberOfSamplesSpinBox", "seedSpinBox", "temperatureSlider", "deviceComboBox",
                 "anatomyComboBox")


class PathARWidget(JobPanel):
    """Binds the .ui to the parameter node, runs sampling in the background and drives the linked views."""

    windowTitle = "PathAR"
    defaultVolumeField = "targetVolume"

    def __init__(self, ui, logic: PathARModuleLogic | None = None, parent=None):
        self.run = None  # the latest PathARRun
        self.layout = None  # its LinkedLayout
        JobPanel.__init__(self, ui, logic or PathARModuleLogic(), parent)
        ui.generateButton.connect("clicked(bool)", self.onGenerateClicked)
        ui.useMaskButton.connect("clicked(bool)", self.onUseMask)
        ui.exportFigureButton.connect("clicked(bool)", self.onExportFigure)
        ui.displayedModalityComboBox.connect("currentTextChanged(QString)", self.onDisplayedModality)
        # qSlicerSimpleMarkupsWidget has no parameterNodeWrapper connector: bound in parameterNodeConnected
        ui.placementPointWidget.connect("markupsNodeChanged()", self.onPlacementNodeChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.initializeParameterNode()
        if not dependencyProblems():  # the shared engine worker loads the models while the user sets up
            warmUpSharedWorker()

    # --- parameter node ----------------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        if self.run is None:
            self.run = self.logic.runFromScene()  # e.g. a saved scene with a PathAR run was loaded
        # the placement markups node is created when there are samples to place (ensurePlacementNode), not here
        JobPanel.initializeParameterNode(self)

    def ensurePlacementNode(self):
        params = self.params
        if params is not None and params.placementPoint is None:
            point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", PLACEMENT_NODE_NAME)
            point.SetMaximumNumberOfControlPoints(1)
            point.CreateDefaultDisplayNodes()
            point.GetDisplayNode().SetSelectedColor(0.9, 0.47, 0.12)
            params.placementPoint = point
            self.ui.placementPointWidget.setCurrentNode(point)
        return params.placementPoint if params is not None else None

    def parameterNodeConnected(self, params) -> None:
        self.ui.placementPointWidget.setCurrentNode(params.placementPoint)

    def onPlacementNodeChanged(self, *_):
        if self._parameterNode is None:
            return
        node = self.ui.placementPointWidget.currentNode()
        if node is not None and not node.IsA("vtkMRMLMarkupsFiducialNode"):
            node = None
        if node is not self._parameterNode.placementPoint:
            self._parameterNode.placementPoint = node

    def updateGUI(self, *_):
        params = self._parameterNode
        if params is None:
            return
        running = self.running
        self.ui.generateButton.setEnabled(running or bool(P.renderModalities(params)))
        for name in INPUT_WIDGETS:
            widget = getattr(self.ui, name, None)
            if widget is not None:
                widget.setEnabled(not running)
        if not running:
            self.ui.generateButton.text = "Generate samples"
        haveRun = self.run is not None
        self.ui.useMaskButton.setEnabled(haveRun and not running and params.targetVolume is not None)
        self.ui.exportFigureButton.setEnabled(haveRun)
        if self.ui.placementPointWidget.currentNode() is not params.placementPoint:
            self.ui.placementPointWidget.setCurrentNode(params.placementPoint)

    def onSceneStartClose(self, *_):
        self.run = self.layout = None
        JobPanel.onSceneStartClose(self)

    def onSceneImported(self, *_):
        if self.run is None or not self.run.isIntact():
            self.run, self.layout = self.logic.runFromScene(), None
            self.updateGUI()

    def onNodeRemoved(self, *_):
        """A sample (or its folder) was deleted: forget the run instead of failing later inside a slot."""
        if self.run is not None and not self.run.isIntact():
            self.run = self.layout = None
            self.ui.statusLabel.setText("Samples were deleted: generate new ones to use the linked views.")
            self.updateGUI()

    # --- sampling in the background ----------------------------------------------------------------------------------
    @reportErrors("Generating samples")
    def onGenerateClicked(self, *_):
        if self.running:
            return self.cancel()
        problems = dependencyProblems()
        if problems:
            return self.showError(dependencyMessage(problems).split(" (install")[0]
                                  + " (install them from the PathoSyn module's Dependencies section)")
        params = self.params
        job = self.logic.createJob(P.renderModalities(params), n=int(params.numberOfSamples), seed=int(params.seed),
                                   temperature=float(params.temperature), device=params.device,
                                   anatomyFrom=params.anatomyFrom)
        return self.startJob(job, self.ui.generateButton, "sampling")

    @reportErrors("Loading the samples")
    def onDone(self, payload: dict):
        with slicer.util.WaitCursor():
            self.run = self.logic.loadJobOutputs(self._job)
            self.showRun()
        self.ui.statusLabel.setText(f"Done: {len(self.run.samples)} samples in {', '.join(self.run.modalities)}")

    # --- views -------------------------------------------------------------------------------------------------------
    def showRun(self):
        modality = self.params.displayedModality
        if modality not in self.run.modalities:
            modality = self.run.modalities[0]
            self.params.displayedModality = modality
        source, output, segmentation = self.logic.pathoSynResult()
        self.layout = self.logic.createLinkedLayout(self.run, pathoSynInput=source, pathoSynOutput=output,
                                                    pathoSynSegmentation=segmentation, modality=modality)
        self.ensurePlacementNode()  # now there is something to place
        self.updateGUI()

    @reportErrors("Showing the modality")
    def onDisplayedModality(self, modality: str):
        if self.run is None or modality not in self.run.modalities:
            return
        if self.layout is None:
            return self.showRun()
        self.logic.showModality(self.run, self.layout, modality)

    @reportErrors("Exporting the figure")
    def onExportFigure(self, *_):
        if self.run is None:
            return
        if self.layout is None:
            self.showRun()
        path = qt.QFileDialog.getSaveFileName(self.parent.parent if self.parent else None, "Export figure",
                                              "pathar.png", "PNG images (*.png)")
        if not path:
            return
        try:  # what is on screen, the way Slicer's Screen Capture module grabs it (keeps the view backgrounds)
            import ScreenCapture

            ScreenCapture.ScreenCaptureLogic().captureImageFromView(None, path)
        except ImportError:  # no Screen Capture module: render the sample views offscreen
            self.logic.exportFigure(self.layout, path)
        self.ui.statusLabel.setText(f"Figure saved: {path}")

    # --- hand a mask to PathoSyn -------------------------------------------------------------------------------------
    @reportErrors("Placing the mask")
    def onUseMask(self, *_):
        params = self.params
        index = int(params.chosenSample) - 1
        if self.run is None or not 0 <= index < len(self.run.samples):
            return self.showError(f"there is no sample {index + 1}: generate samples first")
        self.run.checkIntact()
        placed = self.logic.placeMask(self.run.samples[index].segmentation, params.targetVolume,
                                      P.placementPointRAS(params),
                                      addTo=self.logic.pathoSynMask() if params.addToCurrentMask else None)
        self.logic.useMaskInPathoSyn(placed, params.targetVolume, params.targetModality)
        warning = self.logic.lastPlacement.get("warning")
        if warning:
            slicer.util.warningDisplay(warning, windowTitle="PathAR")
        self.ui.statusLabel.setText(f"Mask placed: {placed.GetName()}. Click 'Synthesize lesion' in PathoSyn.")
        slicer.util.selectModule("PathoSynSlicer")


__all__ = ["PathARWidget"]
