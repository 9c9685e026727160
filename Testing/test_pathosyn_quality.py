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
    challenge, challenge_mean_fill = scores["anatomy_model"]["challenge"], scores["mean_fill_baseline"]["challenge"]
    assert challenge["mse"] < challenge_mean_fill["mse"] and challenge["ssim"] > challenge_mean_fill["ssim"]


def test_pseudo_healthy_beats_mean_fill_in_lesion_sized_holes_of_the_test_fold(data_root):
    """The test fold's lesion-sized protocol (5 fixed unseen cases, each tumour mirrored into healthy tissue):
    on average the inpainter beats a brain-mean fill (it does not on every case: see docs/RESULTS.md)."""
    from scripted_models.evaluation.validation import inpainting_test_fold
    from scripted_models.folds import make_folds

    cases = make_folds(str(data_root)).test
    report = inpainting_test_fold(data_root, cases, lesion_sized=True)
    assert report["masks"] == len(cases) and report["lesion_sized"]
    for row in report["rows"]:
        lesion_voxels = int((load_case(data_root / "cases" / row["case"]).seg > 0).sum())
        assert row["mask_voxels"] > 0.2 * lesion_voxels  # a lesion-sized hole, not an ellipsoid
        assert row["voided_voxels"] > row["mask_voxels"]  # the tumour itself is voided too
    model, mean_fill = report["summary"]["anatomy_model"], report["summary"]["mean_fill_baseline"]
    assert model["mse"] < mean_fill["mse"] and model["ssim"] > mean_fill["ssim"]
    assert model["challenge"]["mse"] < mean_fill["challenge"]["mse"]
