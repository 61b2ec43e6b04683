"""The model shipped for each task in models/<task>/ and its sample case in test/samples/<task>/:
the plan is the task's and loads with every fold's sha256 checked, the folder fits the 50 MB
budget, the card says what the weights are and how they score, every fold of both stages runs,
and (slow) the container's entrypoint reproduces expected_output/ from input/ with a mask of the
model's own (no fallback)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import process
from pantherseg.inference.engines import OnnxEngine, OpenVinoEngine
from pantherseg.inference.plan import TASK_SOCKETS, fold_paths, load_plan

REPO = Path(__file__).resolve().parents[1]
TASKS = ("task1", "task2")
OUTPUT_SOCKET = Path("images") / "pancreatic-tumor-segmentation"


def model(task: str) -> Path:
    return REPO / "models" / task


def sample(task: str) -> Path:
    return REPO / "test" / "samples" / task


def sample_image(task: str) -> Path:
    (image,) = sorted((sample(task) / "input" / "images" / TASK_SOCKETS[task]).glob("*.mha"))
    return image


def read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


@pytest.mark.parametrize("task", TASKS)
def test_model_loads_fits_the_budget_and_says_what_it_is(task):
    folder = model(task)
    plan = load_plan(folder)  # refuses any fold whose sha256 differs from the plan's
    assert plan.task == task and plan.input_socket == TASK_SOCKETS[task]
    assert len(plan.inference.folds) == 3
    assert plan.localiser is not None and len(plan.localiser.inference.folds) == 3
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"{folder} holds {size / 2**20:.1f} MiB"
    card = (folder / "README.md").read_text()
    assert "synthetic phantoms only" in card
    assert "## Cross-validation" in card and "## Held-out phantoms" in card
    assert "## Two stages: the localiser" in card
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["data"]["synthetic"] is True
    assert "Held-out phantoms" in metadata["evaluations"]
    assert "cross_validation" in metadata and "planning" in metadata
    # The plan is the inference contract alone: no provenance, no path of the training machine.
    text = (folder / "plan.json").read_text()
    assert "training" not in json.loads(text) and "/work" not in text
    assert "/work/" not in (folder / "metadata.json").read_text()
    assert plan.inference.mirror_axes == (0, 1, 2)  # what training flipped (the demo recipe)


@pytest.mark.parametrize("task", TASKS)
def test_every_fold_of_both_stages_runs_a_tile(task):
    folder = model(task)
    plan = load_plan(folder)
    assert plan.localiser is not None
    for inference in (plan.inference, plan.localiser.inference):
        patch = inference.patch_size_zyx
        tile = np.random.default_rng(0).normal(size=(1, 1, *patch)).astype(np.float32)
        for path in fold_paths(inference, folder):
            logits = OnnxEngine(path, device="cpu", threads=1)(tile)
            assert logits.shape == (1, len(inference.classes), *patch)
            assert np.isfinite(logits).all()
            # OpenVINO, the CPU's engine where installed, computes the same logits (within a
            # thousandth of their size: its float32 kernels sum in another order).
            scale = np.abs(logits).max()
            openvino = OpenVinoEngine(path, threads=1)(tile)
            np.testing.assert_allclose(openvino, logits, rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("task", TASKS)
def test_sample_case_is_one_job_with_its_expected_mask_and_label(task):
    image_path = sample_image(task)
    inputs = json.loads((sample(task) / "input" / "inputs.json").read_text())
    assert [entry["image"]["name"] for entry in inputs] == [image_path.name]
    assert inputs[0]["interface"]["slug"] == TASK_SOCKETS[task]
    image, _ = read(image_path)
    expected, mask = read(sample(task) / "expected_output" / OUTPUT_SOCKET / image_path.name)
    label, truth = read(sample(task) / "label" / image_path.name)
    assert same_grid(image, expected) and same_grid(image, label)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    assert (truth == 1).any()  # the sample has a tumor to find


@pytest.mark.slow
@pytest.mark.parametrize("cpu_engine", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("task", TASKS)
def test_entrypoint_reproduces_the_expected_output(tmp_path, caplog, task, cpu_engine):
    output = tmp_path / "output"
    argv = ["--input", str(sample(task) / "input"), "--output", str(output)]
    argv += ["--model", str(model(task)), "--cpu-engine", cpu_engine]
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        assert process.main([*argv, "--device", "cpu"]) == 0
    # The mask is the model's: the localiser found the pancreas and no fallback supplied it.
    assert "localiser: pancreas region of" in caplog.text
    assert "empty result avoided" not in caplog.text
    written = [p for p in output.rglob("*") if p.is_file()]
    name = sample_image(task).name
    assert written == [output / OUTPUT_SOCKET / name]
    got_image, got = read(written[0])
    expected_image, expected = read(sample(task) / "expected_output" / OUTPUT_SOCKET / name)
    assert same_grid(got_image, expected_image)
    # Identical on the CPU that wrote it; another CPU's float kernels may flip a boundary voxel.
    assert np.count_nonzero(got != expected) <= 0.001 * np.count_nonzero(expected)
