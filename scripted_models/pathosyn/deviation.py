"""Deviation branch: a conditional DDPM over the pathological residual r = pathological - anatomy.

Works on a lesion ROI (fully convolutional, any side that divides by 8). Channels:
  x_t      noisy residual, one channel per modality                    (4)
  cond     anatomy crop (4) + modality availability (4) + mask one-hot (core, edema, enhancing, whole) (4)
           + region weight (1)                                         (13)
MONAI's DiffusionInferer concatenates cond to x_t and applies classifier-free guidance, whose null
condition is cond filled with -1 (trained by condition dropout).

Ablation baselines (evaluation only) use the same network and pipeline; their model card's config says
  holistic    target "image": generates the whole ROI image, not a residual (no disentanglement)
  mask_only   target "image" and no anatomy channels (no anatomy branch)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..labels import MODALITIES, NUM_SUBREGIONS
from ..runtime import autocast, pin_cpu_inference

WEIGHTS_NAME = "deviation_diffusion"
NULL_CONDITION = -1.0
VARIANTS = ("pathosyn", "holistic", "mask_only")


@dataclass
class DeviationConfig:
    channels: tuple[int, ...] = (16, 32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: int = 16
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "v_prediction"
    residual_scale: float = 0.5  # network sees residual * scale (z-units)
    multiple: int = 8  # ROI sides divisible by the U-Net's total stride
    default_steps: int = 5
    preview_steps: int = 2
    target: str = "residual"  # "residual" (PathoSyn) or "image" (holistic / mask_only baselines)
    anatomy_condition: bool = True  # False: anatomy channels are zero (mask_only baseline)
    # Gaussian sigma (voxels of the 1 mm training grid) applied to the training residual, and to sampled
    # residuals: the scan's own noise belongs to the base, not to the lesion (learning it doubled the noise on
    # healthy bases). 0 = raw residual.
    residual_smoothing: float = 0.0
    # DDIM timesteps at sampling: "trailing" (uniform stride, ends on the clean sample) or "monai" (MONAI 1.6's
    # linspace, which its DDIM step does not follow; measured far worse at 10 steps and fewer)
    timestep_spacing: str = "trailing"

    @property
    def out_channels(self) -> int:
        return len(MODALITIES)

    @property
    def cond_channels(self) -> int:
        return 2 * len(MODALITIES) + NUM_SUBREGIONS + 1 + 1


RESIDUAL_SMOOTHING = 0.5  # what new trainings use (older cards have no key and trained on the raw residual)


def variant_config(variant: str) -> DeviationConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown deviation variant '{variant}' (choose from {', '.join(VARIANTS)})")
    return DeviationConfig(target="residual" if variant == "pathosyn" else "image",
                           anatomy_condition=variant != "mask_only", residual_smoothing=RESIDUAL_SMOOTHING)


def build_deviation_model(cfg: DeviationConfig) -> torch.nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=3, in_channels=cfg.out_channels + cfg.cond_channels, out_channels=cfg.out_channels,
        channels=cfg.channels, attention_levels=cfg.attention_levels, num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups, num_head_channels=cfg.num_head_channels)


def build_scheduler(cfg: DeviationConfig, kind: str = "ddim", steps: int | None = None):
    """"ddpm" for training; "ddim" for sampling, with its timesteps set for `steps` (default: cfg.default_steps)."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, beta_start=cfg.beta_start,
                  beta_end=cfg.beta_end, prediction_type=cfg.prediction_type, clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if cfg.timestep_spacing not in ("trailing", "monai"):
        raise ValueError(f"unknown timestep_spacing '{cfg.timestep_spacing}' (trailing or monai)")
    steps = int(steps or cfg.default_steps)
    scheduler = DDIMScheduler(**common)
    scheduler.set_timesteps(steps)
    if cfg.timestep_spacing == "trailing":
        # MONAI 1.6 places the N timesteps with linspace(T-1, 0, N) but DDIMScheduler.step jumps to
        # t - T // N, so the model is told a timestep that does not match the sample's noise level (5 steps:
        # the sample is at 799 when the model is told 749) and the last step is spent at t = 0. A uniform grid
        # with stride T // N that ends on the step to the clean sample ("trailing", Lin et al., WACV 2024)
        # keeps step() consistent.
        stride = cfg.num_train_timesteps // steps
        scheduler.timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.long) * stride + (stride - 1)
    return scheduler


def deviation_condition(anatomy: np.ndarray, available: np.ndarray, subregions: np.ndarray,
                        region_weight: np.ndarray, with_anatomy: bool = True) -> np.ndarray:
    """(13, D, H, W): anatomy (4, z-scored, 0 where unavailable or with_anatomy=False), availability (4),
    one-hot mask (4), weight (1)."""
    shape = anatomy.shape[1:]
    avail = np.broadcast_to(available.astype(np.float32)[:, None, None, None], (len(MODALITIES),) + shape)
    anatomy = anatomy * available[:, None, None, None] * float(with_anatomy)
    return np.concatenate([anatomy, avail, subregions, region_weight[None]]).astype(np.float32)


class _GuidedUNet(torch.nn.Module):
    """Wraps the U-Net for the inferer: bf16 autocast, float32 output, and a progress tick per call."""

    def __init__(self, net, device, tick: Callable[[], None] | None):
        super().__init__()
        self.net, self.device, self.tick = net, device, tick

    def forward(self, x, timesteps, context=None):
        with autocast(self.device):
            out = self.net(x, timesteps=timesteps, context=context).float()
        if self.tick:
            self.tick()
        return out


class DeviationModel:
    def __init__(self, net: torch.nn.Module, cfg: DeviationConfig, device: torch.device, card: dict | None = None):
        self.net, self.cfg, self.device, self.card = net.eval().to(device), cfg, device, card or {}
        pin_cpu_inference(self.net, channels_last=True)

    @classmethod
    def load(cls, device: torch.device, folder=None) -> DeviationModel:
        from ..weights import load_network

        net, cfg, card = load_network(WEIGHTS_NAME, DeviationConfig, build_deviation_model, folder)
        return cls(net, cfg, device, card)

    @torch.no_grad()
    def sample(self, condition: np.ndarray, samples: int, seed: int, steps: int | None = None,
               guidance: float = 1.0, progress: Callable[[float, str], None] | None = None) -> np.ndarray:
        """Samples (K, 4, D, H, W) in z-units: residuals, or images for cfg.target == "image".
        Deterministic for a given seed on a given device."""
        from monai.inferers import DiffusionInferer

        steps = int(steps or self.cfg.default_steps)
        scheduler = build_scheduler(self.cfg, "ddim", steps)
        inferer = DiffusionInferer(scheduler)
        cond = torch.from_numpy(condition)[None].to(self.device)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (1, self.cfg.out_channels) + condition.shape[1:]
        done = [0]
        total = steps * samples

        def tick():
            done[0] += 1
            if progress:
                progress(done[0] / total, f"denoising step {done[0]}/{total}")

        model = _GuidedUNet(self.net, self.device, tick)
        out = []
        for _ in range(samples):
            noise = torch.randn(shape, generator=generator).to(self.device)
            residual = inferer.sample(noise, model, scheduler, conditioning=cond, mode="concat", verbose=False,
                                      cfg=None if guidance == 1.0 else float(guidance),
                                      cfg_fill_value=NULL_CONDITION)
            out.append(residual[0].float().cpu().numpy() / self.cfg.residual_scale)
        return band_limit(np.stack(out), self.cfg)


def band_limit(samples: np.ndarray, cfg: DeviationConfig) -> np.ndarray:
    """Residual samples (K, C, D, H, W) low-passed with the Gaussian the training target had (residual models
    with `residual_smoothing` only): detail finer than the target's band is sampler/model error, not lesion."""
    if cfg.target != "residual" or cfg.residual_smoothing <= 0:
        return samples
    from scipy.ndimage import gaussian_filter

    sigma = (0, 0) + (float(cfg.residual_smoothing),) * (samples.ndim - 2)
    return gaussian_filter(samples, sigma, mode="nearest").astype(samples.dtype, copy=False)


def config_dict(cfg: DeviationConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
