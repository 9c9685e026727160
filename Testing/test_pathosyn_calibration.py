"""Calibration after the networks: the scan's noise in an inpainted hole, lesion levels pulled towards the
training population (unit level, and through synthesize_lesion / pseudo_healthy on the committed weights)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_ball_mask, make_head
from scipy.ndimage import gaussian_filter

from scripted_models import pseudo_healthy, synthesize_lesion
from scripted_models.errors import InputError
from scripted_models.labels import CORE, EDEMA, ENHANCING
from scripted_models.pathosyn.calibration import (
    highpass,
    lesion_texture_ratio,
    level_ring,
    population_levels,
    pull_levels,
    robust_std,
    scanner_noise,
    texture_match,
)
from scripted_models.preprocess import IntensityNormalizer, dilate_mm


def ball(shape, radius, centre=None):
    centre = centre or [n // 2 for n in shape]
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def noisy_scan(shape=(48, 48, 48), seed=0):
    """Smooth anatomy plus spatially correlated noise (as a resampled MRI has)."""
    rng = np.random.default_rng(seed)
    anatomy = gaussian_filter(rng.standard_normal(shape), 6) * 20
    return anatomy + gaussian_filter(rng.standard_normal(shape), 0.7) * 1.5, anatomy


def test_scanner_noise_restores_the_roughness_of_the_tissue_around_a_smooth_hole():
    scan, anatomy = noisy_scan()
    hole = ball(scan.shape, 8)
    healthy = ball(scan.shape, 20) & ~ball(scan.shape, 13)
    filled = np.where(hole, anatomy, scan)  # a smooth fill, as the inpainting network gives
    noise = scanner_noise(filled, hole, healthy, seed=1)
    assert np.all(noise[~hole] == 0)
    wanted = highpass(scan)[healthy].std()
    before, after = highpass(filled)[hole].std(), highpass(filled + noise)[hole].std()
    assert before < 0.5 * wanted
    assert abs(after / wanted - 1) < 0.15, (before, after, wanted)
    np.testing.assert_array_equal(noise, scanner_noise(filled, hole, healthy, seed=1))
    assert not np.array_equal(noise, scanner_noise(filled, hole, healthy, seed=2))
    # a hole that already has the scan's noise gets none
    assert np.abs(scanner_noise(scan, hole, healthy, seed=1)).max() < 0.3 * wanted


def test_pull_levels_moves_each_subregion_mean_by_the_fraction():
    shape = (40, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[ball(shape, 14)] = EDEMA
    labels[ball(shape, 9)] = ENHANCING
    labels[ball(shape, 5)] = CORE
    image = np.random.default_rng(0).normal(0.0, 0.3, shape).astype(np.float32)
    levels = {"core": -2.0, "edema": 1.5, "enhancing": 3.0, "whole": 1.0}
    assert not pull_levels(image, labels, levels, 0.0).any()
    for pull in (0.5, 1.0):
        shifted = image + pull_levels(image, labels, levels, pull)
        for lab, key in ((CORE, "core"), (EDEMA, "edema"), (ENHANCING, "enhancing")):
            sel = labels == lab
            expected = image[sel].mean() + pull * (levels[key] - image[sel].mean())
            assert abs(shifted[sel].mean() - expected) < 1e-4, (key, pull)
    whole = image + pull_levels(image, labels, levels, 1.0, whole_lesion=True)
    assert abs(whole[labels > 0].mean() - levels["whole"]) < 1e-4
    assert np.ptp(whole[labels == ENHANCING] - image[labels == ENHANCING]) < 0.2  # one shift, not per sub-region


def test_population_levels_are_voxel_weighted_means_per_subregion():
    seg = np.array([[[0, CORE, CORE, EDEMA]]], np.uint8)
    a = {"t1": np.array([[[9.0, 1.0, 3.0, 5.0]]])}
    b = {"t1": np.array([[[9.0, 7.0, 0.0, 0.0]]]), "flair": np.array([[[0.0, 4.0, 4.0, 4.0]]])}
    seg_b = np.array([[[0, CORE, 0, 0]]], np.uint8)
    levels = population_levels([(a, seg), (b, seg_b)])
    assert levels["t1"] == {"core": round((1 + 3 + 7) / 3, 4), "edema": 5.0, "whole": 4.0}
    assert levels["flair"] == {"core": 4.0, "whole": 4.0}


def lesion_means_z(result, head, modality):
    labels = result.mask.array
    norm = IntensityNormalizer.fit(head.array, exclude=labels > 0)
    z = norm.forward(result.images[modality].array)
    return {key: float(z[labels == lab].mean()) for lab, key in ((CORE, "core"), (EDEMA, "edema"),
                                                                 (ENHANCING, "enhancing"))}


def test_synthesize_pulls_subregion_levels_towards_the_card_population():
    from scripted_models.pathosyn.deviation import WEIGHTS_NAME
    from scripted_models.weights import load_card

    card = load_card(WEIGHTS_NAME)
    head = make_head(shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), dtype=np.float32)
    mask = make_ball_mask(head, radius_vox=10)
    reference = 0.0  # the card's levels are offsets from the tissue ring around the lesion (z-units)
    if card.get("population_level_reference") == "ring":
        norm = IntensityNormalizer.fit(head.array, exclude=mask.array > 0)
        ring = level_ring(mask.array > 0, (1.0, 1.0, 1.0)) & (head.array > 0)
        reference = float(norm.forward(head.array)[ring].mean())
    free, pulled = (synthesize_lesion({"flair": head, "t1c": head}, mask, seed=2, steps=2, population_pull=p)
                    for p in (0.0, 1.0))
    assert free.report["population_pull"] == 0.0 and pulled.report["population_pull"] == 1.0
    for m in ("flair", "t1c"):
        before, after = lesion_means_z(free, head, m), lesion_means_z(pulled, head, m)
        for key in before:
            target = reference + card["population_levels"][m][key]
            assert abs(after[key] - target) < 0.02 + 0.1 * abs(before[key] - target), (m, key)
    default = synthesize_lesion({"flair": head}, mask, seed=2, steps=2)
    assert default.report["population_pull"] == load_card(WEIGHTS_NAME)["population_pull"]
    with pytest.raises(InputError, match="population_pull"):
        synthesize_lesion({"flair": head}, mask, seed=2, steps=2, population_pull=1.5)


def test_level_ring_is_the_foreground_shell_4_to_12_mm_around_the_lesion():
    shape = (60, 60, 60)
    lesion = ball(shape, 8)
    foreground = np.ones(shape, bool)
    foreground[:, :, :30] = False
    ring = level_ring(lesion, (1.0, 1.0, 1.0), foreground)
    dist = np.sqrt(sum((g - 30) ** 2 for g in np.ogrid[:60, :60, :60]))
    assert not (ring & lesion).any() and not (ring & ~foreground).any()
    assert ring[(dist > 8 + 4.5) & (dist < 8 + 11.5) & foreground].all()
    assert not ring[(dist < 8 + 3.5) | (dist > 8 + 12.5)].any()


def test_ring_reference_pulls_levels_towards_offsets_from_the_scan_s_own_surrounding_tissue(tmp_path):
    """Card `population_level_reference: ring`: the target level is this scan's ring mean + the card's offset, so
    a brighter surrounding gives a brighter lesion by the same amount (z-units)."""
    import shutil

    from scripted_models.pathosyn.deviation import WEIGHTS_NAME
    from scripted_models.weights import load_card, weights_dir, write_card

    shutil.copy(weights_dir() / f"{WEIGHTS_NAME}.safetensors", tmp_path)
    offsets = {"core": -1.0, "edema": 0.5, "enhancing": 2.0, "whole": 0.5}
    card = load_card(WEIGHTS_NAME)
    card.update(population_level_reference="ring", population_levels={"t1": offsets}, population_pull=1.0)
    write_card(WEIGHTS_NAME, card, tmp_path)
    head = make_head(shape=(64, 64, 64), spacing=(1.0, 1.0, 1.0), dtype=np.float32)
    mask = make_ball_mask(head, radius_vox=8)
    lesion = mask.array > 0
    near = level_ring(lesion, (1.0, 1.0, 1.0))
    ring_means = []
    for brighter in (0.0, 80.0):  # the tissue around the lesion brighter than the rest of the head
        scan = head.with_array(np.where(dilate_mm(lesion, 13.0, (1.0, 1.0, 1.0)) & (head.array > 0),
                                        head.array + brighter, head.array).astype(np.float32))
        result = synthesize_lesion({"t1": scan}, mask, seed=3, steps=2, deviation_weights=tmp_path)
        assert result.report["population_level_reference"] == "ring"
        norm = IntensityNormalizer.fit(scan.array, exclude=lesion)
        z = norm.forward(result.images["t1"].array)
        ring_mean = float(norm.forward(scan.array)[near & (scan.array > 0)].mean())
        ring_means.append(ring_mean)
        for lab, key in ((CORE, "core"), (EDEMA, "edema"), (ENHANCING, "enhancing")):
            assert abs(float(z[mask.array == lab].mean()) - (ring_mean + offsets[key])) < 0.1, (brighter, key)
    assert ring_means[1] - ring_means[0] > 0.5


def test_pseudo_healthy_fill_gets_the_scan_noise_back_and_only_inside_the_hole():
    head = make_head(shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), dtype=np.float32)
    mask = make_ball_mask(head, radius_vox=8, labels=False)
    lesioned = np.where(mask.array > 0, head.array + 300, head.array).astype(np.float32)
    inputs = {"t1": head.with_array(lesioned)}
    smooth = pseudo_healthy(inputs, mask, scanner_noise=False)["t1"].array
    noisy = pseudo_healthy(inputs, mask, seed=4)["t1"].array
    np.testing.assert_array_equal(noisy, pseudo_healthy(inputs, mask, seed=4)["t1"].array)
    hole = dilate_mm(mask.array > 0, 2.0, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(noisy[~hole], lesioned[~hole])
    inner = mask.array > 0
    tissue = highpass(head.array)[ball(head.shape, 16) & ~hole].std()
    assert highpass(smooth)[inner].std() < 0.6 * tissue
    assert abs(highpass(noisy)[inner].std() / tissue - 1) < 0.3
    assert abs(noisy[inner].mean() - smooth[inner].mean()) < 0.5 * tissue  # noise, not a level change


def test_texture_match_scales_the_base_texture_by_what_the_population_ratio_leaves_after_the_residual():
    scan, anatomy = noisy_scan(seed=3)  # base = healthy anatomy + its fine texture
    lesion = ball(scan.shape, 12)
    inner = ball(scan.shape, 10)
    s_base = robust_std(highpass(scan)[lesion])
    smooth_residual = gaussian_filter(np.where(lesion, 2.0, 0.0), 3.0)  # a lesion level, no texture of its own
    rng = np.random.default_rng(5)
    rough_residual = smooth_residual + gaussian_filter(rng.standard_normal(scan.shape), 0.7) * 0.75
    measured = []
    for residual in (smooth_residual, rough_residual):
        s_res = robust_std(highpass(residual)[lesion])
        for ratio in (0.3, 0.7):
            field = texture_match(scan, residual, lesion, ratio)
            keep = np.sqrt(max(ratio ** 2 - (s_res / s_base) ** 2, 0.0))
            np.testing.assert_allclose(field, -(1 - keep) * highpass(scan), atol=1e-5)
            out = robust_std(highpass(scan + residual + field)[inner])
            assert ratio * s_base * 0.95 < out < s_base, (ratio, out / s_base)
            measured.append(out)
    assert measured[0] < measured[1] and measured[2] < measured[3]  # a lower ratio: a smoother lesion
    assert measured[0] < measured[2]  # the residual's own texture counts: less of the base's is kept
    # a residual already as rough as asked: none of the base's texture is kept
    np.testing.assert_allclose(texture_match(scan, scan - anatomy, lesion, 0.7), -highpass(scan), atol=1e-5)
    # attenuation only: a ratio of 1 or more, or a tiny lesion, change nothing
    assert not texture_match(scan, smooth_residual, lesion, 1.3).any()
    assert not texture_match(scan, smooth_residual, ball(scan.shape, 2), 0.5).any()


def test_lesion_texture_ratio_measures_a_smoother_lesion():
    scan, anatomy = noisy_scan(seed=6)
    lesion = ball(scan.shape, 9)
    head = np.ones(scan.shape, bool)
    assert lesion_texture_ratio(scan, lesion, head, (1.0, 1.0, 1.0)) == pytest.approx(1.0, abs=0.15)
    smoother = np.where(lesion, anatomy + 0.5 * (scan - anatomy), scan)
    assert lesion_texture_ratio(smoother, lesion, head, (1.0, 1.0, 1.0)) == pytest.approx(0.5, abs=0.1)
    assert lesion_texture_ratio(scan, ball(scan.shape, 2), head, (1.0, 1.0, 1.0)) is None


def test_synthesize_matches_lesion_texture_to_the_card_population_only_inside_the_region():
    from scripted_models.pathosyn.deviation import WEIGHTS_NAME
    from scripted_models.weights import load_card

    ratios = load_card(WEIGHTS_NAME)["population_texture"]
    assert ratios["t1"] < 1.0
    rng = np.random.default_rng(2)
    head = make_head(shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), dtype=np.float32)
    textured = head.array + (gaussian_filter(rng.standard_normal(head.shape), 0.7) * 40).astype(np.float32)
    head = head.with_array(textured)
    mask = make_ball_mask(head, radius_vox=10, labels=False)
    plain, matched = (synthesize_lesion({"t1": head}, mask, seed=1, steps=2, texture_match=t) for t in (False, True))
    assert plain.report["texture_match"] == {} and matched.report["texture_match"] == {"t1": ratios["t1"]}
    region = dilate_mm(mask.array > 0, 6.0, (1.0, 1.0, 1.0))
    a, b = plain.images["t1"].array, matched.images["t1"].array
    np.testing.assert_array_equal(a[~region], b[~region])  # outside the blend region: untouched
    inner = ball(head.shape, 8, [n // 2 for n in head.shape])
    assert robust_std(highpass(b)[inner]) < 0.9 * robust_std(highpass(a)[inner])  # smoother t1 lesion
    assert abs(float(b[inner].mean()) - float(a[inner].mean())) < 0.1 * float(a[inner].std())  # level kept


def test_smooth_fill_low_passes_deep_in_the_hole_keeps_its_border_and_leaves_the_outside():
    from scipy.ndimage import distance_transform_edt, laplace

    from scripted_models.pathosyn.anatomy import smooth_fill

    rng = np.random.default_rng(0)
    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    hole = ball(shape, 14)
    fills = np.stack([gaussian_filter(rng.standard_normal(shape), 1.5) * 10 + 3.0 for _ in range(2)]).astype(np.float32)
    out = smooth_fill(fills, hole, spacing, sigma_mm=6.0, onset_mm=0.0, length_mm=2.0)
    depth = distance_transform_edt(hole, sampling=spacing)
    assert np.array_equal(out[:, ~hole], fills[:, ~hole])
    deep, border = depth > 6, hole & (depth <= 1.0)
    for raw, new in zip(fills, out):
        assert laplace(new)[deep].std() < 0.2 * laplace(raw)[deep].std()
        # within 1 mm of the border the fill keeps most of its own detail
        assert np.abs(new - raw)[border].mean() < 0.7 * np.abs(raw - raw[hole].mean())[border].mean()
        assert abs(new[hole].mean() - raw[hole].mean()) < 0.2


def _hole_problem(large: bool, rng, guess_noise: float):
    """A fill_smoothing_holes-like hole: smooth truth; the fill follows it near the border and adds a structured
    guess (lowpass of a noise field) deeper than 3 mm."""
    depth = rng.uniform(0, 20 if large else 6, 4000).astype(np.float32)
    truth = np.sin(depth / 7.0).astype(np.float32)
    fill = truth + guess_noise * (depth > 3) * rng.standard_normal(depth.size).astype(np.float32)
    lowpass = {s: truth + 0.02 * s for s in (4.0, 8.0, 12.0, 16.0)}  # a smoothed fill: the truth, slightly biased
    return {"case": "c", "large": large, "depth": depth,
            "modalities": {"t1": {"truth": truth, "fill": fill, "lowpass": lowpass}}}


def test_fill_smoothing_fit_prefers_the_lowpass_where_the_fill_guesses_and_none_where_it_is_right():
    from scripted_models.pathosyn.calibration import fill_smoothing_errors, fit_fill_smoothing

    rng = np.random.default_rng(0)
    guessing = [_hole_problem(large, rng, 1.0) for large in (False, False, True, True)]
    fit = fit_fill_smoothing(guessing)
    assert fit["setting"] is not None and fit["setting"]["sigma_mm"] == 4.0  # the least biased lowpass
    assert fit["setting"]["onset_mm"] <= 4.0  # the guess starts at 3 mm
    assert fit["fitted"]["objective"] < 0.2 * fit["raw_fill"]["objective"]
    assert fit["holes"] == {"small": 2, "lesion_sized": 2}
    small, large = fill_smoothing_errors(guessing, None)
    assert large > small > 0.3  # the raw fill: deeper holes guess more
    exact = [_hole_problem(large, rng, 0.0) for large in (False, True)]
    assert fit_fill_smoothing(exact)["setting"] is None  # the fill is the truth: nothing beats it


def _weights_with_fill_smoothing(tmp_path, setting, name="weights", **extra):
    import json
    import shutil

    from scripted_models.weights import weights_dir

    folder = tmp_path / name
    folder.mkdir()
    for f in weights_dir().iterdir():
        if f.suffix in (".json", ".safetensors"):
            (folder / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, folder / f.name)
    card = json.loads((folder / "anatomy_inpainter.json").read_text())
    card["fill_smoothing"] = {"setting": setting, **extra}
    (folder / "anatomy_inpainter.json").write_text(json.dumps(card))
    return folder


def test_pseudo_healthy_low_passes_a_deep_fill_by_the_card_and_synthesis_bases_keep_the_network_fill(
        tmp_path, monkeypatch):
    from scipy.ndimage import distance_transform_edt, laplace

    head = make_head(shape=(56, 56, 56), spacing=(1.0, 1.0, 1.0), dtype=np.float32)
    mask = make_ball_mask(head, radius_vox=12, labels=False)
    lesioned = np.where(mask.array > 0, head.array + 300, head.array).astype(np.float32)
    inputs = {"t1": head.with_array(lesioned)}
    plain = pseudo_healthy(inputs, mask, scanner_noise=False, smooth_deep_fill=False)["t1"].array
    synth = synthesize_lesion(inputs, make_ball_mask(head, radius_vox=12), seed=1, steps=2, base="pseudo-healthy")
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(_weights_with_fill_smoothing(tmp_path, {
        "sigma_mm": 6.0, "onset_mm": 0.0, "length_mm": 2.0})))
    smoothed = pseudo_healthy(inputs, mask, scanner_noise=False)["t1"].array
    hole = dilate_mm(mask.array > 0, 2.0, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(smoothed[~hole], lesioned[~hole])
    deep = distance_transform_edt(hole) > 6
    assert laplace(smoothed)[deep].std() < 0.5 * laplace(plain)[deep].std()
    np.testing.assert_array_equal(pseudo_healthy(inputs, mask, scanner_noise=False, smooth_deep_fill=False)["t1"].array,
                                  plain)
    again = synthesize_lesion(inputs, make_ball_mask(head, radius_vox=12), seed=1, steps=2, base="pseudo-healthy")
    np.testing.assert_array_equal(again.images["t1"].array, synth.images["t1"].array)
    # a smoothing fitted for another network's weights is not applied
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(_weights_with_fill_smoothing(tmp_path, {
        "sigma_mm": 6.0, "onset_mm": 0.0, "length_mm": 2.0}, name="stale", weights_sha256="0" * 64)))
    np.testing.assert_array_equal(pseudo_healthy(inputs, mask, scanner_noise=False)["t1"].array, plain)
