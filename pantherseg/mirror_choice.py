"""`pantherseg choose-mirroring MODEL TUNING`: which axes test-time mirroring flips, measured on
labelled tuning cases by rules fixed in advance, so that the choice is a command of the recipe.

Every set of the axes the network was trained to flip (none, each axis, each pair, all) segments
every case. The network runs once per distinct flipped tile: each set's passes are among those of
all axes, and the folds' outputs are remembered per case, keyed by the tile's bytes. Three axes'
eight sets cost what mirroring over all three costs, and each set's mask is bit for bit the one
`pantherseg predict --mirroring <letters>` writes.

The rules, as the shipped models' cards state them: mirroring goes on if flipping every trained
axis raises the mean Dice over cases with a tumor by at least `min_gain` over no mirroring, with
mean HD95 at most `hd95_slack_mm` worse. If on, it flips the set with the fewest passes whose mean
Dice is at most `tolerance` below all axes', mean HD95 at most `hd95_slack_mm` above, with no fewer
tumors of 2 mL or more found (Dice above 0.1) and no more never-empty fallbacks; among sets with
as few passes, the higher Dice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pantherseg.inference.files import atomic_write_json, atomic_write_text
from pantherseg.inference.io import (
    ImageError,
    check_inference_image,
    list_images,
    read_image,
    write_mask,
)
from pantherseg.inference.plan import (
    AXIS_LETTERS,
    CARD_FILE,
    METADATA_FILE,
    Plan,
    describe_test_time_mirroring,
    load_plan,
    mirroring_letters_axes,
    save_plan,
)
from pantherseg.inference.sliding_window import Predictor, averaged
from pantherseg.scoring.evaluate import EvaluationError, match_predictions, score_pair

FOUND_DICE = 0.1  # a tumor counts as found above this Dice (the demo issues' definition)
SMALL_TUMOR_ML = 2.0
CASES_FILE = "cases.jsonl"
log = logging.getLogger(__name__)
CHOICE_FILE = "choice.json"
TABLE_FILE = "choice.md"
# The model card's line that states the plan's test-time mirroring; --apply rewrites it.
MIRRORING_LINE_PREFIX = "- Test-time mirroring: "


@dataclass(frozen=True)
class Rule:
    """The thresholds of the two rules (see the module's docstring)."""

    min_gain: float = 0.005
    tolerance: float = 0.002
    hd95_slack_mm: float = 0.5


@dataclass(frozen=True)
class AxisSetScore:
    """One axis set's masks over the tuning cases, by the figures the rules read."""

    axes: str  # letters, "" for no mirroring
    passes: int
    dice: float  # mean over cases with a tumor
    hd95: float
    dice_small: float  # mean over tumors under 2 mL; NaN without one
    found: int  # tumors of 2 mL or more with Dice above FOUND_DICE
    large: int  # tumors of 2 mL or more
    fallbacks: int  # never-empty fallbacks over every case

    @property
    def name(self) -> str:
        return self.axes or "none"


class RememberingPredictor:
    """A predictor that computes each distinct input once per case: the axis sets after the first
    reuse the passes they share with it."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor
        self._outputs: dict[bytes, np.ndarray] = {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        key = hashlib.blake2b(batch.view(np.uint8), digest_size=16)
        key.update(repr((batch.shape, batch.dtype.str)).encode())
        digest = key.digest()
        if digest not in self._outputs:
            self._outputs[digest] = np.array(self._predictor(batch), copy=True)
        return self._outputs[digest].copy()  # callers may add into what they get

    def forget(self) -> None:
        self._outputs.clear()


def axis_sets(trained: Sequence[int]) -> list[str]:
    """Every subset of the trained axes as letters, fewest axes first ("" is none)."""
    letters = [AXIS_LETTERS[a] for a in sorted(trained)]
    return ["".join(c) for n in range(len(letters) + 1) for c in itertools.combinations(letters, n)]


def tuning_cases(dataset: Path, limit: int | None = None) -> list[tuple[str, Path, Path]]:
    """(case id, image, label) of a dataset in the PANTHER layout (ImagesTr/, LabelsTr/), sorted
    by case id; the first `limit` only when given. Every label needs its image and the reverse."""
    labels = list_images(dataset / "LabelsTr")
    images = list_images(dataset / "ImagesTr")
    try:
        matched, unlabelled = match_predictions(labels, images)
    except EvaluationError as error:
        raise ImageError(f"{dataset}: {error}") from None
    missing = sorted(case for case, image in matched.items() if image is None)
    if missing or unlabelled:
        problems = [f"no image for label(s) {', '.join(missing[:5])}"] if missing else []
        problems += [f"no label for image(s) {', '.join(unlabelled[:5])}"] if unlabelled else []
        raise ImageError(f"{dataset}: {'; '.join(problems)}")
    if not matched:
        raise ImageError(f"{dataset}: no labelled cases in LabelsTr/")
    cases = [(case, image, labels[case]) for case, image in sorted(matched.items()) if image]
    return cases[:limit] if limit is not None else cases


def remembering_folds(plan_stitching: str, engines: Sequence[Predictor]) -> list[Predictor]:
    """The folds as the pipeline will use them, each remembering its outputs. Folds averaged per
    tile are remembered as their average (one output per flipped tile, not one per fold); with
    nnU-Net's stitching every fold is stitched on its own, so each is remembered on its own."""
    if plan_stitching == "nnunet" or len(engines) == 1:
        return [RememberingPredictor(engine) for engine in engines]
    return [RememberingPredictor(averaged(list(engines)))]


def case_record(
    case: str, label: Path, masks: dict[str, Path], fallbacks: dict[str, bool]
) -> dict[str, object]:
    """One case's scores for every axis set, as a line of cases.jsonl."""
    record: dict[str, object] = {"case": case}
    for axes, mask in masks.items():
        scores = score_pair(case, label, mask).scores["zyx"]
        record["tumor_ml"] = scores.gt_volume_mm3 / 1000
        record[axes or "none"] = {
            "dice": scores.dice,
            "hd95": scores.hd95,
            "fallback": fallbacks[axes],
        }
    return record


def summarise(records: Sequence[dict], sets: Sequence[str]) -> list[AxisSetScore]:
    """Each axis set's figures over the recorded cases."""
    with_tumor = [r for r in records if r["tumor_ml"] > 0]
    if not with_tumor:
        raise ValueError("no tuning case holds a tumor: nothing to measure mirroring by")
    small = [r for r in with_tumor if r["tumor_ml"] < SMALL_TUMOR_ML]
    large = [r for r in with_tumor if r["tumor_ml"] >= SMALL_TUMOR_ML]
    scores = []
    for axes in sets:
        name = axes or "none"
        scores.append(
            AxisSetScore(
                axes=axes,
                passes=2 ** len(axes),
                dice=float(np.mean([r[name]["dice"] for r in with_tumor])),
                hd95=float(np.mean([r[name]["hd95"] for r in with_tumor])),
                dice_small=float(np.mean([r[name]["dice"] for r in small])) if small else math.nan,
                found=sum(r[name]["dice"] > FOUND_DICE for r in large),
                large=len(large),
                fallbacks=sum(bool(r[name]["fallback"]) for r in records),
            )
        )
    return scores


def choose(scores: Sequence[AxisSetScore], rule: Rule) -> str | None:
    """The axes to flip by the two rules, or None for no mirroring."""
    by_axes = {s.axes: s for s in scores}
    full = max(scores, key=lambda s: len(s.axes))
    none = by_axes[""]
    pays = full.dice >= none.dice + rule.min_gain and full.hd95 <= none.hd95 + rule.hd95_slack_mm
    if not pays:
        return None
    near = [
        s
        for s in scores
        if s.axes
        and s.dice >= full.dice - rule.tolerance
        and s.hd95 <= full.hd95 + rule.hd95_slack_mm
        and s.found >= full.found
        and s.fallbacks <= full.fallbacks
    ]
    return min(near, key=lambda s: (s.passes, -s.dice)).axes  # `full` itself always qualifies


def format_table(scores: Sequence[AxisSetScore], chosen: str | None, cases: int) -> str:
    """The Markdown table a model card takes, the chosen set in bold."""
    lines = [
        f"| axes (`--mirroring`), {cases} cases | passes | Dice | HD95 mm | under 2 mL | "
        ">= 2 mL found | fallbacks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in scores:
        cells = [
            s.name,
            str(s.passes),
            f"{s.dice:.4f}",
            f"{s.hd95:.2f}",
            "-" if math.isnan(s.dice_small) else f"{s.dice_small:.3f}",
            f"{s.found}/{s.large}",
            str(s.fallbacks),
        ]
        if (chosen or "") == s.axes:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def applied(plan: Plan, chosen: str | None) -> Plan:
    """The plan with the choice as its test-time mirroring (all trained axes: no subset named)."""
    if chosen is None:
        inference = dataclasses.replace(
            plan.inference, test_time_mirroring=False, test_time_mirror_axes=None
        )
    else:
        axes = mirroring_letters_axes(chosen)
        subset = None if set(axes) == set(plan.inference.mirror_axes) else axes
        inference = dataclasses.replace(
            plan.inference, test_time_mirroring=True, test_time_mirror_axes=subset
        )
    return dataclasses.replace(plan, inference=inference)


def choose_mirroring(
    model_dir: Path,
    dataset: Path,
    out: Path,
    rule: Rule = Rule(),
    limit: int | None = None,
    apply: bool = False,
    device: str = "auto",
    threads: int | None = None,
    cpu_engine: str = "auto",
    progress: bool = True,
) -> tuple[str | None, list[AxisSetScore]]:
    """Segments the tuning cases with every axis set (resuming from `out/cases.jsonl`), scores
    them, writes choice.json and choice.md to `out`, and with `apply` the choice into the plan."""
    from tqdm import tqdm

    from pantherseg.inference.pipeline import (
        Segmenter,
        describe_engines,
        load_fold_engines,
    )

    plan = load_plan(model_dir)
    if not plan.inference.mirror_axes:
        raise ValueError(
            f"{model_dir}: the network was trained without flips (inference.mirror_axes is "
            "empty): there is no mirroring to choose"
        )
    cases = tuning_cases(dataset, limit)
    sets = axis_sets(plan.inference.mirror_axes)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / CASES_FILE
    records = _read_records(records_path, sets)
    done = {r["case"] for r in records}
    todo = [case for case in cases if case[0] not in done]
    if todo:
        engines = load_fold_engines(plan, model_dir, device, threads, cpu_engine)
        folds = remembering_folds(plan.inference.stitching, engines[0])
        localiser = [RememberingPredictor(e) for e in engines[1]] if len(engines) > 1 else []
        on_gpu = any(engine.on_gpu for stage in engines for engine in stage)
        segmenters = {
            axes: Segmenter(
                plan, folds, on_gpu=on_gpu, mirroring=axes or "off", localiser_folds=localiser
            )
            for axes in sets
        }
        log.info("model: %s; %d axis sets", describe_engines(engines, model_dir), len(sets))
        bar = tqdm(todo, desc="axis sets", unit="case", disable=not progress, file=sys.stdout)
        for case, image_path, label in bar:
            image = read_image(image_path)
            array = check_inference_image(image, image_path)
            spacing_zyx = tuple(reversed(image.GetSpacing()))
            masks, fallbacks = {}, {}
            for axes, segmenter in segmenters.items():
                result = segmenter.segment(array, spacing_zyx, image.GetDirection())
                masks[axes] = write_mask(result.mask, image, out / (axes or "none") / f"{case}.mha")
                fallbacks[axes] = bool(result.report.fallback)
            for predictor in [*folds, *localiser]:
                predictor.forget()
            records.append(case_record(case, label, masks, fallbacks))
            # Rewritten whole, atomically: an interruption loses at most the case in progress.
            atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
    wanted = {case for case, _, _ in cases}
    scores = summarise([r for r in records if r["case"] in wanted], sets)
    chosen = choose(scores, rule)
    record = {
        "tuning": dataset.name,
        "cases": len(cases),
        "rule": dataclasses.asdict(rule),
        "axis_sets": [dataclasses.asdict(s) | {"name": s.name} for s in scores],
        "chosen": chosen,
    }
    atomic_write_json(out / CHOICE_FILE, record)
    atomic_write_text(out / TABLE_FILE, format_table(scores, chosen, len(cases)))
    if apply:
        new_plan = applied(plan, chosen)
        save_plan(new_plan, model_dir)
        _record_in_metadata(model_dir, record)
        _record_in_card(model_dir, new_plan, record)
    return chosen, scores


def mirroring_line(plan: Plan, reason: str) -> str:
    """The model card's line for the plan's test-time mirroring and why it is what it is."""
    return f"{MIRRORING_LINE_PREFIX}{describe_test_time_mirroring(plan.inference)} ({reason})."


def _record_in_metadata(model_dir: Path, record: dict) -> None:
    """The measurement beside the plan it changed, for the model card's readers (a model without
    metadata.json gets none: the plan alone is what inference needs)."""
    path = model_dir / METADATA_FILE
    if path.exists():
        metadata = json.loads(path.read_text(encoding="utf-8"))
        metadata["test_time_mirroring_choice"] = record
        atomic_write_json(path, metadata)


def _record_in_card(model_dir: Path, plan: Plan, record: dict) -> None:
    """Rewrites the card's test-time mirroring line, so that the card states what the plan now
    does; a card without that line (written by hand, or by an older export) is left as it is."""
    path = model_dir / CARD_FILE
    if not path.exists():
        return
    reason = (
        f"chosen by `pantherseg choose-mirroring` on {record['cases']} tuning cases "
        f"({record['tuning']}); metadata.json holds every axis set's scores"
    )
    lines = path.read_text(encoding="utf-8").split("\n")
    at = [i for i, line in enumerate(lines) if line.startswith(MIRRORING_LINE_PREFIX)]
    if len(at) != 1:
        log.warning(
            "%s has %s line starting '%s': state the choice there by hand",
            path,
            "no" if not at else "more than one",
            MIRRORING_LINE_PREFIX.strip(),
        )
        return
    lines[at[0]] = mirroring_line(plan, reason)
    atomic_write_text(path, "\n".join(lines))
    log.info("%s: its test-time mirroring line now reads the choice", path)


def _read_records(path: Path, sets: Sequence[str]) -> list[dict]:
    """The cases already measured; a file from another model's axis sets is an error, not mixed."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    names = {axes or "none" for axes in sets}
    for record in records:
        if not names <= record.keys():
            raise ValueError(
                f"{path}: case {record.get('case')} was measured with other axis sets than "
                f"{', '.join(sorted(names))}: use a fresh output folder"
            )
    return records
