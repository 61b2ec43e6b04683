"""Scoring folders of predicted masks against ground truth, the way the challenge does.

A prediction that is missing, unreadable, on another grid, or not binary would fail on
grand-challenge; here it is scored as an empty prediction (the challenge's penalty) and reported by
name, so one bad case can neither hide nor stop the evaluation of the others.
"""

from __future__ import annotations

import csv
import io as text_io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pantherseg.inference.files import atomic_write_json, atomic_write_text
from pantherseg.inference.io import (
    CHANNEL_SUFFIX,
    Geometry,
    ImageError,
    list_images,
    read_image,
)
from pantherseg.parallel import parallel_map
from pantherseg.scoring import metrics

TUMOR_LABEL = 1  # training labels also carry pancreas = 2, which is not scored

STATUS_OK = "ok"
STATUS_MISSING = "missing"
STATUS_UNREADABLE = "unreadable"
STATUS_GEOMETRY = "geometry mismatch"
STATUS_VALUES = "invalid values"

METRIC_COLUMNS = ("dice", "surface_dice", "hd95", "masd", "gt_volume_mm3", "pred_volume_mm3")


@dataclass
class CaseResult:
    """One case of one method: how it was read and what it scored (by spacing convention)."""

    case_id: str
    status: str
    detail: str
    gt_path: Path
    pred_path: Path | None
    scores: dict[str, metrics.CaseMetrics] = field(default_factory=dict)


@dataclass
class MethodEvaluation:
    """All cases of one prediction folder, its aggregates, and what did not match."""

    name: str
    pred_dir: Path
    cases: list[CaseResult]
    extra_predictions: list[str]
    summaries: dict[str, dict[str, float | int]]
    by_volume: dict[str, list[dict]]  # per convention: metrics.by_tumor_volume's bands

    def problems(self) -> list[str]:
        lines = [
            f"{c.case_id}: {c.status}: {c.detail}" for c in self.cases if c.status != STATUS_OK
        ]
        lines += [
            f"{name}: prediction without ground truth (ignored)" for name in self.extra_predictions
        ]
        return lines


class EvaluationError(ValueError):
    """An evaluation that cannot start: no ground truth, an unusable folder, nothing matched."""


def match_predictions(
    gt_files: dict[str, Path], pred_files: dict[str, Path]
) -> tuple[dict[str, Path | None], list[str]]:
    """Pairs each ground-truth case with its prediction.

    A prediction may carry the case id (`10000_0001.mha`, as the labels do) or the input image's
    name (`10000_0001_0000.mha`, as a container names its output).
    """
    matched: dict[str, Path | None] = {}
    used: set[str] = set()
    for case_id in gt_files:
        candidates = [s for s in (case_id, case_id + CHANNEL_SUFFIX) if s in pred_files]
        if len(candidates) > 1:
            names = ", ".join(pred_files[s].name for s in candidates)
            raise EvaluationError(f"case {case_id}: two predictions could be meant ({names})")
        matched[case_id] = pred_files[candidates[0]] if candidates else None
        used.update(candidates)
    extra = sorted(pred_files[s].name for s in pred_files if s not in used)
    return matched, extra


def _binary_prediction(array: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The prediction as a boolean mask, following the organisers' script: {0, 1} as it is, two
    values with 0 binarised (with a note), anything else refused."""
    if array.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        values = np.unique(array)
    if set(values.tolist()) <= {0, 1}:
        return array.astype(bool), ""
    if len(values) == 2 and values[0] == 0:
        return array != 0, f"values {values.tolist()} binarised as nonzero"
    shown = values[:6].tolist()
    return None, f"prediction values {shown}{' ...' if len(values) > 6 else ''} are not binary"


def score_pair(
    case_id: str,
    gt_path: Path,
    pred_path: Path | None,
    conventions: Sequence[metrics.SpacingConvention] = ("zyx",),
    tolerance_mm: float = metrics.DEFAULT_TOLERANCE_MM,
) -> CaseResult:
    """Reads one ground truth and its prediction and scores them; problems with the prediction
    become a status and an empty-prediction score, problems with the ground truth are errors."""
    gt_image = read_image(gt_path)
    gt = sitk.GetArrayViewFromImage(gt_image) == TUMOR_LABEL
    gt_geometry = Geometry.of(gt_image)
    status, detail, pred = STATUS_OK, "", None
    if pred_path is None:
        status, detail = STATUS_MISSING, "no prediction file"
    else:
        try:
            pred_image = read_image(pred_path)
        except ImageError as error:
            status, detail = STATUS_UNREADABLE, str(error)
        else:
            differences = gt_geometry.differences(Geometry.of(pred_image))
            fatal = [d for d in differences if d.startswith(("size", "spacing"))]
            if fatal:
                status, detail = STATUS_GEOMETRY, "; ".join(fatal)
            else:
                pred, detail = _binary_prediction(sitk.GetArrayViewFromImage(pred_image))
                if pred is None:
                    status = STATUS_VALUES
                detail = "; ".join(filter(None, [detail, *differences]))
    if pred is None:
        pred = np.zeros_like(gt)
    scores = {
        c: metrics.score_case(gt, pred, gt_geometry.spacing_zyx, c, tolerance_mm)
        for c in conventions
    }
    return CaseResult(case_id, status, detail, Path(gt_path), pred_path, scores)


def _score_job(args: tuple) -> CaseResult:
    return score_pair(*args)


def evaluate_folder(
    pred_dir: Path,
    gt_dir: Path,
    name: str | None = None,
    conventions: Sequence[metrics.SpacingConvention] = ("zyx",),
    tolerance_mm: float = metrics.DEFAULT_TOLERANCE_MM,
    jobs: int = 1,
    progress: bool = True,
    volume_bands_ml: Sequence[float] = metrics.TUMOR_VOLUME_BANDS_ML,
) -> MethodEvaluation:
    """Scores every ground-truth case of `gt_dir` against its prediction in `pred_dir`, and
    averages them overall and per band of true tumor volume (edges `volume_bands_ml`)."""
    gt_files = list_images(gt_dir)
    if not gt_files:
        raise EvaluationError(f"{gt_dir}: no ground-truth images (.mha, .nii.gz, .nii, .nrrd)")
    pred_files = list_images(pred_dir)
    matched, extra = match_predictions(gt_files, pred_files)
    if not any(matched.values()):
        raise EvaluationError(
            f"{pred_dir}: none of its {len(pred_files)} images matches a case of {gt_dir} "
            f"(first cases expected: {', '.join(list(gt_files)[:3])})"
        )
    tasks = [
        (cid, gt_files[cid], matched[cid], tuple(conventions), tolerance_mm) for cid in gt_files
    ]
    label = name or Path(pred_dir).name
    cases = list(parallel_map(_score_job, tasks, max(1, jobs), progress, f"scoring {label}"))
    summaries = {c: metrics.aggregate([case.scores[c] for case in cases]) for c in conventions}
    by_volume = {
        c: metrics.by_tumor_volume([case.scores[c] for case in cases], volume_bands_ml)
        for c in conventions
    }
    return MethodEvaluation(label, Path(pred_dir), cases, extra, summaries, by_volume)


def rankings(evaluations: Sequence[MethodEvaluation]) -> dict[str, dict[str, dict[str, float]]]:
    """The challenge ranking of the methods, for each spacing convention they were scored with."""
    conventions = evaluations[0].summaries.keys()
    return {
        c: metrics.rank_methods({e.name: e.summaries[c] for e in evaluations}) for c in conventions
    }


def case_rows(evaluations: Sequence[MethodEvaluation]) -> list[dict[str, object]]:
    """One row per method, case and spacing convention: what the per-case CSV holds."""
    rows = []
    for evaluation in evaluations:
        for case in evaluation.cases:
            for convention, scores in case.scores.items():
                values = scores.as_dict()
                rows.append(
                    {
                        "method": evaluation.name,
                        "case_id": case.case_id,
                        "convention": convention,
                        "status": case.status,
                        **{k: values[k] for k in METRIC_COLUMNS},
                        "uniform_prediction": values["uniform_prediction"],
                        "detail": case.detail,
                    }
                )
    return rows


def write_results(
    evaluations: Sequence[MethodEvaluation], out_dir: Path, tolerance_mm: float
) -> None:
    """`metrics.csv` (per case) and `summary.json` (aggregates, problems, ranking) in `out_dir`.
    summary.json is strict JSON: a mean with no value (no case with a tumor) is null."""
    rows = case_rows(evaluations)
    buffer = text_io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(out_dir) / "metrics.csv", buffer.getvalue())
    summary = {
        "tolerance_mm": tolerance_mm,
        "tumor_label": TUMOR_LABEL,
        "methods": {
            e.name: {
                "pred_dir": str(e.pred_dir),
                "aggregates": e.summaries,
                "by_tumor_volume": e.by_volume,
                "problems": e.problems(),
            }
            for e in evaluations
        },
        "ranking": rankings(evaluations),
    }
    atomic_write_json(Path(out_dir) / "summary.json", summary)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else str(value)


def format_case_table(evaluation: MethodEvaluation, convention: str) -> str:
    """A fixed-width per-case table for the terminal."""
    header = (
        f"{'case':<24}{'dice':>8}{'sdice':>8}{'hd95':>9}{'masd':>9}{'gt mL':>9}{'pred mL':>9}"
        "  status"
    )
    lines = [header, "-" * len(header)]
    for case in evaluation.cases:
        s = case.scores[convention]
        lines.append(
            f"{case.case_id:<24}{_fmt(s.dice):>8}{_fmt(s.surface_dice):>8}{_fmt(s.hd95):>9}"
            f"{_fmt(s.masd):>9}{s.gt_volume_mm3 / 1000:>9.2f}{s.pred_volume_mm3 / 1000:>9.2f}"
            f"  {case.status}"
        )
    return "\n".join(lines)


def format_summary_table(evaluations: Sequence[MethodEvaluation], convention: str) -> str:
    """Methods side by side with their aggregates and challenge ranks, best first."""
    ranks = metrics.rank_methods({e.name: e.summaries[convention] for e in evaluations})
    width = max(10, *(len(e.name) for e in evaluations)) + 2
    header = (
        f"{'method':<{width}}{'dice':>8}{'sdice':>8}{'hd95':>9}{'masd':>9}{'burden RMSE':>13}"
        f"{'cases':>7}{'failed':>8}{'mean rank':>11}"
    )
    lines = [f"spacing convention {convention}", header, "-" * len(header)]
    for e in sorted(evaluations, key=lambda e: ranks[e.name]["mean_rank"]):
        s = e.summaries[convention]
        failed = sum(c.status != STATUS_OK for c in e.cases)
        lines.append(
            f"{e.name:<{width}}{_fmt(s['dice']):>8}{_fmt(s['surface_dice']):>8}"
            f"{_fmt(s['hd95']):>9}{_fmt(s['masd']):>9}{_fmt(s['tumor_burden_rmse']):>13}"
            f"{s['n_cases']:>7}{failed:>8}{ranks[e.name]['mean_rank']:>11.2f}"
        )
    return "\n".join(lines)


def format_volume_table(evaluations: Sequence[MethodEvaluation], convention: str) -> str:
    """Each method's means per band of true tumor volume."""
    if not any(e.by_volume[convention] for e in evaluations):
        return f"by true tumor volume, spacing convention {convention}: no case has a tumor"
    width = max(10, *(len(e.name) for e in evaluations)) + 2
    header = (
        f"{'method':<{width}}{'tumor volume':<16}{'cases':>6}{'dice':>8}{'sdice':>8}"
        f"{'hd95':>9}{'masd':>9}"
    )
    lines = [f"by true tumor volume, spacing convention {convention}", header, "-" * len(header)]
    for e in evaluations:
        for band in e.by_volume[convention]:
            lines.append(
                f"{e.name:<{width}}{band['band']:<16}{band['n_cases']:>6}{_fmt(band['dice']):>8}"
                f"{_fmt(band['surface_dice']):>8}{_fmt(band['hd95']):>9}{_fmt(band['masd']):>9}"
            )
    return "\n".join(lines)
