"""`pantherseg upgrade-plan MODEL`: converts a version 1 plan.json (pantherseg 0.1) to the current
format in place, so that a model exported before the plan held only what inference reads keeps
working without retraining.

Version 1 kept training provenance in the plan (`training`: data paths, fingerprint, pooling,
cross-validation variants, export parity); it moves to `metadata.json`, the model card's file for
programs, with absolute paths reduced to folder names. Version 1 recorded only the axes inference
mirrored, not the axes training flipped, so those are an argument (the training YAML's
`augmentation.mirror_axes`); test-time mirroring stays as version 1 used it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

from pantherseg.inference.files import atomic_write_json
from pantherseg.inference.plan import (
    AXIAL_PATIENT_AXES,
    METADATA_FILE,
    PLAN_FILE,
    PLAN_FORMAT,
    PLAN_VERSION,
    PlanError,
    plan_from_json,
    save_plan,
)

# Sections of version 1's `training` that keep their names in metadata.json; the rest of it (the
# planner's figures) becomes `planning`. Sections the metadata already has are kept as they are.
PROVENANCE_SECTIONS = ("data", "cross_validation", "export")


def without_absolute_paths(value: Any) -> Any:
    """A JSON value with every absolute path string reduced to its last part: a shipped file must
    not carry the training machine's folders."""
    if isinstance(value, dict):
        return {k: without_absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_absolute_paths(v) for v in value]
    if isinstance(value, str) and PurePath(value).is_absolute():
        return PurePath(value).name
    return value


def upgrade_plan_json(
    old: dict[str, Any], mirror_axes: Sequence[int] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version 2 plan and the provenance it no longer holds, from a version 1 plan."""
    new = {k: v for k, v in old.items() if k != "training"}
    new["version"] = PLAN_VERSION
    new["preprocessing"] = {"patient_axes_zyx": list(AXIAL_PATIENT_AXES), **old["preprocessing"]}
    inference = dict(old["inference"])
    used = list(inference.get("mirror_axes", []))
    trained = used if mirror_axes is None else sorted(int(a) for a in mirror_axes)
    if not set(used) <= set(trained):
        raise PlanError(
            f"mirror axes {trained} leave out axes {sorted(set(used) - set(trained))} that the "
            "plan's inference mirrored"
        )
    # Inference flips the axes version 1 flipped, even where training flipped more.
    fewer = sorted(used) if used and set(used) != set(trained) else None
    inference.update(
        mirror_axes=trained, test_time_mirroring=bool(used), test_time_mirror_axes=fewer
    )
    new["inference"] = inference
    return new, without_absolute_paths(old.get("training", {}))


def upgrade_model_dir(model_dir: Path, mirror_axes: Sequence[int] | None = None) -> Path:
    """Rewrites `model_dir/plan.json` as version 2 and moves its provenance into
    `metadata.json`; the plan is checked before anything is written."""
    path = Path(model_dir) / PLAN_FILE
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: cannot be read ({error})") from None
    if not isinstance(old, dict) or old.get("format") != PLAN_FORMAT:
        raise PlanError(f"{path}: not a plan file (format != {PLAN_FORMAT})")
    if old.get("version") != 1:
        raise PlanError(f"{path}: version {old.get('version')!r}; only version 1 is upgraded")
    new, provenance = upgrade_plan_json(old, mirror_axes)
    plan = plan_from_json(new, path, require_folds=True)
    metadata_path = Path(model_dir) / METADATA_FILE
    metadata: dict[str, Any] = {}
    if metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    sections = {k: provenance.pop(k) for k in PROVENANCE_SECTIONS if k in provenance}
    for key, value in {"planning": provenance, **sections}.items():
        metadata.setdefault(key, value)
    atomic_write_json(metadata_path, without_absolute_paths(metadata))
    return save_plan(plan, model_dir)
