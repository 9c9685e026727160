"""PathAR judged against the real lesions of the fixed test fold (folds.py), which no PathAR weights saw.

For each weights folder (bundled by default; `--weights LABEL=DIR` adds others, for a before/after table on
the same test fold), samples are drawn at several seeds (all four modalities) and scored against:
  * the model's own training lesions (rigid poses of the cases named in its card, lesion masks included):
    nearest-training Dice of the samples, and the same for the test fold's real lesions (their plain patches):
    a new lesion should be as far from the training set as a held-out real lesion is;
  * the memorisation index with the test-fold lesions as the "new lesion" anchor: 0 = samples as far from the
    training set as test-fold lesions, 1 = as close as a training lesion in a new pose (quality.py);
  * plausibility (one main component, TC attached), diversity (mean pairwise Dice) and sub-region composition
    (shares of core, edema and enhancing) beside the real lesions';
  * appearance: sign of each sub-region's contrast and the ordering of the sub-region means per modality, against
    the test fold's real patches, per seed (12 signs = 3 sub-regions x 4 modalities);
  * a segmenter trained on the real training fold (downstream.py's 2D UNet, flair + t1c, 2 mm) should find the
    generated masks in the generated images: whole-lesion Dice, beside its Dice on the test fold's real patches.

With `--held-out validation` the same report scores the samples against the validation fold instead (sampling
choices that the test fold must not make).

    python -m scripted_models.pathar.test_fold --weights new=.train/pathar_folds/weights --out docs/pathar
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..labels import MODALITIES, SUBREGION_NAMES
from .quality import (
    SHORT,
    SUBREGIONS,
    clear_cells,
    clear_pairs,
    composition_error,
    mask_plausibility,
    mean_contrasts,
    mean_pairwise_dice,
    memorisation_index,
    nearest_dice,
    ordering_agreement,
    same_lesion_new_pose,
    subregion_shares,
)

SEGMENTER_MODALITIES = ("flair", "t1c")
# Chosen on the validation fold's real patches (2026-12-03): 400 steps found 0.52-0.59 of the real lesions, below
# the 0.65 the generated ones are asked for; 1600 steps find 0.72.
SEGMENTER_STEPS = 1600


def model_training_cases(cards: dict) -> set[str]:
    """Case ids the weights were trained on (images and structure-only masks), from their cards."""
    seen = set()
    for card in cards.values():
        for source in card.get("data", []):
            seen.add(source.split(":")[0] if not source.startswith("mask:") else source)
        seen |= set(card.get("structure_only_data", []))
    return seen


def reference_patches(cards: dict, work: Path, data_root=None, held_out: str = "test"):
    """Rigid patches of the model's training cases plus one held-out fold, on the model's patch grid: the test
    fold (is_test, and is_val) or the validation fold (is_val; the test fold left out), for choices that must not
    see the test fold."""
    from .api import TRANSFORMER_NAME
    from .data import MASK_PREFIX, PatchConfig, build_patches, patch_sources

    if held_out not in ("test", "validation"):
        raise ValueError(f"held_out must be 'test' or 'validation', not {held_out!r}")
    role_kept = "test" if held_out == "test" else "val"
    cfg = PatchConfig.from_dict(cards[TRANSFORMER_NAME]["patch"])
    seen = model_training_cases(cards)
    cfg = replace(cfg, split="folds", with_test=held_out == "test", elastic_per_case=0, blend_per_case=0,
                  lesion_masks=any(c.startswith(MASK_PREFIX) for c in seen), exclude=())
    unseen = [case for case, _, role in patch_sources(cfg, data_root) if role != role_kept and case not in seen]
    return build_patches(Path(work), replace(cfg, exclude=tuple(sorted(unseen))), data_root, verbose=False)


def held_out_mask(patches) -> np.ndarray:
    """(P,) bool: the held-out fold's patches of a reference_patches set (the test fold, else the validation fold)."""
    return patches.is_test if patches.is_test.any() else patches.is_val


def patch_contrasts(patches, patch_ids) -> dict[str, dict[int, float]]:
    """{modality: {sub-region: mean contrast}} over the images of the given patches."""
    chosen = np.isin(patches.image_patch, patch_ids)
    out = {}
    for k, mod in enumerate(MODALITIES):
        idx = np.nonzero(chosen & (patches.image_modality == k))[0]
        out[mod] = mean_contrasts((patches.masks[patches.image_patch[i]], patches.images[i].astype(np.float32))
                                  for i in idx)
    return out


def test_fold_contrasts(patches) -> dict[str, dict[int, float]]:
    """The held-out fold's real patches (all their poses)."""
    return patch_contrasts(patches, np.nonzero(held_out_mask(patches))[0])


def test_fold_case_contrasts(patches) -> list[dict[str, dict[int, float]]]:
    """patch_contrasts of each held-out case (all its poses): what clear_cells and clear_pairs bootstrap over."""
    test = np.nonzero(held_out_mask(patches))[0]
    cases = sorted(set(patches.patch_case[test]))
    return [patch_contrasts(patches, test[patches.patch_case[test] == c]) for c in cases]


def compare_contrasts(generated: dict[str, dict[int, float]], real: dict[str, dict[int, float]],
                      clear: set[tuple[str, int]] | None = None,
                      pairs: set[tuple[str, int, int]] | None = None) -> dict:
    """Sign agreement per (modality, sub-region), ordering agreement per modality and the mean absolute contrast
    error of `generated` contrasts against `real` ones; with `clear` (quality.clear_cells) also the signs counted
    only where the real contrast is clear of zero, with `pairs` (quality.clear_pairs) the ordering over the pairs
    whose real difference is clear of zero (None for a modality without one)."""
    signs, clear_signs, ordering, ordering_clear, rows, errors = 0, 0, {}, {}, [], []
    for mod in MODALITIES:
        gen = generated.get(mod, {})
        for c in SUBREGIONS:
            r, g = real[mod].get(c), gen.get(c)
            agrees = None if r is None or g is None else bool(np.sign(r) == np.sign(g))
            signs += bool(agrees)
            clear_signs += bool(agrees) and clear is not None and (mod, c) in clear
            if agrees is not None:
                errors.append(abs(r - g))
            rows.append({"modality": mod, "subregion": SUBREGION_NAMES[c], "real": None if r is None else round(r, 3),
                         "generated": None if g is None else round(g, 3), "sign_agrees": agrees,
                         **({"clear_of_zero": (mod, c) in clear} if clear is not None else {})})
        ordering[mod] = ordering_agreement(real[mod], gen)
        if pairs is not None:
            ordering_clear[mod] = ordering_agreement(real[mod], gen, {(a, b) for m, a, b in pairs if m == mod})
    out = {"signs_agree": signs, "signs_total": len(MODALITIES) * len(SUBREGIONS), "ordering": ordering,
           "contrast_error": round(float(np.mean(errors)), 3) if errors else None, "contrasts": rows}
    if clear is not None:
        out.update(signs_agree_clear=clear_signs, signs_total_clear=len(clear))
    if pairs is not None:
        out.update(ordering_clear=ordering_clear)
    return out


def appearance_agreement(samples, real: dict[str, dict[int, float]],
                         clear: set[tuple[str, int]] | None = None,
                         pairs: set[tuple[str, int, int]] | None = None) -> dict:
    """compare_contrasts for one seed's samples: (mask, {modality: image}) pairs, pooled."""
    samples = list(samples)
    return compare_contrasts({mod: mean_contrasts((mask, images[mod]) for mask, images in samples)
                              for mod in MODALITIES}, real, clear, pairs)


def training_lesions_as_samples(patches, real: dict[str, dict[int, float]],
                                clear: set[tuple[str, int]] | None = None,
                                pairs: set[tuple[str, int, int]] | None = None) -> dict:
    """What real lesions score on the appearance targets: the model's training lesions (rigid poses, pooled as a
    seed's samples are) compared with the test fold, and per (modality, sub-region) the fraction of training
    cases whose own contrast has the test fold's sign. A model that renders its training lesions faithfully
    scores about this; the targets ask for more only where the test fold differs from them."""
    rigid = np.nonzero(~patches.is_val & ~patches.is_test & ~patches.is_elastic & ~patches.is_blend)[0]
    pooled = compare_contrasts(patch_contrasts(patches, rigid), real, clear, pairs)
    cases = {patches.patch_case[p] for p in rigid}
    per_case = [patch_contrasts(patches, rigid[patches.patch_case[rigid] == c]) for c in cases]
    share = {}
    for mod in MODALITIES:
        for c in SUBREGIONS:
            signs = [np.sign(case[mod][c]) for case in per_case if c in case[mod]]
            if signs and real[mod].get(c) is not None:
                share[f"{mod} {SUBREGION_NAMES[c]}"] = round(float(np.mean([v == np.sign(real[mod][c])
                                                                             for v in signs])), 2)
    return {"signs_agree": pooled["signs_agree"], "signs_agree_clear": pooled.get("signs_agree_clear"),
            "ordering": pooled["ordering"], "ordering_clear_of_zero": pooled.get("ordering_clear"),
            "contrast_error": pooled["contrast_error"], "cases_with_the_test_sign": share,
            "contrasts": pooled["contrasts"]}


def train_real_segmenter(data_root=None, steps: int = SEGMENTER_STEPS, seed: int = 0, device: str = "auto"):
    """downstream.py's segmenter on the training fold's real cases only (flair + t1c, axial slices at 2 mm)."""
    from ..cases import default_data_root
    from ..evaluation.downstream import DownstreamSettings, fold_cases, real_grid_case, train_segmenter

    root = Path(data_root or default_data_root())
    real = [real_grid_case(root / "cases" / name) for name in fold_cases(root, quick=False)[0]]
    return train_segmenter([real], DownstreamSettings(steps=steps), seed, device), [c.name for c in real]


def segmenter_dice(net, masks, images) -> list[float]:
    """Whole-lesion Dice of the segmenter on (S, S, S) patches: images {flair, t1c} -> axial slices."""
    from ..evaluation.downstream import dice, predict_slices

    out = []
    for mask, imgs in zip(masks, images):
        x = np.stack([imgs[m] for m in SEGMENTER_MODALITIES]).transpose(1, 0, 2, 3).astype(np.float32)
        out.append(dice(predict_slices(net, np.ascontiguousarray(x))[:, 0] > 0.5, mask > 0))
    return out


def real_test_patches(patches):
    """(masks, [{modality: image}]) of the held-out fold's patches that have both segmenter modalities."""
    masks, images = [], []
    for p in np.nonzero(held_out_mask(patches))[0]:
        have = {MODALITIES[patches.image_modality[i]]: patches.images[i].astype(np.float32)
                for i in np.nonzero(patches.image_patch == p)[0]}
        if all(m in have for m in SEGMENTER_MODALITIES):
            masks.append(patches.masks[p])
            images.append(have)
    return masks, images


def score_weights(folder: Path | None, n: int, seeds, work: Path, data_root=None, device: str = "auto",
                  segmenter=None, modality_guidance=None, fold: str = "test") -> dict:
    from .api import describe_guidance, load_models, sample_pairs

    model = load_models(device, folder)
    patches = reference_patches(model.cards, work, data_root, held_out=fold)
    poses = patches.real_poses(False)
    plain = patches.plain_patches()
    test_plain = plain[held_out_mask(patches)[plain]]
    test_masks = patches.masks[test_plain]
    test_near = nearest_dice(test_masks, patches.masks[poses])
    new_pose = same_lesion_new_pose(patches)
    real_contrasts = test_fold_contrasts(patches)
    per_case = test_fold_case_contrasts(patches)
    clear, pairs_clear = clear_cells(per_case), clear_pairs(per_case)
    training_reference = training_lesions_as_samples(patches, real_contrasts, clear, pairs_clear)
    t0 = time.perf_counter()
    pairs_by_seed = {seed: sample_pairs(list(MODALITIES), n, seed, device=device, weights=folder,
                                        modality_guidance=modality_guidance) for seed in seeds}
    sampling_s = time.perf_counter() - t0
    pairs = [p for seed in seeds for p in pairs_by_seed[seed]]
    masks = [p.mask.array for p in pairs]
    near = nearest_dice(masks, patches.masks[poses])
    rows = [mask_plausibility(m, patches.spacing_mm) for m in masks]
    train_plain = [int(p) for p in patches.plain_patches() if not patches.is_val[p]]
    real_masks = [patches.masks[p] for p in list(train_plain) + list(test_plain)]
    real_rows = [mask_plausibility(m, patches.spacing_mm) for m in real_masks]
    per_seed = {seed: appearance_agreement(((p.mask.array, {m: v.array for m, v in p.images.items()})
                                            for p in pairs_by_seed[seed]), real_contrasts, clear, pairs_clear)
                for seed in seeds}
    report = {
        "weights": str(folder) if folder else "bundled",
        "training_cases": len(patches.training_cases()),
        "test_cases": [patches.case_ids[patches.patch_case[p]] for p in test_plain],
        "n_samples": len(pairs), "seeds": list(seeds),
        "modality_guidance": describe_guidance(model.guidance(modality_guidance)),
        "mean_nearest_train_dice": round(float(np.mean(near)), 3),
        "test_real_nearest_train_dice": round(float(np.mean(test_near)), 3),
        "test_real_nearest_train_dice_per_case": [round(v, 3) for v in test_near],
        "same_lesion_new_pose_dice": round(new_pose, 3),
        "memorisation_index": memorisation_index(float(np.mean(near)), float(np.mean(test_near)), new_pose),
        "closer_than_every_test_lesion_fraction": round(float(np.mean([d > max(test_near) for d in near])), 3),
        "plausible_fraction": round(float(np.mean([r["plausible"] for r in rows])), 3),
        "one_main_component_fraction": round(float(np.mean([r["main_fraction"] >= 0.9 for r in rows])), 3),
        "mean_pairwise_dice": round(mean_pairwise_dice(masks), 3),
        "real_mean_pairwise_dice": round(mean_pairwise_dice(real_masks), 3),
        "real_plausible_fraction": round(float(np.mean([r["plausible"] for r in real_rows])), 3),
        "mean_volume_ml": round(float(np.mean([r["volume_ml"] for r in rows])), 1),
        "real_mean_volume_ml": round(float(np.mean([r["volume_ml"] for r in real_rows])), 1),
        "composition_core_edema_enhancing": [round(float(v), 3) for v in subregion_shares(masks).mean(0)],
        "test_real_composition_core_edema_enhancing": [
            round(float(v), 3) for v in subregion_shares(test_masks).mean(0)],
        "composition_error": round(composition_error(masks, test_masks), 3),
        "signs_agree_per_seed": {str(s): r["signs_agree"] for s, r in per_seed.items()},
        "signs_total": len(MODALITIES) * len(SUBREGIONS),
        "signs_clear_of_zero_per_seed": {str(s): r["signs_agree_clear"] for s, r in per_seed.items()},
        "clear_of_zero_cells": sorted(f"{m} {SUBREGION_NAMES[c]}" for m, c in clear),
        "contrast_error_per_seed": {str(s): r["contrast_error"] for s, r in per_seed.items()},
        "ordering_min_per_modality": {m: min((r["ordering"][m] for r in per_seed.values()
                                              if r["ordering"][m] is not None), default=None) for m in MODALITIES},
        "clear_of_zero_pairs": sorted(f"{m} {SHORT[a]}-{SHORT[b]}" for m, a, b in pairs_clear),
        "ordering_clear_of_zero_min_per_modality": {m: min((r["ordering_clear"][m] for r in per_seed.values()
                                                            if r["ordering_clear"][m] is not None), default=None)
                                                    for m in MODALITIES},
        "appearance_per_seed": {str(s): r for s, r in per_seed.items()},
        "training_lesions_as_samples": training_reference,
        "seconds_per_sample_4_modalities": round(sampling_s / max(1, len(pairs)), 2),
    }
    if segmenter is not None:
        net, _ = segmenter
        generated = segmenter_dice(net, masks, [{m: p.images[m].array for m in SEGMENTER_MODALITIES} for p in pairs])
        real_m, real_i = real_test_patches(patches)
        reference = segmenter_dice(net, real_m, real_i)
        report["segmenter_dice_generated"] = round(float(np.mean(generated)), 3)
        report["segmenter_dice_test_real_patches"] = round(float(np.mean(reference)), 3)
    return report


TARGETS = (
    ("nearest-train Dice <= test real + 0.05", lambda r: r["mean_nearest_train_dice"]
     <= r["test_real_nearest_train_dice"] + 0.05),
    ("memorisation index <= 0.5", lambda r: r["memorisation_index"] is not None and r["memorisation_index"] <= 0.5),
    ("plausible >= 0.95", lambda r: r["plausible_fraction"] >= 0.95),
    ("pairwise Dice within 0.05 of real", lambda r: abs(r["mean_pairwise_dice"] - r["real_mean_pairwise_dice"])
     <= 0.05),
    ("signs 12/12 at every seed", lambda r: all(v == r["signs_total"] for v in r["signs_agree_per_seed"].values())),
    ("signs where the real contrast is clear of zero, all at every seed (reported beside the target)",
     lambda r: "clear_of_zero_cells" in r and all(v == len(r["clear_of_zero_cells"])
                                                  for v in r["signs_clear_of_zero_per_seed"].values())),
    ("ordering >= 0.9 in every modality", lambda r: all(v is not None and v >= 0.9
                                                         for v in r["ordering_min_per_modality"].values())),
    ("ordering >= 0.9 over the pairs whose real difference is clear of zero (reported beside the target)",
     lambda r: "ordering_clear_of_zero_min_per_modality" in r and all(
         v is None or v >= 0.9 for v in r["ordering_clear_of_zero_min_per_modality"].values())),
    ("segmenter Dice on generated >= 0.65", lambda r: r.get("segmenter_dice_generated", 0) >= 0.65),
)


def markdown(reports: dict, fold: str = "test") -> str:
    labels = list(reports)
    keys = ["training_cases", "n_samples", "modality_guidance", "mean_nearest_train_dice",
            "test_real_nearest_train_dice",
            "same_lesion_new_pose_dice", "memorisation_index", "closer_than_every_test_lesion_fraction",
            "plausible_fraction", "mean_pairwise_dice", "real_mean_pairwise_dice", "mean_volume_ml",
            "real_mean_volume_ml", "composition_core_edema_enhancing", "test_real_composition_core_edema_enhancing",
            "composition_error", "signs_agree_per_seed", "clear_of_zero_cells", "signs_clear_of_zero_per_seed",
            "contrast_error_per_seed", "ordering_min_per_modality", "clear_of_zero_pairs",
            "ordering_clear_of_zero_min_per_modality", "segmenter_dice_generated",
            "segmenter_dice_test_real_patches", "seconds_per_sample_4_modalities"]
    lines = [f"# PathAR on the {fold} fold", "",
             ("Test-fold lesions (never used for training or selection): " if fold == "test" else
              "Validation-fold lesions (never trained on; rows named test_* mean this fold here): ")
             + ", ".join(reports[labels[0]]["test_cases"]) + ".", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(reports[lb].get(k, "-")) for lb in labels) + " |")
    for k, field in (("signs", "signs_agree"), ("signs_clear_of_zero", "signs_agree_clear"),
                     ("contrast_error", "contrast_error"), ("ordering", "ordering"),
                     ("ordering_clear_of_zero", "ordering_clear_of_zero")):
        lines.append(f"| training_lesions_{k} | " + " | ".join(
            str(reports[lb].get("training_lesions_as_samples", {}).get(field, "-")) for lb in labels) + " |")
    lines += ["", "| target | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name, check in TARGETS:
        lines.append(f"| {name} | " + " | ".join("met" if check(reports[lb]) else "not met" for lb in labels) + " |")
    reference = reports[labels[0]].get("training_lesions_as_samples")
    if reference:
        lines += ["", "The model's real training lesions scored as if they were samples (training_lesions_*: what "
                  "rendering them faithfully would score against this fold). Share of the training cases whose own "
                  "contrast has the test fold's sign:", "",
                  "| modality, sub-region | test fold contrast | training cases with its sign |", "|---|---|---|"]
        real = {(r["modality"], r["subregion"]): r["real"] for r in reference["contrasts"]}
        for key, share in reference["cases_with_the_test_sign"].items():
            mod, sub = key.split(" ", 1)
            lines.append(f"| {key} | {real[(mod, sub)]} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score PathAR weights against the test fold's real lesions.")
    parser.add_argument("--weights", action="append", default=[], metavar="LABEL=DIR",
                        help="weights folder to score (repeatable); the bundled weights are always scored")
    parser.add_argument("--bundled-label", default="bundled")
    parser.add_argument("--guidance", action="append", default=[], metavar="LABEL=W|LABEL=MOD=W,...",
                        help="modality guidance for that label's weights, one weight or some modalities' "
                             "(default: the weights' card)")
    parser.add_argument("--n", type=int, default=16, help="samples per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--segmenter-steps", type=int, default=SEGMENTER_STEPS, help="0 = no segmenter check")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "pathosyn" / "pathar_patches"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--held-out", choices=("test", "validation"), default="test",
                        help="the fold the samples are scored against (validation: for choices)")
    parser.add_argument("--out", default=None, help="folder for {test,validation}_fold.{json,md}")
    args = parser.parse_args(argv)
    import torch

    from ..errors import InputError
    from .api import parse_modality_guidance

    torch.set_num_threads(args.threads)
    folders = {args.bundled_label: None}
    for item in args.weights:
        label, sep, folder = item.partition("=")
        if not sep or not label or not Path(folder).is_dir():
            raise InputError(f"--weights expects LABEL=DIR with an existing folder, got {item!r}")
        folders[label] = Path(folder)
    guidance = {}
    for item in args.guidance:
        label, _, value = item.partition("=")
        if label not in folders:
            raise InputError(f"--guidance expects LABEL=W or LABEL=MOD=W,MOD=W... with a scored label, got {item!r}")
        guidance[label] = parse_modality_guidance(value)
    segmenter = train_real_segmenter(args.data, args.segmenter_steps, device=args.device) \
        if args.segmenter_steps else None
    reports = {label: score_weights(folder, args.n, args.seeds, Path(args.work), args.data, args.device, segmenter,
                                    guidance.get(label), args.held_out) for label, folder in folders.items()}
    if segmenter is not None:
        for r in reports.values():
            r["segmenter_training_cases"] = segmenter[1]
    text = markdown(reports, args.held_out)
    print(text)
    if args.out:
        from ..pathosyn.commands import write_json_atomic, write_text_atomic

        write_json_atomic(reports, Path(args.out) / f"{args.held_out}_fold.json")
        write_text_atomic(text, Path(args.out) / f"{args.held_out}_fold.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
