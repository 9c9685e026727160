"""Output folders: checked before any work, and done-markers that make interrupted runs resumable.

A done-marker (done.json, written last, atomically) records what the outputs were made from (a fingerprint) and
the size and sha256 of every output file. A folder whose marker is missing, from other settings, or whose files no
longer match it is unfinished and is redone on resume.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import InputError
from .weights import sha256_of

DONE = "done.json"


def check_output_folder(path: str | Path) -> Path:
    """The folder, or InputError when it cannot be one (it, or a folder above it, is a file). Creates nothing."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise InputError(f"output folder {path}: {part} exists and is not a folder")
            break
    return path


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def outputs_record(folder: Path, files: dict[str, str]) -> dict:
    """{name: file name in folder} -> {name: {file, sha256, bytes}} for a done-marker."""
    record = {}
    for name, file in files.items():
        path = Path(folder) / file
        record[name] = {"file": file, "sha256": sha256_of(path), "bytes": path.stat().st_size}
    return record


def verify_done(folder: Path, expected_fingerprint: str) -> dict | None:
    """The done-marker if the folder was finished with the same fingerprint and every output still matches."""
    try:
        done = json.loads((Path(folder) / DONE).read_text())
        if done.get("fingerprint") != expected_fingerprint or not done.get("outputs"):
            return None
        for entry in done["outputs"].values():
            path = Path(folder) / entry["file"]
            if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return done
