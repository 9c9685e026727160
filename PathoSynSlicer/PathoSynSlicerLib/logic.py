"""PathoSyn logic: MRML nodes <-> the PathoSyn engine. Qt-free, so it runs in Slicer and on the `slicer-core` wheel.

Data flows one way: scene nodes -> `Volume` (voxels + IJK-to-RAS) -> engine -> arrays -> NEW scene nodes.
Inputs are never modified; on any error nothing is added to the scene.

Python console (blocking)::

    from PathoSynSlicerLib.logic import PathoSynSlicerLogic
    logic = PathoSynSlicerLogic()
    result = logic.synthesize(getNode("T1"), getNode("Segmentation"), modality="t1", seed=0, steps=5)
    result.volumes["t1"], result.residuals["t1"], result.segmentation

A cohort from a manifest (same engine as `pathosyn batch`; resumable; results loaded on request)::

    result = logic.batch("/data/cohort.csv", "/data/synthetic", workers=2, loadResults=True)

Batch over several files by hand (each case: load, synthesize, save, clear)::

    import glob, os
    from scripted_models.volume import read_volume, write_volume
    for path in sorted(glob.glob("/data/healthy/*_t1.nii.gz")):
        t1 = logic.addVolumeNode(read_volume(path), os.path.basename(path))
        mask = logic.addVolumeNode(read_volume("/data/lesion.nii.gz"), "mask", labelmap=True)
        for seed in range(3):
            out = logic.synthesize({"t1": t1}, mask, seed=seed, samples=1)
            write_volume(logic.volumeFromNode(out.volumes["t1"]), path.replace(".nii.gz", f"_les{seed}.nii.gz"))
            out.removeFromScene()
        slicer.mrmlScene.RemoveNode(t1); slicer.mrmlScene.RemoveNode(mask)
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _ensureEngineImportable() -> None:
    """The engine `scripted_models` is installed next to the module (built extension) or lives in the repository
    root (a clone added with "Add module path")."""
    if importlib.util.find_spec("scripted_models") is not None:
        return
    here = Path(__file__).resolve()
    for candidate in (here.parents[1], here.parents[2]):
        if (candidate / "scripted_models" / "__init__.py").is_file():
            sys.path.insert(0, str(candidate))
            return


_ensureEngineImportable()

from scripted_models.errors import InputError, WeightsError  # noqa: E402
from scripted_models.labels import (  # noqa: E402
    CORE,
    EDEMA,
    ENHANCING,
    MODALITIES,
    PAINT_ORDER,
    SUBREGION_COLORS,
    SUBREGION_NAMES,
)
from scripted_models.labels import subregion_for_name as subregionForSegmentName  # noqa: E402,F401 - front ends
from scripted_models.pathosyn.calibration import DEFAULT_POPULATION_PULL  # noqa: E402,F401 - front ends' default
from scripted_models.volume import Volume  # noqa: E402

MODULE_NAME = "PathoSynSlicer"
ENGINE_ROOT = Path(importlib.util.find_spec("scripted_models").origin).resolve().parents[1]
REQUIRED_PACKAGES = {  # import name -> pip requirement (the same specifiers as pyproject.toml's dependencies)
    "torch": "torch>=2.2", "monai": "monai>=1.4", "einops": "einops", "safetensors": "safetensors",
    "scipy": "scipy", "SimpleITK": "SimpleITK>=2.3", "nibabel": "nibabel",
}
SAMPLE_DATA_PACKAGES = {"nilearn": "nilearn"}
DISTRIBUTIONS = {}  # import name -> distribution name, where they differ (none today)

# Output nodes are tagged so that they are found by attribute, not by name (names get "_1" suffixes).
ROLE_ATTRIBUTE = "PathoSyn.Role"  # synthesized | residual | uncertainty | lesion | pseudo-healthy
RUN_ATTRIBUTE = "PathoSyn.Run"  # 1, 2, ... one number per synthesis in the scene
MODALITY_ATTRIBUTE = "PathoSyn.Modality"
SOURCE_REFERENCE = "PathoSyn.Source"  # node reference: output -> the input volume it was made from

# Layouts (registered at startup so that saved scenes that use them reopen with their views; see registerLayouts)
COMPARE_LAYOUT_ID = 50731
COMPARE_SLICE_TAGS = ("PathoSynInput", "PathoSynResult")  # dedicated views: Red/Yellow keep their orientation
COMPARE_3D_TAG = "PathoSyn3D"
COMPARE_VIEW_GROUP = 5  # its own view group: linking the pair does not link the standard views
COMPARE_LAYOUT = f"""
<layout type="vertical" split="true">
 <item splitSize="600">
  <layout type="horizontal">
   <item><view class="vtkMRMLSliceNode" singletontag="{COMPARE_SLICE_TAGS[0]}">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">In</property>
    <property name="viewcolor" action="default">#F34A33</property>
    <property name="viewgroup" action="default">{COMPARE_VIEW_GROUP}</property>
   </view></item>
   <item><view class="vtkMRMLSliceNode" singletontag="{COMPARE_SLICE_TAGS[1]}">
    <property name="orientation" action="default">Axial</property>
    <property name="viewlabel" action="default">Out</property>
    <property name="viewcolor" action="default">#EDD54C</property>
    <property name="viewgroup" action="default">{COMPARE_VIEW_GROUP}</property>
   </view></item>
  </layout>
 </item>
 <item splitSize="400">
  <view class="vtkMRMLViewNode" singletontag="{COMPARE_3D_TAG}">
   <property name="viewlabel" action="default">PS</property>
   <property name="viewgroup" action="default">{COMPARE_VIEW_GROUP}</property>
  </view>
 </item>
</layout>
"""


JOB_FORMAT = "nii"  # inputs and outputs of a background job: uncompressed NIfTI in a temp folder


class JobError(InputError):
    """A background job that did not produce its outputs (process died, was killed, failed): one-line message."""
WHOLE_LESION_NAME = "lesion"
RESIDUAL_COLOR_NAME = "PathoSynDivergingBlueRed"

# Sample data for teaching: healthy MNI152 T1 (from nilearn, cached on first use) + a ready lesion mask.
SAMPLE_LESION_FILE = ENGINE_ROOT / "scripted_models" / "resources" / "mni152_demo_lesion.nii.gz"
SAMPLE_CHECKSUMS = {
    "mni152_demo_lesion.nii.gz": "SHA256:f913a368a63904b275ad0f010d1d7fec11ad8ce8922e3ca71b3f097efc85a33b",
    "mni152_t1_1mm.nii": "SHA256:c259245d3393bd1ddf70ca4059149f9f7bdbbf7f79f66c05680c35bc7fae87e0",
}

Progress = Callable[[float, str], None]


def _splitRequirement(requirement: str) -> tuple[str, str]:
    """'monai>=1.4' -> ('monai', '>=1.4')."""
    import re

    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(.*)$", requirement)
    return match.group(1), match.group(3).strip()


def versionSatisfies(installed: str, specifier: str) -> bool:
    """Whether version `installed` meets `specifier` ('>=1.4', '>=2.2,<3', '' = any). Uses `packaging` (PEP 440);
    without it, a plain numeric comparison of >=, >, <=, <, ==, != clauses."""
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _simpleSatisfies(installed, specifier)
    try:
        return SpecifierSet(specifier).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return _simpleSatisfies(installed, specifier)


def _simpleSatisfies(installed: str, specifier: str) -> bool:
    import operator
    import re

    def key(v):
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])

    ops = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
           "<": operator.lt}
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        op = next(o for o in (">=", "<=", "==", "!=", ">", "<") if clause.startswith(o))
        a, b = key(installed), key(clause[len(op):])
        n = max(len(a), len(b))
        if not ops[op](a + (0,) * (n - len(a)), b + (0,) * (n - len(b))):
            return False
    return True


def installedVersion(importName: str) -> str | None:
    """The installed distribution version of an importable package (None when not installed)."""
    from importlib import metadata

    if importlib.util.find_spec(importName) is None:
        return None
    try:
        return metadata.version(DISTRIBUTIONS.get(importName, importName))
    except metadata.PackageNotFoundError:
        return "unknown"  # importable but without metadata (e.g. a source tree): cannot be checked


@dataclass
class DependencyProblem:
    name: str
    requirement: str
    installed: str | None  # None = missing

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.name} (not installed; needs {self.requirement})"
        return f"{self.name} {self.installed} is installed but {self.requirement} is required"


def dependencyProblems(packages: dict | None = None, include_sample_data: bool = False) -> dict:
    """{import name: DependencyProblem} of the packages that are missing or whose installed version does not meet
    the requirement. packages: {import name: pip requirement}, default REQUIRED_PACKAGES (+ sample-data ones)."""
    wanted = dict(REQUIRED_PACKAGES if packages is None else packages)
    if include_sample_data:
        wanted.update(SAMPLE_DATA_PACKAGES)
    problems = {}
    for name, requirement in wanted.items():
        installed = installedVersion(name)
        if installed is None:
            problems[name] = DependencyProblem(name, requirement, None)
        elif installed != "unknown" and not versionSatisfies(installed, _splitRequirement(requirement)[1]):
            problems[name] = DependencyProblem(name, requirement, installed)
    return problems


def missingDependencies(include_sample_data: bool = False) -> dict[str, str]:
    """{import name: pip requirement} of the Python packages the engine needs that are not importable or too old
    (what to install or upgrade)."""
    return {name: p.requirement for name, p in dependencyProblems(include_sample_data=include_sample_data).items()}


def dependencyMessage(problems: dict) -> str:
    """One line naming each missing package and each installed version next to the required one."""
    missing = [p for p in problems.values() if p.installed is None]
    old = [p for p in problems.values() if p.installed is not None]
    parts = []
    if missing:
        parts.append(f"missing Python packages: {', '.join(p.name for p in missing)}")
    if old:
        parts.append("incompatible Python packages: " + ", ".join(
            f"{p.name} {p.installed} installed, {p.requirement} required" for p in old))
    reqs = " ".join(f'"{p.requirement}"' for p in problems.values())
    return "; ".join(parts) + f" (install them from the PathoSyn module, or: pip install --upgrade {reqs})"


def checkDependencies(include_sample_data: bool = False) -> None:
    """Raise InputError (one line, with installed and required versions) if a package is missing or too old."""
    problems = dependencyProblems(include_sample_data=include_sample_data)
    if problems:
        raise InputError(dependencyMessage(problems))


def availableDevices() -> list[str]:
    """auto, cpu and cuda when a CUDA GPU is visible to torch. Imports torch (and may initialise CUDA): for the
    Python console; the module panel does not call it (the background process picks the device)."""
    try:
        import torch
    except ImportError:
        return ["auto", "cpu"]
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- MRML <-> numpy helpers (no slicer.util: it expects the desktop application for some calls) -------------------
def _vtkMatrix(m: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    out = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out


def _numpyMatrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def runSteps(steps):
    """Run a generator of scene steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def nodesByClass(scene, className: str, name: str | None = None) -> list:
    """The scene's nodes of a class (and name) as a list. vtkMRMLScene.GetNodesByClass / GetNodesByClassByName return
    a new collection the caller owns; in Python it is never freed and keeps every node in it alive (the removed
    results of a front end, ~90 MB per synthesis of a 1 mm head), so it is released here."""
    nodes = scene.GetNodesByClass(className) if name is None else scene.GetNodesByClassByName(className, name)
    out = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    nodes.UnRegister(None)
    return out


def nodeIJKToRAS(node) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _numpyMatrix(m)


def arrayIJKToRAS(node) -> np.ndarray:
    """IJK-to-RAS of the node's voxel array: index (0, 0, 0) is the first voxel of the image extent, which need not
    start at 0."""
    ijkToRAS = nodeIJKToRAS(node)
    start = np.array(node.GetImageData().GetExtent()[::2], float)
    if start.any():
        ijkToRAS[:3, 3] = (ijkToRAS @ np.array([*start, 1.0]))[:3]
    return ijkToRAS


def _imageArray(image) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy

    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 1:
        raise InputError("expected a single-component scalar image")
    return vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()


def _imageFromArray(array: np.ndarray):
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData

    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_to_vtk(array.ravel(), deep=True, array_type=None)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def _orientedImage(array: np.ndarray, ijkToRAS: np.ndarray):
    import slicer

    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_imageFromArray(array))
    image.SetImageToWorldMatrix(_vtkMatrix(ijkToRAS))
    return image


def _boundingBox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the box around a mask's voxels (+margin, within the array); None for an empty mask. From the
    per-axis projections: a full np.argwhere of a 1 mm head took 0.04 s."""
    box = []
    for axis in range(mask.ndim):
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(found) == 0:
            return None
        box.append(slice(max(int(found[0]) - margin, 0), min(int(found[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def _orientedImageInBox(boxed: np.ndarray, box: tuple[slice, ...], ijkToRAS: np.ndarray):
    """The voxels of a box of the full grid ((z, y, x) slices) as a uint8 vtkOrientedImageData whose extent puts
    them back in place: Slicer converts and merges only that box (the closed surface of a lesion on a 1 mm head:
    0.06 s instead of 0.22 s for the whole grid)."""
    image = _orientedImage(boxed.astype(np.uint8), ijkToRAS)
    z, y, x = box
    image.SetExtent(x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1)
    return image


def _referenceBox(image, ownBox: tuple, refIJKToRAS: np.ndarray, refExtent, refShape: tuple) -> tuple | None:
    """The (z, y, x) array slices of a reference grid (IJK to RAS, extent, array shape) that cover the voxels
    `ownBox` (array slices) of an oriented image, with one voxel of margin; None when they lie outside the grid."""
    import slicer
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    from vtkmodules.vtkCommonTransforms import vtkTransform

    ext = image.GetExtent()
    z, y, x = ownBox
    ownExtent = (ext[0] + x.start, ext[0] + x.stop - 1, ext[2] + y.start, ext[2] + y.stop - 1,
                 ext[4] + z.start, ext[4] + z.stop - 1)
    toWorld = vtkMatrix4x4()
    image.GetImageToWorldMatrix(toWorld)
    toReference = vtkTransform()
    toReference.SetMatrix(_vtkMatrix(np.linalg.inv(refIJKToRAS) @ _numpyMatrix(toWorld)))
    onReference = [0] * 6
    slicer.vtkOrientedImageDataResample.TransformExtent(ownExtent, toReference, onReference)
    box = []
    for axis, size in zip((2, 1, 0), refShape):  # z, y, x
        start = max(onReference[2 * axis] - 1 - refExtent[2 * axis], 0)
        stop = min(onReference[2 * axis + 1] + 2 - refExtent[2 * axis], size)
        if start >= stop:
            return None
        box.append(slice(start, stop))
    return tuple(box)


def _segmentHasVoxels(segmentation, segmentId: str) -> bool:
    """Whether a segment holds anything: voxels of its label value in its binary labelmap (possibly a layer shared
    with other segments), else points in its source representation (a closed surface)."""
    import slicer
    from vtkmodules.util.numpy_support import vtk_to_numpy

    segment = segmentation.GetSegment(segmentId)
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    labelmap = segment.GetRepresentation(binary)
    if labelmap is not None:  # a view of the layer's voxels, not a copy
        scalars = labelmap.GetPointData().GetScalars()
        return scalars is not None and bool((vtk_to_numpy(scalars) == segment.GetLabelValue()).any())
    source = segment.GetRepresentation(segmentation.GetSourceRepresentationName())
    return source is not None and source.GetNumberOfPoints() > 0


def _orientedArray(image, reference_shape=None) -> np.ndarray:
    """Voxels of a vtkOrientedImageData on its extent (which may not start at 0)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    ext = image.GetExtent()
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    if min(shape) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros(reference_shape or (0, 0, 0), np.uint8)
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


@dataclass
class SynthesisNodes:
    """The new nodes a synthesis created (inputs are untouched)."""

    volumes: dict = field(default_factory=dict)  # modality -> vtkMRMLScalarVolumeNode
    residuals: dict = field(default_factory=dict)
    uncertainty: dict = field(default_factory=dict)
    segmentation: object = None  # vtkMRMLSegmentationNode with canonical sub-regions
    colorNodes: list = field(default_factory=list)  # colour tables created for the residual display
    report: dict = field(default_factory=dict)

    def nodes(self) -> list:
        out = [*self.volumes.values(), *self.residuals.values(), *self.uncertainty.values()]
        return out + ([self.segmentation] if self.segmentation is not None else [])

    def removeFromScene(self) -> None:
        removeNodes(self.nodes())


def synthesisDoneMessage(report: dict, names: list[str]) -> str:
    """The status line after a synthesis: its time, the new volumes and the engine's warnings (e.g. a raw scan
    normalised over its whole head, a lesion too large for the model's grid)."""
    seconds = (report.get("timing_s") or {}).get("total")
    text = f"Done{f' in {seconds:.1f} s' if seconds else ''}: {', '.join(names)}"
    return text + "".join(f". Warning: {w}" for w in report.get("warnings") or [])


def removeNodes(nodes) -> None:
    """Remove data nodes with their subject-hierarchy items, display and storage nodes. A bare RemoveNode leaves the
    display nodes in the scene (slicer-core has no plugin that removes them), and they keep the voxels alive: about
    60 MB per removed pair of 1 mm float volumes."""
    for node in nodes:
        scene = node.GetScene() if node is not None else None
        if scene is None:
            continue
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:  # items first: removing a node and then its item can hang without the GUI's plugins
            sh.RemoveItem(item, False, False)
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is scene:
                scene.RemoveNode(helper)


@dataclass
class PreparedInputs:
    """Validated inputs: engine Volumes plus the nodes they came from."""

    images: dict  # modality -> Volume
    nodes: dict  # modality -> volume node
    mask: Volume
    wholeLesion: bool | None
    maskNode: object
    brainMask: Volume | None = None  # normalise over the brain (scans with scalp and skull)


class PathoSynSlicerLogic:
    """MRML nodes in, new MRML nodes out. Works on `slicer.mrmlScene` unless a scene is given."""

    def __init__(self, scene=None):
        self._scene = scene

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        if getattr(slicer, "mrmlScene", None) is None:
            raise InputError("no MRML scene: set slicer.mrmlScene or pass scene= to PathoSynSlicerLogic")
        return slicer.mrmlScene

    # --- parameter node ------------------------------------------------------------------------------------------
    def getParameterNode(self, moduleName: str = MODULE_NAME):
        """The module's singleton vtkMRMLScriptedModuleNode (same convention as ScriptedLoadableModuleLogic)."""
        node = self.scene.GetSingletonNode(moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            import slicer

            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetName(self.scene.GenerateUniqueName(moduleName))
            node.SetSingletonTag(moduleName)
            node.SetModuleName(moduleName)
            node.SetAttribute("ModuleName", moduleName)  # as ScriptedLoadableModuleLogic.createParameterNode does
            node.SetHideFromEditors(True)
            node = self.scene.AddNode(node)
        return node

    def getParameters(self):
        from .parameters import PathoSynParameterNode

        return PathoSynParameterNode(self.getParameterNode())

    # --- nodes -> engine Volumes ------------------------------------------------------------------------------------
    @staticmethod
    def volumeFromNode(node) -> Volume:
        """Voxels (copied) and IJK-to-RAS of a scalar or labelmap volume node."""
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("expected a scalar volume node")
        if node.GetImageData() is None:
            raise InputError(f"volume '{node.GetName()}' has no voxels")
        components = node.GetImageData().GetNumberOfScalarComponents()
        if components != 1:
            raise InputError(f"volume '{node.GetName()}' has {components} values per voxel (a colour, vector or "
                             "diffusion volume): choose a scalar scan")
        return Volume.from_ijk_to_ras(_imageArray(node.GetImageData()), arrayIJKToRAS(node))

    def _inputVolumes(self, volumeNodes, modality: str | None) -> dict:
        from scripted_models.labels import check_modality

        if volumeNodes is None or (isinstance(volumeNodes, dict) and not volumeNodes):
            raise InputError("no input volume: select at least one healthy scan")
        if not isinstance(volumeNodes, dict):
            volumeNodes = {modality or "t1": volumeNodes}
        nodes = {}
        for mod, node in volumeNodes.items():
            if node is None:
                continue
            mod = check_modality(mod)
            if mod in nodes:
                raise InputError(f"modality '{mod}' given twice")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"'{node.GetName()}' is not a scalar volume (for modality {mod})")
            if node.GetImageData() is None:
                raise InputError(f"volume '{node.GetName()}' has no voxels")
            other = next((m for m, n in nodes.items() if n is node), None)
            if other is not None:
                raise InputError(f"'{node.GetName()}' is selected for both {other} and {mod}: choose one scan per "
                                 "modality")
            nodes[mod] = node
        if not nodes:
            raise InputError("no input volume: select at least one healthy scan")
        reference = next(iter(nodes.values()))
        for node in nodes.values():
            if node.GetParentTransformNode() is not reference.GetParentTransformNode():
                raise InputError(f"'{node.GetName()}' is under a different transform than "
                                 f"'{reference.GetName()}': harden the transforms first")
        return nodes

    def maskFromNode(self, maskNode, referenceNode) -> tuple[Volume, bool | None]:
        """(mask Volume, whole_lesion flag). Labelmaps keep their own grid (the engine resamples, nearest);
        segmentations are exported onto the reference volume's grid with segment names mapped to sub-regions."""
        if maskNode is None:
            raise InputError("no lesion mask: select a segmentation or a labelmap volume")
        if maskNode.GetParentTransformNode() is not referenceNode.GetParentTransformNode():
            raise InputError(f"mask '{maskNode.GetName()}' is under a different transform than "
                             f"'{referenceNode.GetName()}': harden the transforms first")
        if maskNode.IsA("vtkMRMLSegmentationNode"):
            return self._maskFromSegmentation(maskNode, referenceNode)
        if maskNode.IsA("vtkMRMLScalarVolumeNode"):
            mask = self.volumeFromNode(maskNode)
            if not np.any(mask.array):
                raise InputError(f"the lesion mask '{maskNode.GetName()}' is empty")
            return mask, None
        raise InputError(f"'{maskNode.GetName()}' is not a segmentation or a labelmap volume")

    def segmentSubregions(self, segmentationNode) -> dict[str, int]:
        """{segment ID: canonical value} of the painted segments (see _segmentMapping)."""
        return self._segmentMapping(segmentationNode)[0]

    @staticmethod
    def _segmentMapping(segmentationNode, role: str = "segmentation") -> tuple[dict[str, int], bool]:
        """({segment ID: canonical value}, whole lesion) of the segments that hold voxels (one added and never
        painted is ignored). Segments are mapped by name (core/necrotic/non-enhancing -> 1, edema -> 2, enhancing ->
        3). A segmentation of one segment, or one painted segment of another name, is the whole lesion (value 1, the
        model invents the structure; a single segment named edema or enhancing keeps its value, e.g. a PathAR
        sample that has only edema)."""
        segmentation = segmentationNode.GetSegmentation()
        name = segmentationNode.GetName()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not ids:
            raise InputError(f"the {role} '{name}' has no segments (the mask is empty)")
        painted = [sid for sid in ids if _segmentHasVoxels(segmentation, sid)]
        if not painted:
            raise InputError(f"the {role} '{name}' is empty")
        values = {sid: subregionForSegmentName(segmentation.GetSegment(sid).GetName()) for sid in painted}
        if len(ids) == 1 or (len(painted) == 1 and values[painted[0]] is None):
            value = values[painted[0]]
            return {painted[0]: value if value in (EDEMA, ENHANCING) else 1}, True
        unknown = [segmentation.GetSegment(sid).GetName() for sid in painted if values[sid] is None]
        if unknown:
            hint = "name them core / edema / enhancing, or use a single segment for the whole lesion"
            if all(re.fullmatch(rf"Segment_{segmentation.GetSegment(sid).GetLabelValue()}",
                                segmentation.GetSegment(sid).GetName()) for sid in painted):
                hint += ("; a label file (e.g. BraTS 1/2/4) loaded as a segmentation: load it as a labelmap volume "
                         "instead, its label values are understood")
            raise InputError(f"cannot map segment(s) {', '.join(repr(n) for n in unknown)} to a lesion sub-region: "
                             f"{hint}")
        return values, False

    def brainMaskFromNode(self, node, referenceNode) -> Volume | None:
        """The brain mask (non-zero = brain) from a labelmap/scalar volume or a one-segment segmentation; None for
        none. The engine then normalises intensities over the brain, as the models learned on skull-stripped scans."""
        if node is None:
            return None
        name = node.GetName()
        if node.GetParentTransformNode() is not referenceNode.GetParentTransformNode():
            raise InputError(f"brain mask '{name}' is under a different transform than '{referenceNode.GetName()}': "
                             "harden the transforms first")
        if node.IsA("vtkMRMLSegmentationNode"):
            if node.GetSegmentation().GetNumberOfSegments() != 1:
                raise InputError(f"brain mask '{name}': use a segmentation with one segment (the brain) or a labelmap")
            mask, _ = self._maskFromSegmentation(node, referenceNode, role="brain mask")
            return mask.with_array((mask.array > 0).astype(np.uint8))
        if node.IsA("vtkMRMLScalarVolumeNode"):
            brain = self.volumeFromNode(node)
            if not np.any(brain.array):
                raise InputError(f"the brain mask '{name}' is empty")
            return brain
        raise InputError(f"'{name}' is not a segmentation or a labelmap volume")

    def _maskFromSegmentation(self, segNode, referenceNode, role: str = "lesion mask") -> tuple[Volume, bool]:
        import slicer

        mapping, whole = self._segmentMapping(segNode, role)
        binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        segmentation = segNode.GetSegmentation()
        if not segmentation.ContainsRepresentation(binary):  # convert a copy: the input stays untouched
            copy = slicer.vtkSegmentation()
            copy.DeepCopy(segmentation)
            # voxelize once, on the reference volume's grid: without a geometry Slicer picks a ~0.01-0.06 mm grid of
            # its own (3 segments of a 2 cm lesion: 62 s instead of 0.02 s) that is then resampled again
            converter = slicer.vtkSegmentationConverter
            copy.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                        converter.SerializeImageGeometry(_vtkMatrix(nodeIJKToRAS(referenceNode)),
                                                                         list(referenceNode.GetImageData().GetExtent())))
            if not copy.CreateRepresentation(binary):
                raise InputError(f"cannot convert segmentation '{segNode.GetName()}' to a binary labelmap")
            segmentation = copy
        refImage = referenceNode.GetImageData()
        refExtent = refImage.GetExtent()
        refIJKToRAS = nodeIJKToRAS(referenceNode)
        shape = tuple(reversed(refImage.GetDimensions()))
        labels = np.zeros(shape, np.uint8)
        anyVoxels = False
        # paint edema first, then enhancing, then core, so that nested sub-regions win over the ones around them
        for sid, value in sorted(mapping.items(), key=lambda kv: PAINT_ORDER[kv[1]]):
            segment = segmentation.GetSegment(sid)
            rep = segment.GetRepresentation(binary)
            if rep is None:
                continue
            own = _orientedArray(rep) == segment.GetLabelValue()
            ownBox = _boundingBox(own, margin=0)
            if ownBox is None:
                continue
            anyVoxels = True
            # resample only the box of the reference grid that the segment's voxels cover (the whole grid of a 1 mm
            # head took 0.045 s of a click for three sub-regions)
            box = _referenceBox(rep, ownBox, refIJKToRAS, refExtent, shape)
            if box is None:
                continue  # outside the reference volume
            reference = slicer.vtkOrientedImageData()
            z, y, x = box
            reference.SetExtent(refExtent[0] + x.start, refExtent[0] + x.stop - 1, refExtent[2] + y.start,
                                refExtent[2] + y.stop - 1, refExtent[4] + z.start, refExtent[4] + z.stop - 1)
            reference.SetImageToWorldMatrix(_vtkMatrix(refIJKToRAS))
            resampled = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    rep, reference, resampled, False, False):
                raise InputError(f"cannot resample segment '{segment.GetName()}' onto '{referenceNode.GetName()}'")
            boxShape = tuple(b.stop - b.start for b in box)
            inBox = _orientedArray(resampled, boxShape)
            if inBox.shape != boxShape:
                raise InputError(f"segment '{segment.GetName()}': unexpected resampled shape {inBox.shape}")
            labels[box][inBox == segment.GetLabelValue()] = value
        if not anyVoxels:
            raise InputError(f"the {role} '{segNode.GetName()}' is empty")
        if not labels.any():
            raise InputError(f"the {role} '{segNode.GetName()}' lies outside the volume "
                             f"'{referenceNode.GetName()}'")
        return Volume.from_ijk_to_ras(labels, arrayIJKToRAS(referenceNode)), whole

    def prepare(self, volumeNodes, maskNode, modality: str | None = None, brainMaskNode=None) -> PreparedInputs:
        """Validate the inputs (raises InputError with a one-line message) and read them into engine Volumes.
        brainMaskNode: optional brain mask (labelmap or one-segment segmentation) for scans with scalp and skull."""
        from scripted_models.volume import working_grid

        nodes = self._inputVolumes(volumeNodes, modality)
        images = {mod: self.volumeFromNode(node) for mod, node in nodes.items()}
        finest = working_grid(images)  # the engine's grid: a segmentation is exported there, not onto a thicker scan
        reference = nodes[finest]
        mask, whole = self.maskFromNode(maskNode, reference)
        self._checkMaskInside(mask, images[finest], maskNode, reference)
        return PreparedInputs(images, nodes, mask, whole, maskNode, self.brainMaskFromNode(brainMaskNode, reference))

    @staticmethod
    def _checkMaskInside(mask: Volume, image: Volume, maskNode, referenceNode) -> None:
        from scripted_models.volume import resample_to

        if mask.same_grid(image):
            return
        on_grid = resample_to(mask, image, nearest=True)
        if not np.any(on_grid.array):
            raise InputError(f"the lesion mask '{maskNode.GetName()}' lies outside the volume "
                             f"'{referenceNode.GetName()}'")

    # --- engine runs (blocking) -------------------------------------------------------------------------------------
    def synthesize(self, volumeNodes, maskNode, modality: str | None = None, seed: int = 0, samples: int = 1,
                   steps: int | None = None, guidance: float = 1.0, device: str = "auto", base: str = "input",
                   progress: Progress | None = None, populationPull: float | None = None,
                   keepBaseTexture: bool = False, brainMaskNode=None) -> SynthesisNodes:
        """Add a synthetic lesion to the healthy volume(s); returns the NEW nodes (inputs are never modified).

        volumeNodes: a scalar volume node (tagged with `modality`, default t1) or a dict {modality: node}.
        maskNode: a segmentation (segments named core/edema/enhancing, or one segment = whole lesion) or a labelmap.
        populationPull: 0..1, how far each sub-region's level moves towards the training population's (None = the
        weights' card value; 0 = as sampled).
        keepBaseTexture: keep the healthy scan's fine texture inside the lesion (default: attenuated to the training
        population's lesion/healthy ratio per modality).
        brainMaskNode: a brain mask (labelmap or one-segment segmentation) for scans with scalp and skull.
        Raises InputError / WeightsError with a one-line message; the scene is then unchanged.
        """
        checkDependencies()
        prepared = self.prepare(volumeNodes, maskNode, modality, brainMaskNode)
        from scripted_models.pathosyn.api import synthesize_lesion

        if steps is not None and int(steps) <= 0:
            steps = None
        result = synthesize_lesion(prepared.images, prepared.mask, seed=int(seed), samples=int(samples), steps=steps,
                                   guidance=float(guidance), device=device, base=base,
                                   whole_lesion=prepared.wholeLesion, progress=progress,
                                   population_pull=populationPull, texture_match=not keepBaseTexture,
                                   brain_mask=prepared.brainMask)
        return self.addSynthesisNodes(prepared, result.images, result.residuals, result.uncertainty, result.mask,
                                      result.report)

    def pseudoHealthy(self, volumeNodes, maskNode, modality: str | None = None, device: str = "auto",
                      progress: Progress | None = None, brainMaskNode=None) -> dict:
        """Remove the lesion under the mask (inpaint healthy tissue). Returns {modality: new volume node}."""
        checkDependencies()
        prepared = self.prepare(volumeNodes, maskNode, modality, brainMaskNode)
        from scripted_models.pathosyn.api import pseudo_healthy

        healthy = pseudo_healthy(prepared.images, prepared.mask, device=device, progress=progress,
                                 brain_mask=prepared.brainMask)
        return self.addPseudoHealthyNodes(prepared, healthy)

    # --- engine outputs -> new nodes --------------------------------------------------------------------------------
    def addVolumeNode(self, volume: Volume, name: str, labelmap: bool = False, like=None, ijkToRAS=None,
                      windowLevel: tuple | None = None):
        """A new volume node with the voxels of `volume`. Geometry: `ijkToRAS` (exact) if given, else the Volume's.
        `windowLevel` (scalar volumes): display with this window/level, skipping Slicer's automatic window/level
        (a histogram pass over every voxel: 0.13 s of the 0.18 s a 1 mm head's volume node costs)."""
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(name))
        node.SetAndObserveImageData(_imageFromArray(volume.array))
        node.SetIJKToRASMatrix(_vtkMatrix(volume.ijk_to_ras() if ijkToRAS is None else ijkToRAS))
        if like is not None and like.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(like.GetParentTransformNode().GetID())
        if windowLevel is not None and not labelmap:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(float(windowLevel[0]), float(windowLevel[1]))
            display.SetDefaultColorMap()
            node.SetAndObserveDisplayNodeID(display.GetID())
        else:
            node.CreateDefaultDisplayNodes()
        return node

    def _outputVolume(self, volume: Volume, reference: Volume, referenceNode, name: str, windowLevel=None):
        """A new volume on the input's grid, shown like the input (window/level, colours) unless `windowLevel`."""
        if not volume.same_grid(reference):
            raise InputError(f"engine output '{name}' is not on the input grid")
        src = referenceNode.GetDisplayNode()
        if windowLevel is None and src is not None:
            windowLevel = (src.GetWindow(), src.GetLevel())
        node = self.addVolumeNode(volume, name, like=referenceNode, ijkToRAS=arrayIJKToRAS(referenceNode),
                                  windowLevel=windowLevel)
        dst = node.GetDisplayNode()
        if src is not None and dst is not None and src.GetColorNodeID():
            dst.SetAndObserveColorNodeID(src.GetColorNodeID())
        return node

    def residualColorNode(self):
        """Diverging blue-white-red colour node (Slicer's DivergingBlueRed when present, else our own)."""
        for name in ("DivergingBlueRed", RESIDUAL_COLOR_NAME):
            nodes = nodesByClass(self.scene, "vtkMRMLColorNode", name)
            if nodes:
                return nodes[0], False
        node = self.scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", RESIDUAL_COLOR_NAME)
        node.SetAttribute("Category", "PathoSyn")
        ctf = node.GetColorTransferFunction()
        ctf.RemoveAllPoints()
        ctf.AddRGBPoint(-1.0, 0.1, 0.25, 0.85)
        ctf.AddRGBPoint(0.0, 1.0, 1.0, 1.0)
        ctf.AddRGBPoint(1.0, 0.85, 0.1, 0.1)
        return node, True

    def _setDivergingDisplay(self, node, colorNode, maxAbs: float) -> None:
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(colorNode.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(2.0 * max(maxAbs, 1e-6), 0.0)

    def addSegmentationNode(self, labels: np.ndarray, ijkToRAS: np.ndarray, name: str, wholeLesion: bool,
                            referenceNode=None, closedSurface: bool = True):
        """Canonical labels -> a segmentation with one segment per sub-region (names, colours from the engine), with
        its closed surfaces for 3D views unless closedSurface is False (then call CreateClosedSurfaceRepresentation)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        if referenceNode is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), referenceNode.GetID())  # DICOM SEG
            if referenceNode.GetParentTransformNode() is not None:
                node.SetAndObserveTransformNodeID(referenceNode.GetParentTransformNode().GetID())
        box = _boundingBox(labels > 0)  # None: no lesion voxels, no segments
        for value in (CORE, EDEMA, ENHANCING) if box is not None else ():
            inside = labels[box] == value
            if not inside.any():
                continue
            segmentName = WHOLE_LESION_NAME if wholeLesion else SUBREGION_NAMES[value]
            image = _orientedImageInBox(inside, box, ijkToRAS)
            segmentId = node.AddSegmentFromBinaryLabelmapRepresentation(image, segmentName,
                                                                        list(SUBREGION_COLORS[value]))
            if value == EDEMA and node.GetDisplayNode() is not None:  # see the tumour core through the edema
                node.GetDisplayNode().SetSegmentOpacity3D(segmentId, 0.35)
        if closedSurface:
            node.CreateClosedSurfaceRepresentation()
        return node

    def addSynthesisNodes(self, prepared: PreparedInputs, images: dict, residuals: dict, uncertainty: dict | None,
                          mask: Volume, report: dict | None = None) -> SynthesisNodes:
        """Create the output nodes; if anything fails, remove what was created (the scene stays as it was)."""
        return runSteps(self.synthesisNodeSteps(prepared, images, residuals, uncertainty, mask, report))

    def synthesisNodeSteps(self, prepared: PreparedInputs, images: dict, residuals: dict, uncertainty: dict | None,
                           mask: Volume, report: dict | None = None):
        """addSynthesisNodes a node at a time: a generator that yields a name after each new node (a front end
        serves its event loop in between) and returns the SynthesisNodes. Closed early or failing, it removes what
        it made."""
        from scripted_models.volume import working_grid

        out = SynthesisNodes(report=dict(report or {}))
        referenceNode = prepared.nodes[working_grid(prepared.images)]  # the lesion mask's grid
        try:
            colorNode, created = self.residualColorNode()
            if created:
                out.colorNodes.append(colorNode)
            for mod, volume in images.items():
                inputNode = prepared.nodes[mod]
                base = inputNode.GetName()
                own = prepared.images[mod]  # the input's grid (the engine maps scans on other grids back)
                out.volumes[mod] = self._outputVolume(volume, own, inputNode, f"{base} synthesized")
                yield f"{mod} synthesized"
                res = residuals[mod]
                maxAbs = max(float(res.array.max()), -float(res.array.min()), 1e-6)  # no |res| copy of the grid
                out.residuals[mod] = self._outputVolume(res, own, inputNode, f"{base} residual",
                                                        windowLevel=(2.0 * maxAbs, 0.0))
                self._setDivergingDisplay(out.residuals[mod], colorNode, maxAbs)
                yield f"{mod} residual"
                if uncertainty and mod in uncertainty:
                    top = max(float(uncertainty[mod].array.max()), 1e-6)  # 0 (certain) .. the largest spread
                    node = self._outputVolume(uncertainty[mod], own, inputNode, f"{base} uncertainty",
                                              windowLevel=(top, top / 2.0))
                    inferno = nodesByClass(self.scene, "vtkMRMLColorNode", "Inferno")
                    if inferno:
                        node.GetDisplayNode().SetAndObserveColorNodeID(inferno[0].GetID())
                    out.uncertainty[mod] = node
                    yield f"{mod} uncertainty"
            whole = bool(out.report.get("whole_lesion_only", prepared.wholeLesion))
            out.segmentation = self.addSegmentationNode(mask.array, arrayIJKToRAS(referenceNode),
                                                        f"{referenceNode.GetName()} lesion", whole, referenceNode,
                                                        closedSurface=False)
            yield "lesion segmentation"
            out.segmentation.CreateClosedSurfaceRepresentation()  # about 0.09 s for a 64^3 ROI: a step of its own
            yield "lesion surfaces"
            run = self.nextRunNumber()
            for role, nodes in (("synthesized", out.volumes), ("residual", out.residuals),
                                ("uncertainty", out.uncertainty)):
                for mod, node in nodes.items():
                    self.tagOutput(node, role, run, prepared.nodes[mod], mod)
            self.tagOutput(out.segmentation, "lesion", run, referenceNode)
            self.placeNextToInput(out.nodes(), referenceNode)
        except BaseException:
            out.removeFromScene()
            for node in out.colorNodes:
                self.scene.RemoveNode(node)
            raise
        return out

    # --- output tags: results are found by attribute, not by name ------------------------------------------------
    def _taggedNodes(self, role: str | None = None, className: str = "vtkMRMLNode") -> list:
        out = []
        for node in nodesByClass(self.scene, className):
            value = node.GetAttribute(ROLE_ATTRIBUTE)
            if value is not None and (role is None or value == role):
                out.append(node)
        return out

    def nextRunNumber(self) -> int:
        runs = [int(n.GetAttribute(RUN_ATTRIBUTE) or 0) for n in self._taggedNodes()]
        return max(runs, default=0) + 1

    @staticmethod
    def tagOutput(node, role: str, run: int, sourceNode=None, modality: str | None = None) -> None:
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(RUN_ATTRIBUTE, str(int(run)))
        if modality:
            node.SetAttribute(MODALITY_ATTRIBUTE, modality)
        if sourceNode is not None:
            node.SetNodeReferenceID(SOURCE_REFERENCE, sourceNode.GetID())

    def latestSynthesis(self) -> tuple:
        """(input volume, synthesized volume, lesion segmentation) of the most recent synthesis still in the scene,
        found by the PathoSyn.Role / PathoSyn.Run attributes (robust to renaming and "_1" name suffixes).
        (None, None, None) when there is none. The input is None if it was deleted since."""
        outputs = self._taggedNodes("synthesized", "vtkMRMLScalarVolumeNode")
        if not outputs:
            return None, None, None
        run = max(int(n.GetAttribute(RUN_ATTRIBUTE) or 0) for n in outputs)
        ofRun = [n for n in outputs if int(n.GetAttribute(RUN_ATTRIBUTE) or 0) == run]
        order = {m: i for i, m in enumerate(MODALITIES)}
        output = min(ofRun, key=lambda n: order.get(n.GetAttribute(MODALITY_ATTRIBUTE), len(order)))
        segs = [n for n in self._taggedNodes("lesion", "vtkMRMLSegmentationNode")
                if int(n.GetAttribute(RUN_ATTRIBUTE) or 0) == run]
        return output.GetNodeReference(SOURCE_REFERENCE), output, (segs[0] if segs else None)

    def placeNextToInput(self, nodes, inputNode) -> None:
        """Put new nodes in the input's subject-hierarchy branch (same patient/study), as Slicer modules do."""
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if sh is None or inputNode is None:
            return
        inputItem = sh.GetItemByDataNode(inputNode)
        if not inputItem:
            return
        parent = sh.GetItemParent(inputItem)
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, parent)
            else:
                sh.CreateItem(parent, node)

    def addPseudoHealthyNodes(self, prepared: PreparedInputs, healthy: dict) -> dict:
        created = {}
        try:
            for mod, volume in healthy.items():
                node = prepared.nodes[mod]
                created[mod] = self._outputVolume(volume, prepared.images[mod], node,
                                                  f"{node.GetName()} pseudo-healthy")
                self.tagOutput(created[mod], "pseudo-healthy", 0, node, mod)
            self.placeNextToInput(list(created.values()), next(iter(prepared.nodes.values())))
        except BaseException:
            for node in created.values():
                self.scene.RemoveNode(node)
            raise
        return created

    # --- background runs: files for the `pathosyn` CLI and back --------------------------------------------------
    def createJob(self, volumeNodes, maskNode, modality: str | None = None, seed: int = 0, samples: int = 1,
                  steps: int | None = None, guidance: float = 1.0, device: str = "auto", command: str = "synthesize",
                  threads: int | None = None, workDir: str | None = None, writeInputs: bool = True,
                  populationPull: float | None = None, keepBaseTexture: bool = False,
                  brainMaskNode=None) -> SynthesisJob:
        """Validate, write the inputs to a temporary folder and return the job (CLI arguments, output folder).
        Run it with process.WorkerRunner(job.argv) (the warm engine worker) or process.CLIRunner(job.argv) (a fresh
        process); then call loadJobOutputs(job). Nothing touches the scene yet. writeInputs=False leaves the files
        to job.writeInputs(), which does not touch the scene either: a front end can run it in a thread."""
        prepared = self.prepare(volumeNodes, maskNode, modality, brainMaskNode)
        folder = Path(tempfile.mkdtemp(prefix="pathosyn-", dir=workDir or temporaryDirectory()))
        files = _jobInputPaths(prepared, folder)
        if writeInputs:
            try:
                _writeJobInputs(prepared, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        out = folder / "outputs"
        argv = [command]
        for mod, path in files["images"].items():
            argv += ["--image", f"{mod}={path}"]
        argv += ["--mask", files["mask"], "--out", str(out), "--device", device, "--format", JOB_FORMAT]
        if "brain_mask" in files:
            argv += ["--brain-mask", files["brain_mask"]]
        if command == "synthesize":
            argv += ["--seed", str(int(seed)), "--samples", str(int(samples)), "--guidance", repr(float(guidance))]
            if steps:
                argv += ["--steps", str(int(steps))]
            if prepared.wholeLesion:
                argv += ["--whole-lesion"]
            if populationPull is not None:
                argv += ["--population-pull", repr(float(populationPull))]
            if keepBaseTexture:
                argv += ["--keep-base-texture"]
            argv += ["--crop-outputs"]  # the lesion ROI box only: readJobOutputs pastes it into the inputs
        if threads:
            argv += ["--threads", str(int(threads))]
        return SynthesisJob(command, argv, folder, out, prepared)

    def runJob(self, job, timeout: float | None = None, progress: Progress | None = None, env: dict | None = None):
        """Run a job (createJob, or PathAR's) in the background process, block until it ends and load its outputs
        as new nodes. Raises JobError (one line) when the process fails, dies or is killed, or times out; the
        scene is then unchanged. The job's temporary folder is removed in every case."""
        from .process import DONE, CLIRunner, WorkerRunner, engineRoot

        # the warm engine worker; a custom environment needs a process of its own
        runner = (CLIRunner(job.argv, engineRoot=engineRoot(), onProgress=progress, env=env) if env
                  else WorkerRunner(job.argv, onProgress=progress))
        try:
            try:
                runner.start()
            except OSError as exc:
                raise JobError(f"cannot start the background process: {exc}") from None
            state = runner.wait(timeout=timeout)
            if state != DONE:
                if state == "cancelled":
                    raise JobError(f"the background process did not finish within {timeout} s (stopped)")
                raise JobError(runner.error or "the background process failed")
            return self.loadJobOutputs(job)
        finally:
            job.cleanup()

    def loadJobOutputs(self, job: SynthesisJob):
        """Read the CLI outputs back into NEW nodes (SynthesisNodes, or {mod: node} for pseudo-healthy)."""
        return self.addJobOutputs(job, self.readJobOutputs(job))

    @staticmethod
    def readJobOutputs(job: SynthesisJob) -> dict:
        """The job's output files as engine Volumes on the exact input grid (no scene access: a front end may run
        this in a thread, then call addJobOutputs on its main thread). Raises JobError when outputs are missing."""
        import json

        from scripted_models.volume import read_volume

        out = job.outputDir
        if job.command == "pseudo-healthy":
            missing = [m for m in job.prepared.images if not (out / f"{m}.{JOB_FORMAT}").is_file()]
            if missing:
                raise JobError(f"the pseudo-healthy run produced no {', '.join(missing)} image in {out}")
            return {"healthy": {mod: read_volume(out / f"{mod}.{JOB_FORMAT}") for mod in job.prepared.images}}
        report_path = out / "report.json"
        if not report_path.is_file():
            raise InputError(f"the synthesis produced no report in {out}")
        report = json.loads(report_path.read_text())
        from scripted_models.volume import working_grid

        images = job.prepared.images
        reference = images[working_grid(images)]  # the mask's grid; a scan on another grid keeps its own
        mods = list(images)
        ext = JOB_FORMAT
        expected = [f"{m}.{ext}" for m in mods] + [f"residual_{m}.{ext}" for m in mods] + [f"mask.{ext}"]
        absent = [name for name in expected if not (out / name).is_file()]
        if absent:
            raise JobError(f"the synthesis output is incomplete: {', '.join(absent)} missing in {out}")

        boxes = {m: report.get("outputs_box_zyx_by_modality", {}).get(m, report.get("outputs_box_zyx"))
                 for m in mods} | {"mask": report.get("outputs_box_zyx")}

        def onGrid(path, grid: Volume, box, inside: bool = False):
            """The output on the exact grid of `grid` (NIfTI stores geometry in float32). A cropped output (the
            job's --crop-outputs) is pasted into the input image (`inside`) or into zeros."""
            array = read_volume(path).array
            if box is not None:
                box = tuple(slice(a, b) for a, b in box)
                if array.shape != tuple(b.stop - b.start for b in box):
                    raise JobError(f"{Path(path).name}: shape {array.shape} does not match the reported box {box}")
                full = grid.array.astype(array.dtype) if inside else np.zeros(grid.shape, array.dtype)
                full[box] = array
                array = full
            return grid.with_array(array)

        return {"images": {m: onGrid(out / f"{m}.{ext}", images[m], boxes[m], inside=True) for m in mods},
                "residuals": {m: onGrid(out / f"residual_{m}.{ext}", images[m], boxes[m]) for m in mods},
                "uncertainty": {m: onGrid(out / f"uncertainty_{m}.{ext}", images[m], boxes[m]) for m in mods
                                if (out / f"uncertainty_{m}.{ext}").is_file()} or None,
                "mask": onGrid(out / f"mask.{ext}", reference, boxes["mask"]), "report": report}

    def addJobOutputs(self, job: SynthesisJob, outputs: dict):
        """NEW nodes for what readJobOutputs read (all or nothing)."""
        return runSteps(self.jobOutputSteps(job, outputs))

    def jobOutputSteps(self, job: SynthesisJob, outputs: dict):
        """addJobOutputs as a generator of steps (see synthesisNodeSteps); returns the new nodes."""
        if job.command == "pseudo-healthy":
            yield "pseudo-healthy"
            return self.addPseudoHealthyNodes(job.prepared, outputs["healthy"])
        return (yield from self.synthesisNodeSteps(job.prepared, outputs["images"], outputs["residuals"],
                                                   outputs["uncertainty"], outputs["mask"], outputs["report"]))

    # --- cohorts (Python console) -----------------------------------------------------------------------------------
    def batch(self, manifest, outputDir, workers: int = 1, scheduler=None, resume: bool = True, device: str = "auto",
              loadResults: bool = False, progress: Progress | None = None) -> BatchResult:
        """Run a `pathosyn batch` manifest (CSV: case_id,mask,seed,t1,t1c,t2,flair[,samples,steps,brain_mask]) blocking.

        The manifest is validated first (every bad row named); finished jobs are kept if you stop, and
        resume=True (default) skips jobs whose outputs still match their checksums. workers=N runs N processes;
        scheduler="tcp://host:8786" (or a dask Client) runs on a Dask cluster. With loadResults=True every finished
        case is loaded into the scene (synthesized volumes, residuals, lesion segmentation) under one
        subject-hierarchy folder per case. Example::

            result = logic.batch("/data/cohort.csv", "/data/synthetic", workers=2, loadResults=True)
            [row["status"] for row in result.rows]      # done / skipped / failed
            result.nodes["case0"]["t1"]                 # a loaded volume node
        """
        from scripted_models.batch import run_batch

        rows = run_batch(manifest, outputDir, workers=workers, scheduler=scheduler, resume=resume, device=device,
                         progress=progress)
        result = BatchResult(rows=rows, outputDir=Path(outputDir))
        if loadResults:
            for row in rows:
                if row["status"] in ("done", "skipped"):
                    result.nodes[row["case_id"]] = self.loadCaseOutputs(row["case_id"], row["files"])
        return result

    def loadCaseOutputs(self, caseId: str, files: dict) -> dict:
        """{output name: new node} for one batch case's files (mask -> segmentation), in a folder named caseId."""
        import slicer

        from scripted_models.volume import read_volume

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        folder = sh.CreateFolderItem(sh.GetSceneItemID(), caseId)
        nodes = {}
        for name, path in files.items():
            if not str(path).endswith((".nii.gz", ".nii", ".nrrd")) or name == "mask":
                continue
            nodes[name] = self.addVolumeNode(read_volume(path), f"{caseId} {name}")
        if "mask" in files:
            mask = read_volume(files["mask"])
            labels = np.rint(mask.array).astype(np.uint8)
            reference = next((n for n in nodes.values()), None)
            nodes["mask"] = self.addSegmentationNode(labels, mask.ijk_to_ras(), f"{caseId} lesion", wholeLesion=False,
                                                     referenceNode=reference)
        for node in nodes.values():
            item = sh.GetItemByDataNode(node)
            sh.SetItemParent(item, folder) if item else sh.CreateItem(folder, node)
        return nodes

    # --- sample data ------------------------------------------------------------------------------------------------
    @staticmethod
    def sampleDataCacheDir() -> Path:
        return Path(os.environ.get("PATHOSYN_CACHE", Path.home() / ".cache" / "pathosyn"))

    @staticmethod
    def _sha256(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return "SHA256:" + digest.hexdigest()

    def sampleDataFiles(self) -> dict[str, Path]:
        """{'t1': MNI152 T1 (written from nilearn to the cache on first use), 'mask': the demo lesion}, both
        checked against their SHA256 checksums."""
        mask = SAMPLE_LESION_FILE
        if self._sha256(mask) != SAMPLE_CHECKSUMS[mask.name]:
            raise InputError(f"sample lesion {mask} does not match its SHA256 checksum")
        t1 = self.sampleDataCacheDir() / "mni152_t1_1mm.nii"
        stamp = t1.with_name(t1.name + ".sha256")  # the checksum of the file as we wrote it
        if t1.is_file():
            actual = self._sha256(t1)
            if actual == SAMPLE_CHECKSUMS[t1.name] or (stamp.is_file() and stamp.read_text().strip() == actual):
                return {"t1": t1, "mask": mask}
        if "nilearn" in missingDependencies(include_sample_data=True):
            raise InputError("the MNI152 sample needs the 'nilearn' package (install it from the PathoSyn module's "
                             "Dependencies section, or: pip install nilearn)")
        from scripted_models.templates import mni_t1
        from scripted_models.volume import write_volume

        write_volume(mni_t1(), t1, compress=False)
        actual = self._sha256(t1)
        stamp.write_text(actual + "\n")
        if actual != SAMPLE_CHECKSUMS[t1.name]:  # another nilearn/SimpleITK build: same image, other bytes
            logging.info("PathoSyn: MNI152 cache %s has checksum %s (reference %s); kept (stamp %s)", t1, actual,
                         SAMPLE_CHECKSUMS[t1.name], stamp.name)
        return {"t1": t1, "mask": mask}

    def loadSampleData(self) -> tuple:
        """Load the teaching sample: (MNI152 T1 volume node, lesion segmentation node)."""
        from scripted_models.volume import read_volume

        files = self.sampleDataFiles()
        t1 = read_volume(files["t1"])
        t1Node = self.addVolumeNode(t1, "MNI152 T1")
        labels = read_volume(files["mask"])
        segNode = self.addSegmentationNode(np.rint(labels.array).astype(np.uint8), labels.ijk_to_ras(),
                                           "MNI152 demo lesion", wholeLesion=False, referenceNode=t1Node)
        return t1Node, segNode


def temporaryDirectory() -> str | None:
    """Where job files are handed over: a RAM-backed folder (/dev/shm) when there is one with room, else Slicer's
    temporary folder (Application settings) when running in Slicer, else the system default (None)."""
    import slicer

    from scripted_models.worker import handover_directory

    ram = handover_directory()
    if ram:
        return ram
    app = getattr(slicer, "app", None)
    path = getattr(app, "temporaryPath", None) if app is not None else None
    if isinstance(path, str) and path and os.path.isdir(path):
        return path
    return None


# --- layouts (Qt-free: layout node + view nodes; the widget only fits the slices) ------------------------------------
def registerLayouts(layoutNode) -> None:
    """Register the PathoSyn compare layout with a vtkMRMLLayoutNode. Called at startup (startupCompleted), so that a
    scene saved while the layout is shown reopens with its views (the scene stores only the layout id)."""
    if not layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
        layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, COMPARE_LAYOUT)


def applicationLayoutNode(scene=None, _cache={}):  # noqa: B006 - one headless layout logic per scene
    """The layout node of Slicer's layout manager; headless (slicer-core), the one of a vtkMRMLLayoutLogic on the
    scene (the same MRML logic Slicer's layout manager uses)."""
    import slicer

    app = getattr(slicer, "app", None)
    manager = app.layoutManager() if app is not None and hasattr(app, "layoutManager") else None
    if manager is not None:
        return manager.layoutLogic().GetLayoutNode()
    scene = scene or slicer.mrmlScene
    logic = _cache.get(id(scene))
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = slicer.vtkMRMLLayoutLogic()
        logic.SetMRMLScene(scene)
        _cache[id(scene)] = logic
    return logic.GetLayoutNode()


def _compositeNodeFor(scene, tag: str):
    for node in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        if node.GetLayoutName() == tag:
            return node
    import slicer

    node = slicer.vtkMRMLSliceCompositeNode()
    node.SetLayoutName(tag)
    return scene.AddNode(node)


@dataclass
class CompareViews:
    sliceNodes: list  # input, result
    compositeNodes: list
    viewNode: object  # 3D


def showCompare(scene, inputNode, outputNode, segmentation=None, layoutNode=None) -> CompareViews:
    """Show the compare layout: input (left) and result (right) in two dedicated axial slice views linked to each
    other only, and the lesion segmentation in the 3D view below. Existing views (Red, Yellow, ...) keep their
    orientation and linking. Raises InputError if a node is no longer in the scene (nothing is changed then)."""
    for node, what in ((inputNode, "input"), (outputNode, "result")):
        if node is None or node.GetScene() is not scene:
            raise InputError(f"the PathoSyn {what} volume is no longer in the scene: run the synthesis again")
    if segmentation is not None and segmentation.GetScene() is not scene:
        segmentation = None
    layoutNode = layoutNode or applicationLayoutNode(scene)
    registerLayouts(layoutNode)
    layoutNode.SetViewArrangement(COMPARE_LAYOUT_ID)
    return linkCompareViews(scene, inputNode, outputNode, segmentation)


def linkCompareViews(scene, inputNode, outputNode, segmentation=None) -> CompareViews:
    """Input and result in the existing compare views (tags PathoSynInput / PathoSynResult / PathoSyn3D), linked to
    each other only. Used by showCompare, and by front ends that create these views themselves (browser)."""
    sliceNodes = [scene.GetSingletonNode(tag, "vtkMRMLSliceNode") for tag in COMPARE_SLICE_TAGS]
    viewNode = scene.GetSingletonNode(COMPARE_3D_TAG, "vtkMRMLViewNode")
    if None in sliceNodes or viewNode is None:
        raise InputError("the compare layout did not create its views")
    composites = [_compositeNodeFor(scene, tag) for tag in COMPARE_SLICE_TAGS]
    for sliceNode, composite, node in zip(sliceNodes, composites, (inputNode, outputNode)):
        sliceNode.SetOrientationToAxial()  # also when the views already existed with another orientation
        sliceNode.SetViewGroup(COMPARE_VIEW_GROUP)
        composite.SetBackgroundVolumeID(node.GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)  # links the pair (same view group) only
        composite.SetHotLinkedControl(True)
    viewNode.SetViewGroup(COMPARE_VIEW_GROUP)
    if segmentation is not None:
        segmentation.CreateDefaultDisplayNodes()
        display = segmentation.GetDisplayNode()
        display.SetVisibility(True)
        if display.GetNumberOfViewNodeIDs():  # restricted to some views: add ours (empty = all views, keep it)
            for node in (*sliceNodes, viewNode):
                display.AddViewNodeID(node.GetID())
    return CompareViews(sliceNodes, composites, viewNode)


@dataclass
class BatchResult:
    """rows: results.csv rows (status, seconds, files ...) in manifest order; nodes: {case_id: {name: node}}."""

    rows: list
    outputDir: Path
    nodes: dict = field(default_factory=dict)


@dataclass
class SynthesisJob:
    command: str  # "synthesize" or "pseudo-healthy"
    argv: list  # arguments after `python -m scripted_models.cli`
    folder: Path  # temporary folder (inputs/ and outputs/); remove with cleanup()
    outputDir: Path
    prepared: PreparedInputs

    def writeInputs(self) -> dict:
        """The input files (for createJob(..., writeInputs=False)); no scene access."""
        return _writeJobInputs(self.prepared, self.folder)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _jobInputPaths(prepared: PreparedInputs, folder: Path) -> dict:
    """{'images': {mod: path}, 'mask': path[, 'brain_mask': path]}: where a job's inputs are written."""
    inputs = Path(folder) / "inputs"
    files = {"images": {mod: str(inputs / f"{mod}.nii") for mod in prepared.images}, "mask": str(inputs / "mask.nii")}
    if prepared.brainMask is not None:
        files["brain_mask"] = str(inputs / "brain_mask.nii")
    return files


def _writeJobInputs(prepared: PreparedInputs, folder: Path) -> dict:
    """Write the validated inputs as NIfTI at _jobInputPaths. Uncompressed: a temporary hand-over to the engine
    worker (gzip would cost about 1 s per 1 mm volume)."""
    from scripted_models.volume import write_volume

    files = _jobInputPaths(prepared, folder)
    for mod, vol in prepared.images.items():
        write_volume(vol, files["images"][mod])
    write_volume(prepared.mask, files["mask"])
    if prepared.brainMask is not None:
        write_volume(prepared.brainMask, files["brain_mask"])
    return files


__all__ = ["BatchResult", "CompareViews", "DependencyProblem", "InputError", "JobError", "MODALITIES",
           "PathoSynSlicerLogic", "SynthesisJob", "SynthesisNodes", "WeightsError", "availableDevices",
           "checkDependencies", "dependencyProblems", "linkCompareViews", "missingDependencies", "registerLayouts",
           "nodesByClass", "removeNodes", "showCompare",
           "subregionForSegmentName"]
