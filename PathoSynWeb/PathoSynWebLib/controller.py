"""The browser front end's controller: the web twin of PathoSynSlicerLib/widget.py, Qt-free and trame-free.

It holds the inputs (scans tagged with modalities, the lesion segmentation), validates clicks, runs jobs in the warm
engine worker (PathoSynSlicerLib.process.WorkerRunner) from an asyncio task, and turns outputs into new nodes through
the Slicer modules' logic. Click handlers only validate and start a task, then return: the server's event loop stays
free for rendering and pings while the worker computes. Scene calls stay on the event-loop thread.

`views` is the display side (app.WebViews: layouts, slice/3D views); None in unit tests. `state` is any object with
the fields of state.PathoSynWebState (trame's TypedState proxy, or the dataclass itself in tests).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import state as _state  # noqa: F401 - also puts the Slicer modules' logic on sys.path (package __init__)

# isort: off
from PathoSynSlicerLib.logic import (  # noqa: E402
    InputError,
    JobError,
    PathoSynSlicerLogic,
    removeNodes,
    synthesisDoneMessage,
)
from PathoSynSlicerLib.process import DONE, WorkerRunner  # noqa: E402
from PathARModuleLib.logic import PathARModuleLogic  # noqa: E402
# isort: on

from scripted_models.labels import MODALITIES, SUBREGION_COLORS, SUBREGION_NAMES, check_modality  # noqa: E402

POLL_SECONDS = 0.2
# Between two steps of a result's set-up, and between two held renders (views.RenderHold), the event loop runs freely
# this long. A message (a ping, a mouse event) needs a few loop turns to be read, handled and answered: steps or
# renders that followed each other turn by turn made it wait for three of them (pings of 300-460 ms, 2 cores).
LOOP_BREATH_S = 0.005
SUBREGION_SEGMENTS = [(SUBREGION_NAMES[v], SUBREGION_COLORS[v]) for v in (1, 2, 3)]  # core, edema, enhancing
WHOLE_LESION_SEGMENT = ("lesion", (0.9, 0.3, 0.3))
log = logging.getLogger("pathosyn.web")


IMAGE_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
CONTRAST_WORDS = ("post", "gd", "gad", "contrast", "ce", "c+", "+c")


def guessModality(filename: str) -> str:
    """t1 / t1c / t2 / flair from a file name (BraTS-style suffixes) or a DICOM series description ("AX T1 POST
    GD"); t1 when nothing matches."""
    name = Path(filename).name.lower()
    for stem in IMAGE_FILE_SUFFIXES:
        if name.endswith(stem):
            name = name[: -len(stem)]
            break
    tokens = name.replace("-", "_").replace(".", "_").replace(" ", "_").split("_")
    if any(t in ("t1", "t1w") for t in tokens) and any(t in CONTRAST_WORDS for t in tokens):
        return "t1c"
    for token in reversed(tokens):
        if token in ("t1c", "t1ce", "t1gd", "t1post"):
            return "t1c"
        if token in ("flair", "t2f", "t2flair"):
            return "flair"
        if token in ("t2", "t2w"):
            return "t2"
        if token in ("t1", "t1w", "t1n"):
            return "t1"
    return "t1"


class WebController:
    def __init__(self, scene, state, views=None, appLogic=None, worker=None,
                 runnerFactory: Callable | None = None, createTask: Callable | None = None,
                 flush: Callable | None = None, workDir: str | None = None):
        self.scene = scene
        self.state = state
        self.views = views
        self.logic = PathoSynSlicerLogic(scene=scene)
        self.pathar = PathARModuleLogic(scene=scene, appLogic=appLogic)
        self.worker = worker
        self._runnerFactory = runnerFactory or (lambda argv: WorkerRunner(argv, worker=self.worker))
        self._createTask = createTask or asyncio.ensure_future
        self._flush = flush or contextlib.nullcontext
        self.workDir = workDir
        self.scans: dict = {}  # modality -> volume node
        self.segmentation = None
        self.brainMask = None  # labelmap node: synthesis normalises over it (scans with scalp and skull)
        self.lastResult = None  # SynthesisNodes of the latest synthesis
        self.lastHealthy: dict = {}  # {modality: node} of the latest pseudo-healthy run
        self.patharRun = None
        self.patharLayout = None
        self.lastShowTimings: dict = {}  # {display phase: seconds} of the latest result (log, status, bench)
        self.lastJobTimeline: dict = {}  # {milestone: seconds since the click} of the latest job (log, status, bench)
        self._clickTime = 0.0  # perf_counter of the latest job's click
        self.runner = None
        self.task = None
        self._cancelRequested = False

    # --- errors ------------------------------------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """One clear line in the page."""
        text = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
        self.state.error = text
        self.state.message = ""
        log.info("error shown: %s", text)

    @contextlib.contextmanager
    def reportErrors(self):
        """Input errors (and anything else) become the page's error line; nothing else happens."""
        self.state.error = ""
        try:
            yield
        except (InputError, OSError, ValueError) as exc:
            self.fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the page: show it, log the traceback
            log.exception("unexpected error")
            self.fail(f"{type(exc).__name__}: {exc}")

    # --- inputs ------------------------------------------------------------------------------------------------------
    @property
    def referenceNode(self):
        return next(iter(self.scans.values()), None)

    def _refreshScans(self) -> None:
        self.state.scans = [{"node_id": n.GetID(), "name": n.GetName(), "modality": m} for m, n in self.scans.items()]
        seg = self.segmentation
        self.state.segmentation_name = seg.GetName() if seg is not None and seg.GetScene() is not None else ""
        brain = self._brainMaskNode()
        self.state.brain_mask_name = brain.GetName() if brain is not None else ""

    def _brainMaskNode(self):
        brain = self.brainMask
        return brain if brain is not None and brain.GetScene() is not None else None

    def addScan(self, node, modality: str) -> None:
        """Tag a loaded volume with its modality (one volume per modality: a new one replaces the old tag)."""
        modality = check_modality(modality)
        ref = self.referenceNode
        if ref is not None and ref is not node and node.GetImageData() is not None:
            if tuple(ref.GetImageData().GetDimensions()) != tuple(node.GetImageData().GetDimensions()):
                log.info("%s has another grid than %s: the engine works on the finer one and maps the outputs back "
                         "onto each scan's grid", node.GetName(), ref.GetName())
        self.scans = {m: n for m, n in self.scans.items() if n is not node}
        self.scans[modality] = node
        self._refreshScans()

    def setModality(self, nodeId: str, modality: str) -> None:
        with self.reportErrors():
            node = self.scene.GetNodeByID(nodeId)
            if node is None:
                raise InputError("that scan is no longer loaded")
            modality = check_modality(modality)
            if modality in self.scans and self.scans[modality] is not node:
                raise InputError(f"modality {modality} is already given to '{self.scans[modality].GetName()}'")
            self.addScan(node, modality)

    def loadScanFile(self, path: str, modality: str | None = None):
        """A NIfTI / NRRD scan, or a folder holding one DICOM series, from the server's disk as a new volume node
        (the files are only read)."""
        from scripted_models.volume import dicom_series_description, read_volume

        path = str(path or "").strip()
        if not path:
            raise InputError("enter the path of a NIfTI or NRRD scan, or of a DICOM series folder")
        if not os.path.isfile(path) and not os.path.isdir(path):
            raise InputError(f"no such file: {path}")
        name, described = Path(path).name.split(".")[0], path
        if os.path.isdir(path):  # a DICOM series: its description names it ("AX T2 FLAIR")
            name = described = dicom_series_description(Path(path)) or name
        modality = check_modality(modality or guessModality(described))
        volume = read_volume(path, segmentation=False)
        if volume.array.ndim != 3:
            raise InputError(f"{Path(path).name} is not a 3D scan (shape {volume.array.shape})")
        node = self.logic.addVolumeNode(volume, name)
        first = not self.scans
        self.addScan(node, modality)
        if self.views is not None and first:
            self.views.showScan(node, self.segmentation)
        return node

    def loadUploadedFiles(self, paths: list[str]) -> None:
        """Files a browser uploaded into one folder: a file named like a brain mask (brainmask / brain_mask /
        brain-mask) becomes the brain mask, one named like a mask (mask / seg / label) or a DICOM SEG the lesion
        mask, other image files are scans (tagged by name), and files that are not NIfTI / NRRD (an uploaded DICOM
        folder's slices) are moved into a folder of their own and read as one series."""
        from scripted_models.volume import is_dicom_seg

        images = [p for p in paths if os.path.basename(p).lower().endswith(IMAGE_FILE_SUFFIXES)]
        dicom_segs = [p for p in paths if p not in images and is_dicom_seg(Path(p))]
        slices = [p for p in paths if p not in images and p not in dicom_segs]
        brains = [p for p in images if re.search(r"brain[_-]?mask", os.path.basename(p).lower())]
        masks = [p for p in images if p not in brains
                 and any(k in os.path.basename(p).lower() for k in ("mask", "seg", "label"))] + dicom_segs
        scans = [(p, None) for p in images if p not in masks and p not in brains]
        if slices:
            series = Path(slices[0]).parent / ".dicom_series"
            series.mkdir()
            for p in slices:
                os.replace(p, series / os.path.basename(p))
            scans.append((str(series), None))
        self.loadScanFiles(scans)
        for path in masks:
            self.loadMaskFile(path)
        for path in brains:
            self.loadBrainMaskFile(path)

    def loadScanFiles(self, items: list) -> list:
        """[(path, modality or None)] -> new volume nodes; all or nothing."""
        created = []
        try:
            for path, modality in items:
                created.append(self.loadScanFile(path, modality))
        except BaseException:
            for node in created:
                self.scans = {m: n for m, n in self.scans.items() if n is not node}
                self.scene.RemoveNode(node)
            self._refreshScans()
            raise
        return created

    def loadSample(self):
        """The teaching sample (logic.loadSampleData): MNI152 T1 + the demo lesion (core / edema / enhancing)."""
        t1, seg = self.logic.loadSampleData()
        self.scans = {}
        self.addScan(t1, "t1")
        self.setSegmentation(seg)
        return t1, seg

    def setSegmentation(self, seg) -> None:
        self.segmentation = seg
        self._refreshScans()
        if self.views is not None and self.referenceNode is not None:
            self.views.showScan(self.referenceNode, seg)

    def loadMaskFile(self, path: str):
        """A lesion mask file (canonical, BraTS or binary labels) as a new segmentation on the reference scan."""
        from scripted_models.labels import to_canonical
        from scripted_models.volume import read_volume

        ref = self._requireScan()
        path = str(path or "").strip()
        if not os.path.isfile(path):
            raise InputError(f"no such mask file: {path}" if path else "enter the path of a mask file")
        mask = read_volume(path)
        values = np.unique(mask.array)
        if not np.all(np.isclose(values, np.rint(values))):
            raise InputError(f"{Path(path).name} has non-integer labels: not a lesion mask")
        labels = np.rint(mask.array).astype(np.int64)
        whole = bool(set(np.unique(labels).tolist()) <= {0, 1})
        canonical = labels.astype(np.uint8) if whole else np.asarray(to_canonical(labels), np.uint8)
        if not canonical.any():
            raise InputError(f"the mask {Path(path).name} is empty")
        seg = self.logic.addSegmentationNode(canonical, mask.ijk_to_ras(), Path(path).name.split(".")[0], whole, ref)
        self.setSegmentation(seg)
        return seg

    def loadBrainMaskFile(self, path: str):
        """A brain mask file (non-zero = brain) for a scan with scalp and skull, as a labelmap node (replacing the
        previous one): synthesis then normalises intensities over the brain, the models' own units."""
        from scripted_models.volume import read_volume

        self._requireScan()
        path = str(path or "").strip()
        if not os.path.isfile(path):
            raise InputError(f"no such brain mask file: {path}" if path else "enter the path of a brain mask file")
        brain = read_volume(path)
        if brain.array.ndim != 3 or not np.any(brain.array):
            raise InputError(f"the brain mask {Path(path).name} is empty or not 3D")
        previous = self._brainMaskNode()
        self.brainMask = self.logic.addVolumeNode(brain.with_array((brain.array != 0).astype(np.uint8)),
                                                  Path(path).name.split(".")[0], labelmap=True)
        if previous is not None:
            self.scene.RemoveNode(previous)
        self._refreshScans()
        return self.brainMask

    def newSegmentation(self, wholeLesion: bool = False):
        """An empty segmentation on the reference scan: segments core / edema / enhancing, or one 'lesion'."""
        ref = self._requireScan()
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName("lesion mask"))
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        for name, color in ([WHOLE_LESION_SEGMENT] if wholeLesion else SUBREGION_SEGMENTS):
            seg.GetSegmentation().AddEmptySegment(name, name, list(color))
        self.setSegmentation(seg)
        return seg

    def _requireScan(self):
        if not self.scans:
            raise InputError("no scan loaded: load a scan or the teaching sample first")
        return self.referenceNode

    def voxelCount(self) -> dict:
        """{segment name: voxels} of the current segmentation (painted strokes included)."""
        from PathoSynSlicerLib.logic import _orientedArray

        seg = self.segmentation
        if seg is None:
            return {}
        out = {}
        segmentation = seg.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            rep = segment.GetRepresentation("Binary labelmap")
            out[segment.GetName()] = int((_orientedArray(rep) == segment.GetLabelValue()).sum()) if rep else 0
        return out

    # --- jobs --------------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """From the click until the result is shown (input files, worker start, job, new nodes): a Cancel in
        any of these stops it, a second click is refused."""
        return self.runner is not None

    def effectiveSteps(self) -> int:
        return 2 if self.state.preview else int(self.state.steps)

    def synthesize(self, command: str = "synthesize"):
        """Validate and start a synthesis (or pseudo-healthy) job; returns the task, or None (error shown)."""
        with self.reportErrors():
            if self.running:
                raise InputError("a job is already running: wait for it or cancel it")
            if not self.scans:
                raise InputError("no scan loaded: load a scan or the teaching sample first")
            if self.segmentation is None or self.segmentation.GetScene() is None:
                raise InputError("no lesion mask: paint one (Add segments) or load a mask")
            s = self.state
            seed, samples, steps, guidance = int(s.seed), int(s.samples), self.effectiveSteps(), float(s.guidance)
            if seed < 0:
                raise InputError(f"seed must be an integer >= 0, got {seed}")
            if not 1 <= samples <= 8:
                raise InputError(f"samples must be 1 to 8, got {samples}")
            if not 1 <= steps <= 50:
                raise InputError(f"steps must be 1 to 50, got {steps}")
            if not 0.0 <= guidance <= 10.0:
                raise InputError(f"guidance must be 0 to 10, got {guidance}")
            pull = float(s.population_pull)
            if not 0.0 <= pull <= 1.0:
                raise InputError(f"population pull must be 0 to 1, got {pull}")
            if self.views is not None:
                self.views.stopEditing()
            log.info("synthesis clicked")
            job = self.logic.createJob(dict(self.scans), self.segmentation, seed=seed, samples=samples, steps=steps,
                                       guidance=guidance, command=command, workDir=self.workDir, writeInputs=False,
                                       populationPull=pull, keepBaseTexture=bool(s.keep_base_texture),
                                       brainMaskNode=self._brainMaskNode())
            log.info("job validated")
            return self._start(job, command, self._onSynthesisDone, read=self.logic.readJobOutputs,
                               write=job.writeInputs)
        return None

    def pseudoHealthy(self):
        return self.synthesize("pseudo-healthy")

    def samplePathAR(self):
        """Validate and start a PathAR `sample` job."""
        with self.reportErrors():
            if self.running:
                raise InputError("a job is already running: wait for it or cancel it")
            s = self.state
            job = self.pathar.createJob(list(s.pathar_modalities or []), n=int(s.pathar_n), seed=int(s.pathar_seed),
                                        temperature=float(s.pathar_temperature), workDir=self.workDir,
                                        anatomyFrom=s.pathar_anatomy)
            return self._start(job, "sample", self._onSamplesDone)
        return None

    def _start(self, job, kind: str, onDone: Callable, read: Callable | None = None, write: Callable | None = None):
        s = self.state
        s.running, s.job_kind, s.progress, s.error = True, kind, 0.0, ""
        s.message = "Starting the engine worker..." if self.worker is not None and not self.worker.alive \
            else "Starting..."
        self._cancelRequested = False
        self._clickTime = time.perf_counter()
        self.runner = self._runnerFactory(job.argv)
        self.task = self._createTask(self._run(job, onDone, read, write))
        return self.task

    async def _run(self, job, onDone: Callable, read: Callable | None = None, write: Callable | None = None) -> None:
        """Write the job's input files in a thread (`write`, no scene access), start the job in the worker, stream
        its progress into the page, then load its outputs as new nodes: `read(job)` reads the files in a thread,
        `onDone(job, outputs)` adds the nodes here, in phases (see _showPhases)."""
        loop = asyncio.get_running_loop()
        runner = self.runner
        timeline = {}

        def milestone(name: str) -> None:
            timeline[name] = round(time.perf_counter() - self._clickTime, 3)

        try:
            if write is not None:  # about 0.1-0.5 s of file writing for a 1 mm head: not on the loop
                await loop.run_in_executor(None, write)
                milestone("inputs written")
                log.info("job inputs written")
            if self.worker is not None and not self.worker.alive:  # starting it imports torch: not on the loop
                await loop.run_in_executor(None, self.worker.start)
            if self._cancelRequested:  # cancelled while the inputs were written or the worker started
                with self._flush():
                    self.state.message = "Cancelled: the scene was not changed."
                return
            runner.start()
            milestone("job sent")
            log.info("job started: %s", " ".join(job.argv[:1]))
            while True:
                if self._cancelRequested:
                    await loop.run_in_executor(None, runner.cancel)
                    break
                if not runner.poll():
                    break
                with self._flush():
                    self.state.progress = round(100.0 * runner.fraction, 1)
                    self.state.message = runner.message or "Running..."
                await asyncio.sleep(POLL_SECONDS)
            with self._flush():
                if runner.state == DONE:
                    self.state.message = "Loading the results..."
            milestone("job ended")
            log.info("job ended: %s", runner.state)
            if runner.state == DONE:
                outputs = await loop.run_in_executor(None, read, job) if read is not None else runner.result
                milestone("outputs read")
                await self._showPhases(onDone(job, outputs))
                milestone("scene set up")
            else:
                with self._flush():
                    if runner.state == "cancelled":
                        self.state.message = "Cancelled: the scene was not changed."
                    else:
                        self.fail(runner.error or "the engine worker failed")
        except (InputError, JobError, OSError) as exc:
            with self._flush():
                self.fail(str(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("job failed")
            with self._flush():
                self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            job.cleanup()
            with self._flush():
                self.state.running = False
                self.state.progress = 100.0 if runner.state == DONE else 0.0
            self.runner = None
            self.lastJobTimeline = timeline
            log.info("job timeline (s since the click): %s", timeline)

    async def _showPhases(self, phases) -> None:
        """Run a result's display phases: `phases` is a generator whose every `yield <name>` ends one scene step
        (new nodes, old ones removed, layout, links, overlay). The event loop is given back between them, so that
        pings and other messages are served while a result is set up instead of after it (for LOOP_BREATH_S: a
        message needs a few loop turns). The views' renders are held until the last phase (views.RenderHold): one
        render per view, of the finished scene."""
        timings = {}
        with self.views.renderHold() if self.views is not None else contextlib.nullcontext():
            while True:
                t0, cpu0 = time.perf_counter(), time.thread_time()
                with self._flush():
                    name = next(phases, None)
                if name is None:
                    break
                timings[name] = round(time.perf_counter() - t0, 3)
                timings[f"{name} (cpu)"] = round(time.thread_time() - cpu0, 3)  # less than the wall time: preempted
                await asyncio.sleep(LOOP_BREATH_S)
        log.info("results shown; scene steps (s): %s", timings)
        self.lastShowTimings = timings

    def cancel(self) -> None:
        """Stop the running job (at its next denoising step; the models stay loaded). The scene is not changed."""
        if self.running:
            self._cancelRequested = True
            self.state.message = "Cancelling..."

    def _onSynthesisDone(self, job, outputs: dict):
        """New nodes for the outputs; they replace the previous result in the page (Save keeps a result), so that
        a long session does not pile up volumes in the server's memory. A generator of display phases."""
        result = yield from self.logic.jobOutputSteps(job, outputs)  # a node per step
        self._removePreviousResults()
        yield "previous result removed"
        if job.command == "pseudo-healthy":
            self.lastHealthy = result
            mod = next(iter(result))
            output, residual, uncertainty, seg = result[mod], None, None, self.segmentation
            self.state.message = f"Done: {output.GetName()}"
        else:
            self.lastResult = result
            mod = next(iter(result.volumes))
            output, seg = result.volumes[mod], result.segmentation
            residual, uncertainty = result.residuals.get(mod), result.uncertainty.get(mod)
            self.state.message = synthesisDoneMessage(result.report, [n.GetName() for n in result.volumes.values()])
        self.state.has_result = True
        self.state.progress = 100.0
        if self.views is not None:
            yield from self.views.showCompare(job.prepared.nodes[mod], output, seg, residual, uncertainty,
                                              self.state.overlay)
            self.state.layout = "Compare"
            yield "layout"

    def _removePreviousResults(self) -> None:
        if self.lastResult is not None:
            self.lastResult.removeFromScene()
        removeNodes(self.lastHealthy.values())
        self.lastResult, self.lastHealthy = None, {}

    def _onSamplesDone(self, job, payload):
        """New nodes for the samples, replacing the previous run's. A generator of display phases."""
        if self.patharRun is not None and self.patharRun.isIntact():
            self.patharRun.removeFromScene()  # one run on screen at a time (the views show n samples)
            yield "previous samples removed"
        self.patharRun = self.pathar.loadJobOutputs(job)
        yield "new nodes"
        modality = self.state.pathar_modality if self.state.pathar_modality in job.modalities else job.modalities[0]
        self.state.pathar_modality = modality
        self.state.pathar_has_run = True
        self.state.pathar_sample = 1
        self.state.message = f"{len(self.patharRun.samples)} PathAR samples ({', '.join(job.modalities)})"
        if self.views is not None:
            self.patharLayout = self.views.showPathAR(self.pathar, self.patharRun, modality)
            self.state.layout = "PathAR"
            yield "layout"

    # --- PathAR: modality, use a sample's mask ---------------------------------------------------------------------
    def showPathARModality(self, modality: str) -> None:
        with self.reportErrors():
            if self.patharRun is None or self.patharLayout is None:
                return
            self.pathar.showModality(self.patharRun, self.patharLayout, modality)

    def armPlacement(self) -> None:
        """The next click in the input view places the chosen sample's mask there."""
        with self.reportErrors():
            self._requireScan()
            self._sampleSegmentation()
            self.state.placing = True
            self.state.message = "Click a point in the scan (axial view) to place the lesion"
            if self.views is not None:
                self.views.stopEditing()  # the placing click must not paint
                # the whole scan in view: centring on the current mask could leave the view's middle off the head
                self.views.showScan(self.referenceNode, self.segmentation, centreOnSegmentation=False)
                self.state.layout = "Paint"

    def _sampleSegmentation(self):
        run = self.patharRun
        if run is None or not run.isIntact():
            raise InputError("generate PathAR samples first")
        index = int(self.state.pathar_sample) - 1
        if not 0 <= index < len(run.samples):
            raise InputError(f"choose a sample 1 to {len(run.samples)}")
        return run.samples[index].segmentation

    def placeSampleAt(self, pointRAS) -> None:
        """Put the chosen sample's mask with its centroid at pointRAS of the reference scan (a NEW segmentation, with
        the current mask's lesions too when "add to the current mask" is ticked) and make it the lesion mask for
        Synthesize (PathAR logic placeMask + useMaskInPathoSyn)."""
        with self.reportErrors():
            self.state.placing = False
            ref = self._requireScan()
            modality = next(m for m, n in self.scans.items() if n is ref)
            placed = self.pathar.placeMask(self._sampleSegmentation(), ref, [float(v) for v in pointRAS],
                                           addTo=self.segmentation if self.state.pathar_add else None)
            self.pathar.useMaskInPathoSyn(placed, ref, modality)
            self.setSegmentation(placed)
            warning = self.pathar.lastPlacement.get("warning")
            self.state.message = f"Placed '{placed.GetName()}'" + (f" ({warning})" if warning else "")

    # --- overlays ----------------------------------------------------------------------------------------------------
    def setOverlay(self, kind: str) -> None:
        if self.views is None or self.lastResult is None:
            return
        mod = next(iter(self.lastResult.volumes))
        node = {"residual": self.lastResult.residuals.get(mod),
                "uncertainty": self.lastResult.uncertainty.get(mod)}.get(kind)
        if kind == "uncertainty" and node is None:
            self.state.error = "no uncertainty map: run with samples > 1"
        self.views.setOverlay(node)

    # --- save --------------------------------------------------------------------------------------------------------
    def save(self, folder: str, mrb: bool = False) -> list:
        """The latest results (synthesized volumes, residuals, uncertainty, mask; pseudo-healthy volumes) as NIfTI
        files in `folder`, each written atomically (engine writer: temp file + rename); with mrb, also the scene."""
        from scripted_models.volume import working_grid, write_volume

        folder = str(folder or "").strip()
        if not folder:
            raise InputError("enter the folder to save into")
        if self.lastResult is None and not self.lastHealthy:
            raise InputError("nothing to save yet: synthesize a lesion first")
        out = Path(folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        written = []

        def write(node, name):
            written.append(write_volume(self.logic.volumeFromNode(node), out / f"{name}.nii.gz"))

        result = self.lastResult
        if result is not None:
            volumes = {mod: self.logic.volumeFromNode(node) for mod, node in result.volumes.items()}
            for mod, volume in volumes.items():
                written.append(write_volume(volume, out / f"{mod}.nii.gz"))
            for mod, node in result.residuals.items():
                write(node, f"residual_{mod}")
            for mod, node in result.uncertainty.items():
                write(node, f"uncertainty_{mod}")
            # the mask on the engine's grid (the finest scan's), not a thicker-slice scan's
            mask, _ = self.logic.maskFromNode(result.segmentation, result.volumes[working_grid(volumes)])
            written.append(write_volume(mask, out / "mask.nii.gz"))
        for mod, node in self.lastHealthy.items():
            write(node, f"pseudo_healthy_{mod}")
        if mrb:
            written.append(self.saveScene(out / "scene.mrb"))
        return [Path(p) for p in written]

    def saveScene(self, path: Path) -> Path:
        """The whole scene as a Slicer .mrb, written to a temp name in the same folder and renamed."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".scene-", suffix=".mrb", dir=path.parent)
        os.close(fd)
        bundle = tempfile.mkdtemp(prefix="pathosyn-mrb-")
        try:
            self.scene.SetRootDirectory(bundle)
            self.scene.SetURL(os.path.join(bundle, "scene.mrml"))
            if not self.scene.WriteToMRB(tmp):
                raise OSError(f"could not write the scene to {path}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
            shutil.rmtree(bundle, ignore_errors=True)
        return path

    def saveClicked(self, folder: str | None = None, mrb: bool | None = None) -> None:
        with self.reportErrors():
            folder = self.state.save_folder if folder is None else folder
            written = self.save(folder, bool(self.state.save_mrb if mrb is None else mrb))
            self.state.message = f"Saved {len(written)} files to {Path(folder).expanduser()}"


__all__ = ["MODALITIES", "WebController", "guessModality"]
