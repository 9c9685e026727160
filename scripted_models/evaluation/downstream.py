"""Downstream value: does training with synthetic lesions help a small segmentation network?

Cases: the case-level folds of folds.py. Networks train on the training fold and are scored on every case of
the fixed test fold (never used for tuning); a seed's score is the mean over the test cases.
Conditions (same network, steps and seeds):
  real        the real training-fold cases only
  pathosyn    + lesions synthesized by PathoSyn on pseudo-healthy bases of the training cases, one with another
                case's real mask and one with a PathAR-generated mask per base
  copy_paste  + the same number of lesions made by pasting another case's residual with its mask (CarveMix-like)
Network: MONAI 2D UNet on axial flair + t1c slices at 2 mm; sigmoid outputs for the BraTS regions whole tumour
(WT), tumour core (TC) and enhancing tumour (ET). Metrics on the held-out volume: Dice per region and slice-level
lesion-detection AUROC (score = max WT probability in the slice). Mean and spread over seeds; conditions are
compared paired by seed (the same seed trains every condition), with a 95 % t confidence interval of the
per-seed differences.
PathAR alignment: the `real` network segments PathAR images; Dice against the generated masks (real patches of
the test cases give the reference).

    python -m scripted_models.evaluation.downstream --out docs/downstream
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cases import _find, default_data_root, load_case
from ..labels import CORE, ENHANCING
from ..preprocess import IntensityNormalizer, blend_weight, dilate_mm
from ..volume import Volume, resample_to

MODS = ("flair", "t1c")
# --quick (CI): a fixed small subset of the training fold, and the first test case
QUICK_TRAIN_CASES = ("brats2013_pat0004", "tcga_du_7294", "brats18_tcia02_135_1")
REGIONS = ("WT", "TC", "ET")
CONDITIONS = ("real", "pathosyn", "copy_paste")
GRID_MM = 2.0
SIDE = 96  # slices are cropped / padded to SIDE x SIDE around the brain (192 mm at 2 mm)
BACKGROUND_Z = -4.0


@dataclass
class DownstreamSettings:
    seeds: tuple = (0, 1, 2, 3, 4)
    steps: int = 400
    batch: int = 16
    lr: float = 2e-3
    synth_steps: int | None = None  # DDIM steps for PathoSyn (None: model default)
    pathar_samples: int = 8
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> DownstreamSettings:
        return cls(seeds=(0,), steps=20, batch=8, synth_steps=2, pathar_samples=2, quick=True)


# --- volumes on a common 2 mm LPS grid -------------------------------------------------------------------------------
def to_grid(volume: Volume, nearest: bool) -> np.ndarray:
    """Reorient to LPS (array axis 0 = inferior -> superior, so axis-0 slices are axial) and resample to 2 mm."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(volume.to_sitk(), "LPS")
    size = [max(1, int(round(n * s / GRID_MM))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                        image.GetOrigin(), (GRID_MM,) * 3, image.GetDirection(), BACKGROUND_Z if not nearest else 0,
                        image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def regions_of(labels: np.ndarray) -> np.ndarray:
    """(3, ...) WT, TC, ET from canonical labels."""
    return np.stack([labels > 0, (labels == CORE) | (labels == ENHANCING), labels == ENHANCING]).astype(np.float32)


@dataclass
class GridCase:
    name: str
    images: np.ndarray  # (2, Z, Y, X) z-scores, background BACKGROUND_Z
    labels: np.ndarray  # (Z, Y, X) canonical


def grid_case(name: str, images_z: dict, labels: np.ndarray, reference: Volume, brain: np.ndarray) -> GridCase:
    arrays = [to_grid(reference.with_array(np.where(brain, images_z[m], BACKGROUND_Z).astype(np.float32)), False)
              for m in MODS]
    return GridCase(name, np.stack(arrays), to_grid(reference.with_array(labels.astype(np.uint8)), True))


# --- training data: real cases and synthetic lesions ------------------------------------------------------------------
class CaseData:
    """One real case: raw images, labels, brain, normaliser, pseudo-healthy base (z-units)."""

    def __init__(self, folder: Path, device: str):
        from ..pathosyn.api import pseudo_healthy

        case = load_case(folder)
        self.name = case.case_id
        self.reference = case.reference
        self.images = {m: case.images[m] for m in MODS}
        self.labels = case.seg
        self.brain = case.foreground()
        lesion = self.labels > 0
        self.norms = {m: IntensityNormalizer.fit(v.array, exclude=lesion, foreground=self.brain)
                      for m, v in self.images.items()}
        self.real_z = {m: self.norms[m].forward(v.array) for m, v in self.images.items()}
        base = pseudo_healthy(self.images, self.reference.with_array(self.labels), device=device,
                              smooth_deep_fill=False)  # the base lesions are synthesized on
        self.base = base  # raw intensities, lesion removed
        self.base_z = {m: self.norms[m].forward(base[m].array) for m in MODS}

    def release(self) -> None:
        """Drop the full-resolution volumes once the grid cases are built (16 cases would hold several GB)."""
        self.images = self.real_z = self.base = self.base_z = None

    @property
    def mask_volume(self) -> Volume:
        return self.reference.with_array(self.labels.astype(np.uint8))

    def centroid_lps(self) -> np.ndarray:
        from ..placement import lesion_points_lps

        return lesion_points_lps(self.mask_volume).mean(axis=1)


def real_grid_case(folder: Path) -> GridCase:
    """A real case on the grid (flair + t1c z-scores and labels; no pseudo-healthy base needed)."""
    case = load_case(folder)
    brain = case.foreground()
    lesion = case.seg > 0
    z = {m: IntensityNormalizer.fit(case.images[m].array, exclude=lesion, foreground=brain)
         .forward(case.images[m].array) for m in MODS}
    return grid_case(case.case_id, z, case.seg, case.reference, brain)


def _moved_residual(source: CaseData, target: CaseData, shift_lps) -> dict:
    """source's residual (real - pseudo-healthy, z-units), translated by shift_lps onto target's grid."""
    out = {}
    for m in MODS:
        resid = source.reference.with_array((source.real_z[m] - source.base_z[m]).astype(np.float32))
        moved = Volume(resid.array, resid.spacing, tuple(np.add(resid.origin, shift_lps)), resid.direction)
        out[m] = resample_to(moved, target.reference, nearest=False).array
    return out


def synthetic_cases(cases: list[CaseData], settings: DownstreamSettings, device: str) -> dict[str, list[GridCase]]:
    """{'pathosyn': [...], 'copy_paste': [...]}: two synthetic lesions per base, same count for both."""
    from ..pathar.api import sample_pairs
    from ..pathosyn.api import synthesize_lesion
    from ..placement import lesion_points_lps, place_lesion

    pathar_masks = [p.mask for p in sample_pairs(list(MODS), max(len(cases), 1), seed=101, device=device)]
    out: dict[str, list[GridCase]] = {"pathosyn": [], "copy_paste": []}
    for k, base in enumerate(cases):
        centre = base.centroid_lps()
        first, second = cases[(k + 1) % len(cases)], cases[(k + 2) % len(cases)]
        jobs = [("pathosyn", first.mask_volume, None), ("pathosyn", pathar_masks[k % len(pathar_masks)], None),
                ("copy_paste", first.mask_volume, first), ("copy_paste", second.mask_volume, second)]
        for j, (kind, mask, source) in enumerate(jobs):
            placed, _ = place_lesion(mask, base.reference, centre)
            labels = placed.array
            if kind == "pathosyn":
                result = synthesize_lesion(base.base, placed, seed=1000 * k + j, steps=settings.synth_steps,
                                           device=device)
                images_z = {m: base.norms[m].forward(result.images[m].array) for m in MODS}
            else:
                shift = centre - lesion_points_lps(source.mask_volume).mean(axis=1)
                resid = _moved_residual(source, base, shift)
                lesion = labels > 0
                spacing_zyx = tuple(reversed(base.reference.spacing))
                weight = blend_weight(lesion, dilate_mm(lesion, 6.0, spacing_zyx), spacing_zyx)
                images_z = {m: base.base_z[m] + weight * resid[m] for m in MODS}
            out[kind].append(grid_case(f"{kind}:{base.name}:{j}", images_z, labels, base.reference, base.brain))
    return out


# --- 2D slices --------------------------------------------------------------------------------------------------------
def _crop_box(images: np.ndarray) -> tuple[slice, slice]:
    brain = (images[0] > BACKGROUND_Z + 0.5).any(axis=0)
    ys, xs = np.nonzero(brain) if brain.any() else (np.array([images.shape[2] // 2]), np.array([images.shape[3] // 2]))
    cy, cx = int(ys.mean()), int(xs.mean())
    return slice(cy - SIDE // 2, cy + SIDE // 2), slice(cx - SIDE // 2, cx + SIDE // 2)


def _take(array: np.ndarray, box, fill) -> np.ndarray:
    """array[..., box] with out-of-range parts filled (crop or pad to SIDE x SIDE)."""
    out = np.full(array.shape[:-2] + (SIDE, SIDE), fill, array.dtype)
    (ys, xs), (h, w) = box, array.shape[-2:]
    y0, y1, x0, x1 = max(ys.start, 0), min(ys.stop, h), max(xs.start, 0), min(xs.stop, w)
    out[..., y0 - ys.start:y1 - ys.start, x0 - xs.start:x1 - xs.start] = array[..., y0:y1, x0:x1]
    return out


def slices_of(case: GridCase):
    """(images (S, 2, SIDE, SIDE), regions (S, 3, SIDE, SIDE)) for the axial slices that contain brain."""
    box = _crop_box(case.images)
    images = _take(case.images, box, BACKGROUND_Z).transpose(1, 0, 2, 3)
    regions = _take(regions_of(case.labels), box, 0.0).transpose(1, 0, 2, 3)
    keep = (images[:, 0] > BACKGROUND_Z + 0.5).mean(axis=(1, 2)) > 0.05
    return np.ascontiguousarray(images[keep]), np.ascontiguousarray(regions[keep])


class SliceSampler:
    """Half of each batch from slices with a lesion; real and synthetic volumes equally likely."""

    def __init__(self, groups: list[list[GridCase]]):
        self.groups = [[slices_of(c) for c in group] for group in groups if group]

    def batch(self, rng: np.random.Generator, size: int):
        xs, ys = [], []
        for b in range(size):
            images, regions = self._pick(rng)
            lesion = np.flatnonzero(regions[:, 0].any(axis=(1, 2)))
            i = rng.choice(lesion) if (b % 2 == 0 and len(lesion)) else rng.integers(len(images))
            x, y = images[i], regions[i]
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, :, ::-1]
            k = int(rng.integers(4))
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
            gain = rng.uniform(0.9, 1.1, size=(x.shape[0], 1, 1))
            xs.append((x * gain + rng.uniform(-0.1, 0.1, size=(x.shape[0], 1, 1))).astype(np.float32))
            ys.append(np.ascontiguousarray(y))
        return np.stack(xs), np.stack(ys)

    def _pick(self, rng):
        group = self.groups[rng.integers(len(self.groups))]
        return group[rng.integers(len(group))]


# --- network ----------------------------------------------------------------------------------------------------------
def build_segmenter():
    import torch
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=2, in_channels=len(MODS), out_channels=len(REGIONS), channels=(16, 32, 64, 128),
               strides=(2, 2, 2), num_res_units=1)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == len(REGIONS)][-1]
    torch.nn.init.constant_(last.bias, -3.0)  # prior: lesions are rare (p ~ 0.05), so training starts calm
    return net


def train_segmenter(groups: list[list[GridCase]], settings: DownstreamSettings, seed: int, device: str = "auto"):
    import torch
    from monai.losses import DiceCELoss

    from ..pathosyn.training import cosine_lr
    from ..runtime import pick_device

    dev = pick_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_segmenter().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)  # batch Dice: slices without lesion do not dominate
    sampler = SliceSampler(groups)
    net.train()
    for step in range(settings.steps):
        x, y = sampler.batch(rng, settings.batch)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, 0, settings.steps, settings.lr, floor_ratio=0.0)
        loss = loss_fn(net(torch.from_numpy(x).to(dev)), torch.from_numpy(y).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def predict_slices(net, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """(S, 3, H, W) probabilities for (S, 2, H, W) slices."""
    import torch

    dev = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(dev)
            out.append(torch.sigmoid(net(x)).cpu().numpy())
    return np.concatenate(out)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary arrays; 1.0 when both are empty."""
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, truth).sum() / total)


def score(net, case: GridCase) -> dict:
    from sklearn.metrics import roc_auc_score

    images, regions = slices_of(case)
    prob = predict_slices(net, images)
    out = {f"dice_{r}": round(dice(prob[:, c] > 0.5, regions[:, c] > 0.5), 4) for c, r in enumerate(REGIONS)}
    has_lesion = regions[:, 0].any(axis=(1, 2))
    slice_score = prob[:, 0].max(axis=(1, 2))
    out["detection_auroc"] = round(float(roc_auc_score(has_lesion, slice_score)), 4) \
        if 0 < has_lesion.sum() < len(has_lesion) else None
    return out


def pathar_alignment(net, real_cases: list[GridCase], n: int, device: str) -> dict:
    """WT Dice of the segmenter on PathAR images vs their generated masks; real lesion-centred patches of the
    test cases as the reference."""
    from ..pathar.api import sample_pairs

    pairs = sample_pairs(list(MODS), n, seed=202, device=device)
    generated = []
    for pair in pairs:
        images = np.stack([pair.images[m].array for m in MODS]).transpose(1, 0, 2, 3).astype(np.float32)
        prob = predict_slices(net, images)
        generated.append(dice(prob[:, 0] > 0.5, pair.mask.array > 0))
    side = pairs[0].mask.array.shape[0] if pairs else 64
    reference = []
    for real_case in real_cases:
        images, labels = lesion_patch(real_case, side)
        prob = predict_slices(net, np.ascontiguousarray(images.transpose(1, 0, 2, 3)))
        reference.append(dice(prob[:, 0] > 0.5, labels > 0))
    return {"n": len(generated), "mean_wt_dice_generated": round(float(np.mean(generated)), 4) if generated else None,
            "wt_dice_per_sample": [round(d, 4) for d in generated],
            "wt_dice_real_patch_reference": round(float(np.mean(reference)), 4),
            "wt_dice_real_patch_per_case": [round(d, 4) for d in reference]}


def lesion_patch(case: GridCase, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (2, side, side, side), labels) centred on the lesion; parts outside the volume are background."""
    centre = np.argwhere(case.labels > 0).mean(axis=0).astype(int)
    images = np.full((case.images.shape[0],) + (side,) * 3, BACKGROUND_Z, np.float32)
    labels = np.zeros((side,) * 3, case.labels.dtype)
    src, dst = [], []
    for c, n in zip(centre, case.labels.shape):
        lo = int(c) - side // 2
        a, b = max(lo, 0), min(lo + side, n)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    images[(slice(None),) + tuple(dst)] = case.images[(slice(None),) + tuple(src)]
    labels[tuple(dst)] = case.labels[tuple(src)]
    return images, labels


def score_cases(net, cases: list[GridCase]) -> dict:
    """score() of each test case and their mean (a case without lesion-free slices has no AUROC)."""
    per_case = {c.name: score(net, c) for c in cases}
    out = {}
    for key in next(iter(per_case.values())):
        values = [r[key] for r in per_case.values() if r[key] is not None]
        out[key] = round(float(np.mean(values)), 4) if values else None
    out["per_case"] = per_case
    return out


def fold_cases(root: Path, quick: bool) -> tuple[list[str], list[str]]:
    """(training cases, test cases): the training and test folds (quick: a fixed small subset)."""
    from ..folds import make_folds

    folds = make_folds(str(root))
    if quick:
        return list(QUICK_TRAIN_CASES), list(folds.test[:1])
    train = [c for c in folds.train if all(_find(root / "cases" / c, m) for m in MODS)]
    return train, list(folds.test)



# --- the study --------------------------------------------------------------------------------------------------------
def run_downstream(data_root=None, settings: DownstreamSettings | None = None, device: str = "auto",
                   out: Path | None = None) -> dict:
    settings = settings or DownstreamSettings()
    root = Path(data_root or default_data_root())
    t0 = time.perf_counter()
    train_names, test_names = fold_cases(root, settings.quick)
    cases = [CaseData(root / "cases" / name, device) for name in train_names]
    real = [grid_case(c.name, c.real_z, c.labels, c.reference, c.brain) for c in cases]
    synthetic = synthetic_cases(cases, settings, device)
    for c in cases:  # the volumes are on the grid now
        c.release()
    test_cases = [real_grid_case(root / "cases" / name) for name in test_names]
    t_data = time.perf_counter() - t0

    groups = {"real": [real], "pathosyn": [real, synthetic["pathosyn"]],
              "copy_paste": [real, synthetic["copy_paste"]]}
    runs: dict[str, list[dict]] = {name: [] for name in CONDITIONS}
    alignment = None
    for seed in settings.seeds:
        for name in CONDITIONS:
            t = time.perf_counter()
            net = train_segmenter(groups[name], settings, seed, device)
            row = score_cases(net, test_cases)
            row["seed"], row["train_s"] = seed, round(time.perf_counter() - t, 1)
            runs[name].append(row)
            if name == "real" and alignment is None:
                alignment = pathar_alignment(net, test_cases, settings.pathar_samples, device)
    summary = {}
    for name, rows in runs.items():
        summary[name] = {}
        for key in [f"dice_{r}" for r in REGIONS] + ["detection_auroc"]:
            values = [r[key] for r in rows if r[key] is not None]
            summary[name][key] = {"mean": round(float(np.mean(values)), 4) if values else None,
                                  "std": round(float(np.std(values)), 4) if values else None}
    report = {"test_case": f"test fold ({len(test_names)} cases)", "test_cases": test_names,
              "train_cases": train_names, "modalities": list(MODS),
              "synthetic_volumes": {k: len(v) for k, v in synthetic.items()}, "runs": runs, "summary": summary,
              "pathar_alignment": alignment, "settings": asdict(settings),
              "timing_s": {"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)}}
    if out is not None:
        write_report(report, Path(out))
    return report


def downstream_markdown(report: dict) -> str:
    s = report["settings"]
    tested = ", ".join(report["test_cases"]) if report.get("test_cases") else report["test_case"]
    lines = [f"## Downstream segmentation (tested on {tested}; {', '.join(report['modalities'])})", "",
             f"MONAI 2D UNet, {s['steps']} steps x batch {s['batch']}, seeds {list(s['seeds'])}; training cases: "
             f"{', '.join(report['train_cases'])}; synthetic volumes added: {report['synthetic_volumes']}.", "",
             "| condition | Dice WT | Dice TC | Dice ET | detection AUROC |", "|---|---|---|---|---|"]

    def cell(v):
        return "-" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    for name, row in report["summary"].items():
        lines.append(f"| {name} | {cell(row['dice_WT'])} | {cell(row['dice_TC'])} | {cell(row['dice_ET'])} | "
                     f"{cell(row['detection_auroc'])} |")
    comparison = paired_comparison(report)
    if comparison:
        lines += ["", "Paired by seed (the same training seed in both conditions): PathoSyn minus the other "
                      "condition, mean ± sd of the per-seed differences, [95 % t interval], and the seeds where "
                      "PathoSyn is higher.", "",
                  "| PathoSyn vs | Dice WT | Dice TC | Dice ET | detection AUROC |", "|---|---|---|---|---|"]

        def interval(m):
            ci = m.get("ci95")
            return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""

        for other, metrics in comparison.items():
            lines.append(f"| {other} | " + " | ".join(
                f"{m['mean_diff']:+.3f} ± {m['sd_diff']:.3f}{interval(m)} ({m['wins']}/{m['n']})"
                for m in metrics.values()) + " |")
        robust = [f"{key} vs {other}" for other, metrics in comparison.items() for key, m in metrics.items()
                  if m["wins"] == m["n"] and m["n"] >= 3]
        lines += ["", "Robust gain (higher in every one of at least 3 seeds): " + (", ".join(robust) if robust else
                  "none. The seed-to-seed spread of a small 2D U-Net is as large as the differences between the "
                  "conditions.")]
    a = report.get("pathar_alignment") or {}
    if a:
        lines += ["", f"PathAR alignment: the `real` network's whole-tumour Dice on {a['n']} PathAR image patches "
                      f"against their generated masks: {a['mean_wt_dice_generated']} (real patches of the test cases: "
                      f"{a['wt_dice_real_patch_reference']})."]
    lines += ["", "![downstream](downstream.png)", ""]
    return "\n".join(lines)


def paired_comparison(report: dict) -> dict:
    """{other condition: {metric: mean/sd of the per-seed differences PathoSyn - other, wins, n}}."""
    runs = report.get("runs") or {}
    if "pathosyn" not in runs:
        return {}
    ours = {r["seed"]: r for r in runs["pathosyn"]}
    out = {}
    for other in (c for c in CONDITIONS if c != "pathosyn" and c in runs):
        out[other] = {}
        for key in [f"dice_{r}" for r in REGIONS] + ["detection_auroc"]:
            diffs = [ours[r["seed"]][key] - r[key] for r in runs[other]
                     if r["seed"] in ours and r[key] is not None and ours[r["seed"]][key] is not None]
            if diffs:
                out[other][key] = {"mean_diff": float(np.mean(diffs)), "sd_diff": float(np.std(diffs)),
                                   "wins": int(sum(d > 0 for d in diffs)), "n": len(diffs),
                                   "ci95": confidence_interval(diffs)}
    return {k: v for k, v in out.items() if v}


def confidence_interval(diffs, level: float = 0.95) -> list[float] | None:
    """Two-sided t interval of the mean of paired differences (None with fewer than 2)."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(diffs, ddof=1) / np.sqrt(n))
    mean = float(np.mean(diffs))
    return [round(mean - half, 4), round(mean + half, 4)]


def write_report(report: dict, out: Path) -> None:
    from ..pathosyn.commands import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "downstream.json")
    downstream_plot(report, out / "downstream.png")
    tmp = out / ".downstream.md.tmp"
    tmp.write_text(downstream_markdown(report))
    tmp.replace(out / "downstream.md")


def downstream_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"dice_{r}" for r in REGIONS] + ["detection_auroc"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(report["summary"])
    for i, (name, row) in enumerate(report["summary"].items()):
        means = [row[k]["mean"] or 0 for k in keys]
        stds = [row[k]["std"] or 0 for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=stds, label=name, capsize=3)
    ax.set_xticks(np.arange(len(keys)) + width * (len(report["summary"]) - 1) / 2)
    ax.set_xticklabels(["Dice WT", "Dice TC", "Dice ET", "det. AUROC"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Downstream segmentation on {report['test_case']} (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None)
    p.add_argument("--out", type=Path, default=Path("docs/downstream"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    settings = DownstreamSettings.quick_settings() if args.quick else DownstreamSettings()
    if args.steps:
        settings.steps = args.steps
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    report = run_downstream(args.data, settings, out=args.out)
    print(downstream_markdown(report))
    print(json.dumps(report["timing_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
