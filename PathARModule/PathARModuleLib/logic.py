"""PathAR logic: PathAR samples -> MRML nodes, the linked compare layout, and masks handed to PathoSyn.

Qt-free, so it runs in Slicer and on the `slicer-core` wheel. Data flows one way: engine samples (arrays + patch
geometry) -> NEW volume and segmentation nodes, grouped in the subject hierarchy under one folder per run.

Python console (blocking)::

    from PathARModuleLib.logic import PathARModuleLogic
    logic = PathARModuleLogic()
    run = logic.generateSamples(["t1c", "flair"], n=4, seed=0, temperature=1.0)
    run.samples[0].volumes["flair"], run.samples[0].segmentation
    layout = logic.createLinkedLayout(run, pathoSynInput=getNode("T1"), pathoSynOutput=getNode("T1 synthesized"))
    logic.showModality(run, layout, "t1c")          # same structures, other contrast
    mask = logic.placeMask(run.samples[2].segmentation, getNode("T1"), pointRAS=[10, -20, 35])
    logic.useMaskInPathoSyn(mask, getNode("T1"))     # then "Synthesize lesion" in the PathoSyn module
    logic.exportFigure(layout, "/tmp/pathar.png")
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if importlib.util.find_spec("PathoSynSlicerLib") is None:  # a clone added with "Add module path" (one module only)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PathoSynSlicer"))

from PathoSynSlicerLib.logic import (  # noqa: E402 - PathoSyn's node helpers; also puts the engine on sys.path
    JobError,
    PathoSynSlicerLogic,
    _orientedArray,
    _segmentHasVoxels,
    applicationLayoutNode,
    arrayIJKToRAS,
    checkDependencies,
    nodesByClass,
    temporaryDirectory,
)

from scripted_models.errors import InputError, WeightsError  # noqa: E402
from scripted_models.labels import MODALITIES, PAINT_ORDER  # noqa: E402
from scripted_models.volume import Volume  # noqa: E402

MODULE_NAME = "PathARModule"
MAX_SAMPLES = 4
LAYOUT_ID_BASE = 50810  # + number of samples (1..4): one registered layout per row length
PATHOSYN_VIEW_GROUP, PATHAR_VIEW_GROUP = 5, 6
PATHOSYN_SLICE_TAGS = ("PathoSynInput", "PathoSynResult")
PATHOSYN_3D_TAG = "PathoSyn3D"

Progress = Callable[[float, str], None]

# Sample nodes are tagged, so that a run is found again after a scene reload and a deleted node is noticed
RUN_ATTRIBUTE = "PathAR.Run"  # the run's subject-hierarchy folder name (unique in the scene)
SAMPLE_ATTRIBUTE = "PathAR.Sample"  # 0, 1, ...
ROLE_ATTRIBUTE = "PathAR.Role"  # image | mask
MODALITY_ATTRIBUTE = "PathAR.Modality"
SEED_ATTRIBUTE, TEMPERATURE_ATTRIBUTE = "PathAR.Seed", "PathAR.Temperature"


def sliceTag(i: int) -> str:
    return f"PathARSlice{i + 1}"


def viewTag(i: int) -> str:
    return f"PathAR{i + 1}"


def _sliceView(tag: str, label: str, group: int, color: str) -> str:
    return (f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
            '<property name="orientation" action="default">Axial</property>'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewcolor" action="default">{color}</property>'
            f'<property name="viewgroup" action="default">{group}</property></view></item>')


def _threeDView(tag: str, label: str, group: int) -> str:
    return (f'<item><view class="vtkMRMLViewNode" singletontag="{tag}">'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewgroup" action="default">{group}</property></view></item>')


def segmentationCentreRAS(segmentation) -> list[float] | None:
    """Mean of the segments' centres (RAS), None without segments."""
    segs = segmentation.GetSegmentation()
    points = [segmentation.GetSegmentCenterRAS(segs.GetNthSegmentID(i)) for i in range(segs.GetNumberOfSegments())]
    points = [p for p in points if p is not None]
    return [float(v) for v in np.mean(points, axis=0)] if points else None


def layoutDescription(n: int) -> str:
    """PathoSyn input / result / 3D on the left; the PathAR samples as a row of 3D views over a row of slices."""
    left = (_sliceView(PATHOSYN_SLICE_TAGS[0], "In", PATHOSYN_VIEW_GROUP, "#F34A33")
            + _sliceView(PATHOSYN_SLICE_TAGS[1], "Out", PATHOSYN_VIEW_GROUP, "#EDD54C")
            + _threeDView(PATHOSYN_3D_TAG, "PS", PATHOSYN_VIEW_GROUP))
    views = "".join(_threeDView(viewTag(i), f"S{i + 1}", PATHAR_VIEW_GROUP) for i in range(n))
    slices = "".join(_sliceView(sliceTag(i), f"S{i + 1}", PATHAR_VIEW_GROUP, "#6E8FCB") for i in range(n))
    return ('<layout type="horizontal" split="true">'
            f'<item splitSize="300"><layout type="vertical">{left}</layout></item>'
            '<item splitSize="700"><layout type="vertical" split="true">'
            f'<item splitSize="600"><layout type="horizontal">{views}</layout></item>'
            f'<item splitSize="400"><layout type="horizontal">{slices}</layout></item>'
            '</layout></item></layout>')


def registerLayouts(layoutNode) -> None:
    """Register the PathAR layouts (1..4 samples) with a vtkMRMLLayoutNode. Called at startup (startupCompleted),
    so that a scene saved while one is shown reopens with its views (the scene stores only the layout id)."""
    for n in range(1, MAX_SAMPLES + 1):
        if not layoutNode.IsLayoutDescription(LAYOUT_ID_BASE + n):
            layoutNode.AddLayoutDescription(LAYOUT_ID_BASE + n, layoutDescription(n))


def _setParent(sh, node, parentItemID: int) -> None:
    """Put a data node under a subject-hierarchy folder (Slicer's GUI creates the item; headless we do)."""
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parentItemID)
    else:
        sh.CreateItem(parentItemID, node)


@dataclass
class SampleNodes:
    """One PathAR sample in the scene: one structure (segmentation) rendered in each modality (volumes)."""

    index: int
    volumes: dict = field(default_factory=dict)  # modality -> vtkMRMLScalarVolumeNode
    segmentation: object = None
    folderItemID: int = 0

    def nodes(self) -> list:
        return [*self.volumes.values(), *([self.segmentation] if self.segmentation is not None else [])]


@dataclass
class PathARRun:
    """The nodes of one "Generate samples" run, under one subject-hierarchy folder."""

    modalities: list
    seed: int
    temperature: float
    samples: list = field(default_factory=list)  # SampleNodes
    folderItemID: int = 0
    scene: object = None

    def nodes(self) -> list:
        return [node for sample in self.samples for node in sample.nodes()]

    def isIntact(self) -> bool:
        """False once one of the run's nodes was deleted (or the scene was closed)."""
        return bool(self.samples) and all(node is not None and node.GetScene() is not None
                                          and (self.scene is None or node.GetScene() is self.scene)
                                          for node in self.nodes())

    def checkIntact(self) -> None:
        if not self.isIntact():
            raise InputError("some nodes of this PathAR run were deleted: generate the samples again")

    def removeFromScene(self) -> None:
        """Remove the run's nodes and folders. Items go first: removing a data node under a folder and then the
        folder can hang when no GUI plugin cleans the item up (slicer-core)."""
        import slicer
        from PathoSynSlicerLib.logic import removeNodes

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene) if self.scene else None
        removeNodes(self.nodes())  # items, display and storage nodes too
        if sh is not None:
            for folder in [s.folderItemID for s in self.samples] + [self.folderItemID]:
                if folder:
                    sh.RemoveItem(folder, False, False)


@dataclass
class LinkedLayout:
    """The registered layout and its view nodes (created even without a GUI)."""

    layoutId: int
    sliceNodes: list  # PathAR slice nodes, one per sample
    viewNodes: list  # PathAR 3D view nodes, one per sample
    cameraNodes: list
    sliceCompositeNodes: list
    pathoSynSliceNodes: list
    pathoSynViewNode: object
    volumeRendering: bool = True  # each sample's image is volume-rendered in its 3D view, behind the surface


@dataclass
class SamplesJob:
    """A background `pathosyn sample` run: CLI arguments and its temporary output folder."""

    argv: list
    folder: Path
    modalities: list
    n: int
    seed: int
    temperature: float

    @property
    def outputDir(self) -> Path:
        return self.folder / "samples"

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PathARModuleLogic:
    """PathAR samples in, new MRML nodes out. Works on `slicer.mrmlScene` unless a scene is given."""

    def __init__(self, scene=None, appLogic=None):
        """appLogic: the application logic whose Volume Rendering module logic to use (e.g. trame-slicer's
        `SlicerApp.app_logic`); default: Slicer's, or `slicer.app_logic` headless."""
        self._scene = scene
        self._appLogic = appLogic
        self._pathoSyn = PathoSynSlicerLogic(scene)
        self.lastPlacement: dict = {}

    @property
    def scene(self):
        return self._pathoSyn.scene

    # --- parameter node ---------------------------------------------------------------------------------------------
    def getParameterNode(self):
        return self._pathoSyn.getParameterNode(MODULE_NAME)

    def getParameters(self):
        from .parameters import PathARParameterNode

        return PathARParameterNode(self.getParameterNode())

    # --- arguments -------------------------------------------------------------------------------------------------
    @staticmethod
    def checkArguments(modalities, n, seed, temperature) -> list[str]:
        from scripted_models.labels import check_modality

        if isinstance(modalities, str):
            modalities = [modalities]
        mods = []
        for m in modalities or []:
            key = check_modality(m)
            if key not in mods:
                mods.append(key)
        if not mods:
            raise InputError(f"choose at least one modality to render ({', '.join(MODALITIES)})")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_SAMPLES:
            raise InputError(f"number of samples must be 1 to {MAX_SAMPLES}, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature <= 0:
            raise InputError(f"temperature must be a number > 0, got {temperature!r}")
        return mods

    @staticmethod
    def checkAnatomyFrom(anatomyFrom) -> str:
        """"card" (the weights' default), "none" (each modality its own anatomy) or the modality all copy."""
        from .parameters import ANATOMY_CHOICES

        if anatomyFrom not in ANATOMY_CHOICES:
            raise InputError(f"anatomy must be one of {', '.join(ANATOMY_CHOICES)}, got {anatomyFrom!r}")
        return anatomyFrom

    # --- samples -> nodes --------------------------------------------------------------------------------------------
    def generateSamples(self, modalities, n: int = 4, seed: int = 0, temperature: float = 1.0,
                        topK: int | None = None, device: str = "auto", progress: Progress | None = None,
                        anatomyFrom: str = "card") -> PathARRun:
        """Sample n lesion structures and render each in every modality (blocking). Returns the new nodes.
        anatomyFrom: see checkAnatomyFrom. Raises InputError / WeightsError with a one-line message; the scene is
        then unchanged."""
        mods = self.checkArguments(modalities, n, seed, temperature)
        anatomyFrom = self.checkAnatomyFrom(anatomyFrom)
        checkDependencies()
        from scripted_models.pathar.api import sample_pairs

        pairs = sample_pairs(mods, n=int(n), seed=int(seed), temperature=float(temperature), top_k=topK,
                             device=device, progress=progress, anatomy_from=anatomyFrom)
        return self.addSampleNodes([(p.mask, p.images) for p in pairs], mods, int(seed), float(temperature))

    def createJob(self, modalities, n: int = 4, seed: int = 0, temperature: float = 1.0, device: str = "auto",
                  threads: int | None = None, workDir: str | None = None, anatomyFrom: str = "card") -> SamplesJob:
        """Arguments for a background `pathosyn sample` (run with PathoSynSlicerLib.process.CLIRunner), then
        loadJobOutputs(job). The scene is not touched until then."""
        mods = self.checkArguments(modalities, n, seed, temperature)
        anatomyFrom = self.checkAnatomyFrom(anatomyFrom)
        folder = Path(tempfile.mkdtemp(prefix="pathar-", dir=workDir or temporaryDirectory()))
        argv = ["sample", *[a for m in mods for a in ("--modality", m)], "--n", str(int(n)), "--seed",
                str(int(seed)), "--temperature", repr(float(temperature)), "--out", str(folder / "samples"),
                "--device", device, "--anatomy-from", anatomyFrom]
        if threads:
            argv += ["--threads", str(int(threads))]
        return SamplesJob(argv, folder, mods, int(n), int(seed), float(temperature))

    def loadJobOutputs(self, job: SamplesJob) -> PathARRun:
        from scripted_models.volume import read_volume

        pairs = []
        for i in range(job.n):
            folder = job.outputDir / f"sample_{i:03d}"
            absent = [f for f in ["mask.nii.gz", *[f"{m}.nii.gz" for m in job.modalities]]
                      if not (folder / f).is_file()]
            if absent:
                raise JobError(f"PathAR produced no complete sample {i} in {job.outputDir} "
                               f"({', '.join(absent)} missing)")
            mask = read_volume(folder / "mask.nii.gz")
            mask = mask.with_array(np.rint(mask.array).astype(np.uint8))
            pairs.append((mask, {m: read_volume(folder / f"{m}.nii.gz") for m in job.modalities}))
        return self.addSampleNodes(pairs, job.modalities, job.seed, job.temperature)

    def addSampleNodes(self, pairs: list, modalities: list, seed: int, temperature: float) -> PathARRun:
        """[(mask Volume, {modality: Volume})] -> nodes in a new subject-hierarchy folder. All or nothing."""
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        run = PathARRun(list(modalities), seed, temperature, scene=self.scene)
        try:
            name = self.scene.GenerateUniqueName(f"PathAR seed {seed} T {temperature:g}")
            run.folderItemID = sh.CreateFolderItem(sh.GetSceneItemID(), name)
            for i, (mask, images) in enumerate(pairs):
                sample = SampleNodes(index=i)
                run.samples.append(sample)
                sample.folderItemID = sh.CreateFolderItem(run.folderItemID, f"sample {i}")
                for mod in modalities:
                    node = self._pathoSyn.addVolumeNode(images[mod], f"PathAR s{i} {mod}")
                    sample.volumes[mod] = node
                    self._tag(node, name, i, "image", seed, temperature, mod)
                    _setParent(sh, node, sample.folderItemID)
                sample.segmentation = self._pathoSyn.addSegmentationNode(
                    np.asarray(mask.array, np.uint8), mask.ijk_to_ras(), f"PathAR s{i} mask", wholeLesion=False,
                    referenceNode=sample.volumes[modalities[0]])
                self._tag(sample.segmentation, name, i, "mask", seed, temperature)
                _setParent(sh, sample.segmentation, sample.folderItemID)
        except BaseException:
            run.removeFromScene()
            raise
        return run

    @staticmethod
    def _tag(node, run: str, index: int, role: str, seed: int, temperature: float, modality: str | None = None):
        node.SetAttribute(RUN_ATTRIBUTE, run)
        node.SetAttribute(SAMPLE_ATTRIBUTE, str(index))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(SEED_ATTRIBUTE, str(int(seed)))
        node.SetAttribute(TEMPERATURE_ATTRIBUTE, repr(float(temperature)))
        if modality:
            node.SetAttribute(MODALITY_ATTRIBUTE, modality)

    def runFromScene(self) -> PathARRun | None:
        """The most recent complete PathAR run in the scene, rebuilt from the node attributes (e.g. after loading a
        saved scene). None if there is none, or if a node of the latest run is missing."""
        import slicer

        runs: dict = {}
        last: dict = {}  # run -> position of its last node in the scene (nodes are kept in the order they were added)
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            run = node.GetAttribute(RUN_ATTRIBUTE)
            if run is not None:
                runs.setdefault(run, []).append(node)
                last[run] = i
        if not runs:
            return None
        members = runs[max(last, key=last.get)]
        first = members[0]
        modalities = [m for m in MODALITIES if any(n.GetAttribute(MODALITY_ATTRIBUTE) == m for n in members)]
        run = PathARRun(modalities, int(first.GetAttribute(SEED_ATTRIBUTE) or 0),
                        float(first.GetAttribute(TEMPERATURE_ATTRIBUTE) or 1.0), scene=self.scene)
        indices = sorted({int(n.GetAttribute(SAMPLE_ATTRIBUTE)) for n in members})
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        for index in indices:
            sample = SampleNodes(index=index)
            for node in members:
                if int(node.GetAttribute(SAMPLE_ATTRIBUTE)) != index:
                    continue
                if node.GetAttribute(ROLE_ATTRIBUTE) == "mask":
                    sample.segmentation = node
                else:
                    sample.volumes[node.GetAttribute(MODALITY_ATTRIBUTE)] = node
            if sample.segmentation is None or set(sample.volumes) != set(modalities):
                return None
            item = sh.GetItemByDataNode(sample.segmentation) if sh is not None else 0
            sample.folderItemID = sh.GetItemParent(item) if item else 0
            run.samples.append(sample)
        if indices != list(range(len(indices))):
            return None
        if sh is not None and run.samples[0].folderItemID:
            run.folderItemID = sh.GetItemParent(run.samples[0].folderItemID)
        return run

    # --- linked layout -----------------------------------------------------------------------------------------------
    def _layoutNode(self):
        """Slicer's layout node; headless, the one of the shared vtkMRMLLayoutLogic on the scene."""
        return applicationLayoutNode(self.scene)

    def _viewNode(self, tag: str, cls: str):
        node = self.scene.GetSingletonNode(tag, cls)
        if node is None:
            raise InputError(f"the layout did not create the view '{tag}'")
        return node

    def _compositeNode(self, tag: str):
        from PathoSynSlicerLib.logic import _compositeNodeFor

        return _compositeNodeFor(self.scene, tag)

    def _cameraNode(self, tag: str):
        for node in nodesByClass(self.scene, "vtkMRMLCameraNode"):
            if node.GetLayoutName() == tag:
                return node
        import slicer

        node = slicer.vtkMRMLCameraNode()
        node.SetName(self.scene.GenerateUniqueName(f"Camera {tag}"))
        node.SetLayoutName(tag)
        return self.scene.AddNode(node)

    def createLinkedLayout(self, run: PathARRun | None = None, numberOfSamples: int | None = None,
                           pathoSynInput=None, pathoSynOutput=None, pathoSynSegmentation=None,
                           modality: str | None = None, volumeRendering: bool = True) -> LinkedLayout:
        """Register and show the compare layout: PathoSyn input/result (+3D) on the left, one linked 3D view and one
        linked slice view per PathAR sample on the right. Cameras of the sample views are linked, and so are their
        slice views (separately from the PathoSyn pair). With volumeRendering, each 3D view also volume-renders its
        sample's image (the displayed modality) behind the semi-transparent segmentation surface.
        Returns the view nodes."""
        n = numberOfSamples or (len(run.samples) if run is not None else MAX_SAMPLES)
        if not 1 <= n <= MAX_SAMPLES:
            raise InputError(f"the layout shows 1 to {MAX_SAMPLES} samples, got {n}")
        if run is not None:
            run.checkIntact()
        for node, what in ((pathoSynInput, "input"), (pathoSynOutput, "result"), (pathoSynSegmentation, "lesion")):
            if node is not None and node.GetScene() is not self.scene:
                raise InputError(f"the PathoSyn {what} '{node.GetName()}' is no longer in the scene")
        layoutNode = self._layoutNode()
        registerLayouts(layoutNode)
        layoutNode.SetViewArrangement(LAYOUT_ID_BASE + n)
        layout = self.linkViews(n, volumeRendering)
        self.showPathoSyn(layout, pathoSynInput, pathoSynOutput, pathoSynSegmentation)
        if run is not None:
            self.showModality(run, layout, modality or run.modalities[0])
        return layout

    def linkViews(self, n: int, volumeRendering: bool = True) -> LinkedLayout:
        """Link the existing view nodes of the layout (tags PathARSlice<i>, PathAR<i>, PathoSynInput/Result/3D):
        samples in one view group, the PathoSyn pair in another. Used by createLinkedLayout, and by front ends that
        create these views themselves (the browser front end)."""
        layoutId = LAYOUT_ID_BASE + n
        sliceNodes = [self._viewNode(sliceTag(i), "vtkMRMLSliceNode") for i in range(n)]
        viewNodes = [self._viewNode(viewTag(i), "vtkMRMLViewNode") for i in range(n)]
        composites = [self._compositeNode(sliceTag(i)) for i in range(n)]
        cameras = [self._cameraNode(viewTag(i)) for i in range(n)]
        pathoSynSlices = [self._viewNode(tag, "vtkMRMLSliceNode") for tag in PATHOSYN_SLICE_TAGS]
        pathoSynView = self._viewNode(PATHOSYN_3D_TAG, "vtkMRMLViewNode")
        for node in [*sliceNodes, *viewNodes]:
            node.SetViewGroup(PATHAR_VIEW_GROUP)
        for node in [*pathoSynSlices, pathoSynView]:
            node.SetViewGroup(PATHOSYN_VIEW_GROUP)
        for node in [*composites, *[self._compositeNode(t) for t in PATHOSYN_SLICE_TAGS]]:
            node.SetLinkedControl(True)
            node.SetHotLinkedControl(False)
        for node in viewNodes:
            node.SetLinkedControl(True)
            node.SetBoxVisible(False)
            node.SetAxisLabelsVisible(False)
        return LinkedLayout(layoutId, sliceNodes, viewNodes, cameras, composites, pathoSynSlices, pathoSynView,
                            volumeRendering)

    def pathoSynResult(self) -> tuple:
        """(input, synthesized volume, lesion segmentation) of the latest PathoSyn synthesis in the scene, found by
        the PathoSyn.Role / PathoSyn.Run node attributes (not by name, which gets "_1" suffixes)."""
        return self._pathoSyn.latestSynthesis()

    def showPathoSyn(self, layout: LinkedLayout, inputNode=None, outputNode=None, segmentation=None) -> None:
        """PathoSyn input and result in the left slice pair; its lesion segmentation in the left 3D view."""
        for tag, node in zip(PATHOSYN_SLICE_TAGS, (inputNode, outputNode)):
            self._compositeNode(tag).SetBackgroundVolumeID(node.GetID() if node is not None else None)
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            display = segmentation.GetDisplayNode()
            if not display.GetNumberOfViewNodeIDs():
                # empty = every view. Keep it in every view that exists (Red, Yellow, 3D view 1, ...) but not in the
                # sample views: restricting it to the PathAR views would hide it everywhere else, also after saving
                sampleViews = {node.GetID() for node in (*layout.viewNodes, *layout.sliceNodes)}
                for cls in ("vtkMRMLSliceNode", "vtkMRMLViewNode"):
                    for view in nodesByClass(self.scene, cls):
                        if view.GetID() not in sampleViews and not (view.GetLayoutName() or "").startswith("PathAR"):
                            display.AddViewNodeID(view.GetID())
            for node in (*layout.pathoSynSliceNodes, layout.pathoSynViewNode):
                display.AddViewNodeID(node.GetID())
            centre = segmentationCentreRAS(segmentation)
            for node in layout.pathoSynSliceNodes:
                node.JumpSliceByCentering(*centre)

    def showModality(self, run: PathARRun, layout: LinkedLayout, modality: str) -> None:
        """Show `modality` as the background of every sample's slice view. The segmentations (the structure) are
        not touched: one structure, rendered in another contrast."""
        run.checkIntact()
        if modality not in run.modalities:
            raise InputError(f"modality '{modality}' was not generated in this run ({', '.join(run.modalities)})")
        if len(run.samples) > len(layout.sliceNodes):
            raise InputError(f"the layout has {len(layout.sliceNodes)} sample views but the run has "
                             f"{len(run.samples)} samples")
        for i, sample in enumerate(run.samples):
            layout.sliceCompositeNodes[i].SetBackgroundVolumeID(sample.volumes[modality].GetID())
            layout.sliceCompositeNodes[i].SetLabelVolumeID(None)
            display = sample.segmentation.GetDisplayNode()
            display.SetViewNodeIDs([layout.viewNodes[i].GetID(), layout.sliceNodes[i].GetID()])
            display.SetVisibility2DFill(True)
            display.SetOpacity2DFill(0.35)
            display.SetOpacity3D(0.6 if layout.volumeRendering else 1.0)
            for mod, volume in sample.volumes.items():
                shown = layout.volumeRendering and mod == modality
                self.setVolumeRendering(volume, layout.viewNodes[i] if shown else None)
        self._aimViews(run, layout)

    # --- volume rendering --------------------------------------------------------------------------------------------
    def _volumeRenderingLogic(self):
        """Slicer's Volume Rendering module logic; headless, one registered with the application logic."""
        import slicer

        from .offscreen import applicationLogic

        modules = getattr(slicer, "modules", None)
        if self._appLogic is None and modules is not None and hasattr(modules, "volumerendering"):
            return modules.volumerendering.logic()
        appLogic = self._appLogic or applicationLogic(self.scene)
        logic = appLogic.GetModuleLogic("VolumeRendering")
        if logic is None:
            logic = slicer.vtkSlicerVolumeRenderingLogic()
            logic.SetMRMLApplicationLogic(appLogic)
            logic.SetMRMLScene(self.scene)
            appLogic.SetModuleLogic("VolumeRendering", logic)
        return logic

    def setVolumeRendering(self, volumeNode, viewNode=None):
        """Volume-render `volumeNode` in `viewNode` only (None hides it). The transfer function shows the brightest
        tissue of the patch (98th percentile and up) as a translucent warm glow, so the lesion surface stays
        visible. Returns the display node, or None when the volume has none and is to be hidden."""
        vrLogic = self._volumeRenderingLogic()
        display = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
        if viewNode is None:
            if display is not None:
                display.SetVisibility(False)
            return display
        if display is None:
            display = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
            self._brightTissueTransferFunction(volumeNode, display.GetVolumePropertyNode())
        display.SetViewNodeIDs([viewNode.GetID()])
        display.SetVisibility(True)
        return display

    @staticmethod
    def _brightTissueTransferFunction(volumeNode, propertyNode) -> None:
        from vtkmodules.util.numpy_support import vtk_to_numpy
        from vtkmodules.vtkCommonDataModel import vtkPiecewiseFunction
        from vtkmodules.vtkRenderingCore import vtkColorTransferFunction

        values = vtk_to_numpy(volumeNode.GetImageData().GetPointData().GetScalars())
        low, high = (float(v) for v in np.percentile(values, [98.0, 99.9]))
        high = max(high, low + 1e-3)
        opacity = vtkPiecewiseFunction()
        opacity.AddPoint(low, 0.0)
        opacity.AddPoint(high, 0.35)
        colors = vtkColorTransferFunction()
        colors.AddRGBPoint(low, 0.55, 0.25, 0.1)
        colors.AddRGBPoint(high, 1.0, 0.85, 0.6)
        # through the MRML node: it re-observes the new functions, so later edits (Volume Rendering module) refresh
        propertyNode.SetScalarOpacity(opacity)
        propertyNode.SetColor(colors)
        propertyNode.GetVolumeProperty().SetShade(False)

    def _aimViews(self, run: PathARRun, layout: LinkedLayout) -> None:
        """Centre slices and cameras on the samples' common patch (same geometry for every sample), at the mean of
        their lesion centres: the linked slices then cut every sample's lesion, not only the first one's."""
        first = next(iter(run.samples[0].volumes.values()))
        bounds = [0.0] * 6
        first.GetRASBounds(bounds)
        centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
        size = max(bounds[2 * a + 1] - bounds[2 * a] for a in range(3))
        centres = [c for c in (segmentationCentreRAS(s.segmentation) for s in run.samples) if c is not None]
        lesion = list(np.mean(centres, axis=0)) if centres else centre
        for node in layout.sliceNodes:
            node.SetFieldOfView(size, size, node.GetFieldOfView()[2])
            node.JumpSliceByCentering(*lesion)
        for camera in layout.cameraNodes:
            camera.SetFocalPoint(*lesion)
            camera.SetPosition(lesion[0] + 0.9 * size, lesion[1] + 0.9 * size, lesion[2] + 0.6 * size)
            camera.SetViewUp(0.0, 0.0, 1.0)

    # --- masks -> PathoSyn -------------------------------------------------------------------------------------------
    def labelsFromSegmentation(self, segmentationNode) -> Volume:
        """Canonical labels of a segmentation on its own geometry (segments mapped by name, as in PathoSyn)."""
        import slicer
        from vtkmodules.vtkCommonCore import vtkIntArray, vtkStringArray

        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError("choose a PathAR sample segmentation to place")
        mapping = self._pathoSyn.segmentSubregions(segmentationNode)
        ids, values = vtkStringArray(), vtkIntArray()
        for sid, value in sorted(mapping.items(), key=lambda kv: PAINT_ORDER[kv[1]]):
            ids.InsertNextValue(sid)
            values.InsertNextValue(int(value))
        merged = slicer.vtkOrientedImageData()
        if not segmentationNode.GenerateMergedLabelmapForAllSegments(
                merged, slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS, None, ids, values):
            raise InputError(f"cannot export the segmentation '{segmentationNode.GetName()}'")
        labels = _orientedArray(merged)
        if not labels.any():
            raise InputError(f"the segmentation '{segmentationNode.GetName()}' is empty")
        from vtkmodules.vtkCommonMath import vtkMatrix4x4

        m = vtkMatrix4x4()
        merged.GetImageToWorldMatrix(m)
        ijkToRAS = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        ext = merged.GetExtent()
        ijkToRAS[:3, 3] = (ijkToRAS @ np.array([ext[0], ext[2], ext[4], 1.0]))[:3]  # extent may not start at 0
        return Volume.from_ijk_to_ras(labels.astype(np.uint8), ijkToRAS)

    def placeMask(self, sampleSegmentation, targetVolume, pointRAS, addTo=None):
        """A NEW segmentation on `targetVolume`'s grid: the sample's lesion moved so its centroid is at `pointRAS`
        (world RAS, as a markups click; resampled nearest-neighbour). Parts outside the volume are clipped with a
        warning; the lost fraction is in `self.lastPlacement`. With `addTo` (the current lesion mask: segmentation
        or labelmap; one with nothing painted adds nothing), the new segmentation also holds that mask's lesions,
        so one synthesis makes them all; where they overlap, nested sub-regions win (labels.PAINT_ORDER). Raises
        InputError (scene unchanged) for a point outside the volume, no target, or a whole-lesion mask to add
        sub-regions to."""
        from scripted_models.placement import place_lesion, ras_to_lps

        if targetVolume is None or not targetVolume.IsA("vtkMRMLScalarVolumeNode") \
                or targetVolume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError("no healthy scan loaded: choose the target volume for the lesion")
        if targetVolume.GetImageData() is None:
            raise InputError(f"volume '{targetVolume.GetName()}' has no voxels")
        if pointRAS is None or len(pointRAS) != 3 or not np.all(np.isfinite(np.asarray(pointRAS, float))):
            raise InputError("click a point (markups) inside the healthy scan to place the lesion")
        target = self._pathoSyn.volumeFromNode(targetVolume)
        lesion = self.labelsFromSegmentation(sampleSegmentation)
        pointRAS = [float(v) for v in pointRAS]
        if targetVolume.GetParentTransformNode() is not None:  # a click is in world RAS, the grid in the volume's own
            from vtkmodules.vtkCommonTransforms import vtkGeneralTransform

            fromWorld = vtkGeneralTransform()
            targetVolume.GetParentTransformNode().GetTransformFromWorld(fromWorld)
            pointRAS = list(fromWorld.TransformPoint(pointRAS))
        try:
            placed, info = place_lesion(lesion, target, ras_to_lps(pointRAS))
        except InputError as exc:
            raise InputError(f"{exc} '{targetVolume.GetName()}'" if "outside the target volume" in str(exc)
                             else str(exc)) from None
        if info["lost_fraction"] > 0:
            info["warning"] = (f"{100 * info['lost_fraction']:.1f}% of the lesion lies outside "
                               f"'{targetVolume.GetName()}' and was clipped")
            logging.warning("PathAR: %s", info["warning"])
        labels, whole, name = placed.array, False, f"{sampleSegmentation.GetName()} placed"
        if addTo is not None and _holdsLesion(addTo):
            labels, whole = self._addToMask(addTo, target, targetVolume, labels)
            name = f"{addTo.GetName()} + {name}"
        self.lastPlacement = info
        return self._pathoSyn.addSegmentationNode(labels, arrayIJKToRAS(targetVolume), name, wholeLesion=whole,
                                                  referenceNode=targetVolume)

    def _addToMask(self, maskNode, target: Volume, targetVolume, placed: np.ndarray) -> tuple[np.ndarray, bool]:
        """(canonical labels of `maskNode` on the target grid with `placed` drawn in, whole-lesion flag)."""
        from scripted_models.labels import is_whole_lesion_only, to_canonical
        from scripted_models.volume import resample_to

        mask, whole = self._pathoSyn.maskFromNode(maskNode, targetVolume)
        current = to_canonical(resample_to(mask, target).array)  # a labelmap keeps its own grid and label values
        if not current.any():
            raise InputError(f"the lesion mask '{maskNode.GetName()}' has no voxels inside '{targetVolume.GetName()}'")
        if is_whole_lesion_only(current) if whole is None else whole:
            if placed.max() > 1:
                raise InputError(f"'{maskNode.GetName()}' is a whole lesion (the model invents its sub-regions) and "
                                 "the PathAR lesion has sub-regions: paint core / edema / enhancing, or place it alone")
            return ((current > 0) | (placed > 0)).astype(np.uint8), True
        rank = np.array([-1] + [PAINT_ORDER[v] for v in (1, 2, 3)])  # by canonical value; healthy lowest
        return np.where(rank[placed] > rank[current], placed, current).astype(np.uint8), False

    def pathoSynMask(self):
        """The PathoSyn module's current lesion mask node (segmentation or labelmap), or None."""
        from PathoSynSlicerLib.parameters import maskNode

        return maskNode(self._pathoSyn.getParameters())

    def useMaskInPathoSyn(self, maskSegmentation, targetVolume, modality: str = "t1"):
        """Make the placed mask and its target volume (as `modality`) the PathoSyn module's inputs. The other
        modality fields are cleared, so that no scan of another subject is mixed in, unless the target already is
        PathoSyn's `modality` scan (they were chosen with it). Returns its parameters."""
        from PathoSynSlicerLib.parameters import MODALITY_FIELDS

        from scripted_models.labels import check_modality

        if maskSegmentation is None or targetVolume is None:
            raise InputError("place a PathAR mask in a healthy scan first")
        modality = check_modality(modality)
        params = self._pathoSyn.getParameters()
        if getattr(params, MODALITY_FIELDS[modality]) is not targetVolume:
            for mod, attr in MODALITY_FIELDS.items():
                setattr(params, attr, targetVolume if mod == modality else None)
        params.maskSegmentation = maskSegmentation
        params.useLabelmap = False
        return params

    # --- figure ------------------------------------------------------------------------------------------------------
    def exportFigure(self, layout: LinkedLayout, path, size=(360, 360), includeSlices: bool = True) -> Path:
        """Render the sample views offscreen (3D row over the slice row) into a PNG. Returns the path."""
        from .offscreen import renderViews, savePNG

        tiles = renderViews(self.scene, layout, size, includeSlices)
        return savePNG(tiles, path)


def _holdsLesion(maskNode) -> bool:
    """Whether a segmentation or labelmap node has any lesion voxel (a new, unpainted mask has none)."""
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        segmentation = maskNode.GetSegmentation()
        return any(_segmentHasVoxels(segmentation, segmentation.GetNthSegmentID(i))
                   for i in range(segmentation.GetNumberOfSegments()))
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = maskNode.GetImageData() if maskNode.IsA("vtkMRMLScalarVolumeNode") else None
    scalars = image.GetPointData().GetScalars() if image is not None else None
    return scalars is not None and bool(vtk_to_numpy(scalars).any())


__all__ = ["InputError", "JobError", "LinkedLayout", "PathARModuleLogic", "PathARRun", "SampleNodes", "SamplesJob",
           "WeightsError", "layoutDescription", "registerLayouts"]
