"""The work folder's typed records: what later steps read back is checked, with the file named."""

from __future__ import annotations

import json

import pytest

from training.records import (
    CROSS_VALIDATION_FILE,
    PLANNING_FILE,
    CrossValidation,
    Planning,
    RecordError,
)


def test_records_round_trip(tmp_path):
    planning = Planning(figures={"fingerprint_cases": 3}, data={"root": "train", "cases": 3})
    planning.save(tmp_path)
    assert Planning.load(tmp_path) == planning
    cv = CrossValidation(3, "mirrored_t0.5_min0", True, {"dice": 0.7}, {"t0.5_min0": {}})
    cv.save(tmp_path)
    assert CrossValidation.load(tmp_path) == cv


def test_missing_and_broken_records_say_what_to_do(tmp_path):
    assert CrossValidation.load(tmp_path) is None  # cross-validation has not run
    with pytest.raises(RecordError, match=f"{PLANNING_FILE}: missing.*training plan"):
        Planning.load(tmp_path)
    (tmp_path / PLANNING_FILE).write_text(json.dumps({"figures": []}))
    with pytest.raises(RecordError, match="'figures' and 'data'"):
        Planning.load(tmp_path)
    path = tmp_path / CROSS_VALIDATION_FILE
    path.write_text(json.dumps({"folds": 3, "selected": "t0.5", "aggregates": {}}))
    with pytest.raises(RecordError, match=r"no 'test_time_mirroring'.*cv --resume"):
        CrossValidation.load(tmp_path)
    good = {"folds": 3, "selected": "t0.5", "test_time_mirroring": False, "aggregates": {}}
    for bad in ({"folds": "3"}, {"folds": 0}, {"folds": True}, {"test_time_mirroring": "no"}):
        path.write_text(json.dumps({**good, **bad}))
        with pytest.raises(RecordError, match="wrong type"):
            CrossValidation.load(tmp_path)
    path.write_text("{")
    with pytest.raises(RecordError, match="cannot be read"):
        CrossValidation.load(tmp_path)
