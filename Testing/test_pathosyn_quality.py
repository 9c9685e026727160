"""The committed PathoSyn weights learned something real: checked on the held-out case brats2013_pat0003."""
from __future__ import annotations

import numpy as np
import pytest

from scripted_models.cases import VALIDATION_CASE, load_case
from scripted_models.labels import CORE, EDEMA, ENHANCING
from scripted_models.preprocess import IntensityNormalizer, dilate_mm


@pytest.fixture(scope="module")
def validation(data_root):
    from scripted_models import pseudo_healthy, synthesize_lesion

    case = load_case(data_root / "cases" / VALIDATION_CASE)
    mask = case.reference.with_array(case.seg)
    base = pseudo_healthy(case.images, mask)
    result = synthesize_lesion(base, mask, seed=0, steps=5)
    fg = case.foreground()
    lesion = case.seg > 0
    norms = {m: IntensityNormalizer.fit(v.array, exclude=lesion, foreground=fg) for m, v in case.images.items()}
    z = {m: norms[m].forward(v.array) for m, v in result.images.items()}
    zb = {m: norms[m].forward(v.array) for m, v in base.items()}
    return case, z, zb, result, base


def test_flair_edema_is_brighter_than_its_base(validation):
    case, z, zb, _, _ = validation
    edema = case.seg == EDEMA
    assert z["flair"][edema].mean() - zb["flair"][edema].mean() > 0.5


def test_t1c_enhancing_is_brighter_than_core(validation):
    case, z, _, _, _ = validation
    assert z["t1c"][case.seg == ENHANCING].mean() > z["t1c"][case.seg == CORE].mean() + 0.3


def test_outside_region_identical_on_real_case(validation):
    case, _, _, result, base = validation
    region = dilate_mm(case.seg > 0, 6.0, case.spacing_zyx)
    for m, vol in result.images.items():
        assert np.array_equal(vol.array[~region], base[m].array[~region])
        assert np.abs(result.residuals[m].array[~region]).max() == 0


def test_pseudo_healthy_beats_mean_fill_in_inpainting_protocol(data_root):
    from scripted_models.evaluation.validation import inpainting_protocol

    scores = inpainting_protocol(data_root)
    assert scores["anatomy_model"]["mse"] < scores["mean_fill_baseline"]["mse"]
    assert scores["anatomy_model"]["ssim"] > scores["mean_fill_baseline"]["ssim"]
