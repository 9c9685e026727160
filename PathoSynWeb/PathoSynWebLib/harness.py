"""Drive the browser front end from outside: start `pathosyn-web` on a free 127.0.0.1 port, open it in Debian's
Chromium through Playwright, stop both by PID. Shared by Testing/test_web_browser.py and bench.py."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from . import TEST_HOOKS_ENV

CHROMIUM = os.environ.get("PATHOSYN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ENTRY_POINT = Path(__file__).resolve().parents[1] / "PathoSynWeb.py"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python PathoSynWeb.py --port N` in its own session; `stop()` ends it and every process it started."""

    def __init__(self, logPath: Path, port: int | None = None, workDir: str | None = None, env: dict | None = None,
                 args: list | None = None):
        self.port = port or freePort()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.logPath = Path(logPath)
        wrapper = [os.environ["PATHOSYN_WEB_WRAPPER"]] if os.environ.get("PATHOSYN_WEB_WRAPPER") else []  # debugging
        argv = [sys.executable, *wrapper, str(ENTRY_POINT), "--port", str(self.port)]
        if workDir:
            argv += ["--work-dir", str(workDir)]
        argv += [str(a) for a in args or []]
        self._log = open(self.logPath, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, TEST_HOOKS_ENV: "1", **(env or {})},
                                     start_new_session=True)
        self.started = time.perf_counter()

    def waitReady(self, timeout: float = 120.0) -> float:
        """Seconds from the start until the page is served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the web server exited with code {self.proc.returncode}:\n{self.logTail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the web server did not answer within {timeout:.0f} s:\n{self.logTail()}")

    def logTail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logPath.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def rssMB(self) -> float:
        """Resident memory of the server process alone (the engine worker is a child process: not counted)."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def workerRssMB(self) -> float:
        import psutil

        return sum(p.memory_info().rss for p in psutil.Process(self.proc.pid).children(recursive=True)) / 2**20

    def stop(self) -> None:
        """SIGTERM the server (it closes its engine worker), then kill what is left, PID by PID."""
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self._log.close()


class Browser:
    """Debian's Chromium, headless, through Playwright (which cannot download browsers here)."""

    def __init__(self, playwright, viewport=(1400, 850)):
        import psutil

        if not os.path.isfile(CHROMIUM):
            raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.pids = [p.pid for p in psutil.Process().children(recursive=True)
                     if p.pid not in before and "chrom" in p.name().lower()]
        self.page = self.browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})

    def close(self) -> None:
        import psutil

        with contextlib.suppress(Exception):
            self.browser.close()
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


# The view images on screen: those of the shown layout's layer (the others stay in the page, hidden: views.buildLayers)
SHOWN_VIEW_IMAGES_JS = ("Array.from(document.querySelectorAll('img.image-display-area')).filter(e => "
                        "!e.closest('.ps-layer:not(.ps-layer-on)') && e.getBoundingClientRect().width > 50)")


class Page:
    """The PathoSyn page: clicks by element id, server-side checks through trame triggers."""

    def __init__(self, page):
        self.page = page

    def open(self, url: str, timeout: float = 90.0) -> float:
        t0 = time.perf_counter()
        self.page.goto(url)
        self.page.wait_for_selector("#ps-load-sample", timeout=timeout * 1000)
        self.page.wait_for_function("window.trame && window.trame.state", timeout=timeout * 1000)
        return time.perf_counter() - t0

    def trigger(self, name: str, *args):
        return self.page.evaluate("([n, a]) => window.trame.trigger(n, a)", [name, list(args)])

    def status(self) -> dict:
        return self.trigger("ps_test_status")

    def voxels(self) -> dict:
        return self.trigger("ps_test_voxels")

    def click(self, selector: str) -> None:
        self.page.click(selector)

    def fill(self, selector: str, value, field: str | None = None) -> None:
        """Type into a text field; with `field` (a PathoSynWebState name), wait until the server has the value
        (the browser syncs state asynchronously: a click right after typing could overtake it)."""
        box = self.page.locator(f"input{selector}, {selector} input").first  # vuetify puts the id on the input
        box.fill(str(value))
        box.press("Tab")
        if field is not None:
            self.waitFor(lambda: str(self.trigger("ps_test_state", field)) == str(value), timeout=10,
                         interval=0.05, what=f"{field} = {value} on the server")

    def waitFor(self, predicate, timeout: float = 120.0, interval: float = 0.2, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}); "
                           f"status {self.status()}")

    def largestView(self):
        """Bounding box of the largest view image on screen (the axial view of the Paint layout)."""
        boxes = self.page.evaluate(SHOWN_VIEW_IMAGES_JS + """.map(e => e.getBoundingClientRect())
            .map(r => ({x: r.x, y: r.y, width: r.width, height: r.height}))""")
        if not boxes:
            raise RuntimeError("no view image on the page")
        return max(boxes, key=lambda b: b["width"] * b["height"])

    def viewImageSources(self) -> list:
        return self.page.evaluate(SHOWN_VIEW_IMAGES_JS + ".map(e => e.src)")

    def brushStroke(self, dx: float = 40.0, steps: int = 8) -> None:
        """Press, drag `dx` px to the right from the centre of the axial view, release: real mouse events."""
        box = self.largestView()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        mouse = self.page.mouse
        mouse.move(x, y)
        time.sleep(0.3)
        mouse.down()
        for i in range(1, steps + 1):
            mouse.move(x + dx * i / steps, y, steps=2)
            time.sleep(0.05)
        mouse.up()

    def selectPaint(self) -> None:
        """trame-slicer's Paint effect (brush icon of the left toolbar)."""
        self.page.locator("button:has(i.mdi-brush):visible").first.click()

    def screenshot(self, path) -> None:
        self.page.screenshot(path=str(path))
