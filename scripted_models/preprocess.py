"""Intensity normalisation (and its inverse), lesion ROI crop/paste, blending weights."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def _border_values(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0].ravel(), array[-1].ravel(), array[:, 0].ravel(), array[:, -1].ravel(),
                           array[:, :, 0].ravel(), array[:, :, -1].ravel()])


def _border_mode(array: np.ndarray) -> tuple[float, float]:
    """The most frequent value on the volume's border faces and the share of the border it covers."""
    values, counts = np.unique(_border_values(array), return_counts=True)
    i = int(np.argmax(counts))
    return float(values[i]), float(counts[i] / counts.sum())


def background_value(array: np.ndarray) -> float:
    """Most frequent value on the volume's border faces (0 for most scans, a constant for z-scored ones)."""
    return _border_mode(array)[0]


CONSTANT_BACKGROUND_SHARE = 0.5  # skull-stripped and z-scored scans: >= 0.97 of the border is one value; raw: < 0.2


def has_constant_background(array: np.ndarray) -> bool:
    """Whether most of the border is one value (skull-stripped or masked scans) rather than noise (raw scans,
    whose air is noise)."""
    return _border_mode(array)[1] >= CONSTANT_BACKGROUND_SHARE


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Head/brain voxels: those that differ from a constant background value, small holes filled; on a scan whose
    background is noise, the head above the air's noise (head_above_noise)."""
    bg, share = _border_mode(array)
    if share < CONSTANT_BACKGROUND_SHARE:
        return head_above_noise(array)
    fg = np.abs(array.astype(np.float64) - bg) > 1e-6 * max(1.0, float(np.abs(array).max()))
    return fill_holes(ndimage.binary_opening(fg, iterations=1)) if fg.any() else fg


def head_above_noise(array: np.ndarray) -> np.ndarray:
    """The head of a raw scan with air around it: voxels above the Otsu threshold between air and tissue (the
    brightest 0.5% clipped), opened, the largest component, with enclosed holes (skull, sinuses, ventricles)
    filled in 3-D and slice by slice (the volume's edge may cut a hole open in 3-D)."""
    import SimpleITK as sitk

    values = array.astype(np.float32)
    values = np.minimum(values, np.percentile(values, 99.5))
    otsu = sitk.OtsuThresholdImageFilter()  # the threshold with the largest between-class variance
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(values))
    head = largest_component(ndimage.binary_opening(values > otsu.GetThreshold(), iterations=1))
    head = fill_holes(head)
    for axis in range(head.ndim):
        head = fill_holes_in_slices(head, axis)
    return head


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Same result as ndimage.binary_fill_holes (6-connected background), by labelling instead of iterating."""
    background, _ = ndimage.label(~mask)
    border = _border_values(background)
    outside = np.isin(background, np.unique(border[border > 0]))
    return ~outside


def fill_holes_in_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Holes filled in every 2-D slice across `axis` (one labelling with in-plane connectivity)."""
    plane = np.zeros((3,) * mask.ndim, bool)
    plane[(slice(None),) * axis + (1,)] = ndimage.generate_binary_structure(mask.ndim - 1, 1)
    background, _ = ndimage.label(~mask, plane)
    edges = [np.take(background, i, axis=a).ravel() for a in range(mask.ndim) if a != axis for i in (0, -1)]
    border = np.concatenate(edges)
    return ~np.isin(background, np.unique(border[border > 0]))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a binary mask (the mask itself when it is empty)."""
    labelled, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labelled == np.bincount(labelled.ravel())[1:].argmax() + 1


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel (None for an empty mask)."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


@dataclass(frozen=True)
class IntensityNormalizer:
    """z-score over healthy foreground: x_n = (x - mean) / std, and back."""

    mean: float
    std: float

    @classmethod
    def fit(cls, array: np.ndarray, exclude: np.ndarray | None = None, foreground: np.ndarray | None = None):
        fg = foreground_mask(array) if foreground is None else foreground
        if exclude is not None:
            fg = fg & ~exclude.astype(bool)
        values = array[fg].astype(np.float64) if fg.any() else array.astype(np.float64).ravel()
        std = float(values.std())
        return cls(float(values.mean()), std if std > 1e-8 else 1.0)

    def forward(self, array: np.ndarray) -> np.ndarray:
        return ((array.astype(np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float64) * self.std + self.mean


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Back to the input's dtype family: integers are rounded and clipped to the type's range."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return values > 0.5
    return values.astype(dtype)


# Millimetre margins are compared with this slack: a spacing of 1.2 mm reaches 6 mm at 5 voxels whether it arrives as
# the header's float32 (1.2000000477) or an affine's float64 (1.1999999958): the same voxels either way.
DISTANCE_TOLERANCE_MM = 1e-3


class DistanceFromMask:
    """Euclidean distance (mm) from a mask's voxels, one transform in the mask's bounding box grown by
    `reach_mm`: `dilate(r)` for every r <= reach_mm is exactly `dilate_mm(mask, r)`."""

    def __init__(self, mask: np.ndarray, spacing_zyx, reach_mm: float):
        mask = mask.astype(bool)
        self.shape, self.reach_mm = mask.shape, float(reach_mm)
        tight = bounding_box(mask)
        self.start = self.distance_mm = None
        if tight is None:
            return
        pad = [int(np.ceil(self.reach_mm / s)) + 1 for s in spacing_zyx]
        lo = np.maximum(np.array([b.start for b in tight]) - pad, 0)
        hi = np.minimum(np.array([b.stop for b in tight]) + pad, mask.shape)
        self.start = tuple(int(a) for a in lo)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.distance_mm = ndimage.distance_transform_edt(~mask[box], sampling=spacing_zyx)

    def dilate(self, radius_mm: float) -> np.ndarray:
        if radius_mm > self.reach_mm:
            raise ValueError(f"radius {radius_mm} mm exceeds the {self.reach_mm} mm the distances were computed for")
        out = np.zeros(self.shape, bool)
        if self.distance_mm is not None:
            out[self._box()] = self.distance_mm <= radius_mm + DISTANCE_TOLERANCE_MM
        return out

    def crop(self, roi: RoiBox) -> np.ndarray:
        """The distances over `roi` (its own frame); inf wherever farther than reach_mm or outside the volume."""
        out = np.full(roi.size, np.inf)
        if self.distance_mm is None:
            return out
        lo = [max(a, b) for a, b in zip(roi.start, self.start)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(roi.start, roi.size, self.start, self.distance_mm.shape)]
        if all(a < b for a, b in zip(lo, hi)):
            out[tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, roi.start))] = \
                self.distance_mm[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.start))]
        return out

    def _box(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.distance_mm.shape))


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing_zyx) -> np.ndarray:
    """Binary dilation by a physical radius (Euclidean distance, computed in the mask's bounding box)."""
    mask = mask.astype(bool)
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    return DistanceFromMask(mask, spacing_zyx, radius_mm).dilate(radius_mm)


def erode_mm(mask: np.ndarray, radius_mm: float, spacing_zyx) -> np.ndarray:
    return ndimage.distance_transform_edt(mask.astype(bool), sampling=spacing_zyx) > radius_mm + DISTANCE_TOLERANCE_MM


def blend_weight(lesion: np.ndarray, region: np.ndarray, spacing_zyx,
                 lesion_distance_mm: np.ndarray | None = None) -> np.ndarray:
    """Seam-aware soft mask: 1 inside the lesion, smooth decay to exactly 0 at the region border.
    The distances are computed in the region's box grown by one voxel (clipped to the array): the same values
    inside the region as over the whole array (the lesion lies in it, and the rim is outside it), for less.
    `lesion_distance_mm` (same frame, exact over the region, e.g. `DistanceFromMask.crop`) saves a transform."""
    lesion, region = lesion.astype(bool), region.astype(bool)
    out = np.zeros(region.shape, np.float32)
    tight = bounding_box(region | lesion)
    if tight is None:
        return out
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in tight)
    lesion_box, region_box = lesion[box], region[box]
    outside = (ndimage.distance_transform_edt(~lesion_box, sampling=spacing_zyx) if lesion_distance_mm is None
               else lesion_distance_mm[box])
    to_border = ndimage.distance_transform_edt(region_box, sampling=spacing_zyx)
    t = np.clip(to_border / np.maximum(to_border + outside, 1e-6), 0.0, 1.0)
    w = t * t * (3.0 - 2.0 * t)  # smoothstep
    w[lesion_box] = 1.0
    w[~region_box] = 0.0
    out[box] = w
    return out


@dataclass(frozen=True)
class RoiBox:
    """A box in voxel coordinates (z, y, x) that may extend past the volume; crops pad with edge values."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))

    def crop(self, array: np.ndarray, mode: str = "edge") -> np.ndarray:
        lead = array.shape[:-3]
        spatial = array.shape[-3:]
        lo = [max(0, s) for s in self.start]
        hi = [min(n, s + z) for n, s, z in zip(spatial, self.start, self.size)]
        inner = array[(...,) + tuple(slice(a, b) for a, b in zip(lo, hi))]
        pads = [(a - s, s + z - b) for a, b, s, z in zip(lo, hi, self.start, self.size)]
        if any(p != (0, 0) for p in pads):
            inner = np.pad(inner, [(0, 0)] * len(lead) + pads, mode=mode)
        return inner

    def paste_slices(self, spatial_shape):
        """(volume slices, roi slices) for the part of the box inside the volume."""
        lo = [max(0, s) for s in self.start]
        hi = [min(n, s + z) for n, s, z in zip(spatial_shape, self.start, self.size)]
        vol = tuple(slice(a, b) for a, b in zip(lo, hi))
        roi = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, self.start))
        return vol, roi


def roi_around(region: np.ndarray, multiple: int = 8, min_size: int = 32) -> RoiBox:
    """Smallest box around `region` with each side a multiple of `multiple` (>= min_size), centred."""
    return roi_around_box(bounding_box(region), multiple, min_size)


def roi_around_box(tight: tuple[slice, ...], multiple: int = 8, min_size: int = 32) -> RoiBox:
    """roi_around for a region's bounding box (slices)."""
    lo, hi = [b.start for b in tight], [b.stop for b in tight]
    start, size = [], []
    for a, b in zip(lo, hi):
        extent = int(b - a)
        side = max(min_size, int(np.ceil(extent / multiple) * multiple))
        s = int(a) - (side - extent) // 2
        start.append(s)
        size.append(side)
    return RoiBox(tuple(start), tuple(size))


def separate_rois(region: np.ndarray, multiple: int = 8, min_size: int = 32) -> tuple[list, np.ndarray | None, tuple]:
    """Parts of `region` that can be processed in boxes of their own: its connected components, merged while their
    roi_around boxes overlap. Returns ([(RoiBox, component ids)], component labels over the region's bounding box
    or None for a single part, that bounding box)."""
    tight = bounding_box(region)
    labels, count = ndimage.label(region[tight], structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return [(roi_around_box(tight, multiple, min_size), [1])], None, tight
    offset = [b.start for b in tight]
    parts = [([i + 1], [slice(s.start + o, s.stop + o) for s, o in zip(found, offset)])
             for i, found in enumerate(ndimage.find_objects(labels))]

    def overlap(a: RoiBox, b: RoiBox) -> bool:
        return all(sa < sb + nb and sb < sa + na for sa, na, sb, nb in zip(a.start, a.size, b.start, b.size))

    merged = True
    while merged:
        merged = False
        boxes = [roi_around_box(tuple(box), multiple, min_size) for _, box in parts]
        for i in range(len(parts)):
            j = next((j for j in range(i + 1, len(parts)) if overlap(boxes[i], boxes[j])), None)
            if j is not None:
                (ids_i, box_i), (ids_j, box_j) = parts[i], parts.pop(j)
                parts[i] = (ids_i + ids_j, [slice(min(a.start, b.start), max(a.stop, b.stop))
                                            for a, b in zip(box_i, box_j)])
                merged = True
                break
    return [(roi_around_box(tuple(box), multiple, min_size), ids) for ids, box in parts], labels, tight


def resize(array: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Resize the last three axes to `shape` (linear for images, nearest for labels)."""
    lead = array.shape[:-3]
    factors = [t / s for t, s in zip(shape, array.shape[-3:])]
    if lead:
        return np.stack([resize(a, shape, order) for a in array.reshape((-1,) + array.shape[-3:])]).reshape(
            lead + tuple(shape))
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
