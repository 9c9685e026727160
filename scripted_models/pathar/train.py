"""PathAR training, resumable, in three stages: structure VQ-VAE, appearance VQ-VAE, IAR transformer.

    python -m scripted_models.cli train-pathar --work .train/pathar --stage all --threads 2
    python -m scripted_models.pathar.train --work .train/pathar            (same, without the CLI)

Each stage keeps work/<stage>/checkpoint.pt (resumed automatically) and loss.jsonl, and ends by writing
pathar_<stage>.safetensors + .json model card into the weights folder (scripted_models/weights/ unless
--out or PATHOSYN_WEIGHTS_DIR). A stage whose weights already match its target steps and config is skipped.
The transformer stage tokenizes the patches with the *saved* VQ weights. After the last stage pathar.md
(a markdown model card built from the JSON cards) is written next to the weights.

Default sizes, float32 on 2 CPU cores (measured on this machine): structure 1500 steps (~8 min), appearance 1500
steps (~12 min), transformer 1500 steps at batch 8 (~2.1 s/step, 53 min), plus ~6 min for the patch cache (with
the elastic patches) and ~1 min for tokenization. The bundled transformer was trained from scratch for 1500 steps
on the rigid and elastic patches and keeps the weights of step 1100, where the held-out NLL was lowest.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cases import VALIDATION_CASE
from ..labels import MODALITIES
from ..runtime import pick_device, training_autocast
from ..weights import load_card, load_state, save_state, weights_dir, write_card, write_safetensors
from . import HEAD_MARGIN_Z
from .api import (
    APPEARANCE_NAME,
    LESION_FRACTION,
    STRUCTURE_NAME,
    TRANSFORMER_NAME,
    describe_guidance,
    per_modality_guidance,
)
from .commands import FINE_TUNES, STAGES, add_arguments
from .data import MASK_PREFIX, PatchConfig, PatchSet, build_patches, flip_lr, image_batch, mask_batch
from .pseudo_labels import PSEUDO_LABELLED
from .tokenizer import (
    AppearanceVQ,
    StructureVQ,
    VQConfig,
    evaluate_appearance,
    evaluate_structure,
    init_codebook,
    one_hot,
    restart_dead_codes,
)
from .transformer import IARConfig, IARTransformer

LICENSE = ("research use only: trained on BraTS 2013 cases (CC BY-NC-SA 3.0; cite Menze et al., IEEE TMI 2015) "
           "and BraTS-style cases (TCGA-LGG via BrainLesion tutorials, BrainLesion/BraTS package case)")
PSEUDO_LICENSE = ("; the AURORA metastasis case (BrainLesion tutorials repository, Apache-2.0; data provenance "
                  "undocumented) with rule-based pseudo-labels")


FOLDS_LICENSE = ("; BraTS 2018/2021 training cases (CBICA, TCIA; research use under the BraTS terms, cite Bakas et "
                 "al., Sci Data 2017 and arXiv:1811.02629) and the manual BraTS 2013 lesion masks of lesion_masks/")


def license_of(patch: PatchConfig) -> str:
    return LICENSE + (FOLDS_LICENSE if patch.split == "folds" else "") + \
        (PSEUDO_LICENSE if patch.pseudo_labelled else "")


@dataclass
class PathARConfig:
    """Everything that defines the trained models (defaults = the bundled weights)."""

    patch: PatchConfig
    structure: VQConfig
    appearance: VQConfig
    transformer: IARConfig

    @classmethod
    def default(cls) -> PathARConfig:
        patch = PatchConfig(elastic_per_case=48)
        structure = VQConfig(num_labels=patch.num_labels, num_embeddings=128, embedding_dim=32)
        appearance = VQConfig(num_labels=patch.num_labels, num_embeddings=256, embedding_dim=32,
                              num_modalities=len(MODALITIES))
        grid = structure.grid((patch.size,) * 3)
        transformer = IARConfig(grid=grid, structure_vocab=structure.num_embeddings,
                                appearance_vocab=appearance.num_embeddings, num_modalities=len(MODALITIES),
                                dropout=0.1, modality_embedding=True)
        return cls(patch, structure, appearance, transformer)


@dataclass
class TrainConfig:
    structure_steps: int = 1500
    appearance_steps: int = 1500
    transformer_steps: int = 1500
    vq_batch: int = 4
    transformer_batch: int = 8
    vq_lr: float = 1e-3
    transformer_lr: float = 6e-4
    warmup_frac: float = 0.05  # learning-rate warm-up
    vq_warmup_frac: float = 0.15  # VQ stages start as plain auto-encoders (no codebook), then k-means++ seeding
    save_every: int = 100
    log_every: int = 25
    seed: int = 0
    modality_balanced: float = 0.5  # share of transformer batch rows drawn modality-first (rare t1/t2 more often)
    structure_only_share: float = 0.25  # share of transformer rows drawn from the blends (masks only), if any
    transformer_init: str | None = None  # weights folder to warm-start the transformer from (new layers start at 0)
    transformer_select: str = "best_val"  # "best_val": keep the weights of the lowest held-out NLL; "last"
    appearance_token_noise: float = 0.1  # share of token positions the appearance decoder sees as random codes
    decoder_steps: int = 1000  # stage "decoder": fine-tune the appearance decoder with the tokens kept
    decoder_refine_channels: int = 16  # ... adding a full-resolution refinement of this width (0 = none)
    decoder_contrast_weight: float = 2.0  # ... and a loss on each sub-region's contrast to healthy tissue
    decoder_adversarial_weight: float = 0.0  # ... and a patch discriminator's loss (VQGAN-style; 0 = none)
    decoder_discriminator_channels: int = 16  # the discriminator's first-layer width
    decoder_adversarial_start: float = 0.3  # share of the steps before the adversarial loss reaches the decoder
    decoder_adversarial_max: float = 1.0  # cap on the adaptive weight (see DecoderCritic)
    anchor_share: float = 0.0  # share of transformer rows that follow another modality's row of the same patch
    joint_steps: int = 3000  # stage "joint": train a cross-modal refinement of the decoded modalities
    joint_channels: int = 24  # ... of this width
    joint_batch: int = 8  # ... on this many crops
    joint_crop: int = 32  # ... of this side (the refinement sees 9 voxels: crops train it as well as patches)


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _versions() -> dict:
    import monai

    from ..runtime import trains_in_bf16

    bf16 = trains_in_bf16(pick_device("auto"))
    return {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
            "train_precision": "bf16 autocast" if bf16 else "float32"}


def _stage_done(name: str, out_dir: Path, steps: int, config: dict) -> bool:
    try:
        card = load_card(name, out_dir)
    except Exception:  # noqa: BLE001 - any unreadable card means "train it"
        return False
    return card.get("steps") == steps and card.get("config") == config and (out_dir / f"{name}.safetensors").is_file()


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over labels 1.. (the lesion sub-regions), batch-pooled."""
    probs = logits.float().softmax(1)[:, 1:]
    onehot = one_hot(target, logits.shape[1])[:, 1:]
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


@torch.no_grad()
def init_output_bias(conv, data: np.ndarray, prior: bool) -> None:
    """Start the output layer at the data's base rate: log class frequencies (labels) or the mean (images).
    Without it the unnormalised MONAI decoder needs hundreds of Adam steps just to reach the background level."""
    if prior:
        freq = np.bincount(np.asarray(data).ravel(), minlength=conv.bias.numel()) / np.asarray(data).size
        conv.bias.copy_(torch.as_tensor(np.log(freq + 1e-4), dtype=conv.bias.dtype))
    else:
        conv.bias.fill_(float(np.mean(data, dtype=np.float64)))


class _Stage:
    """Shared resumable loop bookkeeping: model, optimizer, checkpoint, loss log, wall time."""

    def __init__(self, work: Path, name: str, model, lr: float):
        from ..pathosyn.training import LossLog, load_checkpoint

        self.dir = work / name
        self.model = model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
        self.ckpt = self.dir / "checkpoint.pt"
        self.step, extra = load_checkpoint(self.ckpt, model, self.opt)
        self.wall = float(extra.get("wall_s", 0.0))
        self.meta = {k: v for k, v in extra.items() if k != "wall_s"}  # kept in the checkpoint across resumes
        self.t0 = time.time()
        self.log = LossLog(self.dir / "loss.jsonl", every=1)
        self.every = 25
        self.buffer: list[float] = []
        print(json.dumps({"stage": name, "resume_step": self.step}), flush=True)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def record(self, loss: float, total: int, **extra) -> None:
        self.buffer.append(loss)
        if self.step % self.every == 0 or self.step == total:
            elapsed = self.wall + time.time() - self.t0
            eta = elapsed / max(1, self.step) * (total - self.step)
            self.log.add(self.step, float(np.mean(self.buffer)), total_wall_s=round(elapsed, 1),
                         eta_s=round(eta, 1), **extra)
            self.buffer = []

    def checkpoint(self) -> None:
        from ..pathosyn.training import save_checkpoint

        save_checkpoint(self.ckpt, self.model, self.opt, self.step,
                        {"wall_s": self.wall + time.time() - self.t0, **self.meta})

    def wall_time(self) -> float:
        return round(self.wall + time.time() - self.t0, 1)


def _split_entries(ps: PatchSet) -> dict:
    """Card entries naming what was held out: the validation case, or the folds (validation + test fold)."""
    if ps.config.split != "folds":
        return {"held_out": [VALIDATION_CASE]}
    from ..folds import make_folds

    folds = make_folds()
    masks = sorted(c for c in ps.training_cases() if c.startswith(MASK_PREFIX))
    return {"held_out": sorted(folds.validation + folds.test), "folds": folds.as_dict(),
            "selection_fold": "validation", **({"structure_only_data": masks} if masks else {})}


def _eval_subset(ps: PatchSet, val: bool, limit: int = 32) -> np.ndarray:
    idx = ps.patches(val)
    return idx[np.linspace(0, len(idx) - 1, min(limit, len(idx))).astype(int)]


def train_structure(ps: PatchSet, cfg: PathARConfig, tc: TrainConfig, work: Path, out_dir: Path, device,
                    progress=None) -> Path:
    torch.manual_seed(tc.seed)
    model = StructureVQ(cfg.structure).to(device)
    st = _Stage(work, "structure", model, tc.vq_lr)
    st.every = tc.log_every
    rng = np.random.default_rng(tc.seed + 1000 + st.step)
    total = tc.structure_steps
    warm = int(tc.vq_warmup_frac * total)
    model.train()
    while st.step < total:
        st.set_lr(lr_at(st.step, total, tc.vq_lr, tc.warmup_frac))
        mask = torch.from_numpy(mask_batch(ps, rng, tc.vq_batch)).to(device)
        if st.step == 0:  # fresh start: output layer at the class base rates
            init_output_bias(model.vqvae.decoder.blocks[-1].conv, ps.masks[ps.patches(False)], prior=True)
        if st.step == warm:  # end of the auto-encoder warm-up: codebook seeded on the (now informative) latents
            with torch.no_grad(), training_autocast(device):
                init_codebook(model.quantizer, model.vqvae.encode(one_hot(mask, cfg.structure.num_labels)))
        with training_autocast(device):
            logits, q_loss, _, z = model(mask, quantize=st.step >= warm)
        ce = F.cross_entropy(logits.float(), mask.long())
        loss = ce + _soft_dice_loss(logits, mask) + q_loss
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.step += 1
        moved = restart_dead_codes(model.quantizer, z) if st.step > warm and st.step % 10 == 0 \
            and st.step < 0.8 * total else 0
        st.record(loss.item(), total, ce=round(ce.item(), 4), perplexity=round(float(_perplexity_of(model)), 1),
                  restarted=moved)
        if st.step % tc.save_every == 0 or st.step == total:
            st.checkpoint()
        if progress:
            progress(st.step / total, f"structure VQ {st.step}/{total}")
    metrics = {"val": evaluate_structure(model, ps.masks[_eval_subset(ps, True)], device),
               "train": evaluate_structure(model, ps.masks[_eval_subset(ps, False)], device)}
    card = {"model": STRUCTURE_NAME, "family": "PathAR structure VQ-VAE (MONAI VQVAE on one-hot canonical masks)",
            "config": cfg.structure.to_dict(), "patch": cfg.patch.to_dict(), "steps": st.step, "batch": tc.vq_batch,
            "lr": tc.vq_lr, "wall_time_s": st.wall_time(), "data": ps.training_cases(),
            **_split_entries(ps), "metrics": metrics, "versions": _versions(),
            "license": license_of(cfg.patch)}
    path = save_state(STRUCTURE_NAME, model.state_dict(), card, out_dir)
    print(json.dumps({"saved": str(path), "metrics": metrics}), flush=True)
    return path


def _perplexity_of(model) -> float:
    """Codebook perplexity from the quantizer's EMA cluster sizes (a running estimate of code usage)."""
    q = model.quantizer.quantizer
    p = q.ema_cluster_size / q.ema_cluster_size.sum().clamp(min=1e-8)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _appearance_metrics(model: AppearanceVQ, ps: PatchSet, device) -> dict:
    """evaluate_appearance on up to 48 evenly spread images of the validation and of the training split."""
    metrics = {}
    for split, val in (("val", True), ("train", False)):
        idx = ps.image_indices(val)
        idx = idx[np.linspace(0, len(idx) - 1, min(48, len(idx))).astype(int)]
        metrics[split] = evaluate_appearance(model, ps.images[idx].astype(np.float32), ps.masks[ps.image_patch[idx]],
                                             device, ps.image_modality[idx])
    return metrics


def train_appearance(ps: PatchSet, cfg: PathARConfig, tc: TrainConfig, work: Path, out_dir: Path, device,
                     progress=None) -> Path:
    torch.manual_seed(tc.seed + 1)
    model = AppearanceVQ(cfg.appearance).to(device)
    st = _Stage(work, "appearance", model, tc.vq_lr)
    st.every = tc.log_every
    rng = np.random.default_rng(tc.seed + 2000 + st.step)
    total = tc.appearance_steps
    warm = int(tc.vq_warmup_frac * total)
    model.train()
    while st.step < total:
        st.set_lr(lr_at(st.step, total, tc.vq_lr, tc.warmup_frac))
        x, m, mod = image_batch(ps, rng, tc.vq_batch)
        x = torch.from_numpy(x)[:, None].to(device)
        m = torch.from_numpy(m).to(device)
        mod = torch.from_numpy(mod).to(device)
        if st.step == 0:  # fresh start: output layer at the mean intensity
            init_output_bias(model.head[-1].conv, ps.images[ps.image_indices(False)[::8]], prior=False)
        if st.step == warm:  # end of the auto-encoder warm-up: codebook seeded on the (now informative) latents
            with torch.no_grad(), training_autocast(device):
                init_codebook(model.quantizer, model._encode(x, m, mod)[0])
        with training_autocast(device):
            recon, q_loss, _, z = model(x, m, quantize=st.step >= warm, modality=mod,
                                        token_noise=tc.appearance_token_noise)
        err = (recon.float() - x).abs()
        lesion = (m > 0)[:, None].float()
        l1 = err.mean()
        loss = l1 + (err * lesion).sum() / lesion.sum().clamp(min=1.0) + q_loss
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.step += 1
        moved = restart_dead_codes(model.quantizer, z) if st.step > warm and st.step % 10 == 0 \
            and st.step < 0.8 * total else 0
        st.record(loss.item(), total, l1=round(l1.item(), 4), perplexity=round(_perplexity_of(model), 1),
                  restarted=moved)
        if st.step % tc.save_every == 0 or st.step == total:
            st.checkpoint()
        if progress:
            progress(st.step / total, f"appearance VQ {st.step}/{total}")

    metrics = _appearance_metrics(model, ps, device)
    card = {"model": APPEARANCE_NAME,
            "family": "PathAR appearance VQ-VAE (MONAI Encoder/Decoder/EMA quantizer, decoder conditioned on the mask"
            + (" and the modality label)" if cfg.appearance.num_modalities else ")"),
            "token_noise": tc.appearance_token_noise,
            "config": cfg.appearance.to_dict(), "patch": cfg.patch.to_dict(), "steps": st.step,
            "batch": tc.vq_batch, "lr": tc.vq_lr, "wall_time_s": st.wall_time(), "data": ps.sources(),
            **_split_entries(ps), "metrics": metrics, "intensity": "z-score over healthy foreground",
            "versions": _versions(), "license": license_of(cfg.patch)}
    path = save_state(APPEARANCE_NAME, model.state_dict(), card, out_dir)
    print(json.dumps({"saved": str(path), "metrics": metrics}), flush=True)
    return path


def subregion_contrast_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, num_labels: int,
                            background_z: float, min_voxels: int = 20) -> torch.Tensor:
    """Mean |contrast(recon) - contrast(image)| over the sub-regions present (>= min_voxels), where a contrast is
    a sub-region's mean minus healthy tissue's (label 0 above the background), as in quality.mean_contrasts.
    recon, image (B, 1, *S), mask (B, *S)."""
    regions = one_hot(mask, num_labels)  # (B, L, *S)
    regions[:, 0] *= (image[:, 0] > background_z + HEAD_MARGIN_Z).float()
    count = regions.flatten(2).sum(-1)  # (B, L)
    present = (count[:, 1:] >= min_voxels).float()
    if not present.any():
        return recon.new_zeros(())

    def contrasts(x):
        means = (regions * x.float()).flatten(2).sum(-1) / count.clamp(min=1)  # (B, L)
        return means[:, 1:] - means[:, :1]

    return ((contrasts(recon) - contrasts(image)).abs() * present).sum() / present.sum()


def decoder_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, num_labels: int,
                 contrast_weight: float, background_z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, contrast term) of a decoding recon (B, 1, *S) of image (B, 1, *S) with mask (B, *S): L1, L1 in the
    lesion, and contrast_weight x the sub-regions' contrast error (subregion_contrast_loss)."""
    err = (recon.float() - image).abs()
    lesion = (mask > 0)[:, None].float()
    contrast = subregion_contrast_loss(recon, image, mask, num_labels, background_z)
    return err.mean() + (err * lesion).sum() / lesion.sum().clamp(min=1.0) + contrast_weight * contrast, contrast


class DecoderCritic:
    """A conditional patch discriminator for the decoder fine-tune (VQGAN's recipe, MONAI's PatchDiscriminator
    and least-squares PatchAdversarialLoss). It sees [image, mask one-hot, modality one-hot] and judges local
    patches, so the decoder learns to draw healthy tissue that looks scanned rather than a blurred mean. Its
    weight is adaptive: the adversarial gradient on the decoder's last layer is scaled to `weight` x the
    reconstruction's, so the reconstruction losses keep the tokens' meaning, and capped at `max_weight`: a
    discriminator near chance has tiny gradients, and the ratio then amplified their noise (weights of 10-35 in the
    first run, reconstruction loss 1.7 -> 3.6 within 60 steps)."""

    def __init__(self, vq_cfg: VQConfig, tc: TrainConfig, patch_side: int):
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        self.weight, self.channels = tc.decoder_adversarial_weight, tc.decoder_discriminator_channels
        self.start, self.max_weight = tc.decoder_adversarial_start, tc.decoder_adversarial_max
        self.layers = max(1, min(3, int(math.log2(patch_side)) - 3))  # 3 for 64^3 patches
        conditions = vq_cfg.num_labels + vq_cfg.num_modalities
        self.discriminator = PatchDiscriminator(spatial_dims=vq_cfg.spatial_dims, channels=self.channels,
                                                in_channels=1 + conditions, num_layers_d=self.layers,
                                                norm="INSTANCE")
        self.loss = PatchAdversarialLoss(criterion="least_squares")

    def _logits(self, image: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        with training_autocast(image.device):
            return self.discriminator(torch.cat([image.float(), conditions], 1))[-1].float()  # (B, 1, *patches)

    def generator_loss(self, reconstruction_loss: torch.Tensor, recon: torch.Tensor, conditions: torch.Tensor,
                       model: AppearanceVQ, on: bool) -> tuple[torch.Tensor, float]:
        """reconstruction_loss + w * the decoder's adversarial loss (w = 0 while the discriminator warms up)."""
        if not on:
            return reconstruction_loss, 0.0
        fooled = self.loss(self._logits(recon, conditions), target_is_real=True, for_discriminator=False)
        last = (model.refine[-1] if model.refine is not None else model.head[-1]).conv.weight
        rec_grad = torch.autograd.grad(reconstruction_loss, last, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(fooled, last, retain_graph=True)[0]
        w = (self.weight * rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(max=self.max_weight).detach()
        return reconstruction_loss + w * fooled, round(float(w), 4)

    def step_discriminator(self, recon: torch.Tensor, real: torch.Tensor, conditions: torch.Tensor) -> float:
        """Replaces the discriminator's gradients (the generator loss reached it too) by its own loss's."""
        for p in self.discriminator.parameters():
            p.grad = None
        loss = 0.5 * (self.loss(self._logits(recon.detach(), conditions), target_is_real=False, for_discriminator=True)
                      + self.loss(self._logits(real, conditions), target_is_real=True, for_discriminator=True))
        loss.backward()
        return round(loss.item(), 4)

    def describe(self) -> dict:
        discriminator = (f"MONAI PatchDiscriminator, {self.layers} layers, {self.channels} channels, instance norm, "
                         "least squares")
        weighting = f"adaptive on the decoder's last layer (VQGAN), at most {self.max_weight}"
        return {"adversarial": {"weight": self.weight, "discriminator": discriminator, "start": self.start,
                                "weighting": weighting}}


def train_appearance_decoder(ps: PatchSet, cfg: PathARConfig, tc: TrainConfig, work: Path, out_dir: Path, device,
                             progress=None) -> Path:
    """Fine-tune the appearance VQ's decoder in out_dir (plus a full-resolution refinement, tc.decoder_*), with
    the encoder and the codebook frozen: every image keeps its tokens, so the transformer stays valid. The loss
    adds each sub-region's contrast to healthy tissue, which the coarse decoder blurred (the t1c rim and the core
    inside it). The transformer card in out_dir is pointed at the new weights."""
    from ..errors import WeightsError

    base_state, base_card = load_state(APPEARANCE_NAME, out_dir)
    vq_cfg = VQConfig.from_dict({**base_card["config"], "refine_channels": tc.decoder_refine_channels
                                 or base_card["config"].get("refine_channels", 0)})
    model = AppearanceVQ(vq_cfg).to(device)
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    if unexpected or any(not k.startswith("refine.") for k in missing):
        raise WeightsError(f"{APPEARANCE_NAME} in {out_dir} does not match its card's config")
    for part in (model.encoder, model.quantizer):
        part.requires_grad_(False)
    torch.manual_seed(tc.seed + 3)
    critic = DecoderCritic(vq_cfg, tc, ps.config.size) if tc.decoder_adversarial_weight > 0 else None
    trained = nn.ModuleDict({"appearance": model, "discriminator": critic.discriminator}) if critic else model
    st = _Stage(work, "appearance_decoder_adversarial" if critic else "appearance_decoder", trained,
                tc.vq_lr * 0.3)
    st.every = tc.log_every
    rng = np.random.default_rng(tc.seed + 3000 + st.step)
    total = tc.decoder_steps
    probe = np.concatenate([ps.image_indices(True)[:8], ps.image_indices(False)[:8]])  # tokens must not change
    probe_x = torch.from_numpy(ps.images[probe].astype(np.float32))[:, None].to(device)
    probe_m = torch.from_numpy(ps.masks[ps.image_patch[probe]]).to(device)
    probe_mod = torch.from_numpy(ps.image_modality[probe]).to(device)
    with torch.no_grad():
        tokens_before = model.encode(probe_x, probe_m, probe_mod)
    model.train()
    model.encoder.eval()  # frozen: no dropout or norm statistics to update
    while st.step < total:
        st.set_lr(lr_at(st.step, total, tc.vq_lr * 0.3, tc.warmup_frac))
        x, m, mod = image_batch(ps, rng, tc.vq_batch)
        x, m, mod = torch.from_numpy(x)[:, None].to(device), torch.from_numpy(m).to(device), \
            torch.from_numpy(mod).to(device)
        with torch.no_grad():
            quantized = model.corrupt(model.code_vectors(model.encode(x, m, mod)), tc.appearance_token_noise)
        conditions = model._conditions(m, mod)  # (B, L + M, *S): the decoder's and the critic's
        with training_autocast(device):
            recon = model._decode(quantized, conditions)
        loss, contrast = decoder_loss(recon, x, m, vq_cfg.num_labels, tc.decoder_contrast_weight,
                                      ps.config.background_z)
        st.opt.zero_grad(set_to_none=True)
        logged = {"contrast": round(contrast.item(), 4), "reconstruction": round(loss.item(), 4)}
        if critic:
            generator_on = st.step >= critic.start * total
            loss, logged["adversarial_weight"] = critic.generator_loss(loss, recon, conditions, model, generator_on)
        loss.backward()
        if critic:
            logged["discriminator"] = critic.step_discriminator(recon, x, conditions)  # replaces the critic's grads
        st.opt.step()
        st.step += 1
        st.record(loss.item(), total, **logged)
        if st.step % tc.save_every == 0 or st.step == total:
            st.checkpoint()
        if progress:
            progress(st.step / total, f"appearance decoder {st.step}/{total}")
    model.eval()
    with torch.no_grad():
        if not torch.equal(model.encode(probe_x, probe_m, probe_mod), tokens_before):
            raise RuntimeError("the appearance tokens changed while fine-tuning the decoder")

    metrics = _appearance_metrics(model, ps, device)
    history = list(base_card.get("decoder_finetunes", []))
    history.append({"from_sha256": base_card["sha256"], "steps": st.step, "batch": tc.vq_batch,
                    "lr": tc.vq_lr * 0.3, "refine_channels": vq_cfg.refine_channels,
                    "contrast_weight": tc.decoder_contrast_weight, "token_noise": tc.appearance_token_noise,
                    **(critic.describe() if critic else {}),
                    "wall_time_s": st.wall_time(), "metrics_before": base_card.get("metrics")})
    card = {**base_card, "config": vq_cfg.to_dict(), "metrics": metrics, "decoder_finetunes": history,
            "family": base_card["family"] if "decoder fine-tuned" in base_card["family"]
            else base_card["family"] + "; decoder fine-tuned with the encoder and codebook frozen"}
    return _save_same_tokens(model, card, base_card, out_dir)


def _save_same_tokens(model: AppearanceVQ, card: dict, base_card: dict, out_dir: Path) -> Path:
    """Save appearance weights that keep every image's tokens (only decoding changed): the card lists the
    earlier weights as token-compatible and the transformer card in out_dir is pointed at the new ones."""
    card = {**card, "token_compatible_sha256": sorted(set(base_card.get("token_compatible_sha256", []))
                                                      | {base_card["sha256"]})}
    path = save_state(APPEARANCE_NAME, model.state_dict(), card, out_dir)
    if (out_dir / f"{TRANSFORMER_NAME}.json").is_file():
        t_card = load_card(TRANSFORMER_NAME, out_dir)
        if t_card.get("appearance_vq", {}).get("sha256") in card["token_compatible_sha256"]:
            t_card["appearance_vq"] = {"name": APPEARANCE_NAME, "sha256": load_card(APPEARANCE_NAME, out_dir)["sha256"]}
            write_card(TRANSFORMER_NAME, t_card, out_dir)
    print(json.dumps({"saved": str(path), "metrics": card["metrics"]}), flush=True)
    return path


class RoundTrips:
    """Every image of the patch set encoded and decoded by a frozen appearance VQ, a share of its tokens
    swapped for random codes as a sampler's imperfect tokens are (float16, in the images' order), with each
    patch's modalities for the joint refinement."""

    def __init__(self, model: AppearanceVQ, ps: PatchSet, device, token_noise: float, seed: int, batch: int = 8):
        self.ps = ps
        self.images = np.zeros_like(ps.images)
        torch.manual_seed(seed)
        with torch.no_grad():  # the model is in eval mode: its forward pass leaves the codebook as it is
            for start in range(0, len(ps.images), batch):
                i = np.arange(start, min(start + batch, len(ps.images)))
                x = torch.from_numpy(ps.images[i].astype(np.float32))[:, None].to(device)
                m = torch.from_numpy(ps.masks[ps.image_patch[i]]).to(device)
                mod = torch.from_numpy(ps.image_modality[i]).to(device)
                self.images[i] = model(x, m, modality=mod, token_noise=token_noise)[0][:, 0].float().cpu().numpy()

    def stacked(self, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decoded (M, *S), real (M, *S), available (M,) bool): the patch's images in label order, zero where
        absent."""
        M = len(MODALITIES)
        decoded, real = (np.zeros((M, *self.ps.masks.shape[1:]), np.float32) for _ in range(2))
        available = np.zeros(M, bool)
        for i in np.nonzero(self.ps.image_patch == patch)[0]:
            k = self.ps.image_modality[i]
            decoded[k], real[k], available[k] = self.images[i], self.ps.images[i], True
        return decoded, real, available


def joint_batch(rt: RoundTrips, rng: np.random.Generator, batch: int, crop: int):
    """Crops (decoded (B, M, c^3), real (B, M, c^3), masks (B, c^3), present (B, M)): half of them centred on
    a lesion voxel, flipped at random; half keep every available modality, half a random non-empty subset."""
    ps, side = rt.ps, rt.ps.masks.shape[1]
    xs, ys, ms, presents = [], [], [], []
    for p in rng.choice(ps.imaged_patches(False), batch):
        decoded, real, available = rt.stacked(p)
        mask = ps.masks[p]
        lesion = np.argwhere(mask > 0)
        if len(lesion) and rng.random() < 0.5:
            centre = lesion[rng.integers(len(lesion))]
            start = np.clip(centre - crop // 2, 0, side - crop)
        else:
            start = rng.integers(0, side - crop + 1, 3)
        box = tuple(slice(a, a + crop) for a in start)
        decoded, real, mask = decoded[(slice(None),) + box], real[(slice(None),) + box], mask[box]
        if rng.random() < 0.5:
            decoded, real, mask = flip_lr(decoded), flip_lr(real), flip_lr(mask)
        present = available.copy()
        if rng.random() < 0.5:
            present &= rng.random(len(present)) < 0.5
            if not present.any():
                present[rng.choice(np.nonzero(available)[0])] = True
        xs.append(decoded)
        ys.append(real)
        ms.append(mask)
        presents.append(present)
    return (np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ys)), np.ascontiguousarray(np.stack(ms)),
            np.stack(presents))


def _joint_loss(refined: torch.Tensor, real: torch.Tensor, mask: torch.Tensor, present: torch.Tensor,
                num_labels: int, contrast_weight: float, background_z: float) -> torch.Tensor:
    """The decoder's loss (decoder_loss) over the present modalities."""
    b, m = torch.nonzero(present, as_tuple=True)
    return decoder_loss(refined[b, m][:, None], real[b, m][:, None], mask[b], num_labels, contrast_weight,
                        background_z)[0]


@torch.no_grad()
def joint_validation(model: AppearanceVQ, rt: RoundTrips, device) -> dict:
    """MAE of the decoded validation patches (all their modalities) against the real ones, before and after
    the joint refinement: everywhere and in the lesion."""
    err = {"mae": [0.0, 0.0], "mae_lesion": [0.0, 0.0]}
    patches = rt.ps.imaged_patches(True)
    for p in patches:
        decoded, real, available = rt.stacked(p)
        mask = torch.from_numpy(rt.ps.masks[p][None]).to(device)
        present = torch.from_numpy(available[None]).to(device)
        x = torch.from_numpy(decoded[None]).to(device)
        refined = model.joint(x, present, one_hot(mask, model.cfg.num_labels))[0, available].cpu().numpy()
        lesion = rt.ps.masks[p] > 0
        for k, image in enumerate((decoded[available], refined)):
            diff = np.abs(image - real[available])
            err["mae"][k] += float(diff.mean())
            err["mae_lesion"][k] += float(diff[:, lesion].mean()) if lesion.any() else 0.0
    n = max(1, len(patches))
    return {f"{k}_{when}": round(v[i] / n, 4) for k, v in err.items() for i, when in enumerate(("decoded", "refined"))}


def _joint_score(val: dict) -> float:
    """The validation score the joint stage keeps the lowest of: the loss's L1 parts (everywhere + in the lesion)."""
    return val["mae_refined"] + val["mae_lesion_refined"]


def train_joint_refinement(ps: PatchSet, cfg: PathARConfig, tc: TrainConfig, work: Path, out_dir: Path, device,
                           progress=None) -> Path:
    """Train the appearance VQ's cross-modal refinement in out_dir (tc.joint_*) on round trips of the training
    patches, everything else frozen: tokens and the transformer stay valid. Keeps the weights of the lowest
    validation MAE everywhere + in the lesion (checked every save; the identity if never below it)."""
    from ..errors import WeightsError

    base_state, base_card = load_state(APPEARANCE_NAME, out_dir)
    vq_cfg = VQConfig.from_dict({**base_card["config"], "joint_channels": tc.joint_channels})
    model = AppearanceVQ(vq_cfg).to(device)
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    if unexpected or any(not k.startswith("joint.") for k in missing):
        raise WeightsError(f"{APPEARANCE_NAME} in {out_dir} does not match its card's config")
    model.eval().requires_grad_(False)
    model.joint.requires_grad_(True)
    rt = RoundTrips(model, ps, device, tc.appearance_token_noise, tc.seed + 4)
    st = _Stage(work, "appearance_joint", model.joint, tc.vq_lr)
    st.every = tc.log_every
    rng = np.random.default_rng(tc.seed + 4000 + st.step)
    total = tc.joint_steps
    if "best" not in st.meta:
        st.meta["best"] = {"step": 0, **joint_validation(model, rt, device)}
    model.joint.train()
    while st.step < total:
        st.set_lr(lr_at(st.step, total, tc.vq_lr, tc.warmup_frac))
        x, y, m, present = (torch.from_numpy(a).to(device) for a in joint_batch(rt, rng, tc.joint_batch,
                                                                                  tc.joint_crop))
        with training_autocast(device):
            refined = model.joint(x, present, one_hot(m, vq_cfg.num_labels))
        loss = _joint_loss(refined, y, m, present, vq_cfg.num_labels, tc.decoder_contrast_weight,
                          ps.config.background_z)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.step += 1
        st.record(loss.item(), total)
        if st.step % tc.save_every == 0 or st.step == total:
            model.joint.eval()
            val = joint_validation(model, rt, device)
            model.joint.train()
            if _joint_score(val) < _joint_score(st.meta["best"]):
                st.meta["best"] = {"step": st.step, **val}
                write_safetensors(model.joint.state_dict(), st.dir / "best.safetensors")
            st.log.add(st.step, loss.item(), **{f"val_{k}": v for k, v in val.items()})
            st.checkpoint()
        if progress:
            progress(st.step / total, f"joint refinement {st.step}/{total}")
    model.joint.eval()
    best = st.meta["best"]
    if best["step"]:
        from safetensors.torch import load_file

        model.joint.load_state_dict(load_file(str(st.dir / "best.safetensors")))
    else:
        nn.init.zeros_(model.joint.net[-1].conv.weight)  # never better than none: the identity
        nn.init.zeros_(model.joint.net[-1].conv.bias)
    history = list(base_card.get("joint_refinements", []))
    history.append({"from_sha256": base_card["sha256"], "steps": st.step, "kept_step": best["step"],
                    "batch": tc.joint_batch, "crop": tc.joint_crop, "lr": tc.vq_lr, "channels": tc.joint_channels,
                    "contrast_weight": tc.decoder_contrast_weight, "token_noise": tc.appearance_token_noise,
                    "validation": best, "wall_time_s": st.wall_time()})
    card = {**base_card, "config": vq_cfg.to_dict(), "joint_refinements": history,
            "family": base_card["family"] if "cross-modal" in base_card["family"]
            else base_card["family"] + "; a cross-modal refinement of the modalities decoded together"}
    return _save_same_tokens(model, card, base_card, out_dir)


@torch.no_grad()
def tokenize(ps: PatchSet, structure: StructureVQ, appearance: AppearanceVQ, device, batch: int = 8) -> dict:
    """Tokens of every patch (and its left-right flip): s (P, 2, N), images' a (I, 2, N)."""
    structure.eval()
    appearance.eval()
    n_patches, n_images = len(ps.masks), len(ps.images)
    s = np.zeros((n_patches, 2, int(np.prod(structure.cfg.grid((ps.config.size,) * 3)))), np.int16)
    a = np.zeros((n_images, 2, s.shape[-1]), np.int16)
    for flip in (0, 1):
        f = flip_lr if flip else (lambda v: v)
        for i in range(0, n_patches, batch):
            m = torch.from_numpy(np.stack([f(x) for x in ps.masks[i:i + batch]])).to(device)
            s[i:i + batch, flip] = structure.encode(m).flatten(1).cpu().numpy()
        for i in range(0, n_images, batch):
            x = np.stack([f(v.astype(np.float32)) for v in ps.images[i:i + batch]])
            m = np.stack([f(ps.masks[p]) for p in ps.image_patch[i:i + batch]])
            mod = torch.from_numpy(ps.image_modality[i:i + batch].astype(np.int64)).to(device)
            t = appearance.encode(torch.from_numpy(x)[:, None].to(device), torch.from_numpy(m).to(device), mod)
            a[i:i + batch, flip] = t.flatten(1).cpu().numpy()
    return {"s": s, "a": a}


def load_vqs(folder: Path, device):
    """(StructureVQ, AppearanceVQ, cards) from saved weights (sha256-verified)."""
    s_state, s_card = load_state(STRUCTURE_NAME, folder)
    a_state, a_card = load_state(APPEARANCE_NAME, folder)
    structure = StructureVQ(VQConfig.from_dict(s_card["config"]))
    structure.load_state_dict(s_state)
    appearance = AppearanceVQ(VQConfig.from_dict(a_card["config"]))
    appearance.load_state_dict(a_state)
    return structure.to(device).eval(), appearance.to(device).eval(), s_card, a_card


def warm_start_transformer(model: IARTransformer, folder: Path, s_card: dict, a_card: dict) -> dict:
    """Load earlier transformer weights into `model`; layers the old model lacks (e.g. the modality embedding)
    start at zero, so training resumes from the old model's predictions. The structure VQ must be the same. With
    another appearance VQ the appearance codes mean something else: their embeddings and output head keep their
    fresh initialisation, the rest (blocks, structure stream, modality labels) is reused."""
    from ..errors import WeightsError

    state, card = load_state(TRANSFORMER_NAME, folder)
    if card.get("structure_vq", {}).get("sha256") != s_card["sha256"]:
        raise WeightsError(f"cannot warm-start from {folder}: its transformer used a different {s_card['model']}")
    fresh = []
    same_tokens = {a_card["sha256"], *a_card.get("token_compatible_sha256", [])}  # a decoder fine-tune keeps them
    if card.get("appearance_vq", {}).get("sha256") not in same_tokens:
        vocab = model.cfg.appearance_vocab
        state = dict(state)
        wae = state["wae.weight"].clone()
        wae[:vocab] = model.wae.weight.detach()[:vocab]
        state["wae.weight"] = wae
        state["head_a.weight"] = model.head_a.weight.detach().clone()
        fresh = ["wae.weight[:appearance_vocab]", "head_a.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise WeightsError(f"cannot warm-start from {folder}: unexpected weights {unexpected[:3]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in missing:
                p.zero_()
    info = {"from": str(folder), "sha256": card["sha256"], "steps": card.get("steps"), "new_layers": missing,
            "reinitialised": fresh}
    print(json.dumps({"warm_start": info}), flush=True)
    if card.get("sampling"):  # the warm start's sampling settings stay the default until chosen again
        info["sampling"] = {**card["sampling"], "inherited_from": f"{folder} (warm start)"}
    return info


def train_transformer(ps: PatchSet, cfg: PathARConfig, tc: TrainConfig, work: Path, out_dir: Path, device,
                      progress=None) -> Path:
    structure, appearance, s_card, a_card = load_vqs(out_dir, device)
    key = f"{s_card['sha256'][:12]}_{a_card['sha256'][:12]}"
    tok_path = work / "transformer" / f"tokens_{key}.npz"
    if tok_path.is_file():
        tokens = dict(np.load(tok_path))
    else:
        t0 = time.time()
        tokens = tokenize(ps, structure, appearance, device)
        tok_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tok_path, **tokens)
        print(json.dumps({"tokenized": str(tok_path), "seconds": round(time.time() - t0, 1)}), flush=True)
    s_tok = torch.from_numpy(tokens["s"].astype(np.int64))
    a_tok = torch.from_numpy(tokens["a"].astype(np.int64))
    mod = torch.from_numpy(ps.image_modality.astype(np.int64))
    train_imgs, val_imgs = ps.image_indices(False), ps.image_indices(True)
    # rows drawn patch-first (then one of its modalities: cases with 2 modalities are not under-represented) or,
    # a share `modality_balanced` of them, modality-first (t1 and t2 exist in fewer cases); with blends, a share
    # `structure_only_share` of the rows are blends (structure tokens only)
    by_patch = {int(p): np.nonzero(ps.image_patch == p)[0] for p in ps.imaged_patches(False)}
    structure_only = ps.structure_only_patches(False)  # blends and lesion masks without a scan
    patches = np.array(sorted(by_patch))
    by_modality = [m for m in (train_imgs[ps.image_modality[train_imgs] == k] for k in range(len(MODALITIES)))
                   if len(m)]

    torch.manual_seed(tc.seed + 2)
    model = IARTransformer(cfg.transformer).to(device)
    warm = None
    if tc.transformer_init and not (work / "transformer" / "checkpoint.pt").is_file():
        warm = warm_start_transformer(model, Path(tc.transformer_init), s_card, a_card)
    st = _Stage(work, "transformer", model, tc.transformer_lr)
    if warm:
        st.meta["sampling"] = warm.pop("sampling", None)  # the card's default until a sweep chooses again
        st.meta["warm_start"] = warm
    st.every = tc.log_every
    rng = np.random.default_rng(tc.seed + 3000 + st.step)
    total = tc.transformer_steps

    if tc.anchor_share and not cfg.transformer.anchor_conditioning:
        raise ValueError("anchor_share > 0 needs a transformer with anchor_conditioning")
    images_of_patch: dict[int, list[int]] = {}
    for i, p in enumerate(ps.image_patch):
        images_of_patch.setdefault(int(p), []).append(i)

    def anchors_of(images: np.ndarray, flips: np.ndarray, rows: int, draw: np.random.Generator) -> torch.Tensor:
        """(rows, N) anchor ids: with probability anchor_share an image row follows another modality's tokens of
        the same patch (and flip); the other rows, and structure-only rows, follow none."""
        ids = torch.full((rows, a_tok.shape[-1]), model.no_anchor, dtype=torch.long)
        for r, (i, f) in enumerate(zip(images, flips)):
            others = [j for j in images_of_patch[int(ps.image_patch[i])] if j != i]
            if others and draw.random() < tc.anchor_share:
                j = int(draw.choice(others))
                ids[r] = model.anchor_ids(a_tok[j, f][None], mod[j:j + 1])[0]
        return ids

    def batch_of(images: np.ndarray, flips: np.ndarray, masks_only: np.ndarray | None = None,
                 draw: np.random.Generator | None = None):
        """Rows for images (I,) and then structure-only patches (no appearance: tokens 0, modality 0); with
        anchor conditioning also the rows' anchor ids."""
        masks_only = np.zeros(0, int) if masks_only is None else masks_only
        p = np.concatenate([ps.image_patch[images], masks_only])
        real = torch.arange(len(p)) < len(images)
        a = torch.zeros(len(p), a_tok.shape[-1], dtype=torch.long)
        a[real] = a_tok[images, flips[:len(images)]]
        m = torch.zeros(len(p), dtype=torch.long)
        m[real] = mod[images]
        anchor = None
        if cfg.transformer.anchor_conditioning:
            anchor = anchors_of(images, flips, len(p), draw if draw is not None else rng).to(device)
        return s_tok[p, flips].to(device), a.to(device), m.to(device), real.to(device), anchor

    if tc.transformer_select not in ("best_val", "last"):
        raise ValueError(f"transformer_select must be 'best_val' or 'last', got {tc.transformer_select!r}")
    best_path = work / "transformer" / "best_val.safetensors"  # the lowest held-out NLL so far (resumable)

    def nll(split_idx: np.ndarray) -> dict:
        was_training = model.training
        model.eval()
        ls, la = [], []
        draw = np.random.default_rng(tc.seed + 4000)  # the same anchors at every evaluation
        with torch.no_grad():
            for i in range(0, len(split_idx), 8):
                chunk = split_idx[i:i + 8]
                _, s_l, a_l = model.loss(*batch_of(chunk, np.zeros(len(chunk), int), draw=draw))  # no blends
                ls.append(float(s_l))
                la.append(float(a_l))
        model.train(was_training)
        return {"nll_structure": round(float(np.mean(ls)), 4), "nll_appearance": round(float(np.mean(la)), 4)}

    model.train()
    while st.step < total:
        st.set_lr(lr_at(st.step, total, tc.transformer_lr, tc.warmup_frac))
        n_masks = int(rng.binomial(tc.transformer_batch, tc.structure_only_share)) if len(structure_only) else 0
        images = np.array([rng.choice(by_modality[rng.integers(len(by_modality))])
                           if rng.random() < tc.modality_balanced else rng.choice(by_patch[int(rng.choice(patches))])
                           for _ in range(tc.transformer_batch - n_masks)], dtype=int)
        masks_only = rng.choice(structure_only, n_masks) if n_masks else None
        flips = rng.integers(0, 2, tc.transformer_batch)
        with training_autocast(device):
            loss, loss_s, loss_a = model.loss(*batch_of(images, flips, masks_only))
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        st.opt.step()
        st.step += 1
        st.record(loss.item(), total, loss_s=round(loss_s.item(), 4), loss_a=round(loss_a.item(), 4))
        if st.step % tc.save_every == 0 or st.step == total:
            if tc.transformer_select == "best_val":
                val = nll(val_imgs)
                score = val["nll_structure"] + val["nll_appearance"]
                st.meta.setdefault("val_curve", []).append({"step": st.step, **val})
                if score < st.meta.get("best_val", {}).get("score", float("inf")):
                    write_safetensors(model.state_dict(), best_path)
                    st.meta["best_val"] = {"step": st.step, "score": round(score, 4), **val}
            st.checkpoint()
        if progress:
            progress(st.step / total, f"transformer {st.step}/{total}")

    if tc.transformer_select == "best_val" and "best_val" in st.meta:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(best_path))
    model.eval()
    metrics = {"val": nll(val_imgs), "train": nll(train_imgs[:: max(1, len(train_imgs) // 32)])}
    card = {"model": TRANSFORMER_NAME,
            "family": "PathAR interleaved AR transformer (nanoGPT-style, asymmetric attention, KV cache)",
            "config": cfg.transformer.to_dict(), "patch": cfg.patch.to_dict(), "modalities": list(MODALITIES),
            "structure_vq": {"name": STRUCTURE_NAME, "sha256": s_card["sha256"]},
            "appearance_vq": {"name": APPEARANCE_NAME, "sha256": a_card["sha256"]},
            "steps": st.step, "batch": tc.transformer_batch, "lr": tc.transformer_lr, "wall_time_s": st.wall_time(),
            "modality_balanced": tc.modality_balanced, "warm_start": st.meta.get("warm_start"),
            **({"sampling": st.meta["sampling"]} if st.meta.get("sampling") else {}),
            **({"anchor_share": tc.anchor_share} if tc.anchor_share else {}),
            **({"structure_only_share": tc.structure_only_share} if len(structure_only) else {}),
            "selection": {"rule": tc.transformer_select, "selected_step": st.meta.get("best_val", {}).get(
                "step", st.step), "val_curve": st.meta.get("val_curve", [])},
            "params": model.num_params(), "data": ps.sources(), **_split_entries(ps),
            "metrics": metrics, "versions": _versions(), "license": license_of(cfg.patch)}
    path = save_state(TRANSFORMER_NAME, model.state_dict(), card, out_dir)
    print(json.dumps({"saved": str(path), "metrics": metrics}), flush=True)
    return path


def add_sample_metrics(out_dir: Path, n: int = 8, seed: int = 0) -> dict:
    """Sample n pairs with the saved weights, add quality metrics and sampling time to the transformer card."""
    from ..weights import load_state as _load
    from . import api, quality

    t0 = time.time()
    pairs = api.sample_pairs(list(MODALITIES), n=n, seed=seed, device="cpu", weights=out_dir)
    seconds = (time.time() - t0) / n
    summary = quality.summarize_masks([p.mask.array for p in pairs])
    state, card = _load(TRANSFORMER_NAME, out_dir)
    card["metrics"]["samples"] = {"n": n, "seed": seed, "seconds_per_sample_4_modalities": round(seconds, 2),
                                  **summary}
    card.pop("sha256", None)
    card.pop("file", None)
    save_state(TRANSFORMER_NAME, state, card, out_dir)
    return card["metrics"]["samples"]


def _numbers_first(item: tuple[str, object]) -> tuple:
    """Sort key of table rows named by a guidance: numbers in numeric order, then the rest by name."""
    try:
        return 0, float(item[0]), ""
    except ValueError:
        return 1, 0.0, item[0]


def _joint_line(run: dict) -> str:
    """The markdown card's line on the appearance VQ's latest joint refinement (`joint_refinements[-1]`)."""
    v = run["validation"]
    return (f"- Cross-modal refinement (appearance VQ `joint_channels` {run['channels']}): the modalities of a sample "
            "are decoded from their own tokens, then corrected together with the mask by a 3-layer convolution "
            f"(9-voxel field); trained {run['steps']} steps on round trips of the training patches (kept: step "
            f"{run['kept_step']}, the lowest validation MAE everywhere + in the lesion), everything else frozen. "
            f"Validation MAE {v['mae_decoded']} -> {v['mae_refined']} z, in the lesion {v['mae_lesion_decoded']} -> "
            f"{v['mae_lesion_refined']} z.")


def write_markdown_card(folder: Path | None = None) -> Path:
    """scripted_models/weights/pathar.md from the three JSON model cards."""
    folder = Path(folder or weights_dir())
    cards = {name: load_card(name, folder) for name in (STRUCTURE_NAME, APPEARANCE_NAME, TRANSFORMER_NAME)}
    t = cards[TRANSFORMER_NAME]
    patch = t["patch"]
    lines = [
        "# PathAR model card",
        "",
        "Structure-first autoregressive synthesis of lesion patches: a structure VQ-VAE (lesion mask), an appearance "
        "VQ-VAE (one MRI modality, decoder conditioned on the mask"
        + (" and the modality label" if cards[APPEARANCE_NAME]["config"].get("num_modalities") else "")
        + ") and an interleaved autoregressive transformer whose structure tokens never attend to appearance tokens "
        "or the modality label. One sampled structure is rendered in every requested modality.",
        "",
        f"- Patch: {patch['size']}^3 voxels at {patch['spacing_mm']} mm, lesion-centred, identity direction; "
        f"token grid {'x'.join(str(g) for g in t['config']['grid'])}.",
        f"- Augmentation: {patch.get('augment_per_case')} rigid patches per case (rotation up to "
        f"{patch.get('max_rotation_deg')} degrees, scale +/- {patch.get('scale_jitter')}, shift up to "
        f"{patch.get('shift_mm')} mm), left-right flips, intensity jitter"
        + (f"; the transformer also saw {patch['elastic_per_case']} elastically deformed patches per training case "
           f"(cubic B-spline, {patch['elastic_mesh']}^3 mesh, control points moved N(0, {patch['elastic_mm']} mm)), "
           "i.e. new lesion shapes" if patch.get("elastic_per_case") else "")
        + (f"; its structure stream also saw {patch['blend_per_case']} structure-only blends per training case "
           f"(signed-distance morph with another training lesion, t in {patch['blend_range']})"
           if patch.get("blend_per_case") else "") + ".",
        "- Labels: 0 healthy, 1 necrotic/non-enhancing core, 2 edema, 3 enhancing tumour. "
        "Images: z-scores over healthy foreground (background set to "
        f"{patch['background_z']})."
        + (f" Unlabelled case(s) {', '.join(patch['pseudo_labelled'])} got rule-based pseudo-labels (cyst = core, "
           "enhancing rim, flair-bright edema; scripted_models/pathar/pseudo_labels.py)."
           if patch.get("pseudo_labelled") else ""),
        f"- Modalities: {', '.join(t['modalities'])}.",
        *([f"- Anchor conditioning: {t['anchor_share']:.0%} of the transformer's appearance rows were trained "
           "following another modality's row of the same patch (slot t also sees that row's token a'_t), so a "
           "shared anatomy draws one modality first and lets the others follow it."] if t.get("anchor_share")
          else []),
        *([f"- Appearance VQ decoder trained with {cards[APPEARANCE_NAME]['token_noise']:.0%} of its token "
           "positions swapped for random codes, so that it renders the mask's sub-regions in the labelled "
           "modality even where the sampled tokens are imperfect."] if cards[APPEARANCE_NAME].get("token_noise")
          else []),
        *([_joint_line(cards[APPEARANCE_NAME]["joint_refinements"][-1])]
          if cards[APPEARANCE_NAME].get("joint_refinements") else []),
        f"- Training data: {', '.join(sorted(set(t['data'])))}"
        + (f"; structure only (lesion masks without a scan): {', '.join(t['structure_only_data'])}"
           if t.get("structure_only_data") else "") + ".",
        (f"- Folds (scripted_models/folds.py): the validation fold ({', '.join(t['folds']['validation'])}) selects "
         f"the weights; the test fold ({', '.join(t['folds']['test'])}) was never used for training or selection "
         "(`python -m scripted_models.pathar.test_fold` scores it)." if t.get("folds") else
         f"- Held out: {', '.join(t['held_out'])}."),
        f"- Licence: {t['license']}.",
        "",
        "| model | file sha256 | steps | batch | wall time | metrics (" + ("validation fold" if t.get("folds")
                                                                       else "held-out case") + ") |",
        "|---|---|---|---|---|---|",
    ]
    for name, card in cards.items():
        val = card.get("metrics", {}).get("val", {})
        shown = ", ".join(f"{k} {v}" for k, v in val.items())
        warm = card.get("warm_start") or {}
        steps = card["steps"]
        if warm:
            steps = f"{steps} (after {warm['steps']} of the weights it warm-started from)"
        selection = card.get("selection") or {}
        if selection.get("rule") == "best_val" and selection.get("selected_step") != card["steps"]:
            steps = f"{steps} (weights of step {selection['selected_step']}: lowest held-out NLL)"
        lines.append(f"| {name} | `{card['sha256'][:16]}` | {steps} | {card['batch']} | "
                     f"{card['wall_time_s'] / 60:.1f} min | {shown} |")
    samples = t.get("metrics", {}).get("samples")
    lines += ["", "Metrics: Dice per label of the mask reconstruction, image MAE in z units (mae_lesion inside the "
              "lesion), codebook perplexity (exp of the token entropy) and used codes; transformer negative "
              "log-likelihood per token (nats).", ""]
    if samples:
        lines += ["## Samples", "", "```", json.dumps(samples, indent=1), "```", ""]
    if t.get("protocol_correction"):
        lines += ["## Correction: the sampling settings were chosen on the test fold", "", t["protocol_correction"],
                  ""]
    sampling = t.get("sampling")
    if sampling:
        default = describe_guidance(per_modality_guidance(sampling["modality_guidance"], MODALITIES))
        lines += ["## Sampling", "",
                  f"Modality guidance {default} by default "
                  "(`sample_pairs(..., modality_guidance=W or {modality: W})` or `pathosyn sample "
                  "--modality-guidance W|MOD=W,...` overrides it): each appearance token of modality m is drawn from "
                  "(1 + W_m) log p(a | m) - W_m mean_j log p(a | j) over the modality labels j. "
                  + sampling.get("chosen_on", ""), ""]
        if sampling.get("per_modality_sweep"):
            lines += ["A weight per modality: " + sampling["per_modality_sweep"], ""]
        if sampling.get("shared_anatomy_sweep"):
            anchor = sampling.get("anatomy_from")
            anatomy_default = f"Shared anatomy from {anchor}" if anchor else "Independent modality rows"
            lines += [anatomy_default + " by default (`sample_pairs(..., anatomy_from=MOD|'none')`, `pathosyn sample "
                      "--anatomy-from`): " + sampling["shared_anatomy_sweep"], ""]
        if sampling.get("anchor_sweep"):
            where = {True: "Guidance only in the lesion's cells",
                     LESION_FRACTION: "Guidance in the lesion's cells, weighted by each cell's lesion share"}
            lines += [where.get(sampling.get("guidance_in_lesion"), "Guidance everywhere")
                      + " for rows that follow an anchor row: " + sampling["anchor_sweep"], ""]
        if sampling.get("lesion_share_sweep"):
            lines += ["Guidance weighted by each cell's lesion share: " + sampling["lesion_share_sweep"], ""]
        if sampling.get("one_head_outline_sweep"):
            lines += [("One head outline for every modality of a sample" if sampling.get("one_head_outline") else
                       "Each modality its own head outline") + ": " + sampling["one_head_outline_sweep"], ""]
        if sampling.get("validation"):
            lines += ["| W | " + " | ".join(sampling["validation"]["columns"]) + " |",
                      "|---|" + "---|" * len(sampling["validation"]["columns"])]
            lines += [f"| {w} | " + " | ".join(str(v) for v in row) + " |"
                      for w, row in sorted(sampling["validation"]["rows"].items(), key=_numbers_first)]
            lines.append("")
    if t.get("bundled_because"):
        lines += ["## Why these weights are bundled", "", t["bundled_because"], ""]
    test_fold = t.get("metrics", {}).get("test_fold")
    if test_fold:
        lines += ["## Test fold", "", "```", json.dumps(test_fold, indent=1), "```", ""]
    lines += ["## Limitations", "",
              "Trained on few cases (listed above), on 2 CPU cores (wall times above): samples are coarse, "
              "and the nearest-training-mask Dice (`python -m scripted_models.pathar.quality`) shows how close they "
              "stay to the training lesions (they stay closer to them than real lesions are to each other). The "
              "transformer overfits: its held-out negative log-likelihood stays well above the training value, so "
              "the weights with the lowest held-out NLL are kept. Research use only; not for clinical use.", ""]
    path = folder / "pathar.md"
    path.write_text("\n".join(lines))
    return path


def _stage_progress(progress, index: int, count: int):
    if progress is None:
        return None
    return lambda fraction, message: progress((index + fraction) / count, message)


def train(work: Path, stage: str = "all", tc: TrainConfig | None = None, cfg: PathARConfig | None = None,
          out_dir: Path | None = None, data_root=None, device: str = "auto", threads: int | None = None,
          progress=None, sample_check: int = 8) -> dict:
    """Run one stage or all; resumable. Returns {stage: weights path}."""
    if stage not in STAGES + FINE_TUNES + ("all",):
        from ..errors import InputError

        raise InputError(f"unknown stage '{stage}': expected all, {', '.join(STAGES + FINE_TUNES)}")
    if threads:
        torch.set_num_threads(int(threads))
    tc = tc or TrainConfig()
    cfg = cfg or PathARConfig.default()
    work, out_dir = Path(work), Path(out_dir or weights_dir())
    dev = pick_device(device)
    (work).mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps({"train": asdict(tc), "patch": cfg.patch.to_dict(),
                                                  "structure": cfg.structure.to_dict(),
                                                  "appearance": cfg.appearance.to_dict(),
                                                  "transformer": cfg.transformer.to_dict()}, indent=1))
    ps = build_patches(work, cfg.patch, data_root)
    stages = STAGES if stage == "all" else (stage,)
    out = {}
    t0 = time.time()
    for name in stages:
        weights_name, steps, config, fn = {
            "structure": (STRUCTURE_NAME, tc.structure_steps, cfg.structure.to_dict(), train_structure),
            "appearance": (APPEARANCE_NAME, tc.appearance_steps, cfg.appearance.to_dict(), train_appearance),
            "transformer": (TRANSFORMER_NAME, tc.transformer_steps, cfg.transformer.to_dict(), train_transformer),
            "decoder": (APPEARANCE_NAME, tc.decoder_steps, None, train_appearance_decoder),
            "joint": (APPEARANCE_NAME, tc.joint_steps, None, train_joint_refinement),
        }[name]
        if stage == "all" and _stage_done(weights_name, out_dir, steps, config):
            print(json.dumps({"stage": name, "skipped": "weights already trained"}), flush=True)
            out[name] = str(out_dir / f"{weights_name}.safetensors")
            continue
        sub = _stage_progress(progress, stages.index(name), len(stages))
        out[name] = str(fn(ps, cfg, tc, work, out_dir, dev, sub))
        if name == "transformer" and sample_check:
            print(json.dumps({"samples": add_sample_metrics(out_dir, n=sample_check)}), flush=True)
    if all((out_dir / f"{n}.json").is_file() for n in (STRUCTURE_NAME, APPEARANCE_NAME, TRANSFORMER_NAME)):
        out["card"] = str(write_markdown_card(out_dir))
    print(json.dumps({"done": out, "seconds": round(time.time() - t0, 1)}), flush=True)
    return out


def config_from_args(args) -> TrainConfig:
    from ..errors import InputError

    tc = TrainConfig(seed=args.seed)
    if args.steps is not None:
        if args.stage == "all":
            raise InputError("--steps needs a single --stage; use --structure-steps/--appearance-steps/"
                             "--transformer-steps with --stage all")
        setattr(tc, f"{args.stage}_steps", args.steps)
    for name in STAGES + FINE_TUNES:
        value = getattr(args, f"{name}_steps")
        if value is not None:
            setattr(tc, f"{name}_steps", value)
    if args.vq_batch:
        tc.vq_batch = args.vq_batch
    if args.transformer_batch:
        tc.transformer_batch = args.transformer_batch
    if getattr(args, "transformer_init", None):
        tc.transformer_init = str(args.transformer_init)
    tc.transformer_select = getattr(args, "transformer_select", "best_val")
    transformer_lr = getattr(args, "transformer_lr", None)
    if transformer_lr is not None:
        if not 0.0 < transformer_lr < 1.0:
            raise InputError("--transformer-lr must be between 0 and 1")
        tc.transformer_lr = float(transformer_lr)
    anchor_share = getattr(args, "anchor_share", None)
    if anchor_share is not None:
        if not 0.0 <= anchor_share <= 1.0:
            raise InputError("--anchor-share must be between 0 and 1")
        tc.anchor_share = float(anchor_share)
    adversarial = getattr(args, "decoder_adversarial_weight", None)
    if adversarial is not None:
        if not 0.0 <= adversarial <= 10.0:
            raise InputError("--decoder-adversarial-weight must be between 0 and 10")
        tc.decoder_adversarial_weight = float(adversarial)
    for name in STAGES + FINE_TUNES:
        if getattr(tc, f"{name}_steps") < 1:
            raise InputError(f"{name} steps must be >= 1")
    return tc


def model_config_from_args(args) -> PathARConfig:
    from ..errors import InputError

    cfg = PathARConfig.default()
    elastic = getattr(args, "elastic_per_case", None)
    if elastic is not None:
        if elastic < 0:
            raise InputError("--elastic-per-case must be >= 0")
        cfg.patch.elastic_per_case = int(elastic)
    blend = getattr(args, "blend_per_case", None)
    if blend is not None:
        if blend < 0:
            raise InputError("--blend-per-case must be >= 0")
        cfg.patch.blend_per_case = int(blend)
    if getattr(args, "pseudo_labels", False):
        cfg.patch.pseudo_labelled = PSEUDO_LABELLED
    if getattr(args, "split", None):
        cfg.patch.split = args.split
    if getattr(args, "lesion_masks", False):
        cfg.patch.lesion_masks = True
    if getattr(args, "anchor_share", None):
        cfg.transformer.anchor_conditioning = True
    augment = getattr(args, "augment_per_case", None)
    if augment is not None:
        if augment < 1:
            raise InputError("--augment-per-case must be >= 1")
        cfg.patch.augment_per_case = int(augment)
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train PathAR (resumable).")
    add_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    train(Path(args.work), args.stage, config_from_args(args), model_config_from_args(args),
          out_dir=args.out and Path(args.out),
          data_root=args.data, device=args.device, threads=args.threads, sample_check=args.sample_check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
