"""The module panels' controllers (widget.py) on a real MRML scene, with the real engine in a background process.

Slicer's Qt is not in the slicer-core wheel, so the .ui widgets are stand-ins that record what the controller sets
(enabled, visible, text) and `qt.QTimer` is one the test fires by hand. Everything else is real: the parameter
node and its Modified events, the logic, the job files and the `pathosyn` child process."""
from __future__ import annotations

import contextlib
import sys
import time
import types

import numpy as np
import pytest
from conftest import make_ball_mask, make_head

pytest.importorskip("slicer")

from slicer_scene import SlicerScene, array_of, engine_process  # noqa: E402

SUBREGION_SEGMENTS = {1: "Necrotic core", 2: "Edema", 3: "Enhancing tumor"}
WIDGET_MODULES = ("PathoSynSlicerLib.widget", "PathARModuleLib.widget")


class StandInWidget:
    """What the controllers use of a Qt widget: state they set, and the slots connected to its signals."""

    def __init__(self):
        self.enabled, self.visible, self.collapsed = True, True, False
        self.text, self.toolTip, self.value, self.node = "", "", 0, None
        self.slots: dict[str, list] = {}

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def click(self):
        for slot in self.slots.get("clicked(bool)", []):
            slot(False)

    def setEnabled(self, on):
        self.enabled = bool(on)

    def setVisible(self, on):
        self.visible = bool(on)

    def setValue(self, value):
        self.value = value

    def setText(self, text):
        self.text = text

    def setCurrentNode(self, node):
        self.node = node

    def currentNode(self):
        return self.node


class StandInUI:
    def __getattr__(self, name):
        widget = StandInWidget()
        setattr(self, name, widget)
        return widget


class ManualTimer:
    def __init__(self):
        self.active, self.slot = False, None

    def setInterval(self, _ms):
        pass

    def connect(self, _signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def run_timer(panel, until=lambda: False, timeout=300.0):
    """Fire the panel's poll timer the way Qt would, until it stops (the job ended) or `until()` holds."""
    t0 = time.monotonic()
    while panel._timer.active and not until():
        assert time.monotonic() - t0 < timeout, "the job did not end"
        panel._timer.slot()
        time.sleep(0.05)


@pytest.fixture()
def gui(monkeypatch):
    """A scene, the stand-in Qt, no message boxes (errors are recorded) and no warm-up worker."""
    import slicer

    app = SlicerScene()
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace(QTimer=ManualTimer))
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda message, **_: errors.append(message))
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    for name in WIDGET_MODULES:
        sys.modules.pop(name, None)
    import PathARModuleLib.widget as pathar_widget
    import PathoSynSlicerLib.widget as pathosyn_widget
    for module in (pathosyn_widget, pathar_widget):
        monkeypatch.setattr(module, "warmUpSharedWorker", lambda: None)

    # a fresh `pathosyn` process instead of the shared warm worker
    gui = types.SimpleNamespace(app=app, errors=errors, runner=engine_process, pathosyn=pathosyn_widget,
                                pathar=pathar_widget, panels=[])
    yield gui
    for panel in gui.panels:  # what Slicer does when the module is closed: no observers left on the scene
        panel.cleanup()
    for name in WIDGET_MODULES:  # they were imported with the stand-in qt
        sys.modules.pop(name, None)


def pathosyn_panel(gui):
    head = make_head()
    node = gui.app.add_volume(head.array, head.ijk_to_ras(), "head")
    seg = gui.app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    panel = gui.pathosyn.PathoSynWidget(StandInUI())
    panel.runnerClass = gui.runner
    gui.panels.append(panel)
    assert panel.params.t1Volume is node  # the first volume of the scene
    panel.params.maskSegmentation = seg
    panel.params.preview = True  # 2 steps
    return panel, node, head


def test_pathosyn_panel_runs_a_synthesis_and_loads_new_nodes(gui):
    panel, node, head = pathosyn_panel(gui)
    ui = panel.ui
    assert ui.synthesizeButton.enabled and ui.pseudoHealthyButton.enabled
    ui.synthesizeButton.click()
    job = panel._job
    assert panel.running and ui.synthesizeButton.text == "Cancel" and ui.progressBar.visible
    assert not ui.pseudoHealthyButton.enabled and not ui.t1VolumeSelector.enabled
    panel.params.seed = 5  # a parameter change during the run (Modified -> updateGUI) must not re-enable them
    assert not ui.pseudoHealthyButton.enabled and not ui.maskSegmentationSelector.enabled
    ui.pseudoHealthyButton.slots["clicked(bool)"][0](False)  # a click that got through anyway: ignored
    assert panel.running
    run_timer(panel)
    assert not gui.errors, gui.errors
    assert ui.statusLabel.text.startswith("Done") and "head synthesized" in ui.statusLabel.text
    synthesized = gui.app.scene.GetFirstNodeByName("head synthesized")
    assert synthesized is not None and (array_of(synthesized) != head.array).any()
    assert (array_of(node) == head.array).all()  # the input is untouched
    assert ui.synthesizeButton.text == "Synthesize lesion" and ui.pseudoHealthyButton.enabled
    assert not ui.progressBar.visible and ui.progressBar.value > 0 and not job.folder.exists()


def test_pathosyn_panel_cancel_leaves_the_scene_and_the_panel_ready(gui):
    panel, _, _ = pathosyn_panel(gui)
    panel.params.preview, panel.params.steps, panel.params.samples = False, 200, 4
    before = gui.app.node_ids()
    panel.ui.synthesizeButton.click()
    job = panel._job
    run_timer(panel, until=lambda: bool(panel._runner.events))  # the child has started working
    assert panel.running
    panel.ui.synthesizeButton.click()  # its own button is Cancel
    assert not panel.running and not panel._timer.active and not gui.errors
    assert panel.ui.statusLabel.text == "Cancelled: the scene was not changed."
    assert gui.app.node_ids() == before and not job.folder.exists()
    assert panel.ui.synthesizeButton.text == "Synthesize lesion" and panel.ui.t1VolumeSelector.enabled


def test_a_job_that_cannot_start_reports_one_line_and_cleans_up(gui):
    panel, _, _ = pathosyn_panel(gui)

    class NoProcess(gui.pathosyn.WorkerRunner):
        def start(self):
            raise OSError("no such file: PythonSlicer")

    panel.runnerClass = NoProcess
    panel.ui.synthesizeButton.click()
    assert gui.errors == ["cannot start the synthesis process: no such file: PythonSlicer"]
    assert panel._job is None and not panel.running and panel.ui.synthesizeButton.text == "Synthesize lesion"
    assert gui.app.scene.GetFirstNodeByName("head synthesized") is None


def test_pathar_panel_locks_its_inputs_while_sampling_and_cancels(gui):
    head = make_head()
    target = gui.app.add_volume(head.array, head.ijk_to_ras(), "target")
    panel = gui.pathar.PathARWidget(StandInUI())
    panel.runnerClass = gui.runner
    gui.panels.append(panel)
    assert panel.params.targetVolume is target  # the first volume of the scene
    panel.params.numberOfSamples = 4
    ui = panel.ui
    assert ui.generateButton.enabled and not ui.useMaskButton.enabled  # no samples yet
    before = gui.app.node_ids()
    ui.generateButton.click()
    job = panel._job
    assert panel.running and ui.generateButton.text == "Cancel" and ui.generateButton.enabled
    assert not ui.seedSpinBox.enabled and not ui.renderFlairCheckBox.enabled and not ui.useMaskButton.enabled
    panel.params.temperature = 1.1  # Modified -> updateGUI during the run
    assert not ui.temperatureSlider.enabled
    run_timer(panel, until=lambda: bool(panel._runner.events))
    ui.generateButton.click()
    assert not panel.running and not gui.errors and gui.app.node_ids() == before and not job.folder.exists()
    assert ui.generateButton.text == "Generate samples" and ui.seedSpinBox.enabled
    assert ui.statusLabel.text == "Cancelled: the scene was not changed."


def test_pathar_panel_shows_samples_in_linked_views_and_offers_the_mask(gui, monkeypatch):
    head = make_head()
    gui.app.add_volume(head.array, head.ijk_to_ras(), "target")
    panel = gui.pathar.PathARWidget(StandInUI())
    panel.runnerClass = gui.runner
    gui.panels.append(panel)
    panel.params.numberOfSamples, panel.params.renderT1c = 1, False  # one sample, flair only
    ui = panel.ui
    assert not ui.useMaskButton.enabled and panel.params.placementPoint is None
    ui.generateButton.click()
    job = panel._job
    run_timer(panel)
    assert not gui.errors, gui.errors
    assert panel.run is not None and panel.run.modalities == ["flair"] and len(panel.run.samples) == 1
    assert panel.layout is not None and ui.statusLabel.text == "Done: 1 samples in flair"
    assert ui.useMaskButton.enabled and ui.exportFigureButton.enabled and ui.generateButton.text == "Generate samples"
    assert panel.params.placementPoint is not None  # created once there is a sample to place
    assert ui.placementPointWidget.currentNode() is panel.params.placementPoint and not job.folder.exists()

    # "Use this mask in PathoSyn" at a point, then a second lesion with "Add to PathoSyn's current mask" ticked
    import slicer
    from slicer_scene import ijk_to_ras

    monkeypatch.setattr(slicer.util, "selectModule", lambda _name: None, raising=False)
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda *_a, **_k: None, raising=False)  # clipped at an edge
    target, pathosyn = panel.params.targetVolume, panel.logic._pathoSyn

    def place_at(fraction):
        point = (ijk_to_ras(target) @ np.r_[np.array(head.shape[::-1]) * np.array(fraction), 1.0])[:3]
        panel.params.placementPoint.RemoveAllControlPoints()
        panel.params.placementPoint.AddControlPoint(*point)
        ui.useMaskButton.click()
        assert not gui.errors, gui.errors
        mask = panel.logic.pathoSynMask()
        return mask, pathosyn.maskFromNode(mask, target)[0].array

    first, first_labels = place_at((0.3, 0.5, 0.5))
    second, alone = place_at((0.7, 0.5, 0.5))  # not ticked: the new mask replaces the first in PathoSyn
    assert "placed" in first.GetName() and "placed" in second.GetName() and second is not first
    assert first_labels.any() and not np.array_equal(alone, first_labels)
    pathosyn.getParameters().maskSegmentation = first
    panel.params.addToCurrentMask = True
    both, labels = place_at((0.7, 0.5, 0.5))
    assert "+" in both.GetName() and labels[first_labels > 0].all() and labels[alone > 0].all()
    assert (labels > 0).sum() == ((first_labels > 0) | (alone > 0)).sum()
    assert np.array_equal(pathosyn.maskFromNode(first, target)[0].array, first_labels)  # the first mask is kept
