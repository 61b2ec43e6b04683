"""A parallel map with a progress bar, shared by phantom generation, evaluation, and training's
dataset checks and preprocessing.

Written here rather than taken from `concurrent.futures` or tqdm's `process_map` because every
caller needs the same three things together: spawned (not forked) workers, one ITK thread per
worker, and results in input order as they arrive, with one job running in this process.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import SimpleITK as sitk
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _single_threaded_worker() -> None:
    # Each process is one job; ITK's own thread pool per process would oversubscribe the CPUs.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def parallel_map(
    function: Callable[[T], R],
    items: Sequence[T],
    jobs: int,
    progress: bool,
    desc: str,
) -> Iterator[R]:
    """`function` over `items` in order, in `jobs` processes, with a tqdm bar.

    Processes are spawned rather than forked: the caller may already hold torch's or ITK's
    threads, and a forked copy of a thread pool can deadlock. `function` must be a module-level
    function and, as always with spawn, the main module importable (a script file, `python -m`,
    a notebook; not a script piped to stdin). One job (or one item) runs in this process, which
    keeps tests and debugging simple.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="case")
    try:
        if jobs == 1 or len(items) <= 1:
            for item in items:
                yield function(item)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(jobs, len(items)), initializer=_single_threaded_worker) as pool:
            for result in pool.imap(function, items, chunksize=1):
                yield result
                bar.update()
    finally:
        bar.close()
