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

# Conventions seen in the wild: BraTS 2013-2020 (4 = enhancing), BraTS 2023 (3 = enhancing).
BRATS_LEGACY = {1: CORE, 2: EDEMA, 3: CORE, 4: ENHANCING}
BRATS_2023 = {1: CORE, 2: EDEMA, 3: ENHANCING}


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
