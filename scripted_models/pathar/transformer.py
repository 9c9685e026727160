"""Interleaved autoregressive transformer (IAR) with asymmetric attention, nanoGPT style, with a KV cache.

Tokens per spatial position p = 0..N-1 (raster order of the token grid): structure s_p, appearance a_p.
Two streams of "slots"; each slot holds an input token and predicts the next token of its stream:

    structure slot j = 0..N   input  BOS, s_0, s_1, ..., s_{N-1}
                              target s_0, s_1, ..., s_{N-1}, (none: slot N only serves as context)
    appearance slot t = 0..N-1 input MOD, a_0, ..., a_{N-2}      (MOD = modality label, the appearance "BOS")
                              target a_0, a_1, ..., a_{N-1}

As one interleaved sequence (length 2N+1), appearance lagging one position so that the mask is causal:

    [S0=BOS, S1=s_0, A0=MOD, S2=s_1, A1=a_0, S3=s_2, A2=a_1, ..., SN=s_{N-1}, A(N-1)=a_{N-2}]

Asymmetric attention = causal  AND  (key is structure  OR  query is appearance):
  * structure slot j sees structure slots 0..j only: BOS (which carries no modality) and s_0..s_{j-1}.
    Never an appearance token, never the modality label.
  * appearance slot t (predicting a_t) sees structure slots 0..t+1, i.e. BOS and s_0..s_t (the structure up to
    AND INCLUDING the current position p = t), the modality label and a_0..a_{t-1}. Later structure is not seen,
    so joint interleaved sampling s_0, a_0, s_1, a_1, ... is also possible; we sample all structure first.

Exact invariance by construction: the model runs the structure stream on its own (`structure`, with a cache
of structure keys only), and the appearance stream afterwards (`appearance`), attending to that cache (shared,
never copied, by all modalities of a sample: `appearance_attention`) and to its own keys. Structure logits are a
function of structure tokens only; changing appearance tokens or the modality label cannot change them, bit for
bit. `forward_interleaved` is the same model written as one masked sequence; tests check that both agree (to
float rounding) and that the mask has the properties above.

Cross-modal sampling: the structure is sampled once per sample and shared by every requested modality, whose
appearance rows run as one batch. `sample_structure` then `sample_appearance` do it in two passes over the
positions; `sample_joint` pipelines them (s_j and a_{j-1} in one forward pass: a_{j-1} needs only s_0..s_{j-1}),
which draws the same tokens with half the passes.

Modality guidance (`guidance` w > 0, sampling only): every appearance row with w > 0 is also run under each
modality label with its own history, and samples from (1 + w) log p(a | s, m) - w mean_j log p(a | s, j). What sets
the requested modality apart (t1's dark core, flair's bright edema) is amplified; what all modalities share is kept.
No extra training: the label-average is computed from the same conditional model. w is one number or one weight
per modality label (w_m for rows of label m), since each modality needs a different push. Rows with w = 0, and
guided rows after their last guided slot, run under their own label only.

Shared anatomy (`SharedAnatomy`, sampling only): rows sampled independently give every modality of one sample
its own head, ventricles and brain outline (the foreground of t1c and flair overlapped with Dice 0.63 in the
validation fold). With it, one anchor row per sample draws the whole token field and the others copy its tokens
outside the lesion's cells, drawing their own only where the lesion is; the appearance VQ's decoder renders each
row in its own modality from the tokens, the mask and the label.

Rows that follow an anchor row (`anchor_conditioning`, trained with a share of rows conditioned on another
modality of the same patch): appearance slot t also embeds the anchor row's token a'_t (with the anchor's
modality), so it sees a'_0..a'_t. `sample_following` draws the anchor row one slot ahead of the others (one
pass per slot for all rows), which learn the anchor's anatomy and how their own lesion looks given the anchor's,
instead of copying tokens. Modality guidance amplifies what sets a label apart and drowns the anatomy all labels
share, so followers are best guided only in the lesion's cells (`guided`). Structure slots never see the anchor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STRUCTURE, APPEARANCE = 0, 1


@dataclass
class IARConfig:
    grid: tuple[int, ...] = (8, 8, 8)  # token grid; N = prod(grid) positions
    structure_vocab: int = 128
    appearance_vocab: int = 256
    num_modalities: int = 4
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False
    modality_embedding: bool = False  # also add a modality embedding to every appearance slot (not only slot 0)
    anchor_conditioning: bool = False  # appearance slot t also sees another modality's token a'_t (sample_following)

    @property
    def positions(self) -> int:
        return math.prod(self.grid)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> IARConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- masks and layout

def structure_mask(q_slots: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(Tq, n_keys) bool: structure slot j sees structure slots 0..j."""
    return torch.arange(n_keys, device=q_slots.device)[None, :] <= q_slots[:, None]


def interleaved_layout(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kind, slot) for each of the 2n+1 sequence positions: S0, S1, A0, S2, A1, ..., Sn, A(n-1)."""
    kind, slot = [STRUCTURE, STRUCTURE], [0, 1]
    for t in range(n - 1):
        kind += [APPEARANCE, STRUCTURE]
        slot += [t, t + 2]
    kind.append(APPEARANCE)
    slot.append(n - 1)
    return torch.tensor(kind), torch.tensor(slot)


def interleaved_mask(n: int) -> torch.Tensor:
    """(2n+1, 2n+1) bool, query rows x key columns: causal AND (key is structure OR query is appearance)."""
    kind, _ = interleaved_layout(n)
    length = kind.numel()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal & ((kind[None, :] == STRUCTURE) | (kind[:, None] == APPEARANCE))


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys/values of one stream for every layer, preallocated: (B, n_head, capacity, head_dim).
    `length` = slots written. Structure caches have N+1 slots, appearance caches N."""

    def __init__(self, cfg: IARConfig, batch: int, capacity: int, device, dtype=torch.float32):
        shape = (batch, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at slots length..length+T-1; return all keys/values so far (no copy)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (B',) of the batch (the slots written so far are kept)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


# --------------------------------------------------------------------------- attention

def structure_attention(q, k, v, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v for structure queries over structure keys only.
    q (B, H, T, D), k, v (B, H, L, D), mask (T, L) bool (True = may attend) or None -> (B, H, T, D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def appearance_attention(q, ks, vs, ka, va, mask: torch.Tensor | None) -> torch.Tensor:
    """Appearance queries over [structure keys, appearance keys] with one softmax across both.

    q, ka, va (S*r, H, T/La, D): r appearance rows per structure row, structure-major (row b uses structure b // r);
    ks, vs (S, H, Ls, D) are shared, never copied r times: the r queries of one structure are folded into its
    query axis. mask (T, Ls + La) or per row (B, 1, T, Ls + La) bool, or None. Returns (S*r, H, T, D)."""
    B, H, T, D = q.shape
    S, Ls, La = ks.shape[0], ks.shape[2], ka.shape[2]
    r = B // S
    if r == 1:  # teacher forcing: one row per structure, the fused kernel on the concatenated keys is faster
        return F.scaled_dot_product_attention(q, torch.cat([ks, ka], 2), torch.cat([vs, va], 2), attn_mask=mask)
    scale = 1.0 / math.sqrt(D)
    q_fold = q.view(S, r, H, T, D).transpose(1, 2).reshape(S, H, r * T, D)
    att_s = (q_fold @ ks.transpose(-2, -1)) * scale  # (S, H, r*T, Ls)
    att_s = att_s.view(S, H, r, T, Ls).transpose(1, 2).reshape(B, H, T, Ls)
    att_a = (q @ ka.transpose(-2, -1)) * scale  # (B, H, T, La)
    att = torch.cat([att_s, att_a], dim=-1)  # (B, H, T, Ls + La)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.float().softmax(-1).to(q.dtype)
    p_s, p_a = att.split([Ls, La], dim=-1)
    p_fold = p_s.reshape(S, r, H, T, Ls).transpose(1, 2).reshape(S, H, r * T, Ls)
    y_s = (p_fold @ vs).view(S, H, r, T, D).transpose(1, 2).reshape(B, H, T, D)
    return y_s + p_a @ va


# --------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    def __init__(self, cfg: IARConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def qkv(self, x: torch.Tensor):
        """x (B, T, C) -> q, k, v (B, H, T, C/H)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def proj(self, y: torch.Tensor) -> torch.Tensor:
        """Heads (B, H, T, D) -> output projection (B, T, C)."""
        B, H, T, D = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: IARConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block; the same weights serve both streams."""

    def __init__(self, cfg: IARConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def _finish(self, x, y):
        x = x + self.attn.proj(y)
        return x + self.mlp(self.ln_2(x))

    def structure(self, x, layer: int, cache: KVCache, mask):
        """Structure slots (B, T, C) attend to structure keys only (this cache)."""
        q, k, v = self.attn.qkv(self.ln_1(x))
        k, v = cache.write(layer, k, v)
        return self._finish(x, structure_attention(q, k, v, mask, self.dropout if self.training else 0.0))

    def appearance(self, x, layer: int, cache: KVCache, s_cache: KVCache, n_structure: int, mask):
        """Appearance slots (B, T, C) attend to structure slots 0..n_structure-1 and appearance keys so far."""
        q, k, v = self.attn.qkv(self.ln_1(x))
        ka, va = cache.write(layer, k, v)
        ks, vs = s_cache.view(layer, n_structure)
        return self._finish(x, appearance_attention(q, ks, vs, ka, va, mask))

    def joint(self, xs, xa, layer: int, s_cache: KVCache, a_cache: KVCache, n_structure: int, mask):
        """One new structure slot (S rows; xs None for none) and one new position of every appearance row (xa
        (B, 1, C)) in one pass: the linear layers run once on all rows. The appearance rows write at position
        a_cache.length and see structure slots 0..n_structure-1 (this pass's included) and their positions so far,
        as far as mask (B, 1, 1, n_structure + a_cache.length + 1) bool, or None, lets them."""
        S = 0 if xs is None else xs.shape[0]
        x = xa if xs is None else torch.cat([xs, xa], 0)
        q, k, v = self.attn.qkv(self.ln_1(x))
        ys = []
        if S:  # first: the appearance rows may see this structure slot
            ks, vs = s_cache.write(layer, k[:S], v[:S])
            ys.append(structure_attention(q[:S], ks, vs, None))
        ka, va = a_cache.write(layer, k[S:], v[S:])
        ks, vs = s_cache.view(layer, n_structure)
        ys.append(appearance_attention(q[S:], ks, vs, ka, va, mask))
        x = self._finish(x, ys[0] if len(ys) == 1 else torch.cat(ys))
        return (None, x) if S == 0 else (x[:S], x[S:])


class IARTransformer(nn.Module):
    def __init__(self, cfg: IARConfig):
        super().__init__()
        self.cfg = cfg
        N, C = cfg.positions, cfg.n_embd
        self.bos = cfg.structure_vocab  # structure input vocabulary: codes + BOS
        self.wse = nn.Embedding(cfg.structure_vocab + 1, C)
        self.wae = nn.Embedding(cfg.appearance_vocab + cfg.num_modalities, C)  # codes + one label per modality
        self.wpe_s = nn.Embedding(N + 1, C)  # structure slots 0..N
        self.wpe_a = nn.Embedding(N, C)  # appearance slots 0..N-1
        # modality embedding on every appearance slot: the label is not only a token up to N slots back
        self.wme = nn.Embedding(cfg.num_modalities, C) if cfg.modality_embedding else None
        # anchor token embedding: (anchor modality, code) pairs plus one "no anchor" entry (anchor_ids)
        self.wce = nn.Embedding(cfg.num_modalities * cfg.appearance_vocab + 1, C) if cfg.anchor_conditioning else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(C, bias=cfg.bias)
        self.head_s = nn.Linear(C, cfg.structure_vocab, bias=False)
        self.head_a = nn.Linear(C, cfg.appearance_vocab, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, stream: int = STRUCTURE, device=None) -> KVCache:
        """An empty cache: structure (N+1 slots) or appearance (N slots)."""
        device = device or self.wse.weight.device
        N = self.cfg.positions
        return KVCache(self.cfg, batch, N + 1 if stream == STRUCTURE else N, device, self.wse.weight.dtype)

    # --- the two streams ---------------------------------------------------------------------------------
    def structure(self, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Structure slots cache.length .. +T-1 with inputs (B, T) (BOS or codes) -> logits (B, T, Vs).
        Keys/values are appended to `cache`, which the appearance stream then reads."""
        B, T = inputs.shape
        start = cache.length
        slots = torch.arange(start, start + T, device=inputs.device)
        x = self.drop(self.wse(inputs) + self.wpe_s(slots))  # (B, T, C)
        mask = None if T == 1 else structure_mask(slots, start + T)  # one new slot sees every cached slot
        for layer, block in enumerate(self.blocks):
            x = block.structure(x, layer, cache, mask)
        cache.length += T
        return self.head_s(self.ln_f(x))

    @property
    def no_anchor(self) -> int:
        """The anchor id of rows that follow no other modality."""
        return self.cfg.num_modalities * self.cfg.appearance_vocab

    def anchor_ids(self, tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """An anchor row's tokens (B, N) of its modality (B,) -> the ids that condition a following row (B, N)."""
        return modality.long().view(-1, 1) * self.cfg.appearance_vocab + tokens.long()

    def appearance_embedding(self, inputs: torch.Tensor, slots: torch.Tensor, modality: torch.Tensor | None,
                             anchor: torch.Tensor | None = None):
        """inputs (B, T) codes or MOD label, slots (T,) or one per row (B, 1), modality (B,), anchor (B, T) anchor
        ids of these slots (None = no anchor) -> (B, T, C)."""
        x = self.wae(inputs) + self.wpe_a(slots)
        if self.wme is not None:
            if modality is None:
                raise ValueError("this model adds a modality embedding to every appearance slot: pass modality")
            x = x + self.wme(modality.long().to(inputs.device))[:, None]
        if self.wce is not None:
            x = x + self.wce(torch.full_like(inputs, self.no_anchor) if anchor is None else anchor.long())
        elif anchor is not None:
            raise ValueError("this model was not trained to follow an anchor row (IARConfig.anchor_conditioning)")
        return x

    def appearance(self, inputs: torch.Tensor, cache: KVCache, s_cache: KVCache,
                   modality: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Appearance slots start .. start+T-1 (start = cache.length) with inputs (B, T) (MOD label or codes)
        -> logits (B, T, Va). s_cache (S rows, B = S*r) must hold structure slots 0..start+T (s_0..s_{start+T-1}).
        modality (B,) is needed when the config has `modality_embedding`; anchor (B, T): the anchor ids of these
        slots (anchor_ids; None = no anchor)."""
        B, T = inputs.shape
        start = cache.length
        n_structure = start + T + 1
        if s_cache.length < n_structure:
            raise ValueError(f"appearance slots up to {start + T - 1} need {n_structure} structure slots, "
                             f"the cache holds {s_cache.length}")
        slots = torch.arange(start, start + T, device=inputs.device)
        x = self.drop(self.appearance_embedding(inputs, slots, modality, anchor))  # (B, T, C)
        mask = None
        if T > 1:  # slot t sees structure slots 0..t+1 and appearance slots 0..t; one new slot sees all
            js = torch.arange(n_structure, device=inputs.device)
            ja = torch.arange(start + T, device=inputs.device)
            mask = torch.cat([js[None] <= slots[:, None] + 1, ja[None] <= slots[:, None]], 1)
        for layer, block in enumerate(self.blocks):
            x = block.appearance(x, layer, cache, s_cache, n_structure, mask)
        cache.length += T
        return self.head_a(self.ln_f(x))

    def joint_step(self, s_in: torch.Tensor | None, a_in: torch.Tensor, slots: torch.Tensor,
                   modality: torch.Tensor, anchor: torch.Tensor | None, a_cache: KVCache, s_cache: KVCache,
                   n_structure: int, mask: torch.Tensor | None = None):
        """Structure slot j = s_cache.length (inputs (S, 1); None = no structure slot) and one position
        (a_cache.length) of every appearance row in one pass, with one weight read for all rows. Appearance rows
        (B, structure-major) have inputs a_in (B, 1) at appearance slots `slots` (B,) (rows may be at different
        slots), labels modality (B,) and anchor ids (B, 1) or None; they see structure slots 0..n_structure-1 and
        their positions 0..a_cache.length, as far as mask (B, 1, 1, n_structure + a_cache.length + 1) bool or None
        lets them. Returns (structure logits (S, Vs) or None, appearance logits (B, Va))."""
        if s_cache.length + (s_in is not None) < n_structure:
            raise ValueError(f"{n_structure} structure slots needed, the cache holds {s_cache.length}")
        xs = None if s_in is None else self.wse(s_in) + self.wpe_s.weight[s_cache.length]
        xa = self.appearance_embedding(a_in, slots.view(-1, 1), modality, anchor)
        for layer, block in enumerate(self.blocks):
            xs, xa = block.joint(xs, xa, layer, s_cache, a_cache, n_structure, mask)
        if xs is not None:
            s_cache.length += 1
        a_cache.length += 1
        logits_s = None if xs is None else self.head_s(self.ln_f(xs))[:, -1]
        return logits_s, self.head_a(self.ln_f(xa))[:, -1]

    # --- teacher forcing -----------------------------------------------------------------------------------
    def stream_inputs(self, s_tokens, a_tokens, modality):
        """Targets (B, N) -> stream inputs: [BOS, s_0..s_{N-1}] (B, N+1) and [MOD, a_0..a_{N-2}] (B, N)."""
        B = s_tokens.shape[0]
        bos = torch.full((B, 1), self.bos, dtype=torch.long, device=s_tokens.device)
        s_in = torch.cat([bos, s_tokens.long()], 1)
        if a_tokens is None:
            return s_in, None
        mod = (self.cfg.appearance_vocab + modality.long()).view(B, 1)
        return s_in, torch.cat([mod, a_tokens[:, :-1].long()], 1)

    def forward(self, s_tokens: torch.Tensor, a_tokens: torch.Tensor | None = None,
                modality: torch.Tensor | None = None, anchor: torch.Tensor | None = None):
        """s_tokens, a_tokens (B, N) codes, modality (B,) index, anchor (B, N) anchor ids or None -> structure
        logits (B, N, Vs) for s_0..s_{N-1} and appearance logits (B, N, Va) for a_0..a_{N-1} (None without
        a_tokens)."""
        B, N = s_tokens.shape
        s_in, a_in = self.stream_inputs(s_tokens, a_tokens, modality)
        s_cache = self.new_cache(B, STRUCTURE, s_tokens.device)
        logits_s = self.structure(s_in, s_cache)[:, :N]  # slot N predicts nothing
        if a_in is None:
            return logits_s, None
        return logits_s, self.appearance(a_in, self.new_cache(B, APPEARANCE, s_tokens.device), s_cache, modality,
                                         anchor)

    def loss(self, s_tokens, a_tokens, modality, appearance_rows: torch.Tensor | None = None,
             anchor: torch.Tensor | None = None):
        """(total, structure, appearance) mean cross-entropy per token. appearance_rows (B,) bool marks the rows
        whose appearance tokens are real; the others (structure-only masks) add to the structure loss only.
        anchor (B, N): anchor ids (rows that follow another modality's tokens; no_anchor for the others)."""
        logits_s, logits_a = self(s_tokens, a_tokens, modality, anchor)
        loss_s = F.cross_entropy(logits_s.flatten(0, 1).float(), s_tokens.flatten().long())
        if appearance_rows is not None:
            logits_a, a_tokens = logits_a[appearance_rows], a_tokens[appearance_rows]
        if a_tokens.numel() == 0:
            return loss_s, loss_s, logits_a.sum().float()  # no appearance row in this batch: 0, still in the graph
        loss_a = F.cross_entropy(logits_a.flatten(0, 1).float(), a_tokens.flatten().long())
        return loss_s + loss_a, loss_s, loss_a

    def forward_interleaved(self, s_tokens, a_tokens, modality, anchor=None):
        """Reference: the same model as ONE sequence with the asymmetric mask (no streams, no cache).
        Returns the same (structure logits, appearance logits) as forward()."""
        B, N = s_tokens.shape
        s_in, a_in = self.stream_inputs(s_tokens, a_tokens, modality)
        kind, slot = interleaved_layout(N)
        kind, slot = kind.to(s_tokens.device), slot.to(s_tokens.device)
        is_s = kind == STRUCTURE
        x = torch.empty(B, kind.numel(), self.cfg.n_embd, device=s_tokens.device)
        x[:, is_s] = self.wse(s_in[:, slot[is_s]]) + self.wpe_s(slot[is_s])
        x[:, ~is_s] = self.appearance_embedding(a_in[:, slot[~is_s]], slot[~is_s], modality,
                                                None if anchor is None else anchor[:, slot[~is_s]])
        mask = interleaved_mask(N).to(s_tokens.device)
        for block in self.blocks:
            q, k, v = block.attn.qkv(block.ln_1(x))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, -1, self.cfg.n_embd)
            x = x + block.attn.c_proj(y)  # same weights, one sequence
            x = x + block.mlp(block.ln_2(x))
        x = self.ln_f(x)
        s_pos = torch.nonzero(is_s).flatten()  # sequence positions of structure slots 0..N in slot order
        a_pos = torch.nonzero(~is_s).flatten()
        return self.head_s(x[:, s_pos[:N]]), self.head_a(x[:, a_pos])


# --------------------------------------------------------------------------- sampling

def gumbel_noise(generator: torch.Generator, shape) -> torch.Tensor:
    """Gumbel(0, 1) noise; argmax(logits / T + g) is a draw from softmax(logits / T)."""
    u = torch.rand(shape, generator=generator).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def seeded_gumbel_noise(key: list[int], shape) -> torch.Tensor:
    """gumbel_noise from a generator seeded by the key (e.g. [seed, sample, stream]): the same key, the same noise."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    return gumbel_noise(torch.Generator().manual_seed(seed), shape)


def pick(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0,
         top_k: int | None = None) -> torch.Tensor:
    """logits (B, V), Gumbel noise (B, V) -> tokens (B,). temperature 0 (or noise None) = greedy."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if noise is None or temperature <= 0:
        return logits.argmax(-1)
    return (logits / temperature + noise).argmax(-1)


@torch.no_grad()
def sample_structure(model: IARTransformer, noise: torch.Tensor | None, batch: int | None = None,
                     temperature: float = 1.0, top_k: int | None = None, callback=None):
    """Sample s_0..s_{N-1}. noise (B, N, Vs) Gumbel per step (None = greedy, then pass batch).
    Returns tokens (B, N) and the structure cache (all N+1 slots) for the appearance stream."""
    N = model.cfg.positions
    B = noise.shape[0] if noise is not None else batch
    device = model.wse.weight.device
    cache = model.new_cache(B, STRUCTURE, device)
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    x = torch.full((B, 1), model.bos, dtype=torch.long, device=device)
    for p in range(N):
        logits = model.structure(x, cache)[:, -1]
        tokens[:, p] = pick(logits, None if noise is None else noise[:, p].to(device), temperature, top_k)
        x = tokens[:, p:p + 1]
        if callback is not None:
            callback(p + 1, N)
    model.structure(x, cache)  # slot N: s_{N-1} as context for the last appearance token
    return tokens, cache


Guidance = float | Sequence[float]  # one weight for every label, or one per modality label


def row_guidance(guidance: Guidance, modality: torch.Tensor, num_modalities: int) -> torch.Tensor | None:
    """Guidance (one weight, or one per label) -> each row's weight (B, 1) by its label modality (B,), or None
    when every weight is 0 (plain sampling)."""
    weights = torch.as_tensor(guidance, dtype=torch.float32).flatten()
    if weights.numel() == 1:
        weights = weights.expand(num_modalities)
    if weights.numel() != num_modalities or not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"modality guidance needs 1 or {num_modalities} finite weights >= 0, got {guidance!r}")
    return weights.to(modality.device)[modality.long()][:, None] if (weights > 0).any() else None


def guidance_labels(modality: torch.Tensor, num_modalities: int, weights: torch.Tensor | None, structures: int
                    ) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Appearance rows to run and rows per sampled row: modality (B,) itself (1), or every label for each row with
    a weight > 0 and its own label for the others (up to B*M rows; repeat (B,)), a row's labels adjacent (so rows
    stay structure-major; every structure must get as many rows)."""
    if weights is None:
        return modality.long(), 1
    guided = weights[:, 0] > 0  # (B,)
    every = torch.arange(num_modalities, device=modality.device)
    labels = torch.cat([every if g else m.view(1) for m, g in zip(modality.long(), guided.tolist())])
    repeat = torch.where(guided, num_modalities, 1)
    if len(set(repeat.view(structures, -1).sum(1).tolist())) > 1:
        raise ValueError("modality guidance needs the same modality rows for every structure")
    return labels, repeat


def own_label_rows(modality: torch.Tensor, repeat: torch.Tensor) -> torch.Tensor:
    """Each sampled row's (B,) row under its own label among guidance_labels' rows (repeat (B,) from it)."""
    return torch.cumsum(repeat, 0) - repeat + torch.where(repeat > 1, modality.long(), 0)


def guided_logits(logits: torch.Tensor, modality: torch.Tensor, repeat: torch.Tensor | int,
                  weights: torch.Tensor | None):
    """logits of guidance_labels' rows -> (B, V): (1 + w) log p(a | m) - w mean_j log p(a | j), w the row's
    weight (B, 1) from row_guidance (log p(a | m) for rows run under their own label only)."""
    if weights is None:
        return logits
    B = modality.shape[0]
    logp = torch.log_softmax(logits.float(), -1)  # (sum(repeat), V)
    own = logp[own_label_rows(modality, repeat)]  # (B, V)
    row_of = torch.repeat_interleave(torch.arange(B, device=logits.device), repeat)
    mean = torch.zeros_like(own).index_add_(0, row_of, logp) / repeat[:, None]  # (B, V)
    return own + weights * (own - mean)


def anchor_rows(modality: torch.Tensor, S: int, anchor_label: int) -> torch.Tensor:
    """Rows' labels (S*R,) structure-major -> (S, R) bool marking each sample's one row of `anchor_label`."""
    is_anchor = modality.long().view(S, -1) == anchor_label
    if not (is_anchor.sum(1) == 1).all():
        raise ValueError(f"every sample needs exactly one row of the anchor label {anchor_label}")
    return is_anchor


@dataclass
class SharedAnatomy:
    """Rows that copy another row's tokens outside the lesion: `anchor` (B,) is the row each row copies (itself
    for an anchor row), `own` (B, N) marks the positions where a row draws its own token (the lesion's cells;
    every position of an anchor row). The modalities of one sample then share the anchor's head and brain."""
    anchor: torch.Tensor
    own: torch.Tensor

    @classmethod
    def from_lesion_cells(cls, cells: torch.Tensor, modality: torch.Tensor, anchor_label: int) -> SharedAnatomy:
        """cells (S, N): each sample's lesion token cells; modality (S*R,): the rows' labels, structure-major, one
        row of `anchor_label` per sample."""
        S = cells.shape[0]
        is_anchor = anchor_rows(modality, S, anchor_label)  # (S, R)
        R = is_anchor.shape[1]
        anchor = (torch.arange(S, device=modality.device) * R + is_anchor.long().argmax(1)).repeat_interleave(R)
        return cls(anchor=anchor, own=cells.repeat_interleave(R, 0) | is_anchor.flatten()[:, None])


@torch.no_grad()
def sample_appearance(model: IARTransformer, s_cache: KVCache, modality: torch.Tensor, noise: torch.Tensor | None,
                      temperature: float = 1.0, top_k: int | None = None, callback=None,
                      guidance: Guidance = 0.0, shared: SharedAnatomy | None = None) -> torch.Tensor:
    """Sample a_0..a_{N-1} given the complete structure cache (S rows) for B = S * r rows with modality (B,)
    indices, rows ordered structure-major (row b uses structure b // r); noise (B, N, Va) or None (greedy).
    The structure cache is shared by the r modalities of a sample, never copied. guidance: modality guidance
    weight, or one per label (module docstring; 0 = plain sampling). shared: rows take their anchor row's token
    where they do not draw their own (SharedAnatomy). Rows that follow an anchor row: sample_following.
    Returns tokens (B, N)."""
    N, M = model.cfg.positions, model.cfg.num_modalities
    device = model.wse.weight.device
    B = modality.shape[0]
    if B % s_cache.batch:
        raise ValueError(f"{B} appearance rows for {s_cache.batch} structures")
    modality = modality.long().to(device)
    weights = row_guidance(guidance, modality, M)  # (B, 1) or None
    labels, repeat = guidance_labels(modality, M, weights, s_cache.batch)  # (B,) or up to (B*M,)
    cache = model.new_cache(labels.shape[0], APPEARANCE, device)
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    if shared is not None:
        own, copy_from = shared.own.to(device), shared.anchor.long().to(device)
    x = (model.cfg.appearance_vocab + labels).view(-1, 1)
    for t in range(N):
        logits = guided_logits(model.appearance(x, cache, s_cache, labels)[:, -1], modality, repeat, weights)
        drawn = pick(logits, None if noise is None else noise[:, t].to(device), temperature, top_k)  # (B,)
        tokens[:, t] = drawn if shared is None else torch.where(own[:, t], drawn, drawn[copy_from])
        x = tokens[:, t:t + 1].repeat_interleave(repeat, 0)
        if callback is not None:
            callback(t + 1, N)
    return tokens


def _row_groups(modality: torch.Tensor, S: int, anchor_label: int | None) -> list[torch.Tensor]:
    """Rows (B,) structure-major -> [all rows] or, with an anchor label, [each sample's anchor row, the others]."""
    if modality.shape[0] % S:
        raise ValueError(f"{modality.shape[0]} appearance rows for {S} structures")
    if anchor_label is None:
        return [torch.arange(modality.shape[0], device=modality.device)]
    is_anchor = anchor_rows(modality, S, anchor_label).flatten()
    groups = [torch.nonzero(is_anchor).flatten(), torch.nonzero(~is_anchor).flatten()]
    return groups if len(groups[1]) else groups[:1]


@dataclass
class _RowGroup:
    """One appearance group in _pipelined_rows: its sampled rows (B_g,), guidance weights (B_g, 1) or None, the
    labels its rows run under and rows per sampled row (guidance_labels), and the slot from which no row is
    guided."""
    rows: torch.Tensor
    weights: torch.Tensor | None
    labels: torch.Tensor
    repeat: torch.Tensor | int
    guided_until: int


class _RunRows:
    """Every run row of the groups of _pipelined_rows in one batch and one KV cache, structure-major (sample s:
    group 0's rows of s, then group 1's): position p of the cache holds group g's slot p - g (group g lags g
    slots), so all rows write at one position per pass. `mask` hides what a lagging row may not see."""

    def __init__(self, model: IARTransformer, plan: list[_RowGroup], modality: torch.Tensor, S: int):
        self.model, self.plan, self.S = model, plan, S
        device = modality.device
        parts = []  # per group, per run row: (label, sampled row, group)
        for g, group in enumerate(plan):
            sampled = group.rows.repeat_interleave(group.repeat, 0)
            parts.append(torch.stack([group.labels, sampled, torch.full_like(sampled, g)], 1).view(S, -1, 3))
        self._set(torch.cat(parts, 1).flatten(0, 1))
        N = model.cfg.positions
        self.cache = KVCache(model.cfg, self.label.shape[0], N + len(plan) - 1, device, model.wse.weight.dtype)

    def _set(self, table: torch.Tensor) -> None:
        self.label, self.sampled, self.group = table.unbind(1)
        self.members = [torch.nonzero(self.group == g).flatten() for g in range(len(self.plan))]
        B = sum(group.rows.shape[0] for group in self.plan)
        # followers see their sample's anchor row (group 0 has one row per sample)
        self.anchor_of = self.plan[0].rows[self.sampled // (B // self.S)] if len(self.plan) > 1 else None

    def step_inputs(self, p: int, a_tokens: torch.Tensor, modality: torch.Tensor):
        """Position p -> inputs (R, 1), slots (R,) and anchor ids (R, 1) or None of every run row; a row whose slot
        is out of 0..N-1 runs on a valid dummy input (its logits are not used, and what it writes is never seen)."""
        model, N = self.model, self.model.cfg.positions
        t = p - self.group  # (R,) each row's slot
        slots = t.clamp(0, N - 1)
        previous = a_tokens[self.sampled, (t - 1).clamp(0, N - 1)]
        inputs = torch.where(t > 0, previous, model.cfg.appearance_vocab + self.label).view(-1, 1)
        anchor = None
        if self.anchor_of is not None:
            ids = model.anchor_ids(a_tokens[self.anchor_of, slots].view(-1, 1), modality[self.anchor_of])
            anchor = torch.where(self.group.view(-1, 1) > 0, ids, model.no_anchor)  # (R, 1)
        return inputs, slots, anchor

    def mask(self, p: int, n_structure: int) -> torch.Tensor | None:
        """(R, 1, 1, n_structure + p + 1) bool: group g sees structure slots 0..p - g + 1 and cache positions g..p
        (its slots 0..p - g); None when no group lags."""
        if len(self.plan) == 1:
            return None
        device = self.group.device
        sees_s = torch.arange(n_structure, device=device)[None] < (p + 2 - self.group)[:, None]
        sees_a = torch.arange(p + 1, device=device)[None] >= self.group[:, None]
        return torch.cat([sees_s, sees_a], 1)[:, None, None]

    def stop_guidance(self, g: int, modality: torch.Tensor) -> None:
        """Group g keeps only the rows under each sampled row's own label (weight 0 from here on)."""
        group = self.plan[g]
        keep = torch.ones_like(self.group, dtype=torch.bool)
        keep[self.members[g]] = False
        keep[self.members[g][own_label_rows(modality[group.rows], group.repeat)]] = True
        keep = torch.nonzero(keep).flatten()
        self.cache.keep_rows(keep)
        self._set(torch.stack([self.label, self.sampled, self.group], 1)[keep])
        group.labels, group.repeat, group.weights = self.label[self.members[g]], 1, None


def _pipelined_rows(model: IARTransformer, s_cache: KVCache, modality: torch.Tensor, a_noise, groups, lag: int,
                    temperature, top_k, guidance, callback, guided=None, own=None, structure=None) -> torch.Tensor:
    """Appearance rows in groups, group g one slot behind group g-1 (the first `lag` slots behind the structure):
    each pass draws one slot of every group, with one weight read and one attention for all rows (_RunRows).
    Followers (group 1) see the anchor's token at their slot. guided (B, N): where guidance applies (bool), or the
    share of the weight that does (float); after a group's last guided slot its rows run under their own label
    only. own (B, N): where a follower keeps its own token rather than the anchor's. structure: (s_tokens, s_noise)
    when the structure is sampled in the same passes."""
    N, M = model.cfg.positions, model.cfg.num_modalities
    device = model.wse.weight.device
    S, B = s_cache.batch, modality.shape[0]
    a_tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    plan = []
    for rows in groups:
        weights = row_guidance(guidance, modality[rows], M)  # (B_g, 1) or None
        labels, repeat = guidance_labels(modality[rows], M, weights, S)
        until = N
        if guided is not None and weights is not None:
            slots = torch.nonzero(guided[rows].amax(0) > 0).flatten()
            until = int(slots[-1]) + 1 if len(slots) else 0
        plan.append(_RowGroup(rows, weights, labels, repeat, until))
    run = _RunRows(model, plan, modality, S)
    for j in range(lag, N + lag + len(plan) - 1):
        p = j - lag  # cache position: group g's slot p - g
        active = [(g, p - g) for g in range(len(plan)) if 0 <= p - g < N]
        for g, t in active:
            if t >= plan[g].guided_until and plan[g].weights is not None:
                run.stop_guidance(g, modality)
        s_in = None
        if structure is not None and j <= N:
            s_in = structure[0][:, j - 1:j]
        n_structure = min(p + 2, N + 1)
        inputs, slots, anchor = run.step_inputs(p, a_tokens, modality)
        logits_s, logits_a = model.joint_step(s_in, inputs, slots, run.label, anchor, run.cache, s_cache,
                                              n_structure, run.mask(p, n_structure))
        if structure is not None and j < N:
            s_tokens, s_noise = structure
            s_tokens[:, j] = pick(logits_s, None if s_noise is None else s_noise[:, j].to(device), temperature, top_k)
        for g, t in active:
            group = plan[g]
            rows, weights = group.rows, group.weights
            if weights is not None and guided is not None:
                weights = weights * guided[rows, t:t + 1].to(device)
            logits = guided_logits(logits_a[run.members[g]], modality[rows], group.repeat, weights)
            drawn = pick(logits, None if a_noise is None else a_noise[rows, t].to(device), temperature, top_k)
            if g == 1 and own is not None:
                anchor_tokens = a_tokens[plan[0].rows, t].repeat_interleave(len(rows) // S)
                drawn = torch.where(own[rows, t].to(device), drawn, anchor_tokens)
            a_tokens[rows, t] = drawn
        if callback is not None:
            callback(min(j + 1 - lag, N), N)
    return a_tokens


@torch.no_grad()
def sample_following(model: IARTransformer, s_cache: KVCache, modality: torch.Tensor, noise: torch.Tensor | None,
                     anchor_label: int, temperature: float = 1.0, top_k: int | None = None, callback=None,
                     guidance: Guidance = 0.0, shared: SharedAnatomy | None = None,
                     guided: torch.Tensor | None = None) -> torch.Tensor:
    """Appearance rows that follow an anchor row (models with anchor_conditioning), given the complete structure
    cache (S rows): each sample's row of `anchor_label` is drawn one slot ahead of its other rows, which see the
    anchor's token a'_t at their slot t (one pass per slot for all rows). modality (S*R,) structure-major with one
    anchor row per sample; noise (S*R, N, Va) or None. shared: the followers take the anchor's token outside their
    own cells (SharedAnatomy for the S*R rows). guided (S*R, N): where the guidance applies (bool; plain sampling
    elsewhere) or the share of its weight that applies (float). Returns tokens (S*R, N)."""
    modality = modality.long().to(model.wse.weight.device)
    groups = _row_groups(modality, s_cache.batch, anchor_label)
    return _pipelined_rows(model, s_cache, modality, noise, groups, 0, temperature, top_k, guidance, callback,
                           guided, None if shared is None else shared.own)


@torch.no_grad()
def sample_joint(model: IARTransformer, s_noise: torch.Tensor | None, modality: torch.Tensor,
                 a_noise: torch.Tensor | None, batch: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, callback=None, guidance: Guidance = 0.0, anchor_label: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Structure once per sample (S rows) and its appearance in every modality (B = S*r rows, structure-major),
    pipelined: step j samples s_j and a_{j-1} in one pass (N+1 passes instead of 2N+1). a_{j-1} only needs
    s_0..s_{j-1}, so this draws exactly the tokens of sample_structure + sample_appearance with the same noise
    (up to float rounding). guidance: modality guidance weight, or one per label (module docstring).
    anchor_label: rows follow the sample's row of that label (sample_following), one slot behind it (N+2 passes).
    Returns (structure tokens (S, N), appearance tokens (B, N))."""
    N = model.cfg.positions
    device = model.wse.weight.device
    S = s_noise.shape[0] if s_noise is not None else batch
    modality = modality.long().to(device)
    groups = _row_groups(modality, S, anchor_label)
    s_cache = model.new_cache(S, STRUCTURE, device)
    s_tokens = torch.empty(S, N, dtype=torch.long, device=device)
    bos = torch.full((S, 1), model.bos, dtype=torch.long, device=device)
    logits_s = model.structure(bos, s_cache)[:, -1]
    s_tokens[:, 0] = pick(logits_s, None if s_noise is None else s_noise[:, 0].to(device), temperature, top_k)
    a_tokens = _pipelined_rows(model, s_cache, modality, a_noise, groups, 1, temperature, top_k, guidance, callback,
                               structure=(s_tokens, s_noise))
    return s_tokens, a_tokens
