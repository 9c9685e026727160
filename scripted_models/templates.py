"""The built-in healthy default: nilearn's bundled MNI152 T1 (no download) and a built-in lesion mask."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .labels import CORE, EDEMA, ENHANCING
from .preprocess import largest_component
from .volume import Volume, read_volume

RESOURCES = Path(__file__).resolve().parent / "resources"
DEMO_LESION = RESOURCES / "mni152_demo_lesion.nii.gz"


def _nifti_to_volume(img, dtype=np.float32) -> Volume:
    data = np.asarray(img.get_fdata(), dtype=dtype)  # (i, j, k)
    return Volume.from_ijk_to_ras(np.ascontiguousarray(np.transpose(data, (2, 1, 0))), img.affine)


@lru_cache(maxsize=1)
def mni_t1() -> Volume:
    """MNI ICBM152 2009a T1, 1 mm, intensities 0..1 (float32)."""
    from nilearn.datasets import load_mni152_template

    return _nifti_to_volume(load_mni152_template(resolution=1))


@lru_cache(maxsize=1)
def mni_white_matter() -> Volume:
    from nilearn.datasets import load_mni152_wm_template

    return _nifti_to_volume(load_mni152_wm_template(resolution=1))


def make_demo_lesion(seed: int = 7, centre_ras=(28.0, -12.0, 24.0)) -> Volume:
    """A glioma-like lesion in right fronto-parietal white matter: necrotic core, enhancing rim, edema
    spreading along white matter. Deterministic; the committed resource file is made by this function."""
    t1 = mni_t1()
    wm = mni_white_matter().array
    rng = np.random.default_rng(seed)
    ras_to_ijk = np.linalg.inv(t1.ijk_to_ras())
    i, j, k = (ras_to_ijk @ np.array([*centre_ras, 1.0]))[:3]
    zz, yy, xx = np.ogrid[: t1.shape[0], : t1.shape[1], : t1.shape[2]]
    dist = np.sqrt((zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2)
    bumps = ndimage.gaussian_filter(rng.standard_normal(t1.shape).astype(np.float32), 4) * 40
    r = dist + bumps
    labels = np.zeros(t1.shape, np.uint8)
    brain = t1.array > 0.25 * t1.array.max()
    edema = (r < 19) & ((wm > 0.3) | (r < 13)) & brain
    labels[edema] = EDEMA
    labels[(r < 11) & brain] = ENHANCING
    labels[(r < 7.5) & brain] = CORE
    labels[~largest_component(labels > 0)] = 0
    return t1.with_array(labels)


def demo_lesion() -> Volume:
    if DEMO_LESION.is_file():
        return read_volume(DEMO_LESION)
    return make_demo_lesion()
