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
holding structure keys only), and the appearance stream afterwards (`appearance`), with a cache that holds the
structure keys/values copied into their interleaved positions and the appearance keys in between. An appearance
query sees everything before it in the interleaved order, so it simply attends to a prefix of that cache (a plain
causal mask, no mask at all for one new token). Structure logits are a function of structure tokens only;
changing appearance tokens or the modality label cannot change them, bit for bit. `forward_interleaved` is the
same model written as one masked sequence; tests check that both agree (to float rounding) and that the mask
has the properties above.

Cross-modal sampling: sample the structure once (N steps, KV cache), then the appearance of every requested
modality in one batch, reusing the structure cache (N steps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

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
    """Keys/values for every layer, preallocated: (B, n_head, capacity, head_dim); `length` = slots written.

    A structure cache holds structure slots 0..N in order. An appearance cache (`appearance_cache`) holds the
    whole interleaved sequence: structure slot j at position 2j-1 (BOS at 0), appearance slot t at 2t+2."""

    def __init__(self, cfg: IARConfig, batch: int, capacity: int, device, dtype=torch.float32):
        shape = (batch, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # slots written (of this cache's own stream)
        self.interleaved = False  # True for appearance caches

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) of slots length..length+T-1; return every key/value up to the last new one."""
        start, T = self.length, k.shape[2]
        if self.interleaved:  # appearance slot t lives at position 2t+2, right after structure slot t+1
            where, end = slice(2 * start + 2, 2 * (start + T) + 1, 2), 2 * (start + T) + 1
        else:
            where, end = slice(start, start + T), start + T
        self.k[layer][:, :, where] = k
        self.v[layer][:, :, where] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def appearance_cache(self, repeats: int = 1) -> KVCache:
        """Appearance cache from this COMPLETE structure cache (N+1 slots): structure keys/values copied once to
        their interleaved positions (each batch row repeated `repeats` times: one structure shared by several
        modalities), appearance positions left free."""
        n = self.length - 1  # positions N
        if self.k[0].shape[2] != n + 1:
            raise ValueError(f"the appearance stream needs the complete structure ({self.k[0].shape[2]} slots), "
                             f"the cache holds {self.length}")
        out = KVCache.__new__(KVCache)
        out.k, out.v = [], []
        for src, dst in ((self.k, out.k), (self.v, out.v)):
            for t in src:
                B, H, _, D = t.shape
                t = t.repeat_interleave(repeats, 0)
                buf = t.new_zeros((B * repeats, H, 2 * n + 1, D))
                buf[:, :, 0] = t[:, :, 0]  # BOS
                buf[:, :, 1::2] = t[:, :, 1:]  # structure slot j >= 1 at 2j-1
                dst.append(buf)
        out.length, out.interleaved = 0, True
        return out


# --------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    def __init__(self, cfg: IARConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def qkv(self, x: torch.Tensor):
        """x (B, T, C) -> q, k, v (B, H, T, C/H)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + log(mask)) v, then the output projection. mask (Tq, Tk) bool or None (all)."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, Tq, D)
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

    def forward(self, x, layer: int, cache: KVCache, mask):
        """x (B, T, C) attends to every key in `cache` (after appending its own) allowed by mask (T, keys).
        The stream is decided by the cache: a structure cache holds structure keys only."""
        q, k, v = self.attn.qkv(self.ln_1(x))
        k, v = cache.write(layer, k, v)
        x = x + self.attn.attend(q, k, v, mask)
        return x + self.mlp(self.ln_2(x))


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

    def new_cache(self, batch: int, device=None) -> KVCache:
        """An empty structure cache (N+1 slots); once full, `cache.appearance_cache()` serves the appearance."""
        device = device or self.wse.weight.device
        return KVCache(self.cfg, batch, self.cfg.positions + 1, device, self.wse.weight.dtype)

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
            x = block(x, layer, cache, mask)
        cache.length += T
        return self.head_s(self.ln_f(x))

    def appearance(self, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Appearance slots start .. start+T-1 with inputs (B, T) (MOD label or codes) -> logits (B, T, Va).
        `cache` comes from `structure_cache.appearance_cache()`. Appearance slot t attends to the interleaved
        positions 0..2t+2: BOS, s_0..s_t, MOD, a_0..a_{t-1} (and itself)."""
        B, T = inputs.shape
        if not cache.interleaved:
            raise ValueError("appearance() needs an appearance cache (structure_cache.appearance_cache())")
        start = cache.length
        slots = torch.arange(start, start + T, device=inputs.device)
        x = self.drop(self.wae(inputs) + self.wpe_a(slots))
        keys = torch.arange(2 * (start + T) + 1, device=inputs.device)
        mask = None if T == 1 else keys[None, :] <= 2 * slots[:, None] + 2  # causal in interleaved order
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, cache, mask)
        cache.length += T
        return self.head_a(self.ln_f(x))

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
                modality: torch.Tensor | None = None):
        """s_tokens, a_tokens (B, N) codes, modality (B,) index -> structure logits (B, N, Vs) for s_0..s_{N-1}
        and appearance logits (B, N, Va) for a_0..a_{N-1} (None without a_tokens)."""
        B, N = s_tokens.shape
        s_in, a_in = self.stream_inputs(s_tokens, a_tokens, modality)
        s_cache = self.new_cache(B, s_tokens.device)
        logits_s = self.structure(s_in, s_cache)[:, :N]  # slot N predicts nothing
        if a_in is None:
            return logits_s, None
        return logits_s, self.appearance(a_in, s_cache.appearance_cache())

    def loss(self, s_tokens, a_tokens, modality):
        logits_s, logits_a = self(s_tokens, a_tokens, modality)
        loss_s = F.cross_entropy(logits_s.flatten(0, 1).float(), s_tokens.flatten().long())
        loss_a = F.cross_entropy(logits_a.flatten(0, 1).float(), a_tokens.flatten().long())
        return loss_s + loss_a, loss_s, loss_a

    def forward_interleaved(self, s_tokens, a_tokens, modality):
        """Reference: the same model as ONE sequence with the asymmetric mask (no streams, no cache).
        Returns the same (structure logits, appearance logits) as forward()."""
        B, N = s_tokens.shape
        s_in, a_in = self.stream_inputs(s_tokens, a_tokens, modality)
        kind, slot = interleaved_layout(N)
        kind, slot = kind.to(s_tokens.device), slot.to(s_tokens.device)
        is_s = kind == STRUCTURE
        x = torch.empty(B, kind.numel(), self.cfg.n_embd, device=s_tokens.device)
        x[:, is_s] = self.wse(s_in[:, slot[is_s]]) + self.wpe_s(slot[is_s])
        x[:, ~is_s] = self.wae(a_in[:, slot[~is_s]]) + self.wpe_a(slot[~is_s])
        mask = interleaved_mask(N).to(s_tokens.device)
        for block in self.blocks:
            q, k, v = block.attn.qkv(block.ln_1(x))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, -1, self.cfg.n_embd)
            x = x + block.attn.c_proj(y)
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
    cache = model.new_cache(B, device)
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


@torch.no_grad()
def sample_appearance(model: IARTransformer, s_cache: KVCache, modality: torch.Tensor, noise: torch.Tensor | None,
                      temperature: float = 1.0, top_k: int | None = None, callback=None) -> torch.Tensor:
    """Sample a_0..a_{N-1} given the complete structure cache (S rows) for B = S * r rows with modality (B,)
    indices, rows ordered structure-major (row b uses structure b // r); noise (B, N, Va) or None (greedy).
    The structure cache is reused as is (copied once into the appearance cache). Returns tokens (B, N)."""
    N = model.cfg.positions
    device = model.wse.weight.device
    B = modality.shape[0]
    S = s_cache.k[0].shape[0]
    if B % S:
        raise ValueError(f"{B} appearance rows for {S} structures")
    cache = s_cache.appearance_cache(repeats=B // S)
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    x = (model.cfg.appearance_vocab + modality.long().to(device)).view(B, 1)
    for t in range(N):
        logits = model.appearance(x, cache)[:, -1]
        tokens[:, t] = pick(logits, None if noise is None else noise[:, t].to(device), temperature, top_k)
        x = tokens[:, t:t + 1]
        if callback is not None:
            callback(t + 1, N)
    return tokens
