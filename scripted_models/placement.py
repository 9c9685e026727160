"""Place a lesion mask (e.g. a PathAR sample patch) at a physical point inside another scan.

The mask is translated (no rotation or scaling) so that its centroid lands on the target point, then resampled
onto the target grid with nearest-neighbour interpolation. Voxels that fall outside the target's field of view
are clipped; the returned info says how much was lost.

    from scripted_models.placement import place_lesion
    mask, info = place_lesion(sample.mask, t1, target_lps=(10.0, -20.0, 35.0))
    info["lost_fraction"]   # 0.0 when the whole lesion fits
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .volume import Volume, resample_to


def ras_to_lps(point) -> np.ndarray:
    x, y, z = (float(v) for v in point)
    return np.array([-x, -y, z])


def lesion_points_lps(lesion: Volume, subdivide: int = 1) -> np.ndarray:
    """(3, N) physical (LPS) centres of the lesion's voxels; with subdivide s, the centres of the s^3 sub-voxels
    of each voxel (N x s^3 points), so that a voxel cut by a boundary counts by the share on each side."""
    points = np.argwhere(np.asarray(lesion.array) > 0)  # (N, 3) z, y, x
    if not len(points):
        raise InputError("the lesion mask to place is empty")
    ijk = points[:, ::-1].astype(float)  # i, j, k
    if subdivide > 1:
        steps = (np.arange(subdivide) + 0.5) / subdivide - 0.5
        offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        ijk = (ijk[:, None, :] + offsets[None]).reshape(-1, 3)
    return (lesion.ijk_to_lps() @ np.c_[ijk, np.ones(len(ijk))].T)[:3]


def point_in_volume(reference: Volume, point_lps) -> bool:
    """True when the physical point lies inside the reference's voxel grid (within half a voxel of its edge)."""
    ijk = np.linalg.inv(reference.ijk_to_lps()) @ np.r_[np.asarray(point_lps, float), 1.0]
    size = np.array(reference.shape)[::-1]
    return bool(np.all(ijk[:3] >= -0.5) and np.all(ijk[:3] <= size - 0.5))


def fraction_in_fov(points_lps: np.ndarray, reference: Volume) -> float:
    """Fraction of physical points whose nearest reference voxel exists."""
    ijk = np.rint((np.linalg.inv(reference.ijk_to_lps()) @ np.r_[points_lps, np.ones((1, points_lps.shape[1]))])[:3])
    size = np.array(reference.shape)[::-1, None]
    return float(np.all((ijk >= 0) & (ijk < size), axis=0).mean())


def place_lesion(lesion: Volume, reference: Volume, target_lps) -> tuple[Volume, dict]:
    """Translate `lesion` so its centroid is at `target_lps` and resample it onto `reference`'s grid.

    Returns (uint8 labels on the reference grid, info). info: centroid shift (mm), lost_fraction (share of the
    lesion outside the reference's field of view, clipped), volume_ml before and after."""
    target = np.asarray(target_lps, float).reshape(3)
    if not point_in_volume(reference, target):
        raise InputError(f"the target point (LPS {', '.join(f'{v:.1f}' for v in target)}) is outside the target "
                         "volume")
    points = lesion_points_lps(lesion)
    shift = target - points.mean(axis=1)
    lost = 1.0 - fraction_in_fov(lesion_points_lps(lesion, subdivide=4) + shift[:, None], reference)
    if lost >= 1.0:
        raise InputError("the placed lesion lies entirely outside the target volume")
    moved = Volume(np.asarray(lesion.array, np.uint8), lesion.spacing, tuple(np.add(lesion.origin, shift)),
                   lesion.direction)
    placed = reference.with_array(np.asarray(resample_to(moved, reference, nearest=True).array, np.uint8))
    if not placed.array.any():
        raise InputError("the placed lesion is smaller than one voxel of the target volume")
    voxel_ml = float(np.prod(lesion.spacing)) / 1000.0
    info = {"shift_mm": [round(float(v), 3) for v in shift], "lost_fraction": round(float(lost), 4),
            "volume_ml": round(points.shape[1] * voxel_ml, 3),
            "placed_volume_ml": round(float((placed.array > 0).sum()) * float(np.prod(reference.spacing)) / 1000, 3)}
    return placed, info
