"""Volume I/O keeps geometry exactly; labels map onto canonical sub-regions; preprocessing round-trips."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import make_ball_mask, make_head, noisy_head, write_dicom_seg, write_dicom_series

from scripted_models.errors import InputError
from scripted_models.labels import mapping_from_case_json, one_hot_subregions, to_canonical
from scripted_models.preprocess import (
    DistanceFromMask,
    IntensityNormalizer,
    RoiBox,
    blend_weight,
    cast_like,
    dilate_mm,
    roi_around,
)
from scripted_models.volume import Volume, read_volume, resample_to, write_volume

OBLIQUE = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, -1.0]]).ravel())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_roundtrip_keeps_geometry_and_dtype(tmp_path, suffix, dtype):
    vol = make_head(dtype=dtype, direction=OBLIQUE)
    path = write_volume(vol, tmp_path / f"img{suffix}")
    back = read_volume(path)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_a_dicom_series_folder_reads_as_its_volume(tmp_path):
    """A folder of DICOM slices reads with the volume's voxels and geometry (oblique, anisotropic); a folder with
    no series, two series, or a missing slice is a one-line InputError."""
    rotated = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]]).ravel())  # DICOM
    vol = make_head(dtype=np.int16, spacing=(0.9, 1.1, 2.5), direction=rotated)  # slices: right-handed
    got = read_volume(write_dicom_series(vol, tmp_path / "series"))
    assert np.array_equal(got.array, vol.array) and got.array.dtype == np.int16
    assert np.allclose(got.spacing, vol.spacing, atol=1e-4) and np.allclose(got.origin, vol.origin, atol=1e-4)
    assert np.allclose(got.direction, vol.direction, atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without a DICOM series"):
        read_volume(tmp_path / "empty")
    write_dicom_series(vol, tmp_path / "two", "1.2.3.4.1")
    write_dicom_series(vol, tmp_path / "two", "1.2.3.4.2")
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(tmp_path / "two")
    with pytest.raises(InputError, match="not evenly spaced"):
        read_volume(write_dicom_series(vol, tmp_path / "gap", skip=(7,)))
    echoes = write_dicom_series(vol, tmp_path / "4d", "1.2.3.5")
    for path in write_dicom_series(vol, tmp_path / "echo2", "1.2.3.5").glob("*.dcm"):  # a second echo, same series
        os.replace(path, echoes / f"echo2_{path.name}")
    with pytest.raises(InputError, match="2 images at every slice position: a 4D series"):
        read_volume(echoes)
    with pytest.raises(InputError, match="expected a 3D scalar image, got a single slice"):
        read_volume(write_dicom_series(vol, tmp_path / "one", skip=range(1, vol.shape[0])))


def test_a_dicom_seg_reads_as_canonical_labels_on_its_scan(tmp_path):
    """A DICOM SEG over an oblique, anisotropic series (frames only where a segment has voxels): its segments, named
    as BraTS tools name them, become canonical labels that fall on the scan's voxels exactly. A fractional SEG is
    thresholded at one half, a labelmap SEG read by segment number; one segment of any name is the whole lesion;
    names not understood, or a SEG given as a scan, are one line."""
    from scripted_models.labels import CORE, EDEMA, ENHANCING
    from scripted_models.volume import resample_to

    rotated = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]]).ravel())
    head = make_head(dtype=np.int16, spacing=(0.9, 1.1, 2.5), direction=rotated)
    series = write_dicom_series(head, tmp_path / "series")
    labels = make_ball_mask(head, radius_vox=7).array
    names = {"Necrotic tumor core (NCR)": CORE, "Peritumoral edema (ED)": EDEMA, "GD-enhancing tumor (ET)": ENHANCING}
    seg = write_dicom_seg(series, {name: labels == value for name, value in names.items()}, tmp_path / "seg.dcm")
    got = read_volume(seg)
    assert got.shape[0] < head.shape[0]  # only the lesion's slices
    assert np.array_equal(resample_to(got, head, nearest=True).array, labels)

    soft = {name: np.where(labels == value, 0.9, np.where(labels > 0, 0.2, 0.0)) for name, value in names.items()}
    fractional = read_volume(write_dicom_seg(series, soft, tmp_path / "fractional.dcm", fractional=True))
    assert np.array_equal(resample_to(fractional, head, nearest=True).array, labels)

    segments = {name: labels == value for name, value in names.items()}
    one_image = read_volume(write_dicom_seg(series, segments, tmp_path / "labelmap.dcm", labelmap=True))
    assert np.array_equal(resample_to(one_image, head, nearest=True).array, labels)

    whole = read_volume(write_dicom_seg(series, {"Tumor": labels > 0}, tmp_path / "whole.dcm"))
    assert np.array_equal(resample_to(whole, head, nearest=True).array, (labels > 0).astype(np.uint8))

    unknown = write_dicom_seg(series, {"Tumor": labels == 1, "Region 2": labels == 2}, tmp_path / "unknown.dcm")
    with pytest.raises(InputError, match="unknown.dcm: cannot map segment.*'Tumor', 'Region 2'") as info:
        read_volume(unknown)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="is a DICOM SEG .*not a scan"):
        read_volume(seg, segmentation=False)


def test_ijk_to_ras_roundtrip():
    vol = make_head(direction=OBLIQUE)
    m = vol.ijk_to_ras()
    again = Volume.from_ijk_to_ras(vol.array, m)
    np.testing.assert_allclose(again.ijk_to_ras(), m, atol=1e-9)
    # LPS -> RAS flips the first two axes
    np.testing.assert_allclose(m[:2, 3], -np.array(vol.origin[:2]))


def test_reading_4d_and_nan_fails(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputError, match="3D"):
        read_volume(tmp_path / "4d.nii.gz")
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 1, 1] = np.nan
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="NaN"):
        read_volume(tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")


def test_resample_mask_to_image_grid_nearest():
    image = make_head(spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0))
    fine = Volume(np.zeros((80, 96, 88), np.uint8), (0.5, 0.5, 0.5), (-0.25, -0.25, -0.25))
    fine.array[30:50, 40:56, 30:50] = 2
    on_grid = resample_to(fine, image, nearest=True)
    assert on_grid.shape == image.shape
    assert set(np.unique(on_grid.array)) <= {0, 2}  # nearest neighbour: no new label values
    expected = 20 * 16 * 20 * 0.125
    assert abs(int((on_grid.array == 2).sum()) - expected) / expected < 0.2


def test_canonical_mapping_from_case_json(data_root):
    mapping = mapping_from_case_json(data_root / "cases/brats2013_pat0003/case.json")
    assert mapping == {1: 1, 2: 2, 3: 1, 4: 3}
    raw = np.array([0, 1, 2, 3, 4])
    np.testing.assert_array_equal(to_canonical(raw, mapping), [0, 1, 2, 1, 3])
    assert mapping_from_case_json(data_root / "cases/pyradiomics_brain1/case.json") is None
    np.testing.assert_array_equal(to_canonical(np.array([0, 4, 2])), [0, 3, 2])  # BraTS legacy guessed
    with pytest.raises(InputError, match="no canonical mapping"):
        to_canonical(np.array([0, 7]))


def test_every_shared_case_json_maps(data_root):
    for case_json in sorted((data_root / "cases").glob("*/case.json")):
        info = json.loads(case_json.read_text())
        mapping = mapping_from_case_json(case_json)
        if mapping:
            assert set(mapping.values()) <= {1, 2, 3}, info


def test_one_hot_whole_lesion_ablation():
    lab = np.array([[[0, 1, 2, 3]]], np.uint8)
    full = one_hot_subregions(lab, whole_lesion_only=False)
    whole = one_hot_subregions(lab, whole_lesion_only=True)
    assert full[:3].sum() == 3 and whole[:3].sum() == 0
    np.testing.assert_array_equal(full[3], whole[3])


def test_normalizer_inverse_and_cast():
    arr = np.random.default_rng(0).integers(0, 1000, (10, 10, 10)).astype(np.int16)
    norm = IntensityNormalizer.fit(arr, foreground=np.ones(arr.shape, bool))
    back = cast_like(norm.inverse(norm.forward(arr)), arr.dtype)
    np.testing.assert_array_equal(back, arr)
    assert cast_like(np.array([70000.0]), np.int16)[0] == 32767


def test_roi_box_crop_paste_and_blend():
    mask = np.zeros((30, 30, 30), bool)
    mask[2:8, 10:20, 25:29] = True  # near the border: the box sticks out and pads
    box = roi_around(mask, multiple=8, min_size=16)
    assert all(s % 8 == 0 and s >= 16 for s in box.size)
    crop = box.crop(mask.astype(np.uint8), mode="constant")
    assert crop.shape == box.size and crop.sum() == mask.sum()
    vol_sl, roi_sl = box.paste_slices(mask.shape)
    np.testing.assert_array_equal(crop[roi_sl], mask[vol_sl])
    region = dilate_mm(mask, 3.0, (1, 1, 1))
    w = blend_weight(mask, region, (1, 1, 1))
    assert w[mask].min() == 1.0 and w[~region].max() == 0.0
    assert 0 < w[region & ~mask].mean() < 1


def test_blend_weight_in_the_region_box_equals_the_whole_array_formula():
    """blend_weight computes its distances in the region's box only; the weights must equal those computed over
    the whole array, bit for bit, also for regions touching the array's edge and anisotropic voxels."""
    from scipy import ndimage

    def whole_array(lesion, region, spacing):
        outside = ndimage.distance_transform_edt(~lesion, sampling=spacing)
        to_border = ndimage.distance_transform_edt(region, sampling=spacing)
        t = np.clip(to_border / np.maximum(to_border + outside, 1e-6), 0.0, 1.0)
        w = t * t * (3.0 - 2.0 * t)
        w[lesion] = 1.0
        w[~region] = 0.0
        return w.astype(np.float32)

    rng = np.random.default_rng(3)
    for corner in ((2, 5, 5), (20, 0, 11), (14, 14, 14)):
        lesion = np.zeros((24, 26, 28), bool)
        z, y, x = corner
        lesion[z:z + 7, y:y + 5, x:x + 9] = rng.random((7, 5, 9))[: 24 - z, : 26 - y, : 28 - x] > 0.3
        spacing = (2.0, 0.8, 1.1)
        region = dilate_mm(lesion, 4.0, spacing)
        np.testing.assert_array_equal(blend_weight(lesion, region, spacing), whole_array(lesion, region, spacing))
    empty = np.zeros((8, 8, 8), bool)
    assert not blend_weight(empty, empty, (1, 1, 1)).any()


def test_one_distance_transform_gives_every_dilation_and_the_blend_weights_bit_for_bit():
    """The pipeline computes the lesion's distances once (reach 12 mm) and thresholds them for every margin:
    each dilation must equal its own transform, and the blend weights of an ROI that sticks out of the volume
    must equal those blend_weight computes itself."""
    rng = np.random.default_rng(5)
    spacing = (2.0, 0.8, 1.1)
    lesion = np.zeros((24, 40, 36), bool)
    lesion[1:7, 6:20, 24:34] = rng.random((6, 14, 10)) > 0.4  # near the edges
    distance = DistanceFromMask(lesion, spacing, reach_mm=12.0)
    for radius in (0.0, 2.0, 4.0, 6.0, 12.0):
        np.testing.assert_array_equal(distance.dilate(radius), dilate_mm(lesion, radius, spacing))
    with pytest.raises(ValueError, match="exceeds"):
        distance.dilate(12.5)
    region = distance.dilate(6.0)
    box = roi_around(region, multiple=8, min_size=16)
    assert min(box.start) < 0 or any(s + n > m for s, n, m in zip(box.start, box.size, lesion.shape))
    lesion_roi, region_roi = box.crop(lesion, mode="constant"), box.crop(region, mode="constant")
    np.testing.assert_array_equal(blend_weight(lesion_roi, region_roi, spacing, distance.crop(box)),
                                  blend_weight(lesion_roi, region_roi, spacing))
    empty = DistanceFromMask(np.zeros((8, 8, 8), bool), spacing, 6.0)
    assert not empty.dilate(6.0).any() and np.isinf(empty.crop(RoiBox((0, 0, 0), (4, 4, 4)))).all()


def test_dilate_mm_respects_anisotropic_spacing():
    mask = np.zeros((21, 21, 21), bool)
    mask[10, 10, 10] = True
    grown = dilate_mm(mask, 4.0, (2.0, 1.0, 1.0))
    assert grown[10, 10, 14] and not grown[10, 10, 15]
    assert grown[12, 10, 10] and not grown[13, 10, 10]


def test_roibox_explicit():
    box = RoiBox((-2, 0, 0), (4, 2, 2))
    arr = np.arange(3 * 2 * 2).reshape(3, 2, 2)
    out = box.crop(arr)
    assert out.shape == (4, 2, 2)
    np.testing.assert_array_equal(out[2:], arr[:2])


def test_fill_holes_and_bounding_box_match_scipy_and_argwhere():
    from scipy import ndimage

    from scripted_models.labels import is_whole_lesion_only
    from scripted_models.preprocess import bounding_box, fill_holes

    rng = np.random.default_rng(3)
    for threshold in (0.80, 0.90, 0.97):
        mask = ndimage.binary_dilation(rng.random((24, 27, 25)) > threshold)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
        idx = np.argwhere(mask)
        box = bounding_box(mask)
        assert [(b.start, b.stop) for b in box] == list(zip(idx.min(0).tolist(), (idx.max(0) + 1).tolist()))
    shell = np.zeros((9, 9, 9), bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False  # an enclosed hole is filled; a hole open to the border is not
    assert fill_holes(shell)[4, 4, 4]
    shell[4, 4, 0:4] = False
    assert not fill_holes(shell)[4, 4, 4]
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    assert is_whole_lesion_only(labels) and is_whole_lesion_only(np.zeros_like(labels))
    labels[2, 2, 2] = 3
    assert not is_whole_lesion_only(labels)


def test_foreground_of_a_scan_whose_air_is_noise_is_the_head():
    """Where the background is noise (raw clinical scans), the foreground is the head (scalp, skull, brain), not
    every voxel that differs from the border's most frequent value; constant backgrounds keep the old mask."""
    from scipy import ndimage

    from scripted_models.preprocess import fill_holes, fill_holes_in_slices, foreground_mask, has_constant_background

    array, brain, head = noisy_head()
    assert not has_constant_background(array)
    fg = foreground_mask(array)
    assert fg[head].mean() > 0.98 and fg[~head].mean() < 0.01  # the dark skull is inside, the air outside
    stripped = np.where(brain, array, 0.0)  # skull-stripped: a constant background, the old definition
    assert has_constant_background(stripped)
    old = fill_holes(ndimage.binary_opening(stripped != 0, iterations=1))
    np.testing.assert_array_equal(foreground_mask(stripped), old)
    # a hole open to the volume's edge in 3-D but closed in its slices is filled slice by slice
    ring = np.zeros((4, 9, 9), bool)
    ring[:, 2:7, 2:7] = True
    ring[:, 4, 4] = False
    assert not fill_holes(ring)[1, 4, 4] and fill_holes_in_slices(ring, 0)[1, 4, 4]
    assert not fill_holes_in_slices(ring, 1)[1, 4, 4]  # across the other axes the hole is open
