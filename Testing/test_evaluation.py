"""`pathosyn evaluate --quick` and `pathosyn bench --quick` (the CI-sized runs) write complete reports."""
from __future__ import annotations

import json

import numpy as np


def test_evaluate_quick_writes_markdown_json_and_plots(tmp_path, data_root):
    from scripted_models.evaluation.validation import run_validation
    from scripted_models.folds import make_folds

    out = tmp_path / "validation"
    rows = run_validation(data_root, quick=True, out=out)
    for name in ("validation.md", "validation.json", "real_vs_synthetic_test.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    assert json.loads((out / "validation.json").read_text())["settings"]["quick"] is True
    inp = rows["inpainting"]
    assert inp["anatomy_model"]["mse"] < inp["mean_fill_baseline"]["mse"]
    test = rows["realism_test"]
    folds = make_folds(str(data_root))
    assert test["cases"] == [folds.test[0]] and test["split"] == "test"
    summary = test["results"]["bundled"]["summary"]
    assert summary["pairs"] == 4  # one 4-modality case
    assert 0.0 <= summary["pass_fraction"] <= 1.0 and 0.0 <= summary["classifier_auroc"] <= 1.0
    assert 0.0 <= summary["classifier_auroc_copy"] <= 1.0  # the same classifier on the copy-paste baseline
    assert summary["median_texture_ratio"] > 0
    assert summary["outside_region_max_abs_diff"] == 0.0  # outside the blend region: the base, bit for bit
    pathar = rows["pathar"]
    assert pathar["n"] == 4 and 0.0 <= pathar["generated"]["plausible_fraction"] <= 1.0
    real = pathar["real"]  # the memorisation scale: a new real lesion < a blend of two training lesions <= 1
    assert real["mean_nearest_other_cases_dice"] < real["two_lesion_blend_dice"] <= 1.0
    text = (out / "validation.md").read_text()
    assert "pass fraction" in text and "PathAR samples" in text and "test fold" in text


def test_tissue_scale_falls_where_a_skull_widens_the_foreground():
    """The tissue around a lesion in the z-units of the healthy foreground: about 1 on a brain alone, lower when a
    bright and dark shell (scalp, skull) joins the foreground the z-units come from."""
    from scripted_models.evaluation.realism import tissue_scale
    from scripted_models.preprocess import IntensityNormalizer

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:64, :64, :64]
    r = np.sqrt((zz - 32) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2)
    brain, head = r < 24, r < 30  # the ring (6-16 mm around the lesion) lies inside the brain
    lesion = r < 4
    image = np.where(brain, 100 + rng.normal(0, 10, r.shape), 0.0)
    with_skull = image + np.where(head & ~brain, np.where(r < 27, 400.0, 10.0), 0.0)
    spacing = (1.0, 1.0, 1.0)

    def scale(array, foreground):
        z = IntensityNormalizer.fit(array, exclude=lesion, foreground=foreground).forward(array)
        return tissue_scale(z, lesion, foreground, spacing)

    assert 0.9 < scale(image, brain) < 1.1
    assert scale(with_skull, head) < 0.2


def test_clinical_scans_are_scored_apart_with_their_tissue_scale(data_root):
    """A skull-on clinical scan (t1c, 6.5 mm slices, a whole-lesion mask; in no fold) runs through the realism
    protocol: one (case, modality) pair, the scan outside the blend region bit for bit, its tissue scale reported.
    Its air is noise, so its foreground is the head above that noise (94% of the volume as "not the border's
    most frequent value")."""
    from scripted_models.cases import load_case
    from scripted_models.evaluation.realism import CLINICAL_CASES, FoldRealism, realism_markdown
    from scripted_models.folds import make_folds

    folds = make_folds(str(data_root))
    assert not set(CLINICAL_CASES) & set(folds.train + folds.validation + folds.test)
    report = FoldRealism(data_root, "clinical", cases=[CLINICAL_CASES[1]]).score(seeds=(0,), steps=2)
    summary = report["results"]["bundled"]["summary"]
    assert summary["pairs"] == 1 and set(summary["per_modality_pass"]) == {"t1c"}
    assert summary["outside_region_max_abs_diff"] == 0.0
    assert 0.4 < load_case(data_root / "cases" / CLINICAL_CASES[1]).foreground().mean() < 0.7
    assert 0.5 < report["tissue_scale"][CLINICAL_CASES[1]]["t1c"] < 1.2
    assert "clinical scans (skull on" in realism_markdown(report)


def test_bench_quick_prints_latency_memory_and_plot(tmp_path, capsys):
    from scripted_models.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0  # a folder: FOLDER/bench_pathosyn.json
    out = tmp_path / "bench_pathosyn.json"
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    rows = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "p50" in printed
    sides = {r["side"]: r for r in rows["vs_roi"]}
    assert sides[64]["roi_voxels"] > sides[32]["roi_voxels"]
    assert sides[64]["p50_s"] > sides[32]["p50_s"] > 0  # latency grows with the lesion ROI
    assert rows["roi64_double_volume"]["ratio_vs_single"] > 0
    assert rows["roi64_second_modality"]["ratio_own_grid_vs_same"] > 0  # a FLAIR on its own grid runs
    assert rows["pathar_sample_4mod"]["p50_s"] > 0 and rows["import_s"] > 0
    assert rows["peak_rss_mb_synthesize"] > 100
    assert isinstance(rows["native_cpu_bf16"], bool)  # the figures depend on it (bf16 autocast or float32)
    assert rows["cli_end_to_end"]["peak_rss_mb"] > 100 and rows["cli_end_to_end"]["default_steps_s"] > 0
    assert np.isfinite(rows["roi64_preview"]["p50_s"])
    sizes = rows["vs_model_size"]["variants"]  # a wider U-Net has more parameters and a slower step
    assert sizes["wider x1.5"]["parameters"] > 1.5 * sizes["bundled"]["parameters"]
    # both timed (their order is the bench's finding, not the test's: under a concurrent load a quick run can flip it)
    assert sizes["wider x1.5"]["step_s"] > 0 and sizes["bundled"]["step_s"] > 0
    assert "model bundled" in printed
    removal = {r["smooth_deep_fill"]: r for r in rows["pseudo_healthy"]}  # lesion removal, smoothing on and off
    assert removal[True]["p50_s"] > 0 and removal[False]["p50_s"] > 0 and "lesion removal" in printed


def test_normalisation_study_scores_a_reference_that_explains_the_lesion_level_as_perfect():
    """Lesions sitting at a fixed offset from their surrounding tissue: the local-offset normalisation predicts every
    held-out case exactly, the plain z-score does not."""
    from scripted_models.evaluation.normalisation_study import leave_one_out_errors

    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        shell = float(rng.normal(0.0, 1.0))
        rows.append({"case": f"c{k}", "modality": "flair", "shell_mean": shell, "mode": 0.0, "median": 0.0,
                     "iqr": 1.0, "edema": shell + 2.0})
    errors = leave_one_out_errors(rows)
    row = errors[("flair", "edema")]
    assert row["cases"] == 8
    assert row["offset from the tissue 4-12 mm around the lesion"] < 1e-9
    assert row["z-score over healthy brain (today)"] > 0.3
    assert errors[("all", "")]["cases"] == 8


def test_reference_levels_and_foregrounds_are_computed_once_and_handed_out_as_copies(data_root, monkeypatch):
    """The realism evaluation scores three folds against one training fold: its reference is read once per
    process, and what callers get are copies (changing them changes nothing for the next caller); a case's
    foreground likewise."""
    import scripted_models.cases as cases
    from scripted_models.evaluation import realism
    from scripted_models.evaluation.realism import training_reference

    realism._training_reference.cache_clear()
    ids = ["brats2013_pat0005", "brats18_2013_2_1"]  # a fixed pair of training cases
    loads = []
    real_load = cases.load_case
    monkeypatch.setattr(cases, "load_case", lambda folder: loads.append(folder) or real_load(folder))
    means, lesions = training_reference(ids, data_root)
    assert len(loads) == 2 and set(lesions) == set(ids) and means
    expected = (dict(means), {k: (v, set(m)) for k, (v, m) in lesions.items()})
    means.clear()
    lesions[ids[0]][1].add("not a modality")
    assert training_reference(ids, data_root) == expected and len(loads) == 2  # not read again, not changed

    case = real_load(data_root / "cases" / ids[1])
    first = case.foreground()
    first[:] = False
    again = case.foreground()
    assert again.any() and np.array_equal(again, real_load(data_root / "cases" / ids[1]).foreground())
