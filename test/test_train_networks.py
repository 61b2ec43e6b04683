"""Networks: topology from the plan, the train/eval output contract, and ONNX export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pantherseg.inference.plan import Inference, Plan, Preprocessing
from training.config import NetworkConfig
from training.networks import (
    NETWORKS,
    build_network,
    describe_topology,
    level_features,
    network_topology,
)
from training.planner import conv_kernel_sizes

PANTHER_PATCH = (48, 192, 224)
PANTHER_SPACING = (3.0, 1.1875, 1.1875)
ISOTROPIC = [(1, 1, 1), (2, 2, 2), (2, 2, 2)]
ANISOTROPIC = [(1, 1, 1), (1, 2, 2), (2, 2, 2)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_plan(patch, spacing, activation="sigmoid", classes=("tumor",)) -> Plan:
    return Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=tuple(spacing)),
        inference=Inference(
            patch_size_zyx=tuple(patch), folds=(), activation=activation, classes=tuple(classes)
        ),
    )


def tiny(name, strides, out_channels=1, deep_supervision=True, spacing=(1.0, 1.0, 1.0)):
    torch.manual_seed(0)
    return NETWORKS[name](
        in_channels=1,
        out_channels=out_channels,
        strides=strides,
        kernel_sizes=conv_kernel_sizes(spacing, strides[1:]),
        features=level_features(len(strides), 4, 16),
        deep_supervision=deep_supervision,
        residual=True,
    )


def test_topology_isotropic_patch_pools_every_axis_until_min_size():
    strides, kernels = network_topology((16, 32, 32), (1.0, 1.0, 1.0))
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2)]  # z would drop below 4
    assert kernels == [(3, 3, 3)] * 4


def test_topology_panther_plan_pools_thick_slices_later():
    strides, kernels = network_topology(PANTHER_PATCH, PANTHER_SPACING)
    assert strides[:3] == [(1, 1, 1), (1, 2, 2), (2, 2, 2)]
    assert len(strides) == 6
    total = np.prod(np.array(strides), axis=0)
    assert all(p % t == 0 for p, t in zip(PANTHER_PATCH, total, strict=True))
    assert all(p // t >= 4 for p, t in zip(PANTHER_PATCH, total, strict=True))
    assert kernels[0] == (1, 3, 3) and kernels[1] == (3, 3, 3)


def test_topology_depth_is_honoured_or_refused():
    assert len(network_topology(PANTHER_PATCH, PANTHER_SPACING, depth=3)[0]) == 3
    with pytest.raises(ValueError, match="resolution level"):
        network_topology((8, 8, 8), (1.0, 1.0, 1.0), depth=4)
    with pytest.raises(ValueError, match="at least 2"):
        network_topology((8, 8, 8), (1.0, 1.0, 1.0), depth=1)


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("strides", [ISOTROPIC, ANISOTROPIC], ids=["isotropic", "anisotropic"])
def test_train_mode_returns_levels_finest_first_eval_returns_one_tensor(name, strides):
    net = tiny(name, strides, out_channels=2)
    x = torch.randn(2, 1, 8, 16, 16)
    net.train()
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == len(strides) - 1
    size = np.array([8, 16, 16])
    for level, output in enumerate(outputs):
        size = size // np.array(strides[level])
        assert output.shape == (2, 2, *size)
    net.eval()
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 2, 8, 16, 16)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_deep_supervision_off_returns_one_tensor_in_training(name):
    net = tiny(name, ANISOTROPIC, deep_supervision=False).train()
    out = net(torch.randn(1, 1, 8, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 8, 16, 16)
    switched = tiny(name, ANISOTROPIC, deep_supervision=True).train()
    switched.deep_supervision = False  # as before export
    assert isinstance(switched(torch.randn(1, 1, 8, 16, 16)), torch.Tensor)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_gradients_reach_every_parameter(name):
    net = tiny(name, ANISOTROPIC).train()
    outputs = net(torch.randn(1, 1, 8, 16, 16))
    sum(o.square().mean() for o in outputs).backward()
    for pname, parameter in net.named_parameters():
        assert parameter.grad is not None, pname
        assert torch.isfinite(parameter.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


def test_build_network_reads_plan_and_config():
    plan = make_plan((8, 16, 16), (3.0, 1.0, 1.0), "softmax", ("background", "tumor", "pancreas"))
    for name in NETWORKS:
        config = NetworkConfig(name=name, base_features=4, max_features=16, depth=3)
        net = build_network(config, plan).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 1, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
        assert net.deep_supervision is True
    with pytest.raises(ValueError, match="attention_unet, dynunet"):
        build_network(NetworkConfig(name="vnet"), plan)


def test_parameter_counts_at_panther_plan():
    plan = make_plan(PANTHER_PATCH, PANTHER_SPACING)
    strides, kernels = network_topology(PANTHER_PATCH, PANTHER_SPACING, depth=5)
    print()
    print(describe_topology(strides, kernels, PANTHER_PATCH, level_features(5, 32, 320)))
    counts = {}
    for name in NETWORKS:
        net = build_network(NetworkConfig(name=name, base_features=32, depth=5), plan)
        counts[name] = sum(p.numel() for p in net.parameters())
        print(f"{name}: {counts[name] / 1e6:.1f} M parameters (32 base features, 5 levels)")
    # 32..320 features over 5 levels, two 3x3x3 convolutions per block: nnU-Net-sized.
    assert 5e6 < counts["attention_unet"] < 40e6
    assert 5e6 < counts["dynunet"] < 40e6


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::torch.jit.TracerWarning"
)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnx_export_matches_torch_with_one_output(name, tmp_path):
    net = tiny(name, ANISOTROPIC, out_channels=1, spacing=(3.0, 1.0, 1.0)).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        net,
        (torch.randn(1, 1, 8, 16, 16),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["logits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 8, 16, 16)  # another batch size than exported: dynamic batch
    with torch.no_grad():
        expected = net(x).numpy()
    (actual,) = session.run(None, {"image": x.numpy()})
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-3
