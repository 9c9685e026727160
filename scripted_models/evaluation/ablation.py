"""Equal-budget ablation of PathoSyn's disentanglement (the paper's central comparison).

Trains three deviation models one after another, from scratch, with the same steps, crops, batch and
seed, into weights/ablation/<variant>/ (resumable: rerun the same command):
  pathosyn    residual r = pathological - anatomy, conditioned on anatomy + mask
  holistic    the whole ROI image, conditioned on anatomy + mask (no disentanglement)
  mask_only   the whole ROI image, conditioned on the mask only (no anatomy branch)
`pathosyn evaluate` then scores all three with the same pipeline as the bundled model.

    python -m scripted_models.evaluation.ablation --steps 500 --crop 32
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..pathosyn.deviation import VARIANTS


def train_ablation(work: Path, steps: int, crop: int = 32, batch: int = 4, seed: int = 0, data_root=None,
                   out_root: Path | None = None, threads: int | None = None, variants=VARIANTS) -> dict:
    from ..pathosyn.train_deviation import train_deviation
    from .validation import ablation_dir

    out_root = Path(out_root or ablation_dir())
    paths = {}
    for variant in variants:  # sequential: one training at a time
        paths[variant] = train_deviation(work / f"ablation_{variant}", steps=steps, batch=batch, crop=crop, seed=seed,
                                         data_root=data_root, out_dir=out_root / variant, threads=threads,
                                         variant=variant, cache=work / "deviation" / "cache", from_scratch=True)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(".train"))
    p.add_argument("--data", default=None)
    p.add_argument("--out", type=Path, default=None, help="default: scripted_models/weights/ablation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variant", action="append", choices=VARIANTS, help="default: all three")
    args = p.parse_args(argv)
    train_ablation(args.work, args.steps, args.crop, args.batch, args.seed, args.data, args.out, args.threads,
                   tuple(args.variant or VARIANTS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
