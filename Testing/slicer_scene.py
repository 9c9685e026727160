"""A headless 3D Slicer scene on the `slicer-core` wheel (real MRML, module logics, offscreen VTK rendering).

Shared by the Slicer-module tests (PathoSyn, PathAR). The Slicer desktop application is not needed:

    from slicer_scene import SlicerScene
    app = SlicerScene()                       # sets slicer.mrmlScene, registers module logics
    node = app.add_volume(array, ijk_to_ras, "T1")
    app.save_mrb(path); app.load_mrb(path)
    png = app.render_slice(background=node, label_or_segmentation=seg, path=...)   # MRML displayable managers

What a running Slicer provides and this helper mimics: `slicer.mrmlScene`, an application logic with the Colors,
Volumes and Segmentations module logics registered, default colour nodes, slice orientation presets and
`slicer.modules.<name>.logic()` for those modules (only when `slicer.modules` is absent, i.e. never inside Slicer).
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np


class SlicerScene:
    def __init__(self):
        import slicer
        from vtkmodules.vtkCommonCore import vtkCollection, vtkOutputWindow

        out = vtkOutputWindow()
        out.SetDisplayModeToAlwaysStdErr()
        vtkOutputWindow.SetInstance(out)

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        # .mrb reading unpacks into the remote cache directory of the scene's data I/O manager
        import tempfile

        self._cache_dir = tempfile.TemporaryDirectory(prefix="slicer-cache-")
        cache = slicer.vtkCacheManager()
        cache.SetRemoteCacheDirectory(self._cache_dir.name)
        io_manager = slicer.vtkDataIOManager()
        io_manager.SetCacheManager(cache)
        self.scene.SetCacheManager(cache)
        self.scene.SetDataIOManager(io_manager)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.app_logic)
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.app_logic)

        self.logics = {}
        self.color_logic = self.app_logic.GetColorLogic()  # vtkSlicerColorLogic needs the Slicer share folder
        self.logics["Colors"] = self.color_logic
        self.volumes_logic = self._register("Volumes", slicer.vtkSlicerVolumesLogic())
        self.segmentations_logic = self._register("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())
        self.subject_hierarchy_logic = self._register("SubjectHierarchy",
                                                      slicer.vtkSlicerSubjectHierarchyModuleLogic())
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)

        slicer.mrmlScene = self.scene
        slicer.app_logic = self.app_logic
        if not hasattr(slicer, "modules") or getattr(slicer.modules, "_headless", False):
            slicer.modules = types.SimpleNamespace(_headless=True, **{
                name.lower(): types.SimpleNamespace(logic=(lambda lg=logic: lg))
                for name, logic in self.logics.items()})
        self._views = []

    def _register(self, name, logic):
        logic.SetMRMLApplicationLogic(self.app_logic)
        logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic(name, logic)
        self.logics[name] = logic
        return logic

    # --- nodes --------------------------------------------------------------------------------------------
    def add_volume(self, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Volume",
                   labelmap: bool = False):
        """A scalar (or labelmap) volume node with display nodes, from a (k, j, i) array and a 4x4 IJK-to-RAS."""
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData

        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name)
        array = np.ascontiguousarray(array)
        image = vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        scalars = numpy_to_vtk(array.ravel(), deep=True)
        scalars.SetName("ImageScalars")
        image.GetPointData().SetScalars(scalars)
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(matrix_to_vtk(ijk_to_ras))
        node.CreateDefaultDisplayNodes()
        return node

    def add_segmentation(self, labels: np.ndarray, ijk_to_ras: np.ndarray, names: dict[int, str],
                         node_name: str = "Segmentation"):
        """A segmentation node with one segment per label value in `names` ({value: segment name})."""
        slicer = self.slicer
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
        node.CreateDefaultDisplayNodes()
        for value, segment_name in names.items():
            image = oriented_image((labels == value).astype(np.uint8), ijk_to_ras)
            node.AddSegmentFromBinaryLabelmapRepresentation(image, segment_name, [0.5, 0.5, 0.5])
        node.GetSegmentation().SetSourceRepresentationName(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
        return node

    # --- snapshots ------------------------------------------------------------------------------------------
    def node_ids(self) -> set[str]:
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    # --- scene files ------------------------------------------------------------------------------------------
    def save_mrb(self, path) -> Path:
        path = Path(path)
        if not self.scene.WriteToMRB(str(path)):
            raise RuntimeError(f"writing {path} failed")
        return path

    def load_mrb(self, path, clear: bool = True) -> None:
        if not self.scene.ReadFromMRB(str(path), clear):
            raise RuntimeError(f"reading {path} failed")

    # --- offscreen rendering through MRML displayable managers ------------------------------------------------
    def render_slice(self, background, foreground=None, segmentation=None, orientation: str = "Axial",
                     size=(400, 400), name: str = "Red", offset_ras=None, foreground_opacity: float = 0.0):
        """Render one slice view (vtkMRMLSliceLogic + slice displayable managers) to an RGB numpy array."""
        view = _SliceView(self, name, orientation, size)
        self._views.append(view)
        return view.render(background, foreground, segmentation, offset_ras, foreground_opacity)

    def render_3d(self, size=(400, 400), name: str = "View1", elevation: float = 20.0, azimuth: float = 30.0):
        """Render a 3D view (threeD displayable managers: models, segmentations) to an RGB numpy array."""
        view = _ThreeDView(self, name, size)
        self._views.append(view)
        return view.render(elevation, azimuth)


def matrix_to_vtk(m: np.ndarray):
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    out = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out


def matrix_from_vtk(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def oriented_image(array: np.ndarray, ijk_to_ras: np.ndarray):
    import slicer
    from vtkmodules.util.numpy_support import numpy_to_vtk

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    image.SetImageToWorldMatrix(matrix_to_vtk(ijk_to_ras))
    return image


def ijk_to_ras(node) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_from_vtk(m)


def array_of(node) -> np.ndarray:
    """A copy of a volume node's voxels as a (k, j, i) array."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = node.GetImageData()
    dims = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]).copy()


def _grab(render_window) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    grab = vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.ReadFrontBufferOff()
    grab.Update()
    img = grab.GetOutput()
    w, h, _ = img.GetDimensions()
    arr = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]
    return np.flipud(arr).copy()


def save_png(rgb: np.ndarray, path) -> Path:
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.ascontiguousarray(np.flipud(rgb).astype(np.uint8))
    image = vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    scalars = numpy_to_vtk(rgb.reshape(-1, rgb.shape[2]), deep=True)
    image.GetPointData().SetScalars(scalars)
    writer = vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path


class _View:
    def __init__(self, size):
        from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow

        self.renderer = vtkRenderer()
        self.window = vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.window.AddRenderer(self.renderer)
        from vtkmodules.vtkRenderingCore import vtkRenderWindowInteractor

        self.interactor = vtkRenderWindowInteractor()  # displayable managers observe the interactor
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        import slicer

        self.group = slicer.vtkMRMLDisplayableManagerGroup()
        self.group.SetRenderer(self.renderer)

    def _init_group(self, factory, app, managers):
        factory = factory.GetInstance()
        factory.SetMRMLApplicationLogic(app.app_logic)
        for manager in managers:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.group.Initialize(factory, self.renderer)


class _SliceView(_View):
    def __init__(self, app: SlicerScene, name, orientation, size):
        import slicer
        from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper

        super().__init__(size)
        self.app = app
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.mapper = vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        self.actor = vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.actor)
        self._init_group(slicer.vtkMRMLSliceViewDisplayableManagerFactory, app, [
            "vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLModelSliceDisplayableManager",
            "vtkMRMLCrosshairDisplayableManager"])
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        self.logic.SetMRMLScene(app.scene)
        app.app_logic.GetSliceLogics().AddItem(self.logic)
        self.node = self.logic.AddSliceNode(name)
        self.node.SetOrientation(orientation)
        self.group.SetMRMLDisplayableNode(self.node)
        self.size = size

    def render(self, background, foreground, segmentation, offset_ras, foreground_opacity):
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(foreground_opacity)
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.GetDisplayNode().SetVisibility2DFill(True)
            segmentation.GetDisplayNode().SetOpacity2DFill(0.5)
        self.logic.ResizeSliceNode(*self.size)
        self.logic.RotateSliceToLowestVolumeAxes(False)
        self.logic.FitSliceToBackground()
        if offset_ras is not None:
            self.node.JumpSliceByCentering(*offset_ras)
        self.logic.SnapSliceOffsetToIJK()
        self.logic.UpdatePipeline()
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.group.ForceRender() if hasattr(self.group, "ForceRender") else None
        self.renderer.ResetCamera()
        self.window.Render()
        return _grab(self.window)


class _ThreeDView(_View):
    def __init__(self, app: SlicerScene, name, size):
        import slicer

        super().__init__(size)
        self._init_group(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, app, [
            "vtkMRMLModelDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D",
            "vtkMRMLThreeDReformatDisplayableManager"])
        self.node = app.scene.AddNewNodeByClass("vtkMRMLViewNode", name)
        self.node.SetBoxVisible(False)
        self.node.SetAxisLabelsVisible(False)
        self.group.SetMRMLDisplayableNode(self.node)

    def render(self, elevation, azimuth):
        self.renderer.SetBackground(*self.node.GetBackgroundColor())
        self.renderer.SetBackground2(*self.node.GetBackgroundColor2())
        self.renderer.GradientBackgroundOn()
        self.window.Render()
        self.renderer.ResetCamera()
        camera = self.renderer.GetActiveCamera()
        camera.Elevation(elevation)
        camera.Azimuth(azimuth)
        camera.OrthogonalizeViewUp()
        self.renderer.ResetCameraClippingRange()
        self.window.Render()
        return _grab(self.window)


def engine_process(argv, **callbacks):
    """A fresh `pathosyn` child process on one thread (the CLI runner the modules fall back to)."""
    from PathoSynSlicerLib.process import CLIRunner, engineRoot

    return CLIRunner(argv, engineRoot=engineRoot(), env={"OMP_NUM_THREADS": "1"}, **callbacks)
