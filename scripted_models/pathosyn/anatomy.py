"""Anatomy branch: a 3D inpainting U-Net that fills a lesion with plausible healthy tissue.

Input channels: image with the hole zeroed (z-scored units), the hole mask, modality one-hot (4).
Output: the healthy image; only the hole is used, the rest is copied from the input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.ndimage import binary_erosion

from ..labels import MODALITIES
from ..preprocess import background_value, dilate_mm, roi_around
from ..runtime import autocast, pin_onednn_convolutions

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
        pin_onednn_convolutions(self.net)

    @classmethod
    def load(cls, device: torch.device, folder=None) -> AnatomyModel:
        from ..weights import load_network

        net, cfg, card = load_network(WEIGHTS_NAME, AnatomyConfig, build_anatomy_model, folder)
        return cls(net, cfg, device, card)

    @torch.no_grad()
    def inpaint(self, images: dict[str, np.ndarray], hole: np.ndarray, spacing_zyx,
                noise_seed: int | None = 0) -> dict[str, np.ndarray]:
        """Fill `hole` in each z-scored image; voxels outside the hole are returned unchanged. With a
        `noise_seed`, the fill gets the scan's noise back (calibration.scanner_noise); None leaves it smooth."""
        from .calibration import scanner_noise

        context = dilate_mm(hole, self.cfg.context_mm, spacing_zyx)
        box = roi_around(context, multiple=self.cfg.multiple, min_size=64)
        hole_roi = box.crop(hole, mode="constant")
        crops = {m: box.crop(img) for m, img in images.items()}
        batch = np.stack([anatomy_input(crops[m], hole_roi, m) for m in images])
        with autocast(self.device):
            pred = self.net(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()[:, 0]
        if noise_seed is not None:  # healthy tissue 6 mm beyond the hole, inside the context, in the head
            ring = box.crop(context, mode="constant") & ~dilate_mm(hole_roi, NOISE_RING_GAP_MM, spacing_zyx)
        out = {}
        vol_sl, roi_sl = box.paste_slices(hole.shape)
        for i, (m, img) in enumerate(images.items()):
            p = pred[i]
            if noise_seed is not None:
                crop = crops[m]
                head = binary_erosion(np.abs(crop - background_value(img)) > 1e-6 * max(1.0, float(np.abs(crop).max())),
                                      iterations=2)  # not the head's border
                filled = np.where(hole_roi, p, crop)
                p = p + scanner_noise(filled, hole_roi, ring & head, seed=int(noise_seed) + i)
            filled = img.copy()
            region = hole[vol_sl]
            filled[vol_sl][region] = p[roi_sl][region]
            out[m] = filled
        return out


def config_dict(cfg: AnatomyConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}

