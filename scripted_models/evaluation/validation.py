"""PathoSyn validation study (`pathosyn evaluate`).

1. Lesion realism on the fixed test fold (headline) and on the validation fold: evaluation/realism.py.
2. Pseudo-healthy in the BraTS 2023 local-inpainting protocol (brats_gli_00001_inpainting, t1): fill the
   voided region, score SSIM / PSNR / MSE inside the inpainting mask (intensities scaled to [0, 1] by the
   0.5-99.5 percentiles of the real brain). Baseline: fill with the brain mean.
3. The MNI152 demo lesion's residual, and PathAR sample quality.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..cases import INPAINTING_CASE, VALIDATION_CASE, default_data_root
from ..labels import CORE, EDEMA, ENHANCING, SUBREGION_NAMES
from ..preprocess import dilate_mm, foreground_mask
from ..volume import read_volume
from .metrics import brats_inpainting_scores, masked_mse_psnr, ssim_in_box

SUBREGIONS = (CORE, EDEMA, ENHANCING)


def ablation_dir() -> Path:
    from ..weights import weights_dir

    return weights_dir() / "ablation"


INPAINTING_METHODS = ("anatomy_model", "anatomy_model_scanner_noise", "mean_fill_baseline")
NIFTI_FIRST_AXIS = 2  # SimpleITK arrays are (k, j, i): the challenge's SSIM slices run across i


def score_inpainting(real: np.ndarray, filled: np.ndarray, voided: np.ndarray, brain: np.ndarray,
                     hole: np.ndarray, target: np.ndarray, filled_noisy: np.ndarray | None = None) -> dict:
    """Local-inpainting scores inside `target` for the model (smooth fill, and with the scan's noise restored when
    `filled_noisy` is given) and for a brain-mean fill, two ways: ours (intensities scaled to [0, 1] by the
    0.5-99.5 percentiles of the visible brain; 3-D SSIM around the target) and, under "challenge", the BraTS 2023
    challenge's own scoring (`brats_inpainting_scores`: percentiles of the whole voided volume, 2-D SSIM)."""
    lo, hi = np.percentile(real[brain & ~hole], [0.5, 99.5])

    def scale(a):
        return np.clip((a.astype(np.float64) - lo) / (hi - lo), 0, 1)

    gt = scale(real)
    methods = [("anatomy_model", filled)]
    if filled_noisy is not None:
        methods.append(("anatomy_model_scanner_noise", filled_noisy))
    methods.append(("mean_fill_baseline", np.where(hole, real[brain & ~hole].mean(), voided)))
    challenge = brats_inpainting_scores(dict(methods), real, voided, target, NIFTI_FIRST_AXIS)
    out = {}
    for name, raw in methods:
        img = scale(raw)
        mse, psnr = masked_mse_psnr(img, gt, target)
        ssim = ssim_in_box(np.where(target, img, gt), gt, target)
        out[name] = {"ssim": round(ssim, 4), "psnr_db": round(psnr, 2), "mse": round(mse, 5),
                     "challenge": challenge[name]}
    out["mask_voxels"] = int(target.sum())
    out["voided_voxels"] = int(hole.sum())
    return out


def inpainting_protocol(data_root: Path, device: str = "auto") -> dict:
    """The BraTS 2023 inpainting case: its given healthy-tissue mask and voided t1."""
    from ..pathosyn.api import pseudo_healthy

    folder = Path(data_root) / "cases" / INPAINTING_CASE
    t1 = read_volume(folder / "t1.nii.gz")
    voided = read_volume(folder / "t1_voided.nii.gz")
    target_mask = read_volume(folder / "inpainting_mask.nii.gz").array > 0.5
    brain = foreground_mask(t1.array)
    hole = brain & (voided.array == 0)
    hole |= target_mask
    images, mask = {"t1": voided.with_array(voided.array.astype(np.float32))}, voided.with_array(hole.astype(np.uint8))
    filled, noisy = (pseudo_healthy(images, mask, device=device, scanner_noise=noise)["t1"].array
                     for noise in (False, True))
    return score_inpainting(t1.array, filled, voided.array, brain, hole, target_mask, noisy)


def healthy_tissue_mask(brain: np.ndarray, lesion: np.ndarray, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """A random ellipsoid of healthy brain (radii 8-15 mm), inside the brain and 10 mm clear of the lesion."""
    from scipy.ndimage import binary_erosion

    radii = rng.uniform(8.0, 15.0, 3)
    margin = int(np.ceil(max(radii) / min(spacing_zyx)))
    allowed = binary_erosion(brain, iterations=margin) & ~dilate_mm(lesion, 10.0 + max(radii), spacing_zyx)
    points = np.argwhere(allowed[::2, ::2, ::2]) * 2
    if not len(points):
        return np.zeros_like(brain)
    centre = points[rng.integers(len(points))]
    grid = np.ogrid[tuple(slice(0, n) for n in brain.shape)]
    dist = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, spacing_zyx, radii))
    return (dist <= 1.0) & brain


def mirrored_lesion(lesion: np.ndarray, brain: np.ndarray, spacing_zyx, margin_mm: float = 10.0) -> np.ndarray:
    """The lesion reflected left-right (last array axis) about the brain's mid-plane, kept where it lands on
    brain tissue `margin_mm` clear of the lesion: a lesion-shaped hole whose healthy truth is known."""
    columns = np.nonzero(brain.any(axis=(0, 1)))[0]
    if not len(columns) or not lesion.any():
        return np.zeros_like(brain)
    source = columns[0] + columns[-1] - np.arange(brain.shape[2])  # x -> a + b - x
    inside = (source >= 0) & (source < brain.shape[2])
    mirrored = np.zeros_like(lesion)
    mirrored[..., inside] = lesion[..., source[inside]]
    return mirrored & brain & ~dilate_mm(lesion, margin_mm, spacing_zyx)


def inpainting_holes(brain: np.ndarray, lesion: np.ndarray, spacing_zyx, rng: np.random.Generator,
                     ellipsoids: int, lesion_sized: bool) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(target, hole, lesion-sized) problems of one case: `ellipsoids` random healthy-tissue ellipsoids, then (if
    `lesion_sized`) the tumour mirrored into the healthy hemisphere; the hole voids the target and the tumour.
    Targets too small to score are left out."""
    targets = [(healthy_tissue_mask(brain, lesion, spacing_zyx, rng), False) for _ in range(ellipsoids)]
    if lesion_sized:
        targets.append((mirrored_lesion(lesion, brain, spacing_zyx), True))
    tumour = dilate_mm(lesion, 2.0, spacing_zyx) & brain
    return [(target, target | tumour, large) for target, large in targets if target.sum() >= (1000 if large else 100)]


def inpainting_test_fold(data_root: Path, cases, masks_per_case: int = 2, device: str = "auto",
                         seed: int = 0, lesion_sized: bool = False) -> dict:
    """The same protocol on test-fold cases (t1): each case's tumour and a random healthy-tissue ellipsoid are
    voided and inpainted; scored inside the healthy ellipsoid only (where the truth is known). lesion_sized:
    one hole per case instead, the case's tumour mirrored into the healthy hemisphere (the size of the holes
    a synthesis fills)."""
    from ..cases import load_case
    from ..pathosyn.api import pseudo_healthy

    rng = np.random.default_rng(seed)
    rows = []
    for case_id in cases:
        case = load_case(Path(data_root) / "cases" / case_id)
        if "t1" not in case.images:
            continue
        t1 = case.images["t1"]
        brain = case.foreground()
        lesion = case.seg > 0
        for target, hole, _ in inpainting_holes(brain, lesion, case.spacing_zyx, rng,
                                                0 if lesion_sized else masks_per_case, lesion_sized):
            voided = np.where(hole, 0, t1.array).astype(np.float32)
            images, mask = {"t1": t1.with_array(voided)}, t1.with_array(hole.astype(np.uint8))
            filled, noisy = (pseudo_healthy(images, mask, device=device, scanner_noise=noise)["t1"].array
                             for noise in (False, True))
            rows.append({"case": case_id, **score_inpainting(t1.array, filled, voided, brain, hole, target, noisy)})
    def mean(scores):  # the mean of each number over the rows (the nested challenge scores apart)
        return {key: round(float(np.mean([s[key] for s in scores])), 4) for key in scores[0] if key != "challenge"}

    summary = {name: {**mean([r[name] for r in rows]), "challenge": mean([r[name]["challenge"] for r in rows])}
               for name in INPAINTING_METHODS} if rows else {}
    return {"cases": list(cases), "masks": len(rows), "lesion_sized": lesion_sized, "summary": summary, "rows": rows}


def demo_residual(seeds=(0, 1, 2), steps: int | None = None, device: str = "auto",
                  deviation_weights=None) -> dict:
    """The MNI152 demo lesion: mean residual per sub-region and its roughness (std of the 3D Laplacian inside the
    lesion, MNI intensity units; salt-and-pepper noise left by an undertrained diffusion model raises it)."""
    from scipy.ndimage import laplace

    from ..pathosyn.api import synthesize_lesion
    from ..templates import demo_lesion, mni_t1

    t1, mask = mni_t1(), demo_lesion()
    labels = mask.array
    rough, means = [], {SUBREGION_NAMES[k].split()[0]: [] for k in SUBREGIONS}
    for seed in seeds:
        res = synthesize_lesion({"t1": t1}, mask, seed=seed, steps=steps, device=device,
                                deviation_weights=deviation_weights).residuals["t1"].array
        rough.append(float(laplace(res.astype(np.float64))[labels > 0].std()))
        for k in SUBREGIONS:
            if (labels == k).any():
                means[SUBREGION_NAMES[k].split()[0]].append(float(res[labels == k].mean()))
    base = float(laplace(t1.array.astype(np.float64))[labels > 0].std())  # the template's own texture there
    return {"seeds": list(seeds), "laplacian_std_in_lesion": round(float(np.mean(rough)), 4),
            "base_laplacian_std_in_lesion": round(base, 4),
            "mean_residual": {k: round(float(np.mean(v)), 4) for k, v in means.items() if v}}


def pathar_quality(data_root: Path, n: int = 8, seed: int = 0, work: Path | None = None,
                   device: str = "auto") -> dict:
    """PathAR samples scored against the real training patches (plausibility, diversity, memorisation,
    sub-region intensity signs and ordering per modality)."""
    from ..labels import MODALITIES
    from ..pathar.api import load_models, sample_pairs
    from ..pathar.quality import quality_report, reference_patches

    model = load_models(device)
    patches = reference_patches(model, Path(work or Path.home() / ".cache" / "pathosyn" / "pathar_patches"),
                                data_root)
    pairs = sample_pairs(list(MODALITIES), n, seed, device=device)
    report = quality_report(pairs, patches, list(MODALITIES))
    # reference for memorisation: how close an unseen real lesion (the held-out case) comes to the training set
    report["held_out_real_nearest_train_dice"] = report["real"]["nearest_other_cases_dice"][VALIDATION_CASE]
    report["nearest_train_dice_per_sample"] = [r["nearest_train_dice"] for r in report["samples"]]
    report.pop("samples", None)
    report["n"] = n
    return report


def run_validation(data_root=None, samples: int = 3, steps: int | None = None, quick: bool = False,
                   out: Path | None = None, device: str = "auto", pathar_n: int = 8,
                   compare_weights: dict | None = None, bundled_label: str = "bundled",
                   compare_uncalibrated: bool = False) -> dict:
    """Realism on the fixed test fold (headline), the validation fold and the clinical-like scans in no fold (skull
    on, thick slices), the inpainting protocol, the demo residual and PathAR quality. quick (for CI): one test case,
    one seed, 3 DDIM steps, no validation fold or clinical scans, 4 PathAR samples. compare_weights {label:
    folder}: also score these deviation weights on the same bases (a paired before/after table); bundled_label
    names the bundled weights in it. compare_uncalibrated: also score the bundled weights without the calibration
    (population pull 0, smooth pseudo-healthy base)."""
    from .realism import CLINICAL_CASES, UNCALIBRATED, realism_study

    data_root = Path(data_root or default_data_root())
    if quick:
        samples, steps, pathar_n = 1, steps or 3, min(pathar_n, 4)
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = tuple(range(samples))
    weights = {bundled_label: None, **{label: Path(folder) for label, folder in (compare_weights or {}).items()}}
    if compare_uncalibrated:
        weights["uncalibrated"] = UNCALIBRATED
    test_cases = None
    if quick:
        from ..folds import make_folds

        test_cases = list(make_folds(str(data_root)).test[:1])
    rows = {"realism_test": realism_study(data_root, "test", seeds, steps, device, weights, test_cases,
                                          figure=out / "real_vs_synthetic_test.png" if out else None)}
    if not quick:
        rows["realism_validation"] = realism_study(data_root, "validation", seeds, steps, device, weights)
        rows["realism_clinical"] = realism_study(data_root, "clinical", seeds, steps, device, weights,
                                                 list(CLINICAL_CASES))
    rows["inpainting"] = inpainting_protocol(data_root, device)
    if not quick:
        from ..folds import make_folds

        test = make_folds(str(data_root)).test
        rows["inpainting_test_fold"] = inpainting_test_fold(data_root, test, device=device)
        rows["inpainting_test_fold_lesion_sized"] = inpainting_test_fold(data_root, test, device=device,
                                                                          lesion_sized=True)
    rows["demo_residual"] = demo_residual(seeds=(0,) if quick else (0, 1, 2), steps=steps, device=device)
    if pathar_n:
        rows["pathar"] = pathar_quality(data_root, pathar_n, device=device)
    rows["settings"] = {"samples": samples, "steps": steps, "quick": quick, "pathar_n": pathar_n,
                        "wall_s": round(time.perf_counter() - t0, 1)}
    if out:
        from ..pathosyn.commands import write_json_atomic

        write_json_atomic(rows, out / "validation.json")
        tmp = out / ".validation.md.tmp"
        tmp.write_text(validation_markdown(rows))
        tmp.replace(out / "validation.md")
    return rows


def validation_markdown(rows: dict) -> str:
    inp = rows["inpainting"]
    header = ["| method | SSIM | PSNR (dB) | MSE | challenge scoring: SSIM | PSNR (dB) | PSNR, range 1 (dB) | MSE |",
              "|---|---|---|---|---|---|---|---|"]

    def row(name, r):
        c = r["challenge"]
        return (f"| {name} | {r['ssim']} | {r['psnr_db']} | {r['mse']} | {c['ssim']} | {c['psnr_db']} | "
                f"{c['psnr_01_db']} | {c['mse']} |")

    lines = ["## Pseudo-healthy: BraTS 2023 local-inpainting protocol (brats_gli_00001, t1)", "",
             "Ours: intensities scaled by the 0.5-99.5 percentiles of the visible brain, 3-D SSIM around the mask. "
             "Challenge scoring: the BraTS 2023 challenge's own code path (percentiles of the whole voided volume, "
             "2-D SSIM per slice), the one its leaderboards use; on the cropped test-fold volumes its percentiles "
             "depend on the crop.", ""] + header
    lines += [row(name, inp[name]) for name in INPAINTING_METHODS if name in inp]
    for key, holes in (("inpainting_test_fold", "random healthy-tissue ellipsoids of radii 8-15 mm"),
                       ("inpainting_test_fold_lesion_sized", "lesion-sized holes (the case's tumour mirrored into "
                                                             "the healthy hemisphere)")):
        tf = rows.get(key, {})
        if not tf.get("summary"):
            continue
        lines += ["", f"Same protocol on the test fold (t1; {tf['masks']} {holes} in {len(tf['cases'])} cases, "
                  "tumour voided too; mean):", ""] + header
        lines += [row(name, r) for name, r in tf["summary"].items()]
    from .realism import realism_markdown

    lines = [realism_markdown(rows["realism_test"]), ""] + lines
    for key in ("realism_validation", "realism_clinical"):
        if key in rows:
            lines += ["", realism_markdown(rows[key])]
    if "demo_residual" in rows:
        d = rows["demo_residual"]
        lines += ["## MNI152 demo lesion: residual", "",
                  f"Roughness (std of the 3D Laplacian of the residual inside the lesion, MNI units, seeds "
                  f"{d['seeds']}): {d['laplacian_std_in_lesion']} (the MNI T1 itself in the same region: "
                  f"{d.get('base_laplacian_std_in_lesion', '-')}); mean residual per sub-region: "
                  f"{d['mean_residual']}.", ""]
    if "pathar" in rows:
        pa = rows["pathar"]
        g, r = pa["generated"], pa["real"]
        lines += [f"## PathAR samples (n = {pa['n']}, all four modalities)", "",
                  "| | generated | real training lesions |", "|---|---|---|",
                  f"| plausible (one main component, core/enhancing inside) | {g['plausible_fraction']} | "
                  f"{r['plausible_fraction']} |",
                  f"| mean pairwise Dice (diversity) | {g.get('mean_pairwise_dice')} | {r['mean_pairwise_dice']} |",
                  f"| mean nearest-training Dice (memorisation) | {g['mean_nearest_train_dice']} "
                  f"(max {g.get('max_nearest_train_dice', '-')}) | "
                  f"{r.get('mean_nearest_other_cases_dice', '-')} (each real case against the other cases; "
                  f"held-out case {pa.get('held_out_real_nearest_train_dice', '-')}) |",
                  f"| a training lesion in a new pose: nearest Dice to the other poses | | "
                  f"{r.get('same_lesion_new_pose_dice', '-')} |",
                  f"| a blend of two training lesions (signed-distance morph): nearest Dice | | "
                  f"{r.get('two_lesion_blend_dice', '-')} |",
                  f"| memorisation index (0: as new as a real lesion, 1: as close as a re-posed training lesion) | "
                  f"{g.get('memorisation_index', '-')} | |",
                  f"| samples closer to a training lesion than any real lesion is to another | "
                  f"{g.get('closer_than_any_real_fraction', '-')} | |",
                  f"| mean volume (ml) | {g.get('mean_volume_ml')} | {r['mean_volume_ml']} |", "",
                  "| modality | sub-region | real contrast | generated | sign agrees |", "|---|---|---|---|---|"]
        for row in pa["intensity"]:
            if "ordering_agreement" in row:
                lines.append(f"| {row['modality']} | ordering agreement | | {row['ordering_agreement']} | |")
            else:
                lines.append(f"| {row['modality']} | {row['subregion']} | {_num(row['real'])} | "
                             f"{_num(row['generated'])} | {row['sign_agrees']} |")
        lines.append("")
    if "settings" in rows:
        lines += [f"Settings: {json.dumps(rows['settings'])}", ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_validation(rows: dict) -> None:
    print(validation_markdown(rows))


