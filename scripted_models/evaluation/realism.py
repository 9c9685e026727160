"""Lesion realism on case-level folds (scripted_models.folds): the headline quality measure of PathoSyn.

For every case of a fold: build its pseudo-healthy base (anatomy model), synthesize a lesion with the case's
true mask (several seeds), and compare with the real lesion per modality and sub-region, in z-units of the
case's healthy tissue:
- mean error, against the no-lesion base (the pseudo-healthy scan itself);
- 1-D Wasserstein distance, against a constant fill with the population mean of the *training fold*;
- texture ratio: std of the 3-D Laplacian inside the sub-region, synthetic / real (1 = as rough as real);
- the same numbers for copy-paste (the residual of the training case with the nearest lesion volume, centred
  on the lesion).
A (case, modality) pair **passes** when, averaged over seeds and sub-regions, the synthetic lesion is closer
than the base on mean intensity *and* closer than the constant fill on Wasserstein. The pass fraction over
the fold is the headline number. A two-sample texture classifier (real vs synthetic axial patches, all four
modalities) is pooled over the fold's cases, cross-validated within cases (how close to this case's own lesion)
and across cases (leave one case out: do synthetic lesions differ from real ones in a way that holds from case to
case); see two_sample.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cases import default_data_root, load_case
from ..folds import make_folds
from ..labels import CORE, EDEMA, ENHANCING, MODALITIES
from ..preprocess import IntensityNormalizer, blend_weight, bounding_box, dilate_mm
from .metrics import wasserstein

SUBREGIONS = {CORE: "core", EDEMA: "edema", ENHANCING: "enhancing"}
MIN_VOXELS = 50
# clinical-like scans in no fold (skull on, 6.5 mm slices, t1c, whole-lesion masks): scored apart, never for choices
CLINICAL_CASES = ("pyradiomics_brain1", "pyradiomics_brain2")
SPLIT_TITLES = {"clinical": "clinical scans (skull on, 6.5 mm slices; in no fold)"}  # else "<split> fold"


def tissue_scale(real_z: np.ndarray, lesion: np.ndarray, foreground: np.ndarray, spacing_zyx) -> float:
    """Std of the tissue 6-16 mm around the lesion in the z-units the pipeline uses (healthy foreground std).
    Below 1 where the foreground spreads wider than brain tissue (a skull and scalp): a residual in z-units is then
    too strong in the tissue's own units by 1 / this."""
    from ..pathosyn.calibration import texture_ring

    ring = texture_ring(lesion, spacing_zyx) & foreground
    return float(real_z[ring].std()) if ring.any() else float("nan")


def roughness(values_z: np.ndarray, region: np.ndarray) -> float:
    """Std of the 3-D Laplacian inside `region` (z-units): fine texture."""
    from scipy.ndimage import laplace

    box = bounding_box(region)
    pad = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    lap = laplace(values_z[pad].astype(np.float64))
    return float(lap[region[pad]].std())


def training_reference(case_ids, data_root: Path) -> tuple[dict, dict]:
    """One pass over the (training-fold) cases: the mean z-score per (modality, sub-region), and per case its
    whole-lesion volume in ml and its modalities (for choosing a copy-paste source). Computed once per process
    for the same cases (an evaluation scores three folds against the same training fold); copies are returned."""
    means, lesions = _training_reference(tuple(case_ids), str(data_root))
    return dict(means), {case_id: (volume, set(modalities)) for case_id, (volume, modalities) in lesions.items()}


@functools.lru_cache(maxsize=2)
def _training_reference(case_ids: tuple[str, ...], data_root: str) -> tuple[dict, dict]:
    from ..pathosyn.calibration import SUBREGION_KEYS, case_levels

    lesions: dict = {}

    def note(case_id, case):
        lesions[case_id] = (int((case.seg > 0).sum()) * float(np.prod(case.reference.spacing)) / 1000.0,
                            frozenset(case.images))

    levels = case_levels(case_ids, data_root, on_case=note)
    means = {(m, k): per[key] for m, per in levels.items() for k, key in SUBREGION_KEYS.items() if key in per}
    return means, lesions


@dataclass(frozen=True)
class Pipeline:
    """What is scored under one label: deviation weights (None = bundled), the population pull (None = the
    weights' card value) and whether the pseudo-healthy base gets the scan's noise back."""

    weights: Path | None = None
    population_pull: float | None = None
    scanner_noise: bool = True
    texture_match: bool = True


UNCALIBRATED = Pipeline(population_pull=0.0, scanner_noise=False, texture_match=False)  # before calibration


def as_pipeline(value) -> Pipeline:
    return value if isinstance(value, Pipeline) else Pipeline(weights=Path(value) if value else None)


class _CaseZ:
    """A case in z-units of its healthy tissue: real images, pseudo-healthy base, masks. `base` is the smooth
    inpainting (the no-lesion baseline and copy-paste use it, as before the scanner noise existed); the base with
    the scan's noise is made on request."""

    def __init__(self, case_id: str, data_root: Path, device: str):
        self.case = load_case(data_root / "cases" / case_id)
        self.id = case_id
        self.seg = self.case.seg
        self.lesion = self.seg > 0
        fg = self.foreground = self.case.foreground()
        self.norms = {m: IntensityNormalizer.fit(v.array, exclude=self.lesion, foreground=fg)
                      for m, v in self.case.images.items()}
        self.real = {m: self.norms[m].forward(v.array) for m, v in self.case.images.items()}
        self.mask = self.case.reference.with_array(self.seg)
        self.device = device
        self.bases = {}
        self.base = self.base_with(scanner_noise=False)
        self.base_z = {m: self.norms[m].forward(v.array) for m, v in self.base.items()}

    def base_with(self, scanner_noise: bool) -> dict:
        from ..pathosyn.api import pseudo_healthy

        if scanner_noise not in self.bases:  # the base a synthesis draws on: the network's own fill
            self.bases[scanner_noise] = pseudo_healthy(self.case.images, self.mask, device=self.device,
                                                       scanner_noise=scanner_noise, smooth_deep_fill=False)
        return self.bases[scanner_noise]

    def z(self, volumes) -> dict[str, np.ndarray]:
        return {m: self.norms[m].forward(v.array) for m, v in volumes.items()}


def _nearest_volume_source(target: _CaseZ, lesions: dict) -> str:
    """The training case with all of the target's modalities whose lesion volume is closest to the target's."""
    volume = int(target.lesion.sum()) * float(np.prod(target.case.reference.spacing)) / 1000.0
    candidates = {c: abs(ml - volume) for c, (ml, mods) in lesions.items()
                  if c != target.id and set(target.real) <= mods}
    return min(candidates, key=candidates.get)


def copy_paste(target: _CaseZ, source: _CaseZ) -> dict[str, np.ndarray]:
    """The source's residual (real - pseudo-healthy, z-units) centred on the target lesion, seam-blended into
    the target's base inside the target's blend region."""
    sp = target.case.spacing_zyx
    weight = blend_weight(target.lesion, dilate_mm(target.lesion, 6.0, sp), sp)
    box = bounding_box(source.lesion)
    shift = np.round(np.argwhere(target.lesion).mean(0) - np.argwhere(source.lesion).mean(0)).astype(int)
    out = {}
    for m in target.real:
        resid = (source.real[m] - source.base_z[m])[box]
        pasted = np.zeros_like(target.real[m])
        dst = [slice(max(b.start + s, 0), min(b.stop + s, n)) for b, s, n in zip(box, shift, pasted.shape)]
        src = [slice(d.start - b.start - s, d.stop - b.start - s) for d, b, s in zip(dst, box, shift)]
        if all(d.stop > d.start for d in dst):
            pasted[tuple(dst)] = resid[tuple(src)]
        out[m] = target.base_z[m] + weight * pasted
    return out


def _region_rows(target: _CaseZ, runs: list[dict], const_means: dict, copy: dict) -> list[dict]:
    rows = []
    for m in target.real:
        for k, name in SUBREGIONS.items():
            sel = target.seg == k
            if sel.sum() < MIN_VOXELS:
                continue
            real = target.real[m][sel]
            real_mean, real_rough = float(real.mean()), roughness(target.real[m], sel)
            const = const_means.get((m, k), 0.0)
            rows.append({
                "case": target.id, "modality": m, "subregion": name, "voxels": int(sel.sum()),
                "real_mean": round(real_mean, 4),
                "mean_err": float(np.mean([abs(float(r[m][sel].mean()) - real_mean) for r in runs])),
                "mean_err_base": abs(float(target.base_z[m][sel].mean()) - real_mean),
                "mean_err_copy": abs(float(copy[m][sel].mean()) - real_mean),
                "wasserstein": float(np.mean([wasserstein(r[m][sel], real) for r in runs])),
                "wasserstein_const": float(np.mean(np.abs(real - const))),
                "wasserstein_copy": wasserstein(copy[m][sel], real),
                "texture_ratio": float(np.mean([roughness(r[m], sel) for r in runs])) / max(real_rough, 1e-6),
                "texture_ratio_copy": roughness(copy[m], sel) / max(real_rough, 1e-6),
            })
    return rows


def pair_verdicts(rows: list[dict]) -> list[dict]:
    """(case, modality) pairs: mean over sub-regions of each error; pass = beats base on mean and constant
    fill on Wasserstein; copy-paste judged the same way."""
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["case"], r["modality"]), []).append(r)
    out = []
    for (case, m), rs in pairs.items():
        avg = {key: float(np.mean([r[key] for r in rs])) for key in
               ("mean_err", "mean_err_base", "mean_err_copy", "wasserstein", "wasserstein_const",
                "wasserstein_copy")}
        out.append({"case": case, "modality": m, **{k: round(v, 4) for k, v in avg.items()},
                    "pass": bool(avg["mean_err"] < avg["mean_err_base"]
                                 and avg["wasserstein"] < avg["wasserstein_const"]),
                    "copy_pass": bool(avg["mean_err_copy"] < avg["mean_err_base"]
                                      and avg["wasserstein_copy"] < avg["wasserstein_const"])})
    return out


def summarise(rows: list[dict], pairs: list[dict]) -> dict:
    def frac(xs):
        return round(float(np.mean(xs)), 4) if xs else None

    return {
        "pairs": len(pairs),
        "pass_fraction": frac([p["pass"] for p in pairs]),
        "copy_paste_pass_fraction": frac([p["copy_pass"] for p in pairs]),
        "median_texture_ratio": round(float(np.median([r["texture_ratio"] for r in rows])), 4),
        "median_texture_ratio_copy": round(float(np.median([r["texture_ratio_copy"] for r in rows])), 4),
        "mean_err": round(float(np.mean([r["mean_err"] for r in rows])), 4),
        "mean_err_base": round(float(np.mean([r["mean_err_base"] for r in rows])), 4),
        "mean_err_copy": round(float(np.mean([r["mean_err_copy"] for r in rows])), 4),
        "wasserstein": round(float(np.mean([r["wasserstein"] for r in rows])), 4),
        "wasserstein_const": round(float(np.mean([r["wasserstein_const"] for r in rows])), 4),
        "wasserstein_copy": round(float(np.mean([r["wasserstein_copy"] for r in rows])), 4),
        "per_modality_pass": {m: frac([p["pass"] for p in pairs if p["modality"] == m])
                              for m in MODALITIES if any(p["modality"] == m for p in pairs)},
    }


class FoldRealism:
    """A fold's cases prepared once (pseudo-healthy bases, copy-paste, reference statistics), so that several
    weights can be scored on the same bases: `realism_study` for reports, and the deviation training for
    selecting its weights on the validation fold."""

    def __init__(self, data_root=None, split: str = "test", device: str = "auto", cases: list[str] | None = None):
        self.data_root = Path(data_root or default_data_root())
        self.folds = make_folds(str(self.data_root))
        self.split = split
        self.device = device
        self.case_ids = list(cases or getattr(self.folds, split))
        self.const_means, train_lesions = training_reference(self.folds.train, self.data_root)
        sources: dict[str, _CaseZ] = {}
        self.targets = []
        for case_id in self.case_ids:
            target = _CaseZ(case_id, self.data_root, device)
            source_id = _nearest_volume_source(target, train_lesions)
            if source_id not in sources:
                sources[source_id] = _CaseZ(source_id, self.data_root, device)
            self.targets.append((target, source_id, copy_paste(target, sources[source_id])))
        del sources  # only the pasted copies are needed from here on
        self.tissue_scale = {target.id: {m: round(tissue_scale(z, target.lesion, target.foreground,
                                                               target.case.spacing_zyx), 3)
                                         for m, z in target.real.items()} for target, _, _ in self.targets}

    def score(self, weights: dict | None = None, seeds=(0, 1, 2), steps: int | None = None,
              figure: Path | None = None) -> dict:
        """`weights` maps a label to a Pipeline, or to a deviation-weights folder (None = bundled)."""
        from ..pathosyn.api import synthesize_lesion
        from .two_sample import axial_patches, classifier_auroc, lesion_centres, separating_features

        t0 = time.perf_counter()
        weights = {label: as_pipeline(v) for label, v in (weights or {"bundled": None}).items()}
        per_weights = {label: {"rows": [], "real_patches": [], "syn_patches": [], "outside_max_abs": 0.0,
                               "examples": {}} for label in weights}
        copy_patches = []  # the copy-paste baseline's patches, for its classifier AUROC (a real lesion's texture)
        patch_cases = []  # the case of each patch row (the same rows for every weights), for the across-case AUROC
        for target, source_id, copy in self.targets:
            region = dilate_mm(target.lesion, 6.0, target.case.spacing_zyx)
            mods = [m for m in MODALITIES if m in target.real]
            centres = lesion_centres(target.lesion, n=120, seed=0)
            if len(mods) == len(MODALITIES):
                copy_patches.append(axial_patches([copy[m] for m in mods], centres))
                patch_cases += [target.id] * len(centres)
            for label, pipe in weights.items():
                acc = per_weights[label]
                runs = []
                base = target.base_with(pipe.scanner_noise)
                for seed in seeds:
                    result = synthesize_lesion(base, target.mask, seed=seed, steps=steps, device=self.device,
                                               deviation_weights=pipe.weights, population_pull=pipe.population_pull,
                                               texture_match=pipe.texture_match)
                    for m, vol in result.images.items():  # outside the blend region: the base, bit for bit
                        diff = np.abs(vol.array.astype(np.float64) - base[m].array.astype(np.float64))[~region]
                        acc["outside_max_abs"] = max(acc["outside_max_abs"], float(diff.max(initial=0.0)))
                    runs.append(target.z(result.images))
                rows = _region_rows(target, runs, self.const_means, copy)
                for r in rows:
                    r["copy_source"] = source_id
                acc["rows"] += rows
                if len(mods) == len(MODALITIES):
                    acc["real_patches"].append(axial_patches([target.real[m] for m in mods], centres))
                    acc["syn_patches"].append(axial_patches([runs[0][m] for m in mods], centres))
                if len(acc["examples"]) < 3:
                    acc["examples"][target.id] = (target.real, runs[0], target.seg)
        report = {"split": self.split, "cases": self.case_ids, "seeds": list(seeds), "steps": steps,
                  "folds": self.folds.as_dict(),
                  "tissue_scale": self.tissue_scale,
                  "weights": {k: {"weights": str(p.weights) if p.weights else "bundled",
                                  "population_pull": "card" if p.population_pull is None else p.population_pull,
                                  "scanner_noise": p.scanner_noise, "texture_match": p.texture_match}
                              for k, p in weights.items()},
                  "results": {}}
        for label, acc in per_weights.items():
            pairs = pair_verdicts(acc["rows"])
            summary = summarise(acc["rows"], pairs)
            if acc["real_patches"]:
                real, syn, copied = (np.concatenate(p) for p in (acc["real_patches"], acc["syn_patches"],
                                                                  copy_patches))
                summary["classifier_auroc"] = round(classifier_auroc(real, syn), 4)
                summary["classifier_auroc_copy"] = round(classifier_auroc(real, copied), 4)
                if len(set(patch_cases)) > 1:
                    cases = np.array(patch_cases)
                    summary["classifier_auroc_across_cases"] = round(classifier_auroc(real, syn, cases), 4)
                    summary["classifier_auroc_across_cases_copy"] = round(classifier_auroc(real, copied, cases), 4)
                summary["separating_features"] = separating_features(real, syn, list(MODALITIES))
            summary["outside_region_max_abs_diff"] = acc["outside_max_abs"]
            report["results"][label] = {"summary": summary, "pairs": pairs,
                                        "regions": [{k: (round(v, 4) if isinstance(v, float) else v)
                                                     for k, v in r.items()} for r in acc["rows"]]}
            if figure is not None:
                from .plots import real_vs_synthetic

                path = Path(figure)
                written = real_vs_synthetic(acc["examples"], path.with_name(f"{path.stem}_{label}{path.suffix}")
                                            if len(weights) > 1 else path)
                report.setdefault("figures", {})[label] = written.name
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        return report


def realism_study(data_root=None, split: str = "test", seeds=(0, 1, 2), steps: int | None = None,
                  device: str = "auto", weights: dict | None = None, cases: list[str] | None = None,
                  figure: Path | None = None) -> dict:
    """Score PathoSyn on a fold. `weights` maps a label to a Pipeline or a deviation-weights folder (None =
    bundled); all are scored on the same cases and masks, so the table is a paired before/after comparison."""
    t0 = time.perf_counter()
    report = FoldRealism(data_root, split, device, cases).score(weights, seeds, steps, figure)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def realism_markdown(report: dict) -> str:
    labels = list(report["results"])
    where = SPLIT_TITLES.get(report["split"], f"{report['split']} fold")
    lines = [f"## Lesion realism, {where} ({len(report['cases'])} cases: "
             f"{', '.join(report['cases'])}; seeds {report['seeds']})", "",
             "A (case, modality) pair passes when the synthetic lesion is closer to the real one than the "
             "pseudo-healthy base on mean intensity and closer than a training-fold constant fill on the "
             "intensity distribution (Wasserstein), averaged over seeds and sub-regions. z-units of the case's "
             "healthy tissue.", "",
             "| | " + " | ".join(labels) + " | copy-paste |", "|---|" + "---|" * (len(labels) + 1)]
    s = {k: report["results"][k]["summary"] for k in labels}
    first = s[labels[0]]

    def row(name, key, copy_key=None):
        cells = [str(s[k].get(key, "-")) for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first.get(copy_key, '-') if copy_key else '-'} |")

    row("**pass fraction** (case, modality pairs)", "pass_fraction", "copy_paste_pass_fraction")
    row("median texture ratio (synthetic / real, 1 = real)", "median_texture_ratio", "median_texture_ratio_copy")
    row("classifier AUROC within cases (0.5 = indistinguishable)", "classifier_auroc", "classifier_auroc_copy")
    row("classifier AUROC across cases (leave one case out)", "classifier_auroc_across_cases",
        "classifier_auroc_across_cases_copy")
    row(f"mean error (base: {first['mean_err_base']})", "mean_err", "mean_err_copy")
    row(f"Wasserstein (constant fill: {first['wasserstein_const']})", "wasserstein", "wasserstein_copy")
    row("outside-region max abs difference", "outside_region_max_abs_diff")
    for m in first["per_modality_pass"]:
        lines.append(f"| pass fraction, {m} | " + " | ".join(str(s[k]["per_modality_pass"].get(m)) for k in labels)
                     + " | |")
    for k in labels:
        if s[k].get("separating_features"):
            lines += ["", f"Single patch features that best separate real from synthetic ({k}): "
                      + "; ".join(f"{r['channel']} {r['feature']} {r['auroc']} (real {r['real_mean']}, synthetic "
                                  f"{r['synthetic_mean']})" for r in s[k]["separating_features"])]
    if report.get("tissue_scale"):
        scales = [v for per_case in report["tissue_scale"].values() for v in per_case.values() if np.isfinite(v)]
        if scales:
            lines += ["", f"Tissue scale (std of the tissue 6-16 mm around the lesion in the z-units used; below 1 "
                      f"where a skull and scalp widen the healthy foreground): {min(scales):.2f} to {max(scales):.2f}."]
    lines += ["", "Per (case, modality) pair: the base's mean error and the constant fill's Wasserstein, then each "
              "weights' mean error / Wasserstein / pass", "",
              "| case | modality | base mean err | const W | " + " | ".join(labels) + " |",
              "|---|---|---|---|" + "---|" * len(labels)]
    by_label = {k: {(p["case"], p["modality"]): p for p in report["results"][k]["pairs"]} for k in labels}
    for key, p in by_label[labels[0]].items():
        cells = [f"{by_label[k][key]['mean_err']:.2f} / {by_label[k][key]['wasserstein']:.2f} / "
                 f"{'yes' if by_label[k][key]['pass'] else 'no'}" for k in labels]
        lines.append(f"| {key[0]} | {key[1]} | {p['mean_err_base']:.2f} | {p['wasserstein_const']:.2f} | "
                     + " | ".join(cells) + " |")
    for label, name in (report.get("figures") or {}).items():
        lines += ["", f"Real (upper row) vs synthetic (lower row, seed 0), {label} weights, three "
                      f"{report['split']}-fold cases, every modality; orange: the lesion outline.", "",
                  f"![{label}]({name})"]
    lines.append("")
    return "\n".join(lines)
