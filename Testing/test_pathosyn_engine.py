"""PathoSyn engine on the committed weights: fusion, identity outside the region, determinism, uncertainty,
geometry, bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import make_ball_mask, make_head, noisy_head

from scripted_models import pseudo_healthy, synthesize_lesion
from scripted_models.errors import InputError
from scripted_models.evaluation.bench import thick_slices
from scripted_models.pathosyn.api import BLEND_MARGIN_MM
from scripted_models.preprocess import dilate_mm
from scripted_models.volume import Volume

STEPS = 2


def region_of(result, head):
    spacing_zyx = tuple(reversed(head.spacing))
    return dilate_mm(result.mask.array > 0, BLEND_MARGIN_MM, spacing_zyx)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_outside_region_is_bit_identical(dtype):
    head = make_head(dtype=dtype)
    mask = make_ball_mask(head)
    before = head.array.copy()
    result = synthesize_lesion({"t1": head}, mask, seed=1, steps=STEPS)
    out = result.images["t1"]
    np.testing.assert_array_equal(head.array, before)  # input untouched
    assert out.array.dtype == head.array.dtype
    assert out.spacing == head.spacing and out.origin == head.origin and out.direction == head.direction
    region = region_of(result, head)
    assert np.array_equal(out.array[~region], head.array[~region])
    assert np.abs(out.array[region].astype(float) - head.array[region]).max() > 0
    assert np.all(result.residuals["t1"].array[~region] == 0)


def test_same_seed_same_output_and_seed_changes_it():
    head = make_head()
    mask = make_ball_mask(head)
    a = synthesize_lesion({"flair": head}, mask, seed=3, steps=STEPS).images["flair"].array
    b = synthesize_lesion({"flair": head}, mask, seed=3, steps=STEPS).images["flair"].array
    c = synthesize_lesion({"flair": head}, mask, seed=4, steps=STEPS).images["flair"].array
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_weights_rewritten_in_a_folder_are_used_by_the_next_synthesis(tmp_path):
    """A training rewrites its candidate folder at every realism check: the model cache must not serve the weights
    that were there before (it did, and every candidate scored as the first one)."""
    import torch

    from scripted_models.pathosyn.deviation import WEIGHTS_NAME
    from scripted_models.weights import load_state, save_state

    state, card = load_state(WEIGHTS_NAME)
    head = make_head(dtype=np.float32)
    mask = make_ball_mask(head)

    def synthesize():
        return synthesize_lesion({"t1": head}, mask, seed=0, steps=1, deviation_weights=tmp_path).images["t1"].array

    save_state(WEIGHTS_NAME, state, card, tmp_path)
    first = synthesize()
    changed = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in state.items()}
    save_state(WEIGHTS_NAME, changed, card, tmp_path)
    assert not np.array_equal(synthesize(), first), "the cached model of the old weights was used"
    save_state(WEIGHTS_NAME, {k: v.clone() for k, v in state.items()}, card, tmp_path)
    np.testing.assert_array_equal(synthesize(), first)
    assert torch.equal(load_state(WEIGHTS_NAME, tmp_path)[0][next(iter(state))], next(iter(state.values())))


def test_uncertainty_is_localised_to_the_region():
    head = make_head(dtype=np.float32)
    mask = make_ball_mask(head)
    result = synthesize_lesion({"t1": head}, mask, seed=0, samples=3, steps=STEPS)
    std = result.uncertainty["t1"].array
    region = region_of(result, head)
    assert np.all(std[~region] == 0)
    assert std[mask.array > 0].mean() > 0


def test_multimodal_output_shares_one_lesion_region():
    t1 = make_head(seed=1)
    flair = t1.with_array((t1.array * 0.7).astype(np.int16))
    mask = make_ball_mask(t1)
    result = synthesize_lesion({"t1": t1, "flair": flair}, mask, seed=0, steps=STEPS)
    assert set(result.images) == {"t1", "flair"}
    changed = [result.images[m].array != v.array for m, v in (("t1", t1), ("flair", flair))]
    region = region_of(result, t1)
    for c in changed:
        assert not c[~region].any() and c.any()


def test_mask_on_another_grid_and_binary_mask():
    head = make_head(spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0))
    fine_shape = tuple(2 * n for n in head.shape)
    binary = make_ball_mask(Volume(np.zeros(fine_shape, np.uint8), (0.5, 0.5, 0.5), (-0.25, -0.25, -0.25)),
                            radius_vox=12, labels=False)
    result = synthesize_lesion({"t2": head}, binary, seed=0, steps=STEPS)
    assert result.report["whole_lesion_only"] is True
    assert result.mask.shape == head.shape
    assert 0 < (result.mask.array > 0).sum() < head.array.size


def test_a_lesion_painted_past_the_head_is_said_and_never_darker_than_the_scan():
    """A mask that spills into the air: a warning with the share outside, and no voxel below the scan's darkest
    (a T1 core drawn on air would go below zero); output = input + residual still holds."""
    head = make_head(dtype=np.float32)
    inside = synthesize_lesion({"t1": head}, make_ball_mask(head), seed=0, steps=STEPS)
    assert not any("outside" in w for w in inside.report["warnings"])
    mask = make_ball_mask(head, centre_frac=(0.95, 0.5, 0.5), radius_vox=7)
    with pytest.warns(UserWarning, match=r"\d+% of the lesion mask lies outside the head"):
        result = synthesize_lesion({"t1": head}, mask, seed=0, steps=STEPS)
    out = result.images["t1"].array
    assert out.min() >= head.array.min()
    np.testing.assert_allclose(out, head.array + result.residuals["t1"].array, atol=1e-4)


def test_spacing_as_float32_or_float64_gives_the_same_lesion():
    """1.2 mm read from a header (float32: 1.2000000477) or from an affine (1.1999999958): 5 voxels are 6 mm in
    both, so the margins cover the same voxels and the outputs agree (bit differences only)."""
    head = make_head(dtype=np.float32, spacing=(1.2, 1.0, 1.5))
    results = []
    for spacing in ((float(np.float32(1.2)), 1.0, 1.5), (1.2 - 4e-9, 1.0, 1.5)):
        vol = Volume(head.array, spacing, head.origin, head.direction)
        results.append(synthesize_lesion({"t1": vol}, make_ball_mask(vol), seed=0, steps=1))
    assert results[0].report["region_voxels"] == results[1].report["region_voxels"]
    np.testing.assert_allclose(results[0].images["t1"].array, results[1].images["t1"].array, atol=1e-3)


def test_large_lesion_is_scaled_down_with_warning():
    head = make_head(shape=(160, 160, 160), spacing=(1.0, 1.0, 1.0))  # the ball covers about a third of it
    mask = make_ball_mask(head, radius_vox=50, labels=False)
    with pytest.warns(UserWarning, match="exceeds"):
        result = synthesize_lesion({"t1": head}, mask, seed=0, steps=1)
    assert result.report["scale"] < 1.0
    assert max(result.report["model_grid_zyx"]) <= 96


def two_lesions(head, centres=((0.5, 0.5, 0.15), (0.5, 0.5, 0.85)), radius_vox=5):
    first, second = (make_ball_mask(head, centre_frac=c, radius_vox=radius_vox) for c in centres)
    return head.with_array(np.maximum(first.array, second.array)), first, second


def test_lesions_far_apart_are_synthesized_each_in_a_roi_of_its_own():
    """Two lesions at the ends of a long head: two 32^3 ROIs at full resolution (one box around both would be
    scaled down, with a warning); outside the two blend regions the scan is untouched, output = base + residual,
    and the report's box (the CLI's --crop) covers every change."""
    head = make_head(shape=(40, 48, 200), spacing=(1.0, 1.0, 1.0))
    both, first, _ = two_lesions(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "exceeds ... resolution" warning
        result = synthesize_lesion({"t1": head}, both, seed=0, steps=STEPS, samples=2)
    rois = result.report["rois"]
    assert len(rois) == 2 and all(r["scale"] == 1.0 for r in rois) and result.report["scale"] == 1.0
    assert sum(r["lesion_voxels"] for r in rois) == result.report["lesion_voxels"] == int((both.array > 0).sum())
    out, residual = result.images["t1"].array, result.residuals["t1"].array
    region = region_of(result, head)
    assert np.array_equal(out[~region], head.array[~region]) and np.all(residual[~region] == 0)
    changed = out != head.array
    spread = result.uncertainty["t1"].array
    for lesion in (first.array > 0, (both.array > 0) & ~(first.array > 0)):
        assert changed[lesion].mean() > 0.5 and spread[lesion].mean() > 0  # both lesions are drawn, 2 samples each
    assert np.all(spread[~region] == 0)
    np.testing.assert_allclose(out.astype(np.float32)[region], (head.array + residual)[region], atol=0.5)  # int16
    start, size = result.report["roi_start_zyx"], result.report["roi_size_zyx"]
    box = np.zeros(head.shape, bool)
    box[tuple(slice(max(a, 0), a + n) for a, n in zip(start, size))] = True
    assert not (changed & ~box).any()


def test_many_small_lesions_share_one_roi_when_theirs_would_cost_more_than_the_largest():
    """36 small lesions whose 32^3 ROIs hold more than 96^3 model voxels (and more than one box around all): one
    ROI, scaled down with its warning, as one large lesion."""
    from scripted_models.pathosyn.api import MAX_ROI

    head = make_head(shape=(48, 300, 300), spacing=(1.0, 1.0, 1.0))
    lesions = np.zeros(head.shape, np.uint8)
    centres = [(24, 67 + 33 * i, 67 + 33 * j) for i in range(6) for j in range(6)]
    for z, y, x in centres:
        lesions[z - 2:z + 2, y - 2:y + 2, x - 2:x + 2] = 1
    assert len(centres) * 32 ** 3 > MAX_ROI ** 3
    with pytest.warns(UserWarning, match="exceeds"):
        result = synthesize_lesion({"t1": head}, head.with_array(lesions), seed=0, steps=1)
    assert len(result.report["rois"]) == 1 and result.report["scale"] < 1.0


def test_a_raw_scan_is_normalised_over_its_head_and_says_so():
    """A scan whose air is noise (not skull-stripped): the report warns that the units come from the whole head, and
    the air stays untouched."""
    array, brain, head = noisy_head()
    scan = Volume(array, (1.0, 1.0, 1.0))
    mask = make_ball_mask(scan, radius_vox=5)
    with pytest.warns(UserWarning, match="background is noise"):
        result = synthesize_lesion({"t1": scan}, mask, seed=0, steps=1)
    assert any("not skull-stripped" in w for w in result.report["warnings"])
    np.testing.assert_array_equal(result.images["t1"].array[~head], array[~head])
    skull_stripped = scan.with_array(np.where(brain, array, 0).astype(np.float32))
    assert not synthesize_lesion({"t1": skull_stripped}, mask, seed=0, steps=1).report["warnings"]
    in_the_air = make_ball_mask(scan, centre_frac=(0.5, 0.5, 0.03), radius_vox=1)  # every voxel differs from the mode
    with pytest.raises(InputError, match="does not overlap the brain"):
        synthesize_lesion({"t1": scan}, in_the_air, seed=0, steps=1)


def test_a_brain_mask_gives_a_raw_scan_the_units_of_its_brain():
    """With a brain mask, a raw scan is normalised over the brain (as the skull-stripped scan is), without the raw-scan
    warning; the mask may come on another grid; a mask that is empty or misses the lesion is refused."""
    import warnings

    from scripted_models.pathosyn.api import _prepare

    array, brain, head = noisy_head()
    scan = Volume(array, (1.0, 1.0, 1.0))
    mask = make_ball_mask(scan, radius_vox=5)
    brain_volume = scan.with_array(brain.astype(np.uint8))
    coarse = Volume(brain[::2, ::2, ::2].astype(np.uint8), (2.0, 2.0, 2.0), origin=(0.5, 0.5, 0.5))
    stripped = _prepare({"t1": scan.with_array(np.where(brain, array, 0).astype(np.float32))}, mask, None)
    for given in (brain_volume, coarse):
        prep = _prepare({"t1": scan}, mask, None, given)
        assert prep.from_brain_mask and prep.head.sum() > 0.9 * brain.sum()
        assert prep.normalizers["t1"].mean == pytest.approx(stripped.normalizers["t1"].mean, rel=0.02)
        assert prep.normalizers["t1"].std == pytest.approx(stripped.normalizers["t1"].std, rel=0.1)
    raw = _prepare({"t1": scan}, mask, None)
    assert raw.normalizers["t1"].std > 2 * stripped.normalizers["t1"].std  # scalp and skull in the units
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw-scan warning
        result = synthesize_lesion({"t1": scan}, mask, seed=0, steps=1, brain_mask=brain_volume)
    assert result.report["normalised_over"] == "brain mask" and not result.report["warnings"]
    region = dilate_mm(mask.array > 0, BLEND_MARGIN_MM, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(result.images["t1"].array[~region], array[~region])
    with pytest.raises(InputError, match="brain mask is empty"):
        synthesize_lesion({"t1": scan}, mask, seed=0, steps=1, brain_mask=scan.with_array(np.zeros_like(array)))
    elsewhere = scan.with_array((make_ball_mask(scan, centre_frac=(0.5, 0.5, 0.15), radius_vox=3).array > 0
                                 ).astype(np.uint8))
    with pytest.raises(InputError, match="does not overlap the brain mask"):
        synthesize_lesion({"t1": scan}, mask, seed=0, steps=1, brain_mask=elsewhere)


def test_pseudo_healthy_changes_only_the_hole():
    head = make_head(dtype=np.float32)
    lesioned = head.array.copy()
    mask = make_ball_mask(head, radius_vox=5, labels=False)
    lesioned[mask.array > 0] += 500  # a bright blob
    healthy = pseudo_healthy({"t1": head.with_array(lesioned)}, mask)["t1"].array
    hole = dilate_mm(mask.array > 0, 2.0, tuple(reversed(head.spacing)))
    assert np.array_equal(healthy[~hole], lesioned[~hole])
    # the blob is removed: back near the healthy tissue level
    assert abs(healthy[mask.array > 0].mean() - head.array[mask.array > 0].mean()) < 200


def _flair_on_thick_slices():
    """(t1 on 1 mm, the same subject's flair on 3 mm slices: each the mean of 3 of a 1 mm flair, the ball mask)."""
    t1 = make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    thick = thick_slices(make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), seed=1))
    return t1, thick, make_ball_mask(t1)


def test_scans_on_different_grids_are_synthesized_each_on_its_own():
    """A 1 mm t1 and a 3 mm-slice flair of one subject: the engine works on the t1's grid (the flair resampled onto
    it) and gives the flair back on its own grid, its voxels bit for bit where nothing changed. Oracle: the same run
    with the flair already resampled onto the t1 grid; its change, averaged over each 3 mm voxel, is the flair's."""
    from scripted_models.preprocess import background_value
    from scripted_models.volume import resample_to

    t1, thick, mask = _flair_on_thick_slices()
    result = synthesize_lesion({"flair": thick, "t1": t1}, mask, seed=0, steps=2, samples=2)
    flair = result.images["flair"]
    assert flair.same_grid(thick) and flair.array.dtype == thick.array.dtype and result.images["t1"].same_grid(t1)
    assert result.residuals["flair"].same_grid(thick) and result.uncertainty["flair"].same_grid(thick)
    assert result.mask.same_grid(t1) and result.report["working_grid"] == "t1"
    assert result.report["resampled"] == ["flair"]
    residual = result.residuals["flair"].array
    assert np.array_equal(flair.array[residual == 0], thick.array[residual == 0])
    lesion_slices = np.unique(np.argwhere(mask.array > 0)[:, 0] // 3)
    assert np.abs(residual).sum(axis=(1, 2))[lesion_slices].min() > 0  # every slice the lesion crosses changed
    far = np.ones(16, bool)
    far[max(lesion_slices.min() - 3, 0):lesion_slices.max() + 4] = False  # 6 mm margin + a slice
    assert far.any() and not residual[far].any()

    resampled = resample_to(thick, t1, nearest=False, default=background_value(thick.array))
    resampled = resampled.with_array(resampled.array.astype(np.float32))
    oracle = synthesize_lesion({"flair": resampled, "t1": t1}, mask, seed=0, steps=2, samples=2)
    assert np.array_equal(oracle.images["t1"].array, result.images["t1"].array)
    change = (oracle.images["flair"].array - resampled.array).reshape(16, 3, 56, 52).mean(axis=1)
    assert np.abs(change).max() > 50  # a lesion, not noise
    assert np.abs(flair.array.astype(np.float64) - thick.array - change).max() <= 0.5 + 1e-3  # int16 rounding

    healthy = pseudo_healthy({"t1": t1, "flair": thick}, mask)["flair"]
    assert healthy.same_grid(thick) and healthy.array.dtype == thick.array.dtype
    assert (healthy.array != thick.array).any()


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty"),
        ("outside", "overlap"),
        ("out_of_view", "does not cover the whole lesion"),
        ("unknown", "unknown modality"),
        ("samples", "samples"),
        ("nan", "NaN"),
        ("volume_not_dict", "dict"),
        ("list_not_dict", "dict"),
        ("array_image", r"images\['t1'\] must be a Volume"),
        ("array_mask", "mask must be a Volume"),
        ("array_brain_mask", "brain mask must be a Volume"),
        ("text_steps", "steps must be an integer"),
        ("float_samples", "samples must be an integer"),
        ("text_guidance", "guidance must be a finite number"),
    ],
)
def test_bad_input_raises_one_line(case, message):
    head = make_head(dtype=np.float32)
    mask = make_ball_mask(head)
    images, kwargs = {"t1": head}, {}
    if case == "empty":
        mask = mask.with_array(np.zeros_like(mask.array))
    elif case == "outside":
        m = np.zeros_like(mask.array)
        m[0:2, 0:2, 0:2] = 1
        mask = mask.with_array(m)
    elif case == "out_of_view":  # a flair whose field of view ends before the lesion (another space)
        images = {"t1": head, "flair": make_head(shape=(30, 30, 30), origin=(300.0, 0.0, 0.0))}
    elif case == "unknown":
        images = {"pd": head}
    elif case == "samples":
        kwargs = {"samples": 0}
    elif case == "nan":
        arr = head.array.copy()
        arr[5, 5, 5] = np.nan
        images = {"t1": head.with_array(arr)}
    elif case == "volume_not_dict":
        images = head
    elif case == "list_not_dict":  # the mistakes of a Python caller: one clear line, not an AttributeError
        images = [head]
    elif case == "array_image":
        images = {"t1": head.array}
    elif case == "array_mask":
        mask = mask.array
    elif case == "array_brain_mask":
        kwargs = {"brain_mask": mask.array > 0}
    elif case == "text_steps":
        kwargs = {"steps": "5"}
    elif case == "float_samples":
        kwargs = {"samples": 2.0}
    elif case == "text_guidance":
        kwargs = {"guidance": "2"}
    with pytest.raises(InputError, match=message) as info:
        synthesize_lesion(images, mask, **{"steps": 1, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 20])
def test_ddim_timesteps_follow_the_step_stride_down_to_the_clean_sample(steps):
    from scripted_models.pathosyn.deviation import DeviationConfig, build_scheduler

    cfg = DeviationConfig()
    trailing = build_scheduler(cfg, "ddim", steps)
    ts = [int(t) for t in trailing.timesteps]
    stride = cfg.num_train_timesteps // steps  # what DDIMScheduler.step subtracts
    assert len(ts) == steps and cfg.num_train_timesteps - stride <= ts[0] <= cfg.num_train_timesteps - 1
    assert all(a - b == stride for a, b in zip(ts, ts[1:]))  # each step lands where the next one starts
    assert ts[-1] - stride == -1  # the last step lands on the clean sample (alpha_prod = 1)
    if steps > 1:  # MONAI's own linspace grid does not follow the step's stride
        monai = [int(t) for t in build_scheduler(DeviationConfig(timestep_spacing="monai"), "ddim", steps).timesteps]
        assert monai[-1] == 0 and any(a - b != stride for a, b in zip(monai, monai[1:]))
    with pytest.raises(ValueError, match="timestep_spacing"):
        build_scheduler(DeviationConfig(timestep_spacing="sideways"), "ddim", steps)


def test_same_seed_same_bytes_on_one_and_two_threads():
    import torch

    head = make_head()
    mask = make_ball_mask(head)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            result = synthesize_lesion({"t1": head}, mask, seed=5, steps=STEPS)
            runs.append((result.images["t1"].array, result.residuals["t1"].array))
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_pinned_inference_matches_pytorch_and_leaves_training_and_bf16_alone():
    import copy

    import torch

    from scripted_models.runtime import CHANNELS_LAST, pin_cpu_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv3d(8, 4, 1), torch.nn.GroupNorm(2, 4),
                              torch.nn.Conv3d(4, 4, 3, stride=2, padding=1))
    x = torch.randn(1, 3, 12, 10, 8)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference_bf16 = net(x)
    channels_first = pin_cpu_inference(copy.deepcopy(net))
    pin_cpu_inference(pin_cpu_inference(net, channels_last=True), channels_last=True)  # idempotent
    with torch.no_grad():
        pinned = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = net(x)
        pinned_first = channels_first(x)
    torch.testing.assert_close(pinned, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pinned_first, reference, rtol=1e-5, atol=1e-5)
    assert pinned.is_contiguous(memory_format=CHANNELS_LAST) and not pinned.is_contiguous()  # float32: NDHWC
    assert pinned_first.is_contiguous()  # the default keeps the layout
    assert under_autocast.is_contiguous()  # bf16 autocast keeps the channels-first path
    # ... and its bf16 convolutions (torch.mkldnn_convolution is no autocast op: it ran them in float32)
    assert under_autocast.dtype == reference_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(under_autocast, reference_bf16)
    net(x).sum().backward()  # grad enabled: PyTorch's own path, trainable
    assert all(p.grad is not None for p in net.parameters())


def test_pinned_convolution_under_autocast_falls_back_where_onednn_lacks_the_dtype(monkeypatch):
    """A CPU without AVX-512 (AVX2 only): oneDNN refuses bf16 convolutions, so a pinned convolution under bf16
    autocast runs PyTorch's own (autocast) path instead of failing."""
    import torch

    from scripted_models import runtime

    torch.manual_seed(0)
    conv, x = torch.nn.Conv3d(3, 4, 3, padding=1), torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = conv(x)
        runtime.pin_cpu_inference(conv)
        monkeypatch.setattr(runtime, "_onednn_supports", lambda dtype: False)
        monkeypatch.setattr(torch, "mkldnn_convolution", None)  # must not be called
        fallback = conv(x)
    assert fallback.dtype == torch.bfloat16 and torch.equal(fallback, reference)


@pytest.mark.parametrize("spatial", [(40, 36, 32), (21, 23, 25)])
def test_channels_last_group_norm_matches_pytorch_with_the_same_bytes_on_one_and_two_threads(spatial):
    import torch

    from scripted_models.runtime import CHANNELS_LAST, group_norm_channels_last

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(1, 16, *spatial) * 3 + 2).contiguous(memory_format=CHANNELS_LAST)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                runs.append(group_norm_channels_last(x, norm))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        torch.testing.assert_close(runs[0], norm(x.contiguous()), rtol=1e-5, atol=1e-5)


def test_upsample_then_convolution_runs_as_one_transposed_convolution():
    import copy

    import torch
    from monai.networks.nets import DiffusionModelUNet

    from scripted_models.runtime import pin_cpu_inference

    torch.manual_seed(0)
    net = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16, 16),
                             attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=4).eval()
    with torch.no_grad():
        for parameter in net.parameters():  # MONAI zero-initialises the output convolution
            parameter.normal_(0.0, 0.2)
    pinned = pin_cpu_inference(copy.deepcopy(net), channels_last=True)
    rewritten = [name for name, module in pinned.named_modules() if "forward" in module.__dict__
                 and type(module).__name__ == "WrappedUpsample"]
    assert len(rewritten) == 2
    x, t = torch.randn(1, 2, 24, 16, 20), torch.tensor([300])
    before = torch.get_num_threads()
    runs = []
    try:
        with torch.no_grad():
            reference = net(x, timesteps=t)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(pinned(x, timesteps=t))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(runs[0], reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0], runs[1])
