"""bench.engines times both CPU engines on a network and says how far apart their logits are."""

from __future__ import annotations

import re

import pytest

from bench import engines as bench_engines


def test_both_engines_are_timed_and_agree(capsys):
    path = bench_engines.DEFAULT_MODEL / "localiser_fold_0.onnx"
    assert bench_engines.main([str(path), "--repeats", "1", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if str(path) in line]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "1 x 40 x 56 x 64"  # the file's own patch
    ort_s, openvino_s = float(cells[2]), float(cells[3])
    assert ort_s > 0 and openvino_s > 0
    speedup = float(cells[4].removesuffix("x"))  # from the unrounded seconds
    assert speedup == pytest.approx(ort_s / openvino_s, rel=0.05)
    difference = float(re.match(r"([0-9.e+-]+) of the largest", cells[5]).group(1))
    assert difference < 1e-3
