"""Cases in the ../shared/data layout: cases/<id>/{<modality>.nii.gz|.nrrd, seg.*, case.json}."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .labels import MODALITIES, mapping_from_case_json, to_canonical
from .preprocess import IntensityNormalizer, foreground_mask
from .volume import Volume, read_volume

VALIDATION_CASE = "brats2013_pat0003"
INPAINTING_CASE = "brats_gli_00001_inpainting"
# Same subject as the inpainting case, so it is held out of anatomy training too.
INPAINTING_TWIN = "brats_pkg_case"


def default_data_root() -> Path:
    env = os.environ.get("PATHOSYN_DATA")
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data",
                  Path("/work/shared/data")]
    return next((c for c in candidates if (c / "cases").is_dir()), candidates[0])


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


@dataclass
class Case:
    case_id: str
    folder: Path
    info: dict
    images: dict[str, Volume] = field(default_factory=dict)  # raw, as on disk
    seg: np.ndarray | None = None  # canonical labels 0..3 on the image grid
    binary_only: bool = False  # labels are a whole-lesion mask only
    _foreground: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def reference(self) -> Volume:
        return next(iter(self.images.values()))

    @property
    def spacing_zyx(self):
        return tuple(reversed(self.reference.spacing))

    def foreground(self) -> np.ndarray:
        """The case's brain mask file if it has one, else the union of its images' foregrounds (computed once per
        case; each call gets its own copy)."""
        if self._foreground is None:
            brain = _find(self.folder, "brainmask")
            if brain is not None:
                self._foreground = read_volume(brain).array > 0.5
            else:
                self._foreground = np.zeros(self.reference.shape, bool)
                for vol in self.images.values():
                    self._foreground |= foreground_mask(vol.array)
        return self._foreground.copy()

    def normalized(self, foreground: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """z-scored images; statistics from healthy foreground (lesion excluded)."""
        fg = self.foreground() if foreground is None else foreground
        lesion = self.seg > 0 if self.seg is not None else None
        return {m: IntensityNormalizer.fit(v.array, exclude=lesion, foreground=fg).forward(v.array)
                for m, v in self.images.items()}


def load_case(folder: str | Path) -> Case:
    folder = Path(folder)
    info = json.loads((folder / "case.json").read_text())
    case = Case(folder.name, folder, info)
    for m in MODALITIES:
        p = _find(folder, m)
        if p is not None:
            case.images[m] = read_volume(p)
    seg_path = _find(folder, "seg")
    if seg_path is not None:
        from .volume import resample_to

        seg = resample_to(read_volume(seg_path), case.reference, nearest=True)
        mapping = mapping_from_case_json(folder / "case.json")
        case.binary_only = mapping is None
        case.seg = to_canonical(seg.array, mapping if mapping is not None else {1: 1})
    return case


def list_cases(root: str | Path | None = None) -> list[Path]:
    root = Path(root or default_data_root())
    return sorted(p for p in (root / "cases").iterdir() if (p / "case.json").is_file())
