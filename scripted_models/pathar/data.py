"""Lesion-centred 3D patches for PathAR, cached to a .npz under the work folder.

Each labelled case (canonical sub-regions; binary-only masks are skipped because they carry no structure)
gives patches of `size`^3 voxels at `spacing_mm` (64^3 at 2 mm = 128 mm, enough for every lesion in
../shared/data, the largest spans 108 mm), centred on the lesion's bounding box, on an axis-aligned LPS grid
(identity direction), whatever the case's own orientation. Array axes are (z, y, x) = (S, P, L).

Augmentation, precomputed per case (`augment_per_case` patches; the first is the plain one): rotation up to
`max_rotation_deg` about each axis, isotropic scale jitter (the lesion looks up to 10 % smaller/larger), shift.
Training cases also get `elastic_per_case` patches that add a smooth random deformation (a cubic B-spline on a
`elastic_mesh`^3 mesh over the patch, control-point displacements N(0, `elastic_mm`) clipped at 2.5 sd), applied
to the mask and the images alike: new lesion shapes rather than new poses of the same training lesions. They come
from their own random stream, so the rigid patches are the same with or without them, and they are flagged
(`is_elastic`) so that memorisation is measured against the real lesions' poses only.
With `blend_per_case`, each training case also gets that many structure-only masks (`is_blend`, no images): a
signed-distance blend (`shape_blend`, t ~ U(blend_range)) of one of its rigid poses with a rigid pose of another
training case, i.e. lesions between the training lesions, for the structure stream only.
On the fly during training (`augment`): left-right flips only (the other axes would turn anatomy upside down),
and intensity jitter for images. Images are the case's z-scored volumes (Case.normalized: statistics of healthy
foreground), with everything outside the brain/head foreground set to `background_z` and values clipped.
Labels are resampled as one-hot channels (linear) and arg-maxed, which keeps boundaries smooth under rotation.

Every case contributes the modalities it has: BraTS 2013 cases flair + t1c, the others all four. Which cases
are held out depends on `split`:
  * "validation_case" (the earlier weights): VALIDATION_CASE is held out (its patches have is_val=True).
  * "folds": the case-level folds of folds.py. The validation fold is held out (is_val) and selects the
    weights; the test fold is left out entirely, or, with `with_test` (evaluation only, never training), added
    as held-out patches flagged `is_test`.
With `lesion_masks`, the manual masks of ../shared/data/lesion_masks/ (no scan behind them) join the training
split as structure-only cases ("mask:<id>"): patches without images, for the structure VQ and the transformer's
structure stream. Unlabelled cases named in `pseudo_labelled` (`train-pathar --pseudo-labels` names
aurora_met_unlabelled, all four modalities) join with rule-based labels (pseudo_labels.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..cases import VALIDATION_CASE, default_data_root, list_cases, load_case
from ..labels import MODALITIES

CACHE_VERSION = 1
SPLITS = ("validation_case", "folds")
MASK_PREFIX = "mask:"  # case ids of the structure-only lesion masks
ELASTIC_STREAM = 1  # seeds the elastic draws apart from the rigid ones: np.random.default_rng([seed, 1, case])
BLEND_STREAM = 2  # and the blends: np.random.default_rng([seed, 2])


@dataclass
class PatchConfig:
    size: int = 64
    spacing_mm: float = 2.0
    num_labels: int = 4
    augment_per_case: int = 32
    val_per_case: int = 4
    max_rotation_deg: float = 15.0
    scale_jitter: float = 0.1
    shift_mm: float = 8.0
    elastic_per_case: int = 0  # extra deformed patches per training case (0 = rigid augmentation only)
    elastic_mm: float = 8.0
    elastic_mesh: int = 3
    blend_per_case: int = 0  # structure-only blends of each training case with another one (0 = none)
    blend_range: tuple[float, float] = (0.2, 0.8)
    background_z: float = -4.0
    clip: tuple[float, float] = (-5.0, 8.0)
    seed: int = 0
    exclude: tuple[str, ...] = field(default_factory=tuple)  # case ids to leave out entirely
    pseudo_labelled: tuple[str, ...] = field(default_factory=tuple)  # unlabelled cases given rule-based labels
    split: str = "validation_case"  # or "folds" (folds.py: validation fold held out, test fold left out)
    lesion_masks: bool = False  # add ../shared/data/lesion_masks/ as structure-only training cases
    with_test: bool = False  # "folds" only, evaluation only: add the test fold as held-out is_test patches

    def to_dict(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        defaults = {"split": "validation_case", "lesion_masks": False, "with_test": False}
        for k, v in defaults.items():  # configs from before these options keep their cache key and card entry
            if out[k] == v:
                out.pop(k)
        if not self.elastic_per_case:  # rigid-only configs keep their earlier cache key and card entry
            for k in ("elastic_per_case", "elastic_mm", "elastic_mesh"):
                out.pop(k)
        if not self.pseudo_labelled:
            out.pop("pseudo_labelled")
        if not self.blend_per_case:
            for k in ("blend_per_case", "blend_range"):
                out.pop(k)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PatchConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


@dataclass
class PatchSet:
    """Masks (P, S, S, S) uint8 and images (I, S, S, S) float16; image i belongs to patch image_patch[i]."""

    masks: np.ndarray
    patch_case: np.ndarray  # (P,) index into case_ids
    is_val: np.ndarray  # (P,) bool
    images: np.ndarray
    image_patch: np.ndarray  # (I,)
    image_modality: np.ndarray  # (I,) index into MODALITIES
    case_ids: list[str]
    config: PatchConfig
    is_elastic: np.ndarray | None = None  # (P,) bool: deformed patches (new shapes); None = all rigid
    is_blend: np.ndarray | None = None  # (P,) bool: blends of two training lesions, masks only; None = none
    is_test: np.ndarray | None = None  # (P,) bool: test-fold patches (also is_val), evaluation sets only

    def __post_init__(self):
        for name in ("is_elastic", "is_blend", "is_test"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(len(self.masks), bool))

    @cached_property
    def has_images(self) -> np.ndarray:
        """(P,) bool: patches with at least one image (not the blends or the mask-only lesions)."""
        return np.isin(np.arange(len(self.masks)), self.image_patch)

    @property
    def spacing_mm(self) -> float:
        return self.config.spacing_mm

    def patches(self, val: bool = False) -> np.ndarray:
        return np.nonzero((self.is_val == val) & ~self.is_test)[0]

    def plain_patches(self) -> np.ndarray:
        """The un-augmented patch of each case (its first one), in case order."""
        return np.unique(self.patch_case, return_index=True)[1]

    def real_poses(self, val: bool = False) -> np.ndarray:
        """Patches that only re-pose a real lesion (rigid augmentation): the memorisation reference."""
        return np.nonzero((self.is_val == val) & ~self.is_test & ~self.is_elastic & ~self.is_blend)[0]

    def imaged_patches(self, val: bool = False) -> np.ndarray:
        """Patches with images (all but the structure-only blends and lesion masks)."""
        return np.nonzero((self.is_val == val) & ~self.is_test & self.has_images)[0]

    def structure_only_patches(self, val: bool = False) -> np.ndarray:
        """Patches without images: blends and lesion masks."""
        return np.nonzero((self.is_val == val) & ~self.is_test & ~self.has_images)[0]

    def image_indices(self, val: bool = False) -> np.ndarray:
        patch = self.image_patch
        return np.nonzero((self.is_val[patch] == val) & ~self.is_test[patch])[0]

    def modalities_of(self, patch: int) -> list[int]:
        return self.image_modality[self.image_patch == patch].tolist()

    def sources(self) -> list[str]:
        """'case:modality' strings of the training split (for model cards)."""
        out = set()
        for i in self.image_indices(False):
            out.add(f"{self.case_ids[self.patch_case[self.image_patch[i]]]}:{MODALITIES[self.image_modality[i]]}")
        return sorted(out)

    def training_cases(self) -> list[str]:
        return sorted({self.case_ids[c] for c in self.patch_case[~self.is_val]})

    def held_out_cases(self) -> list[str]:
        return sorted({self.case_ids[c] for c in self.patch_case[self.is_val]})


def labelled_cases(data_root=None, exclude=(), pseudo_labelled=()) -> list[Path]:
    """Case folders with canonical sub-region labels, plus the unlabelled cases named in `pseudo_labelled`
    (binary-only and other unlabelled cases skipped)."""
    out = []
    for folder in list_cases(data_root):
        if folder.name in exclude:
            continue
        info = json.loads((folder / "case.json").read_text())
        mapping = info.get("label_map_to_canonical") or {}
        if (mapping and all(isinstance(v, int) for v in mapping.values())) or folder.name in pseudo_labelled:
            out.append(folder)
    return out


def patch_sources(cfg: PatchConfig, data_root=None) -> list[tuple[str, Path, str]]:
    """(case id, case folder or mask file, role "train" | "val" | "test") of every case the patch set holds."""
    from ..errors import InputError

    if cfg.split not in SPLITS:
        raise InputError(f"unknown patch split '{cfg.split}': expected one of {', '.join(SPLITS)}")
    root = Path(data_root or default_data_root())
    folders = labelled_cases(root, cfg.exclude, cfg.pseudo_labelled)
    out = []
    if cfg.split == "folds":
        from ..folds import make_folds

        folds = make_folds(str(root))
        for folder in folders:
            role = {"validation": "val"}.get(folds.role(folder.name), folds.role(folder.name))
            if role is None and folder.name in cfg.pseudo_labelled:
                role = "train"
            if role is None or (role == "test" and not cfg.with_test):
                continue
            out.append((folder.name, folder, role))
    else:
        out = [(f.name, f, "val" if f.name == VALIDATION_CASE else "train") for f in folders]
    if cfg.lesion_masks:
        index = json.loads((root / "lesion_masks" / "index.json").read_text())
        for name in sorted(index["masks"]):
            case_id = MASK_PREFIX + name.split(".")[0]
            if case_id not in cfg.exclude:
                out.append((case_id, root / "lesion_masks" / name, "train"))
    return out


def load_labelled_case(folder: Path, cfg: PatchConfig):
    """The case with canonical labels: its own, or rule-based ones if it is named in cfg.pseudo_labelled."""
    case = load_case(folder)
    if folder.name in cfg.pseudo_labelled and (case.seg is None or not case.seg.any()):
        from .pseudo_labels import pseudo_label_case

        pseudo_label_case(case)
    return case


def _sitk(array: np.ndarray, reference):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing(reference.spacing)
    img.SetOrigin(reference.origin)
    img.SetDirection(reference.direction)
    return img


def _patch_grid(centre, spacing: float, size: int):
    """An empty image holding the patch grid: identity direction, centred on `centre` (LPS mm)."""
    import SimpleITK as sitk

    grid = sitk.Image([size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(tuple(float(c) - spacing * (size - 1) / 2.0 for c in centre))
    return grid


def patch_transform(centre, spacing: float, size: int, angles, shift, elastic=None):
    """Patch point -> case point: an Euler rotation about `centre` plus `shift` (mm), preceded by an optional
    B-spline deformation of the patch grid. elastic: (mesh, displacements (n_params,) in mm) or None."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(float(c) for c in centre))
    euler.SetRotation(*[float(a) for a in angles])
    euler.SetTranslation(tuple(float(s) for s in shift))
    if elastic is None:
        return euler
    mesh, displacements = elastic
    bspline = sitk.BSplineTransformInitializer(_patch_grid(centre, spacing, size), [int(mesh)] * 3)
    bspline.SetParameters([float(d) for d in displacements])
    return sitk.CompositeTransform([euler, bspline])  # the last added acts first: deform, then re-pose


def elastic_draw(cfg: PatchConfig, rng: np.random.Generator):
    """(mesh, displacements) for `patch_transform`: N(0, elastic_mm) per control point and axis, clipped."""
    n_params = 3 * (cfg.elastic_mesh + 3) ** 3  # cubic B-spline: mesh + order control points per axis
    d = rng.normal(0.0, cfg.elastic_mm, n_params)
    return cfg.elastic_mesh, np.clip(d, -2.5 * cfg.elastic_mm, 2.5 * cfg.elastic_mm)


def _resample(image, centre, spacing: float, size: int, transform, default: float):
    """Patch of `image` (linear) on an identity-direction grid centred on `centre` (LPS mm), through `transform`."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(_patch_grid(centre, spacing, size))
    f.SetTransform(transform)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    return sitk.GetArrayFromImage(f.Execute(image))


def signed_distance(region: np.ndarray, spacing_mm: float, far: float | None = None) -> np.ndarray:
    """Distance (mm) to the region's boundary, negative inside; an empty region is `far` everywhere (None: as far
    as the grid is wide)."""
    from scipy import ndimage

    if not region.any():
        far = spacing_mm * float(np.linalg.norm(region.shape)) if far is None else far
        return np.full(region.shape, far, np.float32)
    outside = ndimage.distance_transform_edt(~region, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(region, sampling=spacing_mm)
    return (outside - inside).astype(np.float32)


def shape_blend(a: np.ndarray, b: np.ndarray, t: float, spacing_mm: float = 2.0) -> np.ndarray:
    """A lesion part way (t = 0: a, t = 1: b) between two canonical masks, by signed distances sd (mm): the
    whole lesion and TC are where (1 - t) * sd_a + t * sd_b < 0 (TC kept inside the lesion's largest
    component); inside TC each voxel takes core or enhancing, whichever blended distance is lower (a thin
    enhancing rim would vanish as a level set of its own)."""
    from ..labels import CORE, EDEMA, ENHANCING
    from ..preprocess import bounding_box, largest_component

    out = np.zeros(a.shape, np.uint8)
    both = bounding_box((a > 0) | (b > 0))
    if both is None:
        return out
    # The distances are computed in the two lesions' box plus one healthy voxel, where they are exact (every
    # lesion voxel is in it, and its healthy rim is nearer than any voxel beyond it); outside, both are healthy.
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(both, a.shape))
    a, b = a[box], b[box]
    far = spacing_mm * float(np.linalg.norm(out.shape))  # an empty level: as far as the whole patch is wide

    def blended(level):
        return (1 - t) * signed_distance(level(a), spacing_mm, far) + t * signed_distance(level(b), spacing_mm, far)

    whole = largest_component(blended(lambda m: m > 0) < 0)
    tc = whole & (blended(lambda m: (m == CORE) | (m == ENHANCING)) < 0)
    enhancing = tc & (blended(lambda m: m == ENHANCING) < blended(lambda m: m == CORE))
    inner = out[box]
    inner[whole] = EDEMA
    inner[tc] = CORE
    inner[enhancing] = ENHANCING
    return out


def blend_patches(masks: np.ndarray, poses: np.ndarray, pose_case: np.ndarray, per_case: int, spacing_mm: float,
                  t_range=(0.2, 0.8), rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(blends (per_case * cases, *S) uint8, case of each blend's first lesion): for each case, `per_case`
    blends of a random pose of it (masks[poses]) with a random pose of another case."""
    rng = rng or np.random.default_rng(0)
    cases = np.unique(pose_case)
    out, first = [], []
    if len(cases) < 2:  # nothing to blend with
        cases = cases[:0]
    for case in cases:
        for _ in range(per_case):
            other = rng.choice(cases[cases != case])
            a = rng.choice(poses[pose_case == case])
            b = rng.choice(poses[pose_case == other])
            out.append(shape_blend(masks[a], masks[b], float(rng.uniform(*t_range)), spacing_mm))
            first.append(case)
    shape = (0,) + masks.shape[1:]
    return (np.stack(out) if out else np.zeros(shape, np.uint8)), np.array(first, int)


def case_patches(folder: Path, cfg: PatchConfig, count: int, rng: np.random.Generator, elastic: int = 0,
                 elastic_rng: np.random.Generator | None = None):
    """(masks (count + elastic, S, S, S) uint8, {modality: (count + elastic, S, S, S) float16}) for one case:
    `count` rigid patches (drawn from rng), then `elastic` deformed ones (drawn from elastic_rng)."""
    case = load_labelled_case(folder, cfg)
    fg = case.foreground()
    images = {m: np.clip(np.where(fg, a, cfg.background_z), *cfg.clip) for m, a in case.normalized(fg).items()}
    return lesion_patches(case.reference, case.seg, images, cfg, count, rng, elastic, elastic_rng)


def mask_patches(path: Path, cfg: PatchConfig, count: int, rng: np.random.Generator, elastic: int = 0,
                 elastic_rng: np.random.Generator | None = None):
    """The same for a lesion mask without a scan (canonical labels 0-3 already): masks only, no images."""
    from ..errors import InputError
    from ..volume import read_volume

    mask = read_volume(path)
    seg = np.rint(mask.array).astype(np.int16)
    if seg.min() < 0 or seg.max() >= cfg.num_labels or not (seg > 0).any():
        raise InputError(f"{path}: expected canonical labels 0-{cfg.num_labels - 1} with a lesion")
    return lesion_patches(mask, seg.astype(np.uint8), {}, cfg, count, rng, elastic, elastic_rng)


def lesion_patches(ref, seg: np.ndarray, images: dict[str, np.ndarray], cfg: PatchConfig, count: int,
                   rng: np.random.Generator, elastic: int = 0, elastic_rng: np.random.Generator | None = None):
    """Patches of one lesion: seg (canonical labels) and prepared images (z-scores) on the grid of `ref`."""
    idx = np.argwhere(seg > 0)
    centre_kji = (idx.min(0) + idx.max(0)) / 2.0
    centre = (ref.ijk_to_lps() @ np.r_[centre_kji[::-1], 1.0])[:3]  # LPS mm
    onehot = [_sitk(seg == c, ref) for c in range(cfg.num_labels)]
    images = {m: _sitk(a, ref) for m, a in images.items()}
    masks = np.zeros((count + elastic,) + (cfg.size,) * 3, np.uint8)
    out = {m: np.zeros(masks.shape, np.float16) for m in images}  # calloc: pages touched once, when filled
    for n in range(count + elastic):
        draw = rng if n < count else elastic_rng
        if n == 0:
            angles, scale, shift = np.zeros(3), 1.0, np.zeros(3)
        else:
            angles = np.deg2rad(draw.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3))
            scale = float(draw.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
            shift = draw.uniform(-cfg.shift_mm, cfg.shift_mm, 3)
        spacing = cfg.spacing_mm * scale
        transform = patch_transform(centre, spacing, cfg.size, angles, shift,
                                    elastic_draw(cfg, draw) if n >= count else None)
        probs = np.stack([_resample(o, centre, spacing, cfg.size, transform, 1.0 if c == 0 else 0.0)
                          for c, o in enumerate(onehot)])
        masks[n] = probs.argmax(0).astype(np.uint8)
        for m, img in images.items():
            out[m][n] = _resample(img, centre, spacing, cfg.size, transform, cfg.background_z).astype(np.float16)
    return masks, out


def cache_path(work: Path, cfg: PatchConfig, sources: list[tuple[str, Path, str]]) -> Path:
    cases = [case_id for case_id, _, _ in sources]
    if cfg.split != "validation_case":  # earlier caches keep their key
        cases = [f"{case_id}:{role}" for case_id, _, role in sources]
    key = json.dumps({"v": CACHE_VERSION, "cfg": cfg.to_dict(), "cases": cases}, sort_keys=True)
    return Path(work) / f"patches_{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"


def build_patches(work: Path, cfg: PatchConfig | None = None, data_root=None, verbose: bool = True) -> PatchSet:
    """Load the cached patch set for this config and data, or build and cache it (about 1 min)."""
    cfg = cfg or PatchConfig()
    sources = patch_sources(cfg, data_root)
    path = cache_path(work, cfg, sources)
    if path.is_file():
        return load_patches(path)
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    masks, patch_case, is_val, images, image_patch, image_modality, case_ids = [], [], [], [], [], [], []
    is_elastic, is_test = [], []
    for case_index, (case_id, source, role) in enumerate(sources):
        val = role != "train"
        rigid = cfg.val_per_case if val else cfg.augment_per_case
        elastic = 0 if val else cfg.elastic_per_case
        make = mask_patches if case_id.startswith(MASK_PREFIX) else case_patches
        m, imgs = make(source, cfg, rigid, rng, elastic, np.random.default_rng([cfg.seed, ELASTIC_STREAM, case_index]))
        count = rigid + elastic
        base = sum(len(x) for x in masks)
        masks.append(m)
        patch_case += [len(case_ids)] * count
        is_val += [val] * count
        is_test += [role == "test"] * count
        is_elastic += [False] * rigid + [True] * elastic
        case_ids.append(case_id)
        for mod, arr in imgs.items():
            images.append(arr)
            image_patch += list(range(base, base + count))
            image_modality += [MODALITIES.index(mod)] * count
        if verbose:
            print(json.dumps({"patches": case_id, "role": role, "rigid": rigid, "elastic": elastic,
                              "modalities": sorted(imgs), "elapsed_s": round(time.time() - t0, 1)}), flush=True)
    is_blend = [False] * len(is_val)
    if cfg.blend_per_case:
        rigid = np.nonzero(~np.array(is_val) & ~np.array(is_elastic))[0]
        blends, first = blend_patches(np.concatenate(masks), rigid, np.array(patch_case)[rigid], cfg.blend_per_case,
                                      cfg.spacing_mm, cfg.blend_range, np.random.default_rng([cfg.seed, BLEND_STREAM]))
        masks.append(blends)
        patch_case += first.tolist()
        is_val += [False] * len(blends)
        is_elastic += [False] * len(blends)
        is_test += [False] * len(blends)
        is_blend += [True] * len(blends)
        if verbose:
            print(json.dumps({"blends": len(blends), "elapsed_s": round(time.time() - t0, 1)}), flush=True)
    ps = PatchSet(np.concatenate(masks), np.array(patch_case), np.array(is_val, bool), np.concatenate(images),
                  np.array(image_patch, int), np.array(image_modality, int), case_ids, cfg,
                  np.array(is_elastic, bool), np.array(is_blend, bool), np.array(is_test, bool))
    save_patches(path, ps)
    return ps


def save_patches(path: Path, ps: PatchSet) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, masks=ps.masks, patch_case=ps.patch_case, is_val=ps.is_val, images=ps.images,
             image_patch=ps.image_patch, image_modality=ps.image_modality, case_ids=np.array(ps.case_ids),
             is_elastic=ps.is_elastic, is_blend=ps.is_blend, is_test=ps.is_test,
             config=np.array(json.dumps(ps.config.to_dict())))
    os.replace(tmp, path)


def load_patches(path: Path) -> PatchSet:
    z = np.load(path)
    # caches from before these flags lack them
    optional = {k: z[k] for k in ("is_elastic", "is_blend", "is_test") if k in z.files}
    return PatchSet(z["masks"], z["patch_case"], z["is_val"], z["images"], z["image_patch"], z["image_modality"],
                    [str(c) for c in z["case_ids"]], PatchConfig.from_dict(json.loads(str(z["config"]))), **optional)


# --------------------------------------------------------------------------- on-the-fly augmentation

def flip_lr(array: np.ndarray) -> np.ndarray:
    """Left-right flip of (..., z, y, x) arrays (x is L-R on the identity-direction patch grid)."""
    return np.ascontiguousarray(array[..., ::-1])


def mask_batch(ps: PatchSet, rng: np.random.Generator, batch: int) -> np.ndarray:
    """(B, S, S, S) uint8 training masks, random left-right flips."""
    idx = rng.choice(ps.patches(False), batch)
    return np.stack([flip_lr(ps.masks[i]) if rng.random() < 0.5 else ps.masks[i] for i in idx])


def image_batch(ps: PatchSet, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (B, S, S, S) float32, masks (B, S, S, S) uint8, modality indices (B,)): random flips and intensity jitter
    (x * U(0.9, 1.1) + U(-0.1, 0.1)). Patches with images are drawn uniformly, then one of their modalities."""
    patches = rng.choice(ps.imaged_patches(False), batch)
    xs, ms, mods = [], [], []
    for p in patches:
        choices = np.nonzero(ps.image_patch == p)[0]
        i = int(rng.choice(choices))
        x, m = ps.images[i].astype(np.float32), ps.masks[p]
        if rng.random() < 0.5:
            x, m = flip_lr(x), flip_lr(m)
        xs.append(x * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1))
        ms.append(m)
        mods.append(int(ps.image_modality[i]))
    return np.stack(xs).astype(np.float32), np.stack(ms), np.asarray(mods, np.int64)
