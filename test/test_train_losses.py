"""Losses on inputs whose values can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from pantherseg.inference.plan import Inference, Plan, Preprocessing
from training.config import LossConfig
from training.losses import (
    DeepSupervisedLoss,
    DiceCE,
    DiceFocalBoundaryLoss,
    build_loss,
    deep_supervision_weights,
    downsample_labels,
    signed_distance,
    tumor_slice_weights,
)
from training.networks import NETWORKS
from training.planner import conv_kernel_sizes

CLASSES3 = ("background", "tumor", "pancreas")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_plan(activation="sigmoid", classes=("tumor",), spacing=(3.0, 1.0, 1.0)) -> Plan:
    return Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=spacing),
        inference=Inference(
            patch_size_zyx=(8, 16, 16), folds=(), activation=activation, classes=classes
        ),
    )


def labels(tumor=True, pancreas=False) -> torch.Tensor:
    target = torch.zeros(2, 1, 8, 16, 16, dtype=torch.uint8)
    if pancreas:
        target[:, 0, 2:6, 3:13, 3:13] = 2
    if tumor:
        target[0, 0, 3:5, 6:10, 6:10] = 1
        target[1, 0, 4:6, 4:7, 9:12] = 1
    return target


def confident(target: torch.Tensor, channels: int = 1, sign: float = 1.0) -> torch.Tensor:
    """Logits of +-20: right (sign 1) or wrong (sign -1) about every voxel."""
    if channels == 1:
        return sign * 20.0 * (2 * (target == 1).float() - 1)
    one_hot = nnf.one_hot(target[:, 0].long(), channels).permute(0, 4, 1, 2, 3).float()
    return sign * 20.0 * (2 * one_hot - 1)


def test_perfect_prediction_is_near_the_minimum_and_wrong_is_worse():
    loss = DiceFocalBoundaryLoss(spacing=(3.0, 1.0, 1.0))
    target = labels()
    perfect = loss.components(confident(target), target)
    assert perfect["dice"] < 1e-6 and perfect["focal"] < 1e-6
    assert perfect["boundary"] < 0  # probability 1 exactly where the distance is negative
    for other in (torch.zeros(2, 1, 8, 16, 16), torch.randn(2, 1, 8, 16, 16) * 5):
        assert loss.components(other, target)["boundary"] > perfect["boundary"]
    assert loss(confident(target, sign=-1), target) > loss(torch.zeros(2, 1, 8, 16, 16), target)
    assert loss(torch.zeros(2, 1, 8, 16, 16), target) > loss(confident(target), target)


def test_dice_term_matches_hand_computation():
    loss = DiceFocalBoundaryLoss(tumor_slice_weight=1.0)
    target = labels()
    n, total = int((target == 1).sum()), target.numel()
    expected = 1 - (2 * 0.5 * n + 1) / (0.5 * total + n + 1)  # p = 0.5 everywhere, smooth 1
    dice = loss.components(torch.zeros(2, 1, 8, 16, 16), target)["dice"]
    assert dice.item() == pytest.approx(expected, rel=1e-5)


def test_focal_term_matches_the_formula():
    loss = DiceFocalBoundaryLoss(tumor_slice_weight=1.0)
    target = torch.zeros(1, 1, 1, 1, 4, dtype=torch.uint8)
    target[..., :2] = 1
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0]).reshape(1, 1, 1, 1, 4)
    p_true = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]  # tumor voxels
    p_true += [1 - 1 / (1 + math.exp(-0.5)), 1 - 1 / (1 + math.exp(3.0))]  # background
    expected = np.mean([-((1 - p) ** 2) * math.log(p) for p in p_true])
    assert loss.components(logits, target)["focal"].item() == pytest.approx(expected, rel=1e-5)


def test_softmax_focal_matches_the_formula():
    loss = DiceFocalBoundaryLoss("softmax", CLASSES3, tumor_slice_weight=1.0)
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).T.reshape(1, 3, 1, 1, 2)
    target = torch.tensor([1, 2], dtype=torch.uint8).reshape(1, 1, 1, 1, 2)
    p = torch.softmax(logits, dim=1)[0, :, 0, 0]
    p_true = [p[1, 0].item(), p[2, 1].item()]
    expected = np.mean([-((1 - q) ** 2) * math.log(q) for q in p_true])
    assert loss.components(logits, target)["focal"].item() == pytest.approx(expected, rel=1e-5)


def test_signed_distance_in_mm_negative_inside():
    mask = np.zeros((1, 1, 10), bool)
    mask[..., 4:6] = True
    line = signed_distance(mask, (1.0, 1.0, 1.0))[0, 0]
    # outside: distance to the nearest tumor voxel; inside: minus distance to background
    np.testing.assert_allclose(line * 4, [4, 3, 2, 1, -1, -1, 1, 2, 3, 4])
    dot = np.zeros((5, 5, 1), bool)
    dot[2, 2, 0] = True
    field = signed_distance(dot, (3.0, 1.0, 1.0))  # thick z: 2 slices away is 6 mm
    assert field[0, 2, 0] / field[2, 0, 0] == pytest.approx(3.0)
    assert not signed_distance(np.zeros((3, 3, 3), bool), (1, 1, 1)).any()
    assert not signed_distance(np.ones((3, 3, 3), bool), (1, 1, 1)).any()


def test_boundary_term_sign():
    loss = DiceFocalBoundaryLoss(tumor_slice_weight=1.0)
    target = torch.zeros(1, 1, 4, 16, 16, dtype=torch.uint8)
    target[0, 0, :, 6:10, 6:10] = 1
    inside = torch.full(target.shape, -20.0)
    inside[target == 1] = 20.0
    far = torch.full(target.shape, -20.0)
    far[..., 0, 0] = 20.0
    near = torch.full(target.shape, -20.0)
    near[..., 5, 6] = 20.0
    boundary = {
        k: loss.components(v, target)["boundary"].item()
        for k, v in {"inside": inside, "far": far, "near": near}.items()
    }
    assert boundary["inside"] < 0 < boundary["near"] < boundary["far"]


def test_slice_weights_change_the_loss_only_when_tumor_slices_exist():
    weights = tumor_slice_weights(labels(), 3.0)
    assert weights.shape == (2, 1, 8, 1, 1)
    assert weights[0, 0, :, 0, 0].tolist() == [1, 1, 1, 3, 3, 1, 1, 1]
    logits = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = DiceFocalBoundaryLoss(tumor_slice_weight=1.0)
    heavy = DiceFocalBoundaryLoss(tumor_slice_weight=5.0)
    empty = labels(tumor=False, pancreas=True)
    assert heavy(logits, empty).item() == pytest.approx(plain(logits, empty).item(), abs=1e-7)
    assert abs(heavy(logits, labels()).item() - plain(logits, labels()).item()) > 1e-4
    for name in ("dice", "focal", "boundary"):  # all three terms are weighted
        a = plain.components(logits, labels())[name]
        b = heavy.components(logits, labels())[name]
        assert abs(a - b) > 1e-5, name


def test_downsampling_keeps_a_single_tumor_voxel_and_prefers_tumor():
    target = labels(tumor=False, pancreas=True)
    target[0, 0, 3, 5, 5] = 1  # one tumor voxel inside the pancreas
    coarse = downsample_labels(target, (4, 8, 8))
    assert coarse.shape == (2, 1, 4, 8, 8) and coarse.dtype == target.dtype
    assert coarse[0, 0, 1, 2, 2] == 1 and int((coarse == 1).sum()) == 1
    assert (coarse == 2).any()
    assert downsample_labels(target, (8, 16, 16)) is target


def test_deep_supervision_weights_and_list_equals_weighted_sum():
    weights = deep_supervision_weights(3, 0.5)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[1] / weights[0] == pytest.approx(0.5) == weights[2] / weights[1]
    plan = make_plan(spacing=(3.0, 1.0, 1.0))
    loss = build_loss(LossConfig(), plan)
    target = labels()
    generator = torch.Generator().manual_seed(1)
    outputs = [
        torch.randn(2, 1, 8, 16, 16, generator=generator),
        torch.randn(2, 1, 8, 8, 8, generator=generator),
        torch.randn(2, 1, 4, 4, 4, generator=generator),
    ]
    spacings = [(3.0, 1.0, 1.0), (3.0, 2.0, 2.0), (6.0, 4.0, 4.0)]
    single = loss.loss
    expected = sum(
        w * single(o, downsample_labels(target, o.shape[2:]), spacing=s)
        for w, o, s in zip(weights, outputs, spacings, strict=True)
    )
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(outputs[0], target).item() == pytest.approx(single(outputs[0], target).item())
    with pytest.raises(ValueError, match="label's size"):
        loss(outputs[1:], target)


def test_softmax_three_classes():
    plan = make_plan("softmax", CLASSES3)
    target = labels(pancreas=True)
    for name in ("dice_focal_boundary", "dice_ce", "tversky_ce"):
        loss = build_loss(LossConfig(name=name), plan)
        good = loss(confident(target, 3), target)
        bad = loss(confident(target, 3, sign=-1), target)
        assert torch.isfinite(good) and good < bad
    terms = DiceFocalBoundaryLoss("softmax", CLASSES3).components(confident(target, 3), target)
    assert terms["dice"] < 1e-6 and terms["focal"] < 1e-6 and terms["boundary"] < 0


def test_pancreas_label_counts_as_background_where_not_a_class():
    target = labels(pancreas=True)
    tumor_only = labels()
    logits = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    for loss in (DiceFocalBoundaryLoss(), DiceCE()):
        assert loss(logits, target).item() == pytest.approx(loss(logits, tumor_only).item())
    two = DiceFocalBoundaryLoss("softmax", ("background", "tumor"))
    two_logits = torch.randn(2, 2, 8, 16, 16)
    assert two(two_logits, target).item() == pytest.approx(two(two_logits, tumor_only).item())


def test_dice_ce_perfect_near_zero():
    target = labels()
    loss = DiceCE()
    assert loss(confident(target), target) < 1e-4
    assert loss(confident(target, sign=-1), target) > 1.0


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_tversky_at_even_weights_is_dice_ce(activation):
    """The Tversky branch (its own cross-entropy) meets MONAI's DiceCELoss where Tversky is Dice."""
    classes = CLASSES3 if activation == "softmax" else ("tumor",)
    channels = len(classes) if activation == "softmax" else 1
    target = labels(pancreas=True)
    logits = torch.randn(2, channels, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    reference = DiceCE(activation, classes)(logits, target)
    near_even = DiceCE(activation, classes, false_negative_weight=0.5 + 1e-7)
    assert near_even.tversky is not None
    assert near_even(logits, target).item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_tversky_charges_missed_tumor_more_than_extra(activation):
    """Weight 0.7 on false negatives: missing 28 tumor voxels costs more, against adding 28
    outside, than it does with Dice (whose denominator already favours the larger mask a little;
    the cross-entropy is the same for both)."""
    classes = ("background", "tumor") if activation == "softmax" else ("tumor",)
    channels = 2 if activation == "softmax" else 1
    target = labels()
    missed, extra = target.clone(), target.clone()
    missed[0, 0, 3:5, 6:10, 6:8] = 0  # 16 of the first tumor's 32 voxels, and as many...
    missed[1, 0, 4:6, 4:7, 9:11] = 0  # ...12 of the second's 18 (28 in all)
    extra[0, 0, 3:5, 0:4, 0:2] = 1  # 16 voxels away from both tumors...
    extra[1, 0, 4:6, 0:3, 0:2] = 1  # ...and 12 more (28 in all)
    ratios = {}
    for weight in (0.5, 0.7):
        loss = DiceCE(activation, classes, false_negative_weight=weight)
        ratios[weight] = loss(confident(missed, channels), target) / loss(
            confident(extra, channels), target
        )
    assert ratios[0.7] > 1.25 * ratios[0.5] > 1.25
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        DiceCE(activation, classes, false_negative_weight=1.0)


@pytest.mark.parametrize("name", ["dice_focal_boundary", "dice_ce", "tversky_ce"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_gradients_finite_without_any_tumor(name, activation):
    classes = CLASSES3 if activation == "softmax" else ("tumor",)
    loss = build_loss(LossConfig(name=name), make_plan(activation, classes))
    channels = len(classes) if activation == "softmax" else 1
    outputs = [
        torch.randn(2, channels, 8, 16, 16, requires_grad=True),
        torch.randn(2, channels, 4, 8, 8, requires_grad=True),
    ]
    for target in (labels(tumor=False), labels(tumor=False, pancreas=True)):
        value = loss(outputs, target)
        value.backward()
        assert torch.isfinite(value)
        for output in outputs:
            assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0
            output.grad = None


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="dice_focal_boundary, dice_ce, tversky_ce"):
        build_loss(LossConfig(name="tversky"), make_plan())
    with pytest.raises(ValueError, match="background"):
        DiceFocalBoundaryLoss("softmax", ("tumor", "pancreas"))


def test_loss_trains_a_network_output_list():
    strides = [(1, 1, 1), (1, 2, 2), (2, 2, 2)]
    net = NETWORKS["attention_unet"](
        1, 1, strides, conv_kernel_sizes((3, 1, 1), strides[1:]), [4, 8, 16], True, True
    ).train()
    loss = DeepSupervisedLoss(DiceFocalBoundaryLoss(spacing=(3, 1, 1)), 0.5, (3, 1, 1))
    value = loss(net(torch.randn(2, 1, 8, 16, 16)), labels())
    value.backward()
    assert torch.isfinite(value)
