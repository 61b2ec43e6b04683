"""`pantherseg upgrade-plan`: a model exported with a version 1 plan keeps working after one
command, with its provenance moved to metadata.json and no path of the training machine left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from imaging import write_image
from model_factory import threshold_model_dir

import process
from pantherseg.cli import main as pantherseg_main
from pantherseg.inference.pipeline import mirror_axes_to_use
from pantherseg.inference.plan import PLAN_FILE, load_plan

TRAINING_V1 = {
    "fingerprint_cases": 60,
    "median_spacing_zyx": [3.0, 1.1875, 1.1875],
    "data": {"root": "/work/demo/train", "cases": 60, "synthetic": True},
    "cross_validation": {"selected": "t0.4_min1000", "folds": 3, "aggregates": {"dice": 0.65}},
    "export": {"opset": 17},
}


def version_1_model(model_dir: Path, mirror_axes: list[int]) -> Path:
    """A model folder as pantherseg 0.1 exported it: plan version 1 with a `training` section."""
    threshold_model_dir(model_dir)
    path = model_dir / PLAN_FILE
    plan = json.loads(path.read_text())
    plan["version"] = 1
    del plan["preprocessing"]["patient_axes_zyx"]
    for key in (
        "gaussian_sigma_scale",
        "test_time_mirroring",
        "test_time_mirror_axes",
        "precision",
    ):
        del plan["inference"][key]
    del plan["postprocessing"]["connectivity"]
    del plan["postprocessing"]["pancreas_guidance"]["pancreas_threshold"]
    plan["inference"]["mirror_axes"] = mirror_axes
    plan["training"] = TRAINING_V1
    path.write_text(json.dumps(plan))
    (model_dir / "metadata.json").write_text(json.dumps({"name": "pantherseg", "data": {}}))
    return model_dir


def test_a_version_1_model_is_refused_with_the_command_that_converts_it(tmp_path, capsys):
    model = version_1_model(tmp_path / "model", [])
    root = tmp_path / "input"
    image = np.random.default_rng(0).normal(100, 5, (6, 12, 12)).astype(np.float32)
    write_image(root / "images" / "abdominal-t1-mri" / "case.mha", image)
    out = tmp_path / "out"
    status = process.main(["--input", str(root), "--output", str(out), "--model", str(model)])
    err = capsys.readouterr().err
    assert status == 1 and f"pantherseg upgrade-plan {model}" in err
    assert not list(out.rglob("*.mha"))


def test_upgrade_moves_provenance_and_records_the_trained_mirror_axes(tmp_path, capsys):
    model = version_1_model(tmp_path / "model", [])
    weights = (model / "fold_0.onnx").read_bytes()
    assert pantherseg_main(["upgrade-plan", str(model), "--mirror-axes", "0", "1", "2"]) == 0
    plan = load_plan(model)
    assert plan.inference.mirror_axes == (0, 1, 2)
    assert plan.inference.test_time_mirroring is False  # version 1 did not mirror at inference
    assert plan.preprocessing.patient_axes_zyx == (2, 1, 0)
    assert "training" not in json.loads((model / PLAN_FILE).read_text())
    assert (model / "fold_0.onnx").read_bytes() == weights

    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["planning"]["fingerprint_cases"] == 60
    assert metadata["cross_validation"]["selected"] == "t0.4_min1000"
    assert metadata["export"] == {"opset": 17}
    assert metadata["data"] == {}  # the metadata's own section is kept
    assert "/work" not in (model / "metadata.json").read_text()

    # Upgrading twice is refused: the plan is current.
    assert pantherseg_main(["upgrade-plan", str(model)]) == 2
    assert "only version 1 is upgraded" in capsys.readouterr().err


def test_upgrade_keeps_inference_mirroring_and_refuses_fewer_trained_axes(tmp_path, capsys):
    model = version_1_model(tmp_path / "model", [1, 2])
    before = (model / PLAN_FILE).read_text()
    assert pantherseg_main(["upgrade-plan", str(model), "--mirror-axes", "0"]) == 2
    assert "leave out axes [1, 2]" in capsys.readouterr().err
    assert (model / PLAN_FILE).read_text() == before  # nothing written on failure
    assert pantherseg_main(["upgrade-plan", str(model)]) == 0
    plan = load_plan(model)
    assert plan.inference.mirror_axes == (1, 2) and plan.inference.test_time_mirroring is True
    assert plan.inference.test_time_mirror_axes is None  # all the trained axes, as before


def test_upgrade_keeps_the_inference_axes_when_training_flipped_more(tmp_path):
    """Version 1 mirrored y and x at inference; training flipped z too: inference still flips
    only y and x, and the plan says so."""
    model = version_1_model(tmp_path / "model", [2, 1])
    assert pantherseg_main(["upgrade-plan", str(model), "--mirror-axes", "0", "1", "2"]) == 0
    inference = load_plan(model).inference
    assert inference.mirror_axes == (0, 1, 2) and inference.test_time_mirror_axes == (1, 2)
    assert mirror_axes_to_use(inference) == (1, 2)
    assert mirror_axes_to_use(inference, "on") == (0, 1, 2)


@pytest.mark.parametrize("path", ["/work/demo/train", "/home/user/data/x.mha"])
def test_no_absolute_path_survives(path):
    from pantherseg.plan_upgrade import without_absolute_paths

    cleaned = without_absolute_paths({"a": [path, {"b": path}], "c": "relative/x", "d": 3})
    assert cleaned == {"a": [Path(path).name, {"b": Path(path).name}], "c": "relative/x", "d": 3}
