"""Run a validated manifest: in this process, in N local worker processes, or on a Dask distributed cluster.

OUT/results.csv (case_id,status,seconds,outputs,sha256,error) is rewritten atomically after every finished job.
status: done (finished in this run), skipped (finished earlier, verified by checksum; --resume), failed, pending.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..outputs import check_output_folder
from .job import LOG, read_log, result_row, run_job, verify_done
from .manifest import Job, load_manifest

RESULTS = "results.csv"
COLUMNS = ("case_id", "status", "seconds", "outputs", "sha256", "error")
MAX_POOL_RESTARTS = 2  # a job in flight when a worker process dies is retried this many times


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def write_results(rows: list[dict], out: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = out / RESULTS
    tmp = out / f".{RESULTS}.{os.getpid()}.tmp"
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _out_lock(out: Path):
    """One run per output folder at a time (advisory lock; released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    fh = open(out / ".batch.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another `pathosyn batch` run is writing to {out}") from None
        yield
    finally:
        fh.close()


# ---------------------------------------------------------------- local worker processes

def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # the batch process died (e.g. SIGKILL): do not finish orphaned jobs
            os._exit(3)
        time.sleep(0.5)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker the moment the batch process dies (a 0.5 s poll alone let a worker
    finish a queued job or two after the batch was killed). The signal follows the thread that started the
    worker: `_run_pool`'s thread (its submit calls start them), which outlives the pool."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_init(threads: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the workers
    _die_with_parent()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()


def _python_executable() -> str | None:
    """Inside 3D Slicer sys.executable is the Slicer application: spawn PythonSlicer instead."""
    exe = Path(sys.executable)
    if exe.name.lower().startswith("python"):
        return None
    for candidate in (exe.parent / "PythonSlicer", exe.parent / "PythonSlicer.exe",
                      exe.parent.parent / "bin" / "PythonSlicer", exe.parent.parent / "bin" / "PythonSlicer.exe"):
        if candidate.is_file():
            return str(candidate)
    return None


def _terminate(executor) -> None:
    if hasattr(executor, "terminate_workers"):  # Python >= 3.14
        executor.terminate_workers()
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(5)
    executor.shutdown(wait=False, cancel_futures=True)


def _run_pool(jobs: list[Job], out: Path, device: str, run_id: str, workers: int, threads: int,
              on_row: Callable[[dict], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    exe = _python_executable()
    if exe:
        ctx.set_executable(exe)
    pending = {job.case_id: job for job in jobs}
    attempts = dict.fromkeys(pending, 0)  # starts in this run (the run id is new: no log holds one yet)
    while pending:
        # jobs that were in flight when a pool died run one at a time, so that the next death is charged to the
        # job that caused it alone (side by side, an innocent job could be charged every time and fail too)
        suspects = [job for case, job in pending.items() if attempts[case]]
        batch = suspects or list(pending.values())
        executor = ProcessPoolExecutor(max_workers=1 if suspects else min(workers, len(batch)), mp_context=ctx,
                                       initializer=_worker_init, initargs=(threads, os.getpid()))
        attempts_before, finished_here = dict(attempts), 0
        try:
            futures = {executor.submit(run_job, job, out, device, run_id): job for job in batch}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    row = future.result()
                except BrokenProcessPool:
                    # a worker died (killed, out of memory, crashed): every queued job lands here. Only jobs
                    # that had started count an attempt; the others are simply resubmitted to a fresh pool.
                    attempts[job.case_id] = _attempts(out, job.case_id, run_id)
                    if attempts[job.case_id] <= MAX_POOL_RESTARTS:
                        continue
                    row = result_row(job, "failed", out=out,
                                     error=f"worker process died during each of {attempts[job.case_id]} attempts")
                except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the batch
                    row = result_row(job, "failed", out=out, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
                del pending[job.case_id]
                finished_here += 1
                on_row(row)
        except BaseException:
            _terminate(executor)
            raise
        executor.shutdown(wait=True)
        if pending and not finished_here and attempts == attempts_before:
            for case in list(pending):  # the pool died before any job started: do not loop forever
                on_row(result_row(pending.pop(case), "failed", out=out, error="worker processes failed to start"))


def _attempts(out: Path, case_id: str, run_id: str) -> int:
    """How often this run started a job (its log's 'start' events): the in-flight jobs of a broken pool."""
    return sum(1 for e in read_log(out / case_id / LOG) if e.get("event") == "start" and e.get("run") == run_id)


# ---------------------------------------------------------------- Dask

def _dask_task(job: Job, out: str, device: str, run_id: str, threads: dict) -> dict:
    """Runs on a Dask worker. Models stay cached in the worker process between tasks (pathosyn.api._MODELS)."""
    from dask.distributed import get_worker

    n = threads.get(get_worker().address)
    if n:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return run_job(job, out, device, run_id)


def _worker_threads(client) -> dict:
    """Torch threads per Dask worker: the host's cores shared among the worker threads on that host."""
    workers = client.scheduler_info().get("workers", {})
    cores = client.run(cpu_cores)
    per_host: dict[str, int] = {}
    for info in workers.values():
        per_host[info.get("host")] = per_host.get(info.get("host"), 0) + int(info.get("nthreads", 1))
    return {addr: max(1, int(cores.get(addr, 1)) // max(1, per_host.get(info.get("host"), 1)))
            for addr, info in workers.items()}


def _run_dask(jobs: list[Job], out: Path, device: str, run_id: str, scheduler, threads: int | None,
              on_row: Callable[[dict], None]) -> None:
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise InputError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") from None
    if isinstance(scheduler, Client):
        client, own = scheduler, False
    else:  # an address, or a Cluster object (e.g. LocalCluster)
        try:
            client, own = Client(scheduler, timeout="30s", set_as_default=False), True
        except OSError as exc:
            raise InputError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from None
    futures = []
    try:
        if threads:
            per_worker = {addr: threads for addr in client.scheduler_info().get("workers", {})}
        else:
            per_worker = _worker_threads(client)
        by_key = {}
        for job in jobs:
            future = client.submit(_dask_task, job, str(out), device, run_id, per_worker,
                                   key=f"pathosyn-batch-{run_id[:12]}-{job.case_id}", pure=False, retries=2)
            futures.append(future)
            by_key[future.key] = job
        for future in as_completed(futures):
            job = by_key[future.key]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - includes KilledWorker after repeated worker deaths
                row = result_row(job, "failed", out=out, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            on_row(row)
    except BaseException:
        with contextlib.suppress(Exception):
            client.cancel(futures)
        raise
    finally:
        if own:
            client.close()


# ---------------------------------------------------------------- entry point

def _in_process(jobs: list[Job], out: Path, device: str, run_id: str, threads: int | None,
                on_row: Callable[[dict], None]) -> None:
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for job in jobs:
            try:
                row = run_job(job, out, device, run_id)
            except Exception as exc:  # noqa: BLE001
                row = result_row(job, "failed", out=out, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            on_row(row)
    finally:
        torch.set_num_threads(before)


def run_batch(manifest: str | Path, out: str | Path, workers: int = 1, scheduler=None, resume: bool = False,
              device: str = "auto", progress: Callable[[float, str], None] | None = None,
              threads: int | None = None, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every job of a manifest; returns the results rows in manifest order.

    workers=1 runs in this process (blocking; fine from the Slicer Python console); workers=N>1 uses N spawned
    processes with max(1, cores // N) torch threads each; scheduler: a Dask address ("tcp://host:8786"), or a
    dask.distributed Client / Cluster object. resume=True skips jobs whose done.json and output checksums are
    valid and redoes the rest. Each row: case_id, status, seconds, outputs, sha256, error (results.csv columns)
    plus 'dir' and 'files' {name: absolute path}. progress(fraction, message) is called after every job.
    """
    jobs = load_manifest(manifest)  # everything validated before anything is created
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be an integer >= 1, got {workers!r}")
    if scheduler is not None and workers != 1:
        raise InputError("give either workers or scheduler, not both")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    if str(device).lower() not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device '{device}': expected auto, cpu or cuda")
    out = check_output_folder(Path(out).expanduser().resolve())
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    with _out_lock(out):
        rows: dict[str, dict] = {}
        todo: list[Job] = []
        for job in jobs:
            done = verify_done(out / job.case_id, job) if resume else None
            if done is not None:
                rows[job.case_id] = result_row(job, "skipped", done, out)
            else:
                rows[job.case_id] = result_row(job, "pending", out=out)
                todo.append(job)
        finished = [len(jobs) - len(todo)]
        write_results(list(rows.values()), out)
        if progress:
            progress(finished[0] / len(jobs), f"{finished[0]}/{len(jobs)} jobs already complete")

        def on_row(row: dict) -> None:
            rows[row["case_id"]] = row
            finished[0] += 1
            write_results(list(rows.values()), out)
            if on_result:
                on_result(row)
            if progress:
                progress(finished[0] / len(jobs), f"{finished[0]}/{len(jobs)} {row['case_id']} {row['status']}")

        if todo:
            if scheduler is not None:
                _run_dask(todo, out, device, run_id, scheduler, threads, on_row)
            elif workers == 1:
                _in_process(todo, out, device, run_id, threads or cpu_cores(), on_row)
            else:
                _run_pool(todo, out, device, run_id, workers, threads or max(1, cpu_cores() // workers), on_row)
    return [rows[job.case_id] for job in jobs]
