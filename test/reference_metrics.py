"""The official evaluation's metric calls, on DeepMind's surface-distance package, for comparison.

The package predates NumPy 2 and uses `np.Inf`/`np.NaN` for one-sided empty surfaces; the aliases
are restored here for the reference alone.
"""

from __future__ import annotations

import numpy as np

if not hasattr(np, "Inf"):  # NumPy 2 removed the aliases the reference package still uses.
    np.Inf = np.inf  # type: ignore[attr-defined]
    np.NaN = np.nan  # type: ignore[attr-defined]

from surface_distance import metrics as reference


def reference_scores(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """The organisers' script's scores for a non-uniform prediction (spacing per array axis)."""
    sd = reference.compute_surface_distances(gt, pred, spacing_mm=spacing)
    gt_to_pred, pred_to_gt = reference.compute_average_surface_distance(sd)
    return {
        "surface_distances": sd,
        "dice": reference.compute_dice_coefficient(gt, pred),
        "surface_dice": reference.compute_surface_dice_at_tolerance(sd, tolerance_mm=5),
        "hd95": reference.compute_robust_hausdorff(sd, percent=95),
        "masd": (gt_to_pred + pred_to_gt) / 2.0,
    }
