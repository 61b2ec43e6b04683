"""The planner: target spacing, patch size and pooling from a fingerprint, checked on the real
PANTHER Task 1 statistics (published by the organisers, copied to test/data) and on made-up ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pantherseg.inference.plan import load_plan, save_plan
from training.config import ConfigError, TrainingConfig
from training.data import Fingerprint
from training.planner import (
    conv_kernel_sizes,
    divisors,
    estimate_training_memory_gb,
    plan_from_fingerprint,
    plan_with_facts,
    pooling_per_axis,
    target_spacing,
)

REFERENCE = Path(__file__).parent / "data" / "panther_task1_fingerprint.json"
# What nnU-Net planned from the same fingerprint (the organisers' plans.json, 3d_fullres).
NNUNET_SPACING = (3.0, 1.1875, 1.1875)
NNUNET_PATCH = (48, 192, 224)
NNUNET_STRIDES = [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]  # without the stem
NNUNET_KERNELS = [(1, 3, 3)] + [(3, 3, 3)] * 5


@pytest.fixture(scope="module")
def real() -> Fingerprint:
    return Fingerprint.from_nnunet(json.loads(REFERENCE.read_text()))


def config(gpu_memory_gb: float = 16.0, **plan) -> TrainingConfig:
    cfg = TrainingConfig()
    cfg.plan.gpu_memory_gb = gpu_memory_gb
    for key, value in plan.items():
        setattr(cfg.plan, key, value)
    return cfg


def memory_of(plan, cfg: TrainingConfig) -> float:
    patch = plan.inference.patch_size_zyx
    strides = pooling_per_axis(patch, plan.preprocessing.target_spacing_zyx)
    return estimate_training_memory_gb(
        patch,
        strides,
        cfg.network.base_features,
        cfg.network.max_features,
        cfg.sampling.batch_size,
    )


def test_real_target_spacing_is_the_median(real):
    median = tuple(np.median(np.asarray(real.spacings_zyx), axis=0))
    assert median == NNUNET_SPACING
    plan, facts = plan_with_facts(real, config(), "task1")
    assert plan.preprocessing.target_spacing_zyx == NNUNET_SPACING
    assert facts["median_spacing_zyx"] == list(NNUNET_SPACING)
    assert facts["fingerprint_cases"] == 92


def test_real_patch_at_16_gb_is_sensible(real):
    cfg = config(16.0)
    plan, facts = plan_with_facts(real, cfg, "task1")
    patch = plan.inference.patch_size_zyx
    for ours, theirs in zip(patch, NNUNET_PATCH, strict=True):
        assert theirs / 2 <= ours <= theirs * 2
    assert memory_of(plan, cfg) <= 16.0
    assert facts["estimated_memory_gb"] == pytest.approx(memory_of(plan, cfg), abs=1e-3)
    strides = pooling_per_axis(patch, NNUNET_SPACING)
    assert facts["pooling_per_axis"] == [list(s) for s in strides]
    div = divisors(strides)
    assert all(p % d == 0 for p, d in zip(patch, div, strict=True))
    # never larger than the median case, rounded up to the divisibility
    median = facts["median_shape_zyx"]
    assert median == [72, 258, 318]
    assert all(p <= math.ceil(m / d) * d for p, m, d in zip(patch, median, div, strict=True))
    assert all(min(s) >= 4 for s in _bottom(patch, strides))


def _bottom(patch, strides):
    shape = list(patch)
    for stride in strides:
        shape = [math.ceil(n / s) for n, s in zip(shape, stride, strict=True)]
    return [shape]


def test_less_memory_gives_a_smaller_patch(real):
    big = plan_from_fingerprint(real, config(16.0), "task1").inference.patch_size_zyx
    small_plan = plan_from_fingerprint(real, config(8.0), "task1")
    small = small_plan.inference.patch_size_zyx
    assert math.prod(small) < math.prod(big)
    assert all(s <= b for s, b in zip(small, big, strict=True))
    assert memory_of(small_plan, config(8.0)) <= 8.0
    for ours, theirs in zip(small, NNUNET_PATCH, strict=True):
        assert theirs / 2 <= ours <= theirs * 2


def test_pooling_and_kernels_match_nnunet_on_its_own_patch():
    strides = pooling_per_axis(NNUNET_PATCH, NNUNET_SPACING)
    assert strides == NNUNET_STRIDES
    assert conv_kernel_sizes(NNUNET_SPACING, strides) == NNUNET_KERNELS
    assert divisors(strides) == (8, 32, 32)
    assert len(pooling_per_axis(NNUNET_PATCH, NNUNET_SPACING, max_levels=3)) == 2
    assert pooling_per_axis((4, 6, 7), (1.0, 1.0, 1.0)) == []  # nothing is large enough
    # one axis alone is pooled only while it has 12 voxels or more
    assert pooling_per_axis((4, 4, 20), (1.0, 1.0, 1.0)) == [(1, 1, 2)]
    # a kernel that has become 3 wide stays so, even where that axis is now the coarse one
    assert conv_kernel_sizes((1.0, 1.0, 1.0), [(1, 1, 2)]) == [(3, 3, 3), (3, 3, 3)]


def test_pooling_waits_for_thick_slices():
    # 5 mm slices, 0.8 mm in-plane: z joins once in-plane has been pooled to 3.2 mm (5 < 6.4).
    strides = pooling_per_axis((32, 128, 128), (5.0, 0.8, 0.8))
    assert strides == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert conv_kernel_sizes((5.0, 0.8, 0.8), strides)[:3] == [(1, 3, 3), (1, 3, 3), (3, 3, 3)]


def test_memory_estimate_behaves():
    strides = pooling_per_axis(NNUNET_PATCH, NNUNET_SPACING)
    base = estimate_training_memory_gb(NNUNET_PATCH, strides, 32, 320, 2)
    assert 6.0 < base < 10.0  # nnU-Net sized this plan for its 8 GB reference GPU
    assert estimate_training_memory_gb(NNUNET_PATCH, strides, 32, 320, 4) > base
    assert estimate_training_memory_gb(NNUNET_PATCH, strides, 16, 320, 2) < base
    assert estimate_training_memory_gb(NNUNET_PATCH, strides, 32, 512, 2) > base
    bigger = (64, 192, 224)
    assert (
        estimate_training_memory_gb(bigger, pooling_per_axis(bigger, NNUNET_SPACING), 32, 320, 2)
        > base
    )
    # pooling z at the first levels instead of later ones shrinks the big feature maps
    early = [(2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert estimate_training_memory_gb(NNUNET_PATCH, early, 32, 320, 2) < base
    with pytest.raises(ValueError, match="per-level strides"):
        estimate_training_memory_gb(NNUNET_PATCH, (3, 5, 5), 32, 320, 2)


def test_plan_does_not_depend_on_the_order_of_the_cases(real):
    """A fingerprint lists its cases in whatever order discovery gave them: the plan must come
    from the statistics alone, so the same cases listed otherwise give the same plan file."""
    n = len(real.case_ids)
    order = sorted(range(n), key=lambda i: (real.spacings_zyx[i], real.shapes_after_crop_zyx[i]))
    reordered = Fingerprint(
        case_ids=[real.case_ids[i] for i in reversed(order)],
        spacings_zyx=[real.spacings_zyx[i] for i in reversed(order)],
        shapes_after_crop_zyx=[real.shapes_after_crop_zyx[i] for i in reversed(order)],
        foreground_intensity=dict(reversed(real.foreground_intensity.items())),
    )
    # Both ends move: a planner that read the first or last case would see other values.
    assert reordered.spacings_zyx[0] != real.spacings_zyx[0]
    assert reordered.spacings_zyx[-1] != real.spacings_zyx[-1]
    assert reordered.shapes_after_crop_zyx != real.shapes_after_crop_zyx
    first = plan_from_fingerprint(real, config(), "task1")
    second = plan_from_fingerprint(reordered, config(), "task1")
    assert second == first
    assert json.dumps(second.to_json()) == json.dumps(first.to_json())


def test_overrides(real):
    plan = plan_from_fingerprint(
        real, config(target_spacing_zyx=[2.0, 1.0, 1.0], patch_size_zyx=[32, 128, 160]), "task2"
    )
    assert plan.preprocessing.target_spacing_zyx == (2.0, 1.0, 1.0)
    assert plan.inference.patch_size_zyx == (32, 128, 160)
    assert plan.task == "task2" and plan.input_socket == "abdominal-t2-mri"
    with pytest.raises(ConfigError, match=r"patch_size_zyx \[50, 128, 160\].*divisible"):
        plan_from_fingerprint(real, config(patch_size_zyx=[50, 128, 160]), "task1")
    with pytest.raises(ConfigError, match="3 positive numbers"):
        plan_from_fingerprint(real, config(patch_size_zyx=[0, 128, 160]), "task1")
    with pytest.raises(ConfigError, match="whole numbers"):
        plan_from_fingerprint(real, config(patch_size_zyx=[32.5, 128, 160]), "task1")
    with pytest.raises(ConfigError, match="target_spacing_zyx"):
        plan_from_fingerprint(real, config(target_spacing_zyx=[3.0, 1.0]), "task1")
    with pytest.raises(ConfigError, match="task must be one of"):
        plan_from_fingerprint(real, config(), "task3")


def test_memory_budget_too_small_is_an_error(real):
    with pytest.raises(ConfigError, match=r"gpu_memory_gb 0\.5 is too small"):
        plan_from_fingerprint(real, config(0.5), "task1")


def _made_up(spacings, shape=(40, 300, 300)) -> Fingerprint:
    n = len(spacings)
    return Fingerprint(
        case_ids=[f"c{i}" for i in range(n)],
        spacings_zyx=spacings,
        shapes_after_crop_zyx=[shape] * n,
        foreground_intensity={},
    )


def test_anisotropic_thick_axis_takes_the_10th_percentile():
    rng = np.random.default_rng(0)
    z = [4.0, 4.4, 4.6, 4.8, 5.0, 5.0, 5.0, 5.0, 5.5, 6.0, 6.5]
    inplane = rng.uniform(0.7, 0.9, len(z))
    fp = _made_up([(zz, float(s), float(s)) for zz, s in zip(z, inplane, strict=True)])
    spacing = target_spacing(fp, anisotropy_threshold=3.0)
    assert spacing[0] == pytest.approx(np.percentile(z, 10))
    assert spacing[0] < np.median(z)
    assert spacing[1] == spacing[2] == pytest.approx(np.median(inplane))
    relaxed = target_spacing(fp, anisotropy_threshold=10.0)  # not anisotropic enough: median
    assert relaxed[0] == np.median(z)
    plan = plan_from_fingerprint(fp, config(anisotropy_threshold=3.0), "task1")
    assert plan.preprocessing.target_spacing_zyx == spacing
    assert plan.preprocessing.resampling.anisotropy_threshold == 3.0


def test_label_modes_and_normalisation_settings(real):
    cfg = config(clip_percentiles=None, nonzero_only=True)
    assert cfg.data.labels == "tumor+pancreas"  # the default
    plan = plan_from_fingerprint(real, cfg, "task1")
    assert plan.inference.activation == "softmax"
    assert plan.inference.classes == ("background", "tumor", "pancreas")
    assert plan.preprocessing.normalization.clip_percentiles is None
    assert plan.preprocessing.normalization.nonzero_only is True
    tumor_only = config(clip_percentiles=[1.0, 99.0])
    tumor_only.data.labels = "tumor"
    binary = plan_from_fingerprint(real, tumor_only, "task1")
    assert (binary.inference.activation, binary.inference.classes) == ("sigmoid", ("tumor",))
    assert binary.preprocessing.normalization.clip_percentiles == (1.0, 99.0)
    assert binary.inference.folds == ()


def test_plan_saves_and_loads_without_folds(real, tmp_path):
    plan = plan_from_fingerprint(real, config(), "task1")
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path, verify_weights=False) == plan


def test_depth_limits_the_pooling(real):
    cfg = config()
    cfg.network.depth = 4
    _, facts = plan_with_facts(real, cfg, "task1")
    assert len(facts["pooling_per_axis"]) == 3
    assert len(facts["conv_kernel_sizes"]) == 4


@settings(max_examples=25, deadline=None)
@given(
    z=st.floats(1.0, 6.0),
    inplane=st.floats(0.5, 2.0),
    shape=st.tuples(st.integers(8, 120), st.integers(8, 500), st.integers(8, 500)),
    budget=st.floats(4.0, 40.0),
)
def test_any_plan_is_valid_and_fits(z, inplane, shape, budget):
    fp = _made_up([(z, inplane, inplane), (z * 1.05, inplane * 0.95, inplane)], shape)
    cfg = config(budget)
    plan, facts = plan_with_facts(fp, cfg, "task1")
    patch = plan.inference.patch_size_zyx
    strides = pooling_per_axis(patch, plan.preprocessing.target_spacing_zyx)
    div = divisors(strides)
    assert all(p % d == 0 for p, d in zip(patch, div, strict=True))
    assert memory_of(plan, cfg) <= budget
    median = facts["median_shape_zyx"]
    assert all(
        p <= max(8, math.ceil(m / d) * d) for p, m, d in zip(patch, median, div, strict=True)
    )


def test_cases_stored_in_another_axis_order_are_planned_in_the_common_one():
    """A sagittally stored case (array axes along x, y, z) counts with its thick slices on the
    plan's slice axis, as preprocessing will transpose it; the plan takes the common order."""
    axial = [(3.0, 1.0, 1.0)] * 2
    stored_x_first = (1.0, 1.0, 3.0)  # the same physical grid, array axes reversed
    fp = Fingerprint(
        case_ids=["a", "b", "c"],
        spacings_zyx=[*axial, stored_x_first],
        shapes_after_crop_zyx=[(40, 200, 220), (40, 200, 220), (220, 200, 40)],
        foreground_intensity={},
        patient_axes_zyx=[(2, 1, 0), (2, 1, 0), (0, 1, 2)],
    )
    plan, facts = plan_with_facts(fp, config(), "task1")
    assert plan.preprocessing.patient_axes_zyx == (2, 1, 0)
    assert plan.preprocessing.target_spacing_zyx == (3.0, 1.0, 1.0)
    assert facts["median_shape_zyx"] == [40, 200, 220]
    # Mostly x-first: the plan keeps that order (those cases are not transposed at all).
    flipped = Fingerprint(
        case_ids=fp.case_ids,
        spacings_zyx=[stored_x_first, stored_x_first, (3.0, 1.0, 1.0)],
        shapes_after_crop_zyx=[(220, 200, 40)] * 2 + [(40, 200, 220)],
        foreground_intensity={},
        patient_axes_zyx=[(0, 1, 2), (0, 1, 2), (2, 1, 0)],
    )
    plan = plan_from_fingerprint(flipped, config(), "task1")
    assert plan.preprocessing.patient_axes_zyx == (0, 1, 2)
    assert plan.preprocessing.target_spacing_zyx == (1.0, 1.0, 3.0)


def test_fingerprint_axis_orders_round_trip_and_default_to_axial():
    fp = _made_up([(3.0, 1.0, 1.0)])
    assert fp.patient_axes_zyx == [(2, 1, 0)]  # nnU-Net's fingerprint records no directions
    again = Fingerprint.from_json(json.loads(json.dumps(fp.to_json())))
    assert again == fp
    with pytest.raises(ValueError, match="permutation"):
        Fingerprint(["a"], [(1, 1, 1)], [(4, 4, 4)], {}, patient_axes_zyx=[(0, 0, 1)])
