"""The plan: every data-dependent decision of a trained model, in one versioned JSON file.

Training writes `plan.json` next to the exported weights; inference only reads it. It is the sole
contract between the two, so it holds what inference reads and nothing else (where the weights came
from, how they scored: the model card's `metadata.json`), and it is validated strictly on load: an
unknown version or field, a missing field, a missing weight file or a weight file whose sha256
differs is an error naming the file.

Version 2 added the patient-axis order, the trained mirror axes with the test-time mirroring
choice, the Gaussian's sigma, the precision, the component connectivity and the pancreas threshold,
and dropped the free-form `training` section. A version 1 plan is refused with the command that
converts it (`pantherseg upgrade-plan`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pantherseg.inference.files import atomic_write_text

PLAN_FORMAT = "pantherseg-plan"
PLAN_VERSION = 2
UPGRADE_HINT = "convert it with `pantherseg upgrade-plan {folder}`"
PLAN_FILE = "plan.json"
# Beside the plan: the model card's file for programs (provenance, evaluations), never read by
# inference.
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"  # the model card, for people; metadata.json is for programs
TASK_SOCKETS = {"task1": "abdominal-t1-mri", "task2": "abdominal-t2-mri"}
OUTPUT_SOCKET = "pancreatic-tumor-segmentation"
# "none" passes intensities through as float32 (nnU-Net's NoNormalization).
NORMALIZATION_SCHEMES = ("zscore", "none")
# What the network's output channels mean. "sigmoid": one channel, tumor logit. "softmax": one
# channel per class, in the order of `classes`.
OUTPUT_ACTIVATIONS = ("sigmoid", "softmax")
KNOWN_CLASSES = ("background", "tumor", "pancreas")
# Network precision on a GPU. "float16" lets TensorRT build half-precision engines; export writes it
# only after checking that the network's half-precision logits match its float32 ones.
PRECISIONS = ("float32", "float16")
CONNECTIVITIES = (6, 18, 26)
# How a run chooses test-time mirroring: as the plan says, forced on or off, or over the axes a
# word of axis letters names ("x", "yx": see `mirroring_letters_axes`).
MIRRORING_CHOICES = ("plan", "on", "off")
AXIS_LETTERS = "zyx"
# How tiles are placed, weighted and summed: this project's way, or nnU-Net v2's exactly (for
# imported nnU-Net models, whose masks must match nnU-Net's own predictor).
STITCHINGS = ("pantherseg", "nnunet")
# What is resampled back onto the input grid: class probabilities, or logits (nnU-Net), with the
# activation applied afterwards.
RESTORES = ("probabilities", "logits")
# How a voxel becomes tumor: its tumor probability reaches `threshold`, or tumor is its most
# probable class (nnU-Net's argmax).
DECISIONS = ("threshold", "argmax")
# Patient axes in ITK's LPS order: 0 left-right, 1 posterior-anterior, 2 inferior-superior.
AXIAL_PATIENT_AXES = (2, 1, 0)


def mirroring_letters_axes(value: str) -> tuple[int, ...]:
    """The array axes (z=0, y=1, x=2), in increasing order, that a mirroring choice such as "yx"
    names; a ValueError for anything else that is not one of MIRRORING_CHOICES."""
    if not value or set(value) - set(AXIS_LETTERS) or len(set(value)) != len(value):
        raise ValueError(
            f"mirroring must be one of {', '.join(MIRRORING_CHOICES)} or distinct axis letters "
            f"among z, y, x (such as yx), got {value!r}"
        )
    return tuple(sorted(AXIS_LETTERS.index(letter) for letter in value))


class PlanError(ValueError):
    """A plan file that cannot be used, with the file and the problem in the message."""


@dataclass(frozen=True)
class Normalization:
    """Per-image intensity normalisation. Percentile clipping tames MRI's arbitrary bright spots
    before the z-score; `nonzero_only` computes the statistics inside the body only (the nonzero
    voxels with their holes filled, nnU-Net's `use_mask_for_norm`) and leaves the rest at 0."""

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
    # None: network outputs go back with `probability_order` on every axis; a number: across the
    # thick axis with this order, as nnU-Net resamples its probabilities.
    probability_through_plane_order: int | None = None
    # Keep the image's interpolation within the values it interpolates (per slice when the thick
    # axis goes on its own), as nnU-Net's resampling does.
    clip_image: bool = False


@dataclass(frozen=True)
class Preprocessing:
    """`patient_axes_zyx`: the patient axis each array axis of the network's grid runs along.
    Every image is transposed into this order first (and its output back), so that one physical
    image gets one mask whatever the axis order of its file; the target spacing is in this order.
    """

    target_spacing_zyx: tuple[float, float, float]
    patient_axes_zyx: tuple[int, int, int] = AXIAL_PATIENT_AXES
    # nnU-Net's rule instead: one transpose for every image (its plans' transpose_forward).
    fixed_transpose: tuple[int, int, int] | None = None
    crop_to_nonzero: bool = True
    normalization: Normalization = field(default_factory=Normalization)
    resampling: Resampling = field(default_factory=Resampling)


@dataclass(frozen=True)
class FoldWeights:
    file: str
    sha256: str


@dataclass(frozen=True)
class Inference:
    """`mirror_axes` are the axes training mirrored, the only ones test-time mirroring may flip;
    `test_time_mirroring` says whether inference does by default (cross-validation measures it),
    over `test_time_mirror_axes` when the plan names some of them (2**n passes per tile: fewer
    axes, less time), else over all. Tiles are blended by a Gaussian of sigma = patch *
    `gaussian_sigma_scale`."""

    patch_size_zyx: tuple[int, int, int]
    folds: tuple[FoldWeights, ...]
    tile_step: float = 0.5
    gaussian_sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = ()
    test_time_mirroring: bool = False
    test_time_mirror_axes: tuple[int, ...] | None = None
    batch_size: int = 2
    activation: str = "sigmoid"
    classes: tuple[str, ...] = ("tumor",)
    precision: str = "float32"
    stitching: str = "pantherseg"
    restore: str = "probabilities"


def planned_test_time_axes(inference: Inference) -> tuple[int, ...]:
    """The axes the plan's own test-time mirroring flips: none when it is off, the axes it names,
    or every trained one."""
    if not inference.test_time_mirroring:
        return ()
    if inference.test_time_mirror_axes is not None:
        return tuple(inference.test_time_mirror_axes)
    return tuple(inference.mirror_axes)


def describe_test_time_mirroring(inference: Inference) -> str:
    """The plan's test-time mirroring in words, as model cards and logs state it: "off" or, for
    example, "on over z and x, 4 passes per tile"."""
    axes = planned_test_time_axes(inference)
    if not inference.test_time_mirroring:
        return "off"
    if not axes:
        return "on, but the network was trained without flips (inference.mirror_axes is empty)"
    letters = [AXIS_LETTERS[axis] for axis in axes]
    words = letters[0] if len(letters) == 1 else f"{', '.join(letters[:-1])} and {letters[-1]}"
    return f"on over {words}, {2 ** len(axes)} passes per tile"


@dataclass(frozen=True)
class PancreasGuidance:
    """Keep a tumor component only if enough of it lies in the (dilated) predicted pancreas, the
    voxels whose pancreas probability reaches `pancreas_threshold`."""

    enabled: bool = False
    pancreas_threshold: float = 0.5
    dilation_mm: float = 10.0
    min_overlap: float = 0.15


@dataclass(frozen=True)
class Postprocessing:
    """`connectivity`: 26 counts voxels touching at a corner as one lesion, 6 only at a face."""

    threshold: float = 0.5
    decision: str = "threshold"
    min_component_mm3: float = 0.0
    connectivity: int = 26
    pancreas_guidance: PancreasGuidance = field(default_factory=PancreasGuidance)
    never_empty: bool = True


@dataclass(frozen=True)
class Localiser:
    """The first stage of a two-stage model: a network on a coarse grid over the whole image,
    whose pancreas-and-tumor region, grown by `margin_mm`, is all the main network sees.

    The region is the largest connected component of the voxels whose foreground probability
    (1 - background) reaches `threshold`, with every other component of at least
    `component_share` of its volume. It is implausible, and the main network runs over the whole
    image, when it holds less than `min_foreground_ml` or its longest side exceeds
    `max_extent_mm` (training sets both from the annotated cases).
    """

    preprocessing: Preprocessing
    inference: Inference
    margin_mm: float = 30.0
    threshold: float = 0.5
    min_foreground_ml: float = 1.0
    max_extent_mm: float = 400.0
    component_share: float = 0.25


@dataclass(frozen=True)
class Plan:
    """`localiser`: None for a single-stage model, else the first stage of a two-stage one."""

    task: str
    preprocessing: Preprocessing
    inference: Inference
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    input_socket: str = ""
    localiser: Localiser | None = None

    def __post_init__(self) -> None:
        if not self.input_socket and self.task in TASK_SOCKETS:
            object.__setattr__(self, "input_socket", TASK_SOCKETS[self.task])

    def to_json(self) -> dict[str, Any]:
        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}
        if self.localiser is None:  # a single-stage plan reads as before two stages existed
            del data["localiser"]
        return data


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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def _preprocessing_from(pre: dict, where: Path) -> Preprocessing:
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
        resampling.probability_through_plane_order or 0,
    ):
        _require(order in range(6), where, "interpolation orders must be 0..5")
    spacing = _tuple_of(pre.get("target_spacing_zyx"), float, 3, where, "target_spacing_zyx")
    _require(all(s > 0 for s in spacing), where, "target_spacing_zyx must be positive")
    axes = _tuple_of(
        pre.get("patient_axes_zyx", AXIAL_PATIENT_AXES), int, 3, where, "patient_axes_zyx"
    )
    _require(sorted(axes) == [0, 1, 2], where, "patient_axes_zyx must be a permutation of 0, 1, 2")
    fixed = pre.get("fixed_transpose")
    if fixed is not None:
        fixed = _tuple_of(fixed, int, 3, where, "fixed_transpose")
        _require(sorted(fixed) == [0, 1, 2], where, "fixed_transpose must permute 0, 1, 2")
    return _build(
        Preprocessing,
        pre,
        where,
        "preprocessing",
        target_spacing_zyx=spacing,
        patient_axes_zyx=axes,
        fixed_transpose=fixed,
        normalization=normalization,
        resampling=resampling,
    )


def _inference_from(inf: dict, where: Path, require_folds: bool) -> Inference:
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
    test_time_axes = inf.get("test_time_mirror_axes")
    if test_time_axes is not None:
        test_time_axes = _tuple_of(test_time_axes, int, None, where, "test_time_mirror_axes")
        _require(
            bool(test_time_axes)
            and set(test_time_axes) <= set(mirror)
            and list(test_time_axes) == sorted(set(test_time_axes)),
            where,
            f"test_time_mirror_axes must be some of the trained mirror_axes {list(mirror)}, "
            "distinct and in increasing order (null: all of them)",
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
        test_time_mirror_axes=test_time_axes,
        classes=classes,
    )
    _require(0 < inference.tile_step <= 1, where, "tile_step must be in (0, 1]")
    _require(
        _is_number(inference.gaussian_sigma_scale) and inference.gaussian_sigma_scale > 0,
        where,
        "gaussian_sigma_scale must be a positive number",
    )
    _require(
        isinstance(inference.test_time_mirroring, bool),
        where,
        "test_time_mirroring must be true or false",
    )
    _require(
        not inference.test_time_mirroring or bool(mirror),
        where,
        "test_time_mirroring needs the mirror_axes the network was trained with",
    )
    _require(
        inference.test_time_mirroring or test_time_axes is None,
        where,
        "test_time_mirror_axes are set, but test_time_mirroring is off",
    )
    _require(inference.precision in PRECISIONS, where, f"precision must be one of {PRECISIONS}")
    _require(inference.stitching in STITCHINGS, where, f"stitching must be one of {STITCHINGS}")
    _require(inference.restore in RESTORES, where, f"restore must be one of {RESTORES}")
    _require(
        inference.restore != "logits" or inference.activation == "softmax",
        where,
        "restoring logits needs a softmax network",
    )
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
    return inference


def _localiser_from(value: Any, where: Path, require_folds: bool) -> Localiser | None:
    """The optional first stage; errors name the section."""
    if value is None:
        return None
    _require(isinstance(value, dict), where, "'localiser' must be an object or null")
    try:
        preprocessing = _preprocessing_from(_section(value, "preprocessing", where), where)
        inference = _inference_from(_section(value, "inference", where), where, require_folds)
        needed = {"background", "pancreas"}
        _require(
            inference.activation == "softmax" and needed <= set(inference.classes),
            where,
            "a localiser is a softmax network with the classes background and pancreas",
        )
        localiser = _build(
            Localiser, value, where, "localiser", preprocessing=preprocessing, inference=inference
        )
        for name in ("margin_mm", "min_foreground_ml"):
            number = getattr(localiser, name)
            _require(_is_number(number) and number >= 0, where, f"{name} must be a number >= 0")
        _require(
            _is_number(localiser.max_extent_mm) and localiser.max_extent_mm > 0,
            where,
            "max_extent_mm must be a positive number",
        )
        _require(0 < localiser.threshold < 1, where, "threshold must be in (0, 1)")
        _require(
            _is_number(localiser.component_share) and 0 < localiser.component_share <= 1,
            where,
            "component_share must be in (0, 1]",
        )
    except PlanError as error:
        raise PlanError(str(error).replace(f"{where}: ", f"{where}: localiser: ", 1)) from None
    return localiser


def plan_from_json(data: dict[str, Any], where: Path, require_folds: bool = True) -> Plan:
    """Validates a parsed plan; `where` names the file in errors. Training plans its
    preprocessing before any weights exist, so it may ask for a plan without folds."""
    _require(isinstance(data, dict), where, "a plan must be a JSON object")
    _require(data.get("format") == PLAN_FORMAT, where, f"not a plan file (format != {PLAN_FORMAT})")
    version = data.get("version")
    _require(
        not (isinstance(version, int) and 1 <= version < PLAN_VERSION),
        where,
        f"plan version {version} was written by an older pantherseg and is no longer read; "
        + UPGRADE_HINT.format(folder=where.parent),
    )
    _require(
        version == PLAN_VERSION,
        where,
        f"plan version {version!r} is not supported (this pantherseg reads version "
        f"{PLAN_VERSION}; a newer plan needs a newer pantherseg)",
    )
    unknown = set(data) - {"format", "version", *Plan.__dataclass_fields__}
    _require(not unknown, where, f"unknown top-level field(s): {', '.join(sorted(unknown))}")
    task = data.get("task")
    _require(task in TASK_SOCKETS, where, f"task must be one of {list(TASK_SOCKETS)}, got {task!r}")

    preprocessing = _preprocessing_from(_section(data, "preprocessing", where), where)
    inference = _inference_from(_section(data, "inference", where), where, require_folds)
    classes = inference.classes
    localiser = _localiser_from(data.get("localiser"), where, require_folds)

    post = _section(data, "postprocessing", where)
    guidance = _build(
        PancreasGuidance, _section(post, "pancreas_guidance", where), where, "pancreas_guidance"
    )
    postprocessing = _build(
        Postprocessing, post, where, "postprocessing", pancreas_guidance=guidance
    )
    _require(0 < postprocessing.threshold < 1, where, "threshold must be in (0, 1)")
    _require(postprocessing.decision in DECISIONS, where, f"decision must be one of {DECISIONS}")
    _require(
        postprocessing.decision != "argmax" or inference.activation == "softmax",
        where,
        "the argmax decision needs a softmax network",
    )
    _require(
        postprocessing.connectivity in CONNECTIVITIES,
        where,
        f"connectivity must be one of {CONNECTIVITIES}",
    )
    _require(0 < guidance.pancreas_threshold < 1, where, "pancreas_threshold must be in (0, 1)")
    _require(postprocessing.min_component_mm3 >= 0, where, "min_component_mm3 must be >= 0")
    _require(
        not guidance.enabled or "pancreas" in classes,
        where,
        "pancreas guidance needs a network that predicts the pancreas",
    )
    return Plan(
        task=task,
        preprocessing=preprocessing,
        inference=inference,
        postprocessing=postprocessing,
        input_socket=data.get("input_socket", ""),
        localiser=localiser,
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
        stages = [("", plan.inference)]
        if plan.localiser is not None:
            stages.append(("localiser: ", plan.localiser.inference))
        for stage, inference in stages:
            for fold in inference.folds:
                weights = Path(model_dir) / fold.file
                _require(weights.is_file(), path, f"{stage}weight file {fold.file} is missing")
                actual = sha256_of(weights)
                _require(
                    actual == fold.sha256,
                    path,
                    f"{stage}weight file {fold.file} has sha256 {actual}, the plan expects "
                    f"{fold.sha256}",
                )
    return plan


def save_plan(plan: Plan, model_dir: Path) -> Path:
    """Writes the plan atomically, after checking it would load again."""
    data = plan.to_json()
    path = Path(model_dir) / PLAN_FILE
    plan_from_json(json.loads(json.dumps(data)), path, require_folds=False)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def all_folds(plan: Plan) -> tuple[FoldWeights, ...]:
    """Every weight file the model needs: the main network's folds, then the localiser's."""
    localiser = plan.localiser.inference.folds if plan.localiser is not None else ()
    return plan.inference.folds + localiser


def fold_paths(inference: Inference, model_dir: Path) -> list[Path]:
    return [Path(model_dir) / fold.file for fold in inference.folds]
