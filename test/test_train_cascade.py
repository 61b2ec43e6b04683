"""Two stages in training: the localiser's grid and configuration, the jittered boxes the main
network trains in, the out-of-fold boxes against the truth (recall, side errors, jitter), the
out-of-fold prediction inside each case's box, and the whole workflow (`python -m training all`)
down to a two-stage model that the container loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from training_fixtures import tiny_config, tiny_setup, write_config  # noqa: F401

from pantherseg.inference.localise import Localisation, grown_box
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import Inference, Localiser, Preprocessing, load_plan
from training.__main__ import main
from training.cascade import localiser_config, localiser_spacing, measure, plausibility
from training.crossval import predict_out_of_fold
from training.data import Case, Fingerprint
from training.networks import build_network
from training.regions import RegionSampling, foreground_box, region_box

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASCADE = {"enabled": True, "localiser_voxels": 24, "localiser_patch_size_zyx": [16, 32, 32]}


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_region_boxes_grow_by_the_margin_and_jitter_within_bounds():
    box, spacing, shape = ((5, 20, 30), (9, 40, 50)), (3.0, 1.5, 1.5), (20, 80, 90)
    plain = region_box(box, spacing, shape, RegionSampling(6.0))
    assert plain == grown_box(box, spacing, 6.0, shape) == ((3, 16, 26), (11, 44, 54))
    rng = np.random.default_rng(0)
    sampling = RegionSampling(6.0, jitter_mm=4.5)
    seen = set()
    for _ in range(200):
        start, stop = region_box(box, spacing, shape, sampling, rng)
        seen.add((start, stop))
        for axis, s in enumerate(spacing):
            low = np.ceil((6.0 - 4.5) / s - 1e-9)
            high = np.ceil((6.0 + 4.5) / s - 1e-9)
            assert low <= box[0][axis] - start[axis] <= high or start[axis] == 0
            assert low <= stop[axis] - box[1][axis] <= high or stop[axis] == shape[axis]
    assert len(seen) > 50  # the sides really move
    # A jitter larger than the margin may cut into the box, but never empties it.
    tight = RegionSampling(0.0, jitter_mm=30.0)
    for _ in range(100):
        start, stop = region_box(box, spacing, shape, tight, rng)
        assert all(0 <= a < b <= n for a, b, n in zip(start, stop, shape, strict=True))


def test_foreground_box_covers_every_label():
    label = np.zeros((6, 7, 8), np.uint8)
    assert foreground_box(label) is None
    label[1, 2, 3] = 2
    label[4, 5, 6] = 1
    assert foreground_box(label) == ((1, 2, 3), (5, 6, 7))


def test_localiser_grid_is_coarse_isotropic_and_never_finer_than_the_main_one():
    fp = Fingerprint(
        case_ids=["a", "b", "c"],
        spacings_zyx=[(3.0, 1.0, 1.0)] * 3,
        shapes_after_crop_zyx=[(60, 300, 320), (70, 320, 384), (80, 340, 400)],
        foreground_intensity={},
    )
    # Median extents (210, 320, 384) mm: the longest side in 96 voxels is 4 mm.
    assert localiser_spacing(fp, (3.0, 1.0, 1.0), 96) == (4.0, 4.0, 4.0)
    assert localiser_spacing(fp, (5.0, 1.0, 1.0), 96) == (5.0, 4.0, 4.0)
    config = tiny_config(data={"labels": "tumor+pancreas"}, cascade=CASCADE)
    local = localiser_config(config)
    assert local.data.labels == "tumor+pancreas"
    assert local.validation.target == "foreground"
    assert not local.cascade.enabled and not local.cv.measure_mirroring
    assert local.network.base_features == config.cascade.localiser_base_features
    assert local.plan.patch_size_zyx == [16, 32, 32]


def _label_case(tmp_path, name: str, label: np.ndarray, spacing_xyz) -> Case:
    image = sitk.GetImageFromArray(label.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    path = tmp_path / f"{name}.mha"
    sitk.WriteImage(image, str(path))
    return Case(name, path, path)


def test_out_of_fold_boxes_are_measured_against_the_truth(tmp_path):
    """Recall is the share of tumor voxels inside the (grown) box, side errors are in mm and
    positive where the found box cuts into the truth, the jitter is their 90th percentile."""
    label = np.zeros((10, 40, 40), np.uint8)
    label[2:8, 10:30, 10:30] = 2
    label[3:6, 12:16, 12:20] = 1  # 3 x 4 x 8 = 96 tumor voxels
    spacing_xyz = (1.0, 1.0, 2.0)
    cases = {
        "cut": _label_case(tmp_path, "cut", label, spacing_xyz),
        "whole": _label_case(tmp_path, "whole", label, spacing_xyz),
        "exact": _label_case(tmp_path, "exact", label, spacing_xyz),
    }
    truth = ((2, 10, 10), (8, 30, 30))
    # The found box misses tumor columns x < 16 and the grown box too (no margin here).
    cut = ((2, 10, 16), (8, 30, 30))
    found = {
        "cut": Localisation(cut, "", 5.0, 40.0, core=cut),
        "whole": Localisation(None, "no pancreas found"),
        "exact": Localisation(truth, "", 6.0, 40.0, core=truth),
    }
    localiser = Localiser(
        preprocessing=Preprocessing(target_spacing_zyx=(4.0, 4.0, 4.0)),
        inference=Inference(
            patch_size_zyx=(16, 16, 16),
            folds=(),
            activation="softmax",
            classes=("background", "tumor", "pancreas"),
        ),
        margin_mm=0.0,
    )
    record = measure(found, cases, localiser, jitter_mm=None)
    assert record.cases["cut"]["recall"] == pytest.approx(48 / 96)  # x 16..19 of 12..19
    assert record.cases["whole"]["recall"] == 1.0  # the whole image was searched
    assert record.cases["exact"]["recall"] == 1.0
    assert record.cases["cut"]["side_errors_mm"] == [0.0, 0.0, 0.0, 0.0, 6.0, 0.0]
    assert "side_errors_mm" not in record.cases["whole"]
    assert record.recall["worst_case"] == "cut"
    assert record.recall["min"] == pytest.approx(0.5)
    assert record.recall["whole_image_fallbacks"] == 1
    errors = [0.0] * 11 + [6.0]
    assert record.jitter_mm == pytest.approx(round(float(np.percentile(errors, 90)), 2))
    assert record.jitter_measured
    fixed = measure(found, cases, localiser, jitter_mm=7.5)
    assert fixed.jitter_mm == 7.5 and not fixed.jitter_measured
    min_ml, max_mm = plausibility(list(cases.values()))
    assert min_ml == pytest.approx(round(0.1 * 6 * 20 * 20 * 2.0 / 1000, 3))
    assert max_mm == pytest.approx(1.5 * 20.0)


def test_out_of_fold_prediction_stays_in_each_cases_box(tiny):
    config = tiny_config(data={"labels": "tumor+pancreas"})
    plan = tiny.plan
    network = build_network(config.network, plan)
    case = tiny.dataset.labelled[0]
    shape = sitk.GetArrayViewFromImage(sitk.ReadImage(str(case.image))).shape
    box = ((2, 10, 12), (shape[0] - 3, shape[1] - 8, shape[2] - 10))
    splits = [{"train": [], "val": [case.case_id]}]
    [path] = predict_out_of_fold(
        plan,
        [network],
        splits,
        {case.case_id: case},
        tiny.root.parent / "oof_box_test",
        torch.device("cpu"),
        amp=False,
        progress=False,
        regions={case.case_id: box},
    )
    tumor = np.load(path)["tumor"].astype(np.float32)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(*box, strict=True))] = True
    assert tumor.shape == shape
    assert not tumor[~inside].any()
    assert tumor[inside].min() > 0  # a sigmoid is never exactly 0 where the network ran


def test_the_workflow_trains_both_stages_and_exports_a_two_stage_model(tmp_path, tiny):
    config = write_config(
        tmp_path / "cascade.yaml",
        data={"labels": "tumor+pancreas"},
        cascade=CASCADE,
        cv={"measure_mirroring": False},
    )
    work, model = tmp_path / "work", tmp_path / "model"
    code = run("all", "--data", tiny.root, "--work", work, "--out", model, "--config", config)
    assert code == 0
    local = work / "localiser"
    for name in ("plan.json", "config.yaml", "cache/cache.json", "splits.json"):
        assert (local / name).is_file(), name
    assert (local / "splits.json").read_text() == (work / "splits.json").read_text()
    for fold in (0, 1):
        assert (local / f"fold_{fold}" / "best.pt").is_file()
    cascade = json.loads((work / "cascade.json").read_text())
    annotated = {c.case_id for c in tiny.dataset.labelled}
    assert set(cascade["cases"]) == annotated
    for entry in cascade["cases"].values():
        assert (entry["box"] is None) == bool(entry["reason"])
        assert 0.0 <= entry["recall"] <= 1.0
    plan = load_plan(model)  # both stages' weights, with their sha256
    assert plan.localiser is not None
    assert [f.file for f in plan.localiser.inference.folds] == [
        "localiser_fold_0.onnx",
        "localiser_fold_1.onnx",
    ]
    assert plan.localiser.min_foreground_ml == cascade["min_foreground_ml"] > 0
    assert plan.localiser.preprocessing.target_spacing_zyx != plan.preprocessing.target_spacing_zyx
    card = (model / "README.md").read_text()
    assert "## Two stages: the localiser" in card
    assert f"worst case {cascade['recall']['worst_case']}" in card
    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["cascade"]["recall"] == cascade["recall"]
    assert "localiser_fold_0.onnx" in metadata["folds"]

    segmenter = Segmenter.from_model_dir(model, device="cpu")
    image = sitk.ReadImage(str(tiny.dataset.labelled[0].image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    result = segmenter.segment(array, tuple(reversed(image.GetSpacing())), image.GetDirection())
    assert result.mask.shape == array.shape
    assert result.localisation.box is not None or result.localisation.reason

    # Resuming trains nothing again, and the measured boxes stay.
    before = (work / "cascade.json").read_text()
    assert run("cv", "--work", work, "--resume") == 0
    assert (work / "cascade.json").read_text() == before

    # A plan that lost the localiser's limits (a run stopped between writing cascade.json and the
    # plan, or cascade.json copied into a freshly planned folder) gets them back on resuming.
    planned = json.loads((work / "plan.json").read_text())
    planned["localiser"]["min_foreground_ml"], planned["localiser"]["max_extent_mm"] = 1.0, 400.0
    (work / "plan.json").write_text(json.dumps(planned))
    assert run("cv", "--work", work, "--resume") == 0
    resumed = json.loads((work / "plan.json").read_text())["localiser"]
    assert resumed["min_foreground_ml"] == cascade["min_foreground_ml"] != 1.0
    assert resumed["max_extent_mm"] == cascade["max_extent_mm"] != 400.0


def test_two_stage_mistakes_are_clear_errors(tmp_path, tiny, capsys):
    tumor_only = write_config(tmp_path / "tumor.yaml", cascade=CASCADE)  # labels: tumor
    assert run("plan", "--data", tiny.root, "--work", tmp_path / "w1", "--config", tumor_only) == 2
    assert "needs data.labels: tumor+pancreas" in capsys.readouterr().err
    both = write_config(tmp_path / "both.yaml", data={"labels": "tumor+pancreas"}, cascade=CASCADE)
    work = tmp_path / "w2"
    assert run("plan", "--data", tiny.root, "--work", work, "--config", both) == 0
    assert run("train", "--work", work, "--fold", "0") == 2
    assert "train the localiser's folds first" in capsys.readouterr().err
    assert run("pseudo-label", "--work", work, "--out", tmp_path / "pseudo") == 2
    assert "two-stage" in capsys.readouterr().err
