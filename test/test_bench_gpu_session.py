"""bench.gpu_session's CPU preset: the prepared GPU script must work before a GPU is lent, since a
lent session has minutes, not time to debug it."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gpu_session import TRAINING_VARIANTS, main

INFERENCE = ("inference", "inference_batched", "inference_task2")


def run(tmp_path: Path, budget_s: float) -> dict:
    out = tmp_path / "figures.json"
    argv = ["--out", str(out), "--preset", "cpu-small", "--device", "cpu"]
    assert main([*argv, "--budget-s", str(budget_s)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_cpu_small_preset_measures_every_section(tmp_path: Path) -> None:
    figures = run(tmp_path, budget_s=300)
    assert figures["environment"]["torch"]
    for name in INFERENCE:
        section = figures[name]
        assert section["status"] == "ok", section
        assert section["end_to_end_s"] > 0
        assert section["stages_s"]["network"] > 0
        assert section["peak_memory"]["gib"] > 0
        assert section["network_only_s"] > 0
        assert 0 <= section["share_outside_network"] <= 1
    plain, batched, task2 = (figures[name] for name in INFERENCE)
    assert task2["case"] == {"task": "task2", "shape_zyx": [28, 56, 64], "spacing_zyx": [2, 1, 1]}
    assert plain["case"]["task"] == "task1"
    # 2 folds x 8 mirrors over the same tiles, whether stacked in a batch or not
    assert plain["tiles_x_passes"] == batched["tiles_x_passes"] > 0
    assert plain["network_forwards"] == 8 * batched["network_forwards"]
    # the same averages, stitched per fold or once: the masks barely differ
    assert abs(plain["tumor_voxels"] - batched["tumor_voxels"]) <= 0.01 * plain["tumor_voxels"]
    for name in TRAINING_VARIANTS:
        section = figures["training"][name]
        if name == "compile" and section["status"] == "failed":
            assert section["reason"]  # recorded, not raised
            continue
        assert section["status"] == "ok", section
        assert section["steps_per_second"] > 0
        assert section["tflop_per_s"] > 0
        assert section["peak_gib"] > 0


def test_spent_budget_skips_the_sections(tmp_path: Path) -> None:
    figures = run(tmp_path, budget_s=1)
    sections = [figures[name] for name in INFERENCE] + list(figures["training"].values())
    assert len(sections) == len(INFERENCE) + len(TRAINING_VARIANTS)
    for section in sections:
        assert section["status"] == "skipped"
        assert section["reason"].startswith("budget")
    assert figures["elapsed_s"] < 5
