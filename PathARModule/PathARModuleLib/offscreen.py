"""Offscreen rendering of existing MRML view nodes (Qt-free; VTK with EGL/OSMesa or any offscreen context).

Each 3D view node is drawn by MRML displayable managers (camera, segmentations, models), so the picture shows what
the view shows in Slicer: its linked camera and only the segmentations displayed in that view.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

THREE_D_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLModelDisplayableManager",
                    "vtkMRMLSegmentationsDisplayableManager3D", "vtkMRMLVolumeRenderingDisplayableManager")
SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)


def applicationLogic(scene):
    """Slicer's application logic (desktop or the headless test scene), else a new one on `scene`."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "applicationLogic"):
        return app.applicationLogic()
    if getattr(slicer, "app_logic", None) is not None:
        return slicer.app_logic
    logic = slicer.vtkSlicerApplicationLogic()
    logic.SetMRMLScene(scene)
    return logic


def _window(size):
    from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow, vtkRenderWindowInteractor

    renderer, window = vtkRenderer(), vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    interactor = vtkRenderWindowInteractor()  # displayable managers observe an interactor
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return renderer, window, interactor


def _group(factoryClass, appLogic, managers, renderer):
    import slicer

    factory = factoryClass.GetInstance()
    factory.SetMRMLApplicationLogic(appLogic)
    for name in managers:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def _grab(window) -> np.ndarray:
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    return np.flipud(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]).copy()


def renderThreeDView(viewNode, appLogic, size=(360, 360)) -> np.ndarray:
    """RGB (h, w, 3) of a 3D view node, with its own camera node (linked cameras included)."""
    import slicer

    renderer, window, _interactor = _window(size)
    group = _group(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, appLogic, THREE_D_MANAGERS, renderer)
    group.SetMRMLDisplayableNode(viewNode)
    renderer.SetBackground(*viewNode.GetBackgroundColor())
    renderer.SetBackground2(*viewNode.GetBackgroundColor2())
    renderer.GradientBackgroundOn()
    window.Render()
    renderer.ResetCameraClippingRange()
    window.Render()
    return _grab(window)


def renderSliceView(sliceNode, appLogic, size=(360, 360)) -> np.ndarray:
    """RGB (h, w, 3) of a slice view node: its composite node's layers plus segmentations shown in it."""
    import slicer
    from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper

    renderer, window, _interactor = _window(size)
    mapper = vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddViewProp(actor)
    group = _group(slicer.vtkMRMLSliceViewDisplayableManagerFactory, appLogic, SLICE_MANAGERS, renderer)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(appLogic)
    logic.SetMRMLScene(sliceNode.GetScene())
    logic.SetSliceNode(sliceNode)
    group.SetMRMLDisplayableNode(sliceNode)
    keep = sliceNode.GetFieldOfView()
    logic.ResizeSliceNode(*size)
    logic.UpdatePipeline()
    mapper.SetInputConnection(logic.GetImageDataConnection())
    window.Render()
    sliceNode.SetFieldOfView(*keep)  # rendering must not move the user's view
    return _grab(window)


def renderViews(scene, layout, size=(360, 360), includeSlices: bool = True) -> dict:
    """{'3d': [RGB per sample 3D view], 'slices': [RGB per sample slice view]} of a LinkedLayout."""
    appLogic = applicationLogic(scene)
    out = {"3d": [renderThreeDView(v, appLogic, size) for v in layout.viewNodes], "slices": []}
    if includeSlices:
        out["slices"] = [renderSliceView(s, appLogic, size) for s in layout.sliceNodes]
    return out


def tile(views: dict, gap: int = 4) -> np.ndarray:
    """3D row over the slice row, separated by `gap` white pixels."""
    rows = []
    for key in ("3d", "slices"):
        images = views.get(key) or []
        if not images:
            continue
        h = images[0].shape[0]
        spacer = np.full((h, gap, 3), 255, np.uint8)
        parts = [p for img in images for p in (img, spacer)][:-1]
        rows.append(np.concatenate(parts, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    spacer = np.full((gap, width, 3), 255, np.uint8)
    return np.concatenate([p for r in rows for p in (r, spacer)][:-1], axis=0)


def savePNG(views, path) -> Path:
    """Write the tiled views (or an RGB array) as a PNG, atomically."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    rgb = tile(views) if isinstance(views, dict) else np.asarray(views)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flipped = np.ascontiguousarray(np.flipud(rgb).astype(np.uint8))
    image = vtkImageData()
    image.SetDimensions(flipped.shape[1], flipped.shape[0], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(flipped.reshape(-1, 3), deep=True))
    tmp = path.with_name(f".{path.name}.tmp.png")
    writer = vtkPNGWriter()
    writer.SetFileName(str(tmp))
    writer.SetInputData(image)
    writer.Write()
    tmp.replace(path)
    return path
