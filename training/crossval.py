"""Cross-validation: a saved split, out-of-fold predictions on whole cases, and the choice of
post-processing on them by the challenge's own metrics and ranking.

Out-of-fold probabilities come from `pantherseg.pipeline.Segmenter.probabilities`, the code path
the container runs, so the post-processing chosen here is tuned on what inference will see.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from pantherseg import metrics
from pantherseg.io import atomic_write_text, check_inference_image, read_image
from pantherseg.parallel import parallel_map
from pantherseg.pipeline import Segmenter
from pantherseg.plan import PancreasGuidance, Plan, Postprocessing
from pantherseg.postprocess import postprocess
from training.config import TrainingConfig
from training.data import Case
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
) -> list[Path]:
    """Each validation case's probabilities from the fold that did not train on it, saved as
    `<out_dir>/<case>.npz` (float16). Cases already predicted are kept, so a rerun continues."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    todo = [(fold, case_id) for fold, split in enumerate(splits) for case_id in split["val"]]
    for fold, case_id in tqdm(
        todo, desc="out-of-fold predictions", unit="case", disable=not progress
    ):
        target = out_dir / f"{case_id}.npz"
        written.append(target)
        if target.is_file():
            continue
        network = fold_networks[fold].to(device).eval()
        segmenter = Segmenter(plan, [torch_predictor(network, device, amp)])
        image = read_image(cases[case_id].image)
        array = check_inference_image(image, cases[case_id].image)
        probabilities = segmenter.probabilities(array, tuple(reversed(image.GetSpacing())))
        tmp = target.with_name(f".{target.stem}.partial.npz")
        np.savez_compressed(tmp, **{k: v.astype(np.float16) for k, v in probabilities.items()})
        tmp.replace(target)
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
        candidates[name] = Postprocessing(
            threshold=threshold,
            min_component_mm3=size,
            pancreas_guidance=PancreasGuidance(guided, current.dilation_mm, current.min_overlap),
            never_empty=never_empty,
        )
    return candidates


def _score_case_variants(args: tuple) -> dict[str, metrics.CaseMetrics]:
    oof_path, label_path, candidates = args
    label_image = read_image(label_path)
    truth = sitk.GetArrayViewFromImage(label_image) == 1
    spacing = tuple(reversed(label_image.GetSpacing()))
    with np.load(oof_path) as data:
        tumor = data["tumor"].astype(np.float32)
        pancreas = data["pancreas"].astype(np.float32) if "pancreas" in data else None
    scores = {}
    for name, settings in candidates.items():
        guided = settings.pancreas_guidance.enabled
        mask, _ = postprocess(tumor, spacing, settings, pancreas if guided else None)
        scores[name] = metrics.score_case(truth, mask.astype(bool), spacing)
    return scores


def select_postprocessing(
    config: TrainingConfig,
    plan: Plan,
    oof_files: Sequence[Path],
    cases: dict[str, Case],
    jobs: int = 1,
    progress: bool = True,
) -> tuple[str, Postprocessing, dict[str, dict[str, float]]]:
    """The variant with the best challenge ranking (mean of per-metric ranks, ties broken by
    Dice) on the out-of-fold predictions, its settings, and every variant's aggregates (with
    their means per band of tumor volume)."""
    candidates = candidate_settings(config, plan)
    tasks = [(path, cases[path.stem].label, candidates) for path in oof_files]
    if not tasks:
        raise ValueError("no out-of-fold predictions to choose post-processing on")
    # Spawned worker processes (or this one for jobs=1): a forked copy of a process that has run
    # torch's thread pools can deadlock.
    per_case = list(
        parallel_map(
            _score_case_variants, tasks, max(1, jobs), progress, "post-processing variants"
        )
    )
    summaries = {
        name: metrics.aggregate([scores[name] for scores in per_case]) for name in candidates
    }
    ranks = metrics.rank_methods(summaries)
    best = min(candidates, key=lambda n: (ranks[n]["mean_rank"], -summaries[n]["dice"]))
    table = {
        name: {
            **summaries[name],
            "mean_rank": ranks[name]["mean_rank"],
            "by_tumor_volume": metrics.by_tumor_volume([scores[name] for scores in per_case]),
        }
        for name in candidates
    }
    return best, candidates[best], table
