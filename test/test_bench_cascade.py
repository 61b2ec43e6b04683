"""bench.cascade end to end on a tiny grid with tiny networks: the real run takes minutes, so the
script's every path (phantom, export, both child processes, table, JSON) is checked here first.
Figures are only checked to exist and be positive; timings are never thresholded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.cascade import STAGE_ORDER, main

SHAPE = (32, 96, 112)
TINY = [
    "--shape",
    *map(str, SHAPE),
    "--region-patch",
    "16",
    "64",
    "64",
    "--features",
    "2",
    "--localiser-features",
    "4",
    "--localiser-patch",
    "16",
    "32",
    "32",
    "--threads",
    "2",
]


def test_tiny_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cascade.json"
    assert main([*TINY, "--json", str(out), "--keep", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text(encoding="utf-8"))

    assert "box: true pancreas + 30 mm margin, localiser timed separately" in printed
    for label in ("end to end", "peak RSS GiB", "speed-up of two stages", "load average"):
        assert label in printed

    box = figures["box"]
    assert box["size"] == [b - a for a, b in zip(box["start"], box["stop"], strict=True)]
    assert all(0 < n <= m for n, m in zip(box["size"], SHAPE, strict=True))
    assert 0 < box["share"] < 1  # the box is smaller than the image
    assert math.prod(box["size"]) < math.prod(SHAPE)
    truth = figures["pancreas_tumor_box"]
    assert all(
        a <= t0 and t1 <= b
        for a, b, t0, t1 in zip(
            box["start"], box["stop"], truth["start"], truth["stop"], strict=True
        )
    )

    single, cascade = figures["variants"]["single"], figures["variants"]["cascade"]
    for run in (single, cascade):
        for key in ("end_to_end_s", "wall_s", "cpu_s", "peak_gib", "load_s", "read_s"):
            assert run[key] > 0, key
        assert run["tiles"]["region"] > 0
        assert run["network_s_per_tile"] > 0
        assert run["others_cores"] >= 0
        assert run["end_to_end_s"] == pytest.approx(sum(run["stages_s"].values()))
        assert set(run["stages_s"]) <= set(STAGE_ORDER)
    assert not any(stage.startswith("localiser") for stage in single["stages_s"])
    assert set(cascade["stages_s"]) == set(STAGE_ORDER)
    assert all(seconds > 0 for seconds in cascade["stages_s"].values())
    assert cascade["tiles"]["localiser"] > 0
    assert "two stages" in cascade["description"]
    assert figures["speedup"] > 0
    assert figures["targets"] == {}  # a custom grid has none
    assert len(figures["load_average"]["before"]) == 3


def test_task_2_writes_its_phantom_and_plans_at_task_2_spacing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--task task2: the phantom is a Task 2 one at 2 x 1 x 1 mm and the region network's plan
    takes that spacing, so the region stage does not resample; no Task 1 targets apply."""
    out = tmp_path / "cascade.json"
    argv = [*TINY, "--task", "task2", "--variants", "cascade", "--json", str(out)]
    assert main([*argv, "--keep", str(tmp_path / "work")]) == 0
    assert "task2 case 32 x 96 x 112" in capsys.readouterr().out
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["task"] == "task2" and figures["spacing_zyx"] == [2.0, 1.0, 1.0]
    assert figures["targets"] == {}
    plan = json.loads((tmp_path / "work" / "models" / "cascade" / "plan.json").read_text())
    assert plan["task"] == "task1"  # translated from the Task 1 baseline's plans: a stand-in
    assert plan["preprocessing"]["target_spacing_zyx"] == [2.0, 1.0, 1.0]
    phantom = json.loads((tmp_path / "work" / "cascade.json").read_text())
    assert phantom["tiles"]["region"] > 0
