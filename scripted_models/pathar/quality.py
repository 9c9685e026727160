"""Quality checks for PathAR samples, each computed the same way on real patches for reference.

Definitions (masks use canonical labels 0 healthy, 1 core, 2 edema, 3 enhancing; TC = core | enhancing):
  * sub-region contrast: mean z-score of a sub-region minus the mean z-score of healthy *tissue* in the same
    patch (label 0 and brighter than background_z + HEAD_MARGIN_Z, i.e. not the constant outside-brain
    background). We compare the sign of the contrast, and the ordering of the sub-region means within each modality
    (fraction of sub-region pairs ordered as in the real data). Signs and orderings are also counted only where
    the real data has one: a cell (pair) whose mean contrast (difference) over the real cases is clear of zero.
  * one main component: the largest 26-connected component of the whole lesion holds >= 90 % of its voxels.
  * TC attached to edema (`tc_attached`): the fraction of TC voxels whose 26-connected TC component comes
    within 4 mm of edema (touches `dilate(edema, 4 mm)`). Core or enhancing blobs floating away from the edema
    count against it; a core that reaches the brain surface through its edema shell does not. 1.0 without TC.
  * plausible: whole lesion >= `min_voxels` voxels, one main component, and TC attached to edema >= 0.9.
  * diversity: mean pairwise whole-lesion Dice between generated masks (lower = more diverse).
  * composition: each lesion's share of core, edema and enhancing voxels, averaged over lesions; the composition
    error of samples is the mean over the three of |mean share sampled - mean share real|.
  * memorisation: for each sample, the best whole-lesion Dice against every rigid training patch (the real
    lesions in all their augmented poses, and their left-right flips); values near 1 mean the sample copies a
    training lesion. Elastically deformed training patches are left out of this reference, so the number
    compares across trainings with and without them.
  * novelty of real lesions (leave one case out): the same nearest Dice for each real case's plain patch
    against the rigid patches of the *other* training cases. It is what a genuinely new lesion scores;
    samples above the highest of these values are closer to a training lesion than any real lesion is.
  * the same lesion in a new pose: the nearest Dice of a training case's augmented pose against all the other
    poses (its own included). It is what a copy of a training lesion, re-posed, scores. The memorisation index
    (mean sample - mean real novelty) / (new pose - real novelty) is 0 for samples as new as a real lesion and
    1 for samples as close to the training set as a re-posed training lesion.
  * a blend of two training lesions: the same nearest Dice for shapes half-way (t in 0.3-0.7) between rigid
    poses of two different training cases (signed-distance morph, `data.shape_blend`). It is what a new
    lesion that only recombines training lesions scores; when it is as high as the new-pose value, the index
    cannot tell recombination from copying.

    python -m scripted_models.pathar.quality --n 16
"""
from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..labels import CORE, EDEMA, ENHANCING, MODALITIES, SUBREGION_NAMES
from ..preprocess import dilate_mm
from . import HEAD_MARGIN_Z
from .data import blend_patches
from .tokenizer import dice

SUBREGIONS = (CORE, EDEMA, ENHANCING)
SHORT = {CORE: "core", EDEMA: "edema", ENHANCING: "enh"}


# --------------------------------------------------------------------------- intensities

def subregion_contrast(mask: np.ndarray, image: np.ndarray, background_z: float = -4.0) -> dict[int, float]:
    """{label: mean(image in label) - mean(healthy tissue)} for sub-regions present in the mask."""
    healthy = (mask == 0) & (image > background_z + HEAD_MARGIN_Z)
    if not healthy.any():
        return {}
    base = float(image[healthy].mean())
    return {c: float(image[mask == c].mean()) - base for c in SUBREGIONS if (mask == c).sum() >= 5}


def mean_contrasts(items) -> dict[int, float]:
    """items: iterable of (mask, image) -> mean contrast per sub-region over the items that have it."""
    acc: dict[int, list[float]] = {}
    for mask, image in items:
        for c, v in subregion_contrast(mask, image).items():
            acc.setdefault(c, []).append(v)
    return {c: float(np.mean(v)) for c, v in acc.items()}


CLEAR_OF_ZERO_Z = 0.1  # a real sub-region contrast smaller than this has no sign worth matching


def clear_of_zero(values, rng: np.random.Generator, resamples: int = 1000) -> bool:
    """One value per real case: the mean is at least CLEAR_OF_ZERO_Z from zero and the 95% interval of a case
    bootstrap excludes zero."""
    values = np.asarray(values, np.float64)
    if len(values) < 2 or abs(values.mean()) < CLEAR_OF_ZERO_Z:
        return False
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return bool(low > 0 or high < 0)


def clear_cells(per_case: list[dict[str, dict[int, float]]], resamples: int = 1000,
                seed: int = 0) -> set[tuple[str, int]]:
    """(modality, sub-region) cells whose real contrast is clear of zero (`clear_of_zero` over the cases).
    per_case: one {modality: {sub-region: contrast}} per real case."""
    rng = np.random.default_rng(seed)
    cells = set()
    for mod in sorted({m for case in per_case for m in case}):
        for c in SUBREGIONS:
            if clear_of_zero([case[mod][c] for case in per_case if c in case.get(mod, {})], rng, resamples):
                cells.add((mod, c))
    return cells


def clear_pairs(per_case: list[dict[str, dict[int, float]]], resamples: int = 1000,
                seed: int = 0) -> set[tuple[str, int, int]]:
    """(modality, a, b) sub-region pairs whose real difference a - b is clear of zero (`clear_of_zero` over the
    cases that have both): the pairs with an ordering worth matching."""
    rng = np.random.default_rng(seed)
    pairs = set()
    for mod in sorted({m for case in per_case for m in case}):
        for a, b in combinations(SUBREGIONS, 2):
            diffs = [case[mod][a] - case[mod][b] for case in per_case
                     if a in case.get(mod, {}) and b in case.get(mod, {})]
            if clear_of_zero(diffs, rng, resamples):
                pairs.add((mod, a, b))
    return pairs


def ordering_agreement(real: dict[int, float], generated: dict[int, float],
                       only: set[tuple[int, int]] | None = None) -> float | None:
    """Fraction of sub-region pairs whose mean intensities are ordered as in the real data (`only`: just these
    (a, b) pairs, e.g. the modality's clear_pairs)."""
    common = [c for c in SUBREGIONS if c in real and c in generated]
    pairs = [(a, b) for a, b in combinations(common, 2) if only is None or (a, b) in only]
    if not pairs:
        return None
    return float(np.mean([(real[a] > real[b]) == (generated[a] > generated[b]) for a, b in pairs]))


# --------------------------------------------------------------------------- masks

def mask_plausibility(mask: np.ndarray, spacing_mm: float = 2.0, min_voxels: int = 50, main_fraction: float = 0.9,
                      margin_mm: float = 4.0, inside_fraction: float = 0.9) -> dict:
    whole = mask > 0
    n = int(whole.sum())
    labelled, count = ndimage.label(whole, structure=np.ones((3,) * mask.ndim))
    largest = int(np.bincount(labelled.ravel())[1:].max()) if count else 0
    tc = (mask == CORE) | (mask == ENHANCING)
    edema = mask == EDEMA
    if tc.any():
        near_edema = dilate_mm(edema, margin_mm, (spacing_mm,) * mask.ndim) if edema.any() else edema
        tc_lab, _ = ndimage.label(tc, structure=np.ones((3,) * mask.ndim))
        touching = np.unique(tc_lab[near_edema & tc])
        inside = float(np.isin(tc_lab, touching[touching > 0]).sum() / tc.sum())
    else:
        inside = 1.0
    main = largest / n if n else 0.0
    return {"voxels": n, "volume_ml": round(n * spacing_mm ** mask.ndim / 1000.0, 2), "components": int(count),
            "main_fraction": round(main, 3), "tc_attached": round(inside, 3),
            "fractions": {SHORT[c]: round(float((mask == c).sum() / max(1, n)), 3) for c in SUBREGIONS},
            "plausible": bool(n >= min_voxels and main >= main_fraction and inside >= inside_fraction)}


def subregion_shares(masks) -> np.ndarray:
    """Masks -> (L, 3): each lesion's share of core, edema and enhancing voxels (rows of empty masks are 0)."""
    return np.array([[(m == c).sum() / max(1, (m > 0).sum()) for c in SUBREGIONS] for m in masks], np.float64)


def composition_error(sampled, real) -> float:
    """Mean over the sub-regions of |mean share in `sampled` masks - mean share in `real` masks|."""
    return float(np.abs(subregion_shares(sampled).mean(0) - subregion_shares(real).mean(0)).mean())


def mean_pairwise_dice(masks) -> float | None:
    masks = [np.asarray(m) > 0 for m in masks]
    if len(masks) < 2:
        return None
    return float(np.mean([dice(a, b) for a, b in combinations(masks, 2)]))


def dice_matrix(masks, references: np.ndarray, flips: bool = True, chunk: int = 128) -> np.ndarray:
    """(M, R) whole-lesion Dice of each mask against each reference (R, *S); with flips, the better of the
    reference and its left-right flip (scored as the mask flipped). References are converted to float `chunk` at
    a time (memory stays bounded; counts are exact in float32)."""
    query = np.stack([np.asarray(m) > 0 for m in masks])  # (M, *S)
    queries = [query.reshape(len(query), -1).astype(np.float32)]  # (M, V)
    if flips:
        queries.append(query[..., ::-1].reshape(len(query), -1).astype(np.float32))
    out = np.zeros((len(query), len(references)), np.float64)
    for start in range(0, len(references), chunk):
        ref = (np.asarray(references[start:start + chunk]) > 0).reshape(-1, query[0].size).astype(np.float32)
        ref_sizes = ref.sum(1)
        for q in queries:
            denom = q.sum(1)[:, None] + ref_sizes[None]
            d = np.where(denom > 0, 2 * (q @ ref.T) / np.maximum(denom, 1), 1.0)
            out[:, start:start + chunk] = np.maximum(out[:, start:start + chunk], d)
    return out


def nearest_match(masks, references: np.ndarray, flips: bool = True) -> tuple[list[float], list[int]]:
    """(best whole-lesion Dice, index of that reference) of each mask against references (R, *S), each
    reference also tried left-right flipped."""
    d = dice_matrix(masks, references, flips)
    return d.max(1).tolist(), d.argmax(1).tolist()


def nearest_dice(masks, references: np.ndarray, flips: bool = True) -> list[float]:
    """Best whole-lesion Dice of each mask against references (R, *S) (and their left-right flips)."""
    return nearest_match(masks, references, flips)[0]


def real_novelty(patches) -> dict[str, float]:
    """{case: nearest Dice of its plain patch against the rigid patches of the other training cases}."""
    poses = patches.real_poses(False)
    plain = patches.plain_patches()
    cases = patches.patch_case[plain]
    d = dice_matrix(patches.masks[plain], patches.masks[poses])  # (cases, poses)
    d[patches.patch_case[poses][None] == cases[:, None]] = -np.inf  # leave the own case out
    return {patches.case_ids[c]: round(float(v), 3) for c, v in zip(cases, d.max(1))}


def summarize_masks(masks, spacing_mm: float = 2.0) -> dict:
    """Aggregate plausibility and diversity of a list of masks (used in the model card)."""
    rows = [mask_plausibility(np.asarray(m), spacing_mm) for m in masks]
    return {"plausible_fraction": round(float(np.mean([r["plausible"] for r in rows])), 3),
            "one_main_component_fraction": round(float(np.mean([r["main_fraction"] >= 0.9 for r in rows])), 3),
            "mean_tc_attached": round(float(np.mean([r["tc_attached"] for r in rows])), 3),
            "mean_volume_ml": round(float(np.mean([r["volume_ml"] for r in rows])), 1),
            "mean_pairwise_dice": None if len(rows) < 2 else round(mean_pairwise_dice(masks), 3)}


# --------------------------------------------------------------------------- report

def reference_patches(model, work: Path, data_root=None):
    """The real patches the samples are scored against: the transformer card's patch grid with rigid
    augmentation only, no elastic patches or blends, over the cases the model was trained and validated on
    (built and cached under `work` on first use, about 1 min)."""
    from dataclasses import replace

    from .api import TRANSFORMER_NAME
    from .data import PatchConfig, build_patches, labelled_cases

    card = model.cards[TRANSFORMER_NAME]
    # only the cases this model saw (training + held out), not every labelled case that ../shared/data holds now
    seen = {source.split(":")[0] for source in card.get("data", [])} | set(card.get("held_out", []))
    cfg = PatchConfig.from_dict(card["patch"])
    unseen = tuple(sorted({f.name for f in labelled_cases(data_root, (), cfg.pseudo_labelled)} - seen)) if seen else ()
    cfg = replace(cfg, elastic_per_case=0, blend_per_case=0, exclude=tuple(sorted(set(cfg.exclude) | set(unseen))))
    return build_patches(Path(work), cfg, data_root, verbose=False)


def memorisation_index(sample: float, real_novelty_mean: float, new_pose: float) -> float | None:
    """0: samples as far from the training lesions as real lesions are from each other; 1: as close as a
    training lesion in a new pose."""
    span = new_pose - real_novelty_mean
    return None if span <= 0 else round((sample - real_novelty_mean) / span, 2)


def same_lesion_new_pose(patches, per_case: int = 8) -> float:
    """Mean nearest Dice of `per_case` augmented poses of each training case against all the other poses."""
    poses = patches.real_poses(False)
    augmented = np.setdiff1d(poses, patches.plain_patches())
    chosen = np.concatenate([augmented[patches.patch_case[augmented] == c][:per_case]
                             for c in np.unique(patches.patch_case[augmented])])
    d = dice_matrix(patches.masks[chosen], patches.masks[poses])  # (chosen, poses)
    d[chosen[:, None] == poses[None]] = -np.inf  # not against itself
    return float(d.max(1).mean())


def two_lesion_blend(patches, per_case: int = 3, seed: int = 0) -> float:
    """Mean nearest Dice of blends (`shape_blend`, t ~ U(0.3, 0.7)) of each training case's rigid poses with
    another case's, against all the rigid poses: what a lesion that only mixes two training lesions scores."""
    poses = patches.real_poses(False)
    blends, _ = blend_patches(patches.masks, poses, patches.patch_case[poses], per_case, patches.spacing_mm,
                              (0.3, 0.7), np.random.default_rng(seed))
    return float(np.mean(nearest_dice(blends, patches.masks[poses]))) if len(blends) else float("nan")


def quality_report(pairs, patches, modalities) -> dict:
    """Everything the table prints, as a dict: per-sample rows, summaries, intensity comparison."""
    spacing = patches.spacing_mm
    poses = patches.real_poses(False)
    masks = [p.mask.array for p in pairs]
    near, which = nearest_match(masks, patches.masks[poses])
    nearest_case = [patches.case_ids[patches.patch_case[poses[i]]] for i in which]
    novelty = real_novelty(patches)
    novelty_mean = float(np.mean(list(novelty.values())))
    new_pose = same_lesion_new_pose(patches)
    blend = two_lesion_blend(patches)
    rows = []
    for i, (m, nd) in enumerate(zip(masks, near)):
        rows.append({"sample": i, **mask_plausibility(m, spacing), "nearest_train_dice": round(nd, 3),
                     "nearest_case": nearest_case[i]})
    # real reference: the un-augmented patch of every training case
    first = [int(p) for p in patches.plain_patches() if not patches.is_val[p]]
    real_rows = [mask_plausibility(patches.masks[p], spacing) for p in first]
    intensity = []
    for mod in modalities:
        k = MODALITIES.index(mod)
        idx = [i for i in patches.image_indices(False) if patches.image_modality[i] == k]
        real = mean_contrasts((patches.masks[patches.image_patch[i]], patches.images[i].astype(np.float32))
                              for i in idx)
        gen = mean_contrasts((p.mask.array, p.images[mod].array) for p in pairs)
        for c in SUBREGIONS:
            if c in real or c in gen:
                r, g = real.get(c), gen.get(c)
                intensity.append({"modality": mod, "subregion": SUBREGION_NAMES[c], "real": r, "generated": g,
                                  "sign_agrees": None if r is None or g is None else bool(np.sign(r) == np.sign(g))})
        intensity.append({"modality": mod, "ordering_agreement": ordering_agreement(real, gen)})
    return {"samples": rows,
            "generated": {**summarize_masks(masks, spacing),
                          "mean_nearest_train_dice": round(float(np.mean(near)), 3),
                          "max_nearest_train_dice": round(float(np.max(near)), 3),
                          "closer_than_any_real_fraction": round(float(np.mean(
                              [d > max(novelty.values()) for d in near])), 3),
                          "nearest_case_counts": {c: nearest_case.count(c) for c in sorted(set(nearest_case))},
                          "memorisation_index": memorisation_index(float(np.mean(near)), novelty_mean, new_pose)},
            "real": {"nearest_other_cases_dice": novelty,
                     "mean_nearest_other_cases_dice": round(novelty_mean, 3),
                     "same_lesion_new_pose_dice": round(new_pose, 3),
                     "two_lesion_blend_dice": round(blend, 3),
                     "plausible_fraction": round(float(np.mean([r["plausible"] for r in real_rows])), 3),
                     "mean_tc_attached": round(float(np.mean([r["tc_attached"] for r in real_rows])), 3),
                     "mean_volume_ml": round(float(np.mean([r["volume_ml"] for r in real_rows])), 1),
                     "mean_pairwise_dice": round(mean_pairwise_dice([patches.masks[p] for p in first]) or 0, 3)},
            "intensity": intensity}


def _fmt(v, width=8):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, bool):
        return ("yes" if v else "no").rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.2f}"
    return str(v).rjust(width)


def print_report(report: dict) -> None:
    print("sample  vol_ml  comps  main  tc_att core  edema   enh  plausible  nearest_train_dice  nearest_case")
    for r in report["samples"]:
        f = r["fractions"]
        print(f"{r['sample']:6d} {r['volume_ml']:7.1f} {r['components']:6d} {r['main_fraction']:5.2f} "
              f"{r['tc_attached']:6.2f} {f['core']:5.2f} {f['edema']:6.2f} {f['enh']:5.2f} "
              f"{_fmt(r['plausible'], 10)} {r['nearest_train_dice']:19.2f}  {r['nearest_case']}")
    g, r = report["generated"], report["real"]
    print()
    print("summary               generated     real")
    for key in ("plausible_fraction", "mean_tc_attached", "mean_volume_ml", "mean_pairwise_dice"):
        print(f"{key:22s}{_fmt(g.get(key), 10)} {_fmt(r.get(key), 8)}")
    print(f"{'mean_nearest_train_dice':22s}{_fmt(g['mean_nearest_train_dice'], 10)} "
          f"{_fmt(r['mean_nearest_other_cases_dice'], 8)}  (real: each case against the other cases)")
    print(f"{'same lesion, new pose':22s}{'':10s} {_fmt(r['same_lesion_new_pose_dice'], 8)}  "
          f"(memorisation index of the samples: {g['memorisation_index']})")
    print(f"{'blend of two lesions':22s}{'':10s} {_fmt(r['two_lesion_blend_dice'], 8)}  "
          f"(a shape half-way between two training lesions)")
    print(f"samples closer to a training lesion than any real lesion is to another: "
          f"{g['closer_than_any_real_fraction']:.2f}; nearest case per sample: {g['nearest_case_counts']}")
    print()
    print("modality  sub-region                          real  generated  sign")
    for row in report["intensity"]:
        if "ordering_agreement" in row:
            print(f"{row['modality']:8s}  ordering agreement {_fmt(row['ordering_agreement'], 27)}")
        else:
            print(f"{row['modality']:8s}  {row['subregion']:30s} {_fmt(row['real'])} {_fmt(row['generated'], 10)} "
                  f"{_fmt(row['sign_agrees'], 5)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score PathAR samples against the real training patches.")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", action="append", default=None, help="default: all four")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--work", default=".train/pathar", help="where the patch cache lives (built if missing)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    import torch

    from .api import load_models, sample_pairs

    torch.set_num_threads(args.threads)
    mods = args.modality or list(MODALITIES)
    model = load_models(args.device)
    patches = reference_patches(model, Path(args.work), args.data)
    pairs = sample_pairs(mods, args.n, args.seed, args.temperature, args.top_k, args.device)
    report = quality_report(pairs, patches, mods)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
