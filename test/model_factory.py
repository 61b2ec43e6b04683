"""Small ONNX networks and model folders for tests, built without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pantherseg.inference.plan import (
    FoldWeights,
    Inference,
    Plan,
    Postprocessing,
    Preprocessing,
    save_plan,
    sha256_of,
)


def pointwise_conv_model(
    path: Path,
    weight: np.ndarray,
    bias: np.ndarray,
    patch: tuple[int, int, int] | None = None,
) -> Path:
    """A 1x1x1 convolution from C to K channels: output = weight @ input + bias at every voxel.

    Its output at a voxel depends on that voxel alone, which makes stitching checkable exactly.
    """
    weight = np.asarray(weight, dtype=np.float32)
    k, c = weight.shape
    spatial = list(patch) if patch else ["z", "y", "x"]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", c, *spatial])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k, *spatial])
    w = numpy_helper.from_array(weight.reshape(k, c, 1, 1, 1), "w")
    b = numpy_helper.from_array(np.asarray(bias, dtype=np.float32).reshape(k), "b")
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])
    graph = helper.make_graph([node], "pointwise", [x], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def threshold_model_dir(
    model_dir: Path,
    target_spacing_zyx=(3.0, 1.5, 1.5),
    patch=(8, 16, 16),
    n_folds: int = 1,
    task: str = "task1",
    **postprocessing,
) -> Path:
    """A model folder whose network calls a voxel tumor when its z-scored intensity exceeds 1:
    logit = 8 * (x - 1). Enough to drive the whole pipeline to a predictable mask."""
    folds = []
    for fold in range(n_folds):
        path = pointwise_conv_model(model_dir / f"fold_{fold}.onnx", [[8.0]], [-8.0], patch)
        folds.append(FoldWeights(path.name, sha256_of(path)))
    plan = Plan(
        task=task,
        preprocessing=Preprocessing(target_spacing_zyx=tuple(target_spacing_zyx)),
        inference=Inference(patch_size_zyx=tuple(patch), folds=tuple(folds)),
        postprocessing=Postprocessing(**postprocessing),
    )
    save_plan(plan, model_dir)
    return model_dir
