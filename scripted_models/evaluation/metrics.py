"""Image and distribution metrics used by the evaluation (numpy/scipy/MONAI; tested on known inputs)."""
from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-D earth mover's distance between two intensity samples (same units as the intensities)."""
    return float(wasserstein_distance(np.ravel(a), np.ravel(b)))


def glcm_features(values: np.ndarray, region: np.ndarray, levels: int = 16, lo: float = -3.0,
                  hi: float = 6.0) -> dict:
    """3D grey-level co-occurrence (offsets +1 along each axis, symmetric, pairs inside `region`):
    contrast and homogeneity. Intensities are quantised on a fixed [lo, hi] range so cases compare."""
    q = np.clip(((values - lo) / (hi - lo) * levels).astype(int), 0, levels - 1)
    glcm = np.zeros((levels, levels), np.float64)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        both = region[tuple(a)] & region[tuple(b)]
        np.add.at(glcm, (q[tuple(a)][both], q[tuple(b)][both]), 1)
    glcm = glcm + glcm.T
    total = glcm.sum()
    if total == 0:
        return {"contrast": float("nan"), "homogeneity": float("nan")}
    p = glcm / total
    i, j = np.indices(p.shape)
    return {"contrast": float((p * (i - j) ** 2).sum()), "homogeneity": float((p / (1.0 + np.abs(i - j))).sum())}


def masked_mse_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> tuple:
    mse = float(np.mean((pred[mask] - target[mask]) ** 2))
    psnr = float(10 * np.log10(data_range ** 2 / mse)) if mse > 0 else float("inf")
    return mse, psnr


def ssim_in_box(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0,
                margin: int = 4) -> float:
    """MONAI SSIM (3D, Gaussian window) on the bounding box of `mask` plus a margin."""
    import torch
    from monai.metrics import SSIMMetric

    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p = torch.from_numpy(np.ascontiguousarray(pred[box], np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(target[box], np.float32))[None, None]
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=7)
    return float(metric(p, t).mean())


def brats_inpainting_scores(predictions: dict[str, np.ndarray], truth: np.ndarray, voided: np.ndarray,
                            mask: np.ndarray, slice_axis: int) -> dict[str, dict]:
    """{name: scores} of each prediction by the BraTS 2023 local-synthesis challenge's own scoring (its
    `generate_metrics`, re-implemented): both images zeroed outside `mask`, clipped and scaled to [0, 1] by the
    0.5 / 99.5 percentiles of the whole voided volume (background included; the lower one at least 0); SSIM in 2-D
    slices across `slice_axis` (the challenge's first NIfTI axis: Gaussian window 11, sigma 1.5, reflect padding,
    data range from the two images) averaged over the mask's voxels; MSE and PSNR over the mask's voxels, PSNR
    both with a data range of 1 (`psnr_01_db`) and with the truth's range there (`psnr_db`, the torchmetrics
    default)."""
    import torch
    import torch.nn.functional as F
    from monai.metrics.regression import compute_ssim_and_cs

    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("empty inpainting mask")
    lo, hi = np.percentile(voided, [0.5, 99.5])
    lo = max(float(lo), 0.0)

    def scale(image):
        return (np.clip(np.where(mask, image, 0).astype(np.float64), lo, hi) - lo) / (hi - lo)

    # the slices across slice_axis that the mask touches: (slices, 1, H, W), padded by the window's half-width
    touched = np.nonzero(np.moveaxis(mask, slice_axis, 0).any(axis=(1, 2)))[0]
    mask_in_slices = np.moveaxis(mask, slice_axis, 0)[touched]

    def slices(image):
        stack = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, slice_axis, 0)[touched], np.float32))
        return F.pad(stack[:, None], (5, 5, 5, 5), mode="reflect")

    true = scale(truth)
    true_slices, true_range = slices(true), np.ptp(true)
    t = true[mask]
    target_range = float(t.max() - min(t.min(), 0.0))  # torchmetrics: max - min, min taken as 0 if above it
    out = {}
    for name, prediction in predictions.items():
        pred = scale(prediction)
        ssim_map, _ = compute_ssim_and_cs(slices(pred), true_slices, spatial_dims=2, kernel_size=(11, 11),
                                          kernel_sigma=(1.5, 1.5), data_range=float(max(np.ptp(pred), true_range)))
        mse, psnr_01 = masked_mse_psnr(pred, true, mask)
        out[name] = {"ssim": round(float(ssim_map[:, 0].numpy()[mask_in_slices].mean()), 4),
                     "psnr_db": round(psnr_01 + 20 * float(np.log10(target_range)), 2), "psnr_01_db": round(psnr_01, 2),
                     "mse": round(mse, 5)}
    return out


def region_stats(syn: np.ndarray, real: np.ndarray, region: np.ndarray) -> dict:
    """Mean/std error, Wasserstein distance and GLCM differences of `syn` vs `real` inside `region`."""
    a, b = syn[region], real[region]
    ga, gb = glcm_features(syn, region), glcm_features(real, region)
    return {
        "mean_err": float(abs(a.mean() - b.mean())),
        "std_err": float(abs(a.std() - b.std())),
        "wasserstein": wasserstein(a, b),
        "glcm_contrast_err": float(abs(ga["contrast"] - gb["contrast"])),
        "glcm_homogeneity_err": float(abs(ga["homogeneity"] - gb["homogeneity"])),
        "mean_syn": float(a.mean()), "mean_real": float(b.mean()),
        "glcm_contrast_syn": ga["contrast"], "glcm_contrast_real": gb["contrast"],
    }
