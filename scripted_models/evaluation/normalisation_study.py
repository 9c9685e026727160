"""Would another intensity normalisation make lesions of unseen scans more alike? (prints a markdown table)

For every labelled glioma of the folds (train, validation and test: nothing is trained here) and each modality and
sub-region: the sub-region's mean in the evaluation's z-units (healthy foreground z-score, `Case.normalized`), and
three tissue references. Leave one case out: predict its sub-region mean from the other cases' mean in
normalisation X, map it back to z-units, take the absolute error. Lower = that normalisation makes lesions more
alike across cases and scanners, so a model trained in it would have less to guess.

    python -m scripted_models.evaluation.normalisation_study [--data ../shared/data]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..cases import default_data_root, load_case
from ..folds import make_folds
from ..labels import MODALITIES
from ..preprocess import dilate_mm

SUBREGIONS = {1: "core", 2: "edema", 3: "enhancing"}
MIN_VOXELS = 50
# name: (offset, scale) in z-units, from a case row
NORMALISATIONS = {
    "z-score over healthy brain (today)": (lambda r: 0.0, lambda r: 1.0),
    "offset from the tissue 4-12 mm around the lesion": (lambda r: r["shell_mean"], lambda r: 1.0),
    "offset from the healthy-intensity mode": (lambda r: r["mode"], lambda r: 1.0),
    "(x - median) / IQR": (lambda r: r["median"], lambda r: r["iqr"]),
}


def case_rows(case_id: str, data_root: Path) -> list[dict]:
    """Per modality: sub-region means and tissue references, all in z-units of the healthy foreground."""
    case = load_case(data_root / "cases" / case_id)
    if case.seg is None or case.binary_only:
        return []
    fg, lesion, spacing = case.foreground(), case.seg > 0, case.spacing_zyx
    shell = dilate_mm(lesion, 12.0, spacing) & ~dilate_mm(lesion, 4.0, spacing) & fg
    rows = []
    for m, z in case.normalized(fg).items():
        healthy = z[fg & ~lesion].astype(np.float64)
        hist, edges = np.histogram(healthy, bins=200, range=tuple(np.percentile(healthy, [1, 99])))
        peak = int(ndimage.gaussian_filter1d(hist.astype(float), 3).argmax())
        q25, q50, q75 = np.percentile(healthy, [25, 50, 75])
        row = {"case": case_id, "modality": m, "shell_mean": float(z[shell].mean()),
               "mode": float(0.5 * (edges[peak] + edges[peak + 1])), "median": float(q50), "iqr": float(q75 - q25)}
        for label, name in SUBREGIONS.items():
            sel = case.seg == label
            if sel.sum() >= MIN_VOXELS:
                row[name] = float(z[sel].mean())
        rows.append(row)
    return rows


def leave_one_out_errors(rows: list[dict]) -> dict:
    """{(modality, sub-region): {normalisation: mean absolute error in z-units}}, plus ("all", ""): pooled."""
    out, pooled = {}, {name: [] for name in NORMALISATIONS}
    for m in MODALITIES:
        for name in SUBREGIONS.values():
            rs = [r for r in rows if r["modality"] == m and name in r]
            if len(rs) < 5:
                continue
            out[(m, name)] = {"cases": len(rs)}
            for norm, (offset, scale) in NORMALISATIONS.items():
                values = np.array([(r[name] - offset(r)) / scale(r) for r in rs])
                errors = [abs(offset(r) + scale(r) * np.delete(values, i).mean() - r[name]) for i, r in enumerate(rs)]
                out[(m, name)][norm] = float(np.mean(errors))
                pooled[norm] += errors
    out[("all", "")] = {"cases": len({r["case"] for r in rows}), **{n: float(np.mean(e)) for n, e in pooled.items()}}
    return out


def markdown(errors: dict) -> str:
    names = list(NORMALISATIONS)
    lines = ["| modality, sub-region | cases | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (m, name), row in errors.items():
        lines.append(f"| {m} {name} | {row['cases']} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    root = Path(args.data or default_data_root())
    folds = make_folds(str(root))
    rows = [r for case_id in (*folds.train, *folds.validation, *folds.test) for r in case_rows(case_id, root)]
    print(markdown(leave_one_out_errors(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
