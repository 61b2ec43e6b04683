"""The plan: every data-dependent decision of a trained model, in one versioned JSON file.

Training writes `plan.json` next to the exported weights; inference only reads it. It is the sole
contract between the two, so it is validated strictly on load: an unknown version, a missing field,
a missing weight file or a weight file whose sha256 differs is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pantherseg.io import atomic_write_text

PLAN_FORMAT = "pantherseg-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
TASK_SOCKETS = {"task1": "abdominal-t1-mri", "task2": "abdominal-t2-mri"}
OUTPUT_SOCKET = "pancreatic-tumor-segmentation"
NORMALIZATION_SCHEMES = ("zscore",)
# What the network's output channels mean. "sigmoid": one channel, tumor logit. "softmax": one
# channel per class, in the order of `classes`.
OUTPUT_ACTIVATIONS = ("sigmoid", "softmax")
KNOWN_CLASSES = ("background", "tumor", "pancreas")


class PlanError(ValueError):
    """A plan file that cannot be used, with the file and the problem in the message."""


@dataclass(frozen=True)
class Normalization:
    """Per-image intensity normalisation. Percentile clipping tames MRI's arbitrary bright spots
    before the z-score; `nonzero_only` computes the statistics inside the body only."""

    scheme: str = "zscore"
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)
    nonzero_only: bool = False


@dataclass(frozen=True)
class Resampling:
    """Interpolation orders. When the spacing is anisotropic beyond `anisotropy_threshold`
    (largest / smallest target spacing), the through-plane axis uses its own, lower order."""

    image_order: int = 3
    probability_order: int = 1
    through_plane_order: int = 0
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class Preprocessing:
    target_spacing_zyx: tuple[float, float, float]
    crop_to_nonzero: bool = True
    normalization: Normalization = field(default_factory=Normalization)
    resampling: Resampling = field(default_factory=Resampling)


@dataclass(frozen=True)
class FoldWeights:
    file: str
    sha256: str


@dataclass(frozen=True)
class Inference:
    patch_size_zyx: tuple[int, int, int]
    folds: tuple[FoldWeights, ...]
    tile_step: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    batch_size: int = 2
    activation: str = "sigmoid"
    classes: tuple[str, ...] = ("tumor",)


@dataclass(frozen=True)
class PancreasGuidance:
    """Keep a tumor component only if enough of it lies in the (dilated) predicted pancreas."""

    enabled: bool = False
    dilation_mm: float = 10.0
    min_overlap: float = 0.15


@dataclass(frozen=True)
class Postprocessing:
    threshold: float = 0.5
    min_component_mm3: float = 0.0
    pancreas_guidance: PancreasGuidance = field(default_factory=PancreasGuidance)
    never_empty: bool = True


@dataclass(frozen=True)
class Plan:
    task: str
    preprocessing: Preprocessing
    inference: Inference
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    input_socket: str = ""
    # Free-form provenance written by training (data, folds, cross-validation scores).
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.input_socket and self.task in TASK_SOCKETS:
            object.__setattr__(self, "input_socket", TASK_SOCKETS[self.task])

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require(condition: bool, where: Path, message: str) -> None:
    if not condition:
        raise PlanError(f"{where}: {message}")


def _tuple_of(value: Any, kind: type, length: int | None, where: Path, name: str) -> tuple:
    accepted = (int, float) if kind is float else (kind,)  # JSON writes 3.0 as 3
    ok = isinstance(value, list | tuple) and (length is None or len(value) == length)
    ok = ok and all(isinstance(v, accepted) and not isinstance(v, bool) for v in value)
    _require(ok, where, f"{name} must be a list of {length or 'any number of'} {kind.__name__}")
    return tuple(kind(v) for v in value)


def _section(data: dict, key: str, where: Path) -> dict:
    value = data.get(key, {})
    _require(isinstance(value, dict), where, f"'{key}' must be an object")
    return value


def _build(cls: type, values: dict, where: Path, name: str, **converted: Any):
    known = set(cls.__dataclass_fields__)
    unknown = set(values) - known
    _require(not unknown, where, f"unknown field(s) in {name}: {', '.join(sorted(unknown))}")
    try:
        return cls(**{**values, **converted})
    except TypeError as error:
        raise PlanError(f"{where}: {name}: {error}") from None


def plan_from_json(data: dict[str, Any], where: Path, require_folds: bool = True) -> Plan:
    """Validates a parsed plan; `where` names the file in errors. Training plans its
    preprocessing before any weights exist, so it may ask for a plan without folds."""
    _require(isinstance(data, dict), where, "a plan must be a JSON object")
    _require(data.get("format") == PLAN_FORMAT, where, f"not a plan file (format != {PLAN_FORMAT})")
    _require(
        data.get("version") == PLAN_VERSION,
        where,
        f"plan version {data.get('version')!r} is not supported (this pantherseg reads "
        f"version {PLAN_VERSION})",
    )
    task = data.get("task")
    _require(task in TASK_SOCKETS, where, f"task must be one of {list(TASK_SOCKETS)}, got {task!r}")

    pre = _section(data, "preprocessing", where)
    norm = _section(pre, "normalization", where)
    clip = norm.get("clip_percentiles", Normalization.clip_percentiles)
    if clip is not None:
        clip = _tuple_of(clip, float, 2, where, "clip_percentiles")
        _require(0 <= clip[0] < clip[1] <= 100, where, "clip_percentiles must rise within 0..100")
    normalization = _build(Normalization, norm, where, "normalization", clip_percentiles=clip)
    _require(
        normalization.scheme in NORMALIZATION_SCHEMES,
        where,
        f"normalization scheme must be one of {NORMALIZATION_SCHEMES}",
    )
    resampling = _build(Resampling, _section(pre, "resampling", where), where, "resampling")
    for order in (
        resampling.image_order,
        resampling.probability_order,
        resampling.through_plane_order,
    ):
        _require(order in range(6), where, "interpolation orders must be 0..5")
    spacing = _tuple_of(pre.get("target_spacing_zyx"), float, 3, where, "target_spacing_zyx")
    _require(all(s > 0 for s in spacing), where, "target_spacing_zyx must be positive")
    preprocessing = _build(
        Preprocessing,
        pre,
        where,
        "preprocessing",
        target_spacing_zyx=spacing,
        normalization=normalization,
        resampling=resampling,
    )

    inf = _section(data, "inference", where)
    patch = _tuple_of(inf.get("patch_size_zyx"), int, 3, where, "patch_size_zyx")
    _require(all(p > 0 for p in patch), where, "patch_size_zyx must be positive")
    folds_raw = inf.get("folds")
    _require(isinstance(folds_raw, list), where, "inference.folds must be a list")
    _require(bool(folds_raw) or not require_folds, where, "inference.folds lists no weights")
    folds = tuple(_build(FoldWeights, f, where, "fold") for f in folds_raw)
    mirror = _tuple_of(inf.get("mirror_axes", []), int, None, where, "mirror_axes")
    _require(
        set(mirror) <= {0, 1, 2} and len(set(mirror)) == len(mirror),
        where,
        "mirror_axes must be distinct axes among 0, 1, 2",
    )
    classes = _tuple_of(inf.get("classes", ["tumor"]), str, None, where, "classes")
    inference = _build(
        Inference,
        inf,
        where,
        "inference",
        patch_size_zyx=patch,
        folds=folds,
        mirror_axes=mirror,
        classes=classes,
    )
    _require(0 < inference.tile_step <= 1, where, "tile_step must be in (0, 1]")
    _require(inference.batch_size >= 1, where, "batch_size must be at least 1")
    _require(
        inference.activation in OUTPUT_ACTIVATIONS,
        where,
        f"activation must be one of {OUTPUT_ACTIVATIONS}",
    )
    _require(
        set(classes) <= set(KNOWN_CLASSES) and "tumor" in classes,
        where,
        f"classes must include 'tumor' and come from {KNOWN_CLASSES}",
    )
    _require(
        inference.activation != "sigmoid" or classes == ("tumor",),
        where,
        "a sigmoid network has the single class 'tumor'",
    )

    post = _section(data, "postprocessing", where)
    guidance = _build(
        PancreasGuidance, _section(post, "pancreas_guidance", where), where, "pancreas_guidance"
    )
    postprocessing = _build(
        Postprocessing, post, where, "postprocessing", pancreas_guidance=guidance
    )
    _require(0 < postprocessing.threshold < 1, where, "threshold must be in (0, 1)")
    _require(postprocessing.min_component_mm3 >= 0, where, "min_component_mm3 must be >= 0")
    _require(
        not guidance.enabled or "pancreas" in classes,
        where,
        "pancreas guidance needs a network that predicts the pancreas",
    )

    training = data.get("training", {})
    _require(isinstance(training, dict), where, "'training' must be an object")
    return Plan(
        task=task,
        preprocessing=preprocessing,
        inference=inference,
        postprocessing=postprocessing,
        input_socket=data.get("input_socket", ""),
        training=training,
    )


def load_plan(model_dir: Path, verify_weights: bool = True) -> Plan:
    """Reads `model_dir/plan.json` and checks that every fold's weight file is there, unchanged.

    Without `verify_weights` (training, before export) the plan may list no folds yet.
    """
    path = Path(model_dir) / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{path}: no plan file (is {model_dir} a model folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PlanError(f"{path}: not valid JSON ({error})") from None
    plan = plan_from_json(data, path, require_folds=verify_weights)
    if verify_weights:
        for fold in plan.inference.folds:
            weights = Path(model_dir) / fold.file
            _require(weights.is_file(), path, f"weight file {fold.file} is missing")
            actual = sha256_of(weights)
            _require(
                actual == fold.sha256,
                path,
                f"weight file {fold.file} has sha256 {actual}, the plan expects {fold.sha256}",
            )
    return plan


def save_plan(plan: Plan, model_dir: Path) -> Path:
    """Writes the plan atomically, after checking it would load again."""
    data = plan.to_json()
    path = Path(model_dir) / PLAN_FILE
    plan_from_json(json.loads(json.dumps(data)), path, require_folds=False)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def fold_paths(plan: Plan, model_dir: Path) -> list[Path]:
    return [Path(model_dir) / fold.file for fold in plan.inference.folds]
