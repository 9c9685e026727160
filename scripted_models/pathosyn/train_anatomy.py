"""Train the anatomy inpainter on healthy tissue: random holes (real lesion shapes and blobs) placed
outside lesions, on the shared cases and the MNI152 template. Resumable.

    pathosyn train anatomy --steps 4000 --work .train/anatomy
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..cases import INPAINTING_CASE, INPAINTING_TWIN, VALIDATION_CASE, list_cases, load_case
from ..preprocess import IntensityNormalizer, dilate_mm, erode_mm
from ..runtime import training_autocast
from .anatomy import WEIGHTS_NAME, AnatomyConfig, anatomy_input, build_anatomy_model, config_dict
from .training import LossLog, load_checkpoint, save_checkpoint

HELD_OUT = {VALIDATION_CASE, INPAINTING_CASE, INPAINTING_TWIN}
# Unlabelled tumour or skull-on anisotropic scans: their "healthy" tissue is not known to be healthy.
EXCLUDED = {"aurora_met_unlabelled", "pyradiomics_brain1", "pyradiomics_brain2"}


class HealthyPool:
    """Healthy-tissue training volumes plus a library of lesion-shaped holes."""

    def __init__(self, data_root=None, include_mni: bool = True):
        self.items = []  # (case_id, modality, z-scored image, allowed-centre mask)
        self.shapes = []  # binary lesion masks cropped to their bbox
        for folder in list_cases(data_root):
            if folder.name in HELD_OUT or folder.name in EXCLUDED:
                continue
            case = load_case(folder)
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
            shape = shape[tuple(slice(0, min(s, crop - 4)) for s in shape.shape)]
        else:
            radii = rng.uniform(4, 18, size=3)
            r = int(np.ceil(radii.max())) + 2
            g = np.ogrid[tuple(slice(-r, r + 1) for _ in range(3))]
            noise = ndimage.gaussian_filter(rng.standard_normal((2 * r + 1,) * 3), 2) * 3
            shape = sum((gi / ri) ** 2 for gi, ri in zip(g, radii)) + noise < 1.0
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


def train_anatomy(work: Path, steps: int, batch: int = 4, crop: int = 64, lr: float = 2e-4, seed: int = 0,
                  data_root=None, save_every: int = 200, out_dir: Path | None = None, threads: int | None = None):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    cfg = AnatomyConfig()
    net = build_anatomy_model(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    ckpt = work / "checkpoint.pt"
    step, extra = load_checkpoint(ckpt, net, opt)
    wall = float(extra.get("wall_s", 0.0))
    print(f"anatomy: resuming at step {step}" if step else "anatomy: starting", flush=True)
    pool = HealthyPool(data_root)
    rng = np.random.default_rng(seed + step)
    log = LossLog(work / "loss.jsonl")
    net.train()
    t0 = time.time()
    while step < steps:
        xs, ys, holes = [], [], []
        for _ in range(batch):
            image, hole, modality = pool.sample(rng, crop)
            xs.append(anatomy_input(image, hole, modality))
            ys.append(image[None])
            holes.append(hole[None])
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys)).float().to(device)
        h = torch.from_numpy(np.stack(holes)).float().to(device)
        with training_autocast(device):
            pred = net(x).float()
        err = (pred - y).abs()
        loss = (err * h).sum() / h.sum().clamp(min=1) + 0.1 * (err * (1 - h)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log.add(step, float(loss))
        if step % save_every == 0 or step == steps:
            save_checkpoint(ckpt, net, opt, step, {"wall_s": wall + time.time() - t0})
    wall += time.time() - t0
    card = {"model": WEIGHTS_NAME, "family": "PathoSyn anatomy branch (3D inpainting U-Net, MONAI UNet)",
            "config": config_dict(cfg), "steps": step, "batch": batch, "crop": crop, "lr": lr,
            "wall_time_s": round(wall, 1), "data": pool.sources, "held_out": sorted(HELD_OUT),
            "license": "research use only: trained on BraTS 2013 (CC BY-NC-SA 3.0), cite Menze et al., IEEE TMI 2015"}
    from ..weights import save_state

    path = save_state(WEIGHTS_NAME, net.state_dict(), card, out_dir)
    print(json.dumps({"saved": str(path), "steps": step}))
    return path
