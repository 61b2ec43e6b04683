"""The model shipped in model/ and the sample case in test/: the plan loads with every fold's
sha256 checked, the folder fits the 50 MB budget, the card says what the weights are and how they
score, every fold of both stages runs, and (slow) the container's entrypoint reproduces
test/expected_output from test/input with a mask of the model's own (no fallback)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import process
from pantherseg.inference.engines import OnnxEngine
from pantherseg.inference.plan import fold_paths, load_plan

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model"
SAMPLE_INPUT = REPO / "test" / "input"
EXPECTED_OUTPUT = REPO / "test" / "expected_output"
SAMPLE_LABEL = REPO / "test" / "sample_label"
INPUT_SOCKET = Path("images") / "abdominal-t1-mri"
OUTPUT_SOCKET = Path("images") / "pancreatic-tumor-segmentation"


def sample_image() -> Path:
    (image,) = sorted((SAMPLE_INPUT / INPUT_SOCKET).glob("*.mha"))
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


def test_model_loads_fits_the_budget_and_says_what_it_is():
    plan = load_plan(MODEL)  # refuses any fold whose sha256 differs from the plan's
    assert len(plan.inference.folds) == 3
    assert plan.localiser is not None and len(plan.localiser.inference.folds) == 3
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"model/ holds {size / 2**20:.1f} MiB"
    card = (MODEL / "README.md").read_text()
    assert "synthetic phantoms only" in card
    assert "## Cross-validation" in card and "## Held-out phantoms" in card
    assert "## Two stages: the localiser" in card
    metadata = json.loads((MODEL / "metadata.json").read_text())
    assert metadata["data"]["synthetic"] is True
    assert "Held-out phantoms" in metadata["evaluations"]
    assert "cross_validation" in metadata and "planning" in metadata
    # The plan is the inference contract alone: no provenance, no path of the training machine.
    text = (MODEL / "plan.json").read_text()
    assert "training" not in json.loads(text) and "/work" not in text
    assert "/work/" not in (MODEL / "metadata.json").read_text()
    assert plan.inference.mirror_axes == (0, 1, 2)  # what training flipped (the demo recipe)


def test_every_fold_of_both_stages_runs_a_tile():
    plan = load_plan(MODEL)
    assert plan.localiser is not None
    for inference in (plan.inference, plan.localiser.inference):
        patch = inference.patch_size_zyx
        tile = np.random.default_rng(0).normal(size=(1, 1, *patch)).astype(np.float32)
        for path in fold_paths(inference, MODEL):
            logits = OnnxEngine(path, device="cpu", threads=1)(tile)
            assert logits.shape == (1, len(inference.classes), *patch)
            assert np.isfinite(logits).all()


def test_sample_case_is_one_job_with_its_expected_mask_and_label():
    image_path = sample_image()
    inputs = json.loads((SAMPLE_INPUT / "inputs.json").read_text())
    assert [entry["image"]["name"] for entry in inputs] == [image_path.name]
    assert inputs[0]["interface"]["slug"] == "abdominal-t1-mri"
    image, _ = read(image_path)
    expected, mask = read(EXPECTED_OUTPUT / OUTPUT_SOCKET / image_path.name)
    label, truth = read(SAMPLE_LABEL / image_path.name)
    assert same_grid(image, expected) and same_grid(image, label)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    assert (truth == 1).any()  # the sample has a tumor to find


@pytest.mark.slow
def test_entrypoint_reproduces_the_expected_output(tmp_path, caplog):
    output = tmp_path / "output"
    argv = ["--input", str(SAMPLE_INPUT), "--output", str(output), "--model", str(MODEL)]
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        assert process.main([*argv, "--device", "cpu"]) == 0
    # The mask is the model's: the localiser found the pancreas and no fallback supplied it.
    assert "localiser: pancreas region of" in caplog.text
    assert "empty result avoided" not in caplog.text
    written = [p for p in output.rglob("*") if p.is_file()]
    assert written == [output / OUTPUT_SOCKET / sample_image().name]
    got_image, got = read(written[0])
    expected_image, expected = read(EXPECTED_OUTPUT / OUTPUT_SOCKET / sample_image().name)
    assert same_grid(got_image, expected_image)
    # Identical on the CPU that wrote it; another CPU's float kernels may flip a boundary voxel.
    assert np.count_nonzero(got != expected) <= 0.001 * np.count_nonzero(expected)
