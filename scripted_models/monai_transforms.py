"""A MONAI dictionary transform: PathoSyn lesions inside a MONAI data pipeline.

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from scripted_models.monai_transforms import RandSynthesizeLesiond

    keys = ["t1", "flair", "lesion"]
    pipeline = Compose([LoadImaged(keys), EnsureChannelFirstd(keys),
                        RandSynthesizeLesiond(["t1", "flair"], mask_key="lesion", label_key="label", prob=0.5)])
    pipeline.set_random_state(seed=0)   # reproducible: each call draws the engine's seed from this state

Images are channel-first (1, I, J, K) MetaTensors whose affine maps voxel indices to world coordinates (RAS, or LPS
when their meta says so), as LoadImaged gives them: the engine sees the same scan geometry that the command line
reads from a file, and gives the same bytes for the same seed. mask_key=None draws a PathAR lesion and places it in
the brain, as `pathosyn batch` does for a `pathar` row. A synthesis takes about 3 s on 2 CPU cores (64^3 lesion
box): use the transform in the random part of a cached pipeline, or to build a dataset once.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import MetaKeys, SpaceKeys

from .errors import InputError
from .labels import check_modality
from .volume import LPS_TO_RAS, Volume, resample_to, working_grid

MAX_SEED = 2 ** 31 - 1


def volume_from_metatensor(image, name: str) -> Volume:
    """A channel-first (1, I, J, K) MetaTensor -> Volume (array in (k, j, i) order, geometry from its affine)."""
    if not isinstance(image, MetaTensor):
        raise InputError(f"{name}: expected a MetaTensor with its affine (LoadImaged), got {type(image).__name__}")
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(f"{name}: expected one channel first, shape (1, I, J, K), got {tuple(image.shape)}")
    affine = np.asarray(image.affine.detach().cpu(), np.float64)
    if image.meta.get(MetaKeys.SPACE, SpaceKeys.RAS) == SpaceKeys.LPS:
        affine = np.vstack([LPS_TO_RAS @ affine[:3], affine[3:]])
    volume = Volume.from_ijk_to_ras(image[0].detach().cpu().numpy().transpose(2, 1, 0), affine)
    # spacing as an image header stores it (float32): an affine's 1.19999999 mm is the file's 1.2 mm, so the engine
    # gives the bytes it gives for the file (its margins alone would agree anyway: DISTANCE_TOLERANCE_MM)
    return Volume(volume.array, tuple(float(np.float32(s)) for s in volume.spacing), volume.origin, volume.direction)


def like(image: MetaTensor, array_kji: np.ndarray) -> MetaTensor:
    """`array_kji` (k, j, i) as a copy of `image` (its meta, affine, dtype and device kept)."""
    out = image.clone()
    out[0] = torch.as_tensor(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), dtype=out.dtype)
    return out


class RandSynthesizeLesiond(RandomizableTransform, MapTransform):
    """Add a synthetic lesion (PathoSyn) to the images under `keys`, one modality each, with probability `prob`.

    keys: image keys; their modality is the key's name (t1, t1c, t2, flair) unless `modalities` maps it.
    mask_key: where to draw the lesion (canonical, BraTS or binary labels; any grid); None = a PathAR lesion placed
        in the brain of the first image. label_key: if given, the lesion labels of the output (0 where no lesion
        was added) are written there, on the first image's grid. steps, guidance, device: as `synthesize_lesion`.
    Raises InputError (one line) for inputs the engine cannot use. Not invertible.
    """

    def __init__(self, keys: KeysCollection, mask_key: Hashable | None = "label", label_key: Hashable | None = None,
                 prob: float = 1.0, modalities: Mapping[Hashable, str] | None = None, steps: int | None = None,
                 guidance: float = 1.0, device: str = "auto", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.modalities = {key: check_modality((modalities or {}).get(key, str(key))) for key in self.keys}
        self.mask_key, self.label_key = mask_key, label_key
        self.steps, self.guidance, self.device = steps, guidance, device
        self.seed = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.seed = int(self.R.randint(0, MAX_SEED))  # drawn on every call, so the stream does not depend on prob

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        images = {self.modalities[key]: volume_from_metatensor(d[key], str(key)) for key in keys}
        reference = next(iter(images.values()))
        if not self._do_transform:
            if self.label_key is not None:
                d[self.label_key] = like(d[keys[0]], np.zeros(reference.shape, np.float32))
            return d
        from .pathosyn.api import synthesize_lesion

        if self.mask_key is None:
            finest = working_grid(images)  # the engine's grid
            mask = self._pathar_mask(finest, images[finest])
        else:
            if self.mask_key not in d:
                raise InputError(f"no lesion mask under key {self.mask_key!r} (mask_key=None draws a PathAR lesion)")
            mask = volume_from_metatensor(d[self.mask_key], str(self.mask_key))
        result = synthesize_lesion(images, mask, seed=self.seed, steps=self.steps, guidance=self.guidance,
                                   device=self.device)
        for key in keys:
            d[key] = like(d[key], result.images[self.modalities[key]].array)
        if self.label_key is not None:  # on the first image's grid (the engine's is the finest scan's)
            d[self.label_key] = like(d[keys[0]], resample_to(result.mask, reference).array)
        return d

    def _pathar_mask(self, modality: str, reference: Volume) -> Volume:
        from .batch.job import place_mask
        from .pathar.api import sample_pairs

        pair = sample_pairs([modality], n=1, seed=self.seed, device=self.device)[0]
        return place_mask(pair.mask, reference, self.seed)[0]


__all__ = ["RandSynthesizeLesiond", "volume_from_metatensor"]
