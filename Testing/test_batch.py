"""`pathosyn batch`: manifest validation, identical outputs in-process / local workers / Dask, kill + resume,
PathAR placement. Small synthetic heads and steps=1 keep it cheap."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_ball_mask, make_head, noisy_head

from scripted_models.batch import load_manifest, run_batch
from scripted_models.batch.job import place_mask, read_log, verify_done
from scripted_models.errors import InputError
from scripted_models.volume import Volume, read_volume, write_volume
from scripted_models.weights import sha256_of as sha256_file

HEADER = ["case_id", "mask", "seed", "t1", "t1c", "t2", "flair", "samples", "steps"]


def write_manifest(path: Path, rows: list[dict], header=HEADER) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_cohort(root: Path, n: int, steps: int = 1) -> Path:
    """n cases with relative paths; case 1 has two modalities, case 2 two samples (uncertainty output)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        head = make_head(seed=i)
        write_volume(head, root / "data" / f"c{i}_t1.nii.gz")
        write_volume(make_ball_mask(head, centre_frac=(0.5, 0.45 + 0.02 * i, 0.5), radius_vox=5),
                     root / "data" / f"c{i}_mask.nii.gz")
        row = {"case_id": f"case{i}", "mask": f"data/c{i}_mask.nii.gz", "seed": 100 + i,
               "t1": f"data/c{i}_t1.nii.gz", "steps": steps}
        if i == 1:
            flair = head.with_array((head.array * 0.7 + 20).astype(np.int16))
            row["flair"] = str(write_volume(flair, root / "data" / "c1_flair.nii.gz"))  # absolute path
        if i == 2:
            row["samples"] = 2
        rows.append(row)
    return write_manifest(root / "manifest.csv", rows)


def run_cli(*args, timeout=600, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "scripted_models.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT, **popen)


def nifti_checksums(out: Path) -> dict:
    """{case_id: {output name: sha256}} for the NIfTI outputs (report.json has timings, so it differs)."""
    sums = {}
    for done in sorted(out.glob("*/done.json")):
        outputs = json.loads(done.read_text())["outputs"]
        sums[done.parent.name] = {k: v["sha256"] for k, v in outputs.items() if k != "report"}
    return sums


def assert_complete(out: Path, cases: list[str]) -> None:
    results = list(csv.DictReader(open(out / "results.csv")))
    assert [r["case_id"] for r in results] == cases
    assert {r["status"] for r in results} <= {"done", "skipped"}, results
    for case in cases:
        done = json.loads((out / case / "done.json").read_text())
        for entry in done["outputs"].values():
            path = out / case / entry["file"]
            assert sha256_file(path) == entry["sha256"]
            if path.name.endswith(".nii.gz"):
                read_volume(path)
        assert not [p for p in (out / case).iterdir() if p.name.startswith(".")], "temp files left behind"


# ---------------------------------------------------------------- manifest validation (no engine)

def test_bad_manifest_rejected_up_front_naming_every_bad_row(tmp_path):
    root = tmp_path / "cohort"
    manifest = make_cohort(root, 1)
    good = {"mask": "data/c0_mask.nii.gz", "t1": "data/c0_t1.nii.gz", "steps": 1}
    rows = [{"case_id": f"p{i}", "seed": i, **good} for i in range(10)]
    rows[1]["t1"] = "data/missing_t1.nii.gz"  # line 3
    rows[5]["seed"] = "seven"  # line 7
    rows[7]["case_id"] = "p2"  # line 9: duplicate of line 4
    write_manifest(manifest, rows)
    out = tmp_path / "out"
    proc = run_cli("batch", "--manifest", manifest, "--out", out, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pathosyn: error: manifest manifest.csv has 3 bad rows:"), lines
    for fragment in ("line 3: t1 file not found", "line 7: seed 'seven' is not an integer",
                     "line 9: duplicate case_id 'p2' (first on line 4)"):
        assert fragment in lines[0]
    assert not out.exists(), "nothing may be created for a rejected manifest"


def test_manifest_checks(tmp_path, monkeypatch):
    root = tmp_path / "cohort"
    manifest = make_cohort(root, 1)
    head = make_head(shape=(30, 30, 30), origin=(400.0, 0.0, 0.0))  # another space: a grid of its own is fine
    write_volume(head, root / "data" / "other_grid.nii.gz")
    (root / "data" / "notes.txt").write_text("x")
    ok = {"mask": "data/c0_mask.nii.gz", "t1": "data/c0_t1.nii.gz"}
    rows = [
        {"case_id": "ok", "seed": 1, **ok, "samples": 3},  # 2
        {"case_id": "nomod", "seed": 1, "mask": ok["mask"]},  # 3
        {"case_id": "badsamples", "seed": 1, **ok, "samples": 0},  # 4
        {"case_id": "badsteps", "seed": 1, **ok, "steps": "-2"},  # 5
        {"case_id": "../escape", "seed": 1, **ok},  # 6
        {"case_id": "grid", "seed": 1, **ok, "flair": "data/other_grid.nii.gz"},  # 7
        {"case_id": "text", "seed": 1, "mask": "data/notes.txt", "t1": ok["t1"]},  # 8
        {"case_id": "negseed", "seed": -1, **ok},  # 9
        {"case_id": "nomask", "seed": 1, "t1": ok["t1"]},  # 10
        {"case_id": "drawn", "seed": 4, "mask": "PathAR", "t1": ok["t1"]},  # 11
    ]
    write_manifest(manifest, rows)
    with pytest.raises(InputError) as err:
        load_manifest(manifest)
    message = str(err.value)
    assert "has 8 bad rows" in message and "\n" not in message
    for line, fragment in [(3, "no modality given"), (4, "samples 0 is out of range"), (5, "steps -2 is out of"),
                           (6, "case_id '../escape'"), (7, "flair does not overlap t1 in space"),
                           (8, "mask 'data/notes.txt' is not an image file"), (9, "seed -1 is out of range"),
                           (10, "mask is empty")]:
        assert f"line {line}: {fragment}" in message, (line, message)
    assert "line 2:" not in message and "line 11:" not in message

    write_volume(make_head(shape=(30, 30, 30)), root / "data" / "own_grid.nii.gz")  # same space, own grid: taken
    write_manifest(manifest, [{"case_id": "grids", "seed": 1, **ok, "flair": "data/own_grid.nii.gz"}])
    assert set(load_manifest(manifest)[0].images) == {"t1", "flair"}

    write_manifest(manifest, [rows[0], rows[-1]])
    jobs = load_manifest(manifest)
    assert jobs[0].images == {"t1": str((root / "data" / "c0_t1.nii.gz").resolve())}  # relative to the manifest
    assert (jobs[0].samples, jobs[0].steps, jobs[0].line) == (3, None, 2)
    assert jobs[1].uses_pathar and jobs[1].seed == 4

    monkeypatch.setitem(sys.modules, "scripted_models.pathar.api", None)  # PathAR engine not installed
    with pytest.raises(InputError, match=r"1 bad row: line 3: mask 'pathar' needs the PathAR engine"):
        load_manifest(manifest)

    write_manifest(manifest, [{"case_id": "a", "seed": 1, **ok}], header=["case_id", "mask", "seed", "t1", "pd"])
    with pytest.raises(InputError, match=r"bad header: line 1: unknown column\(s\) 'pd'"):
        load_manifest(manifest)


def test_manifest_takes_a_dicom_series_folder_and_checks_its_grid(tmp_path):
    from conftest import write_dicom_seg, write_dicom_series

    root = tmp_path / "cohort"
    manifest = make_cohort(root, 1)
    write_dicom_series(read_volume(root / "data" / "c0_t1.nii.gz"), root / "data" / "t1_dicom")
    write_dicom_series(make_head(shape=(30, 30, 30), origin=(400.0, 0.0, 0.0)), root / "data" / "flair_dicom")
    (root / "data" / "empty").mkdir()
    ok = {"seed": 1, "mask": "data/c0_mask.nii.gz", "t1": "data/t1_dicom"}
    write_manifest(manifest, [{"case_id": "dicom", **ok},
                              {"case_id": "grid", **ok, "flair": "data/flair_dicom"},
                              {"case_id": "none", **ok, "t2": "data/empty"}])
    with pytest.raises(InputError) as err:
        load_manifest(manifest)
    message = str(err.value)
    assert "has 2 bad rows" in message and "line 2:" not in message, message
    assert "line 3: flair does not overlap t1 in space" in message and "line 4: t2: " in message, message
    assert "without a DICOM series" in message, message
    write_manifest(manifest, [{"case_id": "dicom", **ok}])
    assert load_manifest(manifest)[0].images == {"t1": str((root / "data" / "t1_dicom").resolve())}
    lesion = read_volume(root / "data" / "c0_mask.nii.gz").array > 0
    seg = write_dicom_seg(root / "data" / "t1_dicom", {"lesion": lesion}, root / "data" / "c0_seg.dcm")  # sparse
    write_manifest(manifest, [{"case_id": "seg", **ok, "mask": "data/c0_seg.dcm"}])
    assert load_manifest(manifest)[0].mask == str(seg.resolve())


# ---------------------------------------------------------------- PathAR placement (no engine)

def _ball(shape=24, radius=4.0, spacing=2.0) -> Volume:
    zz, yy, xx = np.meshgrid(*[np.arange(shape)] * 3, indexing="ij")
    d = np.sqrt((zz - 14) ** 2 + (yy - 10) ** 2 + (xx - 12) ** 2)
    labels = np.where(d < radius, 2, 0).astype(np.uint8)
    labels[d < radius / 2] = 3
    return Volume(labels, (spacing,) * 3)


def test_pathar_placement_inside_brain_and_seeded():
    from scripted_models.preprocess import foreground_mask

    head = make_head()
    fg = foreground_mask(head.array)
    lesion = _ball()
    mask, info = place_mask(lesion, head, seed=5)
    assert mask.same_grid(head) and mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, 2, 3}
    assert (fg & (mask.array > 0)).sum() / (mask.array > 0).sum() >= 0.9 and info["inside_fraction"] >= 0.9
    # about the lesion's physical volume (2 mm voxels -> the head's 1.2 x 1 x 1.5 mm voxels)
    expected = (lesion.array > 0).sum() * 8 / (1.2 * 1.0 * 1.5)
    assert 0.7 * expected < (mask.array > 0).sum() < 1.3 * expected
    again, _ = place_mask(lesion, head, seed=5)
    other, _ = place_mask(lesion, head, seed=6)
    assert np.array_equal(again.array, mask.array) and not np.array_equal(other.array, mask.array)
    with pytest.raises(InputError, match="could not place the PathAR lesion inside the brain"):
        place_mask(_ball(shape=40, radius=19, spacing=2.0), head, seed=5, tries=20)


def test_pathar_placement_in_a_raw_scan_keeps_out_of_scalp_and_skull():
    """A raw scan's foreground is the whole head (its air is noise): lesions are placed deeper than the scalp and
    skull, inside the brain."""
    array, brain, head = noisy_head(shape=(64, 96, 96))  # 1 mm voxels: brain radius 29 mm, scalp and skull 10 mm
    scan = Volume(array, (1.0, 1.0, 1.0))
    for seed in range(6):
        mask, info = place_mask(_ball(radius=4.0, spacing=1.0), scan, seed=seed)
        placed = mask.array > 0
        assert (placed & brain).sum() / placed.sum() >= 0.9, (seed, info)


def test_brain_mask_column_places_lesions_in_it_and_normalises_over_it(tmp_path):
    """A brain_mask column (optional): the job normalises over it and places PathAR lesions inside it; rows without
    it keep the fingerprint of manifests that have no such column (a resume does not redo them)."""
    import hashlib
    from dataclasses import asdict

    array, brain, head = noisy_head(shape=(64, 96, 96))
    scan = Volume(array, (1.0, 1.0, 1.0))
    inner = np.zeros_like(brain)  # a brain mask smaller than the brain: placements must follow it
    inner[24:40, 40:56, 20:76] = brain[24:40, 40:56, 20:76]
    brain_volume = scan.with_array(inner.astype(np.uint8))
    for seed in range(4):
        mask, info = place_mask(_ball(radius=3.0, spacing=1.0), scan, seed=seed, brain_mask=brain_volume)
        placed = mask.array > 0
        assert (placed & inner).sum() / placed.sum() >= 0.9, (seed, info)
    write_volume(scan, tmp_path / "t1.nii.gz")
    write_volume(make_ball_mask(scan, radius_vox=5), tmp_path / "mask.nii.gz")
    write_volume(scan.with_array(brain.astype(np.uint8)), tmp_path / "brain.nii.gz")
    rows = [{"case_id": "raw", "mask": "mask.nii.gz", "seed": 1, "t1": "t1.nii.gz", "steps": 1,
             "brain_mask": "brain.nii.gz"},
            {"case_id": "plain", "mask": "mask.nii.gz", "seed": 1, "t1": "t1.nii.gz", "steps": 1}]
    manifest = write_manifest(tmp_path / "m.csv", rows, header=HEADER + ["brain_mask"])
    jobs = load_manifest(manifest)
    assert jobs[0].brain_mask == str((tmp_path / "brain.nii.gz").resolve()) and jobs[1].brain_mask is None
    spec = {k: v for k, v in asdict(jobs[1]).items() if k not in ("line", "brain_mask")}
    assert jobs[1].fingerprint == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    run_batch(manifest, tmp_path / "out")
    reports = {case: json.loads((tmp_path / "out" / case / "report.json").read_text()) for case in ("raw", "plain")}
    assert reports["raw"]["normalised_over"] == "brain mask"
    assert reports["plain"]["normalised_over"] == "head above the noise"
    bad = write_manifest(tmp_path / "bad.csv", [{**rows[0], "brain_mask": "missing.nii.gz"}],
                         header=HEADER + ["brain_mask"])
    with pytest.raises(InputError, match="brain_mask"):
        load_manifest(bad)


# ---------------------------------------------------------------- engine runs

def test_identity_local_workers_dask_and_resume(tmp_path):
    from dask.distributed import Client, LocalCluster

    from scripted_models.pathosyn.api import synthesize_lesion
    from scripted_models.pathosyn.commands import write_synthesis

    manifest = make_cohort(tmp_path / "cohort", 3)
    cases = ["case0", "case1", "case2"]
    seen = []
    rows = run_batch(manifest, tmp_path / "w1", workers=1, progress=lambda f, m: seen.append(f))
    assert [r["status"] for r in rows] == ["done"] * 3 and seen[-1] == 1.0
    assert Path(rows[1]["files"]["flair"]).is_file() and "uncertainty_t1" in rows[2]["files"]
    assert_complete(tmp_path / "w1", cases)
    reference = nifti_checksums(tmp_path / "w1")
    assert set(reference["case2"]) == {"t1", "residual_t1", "uncertainty_t1", "mask"}

    # the same bytes as a direct API call written like `pathosyn synthesize`
    job = load_manifest(manifest)[0]
    result = synthesize_lesion({"t1": read_volume(job.images["t1"])}, read_volume(job.mask), seed=job.seed,
                               steps=1)
    files = write_synthesis(result, tmp_path / "direct")
    assert sha256_file(Path(files["t1"])) == reference["case0"]["t1"]

    # 2 local workers and a 2-worker Dask cluster run 1 torch thread per job, 1 worker runs 2: identical bytes
    run_batch(manifest, tmp_path / "w2", workers=2)
    assert_complete(tmp_path / "w2", cases)
    assert nifti_checksums(tmp_path / "w2") == reference
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rows = run_batch(manifest, tmp_path / "dask", scheduler=client)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert_complete(tmp_path / "dask", cases)
    assert nifti_checksums(tmp_path / "dask") == reference

    # resume: a corrupt output and a missing done-marker are redone, the rest is skipped
    out = tmp_path / "w1"
    (out / "case0" / "residual_t1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    (out / "case2" / "done.json").unlink()
    job1 = load_manifest(manifest)[1]
    assert verify_done(out / "case1", job1) is not None
    rows = run_batch(manifest, out, workers=1, resume=True)
    assert [r["status"] for r in rows] == ["done", "skipped", "done"]
    assert_complete(out, cases)
    assert nifti_checksums(out) == reference
    assert [e["event"] for e in read_log(out / "case1" / "log.jsonl")].count("start") == 1


def test_pathar_row_places_a_sampled_lesion(tmp_path, monkeypatch):
    from scripted_models.pathar import api as pathar_api
    from scripted_models.preprocess import foreground_mask

    calls = []

    def fake_sample_pairs(modalities, n, seed, **kwargs):
        calls.append((list(modalities), n, seed))
        return [pathar_api.SamplePair(_ball(), {}, 0, seed)]

    monkeypatch.setattr(pathar_api, "sample_pairs", fake_sample_pairs)
    root = tmp_path / "cohort"
    make_cohort(root, 1)
    manifest = write_manifest(root / "m.csv", [{"case_id": "drawn", "mask": "pathar", "seed": 11,
                                                "t1": "data/c0_t1.nii.gz", "steps": 1}])
    rows = run_batch(manifest, tmp_path / "out")
    assert rows[0]["status"] == "done", rows[0]["error"]
    assert calls == [(["t1"], 1, 11)]
    mask = read_volume(rows[0]["files"]["mask"])
    head = read_volume(root / "data" / "c0_t1.nii.gz")
    lesion = mask.array > 0
    assert mask.same_grid(head) and (lesion & foreground_mask(head.array)).sum() / lesion.sum() >= 0.9
    report = json.loads((tmp_path / "out" / "drawn" / "report.json").read_text())
    assert report["pathar_placement"]["inside_fraction"] >= 0.9


def test_sigkill_then_resume_loses_nothing_and_redoes_nothing(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 6)
    cases = [f"case{i}" for i in range(6)]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "scripted_models.cli", "batch", "--manifest", str(manifest),
                             "--out", str(out), "--workers", "2", "--progress", "none"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not list(out.glob("*/done.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no job finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    # the orphaned worker processes notice and exit without finishing their jobs
    worker_pids = {e["pid"] for case in cases for e in read_log(out / case / "log.jsonl")}
    deadline = time.time() + 30
    while any(_alive(pid) for pid in worker_pids):
        assert time.time() < deadline, "worker processes outlived the killed batch"
        time.sleep(0.2)
    before = {c for c in cases if (out / c / "done.json").is_file()}
    assert before and len(before) < len(cases), before
    for case in before:  # finished before the kill: complete and valid
        job = next(j for j in load_manifest(manifest) if j.case_id == case)
        assert verify_done(out / case, job) is not None

    proc = run_cli("batch", "--manifest", manifest, "--out", out, "--resume", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == len(before) and summary["done"] == len(cases) - len(before)
    assert_complete(out, cases)
    results = {r["case_id"]: r["status"] for r in csv.DictReader(open(out / "results.csv"))}
    for case in cases:
        events = [e["event"] for e in read_log(out / case / "log.jsonl")]
        assert events.count("done") == 1, (case, events)  # completed exactly once
        if case in before:
            assert events.count("start") == 1 and results[case] == "skipped"  # not redone
        else:
            assert results[case] == "done"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped later by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _kill_worker_once_started(out: Path, case_id: str, timeout: float = 300) -> int:
    """SIGKILL the process that runs `case_id` as soon as its job has started (as the OOM killer would)."""
    deadline = time.time() + timeout
    while True:
        starts = [e for e in read_log(out / case_id / "log.jsonl") if e["event"] == "start"]
        if starts:
            os.kill(starts[0]["pid"], signal.SIGKILL)
            return starts[0]["pid"]
        assert time.time() < deadline, f"{case_id} never started"
        time.sleep(0.01)


def _run_killing_one_worker(manifest: Path, out: Path, victim: str, cases: list[str], **run_kwargs) -> None:
    """Run the batch in a thread, SIGKILL the worker of `victim` mid-job, then check that `victim` ran twice
    (in two processes) and that every job completed exactly once with valid files."""
    import threading

    rows = []
    runner = threading.Thread(target=lambda: rows.extend(run_batch(manifest, out, **run_kwargs)))
    runner.start()
    killed = _kill_worker_once_started(out, victim)
    runner.join(600)
    assert not runner.is_alive() and [r["status"] for r in rows] == ["done"] * len(cases), rows
    assert_complete(out, cases)
    starts = [e for e in read_log(out / victim / "log.jsonl") if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["pid"] == killed != starts[1]["pid"]
    for case in cases:
        events = [e["event"] for e in read_log(out / case / "log.jsonl")]
        assert events.count("done") == 1, (case, events)


def test_killed_workers_are_retried_locally_and_on_dask_with_identical_results(tmp_path):
    from dask.distributed import Client, LocalCluster

    manifest = make_cohort(tmp_path / "cohort", 4, steps=3)
    cases = [f"case{i}" for i in range(4)]
    # local pool: case1 is redone in a fresh pool; the jobs that were only queued are not charged
    _run_killing_one_worker(manifest, tmp_path / "local", "case1", cases, workers=2)
    # Dask: the nanny restarts the killed worker and the scheduler reruns its task; the bytes match the local run
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        _run_killing_one_worker(manifest, tmp_path / "dask", "case2", cases, scheduler=client)
    assert nifti_checksums(tmp_path / "dask") == nifti_checksums(tmp_path / "local")


def test_a_job_that_always_kills_its_worker_fails_alone(tmp_path, monkeypatch):
    """After MAX_POOL_RESTARTS retries the job is reported failed; the other jobs are not charged for it."""
    import contextlib
    import threading

    from scripted_models.batch import runner

    manifest = make_cohort(tmp_path / "cohort", 3)
    real_pool = runner._run_pool

    def pool_with_watcher(jobs, out, *args, **kwargs):
        stop = threading.Event()

        def watch():  # kill case0's worker on each of its attempts
            seen = set()
            while not stop.is_set():
                for e in read_log(out / "case0" / "log.jsonl"):
                    if e["event"] == "start" and e["pid"] not in seen:
                        seen.add(e["pid"])
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(e["pid"], signal.SIGKILL)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            return real_pool(jobs, out, *args, **kwargs)
        finally:
            stop.set()

    monkeypatch.setattr(runner, "_run_pool", pool_with_watcher)
    rows = run_batch(manifest, tmp_path / "out", workers=2)
    assert [r["status"] for r in rows] == ["failed", "done", "done"], rows
    assert "worker process died during each of 3 attempts" in rows[0]["error"]
    starts = [e for e in read_log(tmp_path / "out" / "case0" / "log.jsonl") if e["event"] == "start"]
    assert len(starts) == runner.MAX_POOL_RESTARTS + 1
    for case in ("case1", "case2"):
        events = [e["event"] for e in read_log(tmp_path / "out" / case / "log.jsonl")]
        assert events.count("done") == 1
        assert events.count("start") <= 2  # charged at most once, beside case0; then run alone


def test_dask_retries_a_task_that_raises(tmp_path, monkeypatch):
    """A transient error inside a task (not a user error) is retried by Dask; a user error is not."""
    from dask.distributed import Client, LocalCluster

    from scripted_models.batch import runner

    manifest = make_cohort(tmp_path / "cohort", 2)
    failures = {"case0": 1}  # case0 fails once with an OSError, then succeeds
    real_run_job = runner.run_job

    def flaky_run_job(job, *args, **kwargs):
        if failures.get(job.case_id, 0) > 0:
            failures[job.case_id] -= 1
            raise OSError("transient: network file system hiccup")
        return real_run_job(job, *args, **kwargs)

    monkeypatch.setattr(runner, "run_job", flaky_run_job)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rows = run_batch(manifest, tmp_path / "out", scheduler=client)
        assert [r["status"] for r in rows] == ["done", "done"] and failures["case0"] == 0
        failures["case1"] = 5  # more failures than retries: reported failed, with the error
        rows = run_batch(manifest, tmp_path / "out2", scheduler=client)
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "network file system hiccup" in rows[1]["error"] and failures["case1"] == 2  # 1 try + 2 retries
    assert_complete(tmp_path / "out", ["case0", "case1"])
