"""From tumor probability to the submitted mask: threshold, component rules, never-empty rule.

The rules and their parameters come from the plan, where training chose them on out-of-fold
predictions. The never-empty rule exists because the challenge scores an empty mask with the image
diagonal as HD95 and MASD, which outweighs almost any false positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pantherseg.inference.plan import PancreasGuidance, Postprocessing


@dataclass
class PostprocessReport:
    """What the rules did, for the log and for tuning."""

    components_found: int = 0
    removed_small: int = 0
    removed_outside_pancreas: int = 0
    kept: int = 0
    fallback: str = ""
    notes: list[str] = field(default_factory=list)


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components; `connectivity` 6, 18 or 26 neighbours (face, edge, corner)."""
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(3, rank))


def dilate_mm(mask: np.ndarray, spacing_zyx: Sequence[float], radius_mm: float) -> np.ndarray:
    """Dilation by a physical radius on an anisotropic grid, computed inside the mask's bounding
    box plus the radius so that large volumes stay cheap."""
    if not mask.any() or radius_mm <= 0:
        return mask.copy()
    margin = [int(np.ceil(radius_mm / s)) for s in spacing_zyx]
    coords = np.nonzero(mask)
    box = tuple(
        slice(max(0, int(c.min()) - m), min(n, int(c.max()) + m + 1))
        for c, m, n in zip(coords, margin, mask.shape, strict=True)
    )
    distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing_zyx)
    out = np.zeros_like(mask)
    out[box] = distance <= radius_mm
    return out


def _pancreas_overlap(
    labels: np.ndarray,
    count: int,
    pancreas_probability: np.ndarray,
    spacing_zyx: Sequence[float],
    guidance: PancreasGuidance,
) -> np.ndarray | None:
    """Fraction of each component (index 1..count) inside the dilated pancreas; None when no
    pancreas was predicted, since then there is nothing to judge by."""
    pancreas = pancreas_probability >= guidance.pancreas_threshold
    if not pancreas.any():
        return None
    region = dilate_mm(pancreas, spacing_zyx, guidance.dilation_mm)
    inside = np.bincount(labels[region], minlength=count + 1)[1:]
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return inside / np.maximum(sizes, 1)


def _region_around_peak(probability: np.ndarray, connectivity: int) -> np.ndarray:
    """Voxels connected to the most probable voxel whose probability is at least half of its own;
    used only when no voxel passed the threshold."""
    peak = np.unravel_index(int(np.argmax(probability)), probability.shape)
    peak_value = float(probability[peak])
    if peak_value <= 0:
        single = np.zeros(probability.shape, dtype=bool)
        single[peak] = True
        return single
    labels, _ = _components(probability >= peak_value / 2, connectivity)
    return labels == labels[peak]


def postprocess(
    tumor_probability: np.ndarray,
    spacing_zyx: Sequence[float],
    settings: Postprocessing,
    pancreas_probability: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, PostprocessReport]:
    """The uint8 {0, 1} tumor mask on the probability's grid, and what was done to get it.

    The tumor voxels before the component rules are those whose probability reaches the
    threshold, or, with the argmax decision, `candidates` (where tumor is the likeliest class).
    """
    report = PostprocessReport()
    if settings.decision == "argmax":
        if candidates is None:
            raise ValueError(
                "the argmax decision needs the voxels where tumor is the likeliest class"
            )
    else:
        candidates = tumor_probability >= settings.threshold
    labels, count = _components(candidates, settings.connectivity)
    report.components_found = count
    keep = np.ones(count + 1, dtype=bool)
    keep[0] = False
    if count:
        voxel_mm3 = float(np.prod(spacing_zyx))
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_mm3
        small = sizes < settings.min_component_mm3
        small[0] = False
        report.removed_small = int(small.sum())
        keep &= ~small
    guidance = settings.pancreas_guidance
    if count and guidance.enabled:
        if pancreas_probability is None:
            raise ValueError("pancreas guidance is enabled but no pancreas probability was given")
        overlap = _pancreas_overlap(labels, count, pancreas_probability, spacing_zyx, guidance)
        if overlap is None:
            report.notes.append("no pancreas predicted: pancreas guidance skipped")
        else:
            outside = np.concatenate([[False], overlap < guidance.min_overlap]) & keep
            report.removed_outside_pancreas = int(outside.sum())
            keep &= ~outside
    mask = keep[labels]
    report.kept = int(keep.sum())
    if not mask.any() and settings.never_empty:
        if count:
            peaks = ndimage.maximum(tumor_probability, labels, np.arange(1, count + 1))
            mask = labels == int(np.argmax(peaks)) + 1
            report.fallback = "kept the component with the highest peak probability"
        else:
            mask = _region_around_peak(tumor_probability, settings.connectivity)
            report.fallback = "nothing passed the threshold: kept the region around the peak"
    return mask.astype(np.uint8), report
