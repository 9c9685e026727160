"""Dual-VQ tokenizer: structure tokens (lesion mask) and appearance tokens (one image, given the mask).

    structure VQ-VAE   one-hot mask (B, L, *S)  -> tokens (B, *G) -> mask logits (B, L, *S)
    appearance VQ-VAE  [image, one-hot mask] (B, 1+L, *S) -> tokens (B, *G)
                       tokens + mask -> image (B, 1, *S)       (decoder conditioned on the structure)

S is the patch (e.g. 64^3), G = S / 2**len(channels) the token grid (e.g. 8^3). Both work for 2D or 3D
(`spatial_dims`) and any label set (`num_labels`, label 0 = healthy).

The structure VQ-VAE is MONAI's `VQVAE`. MONAI's decoder takes only the latent, so the appearance VQ-VAE is
composed from MONAI's `Encoder`, `Decoder`, `VectorQuantizer(EMAQuantizer)` and `Convolution`, with the
mask injected twice: average-pooled onto the token grid (concatenated to the quantized latent) and at full
resolution (concatenated to the decoder's last features, before a small convolutional head). The image therefore
follows the mask voxel by voxel, and the appearance codes only have to carry what the mask does not say.

Quantizer distances always run in float32 (MONAI only switches CUDA autocast off; CPU bf16 would round them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    spatial_dims: int = 3
    num_labels: int = 4  # one-hot channels of the structure, label 0 = healthy
    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 level each: downsample = 2 ** len(channels)
    num_res_layers: int = 1
    num_embeddings: int = 128  # codebook size = token vocabulary
    embedding_dim: int = 32
    commitment_cost: float = 0.25
    decay: float = 0.9  # EMA codebook decay (fast: the encoder moves a lot early on)
    head_channels: int = 8  # appearance only: features fed to the mask-conditioned output head
    num_modalities: int = 0  # appearance only: > 0 = encoder, decoder and head also see the modality label
    refine_channels: int = 0  # appearance only: > 0 = a full-resolution 3x3x3 refinement after the head
    joint_channels: int = 0  # appearance only: > 0 = a cross-modal refinement of the modalities decoded together

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)

    def grid(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        if any(p % self.downsample for p in patch):
            raise ValueError(f"patch {patch} is not divisible by the downsample factor {self.downsample}")
        return tuple(p // self.downsample for p in patch)

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for optional in ("refine_channels", "joint_channels"):
            if not d[optional]:
                del d[optional]  # cards written before these parts existed stay equal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def _down_up(cfg: VQConfig):
    n = len(cfg.channels)
    return ((2, 4, 1, 1),) * n, ((2, 4, 1, 1, 0),) * n


def _quantizer(cfg: VQConfig):
    from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer

    return VectorQuantizer(EMAQuantizer(spatial_dims=cfg.spatial_dims, num_embeddings=cfg.num_embeddings,
                                        embedding_dim=cfg.embedding_dim, commitment_cost=cfg.commitment_cost,
                                        decay=cfg.decay, ddp_sync=False))


def _quantize(quantizer, z: torch.Tensor):
    """(quantized (B, E, *G) straight-through, commitment loss, indices (B, *G)); float32, EMA update in train."""
    with torch.autocast(z.device.type, enabled=False):
        quantized, loss, indices = quantizer.quantizer(z.float())
    return quantized, loss, indices


def _lookup(quantizer, indices: torch.Tensor) -> torch.Tensor:
    """Code vectors for token indices (B, *G) -> (B, E, *G)."""
    with torch.autocast(indices.device.type, enabled=False):
        return quantizer.embed(indices.long())


def _indices(quantizer, z: torch.Tensor) -> torch.Tensor:
    """Nearest code per position, no EMA update (safe in train mode)."""
    with torch.autocast(z.device.type, enabled=False):
        return quantizer.quantizer.quantize(z.float())[2]


def one_hot(mask: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Label map (B, *S) int -> (B, L, *S) float."""
    dims = mask.dim() - 1
    return F.one_hot(mask.long(), num_labels).permute(0, dims + 1, *range(1, dims + 1)).float()


class StructureVQ(nn.Module):
    """MONAI VQVAE on one-hot masks; decodes tokens to label logits."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        from monai.networks.nets import VQVAE

        self.cfg = cfg
        down, up = _down_up(cfg)
        self.vqvae = VQVAE(spatial_dims=cfg.spatial_dims, in_channels=cfg.num_labels, out_channels=cfg.num_labels,
                           channels=cfg.channels, num_res_layers=cfg.num_res_layers, num_res_channels=cfg.channels,
                           downsample_parameters=down, upsample_parameters=up, num_embeddings=cfg.num_embeddings,
                           embedding_dim=cfg.embedding_dim, commitment_cost=cfg.commitment_cost, decay=cfg.decay,
                           ddp_sync=False)

    @property
    def quantizer(self):
        return self.vqvae.quantizer

    def forward(self, mask: torch.Tensor, quantize: bool = True):
        """mask (B, *S) labels -> (logits (B, L, *S), commitment loss, tokens (B, *G), latent (B, E, *G)).
        quantize=False skips the codebook (plain auto-encoder warm-up; loss 0, tokens None)."""
        z = self.vqvae.encode(one_hot(mask, self.cfg.num_labels))  # (B, E, *G)
        if not quantize:
            return self.vqvae.decode(z), z.new_zeros(()).float(), None, z
        quantized, q_loss, tokens = _quantize(self.quantizer, z)
        return self.vqvae.decode(quantized), q_loss, tokens, z

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, *S) labels -> (B, *G) tokens."""
        return _indices(self.quantizer, self.vqvae.encode(one_hot(mask, self.cfg.num_labels)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *G) tokens -> (B, L, *S) logits."""
        return self.vqvae.decode(_lookup(self.quantizer, tokens)).float()

    def decode_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *G) tokens -> (B, *S) labels (uint8)."""
        return self.decode(tokens).argmax(1).to(torch.uint8)


class AppearanceVQ(nn.Module):
    """Image VQ-VAE whose encoder sees [image, mask] and whose decoder is conditioned on the mask, and with
    cfg.num_modalities > 0 on the modality label too: then the mask and the label can carry a sub-region's
    typical contrast in that sequence, and the tokens what is particular to the case."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets.vqvae import Decoder, Encoder

        self.cfg = cfg
        L, M, dims, F_ = cfg.num_labels, cfg.num_modalities, cfg.spatial_dims, cfg.head_channels
        down, up = _down_up(cfg)
        self.encoder = Encoder(spatial_dims=dims, in_channels=1 + L + M, out_channels=cfg.embedding_dim,
                               channels=cfg.channels, num_res_layers=cfg.num_res_layers,
                               num_res_channels=cfg.channels, downsample_parameters=down, dropout=0.0, act="RELU")
        self.quantizer = _quantizer(cfg)
        self.decoder = Decoder(spatial_dims=dims, in_channels=cfg.embedding_dim + L + M, out_channels=F_,
                               channels=cfg.channels, num_res_layers=cfg.num_res_layers,
                               num_res_channels=cfg.channels, upsample_parameters=up, dropout=0.0, act="RELU",
                               output_act=None)
        self.head = nn.Sequential(  # per voxel [features, mask, modality] -> image (1x1: 3x3 at full res cost 3x)
            Convolution(dims, F_ + L + M, 2 * F_, kernel_size=1, adn_ordering="A", act="RELU", norm=None),
            Convolution(dims, 2 * F_, 1, kernel_size=1, conv_only=True),
        )
        self.refine = None
        if cfg.refine_channels:
            self.refine = self._refinement(dims, 1 + F_ + L + M, cfg.refine_channels)
        self.joint = CrossModalRefinement(cfg) if cfg.joint_channels else None

    @staticmethod
    def _refinement(dims: int, in_channels: int, channels: int) -> nn.Sequential:
        """[image, features, mask, modality] -> a correction of the image, from a 5-voxel neighbourhood: thin
        structures (the enhancing rim and the core inside it) that the 1x1 head cannot draw from 8x coarser
        features. The last layer starts at zero, so a refinement added to trained weights changes nothing yet."""
        from monai.networks.blocks import Convolution

        out = nn.Sequential(
            Convolution(dims, in_channels, channels, kernel_size=3, adn_ordering="A", act="RELU", norm=None),
            Convolution(dims, channels, 1, kernel_size=3, conv_only=True),
        )
        nn.init.zeros_(out[-1].conv.weight)
        nn.init.zeros_(out[-1].conv.bias)
        return out

    def _pool(self, onehot: torch.Tensor) -> torch.Tensor:
        """Label fractions on the token grid: (B, L, *S) -> (B, L, *G)."""
        pool = getattr(F, f"avg_pool{self.cfg.spatial_dims}d")
        return pool(onehot, self.cfg.downsample)

    def _conditions(self, mask: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        """(B, L [+ M], *S): the mask one-hot, then the modality one-hot broadcast over space if modelled (a
        model without the label ignores `modality`)."""
        onehot = one_hot(mask, self.cfg.num_labels)
        if not self.cfg.num_modalities:
            return onehot
        if modality is None:
            raise ValueError("this appearance VQ is conditioned on the modality: pass modality indices (B,)")
        label = F.one_hot(modality.long().to(mask.device), self.cfg.num_modalities).to(onehot.dtype)  # (B, M)
        label = label.view(*label.shape, *(1,) * self.cfg.spatial_dims).expand(-1, -1, *mask.shape[1:])
        return torch.cat([onehot, label], 1)

    def _encode(self, image: torch.Tensor, mask: torch.Tensor, modality: torch.Tensor | None = None):
        conditions = self._conditions(mask, modality)
        return self.encoder(torch.cat([image, conditions.to(image.dtype)], 1)), conditions  # (B, E, *G)

    def _decode(self, quantized: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        h = self.decoder(torch.cat([quantized.to(conditions.dtype), self._pool(conditions)], 1))  # (B, F, *S)
        per_voxel = torch.cat([h, conditions.to(h.dtype)], 1)  # (B, F + L + M, *S)
        image = self.head(per_voxel)  # (B, 1, *S)
        if self.refine is not None:
            image = image + self.refine(torch.cat([image, per_voxel], 1))
        return image

    def corrupt(self, quantized: torch.Tensor, rate: float) -> torch.Tensor:
        """Replace a share `rate` of token positions by random codes: the decoder learns to live with the
        imperfect tokens an autoregressive sampler writes, leaning on the mask and the modality label."""
        if rate <= 0:
            return quantized
        B, E = quantized.shape[:2]
        grid = quantized.shape[2:]
        codes = torch.randint(0, self.cfg.num_embeddings, (B, *grid), device=quantized.device)
        random = _lookup(self.quantizer, codes).detach().to(quantized.dtype)  # (B, E, *G)
        swap = torch.rand((B, 1, *grid), device=quantized.device) < rate
        return torch.where(swap, random, quantized)

    def forward(self, image: torch.Tensor, mask: torch.Tensor, quantize: bool = True,
                modality: torch.Tensor | None = None, token_noise: float = 0.0):
        """image (B, 1, *S), mask (B, *S) [, modality (B,)] -> (recon (B, 1, *S), commitment loss, tokens (B, *G),
        latent). quantize=False skips the codebook (plain auto-encoder warm-up; loss 0, tokens None)."""
        z, conditions = self._encode(image, mask, modality)
        if not quantize:
            return self._decode(z, conditions), z.new_zeros(()).float(), None, z
        quantized, q_loss, tokens = _quantize(self.quantizer, z)
        return self._decode(self.corrupt(quantized, token_noise), conditions), q_loss, tokens, z

    def encode(self, image: torch.Tensor, mask: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        return _indices(self.quantizer, self._encode(image, mask, modality)[0])

    def code_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, *G) -> their codebook vectors (B, E, *G), the decoder's input."""
        return _lookup(self.quantizer, tokens)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, *G), mask (B, *S) labels [, modality (B,) indices] -> image (B, 1, *S)."""
        return self._decode(self.code_vectors(tokens), self._conditions(mask, modality)).float()

    def decode_together(self, tokens: torch.Tensor, mask: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Tokens (B*R, *G) of B masks (B, *S) in R modalities each (modality (B*R,), sample-major) -> images
        (B*R, 1, *S), refined across the modalities of each sample when the weights have a joint refinement."""
        B, R = mask.shape[0], modality.shape[0] // mask.shape[0]
        images = self.decode(tokens, mask.repeat_interleave(R, 0), modality)
        if self.joint is None:
            return images
        per_sample = modality.view(B, R)
        if (per_sample.sort(1).values.diff(dim=1) == 0).any():
            raise ValueError("decode_together: a modality appears twice in one sample")
        stacked, present = self.joint.scatter(images[:, 0].view(B, R, *mask.shape[1:]), per_sample)
        refined = self.joint(stacked, present, one_hot(mask, self.cfg.num_labels))
        return self.joint.gather(refined, per_sample).reshape(images.shape)


class CrossModalRefinement(nn.Module):
    """Each modality is decoded from its own tokens, so the modalities of one sample disagree where their coarse
    tokens blur (the brain's edge, the lesion's border). This refinement sees the decoded modalities of a sample
    together, with the mask, and corrects each from a 9-voxel neighbourhood (the middle layer is dilated). Absent
    modalities are zero with a 0 flag; only present ones are corrected. Its last layer starts at zero."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        from monai.networks.blocks import Convolution

        M, C, dims = cfg.num_modalities, cfg.joint_channels, cfg.spatial_dims
        if M < 2:
            raise ValueError("a cross-modal refinement needs an appearance VQ of several modalities")
        self.num_modalities = M
        self.net = nn.Sequential(  # [images, present flags, mask one-hot] -> a correction per modality
            Convolution(dims, 2 * M + cfg.num_labels, C, kernel_size=3, adn_ordering="A", act="RELU", norm=None),
            Convolution(dims, C, C, kernel_size=3, dilation=2, adn_ordering="A", act="RELU", norm=None),
            Convolution(dims, C, M, kernel_size=3, conv_only=True),
        )
        nn.init.zeros_(self.net[-1].conv.weight)
        nn.init.zeros_(self.net[-1].conv.bias)

    def scatter(self, images: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, R, *S) in modalities (B, R) -> (images (B, M, *S) in label order, zero where absent;
        present (B, M) bool)."""
        B, M = images.shape[0], self.num_modalities
        stacked = images.new_zeros(B, M, *images.shape[2:])
        present = torch.zeros(B, M, dtype=torch.bool, device=images.device)
        rows = torch.arange(B, device=images.device)[:, None].expand_as(modality)
        stacked[rows, modality] = images
        present[rows, modality] = True
        return stacked, present

    @staticmethod
    def gather(images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """images (B, M, *S) in label order -> (B, R, *S) in the order of modality (B, R)."""
        rows = torch.arange(images.shape[0], device=images.device)[:, None].expand_as(modality)
        return images[rows, modality]

    def forward(self, images: torch.Tensor, present: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """images (B, M, *S) (absent ones anything), present (B, M) bool, onehot (B, L, *S) -> images, the
        present ones corrected and the absent ones returned as given."""
        flags = present.to(images.dtype).view(*present.shape, *(1,) * (images.dim() - 2))  # (B, M, 1, ...)
        x = torch.cat([images * flags, flags.expand_as(images), onehot.to(images.dtype)], 1)
        return images + self.net(x).to(images.dtype) * flags


# --------------------------------------------------------------------------- codebook care and metrics

@torch.no_grad()
def init_codebook(quantizer, latent: torch.Tensor, max_points: int = 8192) -> None:
    """k-means++ seeding of the codebook on encoder outputs (B, E, *G): the first code at random, each next one
    drawn with probability proportional to the squared distance to the nearest code chosen so far. Codes thus
    cover the rare lesion latents instead of piling up on the ubiquitous healthy ones (MONAI's N(0, 1) codes sit
    far from the encoder's outputs and the EMA quantizer would collapse onto one or two of them)."""
    q = quantizer.quantizer
    flat = latent.detach().float().movedim(1, -1).reshape(-1, q.embedding_dim)
    if flat.shape[0] > max_points:
        flat = flat[torch.randperm(flat.shape[0], device=flat.device)[:max_points]]
    codes = [flat[torch.randint(0, flat.shape[0], (1,), device=flat.device)][0]]
    d2 = ((flat - codes[0]) ** 2).sum(1)
    for _ in range(q.num_embeddings - 1):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        codes.append(flat[torch.multinomial(weights, 1)][0])
        d2 = torch.minimum(d2, ((flat - codes[-1]) ** 2).sum(1))
    pick = torch.stack(codes)
    pick = pick + 0.01 * pick.std() * torch.randn_like(pick)  # duplicates (fewer distinct latents) drift apart
    q.embedding.weight.data.copy_(pick)
    q.ema_w.data.copy_(pick)
    q.ema_cluster_size.data.fill_(1.0)


@torch.no_grad()
def restart_dead_codes(quantizer, latent: torch.Tensor, min_usage: float = 1.0) -> int:
    """Move codes whose EMA usage (positions per batch) fell below `min_usage` onto encoder outputs of this batch,
    drawn with probability proportional to their squared distance to the nearest code: the positions the codebook
    represents worst (e.g. the rare lesion positions, not the ubiquitous healthy ones) get the free codes.
    MONAI's EMAQuantizer has no restart of its own. Returns how many codes moved."""
    q = quantizer.quantizer
    dead = torch.nonzero(q.ema_cluster_size < min_usage).flatten()
    if dead.numel() == 0:
        return 0
    flat = latent.detach().float().movedim(1, -1).reshape(-1, q.embedding_dim)
    error = torch.cdist(flat, q.embedding.weight.float()).min(1).values ** 2
    weights = error + 1e-12 if float(error.sum()) > 0 else torch.ones_like(error)
    pick = flat[torch.multinomial(weights, dead.numel(), replacement=dead.numel() > flat.shape[0])]
    pick = pick + 0.01 * pick.std() * torch.randn_like(pick)
    q.embedding.weight.data[dead] = pick
    q.ema_w.data[dead] = pick * min_usage
    q.ema_cluster_size.data[dead] = min_usage
    return int(dead.numel())


def codebook_usage(tokens, num_embeddings: int) -> dict:
    """Perplexity exp(H(p)) of the token histogram (1 = one code, num_embeddings = uniform) and used fraction."""
    t = np.asarray(tokens.cpu() if torch.is_tensor(tokens) else tokens).ravel()
    counts = np.bincount(t, minlength=num_embeddings).astype(np.float64)
    p = counts / max(1.0, counts.sum())
    nz = p[p > 0]
    return {"perplexity": float(np.exp(-(nz * np.log(nz)).sum())), "used_codes": int((counts > 0).sum()),
            "num_embeddings": int(num_embeddings)}


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary arrays; 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    denom = pred.sum() + target.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & target).sum() / denom)


def mask_dice(pred: np.ndarray, target: np.ndarray, num_labels: int) -> dict:
    """Dice per label > 0 (only labels present in pred or target) and for the whole lesion (label > 0)."""
    out = {"whole": dice(pred > 0, target > 0)}
    for label in range(1, num_labels):
        if (pred == label).any() or (target == label).any():
            out[str(label)] = dice(pred == label, target == label)
    return out


def image_mae(recon: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Mean absolute error in z-score units, overall and inside the lesion (mask > 0)."""
    err = np.abs(np.asarray(recon, np.float64) - np.asarray(target, np.float64))
    out = {"mae": float(err.mean())}
    if mask is not None and (mask > 0).any():
        out["mae_lesion"] = float(err[mask > 0].mean())
    return out


@torch.no_grad()
def evaluate_structure(model: StructureVQ, masks: np.ndarray, device, batch: int = 8) -> dict:
    """Reconstruction Dice (mean over patches) and codebook usage on masks (P, *S)."""
    model.eval()
    dices, tokens = [], []
    for i in range(0, len(masks), batch):
        m = torch.from_numpy(np.asarray(masks[i:i + batch])).to(device)
        t = model.encode(m)
        rec = model.decode_mask(t).cpu().numpy()
        tokens.append(t.cpu())
        dices += [mask_dice(r, g, model.cfg.num_labels) for r, g in zip(rec, masks[i:i + batch])]
    keys = sorted({k for d in dices for k in d})
    out = {f"dice_{k}": round(float(np.mean([d[k] for d in dices if k in d])), 4) for k in keys}
    usage = codebook_usage(torch.cat(tokens), model.cfg.num_embeddings)
    return {**out, "perplexity": round(usage["perplexity"], 2), "used_codes": usage["used_codes"]}


@torch.no_grad()
def evaluate_appearance(model: AppearanceVQ, images: np.ndarray, masks: np.ndarray, device,
                        modalities: np.ndarray | None = None, batch: int = 8) -> dict:
    """Reconstruction MAE (z units) and codebook usage on images (I, *S) with their masks (I, *S) and, for a
    modality-conditioned model, their modality indices (I,)."""
    model.eval()
    maes, tokens = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.asarray(images[i:i + batch], np.float32))[:, None].to(device)
        m = torch.from_numpy(np.asarray(masks[i:i + batch])).to(device)
        mod = None if modalities is None else torch.as_tensor(np.asarray(modalities[i:i + batch]), device=device)
        t = model.encode(x, m, mod)
        rec = model.decode(t, m, mod)[:, 0].cpu().numpy()
        tokens.append(t.cpu())
        maes += [image_mae(r, g, k) for r, g, k in zip(rec, images[i:i + batch], masks[i:i + batch])]
    out = {k: round(float(np.mean([d[k] for d in maes if k in d])), 4) for k in ("mae", "mae_lesion")}
    usage = codebook_usage(torch.cat(tokens), model.cfg.num_embeddings)
    return {**out, "perplexity": round(usage["perplexity"], 2), "used_codes": usage["used_codes"]}
