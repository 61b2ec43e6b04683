"""Two stages in training: the localiser's configuration and grid, its out-of-fold boxes, and what
they tell the main network's training (the jitter of its boxes) and the model card (the share of
tumor inside the boxes, per case, worst case named).

The localiser trains in `<work>/localiser/`, a work folder of its own (configuration, plan, cache,
folds) on the main work folder's split, so that every case's out-of-fold box comes from a
localiser that never saw it, and the main network's out-of-fold prediction runs in that box: the
post-processing is chosen on what inference will do.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from pantherseg.inference.io import check_inference_image, read_image
from pantherseg.inference.localise import Localisation
from pantherseg.inference.pipeline import NetworkStage, Timings, locate
from pantherseg.inference.plan import Localiser
from pantherseg.inference.preprocess import Box
from training.config import TrainingConfig
from training.data import TUMOR, Case, Fingerprint
from training.records import Cascade
from training.regions import foreground_box
from training.trainer import torch_predictor

log = logging.getLogger("pantherseg.training")

# A region found by the localiser is plausible down to this share of the smallest annotated
# pancreas-and-tumor volume, and up to this multiple of the longest annotated box side.
MIN_VOLUME_SHARE = 0.1
MAX_EXTENT_FACTOR = 1.5
# The main network's boxes move by up to this percentile of the localiser's box-side errors.
JITTER_PERCENTILE = 90


def localiser_config(config: TrainingConfig) -> TrainingConfig:
    """The localiser's training configuration: the main one with tumor and pancreas labels, the
    localiser's network width, patch and epochs, validated on the foreground (its target)."""
    local = copy.deepcopy(config)
    cascade = config.cascade
    local.data.labels = "tumor+pancreas"
    local.plan.patch_size_zyx = cascade.localiser_patch_size_zyx
    local.network.base_features = cascade.localiser_base_features
    local.network.max_features = cascade.localiser_max_features
    local.network.depth = None
    if cascade.localiser_epochs is not None:
        local.optim.epochs = cascade.localiser_epochs
    local.validation.target = "foreground"
    local.cv.measure_mirroring = False
    local.cascade.enabled = False
    return local


def localiser_spacing(
    fp: Fingerprint, main_spacing: Sequence[float], voxels: int
) -> tuple[float, float, float]:
    """Isotropic where it can be: the spacing that puts the median image's longest side (after
    cropping, in mm) into `voxels` voxels, never finer than the main network's on any axis."""
    extents = np.asarray(fp.shapes_after_crop_zyx, float) * np.asarray(fp.spacings_zyx, float)
    coarse = float(np.median(extents, axis=0).max()) / voxels
    return tuple(round(max(coarse, float(s)), 4) for s in main_spacing)


def plausibility(cases: Sequence[Case]) -> tuple[float, float]:
    """(min_foreground_ml, max_extent_mm) for the localiser from the annotated cases: a fraction
    of the smallest pancreas-and-tumor volume, a multiple of the longest box side."""
    volumes, extents = [], []
    for case in cases:
        label = read_image(case.label)
        spacing = np.asarray(tuple(reversed(label.GetSpacing())))
        foreground = sitk.GetArrayViewFromImage(label) > 0
        box = foreground_box(foreground)
        if box is None:
            continue
        volumes.append(float(foreground.sum()) * float(np.prod(spacing)) / 1000.0)
        extents.append(float(((np.asarray(box[1]) - box[0]) * spacing).max()))
    if not volumes:
        raise ValueError("no annotated case has a pancreas or tumor label to localise")
    return round(MIN_VOLUME_SHARE * min(volumes), 3), round(MAX_EXTENT_FACTOR * max(extents), 1)


def localise_out_of_fold(
    localiser: Localiser,
    fold_networks: Sequence[torch.nn.Module],
    splits: Sequence[dict[str, list[str]]],
    cases: dict[str, Case],
    device: torch.device,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Localisation]:
    """Each validation case's box from the localiser fold that did not train on it, found by the
    container's own code (`pipeline.locate`)."""
    found = {}
    todo = [(fold, case_id) for fold, split in enumerate(splits) for case_id in split["val"]]
    for fold, case_id in tqdm(todo, desc="out-of-fold boxes", unit="case", disable=not progress):
        network = fold_networks[fold].to(device).eval()
        stage = NetworkStage(
            localiser.preprocessing,
            localiser.inference,
            [torch_predictor(network, device, amp)],
            on_gpu=device.type == "cuda",
            mirroring="off",
        )
        image = read_image(cases[case_id].image)
        array = check_inference_image(image, cases[case_id].image)
        spacing = tuple(reversed(image.GetSpacing()))
        found[case_id] = locate(
            stage, localiser, array, spacing, image.GetDirection(), False, Timings()
        )
    return found


def _side_errors_mm(core: Box, truth: Box, spacing: Sequence[float]) -> list[float]:
    """How far each side of the found box lies from the true box's, in mm (positive: the found
    box is smaller there, so it cuts into the truth)."""
    errors = []
    for axis, s in enumerate(spacing):
        errors.append((core[0][axis] - truth[0][axis]) * float(s))
        errors.append((truth[1][axis] - core[1][axis]) * float(s))
    return errors


def measure(
    found: dict[str, Localisation],
    cases: dict[str, Case],
    localiser: Localiser,
    jitter_mm: float | None,
) -> Cascade:
    """The localiser's out-of-fold boxes against the truth: per case the share of tumor voxels
    inside the box (recall) and the box-side errors; the jitter the main network trains with
    (`jitter_mm`, or the 90th percentile of the absolute side errors when None)."""
    per_case, errors = {}, []
    for case_id, localisation in sorted(found.items()):
        label_image = read_image(cases[case_id].label)
        label = sitk.GetArrayViewFromImage(label_image)
        spacing = tuple(reversed(label_image.GetSpacing()))
        tumor = label == TUMOR
        truth = foreground_box(label)
        entry = {
            "box": _listed(localisation.box),
            "found": _listed(localisation.core),
            "reason": localisation.reason,
            "foreground_ml": round(localisation.foreground_ml, 3),
        }
        if localisation.box is None:
            entry["recall"] = 1.0 if tumor.any() else None  # the whole image was searched
        else:
            inside = tumor[tuple(slice(a, b) for a, b in zip(*localisation.box, strict=True))]
            entry["recall"] = float(inside.sum()) / float(tumor.sum()) if tumor.any() else None
        if localisation.core is not None and truth is not None:
            entry["side_errors_mm"] = [
                round(e, 2) for e in _side_errors_mm(localisation.core, truth, spacing)
            ]
            errors += entry["side_errors_mm"]
        per_case[case_id] = entry
    measured = float(np.percentile(np.abs(errors), JITTER_PERCENTILE)) if errors else 0.0
    recalls = {c: e["recall"] for c, e in per_case.items() if e["recall"] is not None}
    worst = min(recalls, key=recalls.get) if recalls else None
    return Cascade(
        margin_mm=localiser.margin_mm,
        jitter_mm=round(measured if jitter_mm is None else jitter_mm, 2),
        jitter_measured=jitter_mm is None,
        min_foreground_ml=localiser.min_foreground_ml,
        max_extent_mm=localiser.max_extent_mm,
        recall={
            "mean": float(np.mean(list(recalls.values()))) if recalls else None,
            "min": recalls[worst] if worst else None,
            "worst_case": worst,
            "cases": len(recalls),
            "whole_image_fallbacks": sum(1 for e in per_case.values() if e["box"] is None),
        },
        cases=per_case,
    )


def _listed(box: Box | None) -> list[list[int]] | None:
    return None if box is None else [list(map(int, box[0])), list(map(int, box[1]))]


def boxes_of(record: Cascade) -> dict[str, Box | None]:
    """Each case's out-of-fold box (None: the whole image), as the main network's out-of-fold
    prediction takes it."""
    return {
        case_id: None if entry["box"] is None else (tuple(entry["box"][0]), tuple(entry["box"][1]))
        for case_id, entry in record.cases.items()
    }
