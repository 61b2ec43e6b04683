"""Cross-validation: the saved split, the post-processing variants, and the choice among them on
hand-made out-of-fold predictions whose best variant is known."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from pantherseg.inference.plan import Inference, Plan, Preprocessing
from pantherseg.inference.postprocess import postprocess
from pantherseg.scoring import metrics
from training.config import TrainingConfig
from training.crossval import (
    SplitError,
    _score_case_variants,
    candidate_settings,
    load_or_make_splits,
    make_splits,
    select_postprocessing,
)
from training.data import Case

IDS = [f"case_{i:02d}" for i in range(11)]


def test_every_case_is_validated_exactly_once():
    splits = make_splits(IDS, 5, seed=0)
    assert len(splits) == 5
    validated = [c for split in splits for c in split["val"]]
    assert sorted(validated) == IDS
    for split in splits:
        assert sorted(split["train"] + split["val"]) == IDS
        assert not set(split["train"]) & set(split["val"])
        assert len(split["val"]) in (2, 3)  # as even as 11 / 5 allows


def test_splits_are_deterministic_and_seeded():
    assert make_splits(IDS, 5, seed=0) == make_splits(list(reversed(IDS)), 5, seed=0)
    assert make_splits(IDS, 5, seed=0) != make_splits(IDS, 5, seed=1)


def test_bad_fold_counts_and_duplicates_are_errors():
    with pytest.raises(SplitError, match="between 2 and 11"):
        make_splits(IDS, 12, seed=0)
    with pytest.raises(SplitError, match="between 2"):
        make_splits(IDS, 1, seed=0)
    with pytest.raises(SplitError, match="unique"):
        make_splits([*IDS, IDS[0]], 2, seed=0)


def test_split_is_saved_reloaded_and_checked_against_the_dataset(tmp_path):
    path = tmp_path / "splits.json"
    first = load_or_make_splits(path, IDS, 3, seed=4)
    assert json.loads(path.read_text()) == first
    # Reloaded as saved, even when asked with another seed (the file is the record).
    assert load_or_make_splits(path, list(reversed(IDS)), 3, seed=99) == first
    with pytest.raises(SplitError, match="remove it"):
        load_or_make_splits(path, [*IDS, "case_new"], 3, seed=4)
    with pytest.raises(SplitError, match="remove it"):
        load_or_make_splits(path, IDS[:-1], 3, seed=4)
    with pytest.raises(SplitError, match="fold count"):
        load_or_make_splits(path, IDS, 4, seed=4)


def make_plan(classes=("tumor",), activation="sigmoid") -> Plan:
    return Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=(1.0, 1.0, 1.0)),
        inference=Inference(
            patch_size_zyx=(8, 8, 8), folds=(), activation=activation, classes=classes
        ),
    )


def config_with(thresholds, sizes) -> TrainingConfig:
    config = TrainingConfig()
    config.cv = dataclasses.replace(config.cv, thresholds=thresholds, min_component_mm3=sizes)
    return config


def test_candidate_settings_names_and_variants():
    config = config_with([0.4, 0.6], [0.0, 50.0])
    candidates = candidate_settings(config, make_plan())
    assert len(candidates) == 2 * 2 * 2  # threshold x size x never-empty
    assert set(candidates) == {
        f"t{t}_min{m}{suffix}"
        for t in ("0.4", "0.6")
        for m in ("0", "50")
        for suffix in ("", "_allow-empty")
    }
    chosen = candidates["t0.6_min50_allow-empty"]
    assert (chosen.threshold, chosen.min_component_mm3, chosen.never_empty) == (0.6, 50.0, False)
    assert not chosen.pancreas_guidance.enabled

    three_class = make_plan(("background", "tumor", "pancreas"), "softmax")
    candidates = candidate_settings(config, three_class)
    assert len(candidates) == 16  # and with or without pancreas guidance
    guided = candidates["t0.4_min0_pancreas"]
    assert guided.pancreas_guidance.enabled and guided.never_empty
    defaults = three_class.postprocessing.pancreas_guidance
    assert guided.pancreas_guidance.dilation_mm == defaults.dilation_mm


def write_known_case(folder, case_id, rng, shape=(24, 32, 32)):
    """A labelled cube tumor and its probability map: 0.65 inside the tumor, 0.55 in a shell
    around it, a 27 mm^3 blob of 0.65 far away, 0.1 elsewhere. Threshold 0.6 with a 100 mm^3
    minimum component reproduces the label exactly; lower thresholds add the shell, no minimum
    keeps the blob, threshold 0.7 leaves nothing."""
    label = np.zeros(shape, np.uint8)
    z, y, x = (int(rng.integers(7, s - 14)) for s in shape)
    side = int(rng.integers(5, 8))
    label[z : z + side, y : y + side, x : x + side] = 1
    probability = np.full(shape, 0.1, np.float32)
    probability[z - 2 : z + side + 2, y - 2 : y + side + 2, x - 2 : x + side + 2] = 0.55
    probability[label == 1] = 0.65
    far = (0, 0, 0) if z + y + x > sum(shape) / 2 else (shape[0] - 3, shape[1] - 3, shape[2] - 3)
    probability[far[0] : far[0] + 3, far[1] : far[1] + 3, far[2] : far[2] + 3] = 0.65
    image = sitk.GetImageFromArray(label)
    image.SetSpacing((1.0, 1.0, 1.0))
    label_path = folder / f"{case_id}.mha"
    sitk.WriteImage(image, str(label_path))
    oof = folder / f"{case_id}.npz"
    np.savez_compressed(oof, tumor=probability.astype(np.float16))
    return Case(case_id, label_path, label_path), oof


@pytest.mark.parametrize("jobs", [1, 2])
def test_selection_finds_the_known_best_variant(tmp_path, jobs):
    rng = np.random.default_rng(7)
    cases, files = {}, []
    for i in range(3):
        case, oof = write_known_case(tmp_path, f"c{i}", rng)
        cases[case.case_id] = case
        files.append(oof)
    config = config_with([0.4, 0.5, 0.6, 0.7], [0.0, 100.0])
    name, settings, table = select_postprocessing(
        config, make_plan(), files, cases, jobs=jobs, progress=False
    )
    assert (settings.threshold, settings.min_component_mm3) == (0.6, 100.0)
    assert name.startswith("t0.6_min100")
    assert set(table) == set(candidate_settings(config, make_plan()))
    best = table[name]
    assert best["dice"] == pytest.approx(1.0) and best["hd95"] == pytest.approx(0.0)
    assert best["n_cases"] == 3 and best["mean_rank"] == min(t["mean_rank"] for t in table.values())
    assert [b["n_cases"] for b in best["by_tumor_volume"]] == [3]  # cubes of 125 to 343 mm^3
    assert best["by_tumor_volume"][0]["dice"] == pytest.approx(1.0)
    assert table["t0.6_min0"]["dice"] < 1.0  # the far blob
    assert table["t0.5_min100"]["dice"] < 1.0  # the shell
    assert table["t0.7_min100_allow-empty"]["dice"] == 0.0  # nothing left
    assert table["t0.7_min100"]["dice"] > 0.0  # the never-empty rule kept something
    assert table["t0.7_min100"]["n_never_empty_fallbacks"] == 3
    assert best["n_never_empty_fallbacks"] == 0


def test_every_variant_scores_as_its_own_postprocessing_would(tmp_path):
    """The search reuses a never-empty variant's twin score where the twin's mask is not empty;
    each variant still scores exactly what post-processing it alone gives, at thresholds that
    leave the mask full, partial and empty."""
    case, oof = write_known_case(tmp_path, "c0", np.random.default_rng(5))
    candidates = candidate_settings(config_with([0.5, 0.6, 0.7], [0.0, 100.0]), make_plan())
    scores, fell_back = _score_case_variants((oof, case.label, candidates))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) == 1
    with np.load(oof) as data:
        tumor = data["tumor"].astype(np.float32)
    for name, settings in candidates.items():
        mask, report = postprocess(tumor, (1.0, 1.0, 1.0), settings)
        assert scores[name] == metrics.score_case(truth, mask.astype(bool), (1.0, 1.0, 1.0)), name
        assert (name in fell_back) == bool(report.fallback), name
    assert fell_back == {"t0.7_min0", "t0.7_min100"}


def test_never_empty_fallbacks_are_counted_per_variant_and_logged_once(tmp_path, caplog):
    """Four cases, two of them with every probability below 0.5 (the known case at half
    strength, peak 0.325): the never-empty rule supplies the mask of those two at threshold 0.5,
    of all four at 0.7, and never where empty masks are allowed. One log line says so, for the
    selected variant, however many cases fell back."""
    rng = np.random.default_rng(3)
    cases, files = {}, []
    for i in range(4):
        case, oof = write_known_case(tmp_path, f"c{i}", rng)
        if i % 2:
            with np.load(oof) as data:
                faint = data["tumor"] * 0.5
            np.savez_compressed(oof, tumor=faint)
        cases[case.case_id] = case
        files.append(oof)
    caplog.set_level(logging.DEBUG)
    name, _, table = select_postprocessing(
        config_with([0.5, 0.7], [0.0]), make_plan(), files, cases, progress=False
    )
    counts = {variant: row["n_never_empty_fallbacks"] for variant, row in table.items()}
    assert counts == {
        "t0.5_min0": 2,
        "t0.5_min0_allow-empty": 0,
        "t0.7_min0": 4,
        "t0.7_min0_allow-empty": 0,
    }
    mentions = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(mentions) == 1, mentions
    assert name in mentions[0] and f"on {counts[name]} of 4 cases" in mentions[0]


def test_selection_without_predictions_is_an_error():
    with pytest.raises(ValueError, match="no out-of-fold predictions"):
        select_postprocessing(config_with([0.5], [0.0]), make_plan(), [], {}, progress=False)


def test_mirroring_is_chosen_only_where_it_pays(tmp_path):
    """The same cases predicted twice: one set exactly the known case, the other blurred (the
    shell raised to the tumor's 0.65, as a worse predictor would). Whichever set is the better
    one wins, under its own name, so the choice of test-time mirroring follows the scores."""
    rng = np.random.default_rng(11)
    cases, exact, blurred = {}, [], []
    (tmp_path / "blurred").mkdir()
    for i in range(3):
        case, oof = write_known_case(tmp_path, f"c{i}", rng)
        cases[case.case_id] = case
        exact.append(oof)
        with np.load(oof) as data:
            worse = np.where(data["tumor"] > 0.5, np.float16(0.65), data["tumor"])
        blurred.append(tmp_path / "blurred" / oof.name)
        np.savez_compressed(blurred[-1], tumor=worse)
    config = config_with([0.6], [100.0])
    name, _, table = select_postprocessing(
        config, make_plan(), blurred, cases, progress=False, mirrored_files=exact
    )
    assert name == "mirrored_t0.6_min100"  # the mirrored set is the exact one here
    assert set(table) == {
        f"{p}t0.6_min100{s}" for p in ("", "mirrored_") for s in ("", "_allow-empty")
    }
    assert table["mirrored_t0.6_min100"]["dice"] > table["t0.6_min100"]["dice"]
    name, _, _ = select_postprocessing(
        config, make_plan(), exact, cases, progress=False, mirrored_files=blurred
    )
    assert name == "t0.6_min100"
    with pytest.raises(ValueError, match="same cases"):
        select_postprocessing(config, make_plan(), exact, cases, mirrored_files=blurred[:2])
