"""Every training hyper-parameter, in one YAML file.

`default.yaml` beside this module documents each value; a user's file overrides any subset, and an
unknown key is an error (a typo must not silently fall back to a default). A file may build on
another (`base: other.yaml`, relative to it), so that a variant recipe states only what it changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pantherseg.inference.plan import KNOWN_CLASSES

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
BASE_KEY = "base"


class ConfigError(ValueError):
    """A configuration file that cannot be used, with the file and the key in the message."""


@dataclass
class DataConfig:
    labels: str = "tumor+pancreas"  # or "tumor" (binary); the pancreas is removed at output
    jobs: int = 2


@dataclass
class PlanConfig:
    gpu_memory_gb: float = 16.0
    anisotropy_threshold: float = 3.0
    target_spacing_zyx: list[float] | None = None
    patch_size_zyx: list[int] | None = None
    clip_percentiles: list[float] | None = field(default_factory=lambda: [0.5, 99.5])
    nonzero_only: bool = False


@dataclass
class SamplingConfig:
    tumor_fraction: float = 0.5
    batch_size: int = 2
    workers: int = 2


@dataclass
class AugmentationConfig:
    probability: float = 0.2
    rotation_in_plane_deg: float = 30.0
    rotation_out_of_plane_deg: float = 5.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.25])
    elastic: bool = False
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    brightness: float = 0.25
    contrast: float = 0.25
    noise_std: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    low_resolution: list[float] = field(default_factory=lambda: [0.5, 1.0])
    label_intensity: list[float] | None = None
    label_intensity_classes: list[str] = field(default_factory=lambda: ["tumor", "pancreas"])
    label_intensity_probability: float = 0.3


@dataclass
class NetworkConfig:
    name: str = "attention_unet"  # or "dynunet"
    base_features: int = 32
    max_features: int = 320
    depth: int | None = None  # None: from the plan's patch size
    deep_supervision: bool = True
    residual: bool = True


@dataclass
class LossConfig:
    name: str = "dice_focal_boundary"  # or "dice_ce", "tversky_ce"
    dice_weight: float = 0.6
    focal_weight: float = 0.3
    boundary_weight: float = 0.1
    tumor_slice_weight: float = 2.0
    false_negative_weight: float = 0.7  # tversky_ce: beta; false positives weigh 1 - beta
    deep_supervision_decay: float = 0.5


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # or "sgd"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    momentum: float = 0.99
    scheduler: str = "plateau"  # "plateau", "poly" or "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    warmup_epochs: int = 0
    epochs: int = 300
    iterations_per_epoch: int = 250
    patience: int = 15
    time_limit_minutes: float | None = None
    grad_clip: float = 12.0
    amp: bool = True
    cpu_bfloat16: bool | str = False  # or "auto": bfloat16 where the CPU runs it natively
    cudnn_benchmark: bool = True
    channels_last: bool = False


@dataclass
class ValidationConfig:
    every_epochs: int = 1
    tile_step: float = 0.5
    batch_size: int = 2
    target: str = "tumor"  # what the validation Dice scores: "tumor" or "foreground" (any label)


@dataclass
class CascadeConfig:
    enabled: bool = True
    localiser_voxels: int = 96  # the median image's longest side on the localiser's grid
    localiser_patch_size_zyx: list[int] | None = None
    localiser_base_features: int = 16
    localiser_max_features: int = 128
    localiser_epochs: int | None = None
    margin_mm: float = 30.0
    jitter_mm: float | None = None


@dataclass
class CrossValidationConfig:
    folds: int = 5
    seed: int = 0
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6])
    min_component_mm3: list[float] = field(default_factory=lambda: [0.0, 50.0, 200.0, 500.0])
    measure_mirroring: bool = True
    parallel_folds: int = 1


@dataclass
class ExportConfig:
    opset: int = 17
    tolerance: float = 1e-4
    fp16_tolerance: float = 1e-2


@dataclass
class TrainingConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    cv: CrossValidationConfig = field(default_factory=CrossValidationConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(instance: Any, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(instance)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, where, f"{prefix}{key}.")
        else:
            setattr(instance, key, _checked(value, str(fields[key].type), where, prefix + key))
    return instance


def _checked(value: Any, annotation: str, where: str, name: str) -> Any:
    """`value` as one of the field's declared types (bool, int, float, str or list, optionally
    None; a union such as `bool | str` takes either).

    YAML 1.1, which PyYAML reads, takes `1e-4` (no dot) for a string: such a string is read as
    the float it means rather than failing deep inside PyTorch."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{where}: '{name}' must not be empty (null)")
    kinds = [k for k in kinds if k != "None"]
    for kind in kinds:
        if kind == "float" and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        expected = {
            "bool": (bool,),
            "int": (int,),
            "float": (int, float),
            "str": (str,),
        }.get(kind, (list,) if kind.startswith("list") else (object,))
        if isinstance(value, expected) and (bool in expected or not isinstance(value, bool)):
            return float(value) if kind == "float" else value
    what = {"bool": "true or false", "int": "a whole number", "float": "a number"}
    described = " or ".join(
        what.get(kind, "a list" if kind.startswith("list") else f"a {kind}") for kind in kinds
    )
    raise ConfigError(f"{where}: '{name}' must be {described}, got {value!r}")


def _read_yaml(source: Path) -> Any:
    try:
        return yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{source}: cannot be read as YAML ({error})") from None


def _layers(path: Path) -> list[tuple[Path, Any]]:
    """`path` and the files it builds on through `base:`, the most basic first."""
    layers: list[tuple[Path, Any]] = []
    source = Path(path)
    while True:
        if source.resolve() in [seen.resolve() for seen, _ in layers]:
            raise ConfigError(f"{source}: the chain of '{BASE_KEY}' files comes back to this file")
        values = _read_yaml(source)
        base = values.pop(BASE_KEY, None) if isinstance(values, dict) else None
        layers.append((source, values))
        if base is None:
            return layers[::-1]
        if not isinstance(base, str):
            raise ConfigError(f"{source}: '{BASE_KEY}' must be a file name, got {base!r}")
        if not (source.parent / base).is_file():
            raise ConfigError(f"{source}: '{BASE_KEY}' names {source.parent / base}, not a file")
        source = source.parent / base


def load_config(path: Path | None = None) -> TrainingConfig:
    """The defaults, overridden by `path` (and the files it builds on) when given."""
    config = TrainingConfig()
    layers = [(DEFAULT_CONFIG, _read_yaml(DEFAULT_CONFIG))]
    if path is not None:
        layers += _layers(path)
    for source, values in layers:
        _merge(config, values, str(source))
    limit = config.optim.time_limit_minutes
    if limit is not None and limit <= 0:
        raise ConfigError(f"optim.time_limit_minutes must be positive (or null), not {limit}")
    if config.data.labels not in ("tumor", "tumor+pancreas"):
        raise ConfigError(
            f"data.labels must be 'tumor' or 'tumor+pancreas', not {config.data.labels!r}"
        )
    if config.validation.target not in ("tumor", "foreground"):
        raise ConfigError(
            f"validation.target must be 'tumor' or 'foreground', not {config.validation.target!r}"
        )
    if isinstance(config.optim.cpu_bfloat16, str) and config.optim.cpu_bfloat16 != "auto":
        raise ConfigError(
            f"optim.cpu_bfloat16 must be true, false or 'auto', not {config.optim.cpu_bfloat16!r}"
        )
    _check_label_intensity(config.augmentation)
    if config.cv.parallel_folds < 1:
        raise ConfigError(f"cv.parallel_folds must be at least 1, not {config.cv.parallel_folds}")
    cascade = config.cascade
    if cascade.margin_mm < 0 or (cascade.jitter_mm is not None and cascade.jitter_mm < 0):
        raise ConfigError("cascade.margin_mm and cascade.jitter_mm must be >= 0")
    if cascade.localiser_voxels < 8:
        raise ConfigError(
            f"cascade.localiser_voxels must be at least 8, not {cascade.localiser_voxels}"
        )
    return config


def _check_label_intensity(aug: AugmentationConfig) -> None:
    if aug.label_intensity is not None:
        factors = aug.label_intensity
        if len(factors) != 2 or not 0 < factors[0] <= factors[1]:
            raise ConfigError(
                "augmentation.label_intensity must be null or [low, high] with "
                f"0 < low <= high, not {factors}"
            )
    unknown = [c for c in aug.label_intensity_classes if c not in KNOWN_CLASSES[1:]]
    if unknown or not aug.label_intensity_classes:
        raise ConfigError(
            "augmentation.label_intensity_classes must name tumor and/or pancreas, not "
            f"{aug.label_intensity_classes}"
        )
    if not 0 <= aug.label_intensity_probability <= 1:
        raise ConfigError(
            "augmentation.label_intensity_probability must be in [0, 1], not "
            f"{aug.label_intensity_probability}"
        )
