"""`pathosyn bench`: latency and memory of `synthesize`, measured and printed (median and spread).

Workloads use the MNI152 T1 with spherical lesions sized so the dilated ROI has a given side.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np


def thick_slices(volume, factor: int = 3):
    """The scan as a thicker-slice acquisition of it: each new slice the mean of `factor` slices along k (extra
    slices at the end dropped), at the physical place they span; same dtype."""
    k, j, i = volume.shape
    k -= k % factor
    array = volume.array[:k].reshape(k // factor, factor, j, i).mean(axis=1)
    if volume.array.dtype.kind in "iu":
        array = array.round()
    origin = volume.ijk_to_lps() @ np.array([0.0, 0.0, (factor - 1) / 2.0, 1.0])
    spacing = (volume.spacing[0], volume.spacing[1], volume.spacing[2] * factor)
    return type(volume)(array.astype(volume.array.dtype), spacing, tuple(origin[:3]), volume.direction)


def _lesion(reference, radius_mm: float, centre_ras=(24.0, -10.0, 20.0)):
    from ..labels import CORE, EDEMA, ENHANCING

    ras_to_ijk = np.linalg.inv(reference.ijk_to_ras())
    i, j, k = (ras_to_ijk @ np.array([*centre_ras, 1.0]))[:3]
    zz, yy, xx = np.ogrid[: reference.shape[0], : reference.shape[1], : reference.shape[2]]
    sz, sy, sx = reversed(reference.spacing)
    d = np.sqrt(((zz - k) * sz) ** 2 + ((yy - j) * sy) ** 2 + ((xx - i) * sx) ** 2)
    labels = np.zeros(reference.shape, np.uint8)
    labels[d < radius_mm] = EDEMA
    labels[d < 0.6 * radius_mm] = ENHANCING
    labels[d < 0.35 * radius_mm] = CORE
    return reference.with_array(labels)


def radius_for_roi(side: int, margin_mm: float = 6.0) -> float:
    """Sphere radius whose dilated bounding box is about side^3 voxels at 1 mm."""
    return (side - 2 * margin_mm) / 2.0 - 0.5


def _time(fn, repeats: int):
    times = []
    result = None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times, result


def _stats(times):
    return {"p50_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "n": len(times)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bench(repeats: int = 5, quick: bool = False, roi_sides=(32, 48, 64, 80, 96), steps_list=(2, 5, 10, 20),
              naive: bool = True, out: Path | None = None, device: str = "auto") -> dict:
    import torch

    from ..pathosyn.api import _model, synthesize_lesion
    from ..runtime import native_cpu_bf16, pick_device
    from ..templates import mni_t1
    from ..worker import loaded_allocator

    t1 = mni_t1()
    if quick:
        repeats, roi_sides, steps_list = 2, (32, 64), (3,)
    rows = {"threads": torch.get_num_threads(), "device": device, "torch": torch.__version__,
            "native_cpu_bf16": native_cpu_bf16(),  # bf16 autocast on the CPU (1.7-4x faster U-Net steps) or float32
            "cpu": platform.processor() or platform.machine(), "repeats": repeats, "allocator": loaded_allocator()}
    t = time.perf_counter()
    mask64 = _lesion(t1, radius_for_roi(64))
    synthesize_lesion({"t1": t1}, mask64, steps=1, device=device)  # warm-up: model load, allocator
    rows["first_call_s"] = round(time.perf_counter() - t, 3)

    def synth(mask, steps=None, vol=t1):
        return synthesize_lesion({"t1": vol}, mask, seed=0, steps=steps, device=device)

    # 1. headline: 64^3 ROI, default and preview steps, interleaved so that a slow spell of a shared host hits
    #    both alike; at least 9 repeats for a stable median
    preview_steps = _model("deviation", pick_device(device)).cfg.preview_steps  # loaded by the warm-up
    settings = {"roi64_default": None, "roi64_preview": preview_steps}
    headline, reports = {key: [] for key in settings}, {}
    for _ in range(repeats if quick else max(repeats, 9)):
        for key, steps in settings.items():
            times, res = _time(lambda steps=steps: synth(mask64, steps), 1)
            headline[key] += times
            reports[key] = res.report
    for key, times in headline.items():
        rows[key] = {**_stats(times), "steps": reports[key]["steps"], "roi": reports[key]["roi_size_zyx"]}

    # 2. same lesion in a volume twice as large (padded along z)
    from ..volume import Volume

    big = Volume(np.concatenate([t1.array, np.zeros_like(t1.array)], axis=0), t1.spacing, t1.origin, t1.direction)
    big_mask = big.with_array(np.concatenate([mask64.array, np.zeros_like(mask64.array)], axis=0))
    times_big, _ = _time(lambda: synth(big_mask, vol=big), repeats)
    rows["roi64_double_volume"] = {**_stats(times_big), "voxels": int(big.array.size), "ratio_vs_single":
                                   round(statistics.median(times_big) / rows["roi64_default"]["p50_s"], 3)}

    # 2b. a second modality on its own grid (3 mm slices: resampled for the engine, outputs mapped back) vs on the
    #     same grid, interleaved
    flair = {"same grid": t1, "3 mm slices": thick_slices(t1, 3)}
    two = {key: [] for key in flair}
    for _ in range(repeats):
        for key, vol in flair.items():
            two[key] += _time(lambda vol=vol: synthesize_lesion({"t1": t1, "flair": vol}, mask64, seed=0,
                                                                device=device), 1)[0]
    rows["roi64_second_modality"] = {key: _stats(times) for key, times in two.items()}
    rows["roi64_second_modality"]["ratio_own_grid_vs_same"] = round(
        statistics.median(two["3 mm slices"]) / statistics.median(two["same grid"]), 3)

    # 3. latency vs ROI side (default steps) and vs steps (64^3)
    rows["vs_roi"] = []
    for side in roi_sides:
        mask = _lesion(t1, radius_for_roi(side))
        times, res = _time(lambda mask=mask: synth(mask), max(1, repeats // 2 + 1))
        rows["vs_roi"].append({"side": side, "roi": res.report["roi_size_zyx"], "roi_voxels": res.report["roi_voxels"],
                               **_stats(times)})
    rows["vs_steps"] = []
    for steps in steps_list:
        times, _ = _time(lambda steps=steps: synth(mask64, steps), max(1, repeats // 2 + 1))
        rows["vs_steps"].append({"steps": steps, **_stats(times)})

    # this process's peak so far, dominated by the 96^3 ROI and the double volume (the 64^3 workload's own peak is
    # cli_end_to_end.peak_rss_mb, measured in a fresh process)
    rows["peak_rss_mb_synthesize"] = round(peak_rss_mb(), 1)

    # 3b. lesion removal (pseudo_healthy, t1), with the card's deep-fill smoothing and without it
    from ..pathosyn.api import pseudo_healthy

    pseudo_healthy({"t1": t1}, mask64, device=device)  # warm-up: the anatomy model's load
    rows["pseudo_healthy"] = []
    for side in (64,) if quick else (64, 96):
        mask = mask64 if side == 64 else _lesion(t1, radius_for_roi(side))
        for smooth in (True, False):
            times, _ = _time(lambda mask=mask, smooth=smooth: pseudo_healthy({"t1": t1}, mask, device=device,
                                                                               smooth_deep_fill=smooth),
                             max(1, repeats // 2 + 1))
            rows["pseudo_healthy"].append({"side": side, "lesion_voxels": int((mask.array > 0).sum()),
                                           "smooth_deep_fill": smooth, **_stats(times)})

    # 4. PathAR: one sample (structure + 4 modalities)
    from ..labels import MODALITIES
    from ..pathar.api import sample_pairs

    sample_pairs(list(MODALITIES), 1, seed=0, device=device)  # warm-up: model load
    times, _ = _time(lambda: sample_pairs(list(MODALITIES), 1, seed=1, device=device), max(1, repeats // 2 + 1))
    rows["pathar_sample_4mod"] = _stats(times)

    # 5. import overhead and the end-to-end CLI (fresh process: imports, model load, I/O, synthesis)
    rows["import_s"] = _subprocess_seconds(["-c", "import scripted_models.pathosyn.api"])
    rows["cli_end_to_end"] = _cli_seconds(t1, mask64)

    # 6. naive whole-volume diffusion: one U-Net step on the whole volume vs one on the 64^3 ROI
    if naive and not quick:
        rows["naive_whole_volume"] = _naive_ratio(t1, device)

    # 7. model size vs latency: what a larger deviation U-Net would cost per click (64^3, default steps)
    rows["vs_model_size"] = _model_size_tradeoff(device, rows["roi64_default"]["p50_s"], quick)
    rows["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if out:
        from ..pathosyn.commands import write_json_atomic
        from .plots import bench_plot

        write_json_atomic(rows, Path(out))
        bench_plot(rows, Path(out).with_suffix(".png"))
    return rows


def _subprocess_seconds(args: list[str]) -> float:
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return round(time.perf_counter() - t, 3)


def _cli_seconds(t1, mask) -> dict:
    import tempfile

    from ..volume import write_volume

    with tempfile.TemporaryDirectory(prefix="pathosyn-bench-") as tmp:
        image = write_volume(t1, Path(tmp) / "t1.nii.gz")
        lesion = write_volume(mask, Path(tmp) / "mask.nii.gz")
        argv = ["synthesize", "--image", f"t1={image}", "--mask", str(lesion), "--out", str(Path(tmp) / "out"),
                "--progress", "none"]
        seconds, peak_mb = _cli_run(argv)
    return {"default_steps_s": seconds, "peak_rss_mb": peak_mb,
            "note": "fresh process on the 64^3 workload: imports + weights + NIfTI I/O + synthesis"}


_PEAK_CODE = """
import json, resource, sys
from scripted_models.cli import main
rc = main(sys.argv[1:])
peak = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024.0
except OSError:
    pass
print(json.dumps({"rc": rc, "peak_mb": peak if peak is not None else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}), file=sys.stderr)
"""


def _cli_run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one fresh CLI process. The peak is read inside it (VmHWM starts afresh
    at exec; the rusage high-water mark of a child would include this large parent's)."""
    import subprocess
    import sys

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_CODE, *argv], check=True, capture_output=True, text=True)
    seconds = round(time.perf_counter() - t, 3)
    return seconds, round(float(json.loads(proc.stderr.strip().splitlines()[-1])["peak_mb"]), 1)


def _naive_ratio(t1, device: str) -> dict:
    import torch

    from ..pathosyn.api import _model
    from ..runtime import autocast, pick_device

    dev = pick_device(device)
    model = _model("deviation", dev)
    cfg = model.cfg
    shape = tuple(int(np.ceil(s / cfg.multiple) * cfg.multiple) for s in t1.shape)
    channels = cfg.out_channels + cfg.cond_channels
    out = {}
    for name, grid in (("roi64", (64, 64, 64)), ("whole_volume", shape)):
        x = torch.zeros((1, channels) + grid)
        with torch.no_grad(), autocast(dev):
            t = time.perf_counter()
            model.net(x, timesteps=torch.tensor([500]))
            out[f"{name}_step_s"] = round(time.perf_counter() - t, 3)
    out["whole_volume_grid"] = list(shape)
    out["ratio"] = round(out["whole_volume_step_s"] / out["roi64_step_s"], 1)
    return out


MODEL_SIZES = {  # name: DeviationConfig overrides; "bundled" is the shipped configuration
    "bundled": {},
    "wider x1.5": {"channels": (24, 48, 96, 96)},
    "wider x2": {"channels": (32, 64, 128, 128)},
    "2 res blocks": {"num_res_blocks": 2},
    "attention at 1/8": {"attention_levels": (False, False, False, True)},
}


def _model_size_tradeoff(device: str, click_p50_s: float, quick: bool) -> dict:
    """Per variant: parameters and the seconds of one denoising step on the 64^3 ROI (untrained weights of the same
    architecture: the time does not depend on the values), and the click this implies: the measured default click
    with the bundled network's steps swapped for the variant's."""
    import dataclasses

    import torch

    from ..pathosyn.api import _model
    from ..pathosyn.deviation import build_deviation_model
    from ..runtime import autocast, pick_device, pin_cpu_inference

    dev = pick_device(device)
    bundled = _model("deviation", dev).cfg
    x = torch.zeros((1, bundled.out_channels + bundled.cond_channels, 64, 64, 64), device=dev)
    step = torch.tensor([500], device=dev)
    nets = {name: pin_cpu_inference(build_deviation_model(dataclasses.replace(bundled, **overrides)).eval().to(dev),
                                    channels_last=True)
            for name, overrides in MODEL_SIZES.items() if not quick or name in ("bundled", "wider x1.5")}
    times = {name: [] for name in nets}
    with torch.no_grad(), autocast(dev):
        for net in nets.values():
            net(x, timesteps=step)  # warm-up
        for _ in range(1 if quick else 5):  # interleaved: a slow spell of the host hits every variant alike
            for name, net in nets.items():
                t = time.perf_counter()
                net(x, timesteps=step)
                times[name].append(time.perf_counter() - t)
    variants = {}
    for name, net in nets.items():
        variants[name] = {"parameters": sum(p.numel() for p in net.parameters()),
                          "step_s": round(statistics.median(times[name]), 3),
                          **{k: list(v) if isinstance(v, tuple) else v for k, v in MODEL_SIZES[name].items()}}
    base_step = variants["bundled"]["step_s"]
    for row in variants.values():
        row["click_s_estimate"] = round(click_p50_s + bundled.default_steps * (row["step_s"] - base_step), 2)
    return {"steps": bundled.default_steps, "roi": [64, 64, 64], "variants": variants,
            "note": "click_s_estimate = measured roi64_default p50 + steps x (variant step - bundled step)"}


def print_bench(rows: dict) -> None:
    print(f"threads={rows['threads']} device={rows['device']} torch={rows['torch']} repeats={rows['repeats']} "
          f"allocator={rows.get('allocator', '?')}")
    for key in ("roi64_default", "roi64_preview", "roi64_double_volume", "roi64_second_modality"):
        print(f"{key:22s} {json.dumps(rows[key])}")
    for r in rows["vs_roi"]:
        print(f"roi side {r['side']:3d} voxels {r['roi_voxels']:8d}  p50 {r['p50_s']:.3f} s")
    for key in ("peak_rss_mb_synthesize", "pathar_sample_4mod", "import_s", "cli_end_to_end"):
        if key in rows:
            print(f"{key:22s} {json.dumps(rows[key])}")
    for r in rows["vs_steps"]:
        print(f"steps {r['steps']:3d}  p50 {r['p50_s']:.3f} s")
    for r in rows.get("pseudo_healthy", []):
        print(f"lesion removal, lesion for a {r['side']}^3 ROI ({r['lesion_voxels']} voxels), deep-fill smoothing "
              f"{'on ' if r['smooth_deep_fill'] else 'off'}: p50 {r['p50_s']:.3f} s")
    if "naive_whole_volume" in rows:
        print(f"naive whole-volume step vs 64^3 ROI step: {json.dumps(rows['naive_whole_volume'])}")
    for name, r in rows.get("vs_model_size", {}).get("variants", {}).items():
        print(f"model {name:18s} {r['parameters']:9d} parameters  step {r['step_s']:.3f} s  "
              f"click ~{r['click_s_estimate']} s")
    print(f"peak RSS {rows['peak_rss_mb']:.0f} MB")
