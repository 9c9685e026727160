"""Background runner for the `pathosyn` command line (`python -m scripted_models.cli ... --progress jsonl`).

Qt-free so that it can be tested without Slicer: a subprocess plus two reader threads. The GUI calls `poll()` from a
QTimer (callbacks then run in the GUI thread); scripts call `wait()`. Protocol (one JSON object per stdout line):
    {"event": "progress", "fraction": 0.4, "message": "..."}
    {"event": "done", "outputs": {...}, ...}               exit code 0
    {"event": "error", "message": "one line"}              exit code 2 (bad input, missing weights)

Cancel stops the whole process tree: Slicer's `PythonSlicer` is a launcher that starts `python-real`, so killing only
the direct child would leave the real interpreter running (on Windows in particular). The tree is collected with
psutil when it is installed, else `taskkill /T /F` (Windows) or the child's process group (POSIX). On Windows the
child gets no console window.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# isort: off
from . import logic as _logic  # noqa: F401 - puts the engine (scripted_models) on sys.path first
from scripted_models.worker import kill_process_tree, popen_platform_arguments, process_tree
# isort: on

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
ERROR_PREFIX = "pathosyn: error: "


# Process-tree handling lives in the engine (the warm worker client uses it too).
popenPlatformArguments = popen_platform_arguments
processTree = process_tree
killProcessTree = kill_process_tree


def describeExit(returnCode: int | None, stderrTail: str | None) -> str:
    """One line for a process that ended without a result."""
    if returnCode is not None and returnCode < 0:
        return f"the background process stopped unexpectedly (killed by signal {-returnCode}) before it finished"
    if stderrTail:
        line = stderrTail[len(ERROR_PREFIX):] if stderrTail.startswith(ERROR_PREFIX) else stderrTail
        if returnCode == 2:
            return line
        return f"the background process failed (exit code {returnCode}): {line}"
    if returnCode == 0:
        return "the background process ended without a result"
    return f"the background process failed (exit code {returnCode})"


def pythonExecutable() -> str:
    """Slicer's `PythonSlicer` launcher when present (sets up Slicer's environment), else this interpreter."""
    launcher = shutil.which("PythonSlicer")
    return launcher or sys.executable


class CLIRunner:
    """Run `python -m scripted_models.cli <argv> --progress jsonl` in a child process.

    Callbacks: onProgress(fraction, message), onDone(payload: dict), onError(message: str), onFinished(state).
    """

    def __init__(self, argv: list[str], engineRoot: str | os.PathLike | None = None,
                 onProgress: Callable[[float, str], None] | None = None,
                 onDone: Callable[[dict], None] | None = None,
                 onError: Callable[[str], None] | None = None,
                 onFinished: Callable[[str], None] | None = None,
                 python: str | None = None, env: dict | None = None):
        self.argv = list(argv)
        if "--progress" not in self.argv:
            self.argv += ["--progress", "jsonl"]
        self.engineRoot = str(engineRoot) if engineRoot else None
        self.onProgress, self.onDone, self.onError, self.onFinished = onProgress, onDone, onError, onFinished
        self.python = python or pythonExecutable()
        self.extraEnv = env or {}
        self.state = IDLE
        self.fraction, self.message = 0.0, ""
        self.result: dict | None = None
        self.error: str | None = None
        self.returnCode: int | None = None
        self.events: list[dict] = []
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        self._cancelRequested = False

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [self.python, "-m", "scripted_models.cli", *self.argv]

    def environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.extraEnv)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.engineRoot:
            env["PYTHONPATH"] = os.pathsep.join([self.engineRoot, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def start(self) -> CLIRunner:
        if self.state == RUNNING:
            raise RuntimeError("already running")
        self.state = RUNNING
        try:
            self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                          bufsize=1, env=self.environment(), **popenPlatformArguments())
        except BaseException:
            self.state = IDLE
            raise
        self._threads = [threading.Thread(target=self._readStdout, daemon=True),
                         threading.Thread(target=self._readStderr, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _readStdout(self):
        try:  # undecodable bytes are replaced (errors="replace"); any other failure still ends the run
            for line in self._proc.stdout:
                self._queue.put(("line", line))
        except Exception as exc:  # noqa: BLE001 - a dead reader must not make the run hang
            self._stderr.append(f"reading the process output failed: {exc}")
        finally:
            self._queue.put(("eof", None))

    def _readStderr(self):
        try:
            for line in self._proc.stderr:
                self._stderr.append(line.rstrip("\n"))
        except Exception as exc:  # noqa: BLE001
            self._stderr.append(f"reading the process errors failed: {exc}")

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def poll(self) -> bool:
        """Handle the lines received so far (runs the callbacks in the caller's thread). True while running."""
        if self.state != RUNNING:
            return False
        eof = False
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "eof":
                eof = True
                break
            self._handleLine(line)
        if eof:  # stdout closed: the process has ended (or is about to)
            self._finish()
            return False
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Block until the process ends (or timeout seconds: then cancel). Returns the final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            time.sleep(interval)
        return self.state

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the process and everything it started (terminate, then kill after `grace` seconds). Outputs are
        discarded by the caller."""
        if self.state != RUNNING or self._proc is None:
            return
        self._cancelRequested = True
        killProcessTree(self._proc, grace)
        for t in self._threads:
            t.join(timeout=2.0)
        self._finish()

    # --- protocol ------------------------------------------------------------------------------------------------
    def _handleLine(self, line: str) -> None:
        line = line.strip()
        if not line.startswith("{"):
            return
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        self.events.append(event)
        kind = event.get("event")
        if kind == "progress":
            self.fraction = float(event.get("fraction", 0.0))
            self.message = str(event.get("message", ""))
            if self.onProgress:
                self.onProgress(self.fraction, self.message)
        elif kind == "done":
            self.result = event
        elif kind == "error":
            self.error = str(event.get("message", "error"))

    def _finish(self) -> None:
        """Set the final state and run the callbacks. onFinished always runs, even when onDone/onError raise (the
        exception is re-raised afterwards)."""
        try:
            self._collect()
            if self._cancelRequested:
                self.state = CANCELLED
            elif self._succeeded():
                self.state = DONE
                self.fraction = 1.0
                if self.onDone:
                    self.onDone(self.result)
            else:
                self.state = FAILED
                self.error = self._failureMessage()
                if self.onError:
                    self.onError(self.error)
        except BaseException:
            if self.state == RUNNING:
                self.state = FAILED
            raise
        finally:
            if self.onFinished:
                self.onFinished(self.state)

    def _collect(self) -> None:
        """The reader threads' last lines and the exit code."""
        for t in self._threads:
            t.join(timeout=2.0)
        while not self._queue.empty():  # lines that arrived after the last poll
            kind, line = self._queue.get_nowait()
            if kind == "line":
                self._handleLine(line)
        self.returnCode = self._proc.wait()

    def _succeeded(self) -> bool:
        return self.returnCode == 0 and self.result is not None

    def _failureMessage(self) -> str:
        if not self.error or self.returnCode is not None and self.returnCode < 0:
            tail = [s for s in self._stderr if s.strip()]
            return describeExit(self.returnCode, tail[-1].strip() if tail else None)
        return self.error

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)


# --- the warm engine worker ------------------------------------------------------------------------------------
_SHARED_WORKER = None


def sharedWorker():
    """The front end's one warm engine worker (scripted_models.worker) with Slicer's `PythonSlicer` when present.
    It loads the models and runs one small warm-up synthesis before it takes jobs (--preload), and the models stay
    loaded between clicks."""
    global _SHARED_WORKER
    if _SHARED_WORKER is None:
        from scripted_models.worker import EngineWorker

        _SHARED_WORKER = EngineWorker(command=[pythonExecutable()], preload=True)
    return _SHARED_WORKER


def warmUpSharedWorker():
    """Start the shared worker in the background (a module calls this when it opens), so that the first click
    finds the models loaded instead of waiting for the process to start. Never blocks; a worker that fails to
    start is reported by the first job that needs it."""
    import threading

    worker = sharedWorker()
    if worker.alive:
        return None

    def start():
        try:
            worker.start()
        except Exception as exc:  # noqa: BLE001 - reported again, with the job, on the first click
            logging.warning(f"PathoSyn: the engine worker did not start in the background: {exc}")

    thread = threading.Thread(target=start, name="pathosyn-worker-warm-up", daemon=True)
    thread.start()
    return thread


def shutdownSharedWorker() -> None:
    global _SHARED_WORKER
    if _SHARED_WORKER is not None:
        _SHARED_WORKER.close()
        _SHARED_WORKER = None


def workerJob(argv: list[str]) -> tuple[str, dict]:
    """(op, args) of the worker protocol for CLI arguments (parsed by the CLI's own parser): every option of the
    command, under its own name (the images as {modality: path}, the modalities as a list); the worker has its own
    threads and progress events."""
    from scripted_models.cli import build_parser

    args = vars(build_parser().parse_args(argv))
    op = args.pop("command")
    for own in ("func", "threads", "progress"):
        args.pop(own, None)
    if "image" in args:
        args["images"] = dict(item.split("=", 1) for item in args.pop("image"))
    if "modality" in args:
        args["modalities"] = list(args.pop("modality"))
    return op, args


class WorkerRunner(CLIRunner):
    """The same interface as CLIRunner (callbacks, poll, wait, cancel, state), but the job runs in the shared warm
    engine worker instead of a fresh process. Cancel stops the job at its next denoising step and keeps the
    models loaded; a worker that does not stop within `grace` seconds is restarted. A worker that dies fails
    the job with its exit code and last error line, and is restarted on the next job."""

    def __init__(self, argv: list[str], worker=None, **kwargs):
        super().__init__(argv, **kwargs)
        self.worker = worker or sharedWorker()
        self.jobId: str | None = None

    def start(self) -> WorkerRunner:
        if self.state == RUNNING:
            raise RuntimeError("already running")
        op, args = workerJob(self.argv)
        self.state = RUNNING
        try:
            self.jobId = self.worker.submit(op, args)
        except BaseException:
            self.state = IDLE
            raise
        return self

    def poll(self, _timeout: float | None = None) -> bool:
        """Handle the job's events so far (callbacks run in the caller's thread). True while running."""
        if self.state != RUNNING:
            return False
        finished = False
        for event in self.worker.job_events(self.jobId, timeout=_timeout):
            self.events.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.fraction, self.message = float(event.get("fraction", 0.0)), str(event.get("message", ""))
                if self.onProgress:
                    self.onProgress(self.fraction, self.message)
            elif kind == "done":
                self.result, finished = event, True
            elif kind == "error":
                self.error, finished = str(event.get("message", "error")), True
                self.returnCode = -1 if event.get("kind") == "died" else 2
        if finished:
            self._finish()
            return False
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll(interval):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
        return self.state

    def cancel(self, grace: float = 5.0) -> None:
        """Stop the job at its next denoising step (the models stay loaded); restart the worker if it does not
        stop within `grace` seconds."""
        if self.state != RUNNING:
            return
        self._cancelRequested = True
        self.worker.cancel(self.jobId)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if any(e.get("event") in ("done", "error") for e in self.worker.job_events(self.jobId, timeout=0.05)):
                break
        else:
            self.worker.restart()
        self._finish()

    def _collect(self) -> None:
        pass  # the worker's events are already in

    def _succeeded(self) -> bool:
        return self.result is not None

    def _failureMessage(self) -> str:
        return self.error or "the engine worker failed"


def engineRoot() -> Path:
    """Folder that contains the `scripted_models` package (for the child's PYTHONPATH)."""
    import importlib.util

    spec = importlib.util.find_spec("scripted_models")
    if spec is None or spec.origin is None:
        from . import logic  # noqa: F401 - puts the engine on sys.path

        spec = importlib.util.find_spec("scripted_models")
    return Path(spec.origin).resolve().parents[1]
