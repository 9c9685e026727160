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
  weights' card. With the card's `population_level_reference: ring` the population level is an offset from the
  mean of the tissue 4-12 mm around the lesion (`level_ring`), so the level follows the case's own surroundings.
- **Lesion texture.** Inside the lesion the base keeps the healthy tissue's fine texture (its own, or the
  restored scanner noise), but real lesions differ from it per modality: on the training fold a t1 lesion's
  fine texture is 0.72x the surrounding tissue's, t2 0.89x, flair 0.92x, t1c 1.31x. `texture_match` scales the
  base's fine texture inside the lesion so that base + residual has the population's ratio (card
  `population_texture`); it only attenuates (healthy texture amplified is not lesion texture: measured worse).
- **Fill smoothing** (lesion removal only). Deep in a lesion-sized hole the anatomy network draws confident
  structure where it can only guess: on the training fold its fill there was further from the truth than the
  same fill low-passed. `fit_fill_smoothing` chooses, on the training fold's holes, how far from the hole's
  border the fill is low-passed and how strongly (anatomy card `fill_smoothing`; `anatomy.smooth_fill`).
"""
from __future__ import annotations

import numpy as np

from ..labels import CORE, EDEMA, ENHANCING

SUBREGION_KEYS = {CORE: "core", EDEMA: "edema", ENHANCING: "enhancing"}
WHOLE = "whole"
NOISE_HIGHPASS_SIGMA = 1.0  # voxels: the band whose std is matched (the realism texture measure's band)
DEFAULT_POPULATION_PULL = 0.75  # chosen on the validation fold with the ring reference (0.5, 0.75): docs/RESULTS.md
DEFAULT_LEVEL_REFERENCE = "ring"  # population levels as offsets from the tissue around the lesion (else "healthy")
LEVEL_SHIFT_SMOOTHING = 1.0  # voxels: sub-region level shifts are softened at their borders
TEXTURE_RING_MM = (6.0, 16.0)  # healthy tissue this far around a lesion is its texture reference
MIN_TEXTURE_VOXELS = 64  # fewer lesion voxels: too few to measure a texture, nothing is changed
LEVEL_RING_MM = (4.0, 12.0)  # the `ring` level reference: tissue this far around a lesion


def highpass(image: np.ndarray, sigma: float = NOISE_HIGHPASS_SIGMA) -> np.ndarray:
    from scipy.ndimage import gaussian_filter  # here: the front ends import this module for its defaults

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


def level_ring(lesion: np.ndarray | None, spacing_zyx, foreground: np.ndarray | None = None,
               lesion_distance=None) -> np.ndarray:
    """The tissue LEVEL_RING_MM around a lesion (in the foreground, when given): the `ring` level reference.
    `lesion_distance`: the lesion's `DistanceFromMask` with reach >= 12 mm, if already computed."""
    from ..preprocess import DistanceFromMask

    distance = lesion_distance or DistanceFromMask(lesion, spacing_zyx, max(LEVEL_RING_MM))
    near, far = (distance.dilate(mm) for mm in LEVEL_RING_MM)
    ring = far & ~near
    return ring if foreground is None else ring & foreground


def case_levels(case_ids, data_root, on_case=None, reference: str = "healthy") -> dict[str, dict[str, float]]:
    """population_levels of labelled cases of ../shared/data (cases without sub-region labels are skipped),
    loading one case at a time; `on_case(case_id, case)` sees each case used. reference "ring": each level as
    an offset from the case's mean over `level_ring`."""
    from pathlib import Path

    from ..cases import load_case

    def cases():
        for case_id in case_ids:
            case = load_case(Path(data_root) / "cases" / case_id)
            if case.seg is None or case.binary_only:
                continue
            if on_case:
                on_case(case_id, case)
            images = case.normalized()
            if reference == "ring":
                ring = level_ring(case.seg > 0, case.spacing_zyx, case.foreground())
                images = {m: z - float(z[ring].mean(dtype=np.float64)) for m, z in images.items()}
            yield images, case.seg

    return population_levels(cases())


def level_entries(case_ids, data_root, on_case=None) -> dict:
    """The deviation card's level calibration, measured on `case_ids` (the training fold): the population levels
    in the default reference, the reference and the default pull."""
    levels = case_levels(case_ids, data_root, on_case=on_case, reference=DEFAULT_LEVEL_REFERENCE)
    return {"population_levels": levels, "population_level_reference": DEFAULT_LEVEL_REFERENCE,
            "population_pull": DEFAULT_POPULATION_PULL}


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
    from scipy.ndimage import gaussian_filter

    shift = gaussian_filter(shift, LEVEL_SHIFT_SMOOTHING)  # soft borders; then each region's mean made exact
    for key, sel in regions.items():
        shift[sel] += targets[key] - float((image[sel] + shift[sel]).mean(dtype=np.float64))
    return shift.astype(np.float32)


def texture_ring(lesion: np.ndarray, spacing_zyx) -> np.ndarray:
    """The tissue TEXTURE_RING_MM around a lesion: the reference of its texture (and of the tissue scale)."""
    from ..preprocess import dilate_mm

    return dilate_mm(lesion, TEXTURE_RING_MM[1], spacing_zyx) & ~dilate_mm(lesion, TEXTURE_RING_MM[0], spacing_zyx)


def lesion_texture_ratio(image: np.ndarray, lesion: np.ndarray, head: np.ndarray, spacing_zyx) -> float | None:
    """Fine-texture (high-pass, robust) std inside the lesion (one voxel in from its border) over that of the
    healthy tissue 6-16 mm around it, in the head; None when either has too few voxels."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(lesion, iterations=1)
    ring = texture_ring(lesion, spacing_zyx) & binary_erosion(head, iterations=3)  # not the head's border
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


FILL_SMOOTHING_GRID = {"sigma_mm": (4.0, 8.0, 12.0, 16.0), "onset_mm": (0.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0),
                       "length_mm": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)}


def fill_smoothing_holes(case_ids, data_root, ellipsoids: int = 2, seed: int = 123, device: str = "cpu",
                         on_hole=None, weights=None) -> list[dict]:
    """Inpainting problems with a known truth on labelled cases (evaluation.validation.inpainting_holes:
    healthy-tissue ellipsoids and the tumour mirrored into the healthy hemisphere), filled by the anatomy
    network of `weights` (None = bundled; smooth, unsmoothed). Per hole, at the scored voxels, in z-units of the
    case's healthy tissue: the depth (mm) and per modality the truth, the fill and the fill low-passed at each grid
    sigma."""
    from pathlib import Path

    from ..cases import load_case
    from ..errors import InputError
    from ..evaluation.validation import inpainting_holes
    from ..preprocess import dilate_mm
    from .anatomy import _wide_gaussian, depth_in_hole, lowpass_in_hole
    from .api import HOLE_MARGIN_MM, pseudo_healthy

    rng = np.random.default_rng(seed)
    holes = []
    for case_id in case_ids:
        case = load_case(Path(data_root) / "cases" / case_id)
        if not case.images or case.seg is None:
            continue
        brain, lesion = case.foreground(), case.seg > 0
        for target, hole, large in inpainting_holes(brain, lesion, case.spacing_zyx, rng, ellipsoids, True):
            images = {m: v.with_array(np.where(hole, 0, v.array).astype(np.float32)) for m, v in case.images.items()}
            try:
                filled = pseudo_healthy(images, case.reference.with_array(hole.astype(np.uint8)), device=device,
                                        scanner_noise=False, smooth_deep_fill=False, anatomy_weights=weights)
            except InputError:  # a hole too large for the head (tumour and mirror together)
                continue
            region = dilate_mm(hole, HOLE_MARGIN_MM, case.spacing_zyx)  # what the inpainter filled
            healthy = brain & ~region & ~lesion
            sigmas = {s: [s / d for d in case.spacing_zyx] for s in FILL_SMOOTHING_GRID["sigma_mm"]}
            supports = {s: _wide_gaussian(region.astype(np.float32), sigma) for s, sigma in sigmas.items()}
            row = {"case": case_id, "large": bool(large),
                   "depth": depth_in_hole(region, case.spacing_zyx)[target], "modalities": {}}
            for m, v in case.images.items():
                scale = float(v.array[healthy].std()) or 1.0
                fill = filled[m].array.astype(np.float32)
                row["modalities"][m] = {
                    "truth": v.array[target].astype(np.float32) / scale, "fill": fill[target] / scale,
                    "lowpass": {s: lowpass_in_hole(fill, region, sigma, supports[s])[target] / scale
                                for s, sigma in sigmas.items()}}
            holes.append(row)
            if on_hole:
                on_hole(row)
    return holes


def fill_smoothing_errors(holes: list[dict], setting: dict | None) -> tuple[float, float]:
    """(small holes' mean MSE, lesion-sized holes' mean MSE) with a smoothing setting (None: the raw fill);
    a hole's MSE is the mean over its modalities."""
    from .anatomy import deep_fill_keep

    small, large = [], []
    for h in holes:
        keep = deep_fill_keep(h["depth"], setting["onset_mm"], setting["length_mm"]) if setting else None
        errors = []
        for m in h["modalities"].values():
            fill = m["fill"]
            if setting:
                smooth = m["lowpass"][setting["sigma_mm"]]
                fill = smooth + keep * (fill - smooth)
            errors.append(float(np.mean((fill - m["truth"]) ** 2)))
        (large if h["large"] else small).append(float(np.mean(errors)))
    return (float(np.mean(small)) if small else float("nan"), float(np.mean(large)) if large else float("nan"))


def fit_fill_smoothing(holes: list[dict], grid: dict = FILL_SMOOTHING_GRID) -> dict:
    """The grid setting with the lowest mean of the small and the lesion-sized holes' MSE (setting None when
    the raw fill is as good), with the raw fill's scores."""
    def scored(setting):
        small, large = fill_smoothing_errors(holes, setting)
        return {"small_holes_mse": round(small, 4), "lesion_sized_holes_mse": round(large, 4),
                "objective": round((small + large) / 2, 4)}

    settings = [{"sigma_mm": s, "onset_mm": o, "length_mm": n} for s in grid["sigma_mm"] for o in grid["onset_mm"]
                for n in grid["length_mm"]]
    results = [(scored(s), s) for s in settings]
    best_score, best = min(results, key=lambda r: r[0]["objective"])
    raw = scored(None)
    if raw["objective"] <= best_score["objective"]:
        best, best_score = None, raw
    return {"setting": best, "fitted": best_score, "raw_fill": raw,
            "holes": {"small": sum(not h["large"] for h in holes), "lesion_sized": sum(h["large"] for h in holes)},
            "grid": {k: list(v) for k, v in grid.items()}}
