"""Case-level folds over the labelled gliomas of ../shared/data, with one fixed test fold.

Subjects, not files, are split: a patient that appears twice (BraTS 2013 data re-released in BraTS 2015 and
2018, the BraTS 2023 case and its preprocessed twin) sits in one fold only.

- **test** (fold 0): never used for training, model selection or tuning. Drawn from the BraTS 2018/2021
  cases of institutions other than BraTS 2013 (CBICA, TCIA), stratified by grade, with a fixed seed.
- **validation** (fold 1): model selection (best checkpoint), from the same pool.
- **train**: the rest of that pool, every BraTS 2013 subject (earlier models were trained and tuned on some of
  them, and re-released copies cannot be told apart, so none may sit in a held-out fold) and the cases with
  automatic labels.

Not in any fold: cases without tumour labels, binary-mask clinical scans (`pyradiomics_*`) and other lesion
types (`other_lesions/`, multiple sclerosis: no lesion-type condition yet).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .cases import default_data_root, list_cases
from .errors import InputError

FOLD_SEED = 2026
TEST_SIZE = 5
VALIDATION_SIZE = 4
# cases that take part in no glioma fold (see the module docstring)
NOT_IN_FOLDS = {"pyradiomics_brain1", "pyradiomics_brain2", "aurora_met_unlabelled", "brats_gli_00001_inpainting"}
LOW_GRADE = {"brats18_tcia10_628_1", "brats18_tcia10_639_1", "brats18_tcia13_623_1"}


def subject_of(case_id: str) -> str:
    """Patient identity used for grouping: re-released copies of one patient share it."""
    if case_id.startswith(("brats2013_", "brats18_2013_")):
        return "brats2013"  # all BraTS 2013 patients form one always-train group
    if case_id in ("brats_pkg_case", "brats_gli_00001_inpainting"):
        return "brats_gli_00001"
    return case_id


@dataclass(frozen=True)
class Folds:
    test: tuple[str, ...]
    validation: tuple[str, ...]
    train: tuple[str, ...]

    def role(self, case_id: str) -> str | None:
        for name in ("test", "validation", "train"):
            if case_id in getattr(self, name):
                return name
        return None

    def as_dict(self) -> dict:
        return {"seed": FOLD_SEED, "test": list(self.test), "validation": list(self.validation),
                "train": list(self.train)}


def _labelled_gliomas(root: Path) -> list[tuple[str, dict]]:
    out = []
    for folder in list_cases(root):
        if folder.name in NOT_IN_FOLDS:
            continue
        info = json.loads((folder / "case.json").read_text())
        has_seg = any((folder / f"seg{ext}").is_file() for ext in (".nii.gz", ".nii", ".nrrd"))
        if has_seg and info.get("lesion_type", "glioma") == "glioma":
            out.append((folder.name, info))
    return out


@lru_cache(maxsize=4)
def make_folds(data_root: str | None = None) -> Folds:
    """The fixed split. Deterministic: the same cases give the same folds on every machine."""
    root = Path(data_root or default_data_root())
    if not (root / "cases").is_dir():
        raise InputError(f"no labelled cases at {root / 'cases'}: give --data or set PATHOSYN_DATA to the data folder")
    cases = _labelled_gliomas(root)
    pool = [c for c, info in cases if info.get("labels") == "manual" and subject_of(c) == c
            and len(info.get("modalities", [])) == 4]
    rng = np.random.default_rng(FOLD_SEED)
    low = [c for c in sorted(pool) if c in LOW_GRADE]
    high = [c for c in sorted(pool) if c not in LOW_GRADE]
    low = [low[i] for i in rng.permutation(len(low))]
    high = [high[i] for i in rng.permutation(len(high))]
    n_low_test = min(1, len(low))
    n_low_val = min(1, len(low) - n_low_test)
    test = low[:n_low_test] + high[: TEST_SIZE - n_low_test]
    validation = low[n_low_test:n_low_test + n_low_val] + \
        high[TEST_SIZE - n_low_test:TEST_SIZE - n_low_test + VALIDATION_SIZE - n_low_val]
    held = set(test) | set(validation)
    train = [c for c, _ in cases if c not in held]
    return Folds(tuple(sorted(test)), tuple(sorted(validation)), tuple(sorted(train)))
