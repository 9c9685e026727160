"""Layouts and what the views show: trame-slicer's views, linked through the Slicer modules' logic.

Three layouts, their views created at startup (the first creation of a view costs about 2 s on a CPU renderer) and
shown as stacked layers of the page (WebViews.buildLayers: a switch changes which layer is visible):
  Paint    axial (large) + coronal, sagittal, 3D: paint the lesion here
  Compare  input | result slice views (tags PathoSynInput / PathoSynResult, the desktop module's) + 3D;
           linked (view group, composite LinkedControl) by PathoSynSlicerLib.logic.linkCompareViews
  PathAR n a row of sample 3D views over a row of sample slice views (tags PathAR<i> / PathARSlice<i>), linked by
           PathARModuleLib.logic.PathARModuleLogic.linkViews
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time

# isort: off
from PathoSynSlicerLib.logic import (  # noqa: E402
    COMPARE_3D_TAG,
    COMPARE_SLICE_TAGS,
    COMPARE_VIEW_GROUP,
    linkCompareViews,
    nodesByClass,
)
from PathARModuleLib.logic import (  # noqa: E402
    MAX_SAMPLES,
    PATHAR_VIEW_GROUP,
    segmentationCentreRAS,
    sliceTag,
    viewTag,
)
# isort: on
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps  # noqa: E402
from trame_slicer.views.view_layout_definition import ViewType  # noqa: E402

from .controller import LOOP_BREATH_S  # noqa: E402

log = logging.getLogger("pathosyn.web")
PAINT_SLICE_TAGS = ("Red", "Green", "Yellow")
OVERLAY_OPACITY = 0.6
FRAME_MARGIN = 1.8  # a 3D view aimed at a lesion is this many times the lesion's size across
COMPARE_SPAN, COMPARE_MIN_FOV_MM = 3.0, 100.0  # the compare slices show 3 lesion sizes across (>= 100 mm) around it
STILL_QUALITY = 90  # trame_rca RcaImageRenderScheduler's default still_quality
# Views render at most this many pixels; the browser scales the image up to the view's size. On a CPU renderer
# (llvmpipe, 2 cores) a render costs about its pixel count: the Paint layout's 718x764 axial view took 0.10 s a
# frame, capped to 530x564 0.05 s, which took a brush stroke from mouse-up to screen from 0.62-0.79 s to 0.41-0.45 s.
MAX_VIEW_PIXELS = 300_000
# Views the mouse is not over render at most this often (trame-slicer's default: 10 per second). A brush stroke in
# the axial view re-renders the other three (the brush shows in each), and every render holds the event loop that
# has to take the stroke's mouse-up: 3 per second took stroke-to-screen medians from 0.56 / 0.47 s to 0.44 / 0.37 s
# (two interleaved runs of 4 strokes each, 2 cores).
BLUR_FPS = 3.0


# A released view that has not rendered after this long (busy with its frame-rate wait) no longer holds the next one.
RENDER_WAIT_S = 0.4


class RenderHold:
    """Which views render, and when. A view renders only while its layout is shown: every layout's views exist from
    startup (createAllViews), and each scene change asked all of them, hidden ones included, for a render (CPU
    rendering, 2 cores). A hidden view's render waits until its layout is shown again. While a result is set up in
    phases (new nodes, layout, links, overlay) renders are held: one per view at the end instead of one per phase.
    Each intermediate render cost the event loop 0.05-0.1 s, and at BLUR_FPS the final one waited behind them.
    Held renders are released one view at a time: the next when the previous has rendered and the loop has had
    LOOP_BREATH_S to answer what came in meanwhile."""

    def __init__(self, first=(COMPARE_SLICE_TAGS[1], COMPARE_SLICE_TAGS[0])):
        self.depth = 0
        self.first = tuple(first)  # released before the others: the result view, then the input it is compared to
        self.shown: set | None = None  # tags of the shown layout's views (None: all)
        self.pending: dict = {}  # view tag -> its scheduler's own schedule_render
        self._nextTurn = None  # the event-loop handle of the release chain, while one runs
        self._rendering = None  # tag of the released view whose render the chain waits for
        self.recentRenders = collections.deque(maxlen=12)  # (view tag, seconds) of the latest renders (status, bench)

    def manage(self, scheduler, tag: str) -> None:
        """Route `scheduler.schedule_render` (trame_rca's RcaImageRenderScheduler) of view `tag` through the gate,
        and learn when the view has rendered (its `_render_frame`, where it has one)."""
        schedule = scheduler.schedule_render

        def scheduleRender():
            if self.depth or (self.shown is not None and tag not in self.shown):
                self.pending[tag] = schedule
            else:
                schedule()

        scheduler.schedule_render = scheduleRender
        renderFrame = getattr(scheduler, "_render_frame", None)
        if renderFrame is not None:
            def renderAndTell(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return renderFrame(*args, **kwargs)
                finally:
                    self.recentRenders.append((tag, round(time.perf_counter() - t0, 3)))
                    self._rendered(tag)

            scheduler._render_frame = renderAndTell

    def show(self, tags) -> None:
        """The layout with these views is on screen: their deferred renders run now."""
        self.shown = set(tags)
        self._release()

    def _release(self) -> None:
        if self.depth or self._nextTurn is not None:
            return
        self._releaseOne()

    def _ready(self) -> list:
        return sorted((t for t in self.pending if self.shown is None or t in self.shown),
                      key=lambda t: self.first.index(t) if t in self.first else len(self.first))

    def _releaseOne(self) -> None:
        """Release the first ready view; the next follows once it has rendered (see _rendered)."""
        self._nextTurn, self._rendering = None, None
        if self.depth:
            return
        ready = self._ready()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tests): all at once
            loop = None
        for tag in ready if loop is None else ready[:1]:
            self.pending.pop(tag)()
        if loop is not None and ready:
            self._rendering = ready[0]
            self._nextTurn = loop.call_later(RENDER_WAIT_S, self._releaseOne)

    def _rendered(self, tag: str) -> None:
        if tag != self._rendering or self._nextTurn is None:
            return
        self._nextTurn.cancel()
        self._rendering = None
        self._nextTurn = asyncio.get_running_loop().call_later(LOOP_BREATH_S, self._releaseOne)

    @contextlib.contextmanager
    def __call__(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self._release()


def registerViewFactories(viewManager, server, maxPixels: int = MAX_VIEW_PIXELS,
                          hold: RenderHold | None = None) -> None:
    """trame-slicer's remote slice and 3D view factories (as `register_rca_factories`), each view capped at
    `maxPixels` rendered pixels (0: the view's full size), at one render per change (interactive quality = still
    quality: no interactive frame followed by a still one) and at BLUR_FPS while the mouse is elsewhere; `hold`
    (a RenderHold) can defer their renders."""
    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui
    from trame_slicer.rca_view.rca_view_factory import RemoteSliceViewFactory, RemoteThreeDViewFactory

    def capped(factoryClass):
        class Capped(factoryClass):
            def _create_view(self, definition, *args, **kwargs):
                view = super()._create_view(definition, *args, **kwargs)
                view.view_adapter.max_pixel_count = int(maxPixels)
                if definition.view_type == ViewType.THREE_D_VIEW:
                    # depth peeling dropped translucent surfaces (edema, opacity 0.35) on llvmpipe: plain blending
                    view.slicer_view.renderer().SetUseDepthPeeling(False)
                if hold is not None:
                    hold.manage(view.view_adapter._scheduler, definition.singleton_tag)
                return view

        return Capped

    for factoryClass, populate in ((RemoteSliceViewFactory, create_vertical_slice_view_gutter_ui),
                                   (RemoteThreeDViewFactory, create_vertical_view_gutter_ui)):
        viewManager.register_factory(capped(factoryClass)(server, interactive_quality=STILL_QUALITY,
                                                          populate_view_ui_f=populate, blur_fps=BLUR_FPS))


def _slice(tag: str, label: str, color: str, group: int = 0, orientation: str = "Axial") -> ViewLayoutDefinition:
    return ViewLayoutDefinition(tag, ViewType.SLICE_VIEW, ViewProps(label=label, orientation=orientation, color=color,
                                                                    group=group))


def _threeD(tag: str, label: str, group: int = 0) -> ViewLayoutDefinition:
    return ViewLayoutDefinition(tag, ViewType.THREE_D_VIEW, ViewProps(label=label, group=group, box_visible=False,
                                                                      background_color=("#1f2020", "#3c3c3c")))


def patharLayoutId(n: int) -> str:
    return f"PathAR {n}"


def patharColumns(layoutId: str) -> int:
    """Samples shown by a PathAR layout (0 for the others)."""
    return int(layoutId.split()[-1]) if layoutId.startswith("PathAR ") else 0


def patharColumn(tag: str) -> int | None:
    """The sample (column) of a PathAR view tag, None for other views."""
    return next((i for i in range(MAX_SAMPLES) if tag in (viewTag(i), sliceTag(i))), None)


# The view area's layers (WebViews.buildLayers): stacked in one place, each keeps its size while hidden (no resize, no
# re-render when it shows again); hidden ones are not painted and take no mouse events.
PAGE_LAYERS_CSS = (".ps-layers { position: relative; flex: 1 1 auto; height: 100%; background-color: black; } "
                   ".ps-layer { position: absolute; inset: 0; display: flex; flex-direction: column; "
                   "visibility: hidden; pointer-events: none; } "
                   ".ps-layer-on { visibility: visible; pointer-events: auto; }")


def layouts() -> dict:
    paint = Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(),
        Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view(),
                                          ViewLayoutDefinition.threed_view()]),
    ], flex_sizes=["3", "1"])
    compare = Layout(LayoutDirection.Horizontal, [
        _slice(COMPARE_SLICE_TAGS[0], "In", "#F34A33", COMPARE_VIEW_GROUP),
        _slice(COMPARE_SLICE_TAGS[1], "Out", "#EDD54C", COMPARE_VIEW_GROUP),
        _threeD(COMPARE_3D_TAG, "PS", COMPARE_VIEW_GROUP),
    ])
    out = {"Paint": paint, "Compare": compare}
    for n in range(1, MAX_SAMPLES + 1):
        out[patharLayoutId(n)] = Layout(LayoutDirection.Vertical, [
            Layout(LayoutDirection.Horizontal, [_threeD(viewTag(i), f"S{i + 1}", PATHAR_VIEW_GROUP) for i in range(n)]),
            Layout(LayoutDirection.Horizontal,
                   [_slice(sliceTag(i), f"S{i + 1}", "#6E8FCB", PATHAR_VIEW_GROUP) for i in range(n)]),
        ])
    return out


class WebViews:
    """Display side of the controller (app-side; needs trame-slicer's SlicerApp and LayoutManager)."""

    def __init__(self, slicerApp, layoutManager, onLayout=None, renderHold: RenderHold | None = None):
        self.app = slicerApp
        self.scene = slicerApp.scene
        self.layoutManager = layoutManager  # holds the layouts, creates their views; buildLayers shows them
        self.onLayout = onLayout  # called with the layout id (the page's layout selector follows)
        self.currentLayout: str | None = None
        self.renderHold = renderHold or RenderHold()  # the one registerViewFactories was given
        self.resultComposite = None
        self.layoutTags: dict = {}  # layout id -> tags of its views
        self.aims: dict = {}  # 3D view tag -> (camera node, centre, size, position set): see aimCamera
        self.resizeObservers: dict = {}
        for layoutId, layout in layouts().items():
            layoutManager.register_layout(layoutId, layout, lazy_initialization=True)
            self.layoutTags[layoutId] = [v.singleton_tag for v in layout.get_views(is_recursive=True)]

    def createAllViews(self) -> None:
        """Create every layout's views now, at startup: the first Compare / PathAR display then does not pay for
        them (about 1-2 s per view on llvmpipe). Not in the background: a segment editor effect activated while a
        view is half-created fails (its pipeline finds no view)."""
        for layoutId in self.layoutManager.get_layout_ids():
            self.layoutManager.create_layout_views_if_needed(layoutId)

    def buildLayers(self, server, layoutState: str, columnsState: str) -> None:
        """The page's view area: the Paint, Compare and PathAR layouts as stacked layers (PAGE_LAYERS_CSS), built
        once, every view mounted for good. A layout switch only changes which layer is visible (state `layoutState`:
        Paint / Compare / PathAR) and how many PathAR columns show (`columnsState`). trame-slicer's LayoutManager
        re-sent the whole page's template on every switch instead: a 200-290 ms task in the page, during which it
        answered nothing (pings after a synthesis of up to 460 ms)."""
        from trame.widgets import html

        with html.Div(classes="ps-layers"):
            layers = (("Paint", "Paint"), ("Compare", "Compare"), ("PathAR", patharLayoutId(MAX_SAMPLES)))
            for layer, layoutId in layers:
                with html.Div(id=f"ps-layer-{layer.lower()}",
                              classes=(f"{layoutState} === '{layer}' ? 'ps-layer ps-layer-on' : 'ps-layer'",)):
                    self._grid(server, self.layoutManager.get_layout(layoutId), columnsState)

    def _grid(self, server, layout: Layout, columnsState: str) -> None:
        """A layout's nested flex boxes, each view as its server template (as trame-slicer's LayoutGrid); the PathAR
        sample i's views only while `columnsState` > i."""
        from trame.widgets import client, html

        direction = "row" if layout.direction == LayoutDirection.Horizontal else "column"
        with html.Div(style=f"display: flex; flex-direction: {direction}; flex: 1; min-width: 0; min-height: 0;"):
            for i, item in enumerate(layout.items):
                flex = layout.flex_sizes[i] if layout.flex_sizes and len(layout.flex_sizes) > i else "1"
                if isinstance(item, Layout):
                    with html.Div(style=f"display: flex; flex: {flex}; min-width: 0; min-height: 0;"):
                        self._grid(server, item, columnsState)
                    continue
                column = patharColumn(item.singleton_tag)
                with html.Div(classes="layout-grid-item", style=f"display: flex; flex: {flex}; min-width: 0; "
                              "min-height: 0; border: 1px solid #222;",
                              v_show=(f"{columnsState} > {column}",) if column is not None else None):
                    client.ServerTemplate(name=server.translator.translate_key(item.singleton_tag))

    def setLayout(self, layoutId: str) -> None:
        """Every layout change comes here: the page shows its layer (onLayout sets the state buildLayers reads),
        trame-slicer renders only its views, and the render gate (RenderHold) learns which views are on screen."""
        tags = self.layoutTags.get(layoutId, [])
        self.currentLayout = layoutId
        self.app.view_manager.set_current_view_ids(tags)
        self.renderHold.show(tags)
        if self.onLayout is not None:
            self.onLayout(layoutId)

    def view(self, tag: str):
        return self.app.view_manager.get_view(tag)

    # --- painting ----------------------------------------------------------------------------------------------------
    def showScan(self, volume, segmentation=None, centreOnSegmentation: bool = True) -> None:
        """The scan in the Paint views, fitted; the segmentation (filled) is the one the segment editor paints, and
        the slices pass through its centre unless centreOnSegmentation is False (the whole scan stays in view)."""
        self.setLayout("Paint")
        for tag in PAINT_SLICE_TAGS:
            view = self.view(tag)
            if view is not None:
                view.set_background_volume_id(volume.GetID())
                view.set_foreground_volume_id(None)
                view.fit_view_to_content()
        editor = self.app.segmentation_editor
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            display = segmentation.GetDisplayNode()
            display.SetVisibility2DFill(True)
            display.SetVisibility2DOutline(True)
            self.showOnlyIn(segmentation, [*PAINT_SLICE_TAGS, "ThreeD"])
            editor.set_active_segmentation(segmentation, volume)
            centre = segmentationCentreRAS(segmentation) if centreOnSegmentation else None
            if centre is not None:
                for tag in PAINT_SLICE_TAGS:
                    view = self.view(tag)
                    if view is not None:
                        view.get_view_node().JumpSliceByCentering(*centre)
        threeD = self.view("ThreeD")
        if threeD is not None:
            threeD.reset_view()

    def stopEditing(self) -> None:
        self.app.segmentation_editor.deactivate_effect()

    # --- compare -----------------------------------------------------------------------------------------------------
    def showCompare(self, inputNode, outputNode, segmentation=None, residual=None, uncertainty=None,
                    overlay: str = "none"):
        """Input and result in the linked Compare views, the lesion as an outline. A generator: each `yield` ends a
        scene step, and the controller gives the event loop back in between (the layout switch alone schedules
        renders of three views)."""
        self.stopEditing()
        self.setLayout("Compare")
        yield "compare layout"
        views = linkCompareViews(self.scene, inputNode, outputNode, segmentation)
        self.resultComposite = views.compositeNodes[1]
        inputView, resultView = (self.view(tag) for tag in COMPARE_SLICE_TAGS)
        if inputView is not None:
            inputView.fit_view_to_content()
        source, target = views.sliceNodes
        centre = segmentationCentreRAS(segmentation) if segmentation is not None else None
        size = _segmentationSize(segmentation) if centre is not None else 0.0
        if centre is not None:
            source.JumpSliceByCentering(*centre)
            zoomSlice(source, size)
        target.SetFieldOfView(*source.GetFieldOfView())  # linked views share interaction, not the first FOV
        target.GetSliceToRAS().DeepCopy(source.GetSliceToRAS())
        target.UpdateMatrices()
        yield "views linked"
        if segmentation is not None:  # outline only: the synthesized voxels stay visible
            display = segmentation.GetDisplayNode()
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
            display.SetSliceIntersectionThickness(2)
            self.showOnlyIn(segmentation, [*COMPARE_SLICE_TAGS, COMPARE_3D_TAG])
            yield "lesion outline"
        self.setOverlay({"residual": residual, "uncertainty": uncertainty}.get(overlay))
        if centre is not None:
            self.aimCamera(COMPARE_3D_TAG, centre, size)
        yield "overlay and camera"

    def showOnlyIn(self, displayable, tags) -> None:
        """Show a node in these views only (the painted mask in the Paint views, a result in the Compare views)."""
        ids = [view.get_view_node().GetID() for view in (self.view(tag) for tag in tags) if view is not None]
        for i in range(displayable.GetNumberOfDisplayNodes()):
            display = displayable.GetNthDisplayNode(i)
            if display is not None:
                display.SetViewNodeIDs(ids)

    def aimCamera(self, tag: str, centre, size: float) -> None:
        """Frame a lesion (`centre`, `size` mm across) in 3D view `tag`, again whenever the view is resized (the page
        sends a new layout's sizes after the switch) until the user moves the camera."""
        camera = next((c for c in nodesByClass(self.scene, "vtkMRMLCameraNode") if c.GetLayoutName() == tag), None)
        if camera is None:
            return
        aimCamera(camera, centre, size, self.viewAspect(tag))
        self.aims[tag] = (camera, centre, size, camera.GetPosition())
        view = self.view(tag)
        if view is not None and tag not in self.resizeObservers:
            self.resizeObservers[tag] = view.render_window().AddObserver(
                "WindowResizeEvent", lambda *_args, tag=tag: self._reaim(tag))

    def _reaim(self, tag: str) -> None:
        camera, centre, size, position = self.aims.get(tag, (None,) * 4)
        if camera is not None and math.dist(camera.GetPosition(), position) < 1e-3:  # not moved by the user since
            self.aimCamera(tag, centre, size)

    def viewAspect(self, tag: str) -> float:
        """Width / height of a view's render window (1 when unknown)."""
        view = self.view(tag)
        width, height = view.render_window().GetSize() if view is not None else (0, 0)
        return width / height if width > 0 and height > 0 else 1.0

    def setOverlay(self, node) -> None:
        """Residual or uncertainty over the result (foreground layer), or nothing."""
        if self.resultComposite is None:
            return
        self.resultComposite.SetForegroundVolumeID(node.GetID() if node is not None else None)
        self.resultComposite.SetForegroundOpacity(OVERLAY_OPACITY if node is not None else 0.0)

    # --- PathAR ------------------------------------------------------------------------------------------------------
    def showPathAR(self, patharLogic, run, modality: str):
        self.stopEditing()
        n = len(run.samples)
        self.setLayout(patharLayoutId(n))
        layout = patharLogic.linkViews(n, volumeRendering=False)  # CPU rendering: surfaces only
        patharLogic.showModality(run, layout, modality)
        for i in range(n):
            view = self.view(viewTag(i))
            if view is not None:
                view.schedule_render()
        return layout

    # --- placing a PathAR mask ---------------------------------------------------------------------------------------
    def observeClicks(self, tag: str, onClick) -> None:
        """onClick(pointRAS) on a left click in slice view `tag`; returns True to swallow the click."""
        view = self.view(tag)
        if view is None:
            return
        interactor = view.interactor()

        def onPress(caller, _event):
            x, y = caller.GetEventPosition()
            xyToRAS = view.get_view_node().GetXYToRAS()
            ras = xyToRAS.MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3]
            onClick(ras)

        interactor.AddObserver("LeftButtonPressEvent", onPress, 10.0)


def zoomSlice(sliceNode, size: float) -> None:
    """Zoom a slice view (about its centre) so that its narrower side spans COMPARE_SPAN lesion sizes (`size` mm),
    at least COMPARE_MIN_FOV_MM; never out beyond the fitted view."""
    fov = sliceNode.GetFieldOfView()
    scale = min(1.0, max(COMPARE_SPAN * size, COMPARE_MIN_FOV_MM) / max(min(fov[0], fov[1]), 1e-6))
    sliceNode.SetFieldOfView(fov[0] * scale, fov[1] * scale, fov[2])


def aimCamera(camera, centre, size: float, aspect: float = 1.0) -> None:
    """Point a camera node at `centre` from the front-right, far enough that `size` mm spans 1 / FRAME_MARGIN of
    the view across its narrower side (the view angle is vertical; `aspect` = width / height)."""
    tangent = math.tan(math.radians(camera.GetViewAngle() or 30.0) / 2.0) * min(1.0, aspect)
    distance = FRAME_MARGIN * max(size, 20.0) / (2.0 * tangent)
    direction = [0.6, 0.6, 0.5]
    norm = math.sqrt(sum(d * d for d in direction))
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(c + distance * d / norm for c, d in zip(centre, direction)))
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.ResetClippingRange()


def _segmentationSize(segmentation) -> float:
    """Largest extent (mm) of the segments' closed surfaces (the lesion itself; the node's RAS bounds are those of
    its labelmap, which may be the whole scan or just the painted box), else of the labelmap."""
    segmentation.CreateClosedSurfaceRepresentation()  # the 3D view shows it anyway
    segs = segmentation.GetSegmentation()
    low, high = [math.inf] * 3, [-math.inf] * 3
    for i in range(segs.GetNumberOfSegments()):
        surface = segmentation.GetClosedSurfaceInternalRepresentation(segs.GetNthSegmentID(i))
        if surface is None or not surface.GetNumberOfPoints():
            continue
        b = surface.GetBounds()
        low = [min(v, b[2 * a]) for a, v in enumerate(low)]
        high = [max(v, b[2 * a + 1]) for a, v in enumerate(high)]
    if all(math.isfinite(v) for v in low + high):
        return max(h - lo for lo, h in zip(low, high))
    bounds = [0.0] * 6
    segmentation.GetRASBounds(bounds)
    return max(bounds[1] - bounds[0], bounds[3] - bounds[2], bounds[5] - bounds[4], 0.0)
