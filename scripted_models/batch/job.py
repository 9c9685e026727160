"""One batch job: read inputs, synthesize, write OUT/<case_id>/ like `pathosyn synthesize`, then done.json last.

Crash safety: every output is written atomically (temp file + rename) and done.json, which records the sha256 of
every output, is written last. A job folder without a valid done.json (or whose files no longer match it) is
unfinished and is redone by --resume. log.jsonl is append-only: one JSON object per line.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InputError, WeightsError
from ..outputs import DONE, outputs_record
from ..outputs import verify_done as verify_outputs
from .manifest import Job

LOG = "log.jsonl"
MIN_INSIDE = 0.90  # PathAR placement: fraction of the lesion that must lie inside the brain
PLACEMENT_TRIES = 200
SCALP_AND_SKULL_MM = 12.0  # raw scans (air is noise): the brain starts at least this far inside the head


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JobLog:
    """Append-only JSON lines in OUT/<case_id>/log.jsonl (readers skip a torn last line)."""

    def __init__(self, path: Path, job: Job, run_id: str):
        self.path, self.base = path, {"case_id": job.case_id, "run": run_id, "pid": os.getpid(),
                                      "host": socket.gethostname()}
        self.last_message = None

    def __call__(self, event: str, **payload) -> None:
        record = {"time": _now(), "event": event, **self.base, **payload}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def progress(self, fraction: float, message: str) -> None:
        if message != self.last_message:  # one line per stage / denoising step
            self.last_message = message
            self("progress", fraction=round(float(fraction), 4), message=message)


def read_log(path: Path) -> list[dict]:
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def verify_done(job_dir: Path, job: Job) -> dict | None:
    """The done-marker if the job finished with the same inputs and every output still matches its checksum."""
    return verify_outputs(job_dir, job.fingerprint)


def result_row(job: Job, status: str, done: dict | None = None, out: Path | None = None, seconds=None,
               error: str = "") -> dict:
    """A results.csv row (strings) plus 'dir' and 'files' (name -> absolute path) for Python callers."""
    outputs = (done or {}).get("outputs", {})
    if seconds is None and done:
        seconds = done.get("seconds")
    row = {
        "case_id": job.case_id,
        "status": status,
        "seconds": "" if seconds is None else f"{float(seconds):.2f}",
        "outputs": ";".join(f"{job.case_id}/{e['file']}" for e in outputs.values()),
        "sha256": ";".join(e["sha256"] for e in outputs.values()),
        "error": error,
    }
    if out is not None:
        job_dir = Path(out) / job.case_id
        row["dir"] = str(job_dir)
        row["files"] = {name: str(job_dir / e["file"]) for name, e in outputs.items()}
    return row


def _brain_voxel_centres(reference, brain_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """The brain (a given brain mask; else the foreground of a skull-stripped scan, or of a raw scan, whose
    foreground is the whole head, the voxels at least SCALP_AND_SKULL_MM inside it) and its voxels (N, 3) in
    (z, y, x)."""
    from ..pathosyn.api import brain_on_grid
    from ..preprocess import erode_mm, foreground_mask, has_constant_background

    if brain_mask is not None:
        fg = brain_on_grid(brain_mask, reference)
    else:
        fg = foreground_mask(reference.array)
        if fg.any() and not has_constant_background(reference.array):
            fg = erode_mm(fg, SCALP_AND_SKULL_MM, tuple(reversed(reference.spacing)))
    if not fg.any():
        raise InputError("the first image has no foreground (brain) voxels to place a PathAR lesion in")
    return fg, np.argwhere(fg)  # (N, 3) in (z, y, x)


def place_mask(lesion, reference, seed: int, min_inside: float = MIN_INSIDE, tries: int = PLACEMENT_TRIES,
               brain_mask=None):
    """Move `lesion` (any grid) so its centroid sits on a random brain voxel of `reference` (seeded), and
    resample it onto the reference grid (nearest neighbour). Placements with less than `min_inside` of the
    lesion inside the brain (`brain_mask`, else the scan's foreground) are rejected. Returns (mask Volume on the
    reference grid, info dict)."""
    from ..placement import lesion_points_lps, place_lesion

    if not np.any(np.asarray(lesion.array) > 0):
        raise InputError("the PathAR sample has an empty lesion mask")
    lps = lesion_points_lps(lesion)
    centroid = lps.mean(axis=1, keepdims=True)
    fg, brain = _brain_voxel_centres(reference, brain_mask)
    ref_from_lps = np.linalg.inv(reference.ijk_to_lps())
    ref_to_lps = reference.ijk_to_lps()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9A7A]))
    shape = np.array(reference.shape)[::-1, None]  # i, j, k sizes
    best = 0.0
    for attempt in range(1, tries + 1):
        z, y, x = brain[rng.integers(len(brain))]
        target = (ref_to_lps @ np.array([x, y, z, 1.0]))[:3, None]
        moved = lps - centroid + target
        idx = np.rint((ref_from_lps @ np.r_[moved, np.ones((1, moved.shape[1]))])[:3]).astype(np.int64)
        in_fov = np.all((idx >= 0) & (idx < shape), axis=0)
        inside = np.zeros(moved.shape[1], bool)
        inside[in_fov] = fg[idx[2, in_fov], idx[1, in_fov], idx[0, in_fov]]
        fraction = float(inside.mean())
        best = max(best, fraction)
        if fraction >= min_inside:
            try:
                mask, _ = place_lesion(lesion, reference, target.ravel())
            except InputError:
                continue
            placed = mask.array > 0
            # judge on the target grid: resampling can move the fraction across the threshold
            fraction = float((fg & placed).sum() / placed.sum())
            best = max(best, fraction)
            if fraction >= min_inside:
                centre_ras = (reference.ijk_to_ras() @ np.array([x, y, z, 1.0]))[:3]
                return mask, {"centre_ijk": [int(x), int(y), int(z)], "centre_ras": [round(float(c), 2)
                                                                                    for c in centre_ras],
                              "inside_fraction": round(fraction, 4), "attempts": attempt}
    raise InputError(f"could not place the PathAR lesion inside the brain: best placement had "
                     f"{100 * best:.0f}% of the lesion inside (need {100 * min_inside:.0f}%) after {tries} tries")


def pathar_mask(job: Job, reference, device: str, brain_mask=None):
    """Draw one PathAR lesion (seeded by the row seed) and place it inside the brain of `reference`."""
    import importlib

    try:
        sample_pairs = importlib.import_module("scripted_models.pathar.api").sample_pairs
    except ImportError as exc:
        raise InputError(f"line {job.line} ({job.case_id}): mask 'pathar' needs the PathAR engine "
                         f"(scripted_models.pathar.api cannot be imported: {exc})") from None
    modality = next(iter(job.images))
    pair = sample_pairs([modality], n=1, seed=job.seed, device=device)[0]
    return place_mask(pair.mask, reference, job.seed, brain_mask=brain_mask)


def _clean(job_dir: Path) -> None:
    """Forget a previous attempt: done-marker first, then stale outputs and temp files of killed writes."""
    (job_dir / DONE).unlink(missing_ok=True)
    for path in job_dir.iterdir():
        if path.is_file() and (path.name.startswith(".") or path.name.endswith(".nii.gz")
                               or path.name == "report.json"):
            path.unlink(missing_ok=True)


def run_job(job: Job, out: str | Path, device: str = "auto", run_id: str = "", guidance: float = 1.0) -> dict:
    """Run one job and return its results row. User errors (InputError, WeightsError) give a 'failed' row;
    anything else propagates (so Dask can retry on another worker)."""
    from ..pathosyn.api import synthesize_lesion
    from ..pathosyn.commands import write_json_atomic, write_synthesis
    from ..volume import read_volume, working_grid

    out = Path(out)
    job_dir = out / job.case_id
    previous = verify_done(job_dir, job)
    if previous is not None and run_id and previous.get("run") == run_id:
        return result_row(job, "done", previous, out)  # a retried task whose first attempt had finished
    job_dir.mkdir(parents=True, exist_ok=True)
    _clean(job_dir)
    log = JobLog(job_dir / LOG, job, run_id)
    log("start", line=job.line, seed=job.seed, samples=job.samples, steps=job.steps, mask=job.mask,
        images=job.images, brain_mask=job.brain_mask)
    t0 = time.perf_counter()
    try:
        images = {m: read_volume(p, segmentation=False) for m, p in job.images.items()}
        brain = read_volume(job.brain_mask) if job.brain_mask else None
        placement = None
        if job.uses_pathar:
            log.progress(0.0, "sampling a PathAR lesion")
            mask, placement = pathar_mask(job, images[working_grid(images)], device, brain)  # the finest scan
            log("placed", **placement)
        else:
            mask = read_volume(job.mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings are recorded in report.json
            result = synthesize_lesion(images, mask, seed=job.seed, samples=job.samples, steps=job.steps,
                                       guidance=guidance, device=device, progress=log.progress, brain_mask=brain)
        if placement:
            result.report["pathar_placement"] = placement
        result.report["batch"] = {"case_id": job.case_id, "line": job.line, "run": run_id}
        files = {name: Path(p).name for name, p in write_synthesis(result, job_dir).items()}
        files["report"] = "report.json"
        outputs = outputs_record(job_dir, files)
        seconds = time.perf_counter() - t0
        done = {"case_id": job.case_id, "line": job.line, "fingerprint": job.fingerprint, "run": run_id,
                "seconds": round(seconds, 3), "finished": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                "outputs": outputs}
        write_json_atomic(done, job_dir / DONE)  # the done-marker: last
        log("done", seconds=round(seconds, 3), outputs={k: v["sha256"] for k, v in outputs.items()})
        return result_row(job, "done", done, out)
    except (InputError, WeightsError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log("error", message=message, seconds=round(time.perf_counter() - t0, 3))
        return result_row(job, "failed", None, out, seconds=time.perf_counter() - t0, error=message)
    except BaseException as exc:
        log("error", message=f"{type(exc).__name__}: {exc}"[:500], seconds=round(time.perf_counter() - t0, 3))
        raise

