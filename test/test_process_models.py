"""process.py with a tumor + pancreas softmax model: pancreas guidance from the model's own
pancreas class, test-time mirroring as the plan says (and as --mirroring overrides), the Gaussian's
sigma from the plan.

The network is one convolution whose kernel looks one voxel further along x, so it is not
mirror-symmetric: mirroring changes its output, and a run that skipped (or forced) mirroring
writes another mask.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from imaging import write_image
from onnx import TensorProto, helper, numpy_helper

import process
from pantherseg.inference.pipeline import Segmenter, class_probabilities, is_argmax, sigmoid
from pantherseg.inference.plan import (
    FoldWeights,
    Inference,
    PancreasGuidance,
    Plan,
    Postprocessing,
    Preprocessing,
    load_plan,
    save_plan,
    sha256_of,
)
from pantherseg.inference.preprocess import normalize

SOCKET = Path("images") / "abdominal-t1-mri"
OUTPUT = Path("images") / "pancreatic-tumor-segmentation"
SPACING_XYZ = (1.5, 1.5, 3.0)
BACKGROUND, PANCREAS, TUMOR = 100.0, 250.0, 400.0


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background, a pancreas with a tumor in it, and a second bright blob far from any pancreas
    (a false positive pancreas guidance must drop)."""
    rng = np.random.default_rng(7)
    image = rng.normal(BACKGROUND, 4, (16, 48, 52)).astype(np.float32)
    image[4:12, 10:30, 8:30] = PANCREAS
    inside = np.zeros(image.shape, bool)
    inside[6:10, 15:23, 14:22] = True
    far = np.zeros(image.shape, bool)
    far[6:10, 36:44, 40:48] = True
    image[inside | far] = TUMOR
    return image, inside, far


def softmax_network(path: Path, image: np.ndarray) -> Path:
    """Logits (background, tumor, pancreas) from the z-scored intensity x of a voxel and its next
    neighbour along x, x': background 0, pancreas k(x - a), tumor 2k(x - b) + k(b - a) (so tumor
    beats pancreas exactly where x > b), each weighing x by 3/4 and x' by 1/4."""
    z = normalize(image, Preprocessing(target_spacing_zyx=(1, 1, 1)).normalization)
    nearest = np.abs(image[..., None] - np.array([BACKGROUND, PANCREAS, TUMOR])).argmin(-1)
    level = {
        v: float(np.median(z[nearest == i])) for i, v in enumerate((BACKGROUND, PANCREAS, TUMOR))
    }
    a = (level[BACKGROUND] + level[PANCREAS]) / 2
    b = (level[PANCREAS] + level[TUMOR]) / 2
    k = 6.0
    slopes = np.array([0.0, 2 * k, k], np.float32)
    biases = np.array([0.0, -2 * k * b + k * (b - a), -k * a], np.float32)
    weight = np.zeros((3, 1, 1, 1, 2), np.float32)
    weight[:, 0, 0, 0, 0] = 0.75 * slopes
    weight[:, 0, 0, 0, 1] = 0.25 * slopes
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "z", "y", "x"])
    node = helper.make_node(
        "Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 2], pads=[0, 0, 0, 0, 0, 1]
    )
    graph = helper.make_graph(
        [node],
        "softmax",
        [x],
        [y],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(biases, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("softmax")
    image, inside, far = scene()
    weights = softmax_network(root / "model" / "fold_0.onnx", image)
    plan = Plan(
        task="task1",
        # The image's own grid: no resampling, so the expected masks are easy to reason about.
        preprocessing=Preprocessing(target_spacing_zyx=tuple(reversed(SPACING_XYZ))),
        inference=Inference(
            patch_size_zyx=(8, 32, 32),
            folds=(FoldWeights(weights.name, sha256_of(weights)),),
            gaussian_sigma_scale=0.25,
            mirror_axes=(0, 1, 2),
            test_time_mirroring=True,
            activation="softmax",
            classes=("background", "tumor", "pancreas"),
        ),
        postprocessing=Postprocessing(
            threshold=0.5,
            pancreas_guidance=PancreasGuidance(enabled=True, dilation_mm=3.0, min_overlap=0.15),
        ),
    )
    save_plan(plan, root / "model")
    input_dir = root / "input"
    write_image(input_dir / SOCKET / "case.mha", image, spacing_xyz=SPACING_XYZ)
    return root / "model", input_dir, inside, far


def run_process(case, tmp_path: Path, *flags: str) -> np.ndarray:
    model, input_dir, _, _ = case
    out = tmp_path / "out"
    argv = ["--input", str(input_dir), "--output", str(out), "--model", str(model), *flags]
    assert process.main([*argv, "--device", "cpu"]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUT / "case.mha")))


def direct(case, mirroring: str) -> np.ndarray:
    model, input_dir, _, _ = case
    image = sitk.ReadImage(str(input_dir / SOCKET / "case.mha"))
    segmenter = Segmenter.from_model_dir(model, device="cpu", mirroring=mirroring)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return segmenter.segment(array, tuple(reversed(SPACING_XYZ)), image.GetDirection()).mask


def test_pancreas_guidance_keeps_the_tumor_in_the_pancreas_and_drops_the_far_blob(
    case, tmp_path, capsys, caplog
):
    _, _, inside, far = case
    caplog.set_level(logging.INFO, logger="pantherseg")
    mask = run_process(case, tmp_path).astype(bool)
    dice = 2 * (mask & inside).sum() / (mask.sum() + inside.sum())
    assert dice > 0.9
    assert not (mask & far).any()
    assert "mirroring axes [0, 1, 2]" in caplog.text  # the plan's test-time mirroring
    assert capsys.readouterr().err == ""


def test_mirroring_follows_the_plan_and_the_flag(case, tmp_path):
    on, off = direct(case, "on"), direct(case, "off")
    assert (on != off).any(), "this network must be mirror-sensitive for the test to mean much"
    np.testing.assert_array_equal(run_process(case, tmp_path / "plan"), on)  # the plan says on
    np.testing.assert_array_equal(run_process(case, tmp_path / "off", "--mirroring", "off"), off)


def changed_model(model: Path, folder: Path, **inference_changes) -> Path:
    """A copy of the model whose plan's inference section has these changes."""
    shutil.copytree(model, folder)
    plan = load_plan(folder)
    inference = dataclasses.replace(plan.inference, **inference_changes)
    save_plan(dataclasses.replace(plan, inference=inference), folder)
    return folder


def test_the_plan_may_mirror_fewer_axes_than_training_did(case, tmp_path, caplog):
    """A plan whose test-time mirroring names fewer axes flips only those (`--mirroring on`
    still flips every trained one): the network is symmetric in z and y, so flipping those alone
    gives the unmirrored mask, and flipping x alone the fully mirrored one."""
    model, input_dir, _, _ = case
    on, off = direct(case, "on"), direct(case, "off")
    for axes, expected in (((0, 1), off), ((2,), on)):
        fewer = changed_model(
            model, tmp_path / f"axes_{''.join(map(str, axes))}", test_time_mirror_axes=axes
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pantherseg"):
            mask = run_process((fewer, input_dir, None, None), fewer / "run")
        np.testing.assert_array_equal(mask, expected)
        assert f"mirroring axes {list(axes)}" in caplog.text
        forced = run_process((fewer, input_dir, None, None), fewer / "on", "--mirroring", "on")
        np.testing.assert_array_equal(forced, on)


def test_mirroring_over_axes_named_by_letters(case, tmp_path, capsys):
    """`--mirroring x` flips x alone (the fully mirrored mask: the network is symmetric in z and
    y), `--mirroring zy` z and y (the unmirrored one); axes training did not flip are refused
    with the reason, and nothing is written."""
    on, off = direct(case, "on"), direct(case, "off")
    np.testing.assert_array_equal(run_process(case, tmp_path / "x", "--mirroring", "x"), on)
    np.testing.assert_array_equal(run_process(case, tmp_path / "zy", "--mirroring", "zy"), off)
    model, input_dir, _, _ = case
    narrow = changed_model(model, tmp_path / "narrow", mirror_axes=(1, 2))
    argv = ["--input", str(input_dir), "--output", str(tmp_path / "out"), "--model", str(narrow)]
    capsys.readouterr()
    assert process.main([*argv, "--device", "cpu", "--mirroring", "zx"]) == 1
    err = capsys.readouterr().err
    assert "over zx was asked for" in err and "only the axes yx" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.mha"))


def test_the_far_blob_is_a_tumor_without_guidance(case):
    """The network itself calls the far blob tumor: guidance, not the network, removes it."""
    model, input_dir, _, far = case
    image = sitk.ReadImage(str(input_dir / SOCKET / "case.mha"))
    segmenter = Segmenter.from_model_dir(model, device="cpu", mirroring="off")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    probabilities = segmenter.probabilities(
        array, tuple(reversed(SPACING_XYZ)), image.GetDirection()
    )
    assert (probabilities["tumor"][far] > 0.5).mean() > 0.9
    assert (probabilities["pancreas"][far] < 0.5).mean() > 0.9


def test_sigmoid_is_exact_and_silent_for_any_logit():
    """1 / (1 + exp(-x)) overflows (a RuntimeWarning on stderr) below x = -88 in float32."""
    logits = np.array([-1000.0, -100.0, -88.8, -5.0, 0.0, 5.0, 100.0, 1000.0], np.float32)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # numpy warns on these
        got = sigmoid(logits)
    expected = 1 / (1 + np.exp(-np.clip(logits.astype(np.float64), -700, 700)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-38)  # float32 subnormals
    assert got.dtype == np.float32 and got[0] == 0.0 and got[-1] == 1.0


@pytest.mark.parametrize("wanted", [["tumor", "background"], ["tumor"], ["pancreas", "tumor"]])
def test_class_probabilities_are_the_softmax_of_the_logits(wanted):
    """Per class and only for the classes asked for (the first class among them or not, since
    its exponential starts the sum); large logits neither overflow nor warn."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((3, 4, 5, 6)) * 40).astype(np.float32)
    logits[:, 0] = 500.0  # all classes tied, far beyond exp's float32 range
    inference = Inference(
        patch_size_zyx=(4, 5, 6),
        folds=[],
        classes=("background", "pancreas", "tumor"),
        activation="softmax",
    )
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        got = class_probabilities(logits, inference, wanted)
    wide = logits.astype(np.float64)
    expected = np.exp(wide - wide.max(axis=0)) / np.exp(wide - wide.max(axis=0)).sum(axis=0)
    assert sorted(got) == sorted(wanted)
    for name in wanted:
        index = inference.classes.index(name)
        np.testing.assert_allclose(got[name], expected[index], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(got["tumor"][0], 1 / 3, rtol=1e-6)
    assert all(p.dtype == np.float32 for p in got.values())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_is_argmax_agrees_with_numpys_argmax_ties_included(index):
    rng = np.random.default_rng(index)
    maps = [rng.integers(0, 3, size=(7, 8, 9)).astype(np.float32) for _ in range(3)]  # many ties
    expected = np.stack(maps).argmax(axis=0) == index
    got = is_argmax(maps, index)
    np.testing.assert_array_equal(got, expected)
    assert got.any() and not got.all()
