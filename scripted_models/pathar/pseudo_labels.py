"""Rule-based sub-region labels for a cystic lesion whose tumour is unlabelled (aurora_met_unlabelled).

PathAR's structure prior learns from very few lesions, so one more distinct shape matters. The AURORA
metastasis has no mask but a textbook look: a fluid cyst (bright on t2, dark on t1c) with a contrast-enhancing
rim, inside flair-bright edema. The rule below labels exactly that, on z-scored images, in mm:

    anchor   = largest component of smoothed flair > anchor_flair_z (inside the brain)
    cyst     = t2 > cyst_t2_z and t1c < cyst_t1c_z, within roi_mm of the anchor, touching it (cyst_near_mm),
               largest component, holes filled                                   -> core (necrotic/cystic)
    rim      = t1c > rim_t1c_z within rim_mm outside the cyst                    -> enhancing
    edema    = flair > edema_flair_z (or core) within roi_mm, connected to the core -> edema

Like the automatic labels of tcga_du_7294 and brats_pkg_case these are not manual; the case card says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..labels import CORE, EDEMA, ENHANCING
from ..preprocess import dilate_mm, erode_mm, fill_holes, largest_component

PSEUDO_LABELLED = ("aurora_met_unlabelled",)  # cases `train-pathar --pseudo-labels` labels with the rule
REQUIRED = ("t1c", "t2", "flair")


@dataclass(frozen=True)
class CysticLesionRule:
    smooth_mm: float = 1.0
    brain_margin_mm: float = 3.0
    anchor_flair_z: float = 1.5
    roi_mm: float = 20.0
    cyst_t2_z: float = 1.8
    cyst_t1c_z: float = -0.3
    cyst_near_mm: float = 8.0
    rim_mm: float = 5.0
    rim_t1c_z: float = 0.8
    edema_flair_z: float = 1.0


def _touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Components of `mask` that overlap `seed`."""
    labelled, _ = ndimage.label(mask)
    keep = np.unique(labelled[seed & mask])
    return np.isin(labelled, keep[keep > 0])


def cystic_lesion_labels(images_z: dict[str, np.ndarray], foreground: np.ndarray, spacing_zyx,
                         rule: CysticLesionRule = CysticLesionRule()) -> np.ndarray:
    """Canonical labels (uint8, 0..3) of the case's cystic lesion from z-scored t1c, t2 and flair."""
    missing = [m for m in REQUIRED if m not in images_z]
    if missing:
        raise InputError(f"the cystic-lesion rule needs {', '.join(REQUIRED)}; missing {', '.join(missing)}")
    sigma = [rule.smooth_mm / s for s in spacing_zyx]
    z = {m: ndimage.gaussian_filter(images_z[m].astype(np.float32), sigma) for m in REQUIRED}
    brain = erode_mm(foreground, rule.brain_margin_mm, spacing_zyx)

    anchor = largest_component((z["flair"] > rule.anchor_flair_z) & brain)
    if not anchor.any():
        raise InputError("the cystic-lesion rule found no flair-bright lesion")
    roi = dilate_mm(anchor, rule.roi_mm, spacing_zyx) & brain
    cyst = (z["t2"] > rule.cyst_t2_z) & (z["t1c"] < rule.cyst_t1c_z) & roi
    cyst = largest_component(fill_holes(_touching(cyst, dilate_mm(anchor, rule.cyst_near_mm, spacing_zyx))))
    if not cyst.any():
        raise InputError("the cystic-lesion rule found no cyst (t2-bright, t1c-dark) next to the lesion")
    rim = dilate_mm(cyst, rule.rim_mm, spacing_zyx) & ~cyst & (z["t1c"] > rule.rim_t1c_z)
    core = fill_holes(cyst | rim)
    whole = _touching(((z["flair"] > rule.edema_flair_z) | core) & roi, core)
    whole = ndimage.binary_closing(whole, ndimage.generate_binary_structure(3, 1)) | core

    labels = np.zeros(foreground.shape, np.uint8)
    labels[whole] = EDEMA
    labels[core] = CORE
    labels[core & rim] = ENHANCING
    return labels


def pseudo_label_case(case, rule: CysticLesionRule = CysticLesionRule()):
    """Give an unlabelled Case (cases.load_case) rule-based canonical labels, in place; returns the case."""
    foreground = case.foreground()
    case.seg = cystic_lesion_labels(case.normalized(foreground), foreground, case.spacing_zyx, rule)
    case.binary_only = False
    case.info = {**case.info, "labels": "rule-based pseudo-labels (scripted_models.pathar.pseudo_labels)"}
    return case
