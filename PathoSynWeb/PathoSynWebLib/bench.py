"""Browser-side timings of the web front end (Debian's Chromium through Playwright, server on 127.0.0.1):

    python -m PathoSynWeb.PathoSynWebLib.bench [--runs 3] [--out docs/bench_web.json]

  page ready            navigation -> the panel is up and trame's state is connected
  scan visible          click "Load teaching sample" -> the axial view shows the brain (mean pixel value > 20)
  stroke -> screen      mouse-up after a brush stroke -> a frame of the axial view with more lesion-coloured pixels
                        than before the stroke (page only; the voxels are checked after it)
  stroke -> voxels      same, -> the server has the voxels (a trigger polled every 20 ms), on separate strokes
  synthesize -> shown   click "Synthesize lesion" (warm worker) -> the compare layout shows the result view, on the
                        browser's clock (click event to the result image's load; `polled_s`: the harness's
                        loop); 5 steps and the 2-step preview, median of --runs. The mask is loaded from a file
                        (the "mask file on the server" field): the sample scan with the lesion of `pathosyn
                        bench`, whose ROI is 64^3; with the server's milestones since the click and the CPU
                        seconds of each process
  PathAR -> shown       click "Generate samples" (warm worker, after one click that loads the PathAR models) -> every
                        view of the PathAR layout shows the new samples, on the browser's clock (click to the
                        last view image's load); the panel's default (4 samples, t1c and flair), median of --runs
  ping during a run     round trip of a trame trigger every 0.2 s during --ping-runs 5-step clicks of their own
  server memory         RSS of the server process (the engine worker, a child process, is listed apart)

Times are wall-clock on whatever else the machine is doing: note the load average that is printed with them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from .harness import SHOWN_VIEW_IMAGES_JS, Browser, Page, Server

VIEW_STATS_JS = """(mode) => {
  const imgs = """ + SHOWN_VIEW_IMAGES_JS + """
      .filter(e => e.complete && e.naturalWidth > 0)
      .sort((a, b) => a.getBoundingClientRect().x - b.getBoundingClientRect().x);
  if (!imgs.length) return null;
  const pick = mode === 'largest'
      ? imgs.reduce((a, b) => a.width * a.height >= b.width * b.height ? a : b)
      : imgs[Math.min(1, imgs.length - 1)];
  const c = document.createElement('canvas');
  c.width = pick.naturalWidth; c.height = pick.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(pick, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, red = 0;
  for (let i = 0; i < d.length; i += 4) {
    sum += d[i] + d[i + 1] + d[i + 2];
    if (d[i] > 90 && d[i] > 1.6 * d[i + 1] && d[i] > 1.6 * d[i + 2]) red++;
  }
  return {mean: sum / (d.length / 4) / 3, red: red, src: pick.src.slice(-24), fullSrc: pick.src, n: imgs.length};
}"""

# The browser's own clock: when the click on an element was dispatched, and when each view image finished loading
# (decoded, painted at the next frame). The page's timing then does not include the harness's polling interval.
PAGE_CLOCK_JS = """(selector) => {
  if (!window.__psClock) {
    window.__psClock = {loads: {}, clicks: {}};
    document.addEventListener('load', e => {
      if (e.target.tagName === 'IMG') window.__psClock.loads[e.target.src] = performance.now();
    }, true);
    document.addEventListener('click', e => {
      for (const s of Object.keys(window.__psClock.clicks)) {
        if (e.target.closest(s)) window.__psClock.clicks[s] = e.timeStamp;
      }
    }, true);
  }
  window.__psClock.clicks[selector] = null;
}"""


# src of the Compare layout's result view image (the second from the left), shown or not
RESULT_VIEW_SRC_JS = """(() => {
  const imgs = Array.from(document.querySelectorAll('#ps-layer-compare img.image-display-area'))
      .sort((a, b) => a.getBoundingClientRect().x - b.getBoundingClientRect().x);
  return imgs.length > 1 ? imgs[1].src : null; })()"""


# srcs of the PathAR layout's view images that have loaded
PATHAR_VIEW_SRCS_JS = """(() => Array.from(document.querySelectorAll('#ps-layer-pathar img.image-display-area'))
  .filter(e => e.complete && e.naturalWidth > 0 && e.getBoundingClientRect().width > 50).map(e => e.src))()"""


def pageSeconds(page: Page, selector: str, src: str) -> float | None:
    """Seconds from the click on `selector` to the load of the image `src`, on the browser's clock."""
    clock = page.page.evaluate("([sel, src]) => window.__psClock && [window.__psClock.clicks[sel], "
                               "window.__psClock.loads[src]]", [selector, src])
    return round((clock[1] - clock[0]) / 1000.0, 3) if clock and None not in clock else None


def viewStats(page: Page, mode: str = "largest"):
    return page.page.evaluate(VIEW_STATS_JS, mode)


def timeUntil(predicate, timeout: float, interval: float = 0.02) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter() - t0
        time.sleep(interval)
    raise TimeoutError("timed out")


def layoutIs(page: Page, name: str) -> bool:
    return page.page.evaluate(f"document.querySelector('#ps-layout-{name}').classList.contains('v-btn--active')")


def cpuSeconds(server: Server, browser: Browser) -> dict:
    """CPU seconds (user + system) used so far by the server, its engine worker, Chromium and this process."""
    import psutil

    def used(procs) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    serverProc = psutil.Process(server.proc.pid)
    chromium = []
    for pid in browser.pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            chromium += [root, *root.children(recursive=True)]
    return {"server": used([serverProc]), "worker": used(serverProc.children(recursive=True)),
            "chromium": used({p.pid: p for p in chromium}.values()), "bench": used([psutil.Process()])}


def synthesizeOnce(page: Page, steps: int, pings: list | None = None, cpu=None) -> dict:
    page.click("#ps-layout-paint")
    page.waitFor(lambda: layoutIs(page, "paint") and not page.status()["running"], timeout=30, what="Paint layout")
    page.fill("#ps-steps", steps, field="steps")
    time.sleep(0.5)
    cpuBefore = cpu() if cpu is not None else None
    page.page.evaluate(PAGE_CLOCK_JS, "#ps-synthesize")
    previous = page.page.evaluate(RESULT_VIEW_SRC_JS)  # the Compare layer keeps the last result's image
    t0 = time.perf_counter()
    page.click("#ps-synthesize")
    while True:
        if layoutIs(page, "compare"):
            stats = viewStats(page, "second")
            if stats and stats["n"] == 3 and stats["mean"] > 20 and stats["fullSrc"] != previous:
                shown = time.perf_counter() - t0
                inPage = pageSeconds(page, "#ps-synthesize", stats["fullSrc"])
                break
        if pings is not None:
            p0, wall0 = time.perf_counter(), time.time()
            served = page.trigger("ps_ping")  # the server's time.time() when it answered (same machine, same clock)
            ms = 1000 * (time.perf_counter() - p0)
            pings.append((round(p0 - t0, 3), ms, round(1000 * (served - wall0), 1)))  # (s since the click, ms, ms out)
        if time.perf_counter() - t0 > 300:
            raise TimeoutError(f"no result on screen after 300 s: {page.status()}")
        time.sleep(0.05 if pings is None else 0.2)
    cpuAfter = cpu() if cpu is not None else None
    page.waitFor(lambda: not page.status()["running"], timeout=60, what="the job's end")
    status = page.status()
    if status["error"]:
        raise RuntimeError(status["error"])
    report = status.get("report", {})
    # seconds: the browser's clock, click to the result view's image loaded; polled_s: the harness's polling loop
    # (an upper bound: its interval, pings and pixel checks add up to 0.3 s)
    row = {"seconds": inPage if inPage is not None else round(shown, 2), "polled_s": round(shown, 2),
           "engine_s": (report.get("timing_s") or {}).get("total"),
           "roi_size_zyx": report.get("roi_size_zyx"), "server_timeline_s": status.get("job_timeline_s"),
           "scene_steps_s": status.get("show_timings_s"), "renders_s": status.get("recent_renders_s")}
    if cpu is not None:
        row["cpu_s"] = {k: round(cpuAfter[k] - cpuBefore[k], 2) for k in cpuBefore}
    return row


def patharOnce(page: Page, n: int, cpu=None) -> dict:
    """Click "Generate samples" (n samples, the panel's modalities) -> every PathAR view shows a new image."""
    page.fill("#ps-pathar-n", n, field="pathar_n")
    time.sleep(0.5)
    before = set(page.page.evaluate(PATHAR_VIEW_SRCS_JS))
    cpuBefore = cpu() if cpu is not None else None
    page.page.evaluate(PAGE_CLOCK_JS, "#ps-pathar-generate")
    t0 = time.perf_counter()
    page.click("#ps-pathar-generate")
    while True:  # polled in the page; the server is asked only once the views changed (it shares the cores)
        srcs = page.page.evaluate(PATHAR_VIEW_SRCS_JS)
        if srcs and not before & set(srcs) and layoutIs(page, "pathar"):
            status = page.status()
            if status["error"]:
                raise RuntimeError(status["error"])
            if not status["running"] and status["pathar_samples"] == n:
                shown = time.perf_counter() - t0
                break
        if time.perf_counter() - t0 > 300:
            raise TimeoutError(f"no PathAR samples on screen after 300 s: {page.status()}")
        time.sleep(0.1)
    ends = [pageSeconds(page, "#ps-pathar-generate", src) for src in srcs]
    row = {"seconds": max(ends) if None not in ends else round(shown, 2), "polled_s": round(shown, 2),
           "views": len(srcs), "server_timeline_s": status.get("job_timeline_s"),
           "scene_steps_s": status.get("show_timings_s")}
    if cpu is not None:
        cpuAfter = cpu()
        row["cpu_s"] = {k: round(cpuAfter[k] - cpuBefore[k], 2) for k in cpuBefore}
    return row


def slowPings(pings: list, timeline: dict | None, limitMs: float = 150.0) -> list:
    """The pings slower than `limitMs`, each with the server's phase it was sent in (the job's milestones since the
    click: before "job sent", computing until "job ended", then reading and setting up the result, then rendering)
    and the part of its round trip until the server answered (the rest: the answer's way back through the page)."""
    marks = sorted((timeline or {}).items(), key=lambda kv: kv[1])
    out = []
    for sent, ms, outbound in pings:
        if ms > limitMs:
            phase = next((f"before '{name}'" for name, at in marks if sent < at), "after 'scene set up'")
            out.append({"sent_s": sent, "ms": round(ms, 1), "to_server_ms": outbound, "phase": phase})
    return out


def run(runs: int = 3, out: Path | None = None, shots: Path | None = None, strokesOnly: bool = False,
        strokeRuns: int = 3, serverArgs: list | None = None, pingRuns: int = 3) -> dict:
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="pathosyn-web-bench-"))
    server = Server(work / "server.log", workDir=str(work), args=serverArgs)
    result: dict = {"load_average_start": list(os.getloadavg()), "cpus": os.cpu_count(),
                    "server_args": list(serverArgs or [])}
    browser = None
    try:
        result["server_start_to_http_s"] = round(server.waitReady(timeout=180), 2)
        with sync_playwright() as playwright:
            browser = Browser(playwright)
            page = Page(browser.page)
            result["page_ready_s"] = round(page.open(server.url), 2)
            result["server_rss_idle_mb"] = round(server.rssMB())

            page.click("#ps-load-sample")
            result["scan_visible_s"] = round(timeUntil(
                lambda: (s := viewStats(page)) is not None and s["mean"] > 20, 60), 2)
            time.sleep(1.0)

            # brush stroke: mouse-up -> voxels on the server, -> more lesion-coloured pixels on screen
            page.selectPaint()
            time.sleep(1.0)
            strokes = []
            for k in range(2 * strokeRuns):
                # even strokes: time to the frame on screen (the page alone, as a user sees it); odd strokes: time
                # to the voxels on the server (a trigger polled every 20 ms: it competes with the renders it waits
                # for, so the two are measured on separate strokes)
                watch = "screen" if k % 2 == 0 else "voxels"
                page.page.mouse.move(10, 10)  # away from the view: no brush circle in the baseline
                time.sleep(0.8)
                before_vox = sum(page.voxels().values())
                before_red = viewStats(page)["red"]
                box = page.largestView()
                x, y = box["x"] + box["width"] / 2 + 20 * k - 60, box["y"] + box["height"] / 2 + 40
                mouse = page.page.mouse
                mouse.move(x, y)
                time.sleep(0.3)
                mouse.down()
                for i in range(1, 9):
                    mouse.move(x + 5 * i, y, steps=1)
                    time.sleep(0.03)
                mouse.up()
                up, seconds = time.perf_counter(), None
                while seconds is None and time.perf_counter() - up < 30:
                    if watch == "screen" and viewStats(page)["red"] > before_red + 30:
                        seconds = time.perf_counter() - up
                    elif watch == "voxels" and sum(page.voxels().values()) > before_vox:
                        seconds = time.perf_counter() - up
                    time.sleep(0.02)
                if seconds is None:
                    raise TimeoutError(f"stroke {k}: nothing on the {watch} after 30 s")
                if sum(page.voxels().values()) <= before_vox:
                    raise RuntimeError(f"stroke {k}: the frame changed but no voxels were painted")
                strokes.append({"to": watch, "seconds": round(seconds, 3)})
                page.page.mouse.move(10, 10)
            result["brush_stroke"] = strokes
            result["brush_stroke_to_screen_median_s"] = statistics.median(
                s["seconds"] for s in strokes if s["to"] == "screen")
            result["brush_stroke_to_voxels_median_s"] = statistics.median(
                s["seconds"] for s in strokes if s["to"] == "voxels")
            if shots:
                page.screenshot(shots / "bench_painted.png")

            if not strokesOnly:
                # synthesis on the 64^3 workload of `pathosyn bench`, loaded as a mask file; warm: one warm-up
                # click, then `runs` clicks per setting; then `pingRuns` 5-step clicks with a ping every 0.2 s, on
                # clicks of their own: the probe costs the page and the server CPU that the timed clicks should not
                # pay (as strokes are timed to the screen and to the voxels on separate strokes)
                from scripted_models.evaluation.bench import _lesion, radius_for_roi
                from scripted_models.templates import mni_t1
                from scripted_models.volume import write_volume

                maskPath = write_volume(_lesion(mni_t1(), radius_for_roi(64)), work / "lesion_roi64.nii.gz")
                page.click("#ps-tool-PathoSynPanel")
                page.fill("#ps-mask-path", str(maskPath), field="mask_path")
                page.click("#ps-load-mask")
                page.waitFor(lambda: page.status()["segmentation"] == "lesion_roi64", timeout=60,
                             what="the 64^3-ROI mask")
                page.waitFor(lambda: page.status()["worker_alive"], timeout=120, what="the engine worker")
                cpu = lambda: cpuSeconds(server, browser)  # noqa: E731
                allPings: list = []
                result["warmup"] = synthesizeOnce(page, 2)
                for steps, key in ((5, "synthesize_5_steps"), (2, "synthesize_preview_2_steps")):
                    rows = [synthesizeOnce(page, steps, None, cpu) for _ in range(runs)]
                    result[key] = {"runs": rows, "median_s": statistics.median(r["seconds"] for r in rows)}
                pingRows = []
                for _ in range(pingRuns):
                    pings: list = []
                    row = synthesizeOnce(page, 5, pings, cpu)
                    row["slow_pings"] = slowPings(pings, row["server_timeline_s"])
                    pingRows.append(row)
                    allPings += [ms for _, ms, _ in pings]
                result["synthesize_5_steps_with_pings"] = pingRows
                result["ping_during_synthesis_ms"] = {
                    "n": len(allPings), "median": round(statistics.median(allPings), 1),
                    "p95": round(sorted(allPings)[int(0.95 * (len(allPings) - 1))], 1),
                    "max": round(max(allPings), 1)}
                n = int(page.trigger("ps_test_state", "pathar_n"))  # the panel's default
                result["pathar_warmup"] = patharOnce(page, n)
                rows = [patharOnce(page, n, cpu) for _ in range(runs)]
                result["pathar_generate"] = {"runs": rows, "median_s": statistics.median(r["seconds"] for r in rows),
                                             "samples": n, "modalities": page.trigger("ps_test_state",
                                                                                      "pathar_modalities")}
                result["server_rss_after_mb"] = round(server.rssMB())
                result["worker_rss_mb"] = round(server.workerRssMB())
                if shots:
                    page.screenshot(shots / "bench_compare.png")
    finally:
        if browser is not None:
            browser.close()
        server.stop()
    result["load_average_end"] = list(os.getloadavg())
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (e.g. docs/bench_web.json)")
    parser.add_argument("--shots", type=Path, default=None, help="folder for screenshots of the runs")
    parser.add_argument("--strokes-only", action="store_true", help="page, scan and brush timings only")
    parser.add_argument("--strokes", type=int, default=3, help="brush strokes timed to the screen (and as many to "
                                                               "the server's voxels)")
    parser.add_argument("--max-view-pixels", type=int, default=None, help="passed to pathosyn-web")
    parser.add_argument("--ping-runs", type=int, default=3, help="5-step clicks with pings (apart from the timed ones)")
    args = parser.parse_args(argv)
    serverArgs = [] if args.max_view_pixels is None else ["--max-view-pixels", args.max_view_pixels]
    run(args.runs, args.out, args.shots, args.strokes_only, args.strokes, serverArgs, args.ping_runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
