"""Latency of one PathAR sample (structure + 4 modalities) on CPU.

    python -m scripted_models.pathar.bench                 # weights from weights_dir()
    python -m scripted_models.pathar.bench --random-init   # real-size config, untrained weights (speed only)

Prints p50/p90 over --runs runs (after one warm-up) of the whole sample_pairs call and of its parts, in wall
time and in process CPU time (on a busy machine, `--threads 1` CPU time estimates the idle-machine latency).
Target: p50 <= 5 s with 2 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..labels import MODALITIES
from ..runtime import native_cpu_bf16
from . import ANATOMY_CARD, ANATOMY_INDEPENDENT


def save_random_weights(folder: Path) -> None:
    """Real-size PathAR models with random weights, saved like trained ones (for speed measurements)."""
    from ..weights import save_state
    from .api import APPEARANCE_NAME, STRUCTURE_NAME, TRANSFORMER_NAME
    from .tokenizer import AppearanceVQ, StructureVQ
    from .train import PathARConfig
    from .transformer import IARTransformer

    cfg = PathARConfig.default()
    torch.manual_seed(0)
    common = {"patch": cfg.patch.to_dict(), "steps": 0, "batch": 0, "wall_time_s": 0.0, "untrained": True}
    save_state(STRUCTURE_NAME, StructureVQ(cfg.structure).state_dict(),
               {**common, "config": cfg.structure.to_dict()}, folder)
    save_state(APPEARANCE_NAME, AppearanceVQ(cfg.appearance).state_dict(),
               {**common, "config": cfg.appearance.to_dict()}, folder)
    save_state(TRANSFORMER_NAME, IARTransformer(cfg.transformer).state_dict(),
               {**common, "config": cfg.transformer.to_dict(), "modalities": list(MODALITIES)}, folder)


def bench(runs: int = 5, modalities=MODALITIES, device: str = "cpu", modality_guidance=None,
          anatomy_from: str = ANATOMY_CARD) -> dict:
    from .api import load_models, sample_pairs

    t0 = time.perf_counter()
    model = load_models(device)
    load_s = time.perf_counter() - t0
    marks: dict[str, float] = {}

    def progress(fraction, message):
        marks.setdefault(message, time.perf_counter())

    totals, cpu, parts = [], [], {"tokens": [], "decode": []}
    for r in range(runs + 1):
        marks.clear()
        c0, t0 = time.process_time(), time.perf_counter()
        sample_pairs(list(modalities), n=1, seed=r, device=device, progress=progress,
                     modality_guidance=modality_guidance, anatomy_from=anatomy_from)
        t1, c1 = time.perf_counter(), time.process_time()
        if r == 0:
            continue  # warm-up
        totals.append(t1 - t0)
        cpu.append(c1 - c0)
        d0 = marks.get("decoding", t1)
        parts["tokens"].append(d0 - t0)  # structure + appearance tokens (pipelined, one KV-cached pass each)
        parts["decode"].append(t1 - d0)  # VQ decoders: mask and images

    def pct(v):
        return {"p50": round(float(np.percentile(v, 50)), 3), "p90": round(float(np.percentile(v, 90)), 3)}

    return {"total_s": pct(totals), "cpu_s": pct(cpu), **{k: pct(v) for k, v in parts.items()},
            "load_s": round(load_s, 2), "runs": runs, "threads": torch.get_num_threads(),
            "native_cpu_bf16": native_cpu_bf16(),
            "modalities": list(modalities),
            "modality_guidance": model.guidance(modality_guidance),
            "anatomy_from": model.anchor_modality(anatomy_from) or ANATOMY_INDEPENDENT}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None, help="weights folder (default: weights_dir())")
    parser.add_argument("--random-init", action="store_true", help="real-size models with random weights")
    parser.add_argument("--modality-guidance", default=None, metavar="W|MOD=W,...",
                        help="default: the weights' card")
    parser.add_argument("--anatomy-from", default=ANATOMY_CARD, metavar="MOD|none", help="default: the weights' card")
    args = parser.parse_args(argv)
    from .api import describe_guidance, parse_modality_guidance

    torch.set_num_threads(args.threads)
    tmp = None
    if args.random_init:
        tmp = tempfile.TemporaryDirectory(prefix="pathar_bench_")
        save_random_weights(Path(tmp.name))
        os.environ["PATHOSYN_WEIGHTS_DIR"] = tmp.name
    elif args.weights:
        os.environ["PATHOSYN_WEIGHTS_DIR"] = str(Path(args.weights).resolve())
    guidance = None if args.modality_guidance is None else parse_modality_guidance(args.modality_guidance)
    result = bench(args.runs, MODALITIES, args.device, guidance, args.anatomy_from)
    t = result["total_s"]
    print(f"PathAR sample (structure + {len(MODALITIES)} modalities, modality guidance "
          f"{describe_guidance(result['modality_guidance'])}, anatomy {result['anatomy_from']}), "
          f"{result['threads']} threads{'' if result['native_cpu_bf16'] else ' (float32: no CPU bf16)'}, "
          f"{args.runs} runs: p50 {t['p50']:.2f} s, p90 {t['p90']:.2f} s")
    c = result["cpu_s"]
    print(f"  CPU time   p50 {c['p50']:.2f} s  p90 {c['p90']:.2f} s  (process CPU seconds; with 1 thread this is the "
          "latency of an idle core, whatever else runs on the machine)")
    for part in ("tokens", "decode"):
        print(f"  {part:10s} p50 {result[part]['p50']:.2f} s  p90 {result[part]['p90']:.2f} s")
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
