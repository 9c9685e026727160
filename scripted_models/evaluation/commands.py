"""`pathosyn bench` and `pathosyn evaluate`."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_bench(args) -> int:
    from .bench import print_bench, run_bench

    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or args.out.endswith(("/", "\\"))):
        out = out / "bench_pathosyn.json"  # a folder: the default file name inside it (checked before the run)
    rows = run_bench(repeats=args.repeats, quick=args.quick, out=out, device=args.device, naive=not args.no_naive)
    print_bench(rows)
    return 0


def _labelled(value: str) -> tuple[str, Path]:
    from ..errors import InputError

    label, _, folder = value.rpartition("=")
    path = Path(folder)
    if not (path / "deviation_diffusion.safetensors").is_file():
        raise InputError(f"--compare-weights: no deviation_diffusion.safetensors in {path}")
    return label or path.name, path


def cmd_evaluate(args) -> int:
    from .validation import print_validation, run_validation

    rows = run_validation(data_root=args.data, samples=args.samples, steps=args.steps, quick=args.quick,
                          out=Path(args.out) if args.out else None, device=args.device,
                          compare_weights=dict(_labelled(w) for w in args.compare_weights or []),
                          bundled_label=args.bundled_label, compare_uncalibrated=args.compare_uncalibrated)
    print_validation(rows)
    if args.downstream:
        from .downstream import DownstreamSettings, downstream_markdown, run_downstream

        settings = DownstreamSettings.quick_settings() if args.quick else DownstreamSettings()
        report = run_downstream(args.data, settings, device=args.device,
                                out=Path(args.out) / "downstream" if args.out else None)
        print(downstream_markdown(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("bench", help="latency and memory of synthesize (prints measured numbers)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="short run for CI")
    p.add_argument("--no-naive", action="store_true", help="skip the whole-volume comparison")
    p.add_argument("--out", default=None, help="also write the numbers as JSON (a file, or a folder for "
                                                "FOLDER/bench_pathosyn.json) and a PNG plot next to it")
    add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evaluate", help="realism on the fixed test and validation folds; inpainting; PathAR")
    p.add_argument("--data", default=None)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="report folder (Markdown + JSON)")
    p.add_argument("--compare-weights", action="append", metavar="[LABEL=]DIR",
                   help="also score the deviation weights in DIR on the same bases (paired before/after table)")
    p.add_argument("--compare-uncalibrated", action="store_true",
                   help="also score the bundled weights without calibration (population pull 0, smooth base, "
                        "the base's texture kept in the lesion)")
    p.add_argument("--bundled-label", default="bundled", help="name of the bundled weights in the tables")
    p.add_argument("--downstream", action="store_true",
                   help="also run the downstream segmentation study (9 small networks; about 15 min on 2 cores)")
    add_common(p)
    p.set_defaults(func=cmd_evaluate)
