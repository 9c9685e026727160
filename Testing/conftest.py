"""Shared fixtures. Engine tests use the committed weights in scripted_models/weights."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for module_dir in ("PathoSynSlicer", "PathARModule"):
    sys.path.insert(0, str(ROOT / module_dir))

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_root() -> Path:
    from scripted_models.cases import default_data_root

    root = default_data_root()
    if not (root / "cases").is_dir():
        pytest.fail(f"shared data not found at {root}; set PATHOSYN_DATA")
    return root


def make_head(shape=(40, 48, 44), spacing=(1.2, 1.0, 1.5), dtype=np.int16, seed=0, direction=None,
              origin=(10.0, -20.0, 5.0)):
    """A synthetic 'head': an ellipsoid of tissue with texture in a zero background."""
    from scripted_models.volume import Volume

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = zz ** 2 + yy ** 2 + xx ** 2 < 0.85
    arr = np.where(inside, 400 + 60 * np.sin(6 * xx) + rng.normal(0, 15, shape), 0)
    direction = direction or (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return Volume(arr.astype(dtype), spacing, origin, direction)


def noisy_head(seed=0, shape=(48, 64, 64)):
    """A raw scan: brain (400) in a dark skull (30) in a bright scalp (800), joined below through the skull (the
    brain stem), with noise in the air around it (no value is shared by most of the border)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    stem = (zz < 0) & (np.sqrt(yy ** 2 + xx ** 2) < 0.15)
    brain, skull, head = r < 0.6, (r < 0.7) & ~stem, r < 0.8
    array = np.where(brain, 400.0, np.where(skull, 30.0, np.where(head, 800.0, 0.0)))
    array = np.abs(array + rng.normal(0, 12, shape))  # magnitude images: Rician-like air
    return array.astype(np.float32), brain, head


def make_ball_mask(head, centre_frac=(0.5, 0.5, 0.5), radius_vox=6, labels=True):
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in head.shape], indexing="ij")
    c = [f * (n - 1) for f, n in zip(centre_frac, head.shape)]
    d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    m = np.zeros(head.shape, np.uint8)
    if labels:
        m[d < radius_vox] = 2
        m[d < 0.66 * radius_vox] = 3
        m[d < 0.33 * radius_vox] = 1
    else:
        m[d < radius_vox] = 1
    return head.with_array(m)


def write_dicom_series(vol, folder, series_uid="1.2.826.0.1.3680043.2.1125.1", skip=(), description=""):
    """vol as one MR slice file per z index (the tags a scanner writes for geometry), slices in `skip` left out.
    GDCM's writer sets the process locale to "C" (ASCII file encoding for every later test): it is put back."""
    import locale

    kept = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_dicom_series(vol, folder, series_uid, skip, description)
    finally:
        locale.setlocale(locale.LC_ALL, kept)


def _write_dicom_series(vol, folder, series_uid, skip, description):
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = vol.to_sitk()
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        piece = image[:, :, k]
        for tag, value in {"0008|0060": "MR", "0020|000d": series_uid + ".0", "0020|000e": series_uid,
                           "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0037": "\\".join(f"{v:.9f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                           "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0008|103e": description,
                           "0020|0052": series_uid + ".9"}.items():  # frame of reference (a SEG needs it)
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-1]}_slice{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def write_dicom_seg(series_folder, segments: dict, path, fractional: bool = False, labelmap: bool = False):
    """A DICOM SEG (highdicom) over the DICOM series in `series_folder`: {segment label: mask (k, j, i)}. Frames
    where a segment is empty are left out, as most writers do."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(f) for f in sorted(series_folder.glob("*.dcm"))),
                     key=lambda d: int(d.InstanceNumber))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n + 1, segment_label=label, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, label in enumerate(segments)]
    pixels = np.stack([np.asarray(m) for m in segments.values()], axis=-1)
    pixels = pixels.astype(np.float32 if fractional else np.uint8)
    if labelmap:  # one label image: the segment number at each voxel
        pixels = (pixels * np.arange(1, pixels.shape[-1] + 1, dtype=np.uint8)).max(axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segment_descriptions=descriptions,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else
        hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY,
        series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(path)
    return path
