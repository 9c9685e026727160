"""`pathosyn demo`: the MNI152 T1 with the built-in lesion -> NIfTI outputs and a PNG figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..templates import demo_lesion, mni_t1
from ..volume import write_volume
from .api import synthesize_lesion
from .commands import write_synthesis


def save_figure(before: np.ndarray, after: np.ndarray, residual: np.ndarray, labels: np.ndarray,
                path: Path, uncertainty: np.ndarray | None = None, title: str = "") -> Path:
    """Rows: axial slices through the lesion; columns: before / after / residual / mask (/ uncertainty).
    Arrays are (z, y, x) in LPS-ordered voxels; slices are shown in radiological-free 'neurological' view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    zs = np.flatnonzero(labels.any(axis=(1, 2)))
    picks = [int(zs[len(zs) // 4]), int(zs[len(zs) // 2]), int(zs[3 * len(zs) // 4])]
    cols = ["before", "after", "residual", "mask"] + (["uncertainty"] if uncertainty is not None else [])
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.6 * len(cols), 2.7 * len(picks)))
    lo, hi = np.percentile(before[before > before.min()], [0.5, 99.5]) if (before > before.min()).any() else (0, 1)
    rmax = float(np.abs(residual).max()) or 1.0
    mask_cmap = ListedColormap([(0, 0, 0, 0), (0.85, 0.2, 0.2, 1), (0.2, 0.8, 0.2, 1), (0.95, 0.85, 0.1, 1)])
    for row, z in enumerate(picks):
        views = {"before": (before[z], "gray", lo, hi), "after": (after[z], "gray", lo, hi),
                 "residual": (residual[z], "RdBu_r", -rmax, rmax)}
        for col, name in enumerate(cols):
            ax = axes[row, col]
            if name == "mask":
                ax.imshow(np.flipud(before[z]), cmap="gray", vmin=lo, vmax=hi)
                ax.imshow(np.flipud(labels[z]), cmap=mask_cmap, vmin=0, vmax=3, interpolation="nearest", alpha=0.6)
            elif name == "uncertainty":
                ax.imshow(np.flipud(uncertainty[z]), cmap="magma")
            else:
                img, cmap, vmin, vmax = views[name]
                ax.imshow(np.flipud(img), cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
        axes[row, 0].set_ylabel(f"axial k={z}")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_demo(out: Path, seed: int = 0, samples: int = 3, steps: int | None = None, device: str = "auto",
             progress=None) -> dict:
    t1 = mni_t1()
    mask = demo_lesion()
    result = synthesize_lesion({"t1": t1}, mask, seed=seed, samples=samples, steps=steps, device=device,
                               progress=progress)
    files = write_synthesis(result, out)
    files["input_t1"] = str(write_volume(t1, out / "input_t1.nii.gz"))
    unc = result.uncertainty["t1"].array if result.uncertainty else None
    rep = result.report
    title = (f"PathoSyn demo: MNI152 T1 + built-in lesion, seed {seed}, {rep['steps']} DDIM steps, "
             f"K={samples}, ROI {rep['roi_size_zyx']}, model {rep['timing_s']['model']:.1f} s")
    files["figure"] = str(save_figure(t1.array, result.images["t1"].array, result.residuals["t1"].array,
                                      result.mask.array, out / "demo.png", unc, title))
    return files
