"""Anatomy branch: a 3D inpainting U-Net that fills a lesion with plausible healthy tissue.

Input channels: image with the hole zeroed (z-scored units), the hole mask, modality one-hot (4).
Output: the healthy image; only the hole is used, the rest is copied from the input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..labels import MODALITIES
from ..preprocess import dilate_mm, roi_around
from ..runtime import autocast, pin_onednn_convolutions

WEIGHTS_NAME = "anatomy_inpainter"


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
    def inpaint(self, images: dict[str, np.ndarray], hole: np.ndarray, spacing_zyx) -> dict[str, np.ndarray]:
        """Fill `hole` in each z-scored image; voxels outside the hole are returned unchanged."""
        context = dilate_mm(hole, self.cfg.context_mm, spacing_zyx)
        box = roi_around(context, multiple=self.cfg.multiple, min_size=64)
        hole_roi = box.crop(hole, mode="constant")
        batch = np.stack([anatomy_input(box.crop(img), hole_roi, m) for m, img in images.items()])
        with autocast(self.device):
            pred = self.net(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()[:, 0]
        out = {}
        vol_sl, roi_sl = box.paste_slices(hole.shape)
        for (m, img), p in zip(images.items(), pred):
            filled = img.copy()
            region = hole[vol_sl]
            filled[vol_sl][region] = p[roi_sl][region]
            out[m] = filled
        return out


def config_dict(cfg: AnatomyConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}

