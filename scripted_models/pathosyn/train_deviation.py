"""Train the deviation diffusion model on lesion-centred crops of the shared cases. Resumable.

The residual target is r = real - pseudo_healthy(real), where the pseudo-healthy base comes from the
trained anatomy model (so train `anatomy` first). Augmentation: flips, axial 90-degree rotations,
intensity jitter, modality dropout (per-channel availability), mask ablation (whole-lesion only) and
condition dropout (for classifier-free guidance).

    pathosyn train deviation --steps 3000 --work .train/deviation
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..cases import default_data_root, load_case
from ..folds import make_folds
from ..labels import MODALITIES, one_hot_subregions
from ..preprocess import RoiBox, blend_weight, dilate_mm, roi_around
from ..runtime import training_autocast
from .api import BLEND_MARGIN_MM, HOLE_MARGIN_MM
from .calibration import case_texture_ratio, level_entries, median_texture_ratios
from .deviation import (
    NULL_CONDITION,
    WEIGHTS_NAME,
    DeviationConfig,
    build_deviation_model,
    build_scheduler,
    config_dict,
    deviation_condition,
    variant_config,
)
from .training import EMA, LossLog, cosine_lr, load_checkpoint, save_checkpoint, warm_start

VALIDATION_CROPS = 48  # fixed held-out (crop, timestep, noise) draws scored for model selection


def prepare_lesion_cache(cache: Path, data_root=None, device=None, cases: tuple[str, ...] | None = None) -> list[Path]:
    """Per case: lesion ROI arrays (anatomy, residual, labels, weight) as .npz. Computed once.
    `cases` defaults to the training fold (scripted_models.folds)."""
    from .anatomy import AnatomyModel

    cache.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cpu")
    root = Path(data_root or default_data_root())
    model = None
    paths = []
    for name in cases if cases is not None else make_folds(str(root)).train:
        folder = root / "cases" / name
        out = cache / f"{folder.name}.npz"
        if out.is_file():
            paths.append(out)
            continue
        case = load_case(folder)
        if case.seg is None or not case.seg.any() or case.binary_only:
            continue
        model = model or AnatomyModel.load(device)
        sp = case.spacing_zyx
        real = case.normalized()
        lesion = case.seg > 0
        hole = dilate_mm(lesion, HOLE_MARGIN_MM, sp)
        anatomy = model.inpaint(real, hole, sp, noise_seed=None)  # the smooth expected tissue
        region = dilate_mm(lesion, BLEND_MARGIN_MM, sp)
        box = roi_around(dilate_mm(region, 16.0, sp), multiple=8, min_size=48)
        avail = np.array([m in real for m in MODALITIES], np.float32)
        zeros = np.zeros(box.size, np.float32)
        anat = np.stack([box.crop(anatomy[m]) if m in real else zeros for m in MODALITIES])
        resid = np.stack([box.crop(real[m] - anatomy[m]) if m in real else zeros for m in MODALITIES])
        labels = box.crop(case.seg, mode="constant")
        weight = blend_weight(labels > 0, box.crop(region, mode="constant"), sp)
        tmp = out.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, anatomy=anat, residual=resid, labels=labels, weight=weight, available=avail)
        tmp.replace(out)
        print(json.dumps({"cached": folder.name, "roi": list(box.size)}), flush=True)
        paths.append(out)
    return paths


def smooth_residual(case: dict, sigma: float) -> dict:
    """Low-pass each residual channel (Gaussian, sigma in voxels); 0 leaves it as is."""
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        case["residual"] = gaussian_filter(case["residual"], (0, sigma, sigma, sigma), mode="nearest")
    return case


def textured_hole(anatomy: np.ndarray, region_weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give the inpainted (smooth) lesion region of an anatomy crop (C, D, H, W) the scan's own fine texture:
    the crop's high-pass component, taken from a random shift, blended in with the region weight."""
    from scipy.ndimage import gaussian_filter

    shift = tuple(int(v) for v in rng.integers(4, 12, size=3) * rng.choice([-1, 1], size=3))
    out = anatomy.copy()
    for c, channel in enumerate(anatomy):
        if not channel.any():
            continue
        fine = channel - gaussian_filter(channel, 1.0, mode="nearest")
        out[c] = channel + region_weight * np.roll(fine, shift, axis=(0, 1, 2))
    return out


class LesionCrops:
    """Random augmented lesion crops -> (condition, target, availability) for one deviation variant."""

    def __init__(self, paths: list[Path], cfg: DeviationConfig | None = None):
        self.cfg = cfg or DeviationConfig()
        self.cases = [smooth_residual(dict(np.load(p)), self.cfg.residual_smoothing) for p in paths]
        self.names = [p.stem for p in paths]
        # share of crops whose (inpainted, smooth) anatomy gets the scan's texture inside the lesion region,
        # as a healthy input base has at synthesis time
        self.texture_prob = 0.5 if self.cfg.residual_smoothing > 0 else 0.0

    def sample(self, rng: np.random.Generator, crop: int):
        c = self.cases[rng.integers(len(self.cases))]
        lesion_idx = np.argwhere(c["labels"][::2, ::2, ::2] > 0) * 2
        centre = lesion_idx[rng.integers(len(lesion_idx))] + rng.integers(-8, 9, size=3)
        box = RoiBox(tuple(int(x) - crop // 2 for x in centre), (crop,) * 3)
        anatomy = box.crop(c["anatomy"])
        residual = box.crop(c["residual"], mode="constant")
        labels = box.crop(c["labels"], mode="constant")
        weight = box.crop(c["weight"], mode="constant")
        avail = c["available"].copy()
        # flips and an axial rotation, same for every array
        arrays = [anatomy, residual, labels[None], weight[None]]
        for ax in (1, 2, 3):
            if rng.random() < 0.5:
                arrays = [np.flip(a, ax) for a in arrays]
        k = int(rng.integers(4))
        arrays = [np.rot90(a, k, axes=(2, 3)) for a in arrays]
        anatomy, residual, labels, weight = [np.ascontiguousarray(a) for a in arrays]
        labels, weight = labels[0], weight[0]
        if rng.random() < self.texture_prob:
            anatomy = textured_hole(anatomy, weight, rng)
        gain = rng.uniform(0.9, 1.1, size=(4, 1, 1, 1)).astype(np.float32)
        anatomy = anatomy * gain + rng.uniform(-0.1, 0.1, size=(4, 1, 1, 1)).astype(np.float32)
        residual = residual * gain
        present = np.flatnonzero(avail)
        if len(present) > 1:  # modality dropout, keep at least one
            drop = rng.random(len(present)) < 0.3
            if drop.all():
                drop[rng.integers(len(present))] = False
            avail[present[drop]] = 0.0
        whole_only = rng.random() < 0.3
        cond = deviation_condition(anatomy, avail, one_hot_subregions(labels, whole_only), weight,
                                   self.cfg.anatomy_condition)
        if rng.random() < 0.1:
            cond[:] = NULL_CONDITION
        target = residual if self.cfg.target == "residual" else anatomy + residual
        return cond, target * avail[:, None, None, None], avail


def validation_draws(data: LesionCrops, cfg: DeviationConfig, crop: int, n: int = VALIDATION_CROPS, seed: int = 0):
    """Fixed held-out draws: (condition, x0, availability, timestep, noise) tensors, the same at every check."""
    rng = np.random.default_rng(10_000 + seed)
    conds, targets, avails = zip(*(data.sample(rng, crop) for _ in range(n)))
    gen = torch.Generator().manual_seed(10_000 + seed)
    x0 = torch.from_numpy(np.stack(targets)) * cfg.residual_scale
    t = torch.linspace(0, cfg.num_train_timesteps - 1, n).round().long()
    return (torch.from_numpy(np.stack(conds)), x0, torch.from_numpy(np.stack(avails)), t,
            torch.randn(x0.shape, generator=gen))


@torch.no_grad()
def validation_loss(net, draws, scheduler, cfg: DeviationConfig, device, chunk: int = 8) -> float:
    """Mean masked v-prediction (or noise) loss of `net` on the fixed validation draws."""
    cond, x0, avail, t, noise = draws
    was_training = net.training
    net.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(t), chunk):
        sl = slice(i, i + chunk)
        x, n, tt = x0[sl].to(device), noise[sl].to(device), t[sl].to(device)
        a = avail[sl].to(device)[:, :, None, None, None]
        target = scheduler.get_velocity(x, n, tt) if cfg.prediction_type == "v_prediction" else n
        with training_autocast(device):
            pred = net(torch.cat([scheduler.add_noise(x, n, tt), cond[sl].to(device)], 1), timesteps=tt).float()
        total += float((((pred - target) ** 2) * a).sum())
        count += float(a.sum()) * float(np.prod(x.shape[2:]))
    net.train(was_training)
    return total / max(count, 1.0)


def train_deviation(work: Path, steps: int, batch: int = 4, crop: int = 48, lr: float = 2e-4, seed: int = 0,
                    data_root=None, save_every: int = 100, out_dir: Path | None = None, threads: int | None = None,
                    max_minutes: float | None = None, variant: str = "pathosyn", cache: Path | None = None,
                    from_scratch: bool = False, eval_every: int = 200, select: str = "loss",
                    realism_every: int = 400):
    """Train on the training fold; every `eval_every` steps the EMA weights are scored on fixed validation-fold
    draws (denoising loss). select="loss" keeps the weights with the lowest loss (work/best_val.safetensors);
    select="realism" also synthesizes the validation fold's lesions every `realism_every` steps (one seed, the
    default sampler) and keeps the weights with the highest pass fraction, then the lowest Wasserstein
    (work/best_realism.safetensors): a lower denoising loss did not mean more realistic lesions. Every scored
    candidate stays in work/realism_step{N}.safetensors."""
    if select not in ("loss", "realism"):
        from ..errors import InputError

        raise InputError(f"unknown selection rule '{select}': expected loss or realism")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    cfg = variant_config(variant)
    folds = make_folds(str(data_root) if data_root else None)
    cache = cache or work / "cache"
    paths = prepare_lesion_cache(cache, data_root, cases=folds.train)
    data = LesionCrops(paths, cfg)
    val_data = LesionCrops(prepare_lesion_cache(cache, data_root, cases=folds.validation), cfg)
    val_draws = validation_draws(val_data, cfg, crop, seed=seed)
    net = build_deviation_model(cfg).to(device)
    ema_net = build_deviation_model(cfg).to(device)  # holds the EMA weights while they are scored
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    ckpt = work / "checkpoint.pt"
    ema = EMA(net)
    step, extra = load_checkpoint(ckpt, net, opt, ema)
    wall = float(extra.get("wall_s", 0.0))
    if step == 0 and not from_scratch:
        # no checkpoint: continue from the last weights in out_dir, else (PathoSyn only) from the bundled ones
        step, wall = warm_start(WEIGHTS_NAME, net, out_dir, bundled=variant == "pathosyn")
        ema = EMA(net)
    start_step = int(extra.get("start_step", step))  # the learning rate decays from here to `steps`
    print(f"deviation: {f'resuming at step {step}' if step else 'starting'}; cases {data.names}", flush=True)
    scheduler = build_scheduler(cfg, "ddpm")
    rng = np.random.default_rng(seed + step)
    log = LossLog(work / "loss.jsonl")
    best_path = work / "best_val.safetensors"
    val_curve = list(extra.get("val_curve", []))
    best = dict(extra.get("best_val", {}))
    realism_path = work / "best_realism.safetensors"
    realism_curve = list(extra.get("realism_curve", []))
    best_realism = dict(extra.get("best_realism", {}))
    calibration = dict(extra.get("calibration", {}))

    def measure_calibration():
        """The card's calibration entries (they depend on the training fold only, not on the weights)."""
        if not calibration:
            textures: list[dict] = []  # per training case, filled while the population levels are measured
            calibration.update(level_entries(folds.train, data_root or default_data_root(),
                                             on_case=lambda _, case: textures.append(case_texture_ratio(case))),
                               population_texture=median_texture_ratios(textures))
        return calibration

    validation_fold = None
    if select == "realism":
        from ..evaluation.realism import FoldRealism

        validation_fold = FoldRealism(data_root, "validation", device=str(device))
        measure_calibration()  # candidates are scored as they would ship: calibrated

    def check_realism():
        from ..weights import save_state, write_safetensors

        candidate = work / "candidate"
        state = {k: v.contiguous() for k, v in ema_net.state_dict().items()}
        save_state(WEIGHTS_NAME, state, {"model": WEIGHTS_NAME, "variant": variant, "config": config_dict(cfg),
                                         "steps": step, "note": "EMA weights under validation", **calibration},
                   candidate)
        summary = validation_fold.score({"candidate": candidate}, seeds=(0,))["results"]["candidate"]["summary"]
        row = {"step": step, "pass_fraction": summary["pass_fraction"], "wasserstein": summary["wasserstein"],
               "mean_err": summary["mean_err"], "per_modality_pass": summary["per_modality_pass"],
               "classifier_auroc": summary.get("classifier_auroc"),
               "classifier_auroc_across_cases": summary.get("classifier_auroc_across_cases"),
               "median_texture_ratio": summary.get("median_texture_ratio")}
        write_safetensors(state, work / f"realism_step{step}.safetensors")
        realism_curve.append(row)
        print(json.dumps({"validation_realism": row}), flush=True)
        key = (row["pass_fraction"], -row["wasserstein"])
        if not best_realism or key > (best_realism["pass_fraction"], -best_realism["wasserstein"]):
            write_safetensors(state, realism_path)
            best_realism.clear()
            best_realism.update(row)

    def check_validation():
        ema_net.load_state_dict(ema.weights_for(net))
        score = validation_loss(ema_net, val_draws, scheduler, cfg, device)
        val_curve.append({"step": step, "val_loss": round(score, 5)})
        print(json.dumps({"step": step, "val_loss": round(score, 5)}), flush=True)
        if score < best.get("val_loss", float("inf")):
            from ..weights import write_safetensors

            write_safetensors({k: v.contiguous() for k, v in ema_net.state_dict().items()}, best_path)
            best.update(step=step, val_loss=round(score, 5))
        if validation_fold is not None and (step % realism_every == 0 or step == steps or not realism_curve):
            check_realism()

    def state_extra():
        return {"wall_s": wall + time.time() - t0, "start_step": start_step, "val_curve": val_curve,
                "best_val": best, "realism_curve": realism_curve, "best_realism": best_realism,
                "calibration": calibration}

    net.train()
    t0 = time.time()
    if not val_curve:
        check_validation()  # the starting weights are a candidate too
    while step < steps:
        if max_minutes and (time.time() - t0) > 60 * max_minutes:
            break
        conds, targets, avails = zip(*(data.sample(rng, crop) for _ in range(batch)))
        cond = torch.from_numpy(np.stack(conds)).to(device)
        x0 = torch.from_numpy(np.stack(targets)).to(device) * cfg.residual_scale
        avail = torch.from_numpy(np.stack(avails)).to(device)[:, :, None, None, None]
        noise = torch.randn_like(x0)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, start_step, steps, lr)
        t = torch.randint(0, cfg.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if cfg.prediction_type == "v_prediction" else noise
        with training_autocast(device):
            pred = net(torch.cat([noisy, cond], 1), timesteps=t).float()
        loss = (((pred - target) ** 2) * avail).sum() / (avail.sum() * np.prod(x0.shape[2:])).clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, step - start_step)
        step += 1
        log.add(step, loss.item())
        if step % eval_every == 0 or step == steps:
            check_validation()
        if step % save_every == 0 or step == steps:
            save_checkpoint(ckpt, net, opt, step, state_extra(), ema)
    measure_calibration()  # before the last checkpoint, so that a resumed run reuses it
    save_checkpoint(ckpt, net, opt, step, state_extra(), ema)
    wall += time.time() - t0
    family = {"pathosyn": "PathoSyn deviation branch (conditional DDPM on the residual, MONAI DiffusionModelUNet)",
              "holistic": "Ablation baseline: the same DDPM generating the whole ROI image (no disentanglement)",
              "mask_only": "Ablation baseline: the same DDPM generating the ROI image from the mask only "
                           "(no anatomy branch)"}[variant]
    card = {"model": WEIGHTS_NAME, "variant": variant, "family": family,
            "config": config_dict(cfg), "steps": step, "batch": batch, "crop": crop, "lr": lr,
            "wall_time_s": round(wall, 1), "ema_decay": ema.decay, "lr_schedule": f"cosine from step {start_step}",
            "data": data.names, "held_out": {"validation": list(folds.validation), "test": list(folds.test)},
            "folds": folds.as_dict(),
            **calibration,
            "selection": {"rule": "lowest validation-fold denoising loss of the EMA weights",
                          "draws": VALIDATION_CROPS, "selected_step": best.get("step"), "curve": val_curve},
            "license": "research use only: trained on BraTS data (BraTS 2013: CC BY-NC-SA 3.0); cite Menze et al., "
                       "IEEE TMI 2015 and Bakas et al., Sci Data 2017"}
    from ..weights import save_state

    if select == "realism" and realism_path.is_file():
        from safetensors.torch import load_file

        card["selection"] = {"rule": "highest validation-fold realism pass fraction of the EMA weights (one seed, "
                                     "default sampler), then lowest Wasserstein", "selected_step": best_realism["step"],
                             "curve": realism_curve, "loss_curve": val_curve}
        state = load_file(realism_path)
        card["steps_selected"] = best_realism["step"]
    elif best_path.is_file():
        from safetensors.torch import load_file

        state = load_file(best_path)
        card["steps_selected"] = best.get("step")
    else:
        state = ema.weights_for(net)
    path = save_state(WEIGHTS_NAME, state, card, out_dir)
    print(json.dumps({"saved": str(path), "steps": step}), flush=True)
    return path
