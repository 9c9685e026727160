"""PathoSyn module GUI (Qt; runs inside Slicer only). The work is done by logic.py and process.py."""
from __future__ import annotations

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from . import parameters as P
from .logic import (
    InputError,
    PathoSynSlicerLogic,
    WeightsError,
    availableDevices,
    missingDependencies,
)
from .process import CLIRunner, engineRoot

COMPARE_LAYOUT_ID = 50731
COMPARE_LAYOUT = """
<layout type="vertical" split="true">
 <item splitSize="600">
  <layout type="horizontal">
   <item><view class="vtkMRMLSliceNode" singletontag="Red">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">R</property>
    <property name="viewcolor" action="default">#F34A33</property>
   </view></item>
   <item><view class="vtkMRMLSliceNode" singletontag="Yellow">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">Y</property>
    <property name="viewcolor" action="default">#EDD54C</property>
   </view></item>
  </layout>
 </item>
 <item splitSize="400">
  <view class="vtkMRMLViewNode" singletontag="1"><property name="viewlabel" action="default">1</property></view>
 </item>
</layout>
"""


class PathoSynWidget(VTKObservationMixin):
    """Binds the .ui to the parameter node and runs the engine in a background process."""

    def __init__(self, ui, logic: PathoSynSlicerLogic | None = None, parent=None):
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic or PathoSynSlicerLogic()
        self.parent = parent
        self._parameterNode = None
        self._guiConnection = None
        self._runner: CLIRunner | None = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

        ui.synthesizeButton.connect("clicked(bool)", self.onSynthesizeClicked)
        ui.pseudoHealthyButton.connect("clicked(bool)", self.onPseudoHealthyClicked)
        ui.createSegmentationButton.connect("clicked(bool)", self.onCreateSegmentation)
        ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        ui.loadMaskButton.connect("clicked(bool)", self.onLoadMask)
        ui.loadSampleDataButton.connect("clicked(bool)", self.onLoadSampleData)
        ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        ui.progressBar.setVisible(False)
        devices = availableDevices()
        ui.deviceInfoLabel.setText("GPU: " + ("CUDA available" if "cuda" in devices else "none found, using CPU"))
        self.updateDependencies()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    # --- parameter node ----------------------------------------------------------------------------------------------
    @property
    def params(self):
        return self._parameterNode

    def initializeParameterNode(self) -> None:
        params = self.logic.getParameters()
        if params.t1Volume is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                params.t1Volume = first
        self.setParameterNode(params)

    def setParameterNode(self, params) -> None:
        if self._parameterNode is not None:
            if self._guiConnection is not None:
                self._parameterNode.disconnectGui(self._guiConnection)
                self._guiConnection = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = params
        if params is not None:
            if P.HAVE_PARAMETER_NODE_WRAPPER:
                self._guiConnection = params.connectGui(self.ui)
            self.addObserver(params.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, *_):
        params = self._parameterNode
        if params is None:
            return
        labelmap = bool(params.useLabelmap)
        for w in (self.ui.maskLabelmapSelector, self.ui.maskLabelmapSelectorLabel):
            w.setVisible(labelmap)
        for w in (self.ui.maskSegmentationSelector, self.ui.maskSegmentationSelectorLabel,
                  self.ui.editSegmentationButton, self.ui.createSegmentationButton):
            w.setVisible(not labelmap)
        self.ui.stepsSpinBox.setEnabled(not params.preview)
        ready = bool(P.inputVolumes(params)) and P.maskNode(params) is not None
        running = self._runner is not None and self._runner.running
        self.ui.synthesizeButton.setEnabled(ready or (running and self._job.command == "synthesize"))
        self.ui.pseudoHealthyButton.setEnabled(ready or (running and self._job.command == "pseudo-healthy"))
        if not running:
            self.ui.synthesizeButton.text = "Synthesize lesion"
            self.ui.pseudoHealthyButton.text = "Pseudo-healthy"
            self.ui.synthesizeButton.toolTip = ("Add a synthetic lesion" if ready else
                                                "Select at least one healthy scan and a lesion mask")

    def onSceneStartClose(self, *_):
        self.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, *_):
        if self.parent is None or self.parent.isEntered:
            self.initializeParameterNode()

    def cleanup(self):
        self.cancel()
        self._timer.stop()
        self.removeObservers()

    # --- dependencies ----------------------------------------------------------------------------------------------
    def updateDependencies(self) -> None:
        missing = missingDependencies()
        self.ui.dependenciesLabel.setText(
            "All Python packages are installed." if not missing else
            f"Missing Python packages: {', '.join(missing)}. They are installed after you confirm.")
        self.ui.installDependenciesButton.setEnabled(bool(missing))
        self.ui.dependenciesCollapsibleButton.collapsed = not missing

    def ensureDependencies(self) -> bool:
        missing = missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"PathoSyn needs these Python packages: {', '.join(missing)}.\n"
                "Install them now? (This downloads several hundred MB and may take a few minutes.)",
                windowTitle="PathoSyn: install dependencies"):
            return False
        return self.installDependencies(missing)

    def onInstallDependencies(self):
        self.ensureDependencies()

    def installDependencies(self, missing: dict) -> bool:
        with slicer.util.WaitCursor():
            try:
                if "torch" in missing:
                    try:
                        import PyTorchUtils  # from the PyTorch extension (EXTENSION_DEPENDS PyTorch)
                    except ImportError:
                        slicer.util.pip_install("torch")
                    else:
                        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                            raise RuntimeError("PyTorch installation was not completed")
                rest = [req for name, req in missing.items() if name != "torch"]
                if rest:
                    slicer.util.pip_install(" ".join(f'"{r}"' for r in rest))
            except Exception as exc:  # noqa: BLE001 - show any installer failure
                slicer.util.errorDisplay(f"Installing dependencies failed: {exc}", windowTitle="PathoSyn")
                return False
            finally:
                self.updateDependencies()
        return not missingDependencies()

    # --- mask helpers ------------------------------------------------------------------------------------------------
    def referenceVolume(self):
        volumes = P.inputVolumes(self.params)
        return next(iter(volumes.values())) if volumes else None

    def onCreateSegmentation(self):
        from scripted_models.labels import SUBREGION_COLORS, SUBREGION_NAMES

        reference = self.referenceVolume()
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lesion mask")
        seg.CreateDefaultDisplayNodes()
        if reference is not None:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for value, name in SUBREGION_NAMES.items():
            seg.GetSegmentation().AddEmptySegment("", name, list(SUBREGION_COLORS[value]))
        self.params.useLabelmap = False
        self.params.maskSegmentation = seg
        self.onEditSegmentation()

    def onEditSegmentation(self):
        seg = self.params.maskSegmentation
        if seg is None:
            return self.onCreateSegmentation()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg)
        reference = self.referenceVolume()
        if reference is not None:
            (editor.setSourceVolumeNode if hasattr(editor, "setSourceVolumeNode") else
             editor.setMasterVolumeNode)(reference)

    def onLoadMask(self):
        from scripted_models.volume import read_volume

        path = qt.QFileDialog.getOpenFileName(self.parent.parent if self.parent else None, "Load lesion mask", "",
                                              "Images (*.nii *.nii.gz *.nrrd *.mha *.mhd);;All files (*)")
        if not path:
            return
        try:
            mask = read_volume(path)
        except InputError as exc:
            return self.showError(str(exc))
        import os

        name = os.path.basename(path).split(".")[0]
        node = self.logic.addVolumeNode(mask.with_array(mask.array.round().astype("int16")), name, labelmap=True)
        self.params.maskLabelmap = node
        self.params.useLabelmap = True

    def onLoadSampleData(self):
        try:
            with slicer.util.WaitCursor():
                t1, seg = self.logic.loadSampleData()
        except InputError as exc:
            return self.showError(str(exc))
        self.params.t1Volume, self.params.maskSegmentation, self.params.useLabelmap = t1, seg, False
        slicer.util.setSliceViewerLayers(background=t1, fit=True)

    # --- running -----------------------------------------------------------------------------------------------------
    def showError(self, message: str) -> None:
        self.ui.statusLabel.setText(f"<span style='color:#c0392b'>{message}</span>")
        slicer.util.errorDisplay(message, windowTitle="PathoSyn")

    def onSynthesizeClicked(self):
        if self._runner is not None and self._runner.running:
            return self.cancel()
        self.start("synthesize")

    def onPseudoHealthyClicked(self):
        if self._runner is not None and self._runner.running:
            return self.cancel()
        self.start("pseudo-healthy")

    def start(self, command: str) -> None:
        if not self.ensureDependencies():
            return
        params = self.params
        try:
            self._job = self.logic.createJob(P.inputVolumes(params), P.maskNode(params), seed=params.seed,
                                             samples=params.samples, steps=P.effectiveSteps(params),
                                             guidance=params.guidance, device=params.device, command=command)
        except (InputError, WeightsError) as exc:
            return self.showError(str(exc))
        self._runner = CLIRunner(self._job.argv, engineRoot=engineRoot(), onProgress=self.onProgress,
                                 onDone=self.onDone, onError=self.showError, onFinished=self.onFinished)
        try:
            self._runner.start()
        except OSError as exc:
            self._job.cleanup()
            self._runner = self._job = None
            return self.showError(f"cannot start the synthesis process: {exc}")
        button = self.ui.synthesizeButton if command == "synthesize" else self.ui.pseudoHealthyButton
        other = self.ui.pseudoHealthyButton if command == "synthesize" else self.ui.synthesizeButton
        button.text = "Cancel"
        other.setEnabled(False)
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
                result = self.logic.loadJobOutputs(self._job)
        except (InputError, WeightsError, OSError) as exc:
            return self.showError(str(exc))
        if self._job.command == "synthesize":
            self.showResults(result)
            seconds = (result.report.get("timing_s") or {}).get("total")
            self.ui.statusLabel.setText(f"Done{f' in {seconds:.1f} s' if seconds else ''}: "
                                        f"{', '.join(n.GetName() for n in result.volumes.values())}")
        else:
            node = next(iter(result.values()))
            self.showCompare(self._job.prepared.nodes[next(iter(result))], node)
            self.ui.statusLabel.setText(f"Done: {node.GetName()}")

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
    def showCompare(self, inputNode, outputNode, segmentation=None):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, COMPARE_LAYOUT)
        layoutManager.setLayout(COMPARE_LAYOUT_ID)
        for name, node in (("Red", inputNode), ("Yellow", outputNode)):
            sliceWidget = layoutManager.sliceWidget(name)
            if sliceWidget is None:
                continue
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(node.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(True)
            sliceWidget.sliceLogic().FitSliceToBackground()
        if segmentation is not None:
            segmentation.GetDisplayNode().SetVisibility(True)
            seg = segmentation.GetSegmentation()
            if seg.GetNumberOfSegments():
                center = segmentation.GetSegmentCenterRAS(seg.GetNthSegmentID(0))
                slicer.modules.markups.logic().JumpSlicesToLocation(*center, True)
            threeD = layoutManager.threeDWidget(0)
            if threeD is not None:
                threeD.threeDView().resetFocalPoint()

    def showResults(self, result):
        mod = next(iter(result.volumes))
        self.showCompare(self._job.prepared.nodes[mod], result.volumes[mod], result.segmentation)


__all__ = ["PathoSynWidget"]
