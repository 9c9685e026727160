"""PathAR module GUI (Qt; runs inside Slicer only). The work is done by logic.py; the background process is
PathoSyn's CLI runner (`pathosyn sample --progress jsonl`)."""
from __future__ import annotations

import qt
import slicer
import vtk
from PathoSynSlicerLib.logic import dependencyMessage, dependencyProblems
from PathoSynSlicerLib.parameters import HAVE_PARAMETER_NODE_WRAPPER
from PathoSynSlicerLib.parameters import connectGui as connectWrapperToGui
from PathoSynSlicerLib.process import WorkerRunner, warmUpSharedWorker
from PathoSynSlicerLib.widget import reportErrors
from slicer.util import VTKObservationMixin

from . import parameters as P
from .logic import PathARModuleLogic

PLACEMENT_NODE_NAME = "PathAR lesion centre"
INPUT_WIDGETS = ("renderT1CheckBox", "renderT1cCheckBox", "renderT2CheckBox", "renderFlairCheckBox",
                 "numberOfSamplesSpinBox", "seedSpinBox", "temperatureSlider", "deviceComboBox",
                 "anatomyComboBox")


class PathARWidget(VTKObservationMixin):
    """Binds the .ui to the parameter node, runs sampling in the background and drives the linked views."""

    def __init__(self, ui, logic: PathARModuleLogic | None = None, parent=None):
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic or PathARModuleLogic()
        self.parent = parent
        self._parameterNode = None
        self._guiConnection = None
        self._runner: WorkerRunner | None = None
        self._job = None
        self.run = None  # the latest PathARRun
        self.layout = None  # its LinkedLayout
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        ui.generateButton.connect("clicked(bool)", self.onGenerateClicked)
        ui.useMaskButton.connect("clicked(bool)", self.onUseMask)
        ui.exportFigureButton.connect("clicked(bool)", self.onExportFigure)
        ui.displayedModalityComboBox.connect("currentTextChanged(QString)", self.onDisplayedModality)
        # no parameterNodeWrapper connector exists for qSlicerSimpleMarkupsWidget: bound by hand (setParameterNode)
        ui.placementPointWidget.connect("markupsNodeChanged()", self.onPlacementNodeChanged)
        ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.initializeParameterNode()
        if not dependencyProblems():  # the shared engine worker loads the models while the user sets up
            warmUpSharedWorker()

    # --- parameter node ----------------------------------------------------------------------------------------------
    @property
    def params(self):
        return self._parameterNode

    def initializeParameterNode(self) -> None:
        params = self.logic.getParameters()
        if self._parameterNode is not None and self._parameterNode.parameterNode is params.parameterNode:
            params = self._parameterNode  # one wrapper per parameter node (no new set of connectors per visit)
        if params.targetVolume is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                params.targetVolume = first
        if self.run is None:
            self.run = self.logic.runFromScene()  # e.g. a saved scene with a PathAR run was loaded
        # the placement markups node is created when there are samples to place (ensurePlacementNode), not here
        self.setParameterNode(params)

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

    def setParameterNode(self, params) -> None:
        if self._parameterNode is not None and self._parameterNode is not params:
            self.disconnectGui()
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        if params is not None and self._parameterNode is not params:
            self.addObserver(params.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = params
        if params is not None:
            self.connectGui()
            self.ui.placementPointWidget.setCurrentNode(params.placementPoint)
        self.updateGUI()

    def connectGui(self) -> None:
        if not HAVE_PARAMETER_NODE_WRAPPER or self._parameterNode is None or self._guiConnection is not None:
            return
        self._guiConnection = connectWrapperToGui(self._parameterNode, self.ui)

    def disconnectGui(self) -> None:
        """Called by the module's exit() and cleanup(): the widgets stop writing to the parameter node."""
        if self._guiConnection is not None and self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiConnection)
        self._guiConnection = None

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
        running = self._runner is not None and self._runner.running
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
        self.cancel()
        self.run = self.layout = None
        self.setParameterNode(None)

    def onSceneEndClose(self, *_):
        if self.parent is None or self.parent.isEntered:
            self.initializeParameterNode()

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

    def cleanup(self):
        self.cancel()
        self._timer.stop()
        self.disconnectGui()
        self.removeObservers()

    # --- sampling in the background ----------------------------------------------------------------------------------
    def showError(self, message: str) -> None:
        self.ui.statusLabel.setText(f"<span style='color:#c0392b'>{message}</span>")
        slicer.util.errorDisplay(message, windowTitle="PathAR")

    @reportErrors("Generating samples")
    def onGenerateClicked(self, *_):
        if self._runner is not None and self._runner.running:
            return self.cancel()
        problems = dependencyProblems()
        if problems:
            return self.showError(dependencyMessage(problems).split(" (install")[0]
                                  + " (install them from the PathoSyn module's Dependencies section)")
        params = self.params
        self._job = self.logic.createJob(P.renderModalities(params), n=int(params.numberOfSamples),
                                         seed=int(params.seed), temperature=float(params.temperature),
                                         device=params.device, anatomyFrom=params.anatomyFrom)
        self._runner = WorkerRunner(self._job.argv, onProgress=self.onProgress, onDone=self.onDone,
                                    onError=self.showError, onFinished=self.onFinished)
        try:
            self._runner.start()
        except OSError as exc:
            self._job.cleanup()
            self._runner = self._job = None
            return self.showError(f"cannot start the sampling process: {exc}")
        self.ui.generateButton.text = "Cancel"
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText("Starting...")
        self.updateGUI()
        self._timer.start()

    @reportErrors("Reading the samples")
    def _poll(self):
        if self._runner is None or not self._runner.poll():
            self._timer.stop()

    def onProgress(self, fraction: float, message: str):
        self.ui.progressBar.setValue(int(1000 * fraction))
        self.ui.statusLabel.setText(message)

    @reportErrors("Loading the samples")
    def onDone(self, payload: dict):
        with slicer.util.WaitCursor():
            self.run = self.logic.loadJobOutputs(self._job)
            self.showRun()
        self.ui.statusLabel.setText(f"Done: {len(self.run.samples)} samples in {', '.join(self.run.modalities)}")

    def onFinished(self, state: str):
        self._timer.stop()
        if self._job is not None:
            self._job.cleanup()
        if state == "cancelled":
            self.ui.statusLabel.setText("Cancelled: the scene was not changed.")
        self._runner, self._job = None, None
        self.ui.progressBar.setVisible(False)
        self.updateGUI()

    def cancel(self):
        if self._runner is not None and self._runner.running:
            self._runner.cancel()

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
                                      P.placementPointRAS(params))
        self.logic.useMaskInPathoSyn(placed, params.targetVolume, params.targetModality)
        warning = self.logic.lastPlacement.get("warning")
        if warning:
            slicer.util.warningDisplay(warning, windowTitle="PathAR")
        self.ui.statusLabel.setText(f"Mask placed: {placed.GetName()}. Click 'Synthesize lesion' in PathoSyn.")
        slicer.util.selectModule("PathoSynSlicer")


__all__ = ["PathARWidget"]
