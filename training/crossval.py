"""Cross-validation: a saved split, out-of-fold predictions on whole cases, and the choice of
post-processing on them by the challenge's own metrics and ranking.

Out-of-fold probabilities come from `pantherseg.inference.pipeline.Segmenter.probabilities`, the
code path the container runs, so the post-processing chosen here is tuned on what inference will
see.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from pantherseg.inference.files import atomic_output, atomic_write_text
from pantherseg.inference.io import check_inference_image, read_image
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import Plan, Postprocessing
from pantherseg.inference.postprocess import postprocess
from pantherseg.inference.preprocess import Box
from pantherseg.parallel import parallel_map
from pantherseg.scoring import metrics
from training.config import TrainingConfig
from training.data import Case
from training.records import MIRRORED_PREFIX
from training.trainer import torch_predictor

log = logging.getLogger("pantherseg.training")

SPLITS_FILE = "splits.json"


class SplitError(ValueError):
    """Saved splits that no longer fit the dataset."""


def make_splits(case_ids: Sequence[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """k folds over the sorted case ids, shuffled by `seed`; every case is validated once."""
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise SplitError("case ids must be unique")
    if not 2 <= folds <= len(ids):
        raise SplitError(f"{folds} folds need between 2 and {len(ids)} (the number of cases)")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    splits = []
    for fold in range(folds):
        val = sorted(order[fold::folds])
        splits.append({"train": sorted(set(ids) - set(val)), "val": val})
    return splits


def load_or_make_splits(
    path: Path, case_ids: Sequence[str], folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """The saved split when it still matches the dataset, else a new one saved to `path`."""
    path = Path(path)
    if path.is_file():
        splits = json.loads(path.read_text(encoding="utf-8"))
        saved = {c for split in splits for c in split["val"]}
        if saved != set(case_ids) or len(splits) != folds:
            raise SplitError(
                f"{path}: the saved {len(splits)}-fold split covers other cases than the dataset's "
                f"{len(case_ids)} or another fold count; remove it to make a new split"
            )
        return splits
    splits = make_splits(case_ids, folds, seed)
    atomic_write_text(path, json.dumps(splits, indent=1) + "\n")
    return splits


def predict_out_of_fold(
    plan: Plan,
    fold_networks: Sequence[torch.nn.Module],
    splits: Sequence[dict[str, list[str]]],
    cases: dict[str, Case],
    out_dir: Path,
    device: torch.device,
    amp: bool = True,
    progress: bool = True,
    mirroring: str = "off",
    regions: dict[str, Box | None] | None = None,
) -> list[Path]:
    """Each validation case's probabilities from the fold that did not train on it, saved as
    `<out_dir>/<case>.npz` (float16). Cases already predicted are kept, so a rerun continues.
    `mirroring` ("off" or "on": over the plan's trained axes) is explicit, not the plan's choice,
    because cross-validation is what makes that choice. `regions`: each case's out-of-fold
    localiser box (two-stage models; None for the whole image)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    todo = [(fold, case_id) for fold, split in enumerate(splits) for case_id in split["val"]]
    what = "out-of-fold predictions" + (", mirrored" if mirroring == "on" else "")
    for fold, case_id in tqdm(todo, desc=what, unit="case", disable=not progress):
        target = out_dir / f"{case_id}.npz"
        written.append(target)
        if target.is_file():
            continue
        network = fold_networks[fold].to(device).eval()
        # The main network alone: the localiser's boxes come in `regions`.
        segmenter = Segmenter(
            dataclasses.replace(plan, localiser=None),
            [torch_predictor(network, device, amp)],
            mirroring=mirroring,
        )
        image = read_image(cases[case_id].image)
        array = check_inference_image(image, cases[case_id].image)
        probabilities = segmenter.probabilities(
            array,
            tuple(reversed(image.GetSpacing())),
            image.GetDirection(),
            region=(regions or {}).get(case_id),
        )
        with atomic_output(target) as tmp:
            np.savez_compressed(tmp, **{k: v.astype(np.float16) for k, v in probabilities.items()})
    return written


def candidate_settings(config: TrainingConfig, plan: Plan) -> dict[str, Postprocessing]:
    """Every post-processing variant worth trying, by a readable name."""
    guidance = [False, True] if "pancreas" in plan.inference.classes else [False]
    current = plan.postprocessing.pancreas_guidance
    candidates = {}
    for threshold, size, guided, never_empty in itertools.product(
        config.cv.thresholds, config.cv.min_component_mm3, guidance, [True, False]
    ):
        name = (
            f"t{threshold:g}_min{size:g}{'_pancreas' if guided else ''}"
            f"{'' if never_empty else '_allow-empty'}"
        )
        # Whatever the plan sets and the search does not vary (connectivity, the pancreas
        # threshold and dilation) stays as the plan has it.
        candidates[name] = dataclasses.replace(
            plan.postprocessing,
            threshold=threshold,
            min_component_mm3=size,
            pancreas_guidance=dataclasses.replace(current, enabled=guided),
            never_empty=never_empty,
        )
    return candidates


def _score_case_variants(args: tuple) -> tuple[dict[str, metrics.CaseMetrics], set[str]]:
    """One case's metrics under every variant, and the variants whose mask the never-empty rule
    supplied (counted for the selection's report, not logged per case)."""
    oof_path, label_path, candidates = args
    label_image = read_image(label_path)
    truth = sitk.GetArrayViewFromImage(label_image) == 1
    spacing = tuple(reversed(label_image.GetSpacing()))
    with np.load(oof_path) as data:
        tumor = data["tumor"].astype(np.float32)
        pancreas = data["pancreas"].astype(np.float32) if "pancreas" in data else None
    scores, fell_back = {}, set()
    # The never-empty rule changes a mask only where it would be empty, so a variant with the rule
    # reuses its twin's score when the twin's mask is not empty: half the cost of the search.
    not_empty: dict[Postprocessing, metrics.CaseMetrics] = {}
    for name, settings in sorted(candidates.items(), key=lambda item: item[1].never_empty):
        twin = dataclasses.replace(settings, never_empty=False)
        if settings.never_empty and twin in not_empty:
            scores[name] = not_empty[twin]
            continue
        guided = settings.pancreas_guidance.enabled
        mask, report = postprocess(tumor, spacing, settings, pancreas if guided else None)
        scores[name] = metrics.score_case(truth, mask.astype(bool), spacing)
        if report.fallback:
            fell_back.add(name)
        if not settings.never_empty and mask.any():
            not_empty[settings] = scores[name]
    return scores, fell_back


def select_postprocessing(
    config: TrainingConfig,
    plan: Plan,
    oof_files: Sequence[Path],
    cases: dict[str, Case],
    jobs: int = 1,
    progress: bool = True,
    mirrored_files: Sequence[Path] = (),
) -> tuple[str, Postprocessing, dict[str, dict[str, Any]]]:
    """The variant with the best challenge ranking (mean of per-metric ranks, ties broken by
    Dice) on the out-of-fold predictions, its settings, and every variant's aggregates (with
    their means per band of tumor volume, and `n_never_empty_fallbacks`: on how many cases the
    never-empty rule supplied the mask, which the ranking does not use).

    With `mirrored_files` (the same cases predicted with test-time mirroring) every variant is
    scored on those too, under its name with `MIRRORED_PREFIX`: the winner's name says whether
    inference should mirror, so mirroring is kept only where it pays by the challenge's ranking.
    """
    candidates = candidate_settings(config, plan)
    sets = {"": list(oof_files)}
    if mirrored_files:
        if sorted(p.stem for p in mirrored_files) != sorted(p.stem for p in oof_files):
            raise ValueError("mirrored out-of-fold predictions must cover the same cases")
        sets[MIRRORED_PREFIX] = list(mirrored_files)
    if not oof_files:
        raise ValueError("no out-of-fold predictions to choose post-processing on")
    tasks = [(p, cases[p.stem].label, candidates) for files in sets.values() for p in files]
    # Spawned worker processes (or this one for jobs=1): a forked copy of a process that has run
    # torch's thread pools can deadlock.
    scored = iter(
        parallel_map(
            _score_case_variants, tasks, max(1, jobs), progress, "post-processing variants"
        )
    )
    per_case: dict[str, list[metrics.CaseMetrics]] = {}
    fallbacks: Counter[str] = Counter()
    for prefix, files in sets.items():
        for scores, fell_back in itertools.islice(scored, len(files)):
            for name, score in scores.items():
                per_case.setdefault(prefix + name, []).append(score)
            fallbacks.update(prefix + name for name in fell_back)
    settings = {prefix + name: candidates[name] for prefix in sets for name in candidates}
    summaries = {name: metrics.aggregate(per_case[name]) for name in settings}
    ranks = metrics.rank_methods(summaries)
    best = min(settings, key=lambda n: (ranks[n]["mean_rank"], -summaries[n]["dice"]))
    table = {
        name: {
            **summaries[name],
            "mean_rank": ranks[name]["mean_rank"],
            "by_tumor_volume": metrics.by_tumor_volume(per_case[name]),
            "n_never_empty_fallbacks": fallbacks[name],
        }
        for name in settings
    }
    log.info(
        "post-processing %s: the never-empty rule supplied the mask on %d of %d cases",
        best,
        fallbacks[best],
        len(oof_files),
    )
    return best, settings[best], table
