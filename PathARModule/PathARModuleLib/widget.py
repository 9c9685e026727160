"""PathAR module GUI (Qt; runs inside Slicer only). The work is done by logic.py; the background process is
PathoSyn's CLI runner (`pathosyn sample --progress jsonl`)."""
from __future__ import annotations

import qt
import slicer
import vtk
from PathoSynSlicerLib.logic import missingDependencies
from PathoSynSlicerLib.parameters import HAVE_PARAMETER_NODE_WRAPPER
from PathoSynSlicerLib.process import CLIRunner, engineRoot
from slicer.util import VTKObservationMixin

from . import parameters as P
from .logic import InputError, PathARModuleLogic, WeightsError


class PathARWidget(VTKObservationMixin):
    """Binds the .ui to the parameter node, runs sampling in the background and drives the linked views."""

    def __init__(self, ui, logic: PathARModuleLogic | None = None, parent=None):
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic or PathARModuleLogic()
        self.parent = parent
        self._parameterNode = None
        self._guiConnection = None
        self._runner: CLIRunner | None = None
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
        ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # --- parameter node ----------------------------------------------------------------------------------------------
    @property
    def params(self):
        return self._parameterNode

    def initializeParameterNode(self) -> None:
        params = self.logic.getParameters()
        if params.targetVolume is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                params.targetVolume = first
        if params.placementPoint is None:
            point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "PathAR lesion centre")
            point.SetMaximumNumberOfControlPoints(1)
            params.placementPoint = point
        self.setParameterNode(params)

    def setParameterNode(self, params) -> None:
        if self._parameterNode is not None:
            if self._guiConnection is not None:
                self._parameterNode.disconnectGui(self._guiConnection)
                self._guiConnection = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = params
        if params is not None:
            if HAVE_PARAMETER_NODE_WRAPPER:
                self._guiConnection = params.connectGui(self.ui)
            self.addObserver(params.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, *_):
        params = self._parameterNode
        if params is None:
            return
        running = self._runner is not None and self._runner.running
        self.ui.generateButton.setEnabled(running or bool(P.renderModalities(params)))
        if not running:
            self.ui.generateButton.text = "Generate samples"
        haveRun = self.run is not None
        self.ui.useMaskButton.setEnabled(haveRun and params.targetVolume is not None)
        self.ui.exportFigureButton.setEnabled(haveRun)

    def onSceneStartClose(self, *_):
        self.cancel()
        self.run = self.layout = None
        self.setParameterNode(None)

    def onSceneEndClose(self, *_):
        if self.parent is None or self.parent.isEntered:
            self.initializeParameterNode()

    def cleanup(self):
        self.cancel()
        self._timer.stop()
        self.removeObservers()

    # --- sampling in the background ----------------------------------------------------------------------------------
    def showError(self, message: str) -> None:
        self.ui.statusLabel.setText(f"<span style='color:#c0392b'>{message}</span>")
        slicer.util.errorDisplay(message, windowTitle="PathAR")

    def onGenerateClicked(self):
        if self._runner is not None and self._runner.running:
            return self.cancel()
        missing = missingDependencies()
        if missing:
            return self.showError(f"missing Python packages: {', '.join(missing)} (install them from the PathoSyn "
                                  "module's Dependencies section)")
        params = self.params
        try:
            self._job = self.logic.createJob(P.renderModalities(params), n=int(params.numberOfSamples),
                                             seed=int(params.seed), temperature=float(params.temperature),
                                             device=params.device)
        except (InputError, WeightsError) as exc:
            return self.showError(str(exc))
        self._runner = CLIRunner(self._job.argv, engineRoot=engineRoot(), onProgress=self.onProgress,
                                 onDone=self.onDone, onError=self.showError, onFinished=self.onFinished)
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
        self._timer.start()

    def _poll(self):
        if self._runner is None or not self._runner.poll():
            self._timer.stop()

    def onProgress(self, fraction: float, message: str):
        self.ui.progressBar.setValue(int(1000 * fraction))
        self.ui.statusLabel.setText(message)

    def onDone(self, payload: dict):
        try:
            with slicer.util.WaitCursor():
                self.run = self.logic.loadJobOutputs(self._job)
                self.showRun()
        except (InputError, WeightsError, OSError) as exc:
            return self.showError(str(exc))
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
    def pathoSynResult(self):
        """(input, output, segmentation) of the latest PathoSyn result in the scene, if any."""
        outputs = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if n.GetName().endswith(" synthesized")]
        if not outputs:
            return None, None, None
        output = outputs[-1]
        source = slicer.mrmlScene.GetFirstNodeByName(output.GetName().removesuffix(" synthesized"))
        segs = [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if n.GetName().endswith(" lesion")]
        return source, output, (segs[-1] if segs else None)

    def showRun(self):
        modality = self.params.displayedModality
        if modality not in self.run.modalities:
            modality = self.run.modalities[0]
            self.params.displayedModality = modality
        source, output, segmentation = self.pathoSynResult()
        self.layout = self.logic.createLinkedLayout(self.run, pathoSynInput=source, pathoSynOutput=output,
                                                    pathoSynSegmentation=segmentation, modality=modality)
        layoutManager = slicer.app.layoutManager()
        for i in range(len(self.run.samples)):
            widget = layoutManager.threeDWidget(self.layout.viewNodes[i].GetLayoutLabel()) \
                if hasattr(layoutManager, "threeDWidget") else None
            if widget is not None:
                widget.threeDView().resetFocalPoint()
        self.updateGUI()

    def onDisplayedModality(self, modality: str):
        if self.run is None or self.layout is None or modality not in self.run.modalities:
            return
        self.logic.showModality(self.run, self.layout, modality)

    def onExportFigure(self):
        if self.layout is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent.parent if self.parent else None, "Export figure",
                                              "pathar.png", "PNG images (*.png)")
        if not path:
            return
        viewport = slicer.app.layoutManager().viewport()
        if not viewport.grab().save(path):  # what is on screen; offscreen render as a fallback
            self.logic.exportFigure(self.layout, path)
        self.ui.statusLabel.setText(f"Figure saved: {path}")

    # --- hand a mask to PathoSyn -------------------------------------------------------------------------------------
    def onUseMask(self):
        params = self.params
        index = int(params.chosenSample) - 1
        if self.run is None or not 0 <= index < len(self.run.samples):
            return self.showError(f"there is no sample {index + 1}: generate samples first")
        try:
            placed = self.logic.placeMask(self.run.samples[index].segmentation, params.targetVolume,
                                          P.placementPointRAS(params))
            self.logic.useMaskInPathoSyn(placed, params.targetVolume)
        except InputError as exc:
            return self.showError(str(exc))
        warning = self.logic.lastPlacement.get("warning")
        if warning:
            slicer.util.warningDisplay(warning, windowTitle="PathAR")
        self.ui.statusLabel.setText(f"Mask placed: {placed.GetName()}. Click 'Synthesize lesion' in PathoSyn.")
        slicer.util.selectModule("PathoSynSlicer")


__all__ = ["PathARWidget"]
