"""Cohort-scale synthesis: `pathosyn batch` and `run_batch` (manifest CSV -> one output folder per case).

    from scripted_models.batch import run_batch
    rows = run_batch("cohort.csv", "out", workers=2)          # or scheduler="tcp://host:8786", resume=True
    rows[0]["files"]["t1"]                                    # absolute path of the synthesized T1

Modules: manifest (parse + validate), job (one job, done-marker, PathAR placement), runner (in-process, local
processes, Dask), commands (the CLI subcommand). Importing this package does not import torch.
"""
from __future__ import annotations

from .commands import register
from .manifest import Job, load_manifest
from .runner import run_batch

__all__ = ["Job", "load_manifest", "register", "run_batch"]
