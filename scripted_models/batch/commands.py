"""`pathosyn batch --manifest CSV --out DIR [--workers N | --scheduler ADDRESS] [--resume]`."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _sigterm(signum, frame):  # terminate like Ctrl-C: workers are stopped, finished jobs are kept
    raise KeyboardInterrupt


def cmd_batch(args) -> int:
    from .runner import RESULTS, run_batch

    mode = args.progress
    if mode == "auto":
        mode = "tqdm" if sys.stderr.isatty() else "none"
    bar = None

    def progress(fraction: float, message: str) -> None:
        nonlocal bar
        if mode == "jsonl":
            print(json.dumps({"event": "progress", "fraction": round(float(fraction), 4), "message": message}),
                  flush=True)
        elif mode == "tqdm":
            from tqdm import tqdm

            total = int(message.split("/", 1)[1].split()[0]) if "/" in message else 0
            if bar is None:
                bar = tqdm(total=total, unit="job", file=sys.stderr, desc="pathosyn batch")
            bar.n = round(fraction * total)
            bar.set_postfix_str(message.split(" ", 1)[1][:40] if " " in message else "")
            bar.refresh()

    def on_result(row: dict) -> None:
        if mode == "jsonl":
            print(json.dumps({"event": "job", **{k: row[k] for k in ("case_id", "status", "seconds", "error")}}),
                  flush=True)
        if row["status"] == "failed":
            message = f"pathosyn: job {row['case_id']} failed: {row['error']}"
            (bar.write(message, file=sys.stderr) if bar is not None else print(message, file=sys.stderr))

    previous = signal.signal(signal.SIGTERM, _sigterm) if hasattr(signal, "SIGTERM") else None
    try:
        rows = run_batch(args.manifest, args.out, workers=args.workers, scheduler=args.scheduler,
                         resume=args.resume, device=args.device, progress=progress, threads=args.threads,
                         on_result=on_result)
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    summary = {"jobs": len(rows), **counts, "results": str(Path(args.out).expanduser().resolve() / RESULTS)}
    print(json.dumps({"event": "done", **summary}) if mode == "jsonl" else json.dumps(summary, indent=1), flush=True)
    return 1 if counts["failed"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("batch", help="run many synthesis jobs from a CSV manifest (local processes or Dask)",
                       description="Manifest columns: case_id,mask,seed,t1,t1c,t2,flair[,samples,steps,brain_mask]. "
                                   "mask is a path or 'pathar'; brain_mask (optional) the brain of a scan with "
                                   "scalp and skull; empty modality cells are skipped; relative paths are "
                                   "relative to the manifest. Outputs: OUT/<case_id>/ as `pathosyn synthesize` "
                                   "writes them, plus done.json and log.jsonl, and OUT/results.csv. Exit code 1 "
                                   "when some jobs failed, 2 for a bad manifest (nothing is started).")
    p.add_argument("--manifest", required=True, help="CSV, one row per job")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per case_id)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1,
                       help="local worker processes (torch threads: cores // N each unless --threads)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="Dask distributed scheduler, e.g. tcp://10.0.0.5:8786 (shared filesystem needed)")
    p.add_argument("--resume", action="store_true",
                   help="skip jobs whose outputs match their recorded checksums; redo partial or corrupt ones")
    add_common(p)
    p.set_defaults(func=cmd_batch)
