"""Typed files of a work folder that later steps read back: what planning found and what
cross-validation chose. They are workflow state and provenance, not the plan: `plan.json` holds
only what inference reads, and export copies these into the model card's `metadata.json`.

    <work>/planning.json           the planner's figures and the training data's description
    <work>/cross_validation.json   folds, the chosen post-processing and every variant's scores
    <work>/cascade.json            two stages: the localiser's out-of-fold boxes and their recall
    <work>/localiser/              two stages: the localiser's own work folder (same files)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pantherseg.inference.files import atomic_write_text

PLANNING_FILE = "planning.json"
CROSS_VALIDATION_FILE = "cross_validation.json"
CASCADE_FILE = "cascade.json"
LOCALISER_DIR = "localiser"
# Names of post-processing variants scored on the mirrored out-of-fold predictions start so.
MIRRORED_PREFIX = "mirrored_"


def localiser_work(work: Path) -> Path:
    """The work folder of a two-stage model's localiser, inside the main one."""
    return Path(work) / LOCALISER_DIR


class RecordError(ValueError):
    """A work-folder record that is missing pieces or was written by something else."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: cannot be read ({error})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return data


def _write(path: Path, record: Any) -> Path:
    atomic_write_text(path, json.dumps(asdict(record), indent=1) + "\n")
    return path


@dataclass(frozen=True)
class Planning:
    """What `plan` found: the planner's figures (medians, memory estimate, topology) and where
    the training data came from (its folder's name, never the machine's absolute path)."""

    figures: dict[str, Any]
    data: dict[str, Any]

    def save(self, work: Path) -> Path:
        return _write(Path(work) / PLANNING_FILE, self)

    @classmethod
    def load(cls, work: Path) -> Planning:
        path = Path(work) / PLANNING_FILE
        if not path.is_file():
            raise RecordError(
                f"{path}: missing (planned by an older pantherseg?); run `python -m training plan` "
                "again (the cache is reused where the preprocessing is unchanged)"
            )
        data = _read(path)
        if not isinstance(data.get("figures"), dict) or not isinstance(data.get("data"), dict):
            raise RecordError(f"{path}: expected objects 'figures' and 'data'")
        return cls(figures=data["figures"], data=data["data"])


@dataclass(frozen=True)
class CrossValidation:
    """What `cv` chose: how many folds were trained (export and pseudo-labelling take exactly
    these), the post-processing variant picked, whether test-time mirroring is used, and every
    variant's out-of-fold aggregates."""

    folds: int
    selected: str
    test_time_mirroring: bool
    aggregates: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self, work: Path) -> Path:
        return _write(Path(work) / CROSS_VALIDATION_FILE, self)

    @classmethod
    def load(cls, work: Path) -> CrossValidation | None:
        """The work folder's record, or None when cross-validation has not run."""
        path = Path(work) / CROSS_VALIDATION_FILE
        if not path.is_file():
            return None
        data = _read(path)
        try:
            record = cls(
                folds=data["folds"],
                selected=data["selected"],
                test_time_mirroring=data["test_time_mirroring"],
                aggregates=data["aggregates"],
                variants=data.get("variants", {}),
            )
        except KeyError as error:
            raise RecordError(
                f"{path}: no {error}; run `python -m training cv --resume` again"
            ) from None
        ok = isinstance(record.folds, int) and not isinstance(record.folds, bool)
        ok = ok and record.folds >= 1 and isinstance(record.selected, str)
        ok = ok and isinstance(record.test_time_mirroring, bool)
        ok = ok and isinstance(record.aggregates, dict) and isinstance(record.variants, dict)
        if not ok:
            raise RecordError(f"{path}: a field has the wrong type")
        return record


@dataclass(frozen=True)
class Cascade:
    """What the localiser's out-of-fold boxes showed (two-stage models): the margin, the jitter
    the main network trained with, the plausibility limits, the share of tumor inside the boxes
    (mean, worst case) and per case the box, the region found, its side errors and recall."""

    margin_mm: float
    jitter_mm: float
    jitter_measured: bool
    min_foreground_ml: float
    max_extent_mm: float
    recall: dict[str, Any]
    cases: dict[str, dict[str, Any]]

    def save(self, work: Path) -> Path:
        return _write(Path(work) / CASCADE_FILE, self)

    @classmethod
    def load(cls, work: Path) -> Cascade | None:
        """The work folder's record, or None when the localiser has not been measured."""
        path = Path(work) / CASCADE_FILE
        if not path.is_file():
            return None
        data = _read(path)
        try:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except KeyError as error:
            raise RecordError(
                f"{path}: no {error}; run `python -m training cv --resume` again"
            ) from None
