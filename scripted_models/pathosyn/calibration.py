"""Calibration after the networks: the scan's noise in an inpainted hole, and lesion levels pulled towards the
training population.

- **Scanner noise.** The anatomy network's inpainting is smooth (it predicts the expected healthy tissue), so
  an inpainted hole lacks the scan's noise: its fine texture was 0.3x that of the tissue around it. The
  hole gets a top-up of noise with the power spectrum of the high-passed healthy tissue around it (random
  phases, seeded), sized so that the hole's high-pass std matches that tissue's. A hole that already has
  the scan's noise gets none.
- **Population pull.** Lesion intensity varies more between real cases than any scan feature predicts (see
  docs/RESULTS.md, normalisation study), and a sampled level is one draw of that spread. `pull_levels` moves
  each sub-region's mean towards the training population's mean by a fraction (0 = as sampled, 1 = the
  population mean), keeping the sampled structure and texture: the truncation trick of generative models,
  for lesion levels. The population means (z-units of the case's healthy tissue) are stored in the deviation
  weights' card.
- **Lesion texture.** Inside the lesion the base keeps the healthy tissue's fine texture (its own, or the
  restored scanner noise), but real lesions differ from it per modality: on the training fold a t1 lesion's
  fine texture is 0.72x the surrounding tissue's, t2 0.89x, flair 0.92x, t1c 1.31x. `texture_match` scales the
  base's fine texture inside the lesion so that base + residual has the population's ratio (card
  `population_texture`); it only attenuates (healthy texture amplified is not lesion texture: measured worse).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..labels import CORE, EDEMA, ENHANCING

SUBREGION_KEYS = {CORE: "core", EDEMA: "edema", ENHANCING: "enhancing"}
WHOLE = "whole"
NOISE_HIGHPASS_SIGMA = 1.0  # voxels: the band whose std is matched (the realism texture measure's band)
DEFAULT_POPULATION_PULL = 0.5  # chosen on the validation fold (0, 0.25, 0.5, 0.75, 1 tried): docs/RESULTS.md
LEVEL_SHIFT_SMOOTHING = 1.0  # voxels: sub-region level shifts are softened at their borders
TEXTURE_RING_MM = (6.0, 16.0)  # healthy tissue this far around a lesion is its texture reference
MIN_TEXTURE_VOXELS = 64  # fewer lesion voxels: too few to measure a texture, nothing is changed


def highpass(image: np.ndarray, sigma: float = NOISE_HIGHPASS_SIGMA) -> np.ndarray:
    image = image.astype(np.float64)
    return image - gaussian_filter(image, sigma)


def robust_std(values: np.ndarray, clip: float = 4.0) -> float:
    """Std of values clipped at `clip` x the median-absolute-deviation sigma: the tissue's texture counts, the
    strong edges of anatomy (ventricles, the brain's border) do not."""
    if not values.size:
        return 0.0
    centre = np.median(values)
    sigma = 1.4826 * float(np.median(np.abs(values - centre)))
    return float(np.clip(values, centre - clip * sigma, centre + clip * sigma).std())


def scanner_noise(image: np.ndarray, hole: np.ndarray, healthy: np.ndarray, seed: int) -> np.ndarray:
    """Noise to add inside `hole` of a (z-scored, inpainted) crop so that its high-pass (robust) std matches
    `healthy`'s: the healthy high-pass amplitude spectrum with random phases. Zero outside the hole, and zero
    when the hole is already as rough as the healthy tissue or there is no healthy tissue to learn from."""
    out = np.zeros(image.shape, np.float32)
    if healthy.sum() < 64 or not hole.any():
        return out
    texture = highpass(image)
    wanted, present = robust_std(texture[healthy]), robust_std(texture[hole])
    missing = np.sqrt(max(wanted ** 2 - present ** 2, 0.0))
    if missing <= 0.0:
        return out
    # anatomical edges in the healthy tissue (ventricles, the brain's border) would pass for noise: clipped
    sample = np.where(healthy, np.clip(texture, -4 * wanted, 4 * wanted), 0.0)
    amplitude = np.abs(np.fft.rfftn(sample))
    white = np.fft.rfftn(np.random.default_rng(seed).standard_normal(image.shape))
    field = np.fft.irfftn(amplitude * white / np.maximum(np.abs(white), 1e-12), s=image.shape)
    field *= missing / max(float(field[hole].std()), 1e-9)  # sized on the hole alone
    out[hole] = field[hole]
    return out


def population_levels(cases) -> dict[str, dict[str, float]]:
    """{modality: {core, edema, enhancing, whole: mean z-score}} over `cases`: (z-scored images dict, canonical
    labels) pairs, voxel-weighted over all cases (the realism evaluation's constant fill uses the same means)."""
    sums: dict = {}
    for images, seg in cases:
        for m, image in images.items():
            for label, key in list(SUBREGION_KEYS.items()) + [(None, WHOLE)]:
                sel = seg > 0 if label is None else seg == label
                if sel.any():
                    acc = sums.setdefault(m, {}).setdefault(key, [0.0, 0])
                    acc[0] += float(image[sel].sum(dtype=np.float64))
                    acc[1] += int(sel.sum())
    return {m: {k: round(s / n, 4) for k, (s, n) in per.items()} for m, per in sums.items()}


def case_levels(case_ids, data_root, on_case=None) -> dict[str, dict[str, float]]:
    """population_levels of labelled cases of ../shared/data (cases without sub-region labels are skipped),
    loading one case at a time; `on_case(case_id, case)` sees each case used."""
    from pathlib import Path

    from ..cases import load_case

    def cases():
        for case_id in case_ids:
            case = load_case(Path(data_root) / "cases" / case_id)
            if case.seg is None or case.binary_only:
                continue
            if on_case:
                on_case(case_id, case)
            yield case.normalized(), case.seg

    return population_levels(cases())


def pull_levels(image: np.ndarray, labels: np.ndarray, levels: dict[str, float], pull: float,
                whole_lesion: bool = False) -> np.ndarray:
    """Level shift (same shape as `image`, z-units) that moves each sub-region's mean of `image` towards the
    population level by the fraction `pull`; the whole lesion as one region when `whole_lesion` (its
    sub-regions were invented by the model, not given). Softened at region borders; the means are exact."""
    shift = np.zeros(image.shape, np.float64)
    if pull <= 0.0:
        return shift.astype(np.float32)
    regions = {WHOLE: labels > 0} if whole_lesion else {k: labels == lab for lab, k in SUBREGION_KEYS.items()}
    regions = {k: sel for k, sel in regions.items() if k in levels and sel.any()}
    targets = {}
    for key, sel in regions.items():
        mean = float(image[sel].mean(dtype=np.float64))
        targets[key] = mean + pull * (float(levels[key]) - mean)
        shift[sel] = targets[key] - mean
    if not shift.any():
        return shift.astype(np.float32)
    shift = gaussian_filter(shift, LEVEL_SHIFT_SMOOTHING)  # soft borders; then each region's mean made exact
    for key, sel in regions.items():
        shift[sel] += targets[key] - float((image[sel] + shift[sel]).mean(dtype=np.float64))
    return shift.astype(np.float32)


def lesion_texture_ratio(image: np.ndarray, lesion: np.ndarray, head: np.ndarray, spacing_zyx) -> float | None:
    """Fine-texture (high-pass, robust) std inside the lesion (one voxel in from its border) over that of the
    healthy tissue 6-16 mm around it, in the head; None when either has too few voxels."""
    from scipy.ndimage import binary_erosion

    from ..preprocess import dilate_mm

    inner = binary_erosion(lesion, iterations=1)
    ring = dilate_mm(lesion, TEXTURE_RING_MM[1], spacing_zyx) & ~dilate_mm(lesion, TEXTURE_RING_MM[0], spacing_zyx)
    ring &= binary_erosion(head, iterations=3)  # not the head's border
    if inner.sum() < MIN_TEXTURE_VOXELS or ring.sum() < MIN_TEXTURE_VOXELS:
        return None
    texture = highpass(image)
    return robust_std(texture[inner]) / max(robust_std(texture[ring]), 1e-6)


def case_texture_ratio(case) -> dict[str, float]:
    """lesion_texture_ratio per modality of a loaded labelled case, on a crop around its lesion and the ring."""
    lesion = case.seg > 0 if case.seg is not None else None
    if lesion is None or not lesion.any():
        return {}
    margin = int(np.ceil(TEXTURE_RING_MM[1] / min(case.spacing_zyx))) + 4  # the ring, then the high-pass support
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in np.nonzero(lesion))
    foreground = case.foreground()  # once: the normalisation uses it too
    ratios = {m: lesion_texture_ratio(image[box], lesion[box], foreground[box], case.spacing_zyx)
              for m, image in case.normalized(foreground).items()}
    return {m: r for m, r in ratios.items() if r is not None}


def median_texture_ratios(per_case: list[dict[str, float]]) -> dict[str, float]:
    """{modality: median over cases} of case_texture_ratio results: the card's `population_texture`."""
    modalities = sorted({m for ratios in per_case for m in ratios})
    return {m: round(float(np.median([r[m] for r in per_case if m in r])), 4) for m in modalities}


def case_texture_ratios(case_ids, data_root) -> dict[str, float]:
    """population_texture of labelled cases of ../shared/data, loading one case at a time."""
    from pathlib import Path

    from ..cases import load_case

    return median_texture_ratios([case_texture_ratio(load_case(Path(data_root) / "cases" / c)) for c in case_ids])


def texture_match(base: np.ndarray, residual: np.ndarray, lesion: np.ndarray, ratio: float) -> np.ndarray:
    """Field to add to `residual` (same shape as `base`, z-units) that scales the base's fine texture (its
    high-pass) by k in [0, 1], where k, with the residual's own fine texture inside `lesion`, would give `ratio`
    x the base's: sqrt(k^2 s_base^2 + s_res^2) = ratio s_base. (A sigma-1 high-pass is not idempotent, so the
    texture measured afterwards lands somewhat above `ratio`: k = 0.3 measures about 0.43.) Zero when the lesion
    is tiny, the base has no texture there, or the ratio asks for as much as it has or more."""
    out = np.zeros(base.shape, np.float32)
    if lesion.sum() < MIN_TEXTURE_VOXELS:
        return out
    base_texture = highpass(base)
    s_base = robust_std(base_texture[lesion])
    if s_base <= 1e-6:
        return out
    s_res = robust_std(highpass(residual)[lesion])
    keep = float(np.sqrt(max((ratio * s_base) ** 2 - s_res ** 2, 0.0))) / s_base
    if keep >= 1.0:
        return out
    return (-(1.0 - keep) * base_texture).astype(np.float32)
