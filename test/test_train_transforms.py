"""Training transforms: patch shape and types, label integrity, tumor sampling, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pantherseg.inference.plan import Inference, Plan, Preprocessing
from training.config import AugmentationConfig, TrainingConfig
from training.transforms import (
    FLOOR_KEY,
    INDICES_KEY,
    RandLabelIntensityd,
    RandRotateScaled,
    RandTumorCropd,
    TumorIndicesd,
    context_size,
    train_transforms,
)

PATCH = (8, 16, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_plan(patch=PATCH, spacing=(3.0, 1.0, 1.0)) -> Plan:
    return Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=spacing),
        inference=Inference(patch_size_zyx=patch, folds=()),
    )


def make_config(tumor_fraction=0.5, probability=0.2, seed=0, **augmentation) -> TrainingConfig:
    config = TrainingConfig(seed=seed)
    config.sampling.tumor_fraction = tumor_fraction
    config.augmentation.probability = probability
    for key, value in augmentation.items():
        setattr(config.augmentation, key, value)
    return config


def make_case(shape=(20, 48, 48), tumor_at=(10, 30, 20)) -> dict:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), np.uint8)
    z, y, x = tumor_at
    label[0, z - 6 : z + 6, y - 8 : y + 8, x - 8 : x + 8] = 2  # pancreas around the tumor
    label[0, z - 1 : z + 1, y - 2 : y + 1, x - 2 : x + 1] = 1  # 18 tumor voxels
    image[label == 1] += 3.0
    return {"image": image, "label": label}


def test_patch_shape_types_and_keys():
    transform = train_transforms(make_config(), make_plan())
    out = transform(make_case())
    assert set(out) == {"image", "label"}
    assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
    assert out["image"].shape == (1, *PATCH) and out["image"].dtype == torch.float32
    assert out["label"].shape == (1, *PATCH) and out["label"].dtype == torch.uint8


@pytest.mark.parametrize("elastic", [False, True])
def test_labels_stay_in_the_label_set_under_every_augmentation(elastic):
    transform = train_transforms(make_config(probability=1.0, elastic=elastic), make_plan())
    case = TumorIndicesd()(make_case())
    seen = set()
    for _ in range(10):
        out = transform(case)
        values = set(torch.unique(out["label"]).tolist())
        assert values <= {0, 1, 2}
        seen |= values
        assert torch.isfinite(out["image"]).all()
    assert seen == {0, 1, 2}


def tumor_share(tumor_fraction: float, samples: int = 200) -> float:
    transform = train_transforms(make_config(tumor_fraction), make_plan())
    case = TumorIndicesd()(make_case(shape=(24, 64, 64)))
    return np.mean([bool((transform(case)["label"] == 1).any()) for _ in range(samples)])


def test_tumor_fraction_is_honoured():
    never, half, always = tumor_share(0.0), tumor_share(0.5), tumor_share(1.0)
    # The 18-voxel tumor lies in ~3% of random 8x16x16 placements in a 24x64x64 volume.
    assert never < 0.15
    assert half > never + 0.25 and half > 0.4
    assert always > 0.9


def test_tumor_near_the_border_is_still_in_the_patch():
    crop = RandTumorCropd(("image", "label"), PATCH, PATCH, tumor_fraction=1.0)
    case = make_case(tumor_at=(1, 2, 46))
    for seed in range(20):
        crop.set_random_state(seed)
        out = crop(case)
        assert out["label"].shape == (1, *PATCH) and (out["label"] == 1).any()
        assert not (out["image"] == 0).all(axis=(1, 2)).any()  # no padded slab: inside volume


def test_precomputed_indices_are_used_and_dropped():
    case = TumorIndicesd()(make_case())
    assert case[INDICES_KEY].size == 18
    crop = RandTumorCropd(("image", "label"), PATCH, PATCH, tumor_fraction=1.0)
    fake = dict(case, **{INDICES_KEY: np.array([0])})  # pretend only voxel 0 is tumor
    out = crop(fake)
    assert INDICES_KEY not in out
    assert not (out["label"] == 1).any()  # it went to voxel 0, the corner, as told
    assert TumorIndicesd()(fake)[INDICES_KEY] is fake[INDICES_KEY]  # kept when present


def test_same_seed_same_patches_other_seed_other_patches():
    case = TumorIndicesd()(make_case())
    runs = []
    for seed in (7, 7, 8):
        transform = train_transforms(make_config(probability=0.5, seed=seed), make_plan())
        runs.append([transform(case) for _ in range(5)])
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert any(
        not torch.equal(a["image"], c["image"]) for a, c in zip(runs[0], runs[2], strict=True)
    )
    runs[0][0]["image"].zero_()  # outputs are copies, not views of the cached case
    assert case["image"].any()


def test_small_volume_is_padded_to_the_patch():
    transform = train_transforms(make_config(probability=0.0, mirror_axes=[]), make_plan())
    case = make_case(shape=(4, 10, 10), tumor_at=(2, 5, 5))
    case["image"] += 10.0  # every real voxel nonzero
    out = transform(case)
    assert out["image"].shape == (1, *PATCH)
    assert int((out["image"] != 0).sum()) == 4 * 10 * 10
    assert (out["label"] == 1).any()


def test_context_size_covers_the_rotated_patch_with_matching_parity():
    aug = AugmentationConfig()
    size = context_size((48, 192, 224), aug)
    assert all(s >= p and (s - p) % 2 == 0 for s, p in zip(size, (48, 192, 224), strict=True))
    assert size[1] > 192 * 1.25 and size[2] > 224 * 1.25  # 30 degrees in-plane and zoom-out
    aug.probability = 0.0
    assert context_size((48, 192, 224), aug) == (48, 192, 224)


def test_rotation_is_about_z_so_slices_stay_slices():
    label = np.zeros((1, 9, 33, 33), np.uint8)
    label[0, 4, 4:29, 14:19] = 1  # a bar in slice 4
    rotate = RandRotateScaled(
        ("label",),
        (9, 33, 33),
        prob=1.0,
        in_plane_deg=45.0,
        out_of_plane_deg=0.0,
        scale=(1.0, 1.0),
    )
    rotate.set_random_state(3)
    out = rotate({"label": label})["label"]
    assert out.dtype == torch.uint8
    assert torch.nonzero(out)[:, 1].unique().tolist() == [4]  # still only slice 4
    assert not torch.equal(out, torch.as_tensor(label))  # but turned within it


def test_label_intensity_scales_raw_intensity_inside_the_classes_only():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 20, 40, 40)).astype(np.float32)
    label = np.zeros((1, 20, 40, 40), np.uint8)
    label[0, 2:18, 3:25, 3:25] = 2
    label[0, 6:14, 10:18, 10:18] = 1
    floor = -1.5
    transform = RandLabelIntensityd("image", "label", (1, 2), (0.5, 0.5), prob=1.0)
    out = transform({"image": image, "label": label, FLOOR_KEY: floor})
    assert FLOOR_KEY not in out and out["label"] is label
    core = np.zeros_like(label, bool)
    core[0, 7:13, 8:20, 8:20] = True  # 5 voxels inside: the blurred weight is 1 there
    np.testing.assert_allclose(out["image"][core], floor + 0.5 * (image[core] - floor), atol=1e-4)
    far = np.zeros_like(label, bool)
    far[0, :, 32:, 32:] = True  # beyond the blur
    np.testing.assert_array_equal(out["image"][far], image[far])
    row = (0, 10, 14, slice(0, 7))  # across the pancreas' edge at x = 3: a gradual change
    change = out["image"][row] - image[row]
    full = 0.5 * (floor - image[row])
    assert np.all(np.abs(change) <= np.abs(full) + 1e-6)
    assert 0.05 < change[2] / full[2] < 0.95 and 0.05 < change[3] / full[3] < 0.95


def test_label_intensity_off_by_probability_and_without_the_classes():
    image = np.zeros((1, 4, 8, 8), np.float32)
    label = np.zeros((1, 4, 8, 8), np.uint8)
    never = RandLabelIntensityd("image", "label", (1,), (0.5, 2.0), prob=0.0)
    np.testing.assert_array_equal(never({"image": image + 1, "label": label + 1})["image"], 1)
    always = RandLabelIntensityd("image", "label", (1,), (0.5, 2.0), prob=1.0)
    np.testing.assert_array_equal(always({"image": image + 1, "label": label})["image"], 1)


def test_label_intensity_in_the_pipeline_keeps_the_patch_keys():
    config = make_config(label_intensity=[0.6, 1.3], label_intensity_probability=1.0)
    transform = train_transforms(config, make_plan())
    case = make_case()
    off = make_config(label_intensity=[0.6, 1.3], label_intensity_probability=0.0)
    plain = train_transforms(off, make_plan())({**make_case(), FLOOR_KEY: -3.0})
    out = transform({**case, FLOOR_KEY: -3.0})
    assert set(out) == {"image", "label"}
    assert torch.equal(out["label"], plain["label"])  # the label and the crop are untouched
    assert not torch.equal(out["image"], plain["image"])
