"""The PANTHER challenge metrics, with the semantics of DeepMind's surface-distance package.

The official evaluation scores with `surface_distance.metrics`. That package sorts surface elements
with a Python-level `sorted(zip(...))`, builds two full distance transforms over the bounding box of
both masks, and breaks on NumPy 2 (`np.Inf`) for one-sided empty masks. This module keeps its exact
definitions (surface elements on the voxel-corner grid, marching-cubes surfel areas, area-weighted
percentiles and averages) but finds nearest surface points with a k-d tree, which costs time in
proportion to the surface instead of the volume. The surfel area table itself is taken from the
package, because it *is* the definition of the metric.

Spacing is applied in the array's (z, y, x) axis order. The organisers' local script passes
SimpleITK's (x, y, z) spacing to (z, y, x) arrays; `convention="xyz"` reproduces that, for
comparison.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

SpacingConvention = Literal["zyx", "xyz"]
SPACING_CONVENTIONS: tuple[SpacingConvention, ...] = ("zyx", "xyz")

DEFAULT_TOLERANCE_MM = 5.0
CASE_MEAN_METRICS = ("dice", "surface_dice", "hd95", "masd")  # averaged over cases with a tumor
DEFAULT_HAUSDORFF_PERCENT = 95.0

# Bit weight of each corner of a 2x2x2 cube, indexed by the corner's (dz, dy, dx) offset. It is the
# surface-distance package's neighbourhood code, so its area table can be indexed with our codes.
_CORNER_WEIGHTS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances from every surface element of one mask to the other mask's surface, with areas."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    areas_gt: np.ndarray
    areas_pred: np.ndarray


@dataclass(frozen=True)
class CaseMetrics:
    """One case's scores, as the challenge reports them."""

    dice: float
    surface_dice: float
    hd95: float
    masd: float
    gt_volume_mm3: float
    pred_volume_mm3: float
    uniform_prediction: bool

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def applied_spacing(spacing_zyx: Sequence[float], convention: SpacingConvention) -> np.ndarray:
    """The per-array-axis spacing that a convention ends up using.

    "zyx" is correct; "xyz" reproduces the organisers' script, which hands SimpleITK's (x, y, z)
    spacing to (z, y, x) arrays and so puts the slice spacing on the x axis.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive numbers, got {list(spacing_zyx)}")
    if convention == "zyx":
        return spacing
    if convention == "xyz":
        return spacing[::-1].copy()
    raise ValueError(f"unknown spacing convention {convention!r}; use one of {SPACING_CONVENTIONS}")


@lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    # Imported lazily: only scoring needs it, the inference container does not.
    from surface_distance import lookup_tables

    return np.asarray(lookup_tables.create_table_neighbour_code_to_surface_area(spacing))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner that can touch the mask.

    A corner's code has one bit per voxel of the 2x2x2 cube around it. Padding the mask with one
    empty voxel on each side makes every corner of the (cropped) mask appear exactly once.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    out_shape = tuple(s - 1 for s in padded.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                part = padded[
                    dz : dz + out_shape[0], dy : dy + out_shape[1], dx : dx + out_shape[2]
                ]
                codes += part * _CORNER_WEIGHTS[dz, dy, dx]
    return codes


def _surface(codes: np.ndarray, spacing: np.ndarray, areas: np.ndarray):
    border = (codes != 0) & (codes != 255)
    points = np.argwhere(border).astype(np.float64) * spacing
    return points, areas[codes[border]]


def _nearest_distances(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if points.shape[0] == 0:
        return np.zeros(0)
    if targets.shape[0] == 0:
        return np.full(points.shape[0], np.inf)
    distances, _ = cKDTree(targets).query(points, k=1, workers=-1)
    return distances


def _sorted_by_distance(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Same order as the reference (distance, then area), so percentiles land on the same element.
    order = np.lexsort((areas, distances))
    return distances[order], areas[order]


def surface_distances(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]
) -> SurfaceDistances:
    """Surface elements of both masks and their distances to the other surface.

    `spacing` is per array axis, in mm. Both masks must be boolean arrays of the same 3D shape.
    """
    gt, pred = _checked_pair(gt, pred)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    box = _bounding_box(gt | pred)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    areas = _surfel_area_table(tuple(float(s) for s in spacing_arr))
    gt_points, gt_areas = _surface(_corner_codes(gt[box]), spacing_arr, areas)
    pred_points, pred_areas = _surface(_corner_codes(pred[box]), spacing_arr, areas)
    d_gt, a_gt = _sorted_by_distance(_nearest_distances(gt_points, pred_points), gt_areas)
    d_pred, a_pred = _sorted_by_distance(_nearest_distances(pred_points, gt_points), pred_areas)
    return SurfaceDistances(d_gt, d_pred, a_gt, a_pred)


def _checked_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.dtype != bool or pred.dtype != bool:
        raise TypeError(f"masks must be boolean arrays, got {gt.dtype} and {pred.dtype}")
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise ValueError(f"masks must be 3D and of one shape, got {gt.shape} and {pred.shape}")
    return gt, pred


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice; NaN when both masks are empty, as in the reference package."""
    gt, pred = _checked_pair(gt, pred)
    total = int(gt.sum()) + int(pred.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


def surface_dice(sd: SurfaceDistances, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Fraction of both surfaces (by area) within `tolerance_mm` of the other surface."""
    close_gt = sd.areas_gt[sd.distances_gt_to_pred <= tolerance_mm].sum()
    close_pred = sd.areas_pred[sd.distances_pred_to_gt <= tolerance_mm].sum()
    total = sd.areas_gt.sum() + sd.areas_pred.sum()
    return float((close_gt + close_pred) / total) if total > 0 else math.nan


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    if distances.size == 0:
        return math.inf
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(index, distances.size - 1)])


def robust_hausdorff(sd: SurfaceDistances, percent: float = DEFAULT_HAUSDORFF_PERCENT) -> float:
    """The larger of the two directed area-weighted `percent`-th percentile distances, in mm."""
    return max(
        _area_percentile(sd.distances_gt_to_pred, sd.areas_gt, percent),
        _area_percentile(sd.distances_pred_to_gt, sd.areas_pred, percent),
    )


def _area_mean(distances: np.ndarray, areas: np.ndarray) -> float:
    total = areas.sum()
    if total == 0:
        return math.nan
    return float(np.sum(distances * areas) / total)


def average_surface_distances(sd: SurfaceDistances) -> tuple[float, float]:
    """(ground truth to prediction, prediction to ground truth) area-weighted mean distances."""
    return (
        _area_mean(sd.distances_gt_to_pred, sd.areas_gt),
        _area_mean(sd.distances_pred_to_gt, sd.areas_pred),
    )


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The penalty distance for a uniform prediction: the image diagonal in mm."""
    return float(np.linalg.norm(np.asarray(shape, dtype=np.float64) * np.asarray(spacing)))


def score_case(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing_zyx: Sequence[float],
    convention: SpacingConvention = "zyx",
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> CaseMetrics:
    """All challenge metrics for one case.

    A uniform prediction (all background or all foreground) gets the challenge's penalty: Dice and
    surface Dice 0, HD95 and MASD the image diagonal, and a predicted volume of 0 (the organisers'
    script records 0 even for an all-foreground mask).
    """
    gt, pred = _checked_pair(gt, pred)
    spacing = applied_spacing(spacing_zyx, convention)
    voxel_mm3 = float(np.prod(spacing))
    gt_volume = float(np.count_nonzero(gt)) * voxel_mm3
    n_pred = int(np.count_nonzero(pred))
    if n_pred == 0 or n_pred == pred.size:
        diagonal = image_diagonal_mm(gt.shape, spacing)
        return CaseMetrics(0.0, 0.0, diagonal, diagonal, gt_volume, 0.0, True)
    sd = surface_distances(gt, pred, spacing)
    gt_to_pred, pred_to_gt = average_surface_distances(sd)
    return CaseMetrics(
        dice=dice(gt, pred),
        surface_dice=surface_dice(sd, tolerance_mm),
        hd95=robust_hausdorff(sd, DEFAULT_HAUSDORFF_PERCENT),
        masd=(gt_to_pred + pred_to_gt) / 2.0,
        gt_volume_mm3=gt_volume,
        pred_volume_mm3=float(n_pred) * voxel_mm3,
        uniform_prediction=False,
    )


def tumor_burden_rmse(gt_volumes_mm3: Sequence[float], pred_volumes_mm3: Sequence[float]) -> float:
    """Root mean squared error of the tumor volume over cases, in mm^3."""
    gt = np.asarray(gt_volumes_mm3, dtype=np.float64)
    pred = np.asarray(pred_volumes_mm3, dtype=np.float64)
    if gt.shape != pred.shape or gt.size == 0:
        raise ValueError("tumor burden needs one predicted volume per ground-truth volume")
    return float(np.sqrt(np.mean((pred - gt) ** 2)))


# Aggregate name -> True when a higher value is better. The challenge ranks teams on each.
RANKED_AGGREGATES: dict[str, bool] = {
    "dice": True,
    "surface_dice": True,
    "hd95": False,
    "masd": False,
    "tumor_burden_rmse": False,
}


def aggregate(cases: Sequence[CaseMetrics]) -> dict[str, float | int]:
    """Means of the per-case metrics and the tumor burden RMSE, as the leaderboard shows them.

    The overlap and distance metrics are undefined for a case without tumor (the reference package
    gives infinite or NaN distances), so their means run over cases with a tumor only; the count of
    the others is reported. The tumor burden RMSE runs over every case.
    """
    if not cases:
        raise ValueError("no cases to aggregate")
    with_tumor = [c for c in cases if c.gt_volume_mm3 > 0]
    summary: dict[str, float | int] = {}
    for name in CASE_MEAN_METRICS:
        values = [getattr(c, name) for c in with_tumor]
        summary[name] = float(np.mean(values)) if values else math.nan
    summary["tumor_burden_rmse"] = tumor_burden_rmse(
        [c.gt_volume_mm3 for c in cases], [c.pred_volume_mm3 for c in cases]
    )
    summary["n_cases"] = len(cases)
    summary["n_without_tumor"] = len(cases) - len(with_tumor)
    summary["n_uniform_predictions"] = sum(c.uniform_prediction for c in cases)
    return summary


TUMOR_VOLUME_BANDS_ML = (2.0, 5.0, 10.0)  # band edges: under 2, 2 to 5, 5 to 10, 10 mL and more


def _band_label(low: float, high: float) -> str:
    if low == 0:
        return f"under {high:g} mL"
    if math.isinf(high):
        return f"{low:g} mL and more"
    return f"{low:g} to {high:g} mL"


def volume_band_bounds(edges_ml: Sequence[float]) -> list[float]:
    """0, the edges, infinity; an error for edges that do not rise from above 0 mL."""
    bounds = [0.0, *edges_ml, math.inf]
    if any(low >= high for low, high in itertools.pairwise(bounds)):
        raise ValueError(f"volume band edges must rise from above 0 mL, got {list(edges_ml)}")
    return bounds


def by_tumor_volume(
    cases: Sequence[CaseMetrics], edges_ml: Sequence[float] = TUMOR_VOLUME_BANDS_ML
) -> list[dict[str, float | int | str | None]]:
    """Means of the overlap and distance metrics per band of true tumor volume, for the bands
    that hold a case. Small tumors are where models fail, and an overall mean hides how many of
    them a test set holds."""
    rows: list[dict[str, float | int | str | None]] = []
    for low, high in itertools.pairwise(volume_band_bounds(edges_ml)):
        band = [c for c in cases if c.gt_volume_mm3 > 0 and low <= c.gt_volume_mm3 / 1000 < high]
        if band:
            means = aggregate(band)
            rows.append(
                {
                    "band": _band_label(low, high),
                    "min_ml": low,
                    "max_ml": None if math.isinf(high) else high,
                    "n_cases": len(band),
                    **{name: means[name] for name in CASE_MEAN_METRICS},
                }
            )
    return rows


def rank_methods(summaries: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The challenge's ranking: rank methods on each aggregate, then average the ranks.

    Ties share the best rank (1, 1, 3), and NaN ranks last. Returns, per method, its rank on each
    metric and its `mean_rank` (lower is better).
    """
    names = list(summaries)
    ranks: dict[str, dict[str, float]] = {name: {} for name in names}
    for metric, higher_is_better in RANKED_AGGREGATES.items():
        values = np.array([summaries[n].get(metric, math.nan) for n in names], dtype=np.float64)
        keyed = np.where(np.isnan(values), np.inf, -values if higher_is_better else values)
        for i, name in enumerate(names):
            ranks[name][metric] = float(1 + np.count_nonzero(keyed < keyed[i]))
    for name in names:
        ranks[name]["mean_rank"] = float(np.mean([ranks[name][m] for m in RANKED_AGGREGATES]))
    return ranks
