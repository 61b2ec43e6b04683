"""Training-time sampling and augmentation: MONAI dictionary transforms over preprocessed arrays.

Input: {"image": (1, Z, Y, X) float32, "label": (1, Z, Y, X) uint8} (already cropped, normalised
and resampled by `pantherseg.inference.preprocess`; no file reading here). Output: one patch of
the plan's size per call, {"image": float32 tensor, "label": uint8 tensor}.

Stages (applied in nnU-Net's order: crop, spatial, intensity, mirroring):
1. sampling: a patch centred on a random tumor voxel with probability `sampling.tumor_fraction`,
   else at a uniformly random position inside the volume (every placement that fits is equally
   likely, as in nnU-Net, rather than half-empty patches around border voxels). Tumor voxel
   indices are computed once per case (`TumorIndicesd`, deterministic, so a MONAI CacheDataset
   keeps them) instead of MONAI's FgBgToIndicesd, which also lists every background voxel
   (millions per case).
   The crop is larger than the patch (`context_size`) so that rotating and scaling it never
   brings padded corners into the patch; parts outside the volume (and volumes smaller than the
   patch) are zero-padded, 0 being the mean intensity after z-scoring.
   Optionally (`augmentation.label_intensity`) the tumor's and pancreas' intensity is scaled
   on the crop, which varies their contrast against their neighbours (`RandLabelIntensityd`).
2. spatial: rotation mostly about z (in-plane), small tilts of the thick slices, isotropic
   scaling, each with `augmentation.probability`, resampled straight to the patch size in one
   interpolation (images linear, labels nearest); without either it is a plain centre crop.
   Optional grid distortion (`augmentation.elastic`); mirroring on `augmentation.mirror_axes`
   with probability 0.5 per axis (as nnU-Net, and matching mirror test-time augmentation).
3. intensity: noise, blur (sigma in mm-equivalent voxels, so hardly across thick slices),
   multiplicative brightness, contrast, low-resolution simulation, gamma.

Randomness comes from each transform's own generator: `Compose.set_random_state(seed)` makes the
sequence reproducible; use `monai.data.DataLoader`, which reseeds the transforms per worker.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandGridDistortiond,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    Transform,
)
from monai.transforms.utils import create_rotate, create_scale
from scipy import ndimage

from pantherseg.inference.plan import KNOWN_CLASSES, Plan
from training.config import AugmentationConfig, TrainingConfig

TUMOR = KNOWN_CLASSES.index("tumor")
INDICES_KEY = "tumor_indices"
FLOOR_KEY = "intensity_floor"  # the z-score of raw zero in a case, for RandLabelIntensityd
Triple = tuple[int, int, int]


class TumorIndicesd(Transform):
    """Adds the flat indices of the tumor voxels of `label_key` (once per case; kept if present)."""

    def __init__(self, label_key: str = "label", indices_key: str = INDICES_KEY) -> None:
        self.label_key = label_key
        self.indices_key = indices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.indices_key not in d:
            label = np.asarray(d[self.label_key])[0]
            d[self.indices_key] = np.flatnonzero(label == TUMOR)
        return d


def context_size(patch: Sequence[int], aug: AugmentationConfig) -> Triple:
    """Region to crop so that the patch, after the largest rotation and zoom-out that
    `RandRotateScaled` may draw, still samples only inside it. Same parity as the patch on each
    axis, so an un-augmented patch is an exact centre crop."""
    if aug.probability <= 0:
        return _triple(patch)
    half = np.array([(p - 1) / 2 for p in patch])
    zoom_out = max(max(aug.scale), 1.0)
    in_plane = math.radians(aug.rotation_in_plane_deg)
    tilt = math.radians(aug.rotation_out_of_plane_deg)
    extent = half.copy()
    angles = np.linspace(0.0, in_plane, 16)
    for angle, tilt_y, tilt_x in itertools.product(angles, (-tilt, tilt), (-tilt, tilt)):
        rotation = np.abs(create_rotate(3, (angle, tilt_y, tilt_x))[:3, :3])
        extent = np.maximum(extent, rotation @ half)
    # 2 * half-extent + the centre voxel + one voxel of interpolation margin on each side
    size = [
        max(int(p), 2 * math.ceil(zoom_out * e) + 3) for p, e in zip(patch, extent, strict=True)
    ]
    return _triple([s + (s - p) % 2 for s, p in zip(size, patch, strict=True)])


def _triple(values: Sequence[int]) -> Triple:
    z, y, x = (int(v) for v in values)
    return z, y, x


class RandTumorCropd(Randomizable, MapTransform):
    """Crops a `size` region whose central `patch` is centred on a tumor voxel with probability
    `tumor_fraction` (if the case has tumor), else placed uniformly inside the volume.

    The patch is shifted to stay inside the volume when the tumor is near its border (it still
    contains the tumor voxel); the context margin around it and volumes smaller than the patch
    are zero-padded. The indices key is dropped from the output, so batches collate."""

    def __init__(
        self,
        keys: KeysCollection,
        patch: Sequence[int],
        size: Sequence[int],
        tumor_fraction: float,
        label_key: str = "label",
        indices_key: str = INDICES_KEY,
    ) -> None:
        MapTransform.__init__(self, keys)
        if any((s - p) % 2 or s < p for s, p in zip(size, patch, strict=True)):
            raise ValueError(f"crop size {size} must exceed patch {patch} by an even margin")
        self.patch = tuple(int(p) for p in patch)
        self.size = tuple(int(s) for s in size)
        self.tumor_fraction = tumor_fraction
        self.label_key = label_key
        self.indices_key = indices_key
        self._start: list[int] = [0, 0, 0]

    def randomize(self, shape: Sequence[int], indices: np.ndarray) -> None:
        on_tumor = len(indices) > 0 and self.R.rand() < self.tumor_fraction
        if on_tumor:
            centre = np.unravel_index(int(indices[self.R.randint(len(indices))]), shape)
        start = []
        for axis, (extent, patch) in enumerate(zip(shape, self.patch, strict=True)):
            room = extent - patch
            if room < 0:  # smaller than the patch: centred, padded on both sides
                start.append(room // 2)
            elif on_tumor:
                start.append(min(max(int(centre[axis]) - patch // 2, 0), room))
            else:
                start.append(int(self.R.randint(room + 1)))
        self._start = start

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = np.asarray(d[self.label_key]).shape[1:]
        indices = d.pop(self.indices_key, None)
        if indices is None:
            indices = np.flatnonzero(np.asarray(d[self.label_key])[0] == TUMOR)
        self.randomize(shape, indices)
        lower = [
            s - (c - p) // 2 for s, c, p in zip(self._start, self.size, self.patch, strict=True)
        ]
        for key in self.key_iterator(d):
            d[key] = _crop_padded(np.asarray(d[key]), lower, self.size)
        return d


class RandLabelIntensityd(Randomizable, MapTransform):
    """Scales the image inside `classes` of the label by one factor from `factors`, with
    probability `prob`, as if those tissues enhanced more or less in this patient: the raw
    intensity x becomes f * x there. On z-scored data that is floor + f * (z - floor), `floor`
    being the z-score of raw zero (the case's minimum, `FLOOR_KEY`, else the patch's). The
    region's edge is blurred (sigma one voxel) so the label gets no sharp edge of its own.
    Patch-wide brightness, contrast and gamma keep every tissue's rank; this one changes the
    tumor's and pancreas' contrast against their neighbours, which varies between patients."""

    def __init__(
        self,
        image_key: str,
        label_key: str,
        classes: Sequence[int],
        factors: Sequence[float],
        prob: float,
    ) -> None:
        MapTransform.__init__(self, (image_key,))
        self.image_key, self.label_key = image_key, label_key
        self.classes = tuple(int(c) for c in classes)
        self.factors = (float(factors[0]), float(factors[1]))
        self.prob = prob
        self._factor: float | None = None

    def randomize(self, data: Any = None) -> None:
        apply = self.R.rand() < self.prob
        self._factor = float(self.R.uniform(*self.factors)) if apply else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        floor = d.pop(FLOOR_KEY, None)
        self.randomize()
        if self._factor is None:
            return d
        region = np.isin(np.asarray(d[self.label_key])[0], self.classes)
        if not region.any():
            return d
        image = np.asarray(d[self.image_key], dtype=np.float32)
        floor = float(image.min()) if floor is None else float(floor)
        weight = ndimage.gaussian_filter(region.astype(np.float32), sigma=1.0)
        weight *= self._factor - 1.0
        d[self.image_key] = (image + weight[None] * (image - floor)).astype(np.float32)
        return d


def _crop_padded(array: np.ndarray, lower: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[:, lower:lower+size] with zeros wherever that reaches outside the array."""
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for low, extent, length in zip(lower, array.shape[1:], size, strict=True):
        begin, end = max(low, 0), min(low + length, extent)
        source.append(slice(begin, max(end, begin)))
        target.append(slice(begin - low, begin - low + max(end - begin, 0)))
    out[tuple(target)] = array[tuple(source)]
    return out


class RandRotateScaled(Randomizable, MapTransform):
    """Rotation (about z up to `in_plane_deg`, about y and x up to `out_of_plane_deg`) and an
    isotropic scale factor from `scale` (> 1 shows more context, as in nnU-Net), each with
    probability `prob`, applied about the centre and resampled straight to `patch` (one
    interpolation). Otherwise a centre crop. Labels use nearest-neighbour and stay uint8."""

    def __init__(
        self,
        keys: KeysCollection,
        patch: Sequence[int],
        prob: float,
        in_plane_deg: float,
        out_of_plane_deg: float,
        scale: Sequence[float],
        label_keys: Sequence[str] = ("label",),
    ) -> None:
        MapTransform.__init__(self, keys)
        self.patch = tuple(int(p) for p in patch)
        self.prob = prob
        self.in_plane = math.radians(in_plane_deg)
        self.out_of_plane = math.radians(out_of_plane_deg)
        self.scale = (float(scale[0]), float(scale[1]))
        self.label_keys = set(label_keys)
        self._matrix: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        matrix = np.eye(4)
        if self.R.rand() < self.prob:
            tilt = self.out_of_plane
            angles = (
                self.R.uniform(-self.in_plane, self.in_plane),
                self.R.uniform(-tilt, tilt),
                self.R.uniform(-tilt, tilt),
            )
            matrix = create_rotate(3, angles) @ matrix
        if self.R.rand() < self.prob:
            matrix = create_scale(3, [self.R.uniform(*self.scale)] * 3) @ matrix
        self._matrix = None if np.allclose(matrix, np.eye(4)) else matrix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        grid = None
        for key in self.key_iterator(d):
            array = d[key]
            if self._matrix is None:
                crop = [
                    slice((s - p) // 2, (s - p) // 2 + p)
                    for s, p in zip(array.shape[1:], self.patch, strict=True)
                ]
                d[key] = array[(slice(None), *crop)]
                continue
            volume = torch.as_tensor(np.asarray(array), dtype=torch.float32)[None]
            if grid is None:
                grid = _sampling_grid(self._matrix[:3, :3], volume.shape[2:], self.patch)
            label = key in self.label_keys
            out = nnf.grid_sample(
                volume,
                grid,
                mode="nearest" if label else "bilinear",
                padding_mode="zeros",
                align_corners=True,
            )[0]
            d[key] = out.round().to(torch.uint8) if label else out
        return d


def _sampling_grid(matrix: np.ndarray, source: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """grid_sample grid for output voxel u -> source voxel c_src + matrix (u - c_out), with
    (z, y, x) voxel axes. One grid serves image and label (MONAI's Affine rebuilds it per key)."""
    to_out = np.diag([(p - 1) / 2 for p in patch])  # normalised -> voxels (align_corners)
    to_src = np.diag([2 / max(s - 1, 1) for s in source])  # voxels -> normalised
    theta = to_src @ matrix @ to_out
    theta = theta[::-1, ::-1].copy()  # grid_sample orders coordinates x, y, z
    theta = torch.as_tensor(np.concatenate([theta, np.zeros((3, 1))], axis=1), dtype=torch.float32)
    return nnf.affine_grid(theta[None], [1, 1, *patch], align_corners=True)


def _blur_sigmas(sigma: Sequence[float], spacing: Sequence[float]) -> list[tuple[float, float]]:
    """Blur sigma per axis in voxels, scaled so each axis is blurred by the same distance in mm:
    a 3 mm slice axis gets about 1.19 / 3 of the in-plane sigma."""
    finest = min(spacing)
    return [(sigma[0] * finest / s, sigma[1] * finest / s) for s in spacing]


def train_transforms(config: TrainingConfig, plan: Plan) -> Compose:
    """Sampling + augmentation for one training patch per call, seeded with `config.seed`."""
    aug, patch = config.augmentation, tuple(plan.inference.patch_size_zyx)
    keys, p = ("image", "label"), aug.probability
    sigmas = _blur_sigmas(aug.blur_sigma, plan.preprocessing.target_spacing_zyx)
    transforms: list[Any] = [
        TumorIndicesd("label"),
        RandTumorCropd(keys, patch, context_size(patch, aug), config.sampling.tumor_fraction),
    ]
    if aug.label_intensity is not None:
        classes = [KNOWN_CLASSES.index(name) for name in aug.label_intensity_classes]
        transforms.append(
            RandLabelIntensityd(
                "image", "label", classes, aug.label_intensity, aug.label_intensity_probability
            )
        )
    transforms += [
        RandRotateScaled(
            keys,
            patch,
            prob=p,
            in_plane_deg=aug.rotation_in_plane_deg,
            out_of_plane_deg=aug.rotation_out_of_plane_deg,
            scale=aug.scale,
        ),
    ]
    if aug.elastic:
        # Smooth grid distortion: displacements up to 5% of a cell (a fifth of the patch), so
        # a thick axis moves by a fraction of a slice. MONAI's Rand3DElastic costs ~2 s a patch.
        transforms.append(
            RandGridDistortiond(
                keys,
                num_cells=5,
                prob=p,
                distort_limit=(-0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    transforms += [
        RandGaussianNoised("image", prob=p, std=aug.noise_std),
        # MONAI's sigma_x, _y, _z belong to the first, second and third array axes: our z, y, x.
        RandGaussianSmoothd(
            "image", sigma_x=sigmas[0], sigma_y=sigmas[1], sigma_z=sigmas[2], prob=p
        ),
        RandScaleIntensityd("image", factors=aug.brightness, prob=p),
        RandScaleIntensityFixedMeand(
            "image", factors=aug.contrast, fixed_mean=True, preserve_range=True, prob=p
        ),
        RandSimulateLowResolutiond("image", prob=p, zoom_range=tuple(aug.low_resolution)),
        RandAdjustContrastd("image", prob=p, gamma=tuple(aug.gamma), retain_stats=True),
    ]
    transforms += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in aug.mirror_axes]
    transforms.append(
        EnsureTyped(keys, data_type="tensor", dtype=(torch.float32, torch.uint8), track_meta=False)
    )
    compose = Compose(transforms)
    compose.set_random_state(config.seed)
    return compose
