"""From a dataset fingerprint to a plan: target spacing, patch size, network pooling, and the
settings inference will read.

The rules follow nnU-Net's reasoning (written afresh here): train at the median spacing, except on
a strongly anisotropic thick axis, where the 10th percentile keeps more of the through-plane
detail; make the patch as large as the median case but no larger than what fits the GPU, giving
up the axis with the longest physical extent first so that the patch's field of view stays as
close to a cube in millimetres as the memory allows; pool an axis only while it is large enough
and not much coarser than the finest one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pantherseg.inference.plan import (
    TASK_SOCKETS,
    Inference,
    Normalization,
    Plan,
    Preprocessing,
    Resampling,
    plan_from_json,
)
from pantherseg.inference.preprocess import resampled_shape
from training.config import ConfigError, TrainingConfig
from training.data import Fingerprint

log = logging.getLogger(__name__)

DEFAULT_MAX_LEVELS = 6  # resolution levels, full resolution included: 5 poolings
MIN_FEATURE_MAP = 4  # voxels per axis at the bottom of the U-Net
MIN_PATCH_AXIS = 2 * MIN_FEATURE_MAP  # the planner never shrinks an axis below this
ANISOTROPIC_POOLING_RATIO = 2.0  # an axis this much coarser than the finest is not pooled yet
THICK_AXIS_PERCENTILE = 10.0

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Network topology
# --------------------------------------------------------------------------------------------


def pooling_per_axis(
    patch_size: Sequence[int], spacing: Sequence[float], max_levels: int = DEFAULT_MAX_LEVELS
) -> list[Triple]:
    """The stride (z, y, x) of each downsampling step of a U-Net on this patch and spacing.

    One entry per pooling, finest first; the full-resolution stem is not listed (MONAI's
    DynUNet wants `[(1, 1, 1)] + pooling_per_axis(...)` as its `strides`). `max_levels` counts
    resolution levels like `network.depth`, the full-resolution one included, so there are at
    most `max_levels - 1` poolings.

    At each step an axis is pooled (stride 2) when it still has at least 8 voxels, so that it
    keeps at least 4 at the bottom, and when its current spacing is less than twice the finest
    spacing among such axes: thick slices wait until in-plane pooling has caught up with them.
    Stride 1 otherwise. A level that would pool a single axis needs at least 12 voxels on it,
    else the pooling stops.
    """
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ValueError("patch_size and spacing must have 3 entries (z, y, x)")
    size = [int(s) for s in patch_size]
    current = [float(s) for s in spacing]
    strides: list[Triple] = []
    for _ in range(max_levels - 1):
        large = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not large:
            break
        finest = min(current[a] for a in large)
        pooled = [a for a in large if current[a] < ANISOTROPIC_POOLING_RATIO * finest]
        if len(pooled) == 1 and size[pooled[0]] < 3 * MIN_FEATURE_MAP:
            break  # a level for one short axis alone adds cost and little context
        strides.append(tuple(2 if a in pooled else 1 for a in range(3)))
        for a in pooled:
            size[a] = math.ceil(size[a] / 2)  # a stride-2 convolution's output size
            current[a] *= 2
    return strides


def divisors(strides: Sequence[Sequence[int]]) -> Triple:
    """What each patch axis must be divisible by for these strides (2 ** poolings)."""
    out = [1, 1, 1]
    for stride in strides:
        for axis in range(3):
            out[axis] *= int(stride[axis])
    return tuple(out)


def conv_kernel_sizes(spacing: Sequence[float], strides: Sequence[Sequence[int]]) -> list[Triple]:
    """Convolution kernel per level (len(strides) + 1 entries, stem first): 1 on an axis while
    it is at least twice as coarse as the finest at that level, where a 3-voxel kernel would mix
    slices too far apart to be related; 3 otherwise, and 3 from then on."""
    current = [float(s) for s in spacing]
    wide = [False, False, False]
    kernels: list[Triple] = []
    for level in range(len(strides) + 1):
        finest = min(current)
        wide = [w or current[a] < ANISOTROPIC_POOLING_RATIO * finest for a, w in enumerate(wide)]
        kernels.append(tuple(3 if w else 1 for w in wide))
        if level < len(strides):
            current = [c * s for c, s in zip(current, strides[level], strict=True)]
    return kernels


def _as_strides(pooling: Sequence) -> list[Triple]:
    """Per-level strides, checked: a bare count per axis would not say at which level each axis
    is pooled, and that changes the memory several-fold."""
    strides = []
    for stride in pooling:
        if not isinstance(stride, Sequence) or len(stride) != 3:
            raise ValueError(
                f"pooling must be per-level strides (z, y, x) as pooling_per_axis() returns, "
                f"got {list(pooling)!r}"
            )
        strides.append(tuple(int(s) for s in stride))
    return strides


def estimate_training_memory_gb(
    patch: Sequence[int],
    pooling_per_axis: Sequence,
    base_features: int,
    max_features: int,
    batch: int,
) -> float:
    """GPU memory (GB, 1e9 bytes) for training a plain 3D U-Net on this patch, at its peak.

    `pooling_per_axis` is the list of per-level strides that `pooling_per_axis()` returns.
    Assumptions (nnU-Net's plain U-Net; heavier blocks, e.g. residual or attention ones, need
    more, so give them a smaller `plan.gpu_memory_gb`):
    - one resolution level per pooling plus the full-resolution one; features
      `base_features * 2**level`, capped at `max_features`; 3x3x3 kernels everywhere;
    - encoder level: 2 x (convolution, instance norm, leaky ReLU in place); decoder level:
      transposed-convolution upsampling, concatenation with the skip, the same 2 convolutions;
      deep-supervision heads and the loss are negligible (a few channels);
    - mixed precision (CUDA autocast to fp16; instance norm is not among the ops autocast runs
      in fp32): each convolution layer keeps its fp16 output for the norm's backward and the
      norm's fp16 output for the ReLU and the next convolution, 4 bytes per element; the
      decoder's concatenation keeps 2 x 2 bytes per element of a level's feature map (the
      upsampled tensor itself is freed once concatenated);
    - the backward pass adds, at its peak, gradients at full resolution: 8 bytes per element
      of the largest feature map;
    - weights: fp32 weights, gradients and two Adam moments (16 bytes per parameter);
    - 1 GB for the CUDA context and cuDNN workspaces, and 10% of the activations for the
      allocator's fragmentation.
    Checked on the CPU (fp32, saved-for-backward tensors of such a network): the element count
    is within 10% of what autograd keeps. For nnU-Net's 48 x 192 x 224 patch at batch 2 it gives
    about 7.5 GB, in line with nnU-Net sizing that plan for its 8 GB reference GPU.
    """
    strides = _as_strides(pooling_per_axis)
    shape = [int(p) for p in patch]
    features, voxels = [], []
    for level in range(len(strides) + 1):
        if level > 0:
            shape = [math.ceil(n / s) for n, s in zip(shape, strides[level - 1], strict=True)]
        features.append(min(base_features * 2**level, max_features))
        voxels.append(math.prod(shape))
    elements = [f * v for f, v in zip(features, voxels, strict=True)]
    conv_layer, concatenation = 4, 4  # bytes kept per element of a level's feature map
    encoder = sum(2 * conv_layer * e for e in elements)
    decoder = sum((concatenation + 2 * conv_layer) * e for e in elements[:-1])
    backward_peak = 8 * elements[0]
    activations = batch * (encoder + decoder + backward_peak)

    parameters = 27 * 1 * features[0]  # the first convolution reads one channel
    for level, f in enumerate(features):
        parameters += 27 * f * f  # encoder's second convolution
        if level > 0:
            parameters += 27 * features[level - 1] * f  # encoder's first convolution
            parameters += math.prod(strides[level - 1]) * f * features[level - 1]  # upsampling
            parameters += 27 * 2 * features[level - 1] * features[level - 1]  # decoder conv 1
            parameters += 27 * features[level - 1] * features[level - 1]  # decoder conv 2
    weights = 16 * parameters
    return (1.1 * activations + weights) / 1e9 + 1.0


# --------------------------------------------------------------------------------------------
# Spacing and patch size
# --------------------------------------------------------------------------------------------


def target_spacing(fp: Fingerprint, anisotropy_threshold: float) -> tuple[float, float, float]:
    """Per-axis median spacing; on a strongly anisotropic thick axis its 10th percentile instead,
    so that most cases are not downsampled across slices (never finer than the in-plane)."""
    spacings = np.asarray(fp.spacings_zyx, dtype=np.float64)
    target = np.median(spacings, axis=0)
    thick = int(np.argmax(target))
    if target[thick] / target.min() > anisotropy_threshold:
        others = [target[a] for a in range(3) if a != thick]
        target[thick] = max(np.percentile(spacings[:, thick], THICK_AXIS_PERCENTILE), max(others))
    return tuple(float(t) for t in target)


def _divisible(
    patch: Sequence[int], spacing: Sequence[float], max_levels: int, up: bool
) -> tuple[Triple, list[Triple]]:
    """The patch rounded (up or down) to what its own pooling needs, and that pooling.

    Rounding can change the pooling, so it repeats until the two agree; the sizes only move in
    one direction, so this ends.
    """
    patch = tuple(int(p) for p in patch)
    for _ in range(4 * max_levels + 4):
        strides = pooling_per_axis(patch, spacing, max_levels)
        div = divisors(strides)
        if up:
            rounded = tuple(math.ceil(p / d) * d for p, d in zip(patch, div, strict=True))
        else:
            rounded = tuple(max(d, p // d * d) for p, d in zip(patch, div, strict=True))
        if rounded == patch:
            return patch, strides
        patch = rounded
    raise RuntimeError(f"patch size {patch} did not settle")  # unreachable: sizes are monotone


def _fit_patch(
    median_shape: Triple,
    spacing: Sequence[float],
    config: TrainingConfig,
    max_levels: int,
) -> tuple[Triple, list[Triple], float]:
    """The median shape, then smaller, one axis step at a time, until the estimate fits."""
    budget = float(config.plan.gpu_memory_gb)

    def memory(patch: Triple, strides: list[Triple]) -> float:
        return estimate_training_memory_gb(
            patch,
            strides,
            config.network.base_features,
            config.network.max_features,
            config.sampling.batch_size,
        )

    patch, strides = _divisible(median_shape, spacing, max_levels, up=True)
    estimate = memory(patch, strides)
    while estimate > budget:
        shrinkable = [a for a in range(3) if patch[a] > MIN_PATCH_AXIS]
        if not shrinkable:
            raise ConfigError(
                f"plan.gpu_memory_gb {budget} is too small: even a {patch} patch needs about "
                f"{estimate:.1f} GB by the estimate (lower sampling.batch_size or "
                "network.base_features)"
            )
        # The longest side in mm goes first; ties go to the axis most above the median shape.
        axis = max(
            shrinkable,
            key=lambda a: (round(patch[a] * spacing[a], 6), patch[a] / median_shape[a], a),
        )
        step = divisors(strides)[axis]
        smaller = list(patch)
        smaller[axis] = max(MIN_PATCH_AXIS, patch[axis] - step)
        patch, strides = _divisible(smaller, spacing, max_levels, up=False)
        estimate = memory(patch, strides)
    return patch, strides, estimate


def _checked_triple(values: Sequence, kind: type, name: str) -> tuple:
    ok = isinstance(values, list | tuple) and len(values) == 3
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not ok or not all(v > 0 for v in values):
        raise ConfigError(f"{name} must be 3 positive numbers (z, y, x), got {values!r}")
    if kind is int and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"{name} must be whole numbers of voxels, got {values!r}")
    return tuple(kind(v) for v in values)


def _override_patch(
    values: Sequence, spacing: Sequence[float], max_levels: int
) -> tuple[Triple, list[Triple]]:
    patch = _checked_triple(values, int, "plan.patch_size_zyx")
    strides = pooling_per_axis(patch, spacing, max_levels)
    div = divisors(strides)
    if any(p % d for p, d in zip(patch, div, strict=True)):
        near, _ = _divisible(patch, spacing, max_levels, up=False)
        raise ConfigError(
            f"plan.patch_size_zyx {list(patch)}: with its poolings {div} (z, y, x) every axis "
            f"must be divisible by 2 ** poolings; {list(near)} would be"
        )
    return patch, strides


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def _median_int(values: np.ndarray) -> Triple:
    return tuple(math.ceil(m - 1e-9) for m in np.median(values, axis=0))


def plan_from_fingerprint(fp: Fingerprint, config: TrainingConfig, task: str) -> Plan:
    """A plan without weights yet (folds are filled in at export); see `plan_with_facts`."""
    return plan_with_facts(fp, config, task)[0]


def plan_with_facts(
    fp: Fingerprint, config: TrainingConfig, task: str
) -> tuple[Plan, dict[str, Any]]:
    """A plan without weights yet (folds are filled in at export), from a fingerprint and the
    training configuration, and the planner's figures behind it (medians, memory estimate,
    topology) for the model card. Deterministic: the same inputs give the same plan."""
    if task not in TASK_SOCKETS:
        raise ConfigError(f"task must be one of {list(TASK_SOCKETS)}, got {task!r}")
    settings = config.plan
    axes = fp.common_axis_order()
    fp = fp.in_axis_order(axes)  # as preprocessing will transpose every case
    if settings.target_spacing_zyx is not None:
        spacing = _checked_triple(settings.target_spacing_zyx, float, "plan.target_spacing_zyx")
    else:
        spacing = target_spacing(fp, settings.anisotropy_threshold)
    median_spacing = tuple(float(s) for s in np.median(np.asarray(fp.spacings_zyx), axis=0))
    resampled = np.array(
        [
            resampled_shape(shape, case_spacing, spacing)
            for shape, case_spacing in zip(fp.shapes_after_crop_zyx, fp.spacings_zyx, strict=True)
        ]
    )
    median_shape = _median_int(resampled)
    depth = config.network.depth
    max_levels = DEFAULT_MAX_LEVELS if depth is None else int(depth)
    if max_levels < 2:
        raise ConfigError(f"network.depth must be at least 2 levels, got {depth}")

    if settings.patch_size_zyx is not None:
        patch, strides = _override_patch(settings.patch_size_zyx, spacing, max_levels)
        estimate = estimate_training_memory_gb(
            patch,
            strides,
            config.network.base_features,
            config.network.max_features,
            config.sampling.batch_size,
        )
        if estimate > settings.gpu_memory_gb:
            log.warning(
                "patch %s needs about %.1f GB by the estimate, more than plan.gpu_memory_gb %s",
                patch,
                estimate,
                settings.gpu_memory_gb,
            )
    else:
        patch, strides, estimate = _fit_patch(median_shape, spacing, config, max_levels)

    if config.data.labels == "tumor":
        activation, classes = "sigmoid", ("tumor",)
    elif config.data.labels == "tumor+pancreas":
        activation, classes = "softmax", ("background", "tumor", "pancreas")
    else:
        raise ConfigError(
            f"data.labels must be 'tumor' or 'tumor+pancreas', not {config.data.labels!r}"
        )
    clip = settings.clip_percentiles
    plan = Plan(
        task=task,
        preprocessing=Preprocessing(
            target_spacing_zyx=spacing,
            patient_axes_zyx=axes,
            crop_to_nonzero=True,
            normalization=Normalization(
                scheme="zscore",
                clip_percentiles=None if clip is None else tuple(float(c) for c in clip),
                nonzero_only=bool(settings.nonzero_only),
            ),
            resampling=Resampling(anisotropy_threshold=float(settings.anisotropy_threshold)),
        ),
        inference=Inference(
            patch_size_zyx=patch,
            folds=(),
            tile_step=float(config.validation.tile_step),
            # Test-time mirroring may flip what training flipped; cross-validation decides
            # whether it does by default.
            mirror_axes=tuple(sorted(config.augmentation.mirror_axes)),
            batch_size=int(config.validation.batch_size),
            activation=activation,
            classes=classes,
        ),
    )
    # What inference will load must be a valid plan; find out here rather than after training.
    plan_from_json(json.loads(json.dumps(plan.to_json())), Path("<planned>"), require_folds=False)
    facts = {
        "fingerprint_cases": len(fp.case_ids),
        "median_spacing_zyx": list(median_spacing),
        "median_shape_zyx": list(median_shape),  # after crop, at the target spacing
        "estimated_memory_gb": round(estimate, 3),
        "gpu_memory_gb": float(settings.gpu_memory_gb),
        "batch_size": int(config.sampling.batch_size),
        "pooling_per_axis": [list(s) for s in strides],
        "conv_kernel_sizes": [list(k) for k in conv_kernel_sizes(spacing, strides)],
        "labels": config.data.labels,
    }
    return plan, facts
