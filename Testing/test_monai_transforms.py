"""RandSynthesizeLesiond: the engine inside a MONAI pipeline gives what the engine gives on the same files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_ball_mask, make_head
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from monai.utils import MetaKeys, SpaceKeys

from scripted_models import synthesize_lesion
from scripted_models.errors import InputError
from scripted_models.monai_transforms import RandSynthesizeLesiond, volume_from_metatensor
from scripted_models.volume import read_volume, write_volume

OBLIQUE_LEFT_HANDED = tuple(np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, -1.0]]).ravel())


def kji(image) -> np.ndarray:
    return image[0].numpy().transpose(2, 1, 0)


@pytest.fixture
def files(tmp_path):
    head = make_head(dtype=np.float32, spacing=(1.2, 1.0, 1.5), direction=OBLIQUE_LEFT_HANDED)
    flair = head.with_array(head.array * 0.8 + 30)
    return {"t1": write_volume(head, tmp_path / "t1.nii.gz"), "flair": write_volume(flair, tmp_path / "fl.nii.gz"),
            "lesion": write_volume(make_ball_mask(head), tmp_path / "lesion.nii.gz")}


def load(files, keys):
    return Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)])({k: str(files[k]) for k in keys})


def transform_and_engine(data, paths, keys, seed):
    """(the transform's output on `data` (1 step, labels under "label"), synthesize_lesion on the same files with
    the seed the transform drew)."""
    transform = RandSynthesizeLesiond(keys, mask_key="lesion", label_key="label", steps=1)
    transform.set_random_state(seed=seed)
    out = transform(data)
    return out, synthesize_lesion({m: read_volume(paths[m]) for m in keys}, read_volume(paths["lesion"]),
                                  seed=transform.seed, steps=1)


def test_pipeline_gives_the_engine_bytes_of_the_same_files(files):
    """Geometry from the MetaTensor affine (oblique, anisotropic, left-handed), the engine's seed from the
    transform's random state: the images and labels equal synthesize_lesion on the files, meta kept."""
    data = load(files, ["t1", "flair", "lesion"])
    assert np.allclose(volume_from_metatensor(data["t1"], "t1").ijk_to_ras(), read_volume(files["t1"]).ijk_to_ras(),
                       atol=1e-5)
    lps = MetaTensor(data["t1"].as_tensor().clone(), affine=torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0],
                     dtype=torch.float64)) @ data["t1"].affine, meta={MetaKeys.SPACE: SpaceKeys.LPS})
    assert np.allclose(volume_from_metatensor(lps, "t1").ijk_to_ras(), read_volume(files["t1"]).ijk_to_ras(),
                       atol=1e-5)  # an affine in LPS (meta "space") is the same scan
    out, expected = transform_and_engine(data, files, ["t1", "flair"], seed=3)
    for m in ("t1", "flair"):
        assert isinstance(out[m], MetaTensor) and out[m].shape == data[m].shape
        assert np.array_equal(kji(out[m]), expected.images[m].array), m
        assert np.array_equal(out[m].affine, data[m].affine) and not np.array_equal(kji(out[m]), kji(data[m]))
    assert np.array_equal(kji(out["label"]), expected.mask.array) and out["label"].max() == 3
    again = RandSynthesizeLesiond(["t1", "flair"], mask_key="lesion", steps=1)
    again.set_random_state(seed=3)
    assert np.array_equal(again(data)["t1"], out["t1"])  # reproducible from the random state


def test_scans_on_different_grids_stay_on_theirs_and_the_label_is_on_the_first(tmp_path):
    """A 3 mm-slice flair (first key) and a 1 mm t1: each image keeps its own shape and affine, and the label is on
    the first image's grid, the engine's mask (made on the finer t1 grid) resampled there."""
    from scripted_models.evaluation.bench import thick_slices
    from scripted_models.volume import resample_to

    t1 = make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), dtype=np.float32)  # as LoadImaged gives them
    flair = thick_slices(make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), dtype=np.float32, seed=1))
    paths = {"t1": write_volume(t1, tmp_path / "t1.nii.gz"), "flair": write_volume(flair, tmp_path / "fl.nii.gz"),
             "lesion": write_volume(make_ball_mask(t1), tmp_path / "lesion.nii.gz")}
    data = load(paths, ["flair", "t1", "lesion"])
    out, expected = transform_and_engine(data, paths, ["flair", "t1"], seed=1)
    for m in ("flair", "t1"):
        assert out[m].shape == data[m].shape and np.array_equal(kji(out[m]), expected.images[m].array), m
    assert out["label"].shape == data["flair"].shape
    assert np.array_equal(kji(out["label"]), resample_to(expected.mask, read_volume(paths["flair"])).array)
    assert kji(out["label"]).any()


def test_skipped_calls_leave_the_images_and_label_no_lesion(files):
    data = load(files, ["t1", "lesion"])
    out = RandSynthesizeLesiond(["t1"], mask_key="lesion", label_key="label", prob=0.0)(data)
    assert np.array_equal(out["t1"], data["t1"]) and out["label"].shape == data["t1"].shape
    assert not out["label"].any()


def test_without_a_mask_a_pathar_lesion_is_placed_in_the_head(tmp_path):
    head = make_head(shape=(80, 96, 80), spacing=(1.8, 1.8, 1.8), dtype=np.float32)  # a lesion fits in it
    data = load({"t1": write_volume(head, tmp_path / "big.nii.gz")}, ["t1"])
    transform = RandSynthesizeLesiond(["t1"], mask_key=None, label_key="label", steps=1)
    transform.set_random_state(seed=0)
    out = transform(data)
    label = kji(out["label"])
    head = kji(data["t1"]) > 0
    assert label.any() and (head[label > 0]).mean() >= 0.9
    changed = kji(out["t1"]) != kji(data["t1"])
    assert changed[label > 0].mean() > 0.9


def test_bad_inputs_are_one_line_errors(files):
    data = load(files, ["t1", "lesion"])
    with pytest.raises(InputError, match="MetaTensor"):
        RandSynthesizeLesiond(["t1"], mask_key="lesion")({**data, "t1": data["t1"].numpy()})
    with pytest.raises(InputError, match=r"shape \(1, I, J, K\)"):
        RandSynthesizeLesiond(["t1"], mask_key="lesion")({**data, "t1": data["t1"][0]})
    with pytest.raises(InputError, match="no lesion mask under key 'seg'"):
        RandSynthesizeLesiond(["t1"], mask_key="seg")(data)
    with pytest.raises(InputError, match="unknown modality"):
        RandSynthesizeLesiond(["image"], mask_key="lesion")
