"""PathoSyn deviation training: EMA and learning-rate schedule, variant targets, resumable training and
the equal-budget ablation models running through the same synthesis pipeline.

The training runs use a synthetic lesion cache (no shared data, no anatomy model) and a few steps."""
from __future__ import annotations

import json
from dataclasses import replace

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

    crops = LesionCrops(lesion_cache, replace(variant_config(variant), residual_smoothing=0.0))  # exact targets
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


def test_residual_smoothing_removes_voxel_noise_and_keeps_the_lesion_signal(tmp_path):
    from scipy.ndimage import laplace

    from scripted_models.pathosyn.deviation import RESIDUAL_SMOOTHING, variant_config
    from scripted_models.pathosyn.train_deviation import smooth_residual

    assert all(variant_config(v).residual_smoothing == RESIDUAL_SMOOTHING > 0
               for v in ("pathosyn", "holistic", "mask_only"))
    rng = np.random.default_rng(0)
    residual = np.zeros((4, 24, 24, 24), np.float32)
    residual[:, 6:18, 6:18, 6:18] = 1.5 + rng.normal(0, 0.5, (4, 12, 12, 12))  # lesion signal + scan noise
    raw = {"residual": residual.copy()}
    smooth = smooth_residual({"residual": residual.copy()}, RESIDUAL_SMOOTHING)["residual"]
    assert np.array_equal(smooth_residual(raw, 0.0)["residual"], residual)  # 0 = untouched
    inner = (slice(None), slice(8, 16), slice(8, 16), slice(8, 16))
    assert abs(smooth[inner].mean() - residual[inner].mean()) < 0.05  # the lesion's mean deviation stays
    assert abs(smooth.sum() - residual.sum()) / residual.sum() < 1e-3  # mass conserved
    assert laplace(smooth[0])[inner[1:]].std() < 0.5 * laplace(residual[0])[inner[1:]].std()  # voxel noise removed
    far = np.ones((24, 24, 24), bool)
    far[3:21, 3:21, 3:21] = False
    assert np.abs(smooth[:, far]).max() < 1e-3  # no leak beyond a few voxels


def test_textured_hole_adds_scan_texture_only_inside_the_lesion_region():
    from scipy.ndimage import laplace

    from scripted_models.pathosyn.train_deviation import textured_hole

    rng = np.random.default_rng(1)
    anatomy = rng.normal(0, 0.3, (4, 24, 24, 24)).astype(np.float32)
    weight = np.zeros((24, 24, 24), np.float32)
    weight[8:16, 8:16, 8:16] = 1.0
    anatomy[:, weight > 0] = 0.7  # inpainted: smooth inside
    anatomy[3] = 0.0  # unavailable channel
    out = textured_hole(anatomy, weight, rng)
    assert np.array_equal(out[:, weight == 0], anatomy[:, weight == 0])
    assert not out[3].any()
    inside = (slice(9, 15),) * 3
    assert laplace(out[0])[inside].std() > 0.5 * laplace(anatomy[0])[weight == 0].std()
    assert abs(out[0][inside].mean() - 0.7) < 0.1


@pytest.fixture
def two_training_cases(monkeypatch):
    """The training fold cut to its first two cases: the card's calibration is measured on real cases, and the
    tests must not grow with ../shared/data."""
    from scripted_models.folds import make_folds
    from scripted_models.pathosyn import train_deviation as T

    folds = make_folds()
    small = replace(folds, train=folds.train[:2])
    monkeypatch.setattr(T, "make_folds", lambda data_root=None: small)
    return small


def _train(monkeypatch, lesion_cache, work, out, variant, steps):
    from scripted_models.pathosyn import train_deviation as T

    monkeypatch.setattr(T, "prepare_lesion_cache", lambda cache, data_root=None, cases=None: lesion_cache)
    return T.train_deviation(work, steps=steps, batch=1, crop=16, save_every=2, out_dir=out, threads=2,
                             variant=variant, from_scratch=True)


def test_ablation_training_resumes_and_synthesizes_through_the_same_pipeline(monkeypatch, lesion_cache, tmp_path,
                                                                             two_training_cases):
    from scripted_models.pathosyn import train_deviation as T
    from scripted_models.pathosyn.api import synthesize_lesion
    from scripted_models.weights import load_card

    measured = []  # training cases whose levels were measured for the card's calibration
    level_entries = T.level_entries
    monkeypatch.setattr(T, "level_entries", lambda cases, *a, **kw: measured.extend(cases) or level_entries(
        cases, *a, **kw))
    out = tmp_path / "holistic"
    _train(monkeypatch, lesion_cache, tmp_path / "work", out, "holistic", steps=3)
    card = load_card("deviation_diffusion", out)
    assert card["steps"] == 3 and card["variant"] == "holistic"  # from scratch, not the bundled model
    assert card["config"]["target"] == "image" and card["config"]["anatomy_condition"] is True
    assert measured == list(two_training_cases.train) and card["population_levels"]
    calibration = {k: card[k] for k in ("population_levels", "population_texture", "population_pull")}
    _train(monkeypatch, lesion_cache, tmp_path / "work", out, "holistic", steps=5)  # resumes the checkpoint
    card = load_card("deviation_diffusion", out)
    assert card["steps"] == 5
    # the calibration came back with the checkpoint: not measured again, the same in the card
    assert measured == list(two_training_cases.train)
    assert {k: card[k] for k in calibration} == calibration
    # the weights kept are the EMA weights with the lowest validation loss, checked at the start and the end
    curve = card["selection"]["curve"]
    assert [c["step"] for c in curve] == [0, 3, 5]
    best = min(curve, key=lambda c: c["val_loss"])
    assert card["selection"]["selected_step"] == best["step"]
    from safetensors.torch import load_file

    saved = load_file(str(out / "deviation_diffusion.safetensors"))
    kept = load_file(str(tmp_path / "work" / "best_val.safetensors"))
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and "ema" in state and json.loads(state["extra"])["start_step"] == 0
    # a new work folder retrains from scratch, even where out already holds weights
    _train(monkeypatch, lesion_cache, tmp_path / "work_again", out, "holistic", steps=2)
    assert load_card("deviation_diffusion", out)["steps"] == 2
    _train(monkeypatch, lesion_cache, tmp_path / "work", out, "holistic", steps=5)

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


def test_band_limit_applies_only_to_models_trained_on_smoothed_residuals():
    from dataclasses import replace

    from scipy.ndimage import laplace

    from scripted_models.pathosyn.deviation import band_limit, variant_config

    rng = np.random.default_rng(0)
    samples = rng.normal(0, 1, (2, 4, 16, 16, 16)).astype(np.float32)
    smooth = band_limit(samples, variant_config("pathosyn"))
    assert smooth.shape == samples.shape and smooth.dtype == samples.dtype
    assert laplace(smooth[0, 0]).std() < 0.5 * laplace(samples[0, 0]).std()
    assert np.allclose(smooth[1], band_limit(samples[1:], variant_config("pathosyn"))[0])  # per sample
    raw = replace(variant_config("pathosyn"), residual_smoothing=0.0)  # older weights: untouched
    assert band_limit(samples, raw) is samples
    assert band_limit(samples, variant_config("holistic")) is samples  # image targets: never blurred


def test_realism_selection_keeps_the_weights_with_the_best_validation_pass_fraction(monkeypatch, lesion_cache,
                                                                                    tmp_path, two_training_cases):
    """select="realism": the EMA weights are written as a loadable candidate, scored on the validation fold
    (stubbed here: the fold's scores are given per step), and the best pass fraction (then Wasserstein) wins.
    Candidates carry the training fold's calibration, measured once and kept in the checkpoint."""
    from safetensors.torch import load_file

    from scripted_models.evaluation import realism
    from scripted_models.pathosyn import train_deviation as T
    from scripted_models.weights import load_card, load_state

    scores = {0: (0.25, 1.0), 2: (0.75, 0.9), 4: (0.75, 0.8), 5: (0.5, 0.5)}  # step: (pass fraction, W)
    seen = []

    class FakeFold:
        def __init__(self, data_root=None, split="test", device="auto", cases=None):
            assert split == "validation"

        def score(self, weights, seeds=(0, 1, 2), steps=None, figure=None):
            state, card = load_state("deviation_diffusion", weights["candidate"])  # sha256-checked, loadable
            seen.append(card["steps"])
            # scored as it would ship: the card carries the calibration that synthesize_lesion applies
            assert card["population_pull"] > 0 and set(card["population_texture"]) == set(card["population_levels"])
            assert card["population_level_reference"] == "ring"  # the levels the synthesis reads as ring offsets
            p, w = scores[card["steps"]]
            return {"results": {"candidate": {"summary": {"pass_fraction": p, "wasserstein": w, "mean_err": 1.0,
                                                          "per_modality_pass": {}}}}}

    monkeypatch.setattr(realism, "FoldRealism", FakeFold)
    monkeypatch.setattr(T, "prepare_lesion_cache", lambda cache, data_root=None, cases=None: lesion_cache)
    out = tmp_path / "out"
    T.train_deviation(tmp_path / "work", steps=5, batch=1, crop=16, save_every=2, out_dir=out, threads=2,
                      from_scratch=True, eval_every=1, select="realism", realism_every=2)
    assert seen == [0, 2, 4, 5]
    assert sorted(f.name for f in (tmp_path / "work").glob("realism_step*.safetensors")) == [
        f"realism_step{k}.safetensors" for k in (0, 2, 4, 5)]  # every scored candidate is kept
    card = load_card("deviation_diffusion", out)
    assert card["selection"]["selected_step"] == 4 and card["steps_selected"] == 4
    assert [r["step"] for r in card["selection"]["curve"]] == [0, 2, 4, 5]
    saved = load_file(str(out / "deviation_diffusion.safetensors"))
    kept = load_file(str(tmp_path / "work" / "best_realism.safetensors"))
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    extra = json.loads(torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)["extra"])
    assert extra["calibration"]["population_levels"] == card["population_levels"]
    with pytest.raises(Exception, match="selection rule"):
        T.train_deviation(tmp_path / "w2", steps=1, out_dir=out, select="newest")


def test_anatomy_training_uses_the_training_fold_keeps_its_best_validation_weights_and_resumes(monkeypatch, data_root,
                                                                                             tmp_path):
    """Fine-tunes from the bundled weights on a one-case training fold, scores the validation fold's holes at
    every check, writes the weights of lowest validation error with a card that names the folds; a second call
    with more steps resumes from the checkpoint."""
    from scripted_models import folds as folds_module
    from scripted_models.pathosyn import train_anatomy as T
    from scripted_models.weights import load_card

    real = folds_module.make_folds(str(data_root))
    small = folds_module.Folds(test=real.test, validation=real.validation[:1], train=("brats18_tcia13_623_1",))
    monkeypatch.setattr(T, "make_folds", lambda root=None: small)
    monkeypatch.setattr(T, "VALIDATION_HOLES_PER_CASE", 1)
    monkeypatch.setattr(T, "LESION_SIZED_HOLES", False)
    start = load_card(T.WEIGHTS_NAME)["steps"]
    out = tmp_path / "weights"
    T.train_anatomy(tmp_path / "work", steps=start + 2, batch=1, crop=32, out_dir=out, eval_every=1, save_every=1)
    card = load_card(T.WEIGHTS_NAME, out)
    assert card["steps"] == start + 2 and [c["step"] for c in card["selection"]["curve"]] == [start, start + 1,
                                                                                             start + 2]
    assert card["steps_selected"] == min(card["selection"]["curve"], key=lambda c: c["mae"])["step"]
    held_out = set(real.test) | set(real.validation)
    assert {d.split(":")[0] for d in card["data"]} == {"brats18_tcia13_623_1", "mni152"}
    assert not held_out & {d.split(":")[0] for d in card["data"]}
    T.train_anatomy(tmp_path / "work", steps=start + 3, batch=1, crop=32, out_dir=out, eval_every=1, save_every=1)
    card = load_card(T.WEIGHTS_NAME, out)
    assert [c["step"] for c in card["selection"]["curve"]][-2:] == [start + 2, start + 3]


def test_anatomy_training_crop_is_set_from_the_command_line(monkeypatch, data_root, tmp_path, capsys):
    """`pathosyn train anatomy --crop N` trains on N^3 crops (recorded on the card); a crop the U-Net cannot halve
    four times, or not a positive integer, is refused with a one-line error."""
    import pytest

    from scripted_models import folds as folds_module
    from scripted_models.cli import main
    from scripted_models.pathosyn import train_anatomy as T
    from scripted_models.weights import load_card

    real = folds_module.make_folds(str(data_root))
    small = folds_module.Folds(test=real.test, validation=real.validation[:1], train=("brats18_tcia13_623_1",))
    monkeypatch.setattr(T, "make_folds", lambda root=None: small)
    monkeypatch.setattr(T, "VALIDATION_HOLES_PER_CASE", 1)
    monkeypatch.setattr(T, "LESION_SIZED_HOLES", False)
    steps = load_card(T.WEIGHTS_NAME)["steps"] + 1
    out = tmp_path / "weights"
    assert main(["train", "anatomy", "--steps", str(steps), "--batch", "1", "--crop", "48", "--work",
                 str(tmp_path / "work"), "--weights-out", str(out), "--data", str(data_root)]) == 0
    assert load_card(T.WEIGHTS_NAME, out)["crop"] == 48
    assert main(["train", "anatomy", "--steps", str(steps), "--crop", "40", "--work", str(tmp_path / "work")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["train", "anatomy", "--steps", "1", "--crop", "0", "--work", str(tmp_path / "other")])
    assert exited.value.code == 2 and "--crop" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_anatomy_training_of_another_width_starts_from_scratch_and_keeps_its_width(monkeypatch, data_root, tmp_path):
    """`channels` trains another U-Net size from scratch (the bundled weights have the default size); its card
    builds that size again at load time; a resumed run keeps the size it started with and refuses another."""
    import pytest
    import torch

    from scripted_models import folds as folds_module
    from scripted_models.errors import InputError
    from scripted_models.pathosyn import train_anatomy as T
    from scripted_models.pathosyn.anatomy import AnatomyModel
    from scripted_models.weights import load_card

    real = folds_module.make_folds(str(data_root))
    small = folds_module.Folds(test=real.test, validation=real.validation[:1], train=("brats18_tcia13_623_1",))
    monkeypatch.setattr(T, "make_folds", lambda root=None: small)
    monkeypatch.setattr(T, "VALIDATION_HOLES_PER_CASE", 1)
    monkeypatch.setattr(T, "LESION_SIZED_HOLES", False)
    out, work, widths = tmp_path / "weights", tmp_path / "work", (8, 8, 16, 16, 16)
    T.train_anatomy(work, steps=2, batch=1, crop=32, out_dir=out, eval_every=1, save_every=1, channels=widths)
    card = load_card(T.WEIGHTS_NAME, out)
    assert card["config"]["channels"] == list(widths) and card["steps"] == 2
    assert [c["step"] for c in card["selection"]["curve"]] == [0, 1, 2]  # from scratch, not from the bundled step
    model = AnatomyModel.load(torch.device("cpu"), out)
    assert model.cfg.channels == widths
    assert model.net.model[0].conv.unit0.conv.out_channels == widths[0]
    with pytest.raises(InputError, match="started with channels"):
        T.train_anatomy(work, steps=3, batch=1, crop=32, out_dir=out, eval_every=1, channels=(16, 32, 64, 128, 128))
    T.train_anatomy(work, steps=3, batch=1, crop=32, out_dir=out, eval_every=1, save_every=1)  # keeps its width
    assert load_card(T.WEIGHTS_NAME, out)["config"]["channels"] == list(widths)


def test_anatomy_validation_has_a_lesion_sized_hole_in_healthy_tissue_and_scores_it_apart(data_root):
    """The tumour mirrored about the brain's mid-plane lands on healthy tissue clear of the tumour; the check
    scores it apart from the small ellipsoids and selects on the mean of the two."""
    import torch

    from scripted_models.cases import load_case
    from scripted_models.evaluation.validation import mirrored_lesion
    from scripted_models.pathosyn import train_anatomy as T
    from scripted_models.pathosyn.anatomy import AnatomyModel

    lesion = np.zeros((8, 10, 20), bool)
    lesion[3:5, 4:6, 3:6] = True
    brain = np.zeros_like(lesion)
    brain[:, :, 2:18] = True  # mid-plane between columns 9 and 10: column x lands on 19 - x
    mirrored = mirrored_lesion(lesion, brain, (1.0, 1.0, 1.0), margin_mm=2.0)
    assert mirrored[3:5, 4:6, 14:17].all() and mirrored.sum() == lesion.sum()
    assert not mirrored_lesion(lesion, brain, (1.0, 1.0, 1.0), margin_mm=12.0).any()  # too close: nothing

    case_id = "brats18_tcia13_623_1"
    holes = T.ValidationHoles([case_id], data_root, per_case=1, lesion_sized=True)
    assert [large for *_, large in holes.problems] == [False, True]
    images, hole, target, *_ = holes.problems[1]
    assert 1000 <= target.sum() <= (load_case(data_root / "cases" / case_id).seg > 0).sum() and hole[target].all()
    model = AnatomyModel.load(torch.device("cpu"))
    scores = holes.errors(model.net, model.cfg, torch.device("cpu"))
    assert set(scores) == {"mae", "small", "large"} and 0 < scores["small"] < 2 and 0 < scores["large"] < 2
    assert abs(scores["mae"] - (scores["small"] + scores["large"]) / 2) < 1e-9


def test_calibrate_anatomy_writes_the_fill_smoothing_fitted_on_the_training_fold(monkeypatch, data_root, tmp_path,
                                                                                   capsys):
    """`pathosyn calibrate anatomy --weights DIR` fits the lesion-removal smoothing on the training fold's holes
    (here one case) with DIR's inpainter and writes it on DIR's card only; the weights file is untouched."""
    import json
    import os
    import shutil

    from scripted_models import folds as folds_module
    from scripted_models.cli import main
    from scripted_models.weights import load_card, sha256_of, weights_dir

    real = folds_module.make_folds(str(data_root))
    small = folds_module.Folds(test=real.test, validation=real.validation, train=("brats2013_pat0005",))
    monkeypatch.setattr(folds_module, "make_folds", lambda root=None: small)
    out = tmp_path / "weights"
    out.mkdir()
    for f in weights_dir().glob("anatomy_inpainter.*"):
        shutil.copy(f, out / f.name)
    card = json.loads((out / "anatomy_inpainter.json").read_text())
    card.pop("fill_smoothing", None)
    (out / "anatomy_inpainter.json").write_text(json.dumps(card))
    before = os.environ.get("PATHOSYN_WEIGHTS_DIR")
    assert main(["calibrate", "anatomy", "--weights", str(out), "--data", str(data_root)]) == 0
    assert os.environ.get("PATHOSYN_WEIGHTS_DIR") == before
    fitted = load_card("anatomy_inpainter", out)["fill_smoothing"]
    assert fitted["holes"]["small"] >= 1 and fitted["holes"]["lesion_sized"] == 1
    assert fitted["fitted"]["objective"] <= fitted["raw_fill"]["objective"]
    assert fitted["setting"] is None or set(fitted["setting"]) == {"sigma_mm", "onset_mm", "length_mm"}
    assert fitted["weights_sha256"] == sha256_of(out / "anatomy_inpainter.safetensors") == card["sha256"]
    assert "brats2013_pat0005" in capsys.readouterr().out


def test_calibrate_deviation_writes_levels_as_offsets_from_each_case_s_ring(monkeypatch, data_root, tmp_path, capsys):
    """`pathosyn calibrate deviation --weights DIR` writes the population levels of the training fold (here one
    case) as sub-region means minus the case's ring mean, with the ring reference and the default pull."""
    import json
    import shutil

    from scripted_models import folds as folds_module
    from scripted_models.cases import load_case
    from scripted_models.cli import main
    from scripted_models.labels import EDEMA
    from scripted_models.pathosyn.calibration import DEFAULT_POPULATION_PULL, level_ring
    from scripted_models.weights import load_card, sha256_of, weights_dir

    case_id = "brats18_tcia13_623_1"
    real = folds_module.make_folds(str(data_root))
    monkeypatch.setattr(folds_module, "make_folds", lambda root=None: folds_module.Folds(
        test=real.test, validation=real.validation, train=(case_id,)))
    out = tmp_path / "weights"
    out.mkdir()
    for f in weights_dir().glob("deviation_diffusion.*"):
        shutil.copy(f, out / f.name)
    card = json.loads((out / "deviation_diffusion.json").read_text())
    card.update(population_levels={}, population_level_reference="healthy", population_pull=0.1)
    (out / "deviation_diffusion.json").write_text(json.dumps(card))
    assert main(["calibrate", "deviation", "--weights", str(out), "--data", str(data_root)]) == 0
    written = load_card("deviation_diffusion", out)
    assert written["population_level_reference"] == "ring" and written["population_pull"] == DEFAULT_POPULATION_PULL
    case = load_case(data_root / "cases" / case_id)
    ring = level_ring(case.seg > 0, case.spacing_zyx, case.foreground())
    for m, z in case.normalized().items():
        expected = float(z[case.seg == EDEMA].mean()) - float(z[ring].mean())
        assert abs(written["population_levels"][m]["edema"] - expected) < 1e-3, m
    assert sha256_of(out / "deviation_diffusion.safetensors") == card["sha256"]
    assert '"cases": 1' in capsys.readouterr().out
