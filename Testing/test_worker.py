"""The warm engine worker: same bytes as the in-process API, one process for many jobs, ping mid-job, cancel
without losing the warm models, a killed worker reported and restarted, bad input as a one-line error."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from conftest import make_ball_mask, make_head

from scripted_models.errors import InputError
from scripted_models.volume import read_volume, write_volume
from scripted_models.worker import EngineWorker, WorkerError


@pytest.fixture(scope="module")
def worker():
    with EngineWorker(threads=2) as w:
        yield w


@pytest.fixture()
def job(tmp_path):
    head = make_head()
    img = write_volume(head, tmp_path / "in" / "t1.nii.gz")
    mask = write_volume(make_ball_mask(head), tmp_path / "in" / "mask.nii.gz")
    return head, img, mask


def _wait_for(worker, job_id, kinds, timeout=120):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        for event in worker.job_events(job_id, timeout=0.05):
            seen.append(event)
            if event["event"] in kinds:
                return event, seen
    raise AssertionError(f"no {kinds} event for {job_id}: {seen[-3:]}")


def test_jobs_match_the_api_bytes_in_one_warm_process(worker, job, tmp_path):
    from scripted_models.pathosyn.api import synthesize_lesion

    head, img, mask = job
    starts = worker.starts
    fractions = []
    for k in range(2):
        out = worker.run("synthesize", {"images": {"t1": str(img)}, "mask": str(mask), "out": str(tmp_path / f"o{k}"),
                                        "seed": 3, "steps": 2}, progress=lambda f, m: fractions.append(f))
        assert set(out) >= {"t1", "residual_t1", "mask"}
    assert worker.starts == starts  # no new process: the models stayed loaded
    assert fractions and max(fractions) == 1.0 and min(fractions) > 0.0
    direct = synthesize_lesion({"t1": read_volume(img)}, read_volume(mask), seed=3, steps=2)
    for k in range(2):
        assert np.array_equal(read_volume(tmp_path / f"o{k}" / "t1.nii.gz").array, direct.images["t1"].array)


def test_population_pull_reaches_the_engine_from_the_worker_and_the_slicer_job_arguments(worker, job, tmp_path):
    """The front ends' way in (CLI arguments -> worker job) carries --population-pull and --keep-base-texture; the
    worker's bytes are the API's for those settings, and other settings give other bytes."""
    from PathoSynSlicerLib.process import workerJob

    from scripted_models.pathosyn.api import synthesize_lesion

    head, img, mask = job
    op, args = workerJob(["synthesize", "--image", f"t1={img}", "--mask", str(mask), "--out", str(tmp_path / "p"),
                          "--seed", "1", "--steps", "2", "--population-pull", "0.25"])
    assert op == "synthesize" and args["population_pull"] == 0.25
    worker.run(op, args)
    direct = {p: synthesize_lesion({"t1": read_volume(img)}, read_volume(mask), seed=1, steps=2,
                                   population_pull=p).images["t1"].array for p in (0.25, 1.0)}
    got = read_volume(tmp_path / "p" / "t1.nii.gz").array
    assert np.array_equal(got, direct[0.25]) and not np.array_equal(got, direct[1.0])
    # --keep-base-texture: the same way in; the head's noise stays in the lesion (default: attenuated for t1)
    op, args = workerJob(["synthesize", "--image", f"t1={img}", "--mask", str(mask), "--out", str(tmp_path / "k"),
                          "--seed", "1", "--steps", "2", "--population-pull", "0.25", "--keep-base-texture"])
    assert args["keep_base_texture"] is True
    worker.run(op, args)
    kept = synthesize_lesion({"t1": read_volume(img)}, read_volume(mask), seed=1, steps=2, population_pull=0.25,
                             texture_match=False).images["t1"].array
    got = read_volume(tmp_path / "k" / "t1.nii.gz").array
    assert np.array_equal(got, kept) and not np.array_equal(got, direct[0.25])


def test_brain_mask_reaches_the_engine_from_the_worker_and_the_slicer_job_arguments(worker, tmp_path):
    """--brain-mask (CLI arguments -> worker job, synthesize and pseudo-healthy): the worker's bytes are the API's
    with that brain mask, and the report says the units came from it."""
    from conftest import noisy_head
    from PathoSynSlicerLib.process import workerJob

    from scripted_models.pathosyn.api import pseudo_healthy, synthesize_lesion
    from scripted_models.volume import Volume

    array, brain, _ = noisy_head()
    scan = Volume(array, (1.0, 1.0, 1.0))
    img = write_volume(scan, tmp_path / "in" / "t1.nii.gz")
    mask = write_volume(make_ball_mask(scan, radius_vox=5), tmp_path / "in" / "mask.nii.gz")
    brain_file = write_volume(scan.with_array(brain.astype(np.uint8)), tmp_path / "in" / "brain.nii.gz")
    common = ["--image", f"t1={img}", "--mask", str(mask), "--brain-mask", str(brain_file), "--seed", "1"]
    op, args = workerJob(["synthesize", *common, "--out", str(tmp_path / "s"), "--steps", "1"])
    assert args["brain_mask"] == str(brain_file)
    worker.run(op, args)
    inputs = {"t1": read_volume(img)}, read_volume(mask)
    direct = synthesize_lesion(*inputs, seed=1, steps=1, brain_mask=read_volume(brain_file)).images["t1"].array
    assert np.array_equal(read_volume(tmp_path / "s" / "t1.nii.gz").array, direct)
    assert json.loads((tmp_path / "s" / "report.json").read_text())["normalised_over"] == "brain mask"
    op, args = workerJob(["pseudo-healthy", *common, "--out", str(tmp_path / "h")])
    worker.run(op, args)
    healed = pseudo_healthy(*inputs, seed=1, brain_mask=read_volume(brain_file))["t1"].array
    without = pseudo_healthy(*inputs, seed=1)["t1"].array
    got = read_volume(tmp_path / "h" / "t1.nii.gz").array
    assert np.array_equal(got, healed) and not np.array_equal(got, without)


def test_worker_jobs_carry_every_option_of_their_command(tmp_path):
    """The front ends send CLI arguments through workerJob: every option of synthesize, pseudo-healthy and sample
    must reach the job (one it dropped would be ignored without a word, as sample's --anatomy-from was); the worker
    has its own threads and progress events."""
    import argparse

    from PathoSynSlicerLib.process import workerJob

    from scripted_models.cli import build_parser

    renamed = {"image": "images", "modality": "modalities"}
    worker_owns = {"help", "threads", "progress"}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    required = {"synthesize": ["--image", "t1=a.nii", "--mask", "m.nii"],
                "pseudo-healthy": ["--image", "t1=a.nii", "--mask", "m.nii"], "sample": ["--modality", "t1c"]}
    for op, argv in required.items():
        got, args = workerJob([op, *argv, "--out", str(tmp_path)])
        assert got == op
        options = {renamed.get(a.dest, a.dest) for a in commands[op]._actions} - worker_owns
        assert options <= set(args), f"{op}: {sorted(options - set(args))} not in the worker job"


def test_pathar_options_reach_the_engine_from_the_worker(worker, tmp_path):
    """sample's --anatomy-from and --modality-guidance through the worker give the API's bytes with them."""
    from PathoSynSlicerLib.process import workerJob

    from scripted_models.pathar.api import sample_pairs

    common = ["--modality", "t1c", "--modality", "flair", "--seed", "2"]
    op, args = workerJob(["sample", *common, "--anatomy-from", "none", "--modality-guidance", "flair=2",
                          "--out", str(tmp_path / "s")])
    worker.run(op, args)
    direct = sample_pairs(["t1c", "flair"], 1, 2, anatomy_from="none", modality_guidance={"flair": 2.0})[0]
    default = sample_pairs(["t1c", "flair"], 1, 2)[0]
    for m in ("t1c", "flair"):
        got = read_volume(tmp_path / "s" / "sample_000" / f"{m}.nii.gz").array
        assert np.array_equal(got, direct.images[m].array)
    assert not np.array_equal(read_volume(tmp_path / "s" / "sample_000" / "flair.nii.gz").array,
                              default.images["flair"].array)


def test_cropped_outputs_pasted_into_the_input_are_the_full_outputs_bit_for_bit(worker, job, tmp_path):
    """--crop-outputs (the front ends' hand-over) writes the lesion ROI box of each output at its physical place;
    pasted into the input (images) or zeros (residual, uncertainty, mask) it gives the full outputs' bytes."""
    head, img, mask = job
    args = {"images": {"t1": str(img)}, "mask": str(mask), "seed": 5, "steps": 2, "samples": 2, "format": "nii"}
    full = worker.run("synthesize", {**args, "out": str(tmp_path / "full")})
    cropped = worker.run("synthesize", {**args, "out": str(tmp_path / "crop"), "crop_outputs": True})
    report = json.loads((tmp_path / "crop" / "report.json").read_text())
    box = tuple(slice(a, b) for a, b in report["outputs_box_zyx"])
    assert set(cropped) == set(full) == {"t1", "residual_t1", "uncertainty_t1", "mask"}
    for name in full:
        whole, part = read_volume(full[name]), read_volume(cropped[name])
        assert part.shape == tuple(b.stop - b.start for b in box) and part.array.size < whole.array.size
        corner = whole.ijk_to_ras() @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
        assert np.allclose(part.ijk_to_ras()[:, 3], corner, atol=1e-3)  # same physical place
        pasted = (read_volume(img).array if name == "t1" else np.zeros(whole.shape)).astype(part.array.dtype)
        pasted[box] = part.array
        assert pasted.dtype == whole.array.dtype and np.array_equal(pasted, whole.array), name


def test_ping_is_answered_while_a_job_runs_and_cancel_keeps_the_worker(worker, job, tmp_path):
    head, img, mask = job
    starts = worker.starts
    out = tmp_path / "cancelled"
    job_id = worker.submit("synthesize", {"images": {"t1": str(img)}, "mask": str(mask), "out": str(out),
                                          "steps": 400})
    _wait_for(worker, job_id, ("progress",))
    assert worker.ping() < 2.0  # the reader thread answers mid-job
    worker.cancel(job_id)
    event, _ = _wait_for(worker, job_id, ("done", "error"))
    assert event["event"] == "error" and event["kind"] == "cancelled"
    assert not out.exists()  # nothing written
    again = worker.run("synthesize", {"images": {"t1": str(img)}, "mask": str(mask), "out": str(tmp_path / "after"),
                                      "steps": 1})
    assert "t1" in again and worker.starts == starts


def test_bad_input_is_one_line_and_the_worker_survives(worker, job, tmp_path):
    head, img, mask = job
    empty = write_volume(head.with_array(np.zeros(head.shape, np.uint8)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty"):
        worker.run("synthesize", {"images": {"t1": str(img)}, "mask": str(empty), "out": str(tmp_path / "x")})
    assert not (tmp_path / "x").exists() and worker.alive


def test_a_killed_worker_fails_its_job_with_a_reason_and_is_restarted(job, tmp_path):
    head, img, mask = job
    with EngineWorker(threads=2) as w:
        job_id = w.submit("synthesize", {"images": {"t1": str(img)}, "mask": str(mask), "out": str(tmp_path / "k"),
                                         "steps": 400})
        _wait_for(w, job_id, ("progress",))
        os.kill(w.proc.pid, signal.SIGKILL)
        event, _ = _wait_for(w, job_id, ("done", "error"))
        assert event["event"] == "error" and event["kind"] == "died" and "exit code" in event["message"]
        assert not w.alive
        out = w.run("synthesize", {"images": {"t1": str(img)}, "mask": str(mask), "out": str(tmp_path / "ok"),
                                   "steps": 1})
        assert "t1" in out and w.starts == 2
    assert not w.alive


def test_unknown_op_is_refused_before_it_reaches_the_worker():
    with pytest.raises(ValueError, match="unknown op"):
        EngineWorker().submit("format-disk", {})
    assert issubclass(WorkerError, RuntimeError)


def test_handover_directory_prefers_a_writable_ram_folder_with_room(tmp_path):
    from scripted_models.worker import handover_directory

    missing = tmp_path / "no_such_folder"
    assert handover_directory(0, candidates=(str(missing), str(tmp_path))) == str(tmp_path)
    assert handover_directory(1 << 62, candidates=(str(tmp_path),)) is None  # not enough room: disk instead
    assert handover_directory(0, candidates=(str(missing),)) is None
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if not os.access(read_only, os.W_OK):  # root may write anywhere
            assert handover_directory(0, candidates=(str(read_only),)) is None
    finally:
        read_only.chmod(0o700)


def test_job_files_go_to_the_ram_folder_when_there_is_one(monkeypatch, tmp_path):
    """The Slicer logic hands job files over in handover_directory() when it answers, else the temp folder."""
    import slicer_scene  # noqa: F401 - puts the module folders on sys.path
    from PathoSynSlicerLib import logic

    import scripted_models.worker as W

    monkeypatch.setattr(W, "handover_directory", lambda: str(tmp_path))
    assert logic.temporaryDirectory() == str(tmp_path)
    monkeypatch.setattr(W, "handover_directory", lambda: None)
    assert logic.temporaryDirectory() != str(tmp_path)


def test_warm_up_starts_the_shared_worker_in_the_background(monkeypatch):
    """Opening a module starts the shared worker without blocking the GUI; a worker already running is left be,
    and a start failure is only logged (the first job reports it)."""
    import threading

    import slicer_scene  # noqa: F401 - puts the module folders on sys.path
    from PathoSynSlicerLib import process

    class SlowWorker:
        def __init__(self, fail=False):
            self.alive, self.fail, self.started = False, fail, threading.Event()

        def start(self):
            time.sleep(0.5)
            if self.fail:
                raise WorkerError("no python here", "died")
            self.alive = True
            self.started.set()

    worker = SlowWorker()
    monkeypatch.setattr(process, "_SHARED_WORKER", worker)
    t0 = time.perf_counter()
    thread = process.warmUpSharedWorker()
    assert time.perf_counter() - t0 < 0.3 and not worker.alive
    thread.join(5)
    assert worker.started.is_set() and worker.alive
    assert process.warmUpSharedWorker() is None  # running already
    monkeypatch.setattr(process, "_SHARED_WORKER", SlowWorker(fail=True))
    process.warmUpSharedWorker().join(5)  # no exception escapes the thread


def test_preloaded_worker_is_warm_for_its_first_job(tmp_path):
    """--preload runs a warm-up synthesis before "ready": the first real job is as fast as a later one."""
    head = make_head()
    mask = make_ball_mask(head)
    image = write_volume(head, tmp_path / "in" / "t1.nii")
    mask_path = write_volume(mask, tmp_path / "in" / "mask.nii")
    with EngineWorker(preload=True, threads=2) as worker:
        worker.start()
        times = []
        for k in range(2):
            t = time.perf_counter()
            worker.run("synthesize", {"images": {"t1": str(image)}, "mask": str(mask_path),
                                      "out": str(tmp_path / f"out{k}"), "steps": 2, "format": "nii"})
            times.append(time.perf_counter() - t)
    assert times[0] < 2.0 * times[1] + 0.5, times


def test_worker_runs_with_tcmalloc_when_installed_and_not_when_turned_off(tmp_path):
    """The worker preloads tcmalloc where it is installed (1.5x faster convolutions on 2 cores); PATHOSYN_TCMALLOC=0
    keeps the system allocator; an LD_PRELOAD of the caller is kept."""
    from scripted_models.worker import fast_allocator, with_fast_allocator

    library = fast_allocator({})
    env = with_fast_allocator({"LD_PRELOAD": "/some/other.so"})
    if library is None:
        assert env == {"LD_PRELOAD": "/some/other.so"}
    else:
        assert env["LD_PRELOAD"].split() == ["/some/other.so", library]
        assert with_fast_allocator(env) == env  # not added twice
    assert with_fast_allocator({"PATHOSYN_TCMALLOC": "0"}) == {"PATHOSYN_TCMALLOC": "0"}

    with EngineWorker(threads=1, env={**os.environ, "PATHOSYN_TCMALLOC": "1"}) as w:
        w.start()
        maps = open(f"/proc/{w.proc.pid}/maps").read()
        assert w.allocator == ("tcmalloc" if library else "system")
        assert ("libtcmalloc" in maps) == (library is not None)
    with EngineWorker(threads=1, env={**os.environ, "PATHOSYN_TCMALLOC": "0", "LD_PRELOAD": ""}) as w:
        w.start()
        assert w.allocator == "system"
        assert "libtcmalloc" not in open(f"/proc/{w.proc.pid}/maps").read()


def test_the_worker_runs_below_its_caller_priority_so_the_gui_keeps_the_cores():
    """The engine's nice value is the caller's plus WORKER_NICENESS (or what was asked): a GUI or web server that
    needs a core during a synthesis gets it first. niceness=0 leaves the worker at the caller's priority."""
    from scripted_models.worker import WORKER_NICENESS

    own = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, own + WORKER_NICENESS)
    with EngineWorker(threads=1) as w:
        w.start()
        assert w.niceness == expected == os.getpriority(os.PRIO_PROCESS, w.proc.pid)
    with EngineWorker(threads=1, niceness=0) as w:
        w.start()
        assert w.niceness == own == os.getpriority(os.PRIO_PROCESS, w.proc.pid)
    with EngineWorker(threads=1, env={**os.environ, "PATHOSYN_WORKER_NICE": "2"}) as w:
        w.start()
        assert w.niceness == min(19, own + 2)
