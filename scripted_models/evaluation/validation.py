"""PathoSyn validation study.

1. Pseudo-healthy in the BraTS 2023 local-inpainting protocol (brats_gli_00001_inpainting, t1): fill the
   voided region, score SSIM / PSNR / MSE inside the inpainting mask (intensities scaled to [0, 1] by the
   0.5-99.5 percentiles of the real brain). Baseline: fill with the brain mean.
2. Lesion realism on the held-out case (brats2013_pat0003, flair + t1c): build its pseudo-healthy base,
   synthesize with the true mask, compare with the real lesion per sub-region (z-units) against
   (a) constant fill with the training-set mean per sub-region, (b) copy-paste of another case's residual,
   (c) an equal-budget ablation, when its weights exist (weights/ablation/<variant>, see evaluation/ablation.py):
   the residual model (pathosyn), `holistic` (diffusion on the whole ROI, no residual) and `mask_only` (no
   anatomy branch), each trained from scratch with the same steps and crops.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..cases import INPAINTING_CASE, VALIDATION_CASE, default_data_root, list_cases, load_case
from ..errors import WeightsError
from ..labels import CORE, EDEMA, ENHANCING, SUBREGION_NAMES
from ..pathosyn.deviation import VARIANTS
from ..preprocess import IntensityNormalizer, blend_weight, dilate_mm, foreground_mask
from ..volume import read_volume
from .metrics import masked_mse_psnr, region_stats, ssim_in_box

SUBREGIONS = (CORE, EDEMA, ENHANCING)
TRAIN_CASES_FOR_MEANS = ("brats2013_pat0004", "brats2013_pat0005", "brats2013_pat0006", "tcga_du_7294",
                         "brats_pkg_case")
COPY_SOURCE = "brats2013_pat0004"  # same modalities as the validation case


def ablation_dir() -> Path:
    from ..weights import weights_dir

    return weights_dir() / "ablation"


def inpainting_protocol(data_root: Path, device: str = "auto") -> dict:
    from ..pathosyn.api import pseudo_healthy

    folder = Path(data_root) / "cases" / INPAINTING_CASE
    t1 = read_volume(folder / "t1.nii.gz")
    voided = read_volume(folder / "t1_voided.nii.gz")
    target_mask = read_volume(folder / "inpainting_mask.nii.gz").array > 0.5
    brain = foreground_mask(t1.array)
    hole = brain & (voided.array == 0)
    hole |= target_mask
    filled = pseudo_healthy({"t1": voided.with_array(voided.array.astype(np.float32))},
                            voided.with_array(hole.astype(np.uint8)), device=device)["t1"].array
    lo, hi = np.percentile(t1.array[brain & ~hole], [0.5, 99.5])

    def scale(a):
        return np.clip((a.astype(np.float64) - lo) / (hi - lo), 0, 1)

    gt, pred = scale(t1.array), scale(filled)
    mean_fill = scale(np.where(hole, t1.array[brain & ~hole].mean(), voided.array))
    out = {}
    for name, img in (("anatomy_model", pred), ("mean_fill_baseline", mean_fill)):
        mse, psnr = masked_mse_psnr(img, gt, target_mask)
        ssim = ssim_in_box(np.where(target_mask, img, gt), gt, target_mask)
        out[name] = {"ssim": round(ssim, 4), "psnr_db": round(psnr, 2), "mse": round(mse, 5)}
    out["mask_voxels"] = int(target_mask.sum())
    out["voided_voxels"] = int(hole.sum())
    return out


def training_means(data_root: Path) -> dict:
    """Mean z-scored intensity per (modality, sub-region) over the training cases."""
    sums: dict = {}
    for folder in list_cases(data_root):
        if folder.name not in TRAIN_CASES_FOR_MEANS:
            continue
        case = load_case(folder)
        for m, img in case.normalized().items():
            for k in SUBREGIONS:
                sel = case.seg == k
                if sel.any():
                    s = sums.setdefault((m, k), [0.0, 0])
                    s[0] += float(img[sel].sum())
                    s[1] += int(sel.sum())
    return {key: s / n for key, (s, n) in sums.items()}


def _copy_paste_residual(data_root: Path, target_shape, target_centroid, modalities, device) -> dict:
    """Residual (real - pseudo-healthy) of another case, translated so the lesion centroids coincide."""
    from ..pathosyn.api import pseudo_healthy

    case = load_case(Path(data_root) / "cases" / COPY_SOURCE)
    lesion = case.seg > 0
    ph = pseudo_healthy(case.images, case.reference.with_array(case.seg), device=device)
    fg = case.foreground()
    shift = np.round(np.array(target_centroid) - np.argwhere(lesion).mean(0)).astype(int)
    out = {}
    for m in modalities:
        if m not in case.images:
            continue
        norm = IntensityNormalizer.fit(case.images[m].array, exclude=lesion, foreground=fg)
        resid = norm.forward(case.images[m].array) - norm.forward(ph[m].array)
        out[m] = np.roll(resid, tuple(shift), axis=(0, 1, 2))[: target_shape[0], : target_shape[1], : target_shape[2]]
    return out


def _validation_case(data_root: Path, device: str):
    """(case, mask, normalisers, real z-scores, pseudo-healthy base, its z-scores) of the held-out case."""
    from ..pathosyn.api import pseudo_healthy

    case = load_case(Path(data_root) / "cases" / VALIDATION_CASE)
    lesion = case.seg > 0
    fg = case.foreground()
    mask = case.reference.with_array(case.seg)
    norms = {m: IntensityNormalizer.fit(v.array, exclude=lesion, foreground=fg) for m, v in case.images.items()}
    real = {m: norms[m].forward(v.array) for m, v in case.images.items()}
    ph = pseudo_healthy(case.images, mask, device=device)
    ph_z = {m: norms[m].forward(v.array) for m, v in ph.items()}
    return case, mask, norms, real, ph, ph_z


def _region_summary(runs: list[dict], real: dict, seg: np.ndarray) -> tuple[dict, dict]:
    """Per sub-region x modality stats averaged over runs, and their mean over regions."""
    rows = {}
    for m in real:
        for k in SUBREGIONS:
            sel = seg == k
            if sel.sum() < 50:
                continue
            stats = [region_stats(r[m], real[m], sel) for r in runs if m in r]
            rows[f"{m}/{SUBREGION_NAMES[k].split()[0]}"] = {key: float(np.mean([s[key] for s in stats]))
                                                          for key in stats[0]}
    summary = {key: round(float(np.mean([r[key] for r in rows.values()])), 4)
               for key in ("mean_err", "std_err", "wasserstein", "glcm_contrast_err")}
    return rows, summary


def sampler_sweep(data_root: Path, settings=(("trailing", 2), ("trailing", 5), ("trailing", 10),
                                             ("monai", 5), ("monai", 10), ("monai", 20)),
                  samples: int = 3, device: str = "auto") -> list[dict]:
    """PathoSyn realism on the held-out case against DDIM timestep spacing and step count (same weights)."""
    from dataclasses import replace

    from ..pathosyn.api import _model, synthesize_lesion
    from ..runtime import pick_device

    case, mask, norms, real, ph, _ = _validation_case(data_root, device)
    model = _model("deviation", pick_device(device))
    original = model.cfg
    out = []
    try:
        for spacing, steps in settings:
            model.cfg = replace(original, timestep_spacing=spacing)
            t = time.perf_counter()
            runs = [{m: norms[m].forward(v.array) for m, v in
                     synthesize_lesion(ph, mask, seed=k, steps=steps, device=device).images.items()}
                    for k in range(samples)]
            seconds = (time.perf_counter() - t) / samples
            out.append({"spacing": spacing, "steps": steps, **_region_summary(runs, real, case.seg)[1],
                        "synthesize_s_per_sample": round(seconds, 2)})
    finally:
        model.cfg = original
    return out


def lesion_realism(data_root: Path, samples: int = 3, steps: int | None = None, device: str = "auto",
                   figure: Path | None = None) -> dict:
    from ..pathosyn.api import synthesize_lesion

    case, mask, norms, real, ph, ph_z = _validation_case(data_root, device)
    seg = case.seg
    lesion = seg > 0
    sp = case.spacing_zyx
    weight = blend_weight(lesion, dilate_mm(lesion, 6.0, sp), sp)

    methods: dict[str, list[dict[str, np.ndarray]]] = {}
    t = time.perf_counter()
    runs = []
    for k in range(samples):
        res = synthesize_lesion(ph, mask, seed=k, steps=steps, device=device)
        runs.append({m: norms[m].forward(v.array) for m, v in res.images.items()})
    synth_time = (time.perf_counter() - t) / samples
    methods["pathosyn"] = runs
    missing_baselines = {}
    for variant in VARIANTS:
        folder = ablation_dir() / variant
        try:
            methods[f"ablation_{variant}"] = [
                {m: norms[m].forward(v.array) for m, v in synthesize_lesion(
                    ph, mask, seed=k, steps=steps, device=device, deviation_weights=folder).images.items()}
                for k in range(samples)]
        except WeightsError as exc:
            missing_baselines[f"ablation_{variant}"] = str(exc)
    means = training_means(data_root)
    const = {}
    for m in real:
        img = ph_z[m].copy()
        for k in SUBREGIONS:
            img[seg == k] = means.get((m, k), 0.0)
        const[m] = img
    methods["constant_fill"] = [const]
    centroid = np.argwhere(lesion).mean(0)
    resid = _copy_paste_residual(data_root, seg.shape, centroid, list(real), device)
    methods["copy_paste"] = [{m: ph_z[m] + weight * resid[m] for m in real if m in resid}]

    table, summary = {}, {}
    for name, runs in methods.items():
        table[name], summary[name] = _region_summary(runs, real, seg)
    outside = {m: float(np.abs(methods["pathosyn"][0][m] - ph_z[m])[~dilate_mm(lesion, 6.0, sp)].max()) for m in real}
    # two-sample classifier test: real vs synthetic lesion patches at the same centres
    from .two_sample import axial_patches, classifier_auroc, lesion_centres

    centres = lesion_centres(lesion, seed=0)
    mods = sorted(real)
    real_patches = axial_patches([real[m] for m in mods], centres)
    for name, runs in methods.items():
        if all(m in runs[0] for m in mods):
            summary[name]["classifier_auroc"] = round(classifier_auroc(
                real_patches, axial_patches([runs[0][m] for m in mods], centres)), 3)
    if figure is not None:
        from .plots import lesion_slices

        lesion_slices(real, {name: runs[0] for name, runs in methods.items()}, seg, figure)
    return {"case": VALIDATION_CASE, "samples": samples, "synthesize_s_per_sample": round(synth_time, 2),
            "per_region": table, "summary": summary, "outside_region_max_abs_diff": outside,
            "missing_baselines": missing_baselines,
            "classifier_patches": int(len(centres))}


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
                   out: Path | None = None, device: str = "auto", pathar_n: int = 8) -> dict:
    """quick (for CI): one PathoSyn sample, 3 DDIM steps, 4 PathAR samples."""
    data_root = Path(data_root or default_data_root())
    if quick:
        samples, steps, pathar_n = 1, steps or 3, min(pathar_n, 4)
    out = Path(out) if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = {"inpainting": inpainting_protocol(data_root, device),
            "lesion_realism": lesion_realism(data_root, samples, steps, device,
                                             figure=out / "lesion_slices.png" if out else None)}
    rows["sampler_sweep"] = (sampler_sweep(data_root, (("trailing", 2), ("monai", 2)), 1, device) if quick
                             else sampler_sweep(data_root, samples=samples, device=device))
    rows["demo_residual"] = demo_residual(seeds=(0,) if quick else (0, 1, 2), steps=steps, device=device)
    if pathar_n:
        rows["pathar"] = pathar_quality(data_root, pathar_n, device=device)
    rows["settings"] = {"samples": samples, "steps": steps, "quick": quick, "pathar_n": pathar_n,
                        "wall_s": round(time.perf_counter() - t0, 1)}
    if out:
        from ..pathosyn.commands import write_json_atomic
        from .plots import validation_bars

        validation_bars(rows, out / "realism_summary.png")
        write_json_atomic(rows, out / "validation.json")
        tmp = out / ".validation.md.tmp"
        tmp.write_text(validation_markdown(rows))
        tmp.replace(out / "validation.md")
    return rows


def validation_markdown(rows: dict) -> str:
    inp = rows["inpainting"]
    lines = ["## Pseudo-healthy: BraTS 2023 local-inpainting protocol (brats_gli_00001, t1)", "",
             "| method | SSIM | PSNR (dB) | MSE |", "|---|---|---|---|"]
    for name in ("anatomy_model", "mean_fill_baseline"):
        r = inp[name]
        lines.append(f"| {name} | {r['ssim']} | {r['psnr_db']} | {r['mse']} |")
    lr = rows["lesion_realism"]
    lines += ["", f"## Lesion realism on {lr['case']} (z-units, lower is better, mean over sub-regions x modalities)",
              "", "| method | mean err | std err | Wasserstein | GLCM contrast err | classifier AUROC |",
              "|---|---|---|---|---|---|"]
    for name, s in lr["summary"].items():
        lines.append(f"| {name} | {s['mean_err']} | {s['std_err']} | {s['wasserstein']} | {s['glcm_contrast_err']} "
                     f"| {s.get('classifier_auroc', '-')} |")
    for name, why in lr.get("missing_baselines", {}).items():
        lines.append(f"| {name} | not evaluated: {why} | | | | |")
    lines += ["", f"Classifier AUROC: logistic regression on texture features of {lr.get('classifier_patches')} "
              "axial 16x16 patches per method (real vs synthetic, same centres, 5-fold grouped by centre); "
              "0.5 = indistinguishable.", "", "![summary](realism_summary.png)", "",
              "![lesion slices](lesion_slices.png)"]
    lines += ["", "Per sub-region (mean err / Wasserstein):", "", "| region | " +
              " | ".join(lr["per_region"]) + " |", "|---|" + "---|" * len(lr["per_region"])]
    regions = list(next(iter(lr["per_region"].values())))
    for reg in regions:
        cells = [f"{lr['per_region'][n][reg]['mean_err']:.3f} / {lr['per_region'][n][reg]['wasserstein']:.3f}"
                 if reg in lr["per_region"][n] else "-" for n in lr["per_region"]]
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    if all("glcm_contrast_real" in r for rows_ in lr["per_region"].values() for r in rows_.values()):
        lines += ["", "GLCM contrast per sub-region (real, then each method; higher = grainier):", "",
                  "| region | real | " + " | ".join(lr["per_region"]) + " |",
                  "|---|---|" + "---|" * len(lr["per_region"])]
        for reg in regions:
            real = next(r[reg]["glcm_contrast_real"] for r in lr["per_region"].values() if reg in r)
            cells = [f"{lr['per_region'][n][reg]['glcm_contrast_syn']:.2f}" if reg in lr["per_region"][n] else "-"
                     for n in lr["per_region"]]
            lines.append(f"| {reg} | {real:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Outside-region max |output - base|: {lr['outside_region_max_abs_diff']}", ""]
    if rows.get("sampler_sweep"):
        lines += ["## PathoSyn sampler: DDIM timestep spacing and steps (same weights, same case)", "",
                  "\"monai\" is MONAI 1.6's default: timesteps at linspace(999, 0, N), while its DDIM step jumps "
                  "by 1000 // N, so the model is told timesteps that do not match the sample's noise level and the "
                  "last step is spent at t = 0. \"trailing\" (the default here) is a uniform grid of stride "
                  "1000 // N from t = 999 whose last step lands on the clean sample.", "",
                  "| spacing | steps | mean err | std err | Wasserstein | GLCM contrast err | s per sample |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows["sampler_sweep"]:
            lines.append(f"| {r['spacing']} | {r['steps']} | {r['mean_err']} | {r['std_err']} | {r['wasserstein']} "
                         f"| {r['glcm_contrast_err']} | {r['synthesize_s_per_sample']} |")
        lines.append("")
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


