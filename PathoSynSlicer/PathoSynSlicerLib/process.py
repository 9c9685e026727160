"""Background runner for the `pathosyn` command line (`python -m scripted_models.cli ... --progress jsonl`).

Qt-free so that it can be tested without Slicer: a subprocess plus two reader threads. The GUI calls `poll()` from a
QTimer (callbacks then run in the GUI thread); scripts call `wait()`. Protocol (one JSON object per stdout line):
    {"event": "progress", "fraction": 0.4, "message": "..."}
    {"event": "done", "outputs": {...}, ...}               exit code 0
    {"event": "error", "message": "one line"}              exit code 2 (bad input, missing weights)
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"


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
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # cancel also stops grandchildren (e.g. data loader workers)
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True, bufsize=1, env=self.environment(),
                                      **kwargs)
        self._threads = [threading.Thread(target=self._readStdout, daemon=True),
                         threading.Thread(target=self._readStderr, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def _readStdout(self):
        for line in self._proc.stdout:
            self._queue.put(("line", line))
        self._queue.put(("eof", None))

    def _readStderr(self):
        for line in self._proc.stderr:
            self._stderr.append(line.rstrip("\n"))

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
        """Terminate the process (then kill after `grace` seconds). Outputs are discarded by the caller."""
        if self.state != RUNNING or self._proc is None:
            return
        self._cancelRequested = True
        self._signal("terminate")
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal("kill")
            self._proc.wait()
        for t in self._threads:
            t.join(timeout=2.0)
        self._finish()

    def _signal(self, how: str) -> None:
        if os.name == "posix":
            import signal

            try:
                os.killpg(self._proc.pid, signal.SIGTERM if how == "terminate" else signal.SIGKILL)
                return
            except (ProcessLookupError, PermissionError):
                pass
        try:
            getattr(self._proc, how)()
        except ProcessLookupError:
            pass

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
        for t in self._threads:
            t.join(timeout=2.0)
        while not self._queue.empty():  # lines that arrived after the last poll
            kind, line = self._queue.get_nowait()
            if kind == "line":
                self._handleLine(line)
        self.returnCode = self._proc.wait()
        if self._cancelRequested:
            self.state = CANCELLED
        elif self.returnCode == 0 and self.result is not None:
            self.state = DONE
            self.fraction = 1.0
            if self.onDone:
                self.onDone(self.result)
        else:
            self.state = FAILED
            if not self.error:
                tail = [s for s in self._stderr if s.strip()]
                self.error = (tail[-1] if tail else f"the synthesis process exited with code {self.returnCode}")
                self.error = self.error.removeprefix("pathosyn: error: ")
            if self.onError:
                self.onError(self.error)
        if self.onFinished:
            self.onFinished(self.state)

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)


def engineRoot() -> Path:
    """Folder that contains the `scripted_models` package (for the child's PYTHONPATH)."""
    import importlib.util

    spec = importlib.util.find_spec("scripted_models")
    if spec is None or spec.origin is None:
        from . import logic  # noqa: F401 - puts the engine on sys.path

        spec = importlib.util.find_spec("scripted_models")
    return Path(spec.origin).resolve().parents[1]
