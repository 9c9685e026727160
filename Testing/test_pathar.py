"""PathAR engine: asymmetric attention, KV cache, tokenizer, training stages, sample_pairs API and CLI.

Tiny configurations built here (16^3 patches, 4^3 token grids, one transformer layer), trained for a few steps
on synthetic lesion patches into a temporary weights folder (PATHOSYN_WEIGHTS_DIR). Only the last test uses the
bundled weights, and is skipped until they are trained.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scripted_models.errors import InputError, WeightsError
from scripted_models.labels import MODALITIES
from scripted_models.pathar import api, quality
from scripted_models.pathar.data import PatchConfig, PatchSet, shape_blend
from scripted_models.pathar.tokenizer import (
    AppearanceVQ,
    StructureVQ,
    VQConfig,
    codebook_usage,
    mask_dice,
)
from scripted_models.pathar.transformer import (
    APPEARANCE,
    STRUCTURE,
    IARConfig,
    IARTransformer,
    guidance_labels,
    gumbel_noise,
    interleaved_layout,
    interleaved_mask,
    sample_appearance,
    sample_joint,
    sample_structure,
)
from scripted_models.weights import load_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_iar(grid=(3, 3), seed=0, modality_embedding=True, **kw) -> IARTransformer:
    torch.manual_seed(seed)
    cfg = IARConfig(grid=grid, structure_vocab=7, appearance_vocab=11, num_modalities=4, n_layer=2, n_head=2,
                    n_embd=32, modality_embedding=modality_embedding, **kw)
    return IARTransformer(cfg).eval()


def random_tokens(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    N, cfg = model.cfg.positions, model.cfg
    return (torch.randint(0, cfg.structure_vocab, (batch, N), generator=g),
            torch.randint(0, cfg.appearance_vocab, (batch, N), generator=g),
            torch.randint(0, cfg.num_modalities, (batch,), generator=g))


# --------------------------------------------------------------------------- attention and invariance

@pytest.mark.parametrize("modality_embedding", [True, False])
def test_structure_logits_exactly_invariant_to_appearance_and_modality(modality_embedding):
    model = tiny_iar(modality_embedding=modality_embedding)
    s, a, mod = random_tokens(model)
    with torch.no_grad():
        ls, la = model(s, a, mod)
        a2 = (a + 1 + torch.randint(0, 5, a.shape)) % model.cfg.appearance_vocab
        ls2, la2 = model(s, a2, (mod + 1) % 4)
        ls3, _ = model(s)  # no appearance stream at all
    assert torch.equal(ls, ls2) and torch.equal(ls, ls3)  # bitwise
    assert not torch.allclose(la, la2)  # appearance does depend on its own tokens and modality
    with torch.no_grad():  # the modality label alone changes appearance logits from the first position on
        _, la4 = model(s, a, (mod + 1) % 4)
    assert (la4[:, 0] - la[:, 0]).abs().max() > 1e-4


def test_structure_changes_reach_appearance_only_from_their_position():
    model = tiny_iar()
    s, a, mod = random_tokens(model)
    p = 4
    s2 = s.clone()
    s2[:, p] = (s2[:, p] + 1) % model.cfg.structure_vocab
    with torch.no_grad():
        ls, la = model(s, a, mod)
        ls2, la2 = model(s2, a, mod)
    # structure logits for s_0..s_p and appearance logits for a_0..a_{p-1} cannot see s_p
    torch.testing.assert_close(ls[:, :p + 1], ls2[:, :p + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(la[:, :p], la2[:, :p], atol=1e-6, rtol=0)
    # a_p sees s_p (structure up to and including the current position)
    assert (la[:, p] - la2[:, p]).abs().max() > 1e-5


@pytest.mark.parametrize("modality_embedding", [True, False])
def test_two_streams_equal_one_masked_interleaved_sequence(modality_embedding):
    model = tiny_iar(grid=(2, 2, 2), modality_embedding=modality_embedding)
    s, a, mod = random_tokens(model)
    with torch.no_grad():
        ls, la = model(s, a, mod)
        rs, ra = model.forward_interleaved(s, a, mod)
    torch.testing.assert_close(ls, rs, atol=1e-5, rtol=0)
    torch.testing.assert_close(la, ra, atol=1e-5, rtol=0)


def test_attention_mask_properties():
    n = 5
    kind, slot = interleaved_layout(n)
    mask = interleaved_mask(n)
    L = 2 * n + 1
    assert kind.numel() == L and mask.shape == (L, L)
    assert (kind == STRUCTURE).sum() == n + 1 and (kind == APPEARANCE).sum() == n
    assert not torch.triu(mask, diagonal=1).any()  # causal
    assert mask.diagonal().all()  # every position sees itself
    s_rows, a_cols = kind == STRUCTURE, kind == APPEARANCE
    assert not mask[s_rows][:, a_cols].any()  # structure never sees appearance nor the modality label
    mod_pos = int(torch.nonzero(a_cols & (slot == 0)))
    assert mask[:, mod_pos].sum() == n  # the modality label is seen by exactly the n appearance positions
    for i in range(L):
        seen_s = set(slot[mask[i] & (kind == STRUCTURE)].tolist())
        seen_a = set(slot[mask[i] & a_cols].tolist())
        if kind[i] == STRUCTURE:
            assert seen_s == set(range(int(slot[i]) + 1)) and not seen_a
        else:  # appearance slot t predicts a_t: BOS, s_0..s_t (structure slots 0..t+1), MOD, a_0..a_{t-1}
            t = int(slot[i])
            assert seen_s == set(range(t + 2)) and seen_a == set(range(t + 1))


def test_kv_cache_matches_full_recompute():
    model = tiny_iar(grid=(2, 3, 2))
    s, a, mod = random_tokens(model, batch=2)
    N = model.cfg.positions
    with torch.no_grad():
        ls, la = model(s, a, mod)
        s_in, a_in = model.stream_inputs(s, a, mod)
        s_cache = model.new_cache(2, STRUCTURE)
        steps = [model.structure(s_in[:, j:j + 1], s_cache) for j in range(N + 1)]  # one token at a time
        a_cache = model.new_cache(2, APPEARANCE)
        chunks = [model.appearance(a_in[:, j:j + 3], a_cache, s_cache, mod) for j in range(0, N, 3)]  # chunked
    torch.testing.assert_close(torch.cat(steps, 1)[:, :N], ls, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), la, atol=1e-5, rtol=0)


def test_sampling_reuses_structure_cache_and_is_deterministic():
    model = tiny_iar()
    N = model.cfg.positions

    def run(seed, temperature=1.0, top_k=None):
        g = torch.Generator().manual_seed(seed)
        s_noise = gumbel_noise(g, (2, N, model.cfg.structure_vocab))
        s, cache = sample_structure(model, s_noise, temperature=temperature, top_k=top_k)
        a_noise = gumbel_noise(g, (4, N, model.cfg.appearance_vocab))
        a = sample_appearance(model, cache, torch.tensor([0, 3, 0, 3]), a_noise,
                              temperature=temperature, top_k=top_k)
        return s, a

    s1, a1 = run(0)
    s2, a2 = run(0)
    assert torch.equal(s1, s2) and torch.equal(a1, a2)
    s3, _ = run(1)
    assert not torch.equal(s1, s3)
    # top-k 1 is greedy: the noise no longer matters
    assert torch.equal(run(0, top_k=1)[0], run(5, top_k=1)[0])
    # sampled structure tokens are what teacher forcing would have predicted greedily with top_k=1
    s_greedy, _ = run(0, top_k=1)
    with torch.no_grad():
        logits, _ = model(s_greedy)
    assert torch.equal(logits.argmax(-1), s_greedy)


def test_joint_sampling_draws_the_sequential_tokens():
    """Pipelined sampling (s_j with a_{j-1}) = structure first, then appearance, with the same noise; the
    structure does not depend on which modalities are requested."""
    model = tiny_iar(grid=(2, 2, 3))
    N, cfg = model.cfg.positions, model.cfg
    g = torch.Generator().manual_seed(4)
    s_noise = gumbel_noise(g, (2, N, cfg.structure_vocab))
    a_noise = gumbel_noise(g, (6, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 1, 3, 0, 1, 3])  # 2 samples x 3 modalities, structure-major
    s_seq, cache = sample_structure(model, s_noise, temperature=0.8)
    a_seq = sample_appearance(model, cache, mods, a_noise, temperature=0.8)
    s_joint, a_joint = sample_joint(model, s_noise, mods, a_noise, temperature=0.8)
    assert torch.equal(s_seq, s_joint) and torch.equal(a_seq, a_joint)
    s_one, a_one = sample_joint(model, s_noise, torch.tensor([3, 3]), a_noise[[2, 5]], temperature=0.8)
    assert torch.equal(s_one, s_joint) and torch.equal(a_one, a_joint[[2, 5]])


def test_shared_anatomy_copies_the_anchor_outside_the_lesion_cells():
    """With SharedAnatomy a row takes its anchor row's token wherever it does not draw its own; the anchor rows
    draw exactly what independent rows draw; the structure cache is untouched."""
    from scripted_models.pathar.transformer import SharedAnatomy

    model = tiny_iar(grid=(2, 2, 3))
    N, cfg = model.cfg.positions, model.cfg
    g = torch.Generator().manual_seed(6)
    s_noise = gumbel_noise(g, (2, N, cfg.structure_vocab))
    a_noise = gumbel_noise(g, (6, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 2, 3, 0, 2, 3])  # 2 samples x (t1, t2, flair), structure-major; anchor = t2
    _, cache = sample_structure(model, s_noise)
    independent = sample_appearance(model, cache, mods, a_noise, guidance=2.0)
    lesion = torch.zeros(2, N, dtype=torch.bool)
    lesion[0, [1, 4]] = True
    lesion[1, 7:] = True
    own = lesion.repeat_interleave(3, 0)
    own[[1, 4]] = True  # the anchor rows draw every token
    anchor = torch.tensor([1, 1, 1, 4, 4, 4])
    built = SharedAnatomy.from_lesion_cells(lesion, mods, anchor_label=2)
    assert torch.equal(built.anchor, anchor) and torch.equal(built.own, own)
    with pytest.raises(ValueError, match="exactly one row"):
        SharedAnatomy.from_lesion_cells(lesion, mods, anchor_label=1)
    shared = sample_appearance(model, cache, mods, a_noise, guidance=2.0, shared=SharedAnatomy(anchor, own))
    assert torch.equal(shared[[1, 4]], independent[[1, 4]])
    assert torch.equal(shared[~own], shared[anchor][~own])
    # a row's own tokens: guided argmax under its own label, given its history (copied tokens included)
    s_tokens, _ = sample_structure(model, s_noise)
    rows = torch.arange(6) // 3
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(model(s_tokens[rows], shared, torch.full((6,), j))[1], -1)
                            for j in range(cfg.num_modalities)], 1)  # (B, M, N, V)
    mine = logp[torch.arange(6), mods]
    expected = (mine + 2.0 * (mine - logp.mean(1)) + a_noise).argmax(-1)
    assert torch.equal(shared[own], expected[own])


def test_rows_that_follow_an_anchor_row():
    """anchor_conditioning: appearance slot t also sees the anchor row's token a'_t. The anchor ids never reach the
    structure stream; the two-stream model equals the one masked sequence with them; sample_following draws each
    sample's anchor row as plain sampling would and the other rows as the guided argmax given the anchor's tokens;
    a model without it refuses anchor ids."""
    from scripted_models.pathar.transformer import sample_following

    model = tiny_iar(grid=(2, 2, 3), anchor_conditioning=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.wce.weight, std=0.5)
    N, cfg = model.cfg.positions, model.cfg
    s, a, mod = random_tokens(model)
    follow = model.anchor_ids(random_tokens(model, seed=5)[1], torch.tensor([3, 3, 2]))
    follow[2] = model.no_anchor
    with torch.no_grad():
        plain_s, plain_a = model(s, a, mod)
        anchored_s, anchored_a = model(s, a, mod, follow)
        assert torch.equal(plain_s, anchored_s)
        assert not torch.allclose(plain_a[:2], anchored_a[:2]) and torch.equal(plain_a[2], anchored_a[2])
        torch.testing.assert_close(model.forward_interleaved(s, a, mod, follow)[1], anchored_a, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(7)
    s_noise, a_noise = gumbel_noise(g, (2, N, cfg.structure_vocab)), gumbel_noise(g, (6, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 3, 2, 1, 3, 0])  # 2 samples x 3 rows; anchor = flair (3)
    s_tokens, cache = sample_structure(model, s_noise)
    tokens = sample_following(model, cache, mods, a_noise, anchor_label=3, guidance=2.0)
    first = torch.tensor([1, 4])
    assert torch.equal(tokens[first], sample_appearance(model, cache, mods[first], a_noise[first], guidance=2.0))
    rest = torch.tensor([0, 2, 3, 5])
    ids = model.anchor_ids(tokens[first], mods[first]).repeat_interleave(2, 0)
    rows = rest // 3
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(model(s_tokens[rows], tokens[rest], torch.full((4,), j), ids)[1], -1)
                            for j in range(cfg.num_modalities)], 1)  # (4, M, N, V)
    mine = logp[torch.arange(4), mods[rest]]
    expected = (mine + 2.0 * (mine - logp.mean(1)) + a_noise[rest]).argmax(-1)
    assert torch.equal(tokens[rest], expected)
    with pytest.raises(ValueError, match="exactly one row"):
        sample_following(model, cache, mods, a_noise, anchor_label=1)
    # guidance only where `guided` holds: none = plain sampling, everywhere = guided sampling, else a mix
    plain = sample_following(model, cache, mods, a_noise, anchor_label=3)
    nowhere, everywhere = torch.zeros(6, N, dtype=torch.bool), torch.ones(6, N, dtype=torch.bool)
    assert torch.equal(sample_following(model, cache, mods, a_noise, 3, guidance=2.0, guided=nowhere), plain)
    assert torch.equal(sample_following(model, cache, mods, a_noise, 3, guidance=2.0, guided=everywhere), tokens)
    some = torch.rand(6, N, generator=torch.Generator().manual_seed(3)) < 0.5
    mixed = sample_following(model, cache, mods, a_noise, 3, guidance=2.0, guided=some)
    assert torch.equal(mixed[first, :1][~some[first, :1]], plain[first, :1][~some[first, :1]])
    assert torch.equal(mixed[first, :1][some[first, :1]], tokens[first, :1][some[first, :1]])
    # a share of the weight (lesion_guidance "fraction"): half of weight 2 everywhere is weight 1 everywhere
    half = torch.full((6, N), 0.5)
    assert torch.equal(sample_following(model, cache, mods, a_noise, 3, guidance=2.0, guided=half),
                       sample_following(model, cache, mods, a_noise, 3, guidance=1.0, guided=everywhere))
    # guided in the first slots only: after them the rows run under their own label alone (no label-average rows),
    # and each token is still the guided draw where guided and the plain draw elsewhere (checked by teacher forcing)
    early = torch.zeros(6, N, dtype=torch.bool)
    early[:, :N // 2] = True
    drawn = sample_following(model, cache, mods, a_noise, 3, guidance=50.0, guided=early)
    drawn_ids = model.anchor_ids(drawn[first], mods[first]).repeat_interleave(2, 0)
    for which, anchor_ids in ((first, None), (rest, drawn_ids)):
        with torch.no_grad():
            logp = torch.stack([torch.log_softmax(model(s_tokens[which // 3], drawn[which],
                                                        torch.full((len(which),), j), anchor_ids)[1], -1)
                                for j in range(cfg.num_modalities)], 1)  # (rows, M, N, V)
        mine = logp[torch.arange(len(which)), mods[which]]
        weight = 50.0 * early[which, :, None]
        expected = (mine + weight * (mine - logp.mean(1)) + a_noise[which]).argmax(-1)
        assert torch.equal(drawn[which], expected)
    assert not torch.equal(drawn, plain)
    # pipelined: s_j, the anchor's a'_{j-1} and the followers' a_{j-2} in one pass draw the same tokens
    s_joint, a_joint = sample_joint(model, s_noise, mods, a_noise, guidance=2.0, anchor_label=3)
    assert torch.equal(s_joint, s_tokens) and torch.equal(a_joint, tokens)
    with pytest.raises(ValueError, match="exactly one row"):
        sample_joint(model, s_noise, mods, a_noise, anchor_label=1)
    with pytest.raises(ValueError, match="anchor_conditioning"):
        tiny_iar(grid=(2, 2, 3))(s, a, mod, follow)


@pytest.mark.parametrize("mode", ["following", "pipelined", "guided in the first slots"])
def test_lagging_rows_see_exactly_their_teacher_forced_context(monkeypatch, mode):
    """The rows of one pass share one cache (transformer._RunRows): the followers lag the anchor by a slot (and
    the anchor the structure, when pipelined), so a mask must hide the structure slot ahead of them and the
    cache position they never filled; guided rows drop their label-average rows after the last guided slot. The
    log-probabilities every row samples from equal teacher forcing's (1e-5), which argmax tokens alone cannot
    show."""
    import scripted_models.pathar.transformer as T

    model = tiny_iar(grid=(2, 2, 3), anchor_conditioning=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.wce.weight, std=0.5)
    N, M, cfg = model.cfg.positions, model.cfg.num_modalities, model.cfg
    g = torch.Generator().manual_seed(9)
    s_noise, a_noise = gumbel_noise(g, (2, N, cfg.structure_vocab)), gumbel_noise(g, (6, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 3, 2, 1, 3, 0])  # 2 samples x 3 rows; anchor = flair (3)
    w, early = 0.0, torch.zeros(6, N, dtype=torch.bool)
    seen = []  # logits (B_g, V) of every draw, in order
    pick = T.pick
    monkeypatch.setattr(T, "pick", lambda logits, *a: seen.append(logits) or pick(logits, *a))
    if mode == "pipelined":
        s_tokens, tokens = sample_joint(model, s_noise, mods, a_noise, anchor_label=3)
        seen = [lg for lg in seen if lg.shape[-1] == cfg.appearance_vocab]
    else:
        s_tokens, cache = sample_structure(model, s_noise)
        seen.clear()
        if mode == "following":
            tokens = T.sample_following(model, cache, mods, a_noise, anchor_label=3)
        else:
            w, early[:, :N // 2] = 2.0, True
            tokens = T.sample_following(model, cache, mods, a_noise, 3, guidance=w, guided=early)
    first, rest = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])
    ids = model.anchor_ids(tokens[first], mods[first]).repeat_interleave(2, 0)
    draws = {2: [], 4: []}  # in slot order: the anchor rows (2 of them) and the followers (4)
    for logits in seen:
        draws[logits.shape[0]].append(logits)
    for rows, anchor_ids in ((first, None), (rest, ids)):
        with torch.no_grad():  # (rows, M, N, V) under every label, then the guided mix
            logp = torch.stack([torch.log_softmax(model(s_tokens[rows // 3], tokens[rows],
                                                        torch.full((len(rows),), j), anchor_ids)[1], -1)
                                for j in range(M)], 1)
        mine = logp[torch.arange(len(rows)), mods[rows]]
        expected = mine + w * early[rows, :, None] * (mine - logp.mean(1))
        drawn = torch.stack(draws[len(rows)], 1)
        assert drawn.shape == expected.shape
        torch.testing.assert_close(torch.log_softmax(drawn, -1), torch.log_softmax(expected, -1), atol=1e-5, rtol=0)


def test_modality_guidance_samples_from_the_contrast_with_the_label_average():
    """With guidance w each appearance token is drawn from (1 + w) log p(a | m) - w mean_j log p(a | j), every
    term under the row's own history (checked against teacher forcing); w = 0 is plain sampling; the structure
    never depends on it; pipelined and sequential sampling still agree."""
    model = tiny_iar(grid=(2, 2, 2))
    N, cfg = model.cfg.positions, model.cfg
    g = torch.Generator().manual_seed(5)
    s_noise = gumbel_noise(g, (2, N, cfg.structure_vocab))
    a_noise = gumbel_noise(g, (4, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 3, 1, 2])  # 2 samples x 2 modalities
    w = 2.0
    s_plain, a_plain = sample_joint(model, s_noise, mods, a_noise)
    s_guided, a_guided = sample_joint(model, s_noise, mods, a_noise, guidance=w)
    assert torch.equal(s_plain, s_guided)
    assert not torch.equal(a_plain, a_guided)
    s_seq, cache = sample_structure(model, s_noise)
    assert torch.equal(sample_appearance(model, cache, mods, a_noise, guidance=w), a_guided)
    assert torch.equal(sample_appearance(model, cache, mods, a_noise, guidance=0.0), a_plain)
    # the tokens are the argmax of guided log-probabilities + noise, from teacher forcing under every label
    rows = torch.arange(4) // 2
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(model(s_seq[rows], a_guided, torch.full((4,), j))[1], -1)
                            for j in range(cfg.num_modalities)], 1)  # (B, M, N, V)
    own = logp[torch.arange(4), mods]
    expected = (own + w * (own - logp.mean(1)) + a_noise).argmax(-1)
    assert torch.equal(expected, a_guided)


def test_modality_guidance_per_label_weights_act_row_by_row():
    """One weight per modality label: each row is sampled exactly as under a uniform guidance of its label's weight
    (rows are independent), and a weight of 0 gives that row's plain tokens."""
    model = tiny_iar(grid=(2, 2, 2))
    N, cfg = model.cfg.positions, model.cfg
    g = torch.Generator().manual_seed(6)
    s_noise = gumbel_noise(g, (2, N, cfg.structure_vocab))
    a_noise = gumbel_noise(g, (6, N, cfg.appearance_vocab))
    mods = torch.tensor([0, 2, 3, 0, 2, 3])  # 2 samples x 3 modalities
    per_label = [3.0, 1.0, 0.0, 0.5]
    s_mixed, a_mixed = sample_joint(model, s_noise, mods, a_noise, guidance=per_label)
    for label in (0, 2, 3):
        rows = mods == label
        s_one, a_one = sample_joint(model, s_noise, mods, a_noise, guidance=per_label[label])
        assert torch.equal(s_one, s_mixed) and torch.equal(a_one[rows], a_mixed[rows]), label
    assert not torch.equal(a_mixed, sample_joint(model, s_noise, mods, a_noise, guidance=3.0)[1])
    s_seq, cache = sample_structure(model, s_noise)
    assert torch.equal(sample_appearance(model, cache, mods, a_noise, guidance=per_label), a_mixed)
    for bad in ([1.0, 2.0], [1.0, -1.0, 0.0, 0.0], [float("nan")] * 4):
        with pytest.raises(ValueError, match="modality guidance"):
            sample_joint(model, s_noise, mods, a_noise, guidance=bad)


def test_modality_guidance_runs_every_label_only_for_guided_rows():
    """A row with weight 0 runs under its own label only (its draw is plain sampling: the label rows of guided
    rows are not needed for it), so t1c unguided costs one row instead of four."""
    mods = torch.tensor([0, 2, 3, 0, 2, 3])
    weights = torch.tensor([3.0, 1.0, 0.0, 0.5])[mods][:, None]
    labels, repeat = guidance_labels(mods, 4, weights, structures=2)
    assert labels.tolist() == [0, 1, 2, 3, 2, 0, 1, 2, 3] * 2 and repeat.tolist() == [4, 1, 4] * 2
    assert guidance_labels(mods, 4, None, structures=2)[0].tolist() == mods.tolist()
    with pytest.raises(ValueError, match="same modality rows for every structure"):
        guidance_labels(torch.tensor([0, 2, 2, 2]), 4, torch.tensor([1.0, 0, 0, 0])[[0, 2, 2, 2]][:, None], 2)


def test_parse_and_describe_modality_guidance():
    assert api.parse_modality_guidance("8") == 8.0
    assert api.parse_modality_guidance("T1=8, flair=1.5") == {"t1": 8.0, "flair": 1.5}
    assert api.describe_guidance({"t1": 8.0, "flair": 8.0}) == "8"
    assert api.describe_guidance({"t1": 8.0, "flair": 1.5}) == "t1 8, flair 1.5"
    for bad in ("", "x", "-1", "nan", "inf", "t1=x", "t9=1", "flair=-2", "flair="):
        with pytest.raises(InputError):
            api.parse_modality_guidance(bad)


def test_guidance_sweep_rule_keeps_signs_and_dice_then_lowest_contrast_error():
    from scripted_models.pathar.guidance_sweep import DICE_MARGIN, choose

    def run(dice, signs_clear, ordering, error, signs=12):
        return [{"segmenter_dice": dice, "signs": signs, "signs_clear": signs_clear, "worst_ordering": ordering,
                 "contrast_error": error}] * 2

    results = {"8": run(0.43, 11, 0.67, 1.0),
               "fewer signs": run(0.50, 10, 0.67, 0.3),
               "fewer signs near zero only": run(0.43, 11, 0.67, 0.9, signs=10),
               "worse ordering": run(0.50, 11, 0.33, 0.3),
               "much lower Dice": run(0.43 - DICE_MARGIN - 0.01, 11, 0.67, 0.4),
               "slightly lower Dice": run(0.43 - DICE_MARGIN + 0.01, 12, 1.0, 0.6),
               "same": run(0.43, 11, 0.67, 0.7)}
    chosen, qualifies = choose(results)
    assert chosen == "slightly lower Dice"
    assert qualifies == {"8": True, "fewer signs": False, "fewer signs near zero only": True, "worse ordering": False,
                         "much lower Dice": False, "slightly lower Dice": True, "same": True}
    assert choose({"8": run(0.4, 9, 0.5, 1.0)})[0] == "8"  # the reference qualifies by definition
    # with orderings over the pairs whose real difference is clear of zero, those decide (session 31)

    def clear(ordering, ordering_clear, error):
        return [{**r, "worst_ordering_clear": ordering_clear} for r in run(0.43, 11, ordering, error)]

    chosen, qualifies = choose({"8": clear(0.78, 1.0, 1.0), "all pairs lower": clear(0.67, 1.0, 0.5),
                                "clear pairs lower": clear(1.0, 0.83, 0.4)})
    assert chosen == "all pairs lower"
    assert qualifies == {"8": True, "all pairs lower": True, "clear pairs lower": False}


def test_guidance_sweep_table_shows_t1_and_flair_levels():
    from scripted_models.pathar.guidance_sweep import markdown

    def seed(t1_edema):
        contrasts = {m: {"core": 1.0, "edema": t1_edema if m == "t1" else 2.0, "enhancing": 3.0} for m in MODALITIES}
        return {"segmenter_dice": 0.4, "signs": 10, "signs_clear": 9, "signs_total_clear": 10, "worst_ordering": 0.5,
                "contrast_error": 0.9, "contrasts": contrasts}

    real = {m: {1: -0.75, 2: 0.14, 3: -0.44} for m in MODALITIES}
    text = markdown({"8": [seed(-0.6), seed(-0.7)]}, {"8": True}, "8", real, 0.5, 5, [0, 1])
    row = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    assert "| 1.00 / -0.65 / 3.00 | 1.00 / 2.00 / 3.00 | **chosen** |" in row  # t1, then flair
    assert "t1 contrasts necrotic or non-enhancing core -0.75, edema 0.14" in text
    assert "| 9.0 (9-9) of 10 |" in row and "| 0.50 (0.5-0.5) | - |" in row  # no clear-pair ordering given


def test_signs_count_apart_where_the_real_contrast_is_clear_of_zero():
    """A cell counts as clear only when the cases' mean is >= 0.1 z from zero and a case bootstrap excludes zero."""
    from scripted_models.pathar.quality import clear_cells
    from scripted_models.pathar.test_fold import compare_contrasts

    cases = [{"t1": {1: -0.8 + 0.1 * k, 2: 0.05 + 0.01 * k, 3: (-1) ** k * 0.6}} for k in range(5)]
    assert clear_cells(cases) == {("t1", 1)}  # edema too small, enhancing of mixed sign
    assert clear_cells([{"t1": {1: -0.8}}]) == set()  # one case: no interval
    real = {m: {1: -0.6, 2: 0.07, 3: 0.1} for m in MODALITIES}
    out = compare_contrasts({"t1": {1: -0.5, 2: -0.2, 3: 0.3}}, real, {("t1", 1)})
    assert (out["signs_agree"], out["signs_agree_clear"], out["signs_total_clear"]) == (2, 1, 1)
    flipped = compare_contrasts({"t1": {1: 0.5, 2: 0.2, 3: 0.3}}, real, {("t1", 1)})
    assert (flipped["signs_agree"], flipped["signs_agree_clear"]) == (2, 0)
    assert "signs_agree_clear" not in compare_contrasts({"t1": {1: -0.5}}, real)


def test_orderings_count_apart_where_the_real_difference_is_clear_of_zero():
    """An ordering pair counts only when the cases' difference between the two sub-regions is clear of zero."""
    from scripted_models.pathar.quality import clear_pairs, ordering_agreement
    from scripted_models.pathar.test_fold import compare_contrasts

    # core far below edema and enhancing in every case; edema vs enhancing flips from case to case
    cases = [{"flair": {1: -1.0, 2: 1.0 + (-1) ** k * 0.3, 3: 1.0 - (-1) ** k * 0.3}} for k in range(6)]
    assert clear_pairs(cases) == {("flair", 1, 2), ("flair", 1, 3)}
    real, generated = {1: -1.0, 2: 1.1, 3: 1.0}, {1: -0.5, 2: 0.9, 3: 1.2}  # the unclear pair is swapped
    assert ordering_agreement(real, generated) == 2 / 3
    assert ordering_agreement(real, generated, {(1, 2), (1, 3)}) == 1.0
    assert ordering_agreement(real, generated, set()) is None
    full = {m: real for m in MODALITIES}
    out = compare_contrasts({"flair": generated}, full, pairs=clear_pairs(cases))
    assert out["ordering"]["flair"] == 2 / 3 and out["ordering_clear"]["flair"] == 1.0
    assert out["ordering_clear"]["t1"] is None  # no clear pair in t1
    wrong = compare_contrasts({"flair": {1: 2.0, 2: 0.9, 3: 1.2}}, full, pairs=clear_pairs(cases))
    assert wrong["ordering_clear"]["flair"] == 0.0


# --------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("dims,labels,patch", [(2, 3, (16, 24)), (3, 4, (8, 16, 8))])
def test_tokenizer_round_trip_shapes(dims, labels, patch):
    cfg = VQConfig(spatial_dims=dims, num_labels=labels, channels=(4, 8), num_embeddings=16, embedding_dim=8,
                   head_channels=4)
    grid = cfg.grid(patch)
    assert grid == tuple(p // 4 for p in patch)
    torch.manual_seed(0)
    structure, appearance = StructureVQ(cfg).eval(), AppearanceVQ(cfg).eval()
    mask = torch.randint(0, labels, (2,) + patch)
    image = torch.randn(2, 1, *patch)
    with torch.no_grad():
        s = structure.encode(mask)
        assert s.shape == (2,) + grid and s.dtype == torch.long and int(s.max()) < 16
        assert structure.decode(s).shape == (2, labels) + patch
        decoded = structure.decode_mask(s)
        assert decoded.shape == (2,) + patch and decoded.dtype == torch.uint8
        a = appearance.encode(image, mask)
        assert a.shape == (2,) + grid
        out = appearance.decode(a, mask)
        assert out.shape == (2, 1) + patch and torch.isfinite(out).all()
        # the decoder is conditioned on the structure: another mask, another image for the same tokens
        other = (mask + 1) % labels
        assert (appearance.decode(a, other) - out).abs().max() > 1e-6
    with pytest.raises(ValueError):
        cfg.grid(tuple(p + 1 for p in patch))


def test_modality_conditioned_appearance_vq_renders_the_same_tokens_per_modality():
    """With num_modalities the label reaches encoder, decoder and head: the same tokens and mask decode to
    another image in another modality; the label is required; token noise swaps whole positions for codes."""
    cfg = VQConfig(num_labels=4, channels=(4, 8), num_embeddings=16, embedding_dim=8, head_channels=4,
                   num_modalities=4)
    torch.manual_seed(0)
    vq = AppearanceVQ(cfg).eval()
    mask, image = torch.randint(0, 4, (2, 8, 8, 8)), torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        tokens = vq.encode(image, mask, torch.tensor([0, 3]))
        as_t1 = vq.decode(tokens, mask, torch.tensor([0, 0]))
        as_flair = vq.decode(tokens, mask, torch.tensor([3, 3]))
        assert as_t1.shape == (2, 1, 8, 8, 8) and (as_t1 - as_flair).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-6
        torch.testing.assert_close(vq.decode(tokens, mask, torch.tensor([0, 0])), as_t1)
        with pytest.raises(ValueError, match="modality"):
            vq.decode(tokens, mask)
        quantized = vq.quantizer.embed(tokens)
        assert vq.corrupt(quantized, 0.0) is quantized
        swapped = vq.corrupt(quantized, 1.0)
        codebook = vq.quantizer.quantizer.embedding.weight  # (16, E)
        per_position = swapped.permute(0, 2, 3, 4, 1).reshape(-1, 8)
        assert (torch.cdist(per_position, codebook).min(1).values < 1e-5).all()  # every position is a code
        assert (swapped - quantized).abs().sum(1).gt(0).float().mean() > 0.5  # mostly other codes than before


def test_codebook_and_reconstruction_metrics():
    usage = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert usage["perplexity"] == pytest.approx(4.0) and usage["used_codes"] == 4
    assert codebook_usage(np.zeros(10, int), 8)["perplexity"] == pytest.approx(1.0)
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 2
    a[3:5, 3:5] = 1
    d = mask_dice(a, a, 4)
    assert d["whole"] == 1.0 and d["1"] == 1.0 and "3" not in d
    assert mask_dice(a, np.zeros_like(a), 4)["whole"] == 0.0


# --------------------------------------------------------------------------- training on synthetic patches

def synthetic_patches(count=6, size=16, seed=0) -> PatchSet:
    """Nested lesions (core in enhancing ring in edema) with intensities by sub-region, two modalities each."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    masks, images, image_patch, image_modality = [], [], [], []
    for p in range(count):
        c = size / 2 + rng.uniform(-2, 2, 3)
        r = rng.uniform(3, 6)
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        m = np.zeros((size,) * 3, np.uint8)
        m[d < r] = 2
        m[d < 0.7 * r] = 3
        m[d < 0.4 * r] = 1
        masks.append(m)
        for k in ((1, 3) if p % 2 else (0, 1, 2, 3)):
            base = np.array([0.0, -1.0, 1.5, 2.0]) * (1 if k != 0 else -1)
            img = base[m] + 0.2 * rng.standard_normal(m.shape)
            images.append(img.astype(np.float16))
            image_patch.append(p)
            image_modality.append(k)
    is_val = np.zeros(count, bool)
    is_val[-1] = True
    return PatchSet(np.stack(masks), np.arange(count), is_val, np.stack(images), np.array(image_patch),
                    np.array(image_modality), [f"synthetic_{i}" for i in range(count)],
                    PatchConfig(size=size, spacing_mm=4.0))


def same_tokens_after(ps, folder: Path, before_state: dict, before_card: dict):
    """Load the appearance VQs before and after a stage that must keep the tokens (the one in folder now), assert
    that the first training images get the same tokens from both: (before, after, tokens, masks, modalities)."""
    from scripted_models.pathar.tokenizer import AppearanceVQ, VQConfig

    after_state, after_card = load_state(api.APPEARANCE_NAME, folder)
    before, after = AppearanceVQ(VQConfig.from_dict(before_card["config"])), AppearanceVQ(
        VQConfig.from_dict(after_card["config"]))
    before.load_state_dict(before_state)
    after.load_state_dict(after_state)
    idx = ps.image_indices(False)[:4]
    x = torch.from_numpy(ps.images[idx].astype(np.float32))[:, None]
    m = torch.from_numpy(ps.masks[ps.image_patch[idx]])
    mod = torch.from_numpy(ps.image_modality[idx])
    with torch.no_grad():
        tokens = before.eval().encode(x, m, mod)
        assert torch.equal(after.eval().encode(x, m, mod), tokens)
    return before, after, tokens, m, mod


def any_lesion_cells(masks: torch.Tensor, downsample: int) -> torch.Tensor:
    """(B, *S) labels -> (B, N) bool: token cells holding any lesion voxel (max pooling; independent of api)."""
    return torch.nn.functional.max_pool3d((masks > 0).float()[:, None], downsample).flatten(1) > 0


def tiny_config():
    from scripted_models.pathar.train import PathARConfig

    patch = PatchConfig(size=16, spacing_mm=4.0)
    vq = dict(channels=(4, 8), num_embeddings=16, embedding_dim=8, head_channels=4)
    structure, appearance = VQConfig(**vq), VQConfig(**vq, num_modalities=len(MODALITIES))
    transformer = IARConfig(grid=structure.grid((16, 16, 16)), structure_vocab=16, appearance_vocab=16,
                            n_layer=1, n_head=2, n_embd=32)
    return PathARConfig(patch, structure, appearance, transformer)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Train all three stages for a few steps (resuming once) into a temporary weights folder."""
    from scripted_models.pathar import train as T

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pathar")
    work, out = root / "work", root / "weights"
    ps, cfg = synthetic_patches(), tiny_config()
    dev = torch.device("cpu")
    tc = T.TrainConfig(structure_steps=3, appearance_steps=3, transformer_steps=4, vq_batch=2, transformer_batch=3,
                       vq_warmup_frac=0.4, save_every=2, log_every=1)  # step 0: auto-encoder, step 1: codebook
    T.train_structure(ps, cfg, tc, work, out, dev)
    tc.structure_steps = 5  # resume from the step-3 checkpoint
    T.train_structure(ps, cfg, tc, work, out, dev)
    T.train_appearance(ps, cfg, tc, work, out, dev)
    T.train_transformer(ps, cfg, tc, work, out, dev)
    T.write_markdown_card(out)
    return out


def test_decoder_fine_tune_keeps_tokens_and_the_transformer_valid(tiny_weights, tmp_path):
    """Stage "decoder": the appearance decoder (plus a zero-started refinement) is fine-tuned with the encoder and
    codebook frozen. Every image keeps its tokens; the transformer card follows the new sha256, so sampling loads;
    a warm start treats the old and new VQ as the same tokens; resuming continues the step count."""
    from scripted_models.pathar import train as T

    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    before_state, before_card = load_state(api.APPEARANCE_NAME, folder)
    ps, cfg = synthetic_patches(), tiny_config()
    tc = T.TrainConfig(decoder_steps=2, vq_batch=2, save_every=1, log_every=1, decoder_refine_channels=4)
    work = tmp_path / "work"
    T.train_appearance_decoder(ps, cfg, tc, work, folder, torch.device("cpu"))
    tc.decoder_steps = 3  # resume
    T.train_appearance_decoder(ps, cfg, tc, work, folder, torch.device("cpu"))
    after_card = load_state(api.APPEARANCE_NAME, folder)[1]
    before, after, tokens, m, mod = same_tokens_after(ps, folder, before_state, before_card)
    assert after_card["config"]["refine_channels"] == 4 and after.refine is not None
    assert after_card["decoder_finetunes"][-1]["steps"] == 3
    assert before_card["sha256"] in after_card["token_compatible_sha256"]
    with torch.no_grad():
        assert not torch.equal(after.decode(tokens, m, mod), before.decode(tokens, m, mod))
    transformer = json.loads((folder / f"{api.TRANSFORMER_NAME}.json").read_text())
    assert transformer["appearance_vq"]["sha256"] == after_card["sha256"]
    pairs = api.sample_pairs(["t1c"], n=1, seed=0, device="cpu", weights=folder)
    assert np.isfinite(pairs[0].images["t1c"].array).all()
    model = T.IARTransformer(T.IARConfig.from_dict(transformer["config"]))
    structure_card = json.loads((folder / f"{api.STRUCTURE_NAME}.json").read_text())
    info = T.warm_start_transformer(model, tiny_weights, structure_card, after_card)  # old VQ sha, same tokens
    assert info["reinitialised"] == []


def test_subregion_contrast_loss_measures_the_contrast_to_healthy_tissue():
    from scripted_models.pathar.train import subregion_contrast_loss

    mask = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    mask[0, 2:5, 2:5, 2:5] = 1  # 27 core voxels
    mask[0, 5:7, 2:5, 2:5] = 3  # 18 enhancing voxels
    image = torch.zeros(1, 1, 8, 8, 8)
    image[0, 0, 0] = -4.0  # background slab: not healthy tissue
    image[mask[:, None] == 3] = 2.0
    assert subregion_contrast_loss(image, image, mask, 4, -4.0).item() == 0.0
    shifted = image + 5.0  # the same contrasts at another level
    assert subregion_contrast_loss(shifted, image, mask, 4, -4.0).item() == pytest.approx(0.0, abs=1e-5)
    dim_rim = image.clone()
    dim_rim[mask[:, None] == 3] = 1.0
    assert subregion_contrast_loss(dim_rim, image, mask, 4, -4.0, min_voxels=10).item() == pytest.approx(0.5)
    assert subregion_contrast_loss(dim_rim, image, mask, 4, -4.0).item() == 0.0  # 18 rim voxels < 20: ignored


def test_appearance_refinement_starts_as_the_identity():
    """A refinement added to trained weights changes nothing until it is trained (its last layer starts at 0)."""
    from scripted_models.pathar.tokenizer import AppearanceVQ, VQConfig

    cfg = VQConfig(channels=(4, 8), num_embeddings=8, embedding_dim=4, head_channels=4, num_modalities=2)
    plain = AppearanceVQ(cfg).eval()
    refined = AppearanceVQ(VQConfig(**{**cfg.__dict__, "refine_channels": 4})).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("refine.") for k in missing)
    tokens = torch.randint(0, 8, (2, 4, 4, 4))
    mask = torch.randint(0, 4, (2, 16, 16, 16))
    with torch.no_grad():
        assert torch.equal(refined.decode(tokens, mask, torch.tensor([0, 1])),
                           plain.decode(tokens, mask, torch.tensor([0, 1])))
    assert "refine_channels" not in cfg.to_dict()  # cards of weights without it stay as they were



def test_cross_modal_refinement_corrects_present_modalities_from_all_of_them():
    """The joint refinement starts as the identity; trained (here: random last layer), a modality's correction
    depends on the other modalities of its sample; absent modalities come back as given; the order of a sample's
    rows does not matter; one sample's modalities never reach another's."""
    from scripted_models.pathar.tokenizer import AppearanceVQ, VQConfig

    cfg = VQConfig(channels=(4, 8), num_embeddings=8, embedding_dim=4, head_channels=4, num_modalities=4)
    plain = AppearanceVQ(cfg).eval()
    joint = AppearanceVQ(VQConfig(**{**cfg.__dict__, "joint_channels": 4})).eval()
    missing, unexpected = joint.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("joint.") for k in missing)
    assert "joint_channels" not in cfg.to_dict()
    tokens = torch.randint(0, 8, (6, 4, 4, 4))
    masks = torch.randint(0, 4, (2, 16, 16, 16))
    modality = torch.tensor([3, 0, 1, 2, 3, 0])  # sample 0: flair, t1, t1c; sample 1: t2, flair, t1
    with torch.no_grad():
        assert torch.equal(joint.decode_together(tokens, masks, modality),
                           plain.decode(tokens, masks.repeat_interleave(3, 0), modality))
        torch.nn.init.normal_(joint.joint.net[-1].conv.weight, std=0.5)
        refined = joint.decode_together(tokens, masks, modality)
        assert (refined - plain.decode(tokens, masks.repeat_interleave(3, 0), modality)).abs().amax() > 1e-3
        order = torch.tensor([2, 0, 1, 5, 3, 4])
        torch.testing.assert_close(joint.decode_together(tokens[order], masks, modality[order]), refined[order])
        other = tokens.clone()
        other[1] = (other[1] + 1) % 8  # sample 0's t1 changes: its flair changes, sample 1 does not
        changed = joint.decode_together(other, masks, modality)
        assert (changed[0] - refined[0]).abs().amax() > 1e-4
        torch.testing.assert_close(changed[3:], refined[3:])
        images = torch.randn(1, 4, 16, 16, 16)
        present = torch.tensor([[True, False, True, False]])
        out = joint.joint(images, present, torch.nn.functional.one_hot(masks[:1], 4).permute(0, 4, 1, 2, 3).float())
        assert torch.equal(out[:, [1, 3]], images[:, [1, 3]])
        assert not torch.equal(out[:, [0, 2]], images[:, [0, 2]])
        with pytest.raises(ValueError, match="twice"):
            joint.decode_together(tokens, masks, torch.tensor([3, 0, 3, 2, 3, 0]))


def test_joint_refinement_stage_learns_keeps_tokens_and_the_transformer_valid(tiny_weights, tmp_path):
    """Stage "joint": a cross-modal refinement is trained on round trips with everything else frozen. It keeps the
    weights of the lowest validation MAE (everywhere + in the lesion), below the plain decoding's; tokens stay the
    same, the transformer card follows the new sha256, sampling uses it; resuming continues the step count."""
    from scripted_models.pathar import train as T

    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    before_state, before_card = load_state(api.APPEARANCE_NAME, folder)
    ps, cfg = synthetic_patches(), tiny_config()
    tc = T.TrainConfig(joint_steps=20, joint_channels=8, joint_batch=4, joint_crop=8, save_every=10, log_every=5)
    work = tmp_path / "work"
    T.train_joint_refinement(ps, cfg, tc, work, folder, torch.device("cpu"))
    tc.joint_steps = 40  # resume
    T.train_joint_refinement(ps, cfg, tc, work, folder, torch.device("cpu"))
    after_state, after_card = load_state(api.APPEARANCE_NAME, folder)
    run = after_card["joint_refinements"][-1]
    assert after_card["config"]["joint_channels"] == 8 and run["steps"] == 40 and run["kept_step"] > 0
    val = run["validation"]
    assert val["mae_refined"] + val["mae_lesion_refined"] < val["mae_decoded"] + val["mae_lesion_decoded"]
    assert before_card["sha256"] in after_card["token_compatible_sha256"]
    same_tokens_after(ps, folder, before_state, before_card)
    transformer = json.loads((folder / f"{api.TRANSFORMER_NAME}.json").read_text())
    assert transformer["appearance_vq"]["sha256"] == after_card["sha256"]
    joint = api.sample_pairs(["t1", "flair"], n=1, seed=0, device="cpu", weights=folder)[0]
    plain = api.sample_pairs(["t1", "flair"], n=1, seed=0, device="cpu", weights=tiny_weights)[0]
    assert np.array_equal(joint.mask.array, plain.mask.array)
    assert not np.allclose(joint.images["flair"].array, plain.images["flair"].array)

@pytest.fixture
def weights_env(tiny_weights, monkeypatch):
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tiny_weights))
    return tiny_weights


def test_training_writes_cards_and_resumes(tiny_weights):
    structure = json.loads((tiny_weights / "pathar_structure_vq.json").read_text())
    assert structure["steps"] == 5 and len(structure["sha256"]) == 64
    assert {"dice_whole", "perplexity", "used_codes"} <= set(structure["metrics"]["val"])
    log = [json.loads(x) for x in (tiny_weights.parent / "work" / "structure" / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5]  # steps 4-5 continued the step-3 run
    appearance = json.loads((tiny_weights / "pathar_appearance_vq.json").read_text())
    assert {"mae", "mae_lesion", "perplexity"} <= set(appearance["metrics"]["val"])
    transformer = json.loads((tiny_weights / "pathar_transformer.json").read_text())
    assert transformer["structure_vq"]["sha256"] == structure["sha256"]
    assert transformer["metrics"]["val"]["nll_structure"] > 0
    assert transformer["wall_time_s"] >= 0 and transformer["data"]
    # the kept weights are those of the lowest held-out NLL among the checks (every save_every = 2 steps)
    selection = transformer["selection"]
    curve = selection["val_curve"]
    assert selection["rule"] == "best_val" and [c["step"] for c in curve] == [2, 4]
    best = min(curve, key=lambda c: c["nll_structure"] + c["nll_appearance"])
    assert selection["selected_step"] == best["step"]
    assert transformer["metrics"]["val"] == {k: best[k] for k in ("nll_structure", "nll_appearance")}
    md = (tiny_weights / "pathar.md").read_text()
    assert "pathar_transformer" in md and structure["sha256"][:16] in md


def test_a_warm_started_transformer_keeps_the_sampling_settings_it_started_from(tiny_weights, tmp_path):
    """A candidate warm-started from chosen weights is scored (and would be bundled) with their sampling settings
    until a sweep chooses again; without them it would sample unguided (the session-28 test fold of a candidate
    did). The card says where the settings came from."""
    import shutil

    from scripted_models.pathar import train as T
    from scripted_models.pathar.api import load_models

    start, out = tmp_path / "start", tmp_path / "weights"
    shutil.copytree(tiny_weights, start)
    card_path = start / "pathar_transformer.json"
    card = json.loads(card_path.read_text())
    card["sampling"] = {"modality_guidance": {"t1": 32.0, "t1c": 8.0, "t2": 8.0, "flair": 8.0}}
    card_path.write_text(json.dumps(card))
    out.mkdir()
    for vq in start.glob("pathar_*_vq.*"):
        shutil.copy(vq, out)
    tc = T.TrainConfig(transformer_steps=1, transformer_batch=2, save_every=1, log_every=1,
                       transformer_init=str(start))
    T.train_transformer(synthetic_patches(), tiny_config(), tc, tmp_path / "work", out, torch.device("cpu"))
    saved = json.loads((out / "pathar_transformer.json").read_text())
    assert saved["sampling"]["modality_guidance"]["t1"] == 32.0 and str(start) in saved["sampling"]["inherited_from"]
    assert "sampling" not in saved["warm_start"]
    assert load_models("cpu", out).guidance(None)["t1"] == 32.0


def test_anchor_training_rows_follow_another_modality_of_the_same_patch(tmp_path, monkeypatch):
    """--anchor-share: transformer rows follow the tokens of another modality of the same patch (and flip), so a
    one-modality patch never has an anchor; the card records the share."""
    from scripted_models.pathar import train as T

    ps, cfg = synthetic_patches(), tiny_config()
    cfg.transformer.anchor_conditioning = True
    dev = torch.device("cpu")
    tc = T.TrainConfig(structure_steps=2, appearance_steps=2, transformer_steps=2, vq_batch=2, transformer_batch=4,
                       vq_warmup_frac=0.4, save_every=2, log_every=1, anchor_share=1.0, structure_only_share=0.0)
    work, out = tmp_path / "work", tmp_path / "weights"
    T.train_structure(ps, cfg, tc, work, out, dev)
    T.train_appearance(ps, cfg, tc, work, out, dev)
    seen = []
    loss = T.IARTransformer.loss

    def spy(self, s_tokens, a_tokens, modality, appearance_rows=None, anchor=None):
        seen.append((a_tokens.clone(), modality.clone(), appearance_rows.clone(), anchor.clone()))
        return loss(self, s_tokens, a_tokens, modality, appearance_rows, anchor)

    monkeypatch.setattr(T.IARTransformer, "loss", spy)
    T.train_transformer(ps, cfg, tc, work, out, dev)
    card = json.loads((out / "pathar_transformer.json").read_text())
    assert card["anchor_share"] == 1.0 and card["config"]["anchor_conditioning"]
    tokens = dict(np.load(next((work / "transformer").glob("tokens_*.npz"))))["a"]
    vocab, followed, alone = cfg.transformer.appearance_vocab, 0, 0
    for a_tokens, modality, real, anchor in seen:
        for row in np.nonzero(real.numpy())[0]:
            matches = [i for i in range(len(ps.images)) for f in (0, 1)
                       if np.array_equal(tokens[i, f], a_tokens[row].numpy()) and ps.image_modality[i] == modality[row]]
            patch = ps.image_patch[matches[0]]
            ids = anchor[row].numpy()
            if (ids == cfg.transformer.num_modalities * vocab).all():
                alone += 1
                assert len(ps.modalities_of(patch)) == 1, "a patch with other modalities must be followed"
                continue
            followed += 1
            anchor_mod = int(ids[0] // vocab)
            assert (ids // vocab == anchor_mod).all() and anchor_mod != modality[row]
            others = [i for i in np.nonzero(ps.image_patch == patch)[0] if ps.image_modality[i] == anchor_mod]
            assert any(np.array_equal(tokens[i, f], ids % vocab) for i in others for f in (0, 1))
    assert followed > 0
    # sampling: the anatomy modality's row first, the others follow it; with copy they also take its tokens
    # outside the lesion's cells
    monkeypatch.setattr(T.IARTransformer, "loss", loss)

    def sample(**kw):
        pairs = api.sample_pairs(["t1", "flair"], n=2, seed=1, device="cpu", weights=out, **kw)
        return np.stack([p.mask.array for p in pairs]), np.stack([p.images[m].array for p in pairs
                                                                  for m in ("t1", "flair")])

    masks, independent = sample(anatomy_from="none")
    masks_t1c, following = sample(anatomy_from="t1c")
    assert np.array_equal(masks, masks_t1c) and not np.array_equal(independent, following)
    assert np.array_equal(sample(anatomy_from="t1c")[1], following)
    model = api.load_models("cpu", out)
    tr = model.transformer
    s_tokens, s_cache = sample_structure(tr, None, batch=2)
    decoded = model.structure.decode_mask(s_tokens.view(2, *model.grid))
    mods = torch.tensor([0, 1, 3] * 2)
    noise = gumbel_noise(torch.Generator().manual_seed(2), (6, tr.cfg.positions, tr.cfg.appearance_vocab))
    followed_only = model.shared_anatomy_tokens(s_cache, decoded, mods, noise, "t1c", copy=False)
    copied = model.shared_anatomy_tokens(s_cache, decoded, mods, noise, "t1c", copy=True)
    cells = any_lesion_cells(decoded, model.structure.cfg.downsample).repeat_interleave(3, 0)
    anchor_rows = copied[[1, 1, 1, 4, 4, 4]]
    assert (~cells).any() and not torch.equal(copied, followed_only)
    # guidance only in the lesion's cells (the card's sampling.guidance_in_lesion): plain sampling elsewhere
    passed = []
    following = api.sample_following
    monkeypatch.setattr(api, "sample_following", lambda *a: passed.append(a[-1]) or following(*a))
    model.shared_anatomy_tokens(s_cache, decoded, mods, noise, "t1c", guidance=4.0)
    model.shared_anatomy_tokens(s_cache, decoded, mods, noise, "t1c", guidance=4.0, lesion_guidance=True)
    assert passed[0] is None and torch.equal(passed[1], cells)  # the rows' lesion cells (sample_following tests)
    blob = torch.zeros_like(decoded)
    blob[:, 1:decoded.shape[1] - 2, 2:decoded.shape[2] - 1, 1:] = 2  # a lesion with partly covered edge cells
    model.shared_anatomy_tokens(s_cache, blob, mods, noise, "t1c", guidance=4.0, lesion_guidance="fraction")
    share = passed[2]  # each cell's lesion share: 0 outside the lesion's cells, in (0, 1] inside
    blob_cells = any_lesion_cells(blob, model.structure.cfg.downsample).repeat_interleave(3, 0)
    assert share.dtype == torch.float32 and torch.equal(share > 0, blob_cells) and share.max() <= 1.0
    assert 0 < share[blob_cells].min() < 1 and share.max() == 1.0  # edge cells are partly healthy
    (g0, g1, g2), d = model.grid, model.structure.cfg.downsample
    by_hand = (blob[0] > 0).float().reshape(g0, d, g1, d, g2, d).mean((1, 3, 5)).flatten()
    assert torch.allclose(share[0], by_hand)
    assert not model.guides_lesion_only and model.lesion_guidance is False
    card_path = out / "pathar_transformer.json"
    card = json.loads(card_path.read_text())
    for value in (True, "fraction"):
        card["sampling"] = {"guidance_in_lesion": value}
        card_path.write_text(json.dumps(card))
        assert api.load_models("cpu", out).lesion_guidance == value and api.load_models("cpu", out).guides_lesion_only
    card["sampling"] = {"guidance_in_lesion": "edges"}
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="guidance_in_lesion"):
        api.load_models("cpu", out)
    card["sampling"] = {"guidance_in_lesion": True}
    card_path.write_text(json.dumps(card))
    assert api.load_models("cpu", out).guides_lesion_only
    assert np.array_equal(sample(anatomy_from="t1c")[0], masks)
    assert torch.equal(copied[~cells], anchor_rows[~cells]) and torch.equal(copied[[1, 4]], followed_only[[1, 4]])


# --------------------------------------------------------------------------- sample_pairs API

def test_sample_pairs_outputs_and_determinism(weights_env):
    calls = []
    pairs = api.sample_pairs(["t1c", "flair"], n=2, seed=7, progress=lambda f, m: calls.append(f), device="cpu")
    assert len(pairs) == 2
    for pair in pairs:
        assert pair.mask.array.shape == (16, 16, 16) and pair.mask.array.dtype == np.uint8
        assert set(np.unique(pair.mask.array)) <= {0, 1, 2, 3}
        assert pair.mask.spacing == (4.0, 4.0, 4.0) and pair.mask.origin == (0.0, 0.0, 0.0)
        assert pair.mask.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert list(pair.images) == ["t1c", "flair"]
        for vol in pair.images.values():
            assert vol.array.dtype == np.float32 and vol.same_grid(pair.mask) and np.isfinite(vol.array).all()
    assert calls and calls[-1] == pytest.approx(1.0) and all(0 <= f <= 1 for f in calls)
    again = api.sample_pairs(["t1c", "flair"], n=2, seed=7, device="cpu")
    for p, q in zip(pairs, again):
        assert np.array_equal(p.mask.array, q.mask.array)
        for m in p.images:
            assert np.array_equal(p.images[m].array, q.images[m].array)
    other = api.sample_pairs(["t1c", "flair"], n=2, seed=8, device="cpu")
    assert any(not np.array_equal(p.images["t1c"].array, q.images["t1c"].array) for p, q in zip(pairs, other))


def test_sample_pairs_same_bytes_on_one_and_two_threads(weights_env):
    """The decoders run channels-last in float32 (pin_cpu_inference): the bytes must not depend on the threads."""
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            api._MODELS.clear()
            runs.append(api.sample_pairs(["t1c", "flair"], n=1, seed=4, device="cpu")[0])
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(runs[0].mask.array, runs[1].mask.array)
    for m in runs[0].images:
        assert np.array_equal(runs[0].images[m].array, runs[1].images[m].array)


def test_sample_structure_independent_of_n_and_modalities(weights_env):
    a = api.sample_pairs("t1c", n=2, seed=3, device="cpu")
    b = api.sample_pairs(["flair", "t1c", "t2"], n=3, seed=3, device="cpu")
    for i in range(2):
        assert np.array_equal(a[i].mask.array, b[i].mask.array)
        np.testing.assert_allclose(a[i].images["t1c"].array, b[i].images["t1c"].array, atol=1e-4)


def test_modality_guidance_defaults_to_the_weights_card(tiny_weights, tmp_path):
    """The transformer card's sampling.modality_guidance is the default; an explicit value overrides it."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    card_path = folder / f"{api.TRANSFORMER_NAME}.json"
    card = json.loads(card_path.read_text())
    assert "sampling" not in card  # trained weights start with plain sampling

    def images(**kw):
        pairs = api.sample_pairs(["t1", "flair"], n=2, seed=1, device="cpu", weights=folder, **kw)
        return np.stack([p.images[m].array for p in pairs for m in ("t1", "flair")])

    plain = images()
    strong = images(modality_guidance=1e4)
    assert not np.array_equal(plain, strong)
    card["sampling"] = {"modality_guidance": 1e4}  # an untrained model: labels barely differ
    card_path.write_text(json.dumps(card))
    assert np.array_equal(images(), strong)
    assert np.array_equal(images(modality_guidance=0.0), plain)
    # per modality: the card's map is the default, a partial override changes only the modalities it names
    card["sampling"] = {"modality_guidance": {"t1": 1e4, "t1c": 1e4, "t2": 1e4, "flair": 0.0}}
    card_path.write_text(json.dumps(card))
    t1_strong_flair_plain = images()
    assert np.array_equal(t1_strong_flair_plain[0::2], strong[0::2])
    assert np.array_equal(t1_strong_flair_plain[1::2], plain[1::2])
    assert np.array_equal(images(modality_guidance={"flair": 1e4}), strong)
    assert np.array_equal(images(modality_guidance={"t1": 0}), plain)
    card["sampling"] = {"modality_guidance": {"t1": 1e4}}  # modalities left out sample plainly
    card_path.write_text(json.dumps(card))
    assert np.array_equal(images(), t1_strong_flair_plain)
    card["sampling"] = {"modality_guidance": {"t1": -1}}
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="card: modality guidance"):
        images()


def test_shared_anatomy_defaults_to_the_weights_card(tiny_weights, tmp_path):
    """sampling.anatomy_from in the card is the default; "none" or a modality overrides it; the anchor modality
    is drawn even when not requested; the structure never depends on it."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    card_path = folder / f"{api.TRANSFORMER_NAME}.json"
    card = json.loads(card_path.read_text())

    def sample(**kw):
        pairs = api.sample_pairs(["t1", "flair"], n=2, seed=1, device="cpu", weights=folder, **kw)
        return np.stack([p.mask.array for p in pairs]), np.stack([p.images[m].array for p in pairs
                                                                  for m in ("t1", "flair")])

    masks, independent = sample()
    masks_t2, from_t2 = sample(anatomy_from="t2")
    assert np.array_equal(masks, masks_t2)
    assert not np.array_equal(independent, from_t2)
    assert np.array_equal(sample(anatomy_from="t2")[1], from_t2)
    card["sampling"] = {"anatomy_from": "t2"}
    card_path.write_text(json.dumps(card))
    assert np.array_equal(sample()[1], from_t2)
    assert np.array_equal(sample(anatomy_from="none")[1], independent)
    with pytest.raises(InputError, match="anatomy_from"):
        sample(anatomy_from="t9")
    card["sampling"] = {"anatomy_from": "pd"}
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="card: anatomy_from"):
        sample()


def test_one_head_outline_makes_background_common_outside_the_lesion():
    bg = -4.0
    images = np.zeros((1, 2, 4, 4, 4), np.float32)
    images[0, 1, 0] = bg  # modality 1 draws slice 0 as background
    images[0, 0, 3, 0] = bg + 0.2  # modality 0 draws a row of slice 3 as (near) background
    mask = np.zeros((1, 4, 4, 4), np.uint8)
    mask[0, 0, 1, 1] = 2  # a lesion voxel in modality 1's background: kept as drawn
    out = api.one_head_outline(images, mask, bg)
    head = np.ones((4, 4, 4), bool)
    head[0] = False
    head[3, 0] = False
    head[0, 1, 1] = True
    assert np.array_equal(out[0, 0] > bg + api.HEAD_MARGIN_Z, head) and np.array_equal(out[0, 1] > bg + 0.5, head
                                                                                       & (images[0, 1] > bg))
    assert np.array_equal(out[:, :, head], images[:, :, head]) and (out[:, :, ~head] == bg).all()


def test_one_head_outline_from_the_card(tiny_weights, tmp_path):
    """sampling.one_head_outline: every returned modality of a sample has the same head outside the lesion; inside
    that common head the images are those drawn without the option; the structure is unchanged."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    card_path = folder / f"{api.TRANSFORMER_NAME}.json"
    card = json.loads(card_path.read_text())

    def sample():
        pairs = api.sample_pairs(["t1", "flair"], n=2, seed=1, device="cpu", weights=folder)
        return [p.mask.array for p in pairs], [np.stack([p.images[m].array for m in ("t1", "flair")]) for p in pairs]

    masks, drawn = sample()
    assert not api.load_models("cpu", folder).one_head_outline
    # a barely trained decoder draws no background: call half of its intensities background instead
    bg = float(np.median(np.stack(drawn))) - api.HEAD_MARGIN_Z
    card["patch"]["background_z"] = bg
    card["sampling"] = {**card.get("sampling", {}), "one_head_outline": True}
    card_path.write_text(json.dumps(card))
    masks_outlined, outlined = sample()
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks_outlined))
    cut = 0
    for mask, raw, out in zip(masks, drawn, outlined):
        head = (out > bg + api.HEAD_MARGIN_Z) | (mask > 0)
        assert np.array_equal(head[0], head[1])  # one outline for both modalities
        common = ((raw > bg + api.HEAD_MARGIN_Z).all(0) | (mask > 0))
        assert np.array_equal(out[:, common], raw[:, common]) and (out[:, ~common] == bg).all()
        cut += int((raw[:, ~common] > bg + api.HEAD_MARGIN_Z).sum())
    assert cut > 0  # the modalities' own outlines differed somewhere


@pytest.mark.parametrize("kwargs", [
    {"modalities": ["t5"]}, {"modalities": []}, {"n": 0}, {"n": -2}, {"n": 1.5}, {"seed": -1},
    {"temperature": 0.0}, {"temperature": "hot"}, {"top_k": 0}, {"modality_guidance": -1.0},
    {"modality_guidance": "strong"}, {"modality_guidance": float("nan")}, {"modality_guidance": {"flair": -1}},
    {"modality_guidance": {"t9": 1.0}}, {"modality_guidance": {"flair": "x"}},
])
def test_sample_pairs_bad_input(weights_env, kwargs):
    args = {"modalities": ["t1c"], "n": 1, "seed": 0, **kwargs}
    with pytest.raises(InputError):
        api.sample_pairs(args.pop("modalities"), **args)


def test_sample_pairs_missing_or_corrupted_weights(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="missing.*pathosyn train-pathar"):
        api.sample_pairs(["t1c"], n=1, seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_weights.glob("pathar_*"):
        (bad / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(bad))
    api.sample_pairs(["t1c"], n=1, seed=0)  # a good copy loads
    blob = bytearray((bad / "pathar_transformer.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (bad / "pathar_transformer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="corrupted"):  # the cached model is not reused for a changed file
        api.sample_pairs(["t1c"], n=1, seed=0)


# --------------------------------------------------------------------------- CLI

def _cli(args, weights: Path):
    env = dict(os.environ, PATHOSYN_WEIGHTS_DIR=str(weights), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripted_models.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_cli_sample_writes_files(tiny_weights, tmp_path):
    from scripted_models.volume import read_volume

    out = tmp_path / "out"
    r = _cli(["sample", "--modality", "t1c", "--modality", "flair", "--n", "2", "--seed", "0", "--out", str(out),
              "--threads", "1", "--progress", "jsonl"], tiny_weights)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "done" and any(e["event"] == "progress" for e in events)
    for i in range(2):
        folder = out / f"sample_{i:03d}"
        assert sorted(p.name for p in folder.iterdir()) == ["done.json", "flair.nii.gz", "mask.nii.gz", "t1c.nii.gz"]
        mask = read_volume(folder / "mask.nii.gz")
        assert mask.array.dtype == np.uint8 and mask.shape == (16, 16, 16)
        assert mask.spacing == (4.0, 4.0, 4.0)
        assert read_volume(folder / "t1c.nii.gz").array.dtype == np.float32


def _folder_bytes(out: Path) -> dict:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.nii.gz"))}


def test_sample_to_folder_interrupted_then_resumed_gives_the_uninterrupted_bytes(tiny_weights, tmp_path):
    """Samples are written as their chunk completes: an interrupted run keeps the finished ones (done.json), and
    --resume keeps those (files untouched), redraws damaged or missing ones, and ends with the bytes of an
    uninterrupted run. Other settings keep nothing."""
    from scripted_models.outputs import DONE
    from scripted_models.pathar.commands import sample_to_folder

    def run(out, resume=False, seed=5, progress=None):
        return sample_to_folder(out, ["t1c", "flair"], 3, seed, resume=resume, progress=progress, chunk=2,
                                device="cpu", weights=tiny_weights)

    whole = tmp_path / "whole"
    assert run(whole)["kept"] == 0
    expected = _folder_bytes(whole)
    assert len(expected) == 9

    class Interrupt(Exception):
        pass

    def stop_in_second_chunk(fraction, message):  # chunks: samples 0-1, sample 2
        if fraction > 0.7:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run(cut, progress=stop_in_second_chunk)
    assert (cut / "sample_001" / DONE).is_file() and not (cut / "sample_002").exists()
    assert run(cut)["kept"] == 0  # without --resume everything is drawn again
    (cut / "sample_002" / DONE).unlink()  # as if killed before its marker
    (cut / "sample_001" / "t1c.nii.gz").write_bytes(b"damaged")  # its chunk is redrawn, sample 0 kept
    first = (cut / "sample_000" / "flair.nii.gz").stat().st_mtime_ns
    result = run(cut, resume=True)
    assert result["kept"] == 1 and len(result["samples"]) == 3
    assert _folder_bytes(cut) == expected
    assert (cut / "sample_000" / "flair.nii.gz").stat().st_mtime_ns == first
    assert run(cut, resume=True)["kept"] == 3
    (cut / "sample_000" / "t2.nii.gz").write_bytes(b"another run's modality")
    assert run(cut, resume=True, seed=6)["kept"] == 0  # other settings: nothing kept
    assert not (cut / "sample_000" / "t2.nii.gz").exists()
    assert _folder_bytes(cut) != expected


def test_cli_output_folder_that_is_a_file_fails_before_any_work(tiny_weights, tmp_path, monkeypatch, capsys):
    from scripted_models import cli

    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tiny_weights))
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    for out in (taken, taken / "inside"):
        assert cli.main(["sample", "--modality", "t1c", "--n", "1", "--out", str(out), "--progress", "none"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "exists and is not a folder" in err[0], err
    assert taken.read_text() == "a user's file"


def test_cli_bad_input_exit_2(tiny_weights, tmp_path):
    out = tmp_path / "out"
    r = _cli(["sample", "--modality", "t5", "--n", "1", "--out", str(out)], tiny_weights)
    assert r.returncode == 2 and "unknown modality" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    r = _cli(["sample", "--modality", "t1", "--n", "1", "--anatomy-from", "t9", "--out", str(out)], tiny_weights)
    assert r.returncode == 2 and "anatomy_from must be one of" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("guidance,ok", [("flair=1,t1c=4", True), ("3", True), ("flair=-1", False),
                                         ("t9=2", False), ("strong", False)])
def test_cli_sample_modality_guidance(tiny_weights, tmp_path, monkeypatch, capsys, guidance, ok):
    """--modality-guidance takes one weight or MOD=W pairs; a bad value is a one-line error, nothing written."""
    from scripted_models import cli

    out = tmp_path / "out"
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tiny_weights))
    code = cli.main(["sample", "--modality", "t1c", "--modality", "flair", "--n", "1", "--out", str(out),
                     "--progress", "none", "--modality-guidance", guidance])
    err = capsys.readouterr().err.strip()
    if ok:
        assert code == 0 and (out / "sample_000" / "flair.nii.gz").is_file(), err
    else:
        assert code == 2 and len(err.splitlines()) == 1 and ("guidance" in err or "modality" in err), err
        assert not out.exists()


@pytest.mark.parametrize("case", ["n0", "missing", "corrupted"])
def test_cli_exit_2_in_process(tiny_weights, tmp_path, monkeypatch, capsys, case):
    from scripted_models import cli

    weights = tiny_weights
    args = ["sample", "--modality", "t1c", "--n", "1", "--out", str(tmp_path / "out"), "--progress", "none"]
    if case == "n0":
        args[4] = "0"
    elif case == "missing":
        weights = tmp_path / "nothing"
    else:
        weights = tmp_path / "copy"
        weights.mkdir()
        for f in tiny_weights.glob("pathar_*"):
            (weights / f.name).write_bytes(f.read_bytes())
        (weights / "pathar_structure_vq.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(weights))
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pathosyn: error:")
    assert not (tmp_path / "out").exists()


def test_cli_train_pathar_rejects_steps_with_all(tmp_path, capsys):
    from scripted_models import cli

    assert cli.main(["train-pathar", "--work", str(tmp_path), "--stage", "all", "--steps", "5"]) == 2
    assert cli.main(["train-pathar", "--work", str(tmp_path), "--elastic-per-case", "-1"]) == 2
    assert "elastic-per-case" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------- quality metrics

def test_quality_metrics_on_synthetic_masks():
    ps = synthetic_patches()
    good = ps.masks[0]
    r = quality.mask_plausibility(good, 4.0, min_voxels=10)
    assert r["plausible"] and r["components"] == 1 and r["tc_attached"] == 1.0
    two = good.copy()
    two[:3, :3, :3] = 2  # a second, separate lesion of similar size in a corner
    two[-4:, -4:, -4:] = 2
    assert quality.mask_plausibility(two, 4.0, min_voxels=10)["main_fraction"] < 1.0
    floating = good.copy()
    floating[0:2, 0:2, 0:2] = 3  # an enhancing blob far from the edema
    assert quality.mask_plausibility(floating, 4.0, min_voxels=10)["tc_attached"] < 1.0
    assert quality.mean_pairwise_dice([good, good]) == 1.0
    assert quality.nearest_dice([good], ps.masks)[0] == pytest.approx(1.0)
    img = ps.images[0].astype(np.float32)
    contrast = quality.subregion_contrast(ps.masks[ps.image_patch[0]], img)
    # modality 0 of the synthetic data: core brighter than healthy tissue, edema darker, enhancing darkest
    assert contrast[1] == pytest.approx(1.0, abs=0.1) and contrast[3] < contrast[2] < 0
    assert quality.ordering_agreement({1: 0, 2: 1, 3: 2}, {1: 0, 2: 1, 3: 2}) == 1.0
    assert quality.ordering_agreement({1: 0, 2: 1, 3: 2}, {1: 2, 2: 1, 3: 0}) == 0.0
    # composition: each lesion's core / edema / enhancing shares, and the error of the means
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, :2] = 1  # 8 core voxels
    a[1] = 2  # 16 edema
    a[2, :2] = 3  # 8 enhancing
    b = np.zeros_like(a)
    b[3] = 2  # edema only
    assert np.allclose(quality.subregion_shares([a, b]), [[0.25, 0.5, 0.25], [0.0, 1.0, 0.0]])
    assert np.allclose(quality.subregion_shares([np.zeros_like(a)]), 0.0)
    assert quality.composition_error([a], [a, a]) == 0.0
    assert quality.composition_error([b], [a]) == pytest.approx((0.25 + 0.5 + 0.25) / 3)


def test_memorisation_reference_is_the_real_poses_and_leave_one_case_out():
    """Samples are scored against the rigid patches only; each real case against the other cases."""
    ps = synthetic_patches(count=6)
    ps.is_elastic = np.array([False, False, True, False, False, False])
    ps.masks[2] = ps.masks[3]  # a deformed copy of case 3 must not count as a "training lesion" pose
    assert list(ps.real_poses(False)) == [0, 1, 3, 4]
    novelty = quality.real_novelty(ps)
    assert set(novelty) == set(ps.case_ids)
    assert novelty["synthetic_3"] < 1.0  # case 3's own copy (patch 2) is elastic, so it is not a reference
    assert quality.memorisation_index(0.7, 0.7, 0.8) == 0.0 and quality.memorisation_index(0.8, 0.7, 0.8) == 1.0
    assert quality.memorisation_index(0.8, 0.7, 0.7) is None
    ps.patch_case = np.array([0, 0, 0, 1, 1, 1])  # two cases: poses 0, 1 of case 0 and 3, 4 of case 1
    ps.masks[1], ps.masks[4] = ps.masks[0], ps.masks[3]  # each case's second pose repeats its first
    assert quality.same_lesion_new_pose(ps, per_case=1) == pytest.approx(1.0)
    ps.masks[4] = ps.masks[4][::-1]  # case 1's pose no longer matches any other pose
    assert quality.same_lesion_new_pose(ps, per_case=1) < 1.0
    best, index = quality.nearest_match([ps.masks[4][..., ::-1]], ps.masks[[0, 4]])
    assert best[0] == pytest.approx(1.0) and index == [1]  # found through the left-right flip


def test_shape_blend_morphs_nested_lesions_and_scores_recombination():
    """The signed-distance blend returns its ends at t = 0 and 1, lies between two concentric lesions, keeps the
    sub-regions nested; blends of identical cases score as copies, of different cases below."""
    zz, yy, xx = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    d = np.sqrt((zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2)

    def ball(radius):
        m = np.zeros(d.shape, np.uint8)
        m[d < radius] = 2
        m[d < 0.6 * radius] = 3
        m[d < 0.3 * radius] = 1
        return m

    small, large = ball(5), ball(10)
    assert np.array_equal(shape_blend(small, large, 0.0), small)
    assert np.array_equal(shape_blend(small, large, 1.0), large)
    half = shape_blend(small, large, 0.5)
    assert (small > 0).sum() < (half > 0).sum() < (large > 0).sum()
    radius = np.cbrt((half > 0).sum() * 3 / (4 * np.pi))
    assert radius == pytest.approx(7.5, abs=0.5)  # half-way between the radii 5 and 10
    tc = (half == 1) | (half == 3)
    assert tc.any() and (half == 3).any() and not (tc & ~(half > 0)).any()
    two_parts = small.copy()
    two_parts[:3, :3, :3] = 2  # a far-away blob does not survive: one main component
    assert quality.mask_plausibility(shape_blend(two_parts, small, 0.5), 2.0, min_voxels=10)["components"] == 1

    ps = synthetic_patches(count=6)
    ps.masks[:] = ps.masks[0]  # every case has the same lesion: a blend is a copy
    assert quality.two_lesion_blend(ps, per_case=2) == pytest.approx(1.0)
    ps = synthetic_patches(count=6)
    assert 0.0 < quality.two_lesion_blend(ps, per_case=2) < 1.0


def test_shape_blend_in_the_lesions_box_equals_the_blend_on_the_whole_patch():
    """shape_blend computes its distances only in the two lesions' box (plus one voxel): the same labels as on the
    whole patch, also for lesions touching the patch's edge and for sub-regions one lesion lacks."""
    from scipy import ndimage

    from scripted_models.labels import CORE, EDEMA, ENHANCING
    from scripted_models.preprocess import largest_component

    def whole_patch_blend(a, b, t, spacing):
        def sd(region):
            if not region.any():
                return np.full(region.shape, spacing * float(np.linalg.norm(region.shape)), np.float32)
            return (ndimage.distance_transform_edt(~region, sampling=spacing)
                    - ndimage.distance_transform_edt(region, sampling=spacing)).astype(np.float32)

        def blended(level):
            return (1 - t) * sd(level(a)) + t * sd(level(b))

        whole = largest_component(blended(lambda m: m > 0) < 0)
        tc = whole & (blended(lambda m: (m == CORE) | (m == ENHANCING)) < 0)
        enhancing = tc & (blended(lambda m: m == ENHANCING) < blended(lambda m: m == CORE))
        out = np.zeros(a.shape, np.uint8)
        out[whole], out[tc], out[enhancing] = EDEMA, CORE, ENHANCING
        return out

    rng = np.random.default_rng(3)
    grid = np.indices((24, 24, 24)).astype(np.float32)

    def lesion(centre, radius, parts):
        d = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0))
        m = np.zeros(d.shape, np.uint8)
        m[d < radius] = EDEMA
        for label, share in parts:
            m[d < share * radius] = label
        return m

    cases = [(lesion((12, 12, 12), 5, [(ENHANCING, 0.6), (CORE, 0.3)]), lesion((10, 14, 13), 8, [(CORE, 0.4)])),
             (lesion((2, 3, 12), 6, [(ENHANCING, 0.5)]), lesion((20, 21, 22), 5, [])),  # at the edges; no TC in b
             (lesion((12, 12, 1), 9, [(CORE, 0.5), (ENHANCING, 0.3)]), np.zeros((24, 24, 24), np.uint8))]
    for a, b in cases:
        for t in (0.0, 0.1, float(rng.uniform(0.2, 0.8)), 1.0):  # 0.1: an empty level of b still counts
            assert np.array_equal(shape_blend(a, b, t, 2.0), whole_patch_blend(a, b, t, 2.0)), t
    assert not shape_blend(np.zeros_like(a), np.zeros_like(a), 0.5).any()


def test_blends_are_structure_only_patches_between_two_training_lesions():
    """Blends join the patch set flagged, without images: never a memorisation reference, never drawn for the
    appearance VQ, and their (dummy) appearance tokens do not reach the transformer's loss."""
    from scripted_models.pathar.data import blend_patches, image_batch
    from scripted_models.pathar.tokenizer import dice

    ps = synthetic_patches(count=6)
    poses = ps.real_poses(False)
    blends, first = blend_patches(ps.masks, poses, ps.patch_case[poses], 2, 4.0, (0.3, 0.7),
                                  np.random.default_rng(0))
    assert len(blends) == 2 * len(np.unique(ps.patch_case[poses])) and sorted(set(first)) == sorted(set(poses))
    again, _ = blend_patches(ps.masks, poses, ps.patch_case[poses], 2, 4.0, (0.3, 0.7), np.random.default_rng(0))
    assert np.array_equal(again, blends)
    assert all(quality.mask_plausibility(blend, 4.0, min_voxels=10)["plausible"] for blend in blends)
    overlap = [dice(blend > 0, ps.masks[case] > 0) for blend, case in zip(blends, first)]
    assert np.mean(np.array(overlap) < 1.0) > 0.5  # mostly not a copy of its first lesion (tiny balls may be)
    n = len(blends)
    ps = PatchSet(np.concatenate([ps.masks, blends]), np.concatenate([ps.patch_case, first]),
                  np.r_[ps.is_val, np.zeros(n, bool)], ps.images, ps.image_patch, ps.image_modality, ps.case_ids,
                  ps.config, None, np.r_[np.zeros(6, bool), np.ones(n, bool)])
    assert list(ps.real_poses(False)) == list(poses) and list(ps.imaged_patches(False)) == list(poses)
    _, masks, _ = image_batch(ps, np.random.default_rng(0), 64)
    assert all(any(np.array_equal(m, ps.masks[p]) or np.array_equal(m, ps.masks[p][..., ::-1]) for p in poses)
               for m in masks)  # every image row is a real patch, never a blend
    assert "blend_per_case" not in PatchConfig().to_dict()  # configs without blends keep their cache key
    cfg = PatchConfig(blend_per_case=3)
    assert PatchConfig.from_dict(cfg.to_dict()) == cfg

    model = tiny_iar()
    s, a, mod = random_tokens(model, batch=4)
    rows = torch.tensor([True, False, True, False])
    with torch.no_grad():
        total, loss_s, loss_a = model.loss(s, a, mod, rows)
        other = a.clone()
        other[~rows] = (other[~rows] + 1) % model.cfg.appearance_vocab  # change only the structure-only rows
        assert torch.equal(model.loss(s, other, mod, rows)[2], loss_a)
        assert torch.equal(model.loss(s, a, mod, torch.ones(4, dtype=torch.bool))[0], model.loss(s, a, mod)[0])
        assert torch.equal(model.loss(s[rows], a[rows], mod[rows])[2], loss_a)
        assert model.loss(s, a, mod, torch.zeros(4, dtype=torch.bool))[2] == 0


def test_cli_blend_per_case_maps_onto_the_config(tmp_path, capsys):
    import argparse

    from scripted_models import cli
    from scripted_models.pathar.commands import add_arguments
    from scripted_models.pathar.train import model_config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert model_config_from_args(parser.parse_args([])).patch.blend_per_case == 0
    assert model_config_from_args(parser.parse_args(["--blend-per-case", "5"])).patch.blend_per_case == 5
    assert cli.main(["train-pathar", "--work", str(tmp_path), "--blend-per-case", "-1"]) == 2
    assert "blend-per-case" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_transformer_lr_maps_onto_the_config(tmp_path, capsys):
    import argparse

    from scripted_models import cli
    from scripted_models.pathar.commands import add_arguments
    from scripted_models.pathar.train import TrainConfig, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).transformer_lr == TrainConfig().transformer_lr
    assert config_from_args(parser.parse_args(["--transformer-lr", "2e-4"])).transformer_lr == 2e-4
    assert cli.main(["train-pathar", "--work", str(tmp_path), "--transformer-lr", "0"]) == 2
    assert "transformer-lr" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_elastic_patches_are_new_shapes_of_the_same_lesion(data_root):
    """Elastic patches come after the rigid ones without changing them, deform mask and images alike, and keep
    the lesion plausible."""
    from scripted_models.pathar.data import case_patches
    from scripted_models.pathar.tokenizer import dice

    folder = data_root / "cases" / "tcga_du_7294"
    rigid_only, _ = case_patches(folder, PatchConfig(size=32, spacing_mm=4.0), 2, np.random.default_rng(0))
    cfg = PatchConfig(size=32, spacing_mm=4.0, elastic_per_case=2, elastic_mm=8.0)
    masks, images = case_patches(folder, cfg, 2, np.random.default_rng(0), 2, np.random.default_rng(5))
    assert masks.shape == (4, 32, 32, 32) and np.array_equal(masks[:2], rigid_only)
    for k in (2, 3):
        overlap = dice(masks[k] > 0, masks[0] > 0)
        assert 0.3 < overlap < 0.98  # a different shape of the same lesion
        assert quality.mask_plausibility(masks[k], cfg.spacing_mm)["plausible"]
        flair = images["flair"][k].astype(np.float32)
        assert flair[masks[k] == 2].mean() > flair[masks[k] == 0].mean() + 0.5  # edema still bright: aligned
    again, _ = case_patches(folder, cfg, 2, np.random.default_rng(0), 2, np.random.default_rng(5))
    assert np.array_equal(again, masks)


def test_real_case_patch_geometry(data_root):
    """One real labelled case: a lesion-centred patch on an identity-direction grid."""
    from scripted_models.pathar.data import case_patches

    cfg = PatchConfig(size=32, spacing_mm=4.0)
    masks, images = case_patches(data_root / "cases" / "tcga_du_7294", cfg, 2, np.random.default_rng(0))
    assert masks.shape == (2, 32, 32, 32) and set(images) == set(MODALITIES)
    lesion = np.argwhere(masks[0] > 0)
    assert len(lesion) > 50
    centre = (lesion.min(0) + lesion.max(0)) / 2
    assert np.all(np.abs(centre - 15.5) <= 2)  # the un-augmented patch is centred on the lesion
    assert images["flair"].dtype == np.float16
    assert images["flair"][0][masks[0] == 2].mean() > images["flair"][0][masks[0] == 0].mean()


def test_fold_split_holds_out_validation_and_leaves_the_test_fold_out(data_root):
    """split="folds": validation fold held out, test fold absent from training sets (added, flagged, only with_test),
    lesion masks join training as structure-only cases; the earlier split keeps its cache key."""
    from scripted_models.folds import make_folds
    from scripted_models.pathar.data import MASK_PREFIX, cache_path, patch_sources

    folds = make_folds(str(data_root))
    cfg = PatchConfig(split="folds", lesion_masks=True)
    sources = patch_sources(cfg, data_root)
    roles = {case: role for case, _, role in sources}
    assert not set(folds.test) & set(roles)
    assert {c for c, r in roles.items() if r == "val"} == set(folds.validation)
    masks = [c for c in roles if c.startswith(MASK_PREFIX)]
    assert len(masks) >= 10 and all(roles[c] == "train" for c in masks)
    with_test = {case: role for case, _, role in patch_sources(PatchConfig(split="folds", with_test=True), data_root)}
    assert {c for c, r in with_test.items() if r == "test"} == set(folds.test)
    assert not any(c.startswith(MASK_PREFIX) for c in with_test)
    assert set(PatchConfig().to_dict()) == set(PatchConfig(split="validation_case").to_dict())
    assert "split" not in PatchConfig().to_dict() and PatchConfig.from_dict(cfg.to_dict()) == cfg
    assert cache_path(Path("w"), cfg, sources) != cache_path(Path("w"), PatchConfig(split="folds"), sources)
    with pytest.raises(InputError, match="split"):
        patch_sources(PatchConfig(split="random"), data_root)


def test_lesion_mask_rows_are_structure_only_real_lesions(data_root):
    """A mask without a scan gives lesion-centred masks and no images; in a patch set it is a real pose (a
    memorisation reference) drawn for structure only, never for appearance."""
    from scripted_models.pathar.data import image_batch, mask_patches

    path = sorted((data_root / "lesion_masks").glob("*.nii.gz"))[0]
    cfg = PatchConfig(size=16, spacing_mm=8.0)
    masks, images = mask_patches(path, cfg, 3, np.random.default_rng(0))
    assert masks.shape == (3, 16, 16, 16) and images == {}
    lesion = np.argwhere(masks[0] > 0)
    assert len(lesion) > 20 and np.all(np.abs((lesion.min(0) + lesion.max(0)) / 2 - 7.5) <= 1.5)
    assert set(np.unique(masks)) <= {0, 1, 2, 3}
    ps = synthetic_patches(count=4)
    n = len(masks)
    ps = PatchSet(np.concatenate([ps.masks, masks]), np.r_[ps.patch_case, [len(ps.case_ids)] * n],
                  np.r_[ps.is_val, np.zeros(n, bool)], ps.images, ps.image_patch, ps.image_modality,
                  ps.case_ids + ["mask:x"], ps.config)
    extra = np.arange(4, 4 + n)
    assert set(extra) <= set(ps.real_poses(False)) and set(extra) == set(ps.structure_only_patches(False))
    assert not set(extra) & set(ps.imaged_patches(False))
    _, drawn, _ = image_batch(ps, np.random.default_rng(0), 32)
    assert not any(np.array_equal(m, x) or np.array_equal(m, x[..., ::-1]) for m in drawn for x in masks)


def synthetic_cystic_lesion(shape=(48, 48, 48)):
    """z-scored t1c/t2/flair of a sphere cyst (r 6) with an enhancing rim (r 6-8) inside edema (r 8-13)."""
    zz, yy, xx = np.indices(shape)
    r = np.sqrt((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2)
    truth = np.where(r <= 6, 1, np.where(r <= 8, 3, np.where(r <= 13, 2, 0))).astype(np.uint8)
    rng = np.random.default_rng(0)
    values = {"t1c": (0.0, -1.5, 0.3, 2.5), "t2": (0.0, 3.0, 1.0, 0.5), "flair": (0.0, 0.5, 2.5, 1.5)}
    images = {m: np.choose(truth, v).astype(np.float32) + rng.normal(0, 0.2, shape).astype(np.float32)
              for m, v in values.items()}
    brain = r <= 22
    return images, brain, truth


def test_cystic_lesion_rule_recovers_a_synthetic_lesion():
    from scripted_models.pathar.pseudo_labels import cystic_lesion_labels
    from scripted_models.pathar.tokenizer import dice

    images, brain, truth = synthetic_cystic_lesion()
    labels = cystic_lesion_labels(images, brain, (1.0, 1.0, 1.0))
    for c, least in ((1, 0.85), (3, 0.6), (2, 0.85)):
        assert dice(labels == c, truth == c) > least, c
    assert dice(labels > 0, truth > 0) > 0.9
    assert quality.mask_plausibility(labels, 1.0)["plausible"]


def test_cystic_lesion_rule_refuses_what_it_cannot_label():
    from scripted_models.pathar.pseudo_labels import cystic_lesion_labels

    images, brain, _ = synthetic_cystic_lesion()
    with pytest.raises(InputError, match="missing t2"):
        cystic_lesion_labels({m: v for m, v in images.items() if m != "t2"}, brain, (1.0, 1.0, 1.0))
    flat = {m: np.zeros_like(v) for m, v in images.items()}
    with pytest.raises(InputError, match="no flair-bright lesion"):
        cystic_lesion_labels(flat, brain, (1.0, 1.0, 1.0))
    no_cyst = {**images, "t2": np.zeros_like(images["t2"])}
    with pytest.raises(InputError, match="no cyst"):
        cystic_lesion_labels(no_cyst, brain, (1.0, 1.0, 1.0))


def test_pseudo_labelled_case_is_opt_in_and_looks_like_a_cystic_metastasis(data_root):
    """aurora_met_unlabelled joins the patch set only when named; its rule-based labels are plausible, and
    each sub-region has the contrast that defines it."""
    from scripted_models.pathar.data import labelled_cases, load_labelled_case
    from scripted_models.pathar.pseudo_labels import PSEUDO_LABELLED

    case_id = PSEUDO_LABELLED[0]
    assert case_id not in [f.name for f in labelled_cases(data_root)]
    folders = labelled_cases(data_root, pseudo_labelled=PSEUDO_LABELLED)
    assert case_id in [f.name for f in folders] and len(folders) == len(labelled_cases(data_root)) + 1
    assert "pseudo_labelled" not in PatchConfig().to_dict()  # configs without it keep their cache key
    import argparse

    from scripted_models.pathar.commands import add_arguments
    from scripted_models.pathar.train import model_config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert model_config_from_args(parser.parse_args([])).patch.pseudo_labelled == ()
    assert model_config_from_args(parser.parse_args(["--pseudo-labels"])).patch.pseudo_labelled == PSEUDO_LABELLED
    case = load_labelled_case(data_root / "cases" / case_id, PatchConfig(pseudo_labelled=PSEUDO_LABELLED))
    report = quality.mask_plausibility(case.seg, 1.0)
    assert report["plausible"] and report["components"] == 1 and 40 < report["volume_ml"] < 200
    z, brain = case.normalized(), case.foreground()
    mean = {m: {c: float(z[m][(case.seg == c) & brain].mean()) for c in (0, 1, 2, 3)} for m in ("t1c", "t2", "flair")}
    assert mean["t1c"][3] > mean["t1c"][0] + 0.5 > mean["t1c"][1] + 0.5  # enhancing rim, dark cyst
    assert mean["t2"][1] > mean["t2"][2] > mean["t2"][0]  # fluid brightest on t2, then edema
    assert mean["flair"][2] > mean["flair"][0] + 1.0  # edema bright on flair


# --------------------------------------------------------------------------- bundled weights

def test_bundled_weights_sample(monkeypatch):
    monkeypatch.delenv("PATHOSYN_WEIGHTS_DIR", raising=False)
    pairs = api.sample_pairs(list(MODALITIES), n=1, seed=0, device="cpu")
    mask = pairs[0].mask.array
    assert mask.shape == (64, 64, 64) and (mask > 0).sum() > 100
    assert set(pairs[0].images) == set(MODALITIES)
    assert all(np.isfinite(v.array).all() for v in pairs[0].images.values())


def test_bundled_weights_shared_anatomy_gives_every_modality_one_head(monkeypatch):
    """Independent modality rows draw each modality its own head and brain; the bundled default draws flair first
    and lets the other modalities follow it (guided only in the lesion), so the foregrounds agree better (validation
    fold: 0.62-0.68 independent, 0.93 following; real 0.99); the card's one_head_outline then makes them one."""
    monkeypatch.delenv("PATHOSYN_WEIGHTS_DIR", raising=False)

    def foreground_dice(anatomy_from):  # outside the lesion
        pair = api.sample_pairs(["t1c", "flair"], n=1, seed=0, device="cpu", anatomy_from=anatomy_from)[0]
        a, b = (pair.images[m].array > -4.0 + api.HEAD_MARGIN_Z for m in ("t1c", "flair"))
        a, b = (x | (pair.mask.array > 0) for x in (a, b))
        return 2.0 * (a & b).sum() / (a.sum() + b.sum())

    model = api.load_models("cpu")
    assert model.background_z == -4.0
    assert model.anatomy_from == "flair" and model.one_head_outline
    assert foreground_dice("card") == foreground_dice("none") == 1.0
    monkeypatch.setattr(api, "one_head_outline", lambda images, masks, background_z: images)  # the drawing itself
    assert foreground_dice("card") > 0.9
    assert foreground_dice("none") < 0.8



def test_bundled_cross_modal_refinement_corrects_flair_from_the_other_modalities(monkeypatch):
    """The bundled appearance VQ refines the decoded modalities of a sample together: the flair anchor's tokens are
    the same whether it is sampled alone or with the others, yet inside the lesion (where the head outline changes
    nothing) its image differs with the others present, by a correction, not a new image."""
    monkeypatch.delenv("PATHOSYN_WEIGHTS_DIR", raising=False)
    assert api.load_models("cpu").appearance.joint is not None
    together = api.sample_pairs(list(MODALITIES), n=1, seed=0, device="cpu")[0]
    alone = api.sample_pairs(["flair"], n=1, seed=0, device="cpu")[0]
    assert np.array_equal(together.mask.array, alone.mask.array)
    lesion = together.mask.array > 0
    change = np.abs(together.images["flair"].array - alone.images["flair"].array)[lesion]
    assert 0.01 < change.mean() < 0.5, change.mean()

def test_warm_start_keeps_old_predictions_and_checks_the_tokenizers(tmp_path):
    """A transformer without the per-slot modality embedding warm-starts one with it: the new layer starts at
    zero, so the logits are unchanged. Weights trained on another structure VQ are refused; with another
    appearance VQ the structure stream is reused and the appearance codes' embeddings and head start afresh."""
    from scripted_models.errors import WeightsError
    from scripted_models.pathar.api import TRANSFORMER_NAME
    from scripted_models.pathar.train import warm_start_transformer
    from scripted_models.weights import save_state

    old = tiny_iar(modality_embedding=False)
    s_card, a_card = {"model": "s", "sha256": "aa"}, {"model": "a", "sha256": "bb"}
    save_state(TRANSFORMER_NAME, old.state_dict(), {"structure_vq": {"sha256": "aa"}, "appearance_vq": {"sha256": "bb"},
                                                    "steps": 5}, tmp_path)
    new = tiny_iar(seed=3, modality_embedding=True)
    info = warm_start_transformer(new, tmp_path, s_card, a_card)
    assert info["new_layers"] == ["wme.weight"] and not new.wme.weight.any()
    s, a, mod = random_tokens(old)
    with torch.no_grad():
        for x, y in zip(old(s, a, mod), new.eval()(s, a, mod)):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    with pytest.raises(WeightsError, match="different"):
        warm_start_transformer(tiny_iar(modality_embedding=True), tmp_path, {"model": "s", "sha256": "zz"}, a_card)
    fresh = tiny_iar(seed=4, modality_embedding=False)
    fresh_head = fresh.head_a.weight.detach().clone()
    info = warm_start_transformer(fresh, tmp_path, s_card, {"model": "a", "sha256": "cc"})
    assert info["reinitialised"] and torch.equal(fresh.head_a.weight, fresh_head)
    vocab = old.cfg.appearance_vocab
    assert torch.equal(fresh.wae.weight[vocab:], old.wae.weight[vocab:])  # the modality labels are kept
    assert not torch.equal(fresh.wae.weight[:vocab], old.wae.weight[:vocab])
    with torch.no_grad():
        torch.testing.assert_close(old(s, a, mod)[0], fresh.eval()(s, a, mod)[0], atol=1e-6, rtol=0)  # structure
        assert not torch.allclose(old(s, a, mod)[1], fresh(s, a, mod)[1])


def test_adversarial_decoder_fine_tune_trains_a_discriminator_resumes_and_keeps_tokens(tiny_weights, tmp_path):
    """--decoder-adversarial-weight: a conditional patch discriminator joins the decoder fine-tune. It trains
    alone first, then its loss reaches the decoder with an adaptive weight; it is checkpointed with the decoder
    (resume continues it) but not saved in the weights, and the tokens stay the same."""
    from scripted_models.pathar import train as T

    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    before_state, before_card = load_state(api.APPEARANCE_NAME, folder)
    ps, cfg = synthetic_patches(), tiny_config()
    tc = T.TrainConfig(decoder_steps=2, vq_batch=2, save_every=1, log_every=1, decoder_refine_channels=4,
                       decoder_adversarial_weight=0.5, decoder_discriminator_channels=4,
                       decoder_adversarial_start=0.5)
    work = tmp_path / "work"
    T.train_appearance_decoder(ps, cfg, tc, work, folder, torch.device("cpu"))
    checkpoint = torch.load(work / "appearance_decoder_adversarial" / "checkpoint.pt", weights_only=True)
    critic_state = {k: v for k, v in checkpoint["model"].items() if k.startswith("discriminator.")}
    assert critic_state and checkpoint["step"] == 2
    log_file = work / "appearance_decoder_adversarial" / "loss.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert log[0]["adversarial_weight"] == 0.0 and log[1]["adversarial_weight"] > 0  # warm-up, then on
    assert all(r["discriminator"] > 0 for r in log)
    tc.decoder_steps = 3  # resume: the discriminator continues from its checkpoint
    T.train_appearance_decoder(ps, cfg, tc, work, folder, torch.device("cpu"))
    resumed = torch.load(work / "appearance_decoder_adversarial" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 3
    assert any(not torch.equal(resumed["model"][k], v) for k, v in critic_state.items())
    after_state, after_card = load_state(api.APPEARANCE_NAME, folder)
    assert not any(k.startswith("discriminator") for k in after_state)
    assert after_card["decoder_finetunes"][-1]["adversarial"]["weight"] == 0.5
    same_tokens_after(ps, folder, before_state, before_card)


def test_training_lesions_scored_as_samples_show_where_real_cases_disagree_with_the_test_fold():
    """The reference row of the test-fold report: training lesions pooled like a seed's samples; a sub-region whose
    sign differs between cases shows as a share below 1, and an ordering the test fold reverses as 0."""
    from types import SimpleNamespace

    from scripted_models.pathar.quality import clear_cells
    from scripted_models.pathar.test_fold import (
        compare_contrasts,
        patch_contrasts,
        test_fold_case_contrasts,
        training_lesions_as_samples,
    )

    mask = np.zeros((12, 12, 12), np.int64)
    mask[2:5, 2:8, 2:8], mask[5:8, 2:8, 2:8], mask[8:11, 2:8, 2:8] = 1, 2, 3
    levels = {  # per case (2 training, 1 test): t1 contrast of core / edema / enhancing over healthy tissue 0
        0: (-1.0, 0.5, 2.0), 1: (-1.0, -0.2, 1.0), 2: (-1.0, 0.3, 0.1)}
    images, image_patch, image_modality = [], [], []
    for case, (core, edema, enh) in levels.items():
        image = np.zeros(mask.shape, np.float32)
        image[mask == 1], image[mask == 2], image[mask == 3] = core, edema, enh
        images.append(image)
        image_patch.append(case)
        image_modality.append(MODALITIES.index("t1"))
    patches = SimpleNamespace(
        masks=np.stack([mask] * 3), images=np.stack(images), image_patch=np.array(image_patch),
        image_modality=np.array(image_modality), patch_case=np.array([0, 1, 2]),
        is_val=np.array([False, False, True]), is_test=np.array([False, False, True]),
        is_elastic=np.zeros(3, bool), is_blend=np.zeros(3, bool))
    real = patch_contrasts(patches, [2])
    assert real["t1"] == pytest.approx({1: -1.0, 2: 0.3, 3: 0.1}) and real["flair"] == {}
    reference = training_lesions_as_samples(patches, real)
    assert reference["cases_with_the_test_sign"] == {"t1 necrotic or non-enhancing core": 1.0, "t1 edema": 0.5,
                                                     "t1 enhancing tumour": 1.0}
    # pooled training lesions: core -1.0, edema 0.15, enhancing 1.5 -> signs agree; enhancing > edema reverses the
    # test fold's edema > enhancing, so one of three pairs is out of order
    assert reference["signs_agree"] == 3 and reference["ordering"]["t1"] == pytest.approx(2 / 3)
    assert reference["contrast_error"] == pytest.approx((0.0 + 0.15 + 1.4) / 3, abs=1e-3)
    flipped = compare_contrasts({"t1": {1: 1.0, 2: -0.3, 3: -0.1}}, real)
    assert flipped["signs_agree"] == 0 and flipped["ordering"]["t1"] == 0.0
    assert clear_cells(test_fold_case_contrasts(patches)) == set()  # one test case: no interval, no cell is clear
    assert training_lesions_as_samples(patches, real, {("t1", 1)})["signs_agree_clear"] == 1
    # the same report against the validation fold (a patch set built without the test fold): its cases are held out
    from scripted_models.pathar.test_fold import held_out_mask

    assert held_out_mask(patches).tolist() == [False, False, True]
    validation = SimpleNamespace(**{**vars(patches), "is_test": np.zeros(3, bool),
                                    "is_val": np.array([False, True, False])})
    assert held_out_mask(validation).tolist() == [False, True, False]
    assert patch_contrasts(validation, np.nonzero(held_out_mask(validation))[0])["t1"] == pytest.approx(
        {1: -1.0, 2: -0.2, 3: 1.0})


def test_guidance_sweep_scores_the_validation_fold_and_never_the_test_fold(monkeypatch, tmp_path):
    """reference_patches(held_out="validation") keeps the validation fold's cases (unseen by the model) and builds
    without the test fold; held_out="test" keeps the test fold and drops the validation fold. validation_lesions
    skips test patches, which a patch set built with the test fold also flags is_val (the sweeps of sessions 18-26
    read the test fold's lesions through that flag)."""
    from types import SimpleNamespace

    from scripted_models.pathar import data as data_module
    from scripted_models.pathar.api import TRANSFORMER_NAME
    from scripted_models.pathar.guidance_sweep import validation_lesions
    from scripted_models.pathar.test_fold import reference_patches

    built = []
    monkeypatch.setattr(data_module, "patch_sources", lambda cfg, root=None: [
        ("train_a", tmp_path, "train"), ("train_unseen", tmp_path, "train"), ("val_b", tmp_path, "val")]
        + ([("test_c", tmp_path, "test")] if cfg.with_test else []))
    monkeypatch.setattr(data_module, "build_patches", lambda work, cfg, root=None, verbose=True: built.append(cfg))
    cards = {TRANSFORMER_NAME: {"patch": PatchConfig().to_dict(), "data": ["train_a:flair"]}}
    reference_patches(cards, tmp_path, held_out="validation")
    reference_patches(cards, tmp_path)
    assert not built[0].with_test and built[0].exclude == ("train_unseen",)
    assert built[1].with_test and built[1].exclude == ("train_unseen", "val_b")
    with pytest.raises(ValueError, match="held_out"):
        reference_patches(cards, tmp_path, held_out="train")

    mask = np.ones((4, 4, 4), np.int64)
    patches = SimpleNamespace(plain_patches=lambda: np.array([0, 1, 2]), is_val=np.array([False, True, True]),
                              is_test=np.array([False, False, True]), image_patch=np.array([0, 1, 2]),
                              image_modality=np.array([0, 0, 0]), masks=np.stack([mask * 1, mask * 2, mask * 3]),
                              images=np.zeros((3, 4, 4, 4), np.float32))
    rows = validation_lesions(patches)
    assert len(rows) == 1 and (rows[0][0] == 2).all()
