"""Self-training: pseudo-labels for unannotated scans from the cross-validation ensemble, written
as a dataset folder that a second round of training adds to its annotated cases.

    python -m training pseudo-label --work work/ --out pseudo/
    python -m training plan --data PANTHER_Task1 --work work2/ --extra-labelled pseudo/

Every fold's best network predicts through `pantherseg.inference.pipeline.Segmenter`, the code
path the container runs: the same preprocessing, sliding window, fold averaging, mirroring and the
post-processing that cross-validation chose, so a pseudo-label is exactly the mask the exported
model would submit for that scan. The output folder is in the PANTHER layout that
`training.data.discover` reads:

    <out>/ImagesTr/<id>_0000.<ext>   the unlabelled image (a hard link when possible, else a copy)
    <out>/LabelsTr/<id>.<ext>        uint8, 1 tumor, 0 elsewhere, on the image's grid
    <out>/pseudo_labels.json         per case: source image, tumor volume, post-processing notes

Pseudo-labels carry only tumor (no pancreas), so they suit `data.labels: tumor` training; with
`tumor+pancreas` their pancreas would be learnt as background. The scans of PANTHER Task 1's
unlabelled set are of other MRI sequences than the annotated ones: whether they help is what the
second round's cross-validation (on the annotated cases only) tells.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pantherseg.inference.files import atomic_output, atomic_write_text
from pantherseg.inference.io import check_inference_image, read_image, write_mask
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import Plan
from training.data import Case
from training.trainer import torch_predictor

log = logging.getLogger("pantherseg.training")

MANIFEST = "pseudo_labels.json"
IMAGES_DIR, LABELS_DIR = "ImagesTr", "LabelsTr"


def ensemble_segmenter(
    plan: Plan, networks: Sequence[torch.nn.Module], device: torch.device, amp: bool = True
) -> Segmenter:
    """The fold networks as one pantherseg Segmenter (averaged, mirrored as the plan says)."""
    predictors = [torch_predictor(net.to(device).eval(), device, amp) for net in networks]
    return Segmenter(plan, predictors, f"{len(networks)} fold(s)", on_gpu=device.type == "cuda")


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (hard link, else copy), atomically."""
    with atomic_output(target) as tmp:
        tmp.unlink()  # a link needs a free name
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, tmp)


def write_pseudo_labels(
    plan: Plan,
    networks: Sequence[torch.nn.Module],
    cases: Sequence[Case],
    out_dir: Path,
    device: torch.device,
    amp: bool = True,
    progress: bool = True,
    postprocessing_name: str = "plan default",
) -> list[dict]:
    """Segments every case's image with the fold ensemble and writes the dataset folder described
    in the module docstring; returns the manifest entries. `postprocessing_name` (the variant
    cross-validation chose) is recorded in the manifest."""
    if not cases:
        raise ValueError("no unlabelled images to pseudo-label")
    out_dir = Path(out_dir)
    images, labels = out_dir / IMAGES_DIR, out_dir / LABELS_DIR
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    segmenter = ensemble_segmenter(plan, networks, device, amp)
    entries = []
    for case in tqdm(cases, desc="pseudo-labels", unit="case", disable=not progress):
        image = read_image(case.image)
        array = check_inference_image(image, case.image)
        spacing = tuple(reversed(image.GetSpacing()))
        result = segmenter.segment(array, spacing, image.GetDirection())
        ext = _extension(case.image)
        write_mask(result.mask, image, labels / f"{case.case_id}{ext}")
        _link_or_copy(case.image, images / f"{case.case_id}_0000{ext}")
        voxels = int(result.mask.sum())
        entries.append(
            {
                "case_id": case.case_id,
                "source_image": str(case.image),
                "tumor_voxels": voxels,
                "tumor_mm3": voxels * float(np.prod(spacing)),
                "fallback": result.report.fallback,
            }
        )
    manifest = {
        "description": "pseudo-labels (1 tumor) from the cross-validation ensemble",
        "folds": len(networks),
        "postprocessing": postprocessing_name,
        "cases": entries,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info("%d pseudo-label(s) written to %s", len(entries), out_dir)
    return entries
