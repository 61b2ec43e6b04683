"""`pantherseg evaluate`: case matching, grid checks, penalties, outputs, ranking and the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from imaging import write_image
from strict_json import read_strict_json

from pantherseg.cli import main
from pantherseg.scoring import evaluate, metrics

SPACING_XYZ = (1.25, 1.25, 3.0)
SHAPE_ZYX = (12, 40, 48)


def write(path: Path, array: np.ndarray, spacing=SPACING_XYZ, **geometry) -> Path:
    return write_image(path, array, spacing_xyz=spacing, **geometry)


def label_with_tumor(offset: int = 0) -> np.ndarray:
    label = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    label[3:9, 8:30, 10:34] = 2  # pancreas, not scored
    label[4:8, 12 + offset : 22 + offset, 14:26] = 1
    return label


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    gt, good, bad = tmp_path / "gt", tmp_path / "good", tmp_path / "bad"
    ids = ["10000_0001", "10001_0001", "10002_0001", "10003_0001"]
    for i, case_id in enumerate(ids):
        write(gt / f"{case_id}.mha", label_with_tumor())
        # The good method names outputs like the container does (input image name).
        write(good / f"{case_id}_0000.mha", (label_with_tumor(offset=i % 2) == 1).astype(np.uint8))
    # The bad method: one perfect, one on the wrong grid, one with pancreas left in, one missing.
    write(bad / "10000_0001.mha", (label_with_tumor() == 1).astype(np.uint8))
    write(bad / "10001_0001.mha", np.zeros((12, 40, 47), np.uint8))
    write(bad / "10002_0001.mha", label_with_tumor())
    write(bad / "99999_0001.mha", np.zeros(SHAPE_ZYX, np.uint8))
    return {"gt": gt, "good": good, "bad": bad, "ids": ids}


def test_matching_accepts_case_ids_and_image_names(dataset):
    result = evaluate.evaluate_folder(dataset["good"], dataset["gt"], progress=False)
    assert [c.case_id for c in result.cases] == dataset["ids"]
    assert all(c.status == evaluate.STATUS_OK for c in result.cases)
    assert result.cases[0].scores["zyx"].dice == 1.0
    assert result.cases[1].scores["zyx"].dice == pytest.approx(2 * 9 / 20)
    assert result.extra_predictions == []


def test_problem_cases_are_named_and_scored_as_empty(dataset):
    result = evaluate.evaluate_folder(dataset["bad"], dataset["gt"], progress=False)
    by_id = {c.case_id: c for c in result.cases}
    assert by_id["10000_0001"].status == evaluate.STATUS_OK
    assert by_id["10001_0001"].status == evaluate.STATUS_GEOMETRY
    assert "size" in by_id["10001_0001"].detail
    assert by_id["10002_0001"].status == evaluate.STATUS_VALUES
    assert "[0, 1, 2]" in by_id["10002_0001"].detail
    assert by_id["10003_0001"].status == evaluate.STATUS_MISSING
    for case_id in ("10001_0001", "10002_0001", "10003_0001"):
        assert by_id[case_id].scores["zyx"].uniform_prediction
        assert by_id[case_id].scores["zyx"].dice == 0.0
    assert result.extra_predictions == ["99999_0001.mha"]
    problems = "\n".join(result.problems())
    assert "10003_0001: missing" in problems and "99999_0001.mha" in problems
    assert result.summaries["zyx"]["dice"] == pytest.approx(0.25)


def test_spacing_mismatch_beyond_tolerance_is_reported(tmp_path):
    write(tmp_path / "gt" / "a.mha", label_with_tumor())
    write(
        tmp_path / "p" / "a.mha",
        (label_with_tumor() == 1).astype(np.uint8),
        spacing=(1.25, 1.25, 3.0002),
    )
    result = evaluate.evaluate_folder(tmp_path / "p", tmp_path / "gt", progress=False)
    assert result.cases[0].status == evaluate.STATUS_GEOMETRY
    assert "spacing" in result.cases[0].detail
    write(
        tmp_path / "p" / "a.mha",
        (label_with_tumor() == 1).astype(np.uint8),
        spacing=(1.25, 1.25, 3.00005),
        origin=(0.0, 0.0, 0.0),
    )
    result = evaluate.evaluate_folder(tmp_path / "p", tmp_path / "gt", progress=False)
    assert result.cases[0].status == evaluate.STATUS_OK
    assert "origin" in result.cases[0].detail  # scored, but the shift is reported


def test_two_valued_prediction_is_binarised_like_the_organisers_script(tmp_path):
    write(tmp_path / "gt" / "a.mha", label_with_tumor())
    write(tmp_path / "p" / "a.mha", (label_with_tumor() == 1).astype(np.uint8) * 255)
    result = evaluate.evaluate_folder(tmp_path / "p", tmp_path / "gt", progress=False)
    assert result.cases[0].status == evaluate.STATUS_OK
    assert result.cases[0].scores["zyx"].dice == 1.0
    assert "binarised" in result.cases[0].detail


def test_both_conventions_and_parallel_jobs_agree_with_direct_scoring(dataset):
    result = evaluate.evaluate_folder(
        dataset["good"], dataset["gt"], conventions=("zyx", "xyz"), jobs=2, progress=False
    )
    gt = label_with_tumor() == 1
    pred = label_with_tumor(offset=1) == 1
    for convention in ("zyx", "xyz"):
        expected = metrics.score_case(gt, pred, SPACING_XYZ[::-1], convention)
        assert result.cases[1].scores[convention] == expected
    assert result.cases[1].scores["zyx"].masd != result.cases[1].scores["xyz"].masd


def test_nothing_matching_is_an_error(tmp_path, dataset):
    write(tmp_path / "other" / "zzz.mha", np.zeros(SHAPE_ZYX, np.uint8))
    with pytest.raises(evaluate.EvaluationError, match="none of its 1 images"):
        evaluate.evaluate_folder(tmp_path / "other", dataset["gt"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvaluationError, match="no ground-truth"):
        evaluate.evaluate_folder(dataset["good"], tmp_path / "empty", progress=False)


def test_ambiguous_predictions_are_an_error(tmp_path, dataset):
    write(dataset["good"] / "10000_0001.mha", np.zeros(SHAPE_ZYX, np.uint8))
    with pytest.raises(evaluate.EvaluationError, match="two predictions"):
        evaluate.evaluate_folder(dataset["good"], dataset["gt"], progress=False)


def test_cli_writes_csv_json_ranking_and_report(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    images = tmp_path / "images"
    for case_id in dataset["ids"]:
        rng = np.random.default_rng(0)
        write(images / f"{case_id}_0000.mha", rng.normal(200, 30, SHAPE_ZYX).astype(np.int16))
    code = main(
        [
            "evaluate",
            "--pred",
            str(dataset["good"]),
            str(dataset["bad"]),
            "--gt",
            str(dataset["gt"]),
            "--out",
            str(out),
            "--convention",
            "both",
            "--report",
            str(tmp_path / "report"),
            "--images",
            str(images),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "10003_0001: missing" in printed.err
    assert printed.out.index("good") < printed.out.index("bad")  # best first
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4 * 2  # methods x cases x conventions
    assert {r["method"] for r in rows} == {"good", "bad"}
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["ranking"]["zyx"]["good"]["mean_rank"]
        < summary["ranking"]["zyx"]["bad"]["mean_rank"]
    )
    good = summary["methods"]["good"]["aggregates"]["zyx"]
    assert good["dice"] == pytest.approx(np.mean([1.0, 0.9, 1.0, 0.9]))
    assert good["tumor_burden_rmse"] == 0.0  # shifted, not resized
    bad = summary["methods"]["bad"]["aggregates"]["zyx"]
    assert bad["tumor_burden_rmse"] == pytest.approx(math.sqrt(3 * (4 * 10 * 12 * 4.6875) ** 2 / 4))
    bands = summary["methods"]["good"]["by_tumor_volume"]["zyx"]
    volumes_ml = sorted(float(r["gt_volume_mm3"]) / 1000 for r in rows if r["method"] == "good")
    assert bands[0]["min_ml"] <= volumes_ml[0] and sum(b["n_cases"] for b in bands) == 4
    assert "by true tumor volume, spacing convention zyx" in printed.out
    page = (tmp_path / "report" / "index.html").read_text()
    assert "10003_0001" in page and "overlay_0_best.png" in page
    assert "By true tumor volume" in page and bands[0]["band"] in page
    pngs = ("metrics.png", "volumes.png", "dice_by_volume.png", "overlay_0_best.png")
    for png in (*pngs, "overlay_1_worst.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000


def test_cli_reports_bad_folders_with_exit_status_2(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "nope"),
            "--gt",
            str(dataset["gt"]),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "nope: not a folder" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            "--pred",
            str(dataset["good"]),
            "--gt",
            str(tmp_path / "gone"),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "gone: not a folder" in capsys.readouterr().err
    assert not out.exists()


def test_cli_volume_bands_are_chosen_and_checked(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(dataset["good"]), "--gt", str(dataset["gt"]), "--quiet"]
    assert main([*argv, "--out", str(out), "--volume-bands", "0.001"]) == 0
    bands = json.loads((out / "summary.json").read_text())["methods"]["good"]["by_tumor_volume"]
    assert [(b["band"], b["n_cases"]) for b in bands["zyx"]] == [("0.001 mL and more", 4)]
    assert "0.001 mL and more" in capsys.readouterr().out
    bad = tmp_path / "bad-bands"

    def not_to_be_scored(*args, **kwargs):
        raise AssertionError("bad bands must stop the command before any case is scored")

    monkeypatch.setattr(evaluate, "evaluate_folder", not_to_be_scored)
    assert main([*argv, "--out", str(bad), "--volume-bands", "5", "2"]) == 2
    assert "volume band edges must rise" in capsys.readouterr().err
    assert not bad.exists()


def test_summary_is_strict_json_when_no_case_has_a_tumor(tmp_path, capsys):
    """Means over no tumor have no value: null in summary.json, nan on the terminal, and the
    tumor-free case's false positive still counts in the burden RMSE."""
    label = label_with_tumor()
    label[label == 1] = 2  # pancreas only
    write(tmp_path / "gt" / "10000_0001.mha", label)
    false_positive = np.zeros(SHAPE_ZYX, np.uint8)
    false_positive[4:6, 10:14, 10:14] = 1
    write(tmp_path / "pred" / "10000_0001.mha", false_positive)
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    summary = read_strict_json(out / "summary.json")
    means = summary["methods"]["pred"]["aggregates"]["zyx"]
    assert [means[m] for m in ("dice", "surface_dice", "hd95", "masd")] == [None] * 4
    assert means["n_without_tumor"] == 1
    assert means["tumor_burden_rmse"] == pytest.approx(2 * 4 * 4 * 1.25 * 1.25 * 3.0)
    printed = capsys.readouterr().out
    assert "nan" in printed and "spacing convention zyx: no case has a tumor" in printed
