"""Two-stage models: a localiser on a coarse grid finds the pancreas, the region network runs on
the box it gives (grown by the margin), and a localiser that finds nothing plausible costs time,
never the tumor: the region network then runs over the whole image and the reason is logged.

The localiser is a pointwise convolution on raw intensities (no normalisation), so that it finds
nothing in an image without a bright block: background below the midpoint between the background
and pancreas levels, tumor above the one between pancreas and tumor. The region network is
test_process_models' softmax network (it looks one voxel further along x), calibrated on each
image, on the image's own grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import IDENTITY, rotation, write_image
from model_factory import pointwise_conv_model
from test_axis_order import permuted_geometry
from test_process_models import (
    BACKGROUND,
    OUTPUT,
    PANCREAS,
    SOCKET,
    SPACING_XYZ,
    TUMOR,
    scene,
    softmax_network,
)

import process
from pantherseg.inference.io import Geometry
from pantherseg.inference.localise import Localisation, grown_box, locate_foreground
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import (
    PLAN_FILE,
    FoldWeights,
    Inference,
    Localiser,
    Normalization,
    PancreasGuidance,
    Plan,
    PlanError,
    Postprocessing,
    Preprocessing,
    load_plan,
    save_plan,
    sha256_of,
)
from pantherseg.inference.preprocess import (
    grid_box_to_input,
    preprocess,
    restore,
)

SPACING_ZYX = tuple(reversed(SPACING_XYZ))  # (3.0, 1.5, 1.5): the region network's grid
COARSE_ZYX = (6.0, 3.0, 3.0)  # the localiser's grid: every block edge of scene() falls on it
CLASSES = ("background", "tumor", "pancreas")
MARGIN_MM = 6.0
MARGIN_VOXELS = (2, 4, 4)  # 6 mm on the (3, 1.5, 1.5) mm grid
OBLIQUE = rotation((0.3, -1, 0.4), 14.0)
REPO = Path(__file__).resolve().parents[1]


def weights(path: Path) -> FoldWeights:
    return FoldWeights(path.name, sha256_of(path))


def localiser_network(path: Path) -> Path:
    """Logits (background, tumor, pancreas) from the raw intensity x: background 0, pancreas
    (x - low) / 10, tumor (x - high) / 5 + (high - low) / 10, with low and high the midpoints
    between the levels (so tumor beats pancreas exactly where x > high)."""
    low, high = (BACKGROUND + PANCREAS) / 2, (PANCREAS + TUMOR) / 2
    bias = [0.0, -0.2 * high + 0.1 * (high - low), -0.1 * low]
    return pointwise_conv_model(path, [[0.0], [0.2], [0.1]], bias)


def localiser_stage(fold: FoldWeights, **options) -> Localiser:
    return Localiser(
        preprocessing=Preprocessing(
            target_spacing_zyx=COARSE_ZYX,
            normalization=Normalization(scheme="none", clip_percentiles=None),
        ),
        inference=Inference(
            patch_size_zyx=(8, 16, 16), folds=(fold,), activation="softmax", classes=CLASSES
        ),
        **{"margin_mm": MARGIN_MM, **options},
    )


def model_folder(folder: Path, image: np.ndarray, localiser: dict | None = None) -> Path:
    """A model for `image`: the region network on the image's own grid, mirrored on every axis,
    with pancreas guidance; with `localiser` (the Localiser's options) a two-stage model."""
    region = softmax_network(folder / "fold_0.onnx", image)
    stage = None
    if localiser is not None:
        stage = localiser_stage(
            weights(localiser_network(folder / "localiser_0.onnx")), **localiser
        )
    plan = Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=SPACING_ZYX),
        inference=Inference(
            patch_size_zyx=(8, 32, 32),
            folds=(weights(region),),
            gaussian_sigma_scale=0.25,
            mirror_axes=(0, 1, 2),
            test_time_mirroring=True,
            activation="softmax",
            classes=CLASSES,
        ),
        postprocessing=Postprocessing(
            threshold=0.5,
            pancreas_guidance=PancreasGuidance(enabled=True, dilation_mm=3.0, min_overlap=0.15),
        ),
        localiser=stage,
    )
    save_plan(plan, folder)
    return folder


def box_of(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    where = np.argwhere(mask)
    return tuple(int(i) for i in where.min(0)), tuple(int(i) + 1 for i in where.max(0))


def covers(box, mask: np.ndarray) -> bool:
    inside = np.zeros(mask.shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(*box, strict=True))] = True
    return bool(mask[~inside].sum() == 0)


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    mask = mask.astype(bool)
    return 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())


def expected_box(block: np.ndarray, shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The block's box grown by the margin in whole voxels, clipped to the image."""
    start, stop = box_of(block)
    return (
        tuple(max(0, a - m) for a, m in zip(start, MARGIN_VOXELS, strict=True)),
        tuple(min(n, b + m) for b, m, n in zip(stop, MARGIN_VOXELS, shape, strict=True)),
    )


class Case(NamedTuple):
    image: np.ndarray
    tumor: np.ndarray  # the tumor inside the pancreas
    far: np.ndarray  # the tumor-bright blob far from the pancreas
    block: np.ndarray  # the pancreas with its tumor: what the localiser must find
    two: Segmenter
    one: Segmenter  # the same region network without the localiser
    model: Path  # the two-stage model's folder


def make_case(root: Path, image, tumor, far) -> Case:
    block = (image > (BACKGROUND + PANCREAS) / 2) & ~far
    two = model_folder(root / "two", image, {})
    one = model_folder(root / "one", image)
    return Case(
        image,
        tumor,
        far,
        block,
        Segmenter.from_model_dir(two, device="cpu"),
        Segmenter.from_model_dir(one, device="cpu"),
        two,
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return make_case(tmp_path_factory.mktemp("cascade"), *scene())


@pytest.fixture(scope="module")
def reference(case):
    """The two-stage result on the scene as stored (identity direction), for the variants."""
    return case.two.segment(case.image, SPACING_ZYX, IDENTITY)


# 1. The two-stage result


def test_the_region_network_sees_only_the_box_and_masks_as_the_single_stage_model(
    case, reference, caplog
):
    assert reference.localisation.box == expected_box(case.block, case.image.shape)
    assert reference.localisation.reason == ""
    assert reference.localisation.foreground_ml == pytest.approx(case.block.sum() * 6.75 / 1000)
    box = reference.localisation.box
    assert not covers(box, case.far), "the far blob must lie outside the box for the test to bite"

    # Outside the box the region network did not run: the far blob has no tumor probability
    # there, where the single-stage model calls it tumor (and its guidance drops it).
    within = case.two.probabilities(case.image, SPACING_ZYX, IDENTITY, region=box)
    whole = case.one.probabilities(case.image, SPACING_ZYX, IDENTITY)
    assert covers(box, within["tumor"] > 0)
    assert (whole["tumor"][case.far] > 0.5).mean() > 0.9

    caplog.set_level(logging.INFO, logger="pantherseg")
    caplog.clear()
    single = case.one.segment(case.image, SPACING_ZYX, IDENTITY)
    assert single.localisation == Localisation(None, "single-stage model")
    assert "localiser" not in caplog.text  # a single-stage model says nothing about one
    assert dice(reference.mask, case.tumor) > 0.9
    np.testing.assert_array_equal(reference.mask, single.mask)


def run_process(model: Path, input_dir: Path, out: Path) -> sitk.Image:
    argv = ["--input", str(input_dir), "--output", str(out), "--model", str(model)]
    assert process.main([*argv, "--device", "cpu"]) == 0
    return sitk.ReadImage(str(out / OUTPUT / "case.mha"))


def test_process_writes_the_two_stage_mask_on_the_input_grid(case, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="pantherseg")
    path = write_image(
        tmp_path / "in" / SOCKET / "case.mha",
        case.image,
        spacing_xyz=SPACING_XYZ,
        origin=(-31.5, 12.25, 40.0),
        direction=OBLIQUE,
    )
    written = run_process(case.model, tmp_path / "in", tmp_path / "out")
    assert Geometry.of(written) == Geometry.of(sitk.ReadImage(str(path)))
    expected = case.one.segment(case.image, SPACING_ZYX, OBLIQUE).mask
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    assert "two stages (localiser, then region)" in caplog.text
    assert "localiser: pancreas region of" in caplog.text
    output = capsys.readouterr()
    assert "wrote" in output.out and output.err == ""


# 2. Geometry


def flipped_direction(direction, flips) -> tuple[float, ...]:
    """The direction cosines of the array flipped along `flips`: ITK index axis j is array axis
    2 - j, and flipping it reverses its column."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3).copy()
    for axis in flips:
        matrix[:, 2 - axis] *= -1
    return tuple(matrix.ravel())


def forward(array: np.ndarray, flips, order) -> np.ndarray:
    return np.ascontiguousarray(np.flip(array, flips).transpose(order))


def backward(array: np.ndarray, flips, order) -> np.ndarray:
    return np.flip(array.transpose(np.argsort(order)), flips)


def forward_box(box, shape, flips, order):
    start, stop = list(box[0]), list(box[1])
    for axis in flips:
        start[axis], stop[axis] = shape[axis] - stop[axis], shape[axis] - start[axis]
    return tuple(start[a] for a in order), tuple(stop[a] for a in order)


VARIANTS = {
    "as stored": ((), (0, 1, 2), IDENTITY),
    "oblique": ((), (0, 1, 2), OBLIQUE),
    "flipped x": ((2,), (0, 1, 2), IDENTITY),
    "flipped z and y": ((0, 1), (0, 1, 2), IDENTITY),
    "slices along x": ((), (2, 0, 1), IDENTITY),
    "oblique, flipped, permuted": ((0, 2), (1, 2, 0), OBLIQUE),
}


@pytest.mark.parametrize("flips, order, direction", VARIANTS.values(), ids=VARIANTS.keys())
def test_flips_and_axis_orders_locate_the_same_physical_voxels(
    case, reference, flips, order, direction
):
    direction, spacing_xyz = permuted_geometry(
        flipped_direction(direction, flips), SPACING_XYZ, order
    )
    spacing_zyx = tuple(reversed(spacing_xyz))
    image = forward(case.image, flips, order)
    result = case.two.segment(image, spacing_zyx, direction)
    box = result.localisation.box
    assert box == forward_box(reference.localisation.box, case.image.shape, flips, order)
    assert covers(box, forward(case.block, flips, order))
    np.testing.assert_array_equal(backward(result.mask, flips, order), reference.mask)


def test_a_pancreas_at_the_border_gets_a_clipped_box(case):
    """The scene rolled so that the pancreas touches three faces: the same histogram, so the
    same networks."""
    shift = (-4, -10, 22)
    image, tumor, far, block = (
        np.roll(a, shift, axis=(0, 1, 2)) for a in (case.image, case.tumor, case.far, case.block)
    )
    start, stop = box_of(block)
    assert start[0] == 0 and start[1] == 0 and stop[2] == image.shape[2]
    result = case.two.segment(image, SPACING_ZYX, IDENTITY)
    assert result.localisation.box == expected_box(block, image.shape)
    assert dice(result.mask, tumor) > 0.9 and not (result.mask.astype(bool) & far).any()
    np.testing.assert_array_equal(result.mask, case.one.segment(image, SPACING_ZYX, IDENTITY).mask)


def test_an_image_smaller_than_both_patches(tmp_path):
    """(6, 24, 24) voxels, under the region network's (8, 32, 32) patch; (3, 12, 12) on the
    localiser's grid, under its (8, 16, 16) patch: both networks see zero-padded volumes."""
    image, tumor, far = (a[5:11, 8:32, 6:30] for a in scene())
    assert image.shape == (6, 24, 24) and not far.any()
    small = make_case(tmp_path, image, tumor, far)
    result = small.two.segment(image, SPACING_ZYX, IDENTITY)
    assert result.localisation.box is not None
    assert covers(result.localisation.box, small.block)
    assert result.mask.shape == image.shape
    assert dice(result.mask, tumor) > 0.9
    np.testing.assert_array_equal(result.mask, small.one.segment(image, SPACING_ZYX, IDENTITY).mask)


# 3. A localiser that finds nothing plausible


IMPLAUSIBLE = {
    "too small": ({"min_foreground_ml": 100.0}, "less than the plausible 100 mL"),
    "too long": ({"max_extent_mm": 20.0}, "more than the plausible 20 mm"),
}


@pytest.mark.parametrize("options, why", IMPLAUSIBLE.values(), ids=IMPLAUSIBLE.keys())
def test_an_implausible_region_runs_the_whole_image_and_says_why(
    case, tmp_path, caplog, options, why
):
    caplog.set_level(logging.INFO, logger="pantherseg")
    model = model_folder(tmp_path / "model", case.image, options)
    found = Segmenter.from_model_dir(model, device="cpu").locate(case.image, SPACING_ZYX, IDENTITY)
    assert found.box is None and why in found.reason
    assert found.foreground_ml == pytest.approx(case.block.sum() * 6.75 / 1000)

    write_image(tmp_path / "in" / SOCKET / "case.mha", case.image, spacing_xyz=SPACING_XYZ)
    written = sitk.GetArrayFromImage(run_process(model, tmp_path / "in", tmp_path / "out"))
    assert why in caplog.text
    assert "the region network runs over the whole image" in caplog.text
    assert dice(written, case.tumor) > 0.9
    single = case.one.segment(case.image, SPACING_ZYX, IDENTITY).mask
    np.testing.assert_array_equal(written, single)


def test_the_reason_is_on_the_stdout_of_the_container_entrypoint(case, tmp_path):
    """As grand-challenge runs it: its own process, logging on stdout, nothing on stderr."""
    model = model_folder(tmp_path / "model", case.image, {"min_foreground_ml": 100.0})
    write_image(tmp_path / "in" / SOCKET / "case.mha", case.image, spacing_xyz=SPACING_XYZ)
    argv = ["--input", tmp_path / "in", "--output", tmp_path / "out", "--model", model]
    result = subprocess.run(
        [sys.executable, str(REPO / "process.py"), *map(str, argv), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "INFO localiser: the pancreas region found holds 23.76 mL" in result.stdout
    assert "the region network runs over the whole image" in result.stdout
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / OUTPUT / "case.mha")))
    assert dice(written, case.tumor) > 0.9


def test_an_image_without_a_pancreas_is_segmented_whole_and_logged(case, caplog):
    caplog.set_level(logging.INFO, logger="pantherseg")
    image = np.random.default_rng(11).normal(BACKGROUND, 4, case.image.shape).astype(np.float32)
    result = case.two.segment(image, SPACING_ZYX, IDENTITY)
    assert result.localisation.box is None
    assert result.localisation.reason == "no pancreas found"
    assert "localiser: no pancreas found; the region network runs over the whole image" in (
        caplog.text
    )
    assert result.mask.shape == image.shape


def test_locate_foreground_keeps_the_largest_component_and_those_of_comparable_size():
    localiser = localiser_stage(FoldWeights("x.onnx", "0" * 64), min_foreground_ml=0.0)
    foreground = np.zeros((6, 7, 8), bool)
    foreground[1, 1, 1] = foreground[2, 2, 2] = foreground[3, 3, 3] = True  # corners touch
    foreground[0:2, 5:7, 5:8] = True  # 12 voxels: the diagonal's 3 are a quarter of it
    found = locate_foreground(foreground, (2.0, 1.0, 0.5), localiser)
    assert found.box == ((0, 1, 1), (4, 7, 8))  # one pancreas split in two by the localiser
    assert found.foreground_ml == pytest.approx(15 * 1.0 / 1000)
    assert found.extent_mm == pytest.approx(8.0)
    strict = dataclasses.replace(localiser, component_share=0.3)
    alone = locate_foreground(foreground, (2.0, 1.0, 0.5), strict)
    assert alone.box == ((0, 5, 5), (2, 7, 8))  # a small stray blob does not widen the box
    assert alone.foreground_ml == pytest.approx(12 * 1.0 / 1000)
    assert alone.extent_mm == pytest.approx(4.0)
    foreground[0:2, 5:7, 5:8] = False
    assert locate_foreground(foreground, (2.0, 1.0, 0.5), strict).box == ((1, 1, 1), (4, 4, 4))
    nothing = locate_foreground(np.zeros((3, 3, 3), bool), (1, 1, 1), localiser)
    assert nothing.box is None and nothing.reason == "no pancreas found"


# 4. Boxes between grids


def brute_force_cover(start, stop, record) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input voxels (file order) whose footprint on the resampled grid overlaps the box:
    input voxel j of the crop spans [j, j + 1) input voxels, grid voxel i spans
    [i * n / m, (i + 1) * n / m) of them (n cropped, m resampled voxels), in exact fractions."""
    lows, highs = [], []
    for axis in range(3):
        ratio = Fraction(record.cropped_shape[axis], record.resampled_shape[axis])
        hit = [
            j
            for j in range(record.cropped_shape[axis])
            if j < stop[axis] * ratio and j + 1 > start[axis] * ratio
        ]
        lows.append(record.crop_start[axis] + hit[0])
        highs.append(record.crop_start[axis] + hit[-1] + 1)
    inverse = record.inverse_transpose
    return tuple(lows[a] for a in inverse), tuple(highs[a] for a in inverse)


RECORDS = {
    "as stored": ((), (0, 1, 2), IDENTITY),
    "flipped, slices along x": ((0, 2), (2, 0, 1), IDENTITY),
    "oblique, slices along y": ((1,), (1, 0, 2), OBLIQUE),
}


@pytest.mark.parametrize("flips, order, direction", RECORDS.values(), ids=RECORDS.keys())
def test_a_grid_box_maps_to_the_input_voxels_that_cover_it(flips, order, direction):
    image = np.zeros((13, 23, 19), np.float32)  # a zero rim: the crop is offset
    image[1:12, 2:22, 3:18] = np.random.default_rng(5).uniform(1, 2, (11, 20, 15))
    direction, spacing_xyz = permuted_geometry(
        flipped_direction(direction, flips), (1.1, 0.7, 2.5), order
    )
    settings = Preprocessing(target_spacing_zyx=(4.0, 1.7, 3.0))
    _, record = preprocess(
        forward(image, flips, order),
        tuple(reversed(spacing_xyz)),
        settings,
        direction_xyz=direction,
    )
    assert record.transpose == tuple(int(a) for a in np.argsort(order))
    assert any(c % r for c, r in zip(record.cropped_shape, record.resampled_shape, strict=True))
    intervals = [
        [(a, b) for a in range(m) for b in range(a + 1, m + 1)] for m in record.resampled_shape
    ]
    # Every interval on every axis, each with some box on the other two.
    rng = np.random.default_rng(0)
    for axis in range(3):
        for a, b in intervals[axis]:
            start, stop = [], []
            for other in range(3):
                lo, hi = (
                    (a, b)
                    if other == axis
                    else intervals[other][rng.integers(len(intervals[other]))]
                )
                start.append(lo)
                stop.append(hi)
            got = grid_box_to_input(start, stop, record)
            assert got == brute_force_cover(start, stop, record), (start, stop)


def test_a_grid_box_edge_on_an_input_voxel_edge_is_not_widened_by_float_rounding():
    """30 voxels of 1.1 mm resampled to 22 of 1.5 mm: grid voxel 11 starts exactly at input voxel
    15, but 11 * (30 / 22) is 14.999999999999998 in floating point."""
    image = np.ones((4, 4, 30), np.float32)
    _, record = preprocess(
        image,
        (1.5, 1.5, 1.1),
        Preprocessing(target_spacing_zyx=(1.5, 1.5, 1.5)),
        direction_xyz=IDENTITY,
    )
    assert record.resampled_shape == (4, 4, 22)
    start, stop = (0, 0, 11), (4, 4, 22)
    assert brute_force_cover(start, stop, record) == ((0, 0, 15), (4, 4, 30))
    assert grid_box_to_input(start, stop, record) == ((0, 0, 15), (4, 4, 30)), (
        "grid_box_to_input (preprocess.py) floors start * (cropped / resampled) in floating "
        "point, so an exact voxel edge lands one input voxel early: not the smallest cover"
    )


def test_a_region_is_normalised_as_within_the_whole_image_and_restored_in_place():
    image = np.zeros((10, 16, 14), np.float32)
    image[1:9, 1:15, 2:13] = np.random.default_rng(6).gamma(2.0, 50.0, (8, 14, 11))
    settings = Preprocessing(target_spacing_zyx=(2.0, 1.0, 1.0))  # the image's own grid
    whole, _ = preprocess(image, (2.0, 1.0, 1.0), settings, direction_xyz=IDENTITY)
    region = ((0, 4, 5), (6, 16, 9))  # reaches into the zero rim: cut to the nonzero box
    part, record = preprocess(
        image, (2.0, 1.0, 1.0), settings, direction_xyz=IDENTITY, region=region
    )
    assert (record.crop_start, record.crop_stop) == ((1, 4, 5), (6, 15, 9))
    np.testing.assert_array_equal(part, whole[0:5, 3:14, 3:7])  # whole starts at (1, 1, 2)
    back = restore(np.ones(record.resampled_shape, np.float32), record, settings.resampling)
    expected = np.zeros(image.shape, np.float32)
    expected[1:6, 4:15, 5:9] = 1.0
    np.testing.assert_array_equal(back, expected)


def test_grown_box_rounds_margins_up_and_stays_in_the_image():
    box = ((2, 3, 4), (5, 6, 7))
    # 4 mm: 2 voxels of 3 mm (1.33 up), 3 of 1.5 mm (2.67 up), 6 of 0.7 mm (5.71 up).
    assert grown_box(box, (3.0, 1.5, 0.7), 4.0, (20, 20, 20)) == ((0, 0, 0), (7, 9, 13))
    # Whole numbers of voxels stay whole despite float division (3.0 / 0.3 = 10.000000000000002).
    assert grown_box(box, (0.3, 1.5, 1.0), 3.0, (40, 40, 40)) == ((0, 1, 1), (15, 8, 10))
    # Clipped at both ends; a zero margin changes nothing.
    assert grown_box(box, (1.0, 1.0, 1.0), 10.0, (6, 8, 9)) == ((0, 0, 0), (6, 8, 9))
    assert grown_box(box, (1.0, 1.0, 1.0), 0.0, (6, 8, 9)) == box


# 5. plan.json


def test_a_two_stage_plan_round_trips_and_a_single_stage_plan_has_no_localiser_key(case):
    plan = load_plan(case.model)
    assert plan.localiser is not None and plan == case.two.plan
    assert plan.localiser.preprocessing.normalization.scheme == "none"
    data = json.loads((case.model / PLAN_FILE).read_text())
    assert data["localiser"]["margin_mm"] == MARGIN_MM
    single = json.loads((case.model.parent / "one" / PLAN_FILE).read_text())
    assert "localiser" not in single
    assert load_plan(case.model.parent / "one").localiser is None


def copy_model(case: Case, folder: Path) -> Path:
    shutil.copytree(case.model, folder)
    return folder


@pytest.mark.parametrize(
    "inference, problem",
    [
        ({"activation": "sigmoid", "classes": ("tumor",)}, "softmax"),
        ({"classes": ("background", "tumor")}, "pancreas"),
    ],
    ids=["sigmoid", "no pancreas class"],
)
def test_a_localiser_that_cannot_find_the_pancreas_is_refused(case, tmp_path, inference, problem):
    localiser = case.two.plan.localiser
    wrong = dataclasses.replace(
        localiser, inference=dataclasses.replace(localiser.inference, **inference)
    )
    plan = dataclasses.replace(case.two.plan, localiser=wrong)
    with pytest.raises(PlanError, match=f"{PLAN_FILE}: localiser: .*{problem}"):
        save_plan(plan, tmp_path)
    # The same plan written by hand (as an older or foreign tool might) is refused on load.
    folder = copy_model(case, tmp_path / "model")
    data = plan.to_json()
    (folder / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"{PLAN_FILE}: localiser: .*{problem}"):
        load_plan(folder)


def test_the_localiser_weights_are_verified(case, tmp_path):
    folder = copy_model(case, tmp_path / "model")
    (folder / "localiser_0.onnx").write_bytes(b"not the weights")
    with pytest.raises(PlanError, match=re.escape("localiser_0.onnx has sha256")):
        load_plan(folder)
    # A localiser whose weight file is missing: the error must say that it is the localiser's,
    # whatever the file is called.
    plan = case.two.plan
    moved = dataclasses.replace(
        plan.localiser,
        inference=dataclasses.replace(
            plan.localiser.inference, folds=(FoldWeights("coarse.onnx", "0" * 64),)
        ),
    )
    save_plan(dataclasses.replace(plan, localiser=moved), folder)
    with pytest.raises(PlanError, match=re.escape("coarse.onnx is missing")) as raised:
        load_plan(folder)
    message = str(raised.value).split(f"{PLAN_FILE}: ", 1)[1]  # the folder names this test
    assert "localiser" in message, (
        f"a missing localiser weight file is reported without naming the localiser: {raised.value}"
    )
