"""Review fixes of the two Slicer modules (GUI-integration layer), checked on a real headless MRML scene (slicer-core)
and with real processes. Review: shared/reviews/slicer-modules-review.md (finding ids in the test names)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_ball_mask, make_head

pytest.importorskip("slicer")

from slicer_scene import SlicerScene, array_of, engine_process  # noqa: E402

SUBREGION_SEGMENTS = {1: "Necrotic core", 2: "Edema", 3: "Enhancing tumor"}
CONVENTIONAL = 2  # vtkMRMLLayoutNode.SlicerLayoutConventionalView: Red, Yellow (sagittal), Green, 3D view 1


@pytest.fixture()
def app():
    return SlicerScene()


@pytest.fixture()
def logic(app):
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    return PathoSynSlicerLogic()


@pytest.fixture()
def pathar(app):
    from PathARModuleLib.logic import PathARModuleLogic

    return PathARModuleLogic(app.scene)


def add_head(app, name="head", seed=0):
    head = make_head(seed=seed)
    return head, app.add_volume(head.array, head.ijk_to_ras(), name)


def fake_synthesis(logic, node, seg):
    """Output nodes as a synthesis creates them (addSynthesisNodes), without running the engine: these tests are
    about how the result nodes are tagged, placed and found, not about the images."""
    prepared = logic.prepare(node, seg)
    images = {m: v.with_array(v.array + 1) for m, v in prepared.images.items()}
    residuals = {m: v.with_array(np.ones(v.shape, np.float32)) for m, v in prepared.images.items()}
    return logic.addSynthesisNodes(prepared, images, residuals, None, prepared.mask, {"seed": 0})


def fake_run(pathar, mods=("t1c", "flair"), n=2, seed=0):
    """PathAR sample nodes (addSampleNodes) from fixed arrays: about node bookkeeping, not the sampler."""
    from scripted_models.volume import Volume

    pairs = []
    for i in range(n):
        mask = make_ball_mask(make_head(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0)), radius_vox=5 + i)
        images = {m: Volume(np.full(mask.shape, 100 + i, np.int16), (1.0, 1.0, 1.0)) for m in mods}
        pairs.append((mask.with_array(mask.array.astype(np.uint8)), images))
    return pathar.addSampleNodes(pairs, list(mods), seed, 1.0)


def layout_node(scene):
    from PathoSynSlicerLib.logic import applicationLayoutNode

    return applicationLayoutNode(scene)


def one_line(exc) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


# --- B1: compare views are axial even when Yellow exists as sagittal -------------------------------------------------
def test_B1_compare_layout_is_axial_when_yellow_already_exists_sagittal(app, logic):
    from PathoSynSlicerLib.logic import COMPARE_LAYOUT_ID, COMPARE_SLICE_TAGS, showCompare

    layout = layout_node(app.scene)
    layout.SetViewArrangement(CONVENTIONAL)
    yellow = app.scene.GetSingletonNode("Yellow", "vtkMRMLSliceNode")
    assert yellow is not None and yellow.GetOrientation() == "Sagittal"
    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    out = fake_synthesis(logic, node, seg)

    views = showCompare(app.scene, node, out.volumes["t1"], out.segmentation, layout)
    assert layout.GetViewArrangement() == COMPARE_LAYOUT_ID
    assert [v.GetLayoutName() for v in views.sliceNodes] == list(COMPARE_SLICE_TAGS)
    assert [v.GetOrientation() for v in views.sliceNodes] == ["Axial", "Axial"]
    assert [c.GetBackgroundVolumeID() for c in views.compositeNodes] == [node.GetID(), out.volumes["t1"].GetID()]
    assert yellow.GetOrientation() == "Sagittal"  # the standard views are left as they were
    red = app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    assert red.GetViewGroup() != views.sliceNodes[0].GetViewGroup()  # linking the pair does not link Red/Yellow

    views.sliceNodes[1].SetOrientationToSagittal()  # a user changed it: the next compare resets it
    views = showCompare(app.scene, node, out.volumes["t1"], None, layout)
    assert views.sliceNodes[1].GetOrientation() == "Axial"


def test_B1_stale_node_raises_one_line_and_leaves_layout(app, logic):
    from PathoSynSlicerLib.logic import InputError, showCompare

    layout = layout_node(app.scene)
    layout.SetViewArrangement(CONVENTIONAL)
    head, node = add_head(app)
    gone = app.add_volume(head.array, head.ijk_to_ras(), "gone")
    app.scene.RemoveNode(gone)
    before = app.node_ids()
    with pytest.raises(InputError) as exc:
        showCompare(app.scene, node, gone, None, layout)
    assert "no longer in the scene" in one_line(exc)
    assert app.node_ids() == before and layout.GetViewArrangement() == CONVENTIONAL


# --- B4: layouts registered at startup; saved scenes reopen with a layout description ------------------------------
def _write_scene_xml(scene) -> str:
    scene.SetSaveToXMLString(1)
    scene.Commit()
    return scene.GetSceneXMLString()


def _read_scene_xml(xml: str, register: bool):
    import slicer
    from PathARModuleLib.logic import registerLayouts as registerPathAR
    from PathoSynSlicerLib.logic import registerLayouts

    scene = slicer.vtkMRMLScene()
    layoutLogic = slicer.vtkMRMLLayoutLogic()
    layoutLogic.SetMRMLScene(scene)
    if register:  # what the modules' startupCompleted() hooks do in a fresh Slicer session
        registerLayouts(layoutLogic.GetLayoutNode())
        registerPathAR(layoutLogic.GetLayoutNode())
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(xml)
    scene.Connect()
    return scene, layoutLogic


@pytest.mark.parametrize("which", ["compare", "pathar"])
def test_B4_saved_scene_with_a_custom_layout_reopens_with_its_views(app, logic, pathar, which):
    from PathARModuleLib.logic import LAYOUT_ID_BASE
    from PathoSynSlicerLib.logic import COMPARE_LAYOUT_ID, showCompare

    head, node = add_head(app)
    if which == "compare":
        seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
        out = fake_synthesis(logic, node, seg)
        showCompare(app.scene, node, out.volumes["t1"], out.segmentation, layout_node(app.scene))
        layoutId = COMPARE_LAYOUT_ID
    else:
        pathar.createLinkedLayout(numberOfSamples=3)
        layoutId = LAYOUT_ID_BASE + 3
    assert layout_node(app.scene).GetViewArrangement() == layoutId
    xml = _write_scene_xml(app.scene)

    unregistered, keep1 = _read_scene_xml(xml, register=False)  # the defect: a fresh session without registration
    assert keep1.GetLayoutNode().GetViewArrangement() == layoutId
    assert not keep1.GetLayoutNode().GetCurrentLayoutDescription()

    scene, keep2 = _read_scene_xml(xml, register=True)
    layout = keep2.GetLayoutNode()
    assert layout.GetViewArrangement() == layoutId
    description = layout.GetCurrentLayoutDescription()
    assert description and ("PathoSynResult" in description if which == "compare" else "PathARSlice3" in description)


# --- B2: the latest PathoSyn result is found by attribute, not by name -----------------------------------------------
def test_B2_second_synthesis_is_the_one_shown_not_a_stale_one(app, logic, pathar):
    head, node = add_head(app, name="T1")
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS, "MNI152 demo lesion")
    first = fake_synthesis(logic, node, seg)
    second = fake_synthesis(logic, node, seg)
    assert first.volumes["t1"].GetName() == "T1 synthesized"
    assert second.volumes["t1"].GetName() == "T1 synthesized_1"  # what name matching could not find
    source, output, lesion = pathar.pathoSynResult()
    assert output is second.volumes["t1"] and source is node and lesion is second.segmentation
    assert lesion is not seg  # " lesion" suffix of the user's mask does not count

    second.volumes["t1"].SetName("renamed by the user")
    assert pathar.pathoSynResult()[1] is second.volumes["t1"]
    layout = pathar.createLinkedLayout(numberOfSamples=1, pathoSynInput=source, pathoSynOutput=output,
                                       pathoSynSegmentation=lesion)
    assert pathar._compositeNode("PathoSynResult").GetBackgroundVolumeID() == second.volumes["t1"].GetID()
    assert layout.pathoSynSliceNodes

    second.removeFromScene()  # deleting the newest result: the previous one is the latest again
    assert pathar.pathoSynResult()[1] is first.volumes["t1"]


def test_B2_stale_pathosyn_node_raises_one_line_scene_unchanged(app, logic, pathar):
    from PathARModuleLib.logic import InputError

    head, node = add_head(app, name="T1")
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    out = fake_synthesis(logic, node, seg)
    stale = out.volumes["t1"]
    app.scene.RemoveNode(stale)
    before = app.node_ids()
    with pytest.raises(InputError) as exc:
        pathar.createLinkedLayout(numberOfSamples=1, pathoSynInput=node, pathoSynOutput=stale)
    assert "T1 synthesized" in one_line(exc) and "no longer in the scene" in str(exc.value)
    assert app.node_ids() == before


# --- B3: opening PathAR does not hide the PathoSyn lesion from the standard views ----------------------------------
def test_B3_pathosyn_lesion_stays_visible_in_standard_views(app, logic, pathar):
    layout_node(app.scene).SetViewArrangement(CONVENTIONAL)
    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    out = fake_synthesis(logic, node, seg)
    display = out.segmentation.GetDisplayNode()
    assert display.GetNumberOfViewNodeIDs() == 0  # shown in every view
    layout = pathar.createLinkedLayout(numberOfSamples=2, pathoSynInput=node, pathoSynOutput=out.volumes["t1"],
                                       pathoSynSegmentation=out.segmentation)
    for tag, cls in (("Red", "vtkMRMLSliceNode"), ("Yellow", "vtkMRMLSliceNode"), ("1", "vtkMRMLViewNode")):
        view = app.scene.GetSingletonNode(tag, cls)
        assert display.IsDisplayableInView(view.GetID()), tag
    for view in (*layout.pathoSynSliceNodes, layout.pathoSynViewNode):
        assert display.IsDisplayableInView(view.GetID())
    for view in (*layout.viewNodes, *layout.sliceNodes):
        assert not display.IsDisplayableInView(view.GetID())  # not over the samples

    restricted = fake_synthesis(logic, node, seg).segmentation  # a list the user chose is only extended
    red = app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    restricted.GetDisplayNode().SetViewNodeIDs([red.GetID()])
    pathar.showPathoSyn(layout, node, None, restricted)
    ids = set(restricted.GetDisplayNode().GetViewNodeIDs())
    assert ids == {red.GetID(), *(v.GetID() for v in (*layout.pathoSynSliceNodes, layout.pathoSynViewNode))}


# --- B6: "Use this mask" with the scan's modality; other modality fields cleared ---------------------------------
def test_B6_use_mask_sets_the_chosen_modality_and_clears_the_others(app, logic, pathar):
    head, flair = add_head(app, name="FLAIR")
    _, other = add_head(app, name="another subject's T1", seed=1)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    params = logic.getParameters()
    params.t1Volume, params.t2Volume = other, other
    out = pathar.useMaskInPathoSyn(seg, flair, "flair")
    assert out.flairVolume is flair and out.t1Volume is None and out.t2Volume is None and out.t1cVolume is None
    assert out.maskSegmentation is seg and not out.useLabelmap
    with pytest.raises(Exception, match="modality"):
        pathar.useMaskInPathoSyn(seg, flair, "dwi")
    # the target already is PathoSyn's flair: its t1 was chosen with it (same subject) and stays
    params.t1Volume = other
    out = pathar.useMaskInPathoSyn(seg, flair, "flair")
    assert out.flairVolume is flair and out.t1Volume is other and out.maskSegmentation is seg


def test_B6_pathar_parameters_have_a_target_modality(app, pathar):
    params = pathar.getParameters()
    assert params.targetModality == "t1"
    params.targetModality = "t2"
    assert pathar.getParameters().targetModality == "t2"


# --- B8: volume rendering transfer functions set through the MRML node ----------------------------------------------
def test_B8_transfer_function_edits_still_modify_the_property_node(app, pathar):
    import vtk

    run = fake_run(pathar, n=1)
    layout = pathar.createLinkedLayout(run)
    volume = run.samples[0].volumes["t1c"]
    display = pathar.setVolumeRendering(volume, layout.viewNodes[0])
    prop = display.GetVolumePropertyNode()
    assert prop.GetScalarOpacity() is prop.GetVolumeProperty().GetScalarOpacity()
    events = []
    tag = prop.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: events.append(1))
    prop.GetScalarOpacity().AddPoint(50.0, 0.2)  # what the Volume Rendering module's editor does
    prop.GetColor().AddRGBPoint(50.0, 0.1, 0.2, 0.3)
    prop.RemoveObserver(tag)
    assert len(events) >= 2  # the node noticed both edits (views refresh, the change is tracked)


# --- B11: deleted sample nodes, runs found again after a scene reload -------------------------------------------------
def test_B11_deleted_sample_gives_one_line_error_and_scene_unchanged(app, pathar):
    from PathARModuleLib.logic import InputError

    run = fake_run(pathar)
    layout = pathar.createLinkedLayout(run)
    assert run.isIntact()
    app.scene.RemoveNode(run.samples[1].volumes["flair"])
    assert not run.isIntact()
    before = app.node_ids()
    with pytest.raises(InputError) as exc:
        pathar.showModality(run, layout, "t1c")
    assert "deleted" in one_line(exc)
    assert app.node_ids() == before
    assert pathar.runFromScene() is None  # an incomplete run is not offered


def test_B11_run_is_found_again_after_mrb_reload(app, pathar, tmp_path):
    fake_run(pathar, seed=1)
    latest = fake_run(pathar, mods=("t2",), n=3, seed=7)
    path = app.save_mrb(tmp_path / "scene.mrb")
    app.load_mrb(path)
    run = pathar.runFromScene()
    assert run is not None and run.isIntact()
    assert run.modalities == ["t2"] and len(run.samples) == 3 and run.seed == 7
    assert [s.volumes["t2"].GetName() for s in run.samples] == [s.volumes["t2"].GetName() for s in latest.samples]
    layout = pathar.createLinkedLayout(run)
    assert layout.sliceCompositeNodes[2].GetBackgroundVolumeID() == run.samples[2].volumes["t2"].GetID()


# --- C8, C9: parameter node attribute; results next to the input in the subject hierarchy ------------------------
def test_C8_parameter_node_has_module_name_attribute(app, logic):
    assert logic.getParameterNode().GetAttribute("ModuleName") == "PathoSynSlicer"


def test_C9_outputs_are_placed_in_the_inputs_study_with_a_reference_volume(app, logic):
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    head, node = add_head(app)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    item = sh.GetItemByDataNode(node) or sh.CreateItem(study, node)
    sh.SetItemParent(item, study)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    out = fake_synthesis(logic, node, seg)
    for output in out.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(output)) == study, output.GetName()
    role = out.segmentation.GetReferenceImageGeometryReferenceRole()
    assert out.segmentation.GetNodeReference(role) is node


# --- B7: versions checked against the requirement, named in the message -------------------------------------------
def test_B7_too_old_package_is_reported_with_installed_and_required_version():
    from importlib import metadata

    from PathoSynSlicerLib.logic import dependencyMessage, dependencyProblems

    installed = metadata.version("numpy")
    problems = dependencyProblems({"numpy": "numpy>=999", "scipy": "scipy", "noSuchPackage": "noSuchPackage>=1"})
    assert set(problems) == {"numpy", "noSuchPackage"}
    assert problems["numpy"].installed == installed and problems["noSuchPackage"].installed is None
    message = dependencyMessage(problems)
    assert "\n" not in message
    assert f"numpy {installed} installed, numpy>=999 required" in message
    assert "missing Python packages: noSuchPackage" in message


def test_B7_check_dependencies_raises_one_line_naming_the_versions(monkeypatch):
    from importlib import metadata

    from PathoSynSlicerLib import logic as L

    monkeypatch.setitem(L.REQUIRED_PACKAGES, "torch", "torch>=99.0")  # a requirement this install cannot meet
    with pytest.raises(L.InputError) as exc:
        L.checkDependencies()
    message = one_line(exc)
    assert f"torch {metadata.version('torch')} installed, torch>=99.0 required" in message
    assert L.missingDependencies() == {"torch": "torch>=99.0"}  # what the install button upgrades


def test_B7_version_comparison():
    from PathoSynSlicerLib.logic import _simpleSatisfies, versionSatisfies

    assert versionSatisfies("2.13.0+cpu", ">=2.2") and not versionSatisfies("2.1.2", ">=2.2")
    assert versionSatisfies("1.4.0", ">=1.4") and not versionSatisfies("1.3.2", ">=1.4")
    assert versionSatisfies("1.5", ">=1.4,<2") and not versionSatisfies("2.0", ">=1.4,<2")
    assert versionSatisfies("0.1", "")
    assert _simpleSatisfies("2.13.0+cpu", ">=2.2") and not _simpleSatisfies("1.3.2", ">=1.4")  # without packaging


def test_B7_requirements_match_pyproject():
    import re

    from conftest import ROOT
    from PathoSynSlicerLib.logic import REQUIRED_PACKAGES, SAMPLE_DATA_PACKAGES

    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = {re.split(r"[<>=!~ \[]", d)[0]: d for d in re.findall(r'"([^"]+)"', deps)}
    for name, requirement in {**REQUIRED_PACKAGES, **SAMPLE_DATA_PACKAGES}.items():
        assert declared.get(name) == requirement, (name, requirement, declared.get(name))


# --- A3: cancel kills the whole process tree --------------------------------------------------------------------------
TREE_SCRIPT = r"""
import subprocess, sys, time
detach = sys.argv[2] == "detach"
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=detach)
open(sys.argv[1], "w").write(f"{child.pid}\n")
print('{"event": "progress", "fraction": 0.1, "message": "working"}', flush=True)
time.sleep(600)
"""


class _TreeRunner:
    """A CLIRunner whose child starts a grandchild (like the PythonSlicer launcher starting python-real)."""

    def __new__(cls, pidFile, mode, **kw):
        from PathoSynSlicerLib.process import CLIRunner

        class Runner(CLIRunner):
            def command(self):
                return [sys.executable, "-c", TREE_SCRIPT, str(pidFile), mode]

        return Runner([], **kw)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(os.name != "posix", reason="POSIX process tree (Windows uses taskkill /T or psutil)")
@pytest.mark.parametrize("mode", ["same-group", "detach"])
def test_A3_cancel_stops_child_and_grandchild(tmp_path, mode):
    from PathoSynSlicerLib.process import CANCELLED

    pidFile = tmp_path / "grandchild.pid"
    finished = []
    runner = _TreeRunner(pidFile, mode, onFinished=finished.append).start()
    t0 = time.monotonic()
    while runner.poll() and not runner.events and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    assert runner.running and pidFile.is_file(), runner.stderr
    child, grandchild = runner._proc.pid, int(pidFile.read_text())
    assert not _gone(child) and not _gone(grandchild)
    runner.cancel(grace=2.0)
    assert runner.state == CANCELLED and finished == [CANCELLED]
    deadline = time.monotonic() + 10
    while not (_gone(child) and _gone(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the child survived cancel"
    assert _gone(grandchild), f"the grandchild ({mode}) survived cancel"


def test_A3_windows_popen_arguments_hide_the_console():
    from PathoSynSlicerLib import process

    if os.name == "posix":
        assert process.popenPlatformArguments() == {"start_new_session": True}
    else:  # pragma: no cover - Windows
        args = process.popenPlatformArguments()
        assert args["creationflags"] & 0x08000000 and args["startupinfo"].wShowWindow == 0


# --- a worker that dies mid-job; undecodable output; callbacks that raise ---------------------------------------------
def _engine_job(app, logic):
    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    return node, logic.createJob(node, seg, samples=4, steps=200, threads=1)


def _kill_when_started(runner_or_none, predicate, timeout=120):
    """SIGKILL the engine process (and its group) once `predicate()` is true: the worker 'dies' mid-job."""
    import signal

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [p for p in psutil.Process().children(recursive=True)
                 if "scripted_models.cli" in " ".join(p.cmdline())]
        if procs and predicate():
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(os.name != "posix", reason="kills with a POSIX signal")
def test_worker_dying_mid_job_is_a_one_line_failure_and_the_scene_is_unchanged(app, logic):
    from PathoSynSlicerLib.process import FAILED

    node, job = _engine_job(app, logic)
    before = app.node_ids()
    errors, finished = [], []
    runner = engine_process(job.argv, onError=errors.append, onFinished=finished.append).start()
    try:
        t0 = time.monotonic()
        while runner.poll() and not runner.events and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        assert runner.running, runner.stderr
        assert _kill_when_started(runner, lambda: True)
        assert runner.wait(timeout=60) == FAILED
        assert finished == [FAILED] and errors == [runner.error]
        assert "killed by signal 9" in runner.error and "\n" not in runner.error
        assert app.node_ids() == before
    finally:
        job.cleanup()


@pytest.mark.skipif(os.name != "posix", reason="kills with a POSIX signal")
def test_runjob_raises_one_line_when_the_worker_dies(app, logic):
    import threading

    from PathoSynSlicerLib.logic import JobError

    node, job = _engine_job(app, logic)
    before = app.node_ids()
    killer = threading.Thread(target=_kill_when_started, args=(None, lambda: True), daemon=True)
    killer.start()
    with pytest.raises(JobError) as exc:
        logic.runJob(job, timeout=300, env={"OMP_NUM_THREADS": "1"})
    killer.join(timeout=5)
    assert "stopped unexpectedly" in one_line(exc)
    assert app.node_ids() == before and not job.folder.exists()


def test_runjob_timeout_raises_one_line_and_removes_the_job(app, logic):
    from PathoSynSlicerLib.logic import JobError

    node, job = _engine_job(app, logic)
    before = app.node_ids()
    with pytest.raises(JobError) as exc:
        logic.runJob(job, timeout=0.5, env={"OMP_NUM_THREADS": "1"})
    assert "did not finish" in one_line(exc)
    assert app.node_ids() == before and not job.folder.exists()


def test_incomplete_outputs_raise_job_error_scene_unchanged(app, logic):
    from PathoSynSlicerLib.logic import JobError

    node, job = _engine_job(app, logic)
    try:
        job.outputDir.mkdir(parents=True)
        (job.outputDir / "report.json").write_text("{}")  # a process that died after writing the report only
        before = app.node_ids()
        with pytest.raises(JobError) as exc:
            logic.loadJobOutputs(job)
        assert "incomplete" in one_line(exc) and "t1.nii," in str(exc.value)
        assert app.node_ids() == before
    finally:
        job.cleanup()


BAD_BYTES_SCRIPT = r"""
import sys
sys.stdout.buffer.write(b'\xff\xfe not utf-8\n'); sys.stderr.buffer.write(b'\xff bad\n')
sys.stdout.write('{"event": "done", "outputs": {}}\n')
"""


def test_undecodable_output_does_not_hang_and_callbacks_always_finish():
    from PathoSynSlicerLib.process import CLIRunner

    class Runner(CLIRunner):
        def command(self):
            return [sys.executable, "-c", BAD_BYTES_SCRIPT]

    finished = []

    def onDone(_payload):
        raise RuntimeError("loading failed")  # e.g. a disk-full OSError while reading the outputs

    runner = Runner([], onDone=onDone, onFinished=finished.append).start()
    with pytest.raises(RuntimeError, match="loading failed"):
        runner.wait(timeout=60)
    assert finished == ["done"]  # onFinished ran although onDone raised (progress bar hidden, job removed)
    assert "\ufffd" in runner.stderr  # the bad bytes were replaced, the reader thread survived


def test_exit_descriptions_are_one_line():
    from PathoSynSlicerLib.process import describeExit

    assert describeExit(-9, "x") == ("the background process stopped unexpectedly (killed by signal 9) before it "
                                     "finished")
    assert describeExit(2, "pathosyn: error: the mask is empty") == "the mask is empty"
    assert describeExit(1, "MemoryError") == "the background process failed (exit code 1): MemoryError"
    assert describeExit(0, None) == "the background process ended without a result"


# --- B9: the cached sample is not regenerated on every load ---------------------------------------------------------
def test_B9_sample_cache_is_written_once(app, logic, tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    monkeypatch.setenv("PATHOSYN_CACHE", str(tmp_path))
    t1 = logic.sampleDataFiles()["t1"]
    stamp = t1.with_name(t1.name + ".sha256")
    assert stamp.is_file()
    mtime = t1.stat().st_mtime_ns
    time.sleep(0.05)
    assert logic.sampleDataFiles()["t1"] == t1
    assert t1.stat().st_mtime_ns == mtime  # not rewritten
    t1.write_bytes(b"corrupt")  # a damaged cache is rebuilt
    logic.sampleDataFiles()
    assert t1.stat().st_size > 1000


def test_outputs_are_new_nodes_and_inputs_untouched_by_tagging(app, logic):
    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = array_of(node)
    out = fake_synthesis(logic, node, seg)
    assert node.GetAttribute("PathoSyn.Role") is None and seg.GetAttribute("PathoSyn.Role") is None
    assert out.volumes["t1"].GetAttribute("PathoSyn.Role") == "synthesized"
    assert out.residuals["t1"].GetAttribute("PathoSyn.Role") == "residual"
    assert out.segmentation.GetAttribute("PathoSyn.Role") == "lesion"
    assert np.array_equal(array_of(node), before)


def test_result_nodes_come_one_step_at_a_time_and_an_abandoned_setup_leaves_the_scene_as_it_was(app, logic):
    """synthesisNodeSteps (used by the browser front end to serve its event loop between nodes) makes the same nodes
    as addSynthesisNodes, one per step; closed half-way, it removes the nodes it made."""
    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    prepared = logic.prepare(node, seg)
    images = {m: v.with_array(v.array + 1) for m, v in prepared.images.items()}
    residuals = {m: v.with_array(np.ones(v.shape, np.float32)) for m, v in prepared.images.items()}

    def count():
        return app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), \
            app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    before = count()
    steps = logic.synthesisNodeSteps(prepared, images, residuals, None, prepared.mask, {"seed": 0})
    assert next(steps) == "t1 synthesized" and count() == (before[0] + 1, before[1])
    steps.close()  # abandoned: e.g. the page went away
    assert count() == before
    from PathoSynSlicerLib.logic import runSteps

    names, steps = [], logic.synthesisNodeSteps(prepared, images, residuals, None, prepared.mask, {"seed": 0})
    while True:
        try:
            names.append(next(steps))
        except StopIteration as stop:
            out = stop.value
            break
    assert names == ["t1 synthesized", "t1 residual", "lesion segmentation", "lesion surfaces"]
    assert count() == (before[0] + 2, before[1] + 1) and out.segmentation is not None
    closedSurface = "Closed surface"  # made in a step of its own, for the 3D views
    assert out.segmentation.GetSegmentation().ContainsRepresentation(closedSurface)
    again = runSteps(logic.synthesisNodeSteps(prepared, images, residuals, None, prepared.mask, {"seed": 0}))
    assert set(again.volumes) == set(out.volumes) == {"t1"}


def test_logic_files_import_without_qt_after_the_fixes():
    code = ("import sys; sys.path[:0] = ['PathoSynSlicer', 'PathARModule'];"
            "import PathoSynSlicerLib.logic, PathoSynSlicerLib.process, PathARModuleLib.logic;"
            "bad = [m for m in ('qt', 'ctk', 'torch') if m in sys.modules]; assert not bad, bad; print('ok')")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
