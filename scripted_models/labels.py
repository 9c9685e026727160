"""Canonical lesion sub-regions and mappings from dataset label conventions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODALITIES = ("t1", "t1c", "t2", "flair")

HEALTHY, CORE, EDEMA, ENHANCING = 0, 1, 2, 3
SUBREGION_NAMES = {CORE: "necrotic or non-enhancing core", EDEMA: "edema", ENHANCING: "enhancing tumour"}
# Slicer-friendly colours (RGB 0..1), close to the BraTS convention.
SUBREGION_COLORS = {CORE: (0.85, 0.2, 0.2), EDEMA: (0.2, 0.8, 0.2), ENHANCING: (0.95, 0.85, 0.1)}
NUM_SUBREGIONS = 3
PAINT_ORDER = {EDEMA: 0, ENHANCING: 1, CORE: 2}  # masks from separate segments: nested sub-regions painted last

# Conventions seen in the wild: BraTS 2013-2020 (4 = enhancing), BraTS 2023 (3 = enhancing).
BRATS_LEGACY = {1: CORE, 2: EDEMA, 3: CORE, 4: ENHANCING}
BRATS_2023 = {1: CORE, 2: EDEMA, 3: ENHANCING}


# Segment names -> canonical sub-regions (Slicer segments, DICOM SEG segment labels). Checked in order
# ("non-enhancing" before "enhancing"); keywords of up to 4 letters match whole words only.
SEGMENT_NAME_RULES = (
    (("non-enhancing", "nonenhancing", "non enhancing", "necrotic", "necrosis", "core", "ncr", "net"), CORE),
    (("edema", "oedema", "ed", "snfh"), EDEMA),
    (("enhancing", "et"), ENHANCING),
)


def subregion_for_name(name: str) -> int | None:
    """Canonical sub-region value for a segment name (case-insensitive), or None if the name is not recognised."""
    import re

    key = str(name).strip().lower().replace("_", " ")
    words = set(re.split(r"[^a-z0-9]+", key))
    for keywords, value in SEGMENT_NAME_RULES:
        for kw in keywords:
            if (len(kw) <= 4 and kw in words) or (len(kw) > 4 and kw in key):
                return value
    return None


def labels_from_segments(segments: list[tuple[list[str], np.ndarray]], source: str) -> np.ndarray:
    """Canonical labels (uint8) from named binary segments [(names to try, mask)], e.g. those of a DICOM SEG.
    Empty segments are ignored; one segment is the whole lesion (1) unless named edema or enhancing; several are
    mapped by name, nested sub-regions painted last (edema, enhancing, core). InputError for names not understood."""
    from .errors import InputError

    painted = [(names, mask) for names, mask in segments if mask.any()]
    if not painted:
        raise InputError(f"{source}: every segment is empty")
    values = [next((v for v in map(subregion_for_name, names) if v is not None), None) for names, _ in painted]
    if len(painted) == 1:
        value = values[0] if values[0] in (EDEMA, ENHANCING) else CORE
        return painted[0][1].astype(np.uint8) * np.uint8(value)
    unknown = [names[0] for (names, _), v in zip(painted, values) if v is None]
    if unknown:
        raise InputError(f"{source}: cannot map segment(s) {', '.join(repr(n) for n in unknown)} to a lesion "
                         "sub-region: label them core / edema / enhancing, or give one segment for the whole lesion")
    out = np.zeros(painted[0][1].shape, np.uint8)
    for (_, mask), value in sorted(zip(painted, values), key=lambda pv: PAINT_ORDER[pv[1]]):
        out[mask] = value
    return out


def check_modality(name: str) -> str:
    from .errors import InputError

    key = str(name).strip().lower()
    if key not in MODALITIES:
        raise InputError(f"unknown modality '{name}': expected one of {', '.join(MODALITIES)}")
    return key


def mapping_from_case_json(path: str | Path) -> dict[int, int] | None:
    """Label mapping from a ../shared/data case.json; None means 'binary whole lesion'."""
    info = json.loads(Path(path).read_text())
    raw = info.get("label_map_to_canonical") or {}
    if any(not isinstance(v, int) for v in raw.values()):
        return None
    return {int(k): int(v) for k, v in raw.items()}


def to_canonical(labels: np.ndarray, mapping: dict[int, int] | None = None) -> np.ndarray:
    """Map a label array onto canonical values (uint8). mapping=None keeps 0..3 as is;
    unknown non-zero values raise. A binary 0/1 mask stays 0/1 and means 'whole lesion'."""
    from .errors import InputError
    from .preprocess import bounding_box

    array = np.asarray(labels)
    nonzero = np.abs(array) >= 0.5 if array.dtype.kind == "f" else array != 0
    out = np.zeros(array.shape, np.uint8)
    if not nonzero.any():
        return out
    # the work is done in the lesion's bounding box (masks are mostly background)
    box = bounding_box(nonzero)
    raw = array[box]
    if raw.dtype.kind == "f":
        fractional = np.abs(raw - np.rint(raw)) > 1e-3
        if fractional.any():
            found = np.unique(raw[fractional])
            shown = ", ".join(f"{v:g}" for v in found[:5]) + (", ..." if len(found) > 5 else "")
            raise InputError(f"mask has non-integer label values ({shown}): expected integer labels")
    lab = np.rint(raw).astype(np.int64)
    values = set(np.unique(lab).tolist()) - {0}
    negative = sorted(v for v in values if v < 0)
    if negative:
        raise InputError(f"mask has negative label values {negative}: expected 0 (healthy) and positive labels")
    if mapping is None:
        mapping = BRATS_LEGACY if 4 in values else {1: 1, 2: 2, 3: 3}
    unknown = values - set(mapping)
    if unknown:
        raise InputError(f"mask has label values {sorted(unknown)} with no canonical mapping")
    sub = np.zeros(lab.shape, np.uint8)
    for src, dst in mapping.items():
        sub[lab == src] = dst
    out[box] = sub
    return out


def is_whole_lesion_only(canonical: np.ndarray) -> bool:
    """True when the mask carries no sub-region structure (binary mask)."""
    return int(np.max(canonical, initial=0)) <= 1  # canonical values are 0..3


def one_hot_subregions(canonical: np.ndarray, whole_lesion_only: bool) -> np.ndarray:
    """(4, ...) float32: channels core, edema, enhancing, whole lesion.
    With whole_lesion_only the sub-region channels are zero and the model invents the structure."""
    out = np.zeros((NUM_SUBREGIONS + 1,) + canonical.shape, np.float32)
    if not whole_lesion_only:
        for c in (CORE, EDEMA, ENHANCING):
            out[c - 1] = canonical == c
    out[NUM_SUBREGIONS] = canonical > 0
    return out
