"""Export: ONNX parity with PyTorch for both networks, no model left behind by a failed export,
plan.json with verified sha256, the model card, and the exported folder segmenting a phantom
through the same pantherseg path as the container."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from strict_json import read_strict_json
from training_fixtures import tiny_config, tiny_setup  # noqa: F401  (the `tiny` fixture)

import training.export as export_module
from pantherseg.inference.io import check_inference_image, read_image
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import (
    PLAN_FILE,
    PlanError,
    describe_test_time_mirroring,
    load_plan,
    sha256_of,
)
from training.export import ExportError, export_model
from training.networks import build_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CV = {
    "selected": "t0.5_min0",
    "folds": 2,
    "aggregates": {
        "dice": 0.7123,
        "surface_dice": 0.6042,
        "hd95": 12.5,
        "n_cases": 4,
        "by_tumor_volume": [
            {
                "band": "under 2 mL",
                "n_cases": 4,
                "dice": 0.7123,
                "surface_dice": 0.6042,
                "hd95": 12.5,
                "masd": 3.25,
            }
        ],
    },
}


def checkpoint(tmp_path, config, plan, seed, name="fold.pt"):
    torch.manual_seed(seed)
    network = build_network(config.network, plan)
    path = tmp_path / name
    torch.save({"network": network.state_dict(), "epoch": 1, "score": 0.5}, path)
    return path


def real_patches(tiny):
    """A patch of a cached case, as the CLI passes them (batch of one)."""
    from training.cache import load_cached

    image, _ = load_cached(tiny.cases[0])
    z, y, x = tiny.plan.inference.patch_size_zyx
    return [np.asarray(image[None, :, :z, :y, :x])]


@pytest.mark.parametrize("name", ["attention_unet", "dynunet"])
def test_parity_for_both_networks(tiny, tmp_path, name):
    config = tiny_config(network={"name": name})
    folds = [checkpoint(tmp_path, config, tiny.plan, seed, f"f{seed}.pt") for seed in (0, 1)]
    model = tmp_path / "model"
    exported = export_model(folds, config, tiny.plan, model, real_patches=real_patches(tiny))
    assert [f.file for f in exported.inference.folds] == ["fold_0.onnx", "fold_1.onnx"]
    recorded = json.loads((model / "metadata.json").read_text())["export"]
    absolute, relative = recorded["max_abs_difference"], recorded["max_relative_difference"]
    assert set(absolute) == set(relative) == {"fold_0.onnx", "fold_1.onnx"}
    assert all(0 <= relative[f] <= min(absolute[f], config.export.tolerance) for f in relative)
    assert recorded["opset"] == config.export.opset
    # Half precision is allowed on a GPU only when every fold's float16 logits were checked.
    half = recorded["float16_max_relative_difference"]
    assert set(half) == set(relative) and all(v > 0 for v in half.values())
    allowed = all(v <= config.export.fp16_tolerance for v in half.values())
    assert exported.inference.precision == ("float16" if allowed else "float32")
    # The exported graph is the eval-mode network: one output of the plan's patch, any batch.
    import onnx

    graph = onnx.load(str(model / "fold_0.onnx")).graph
    assert len(graph.output) == 1
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, *tiny.plan.inference.patch_size_zyx]


def test_emulated_half_precision_tracks_pytorchs_float16(tiny):
    """The emulation (float16 storage, float32 arithmetic per layer) moves the logits as much as
    PyTorch's own float16 network does, within a factor of four (measured on the shipped demo
    folds: 0.0030 against 0.0059, 0.0044 against 0.0047)."""
    torch.manual_seed(0)
    network = build_network(tiny.config.network, tiny.plan).eval()
    patches = real_patches(tiny)
    emulated = export_module.half_precision_parity(network, patches).max_relative_difference
    half = build_network(tiny.config.network, tiny.plan).eval()
    half.load_state_dict(network.state_dict())
    half = half.half()
    with torch.no_grad():
        expected = network(torch.from_numpy(patches[0])).numpy()
        pytorch = half(torch.from_numpy(patches[0]).half()).float().numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    measured = float(np.abs(pytorch - expected).max()) / scale
    assert measured / 4 <= emulated <= measured * 4


def test_half_precision_overflow_is_infinite_and_keeps_float32(tiny, tmp_path):
    """A first convolution beyond float16's 65504 (its normalisation brings float32 back to
        scale) turns into infinities and NaN logits in float16: the figure is infinite (a NaN
        difference must not pass for zero), the plan keeps float32 at any tolerance, and
    metadata.json records it as null."""
    torch.manual_seed(0)
    network = build_network(tiny.config.network, tiny.plan).eval()
    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    with torch.no_grad():
        first.weight.mul_(2e4 / float(first.weight.abs().max()))  # float16 holds the weights
    difference = export_module.half_precision_parity(network, real_patches(tiny))
    assert difference.max_relative_difference == float("inf")
    path = tmp_path / "loud.pt"
    torch.save({"network": network.state_dict()}, path)
    config = tiny_config(export={"fp16_tolerance": 1e9})
    exported = export_model([path], config, tiny.plan, tmp_path / "model")
    assert exported.inference.precision == "float32"
    # metadata.json stays strict JSON, which has no Infinity: the figure is null there.
    metadata = read_strict_json(tmp_path / "model" / "metadata.json")
    assert metadata["export"]["float16_max_relative_difference"] == {"fold_0.onnx": None}


def test_failed_parity_leaves_no_onnx_file_and_no_plan(tiny, tmp_path, monkeypatch):
    folds = [checkpoint(tmp_path, tiny.config, tiny.plan, s, f"f{s}.pt") for s in (0, 1)]
    real_export = export_module.export_onnx
    calls = []

    def perturbed_second_fold(network, plan, path, opset):
        calls.append(path.name)
        if len(calls) == 2:  # the first fold exports fine, the second one wrongly
            network = build_network(tiny.config.network, plan)
            network.load_state_dict(
                {
                    k: v + 0.05 if v.is_floating_point() else v
                    for k, v in network.state_dict().items()
                }
            )
        return real_export(network, plan, path, opset)

    monkeypatch.setattr(export_module, "export_onnx", perturbed_second_fold)
    model = tmp_path / "model"
    with pytest.raises(ExportError, match=r"fold_1\.onnx: onnxruntime differs from PyTorch by"):
        export_model(folds, tiny.config, tiny.plan, model)
    assert calls == ["fold_0.onnx", "fold_1.onnx"]
    assert not list(model.glob("*.onnx")) and not list(model.glob(".*"))
    assert not (model / PLAN_FILE).exists()


def test_a_tolerance_of_zero_fails_cleanly(tiny, tmp_path):
    config = tiny_config(export={"tolerance": 0.0})
    fold = checkpoint(tmp_path, config, tiny.plan, 0)
    # onnxruntime and PyTorch agree to float rounding, never exactly over a whole U-Net.
    with pytest.raises(ExportError, match=r"more than the tolerance 0\.0"):
        export_model([fold], config, tiny.plan, tmp_path / "model", real_patches(tiny))
    assert not list((tmp_path / "model").glob("*.onnx"))


def test_plan_card_and_the_exported_model_segment_a_phantom(tiny, tmp_path):
    plan = tiny.plan
    fold = checkpoint(tmp_path, tiny.config, plan, 0)
    model = tmp_path / "model"
    provenance = {"cross_validation": CV, "data": {"root": "/work/data/train", "cases": 4}}
    export_model([fold], tiny.config, plan, model, provenance=provenance)

    loaded = load_plan(model)  # verifies every fold's sha256
    assert loaded.inference.folds[0].sha256 == sha256_of(model / "fold_0.onnx")
    assert loaded.preprocessing == tiny.plan.preprocessing
    assert "training" not in json.loads((model / PLAN_FILE).read_text())  # the plan: inference only
    with (model / "fold_0.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(PlanError, match="sha256"):
        load_plan(model)
    export_model(
        [fold], tiny.config, plan, model, provenance=provenance
    )  # exporting again repairs it

    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["data"]["root"] == "train"  # no path of the training machine ships
    assert metadata["cross_validation"]["aggregates"]["dice"] == 0.7123
    assert metadata["folds"] == ["fold_0.onnx"] and metadata["task"] == "task1"
    assert metadata["network"]["name"] == tiny.config.network.name
    assert {"torch", "monai", "onnxruntime", "pantherseg"} <= set(metadata["versions"])
    card = (model / "README.md").read_text()
    assert "| dice | 0.7123 |" in card and "| hd95 | 12.5000 |" in card
    assert "| n_cases | 4 |" in card  # counts as counts
    assert "| under 2 mL | 4 | 0.7123 | 0.6042 | 12.5000 | 3.2500 |" in card
    assert "Intended use" in card and "not a medical device" in card.lower()
    mirroring = describe_test_time_mirroring(plan.inference)
    assert f"\n- Test-time mirroring: {mirroring} (not measured: no cross-validation).\n" in card

    segmenter = Segmenter.from_model_dir(model, device="cpu")
    path = tiny.dataset.labelled[0].image
    image = read_image(path)
    array = check_inference_image(image, path)
    result = segmenter.segment(array, tuple(reversed(image.GetSpacing())), image.GetDirection())
    assert result.mask.shape == array.shape and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask).tolist()) <= {0, 1}
