"""Anatomy branch: a 3D inpainting U-Net that fills a lesion with plausible healthy tissue.

Input channels: image with the hole zeroed (z-scored units), the hole mask, modality one-hot (4).
Output: the healthy image; only the hole is used, the rest is copied from the input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter

from ..labels import MODALITIES
from ..preprocess import background_value, dilate_mm, roi_around
from ..runtime import autocast, pin_cpu_inference

WEIGHTS_NAME = "anatomy_inpainter"
NOISE_RING_GAP_MM = 6.0  # the scan's noise is measured this far beyond the hole (away from lesion margins)


@dataclass
class AnatomyConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    context_mm: float = 16.0  # healthy context around the hole given to the network
    multiple: int = 16  # ROI sides are multiples of the total stride

    @property
    def in_channels(self) -> int:
        return 2 + len(MODALITIES)


def build_anatomy_model(cfg: AnatomyConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=1, channels=cfg.channels,
                strides=cfg.strides, num_res_units=cfg.num_res_units, norm="INSTANCE")


def anatomy_input(image: np.ndarray, hole: np.ndarray, modality: str) -> np.ndarray:
    """(C, D, H, W) network input for one modality crop."""
    onehot = np.zeros((len(MODALITIES),) + image.shape, np.float32)
    onehot[MODALITIES.index(modality)] = 1.0
    return np.concatenate([(image * ~hole)[None], hole[None].astype(np.float32), onehot]).astype(np.float32)


class AnatomyModel:
    """Loaded inpainter: `inpaint(images, hole)` on whole z-scored volumes, working inside an ROI."""

    def __init__(self, net: torch.nn.Module, cfg: AnatomyConfig, device: torch.device, card: dict | None = None):
        self.net, self.cfg, self.device, self.card = net.eval().to(device), cfg, device, card or {}
        pin_cpu_inference(self.net)

    @classmethod
    def load(cls, device: torch.device, folder=None) -> AnatomyModel:
        from ..weights import load_network

        net, cfg, card = load_network(WEIGHTS_NAME, AnatomyConfig, build_anatomy_model, folder)
        return cls(net, cfg, device, card)

    @torch.no_grad()
    def inpaint(self, images: dict[str, np.ndarray], hole: np.ndarray, spacing_zyx,
                noise_seed: int | None = 0, smooth_deep_fill: bool = False,
                head: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Fill `hole` in each z-scored image; voxels outside the hole are returned unchanged. With a
        `noise_seed`, the fill gets the scan's noise back (calibration.scanner_noise); None leaves it smooth.
        smooth_deep_fill: low-pass the fill away from the hole's border by the card's `fill_smoothing` (the best
        estimate of healthy tissue; the network's own structure is kept for the base a lesion is drawn on).
        head: the head's voxels (bool, image grid) for the noise's ring where the background is noise (None: the
        voxels that differ from the background value)."""
        from .calibration import scanner_noise

        context = dilate_mm(hole, self.cfg.context_mm, spacing_zyx)
        box = roi_around(context, multiple=self.cfg.multiple, min_size=64)
        hole_roi = box.crop(hole, mode="constant")
        crops = {m: box.crop(img) for m, img in images.items()}
        batch = np.stack([anatomy_input(crops[m], hole_roi, m) for m in images])
        with autocast(self.device):
            pred = self.net(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()[:, 0]
        smoothing = self.card.get("fill_smoothing") or {}
        fitted_here = smoothing.get("weights_sha256") in (None, self.card.get("sha256"))  # not another network's
        if smooth_deep_fill and smoothing.get("setting") and fitted_here:
            pred = smooth_fill(pred, hole_roi, spacing_zyx, **smoothing["setting"])
        if noise_seed is not None:  # healthy tissue 6 mm beyond the hole, inside the context, in the head
            ring = box.crop(context, mode="constant") & ~dilate_mm(hole_roi, NOISE_RING_GAP_MM, spacing_zyx)
        out = {}
        vol_sl, roi_sl = box.paste_slices(hole.shape)
        for i, (m, img) in enumerate(images.items()):
            p = pred[i]
            if noise_seed is not None:
                crop = crops[m]
                in_head = np.abs(crop - background_value(img)) > 1e-6 * max(1.0, float(np.abs(crop).max())) \
                    if head is None else box.crop(head, mode="constant")
                in_head = binary_erosion(in_head, iterations=2)  # not the head's border
                filled = np.where(hole_roi, p, crop)
                p = p + scanner_noise(filled, hole_roi, ring & in_head, seed=int(noise_seed) + i)
            filled = img.copy()
            region = hole[vol_sl]
            filled[vol_sl][region] = p[roi_sl][region]
            out[m] = filled
        return out


def _wide_gaussian(volume: np.ndarray, sigma_vox) -> np.ndarray:
    """gaussian_filter; a sigma of 8 voxels and more runs on a grid of cells of sigma / 4 voxels (block means,
    linearly upsampled): the same low-pass to about 2 % of its amplitude, at a fraction of the cost."""
    factor = max(1, int(min(sigma_vox) // 4))
    if factor == 1:
        return gaussian_filter(volume, sigma_vox)
    from scipy.ndimage import zoom

    padded = np.pad(volume, [(0, -n % factor) for n in volume.shape], mode="edge")
    d, h, w = (n // factor for n in padded.shape)
    blocks = padded.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))
    coarse = gaussian_filter(blocks, [s / factor for s in sigma_vox])
    fine = zoom(coarse, factor, order=1, grid_mode=True, mode="nearest")
    return fine[tuple(slice(0, n) for n in volume.shape)]


def lowpass_in_hole(fill: np.ndarray, hole: np.ndarray, sigma_vox, support: np.ndarray | None = None) -> np.ndarray:
    """The fill smoothed over the hole only (Gaussian normalised convolution); `support`: the hole's own
    smoothing (_wide_gaussian of the hole), reusable across fills."""
    if support is None:
        support = _wide_gaussian(hole.astype(np.float32), sigma_vox)
    return _wide_gaussian(np.where(hole, fill, 0.0).astype(np.float32), sigma_vox) / np.maximum(support, 1e-6)


def depth_in_hole(hole: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance (mm) of each hole voxel from the hole's border, 0 outside (computed on the hole's bounding box)."""
    depth = np.zeros(hole.shape, np.float64)
    if hole.any():
        box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(hole))
        depth[box] = distance_transform_edt(hole[box], sampling=spacing_zyx)
    return depth


def deep_fill_keep(depth_mm: np.ndarray, onset_mm: float, length_mm: float) -> np.ndarray:
    """How much of the network's own fill is kept at a depth (mm from the hole's border): 1 up to onset_mm, then
    decaying over length_mm."""
    return np.exp(-np.maximum(depth_mm - onset_mm, 0.0) / length_mm).astype(np.float32)


def smooth_fill(fills: np.ndarray, hole: np.ndarray, spacing_zyx, sigma_mm: float, onset_mm: float,
                length_mm: float) -> np.ndarray:
    """(N, D, H, W) fills low-passed inside the hole away from its border: fill' = s + keep (fill - s), s the
    fill smoothed over the hole (sigma_mm), keep = deep_fill_keep(depth). Deep in a large hole the network's
    structure is a guess (calibration.fit_fill_smoothing); near the border it follows the scan. Outside the hole:
    unchanged."""
    sigma = [sigma_mm / s for s in spacing_zyx]
    support = _wide_gaussian(hole.astype(np.float32), sigma)
    keep = deep_fill_keep(depth_in_hole(hole, spacing_zyx), onset_mm, length_mm)
    out = fills.copy()
    for i, fill in enumerate(fills):
        smooth = lowpass_in_hole(fill, hole, sigma, support)
        out[i][hole] = (smooth + keep * (fill - smooth))[hole]
    return out


def config_dict(cfg: AnatomyConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}

