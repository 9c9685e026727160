"""Two-sample classifier test: can a small classifier tell real lesion patches from synthetic ones?

Patches are axial 2D crops (all modalities as channels) centred on the same lesion voxels in the real and the
synthetic image. Each patch is described per channel by intensity (mean, spread, quantiles, 4x4 block means) and
texture (mean absolute gradients and Laplacian, neighbour correlation). A logistic-regression classifier on these
features is cross-validated in one of two ways; AUROC 0.5 means the two sets are indistinguishable to it, 1.0
perfectly separable.
- **Within cases** (folds of patch centres; a location is never in both a training and a test fold): the classifier
  learns each case's own real lesion, so it asks how close the synthetic lesion is to *this case's* lesion. A real
  lesion of another case pasted in does not pass it either.
- **Across cases** (leave one case out): the classifier must judge a case it never saw, so it asks whether
  synthetic lesions differ from real ones in a way that holds from case to case: a realism test.
"""
from __future__ import annotations

import numpy as np

PATCH = 16
MAX_CENTRES = 300


def lesion_centres(lesion: np.ndarray, n: int = MAX_CENTRES, seed: int = 0) -> np.ndarray:
    """Up to n lesion voxel indices (z, y, x), seeded."""
    points = np.argwhere(lesion)
    rng = np.random.default_rng(seed)
    return points[rng.choice(len(points), size=min(n, len(points)), replace=False)]


def axial_patches(images: list[np.ndarray], centres: np.ndarray, size: int = PATCH) -> np.ndarray:
    """(N, C, size, size) axial crops around each centre (edge-padded at the volume border)."""
    half = size // 2
    stack = np.stack([np.pad(img, ((0, 0), (half, half), (half, half)), mode="edge") for img in images])
    out = np.empty((len(centres), len(images), size, size), np.float32)
    for i, (z, y, x) in enumerate(centres):
        out[i] = stack[:, z, y:y + size, x:x + size]
    return out


FEATURE_NAMES = ("mean", "std", "q10", "q50", "q90", "grad_x", "grad_y", "laplacian", "neighbour_corr") + tuple(
    f"block{i}" for i in range(16))  # per channel, in patch_features' order


def patch_features(patches: np.ndarray) -> np.ndarray:
    """(N, C, S, S) -> (N, F) intensity and texture features per channel."""
    n, c, s, _ = patches.shape
    flat = patches.reshape(n, c, -1).astype(np.float64)
    dx = np.abs(np.diff(patches, axis=3)).reshape(n, c, -1).mean(-1)
    dy = np.abs(np.diff(patches, axis=2)).reshape(n, c, -1).mean(-1)
    lap = np.abs(4 * patches[..., 1:-1, 1:-1] - patches[..., :-2, 1:-1] - patches[..., 2:, 1:-1]
                 - patches[..., 1:-1, :-2] - patches[..., 1:-1, 2:]).reshape(n, c, -1).mean(-1)
    a, b = patches[..., :, :-1].reshape(n, c, -1), patches[..., :, 1:].reshape(n, c, -1)
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    corr = (a * b).mean(-1) / np.sqrt((a * a).mean(-1) * (b * b).mean(-1) + 1e-8)
    blocks = patches.reshape(n, c, 4, s // 4, 4, s // 4).mean(axis=(3, 5)).reshape(n, c, -1)
    quantiles = np.percentile(flat, [10, 50, 90], axis=-1).transpose(1, 2, 0)
    parts = [flat.mean(-1, keepdims=True), flat.std(-1, keepdims=True), quantiles, dx[..., None], dy[..., None],
             lap[..., None], corr[..., None], blocks]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def classifier_auroc(real: np.ndarray, synthetic: np.ndarray, cases: np.ndarray | None = None, folds: int = 5,
                     seed: int = 0) -> float:
    """Cross-validated AUROC of real (label 1) vs synthetic (label 0) patches; rows i of both share a centre.
    cases (N,): the case of each row; given, each case is scored by a classifier trained on the others (across
    cases), otherwise folds of patch centres (within cases)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(real)
    x = np.concatenate([patch_features(real), patch_features(synthetic)])
    y = np.r_[np.ones(n), np.zeros(len(synthetic))]
    if cases is None:
        order = np.random.default_rng(seed).permutation(n)  # group = patch centre, shuffled (GroupKFold is not)
        groups, splitter = np.r_[order, order], GroupKFold(n_splits=folds)
    else:
        cases = np.asarray(cases)
        if len(cases) != n or len(np.unique(cases)) < 2:
            raise ValueError("an across-case AUROC needs the case of every row and at least 2 cases")
        groups, splitter = np.r_[cases, cases], LeaveOneGroupOut()
    scores = np.zeros(len(y))
    for train, test in splitter.split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        model.fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, scores))


def separating_features(real: np.ndarray, synthetic: np.ndarray, channels: list[str], top: int = 5) -> list[dict]:
    """The single patch features that best tell real from synthetic patches: the `top` with the highest
    AUROC (max(a, 1 - a): either direction), each with its real and synthetic mean."""
    from sklearn.metrics import roc_auc_score

    fr, fs = patch_features(real), patch_features(synthetic)
    y = np.r_[np.ones(len(fr)), np.zeros(len(fs))]
    rows = []
    for j in range(fr.shape[1]):
        auc = float(roc_auc_score(y, np.r_[fr[:, j], fs[:, j]]))
        rows.append({"channel": channels[j // len(FEATURE_NAMES)], "feature": FEATURE_NAMES[j % len(FEATURE_NAMES)],
                     "auroc": round(max(auc, 1.0 - auc), 3), "real_mean": round(float(fr[:, j].mean()), 3),
                     "synthetic_mean": round(float(fs[:, j].mean()), 3)})
    return sorted(rows, key=lambda r: -r["auroc"])[:top]
