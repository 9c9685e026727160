"""The browser front end's controller (PathoSynWeb/PathoSynWebLib/controller.py) on a plain slicer-core scene: no
trame, no Qt, no browser. Jobs run through a fake runner that writes the CLI's outputs, so the tests are quick;
the real engine worker is exercised by test_web_browser.py and test_worker.py."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_ball_mask, make_head, write_dicom_seg, write_dicom_series

pytest.importorskip("slicer")

from slicer_scene import SlicerScene, array_of  # noqa: E402

from PathoSynWeb.PathoSynWebLib.controller import WebController, guessModality  # noqa: E402
from PathoSynWeb.PathoSynWebLib.state import PathoSynWebState  # noqa: E402
from scripted_models.errors import InputError  # noqa: E402
from scripted_models.volume import read_volume, write_volume  # noqa: E402


class FakeRunner:
    """The WorkerRunner interface; on its 3rd poll it writes what `pathosyn synthesize --format nii` writes (input
    copied, zero residual, the mask) and reports done, or fails / waits for cancel as told."""

    def __init__(self, argv, outcome="done"):
        self.argv, self.outcome = list(argv), outcome
        self.state, self.fraction, self.message, self.result, self.error = "idle", 0.0, "", None, None
        self.polls = 0

    @property
    def running(self):
        return self.state == "running"

    def start(self):
        self.state = "running"
        return self

    def _arg(self, flag):
        return self.argv[self.argv.index(flag) + 1]

    def poll(self, _timeout=None):
        self.polls += 1
        self.fraction, self.message = min(1.0, self.polls / 3), f"denoising step {self.polls}/3"
        if self.outcome == "wait" or self.polls < 3:
            return True
        if self.outcome == "died":
            self.state, self.error = "failed", "the engine worker stopped (exit code -9): killed"
            return False
        out = Path(self._arg("--out"))
        out.mkdir(parents=True)
        for item in [a for a in self.argv if "=" in a and not a.startswith("--")]:
            mod, path = item.split("=", 1)
            image = read_volume(path)
            write_volume(image, out / f"{mod}.nii")
            write_volume(image.with_array(np.zeros(image.shape, np.float32)), out / f"residual_{mod}.nii")
        write_volume(read_volume(self._arg("--mask")), out / "mask.nii")
        if "--brain-mask" in self.argv:  # what the job handed over, for the tests
            self.brain_mask = read_volume(self._arg("--brain-mask"))
        (out / "report.json").write_text(json.dumps({"timing_s": {"total": 0.5}}))
        self.state, self.result = "done", {"event": "done"}
        return False

    def cancel(self):
        self.state = "cancelled"


@pytest.fixture()
def app():
    return SlicerScene()


def controller(app, outcome="done", tmp_path=None):
    runners = []

    def factory(argv):
        runners.append(FakeRunner(argv, outcome))
        return runners[-1]

    c = WebController(app.scene, PathoSynWebState(), runnerFactory=factory, appLogic=app.app_logic,
                      workDir=str(tmp_path) if tmp_path else None)
    c.runners = runners
    return c


def write_head(tmp_path, name="sub01_t1.nii.gz"):
    head = make_head()
    return head, write_volume(head, tmp_path / name)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(task):
    async def go():
        return await task
    return asyncio.get_event_loop().run_until_complete(go()) if task is not None else None


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def test_modality_from_file_name():
    assert guessModality("BraTS-GLI-00001-000-t1c.nii.gz") == "t1c"
    assert guessModality("case_flair.nii") == "flair"
    assert guessModality("/data/sub01_T2w.nrrd") == "t2"
    assert guessModality("BraTS-GLI-00001-000-t2f.nii.gz") == "flair"
    assert guessModality("anything.nii.gz") == "t1"


def test_load_scans_masks_and_segments_leave_files_untouched(app, tmp_path):
    c = controller(app)
    head, path = write_head(tmp_path)
    digest = sha(path)
    node = c.loadScanFile(str(path))
    assert c.scans == {"t1": node} and c.state.scans[0]["modality"] == "t1"
    assert np.array_equal(array_of(node), head.array)

    mask = make_ball_mask(head)
    brats = mask.with_array(np.where(mask.array == 3, 4, mask.array).astype(np.uint8))  # BraTS: 4 = enhancing
    mask_path = write_volume(brats, tmp_path / "lesion.nii.gz")
    mask_digest = sha(mask_path)
    seg = c.loadMaskFile(str(mask_path))
    names = {seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)}
    assert names == {"necrotic or non-enhancing core", "edema", "enhancing tumour"}
    assert c.segmentation is seg and c.state.segmentation_name == seg.GetName()
    assert sum(c.voxelCount().values()) == int((mask.array > 0).sum())
    assert sha(path) == digest and sha(mask_path) == mask_digest, "an input file was modified"
    series = write_dicom_series(head, tmp_path / "dicom")
    node = c.loadScanFile(str(series), "flair")
    assert c.scans["flair"] is node and np.array_equal(array_of(node), head.array)

    whole = c.newSegmentation(wholeLesion=True)
    assert [whole.GetSegmentation().GetNthSegment(i).GetName() for i in range(1)] == ["lesion"]
    three = c.newSegmentation()
    assert three.GetSegmentation().GetNumberOfSegments() == 3


def test_an_upload_is_sorted_into_scans_masks_and_one_dicom_series(app, tmp_path):
    """What the browser's file and folder buttons send: a NIfTI scan, a lesion mask, a brain mask and the slices
    of a DICOM folder (tagged by its series description) in one upload folder; then a DICOM folder holding its
    series and a DICOM SEG of the lesion: the scan and the mask."""
    from scripted_models.volume import write_volume as write

    c = controller(app)
    head, scan = write_head(tmp_path, "sub01_t1.nii.gz")
    mask = write(make_ball_mask(head), tmp_path / "lesion_seg.nii.gz")
    brain = write(head.with_array((head.array > 0).astype(np.uint8)), tmp_path / "sub01_brain_mask.nii.gz")
    flair = head.with_array((head.array * 0.5).astype(np.int16))
    series = write_dicom_series(flair, tmp_path / "dicom", description="AX T2 FLAIR")
    slices = [str(p) for p in sorted(series.iterdir())]
    for p in slices:  # an uploaded folder's slices arrive beside the other files
        os.replace(p, tmp_path / Path(p).name)
    c.loadUploadedFiles([str(scan), str(mask), str(brain)] + [str(tmp_path / Path(p).name) for p in slices])
    assert set(c.scans) == {"t1", "flair"} and c.scans["flair"].GetName() == "AX T2 FLAIR"
    assert np.array_equal(array_of(c.scans["flair"]), flair.array)
    assert c.segmentation is not None and c.brainMask is not None
    assert sum(c.voxelCount().values()) == int((make_ball_mask(head).array > 0).sum())
    labels = make_ball_mask(head).array
    upload = write_dicom_series(flair, tmp_path / "upload2", description="AX T2 FLAIR")
    seg = write_dicom_seg(upload, {"core": labels == 1, "edema": labels == 2, "enhancing": labels == 3},
                          tmp_path / "lesion.dcm")
    os.replace(seg, upload / "zz.dcm")  # among the slices, with no telling name
    c = controller(app)
    c.loadUploadedFiles([str(p) for p in sorted(upload.iterdir())])
    assert set(c.scans) == {"flair"} and c.segmentation is not None
    assert sorted(c.voxelCount().values()) == sorted(int((labels == v).sum()) for v in (1, 2, 3))
    assert guessModality("AX T1 POST GD") == "t1c" and guessModality("sub-01_T1w_ce.nii.gz") == "t1c"
    assert guessModality("Sag T1 MPRAGE") == "t1"


def test_bad_input_gives_one_line_and_changes_nothing(app, tmp_path, loop):
    c = controller(app)
    c.synthesize()
    assert c.state.error.startswith("no scan loaded") and not c.runners
    with pytest.raises(Exception, match="no such file"):
        c.loadScanFile(str(tmp_path / "missing.nii.gz"))
    _, path = write_head(tmp_path)
    c.loadScanFile(str(path))
    c.synthesize()
    assert c.state.error.startswith("no lesion mask")
    c.newSegmentation()  # segments, but nothing painted
    ids = [app.scene.GetNthNode(i).GetID() for i in range(app.scene.GetNumberOfNodes())]
    c.synthesize()
    assert "empty" in c.state.error and "\n" not in c.state.error and not c.runners
    assert [app.scene.GetNthNode(i).GetID() for i in range(app.scene.GetNumberOfNodes())] == ids
    c.setModality(c.scans["t1"].GetID(), "t5")
    assert "t5" in c.state.error
    c.state.population_pull = 1.5
    c.synthesize()
    assert c.state.error.startswith("population pull must be 0 to 1") and not c.runners
    c.state.population_pull = 0.5
    fractional = make_head().with_array(np.full((40, 48, 44), 0.5, np.float32))
    with pytest.raises(Exception, match="non-integer"):
        c.loadMaskFile(str(write_volume(fractional, tmp_path / "soft.nii.gz")))


def test_synthesis_job_streams_progress_and_adds_new_nodes(app, tmp_path, loop):
    c = controller(app, tmp_path=tmp_path)
    head, path = write_head(tmp_path)
    scan = c.loadScanFile(str(path))
    c.loadMaskFile(str(write_volume(make_ball_mask(head), tmp_path / "mask.nii.gz")))
    before = array_of(scan).copy()
    from scripted_models.weights import load_card

    assert c.state.population_pull == load_card("deviation_diffusion")["population_pull"]  # the card's default
    c.state.steps, c.state.seed, c.state.population_pull = 3, 7, 0.2
    task = c.synthesize()
    assert c.state.running and task is not None
    argv = c.runners[0].argv
    assert argv[0] == "synthesize" and argv[argv.index("--steps") + 1] == "3" and "--seed" in argv
    assert float(argv[argv.index("--population-pull") + 1]) == 0.2
    assert "--keep-base-texture" not in argv  # the default: the lesion gets the population's texture
    run(task)
    assert not c.state.running and c.state.has_result and not c.state.error, c.state
    assert c.state.message.startswith("Done in 0.5 s")
    result = c.lastResult
    assert result.volumes["t1"] is not scan and np.array_equal(array_of(scan), before)
    assert result.segmentation is not None and "residual" in result.residuals["t1"].GetName()
    assert not list(tmp_path.glob("pathosyn-*")), "the job folder was not removed"

    out = tmp_path / "saved"
    written = c.save(str(out), mrb=True)
    assert {p.name for p in written} == {"t1.nii.gz", "residual_t1.nii.gz", "mask.nii.gz", "scene.mrb"}
    assert np.array_equal(read_volume(out / "t1.nii.gz").array, head.array)
    assert (read_volume(out / "mask.nii.gz").array > 0).sum() == (make_ball_mask(head).array > 0).sum()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"

    run(c.pseudoHealthy())
    assert c.runners[-1].argv[0] == "pseudo-healthy" and not c.state.error
    assert c.lastHealthy["t1"].GetName().endswith("pseudo-healthy") and c.lastResult is None  # replaces the result
    written = c.save(str(tmp_path / "healthy"))
    assert [p.name for p in written] == ["pseudo_healthy_t1.nii.gz"]

    run(c.synthesize())
    result = c.lastResult
    first = result.nodes()
    run(c.synthesize())  # a new result replaces the previous one in the page (memory of a long session)
    assert c.lastResult is not result and all(n.GetScene() is None for n in first)
    assert scan.GetScene() is app.scene and c.segmentation.GetScene() is app.scene


def test_worker_death_and_cancel_leave_the_scene_unchanged(app, tmp_path, loop):
    for outcome in ("died", "wait"):
        c = controller(app, outcome, tmp_path=tmp_path)
        head, path = write_head(tmp_path)
        c.loadScanFile(str(path))
        c.loadMaskFile(str(write_volume(make_ball_mask(head), tmp_path / "mask.nii.gz")))
        count = app.scene.GetNumberOfNodes()
        task = c.synthesize()
        if outcome == "wait":
            loop.call_later(0.5, c.cancel)
        run(task)
        assert app.scene.GetNumberOfNodes() == count and c.lastResult is None
        assert not c.state.running
        if outcome == "died":
            assert c.state.error.startswith("the engine worker stopped"), c.state.error
        else:
            assert c.state.message.startswith("Cancelled") and not c.state.error
        assert not list(tmp_path.glob("pathosyn-*"))


def test_the_click_returns_before_the_inputs_are_written_and_cancel_can_come_first(app, tmp_path, loop):
    """The job's input files are written in a thread after the click handler returned (about 0.1-0.5 s of file
    writing for a 1 mm head: not on the event loop); a Cancel that arrives meanwhile stops the job before it starts."""
    c = controller(app, tmp_path=tmp_path)
    head, path = write_head(tmp_path)
    c.loadScanFile(str(path))
    c.loadMaskFile(str(write_volume(make_ball_mask(head), tmp_path / "mask.nii.gz")))
    count = app.scene.GetNumberOfNodes()
    task = c.synthesize()
    argv = c.runners[0].argv
    inputs = [Path(a.split("=", 1)[1]) for a in argv if "=" in a and not a.startswith("--")]
    assert inputs and not any(p.exists() for p in inputs), "the inputs were written in the click handler"
    c.cancel()
    run(task)
    assert c.runners[0].state == "idle", "a job cancelled before it started was started"
    assert c.state.message.startswith("Cancelled") and not c.state.error and not c.state.running
    assert app.scene.GetNumberOfNodes() == count and c.lastResult is None
    assert not list(tmp_path.glob("pathosyn-*"))


def test_a_thick_slice_scan_loaded_first_keeps_the_mask_on_the_finest_grid(app, tmp_path, loop):
    """A 3 mm-slice flair loaded before the 1 mm t1: the job's mask and the saved mask.nii.gz are on the t1's
    grid (exported from the segmentation there, not onto the flair's slices); each scan's output on its own."""
    from scripted_models.evaluation.bench import thick_slices

    c = controller(app, tmp_path=tmp_path)
    t1 = make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0))
    flair = thick_slices(make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), seed=1))
    c.loadScanFile(str(write_volume(flair, tmp_path / "sub_flair.nii.gz")))
    c.loadScanFile(str(write_volume(t1, tmp_path / "sub_t1.nii.gz")))
    ball = make_ball_mask(t1)
    c.loadMaskFile(str(write_volume(ball, tmp_path / "mask.nii.gz")))
    run(c.synthesize())
    assert not c.state.error, c.state.error
    out = tmp_path / "saved"
    c.save(str(out))
    saved = read_volume(out / "mask.nii.gz")
    assert saved.same_grid(t1) and np.array_equal(saved.array > 0, ball.array > 0)
    assert read_volume(out / "flair.nii.gz").same_grid(flair) and read_volume(out / "t1.nii.gz").same_grid(t1)


def test_pathar_sample_mask_placed_at_a_point(app, tmp_path):
    c = controller(app)
    head, path = write_head(tmp_path)
    scan = c.loadScanFile(str(path))
    patch = make_ball_mask(make_head(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0)), radius_vox=5)
    image = patch.with_array(np.random.default_rng(0).normal(size=patch.shape).astype(np.float32))
    c.patharRun = c.pathar.addSampleNodes([(patch, {"t1c": image})], ["t1c"], seed=0, temperature=1.0)
    c.armPlacement()
    assert c.state.placing and not c.state.error
    bounds = [0.0] * 6
    scan.GetRASBounds(bounds)
    centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    c.placeSampleAt(centre)
    assert not c.state.error and not c.state.placing
    assert c.segmentation.GetName().endswith("placed") and sum(c.voxelCount().values()) > 0
    assert c.logic.getParameters().maskSegmentation is c.segmentation  # useMaskInPathoSyn: PathoSyn's inputs
    c.placeSampleAt([1e4, 1e4, 1e4])
    assert "outside" in c.state.error

    # "add to the current mask": a second lesion beside the first, in a new segmentation; the first is kept
    first = c.segmentation
    first_labels = c.logic.maskFromNode(first, scan)[0].array.copy()
    c.state.error, c.state.pathar_add = "", True
    centre[0] += 10.0
    c.placeSampleAt(centre)
    assert not c.state.error and c.segmentation is not first and "+" in c.segmentation.GetName()
    labels = c.logic.maskFromNode(c.segmentation, scan)[0].array
    assert labels[first_labels > 0].all() and (labels > 0).sum() > (first_labels > 0).sum()
    assert np.array_equal(c.logic.maskFromNode(first, scan)[0].array, first_labels)
    assert c.logic.getParameters().maskSegmentation is c.segmentation


def test_pathar_anatomy_choice_goes_to_the_job(app, tmp_path, loop):
    c = controller(app, tmp_path=tmp_path)
    c.state.pathar_anatomy = "t2"
    task = c.samplePathAR()
    argv = c.runners[0].argv
    assert argv[0] == "sample" and argv[argv.index("--anatomy-from") + 1] == "t2"
    c.cancel()
    run(task)
    c.state.pathar_anatomy = "pd"
    assert c.samplePathAR() is None and "anatomy must be one of" in c.state.error and len(c.runners) == 1


def test_one_volume_per_modality_goes_to_the_job(app, tmp_path, loop):
    c = controller(app, tmp_path=tmp_path)
    head, t1 = write_head(tmp_path, "sub01_t1.nii.gz")
    _, flair = write_head(tmp_path, "sub01_flair.nii.gz")
    c.loadScanFiles([(str(t1), None), (str(flair), None)])
    assert set(c.scans) == {"t1", "flair"}
    c.setModality(c.scans["flair"].GetID(), "t1")  # taken: refused, tags unchanged
    assert "already given" in c.state.error and set(c.scans) == {"t1", "flair"}
    c.setModality(c.scans["flair"].GetID(), "t2")
    assert set(c.scans) == {"t1", "t2"} and not c.state.error
    c.loadMaskFile(str(write_volume(make_ball_mask(head), tmp_path / "mask.nii.gz")))
    run(c.synthesize())
    images = [a for a in c.runners[0].argv if "=" in a and not a.startswith("--")]
    assert sorted(a.split("=")[0] for a in images) == ["t1", "t2"]
    assert set(c.lastResult.volumes) == {"t1", "t2"}


def test_a_brain_mask_file_goes_to_the_job_and_replaces_the_previous_one(app, tmp_path, loop):
    c = controller(app, tmp_path=tmp_path)
    head, t1 = write_head(tmp_path)
    c.loadScanFile(str(t1))
    c.loadMaskFile(str(write_volume(make_ball_mask(head), tmp_path / "mask.nii.gz")))
    with pytest.raises(InputError, match="empty"):
        c.loadBrainMaskFile(str(write_volume(head.with_array(np.zeros(head.shape, np.uint8)), tmp_path / "e.nii.gz")))
    brain = (head.array > 0).astype(np.uint8)
    path = write_volume(head.with_array(brain * 7), tmp_path / "sub01_brainmask.nii.gz")
    digest = sha(path)
    first = c.loadBrainMaskFile(str(path))
    second = c.loadBrainMaskFile(str(path))
    assert first.GetScene() is None and c.brainMask is second and c.state.brain_mask_name == second.GetName()
    assert np.array_equal(array_of(second), brain) and sha(path) == digest
    run(c.synthesize())
    assert np.array_equal(c.runners[0].brain_mask.array, brain)


def test_render_gate_renders_shown_views_now_hidden_ones_when_shown_and_holds_during_a_setup():
    from PathoSynWeb.PathoSynWebLib.views import RenderHold

    class Scheduler:
        def __init__(self):
            self.renders = 0

        def schedule_render(self):
            self.renders += 1

    gate = RenderHold()
    views = {tag: Scheduler() for tag in ("Red", "ThreeD", "PathoSynResult")}
    for tag, scheduler in views.items():
        gate.manage(scheduler, tag)
    gate.show(["Red", "ThreeD"])
    for scheduler in views.values():
        scheduler.schedule_render()
        scheduler.schedule_render()
    assert [v.renders for v in views.values()] == [2, 2, 0]  # the hidden view waits
    with gate():
        views["Red"].schedule_render()
        views["Red"].schedule_render()
        with gate():  # nested holds release at the outermost
            gate.show(["Red", "PathoSynResult"])
        assert [v.renders for v in views.values()] == [2, 2, 0]
    assert [v.renders for v in views.values()] == [3, 2, 1]  # one render each, after the hold
    gate.show(["ThreeD"])
    assert [v.renders for v in views.values()] == [3, 2, 1]  # nothing was pending for it


def test_render_gate_answers_messages_between_held_renders():
    """After a hold, the views render one at a time, and a message that needs a few loop turns (a ping: read, handled,
    answered) is answered between two renders, not after all of them; a view that does not render does not hold the
    others for long."""
    import time

    from PathoSynWeb.PathoSynWebLib import views as V

    events: list = []

    class Scheduler:  # as trame_rca's: schedule_render wakes the view's task, which renders a loop turn later
        def __init__(self, tag):
            self.tag = tag

        def schedule_render(self):
            if self.tag == "silent":  # busy with its frame-rate wait: renders later, or never here
                events.append("silent asked")
                return
            asyncio.get_running_loop().call_soon(self._render_frame, 90)

        def _render_frame(self, quality):
            time.sleep(0.05)  # a CPU render holds the loop
            events.append(self.tag)

    gate = V.RenderHold()
    schedulers = [Scheduler(tag) for tag in ("a", "silent", "c")]
    for scheduler in schedulers:
        gate.manage(scheduler, scheduler.tag)

    async def ping():
        for _ in range(3):  # three loop turns, as a websocket message takes
            await asyncio.sleep(0)
        events.append("ping")

    async def run():
        with gate():
            for scheduler in schedulers:
                scheduler.schedule_render()
        assert events == []
        task = asyncio.ensure_future(ping())  # arrives while the first view renders
        t0 = time.perf_counter()
        while "c" not in events and time.perf_counter() - t0 < 5:
            await asyncio.sleep(0.01)
        await task
        return time.perf_counter() - t0

    seconds = asyncio.run(run())
    assert events == ["a", "ping", "silent asked", "c"], events
    assert V.RENDER_WAIT_S <= seconds < V.RENDER_WAIT_S + 0.5, seconds


def test_render_gate_releases_the_result_view_first():
    """After a result's set-up the Compare layout's result view renders first, then the input, then the rest, in
    whatever order they asked."""
    from PathoSynSlicerLib.logic import COMPARE_3D_TAG, COMPARE_SLICE_TAGS

    from PathoSynWeb.PathoSynWebLib.views import RenderHold

    renders: list = []

    class Scheduler:
        def __init__(self, tag):
            self.tag = tag

        def schedule_render(self):
            renders.append(self.tag)

    gate = RenderHold()
    schedulers = [Scheduler(tag) for tag in (COMPARE_3D_TAG, COMPARE_SLICE_TAGS[0], COMPARE_SLICE_TAGS[1])]
    for scheduler in schedulers:
        gate.manage(scheduler, scheduler.tag)
    with gate():
        for scheduler in schedulers:
            scheduler.schedule_render()
    assert renders == [COMPARE_SLICE_TAGS[1], COMPARE_SLICE_TAGS[0], COMPARE_3D_TAG]  # no loop here: all at once


def test_compare_slices_zoom_to_three_lesion_sizes_but_never_out(app):
    from PathoSynWeb.PathoSynWebLib import views as V

    node = app.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetFieldOfView(150.0, 300.0, 1.0)  # a fitted narrow view: 150 mm across, 300 mm high
    V.zoomSlice(node, 40.0)
    assert np.allclose(node.GetFieldOfView(), (120.0, 240.0, 1.0))  # 3 x 40 mm across, same aspect
    V.zoomSlice(node, 10.0)
    assert np.allclose(node.GetFieldOfView(), (100.0, 200.0, 1.0))  # at least 100 mm
    V.zoomSlice(node, 90.0)
    assert np.allclose(node.GetFieldOfView(), (100.0, 200.0, 1.0))  # never zoomed out


def test_the_compare_3d_camera_frames_the_lesion_not_its_labelmap(app):
    """A 40 mm lesion in a 120 mm labelmap: the size is the lesion's, and the camera is far enough for the whole
    lesion to fit the view with a margin (it used to sit inside large lesions)."""
    import math

    from PathoSynWeb.PathoSynWebLib import views as V

    labels = np.zeros((120, 120, 120), np.uint8)
    labels[40:60, 50:70, 30:70] = 1  # 40 mm along x (RAS = ijk here)
    seg = app.add_segmentation(labels, np.eye(4), {1: "lesion"})
    size = V._segmentationSize(seg)
    assert 38 <= size <= 42, size
    camera = app.scene.AddNewNodeByClass("vtkMRMLCameraNode")
    camera.SetLayoutName("Compare3D")
    centre = V.segmentationCentreRAS(seg)
    for aspect in (1.0, 0.4):  # a square view, and one narrower than tall (the Compare layout's 3D view)
        V.aimCamera(camera, centre, size, aspect)
        assert np.allclose(camera.GetFocalPoint(), centre)
        distance = math.dist(camera.GetPosition(), centre)
        across = 2 * math.atan(math.tan(math.radians(camera.GetViewAngle()) / 2) * aspect)  # horizontal view angle
        seen = 2 * math.atan(size / 2 / (distance - size / 2))  # angle the lesion spans, its near side included
        assert seen < across, (aspect, math.degrees(seen), math.degrees(across))
