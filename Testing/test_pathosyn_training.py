"""PathoSyn deviation training: EMA and learning-rate schedule, variant targets, resumable training and
the equal-budget ablation models running through the same synthesis pipeline.

The training runs use a synthetic lesion cache (no shared data, no anatomy model) and a few steps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_ball_mask, make_head

from scripted_models.pathosyn.api import BLEND_MARGIN_MM
from scripted_models.preprocess import dilate_mm


def test_ema_warms_up_then_follows_slowly():
    from scripted_models.pathosyn.training import EMA

    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.999)
    torch.nn.init.ones_(net.weight)
    ema.update(net, updates=0)  # warm-up decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    ema.update(net)  # full decay
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9 + 0.1 * 0.001))


def test_cosine_lr_decays_from_peak_to_floor():
    from scripted_models.pathosyn.training import cosine_lr

    assert cosine_lr(100, 100, 200, 1e-3) == pytest.approx(1e-3)
    assert cosine_lr(150, 100, 200, 1e-3) == pytest.approx(0.55e-3)
    assert cosine_lr(200, 100, 200, 1e-3) == pytest.approx(1e-4)
    assert cosine_lr(500, 100, 200, 1e-3) == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def lesion_cache(tmp_path_factory):
    """Two fake cache entries in the layout prepare_lesion_cache writes."""
    folder = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        shape = (24, 24, 24)
        labels = np.zeros(shape, np.uint8)
        labels[8:16, 8:16, 8:16] = 2
        labels[10:14, 10:14, 10:14] = 3
        residual = np.zeros((4,) + shape, np.float32)
        residual[:, labels > 0] = 1.5
        avail = np.array([1, 1, 0, 1 - k], np.float32)
        path = folder / f"fake{k}.npz"
        np.savez(path, anatomy=rng.normal(0, 1, (4,) + shape).astype(np.float32), residual=residual,
                 labels=labels, weight=(labels > 0).astype(np.float32), available=avail)
        paths.append(path)
    return paths


@pytest.mark.parametrize("variant", ["pathosyn", "holistic", "mask_only"])
def test_variant_targets_and_conditions(lesion_cache, variant):
    from scripted_models.labels import MODALITIES
    from scripted_models.pathosyn.deviation import NULL_CONDITION, variant_config
    from scripted_models.pathosyn.train_deviation import LesionCrops

    crops = LesionCrops(lesion_cache, variant_config(variant))
    rng = np.random.default_rng(3)
    n_mod = len(MODALITIES)
    seen = 0
    for _ in range(20):
        cond, target, avail = crops.sample(rng, 16)
        if (cond == NULL_CONDITION).all():
            continue  # condition dropout
        seen += 1
        anatomy = cond[:n_mod]
        lesion = cond[2 * n_mod + 3] > 0  # whole-lesion channel
        if variant == "mask_only":
            assert not anatomy.any()
        else:
            assert np.abs(anatomy[avail > 0]).sum() > 0
        residual_part = target if variant == "pathosyn" else target - anatomy
        if variant != "mask_only":  # the target minus anatomy is the residual: 0 outside, > 0 inside
            for c in np.flatnonzero(avail):
                assert np.allclose(residual_part[c][~lesion], 0, atol=1e-5)
                if lesion.any():
                    assert residual_part[c][lesion].min() > 1.0
        assert not target[avail == 0].any()
    assert seen > 10


def _train(monkeypatch, lesion_cache, work, out, variant, steps):
    from scripted_models.pathosyn import train_deviation as T

    monkeypatch.setattr(T, "prepare_lesion_cache", lambda cache, data_root=None: lesion_cache)
    return T.train_deviation(work, steps=steps, batch=1, crop=16, save_every=2, out_dir=out, threads=2,
                             variant=variant, from_scratch=True)


def test_ablation_training_resumes_and_synthesizes_through_the_same_pipeline(monkeypatch, lesion_cache, tmp_path):
    from scripted_models.pathosyn.api import synthesize_lesion
    from scripted_models.weights import load_card

    out = tmp_path / "holistic"
    _train(monkeypatch, lesion_cache, tmp_path / "work", out, "holistic", steps=3)
    card = load_card("deviation_diffusion", out)
    assert card["steps"] == 3 and card["variant"] == "holistic"  # from scratch, not the bundled model
    assert card["config"]["target"] == "image" and card["config"]["anatomy_condition"] is True
    _train(monkeypatch, lesion_cache, tmp_path / "work", out, "holistic", steps=5)  # resumes the checkpoint
    assert load_card("deviation_diffusion", out)["steps"] == 5
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and "ema" in state and json.loads(state["extra"])["start_step"] == 0

    head = make_head()
    mask = make_ball_mask(head)
    result = synthesize_lesion({"t1": head}, mask, seed=0, steps=2, deviation_weights=out)
    assert result.report["variant"] == "holistic"
    region = dilate_mm(result.mask.array > 0, BLEND_MARGIN_MM, tuple(reversed(head.spacing)))
    out_img = result.images["t1"].array
    assert np.array_equal(out_img[~region], head.array[~region])
    assert np.abs(out_img[region].astype(float) - head.array[region]).max() > 0
    bundled = synthesize_lesion({"t1": head}, mask, seed=0, steps=2)
    assert bundled.report["variant"] == "pathosyn"
    assert not np.array_equal(bundled.images["t1"].array, out_img)
