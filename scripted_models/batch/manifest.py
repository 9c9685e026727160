"""Batch manifest: a CSV with one row per synthesis job, validated as a whole before any work starts.

    case_id,mask,seed,t1,t1c,t2,flair[,samples,steps,brain_mask]
    P001,masks/p001.nii.gz,0,t1/p001.nii.gz,,,flair/p001.nii.gz
    P002,pathar,7,t1/p002.nii.gz,,,

A modality cell holds an image path or is empty; `mask` is a path or the word `pathar` (draw a PathAR lesion and
place it inside the brain); `brain_mask` (optional) is the brain of a scan with scalp and skull: intensities are
normalised over it, and PathAR lesions are placed in it. Relative paths are relative to the manifest file.
"""
from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..labels import MODALITIES
from ..outputs import fingerprint
from ..volume import is_dicom_seg

REQUIRED = ("case_id", "mask", "seed")
OPTIONAL = ("samples", "steps", "brain_mask")
KNOWN = REQUIRED + MODALITIES + OPTIONAL
PATHAR = "pathar"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SEED = 2 ** 63 - 1


@dataclass(frozen=True)
class Job:
    """One manifest row, with absolute paths."""

    case_id: str
    line: int
    mask: str  # absolute path, or "pathar"
    seed: int
    images: dict[str, str] = field(default_factory=dict)  # modality -> absolute path, in MODALITIES order
    samples: int = 1
    steps: int | None = None
    brain_mask: str | None = None  # absolute path, or None

    @property
    def uses_pathar(self) -> bool:
        return self.mask == PATHAR

    @property
    def fingerprint(self) -> str:
        """What the outputs depend on: a changed row invalidates a finished job on --resume."""
        spec = {k: v for k, v in asdict(self).items() if k != "line" and not (k == "brain_mask" and v is None)}
        return fingerprint(spec)


def _int_cell(value: str, name: str, minimum: int, default=None, maximum: int = MAX_SEED):
    text = (value or "").strip()
    if not text:
        if default is not None or name != "seed":
            return default, None
        return None, f"{name} is empty (expected an integer >= {minimum})"
    try:
        number = int(text)
    except ValueError:
        return None, f"{name} '{text}' is not an integer"
    if number < minimum or number > maximum:
        return None, f"{name} {number} is out of range (expected {minimum}..{maximum})"
    return number, None


def _header_info(path: Path, cache: dict):
    """(size, spacing, origin, direction) from the image header only, or an error string."""
    if path in cache:
        return cache[path]
    import SimpleITK as sitk

    from ..volume import read_volume

    if path.is_dir() or is_dicom_seg(path):  # a DICOM series or SEG: its geometry needs every slice or frame
        try:
            volume = read_volume(path)
        except InputError as exc:
            info = str(exc)
        else:
            info = (tuple(reversed(volume.shape)), volume.spacing, volume.origin, volume.direction)
        cache[path] = info
        return info
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        info = f"cannot read {path.name}: {lines[-1] if lines else 'unreadable'}"
    else:
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            info = (f"{path.name} is not a 3D scalar image ({reader.GetDimension()}D, "
                    f"{reader.GetNumberOfComponents()} component(s))")
        else:
            info = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    cache[path] = info
    return info


def _physical_box(info) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) LPS corners of the space a header's (size, spacing, origin, direction) grid covers."""
    size, spacing, origin, direction = (np.asarray(v, float) for v in info)
    edges = [np.array([-0.5, n - 0.5]) for n in size]
    corners = np.array([[edges[0][a], edges[1][b], edges[2][c]] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    lps = origin + (direction.reshape(3, 3) @ np.diag(spacing) @ corners.T).T
    return lps.min(axis=0), lps.max(axis=0)


def _overlap(a, b) -> bool:
    (alo, ahi), (blo, bhi) = _physical_box(a), _physical_box(b)
    return bool(np.all(alo < bhi) and np.all(blo < ahi))


def _check_path(cell: str, base: Path, what: str, cache: dict):
    """(absolute path, header info, None) or (None, None, error)."""
    path = Path(cell.strip()).expanduser()
    if not path.is_absolute():
        path = base / path
    seg = what == "mask" and path.is_file() and is_dicom_seg(path)
    if not path.is_dir() and not seg and not path.name.lower().endswith(IMAGE_SUFFIXES):
        return None, None, (f"{what} '{cell.strip()}' is not an image file (expected {', '.join(IMAGE_SUFFIXES)}, "
                            "a DICOM series folder, or for the mask a DICOM SEG file)")
    if not path.is_dir() and not path.is_file():
        return None, None, f"{what} file not found: {path}"
    info = _header_info(path.resolve(), cache)
    if isinstance(info, str):
        return None, None, f"{what}: {info}"
    return str(path.resolve()), info, None


def _pathar_available() -> str | None:
    import importlib

    try:
        importlib.import_module("scripted_models.pathar.api")
    except ImportError as exc:
        return f"mask 'pathar' needs the PathAR engine (scripted_models.pathar.api cannot be imported: {exc})"
    return None


def load_manifest(path: str | Path) -> list[Job]:
    """Parse and validate the whole manifest. Raises one InputError naming every bad row by line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    base = path.resolve().parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"manifest {path.name} is empty") from None
    except csv.Error as exc:
        raise InputError(f"manifest {path.name}: line 1: {exc}") from None
    columns = [c.strip().lower() for c in header]
    problems = []
    unknown = [c for c in columns if c not in KNOWN]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(repr(c) for c in unknown)} "
                        f"(expected {', '.join(KNOWN)})")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if not any(m in columns for m in MODALITIES):
        problems.append(f"no modality column (expected one or more of {', '.join(MODALITIES)})")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        problems.append(f"duplicate column(s) {', '.join(duplicated)}")
    if problems:
        raise InputError(f"manifest {path.name} has a bad header: line 1: {'; '.join(problems)}")

    jobs: list[Job] = []
    errors: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    headers: dict = {}
    pathar_error: str | None = None
    pathar_checked = False
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append((reader.line_num, str(exc)))
            break
        line = reader.line_num
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue  # blank lines and comments
        if len(cells) != len(columns):
            errors.append((line, f"expected {len(columns)} fields, got {len(cells)}"))
            continue
        row = dict(zip(columns, cells))
        bad = []
        case_id = row["case_id"].strip()
        if not CASE_ID.match(case_id):
            bad.append(f"case_id '{case_id}' must be 1-128 letters, digits, '.', '_' or '-' (a folder name)"
                       if case_id else "case_id is empty")
        elif case_id.lower() in seen:
            bad.append(f"duplicate case_id '{case_id}' (first on line {seen[case_id.lower()]})")
        else:
            seen[case_id.lower()] = line
        seed, err = _int_cell(row["seed"], "seed", 0)
        bad += [err] if err else []
        samples, err = _int_cell(row.get("samples", ""), "samples", 1, default=1, maximum=1000)
        bad += [err] if err else []
        steps, err = _int_cell(row.get("steps", ""), "steps", 1, default=None, maximum=10000)
        bad += [err] if err else []
        images: dict[str, str] = {}
        grids = {}
        for mod in MODALITIES:
            cell = (row.get(mod) or "").strip()
            if not cell:
                continue
            resolved, info, err = _check_path(cell, base, mod, headers)
            if err:
                bad.append(err)
            else:
                images[mod], grids[mod] = resolved, info
        if not any((row.get(m) or "").strip() for m in MODALITIES):
            bad.append("no modality given (fill at least one of " + ", ".join(m for m in MODALITIES if m in row) + ")")
        if len(grids) > 1:  # grids may differ (the engine resamples), the space may not
            first = next(iter(grids))
            for mod, grid in grids.items():
                if not _overlap(grid, grids[first]):
                    bad.append(f"{mod} does not overlap {first} in space (another subject's scan, or not registered)")
        mask_cell = row["mask"].strip()
        mask = None
        if mask_cell.lower() == PATHAR:
            if not pathar_checked:
                pathar_error, pathar_checked = _pathar_available(), True
            if pathar_error:
                bad.append(pathar_error)
            mask = PATHAR
        elif not mask_cell:
            bad.append("mask is empty (a path or 'pathar')")
        else:
            mask, _, err = _check_path(mask_cell, base, "mask", headers)
            bad += [err] if err else []
        brain_mask = None
        brain_cell = (row.get("brain_mask") or "").strip()
        if brain_cell:
            brain_mask, _, err = _check_path(brain_cell, base, "brain_mask", headers)
            bad += [err] if err else []
        if bad:
            label = f" ({case_id})" if case_id else ""
            errors.append((line, f"{', '.join(bad)}{label}"))
        else:
            jobs.append(Job(case_id, line, mask, seed, images, samples, steps, brain_mask))
    if errors:
        detail = "; ".join(f"line {line}: {msg}" for line, msg in errors)
        noun = "row" if len(errors) == 1 else "rows"
        raise InputError(f"manifest {path.name} has {len(errors)} bad {noun}: {detail}")
    if not jobs:
        raise InputError(f"manifest {path.name} has no jobs (only a header)")
    return jobs
