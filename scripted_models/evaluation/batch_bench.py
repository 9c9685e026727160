"""Batch throughput: jobs per minute for 1 vs 2 local worker processes and a 2-worker Dask LocalCluster.

    python -m scripted_models.evaluation.batch_bench --jobs 8            # MNI152-sized inputs, default steps
    python -m scripted_models.evaluation.batch_bench --jobs 2 --steps 1  # a quick check that it works

Every mode runs the same manifest (MNI152 T1 + the built-in demo lesion, seeds 0..N-1) from a cold start, so the
wall time includes starting the worker processes and loading the models once per worker (the Dask cluster's own
start-up is timed separately). Outputs are compared by sha256 and must be identical bit for bit across all modes,
although local1 runs one worker with 2 torch threads and the others 2 workers with 1 thread each (the engine pins
its convolutions to oneDNN, whose results do not depend on the thread count).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = ("local1", "local2", "dask2")


def prepare(work: Path, jobs: int, steps: int | None) -> Path:
    from ..templates import demo_lesion, mni_t1
    from ..volume import write_volume

    data = work / "data"
    t1 = write_volume(mni_t1(), data / "mni152_t1.nii.gz")
    mask = write_volume(demo_lesion(), data / "demo_lesion.nii.gz")
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "mask", "seed", "t1", "t1c", "t2", "flair", "samples", "steps"])
        for i in range(jobs):
            writer.writerow([f"mni{i:03d}", mask.relative_to(work), i, t1.relative_to(work), "", "", "", 1,
                             steps or ""])
    return manifest


def checksums(out: Path) -> dict:
    sums = {}
    for done in sorted(out.glob("*/done.json")):
        outputs = json.loads(done.read_text())["outputs"]
        sums[done.parent.name] = {k: v["sha256"] for k, v in outputs.items() if k != "report"}
    return sums


def max_abs_difference(a: Path, b: Path) -> float:
    """Largest voxel difference between the synthesized images of two output folders."""
    import numpy as np

    from ..volume import read_volume

    worst = 0.0
    for image in sorted(a.glob("*/t1.nii.gz")):
        other = b / image.parent.name / image.name
        worst = max(worst, float(np.abs(read_volume(image).array.astype(np.float64)
                                        - read_volume(other).array.astype(np.float64)).max()))
    return worst


def run_mode(mode: str, manifest: Path, out: Path, device: str) -> dict:
    from ..batch.runner import run_batch

    started = 0.0
    if mode.startswith("dask"):
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=int(mode[4:]), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        started = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            rows = run_batch(manifest, out, scheduler=client, device=device)
            wall = time.perf_counter() - t0
        finally:
            client.close()
            cluster.close()
    else:
        t0 = time.perf_counter()
        rows = run_batch(manifest, out, workers=int(mode[5:]), device=device)
        wall = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise SystemExit(f"{mode}: {len(failed)} job(s) failed, first: {failed[0]['error']}")
    job_seconds = [float(r["seconds"]) for r in rows]
    return {"mode": mode, "jobs": len(rows), "wall_s": round(wall, 2), "jobs_per_min": round(60 * len(rows) / wall, 2),
            "job_s_median": round(statistics.median(job_seconds), 2), "cluster_start_s": round(started, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripted_models.evaluation.batch_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model card's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="keep inputs and outputs here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.jobs < 1:
        parser.error(f"unknown mode(s) {unknown}" if unknown else "--jobs must be >= 1")
    from ..batch.runner import cpu_cores

    with tempfile.TemporaryDirectory(prefix="pathosyn_batch_bench_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest = prepare(work, args.jobs, args.steps)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"batch bench: {args.jobs} jobs, MNI152 T1 197x233x189 + demo lesion, steps={args.steps or 'default'}, "
              f"{cpu_cores()} cores, load average {load:.1f} before start", file=sys.stderr)
        results = []
        for mode in modes:
            results.append(run_mode(mode, manifest, work / f"out_{mode}", args.device))
            r = results[-1]
            print(f"  {mode:7s} {r['jobs_per_min']:7.2f} jobs/min  (wall {r['wall_s']:.1f} s, median job "
                  f"{r['job_s_median']:.1f} s" + (f", cluster start {r['cluster_start_s']:.1f} s" if
                                                   r["cluster_start_s"] else "") + ")", flush=True)
        sums = {m: checksums(work / f"out_{m}") for m in modes}
        identical = all(sums[m] == sums[modes[0]] for m in modes)
        print(f"  outputs identical across {', '.join(modes)}: {'yes' if identical else 'NO'}", flush=True)
        summary = {"jobs": args.jobs, "steps": args.steps, "cores": cpu_cores(), "load_before": round(load, 2),
                   "results": results, "identical": identical, "compared": list(modes)}
        if not identical:
            summary["max_abs_difference"] = {m: max_abs_difference(work / f"out_{modes[0]}", work / f"out_{m}")
                                             for m in modes[1:]}
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
