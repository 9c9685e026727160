"""Train the anatomy inpainter on healthy tissue: random holes (real lesion shapes and blobs) placed
outside lesions, on the training fold's cases (scripted_models.folds) and the MNI152 template. Resumable;
continues from the bundled weights; keeps the EMA weights with the lowest validation-fold inpainting error.

    pathosyn train anatomy --steps 4500 --work .train
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..cases import default_data_root, load_case
from ..errors import InputError, WeightsError
from ..folds import make_folds
from ..preprocess import IntensityNormalizer, bounding_box, dilate_mm, erode_mm
from ..runtime import training_autocast, trains_in_bf16
from .anatomy import WEIGHTS_NAME, AnatomyConfig, AnatomyModel, anatomy_input, build_anatomy_model, config_dict
from .training import EMA, LossLog, cosine_lr, load_checkpoint, save_checkpoint, warm_start

VALIDATION_HOLES_PER_CASE = 4  # random healthy-tissue ellipsoids per validation-fold case (fixed seed)
LESION_SIZED_HOLES = True  # also one hole per case: its tumour mirrored into the healthy hemisphere


def bundled_channels() -> tuple[int, ...] | None:
    """The bundled anatomy weights' U-Net widths (None when there are none)."""
    from ..weights import load_card

    try:
        return tuple(load_card(WEIGHTS_NAME)["config"]["channels"])
    except (WeightsError, KeyError):  # no bundled card: nothing to warm-start from either
        return None


def saved_channels(ckpt: Path) -> tuple[int, ...] | None:
    """The U-Net widths a checkpoint was started with (None: no checkpoint, or one from before they were kept)."""
    if not ckpt.is_file():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)  # mapped: only `extra` is read
    extra = json.loads(state.get("extra", "{}"))
    return tuple(extra["channels"]) if "channels" in extra else None


class HealthyPool:
    """Healthy-tissue training volumes plus a library of lesion-shaped holes."""

    def __init__(self, case_ids, data_root=None, include_mni: bool = True):
        self.items = []  # (case_id, modality, z-scored image, allowed-centre mask)
        self.shapes = []  # binary lesion masks cropped to their bbox
        root = Path(data_root or default_data_root())
        for case_id in case_ids:
            case = load_case(root / "cases" / case_id)
            fg = case.foreground()
            lesion = case.seg > 0 if case.seg is not None else np.zeros_like(fg)
            forbidden = dilate_mm(lesion, 8.0, case.spacing_zyx)
            allowed = erode_mm(fg, 6.0, case.spacing_zyx) & ~forbidden
            for m, img in case.normalized(fg).items():
                self.items.append((case.case_id, m, img, allowed, forbidden))
            if lesion.any():
                labelled, _ = ndimage.label(lesion)
                sl = ndimage.find_objects((labelled > 0).astype(int))[0]
                self.shapes.append(lesion[sl])
        if include_mni:
            from ..templates import mni_t1

            vol = mni_t1()
            fg = vol.array > 0.05 * vol.array.max()
            fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=2))
            img = IntensityNormalizer.fit(vol.array, foreground=fg).forward(vol.array)
            none = np.zeros_like(fg)
            self.items.append(("mni152", "t1", img, erode_mm(fg, 6.0, (1.0, 1.0, 1.0)), none))
        self.sources = sorted({f"{c}:{m}" for c, m, *_ in self.items})

    def hole(self, rng: np.random.Generator, crop: int) -> np.ndarray:
        """A hole shape inside a crop^3 box centred on the box centre."""
        box = np.zeros((crop,) * 3, bool)
        if self.shapes and rng.random() < 0.5:
            shape = self.shapes[rng.integers(len(self.shapes))]
            scale = rng.uniform(0.35, 0.9)
            shape = ndimage.zoom(shape.astype(np.float32), scale, order=1) > 0.5
            for ax in range(3):
                if rng.random() < 0.5:
                    shape = np.flip(shape, ax)
        else:
            radii = rng.uniform(4, 18, size=3)
            r = int(np.ceil(radii.max())) + 2
            g = np.ogrid[tuple(slice(-r, r + 1) for _ in range(3))]
            noise = ndimage.gaussian_filter(rng.standard_normal((2 * r + 1,) * 3), 2) * 3
            shape = sum((gi / ri) ** 2 for gi, ri in zip(g, radii)) + noise < 1.0
        shape = shape[tuple(slice(0, min(s, crop - 4)) for s in shape.shape)]  # fits the crop
        if not shape.any():
            shape = np.zeros((3, 3, 3), bool)
            shape[1, 1, 1] = True
        starts = [(crop - s) // 2 for s in shape.shape]
        box[tuple(slice(a, a + s) for a, s in zip(starts, shape.shape))] = shape
        return box

    def sample(self, rng: np.random.Generator, crop: int):
        case_id, modality, img, allowed, forbidden = self.items[rng.integers(len(self.items))]
        centres = np.argwhere(allowed[::4, ::4, ::4]) * 4
        for _ in range(20):
            c = centres[rng.integers(len(centres))] + rng.integers(-2, 3, size=3)
            start = np.clip(c - crop // 2, 0, np.array(img.shape) - crop)
            sl = tuple(slice(int(a), int(a) + crop) for a in start)
            hole = self.hole(rng, crop)
            hole &= ~forbidden[sl]
            if hole.sum() > 50:
                break
        image = img[sl].copy()
        for ax in range(3):
            if rng.random() < 0.5:
                image, hole = np.flip(image, ax), np.flip(hole, ax)
        image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)  # intensity jitter
        return np.ascontiguousarray(image), np.ascontiguousarray(hole), modality


class ValidationHoles:
    """Fixed inpainting problems on the validation fold, as in the evaluation's test-fold protocol: a random
    healthy-tissue ellipsoid (radii 8-15 mm) and the case's tumour are voided; the error is scored inside the
    ellipsoid, where the truth is known (mean absolute error, z-units, every modality). `lesion_sized` adds
    the tumour mirrored into the healthy hemisphere (a lesion-sized hole, as in the BraTS inpainting protocol);
    the error is then the mean of the small holes' and the large holes' errors."""

    def __init__(self, case_ids, data_root=None, per_case: int = VALIDATION_HOLES_PER_CASE, seed: int = 0,
                 lesion_sized: bool = False):
        from ..evaluation.validation import inpainting_holes

        rng = np.random.default_rng(seed)
        root = Path(data_root or default_data_root())
        self.problems = []  # (z-scored crops {modality: array}, hole, target, spacing, large)
        for case_id in case_ids:
            case = load_case(root / "cases" / case_id)
            brain, lesion = case.foreground(), case.seg > 0
            images = case.normalized(brain)
            for target, hole, large in inpainting_holes(brain, lesion, case.spacing_zyx, rng, per_case, lesion_sized):
                box = bounding_box(dilate_mm(hole, 24.0, case.spacing_zyx))
                self.problems.append(({m: img[box].copy() for m, img in images.items()}, hole[box], target[box],
                                      case.spacing_zyx, large))

    def errors(self, net, cfg: AnatomyConfig, device) -> dict[str, float]:
        """{"mae": selection score, "small": ellipsoids' mean error, "large": lesion-sized holes' (if any)}."""
        model = AnatomyModel(net, cfg, device)
        by_size = {"small": [], "large": []}
        for images, hole, target, spacing, large in self.problems:
            filled = model.inpaint(images, hole, spacing, noise_seed=None)
            by_size["large" if large else "small"] += [float(np.abs(filled[m] - images[m])[target].mean())
                                                       for m in images]
        net.train()
        means = {k: float(np.mean(v)) for k, v in by_size.items() if v}
        return {"mae": float(np.mean(list(means.values()))), **means}


def train_anatomy(work: Path, steps: int, batch: int = 4, crop: int = 64, lr: float = 1e-4, seed: int = 0,
                  data_root=None, save_every: int = 100, out_dir: Path | None = None, threads: int | None = None,
                  eval_every: int = 100, max_minutes: float | None = None, from_scratch: bool = False,
                  channels: tuple[int, ...] | None = None, validation_holes: int | None = None):
    """Train up to `steps` (counted from the bundled weights' steps when continuing from them). `channels`
    (one width per U-Net level) other than the bundled weights' trains that size from scratch; a resumed
    checkpoint keeps the size it was started with. The EMA of the weights is what is scored and kept, on
    `validation_holes` holes per validation-fold case (a checkpoint's curve scored otherwise is set aside)."""
    validation_holes = validation_holes or VALIDATION_HOLES_PER_CASE
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    folds = make_folds(str(data_root) if data_root else None)
    ckpt = work / "checkpoint.pt"
    started = saved_channels(ckpt)
    if started and channels and tuple(channels) != started:
        raise InputError(f"{ckpt} was started with channels {list(started)}, not {list(channels)}")
    cfg = AnatomyConfig(channels=tuple(started or channels or AnatomyConfig.channels))
    if len(cfg.channels) != len(cfg.strides) + 1:
        raise InputError(f"channels needs {len(cfg.strides) + 1} widths (one per U-Net level), "
                         f"got {list(cfg.channels)}")
    if crop % cfg.multiple:
        raise InputError(f"crop must be a multiple of {cfg.multiple} (the U-Net halves it {len(cfg.strides)} times), "
                         f"got {crop}")
    from_scratch = from_scratch or cfg.channels != bundled_channels()  # warm starts need the same size
    net = build_anatomy_model(cfg).to(device)
    ema_net = build_anatomy_model(cfg).to(device)  # holds the EMA weights while they are scored
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    ema = EMA(net)
    step, extra = load_checkpoint(ckpt, net, opt, ema)
    wall = float(extra.get("wall_s", 0.0))
    start_step = int(extra.get("start_step", 0))
    scored_on = {"holes_per_case": validation_holes, "lesion_sized_holes": LESION_SIZED_HOLES, "weights": "ema"}
    curve = extra.get("curve", []) if extra.get("scored_on") == scored_on else []
    earlier_curves = extra.get("earlier_curves", [])
    if extra.get("curve") and not curve:  # scored on other holes or raw weights: not comparable, kept aside
        earlier_curves.append({"scored_on": extra.get("scored_on", {"holes_per_case": 2, "weights": "raw"}),
                               "curve": extra["curve"]})
    if step == 0 and not from_scratch:
        start_step, wall = warm_start(WEIGHTS_NAME, net, bundled=True)
        step = start_step
        ema = EMA(net)
    print(f"anatomy: at step {step} (from {start_step})", flush=True)
    pool = HealthyPool(folds.train, data_root)
    validation = ValidationHoles(folds.validation, data_root, per_case=validation_holes,
                                 lesion_sized=LESION_SIZED_HOLES)
    best_path = work / "best.safetensors"

    def check():
        from ..weights import write_safetensors

        ema_net.load_state_dict(ema.weights_for(net))
        scores = {k: round(v, 5) for k, v in validation.errors(ema_net.eval(), cfg, device).items()}
        error = scores["mae"]
        best = min((c["mae"] for c in curve), default=float("inf"))
        curve.append({"step": step, **scores})
        if error < best or not best_path.is_file():
            write_safetensors({k: v.contiguous() for k, v in ema_net.state_dict().items()}, best_path)
        print(json.dumps({"validation": scores, "step": step, "best": min(error, best)}), flush=True)

    if not curve:
        check()  # the starting weights are a candidate too
    rng = np.random.default_rng(seed + step)
    log = LossLog(work / "loss.jsonl")
    net.train()
    t0 = time.time()
    deadline = t0 + 60 * max_minutes if max_minutes else None

    def checkpoint() -> int:
        save_checkpoint(ckpt, net, opt, step, {"wall_s": wall + time.time() - t0, "start_step": start_step,
                                               "curve": curve, "scored_on": scored_on,
                                               "earlier_curves": earlier_curves, "channels": list(cfg.channels)},
                        ema)
        return step

    saved_at = None
    while step < steps and (deadline is None or time.time() < deadline):
        xs, ys, holes = [], [], []
        for _ in range(batch):
            image, hole, modality = pool.sample(rng, crop)
            xs.append(anatomy_input(image, hole, modality))
            ys.append(image[None])
            holes.append(hole[None])
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys)).float().to(device)
        h = torch.from_numpy(np.stack(holes)).float().to(device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, start_step, steps, lr)
        with training_autocast(device):
            pred = net(x).float()
        err = (pred - y).abs()
        loss = (err * h).sum() / h.sum().clamp(min=1) + 0.1 * (err * (1 - h)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema.update(net, step - start_step)
        log.add(step, loss.item())
        if step % eval_every == 0 or step == steps:
            check()
        if step % save_every == 0 or step == steps:
            saved_at = checkpoint()
    if saved_at != step:  # stopped by the deadline between saves, or nothing left to train
        checkpoint()
    wall += time.time() - t0
    from safetensors.torch import load_file

    from ..weights import save_state

    selected = min(curve, key=lambda c: c["mae"])
    card = {"model": WEIGHTS_NAME, "family": "PathoSyn anatomy branch (3D inpainting U-Net, MONAI UNet)",
            "config": config_dict(cfg), "steps": step, "steps_selected": selected["step"], "batch": batch,
            "crop": crop, "lr": lr, "lr_schedule": f"cosine from step {start_step}", "wall_time_s": round(wall, 1),
            "ema_decay": ema.decay,
            "train_precision": "bf16 autocast" if trains_in_bf16(device) else "float32",
            "data": pool.sources, "folds": folds.as_dict(),
            "held_out": {"validation": list(folds.validation), "test": list(folds.test)},
            "selection": {"rule": "lowest validation-fold inpainting error of the EMA weights (mean absolute error "
                                  f"in z-units inside {validation_holes} random healthy-tissue ellipsoids per "
                                  "case, tumour voided too, every modality"
                                  + ("; averaged with the same inside one lesion-sized hole per case, the "
                                     "tumour mirrored into the healthy hemisphere)" if LESION_SIZED_HOLES else ")"),
                          "curve": curve,
                          **({"earlier_curves": earlier_curves} if earlier_curves else {})},
            "license": "research use only: trained on BraTS data (BraTS 2013: CC BY-NC-SA 3.0); cite Menze et al., "
                       "IEEE TMI 2015 and Bakas et al., Sci Data 2017"}
    path = save_state(WEIGHTS_NAME, load_file(best_path), card, out_dir)
    print(json.dumps({"saved": str(path), "steps": step, "selected": selected}), flush=True)
    return path
