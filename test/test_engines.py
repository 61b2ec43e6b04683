"""ONNX engines: providers, outputs, batching, and refusing models the pipeline cannot use."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pantherseg.inference import engines
from pantherseg.inference.engines import (
    EngineError,
    OnnxEngine,
    OpenVinoCompileError,
    OpenVinoEngine,
    load_engine,
    select_providers,
)
from pantherseg.inference.gpu import GpuReport
from pantherseg.inference.sliding_window import mirrored, sliding_window_predict

RNG = np.random.default_rng(1)
WEIGHT = np.array([[1.5, -0.5], [0.25, 2.0], [-1.0, 0.0]], dtype=np.float32)  # K=3, C=2
BIAS = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def conv_numpy(batch: np.ndarray, weight=WEIGHT, bias=BIAS) -> np.ndarray:
    return np.einsum("kc,bczyx->bkzyx", weight, batch) + bias[None, :, None, None, None]


def save_model(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.31 reads; onnx 1.23 would write a newer one
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_model(
    path: Path,
    batch: int | str = "batch",
    spatial=("z", "y", "x"),
    weight: np.ndarray = WEIGHT,
    bias: np.ndarray = BIAS,
    second_output: bool = False,
) -> Path:
    """A 1x1x1 convolution from C to K channels with known weights: checkable by numpy."""
    k, c = weight.shape
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, c, *spatial])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, k, *spatial])
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])]
    outputs = [y]
    if second_output:  # like a deep-supervision export
        nodes.append(helper.make_node("Relu", ["logits"], ["aux"]))
        outputs.append(
            helper.make_tensor_value_info("aux", TensorProto.FLOAT, [batch, k, *spatial])
        )
    init = [
        numpy_helper.from_array(weight.reshape(k, c, 1, 1, 1), "w"),
        numpy_helper.from_array(bias, "b"),
    ]
    return save_model(path, nodes, [x], outputs, init)


@pytest.fixture
def dynamic_model(tmp_path: Path) -> Path:
    return conv_model(tmp_path / "dynamic.onnx")


@pytest.fixture
def fixed_model(tmp_path: Path) -> Path:
    return conv_model(tmp_path / "fixed.onnx", spatial=(4, 6, 5))


@pytest.fixture(params=["onnxruntime", "openvino"])
def cpu_engine(request):
    """Each CPU engine, for what both must do alike."""
    if request.param == "openvino":
        return lambda path, threads=None: OpenVinoEngine(path, threads=threads)
    return lambda path, threads=None: OnnxEngine(path, device="cpu", threads=threads)


# --- select_providers ----------------------------------------------------------------------------


@pytest.fixture
def usable_gpu(monkeypatch):
    """The driver check says a GPU is there (this machine has none)."""
    monkeypatch.setattr(engines, "cuda_report", lambda: GpuReport(True, "Test GPU, driver 1.0"))


def test_select_providers(monkeypatch, usable_gpu) -> None:
    monkeypatch.setattr(engines, "tensorrt_installed", lambda: True)
    everything = [engines.TENSORRT, engines.CUDA, engines.CPU]
    auto = select_providers("auto", everything)
    assert [p[0] if isinstance(p, tuple) else p for p in auto] == everything
    trt_options = auto[0][1]
    # Half precision only where the plan grants it (export checked the network's fp16 parity).
    assert trt_options["trt_fp16_enable"] is False
    assert select_providers("auto", everything, allow_fp16=True)[0][1]["trt_fp16_enable"] is True
    assert trt_options["trt_engine_cache_enable"] is True
    assert trt_options["trt_engine_cache_path"]
    assert select_providers("auto", [engines.CPU]) == [engines.CPU]
    assert select_providers("auto", ["AzureExecutionProvider", engines.CPU]) == [engines.CPU]
    assert select_providers("cpu", everything) == [engines.CPU]
    assert select_providers("cuda", [engines.CUDA, engines.CPU]) == [engines.CUDA]
    cuda = select_providers("cuda", everything)
    assert engines.CPU not in cuda and len(cuda) == 2
    with pytest.raises(EngineError, match="CUDA"):
        select_providers("cuda", [engines.CPU])
    with pytest.raises(ValueError, match="unknown device"):
        select_providers("gpu", everything)


def test_tensorrt_is_skipped_without_its_library(monkeypatch, usable_gpu) -> None:
    monkeypatch.setattr(engines, "tensorrt_installed", lambda: False)
    everything = [engines.TENSORRT, engines.CUDA, engines.CPU]
    assert select_providers("auto", everything) == [engines.CUDA, engines.CPU]


# --- a working engine ----------------------------------------------------------------------------


def test_cpu_engine_matches_numpy(dynamic_model: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        engine = OnnxEngine(dynamic_model, device="cpu", threads=1)
    assert engine.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in caplog.text and str(dynamic_model) in caplog.text
    assert engine.input_name == "image"
    assert engine.in_channels == 2
    assert engine.patch_size is None
    batch = RNG.normal(size=(3, 2, 4, 5, 6)).astype(np.float32)
    out = engine(batch)
    assert out.dtype == np.float32 and out.shape == (3, 3, 4, 5, 6)
    np.testing.assert_allclose(out, conv_numpy(batch), atol=1e-5)


def test_auto_device_runs_on_cpu_here(fixed_model: Path) -> None:
    engine = OnnxEngine(fixed_model)
    assert engine.provider == "CPUExecutionProvider"
    assert engine.patch_size == (4, 6, 5)
    batch = RNG.normal(size=(2, 2, 4, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(engine(batch), conv_numpy(batch), atol=1e-5)


def test_openvino_engine_matches_numpy(dynamic_model: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        engine = OpenVinoEngine(dynamic_model, threads=1)
    assert engine.provider == "OpenVINO CPU" and not engine.on_gpu
    assert "OpenVINO CPU" in caplog.text and str(dynamic_model) in caplog.text
    assert (engine.input_name, engine.in_channels, engine.patch_size) == ("image", 2, None)
    for shape in ((3, 2, 4, 5, 6), (1, 2, 7, 3, 5)):  # a dynamic model takes any batch and patch
        batch = RNG.normal(size=shape).astype(np.float32)
        out = engine(batch)
        assert out.dtype == np.float32 and out.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(out, conv_numpy(batch), atol=1e-5)


def test_openvino_fixes_a_dynamic_batch_at_one_where_the_patch_is_fixed(
    fixed_model: Path, dynamic_model: Path
) -> None:
    """One shape to compile for; larger batches are still served, one tile at a time."""
    fixed = OpenVinoEngine(fixed_model, threads=1)
    assert fixed._fixed_batch == 1 and fixed.patch_size == (4, 6, 5)
    batch = RNG.normal(size=(3, 2, 4, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(fixed(batch), conv_numpy(batch), atol=1e-5)
    assert OpenVinoEngine(dynamic_model, threads=1)._fixed_batch is None


def test_non_contiguous_and_float64_input(fixed_model: Path, cpu_engine) -> None:
    engine = cpu_engine(fixed_model)
    batch = RNG.normal(size=(2, 2, 4, 6, 5))
    flipped = np.flip(batch, axis=4)
    np.testing.assert_allclose(engine(flipped), conv_numpy(flipped), atol=1e-5)


@pytest.mark.parametrize("fixed_batch", [1, 2])
def test_fixed_batch_model_accepts_larger_batches(
    tmp_path: Path, fixed_batch: int, cpu_engine
) -> None:
    engine = cpu_engine(conv_model(tmp_path / "b.onnx", batch=fixed_batch))
    for n in (1, 3, 4):
        batch = RNG.normal(size=(n, 2, 3, 4, 5)).astype(np.float32)
        out = engine(batch)
        assert out.shape == (n, 3, 3, 4, 5)
        np.testing.assert_allclose(out, conv_numpy(batch), atol=1e-5)


def test_engine_in_sliding_window_with_mirroring(fixed_model: Path) -> None:
    """End to end: a pointwise network is flip-equivariant, so mirrored stitching is exact."""
    engine = OnnxEngine(fixed_model, device="cpu")
    volume = RNG.normal(size=(2, 7, 13, 3)).astype(np.float32)
    out = sliding_window_predict(
        volume, mirrored(engine, (0, 1, 2)), engine.patch_size, batch_size=3
    )
    np.testing.assert_allclose(out, conv_numpy(volume[None])[0], atol=1e-5)


def test_bad_batches_are_rejected(fixed_model: Path, cpu_engine) -> None:
    engine = cpu_engine(fixed_model)
    with pytest.raises(ValueError, match="expected"):
        engine(np.zeros((1, 3, 4, 6, 5), np.float32))  # wrong channel count
    with pytest.raises(ValueError, match="the model takes"):
        engine(np.zeros((1, 2, 4, 6, 6), np.float32))  # wrong patch
    with pytest.raises(ValueError, match="expected"):
        engine(np.zeros((2, 4, 6, 5), np.float32))  # not 5D


def test_wrong_engine_output_shape_is_rejected_by_sliding_window(tmp_path: Path) -> None:
    """A model whose output is not (B, K, *patch) (here it halves x) must not be stitched."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 4, 4, 4])
    y = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 1, 4, 4, 2])
    pool = helper.make_node(
        "MaxPool", ["image"], ["pooled"], kernel_shape=[1, 1, 2], strides=[1, 1, 2]
    )
    engine = OnnxEngine(save_model(tmp_path / "pool.onnx", [pool], [x], [y]), device="cpu")
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 4, 4, 2\)"):
        sliding_window_predict(np.zeros((1, 6, 6, 6), np.float32), engine, (4, 4, 4))


# --- CUDA requested on a machine without it ------------------------------------------------------


def test_cuda_request_fails_without_cuda(dynamic_model: Path) -> None:
    if engines.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(EngineError, match="CUDA was requested but is not active") as info:
        OnnxEngine(dynamic_model, device="cuda")
    assert "onnxruntime-gpu" in str(info.value)
    assert str(dynamic_model) in str(info.value)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_an_unusable_gpu_falls_back_to_the_cpu_with_one_line(monkeypatch, caplog) -> None:
    """onnxruntime-gpu without a driver (or with one too old) would print errors on stderr; the
    driver is asked first, 'auto' runs on the CPU saying why once, 'cuda' fails saying why."""
    reason = "no NVIDIA driver in reach (libcuda.so.1 not found; docker needs --gpus all)"
    monkeypatch.setattr(engines, "cuda_report", lambda: GpuReport(False, reason))
    engines._log_once.cache_clear()
    everything = [engines.TENSORRT, engines.CUDA, engines.CPU]
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        for _ in range(3):  # three folds
            assert select_providers("auto", everything) == [engines.CPU]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"no usable GPU: {reason}; the network runs on the CPU"]
    with pytest.raises(EngineError, match="CUDA was requested but cannot run: no NVIDIA driver"):
        select_providers("cuda", everything)


def test_silent_cpu_fallback_is_caught(dynamic_model: Path, monkeypatch, usable_gpu) -> None:
    """onnxruntime falls back to the CPU when the CUDA provider cannot load; pretend it is listed
    so that the session is created with CUDA requested, and check the fallback is detected."""
    if engines.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    listed = [engines.CUDA, *ort.get_available_providers()]
    monkeypatch.setattr(engines.ort, "get_available_providers", lambda: listed)
    with pytest.raises(EngineError, match="CUDA was requested but is not active") as info:
        OnnxEngine(dynamic_model, device="cuda")
    assert "CPUExecutionProvider" in str(info.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES"):
        OnnxEngine(dynamic_model, device="cuda")


def test_unknown_device_and_bad_threads(dynamic_model: Path) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        OnnxEngine(dynamic_model, device="tpu")
    with pytest.raises(ValueError, match="threads"):
        OnnxEngine(dynamic_model, device="cpu", threads=0)


# --- models the pipeline cannot use --------------------------------------------------------------


def test_missing_file(tmp_path: Path, cpu_engine) -> None:
    path = tmp_path / "absent.onnx"
    with pytest.raises(EngineError, match="not found") as info:
        cpu_engine(path)
    assert str(path) in str(info.value)


def test_garbage_file(tmp_path: Path, cpu_engine) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00this is not a model\xff" * 50)
    with pytest.raises(EngineError, match="cannot load the model") as info:
        cpu_engine(path)
    assert str(path) in str(info.value)


def test_two_outputs(tmp_path: Path, cpu_engine) -> None:
    path = conv_model(tmp_path / "two.onnx", second_output=True)
    with pytest.raises(EngineError, match="2 outputs") as info:
        cpu_engine(path)
    assert str(path) in str(info.value) and "logits" in str(info.value)


def test_two_dimensional_model(tmp_path: Path, cpu_engine) -> None:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, "y", "x"])
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    node = helper.make_node("Conv", ["image", "w"], ["logits"], kernel_shape=[1, 1])
    path = save_model(tmp_path / "flat.onnx", [node], [x], [y], [w])
    with pytest.raises(EngineError, match="5D") as info:
        cpu_engine(path)
    assert str(path) in str(info.value)


def test_integer_input_model(tmp_path: Path, cpu_engine) -> None:
    x = helper.make_tensor_value_info("image", TensorProto.INT32, ["batch", 1, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT32, ["batch", 1, "z", "y", "x"])
    node = helper.make_node("Identity", ["image"], ["logits"])
    path = save_model(tmp_path / "int.onnx", [node], [x], [y])
    with pytest.raises(EngineError, match="float") as info:
        cpu_engine(path)
    assert str(path) in str(info.value)


# --- which engine runs the network ---------------------------------------------------------------


def test_the_cpu_runs_openvino_when_installed_and_onnxruntime_when_asked(fixed_model) -> None:
    for device in ("cpu", "auto"):  # no GPU here: auto is the CPU
        assert isinstance(load_engine(fixed_model, device), OpenVinoEngine)
        assert isinstance(load_engine(fixed_model, device, cpu_engine="openvino"), OpenVinoEngine)
        chosen = load_engine(fixed_model, device, cpu_engine="onnxruntime")
        assert isinstance(chosen, OnnxEngine) and chosen.provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="unknown CPU engine"):
        load_engine(fixed_model, "cpu", cpu_engine="tvm")
    with pytest.raises(ValueError, match="unknown device"):
        load_engine(fixed_model, "tpu")


def test_without_openvino_auto_takes_onnxruntime_and_openvino_is_an_error(
    fixed_model, monkeypatch
) -> None:
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert isinstance(load_engine(fixed_model, "cpu"), OnnxEngine)
    with pytest.raises(EngineError, match="OpenVINO is not installed") as info:
        load_engine(fixed_model, "cpu", cpu_engine="openvino")
    assert str(fixed_model) in str(info.value)


def test_a_model_openvino_cannot_compile_runs_in_onnxruntime_with_one_line(
    fixed_model, monkeypatch, caplog
) -> None:
    def refuse(self, model_path, threads=None):
        raise OpenVinoCompileError(f"{model_path}: OpenVINO cannot compile it: no such kernel")

    monkeypatch.setattr(OpenVinoEngine, "__init__", refuse)
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        engine = load_engine(fixed_model, "cpu")
    assert isinstance(engine, OnnxEngine)
    assert "OpenVINO cannot compile it: no such kernel; onnxruntime runs it instead" in caplog.text
    with pytest.raises(OpenVinoCompileError):  # asked for by name, it is an error
        load_engine(fixed_model, "cpu", cpu_engine="openvino")
