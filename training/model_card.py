"""The model card beside exported weights: `README.md` for people, `metadata.json` for programs.

Export writes it from the plan, the configuration and the work folder's provenance (the planner's
figures, the training data, cross-validation, export parity), which the plan itself does not
carry; evaluations made afterwards (for example on
held-out cases with `pantherseg evaluate`) are recorded into it with `record_evaluation`, so the
card that ships with the weights carries the numbers that describe them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import pantherseg
from pantherseg.inference.files import atomic_write_json, atomic_write_text
from pantherseg.inference.plan import CARD_FILE, METADATA_FILE, Plan, all_folds
from pantherseg.mirror_choice import mirroring_line
from pantherseg.plan_upgrade import without_absolute_paths
from pantherseg.scoring.metrics import CASE_MEAN_METRICS
from training.config import TrainingConfig
from training.records import MIRRORED_PREFIX

INTENDED_USE_HEADING = "## Intended use"
# A recorded evaluation lies between these two lines of its section; recording it again replaces
# only them and what lies between, so paragraphs written by hand after the end marker survive.
RECORDED_START = "<!-- recorded by `python -m training card`: recording again replaces it -->"
RECORDED_END = "<!-- end of the recorded evaluation -->"
METRICS = (*CASE_MEAN_METRICS, "tumor_burden_rmse", "n_cases", "n_without_tumor")


def _versions() -> dict[str, str]:
    import monai
    import onnx
    import onnxruntime

    return {
        "pantherseg": pantherseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_model_card(
    plan: Plan, config: TrainingConfig, model_dir: Path, provenance: dict[str, Any]
) -> None:
    """`README.md` for people and `metadata.json` for programs, beside the weights.

    `provenance` holds `planning`, `data`, `cross_validation` and `export` where known, and
    always `initialisation` (export's record of fine-tuned folds, empty when none was); no
    absolute path of the training machine reaches the shipped files."""
    cv = provenance.get("cross_validation", {})
    data = provenance.get("data", {})
    metadata = {
        "name": "pantherseg",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": plan.task,
        "input": {"socket": plan.input_socket, "modality": "MRI", "pixel": "one 3D scalar image"},
        "output": {
            "socket": "pancreatic-tumor-segmentation",
            "values": {"0": "background", "1": "tumor"},
        },
        "network": dataclasses.asdict(config.network),
        "folds": [f.file for f in all_folds(plan)],
        **without_absolute_paths(provenance),
        "versions": _versions(),
        "intended_use": "research on pancreatic tumor segmentation in the PANTHER challenge; "
        "not a medical device",
    }
    atomic_write_json(model_dir / METADATA_FILE, metadata)
    aggregates = cv.get("aggregates", {})
    rows = "\n".join(
        f"| {name} | {_format(value)} |"
        for name, value in aggregates.items()
        if isinstance(value, int | float)
    )
    bands = aggregates.get("by_tumor_volume")
    by_volume = f"\n\nBy true tumor volume:\n\n{band_table(bands)}" if bands else ""
    warning = (
        "- **Trained on synthetic phantoms only: these weights demonstrate the pipeline; they are"
        " not a model of real MRI.**"
        if data.get("synthetic", False)
        else ""
    )
    card = f"""# pantherseg model card

- Task: {plan.task} ({plan.input_socket}); output: tumor mask, uint8 {{0, 1}}.
- Network: {config.network.name}, {config.network.base_features} base features,
  {len(plan.inference.folds)} fold(s), patch {plan.inference.patch_size_zyx} at spacing
  {plan.preprocessing.target_spacing_zyx} mm (z, y, x); trained with mirroring on axes
  {list(plan.inference.mirror_axes) or "none"}; precision on a GPU: {plan.inference.precision}.
{mirroring_line(plan, _mirroring_reason(cv))}
- Post-processing (chosen on out-of-fold predictions): threshold
  {plan.postprocessing.threshold}, minimum component {plan.postprocessing.min_component_mm3} mm^3,
  pancreas guidance {"on" if plan.postprocessing.pancreas_guidance.enabled else "off"},
  never empty {"on" if plan.postprocessing.never_empty else "off"}.
- Training data: {data.get("description", "see metadata.json")}.
{_initialisation_line(without_absolute_paths(provenance["initialisation"]))}
{warning}

## Cross-validation (out-of-fold, challenge metrics)

| metric | value |
| --- | --- |
{rows or "| (not run) | |"}{by_volume}
{_cascade_section(plan, provenance.get("cascade"))}
## Intended use

Research on automatic pancreatic tumor segmentation (PANTHER challenge). Not a medical device; not
for clinical decisions.

Versions: {", ".join(f"{k} {v}" for k, v in metadata["versions"].items())}.
"""
    atomic_write_text(model_dir / CARD_FILE, card)


def _initialisation_line(initialisation: dict[str, dict[str, Any]]) -> str:
    """The card's word on where training started: which folds were fine-tuned from which file."""
    if not initialisation:
        return "- Initialisation: every fold from random weights."
    folds = "; ".join(
        f"{file} from `{start['source']}`"
        + (f" (sha256 {start['source_sha256'][:12]}...)" if start["source_sha256"] else "")
        + f", {start['loaded_tensors']} tensor(s) loaded, {len(start['kept_initialisation'])}"
        " kept their initialisation"
        for file, start in initialisation.items()
    )
    return f"- Fine-tuned: {folds}; the folds not named here started from random weights."


def _cascade_section(plan: Plan, cascade: dict[str, Any] | None) -> str:
    """Two stages: the localiser's grid and its out-of-fold recall, per case, worst case first."""
    if plan.localiser is None:
        return ""
    local = plan.localiser
    lines = [
        "",
        "## Two stages: the localiser",
        "",
        f"A localiser ({len(local.inference.folds)} fold(s), patch {local.inference.patch_size_zyx}"
        f" at spacing {local.preprocessing.target_spacing_zyx} mm) finds the pancreas and tumor; "
        f"the network above runs in their box grown by {local.margin_mm:g} mm. A region under "
        f"{local.min_foreground_ml:g} mL or longer than {local.max_extent_mm:g} mm is implausible"
        " and the network runs over the whole image instead.",
    ]
    if cascade:
        recall = cascade["recall"]
        if recall.get("cases"):
            lines += [
                "",
                f"Out of fold, {recall['mean']:.1%} of tumor voxels lie inside the boxes on "
                f"average (worst case {recall['worst_case']}: {recall['min']:.1%}); "
                f"{recall['whole_image_fallbacks']} case(s) fell back to the whole image. The "
                f"network trained on true boxes with sides jittered by up to "
                f"{cascade['jitter_mm']:g} mm"
                + (" (the localiser's measured error)." if cascade["jitter_measured"] else "."),
            ]
        rows = sorted(
            (e["recall"], c) for c, e in cascade["cases"].items() if e["recall"] is not None
        )
        if rows:
            lines += ["", "| case | tumor inside the box |", "| --- | --- |"]
            lines += [f"| {case} | {value:.1%} |" for value, case in rows]
    return "\n".join(lines) + "\n"


def _mirroring_reason(cv: dict[str, Any]) -> str:
    if "test_time_mirroring" not in cv:
        return "not measured: no cross-validation"
    if not any(name.startswith(MIRRORED_PREFIX) for name in cv.get("variants", {})):
        return "not measured by cross-validation"
    return "chosen on out-of-fold predictions"


def _format(value: float | int | None) -> str:
    if isinstance(value, int):  # counts
        return str(value)
    # None: a summary.json mean with no value (strict JSON writes NaN as null)
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def evaluation_section(summary: dict, title: str, note: str = "") -> str:
    """A card section with each method's aggregates from `pantherseg evaluate`'s summary.json, one
    column per spacing convention it was scored with."""
    lines = [f"## {title}", RECORDED_START, ""]
    if note:
        lines += [note.strip(), ""]
    for method, result in summary["methods"].items():
        conventions = list(result["aggregates"])
        if len(summary["methods"]) > 1:
            lines += [f"{method}:", ""]
        lines += [
            "| metric | " + " | ".join(f"spacing {c}" for c in conventions) + " |",
            "| --- |" + " --- |" * len(conventions),
        ]
        for metric in METRICS:
            values = [result["aggregates"][c].get(metric, math.nan) for c in conventions]
            lines.append(f"| {metric} | " + " | ".join(_format(v) for v in values) + " |")
        lines.append("")
        bands = result.get("by_tumor_volume", {}).get(conventions[0])
        if bands:
            lines += [
                f"By true tumor volume (spacing {conventions[0]}):",
                "",
                band_table(bands),
                "",
            ]
    return "\n".join([*lines, RECORDED_END])


def band_table(bands: list[dict]) -> str:
    """`pantherseg.scoring.metrics.by_tumor_volume`'s bands as a Markdown table."""
    lines = [
        "| tumor volume | cases | " + " | ".join(CASE_MEAN_METRICS) + " |",
        "| --- | --- |" + " --- |" * len(CASE_MEAN_METRICS),
    ]
    for band in bands:
        values = [band["n_cases"], *(band[m] for m in CASE_MEAN_METRICS)]
        lines.append(f"| {band['band']} | " + " | ".join(_format(v) for v in values) + " |")
    return "\n".join(lines)


def record_evaluation(model_dir: Path, summary_path: Path, title: str, note: str = "") -> None:
    """Adds the section `title` to the model card (or replaces its recorded part, keeping what
    was written by hand after it) and the entry `title` under `evaluations` in metadata.json,
    from a `pantherseg evaluate` summary.json."""
    model_dir, summary_path = Path(model_dir), Path(summary_path)
    card_path, metadata_path = model_dir / CARD_FILE, model_dir / METADATA_FILE
    for path in (card_path, metadata_path, summary_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if not isinstance(summary, dict) or not summary.get("methods"):
        raise ValueError(f"{summary_path}: not a `pantherseg evaluate` summary.json (no methods)")
    section = evaluation_section(summary, title, note)
    card = card_path.read_text(encoding="utf-8")
    # The heading on a line of its own: `## Title` inside `### Title` (an older edition's section
    # under "Previous editions") is another section.
    heading = re.search(rf"^## {re.escape(title)}\n", card, flags=re.MULTILINE)
    if heading:
        start = heading.start()
        end = card.find("\n## ", heading.end())
        end = len(card) if end < 0 else end
        stop = card.find(RECORDED_END, start, end)
        if card.find(RECORDED_START, start, end) < 0 or stop < 0:
            raise ValueError(
                f"{card_path}: section '{title}' lacks the markers of a recorded evaluation, so "
                "it may hold text written by hand; rename or remove its heading, or put its "
                f"recorded part between the lines '{RECORDED_START}' and '{RECORDED_END}'"
            )
        card = card[:start] + section + card[stop + len(RECORDED_END) :]
    elif INTENDED_USE_HEADING in card:
        at = card.index(INTENDED_USE_HEADING)
        card = card[:at] + section + "\n\n" + card[at:]
    else:
        card = card.rstrip("\n") + "\n\n" + section + "\n"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    metadata.setdefault("evaluations", {})[title] = {
        "note": note,
        "methods": {m: r["aggregates"] for m, r in summary["methods"].items()},
        "by_tumor_volume": {m: r.get("by_tumor_volume", {}) for m, r in summary["methods"].items()},
    }
    atomic_write_text(card_path, card)
    atomic_write_json(metadata_path, metadata)
