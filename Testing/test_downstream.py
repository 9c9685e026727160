"""Downstream segmentation study: grid, slicing, metrics, and a segmenter that learns a toy lesion task.

The full study (python -m scripted_models.evaluation.downstream) trains 9 networks; here the pieces run on
synthetic volumes so that each can fail on its own."""
from __future__ import annotations

import numpy as np
import pytest

from scripted_models.evaluation import downstream as D
from scripted_models.volume import Volume


def test_to_grid_reorients_to_lps_and_resamples_to_2mm():
    arr = np.zeros((20, 30, 40), np.float32)
    arr[15, :, :] = 1.0  # a plane at high k
    # k axis points inferior (flipped z): after LPS reorientation the plane must be near the low end of axis 0
    vol = Volume(arr, spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    out = D.to_grid(vol, nearest=True)
    assert out.shape == (10, 15, 20)
    plane = np.flatnonzero(out.any(axis=(1, 2)))
    assert plane.max() <= 3


def test_regions_follow_brats_conventions():
    labels = np.array([0, 1, 2, 3])
    wt, tc, et = D.regions_of(labels)
    assert wt.tolist() == [0, 1, 1, 1] and tc.tolist() == [0, 1, 0, 1] and et.tolist() == [0, 0, 0, 1]


def test_dice_known_values():
    a = np.zeros(10, bool)
    b = np.zeros(10, bool)
    assert D.dice(a, b) == 1.0
    a[:4] = True
    b[2:6] = True
    assert D.dice(a, b) == pytest.approx(0.5)
    assert D.dice(a, a) == 1.0


def toy_case(seed: int, name: str = "toy") -> D.GridCase:
    """A bright ball lesion (enhancing rim, core, edema) in a textured 'brain' on the 2 mm grid."""
    rng = np.random.default_rng(seed)
    shape = (24, 80, 80)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    brain = ((yy - 40) / 36.0) ** 2 + ((xx - 40) / 32.0) ** 2 < 1
    images = np.where(brain, rng.normal(0, 0.5, (2,) + shape), D.BACKGROUND_Z).astype(np.float32)
    c = rng.integers(30, 50, size=2)
    r = np.sqrt((zz - 12) ** 2 + (yy - c[0]) ** 2 + (xx - c[1]) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 8] = 2
    labels[r < 5] = 3
    labels[r < 3] = 1
    images[0][labels == 2] += 2.5  # flair-bright edema
    images[1][labels == 3] += 3.0  # t1c-bright enhancing
    images[0][labels == 3] += 1.5
    return D.GridCase(name, images, labels)


def test_slices_are_cropped_to_the_brain_and_keep_lesion_labels():
    case = toy_case(0)
    images, regions = D.slices_of(case)
    assert images.shape[1:] == (2, D.SIDE, D.SIDE) and regions.shape[1:] == (3, D.SIDE, D.SIDE)
    assert len(images) == case.images.shape[1]  # every slice has brain
    assert regions[:, 0].sum() == (case.labels > 0).sum()  # no lesion voxel lost by the crop


def test_segmenter_learns_a_toy_lesion_task_and_scores_it():
    settings = D.DownstreamSettings(seeds=(0,), steps=80, batch=8)
    train = [toy_case(s, f"toy{s}") for s in range(3)]
    untrained = D.score(D.build_segmenter().eval(), toy_case(9))
    net = D.train_segmenter([train], settings, seed=0)
    scores = D.score(net, toy_case(9))
    assert set(scores) == {"dice_WT", "dice_TC", "dice_ET", "detection_auroc"}
    assert scores["dice_WT"] > 0.5 and scores["dice_WT"] > untrained["dice_WT"] + 0.3
    assert scores["detection_auroc"] > 0.8


def test_report_markdown_and_plot(tmp_path):
    row = {f"dice_{r}": {"mean": 0.5, "std": 0.1} for r in D.REGIONS}
    row["detection_auroc"] = {"mean": 0.9, "std": 0.0}
    report = {"test_case": "x", "modalities": ["flair", "t1c"], "train_cases": ["a"],
              "synthetic_volumes": {"pathosyn": 2, "copy_paste": 2}, "summary": {c: row for c in D.CONDITIONS},
              "settings": {"steps": 1, "batch": 1, "seeds": [0]}, "runs": {}, "timing_s": {},
              "pathar_alignment": {"n": 2, "mean_wt_dice_generated": 0.4, "wt_dice_real_patch_reference": 0.6}}
    D.write_report(report, tmp_path)
    text = (tmp_path / "downstream.md").read_text()
    assert "0.500 ± 0.100" in text and "copy_paste" in text and "PathAR alignment" in text
    assert (tmp_path / "downstream.png").stat().st_size > 1000


def test_paired_comparison_names_only_gains_in_every_seed(tmp_path):
    def run(seed, wt, auroc):
        return {"seed": seed, "dice_WT": wt, "dice_TC": 0.2, "dice_ET": 0.2, "detection_auroc": auroc}

    runs = {"real": [run(s, 0.80, 0.5 + 0.1 * s) for s in range(3)],
            "pathosyn": [run(s, 0.85, 0.6 - 0.1 * s) for s in range(3)],
            "copy_paste": [run(s, 0.90, 0.5) for s in range(3)]}
    comparison = D.paired_comparison({"runs": runs})
    wt = comparison["real"]["dice_WT"]
    assert wt["wins"] == 3 and abs(wt["mean_diff"] - 0.05) < 1e-9 and wt["sd_diff"] < 1e-9
    assert comparison["real"]["detection_auroc"]["wins"] == 1  # +0.1, -0.1, -0.3
    assert comparison["copy_paste"]["dice_WT"]["wins"] == 0
    summary = {c: {k: {"mean": 0.5, "std": 0.1} for k in ("dice_WT", "dice_TC", "dice_ET", "detection_auroc")}
               for c in D.CONDITIONS}
    report = {"test_case": "x", "modalities": ["flair"], "train_cases": ["a"], "synthetic_volumes": {},
              "summary": summary, "settings": {"steps": 1, "batch": 1, "seeds": [0, 1, 2]}, "runs": runs}
    text = D.downstream_markdown(report)
    assert "Robust gain (higher in every one of at least 3 seeds): dice_WT vs real" in text
    assert "+0.050 ± 0.000 [+0.050, +0.050] (3/3)" in text
    runs["pathosyn"][0]["dice_WT"] = 0.7
    assert "Robust gain (higher in every one of at least 3 seeds): none." in D.downstream_markdown(report)


def test_fold_cases_train_on_the_training_fold_and_test_on_the_test_fold(data_root):
    from scripted_models.folds import make_folds

    folds = make_folds(str(data_root))
    train, test = D.fold_cases(data_root, quick=False)
    assert test == list(folds.test) and set(train) <= set(folds.train) and len(train) >= 10
    assert not set(train) & (set(folds.test) | set(folds.validation))
    quick_train, quick_test = D.fold_cases(data_root, quick=True)
    assert set(quick_train) <= set(folds.train) and quick_test == list(folds.test[:1])


def test_confidence_interval_of_paired_differences():
    assert D.confidence_interval([0.1]) is None
    lo, hi = D.confidence_interval([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, t(0.975, 2) = 4.303
    assert lo == pytest.approx(0.2 - 4.303 * 0.1 / np.sqrt(3), abs=1e-3) and hi == pytest.approx(0.4484, abs=1e-3)
    assert D.confidence_interval([0.05, 0.05, 0.05]) == [0.05, 0.05]


def test_scores_are_averaged_over_the_test_cases():
    settings = D.DownstreamSettings(seeds=(0,), steps=40, batch=8)
    net = D.train_segmenter([[toy_case(s, f"toy{s}") for s in range(2)]], settings, seed=0)
    cases = [toy_case(7, "a"), toy_case(8, "b")]
    mean = D.score_cases(net, cases)
    assert set(mean["per_case"]) == {"a", "b"}
    assert mean["dice_WT"] == pytest.approx(np.mean([mean["per_case"][c]["dice_WT"] for c in "ab"]), abs=1e-4)


def test_lesion_patch_pads_at_the_volume_edge():
    case = toy_case(3)
    case.labels[:] = 0
    case.labels[1:3, 2:5, 2:5] = 2  # a lesion at the corner: the patch runs off the volume
    images, labels = D.lesion_patch(case, 16)
    assert images.shape == (2, 16, 16, 16) and labels.shape == (16, 16, 16)
    assert (labels > 0).sum() == (case.labels > 0).sum()
    assert (images[:, :4] == D.BACKGROUND_Z).all()  # padding, not brain
