"""PNG figures for the evaluation and bench reports (matplotlib, Agg backend, atomic writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def bench_plot(rows: dict, path: Path) -> Path:
    """Latency vs lesion-ROI voxels (with the whole volume's voxel count marked), vs DDIM steps and vs the
    deviation U-Net's size (when measured)."""
    plt = _figure()
    sizes = (rows.get("vs_model_size") or {}).get("variants") or {}
    fig, axes = plt.subplots(1, 3 if sizes else 2, figsize=(15 if sizes else 10, 3.6))
    ax, ax2 = axes[0], axes[1]
    roi = rows["vs_roi"]
    x = [r["roi_voxels"] for r in roi]
    ax.errorbar(x, [r["p50_s"] for r in roi], yerr=[[r["p50_s"] - r["min_s"] for r in roi],
                                                     [r["max_s"] - r["p50_s"] for r in roi]], marker="o", capsize=3)
    for r in roi:
        ax.annotate(f"{r['side']}³", (r["roi_voxels"], r["p50_s"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    if "roi64_double_volume" in rows:
        d = rows["roi64_double_volume"]
        ax.set_title(f"same 64³ lesion in a 2x volume: {d['ratio_vs_single']}x", fontsize=9)
    ax.set_xlabel("lesion ROI voxels")
    ax.set_ylabel(f"synthesize p50 (s), {rows.get('threads')} threads")
    steps = rows["vs_steps"]
    ax2.errorbar([r["steps"] for r in steps], [r["p50_s"] for r in steps],
                 yerr=[[r["p50_s"] - r["min_s"] for r in steps], [r["max_s"] - r["p50_s"] for r in steps]],
                 marker="o", capsize=3)
    ax2.set_xlabel("DDIM steps (64³ ROI)")
    ax2.set_ylabel("p50 (s)")
    if sizes:
        ax3 = axes[2]
        for name, r in sizes.items():
            ax3.scatter(r["parameters"] / 1e6, r["click_s_estimate"], color="C1" if name == "bundled" else "C0")
            ax3.annotate(name, (r["parameters"] / 1e6, r["click_s_estimate"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
        ax3.axhline(5.0, color="grey", linestyle="--", linewidth=1)
        ax3.set_xlabel("deviation U-Net parameters (M)")
        ax3.set_ylabel("click estimate, 64³, default steps (s)")
        ax3.set_title("model size vs the 5 s goal (dashed)", fontsize=9)
    path = _save(fig, path)
    plt.close(fig)
    return path


def real_vs_synthetic(examples: dict, path: Path) -> Path:
    """Per case two rows (real, synthetic), one column per modality: the axial slice with the most lesion."""
    from ..labels import MODALITIES

    plt = _figure()
    cases = list(examples)
    fig, axes = plt.subplots(2 * len(cases), len(MODALITIES), figsize=(2.2 * len(MODALITIES), 2.3 * 2 * len(cases)),
                             squeeze=False)
    for i, case_id in enumerate(cases):
        real, synthetic, seg = examples[case_id]
        z = int(np.argmax((seg > 0).sum(axis=(1, 2))))
        ys, xs = np.nonzero(seg[z] > 0)
        half = max(int(np.ptp(ys)), int(np.ptp(xs))) // 2 + 20
        cy, cx = int(ys.mean()), int(xs.mean())
        crop = (slice(max(cy - half, 0), cy + half), slice(max(cx - half, 0), cx + half))
        for j, m in enumerate(MODALITIES):
            for row, (name, images) in enumerate((("real", real), ("synthetic", synthetic))):
                ax = axes[2 * i + row, j]
                ax.axis("off")
                if m not in images:
                    continue
                ax.imshow(images[m][z][crop], cmap="gray", vmin=-2.5, vmax=4.0, origin="lower")
                ax.contour(seg[z][crop] > 0, levels=[0.5], colors="orange", linewidths=0.6, origin="lower")
                ax.set_title(f"{case_id[:22]} {name} {m}" if j == 0 else f"{name} {m}", fontsize=7)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
