"""PathoSyn module GUI (Qt; runs inside Slicer only). The work is done by logic.py and process.py."""
from __future__ import annotations

import functools
import importlib
import logging
import os

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from . import parameters as P
from .logic import (
    REQUIRED_PACKAGES,
    InputError,
    PathoSynSlicerLogic,
    WeightsError,
    dependencyMessage,
    dependencyProblems,
    showCompare,
    synthesisDoneMessage,
)
from .process import WorkerRunner, warmUpSharedWorker

INPUT_WIDGETS = ("t1VolumeSelector", "t1cVolumeSelector", "t2VolumeSelector", "flairVolumeSelector",
                 "maskSegmentationSelector", "maskLabelmapSelector", "useLabelmapCheckBox", "brainMaskSelector",
                 "createSegmentationButton",
                 "editSegmentationButton", "loadMaskButton", "loadSampleDataButton", "installDependenciesButton")


def reportErrors(title: str):
    """Decorator for Qt slots (tryWithErrorDisplay style): any exception is shown in a message box and the status
    line (one line; the traceback goes to the log) instead of only reaching the Python console."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (InputError, WeightsError) as exc:
                self.showError(str(exc))
            except Exception as exc:  # noqa: BLE001 - every failure must reach the user
                logging.exception("%s failed", title)
                self.showError(f"{title} failed: {type(exc).__name__}: {exc}")
            return None

        return wrapper

    return decorate


def installPythonPackages(problems: dict) -> None:
    """Install or upgrade the packages of `dependencyProblems()`. torch only through the PyTorch extension (a plain
    'pip install torch' pulls the multi-GB CUDA build on Linux). Raises RuntimeError with a one-line message."""
    if "torch" in problems:
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS PyTorch)
        except ImportError:
            raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer, then install the other packages here") from None
        spec = REQUIRED_PACKAGES["torch"][len("torch"):]
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=spec) is None:
            raise RuntimeError("PyTorch installation was not completed")
    rest = [p.requirement for name, p in problems.items() if name != "torch"]
    if rest:
        slicer.util.pip_install("--upgrade " + " ".join(f'"{r}"' for r in rest))
    importlib.invalidate_caches()


class JobPanel(VTKObservationMixin):
    """What both module panels share: the parameter node bound to the .ui, one background job at a time (progress
    bar, its button turned into Cancel, clean-up when it ends) and one-line errors. A panel sets `windowTitle` and
    `defaultVolumeField` and implements `updateGUI` and `onDone(payload)`; `runnerClass` is the background runner
    (the shared engine worker)."""

    windowTitle: str
    defaultVolumeField: str  # the parameter that takes the scene's first volume when it is empty
    runnerClass = WorkerRunner

    def __init__(self, ui, logic, parent=None):
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic
        self.parent = parent
        self._parameterNode = None
        self._guiConnection = None
        self._runner: WorkerRunner | None = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        ui.progressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    # --- parameter node ----------------------------------------------------------------------------------------------
    @property
    def params(self):
        return self._parameterNode

    @property
    def running(self) -> bool:
        return self._runner is not None and self._runner.running

    def initializeParameterNode(self) -> None:
        params = self.logic.getParameters()
        if self._parameterNode is not None and self._parameterNode.parameterNode is params.parameterNode:
            params = self._parameterNode  # one wrapper per parameter node (no new set of connectors per visit)
        if getattr(params, self.defaultVolumeField) is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                setattr(params, self.defaultVolumeField, first)
        self.setParameterNode(params)

    def setParameterNode(self, params) -> None:
        if self._parameterNode is not None and self._parameterNode is not params:
            self.disconnectGui()
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        if params is not None and self._parameterNode is not params:
            self.addObserver(params.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = params
        if params is not None:
            self.connectGui()
            self.parameterNodeConnected(params)
        self.updateGUI()

    def parameterNodeConnected(self, params) -> None:
        """Bind what the parameterNodeWrapper connectors cannot (none by default)."""

    def connectGui(self) -> None:
        if not P.HAVE_PARAMETER_NODE_WRAPPER or self._parameterNode is None or self._guiConnection is not None:
            return
        self._guiConnection = P.connectGui(self._parameterNode, self.ui)

    def disconnectGui(self) -> None:
        """Called by the module's exit() and cleanup(): the widgets stop writing to the parameter node."""
        if self._guiConnection is not None and self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiConnection)
        self._guiConnection = None

    def updateGUI(self, *_):
        raise NotImplementedError

    def onSceneStartClose(self, *_):
        self.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, *_):
        if self.parent is None or self.parent.isEntered:
            self.initializeParameterNode()

    def cleanup(self):
        self.cancel()
        self._timer.stop()
        self.disconnectGui()
        self.removeObservers()

    # --- the background job ------------------------------------------------------------------------------------------
    def showError(self, message: str) -> None:
        self.ui.statusLabel.setText(f"<span style='color:#c0392b'>{message}</span>")
        slicer.util.errorDisplay(message, windowTitle=self.windowTitle)

    def startJob(self, job, button, what: str) -> None:
        """Run `job.argv` in the background; `button` becomes Cancel until the job ends."""
        self._job = job
        self._runner = self.runnerClass(job.argv, onProgress=self.onProgress, onDone=self.onDone,
                                        onError=self.showError, onFinished=self.onFinished)
        try:
            self._runner.start()
        except OSError as exc:
            job.cleanup()
            self._runner = self._job = None
            self.showError(f"cannot start the {what} process: {exc}")
            return
        button.text = "Cancel"
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText("Starting...")
        self.updateGUI()
        self._timer.start()

    @reportErrors("Reading the results")
    def _poll(self):
        if self._runner is None or not self._runner.poll():
            self._timer.stop()

    def onProgress(self, fraction: float, message: str):
        self.ui.progressBar.setValue(int(1000 * fraction))
        self.ui.statusLabel.setText(message)

    def onDone(self, payload: dict):
        raise NotImplementedError

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
        if self.running:
            self._runner.cancel()


class PathoSynWidget(JobPanel):
    """Binds the .ui to the parameter node and runs the engine in a background process."""

    windowTitle = "PathoSyn"
    defaultVolumeField = "t1Volume"

    def __init__(self, ui, logic: PathoSynSlicerLogic | None = None, parent=None):
        JobPanel.__init__(self, ui, logic or PathoSynSlicerLogic(), parent)
        self._problems = {}  # dependencyProblems()
        ui.synthesizeButton.connect("clicked(bool)", self.onSynthesizeClicked)
        ui.pseudoHealthyButton.connect("clicked(bool)", self.onPseudoHealthyClicked)
        ui.createSegmentationButton.connect("clicked(bool)", self.onCreateSegmentation)
        ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        ui.loadMaskButton.connect("clicked(bool)", self.onLoadMask)
        ui.loadSampleDataButton.connect("clicked(bool)", self.onLoadSampleData)
        ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        # no torch import here (seconds, and CUDA initialisation in the GUI process): the child picks the device
        ui.deviceInfoLabel.setText("GPU: 'auto' uses CUDA when the background process finds one")
        self.updateDependencies()
        if not self._problems:  # the engine worker loads the models while the user prepares the inputs
            warmUpSharedWorker()
        self.initializeParameterNode()

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
        running = self.running
        command = self._job.command if running and self._job is not None else None
        # while a job runs only its own button (now "Cancel") is enabled, and the inputs are locked
        self.ui.synthesizeButton.setEnabled(command == "synthesize" if running else ready)
        self.ui.pseudoHealthyButton.setEnabled(command == "pseudo-healthy" if running else ready)
        for name in INPUT_WIDGETS:
            widget = getattr(self.ui, name, None)
            if widget is not None:
                widget.setEnabled(not running)
        if not running:
            self.ui.installDependenciesButton.setEnabled(bool(self._problems))
            self.ui.synthesizeButton.text = "Synthesize lesion"
            self.ui.pseudoHealthyButton.text = "Pseudo-healthy"
            self.ui.synthesizeButton.toolTip = ("Add a synthetic lesion" if ready else
                                                "Select at least one healthy scan and a lesion mask")

    # --- dependencies ----------------------------------------------------------------------------------------------
    def updateDependencies(self) -> None:
        self._problems = dependencyProblems(include_sample_data=True)  # nilearn: the teaching sample
        self.ui.dependenciesLabel.setText(
            "All Python packages are installed." if not self._problems else
            dependencyMessage(self._problems).split(" (install")[0] + ". They are installed after you confirm.")
        self.ui.installDependenciesButton.setEnabled(bool(self._problems))
        self.ui.dependenciesCollapsibleButton.collapsed = not self._problems

    def ensureDependencies(self, includeSampleData: bool = False) -> bool:
        problems = dependencyProblems(include_sample_data=includeSampleData)
        if not problems:
            return True
        lines = "\n".join(f"  - {p.describe()}" for p in problems.values())
        if not slicer.util.confirmOkCancelDisplay(
                f"PathoSyn needs these Python packages:\n{lines}\n"
                "Install them now? (This downloads several hundred MB and may take a few minutes.)",
                windowTitle="PathoSyn: install dependencies"):
            return False
        return self.installDependencies(problems, includeSampleData)

    @reportErrors("Installing dependencies")
    def onInstallDependencies(self, *_):
        self.ensureDependencies(includeSampleData=True)

    def installDependencies(self, problems: dict, includeSampleData: bool = False) -> bool:
        try:
            with slicer.util.WaitCursor():
                installPythonPackages(problems)
        except Exception as exc:  # noqa: BLE001 - show any installer failure
            logging.exception("PathoSyn: installing dependencies failed")
            slicer.util.errorDisplay(f"Installing dependencies failed: {exc}", windowTitle="PathoSyn")
            return False
        finally:
            self.updateDependencies()
        left = dependencyProblems(include_sample_data=includeSampleData)
        if left:
            slicer.util.errorDisplay(dependencyMessage(left) + "\nRestart Slicer if a package was upgraded.",
                                     windowTitle="PathoSyn")
        return not left

    # --- mask helpers ------------------------------------------------------------------------------------------------
    def referenceVolume(self):
        volumes = P.inputVolumes(self.params)
        return next(iter(volumes.values())) if volumes else None

    @reportErrors("Creating the mask")
    def onCreateSegmentation(self, *_):
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

    @reportErrors("Editing the mask")
    def onEditSegmentation(self, *_):
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

    @reportErrors("Loading the mask")
    def onLoadMask(self, *_):
        """A labelmap or segmentation file through Slicer's readers (NRRD/NIfTI/.seg.nrrd, DICOM via Add Data)."""
        path = qt.QFileDialog.getOpenFileName(self.parent.parent if self.parent else None, "Load lesion mask", "",
                                              "Masks (*.seg.nrrd *.nii *.nii.gz *.nrrd *.mha *.mhd);;All files (*)")
        if not path:
            return
        with slicer.util.WaitCursor():
            if path.endswith(".seg.nrrd"):
                node = slicer.util.loadSegmentation(path)
                self.params.maskSegmentation, self.params.useLabelmap = node, False
            else:
                node = slicer.util.loadLabelVolume(path, {"name": os.path.basename(path).split(".")[0]})
                self.params.maskLabelmap, self.params.useLabelmap = node, True

    @reportErrors("Loading the teaching sample")
    def onLoadSampleData(self, *_):
        if not self.ensureDependencies(includeSampleData=True):
            return
        with slicer.util.WaitCursor():
            t1, seg = self.logic.loadSampleData()
        self.params.t1Volume, self.params.maskSegmentation, self.params.useLabelmap = t1, seg, False
        slicer.util.setSliceViewerLayers(background=t1, fit=True)

    # --- running -----------------------------------------------------------------------------------------------------
    @reportErrors("Synthesis")
    def onSynthesizeClicked(self, *_):
        self.startOrCancel("synthesize")

    @reportErrors("Pseudo-healthy")
    def onPseudoHealthyClicked(self, *_):
        self.startOrCancel("pseudo-healthy")

    def startOrCancel(self, command: str) -> None:
        """A job's own button cancels it; the other button is disabled while it runs (and ignored here)."""
        if self.running:
            if self._job is not None and self._job.command == command:
                self.cancel()
            return
        self.start(command)

    def start(self, command: str) -> None:
        if not self.ensureDependencies():
            return
        params = self.params
        with slicer.util.WaitCursor():  # writes the inputs as NIfTI (seconds for 1 mm scans)
            job = self.logic.createJob(P.inputVolumes(params), P.maskNode(params), seed=params.seed,
                                       samples=params.samples, steps=P.effectiveSteps(params),
                                       guidance=params.guidance, device=params.device, command=command,
                                       populationPull=params.populationPull, keepBaseTexture=params.keepBaseTexture,
                                       brainMaskNode=params.brainMask)
        button = self.ui.synthesizeButton if command == "synthesize" else self.ui.pseudoHealthyButton
        self.startJob(job, button, "synthesis")

    @reportErrors("Loading the results")
    def onDone(self, payload: dict):
        with slicer.util.WaitCursor():
            result = self.logic.loadJobOutputs(self._job)
        if self._job.command == "synthesize":
            self.showResults(result)
            self.ui.statusLabel.setText(synthesisDoneMessage(result.report,
                                                             [n.GetName() for n in result.volumes.values()]))
        else:
            node = next(iter(result.values()))
            self.showCompare(self._job.prepared.nodes[next(iter(result))], node)
            self.ui.statusLabel.setText(f"Done: {node.GetName()}")

    # --- views -------------------------------------------------------------------------------------------------------
    def showCompare(self, inputNode, outputNode, segmentation=None):
        """Dedicated axial input/result views (logic.showCompare), fitted to the volumes, centred on the lesion."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        views = showCompare(slicer.mrmlScene, inputNode, outputNode, segmentation,
                            layoutManager.layoutLogic().GetLayoutNode())
        slicer.app.processEvents()  # let the layout manager create the view widgets
        for sliceNode in views.sliceNodes:
            sliceWidget = layoutManager.sliceWidget(sliceNode.GetLayoutName())
            if sliceWidget is not None:
                sliceWidget.sliceLogic().FitSliceToBackground()
        if segmentation is not None:
            seg = segmentation.GetSegmentation()
            if seg.GetNumberOfSegments():
                center = segmentation.GetSegmentCenterRAS(seg.GetNthSegmentID(0))
                slicer.modules.markups.logic().JumpSlicesToLocation(*center, True, views.sliceNodes[0].GetViewGroup())
            threeD = layoutManager.threeDWidget(views.viewNode.GetName())  # looked up by node name
            if threeD is not None:
                threeD.threeDView().resetFocalPoint()

    def showResults(self, result):
        mod = next(iter(result.volumes))
        self.showCompare(self._job.prepared.nodes[mod], result.volumes[mod], result.segmentation)


__all__ = ["PathoSynWidget"]
