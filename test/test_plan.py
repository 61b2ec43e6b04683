"""The plan file: round trip, and a clear error for every way it can be wrong."""

from __future__ import annotations

import json

import pytest
from model_factory import threshold_model_dir

from pantherseg.inference.plan import (
    PLAN_FILE,
    Inference,
    PlanError,
    describe_test_time_mirroring,
    load_plan,
    planned_test_time_axes,
    save_plan,
)


@pytest.fixture
def model_dir(tmp_path):
    return threshold_model_dir(tmp_path / "model", n_folds=2, min_component_mm3=50.0)


def edit_plan(model_dir, change) -> None:
    path = model_dir / PLAN_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip_keeps_every_setting(model_dir):
    plan = load_plan(model_dir)
    assert plan.task == "task1" and plan.input_socket == "abdominal-t1-mri"
    assert plan.preprocessing.target_spacing_zyx == (3.0, 1.5, 1.5)
    assert plan.inference.patch_size_zyx == (8, 16, 16)
    assert [f.file for f in plan.inference.folds] == ["fold_0.onnx", "fold_1.onnx"]
    assert plan.postprocessing.min_component_mm3 == 50.0
    # What version 2 added, at the defaults this model was saved with.
    assert plan.preprocessing.patient_axes_zyx == (2, 1, 0)
    assert plan.inference.gaussian_sigma_scale == 0.125 and plan.inference.precision == "float32"
    assert plan.inference.mirror_axes == () and plan.inference.test_time_mirroring is False
    assert plan.postprocessing.connectivity == 26
    assert plan.postprocessing.pancreas_guidance.pancreas_threshold == 0.5
    save_plan(plan, model_dir)
    assert load_plan(model_dir) == plan


@pytest.mark.parametrize(
    ("on", "subset", "axes", "words"),
    [
        (False, None, (), "off"),
        (True, None, (0, 1, 2), "on over z, y and x, 8 passes per tile"),
        (True, (0, 2), (0, 2), "on over z and x, 4 passes per tile"),
        (True, (1,), (1,), "on over y, 2 passes per tile"),
    ],
)
def test_the_plans_test_time_mirroring_in_axes_and_words(on, subset, axes, words):
    inference = Inference(
        (8, 16, 16), (), mirror_axes=(0, 1, 2), test_time_mirroring=on, test_time_mirror_axes=subset
    )
    assert planned_test_time_axes(inference) == axes
    assert describe_test_time_mirroring(inference) == words


def test_integer_json_numbers_are_accepted(model_dir):
    edit_plan(model_dir, lambda d: d["preprocessing"].update(target_spacing_zyx=[3, 1, 1]))
    assert load_plan(model_dir).preprocessing.target_spacing_zyx == (3.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=3), "version 3 is not supported"),
        (lambda d: d.update(version=1), "older pantherseg.*pantherseg upgrade-plan"),
        (lambda d: d.update(training={"data": "/work/x"}), "unknown top-level field.*training"),
        (lambda d: d["preprocessing"].update(patient_axes_zyx=[2, 2, 0]), "permutation"),
        (lambda d: d["inference"].update(gaussian_sigma_scale=0), "gaussian_sigma_scale"),
        (lambda d: d["inference"].update(test_time_mirroring=True), "mirror_axes"),
        (lambda d: d["inference"].update(test_time_mirroring="yes"), "true or false"),
        (
            lambda d: d["inference"].update(mirror_axes=[1, 2], test_time_mirror_axes=[1]),
            "test_time_mirroring is off",
        ),
        (
            lambda d: d["inference"].update(
                mirror_axes=[1, 2], test_time_mirroring=True, test_time_mirror_axes=[0]
            ),
            "some of the trained mirror_axes",
        ),
        (
            lambda d: d["inference"].update(
                mirror_axes=[1, 2], test_time_mirroring=True, test_time_mirror_axes=[]
            ),
            "some of the trained mirror_axes",
        ),
        (
            lambda d: d["inference"].update(
                mirror_axes=[1, 2], test_time_mirroring=True, test_time_mirror_axes=[2, 1]
            ),
            "increasing order",
        ),
        (lambda d: d["inference"].update(precision="int8"), "precision"),
        (lambda d: d["postprocessing"].update(connectivity=8), "connectivity"),
        (
            lambda d: d["postprocessing"]["pancreas_guidance"].update(pancreas_threshold=1.0),
            "pancreas_threshold",
        ),
        (lambda d: d.update(format="nnunet"), "not a plan file"),
        (lambda d: d.update(task="task3"), "task must be one of"),
        (lambda d: d["preprocessing"].update(target_spacing_zyx=[1, 1]), "target_spacing_zyx"),
        (lambda d: d["preprocessing"].update(target_spacing_zyx=[1, 0, 1]), "positive"),
        (lambda d: d["inference"].update(patch_size_zyx=[8, 16, 16.5]), "patch_size_zyx"),
        (lambda d: d["inference"].update(folds=[]), "folds"),
        (lambda d: d["inference"].update(mirror_axes=[0, 3]), "mirror_axes"),
        (lambda d: d["inference"].update(tile_step=0), "tile_step"),
        (lambda d: d["inference"].update(activation="relu"), "activation"),
        (
            lambda d: d["inference"].update(activation="sigmoid", classes=["tumor", "pancreas"]),
            "single class",
        ),
        (lambda d: d["postprocessing"].update(threshold=1.5), "threshold"),
        (lambda d: d["postprocessing"].update(colour="red"), "unknown field"),
        (lambda d: d["postprocessing"]["pancreas_guidance"].update(enabled=True), "pancreas"),
        (lambda d: d["preprocessing"]["normalization"].update(clip_percentiles=[99, 1]), "rise"),
    ],
)
def test_invalid_plans_are_refused_with_the_file_named(model_dir, change, message):
    edit_plan(model_dir, change)
    with pytest.raises(PlanError, match=message) as error:
        load_plan(model_dir)
    assert str(model_dir / PLAN_FILE) in str(error.value)


def test_missing_or_changed_weights_are_refused(model_dir):
    (model_dir / "fold_1.onnx").write_bytes(b"tampered")
    with pytest.raises(PlanError, match=r"fold_1\.onnx has sha256"):
        load_plan(model_dir)
    (model_dir / "fold_1.onnx").unlink()
    with pytest.raises(PlanError, match=r"fold_1\.onnx is missing"):
        load_plan(model_dir)
    assert load_plan(model_dir, verify_weights=False).inference.folds[1].file == "fold_1.onnx"


def test_missing_and_broken_plan_files(tmp_path):
    with pytest.raises(PlanError, match="no plan file"):
        load_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("{ not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path)
