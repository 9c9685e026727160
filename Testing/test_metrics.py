"""Evaluation metrics on known inputs."""
from __future__ import annotations

import numpy as np
import pytest

from scripted_models.evaluation.metrics import (
    brats_inpainting_scores,
    glcm_features,
    masked_mse_psnr,
    region_stats,
    ssim_in_box,
    wasserstein,
)


def test_identical_images_have_zero_distance():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 20, 20)).astype(np.float32)
    region = np.zeros(img.shape, bool)
    region[5:15, 5:15, 5:15] = True
    stats = region_stats(img, img, region)
    for key in ("mean_err", "std_err", "wasserstein", "glcm_contrast_err", "glcm_homogeneity_err"):
        assert stats[key] == 0.0
    assert ssim_in_box(img, img, region) == pytest.approx(1.0, abs=1e-5)
    mse, psnr = masked_mse_psnr(img, img, region)
    assert mse == 0.0 and psnr == float("inf")


def test_shifted_histogram_gives_the_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=5000)
    assert wasserstein(a, a + 0.7) == pytest.approx(0.7, abs=1e-9)
    stats = region_stats(np.full((4, 4, 4), 2.0), np.full((4, 4, 4), 0.5), np.ones((4, 4, 4), bool))
    assert stats["mean_err"] == pytest.approx(1.5) and stats["wasserstein"] == pytest.approx(1.5)


def test_glcm_on_known_patterns():
    flat = np.zeros((6, 6, 6))
    region = np.ones(flat.shape, bool)
    f = glcm_features(flat, region)
    assert f["contrast"] == 0.0 and f["homogeneity"] == pytest.approx(1.0)
    stripes = np.zeros((6, 6, 6))
    stripes[:, :, ::2] = 6.0  # alternate levels 5 and 15 (clipped) along x only
    g = glcm_features(stripes, region)
    # pairs along x differ by 10 levels; along y and z they are equal: contrast = 100 * (1/3)
    assert g["contrast"] == pytest.approx(100 / 3, rel=1e-9)


def test_psnr_of_known_error():
    target = np.zeros((4, 4, 4))
    pred = np.full((4, 4, 4), 0.1)
    mse, psnr = masked_mse_psnr(pred, target, np.ones(target.shape, bool))
    assert mse == pytest.approx(0.01) and psnr == pytest.approx(20.0)


def reference_slice_ssim(pred, true, mask, axis, data_range):
    """The 2-D Gaussian SSIM (sigma 1.5, radius 5, mirrored edges) of each slice across `axis`, by scipy."""
    from scipy.ndimage import gaussian_filter

    sigma = [1.5] * 3
    sigma[axis] = 0

    def blur(a):
        return gaussian_filter(a, sigma, mode="mirror", truncate=5 / 1.5)

    mu_p, mu_t = blur(pred), blur(true)
    var_p, var_t, cov = blur(pred * pred) - mu_p ** 2, blur(true * true) - mu_t ** 2, blur(pred * true) - mu_p * mu_t
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = (2 * mu_p * mu_t + c1) * (2 * cov + c2) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return ssim[mask].mean()


def test_brats_challenge_scoring_on_known_inputs():
    """The challenge's scoring: both images masked, then scaled by the whole voided volume's 0.5 / 99.5
    percentiles (background included, so not the brain's); SSIM in 2-D slices across the given axis."""
    rng = np.random.default_rng(2)
    shape = (24, 30, 36)
    truth = np.zeros(shape)
    truth[2:22, 3:27, 4:32] = rng.uniform(100.0, 1100.0, (20, 24, 28))  # a head in a background of zeros
    mask = np.zeros(shape, bool)
    mask[6:18, 8:22, 24:36] = True  # reaching the edge: the padding counts
    voided = np.where(mask, 0.0, truth)
    lo, hi = np.percentile(voided, [0.5, 99.5])
    assert lo == 0.0 and hi < np.percentile(voided[voided > 0], 99.5)  # the background counts

    perfect = brats_inpainting_scores({"truth": truth}, truth, voided, mask, slice_axis=2)["truth"]
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-4) and perfect["mse"] == 0.0
    assert perfect["psnr_01_db"] == float("inf")

    prediction = truth + rng.normal(0.0, 80.0, shape)
    scaled = [np.clip(np.where(mask, a, 0.0), 0.0, hi) / hi for a in (prediction, truth)]
    mse = float(np.mean((scaled[0][mask] - scaled[1][mask]) ** 2))
    data_range = max(np.ptp(scaled[0]), np.ptp(scaled[1]))
    for axis in (0, 2):
        scores = brats_inpainting_scores({"p": prediction}, truth, voided, mask, slice_axis=axis)["p"]
        assert scores["mse"] == pytest.approx(mse, abs=1e-5)
        assert scores["psnr_01_db"] == pytest.approx(10 * np.log10(1 / mse), abs=0.01)
        assert scores["psnr_db"] == pytest.approx(10 * np.log10(scaled[1][mask].max() ** 2 / mse), abs=0.01)
        assert scores["ssim"] == pytest.approx(reference_slice_ssim(*scaled, mask, axis, data_range), abs=2e-4)
    # the slices run across the given axis: another axis gives another SSIM
    assert (brats_inpainting_scores({"p": prediction}, truth, voided, mask, slice_axis=0)["p"]["ssim"]
            != brats_inpainting_scores({"p": prediction}, truth, voided, mask, slice_axis=2)["p"]["ssim"])
    with pytest.raises(ValueError, match="empty"):
        brats_inpainting_scores({"t": truth}, truth, voided, np.zeros(shape, bool), slice_axis=2)


def box_lesion() -> np.ndarray:
    """A (20, 64, 64) volume's lesion: a 10 x 32 x 32 box."""
    lesion = np.zeros((20, 64, 64), bool)
    lesion[5:15, 16:48, 16:48] = True
    return lesion


def test_two_sample_classifier_auroc_separates_only_different_textures():
    from scripted_models.evaluation.two_sample import axial_patches, classifier_auroc, lesion_centres

    rng = np.random.default_rng(0)
    lesion = box_lesion()
    shape = lesion.shape
    real = rng.normal(0, 1, shape).astype(np.float32)
    same = rng.normal(0, 1, shape).astype(np.float32)  # another draw of the same texture
    smooth = np.full(shape, real[lesion].mean(), np.float32)  # constant fill: no texture
    centres = lesion_centres(lesion, n=200, seed=0)
    assert len(centres) == 200 and lesion[tuple(centres.T)].all()
    p_real = axial_patches([real], centres)
    assert p_real.shape == (200, 1, 16, 16)
    indistinguishable = classifier_auroc(p_real, axial_patches([same], centres))
    separable = classifier_auroc(p_real, axial_patches([smooth], centres))
    assert 0.35 < indistinguishable < 0.65, indistinguishable
    assert separable > 0.95, separable


def test_across_case_auroc_judges_each_case_by_the_others():
    from scripted_models.evaluation.two_sample import axial_patches, classifier_auroc, lesion_centres

    rng = np.random.default_rng(0)
    lesion = box_lesion()
    shape = lesion.shape
    centres = lesion_centres(lesion, n=100, seed=0)
    rough = [axial_patches([rng.normal(0, 1, shape).astype(np.float32)], centres) for _ in range(4)]
    smooth = [axial_patches([rng.normal(0, 0.2, shape).astype(np.float32)], centres) for _ in range(4)]
    cases = np.repeat(["a", "b"], len(centres))
    # a difference every case shares (synthetic smoother): found across cases
    shared = classifier_auroc(np.concatenate(rough[:2]), np.concatenate(smooth[:2]), cases)
    assert shared > 0.95, shared
    # the direction flips between the cases: a classifier trained on one case scores the other backwards, which
    # it could not if the scored case were in its training folds
    flipped = classifier_auroc(np.concatenate([rough[2], smooth[2]]), np.concatenate([smooth[3], rough[3]]), cases)
    assert flipped < 0.1, flipped
    with pytest.raises(ValueError, match="at least 2 cases"):
        classifier_auroc(rough[0], smooth[0], np.repeat("a", len(centres)))


def test_separating_features_name_what_differs():
    from scripted_models.evaluation.two_sample import FEATURE_NAMES, axial_patches, lesion_centres, separating_features

    rng = np.random.default_rng(0)
    lesion = box_lesion()
    shape = lesion.shape
    centres = lesion_centres(lesion, n=200, seed=0)
    real = [rng.normal(0, 1, shape).astype(np.float32), rng.normal(0, 1, shape).astype(np.float32)]
    shifted = [rng.normal(0, 1, shape).astype(np.float32), rng.normal(0, 1, shape).astype(np.float32) + 2.0]
    rows = separating_features(axial_patches(real, centres), axial_patches(shifted, centres), ["t1", "flair"], top=3)
    assert len(rows) == 3 and len(FEATURE_NAMES) == 25
    assert all(r["channel"] == "flair" and r["auroc"] > 0.95 for r in rows)  # only flair's level moved
    assert {r["feature"] for r in rows} <= {"mean", "q10", "q50", "q90"} | {f"block{i}" for i in range(16)}
    assert rows[0]["synthetic_mean"] - rows[0]["real_mean"] == pytest.approx(2.0, abs=0.2)
