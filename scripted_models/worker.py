"""A warm engine worker: one long-lived process keeps the models loaded and runs jobs sent as JSON lines.

    python -m scripted_models.worker [--preload] [--threads N] [--nice N]

Requests, one JSON object per stdin line:
    {"id": "j1", "op": "synthesize", "args": {"images": {"t1": PATH}, "mask": PATH, "out": DIR, "seed": 0, ...}}
    {"id": "j2", "op": "pseudo-healthy", "args": {"images": {...}, "mask": PATH, "out": DIR}}
    {"id": "j3", "op": "sample", "args": {"modalities": ["t1c"], "n": 2, "seed": 0, "out": DIR, "anatomy_from": "none"}}
    {"id": "j4", "op": "ping"}         answered at once, even while a job runs
    {"op": "cancel", "id": "j1"}       the job stops at its next progress tick (one denoising step); nothing is written
    {"op": "shutdown"}
Events, one JSON object per stdout line, each with the job's "id":
    {"event": "ready", "pid": N, "allocator": "tcmalloc" | "system", "niceness": N}  once, when it can take jobs
    {"event": "progress", "id": ..., "fraction": 0.4, "message": "..."}
    {"event": "done", "id": ..., "outputs": {...}, "seconds": 1.2}
    {"event": "error", "id": ..., "kind": "input" | "weights" | "cancelled" | "internal", "message": "one line"}
Volumes travel as files in the caller's temp folder, RAM-backed where the system has one (`handover_directory`:
/dev/shm on Linux); outputs are written atomically, report.json last.

`EngineWorker` is the client (Qt-free, used by the Slicer modules, the browser front end and the benches): it
starts the process, sends jobs, delivers events, cancels, and restarts a worker that died, reporting the job it
was running as failed with the worker's last error line.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

OPS = ("synthesize", "pseudo-healthy", "sample")
HANDOVER_MIN_FREE = 2 << 30  # bytes a RAM folder must have free to be used for job files
WORKER_NICENESS = 5  # the engine yields the cores to the GUI or web server it works for (Unix nice value)


def worker_niceness(env=None) -> int:
    """PATHOSYN_WORKER_NICE if set (0 = the caller's priority), else WORKER_NICENESS."""
    value = (os.environ if env is None else env).get("PATHOSYN_WORKER_NICE", "").strip()
    try:
        return max(0, int(value)) if value else WORKER_NICENESS
    except ValueError:
        return WORKER_NICENESS


def handover_directory(min_free: int = HANDOVER_MIN_FREE, candidates=("/dev/shm",)) -> str | None:
    """A RAM-backed folder for the files a job hands over (inputs and outputs), or None (the system temp folder):
    writing a 1 mm volume there takes about 0.03 s instead of 0.04-0.25 s on disk. Used only when writable and
    with `min_free` bytes free, so a full or read-only /dev/shm falls back to disk."""
    import shutil

    for folder in candidates:
        try:
            if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) \
                    and shutil.disk_usage(folder).free >= min_free:
                return folder
        except OSError:
            continue
    return None


class Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------------- worker side
class _Server:
    def __init__(self, out=sys.stdout):
        self.out, self.lock = out, threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()

    def emit(self, **event) -> None:
        with self.lock:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()

    def read_requests(self, stream) -> None:
        """Reader thread: cancel / ping / shutdown at once, jobs into the queue."""
        for line in stream:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                self.emit(event="error", id=None, kind="input", message="request is not valid JSON")
                continue
            op = request.get("op")
            if op == "cancel":
                self.cancelled.add(str(request.get("id")))
            elif op == "ping":
                self.emit(event="pong", id=request.get("id"), time=time.time())
            elif op == "shutdown":
                break
            elif op in OPS:
                self.jobs.put(request)
            else:
                self.emit(event="error", id=request.get("id"), kind="input", message=f"unknown op {op!r}")
        self.jobs.put(None)

    def run_job(self, request: dict) -> None:
        from .errors import InputError, WeightsError

        job_id = str(request.get("id"))
        if job_id in self.cancelled:
            self.emit(event="error", id=job_id, kind="cancelled", message="cancelled")
            return

        def progress(fraction: float, message: str = "") -> None:
            if job_id in self.cancelled:
                raise Cancelled
            self.emit(event="progress", id=job_id, fraction=round(float(fraction), 4), message=message)

        t0 = time.perf_counter()
        try:
            outputs = _dispatch(request["op"], dict(request.get("args") or {}), progress)
            if job_id in self.cancelled:
                raise Cancelled
            self.emit(event="done", id=job_id, outputs=outputs, seconds=round(time.perf_counter() - t0, 3))
        except Cancelled:
            self.emit(event="error", id=job_id, kind="cancelled", message="cancelled")
        except (InputError, WeightsError) as exc:
            kind = "input" if isinstance(exc, InputError) else "weights"
            self.emit(event="error", id=job_id, kind=kind, message=_one_line(exc))
        except Exception as exc:  # noqa: BLE001 - the worker survives a failed job and says why
            self.emit(event="error", id=job_id, kind="internal", message=f"{type(exc).__name__}: {_one_line(exc)}")
        finally:
            self.cancelled.discard(job_id)
            gc.collect()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dispatch(op: str, args: dict, progress: Callable) -> dict:
    from .errors import InputError
    from .volume import read_volume

    out = Path(args.pop("out", "") or "")
    if not str(out):
        raise InputError("job has no 'out' folder")
    if op == "sample":
        from .pathar import ANATOMY_CARD
        from .pathar.api import parse_modality_guidance
        from .pathar.commands import sample_to_folder

        guidance = args.get("modality_guidance")  # the CLI's text form, "W" or "MOD=W,..."
        top_k = args.get("top_k")
        return sample_to_folder(out, list(args.get("modalities") or []), int(args.get("n", 1)),
                                int(args.get("seed", 0)), resume=bool(args.get("resume", False)), progress=progress,
                                temperature=float(args.get("temperature", 1.0)),
                                top_k=None if top_k is None else int(top_k), device=args.get("device", "auto"),
                                modality_guidance=None if guidance is None else parse_modality_guidance(str(guidance)),
                                anatomy_from=args.get("anatomy_from", ANATOMY_CARD))
    images = {m: read_volume(p, segmentation=False) for m, p in (args.get("images") or {}).items()}
    if not images:
        raise InputError("job has no input images")
    if not args.get("mask"):
        raise InputError("job has no lesion mask")
    mask = read_volume(args["mask"])
    brain = read_volume(args["brain_mask"]) if args.get("brain_mask") else None
    fmt = args.get("format", "nii.gz")
    if op == "pseudo-healthy":
        from .pathosyn.api import pseudo_healthy
        from .volume import write_volume

        healthy = pseudo_healthy(images, mask, device=args.get("device", "auto"), progress=progress,
                                 seed=int(args.get("seed", 0)), scanner_noise=not args.get("smooth"),
                                 brain_mask=brain)
        progress(1.0, "writing")
        return {m: str(write_volume(v, out / f"{m}.{fmt}")) for m, v in healthy.items()}
    from .pathosyn.api import synthesize_lesion
    from .pathosyn.commands import write_synthesis

    result = synthesize_lesion(images, mask, seed=args.get("seed", 0), samples=int(args.get("samples", 1)),
                               steps=args.get("steps"), guidance=float(args.get("guidance", 1.0)),
                               device=args.get("device", "auto"), base=args.get("base", "input"),
                               whole_lesion=True if args.get("whole_lesion") else None, progress=progress,
                               population_pull=args.get("population_pull"),
                               texture_match=not args.get("keep_base_texture"), brain_mask=brain)
    progress(1.0, "writing")
    return write_synthesis(result, out, fmt, crop=bool(args.get("crop_outputs")))


def warm_up() -> None:
    """Load the deviation model and run one small synthesis (64^3 ROI of the MNI T1, one step), so that the first
    job finds the weights verified and loaded and the convolution kernels built for that size."""
    from .evaluation.bench import _lesion, radius_for_roi
    from .pathosyn.api import synthesize_lesion
    from .templates import mni_t1

    t1 = mni_t1()
    synthesize_lesion({"t1": t1}, _lesion(t1, radius_for_roi(64)), seed=0, steps=1)


def loaded_allocator() -> str:
    """"tcmalloc" when this process runs with it (see fast_allocator), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"


def serve(preload: bool = False, stdin=None, stdout=None) -> int:
    server = _Server(stdout or sys.stdout)
    if preload:
        warm_up()
    reader = threading.Thread(target=server.read_requests, args=(stdin or sys.stdin,), daemon=True)
    reader.start()
    server.emit(event="ready", pid=os.getpid(), allocator=loaded_allocator(), niceness=current_niceness())
    while True:
        request = server.jobs.get()
        if request is None:
            return 0
        server.run_job(request)


def current_niceness() -> int | None:
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None


def lower_priority(increment: int) -> None:
    """Raise this process's nice value by `increment` (Unix; a no-op elsewhere or for increment <= 0)."""
    if increment > 0 and hasattr(os, "nice"):
        os.nice(increment)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PathoSyn warm engine worker (JSON lines on stdin/stdout)")
    p.add_argument("--preload", action="store_true",
                   help="load the deviation model and run one small warm-up synthesis before saying ready")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--nice", type=int, default=0,
                   help="raise the worker's nice value by N, so that the GUI or server it works for keeps the cores")
    args = p.parse_args(argv)
    lower_priority(args.nice)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return serve(preload=args.preload)


# ---------------------------------------------------------------------------------------------- client side
class WorkerError(RuntimeError):
    """A job failed in the worker (kind: input, weights, cancelled, internal or died)."""

    def __init__(self, message: str, kind: str = "internal"):
        super().__init__(message)
        self.kind = kind


def popen_platform_arguments() -> dict:
    """Popen keyword arguments: a new session (POSIX: one process group to signal) or, on Windows, a new process
    group and no console window (as slicer.util.launchConsoleProcess does)."""
    if os.name == "posix":
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000) | subprocess.CREATE_NEW_PROCESS_GROUP
    return {"startupinfo": info, "creationflags": flags}


def process_tree(pid: int) -> list:
    """psutil.Process objects of `pid` and all its descendants (empty without psutil or when it has ended)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def kill_process_tree(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Terminate `proc` and every process it started; kill what is still alive after `grace` seconds."""
    tree = process_tree(proc.pid)  # collect first: children are re-parented once the launcher is gone
    if os.name == "posix":
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    elif not tree:  # Windows without psutil: taskkill walks the tree itself
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True,
                       **{k: v for k, v in popen_platform_arguments().items() if k == "creationflags"})
    for p in tree:
        try:
            p.terminate()
        except Exception:  # noqa: BLE001 - psutil.NoSuchProcess / AccessDenied: already gone
            pass
    if tree:
        import psutil

        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            import signal

            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.kill()
        proc.wait()
    if os.name == "posix":  # stragglers of the group (e.g. workers that outlived the launcher)
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# tcmalloc (Debian: libtcmalloc-minimal4), preloaded into the worker when installed: PyTorch's CPU convolutions
# allocate and free large buffers at every step. Worker bench, 2 cores, AVX512-BF16 host: warm 5-step 64^3 click
# 4.9 -> 3.9 s p50, preview 2.5 -> 2.0 s, resident memory 636 -> 975 MB (docs/bench_worker_avx512bf16_no_amx.json).
# PATHOSYN_TCMALLOC=0 turns it off.
def fast_allocator(env: dict | None = None) -> str | None:
    """tcmalloc's library name for the worker's LD_PRELOAD (Linux, when installed), or None."""
    import ctypes.util

    env = os.environ if env is None else env
    if not sys.platform.startswith("linux") or env.get("PATHOSYN_TCMALLOC", "1") == "0":
        return None
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def with_fast_allocator(env: dict) -> dict:
    """`env` with tcmalloc added to LD_PRELOAD (when installed and not there already)."""
    library = fast_allocator(env)
    preload = env.get("LD_PRELOAD", "")
    if library and library not in preload.replace(":", " ").split():
        env = {**env, "LD_PRELOAD": f"{preload} {library}".strip()}
    return env


class EngineWorker:
    """Client of one warm worker process. Thread-safe submit/cancel; events arrive through `poll()` (GUI timers)
    or `run()` (blocking). A worker that dies is restarted on the next submit; its running job fails with kind
    "died" and the worker's last stderr line."""

    def __init__(self, command: list[str] | None = None, env: dict | None = None, preload: bool = False,
                 threads: int | None = None, niceness: int | None = None):
        base = list(command or [sys.executable])
        self.command = base + ["-m", "scripted_models.worker"] + (["--preload"] if preload else []) + \
            ([f"--threads={threads}"] if threads else [])
        niceness = worker_niceness(env) if niceness is None else niceness
        self.command += [f"--nice={niceness}"] if niceness > 0 else []
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()  # events of no submitted job (ready, pong, stray errors)
        self._job_queues: dict[str, queue.Queue] = {}
        self.ready = threading.Event()
        self.running: set[str] = set()
        self.last_stderr = ""
        self.allocator = ""  # the running worker's memory allocator, from its "ready" event
        self.niceness: int | None = None  # the running worker's nice value, from its "ready" event
        self.starts = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- process management
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120.0) -> None:
        with self._lock:
            if self.alive:
                return
            env = with_fast_allocator(dict(os.environ if self.env is None else self.env))
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
            self.ready.clear()
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                         bufsize=1, env=env, **popen_platform_arguments())
            self.starts += 1
            proc = self.proc
            threading.Thread(target=self._read_stdout, args=(proc,), daemon=True).start()
            threading.Thread(target=self._read_stderr, args=(proc,), daemon=True).start()
        if not self.ready.wait(timeout):
            raise WorkerError(f"engine worker did not start within {timeout:.0f} s: {self.last_stderr}", "died")

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "ready":
                self.allocator = str(event.get("allocator", "system"))
                self.niceness = event.get("niceness")
                self.ready.set()
            elif event.get("event") in ("done", "error"):
                self.running.discard(str(event.get("id")))
            self._queue_of(event.get("id")).put(event)
        code = proc.wait()
        if proc is self.proc:  # the worker died (or was stopped): fail what it was running
            for job_id in sorted(self.running):
                self._queue_of(job_id).put({"event": "error", "id": job_id, "kind": "died",
                                            "message": f"the engine worker stopped (exit code {code})"
                                                       + (f": {self.last_stderr}" if self.last_stderr else "")})
            self.running.clear()
            self.ready.set()  # wake a waiting start(); `alive` tells the truth

    def _queue_of(self, job_id) -> queue.Queue:
        return self._job_queues.get(str(job_id), self.events)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            if line.strip():
                self.last_stderr = line.strip()[:500]

    def _send(self, request: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError) as exc:
            raise WorkerError(f"the engine worker is not running: {exc}", "died") from None

    # -- jobs
    def submit(self, op: str, args: dict) -> str:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} (choose from {', '.join(OPS)})")
        if not self.alive:
            self.start()
        job_id = f"j{next(self._ids)}"
        self._job_queues[job_id] = queue.Queue()
        self.running.add(job_id)
        self._send({"id": job_id, "op": op, "args": args})
        return job_id

    def job_events(self, job_id: str, timeout: float | None = None) -> list[dict]:
        """The events of one job that have arrived; with `timeout`, wait that long for the first one. The job's
        queue is dropped once its final event (done / error) has been handed out."""
        q = self._job_queues.get(job_id)
        if q is None:
            return []
        out = []
        try:
            out.append(q.get(timeout=timeout) if timeout else q.get_nowait())
            while True:
                out.append(q.get_nowait())
        except queue.Empty:
            pass
        if any(e.get("event") in ("done", "error") for e in out):
            self._job_queues.pop(job_id, None)
        return out

    def cancel(self, job_id: str) -> None:
        if self.alive:
            self._send({"op": "cancel", "id": job_id})

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip in seconds (answered by the worker's reader thread, also mid-job)."""
        if not self.alive:
            self.start()
        job_id = f"p{next(self._ids)}"
        answers = self._job_queues[job_id] = queue.Queue()
        t0 = time.perf_counter()
        try:
            self._send({"id": job_id, "op": "ping"})
            answers.get(timeout=timeout)
            return time.perf_counter() - t0
        except queue.Empty:
            raise WorkerError("the engine worker did not answer a ping", "died") from None
        finally:
            self._job_queues.pop(job_id, None)

    def poll(self) -> list[dict]:
        """Events of no submitted job that have arrived (non-blocking)."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def run(self, op: str, args: dict, progress: Callable[[float, str], None] | None = None,
            timeout: float | None = None) -> dict:
        """Submit and wait: returns the job's outputs, or raises WorkerError (InputError for bad input)."""
        from .errors import InputError, WeightsError

        job_id = self.submit(op, args)
        events = self._job_queues[job_id]
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            wait = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
            try:
                event = events.get(timeout=wait)
            except queue.Empty:
                self.cancel(job_id)
                raise WorkerError(f"job {job_id} timed out after {timeout} s", "timeout") from None
            kind = event.get("event")
            if kind in ("done", "error"):
                self._job_queues.pop(job_id, None)
            if kind == "progress" and progress:
                progress(event["fraction"], event.get("message", ""))
            elif kind == "done":
                return event["outputs"]
            elif kind == "error":
                if event.get("kind") == "input":
                    raise InputError(event["message"])
                if event.get("kind") == "weights":
                    raise WeightsError(event["message"])
                raise WorkerError(event["message"], event.get("kind", "internal"))

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - stuck or already gone: stop the tree
            kill_process_tree(proc)
        self.running.clear()

    def __enter__(self) -> EngineWorker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(main())
