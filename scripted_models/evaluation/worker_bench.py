"""Click-to-result through the warm engine worker, as a front end sees it (prints the measured numbers).

A "click" is what the Slicer modules and the browser front end do: write the input volumes to the job hand-over
folder (RAM-backed /dev/shm where available, as the front ends do), send the job with --crop-outputs, wait for
"done", read the result boxes back and paste them into whole volumes. Workload: the MNI152 T1 with a lesion whose ROI
is 64^3 voxels.
- cold: the first click, including starting the worker process and loading the models;
- warm: every later click (default steps), and the preview (the model's preview steps);
- memory: the worker's resident memory after 10 and after N consecutive jobs (32^3 ROI previews);
- PathAR: a "Generate samples" click, the Slicer panel's default (4 samples in t1c and flair) and one sample in all four
  modalities: the job, then reading every sample's files back, as the modules do.

    python -m scripted_models.evaluation.worker_bench [--warm 9] [--jobs 200] [--pathar-runs 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20


def run_worker_bench(warm: int = 9, jobs: int = 200, threads: int = 2, pathar_runs: int = 5) -> dict:
    from ..labels import MODALITIES
    from ..pathosyn.deviation import DeviationConfig
    from ..runtime import bf16_supported
    from ..templates import mni_t1
    from ..volume import read_volume, write_volume
    from ..worker import EngineWorker, handover_directory
    from .bench import _lesion, radius_for_roi

    t1 = mni_t1()
    preview_steps = DeviationConfig().preview_steps
    import torch

    handover = handover_directory()
    rows = {"threads": threads, "warm_runs": warm, "memory_jobs": jobs, "handover_dir": handover or "system temp",
            "bf16": bf16_supported(torch.device("cpu"))}
    with tempfile.TemporaryDirectory(dir=handover) as tmp:
        tmp = Path(tmp)
        masks = {side: _lesion(t1, radius_for_roi(side)) for side in (32, 64)}
        counter = [0]

        def click(worker: EngineWorker, side: int = 64, steps=None) -> float:
            counter[0] += 1
            job = tmp / f"job{counter[0]}"
            t = time.perf_counter()
            image = write_volume(t1, job / "in" / "t1.nii")
            mask = write_volume(masks[side], job / "in" / "mask.nii")
            outputs = worker.run("synthesize", {"images": {"t1": str(image)}, "mask": str(mask),
                                                "out": str(job / "out"), "steps": steps, "format": "nii",
                                                "crop_outputs": True})
            box = json.loads((job / "out" / "report.json").read_text())["outputs_box_zyx"]
            box = tuple(slice(a, b) for a, b in box)
            for name, path in outputs.items():  # pasted into the input (images) or zeros, as the modules do
                if str(path).endswith(".nii"):
                    full = t1.array.copy() if name == "t1" else np.zeros(t1.shape, np.float32)
                    full[box] = read_volume(path).array
            seconds = time.perf_counter() - t
            shutil.rmtree(job)  # keep the temp folder small over many jobs
            return seconds

        def sample_click(worker: EngineWorker, modalities: list[str], n: int, seed: int = 100) -> float:
            counter[0] += 1
            job = tmp / f"job{counter[0]}"
            t = time.perf_counter()
            outputs = worker.run("sample", {"modalities": modalities, "n": n, "seed": seed, "out": str(job)})
            for folder in outputs["samples"]:  # read back as PathARModuleLogic.loadJobOutputs does
                for name in ["mask", *modalities]:
                    read_volume(Path(folder) / f"{name}.nii.gz")
            seconds = time.perf_counter() - t
            shutil.rmtree(job)
            return seconds

        t = time.perf_counter()
        worker = EngineWorker(threads=threads)
        try:
            worker.start()
            click(worker)
            rows["cold_first_click_s"] = round(time.perf_counter() - t, 3)
            default, preview = [], []
            for _ in range(warm):  # interleaved, so a slow spell of a shared host hits both alike
                default.append(click(worker))
                preview.append(click(worker, steps=preview_steps))
            for name, times in (("warm_click", default), ("preview_click", preview)):
                rows[name] = {"p50_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                              "max_s": round(max(times), 3), "n": len(times)}
            rows["ping_s"] = round(worker.ping(), 4)
            for name, modalities, n in (("pathar_default_click", ["t1c", "flair"], 4),
                                        ("pathar_4_modalities_click", list(MODALITIES), 1)):
                sample_click(worker, modalities, n)  # loads the PathAR models (not a warm click)
                times = [sample_click(worker, modalities, n, seed) for seed in range(pathar_runs)]
                rows[name] = {"p50_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                              "max_s": round(max(times), 3), "n": len(times), "samples": n,
                              "modalities": modalities}
            rss = {}
            for k in range(1, jobs + 1):
                click(worker, side=32, steps=preview_steps)
                if k in (10, jobs):
                    rss[k] = round(rss_mb(worker.proc.pid), 1)
            rows["rss_mb_after_jobs"] = rss
            rows["rss_growth_10_to_n"] = round(rss[jobs] / rss[10] - 1.0, 4) if 10 in rss else None
            rows["worker_starts"] = worker.starts
            rows["allocator"] = worker.allocator
        finally:
            worker.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm", type=int, default=9)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pathar-runs", type=int, default=5, help="PathAR clicks of each kind (after one that loads)")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    rows = run_worker_bench(args.warm, args.jobs, args.threads, args.pathar_runs)
    print(json.dumps(rows, indent=1))
    if args.out:
        from ..pathosyn.commands import write_json_atomic

        write_json_atomic(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
