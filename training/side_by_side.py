"""Cross-validation folds trained side by side (`cv.parallel_folds`), each in a process of its own
with an equal share of the CPU cores.

Why: on some CPUs a small network's training step hardly gets faster with a second thread, while
two single-thread processes together take about 1.5x the steps of one two-thread process (the
CPU demo network on one 2-core machine: 0.43 s a step with two threads, 0.57 s each for two
processes side by side; on a faster one the second thread counts and the gain was 1.05x;
`python -m bench.training --concurrent 1 2 --threads 1`). Folds are independent, so they are the
natural unit to run at once.

Processes are spawned, not forked (the caller may hold torch's threads). Written here rather
than with `concurrent.futures` or a multiprocessing Pool because a failed fold must stop the
others at once: an executor waits for its running tasks, and a Pool waits forever for the
result of a worker that was killed (out of memory).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
from collections.abc import Sequence
from multiprocessing import connection
from multiprocessing.process import BaseProcess

LOG_FORMAT = "%(asctime)s %(message)s"


def configure_logging() -> None:
    """Timestamped INFO lines for training's own logs, in the main process and in each fold's.
    NumExpr (imported through MONAI's dependencies) would add a thread-count line at INFO to every
    process's log; it is kept at WARNING."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("numexpr").setLevel(logging.WARNING)


class FoldProcessError(RuntimeError):
    """A fold's process ended with an error (its own message is printed above)."""


def threads_per_fold(parallel: int, cpus: int | None = None) -> int:
    """Each of `parallel` fold processes' share of the CPU cores this process may use (at least
    one thread)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return max(1, cpus // parallel)


def _child(target: str, arguments: dict, fold: int, threads: int) -> None:
    import torch

    configure_logging()
    torch.set_num_threads(threads)
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(fold, **arguments)


def train_side_by_side(
    target: str, arguments: dict, folds: Sequence[int], parallel: int, threads: int
) -> None:
    """`function(fold, **arguments)` for every fold, `target` naming the function as
    "module:function", `parallel` at a time, each in a spawned process with `threads` torch
    threads; the next fold starts when one ends. The function is named rather than passed: one
    defined in a module run with `python -m` (training's __main__) cannot be pickled by reference
    into a spawned process. A process that fails (non-zero exit) stops the others and raises
    FoldProcessError naming its fold."""
    if parallel < 1 or threads < 1:
        raise ValueError(f"parallel and threads must be at least 1, got {parallel}, {threads}")
    context = multiprocessing.get_context("spawn")
    waiting = list(folds)
    running: dict[int, tuple[int, BaseProcess]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                fold = waiting.pop(0)
                process = context.Process(
                    target=_child, args=(target, arguments, fold, threads), name=f"fold {fold}"
                )
                process.start()
                running[process.sentinel] = (fold, process)
            for sentinel in connection.wait(list(running)):
                fold, process = running.pop(sentinel)
                process.join()
                if process.exitcode != 0:
                    raise FoldProcessError(
                        f"fold {fold}'s training process failed (exit code {process.exitcode}); "
                        "the other folds were stopped"
                    )
    finally:
        for _, process in running.values():
            process.terminate()
            process.join()
