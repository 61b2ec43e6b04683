"""An HTML evaluation report: the numbers, per-case plots, and overlays a person can check by eye.

Overlays are drawn in the radiological convention (patient right on the screen's left, anterior at
the top) by reorienting a copy of each image to LPS for display only; the scored masks are never
reoriented.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pantherseg import __version__
from pantherseg.inference.files import atomic_output, atomic_write_text
from pantherseg.inference.io import CHANNEL_SUFFIX, ImageError, list_images, read_image
from pantherseg.scoring import metrics
from pantherseg.scoring.evaluate import (
    STATUS_OK,
    TUMOR_LABEL,
    CaseResult,
    MethodEvaluation,
    rankings,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen above, before pyplot loads

GT_COLOUR = "#2ca02c"
PRED_COLOUR = "#d62728"
MAX_TUMORS_SHOWN = 3
ZOOM_MARGIN_MM = 35.0
PLOTTED_METRICS = (
    ("dice", "Dice", (0.0, 1.0)),
    ("surface_dice", "Surface Dice (5 mm)", (0.0, 1.0)),
    ("hd95", "HD95 (mm)", None),
    ("masd", "MASD (mm)", None),
)


def _lps(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def _save(fig: plt.Figure, path: Path) -> str:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def plot_metric_distributions(
    evaluations: Sequence[MethodEvaluation], convention: str, path: Path
) -> str:
    """Per-case values of each metric as points over a box, one column per method."""
    fig, axes = plt.subplots(1, len(PLOTTED_METRICS), figsize=(4 * len(PLOTTED_METRICS), 4))
    rng = np.random.default_rng(0)
    for ax, (key, title, limits) in zip(axes, PLOTTED_METRICS, strict=True):
        columns = []
        for evaluation in evaluations:
            values = [
                getattr(c.scores[convention], key)
                for c in evaluation.cases
                if c.scores[convention].gt_volume_mm3 > 0
            ]
            columns.append([v for v in values if math.isfinite(v)])
        ax.boxplot(columns, showfliers=False, widths=0.5)
        for i, values in enumerate(columns, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.7)
        ax.set_xticks(range(1, len(evaluations) + 1), [e.name for e in evaluations], rotation=20)
        ax.set_title(title)
        if limits:
            ax.set_ylim(*limits)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per-case metrics (cases with a tumor; spacing convention {convention})")
    return _save(fig, path)


def _finish_scatter(
    fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str, path: Path
) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_volumes(evaluations: Sequence[MethodEvaluation], convention: str, path: Path) -> str:
    """Predicted against true tumor volume: the tumor burden metric made visible."""
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 1.0
    for evaluation in evaluations:
        gt = np.array([c.scores[convention].gt_volume_mm3 for c in evaluation.cases]) / 1000
        pred = np.array([c.scores[convention].pred_volume_mm3 for c in evaluation.cases]) / 1000
        rmse = evaluation.summaries[convention]["tumor_burden_rmse"] / 1000
        ax.scatter(gt, pred, s=18, alpha=0.75, label=f"{evaluation.name} (RMSE {rmse:.2f} mL)")
        top = max(top, float(gt.max(initial=0)), float(pred.max(initial=0)))
    ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", linewidth=1, linestyle="--")
    return _finish_scatter(
        fig,
        ax,
        "ground-truth tumor volume (mL)",
        "predicted tumor volume (mL)",
        "Tumor burden",
        path,
    )


def plot_dice_by_volume(
    evaluations: Sequence[MethodEvaluation], convention: str, path: Path
) -> str:
    """Each case's Dice against its true tumor volume (log scale), with the volume bands of the
    summary: where along the size range a method starts to miss tumors."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for evaluation in evaluations:
        scores = [c.scores[convention] for c in evaluation.cases]
        with_tumor = [s for s in scores if s.gt_volume_mm3 > 0]
        ax.scatter(
            [s.gt_volume_mm3 / 1000 for s in with_tumor],
            [s.dice for s in with_tumor],
            s=18,
            alpha=0.75,
            label=evaluation.name,
        )
    edges = sorted({b["min_ml"] for e in evaluations for b in e.by_volume[convention]} - {0.0})
    for edge in edges:
        ax.axvline(edge, color="grey", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    title = "Dice by tumor size (dashed: the summary's volume bands)"
    return _finish_scatter(
        fig, ax, "ground-truth tumor volume (mL, log scale)", "Dice", title, path
    )


def _find_image(images: dict[str, Path], case_id: str) -> Path | None:
    return images.get(case_id + CHANNEL_SUFFIX) or images.get(case_id)


def _tumor_slices(gt: np.ndarray) -> list[tuple[int, tuple[float, float]]]:
    """(axial slice, in-plane centre) through the largest ground-truth tumors."""
    labels, count = ndimage.label(gt)
    if count == 0:
        return []
    sizes = ndimage.sum_labels(gt, labels, index=range(1, count + 1))
    largest = np.argsort(sizes)[::-1][:MAX_TUMORS_SHOWN] + 1
    centres = ndimage.center_of_mass(gt, labels, index=largest)
    return [(round(c[0]), (c[1], c[2])) for c in centres]


def plot_case_overlay(case: CaseResult, image_path: Path | None, path: Path, title: str) -> str:
    """Each of the case's largest tumors: its whole axial slice and a zoom, with the ground truth
    (green) and prediction (red) outlines."""
    gt_image = read_image(case.gt_path)
    gt = _lps(gt_image) == TUMOR_LABEL
    pred = np.zeros_like(gt)
    if case.status == STATUS_OK and case.pred_path is not None:
        pred = _lps(read_image(case.pred_path)) != 0
    background = _lps(read_image(image_path)).astype(np.float32) if image_path else None
    if background is not None and background.shape != gt.shape:
        background = None  # an image of another grid would misplace the outlines
    oriented = sitk.DICOMOrient(gt_image, "LPS")
    spacing_x, spacing_y = oriented.GetSpacing()[:2]
    slices = _tumor_slices(gt)
    fig, axes = plt.subplots(len(slices), 2, figsize=(10, 4.8 * len(slices)), squeeze=False)
    low, high = np.percentile(background, [1, 99.5]) if background is not None else (0, 1)
    for row, (z, (cy, cx)) in zip(axes, slices, strict=True):
        plane = background[z] if background is not None else np.zeros(gt.shape[1:])
        half_y = int(ZOOM_MARGIN_MM / spacing_y)
        half_x = int(ZOOM_MARGIN_MM / spacing_x)
        window = (
            slice(max(0, int(cy) - half_y), int(cy) + half_y),
            slice(max(0, int(cx) - half_x), int(cx) + half_x),
        )
        for ax, crop in zip(row, ((slice(None), slice(None)), window), strict=True):
            ax.imshow(
                plane[crop],
                cmap="gray",
                vmin=low,
                vmax=high,
                aspect=spacing_y / spacing_x,
                interpolation="nearest",
            )
            for mask, colour, style in ((gt, GT_COLOUR, "solid"), (pred, PRED_COLOUR, "dashed")):
                if mask[z][crop].any():
                    ax.contour(
                        mask[z][crop], levels=[0.5], colors=colour, linewidths=1.2, linestyles=style
                    )
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_title(f"axial slice {z} (LPS display order)", fontsize=9)
        row[1].set_title(f"zoom, {2 * ZOOM_MARGIN_MM:.0f} mm field", fontsize=9)
    fig.suptitle(title + ("" if background is not None else " (no input image found)"))
    return _save(fig, path)


def _pick_cases(evaluation: MethodEvaluation, convention: str) -> list[tuple[str, CaseResult]]:
    """Best, median and worst case by Dice, among cases with a tumor."""
    with_tumor = [c for c in evaluation.cases if c.scores[convention].gt_volume_mm3 > 0]
    if not with_tumor:
        return []
    ordered = sorted(with_tumor, key=lambda c: c.scores[convention].dice)
    picks = [("best", ordered[-1]), ("median", ordered[len(ordered) // 2]), ("worst", ordered[0])]
    seen, unique = set(), []
    for role, case in picks:
        if case.case_id not in seen:
            seen.add(case.case_id)
            unique.append((role, case))
    return unique


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if math.isfinite(value) else str(value)
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; } .problem { color: #a00; }
"""


def write_report(
    evaluations: Sequence[MethodEvaluation],
    out_dir: Path,
    images_dir: Path | None = None,
    convention: str = "zyx",
) -> Path:
    """Writes `index.html` and its PNG figures into `out_dir`; returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = list_images(images_dir) if images_dir else {}
    ranks = rankings(evaluations)[convention]
    parts = [
        f"<h1>PANTHER evaluation report</h1><p class='note'>pantherseg {__version__}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Spacing convention <b>{convention}</b>"
        f"{' (correct)' if convention == 'zyx' else ' (the organisers&#39; script)'}; ground truth "
        f"label {TUMOR_LABEL} only. Means of Dice, surface Dice, HD95 and MASD run over cases "
        "with a tumor; the tumor burden RMSE over all cases.</p>",
        "<h2>Summary</h2>",
    ]
    header = [
        "method",
        "Dice",
        "surface Dice",
        "HD95 mm",
        "MASD mm",
        "burden RMSE mm³",
        "cases",
        "without tumor",
        "not scored normally",
        "mean rank",
    ]
    rows = []
    for e in sorted(evaluations, key=lambda e: ranks[e.name]["mean_rank"]):
        s = e.summaries[convention]
        failed = sum(c.status != STATUS_OK for c in e.cases)
        rows.append(
            [
                e.name,
                s["dice"],
                s["surface_dice"],
                s["hd95"],
                s["masd"],
                s["tumor_burden_rmse"],
                s["n_cases"],
                s["n_without_tumor"],
                failed,
                ranks[e.name]["mean_rank"],
            ]
        )
    parts.append(_table(header, rows))
    parts.append(
        "<h2>By true tumor volume</h2><p class='note'>Means over the cases whose tumor falls in "
        "each band: small tumors are where segmentation fails.</p>"
    )
    band_header = ["method", "tumor volume", "cases", "Dice", "surface Dice", "HD95 mm", "MASD mm"]
    band_rows = [
        [e.name, b["band"], b["n_cases"], b["dice"], b["surface_dice"], b["hd95"], b["masd"]]
        for e in evaluations
        for b in e.by_volume[convention]
    ]
    parts.append(_table(band_header, band_rows))
    if band_rows:
        name = plot_dice_by_volume(evaluations, convention, out_dir / "dice_by_volume.png")
        parts.append(f"<img src='{name}' alt='Dice by tumor volume'>")
    for e in evaluations:
        problems = e.problems()
        if problems:
            items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
            parts.append(
                f"<p class='problem'>{html.escape(e.name)}: scored as empty "
                f"predictions or ignored:</p><ul class='problem'>{items}</ul>"
            )
    parts.append("<h2>Per-case distributions</h2>")
    name = plot_metric_distributions(evaluations, convention, out_dir / "metrics.png")
    parts.append(f"<img src='{name}' alt='per-case metric distributions'>")
    name = plot_volumes(evaluations, convention, out_dir / "volumes.png")
    parts.append(f"<img src='{name}' alt='tumor volumes'>")
    for index, e in enumerate(evaluations):
        parts.append(
            f"<h2>{html.escape(e.name)}: best, median and worst cases</h2>"
            "<p class='note'>Green: ground truth. Red, dashed: prediction.</p>"
        )
        for role, case in _pick_cases(e, convention):
            image_path = _find_image(images, case.case_id)
            try:
                png = plot_case_overlay(
                    case,
                    image_path,
                    out_dir / f"overlay_{index}_{role}.png",
                    f"{e.name}, {role}: {case.case_id} (Dice {case.scores[convention].dice:.3f})",
                )
            except ImageError as error:
                parts.append(f"<p class='problem'>{html.escape(str(error))}</p>")
                continue
            parts.append(f"<h3>{role}: {html.escape(case.case_id)}</h3><img src='{png}'>")
        parts.append(f"<h3>All cases of {html.escape(e.name)}</h3>")
        case_header = [
            "case",
            "Dice",
            "surface Dice",
            "HD95",
            "MASD",
            "GT mL",
            "pred mL",
            "status",
            "detail",
        ]
        case_rows = []
        for c in e.cases:
            s: metrics.CaseMetrics = c.scores[convention]
            case_rows.append(
                [
                    c.case_id,
                    s.dice,
                    s.surface_dice,
                    s.hd95,
                    s.masd,
                    s.gt_volume_mm3 / 1000,
                    s.pred_volume_mm3 / 1000,
                    c.status,
                    c.detail,
                ]
            )
        parts.append(_table(case_header, case_rows))
    page = out_dir / "index.html"
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>PANTHER evaluation"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    atomic_write_text(page, document)
    return page
