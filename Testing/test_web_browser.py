"""The browser front end end to end, in a real browser: `pathosyn-web` on a free 127.0.0.1 port, Debian's Chromium
driven by Playwright with real mouse events. Load the teaching sample, paint a brush stroke on the axial view (voxels
counted on the server), Synthesize (2 steps) in the warm engine worker, wait for the result in the compare layout,
Save, and check that outside the dilated mask the output equals the input bit for bit; then 2 PathAR samples.

Needs /usr/bin/chromium (`apt-get install -y chromium`, done by .ci/run) and the `playwright` package; it fails, not
skips, without them. PATHOSYN_WRITE_SCREENSHOT=1 also refreshes Resources/Screenshots/web_*.png.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "Resources" / "Screenshots"
STEPS = 2


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-shots")


@pytest.fixture(scope="module")
def web(tmp_path_factory, shots):
    """(server, page): one server and one browser for the module, both stopped by PID at the end."""
    if not os.path.isfile("/usr/bin/chromium") and "PATHOSYN_CHROMIUM" not in os.environ:
        pytest.fail("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'")
    from PathoSynWeb.PathoSynWebLib.harness import Browser, Page, Server

    work = tmp_path_factory.mktemp("web-work")
    server = Server(work / "server.log", workDir=str(work))
    browser = None
    try:
        server.waitReady(timeout=120)
        with sync_playwright() as playwright:
            browser = Browser(playwright)
            page = Page(browser.page)
            page.open(server.url)
            yield server, page
    finally:
        if browser is not None:
            browser.close()
        server.stop()
        print(server.logTail(15))


def _save_shot(page, shots: Path, name: str) -> Path:
    """A small PNG of the page (tmp; into Resources/Screenshots with PATHOSYN_WRITE_SCREENSHOT=1)."""
    from PIL import Image

    path = shots / f"web_{name}.png"
    page.screenshot(path)
    image = Image.open(path).convert("RGB")
    image.thumbnail((1120, 700))
    image.quantize(colors=256).save(path, optimize=True)
    if os.environ.get("PATHOSYN_WRITE_SCREENSHOT") == "1":
        shutil.copy(path, SCREENSHOTS / path.name)
    return path


def test_paint_synthesize_compare_save(web, shots, tmp_path):
    from scripted_models.pathosyn.api import BLEND_MARGIN_MM
    from scripted_models.preprocess import dilate_mm
    from scripted_models.volume import read_volume

    server, page = web
    page.click("#ps-load-sample")
    page.waitFor(lambda: page.voxels(), timeout=60, what="the teaching sample")
    before = page.voxels()
    assert set(before) == {"necrotic or non-enhancing core", "edema", "enhancing tumour"}, before
    # VTK's messages (trame-slicer's segment editor logs dozens per segmentation) go to a file, not the terminal
    log = server.logPath.read_text(errors="replace")
    vtkLog = Path(log.split("(VTK messages: ", 1)[1].split(")", 1)[0])
    assert "vtkImageReslice" not in log and "WindowResizeEvent" not in log, log[-2000:]
    assert "vtkImageReslice" in vtkLog.read_text(errors="replace")

    # a real brush stroke on the axial view (active segment: the first one, core)
    page.selectPaint()
    time.sleep(1.0)
    page.brushStroke(dx=40)
    after = page.waitFor(lambda: (v := page.voxels()) != before and v, timeout=30, what="painted voxels")
    painted = sum(after.values()) - sum(before.values())
    core = "necrotic or non-enhancing core"
    assert after[core] > before[core] + 50, (before, after)
    print(f"brush stroke: {before} -> {after} ({painted:+d} voxels in total)")
    _save_shot(page, shots, "painted")

    # Synthesize (2 steps, 2 samples: an uncertainty map too): the click returns at once, progress streams, the
    # result lands in the compare layout
    page.fill("#ps-steps", STEPS, field="steps")
    page.fill("#ps-samples", 2, field="samples")
    page.click("#ps-synthesize")
    page.page.wait_for_selector("#ps-progress", timeout=30000)
    page.waitFor(lambda: page.trigger("ps_test_state", "progress") >= 20 or not page.status()["running"], timeout=60,
                 what="some progress")
    _save_shot(page, shots, "running")
    # nothing animates while the worker computes (app.QUIET_PAGE_CSS): CSS animations cost the shared cores
    animations = page.page.evaluate("document.getAnimations().map(a => (a.animationName || a.transitionProperty)"
                                    " + ' on ' + (a.effect?.target?.getAttribute('class') || '?'))")
    assert animations == [] or not page.status()["running"], animations
    pings = []
    while True:  # the server answers while the worker computes (at least one ping, also for a quick job)
        t0 = time.perf_counter()
        page.trigger("ps_ping")
        pings.append(time.perf_counter() - t0)
        if not page.status()["running"]:
            break
        time.sleep(0.2)
    status = page.waitFor(lambda: (s := page.status())["has_result"] and s, timeout=180, what="the result")
    assert not status["error"], status
    assert status["layout"] == "Compare"
    # a frozen page answers once, after the whole job; a responsive one within milliseconds (the last ping may wait
    # for the result nodes to be created, about 1 s)
    assert sorted(pings)[len(pings) // 2] < 0.5 and max(pings) < 4.0, f"the page stopped answering: {pings}"
    time.sleep(3.0)  # let the compare views render
    shot = _save_shot(page, shots, "compare")
    assert shot.stat().st_size > 20_000
    offsets = page.status()["compare_offsets"]
    assert offsets[0] == offsets[1], offsets  # the result view starts where the input view is
    from PathoSynWeb.PathoSynWebLib.harness import SHOWN_VIEW_IMAGES_JS

    first = page.page.evaluate(SHOWN_VIEW_IMAGES_JS + """.map(e => e.getBoundingClientRect())
        .sort((a, b) => a.x - b.x).map(r => [r.x + r.width / 2, r.y + r.height / 2])[0]""")
    page.page.mouse.move(*first)
    for _ in range(3):  # scroll the input view: the linked result view follows
        page.page.mouse.wheel(0, 120)
        time.sleep(0.3)
    moved = page.waitFor(lambda: (o := page.status()["compare_offsets"])[0] != offsets[0] and o[0] == o[1] and o,
                         timeout=20, what="the linked views to scroll together")
    print(f"linked scroll: {offsets} -> {moved}")
    page.page.locator(".v-select:has(#ps-overlay) .v-field").first.click()  # residual as an overlay, then off
    page.page.locator(".v-overlay .v-list-item", has_text="residual").first.click()
    page.waitFor(lambda: (page.status()["overlay"] or "").endswith("residual"), timeout=20, what="the overlay")
    page.page.locator(".v-select:has(#ps-overlay) .v-field").first.click()
    page.page.locator(".v-overlay .v-list-item", has_text="uncertainty").first.click()
    page.waitFor(lambda: (page.status()["overlay"] or "").endswith("uncertainty"), timeout=20,
                 what="the uncertainty overlay")
    page.page.locator(".v-select:has(#ps-overlay) .v-field").first.click()
    page.page.locator(".v-overlay .v-list-item", has_text="none").first.click()
    page.waitFor(lambda: page.status()["overlay"] is None, timeout=20, what="no overlay")
    # a layout switch shows another layer of the page: the views stay mounted (the whole page was re-rendered)
    page.page.evaluate("document.querySelector('#ps-layer-compare img.image-display-area').__psMark = 1")
    for layout in ("paint", "compare"):
        page.click(f"#ps-layout-{layout}")
        page.waitFor(lambda layout=layout: page.status()["layout"].lower() == layout, timeout=20, what=layout)
    assert page.page.evaluate("document.querySelector('#ps-layer-compare img.image-display-area').__psMark === 1")
    assert page.page.evaluate("document.querySelector('#ps-layer-compare').classList.contains('ps-layer-on')")

    # Save through the page, then compare the files with the untouched input
    out = tmp_path / "saved"
    page.fill("#ps-save-folder", out)
    page.click("#ps-save")
    page.waitFor(lambda: (out / "mask.nii.gz").is_file() and (out / "t1.nii.gz").is_file(), timeout=60,
                 what="the saved files")
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    source = read_volume(PathoSynSlicerLogic().sampleDataFiles()["t1"])
    output = read_volume(out / "t1.nii.gz")
    mask = read_volume(out / "mask.nii.gz")
    assert output.array.shape == source.array.shape and output.array.dtype == source.array.dtype
    region = dilate_mm(mask.array > 0, BLEND_MARGIN_MM, tuple(reversed(source.spacing)))
    assert region.any() and not region.all()
    assert np.array_equal(output.array[~region], source.array[~region]), "voxels outside the lesion region changed"
    assert np.abs(output.array[region].astype(float) - source.array[region]).max() > 0, "nothing was synthesized"
    assert (out / "residual_t1.nii.gz").is_file() and (out / "uncertainty_t1.nii.gz").is_file()
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"
    assert not page.status()["torch_in_server"], "the server process imported torch (jobs belong in the worker)"
    page.fill("#ps-samples", 1, field="samples")


def test_test_hooks_are_off_for_users(web, tmp_path):
    """Without PATHOSYN_WEB_TEST_HOOKS=1 (which the harness sets) the server has no ps_test_* triggers; ps_ping
    stays. A second server, opened in a new tab of the module's browser."""
    from PathoSynWeb.PathoSynWebLib.harness import Server

    _, page = web
    server = Server(tmp_path / "server.log", workDir=str(tmp_path), env={"PATHOSYN_WEB_TEST_HOOKS": "0"},
                    args=["--no-worker"])
    tab = None
    ask = """([name, args]) => Promise.race([window.trame.trigger(name, args).then(
                                         v => v === null || v === undefined ? 'nothing' : 'answered', () => 'refused'),
                                     new Promise(r => setTimeout(() => r('no answer'), 3000))])"""
    try:
        server.waitReady(timeout=120)
        tab = page.page.context.browser.new_page()
        tab.goto(server.url)
        tab.wait_for_function("window.trame && window.trame.state", timeout=90000)
        assert tab.evaluate(ask, ["ps_ping", []]) == "answered"
        for name, args in (("ps_test_status", []), ("ps_test_voxels", []), ("ps_test_state", ["steps"])):
            assert tab.evaluate(ask, [name, args]) != "answered", name
    finally:
        if tab is not None:
            tab.close()
        server.stop()


def _error_line(page, what: str) -> str:
    return page.waitFor(lambda: page.status()["error"], timeout=60, what=what)


def test_errors_show_in_the_page(web):
    _, page = web
    page.click("#ps-layout-paint")
    page.fill("#ps-mask-path", "/nonexistent/mask.nii.gz")
    page.click("#ps-load-mask")
    page.page.wait_for_selector("#ps-error", timeout=10000)
    assert "no such mask file" in page.page.inner_text("#ps-error")

    page.click("#ps-new-whole")  # an empty whole-lesion segmentation
    page.waitFor(lambda: page.voxels() == {"lesion": 0}, timeout=20, what="the empty segment")
    page.click("#ps-synthesize")
    assert "empty" in _error_line(page, "the empty-mask error")

    page.selectPaint()  # a stroke in the scan's background, left of the brain
    time.sleep(1.0)
    box = page.largestView()
    x, y = box["x"] + 0.07 * box["width"], box["y"] + 0.5 * box["height"]  # brush well clear of the head
    page.page.mouse.move(x, y)
    page.page.mouse.down()
    page.page.mouse.move(x, y + 15, steps=3)
    page.page.mouse.up()
    page.waitFor(lambda: page.voxels()["lesion"] > 0, timeout=30, what="voxels outside the brain")
    page.click("#ps-synthesize")
    line = _error_line(page, "the outside-the-brain error")
    assert "does not overlap the brain" in line and "\n" not in line, line
    assert page.page.inner_text("#ps-error").strip() == line


def test_pathar_samples_in_a_row(web, shots):
    _, page = web
    page.fill("#ps-pathar-n", 2, field="pathar_n")
    page.click("#ps-pathar-generate")
    status = page.waitFor(lambda: (s := page.status())["pathar_samples"] == 2 and not s["running"] and s,
                          timeout=180, what="2 PathAR samples")
    assert not status["error"], status
    assert status["layout"] == "PathAR 2" and status["pathar_modality_shown"] == "t1c"
    time.sleep(3.0)
    _save_shot(page, shots, "pathar")

    # another modality: the same structures in another contrast
    page.page.locator(".v-select:has(#ps-pathar-modality) .v-field").first.click()
    page.page.locator(".v-overlay .v-list-item", has_text="flair").first.click()
    status = page.waitFor(lambda: (s := page.status())["pathar_modality_shown"] == "flair" and s, timeout=20,
                          what="the flair samples")
    assert status["pathar_structures"] == page.status()["pathar_structures"]

    # "Use this mask": sample 2, placed where the axial view is clicked
    page.fill("#ps-pathar-sample", 2, field="pathar_sample")
    page.click("#ps-use-mask")
    page.waitFor(lambda: page.status()["layout"] == "Paint", timeout=20, what="the Paint layout")
    time.sleep(1.0)
    box = page.largestView()
    page.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    status = page.waitFor(lambda: (s := page.status())["segmentation"].endswith("placed") and s, timeout=20,
                          what="the placed mask")
    assert not status["error"] and sum(page.voxels().values()) > 0, status
    assert "outside" not in status["message"], status["message"]  # the view showed the whole scan: a head click

    # sample 1 added to it ("add to the current mask"), 25 mm to the right of the first: one mask, two lesions
    placed = sum(page.voxels().values())
    page.page.locator("#ps-pathar-add").check()
    page.waitFor(lambda: page.trigger("ps_test_state", "pathar_add") is True, timeout=10, what="the tick")
    page.fill("#ps-pathar-sample", 1, field="pathar_sample")
    page.click("#ps-use-mask")
    page.waitFor(lambda: page.trigger("ps_test_state", "placing") is True, timeout=20, what="placing")
    box = page.largestView()
    page.page.mouse.click(box["x"] + box["width"] / 2 + 25 * box["width"] / 200, box["y"] + box["height"] / 2)
    status = page.waitFor(lambda: (s := page.status())["segmentation"].count("placed") == 2 and s, timeout=20,
                          what="the second lesion added")
    assert not status["error"] and sum(page.voxels().values()) > placed, status


def test_cancel_keeps_the_scene(web):
    _, page = web
    before = page.status()
    assert before["segmentation"].endswith("placed")  # the PathAR masks placed by the previous test
    page.fill("#ps-steps", 5, field="steps")
    page.click("#ps-synthesize")
    page.waitFor(lambda: page.trigger("ps_test_state", "progress") > 0, timeout=60, what="the job to run")
    page.click("#ps-cancel")
    status = page.waitFor(lambda: (s := page.status())["message"].startswith("Cancelled") and s, timeout=30,
                          what="the cancel")
    assert not status["running"] and not status["error"]
    assert status.get("volumes") == before.get("volumes"), "a cancelled run changed the result"


def test_pseudo_healthy_on_the_placed_lesion(web):
    _, page = web
    page.click("#ps-pseudo-healthy")
    status = page.waitFor(lambda: (s := page.status())["healthy"] and not s["running"] and s, timeout=180,
                          what="the pseudo-healthy volume")
    assert not status["error"] and status["healthy"]["t1"].endswith("pseudo-healthy"), status
    assert status["layout"] == "Compare"

def test_a_worker_that_dies_is_one_line(web):
    import psutil

    server, page = web
    page.fill("#ps-steps", 5, field="steps")
    page.click("#ps-synthesize")
    page.waitFor(lambda: page.trigger("ps_test_state", "progress") > 0, timeout=60, what="the job to run")
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "scripted_models.worker" in " ".join(p.cmdline())]
    assert workers, "no engine worker process"
    for p in workers:
        p.kill()
    line = _error_line(page, "the worker error")
    assert line.startswith("the engine worker stopped") and "\n" not in line, line
    assert not page.status()["running"]


def test_upload_scans_tagged_by_name(web, tmp_path):
    from conftest import make_ball_mask, make_head

    from scripted_models.volume import write_volume

    _, page = web
    head = make_head()
    files = [write_volume(head, tmp_path / "sub01_flair.nii.gz"),
             write_volume(make_ball_mask(head), tmp_path / "sub01_mask.nii.gz")]
    page.page.set_input_files("input[type=file]:not([webkitdirectory])", [str(f) for f in files])
    status = page.waitFor(lambda: (s := page.status())["scans"].get("flair") and s, timeout=60,
                          what="the uploaded flair scan")
    assert status["scans"]["flair"] == "sub01_flair" and status["scans"]["t1"] == "MNI152 T1", status
    assert status["segmentation"] == "sub01_mask" and not status["error"]

    from conftest import write_dicom_series  # the folder button with a DICOM series: one scan, named by it

    series = write_dicom_series(head, tmp_path / "dicom", description="AX T1 POST GD")
    page.page.set_input_files("input[type=file][webkitdirectory]", str(series))
    status = page.waitFor(lambda: (s := page.status())["scans"].get("t1c") and s, timeout=60,
                          what="the uploaded DICOM series")
    assert status["scans"]["t1c"] == "AX T1 POST GD" and not status["error"], status

