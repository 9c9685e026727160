"""The trame application: trame-slicer's SlicerApp, layouts, segment editor and upload, plus the PathoSyn panel.

    pathosyn-web [--port 8080] [--host 127.0.0.1]

One server process serves one shared state (one user). Jobs run in the warm engine worker (a child process: no torch
in this process); the worker is started in a thread at startup so that the first click finds it warm.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # headless Mesa/GPU; no X server needed

from . import TEST_HOOKS_ENV  # noqa: E402
from . import state as _state  # noqa: E402,F401 - puts the Slicer modules' logic on sys.path

# No CSS motion where nothing moves: Vuetify keeps the indeterminate bars of every card's and text field's (unused,
# hidden) loader animating, and eases each progress-bar update. In a software-rendered Chromium on the engine
# worker's 2 cores that cost 0.5 CPU-s per 4 s of a job, against 0.12-0.2 without
# (docs/ARCHITECTURE.md, "What a click costs in the browser"). trame-slicer's footer spinner (trame busy) spins
# and eases too, whenever a server call is pending: it stands still as a ring.
QUIET_PAGE_CSS = (".v-card__loader, .v-field__loader { display: none !important; } "
                  ".v-progress-linear, .v-progress-linear *, .v-progress-circular, .v-progress-circular * "
                  "{ transition: none !important; animation: none !important; }")

log = logging.getLogger("pathosyn.web")


def quietVTK(folder: str) -> Path:
    """VTK's warnings and errors (trame-slicer prints them on stderr, e.g. 36 'vtkImageReslice has 0 connections'
    lines each time its segment editor takes a segmentation) go to a file in `folder` instead of the terminal."""
    from vtkmodules.vtkCommonCore import vtkFileOutputWindow, vtkLogger, vtkOutputWindow

    path = Path(folder) / "pathosyn-web-vtk.log"
    window = vtkFileOutputWindow()
    window.SetFileName(str(path))
    window.SetAppend(True)
    window.SetFlush(True)
    vtkOutputWindow.SetInstance(window)
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    return path


class PathoSynWebApp:
    def __init__(self, server=None, workDir: str | None = None, startWorker: bool = True,
                 maxViewPixels: int | None = None):
        from PathoSynSlicerLib.process import pythonExecutable
        from trame.app import get_server
        from trame_server.utils.asynchronous import create_task
        from trame_server.utils.typed_state import TypedState
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.app.logic import SegmentEditorLogic
        from trame_slicer.core import LayoutManager, SlicerApp

        from scripted_models.worker import EngineWorker

        from .controller import WebController
        from .state import PathoSynWebState
        from .views import (
            MAX_VIEW_PIXELS,
            RenderHold,
            WebViews,
            patharColumns,
            patharLayoutId,
            registerViewFactories,
        )

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state = self.server.state
        self.typed = TypedState(self.state, PathoSynWebState)
        self.slicerApp = SlicerApp()
        self.vtkLog = quietVTK(workDir or tempfile.gettempdir())
        # renders run on the event loop: one per change, at most MAX_VIEW_PIXELS each (views.registerViewFactories)
        renderHold = RenderHold()  # the controller holds renders while it sets a result up
        registerViewFactories(self.slicerApp.view_manager, self.server,
                              MAX_VIEW_PIXELS if maxViewPixels is None else maxViewPixels, renderHold)
        self.layoutManager = LayoutManager(self.slicerApp.scene, self.slicerApp.view_manager, self.server)
        self._patharLayoutId = patharLayoutId

        def onLayout(layoutId: str):
            columns = patharColumns(layoutId)
            if columns:
                self.typed.data.pathar_columns = columns
            self.typed.data.layout = "PathAR" if columns else layoutId

        self.views = WebViews(self.slicerApp, self.layoutManager, onLayout=onLayout, renderHold=renderHold)
        self.views.createAllViews()  # before the segment editor: its effect pipelines look the views up
        self.segmentEditorLogic = SegmentEditorLogic(self.server, self.slicerApp)
        # this front end's warm engine worker; --preload: the models are loaded before the first click
        self.worker = EngineWorker(command=[pythonExecutable()], preload=True) if startWorker else None
        self.controller = WebController(self.slicerApp.scene, self.typed.data, views=self.views,
                                        appLogic=self.slicerApp.app_logic, worker=self.worker,
                                        createTask=create_task, flush=lambda: self.state,
                                        workDir=workDir)
        self._buildUI()
        self.views.setLayout("Paint")
        self.views.observeClicks("Red", self._onAxialClick)
        self.typed.bind_changes({
            self.typed.name.layout: self._onLayoutChanged,
            self.typed.name.overlay: self.controller.setOverlay,
            self.typed.name.pathar_modality: self.controller.showPathARModality,
        })
        self.server.trigger("ps_ping")(self._ping)
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            # server-side checks for the browser tests and the bench; not registered for users
            self.server.trigger("ps_test_voxels")(self.controller.voxelCount)
            self.server.trigger("ps_test_status")(self._status)
            self.server.trigger("ps_test_state")(lambda name: getattr(self.typed.data, name))
        self.server.controller.on_server_ready.add(self._onReady)
        self.server.controller.on_client_connected.add(self._onClientConnected)
        self.state["trame__title"] = "PathoSyn"
        self._createTask = create_task

    # --- UI ----------------------------------------------------------------------------------------------------------
    def _buildUI(self):
        from trame.widgets import client
        from trame.widgets.vuetify3 import Template
        from trame_slicer.app.ui import (
            ControlButton,
            LoadVolumeUI,
            SegmentEditorToolbarUI,
            SegmentEditorUI,
            SegmentEditorUndoRedoUI,
            ViewerLayout,
        )

        from .panel_ui import LayoutToggle, PathoSynPanel
        from .views import PAGE_LAYERS_CSS

        c = self.controller
        handlers = {
            "load_sample": self._clicked(c.loadSample), "load_scan": self._clicked(c.loadScanFile),
            "set_modality": c.setModality, "new_subregions": self._clicked(lambda: c.newSegmentation(False)),
            "new_whole": self._clicked(lambda: c.newSegmentation(True)),
            "load_mask": self._clicked(c.loadMaskFile), "load_brain_mask": self._clicked(c.loadBrainMaskFile),
            "synthesize": self._starts(c.synthesize), "pseudo_healthy": self._starts(c.pseudoHealthy),
            "cancel": c.cancel, "pathar": self._starts(c.samplePathAR), "use_mask": c.armPlacement,
            "save": c.saveClicked,  # text fields: the click carries their values (no race with the state sync)
        }
        with ViewerLayout(self.server, title="PathoSyn", is_drawer_visible=True) as self.layout:
            client.Style(QUIET_PAGE_CSS + " " + PAGE_LAYERS_CSS)
            viewer = self.layout.typed_state
            self.layout.drawer.width = 400
            viewer.data.active_tool = "PathoSynPanel"
            with self.layout.appbar, Template(v_slot_prepend=True):
                self.upload = LoadVolumeUI()
            with self.layout.appbar:
                LayoutToggle(self.typed.name, classes="mx-4")
            with self.layout.drawer:
                PathoSynPanel(self.typed.name, handlers, v_if=(f"{viewer.name.active_tool} === 'PathoSynPanel'",))
                self.editorUI = SegmentEditorUI(v_if=(f"{viewer.name.active_tool} === 'SegmentEditorUI'",))
            with self.layout.toolbar:
                for tool, icon, label in (("PathoSynPanel", "mdi-brain", "PathoSyn panel"),
                                          ("SegmentEditorUI", "mdi-palette", "Segment editor panel")):
                    ControlButton(name=label, icon=icon, classes="mt-1", id=f"ps-tool-{tool}",
                                  active=(f"{viewer.name.active_tool} === '{tool}'",),
                                  click=f"{viewer.name.active_tool} = '{tool}'; {viewer.name.is_drawer_visible} = true")
                SegmentEditorToolbarUI(editor_ui=self.editorUI)
            with self.layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editorUI)
            with self.layout.content:
                self.views.buildLayers(self.server, self.typed.name.layout, self.typed.name.pathar_columns)
        self.segmentEditorLogic.set_ui(self.editorUI)
        self.upload.on_load_volume.connect(self._onUpload)

    def _clicked(self, action):
        """A quick (sub-second) scene action run in the click handler; its error becomes the page's line."""
        def handler(*args):
            with self.controller.reportErrors():
                action(*args)
        return handler

    @staticmethod
    def _starts(start):
        """A click that starts a job: the handler must return None. trame awaits a returned awaitable inside the
        trigger, and wslink handles that browser's messages one at a time: returning the task would freeze the page
        (views, pings, progress) for the whole job."""
        def handler(*_args):
            start()
        return handler

    # --- handlers ----------------------------------------------------------------------------------------------------
    def _onUpload(self, files: list) -> None:
        """Browser upload (trame-slicer's chunked file input, files or a folder): sorted by the controller
        (loadUploadedFiles: scans, lesion mask, brain mask, one DICOM series)."""
        from trame_slicer.utils import write_client_files_to_dir

        with self.controller.reportErrors(), tempfile.TemporaryDirectory(prefix="pathosyn-upload-") as folder:
            self.controller.loadUploadedFiles(write_client_files_to_dir(files, folder))

    def _onLayoutChanged(self, layout: str):
        if layout == "PathAR":
            run = self.controller.patharRun
            n = len(run.samples) if run is not None and run.isIntact() else int(self.typed.data.pathar_n or 2)
            layout = self._patharLayoutId(min(max(n, 1), 4))
        if layout != self.views.currentLayout:
            self.views.setLayout(layout)

    def _onAxialClick(self, pointRAS) -> None:
        if self.typed.data.placing:
            with self.state:
                self.controller.placeSampleAt(pointRAS)

    def _ping(self):
        return time.time()

    def _status(self):
        """For tests and the bench: the nodes of the latest result and the job state."""
        c = self.controller
        result = c.lastResult
        out = {"running": c.running, "error": self.typed.data.error, "message": self.typed.data.message,
               "layout": self.views.currentLayout, "has_result": result is not None,
               "pathar_samples": len(c.patharRun.samples) if c.patharRun is not None else 0,
               "worker_alive": bool(self.worker is not None and self.worker.alive),
               "torch_in_server": "torch" in sys.modules, "scene_nodes": self.slicerApp.scene.GetNumberOfNodes(),
               "show_timings_s": c.lastShowTimings, "job_timeline_s": c.lastJobTimeline,
               "recent_renders_s": list(self.views.renderHold.recentRenders)}
        out["scans"] = {e["modality"]: e["name"] for e in (self.typed.data.scans or [])}
        out["segmentation"] = self.typed.data.segmentation_name
        if c.patharLayout is not None and c.patharRun is not None and c.patharRun.isIntact():
            shownId = c.patharLayout.sliceCompositeNodes[0].GetBackgroundVolumeID()
            shown = self.slicerApp.scene.GetNodeByID(shownId) if shownId else None
            out["pathar_modality_shown"] = shown.GetAttribute("PathAR.Modality") if shown is not None else None
            out["pathar_structures"] = [int((c.pathar.labelsFromSegmentation(s.segmentation).array > 0).sum())
                                        for s in c.patharRun.samples]
        composite = self.views.resultComposite
        overlayId = composite.GetForegroundVolumeID() if composite is not None else None
        overlay = self.slicerApp.scene.GetNodeByID(overlayId) if overlayId else None
        out["overlay"] = overlay.GetName() if overlay is not None else None
        out["healthy"] = {m: n.GetName() for m, n in c.lastHealthy.items()}
        out["compare_offsets"] = [round(self.views.view(tag).get_view_node().GetSliceOffset(), 3)
                                  for tag in ("PathoSynInput", "PathoSynResult")]
        if result is not None:
            out["volumes"] = {m: n.GetName() for m, n in result.volumes.items()}
            out["report"] = {k: v for k, v in result.report.items() if isinstance(v, (int, float, str, list, dict))}
        return out

    def _onClientConnected(self, *_args, **_kwargs):
        """A page that was closed during an upload left the upload buttons busy for every later page (shared state):
        a new page starts with them free."""
        from trame_server.utils.typed_state import TypedState
        from trame_slicer.app.ui import LoadVolumeState

        upload = TypedState(self.state, LoadVolumeState).data
        upload.file_button.loading_busy = upload.dir_button.loading_busy = False

    def _onReady(self, **_):
        print(f"PathoSyn web front end: http://{self.host}:{self.port}/ (VTK messages: {self.vtkLog})", flush=True)
        if self.worker is not None:  # warm the engine worker (imports torch, loads the models) off the loop
            asyncio.get_event_loop().run_in_executor(None, self._startWorker)

    def _startWorker(self):
        try:
            self.worker.start()
        except Exception as exc:  # noqa: BLE001 - shown on the first click instead
            log.warning("engine worker did not start: %s", exc)

    def close(self):
        if self.worker is not None:
            self.worker.close()

    def start(self, host: str = "127.0.0.1", port: int = 8080):
        self.host, self.port = host, port
        self.server.start(host=host, port=port, open_browser=False, timeout=0, show_connection_info=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pathosyn-web", description="PathoSyn in the browser (trame-slicer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--work-dir", default=None, help="folder for the jobs' temporary files")
    parser.add_argument("--max-view-pixels", type=int, default=None,
                        help="render each view at most this many pixels, scaled up in the page (default 300000; "
                             "0: full size). Rendering is on the CPU here: fewer pixels, faster brush strokes")
    parser.add_argument("--no-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    if args.max_view_pixels is not None and args.max_view_pixels < 0:
        parser.error(f"--max-view-pixels must be 0 or more, got {args.max_view_pixels}")
    app = PathoSynWebApp(workDir=args.work_dir, startWorker=not args.no_worker, maxViewPixels=args.max_view_pixels)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        app.start(args.host, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
