"""Training data: finding the cases, checking them, and summarising them for the planner.

Three layouts are recognised without being told: the PANTHER Task 1 and Task 2 folders as the
organisers publish them, and an nnU-Net raw dataset (single channel). Images and labels are paired
by case id; anything that does not pair is an error that names the files, because training on a
silently shrunken dataset is worse than not training.

`validate` reads every pair and reports problems per case instead of stopping at the first, so a
user fixes a whole dataset in one go. `fingerprint` collects what the planner needs (spacings,
shapes after cropping, foreground intensities), the same statistics nnU-Net records, and
`Fingerprint.from_nnunet` reads the organisers' published nnU-Net fingerprint so that planning
can be checked against the real data's numbers.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from pantherseg.inference.io import (
    Geometry,
    ImageError,
    check_inference_image,
    list_images,
    read_image,
    strip_image_suffix,
)
from pantherseg.inference.plan import AXIAL_PATIENT_AXES
from pantherseg.inference.preprocess import nonzero_box, patient_axes
from pantherseg.parallel import parallel_map

TASKS = ("task1", "task2")
LAYOUTS = ("panther-task1", "panther-task2", "nnunet")
LABEL_MODES = ("tumor", "tumor+pancreas")
TUMOR, PANCREAS = 1, 2
ALLOWED_LABELS = frozenset({0, TUMOR, PANCREAS})
FOREGROUND_SAMPLES_PER_CASE = 10_000  # nnU-Net's number: enough for stable percentiles
_CHANNEL = re.compile(r"_(\d{4})$")
_UNLABELLED_FOLDER = re.compile(r"^(imagestr_)?unlabell?ed$", re.IGNORECASE)
_LIST_LIMIT = 10  # names shown in an error before "and N more"


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the folder or files."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None


@dataclass
class Dataset:
    root: Path
    layout: str  # one of LAYOUTS
    task: str  # "task1" or "task2"
    labelled: list[Case]
    unlabelled: list[Case] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown} and {more} more" if more > 0 else shown


def _images_of(folder: Path, file_ending: str | None = None) -> dict[str, Path]:
    """Image files by stem, as a DatasetError when the folder is missing or ambiguous."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    try:
        images = list_images(folder)
    except ImageError as error:
        raise DatasetError(str(error)) from None
    images = {s: p for s, p in images.items() if not s.startswith(".")}  # ._x.mha, .partial-x
    if file_ending is not None:
        images = {s: p for s, p in images.items() if p.name.lower().endswith(file_ending.lower())}
    if not images:
        what = f"image files ending in {file_ending}" if file_ending else "image files"
        raise DatasetError(f"{folder}: no {what} found")
    return images


def _case_ids_from_images(folder: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Case id -> image path for files named <case>_0000.<ext> (nnU-Net's channel suffix).

    A second channel (<case>_0001) means a multi-channel dataset, which the single-input
    networks here cannot use; a file without the suffix is a naming mistake. Both are errors
    rather than skipped files, so that no case disappears silently.
    """
    cases: dict[str, Path] = {}
    other_channels, unsuffixed = [], []
    for stem, path in images.items():
        match = _CHANNEL.search(stem)
        if match is None:
            unsuffixed.append(path.name)
        elif match.group(1) != "0000":
            other_channels.append(path.name)
        else:
            cases[stem[: match.start()]] = path
    if other_channels:
        raise DatasetError(
            f"{folder}: multi-channel datasets are not supported (only channel _0000): "
            f"{_names(other_channels)}"
        )
    if unsuffixed:
        raise DatasetError(
            f"{folder}: image file names must end in _0000 (the channel) before the extension: "
            f"{_names(unsuffixed)}"
        )
    return cases


def _pair(
    images: dict[str, Path], labels: dict[str, Path], image_dir: Path, label_dir: Path
) -> list[Case]:
    missing_labels = sorted(set(images) - set(labels))
    orphans = sorted(set(labels) - set(images))
    problems = []
    if missing_labels:
        names = _names(images[c].name for c in missing_labels)
        problems.append(f"{len(missing_labels)} image(s) in {image_dir} without a label: {names}")
    if orphans:
        names = _names(labels[c].name for c in orphans)
        problems.append(f"{len(orphans)} label(s) in {label_dir} without an image: {names}")
    if problems:
        raise DatasetError("; ".join(problems))
    return [Case(case_id, images[case_id], labels[case_id]) for case_id in sorted(images)]


def _unlabelled(root: Path) -> list[Case]:
    """Images of an unlabelled folder (PANTHER Task 1 ships 367 scans of other sequences).

    Its naming is not documented, so any image file is accepted, in subfolders too; a trailing
    _0000 channel suffix is dropped from the case id when present.
    """
    cases: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not _UNLABELLED_FOLDER.match(folder.name):
            continue
        for path in sorted(folder.rglob("*")):
            stem = strip_image_suffix(path.name)
            if stem is None or not path.is_file() or path.name.startswith("."):
                continue
            match = _CHANNEL.search(stem)
            case_id = stem[: match.start()] if match and match.group(1) == "0000" else stem
            if case_id in cases:
                raise DatasetError(
                    f"{folder}: two unlabelled images for case {case_id!r}: "
                    f"{cases[case_id]}, {path}"
                )
            cases[case_id] = path
    return [Case(case_id, path, None) for case_id, path in sorted(cases.items())]


def _read_dataset_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: must hold a JSON object")
    return data


def _check_nnunet_description(data: dict[str, Any], path: Path) -> None:
    """Rejects what the rest of the pipeline would misread: several channels, or label values
    that do not mean 0 background, 1 tumor, 2 pancreas."""
    channels = data.get("channel_names", data.get("modality"))
    if channels is not None:
        if not isinstance(channels, dict) or not channels:
            raise DatasetError(f"{path}: channel_names must be a non-empty object")
        if len(channels) > 1:
            raise DatasetError(
                f"{path}: multi-channel datasets are not supported ({len(channels)} channels: "
                f"{', '.join(str(v) for v in channels.values())})"
            )
    labels = data.get("labels")
    if labels is None:
        return
    if not isinstance(labels, dict):
        raise DatasetError(f"{path}: labels must be an object")
    values: dict[str, int] = {}
    for key, value in labels.items():
        # nnU-Net v2 writes {"name": value}; v1 wrote {"value": "name"}.
        name, number = (value, key) if str(key).isdigit() else (key, value)
        if isinstance(number, str) and number.isdigit():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool):
            raise DatasetError(
                f"{path}: label {name!r} must be a single integer value (regions are not "
                f"supported), got {number!r}"
            )
        values[str(name).lower()] = number
    expected = {"background": 0, "tumor": TUMOR, "tumour": TUMOR, "pancreas": PANCREAS}
    wrong = [f"{n}={v}" for n, v in values.items() if n in expected and expected[n] != v]
    outside = [f"{n}={v}" for n, v in values.items() if v not in ALLOWED_LABELS]
    if wrong or outside:
        raise DatasetError(
            f"{path}: labels must be 0 background, 1 tumor, 2 pancreas; found "
            f"{', '.join(sorted(set(wrong + outside)))}"
        )


def _task_from_names(case_ids: Iterable[str]) -> str:
    """PANTHER Task 1 case ids end in _0001 (the sequence number); Task 2's do not."""
    ids = list(case_ids)
    return "task1" if ids and all(c.endswith("_0001") for c in ids) else "task2"


def _nnunet_task(data: dict[str, Any]) -> str:
    """Task 2 when the channel is named as a T2 scan; otherwise Task 1, the challenge's main task
    (the organisers' own dataset.json calls its channel just "MRI")."""
    channels = data.get("channel_names", data.get("modality")) or {}
    name = " ".join(str(v) for v in channels.values()).lower()
    return "task2" if re.search(r"(^|[^a-z0-9])t2", name) else "task1"


def discover(root: Path, task: str | None = None) -> Dataset:
    """Finds the cases of a dataset folder and works out its layout and task.

    `task` overrides the task read from the file names or dataset.json; it must agree with a
    PANTHER Task 1 layout's naming, because that naming is what Task 1 data looks like.
    """
    root = Path(root)
    if task is not None and task not in TASKS:
        raise DatasetError(f"task must be one of {TASKS}, got {task!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")

    # Exact names: on a case-insensitive file system imagesTr/ would also find ImagesTr/. A
    # dataset.json beside PANTHER's ImagesTr/ does not make it an nnU-Net dataset.
    entries = {p.name for p in root.iterdir()}
    if "imagesTr" in entries:
        description_path = root / "dataset.json"
        if not description_path.is_file():
            raise DatasetError(f"{root}: an nnU-Net dataset needs a dataset.json")
        description = _read_dataset_json(description_path)
        _check_nnunet_description(description, description_path)
        ending = description.get("file_ending")
        if ending is not None and not isinstance(ending, str):
            raise DatasetError(f"{description_path}: file_ending must be a string")
        image_dir, label_dir = root / "imagesTr", root / "labelsTr"
        images = _case_ids_from_images(image_dir, _images_of(image_dir, ending))
        labels = _images_of(label_dir, ending)
        labelled = _pair(images, labels, image_dir, label_dir)
        return Dataset(
            root=root,
            layout="nnunet",
            task=task or _nnunet_task(description),
            labelled=labelled,
            unlabelled=[],
        )

    image_dir, label_dir = root / "ImagesTr", root / "LabelsTr"
    if "ImagesTr" not in entries and "LabelsTr" not in entries:
        raise DatasetError(
            f"{root}: not a dataset folder: expected ImagesTr/ and LabelsTr/ (PANTHER) or "
            "imagesTr/, labelsTr/ and dataset.json (nnU-Net)"
        )
    images = _case_ids_from_images(image_dir, _images_of(image_dir))
    labels = _images_of(label_dir)
    labelled = _pair(images, labels, image_dir, label_dir)
    detected = _task_from_names(images)
    if task == "task1" and detected != "task1":
        wrong = [images[c].name for c in images if not c.endswith("_0001")]
        raise DatasetError(
            f"{image_dir}: Task 1 images are named <id>_0001_0000.<ext>; these are not: "
            f"{_names(wrong)}"
        )
    task = task or detected
    return Dataset(
        root=root,
        layout=f"panther-{task}",
        task=task,
        labelled=labelled,
        unlabelled=_unlabelled(root),
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@dataclass
class CaseProblem:
    case_id: str
    problem: str
    severity: Literal["error", "warning"] = "error"


def _header(path: Path) -> tuple[sitk.ImageFileReader | None, str | None]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        text = str(error).strip()
        reason = text.splitlines()[-1] if text else "unknown error"
        return None, f"{path.name} cannot be read ({reason})"
    return reader, None


def _header_problems(reader: sitk.ImageFileReader, path: Path) -> list[str]:
    problems = []
    if reader.GetDimension() != 3:
        problems.append(f"{path.name} is {reader.GetDimension()}D, expected 3D")
    if reader.GetNumberOfComponents() != 1:
        problems.append(
            f"{path.name} has {reader.GetNumberOfComponents()} components per voxel, expected 1"
        )
    return problems


def _geometry(reader: sitk.ImageFileReader) -> Geometry:
    return Geometry(
        size_zyx=tuple(int(s) for s in reversed(reader.GetSize())),
        spacing_zyx=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin_xyz=tuple(float(o) for o in reader.GetOrigin()),
        direction_xyz=tuple(float(d) for d in reader.GetDirection()),
    )


def _validate_case(job: tuple[Case, str]) -> list[CaseProblem]:
    """Every problem of one labelled case: headers first (cheap), then the voxel values."""
    case, labels = job
    assert case.label is not None
    errors: list[str] = []
    warnings: list[str] = []
    image_header, image_error = _header(case.image)
    label_header, label_error = _header(case.label)
    errors += [e for e in (image_error, label_error) if e]
    if image_header is not None:
        errors += _header_problems(image_header, case.image)
    if label_header is not None:
        errors += _header_problems(label_header, case.label)
    if errors:  # unreadable or not a 3D scalar image: the value checks would only repeat it
        return [CaseProblem(case.case_id, e) for e in errors]
    differences = _geometry(image_header).differences(_geometry(label_header))
    errors += [f"label geometry differs from the image: {d}" for d in differences]

    try:
        check_inference_image(read_image(case.image), case.image)
    except ImageError as error:  # what inference would refuse, training must not learn from
        errors.append(str(error))
    try:
        label_image = read_image(case.label)
    except ImageError as error:
        return [CaseProblem(case.case_id, e) for e in [*errors, str(error)]]
    label = sitk.GetArrayViewFromImage(label_image)  # a view: label_image must stay alive
    if np.issubdtype(label.dtype, np.floating) and not np.all(np.isfinite(label)):
        errors.append(f"{case.label.name} holds NaN or infinite values")
    else:
        values = np.unique(label)
        integral = np.all(values == np.round(values))
        unexpected = sorted(set(values.tolist()) - ALLOWED_LABELS)
        if not integral or unexpected:
            errors.append(
                f"{case.label.name}: label values {_names(str(v) for v in unexpected)} outside "
                "0 background, 1 tumor, 2 pancreas"
            )
        if TUMOR not in values:
            warnings.append("no tumor voxel")
        if labels == "tumor+pancreas" and PANCREAS not in values:
            warnings.append("no pancreas voxel")
    return [CaseProblem(case.case_id, e, "error") for e in errors] + [
        CaseProblem(case.case_id, w, "warning") for w in warnings
    ]


def validate(
    dataset: Dataset, labels: str = "tumor", jobs: int = 2, progress: bool = True
) -> list[CaseProblem]:
    """Reads every labelled pair and lists what is wrong with each, errors and warnings.

    The caller decides: errors should stop training, while a warning such as "no tumor voxel"
    (a tumor-free scan is a legitimate negative example) may be accepted.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    jobs_list = [(case, labels) for case in dataset.labelled]
    problems: list[CaseProblem] = []
    for found in parallel_map(_validate_case, jobs_list, jobs, progress, "validating"):
        problems.extend(found)
    return problems


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------

_INTENSITY_KEYS = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")


@dataclass
class Fingerprint:
    """Per-case geometry and pooled foreground intensities: the planner's only input.

    Spacings and shapes are in each file's own array order; `patient_axes_zyx` says which patient
    axis each of those array axes runs along (`pantherseg.inference.preprocess.patient_axes`), so
    that the planner can bring every case into one axis order, as preprocessing will.
    """

    case_ids: list[str]
    spacings_zyx: list[tuple[float, float, float]]
    shapes_after_crop_zyx: list[tuple[int, int, int]]
    # Over labelled voxels (label > 0), at most 10000 sampled per case; empty without foreground.
    foreground_intensity: dict[str, float]
    # None when the source recorded no directions (nnU-Net's fingerprint): every case axial.
    patient_axes_zyx: list[tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        n = len(self.case_ids)
        if n == 0:
            raise DatasetError("a fingerprint needs at least one case")
        if len(self.spacings_zyx) != n or len(self.shapes_after_crop_zyx) != n:
            raise DatasetError(
                f"fingerprint lists {n} cases, {len(self.spacings_zyx)} spacings and "
                f"{len(self.shapes_after_crop_zyx)} shapes"
            )
        self.spacings_zyx = [_triple(s, float, "spacing") for s in self.spacings_zyx]
        self.shapes_after_crop_zyx = [_triple(s, int, "shape") for s in self.shapes_after_crop_zyx]
        self.foreground_intensity = {k: float(v) for k, v in self.foreground_intensity.items()}
        if self.patient_axes_zyx is None:
            self.patient_axes_zyx = [AXIAL_PATIENT_AXES] * n
        if len(self.patient_axes_zyx) != n:
            raise DatasetError(
                f"fingerprint lists {n} cases and {len(self.patient_axes_zyx)} axis orders"
            )
        self.patient_axes_zyx = [_axis_order(a) for a in self.patient_axes_zyx]

    def to_json(self) -> dict[str, Any]:
        return {
            "case_ids": list(self.case_ids),
            "spacings_zyx": [list(s) for s in self.spacings_zyx],
            "shapes_after_crop_zyx": [list(s) for s in self.shapes_after_crop_zyx],
            "patient_axes_zyx": [list(a) for a in self.patient_axes_zyx or []],
            "foreground_intensity": dict(self.foreground_intensity),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        try:
            return cls(
                case_ids=[str(c) for c in data["case_ids"]],
                spacings_zyx=data["spacings_zyx"],
                shapes_after_crop_zyx=data["shapes_after_crop_zyx"],
                foreground_intensity=data.get("foreground_intensity", {}),
                patient_axes_zyx=data.get("patient_axes_zyx"),
            )
        except (KeyError, TypeError) as error:
            raise DatasetError(f"not a fingerprint: {error!r}") from None

    def common_axis_order(self) -> tuple[int, int, int]:
        """The patient-axis order most cases are stored in (axial on a tie that includes it):
        the plan's, so that the usual case is not transposed at all."""
        counts = Counter(self.patient_axes_zyx)
        top = max(counts.values())
        tied = sorted(order for order, n in counts.items() if n == top)
        return AXIAL_PATIENT_AXES if AXIAL_PATIENT_AXES in tied else tied[0]

    def in_axis_order(self, plan_axes: Sequence[int]) -> Fingerprint:
        """The same fingerprint with every case's spacing and shape in the plan's axis order."""
        spacings, shapes = [], []
        for spacing, shape, own in zip(
            self.spacings_zyx, self.shapes_after_crop_zyx, self.patient_axes_zyx, strict=True
        ):
            order = [own.index(axis) for axis in plan_axes]
            spacings.append(tuple(spacing[a] for a in order))
            shapes.append(tuple(shape[a] for a in order))
        return Fingerprint(
            case_ids=list(self.case_ids),
            spacings_zyx=spacings,
            shapes_after_crop_zyx=shapes,
            foreground_intensity=dict(self.foreground_intensity),
            patient_axes_zyx=[tuple(plan_axes)] * len(self.case_ids),
        )

    @classmethod
    def from_nnunet(cls, data: dict[str, Any]) -> Fingerprint:
        """Reads nnU-Net v2's dataset_fingerprint.json (as the PANTHER organisers published it).

        nnU-Net stores spacings and shapes in the array's axis order, which for SimpleITK-read
        images is (z, y, x): the organisers' file starts with [3.0, 1.1875, 1.1875], the 3 mm
        slice spacing first. It records no case ids, so the cases are numbered.
        """
        try:
            spacings = data["spacings"]
            shapes = data["shapes_after_crop"]
            channels = data.get("foreground_intensity_properties_per_channel", {})
        except (KeyError, TypeError) as error:
            raise DatasetError(f"not an nnU-Net fingerprint: missing {error}") from None
        if len(channels) > 1:
            raise DatasetError(f"an nnU-Net fingerprint of {len(channels)} channels; expected 1")
        stats = next(iter(channels.values()), {})
        intensity = {k: float(stats[k]) for k in _INTENSITY_KEYS if k in stats}
        return cls(
            case_ids=[f"case_{i:03d}" for i in range(len(spacings))],
            spacings_zyx=spacings,
            shapes_after_crop_zyx=shapes,
            foreground_intensity=intensity,
        )


def _axis_order(values: Any) -> tuple[int, int, int]:
    order = tuple(int(v) for v in values)
    if sorted(order) != [0, 1, 2]:
        raise DatasetError(f"fingerprint axis order {values!r} is not a permutation of 0, 1, 2")
    return order


def _triple(values: Any, kind: type, name: str) -> tuple:
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise DatasetError(f"fingerprint {name} {values!r} is not 3 numbers") from None
    if len(out) != 3 or not all(v > 0 for v in out):
        raise DatasetError(f"fingerprint {name} {values!r} must be 3 positive numbers")
    return out


def _case_fingerprint(case: Case) -> tuple[tuple, tuple, tuple, np.ndarray]:
    image = read_image(case.image)
    array = sitk.GetArrayViewFromImage(image)
    start, stop = nonzero_box(array)
    shape = tuple(int(b - a) for a, b in zip(start, stop, strict=True))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    samples = np.empty(0, dtype=np.float64)
    if case.label is not None:
        label_image = read_image(case.label)
        label = sitk.GetArrayViewFromImage(label_image)  # a view: label_image must stay alive
        if label.shape != array.shape:
            raise DatasetError(
                f"case {case.case_id}: label shape {label.shape} differs from image {array.shape}"
            )
        foreground = np.asarray(array[label > 0], dtype=np.float64)
        if foreground.size > FOREGROUND_SAMPLES_PER_CASE:
            # Seeded by the case id: the same case gives the same sample in any process order.
            rng = np.random.default_rng(zlib.crc32(case.case_id.encode("utf-8")))
            pick = rng.choice(foreground.size, FOREGROUND_SAMPLES_PER_CASE, replace=False)
            foreground = foreground[np.sort(pick)]
        samples = foreground
    return spacing, shape, patient_axes(image.GetDirection()), samples


def fingerprint(dataset: Dataset, jobs: int = 2, progress: bool = True) -> Fingerprint:
    """Spacings, shapes after nonzero cropping and foreground intensities of the labelled cases."""
    if not dataset.labelled:
        raise DatasetError(f"{dataset.root}: no labelled cases to fingerprint")
    spacings, shapes, axes, samples = [], [], [], []
    for spacing, shape, order, sample in parallel_map(
        _case_fingerprint, dataset.labelled, jobs, progress, "fingerprint"
    ):
        spacings.append(spacing)
        shapes.append(shape)
        axes.append(order)
        samples.append(sample)
    pooled = np.concatenate(samples)
    intensity: dict[str, float] = {}
    if pooled.size:
        low, median, high = np.percentile(pooled, [0.5, 50.0, 99.5])
        intensity = {
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
            "median": float(median),
            "min": float(pooled.min()),
            "max": float(pooled.max()),
            "percentile_00_5": float(low),
            "percentile_99_5": float(high),
        }
    return Fingerprint(
        case_ids=[c.case_id for c in dataset.labelled],
        spacings_zyx=spacings,
        shapes_after_crop_zyx=shapes,
        foreground_intensity=intensity,
        patient_axes_zyx=axes,
    )
