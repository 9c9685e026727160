"""PathoSyn public API: arrays + geometry in, arrays out.

    from scripted_models import synthesize_lesion, read_volume
    result = synthesize_lesion({"t1": read_volume("t1.nii.gz")}, read_volume("mask.nii.gz"), seed=0)
    result.images["t1"]      # Volume, same grid and dtype family as the input
    result.residuals["t1"]   # float32 Volume, zero outside the blended region
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..labels import MODALITIES, check_modality, is_whole_lesion_only, one_hot_subregions, to_canonical
from ..preprocess import (
    DistanceFromMask,
    IntensityNormalizer,
    background_value,
    blend_weight,
    bounding_box,
    cast_like,
    dilate_mm,
    foreground_mask,
    has_constant_background,
    head_above_noise,
    resize,
    roi_around,
    roi_around_box,
    separate_rois,
)
from ..runtime import pick_device
from ..volume import (
    Volume,
    box_on_grid,
    require_volume,
    resample_box_average,
    resample_to,
    validate_image,
    working_grid,
)

ProgressFn = Callable[[float, str], None]

BLEND_MARGIN_MM = 6.0  # soft seam width around the lesion
HOLE_MARGIN_MM = 2.0  # pseudo-healthy: inpaint slightly beyond the mask
MAX_LESION_OUTSIDE = 0.10  # a larger share of the lesion outside the head gets a warning
MAX_ROI = 96  # larger lesions are scaled down to fit (with a warning)
MAX_LESION_FRACTION = 0.5  # of the head: a mask beyond this is not a lesion (real gliomas: under 20 %)

_MODELS: dict = {}


def check_seed(seed) -> int:
    """Seeds are integers in [0, 2**63): torch generators take no negative seeds."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 63:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _weights_version(folder: Path, name: str) -> tuple:
    """Identity of the weights file and its card as they are now: a folder whose weights were replaced (a
    training's candidate folder, rewritten at every check) or whose card's calibration was refitted (`pathosyn
    calibrate`) must not be served from the cache."""
    try:
        stats = [(Path(folder) / f"{name}{ext}").stat() for ext in (".safetensors", ".json")]
    except OSError:
        return ()
    return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)


def _model(kind: str, device, folder=None):
    from ..weights import weights_dir
    from .anatomy import WEIGHTS_NAME as ANATOMY_WEIGHTS
    from .deviation import WEIGHTS_NAME as DEVIATION_WEIGHTS

    folder = Path(folder or weights_dir())
    name = ANATOMY_WEIGHTS if kind == "anatomy" else DEVIATION_WEIGHTS
    key = (kind, str(device), str(folder), _weights_version(folder, name))
    if key not in _MODELS:
        for stale in [k for k in _MODELS if k[:3] == key[:3]]:  # older weights of the same folder
            del _MODELS[stale]
        if kind == "anatomy":
            from .anatomy import AnatomyModel

            _MODELS[key] = AnatomyModel.load(device, folder)
        else:
            from .deviation import DeviationModel

            _MODELS[key] = DeviationModel.load(device, folder)
    return _MODELS[key]


@dataclass
class SynthesisResult:
    images: dict[str, Volume]
    residuals: dict[str, Volume]
    uncertainty: dict[str, Volume] | None
    mask: Volume  # canonical labels on the image grid
    report: dict = field(default_factory=dict)


STATS_STRIDE = 2  # intensity statistics from every 2nd voxel per axis: same z-scores to <0.5%, 8x less work


@dataclass
class _Prepared:
    images: dict[str, Volume]
    reference: Volume
    lesion_labels: np.ndarray
    normalizers: dict[str, IntensityNormalizer]
    spacing_zyx: tuple
    head: np.ndarray | None = None  # the normalizers' foreground on the image grid: a brain mask, or the head
    # above the noise where a background is noise (None: the scan's own constant-background foreground)
    from_brain_mask: bool = False
    lesion_outside: float = 0.0  # share of the lesion outside the head (or the brain mask)
    native: dict[str, Volume] = field(default_factory=dict)  # scans on other grids than `reference`, as given
    working: str = ""  # the modality whose grid is `reference`

    @property
    def normalized(self) -> dict[str, np.ndarray]:
        """Whole z-scored volumes (only the pseudo-healthy path needs them; synthesis works on crops)."""
        return {m: self.normalizers[m].forward(v.array) for m, v in self.images.items()}

    def normalized_crop(self, modality: str, crop) -> np.ndarray:
        return self.normalizers[modality].forward(crop(self.images[modality].array))


def _levels_from_ring(offsets: dict, prep: _Prepared, lesion_distance: DistanceFromMask,
                      anatomy: dict | None) -> dict:
    """Population levels given as offsets from the tissue ring around the lesion (card
    `population_level_reference: ring`), made absolute with this scan's ring mean per modality."""
    from .calibration import level_ring

    near = level_ring(None, prep.spacing_zyx, lesion_distance=lesion_distance)
    box = bounding_box(near)
    levels = {}
    for m in (m for m in prep.images if m in offsets):
        image = prep.images[m].array
        head = image[box] != background_value(image) if prep.head is None else prep.head[box]
        ring = near[box] & head  # the head, as the fit's foreground
        if not ring.any():
            continue
        z = anatomy[m][box] if anatomy is not None else prep.normalized_crop(m, lambda a: a[box])
        mean = float(z[ring].mean(dtype=np.float64))
        levels[m] = {k: mean + float(v) for k, v in offsets[m].items()}
    return levels


def _model_shape(crop_shape, multiple: int) -> tuple[int, ...]:
    """The model's grid for a ROI: the ROI itself, or scaled down to MAX_ROI on its longest side."""
    scale = min(1.0, MAX_ROI / max(crop_shape))
    return tuple(int(max(multiple, round(s * scale / multiple) * multiple)) for s in crop_shape)


def _roi_parts(region: np.ndarray, multiple: int) -> list:
    """The blend region as parts synthesized in ROIs of their own (lesions far apart: each at full resolution),
    or [None] for one ROI around all of it. Parts only while their ROIs together hold no more model voxels than
    the largest ROI (MAX_ROI^3) or that one ROI: many small lesions never cost more than one large lesion.
    Each part is a function that makes its mask (one whole-volume mask at a time)."""
    parts, labels, tight = separate_rois(region, multiple, min_size=32)
    if len(parts) == 1:
        return [None]
    whole = int(np.prod(_model_shape(roi_around_box(tight, multiple, 32).size, multiple)))
    if sum(int(np.prod(_model_shape(box.size, multiple))) for box, _ in parts) > max(whole, MAX_ROI ** 3):
        return [None]

    def mask_of(ids):
        mask = np.zeros(region.shape, bool)
        mask[tight] = np.isin(labels, ids)
        return mask

    return [lambda ids=ids: mask_of(ids) for _, ids in parts]


def _mask_on_grid(mask: Volume, reference: Volume, what: str) -> np.ndarray:
    """A 3D, finite mask resampled onto the reference grid (nearest neighbour); `what` names it in errors."""
    require_volume(mask, what)
    if mask.array.ndim != 3:
        raise InputError(f"{what}: expected a 3D image, got {mask.array.ndim}D")
    if mask.array.dtype.kind == "f" and not np.isfinite(mask.array).all():
        raise InputError(f"{what}: contains NaN or Inf voxels")
    return resample_to(mask, reference, nearest=True).array


def brain_on_grid(brain_mask: Volume, reference: Volume) -> np.ndarray:
    """A brain mask (any non-zero voxel) on the reference grid (nearest neighbour)."""
    brain = _mask_on_grid(brain_mask, reference, "brain mask") != 0
    if not brain.any():
        raise InputError("the brain mask is empty (on the image grid)")
    return brain


def _prepare(images: dict[str, Volume], mask: Volume, label_mapping: dict | None,
             brain_mask: Volume | None = None) -> _Prepared:
    if not isinstance(images, Mapping):
        raise InputError(f"images must be a dict {{modality: Volume}}, e.g. {{'t1': volume}}, got "
                         f"{type(images).__name__}")
    if not images:
        raise InputError("no input image given")
    checked = {}
    for name, vol in images.items():
        mod = check_modality(name)
        require_volume(vol, f"images[{name!r}]")
        if mod in checked:
            raise InputError(f"modality '{mod}' given twice")
        validate_image(vol, mod)
        checked[mod] = vol
    working = working_grid(checked)
    reference = checked[working]
    constant = [has_constant_background(v.array) for v in checked.values()]  # else a raw scan: air is noise
    native = {m: v for m, v in checked.items() if not v.same_grid(reference)}
    if mask is None:
        raise InputError("no lesion mask given")
    labels = to_canonical(_mask_on_grid(mask, reference, "mask"), label_mapping)
    if not labels.any():
        raise InputError("the lesion mask is empty (on the image grid)")
    in_view = {}
    for mod, vol in native.items():  # the same subject's scan on a grid of its own: onto the working grid
        checked[mod], in_view[mod] = _resampled_scan(vol, reference)
        if not in_view[mod][labels > 0].all():
            raise InputError(f"the {mod} scan does not cover the whole lesion (its field of view ends inside the "
                             f"mask, on the {working} scan's grid): are the scans of one subject, in one space?")
    spacing_zyx = tuple(reversed(reference.spacing))
    lesion = labels > 0
    step = (slice(None, None, STATS_STRIDE),) * 3
    brain = None if brain_mask is None else brain_on_grid(brain_mask, reference)
    if brain is not None:  # the user's brain mask: the models' own units on a scan with scalp and skull
        fg = brain[step].copy()
    else:
        fg = np.zeros(lesion[step].shape, bool)  # head foreground (holes filled) on the strided grid
        for (mod, vol), flat in zip(checked.items(), constant):
            if mod not in native:
                fg |= foreground_mask(vol.array[step])
            else:  # resampled: its head where it has a view (the fill beyond is its background, not the head's)
                fg |= (foreground_mask if flat else head_above_noise)(vol.array[step]) & in_view[mod][step]
    if brain is not None:
        in_brain = bool(brain[lesion].any())
    else:
        box = bounding_box(lesion)
        z, y, x = ((np.argwhere(lesion[box]) + [b.start for b in box]) // STATS_STRIDE).T
        in_brain = bool(fg[z, y, x].any()) or any(  # tiny lesions: a lesion voxel that differs from the background
            np.any(np.abs(v.array[lesion] - background_value(v.array)) > 1e-6 * max(1.0, float(np.abs(v.array).max())))
            for v, c in zip(checked.values(), constant) if c)
    if not in_brain:
        raise InputError("the lesion mask does not overlap the brain (all mask voxels lie in the background)"
                         if brain is None else "the lesion mask does not overlap the brain mask")
    lesion_strided = lesion[step]
    outside = float((lesion_strided & ~fg).sum()) / max(float(lesion_strided.sum()), 1.0)
    covered = float(lesion_strided.sum()) / max(float(fg.sum()), 1.0)
    if covered > MAX_LESION_FRACTION:
        raise InputError(f"the lesion mask covers {100 * min(covered, 1.0):.0f}% of the head (at most "
                         f"{100 * MAX_LESION_FRACTION:.0f}%): is it a head mask rather than a lesion?")
    normalizers = {m: IntensityNormalizer.fit(v.array[step], foreground=fg, exclude=lesion[step] if m not in native
                                              else lesion[step] | ~in_view[m][step]) for m, v in checked.items()}
    head = brain
    if head is None and not all(constant):
        head = fg.repeat(STATS_STRIDE, 0).repeat(STATS_STRIDE, 1).repeat(STATS_STRIDE, 2)[
            tuple(slice(n) for n in lesion.shape)]
    return _Prepared(checked, reference, labels, normalizers, spacing_zyx, head, brain is not None, outside, native,
                     working)


def _resampled_scan(scan: Volume, reference: Volume) -> tuple[Volume, np.ndarray]:
    """(`scan` resampled linearly onto `reference`'s grid (float32; outside its field of view: its background),
    the reference voxels it covers)."""
    moved = resample_to(scan, reference, nearest=False, default=np.nan).array  # NaN: outside its field of view
    covered = ~np.isnan(moved)
    moved[~covered] = background_value(scan.array)
    return reference.with_array(moved.astype(np.float32)), covered


def _averaged_on_native(prep: _Prepared, mod: str, box: tuple, values: np.ndarray,
                        minus: np.ndarray | None = None) -> tuple[tuple, np.ndarray]:
    """(box on the scan `mod`'s own grid, `values` - `minus` (working grid, zero outside `box`) averaged over each
    of the scan's voxels there). Only `box`, grown by 2 voxels, is resampled."""
    work = prep.images[mod]
    grown = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(box, work.shape))
    part = values[grown].astype(np.float32) - (0.0 if minus is None else minus[grown])
    native_box = box_on_grid(box, work, prep.native[mod])
    return native_box, resample_box_average(work.crop(grown).with_array(part), prep.native[mod], native_box)


def _native_image(prep: _Prepared, mod: str, output: np.ndarray, box: tuple) -> tuple[Volume, np.ndarray, tuple]:
    """`output` (working grid; it differs from the input only inside `box`) as the scan `mod` on its own grid:
    (image: the scan's voxels plus the change averaged over each of its voxels, floored at its darkest voxel, and
    bit for bit the scan's where nothing changed; residual, float32; the box on the scan's grid)."""
    scan, work = prep.native[mod], prep.images[mod]
    native_box, change = _averaged_on_native(prep, mod, box, output, minus=work.array)
    values = np.maximum(scan.array[native_box].astype(np.float64) + change, float(scan.array.min()))
    moved = change != 0
    image, residual = scan.array.copy(), np.zeros(scan.shape, np.float32)
    image[native_box][moved] = cast_like(values, scan.array.dtype)[moved]
    residual[native_box][moved] = (values - scan.array[native_box])[moved]
    return scan.with_array(image), residual, native_box


def pseudo_healthy(images: dict[str, Volume], mask: Volume, device: str = "auto", label_mapping: dict | None = None,
                   progress: ProgressFn | None = None, seed: int = 0, scanner_noise: bool = True,
                   smooth_deep_fill: bool = True, anatomy_weights=None, brain_mask: Volume | None = None
                   ) -> dict[str, Volume]:
    """Remove the lesion: inpaint the (slightly dilated) mask with healthy tissue. Returns new Volumes.
    scanner_noise: give the fill the scan's noise (seeded); False returns the network's smooth expected tissue
    (what pixel-wise inpainting scores such as PSNR favour). smooth_deep_fill: low-pass the fill deep inside the
    hole (the anatomy card's `fill_smoothing`, fitted on the training fold): the best estimate of the healthy
    tissue. False gives the base that `synthesize_lesion(base="pseudo-healthy")` draws a lesion on.
    anatomy_weights: a folder with other anatomy weights (None = bundled). brain_mask: see synthesize_lesion."""
    check_seed(seed)
    prep = _prepare(images, mask, label_mapping, brain_mask)
    dev = pick_device(device)
    if progress:
        progress(0.1, "loading anatomy model")
    model = _model("anatomy", dev, anatomy_weights)
    hole = dilate_mm(prep.lesion_labels > 0, HOLE_MARGIN_MM, prep.spacing_zyx)
    if progress:
        progress(0.3, "inpainting healthy tissue")
    filled = model.inpaint(prep.normalized, hole, prep.spacing_zyx, noise_seed=seed if scanner_noise else None,
                           smooth_deep_fill=smooth_deep_fill, head=prep.head)
    out = {}
    for m, vol in prep.images.items():
        restored = cast_like(prep.normalizers[m].inverse(filled[m]), vol.array.dtype)
        result = vol.array.copy()
        result[hole] = restored[hole]
        out[m] = vol.with_array(result) if m not in prep.native else \
            _native_image(prep, m, result, bounding_box(hole))[0]
    if progress:
        progress(1.0, "done")
    return out


def synthesize_lesion(images: dict[str, Volume], mask: Volume, seed: int = 0, samples: int = 1,
                      steps: int | None = None, guidance: float = 1.0, device: str = "auto",
                      base: str = "input", whole_lesion: bool | None = None, label_mapping: dict | None = None,
                      progress: ProgressFn | None = None, deviation_weights=None,
                      population_pull: float | None = None, texture_match: bool = True,
                      brain_mask: Volume | None = None) -> SynthesisResult:
    """Add a synthetic lesion to healthy scan(s): output = anatomy + residual inside the blended region.

    population_pull: move each sub-region's mean level towards the training population's by this fraction
    (0 = as sampled, most diverse; 1 = the population mean); None = the value in the weights' card.
    texture_match: give the lesion the population's fine texture relative to healthy tissue (card
    `population_texture`; weights without it are left as sampled), by attenuating the base's texture there.

    base: "input" (the scan is healthy, so it is its own anatomy) or "pseudo-healthy" (remove an existing
    lesion first). whole_lesion: None infers it from the mask (binary -> the model invents sub-regions).
    brain_mask: the brain (non-zero voxels, any grid). Intensities are then normalised over it, as on the
    skull-stripped scans the models learned, also on a scan with scalp and skull (None: over the scan's head,
    with a warning on such scans).
    Voxels outside the dilated lesion region are copied from the input bit for bit.
    """
    t_start = time.perf_counter()
    check_seed(seed)
    check_count(samples, "samples")
    if steps is not None:
        check_count(steps, "steps")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not np.isfinite(guidance) \
            or guidance < 0:
        raise InputError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if population_pull is not None and not (np.isfinite(population_pull) and 0.0 <= population_pull <= 1.0):
        raise InputError(f"population_pull must be a number from 0 to 1, got {population_pull}")
    if base not in ("input", "pseudo-healthy"):
        raise InputError(f"base must be 'input' or 'pseudo-healthy', got '{base}'")
    prep = _prepare(images, mask, label_mapping, brain_mask)
    dev = pick_device(device)
    say = progress or (lambda f, m: None)
    say(0.02, "loading models")
    model = _model("deviation", dev, deviation_weights)
    cfg = model.cfg
    warn = []
    if prep.head is not None and not prep.from_brain_mask:
        msg = ("the background is noise, not one value (a raw scan, not skull-stripped): intensities are normalised "
               "over the whole head, scalp and skull included, so lesion contrast may come out too strong (the "
               "models learned skull-stripped scans; give a brain mask to normalise over the brain)")
        warnings.warn(msg, stacklevel=2)
        warn.append(msg)
    if prep.lesion_outside > MAX_LESION_OUTSIDE:
        where = "the brain mask" if prep.from_brain_mask else "the head (in the background)"
        msg = f"{100 * prep.lesion_outside:.0f}% of the lesion mask lies outside {where}: a lesion is drawn there too"
        warnings.warn(msg, stacklevel=2)
        warn.append(msg)

    from .calibration import LEVEL_RING_MM

    lesion = prep.lesion_labels > 0
    # one distance transform for every margin around the lesion below
    lesion_distance = DistanceFromMask(lesion, prep.spacing_zyx, max(BLEND_MARGIN_MM, HOLE_MARGIN_MM, *LEVEL_RING_MM))
    anatomy = None  # whole z-scored volumes, only for a pseudo-healthy base; otherwise crops are normalised
    if base == "pseudo-healthy":
        say(0.05, "building pseudo-healthy anatomy")
        hole = lesion_distance.dilate(HOLE_MARGIN_MM)
        anatomy = _model("anatomy", dev).inpaint(prep.normalized, hole, prep.spacing_zyx, noise_seed=seed,
                                                  head=prep.head)

    def anatomy_crop(m: str, crop):
        return crop(anatomy[m]) if anatomy is not None else prep.normalized_crop(m, crop)

    region = lesion_distance.dilate(BLEND_MARGIN_MM)
    whole_only = is_whole_lesion_only(prep.lesion_labels) if whole_lesion is None else bool(whole_lesion)
    parts = _roi_parts(region, cfg.multiple)
    levels_card = model.card.get("population_levels") or {}
    level_reference = model.card.get("population_level_reference", "healthy")
    pull = float(model.card.get("population_pull", 0.0) if population_pull is None else population_pull)
    textures = (model.card.get("population_texture") or {}) if texture_match else {}

    from .calibration import pull_levels
    from .calibration import texture_match as match
    from .deviation import deviation_condition

    available = np.array([m in prep.images for m in MODALITIES], np.float32)
    out_images = {m: vol.array.copy() for m, vol in prep.images.items()}
    out_residuals = {m: np.zeros(vol.shape, np.float32) for m, vol in prep.images.items()}
    out_std = {m: np.zeros(vol.shape, np.float32) for m, vol in prep.images.items()} if samples > 1 else {}
    rois, t_model, levels_used = [], 0.0, False
    for index, part in enumerate(parts):
        if part is None:  # the whole region in one box
            part_labels, part_distance, part_region = prep.lesion_labels, lesion_distance, region
        else:
            part_region = part()
            part_labels = np.where(part_region, prep.lesion_labels, 0).astype(prep.lesion_labels.dtype)
            part_distance = DistanceFromMask(part_labels > 0, prep.spacing_zyx, lesion_distance.reach_mm)
        box = roi_around(part_region, multiple=cfg.multiple, min_size=32)
        crop_shape = box.size
        scale = min(1.0, MAX_ROI / max(crop_shape))
        if scale < 1.0:
            msg = f"lesion ROI {crop_shape} exceeds {MAX_ROI}^3: synthesizing at {scale:.2f}x resolution"
            warnings.warn(msg, stacklevel=2)
            warn.append(msg)
        model_shape = _model_shape(crop_shape, cfg.multiple)

        anatomy_roi = np.stack([anatomy_crop(m, box.crop) if m in prep.images else np.zeros(crop_shape, np.float32)
                                for m in MODALITIES])
        labels_roi = box.crop(part_labels, mode="constant")
        lesion_roi = labels_roi > 0
        region_roi = box.crop(part_region, mode="constant")
        weight_roi = blend_weight(lesion_roi, region_roi, prep.spacing_zyx, part_distance.crop(box))
        subregions_roi = one_hot_subregions(labels_roi, whole_only)
        if scale < 1.0:
            anatomy_in = resize(anatomy_roi, model_shape, order=1)
            subregions_in = resize(subregions_roi, model_shape, order=0)
            weight_in = resize(weight_roi, model_shape, order=1)
        else:
            anatomy_in, subregions_in, weight_in = anatomy_roi, subregions_roi, weight_roi
        condition = deviation_condition(anatomy_in, available, subregions_in, weight_in, cfg.anatomy_condition)
        t_part = time.perf_counter()
        part_seed = seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        residuals = model.sample(condition, samples=samples, seed=part_seed, steps=steps, guidance=guidance,
                                 progress=lambda f, m, i=index: say(0.08 + 0.87 * (i + f) / len(parts), m))
        t_model += time.perf_counter() - t_part
        if cfg.target == "image":  # baselines generate the image; the pipeline below works on its residual
            residuals = residuals - anatomy_in[None]
        if scale < 1.0:
            residuals = resize(residuals, crop_shape, order=1)
        levels = levels_card
        if pull > 0.0 and levels and level_reference == "ring":
            levels = _levels_from_ring(levels, prep, part_distance, anatomy)
        levels_used = levels_used or bool(levels)
        if pull > 0.0 and levels:
            for m in (m for m in prep.images if m in levels):
                c = MODALITIES.index(m)
                for k in range(samples):
                    residuals[k, c] += pull_levels(anatomy_roi[c] + residuals[k, c], labels_roi, levels[m], pull,
                                                   whole_only)
        for m in (m for m in prep.images if m in textures):
            c = MODALITIES.index(m)
            for k in range(samples):
                residuals[k, c] += match(anatomy_roi[c], residuals[k, c], lesion_roi, float(textures[m]))
        residuals = residuals * weight_roi[None, None]  # (K, 4, D, H, W), seam-blended

        say(0.08 + 0.87 * (index + 1) / len(parts), "compositing")
        vol_sl, roi_sl = box.paste_slices(prep.reference.shape)
        inside = part_region[vol_sl]
        for m, vol in prep.images.items():
            c = MODALITIES.index(m)
            norm = prep.normalizers[m]
            base_crop = anatomy_crop(m, lambda a, sl=vol_sl: a[sl])
            # an MRI magnitude: never darker than the scan's darkest voxel (a lesion drawn at the edge of the head)
            values = np.maximum(norm.inverse(base_crop + residuals[0, c][roi_sl]), float(vol.array.min()))
            out_images[m][vol_sl][inside] = cast_like(values, vol.array.dtype)[inside]
            out_residuals[m][vol_sl][inside] = (values - norm.inverse(base_crop))[inside]
            if samples > 1:
                out_std[m][vol_sl][inside] = (residuals[:, c].std(axis=0)[roi_sl] * norm.std)[inside]
        rois.append({"start_zyx": list(box.start), "size_zyx": list(box.size), "model_grid_zyx": list(model_shape),
                     "scale": scale, "lesion_voxels": int((part_labels > 0).sum())})
    out_images = {m: vol.with_array(out_images[m]) for m, vol in prep.images.items()}
    out_residuals = {m: vol.with_array(out_residuals[m]) for m, vol in prep.images.items()}
    out_std = {m: vol.with_array(out_std[m]) for m, vol in prep.images.items()} if samples > 1 else {}
    region_box = bounding_box(region)
    for m, scan in prep.native.items():  # back onto the scan's own grid
        out_images[m], residual, native_box = _native_image(prep, m, out_images[m].array, region_box)
        out_residuals[m] = scan.with_array(residual)
        if samples > 1:
            std = np.zeros(scan.shape, np.float32)
            std[native_box] = _averaged_on_native(prep, m, region_box, out_std[m].array)[1]
            out_std[m] = scan.with_array(std)
    union_start = np.min([r["start_zyx"] for r in rois], axis=0)
    union_stop = np.max([np.add(r["start_zyx"], r["size_zyx"]) for r in rois], axis=0)
    largest = max(rois, key=lambda r: int(np.prod(r["size_zyx"])))
    say(1.0, "done")
    report = {
        "modalities": list(prep.images), "seed": seed, "samples": samples, "steps": int(steps or cfg.default_steps),
        "guidance": guidance, "device": str(dev), "base": base, "whole_lesion_only": whole_only,
        "population_pull": pull if levels_used else 0.0,
        "population_level_reference": level_reference if levels_used else None,
        "texture_match": {m: float(textures[m]) for m in prep.images if m in textures},
        # the box around every ROI (outputs differ from the input only inside it); each ROI in `rois`
        "roi_start_zyx": [int(v) for v in union_start], "roi_size_zyx": [int(v) for v in union_stop - union_start],
        "roi_voxels": sum(int(np.prod(r["size_zyx"])) for r in rois), "rois": rois,
        "model_grid_zyx": largest["model_grid_zyx"], "scale": min(r["scale"] for r in rois),
        "lesion_voxels": int(lesion.sum()),
        "region_voxels": int(region.sum()), "warnings": warn,
        **({"working_grid": prep.working, "resampled": list(prep.native)} if prep.native else {}),
        "normalised_over": ("brain mask" if prep.from_brain_mask else "head above the noise" if prep.head is not None
                            else "foreground"),
        "timing_s": {"model": round(t_model, 3), "total": round(time.perf_counter() - t_start, 3)},
        "weights": {"deviation": model.card.get("sha256", "")[:16]},
        "variant": model.card.get("variant", "pathosyn"),
    }
    return SynthesisResult(out_images, out_residuals, out_std or None,
                           prep.reference.with_array(prep.lesion_labels), report)
