"""Volume = voxel array + geometry. Read NIfTI, NRRD or a DICOM series folder, write NIfTI/NRRD, through SimpleITK.

Arrays are in SimpleITK/Slicer order (k, j, i) = (z, y, x). Geometry follows ITK (LPS):
spacing and origin are (x, y, z); direction is a row-major 3x3 matrix.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in np.asarray(self.direction).ravel())

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, new voxels."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} != {self.array.shape}")
        return replace(self, array=array)

    def crop(self, box: tuple[slice, ...]) -> Volume:
        """The voxels inside `box` (slices in z, y, x, step 1) as a volume of their own, at the same physical place."""
        start = np.array([b.start or 0 for b in box][::-1], float)  # i, j, k
        origin = self.ijk_to_lps()[:3, :] @ np.array([*start, 1.0])
        return replace(self, array=self.array[box].copy(), origin=tuple(origin))

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    # --- geometry as 4x4 matrices (column index order i, j, k) ---
    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        m = self.ijk_to_lps()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        return m

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """Build from a Slicer-style IJK-to-RAS matrix (what vtkMRMLVolumeNode gives)."""
        m = np.asarray(ijk_to_ras, float).copy()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        linear = m[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        return cls(array, tuple(spacing), tuple(m[:3, 3]), tuple((linear / spacing).ravel()))

    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image) -> Volume:
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_series(folder: Path) -> list[str]:
    """The files of the one DICOM series in `folder`, in GDCM's slice order (a DICOM SEG beside it, e.g. the
    lesion mask of the same export, does not count); InputError for none or several."""
    import SimpleITK as sitk

    series = [list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))]
    series = [files for files in series if not (len(files) == 1 and is_dicom_seg(Path(files[0])))]
    if not series:
        raise InputError(f"{folder} is a folder without a DICOM series (give a NIfTI/NRRD file or a folder holding "
                         "one DICOM series)")
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series: give a folder holding one")
    return series[0]


def dicom_series_files(folder: Path) -> list[str]:
    """The slice files of the one DICOM series in `folder`, in slice order. InputError when the folder holds no
    series or several, or when its slices are not evenly spaced (a missing slice would shift the anatomy)."""
    import SimpleITK as sitk

    files = _one_series(folder)
    if len(files) < 2:  # one file: a multi-frame volume, or one slice (read_volume then says it is not 3D)
        return files
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            if normal is None:
                row_col = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(row_col[:3], row_col[3:])
            positions.append(float(np.dot([float(v) for v in reader.GetMetaData("0020|0032").split("\\")], normal)))
        except (RuntimeError, ValueError, IndexError):
            raise InputError(f"{Path(name).name} in {folder}: a DICOM slice without a readable position and "
                             "orientation") from None
    _, repeats = np.unique(np.round(positions, 3), return_counts=True)
    if len(repeats) > 1 and repeats.min() == repeats.max() > 1:
        raise InputError(f"{folder}: {repeats[0]} images at every slice position: a 4D series (echoes, diffusion "
                         "directions or time points), not one scan: give one volume of it")
    gaps = np.abs(np.diff(positions))
    if gaps.min() <= 1e-3 or gaps.max() - gaps.min() > 0.01 * max(float(np.median(gaps)), 1e-3):
        raise InputError(f"{folder}: the DICOM slices are not evenly spaced (gaps {gaps.min():.2f}-{gaps.max():.2f} "
                         "mm: a missing or repeated slice?)")
    return files


def dicom_series_description(folder: Path) -> str:
    """The series description (0008|103e) of the DICOM series in `folder`, e.g. "AX T2 FLAIR"; "" if absent."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(_one_series(Path(folder))[0])
    reader.ReadImageInformation()
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def read_volume(path: str | os.PathLike, check_finite: bool = True, segmentation: bool = True) -> Volume:
    """Read a 3D scalar NIfTI/NRRD image, or the DICOM series in a folder, or a DICOM SEG file (as canonical lesion
    labels; segmentation=False refuses it, for scans). Raises InputError for anything else."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        files = dicom_series_files(path)
    elif not path.is_file():
        raise InputError(f"file not found: {path}")
    elif path.name.endswith(".gz"):
        _check_gzip_complete(path)
    elif is_dicom_seg(path):
        if not segmentation:
            raise InputError(f"{path.name} is a DICOM SEG (a segmentation), not a scan: give it as the lesion mask")
        return read_dicom_seg(path)
    try:
        image = sitk.ReadImage((files if len(files) > 1 else files[0]) if path.is_dir() else str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"cannot read image {path}: {first}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path.name}: expected a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    if min(image.GetSize()) < 2:
        raise InputError(f"{path.name}: expected a 3D scalar image, got a single slice (size {image.GetSize()})")
    volume = Volume.from_sitk(image)
    if check_finite and not _all_finite(volume, path):
        raise InputError(f"{path.name}: contains NaN or Inf voxels")
    return volume


def is_dicom_seg(path: Path) -> bool:
    """A DICOM file (preamble + "DICM") whose Modality is SEG."""
    with open(path, "rb") as fh:
        if fh.read(132)[128:] != b"DICM":
            return False
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "SEG"
    except Exception:  # noqa: BLE001 - not readable by pydicom: SimpleITK reports it
        return False


def read_dicom_seg(path: str | os.PathLike) -> Volume:
    """A DICOM SEG (binary, fractional or labelmap; frames may be left out where empty) as canonical lesion
    labels on the grid its frames span: segments mapped by their labels (core / edema / enhancing), one segment =
    the whole lesion (labels.labels_from_segments)."""
    import pydicom

    from .labels import labels_from_segments

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for unreadable or compressed pixel data
        raise InputError(f"cannot read DICOM SEG {path.name}: {str(exc).strip().splitlines()[0]}") from None

    def item(name, frame=0):
        """The first item of a functional group: the frame's own, else the shared one; None if neither."""
        for groups in (ds.PerFrameFunctionalGroupsSequence[frame], *ds.get("SharedFunctionalGroupsSequence", [])):
            if name in groups:
                return groups[name][0]
        return None

    try:
        orientation = np.array(item("PlaneOrientationSequence").ImageOrientationPatient, float)
        measures = item("PixelMeasuresSequence")
        row_gap, column_gap = (float(v) for v in measures.PixelSpacing)
        positions = np.array([item("PlanePositionSequence", f).ImagePositionPatient for f in range(len(frames))],
                             float)
        labelmap = ds.get("SegmentationType") == "LABELMAP"  # each frame holds segment numbers
        numbers = None if labelmap else [int(item("SegmentIdentificationSequence", f).ReferencedSegmentNumber)
                                         for f in range(len(frames))]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise InputError(f"{path.name}: a DICOM SEG without plane positions, orientation or pixel spacing per frame"
                         ) from None
    across, down = orientation[:3], orientation[3:]  # directions of increasing column (i) and row (j)
    normal = np.cross(across, down)
    offsets = positions @ normal
    levels = np.unique(np.round(offsets, 4))
    if len(levels) > 1:  # from the positions: SpacingBetweenSlices is often missing or wrong
        slice_gap = float(np.diff(levels).min())
    else:
        slice_gap = float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
    k = (offsets - levels[0]) / slice_gap
    in_plane = positions - np.outer(offsets - levels[0], normal)
    if np.abs(k - np.rint(k)).max() > 0.01 or np.abs(in_plane - in_plane[0]).max() > 0.01 * slice_gap:
        raise InputError(f"{path.name}: the DICOM SEG's frames do not lie on one grid of evenly spaced slices")
    k = np.rint(k).astype(int)
    shape = (int(k.max()) + 1, frames.shape[1], frames.shape[2])
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 1)) if ds.get("SegmentationType") == "FRACTIONAL" else 0
    segments = []
    for segment in ds.SegmentSequence:
        mask = np.zeros(shape, bool)
        number = int(segment.SegmentNumber)
        if labelmap and number == 0:  # a labelmap's background
            continue
        for f in range(len(frames)) if labelmap else np.flatnonzero(np.array(numbers) == number):
            mask[k[f]] |= (frames[f] == number) if labelmap else (frames[f] > threshold)
        names = [str(segment.get("SegmentLabel", ""))]
        if "SegmentedPropertyTypeCodeSequence" in segment:
            names.append(str(segment.SegmentedPropertyTypeCodeSequence[0].get("CodeMeaning", "")))
        segments.append((names, mask))
    labels = labels_from_segments(segments, path.name)
    return Volume(labels, (column_gap, row_gap, slice_gap), tuple(in_plane[0]),
                  tuple(np.column_stack([across, down, normal]).ravel()))


def _check_gzip_complete(path: Path) -> None:
    """ITK reads a truncated .gz silently (the missing voxels become 0): decompress once to its end marker."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read image {path}: truncated or corrupt gzip data ({exc})") from None


def _all_finite(volume: Volume, path: Path) -> bool:
    """ITK's NIfTI reader turns NaN into 0, so float NIfTI files are checked on their raw data too."""
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        return False
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        if np.dtype(img.get_data_dtype()).kind == "f":
            return bool(np.isfinite(np.asanyarray(img.dataobj)).all())
    return True


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: a temporary file in the same folder, then rename."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        sitk.WriteImage(volume.to_sitk(), tmp, useCompression=compress)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resample_to(moving: Volume, reference: Volume, nearest: bool = True, default: float = 0.0) -> Volume:
    """Resample `moving` onto the grid of `reference` (physical space, full geometry)."""
    import SimpleITK as sitk

    if moving.same_grid(reference):
        return moving
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(moving.to_sitk(), reference.to_sitk(), sitk.Transform(), interp, default,
                        sitk.sitkFloat64 if not nearest else sitk.sitkUnknown)
    return Volume.from_sitk(out)


def working_grid(images: dict[str, Volume]) -> str:
    """The modality whose grid the engine works on: the finest scan (smallest voxel; ties: the first given).
    Scans of the same subject on other grids are resampled onto it, and their outputs mapped back."""
    volume = {m: float(np.prod(v.spacing)) for m, v in images.items()}
    finest = min(volume.values())
    return next(m for m in images if volume[m] <= finest * (1 + 1e-6))


def box_on_grid(box: tuple[slice, ...], source: Volume, target: Volume, pad: int = 1) -> tuple[slice, ...]:
    """The voxel box of `target` that covers the physical extent of `box` (z, y, x slices of `source`), grown by
    `pad` voxels and clipped to `target`."""
    lo = np.array([b.start for b in box][::-1], float) - 0.5  # i, j, k edges
    hi = np.array([b.stop for b in box][::-1], float) - 0.5
    edges = np.stack([lo, hi])
    corners = np.array([[edges[c, axis] for axis, c in enumerate(choice)] for choice in np.ndindex(2, 2, 2)])
    ijk = (np.linalg.inv(target.ijk_to_lps()) @ source.ijk_to_lps() @ np.c_[corners, np.ones(8)].T)[:3]
    start = np.maximum(np.floor(ijk.min(axis=1)).astype(int) - pad, 0)
    stop = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1 + pad, np.array(target.shape[::-1]))
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(start[::-1], stop[::-1]))


def resample_box_average(moving: Volume, target: Volume, box: tuple[slice, ...], max_factor: int = 8) -> np.ndarray:
    """`moving` averaged over each voxel of `target[box]` (float32, zero where `moving` has no data): sampled
    linearly at f points per voxel and axis (f = the target's spacing / the moving grid's finest, at most
    `max_factor`) and averaged, as a voxel of a coarser scan integrates the tissue it spans."""
    import SimpleITK as sitk

    factor = np.clip(np.ceil(np.array(target.spacing) / min(moving.spacing) - 1e-6), 1, max_factor).astype(int)
    size = np.array([b.stop - b.start for b in box][::-1])  # i, j, k
    first = np.array([b.start for b in box][::-1], float) - 0.5 + 0.5 / factor  # first sample, target index
    fine = sitk.Image([int(v) for v in size * factor], sitk.sitkFloat32)
    fine.SetSpacing(tuple(float(v) for v in np.array(target.spacing) / factor))
    fine.SetOrigin(tuple(float(v) for v in (target.ijk_to_lps() @ np.r_[first, 1.0])[:3]))
    fine.SetDirection(target.direction)
    source = moving.with_array(moving.array.astype(np.float32, copy=False)).to_sitk()
    samples = sitk.GetArrayFromImage(sitk.Resample(source, fine, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                   sitk.sitkFloat32))
    (nz, ny, nx), (fz, fy, fx) = size[::-1], factor[::-1]
    return samples.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def require_volume(value, name: str) -> Volume:
    """value, or InputError when it is not a Volume (an array has no geometry: a Python caller's likely slip)."""
    if not isinstance(value, Volume):
        raise InputError(f"{name} must be a Volume (read_volume(path), or Volume(array, spacing, origin, direction)), "
                         f"got {type(value).__name__}")
    return value


def validate_image(volume: Volume, name: str) -> None:
    require_volume(volume, name)
    if volume.array.ndim != 3:
        raise InputError(f"{name}: expected a 3D image, got {volume.array.ndim}D")
    if volume.array.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported voxel type {volume.array.dtype}")
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        raise InputError(f"{name}: contains NaN or Inf voxels")
    if min(volume.shape) < 2:
        raise InputError(f"{name}: image is too small {volume.shape}")
    if volume.array.min() == volume.array.max():
        raise InputError(f"{name}: image is constant (every voxel is {volume.array.flat[0]}): not a scan")
