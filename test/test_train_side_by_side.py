"""Folds side by side (`training.side_by_side`): each process gets its share of the threads,
and a failed fold stops the others and names itself."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from training.side_by_side import FoldProcessError, threads_per_fold, train_side_by_side


def record_threads(fold: int, folder: str) -> None:
    import torch

    (Path(folder) / f"fold_{fold}.txt").write_text(f"{torch.get_num_threads()} {os.getpid()}")


LOGGERS = ("pantherseg.training", "numexpr.utils")  # training's own, and NumExpr's


def record_logging(fold: int, folder: str) -> None:
    enabled = [logging.getLogger(name).isEnabledFor(logging.INFO) for name in LOGGERS]
    (Path(folder) / f"fold_{fold}.txt").write_text(" ".join(map(str, enabled)))


def fail_fold_one(fold: int, folder: str) -> None:
    if fold == 1:
        sys.exit(3)
    time.sleep(120)  # far longer than fold 1 takes to fail: it must be stopped, not awaited
    (Path(folder) / "fold_0_finished").write_text("")


def test_threads_are_shared_out_and_never_zero():
    assert threads_per_fold(2, cpus=16) == 8
    assert threads_per_fold(3, cpus=16) == 5
    assert threads_per_fold(3, cpus=2) == 1
    assert threads_per_fold(1, cpus=2) == 2


def test_every_fold_runs_in_its_own_process_with_its_threads(tmp_path):
    target, arguments = "test_train_side_by_side:record_threads", {"folder": str(tmp_path)}
    train_side_by_side(target, arguments, [0, 1, 2], 2, threads=1)
    seen = [(tmp_path / f"fold_{k}.txt").read_text().split() for k in range(3)]
    assert [threads for threads, _ in seen] == ["1", "1", "1"]
    assert len({pid for _, pid in seen} | {str(os.getpid())}) == 4


def test_a_failed_fold_stops_the_others(tmp_path):
    target, arguments = "test_train_side_by_side:fail_fold_one", {"folder": str(tmp_path)}
    with pytest.raises(FoldProcessError, match=r"fold 1's training process failed \(exit code 3"):
        train_side_by_side(target, arguments, [0, 1], 2, threads=1)
    assert not (tmp_path / "fold_0_finished").exists()


def test_nonsense_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        train_side_by_side("builtins:print", {}, [0], 0, threads=1)


def test_fold_processes_log_training_at_info_and_numexpr_only_at_warning(tmp_path):
    """A fold's process starts fresh: its training lines must show, and NumExpr's per-process
    thread-count line must not."""
    target, arguments = "test_train_side_by_side:record_logging", {"folder": str(tmp_path)}
    train_side_by_side(target, arguments, [0], 1, threads=1)
    assert (tmp_path / "fold_0.txt").read_text() == "True False"
