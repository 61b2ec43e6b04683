"""`python -m training import-nnunet`: a team that trained nnU-Net v2 ships its folds in our
container.

nnU-Net's trained model folder (`<results>/DatasetXXX/<Trainer>__<Plans>__<configuration>/`) holds
what its predictor reads: `plans.json` (preprocessing and architecture), `dataset.json` (channels
and labels) and `fold_k/checkpoint_final.pth` / `checkpoint_best.pth`. The import rebuilds each
fold's network with dynamic-network-architectures from the plans, loads the fold's weights strictly,
exports it to ONNX (checked against PyTorch like our own export), translates the plans into
plan.json (nnU-Net's transpose, spacing, patch, normalisation, resampling orders, stitching and
argmax) and writes a model card naming the source. What our inference cannot reproduce exactly
(cascades, region-based labels, several input channels, 2D, other normalisations or resampling
functions) is refused with the reason rather than approximated.

Checkpoints are pickles (`torch.load(weights_only=False)`, as nnU-Net reads them): import only
folders you trust.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import pydoc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pantherseg.inference.files import atomic_write_json, atomic_write_text
from pantherseg.inference.plan import (
    CARD_FILE,
    METADATA_FILE,
    OUTPUT_SOCKET,
    PLAN_FILE,
    Inference,
    Normalization,
    PancreasGuidance,
    Plan,
    Postprocessing,
    Preprocessing,
    Resampling,
    plan_from_json,
    save_plan,
    sha256_of,
)
from pantherseg.mirror_choice import mirroring_line
from pantherseg.plan_upgrade import without_absolute_paths
from training.config import ExportConfig
from training.export import (
    export_checked_fold,
    export_record,
    parity_batches,
    removed_on_failure,
)
from training.model_card import INTENDED_USE_HEADING, _versions

log = logging.getLogger("pantherseg.training")

PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
# nnunetv2.configuration.ANISO_THRESHOLD, resample_data_or_seg_to_shape's default.
ANISO_THRESHOLD = 3.0
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
NORMALIZATIONS = {"ZScoreNormalization": "zscore", "NoNormalization": "none"}
PREPROCESSOR = "DefaultPreprocessor"
# Readers that give SimpleITK's (z, y, x) array order with the file's axes; NibabelIOWithReorient
# turns every image to RAS first, which our reader does not.
READERS = ("SimpleITKIO", "NibabelIO")
GAUSSIAN_SIGMA_SCALE = 0.125  # nnU-Net's predictor blends tiles with sigma = patch / 8
STATE_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's wrappers


class NnunetImportError(Exception):
    """An nnU-Net model folder this import cannot read or cannot translate faithfully."""


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """The choices nnU-Net's files leave open. `folds` None: every fold_<number> folder;
    `threshold` None: nnU-Net's argmax decides, a number: tumor probability >= threshold."""

    configuration: str | None = None
    folds: tuple[str, ...] | None = None
    checkpoint: str = "final"
    task: str = "task1"
    tile_step: float = 0.5
    test_time_mirroring: bool = True
    tumor_label: str | None = None
    pancreas_label: str | None = None
    threshold: float | None = None
    min_component_mm3: float = 0.0
    pancreas_guidance: bool = False
    never_empty: bool = True


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NnunetImportError(f"{path}: not found (is {path.parent} an nnU-Net model folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NnunetImportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise NnunetImportError(f"{path}: not a JSON object")
    return data


def configuration_name(folder: Path, given: str | None) -> str:
    """The configuration asked for, or the one nnU-Net names its folder after."""
    if given:
        return given
    parts = folder.resolve().name.split("__")
    if len(parts) != 3 or not all(parts):
        raise NnunetImportError(
            f"{folder}: the folder name is not <Trainer>__<Plans>__<configuration>; "
            "name the configuration with --configuration"
        )
    return parts[2]


def resolve_configuration(plans: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    """The configuration with what it inherits (`inherits_from`) filled in, as nnU-Net's
    PlansManager resolves it: the child's keys override its parent's."""
    configurations = plans.get("configurations", {})
    chain: list[str] = []
    while name is not None:
        if name not in configurations:
            raise NnunetImportError(
                f"{where}: no configuration {name!r} (it has {', '.join(configurations)})"
            )
        if name in chain:
            raise NnunetImportError(f"{where}: configurations inherit in a circle: {chain}")
        chain.append(name)
        name = configurations[name].get("inherits_from")
    resolved: dict[str, Any] = {}
    for link in reversed(chain):
        resolved.update(configurations[link])
    return resolved


def _fold_checkpoints(folder: Path, folds: tuple[str, ...] | None, kind: str) -> dict[str, Path]:
    """fold name -> checkpoint; by default every fold_<number> folder (fold_all, trained on every
    case, only when asked for, as nnU-Net's predictor does)."""
    if kind not in CHECKPOINT_FILES:
        raise NnunetImportError(f"checkpoint must be one of {list(CHECKPOINT_FILES)}, got {kind!r}")
    if folds is None:
        found = [p.name.removeprefix("fold_") for p in folder.glob("fold_*") if p.is_dir()]
        folds = tuple(sorted((f for f in found if f.isdigit()), key=int))
        if not folds:
            raise NnunetImportError(f"{folder}: no fold_<number> folders")
    checkpoints = {fold: folder / f"fold_{fold}" / CHECKPOINT_FILES[kind] for fold in folds}
    missing = [str(path) for path in checkpoints.values() if not path.is_file()]
    if missing:
        raise NnunetImportError(f"checkpoint(s) not found: {', '.join(missing)}")
    return checkpoints


def _check_supported(configuration: dict[str, Any], name: str, plans: dict, where: Path) -> None:
    """Refuses what our inference would only approximate."""
    if configuration.get("previous_stage"):
        raise NnunetImportError(
            f"{where}: configuration {name!r} is a cascade stage (its input includes the "
            f"segmentation of {configuration['previous_stage']!r}); import a single-stage "
            "configuration such as 3d_fullres"
        )
    if len(configuration.get("patch_size", [])) != 3:
        raise NnunetImportError(
            f"{where}: configuration {name!r} has patch size {configuration.get('patch_size')}; "
            "only 3D configurations can be imported"
        )
    if "architecture" not in configuration:
        raise NnunetImportError(
            f"{where}: configuration {name!r} has no 'architecture' section (plans written before "
            "nnU-Net 2.3); plan the dataset again with a current nnU-Net"
        )
    if "spacing" not in configuration:
        raise NnunetImportError(f"{where}: configuration {name!r} has no spacing")
    preprocessor = configuration.get("preprocessor_name", PREPROCESSOR)
    if preprocessor != PREPROCESSOR:
        raise NnunetImportError(
            f"{where}: preprocessor {preprocessor!r} is not nnU-Net's {PREPROCESSOR}"
        )
    reader = plans.get("image_reader_writer", READERS[0])
    if reader not in READERS:
        raise NnunetImportError(
            f"{where}: image reader {reader!r} orders image axes differently from SimpleITK; "
            f"only {', '.join(READERS)} can be imported"
        )


def _normalization(configuration: dict[str, Any], where: Path) -> Normalization:
    schemes = configuration.get("normalization_schemes", [])
    masks = configuration.get("use_mask_for_norm", [False])
    scheme = NORMALIZATIONS.get(schemes[0]) if len(schemes) == 1 else None
    if scheme is None:
        raise NnunetImportError(
            f"{where}: normalization {schemes} cannot be imported; only one channel with "
            f"{' or '.join(NORMALIZATIONS)} can"
        )
    return Normalization(
        scheme=scheme, clip_percentiles=None, nonzero_only=scheme == "zscore" and bool(masks[0])
    )


def _resampling(configuration: dict[str, Any], where: Path) -> Resampling:
    """The interpolation orders of images (data) and network outputs (probabilities); the
    `force_separate_z` None of nnU-Net's default plans decides the thick axis per image, as ours
    does."""
    kwargs = {}
    for part in ("data", "probabilities"):
        function = configuration.get(f"resampling_fn_{part}")
        if function != RESAMPLING_FUNCTION:
            raise NnunetImportError(
                f"{where}: resampling_fn_{part} {function!r} cannot be imported; only "
                f"{RESAMPLING_FUNCTION} can"
            )
        kwargs[part] = configuration.get(f"resampling_fn_{part}_kwargs") or {}
        # Absent means the function's default, False: never resample the thick axis apart.
        forced = kwargs[part].get("force_separate_z", False)
        if forced is not None:
            raise NnunetImportError(
                f"{where}: resampling_fn_{part}_kwargs force_separate_z is {forced!r}; only null "
                "(decided per image, nnU-Net's default) can be imported"
            )
    thresholds = {
        kwargs[part].get("separate_z_anisotropy_threshold", ANISO_THRESHOLD) for part in kwargs
    }
    if len(thresholds) != 1:
        raise NnunetImportError(
            f"{where}: images and probabilities use different anisotropy thresholds {thresholds}"
        )
    return Resampling(
        image_order=kwargs["data"].get("order", 3),
        through_plane_order=kwargs["data"].get("order_z", 0),
        probability_order=kwargs["probabilities"].get("order", 3),
        probability_through_plane_order=kwargs["probabilities"].get("order_z", 0),
        anisotropy_threshold=float(thresholds.pop()),
        clip_image=True,  # skimage's resize, which nnU-Net calls, clips to the input's range
    )


def _class_names(dataset: dict[str, Any], options: ImportOptions, where: Path) -> tuple[str, ...]:
    """Our name for each network output channel, in nnU-Net's label-value order. By default value 1
    is the tumor and value 2 (if any) the pancreas, PANTHER's labels."""
    if "regions_class_order" in dataset:
        raise NnunetImportError(f"{where}: region-based training cannot be imported")
    # nnU-Net's ignore label marks unannotated training voxels; it has no output channel.
    labels = {k: v for k, v in dataset.get("labels", {}).items() if k != "ignore"}
    regions = [k for k, v in labels.items() if isinstance(v, list | tuple)]
    if regions:
        raise NnunetImportError(
            f"{where}: region-based labels ({', '.join(regions)}) cannot be imported"
        )
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise NnunetImportError(
            f"{where}: labels {labels} are not background 0 and consecutive values 1, 2, ..."
        )
    by_value = {value: name for name, value in labels.items()}

    def pick(option: str | None, default: int | None, role: str) -> int | None:
        if option is None:
            return default if default in by_value else None
        if option not in labels or labels[option] == 0:
            raise NnunetImportError(
                f"{where}: no foreground label {option!r} for the {role} (labels: {labels})"
            )
        return labels[option]

    tumor = pick(options.tumor_label, 1, "tumor")
    pancreas = pick(options.pancreas_label, 2, "pancreas")
    if tumor == pancreas:
        raise NnunetImportError(
            f"{where}: label {by_value[tumor]!r} would be both the tumor and the pancreas; name "
            "them with --tumor-label and --pancreas-label"
        )
    names = {0: "background", tumor: "tumor", pancreas: "pancreas"}
    extra = [f"{by_value[v]!r} ({v})" for v in values if v not in names]
    if extra:
        raise NnunetImportError(
            f"{where}: label(s) {', '.join(extra)} are neither background, tumor nor pancreas; "
            "only these can be imported (pick them with --tumor-label / --pancreas-label)"
        )
    log.info(
        "%s: labels as classes: %s",
        where,
        ", ".join(f"{by_value[v]} ({v}) -> {names[v]}" for v in values),
    )
    return tuple(names[v] for v in values)


def translate_plan(
    plans: dict[str, Any],
    configuration: dict[str, Any],
    name: str,
    dataset: dict[str, Any],
    options: ImportOptions,
    where: Path,
) -> Plan:
    """Our plan for nnU-Net's (resolved) configuration `name` of the model folder `where`, without
    folds, mirror axes or precision: the checkpoints and the export decide those."""
    _check_supported(configuration, name, plans, where / PLANS_FILE)
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise NnunetImportError(
            f"{where / DATASET_FILE}: {len(channels)} input channels ({channels}); only "
            "single-channel models can be imported"
        )
    classes = _class_names(dataset, options, where / DATASET_FILE)
    if options.pancreas_guidance and "pancreas" not in classes:
        raise NnunetImportError(
            f"{where / DATASET_FILE}: --pancreas-guidance needs a pancreas label "
            f"(labels: {dataset.get('labels')})"
        )
    # nnU-Net's reader gives SimpleITK's (z, y, x) arrays and transposes every one by
    # transpose_forward; the configuration's spacing and patch are in the transposed order.
    preprocessing = Preprocessing(
        target_spacing_zyx=tuple(float(s) for s in configuration["spacing"]),
        fixed_transpose=tuple(plans.get("transpose_forward", (0, 1, 2))),
        crop_to_nonzero=True,
        normalization=_normalization(configuration, where / PLANS_FILE),
        resampling=_resampling(configuration, where / PLANS_FILE),
    )
    inference = Inference(
        patch_size_zyx=tuple(int(p) for p in configuration["patch_size"]),
        folds=(),
        tile_step=options.tile_step,
        gaussian_sigma_scale=GAUSSIAN_SIGMA_SCALE,
        batch_size=1,
        activation="softmax",
        classes=classes,
        test_time_mirroring=options.test_time_mirroring,
        stitching="nnunet",
        restore="logits",
    )
    postprocessing = Postprocessing(
        decision="argmax" if options.threshold is None else "threshold",
        threshold=0.5 if options.threshold is None else options.threshold,
        min_component_mm3=options.min_component_mm3,
        pancreas_guidance=PancreasGuidance(enabled=options.pancreas_guidance),
        never_empty=options.never_empty,
    )
    return Plan(
        task=options.task,
        preprocessing=preprocessing,
        inference=inference,
        postprocessing=postprocessing,
    )


def _locate(dotted: str, where: Path, what: str) -> Any:
    try:
        found = pydoc.locate(dotted)
    except pydoc.ErrorDuringImport as error:
        raise NnunetImportError(f"{where}: {what} {dotted!r} fails to import ({error})") from None
    if found is None:
        raise NnunetImportError(
            f"{where}: {what} {dotted!r} not found; is the package that defines it installed?"
        )
    return found


def build_network(
    architecture: dict[str, Any], input_channels: int, output_channels: int, where: Path
) -> torch.nn.Module:
    """The network of a configuration's `architecture` section (class and keyword arguments,
    those in `_kw_requires_import` named by their import path), deep supervision off."""
    kwargs = dict(architecture.get("arch_kwargs", {}))
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], where, f"arch_kwargs {key}")
    class_name = architecture.get("network_class_name")
    network_class = _locate(class_name, where, "network class") if class_name else None
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise NnunetImportError(f"{where}: network_class_name {class_name!r} is not a network")
    try:
        network = network_class(
            input_channels=input_channels,
            num_classes=output_channels,
            **{**kwargs, "deep_supervision": False},
        )
    except TypeError as error:
        raise NnunetImportError(
            f"{where}: {class_name} does not take these arch_kwargs ({error})"
        ) from None
    return network.eval()


def _weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict without the prefixes torch.compile and DDP add to every key."""
    weights = {}
    for key, value in checkpoint["network_weights"].items():
        while key.startswith(STATE_PREFIXES):
            key = key.split(".", 1)[1]
        weights[key] = value
    return weights


def load_fold(
    path: Path, network: torch.nn.Module, configuration: str
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Loads the fold's weights into `network` strictly; the checkpoint's facts (trainer, epoch)
    and the axes its training mirrored."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise NnunetImportError(f"{path}: not an nnU-Net v2 checkpoint (no network_weights)")
    trained = checkpoint.get("init_args", {}).get("configuration", configuration)
    if trained != configuration:
        raise NnunetImportError(
            f"{path}: trained with configuration {trained!r}, not {configuration!r}"
        )
    try:
        network.load_state_dict(_weights(checkpoint), strict=True)
    except RuntimeError as error:
        raise NnunetImportError(
            f"{path}: the weights do not fit the network the plans describe: "
            + " ".join(str(error).split())[:500]
        ) from None
    # None (mirroring off in training, or a checkpoint from before nnU-Net recorded it): no axes.
    axes = tuple(sorted(int(a) for a in checkpoint.get("inference_allowed_mirroring_axes") or ()))
    facts = {
        "trainer": checkpoint.get("trainer_name", "unknown"),
        "epochs": checkpoint.get("current_epoch"),
    }
    return facts, axes


def _export_folds(
    checkpoints: dict[str, Path],
    architecture: dict[str, Any],
    plan: Plan,
    configuration: str,
    out: Path,
    where: Path,
) -> tuple[Plan, dict[str, Any]]:
    """Exports every fold and checks it (training.export's checks, at its default tolerances);
    the plan with the folds, the mirror axes they were trained with and the precision, and what
    the model card records. A failure removes every fold this import wrote."""
    settings = ExportConfig()
    facts, axes, exported = {}, None, []
    with removed_on_failure() as written:
        for index, (fold, checkpoint) in enumerate(checkpoints.items()):
            network = build_network(architecture, 1, len(plan.inference.classes), where)
            facts[fold], fold_axes = load_fold(checkpoint, network, configuration)
            if axes is not None and fold_axes != axes:
                raise NnunetImportError(
                    f"{checkpoint}: trained with mirror axes {list(fold_axes)}, the folds before "
                    f"it with {list(axes)}; import folds trained alike"
                )
            axes = fold_axes
            path = out / f"fold_{fold}.onnx"
            written.append(path)
            batches = parity_batches(plan, [], seed=index)
            exported.append(
                export_checked_fold(
                    network, plan, path, batches, settings.tolerance, settings.opset
                )
            )
    record, fp16 = export_record(
        exported, settings.tolerance, settings.fp16_tolerance, settings.opset
    )
    inference = dataclasses.replace(
        plan.inference,
        folds=tuple(fold.weights for fold in exported),
        mirror_axes=axes,
        # nnU-Net mirrors at test time along the axes its training mirrored, if any.
        test_time_mirroring=plan.inference.test_time_mirroring and bool(axes),
        precision="float16" if fp16 else "float32",
    )
    return dataclasses.replace(plan, inference=inference), {"folds": facts, "export": record}


def _write_model_card(plan: Plan, out: Path, source: dict[str, Any], export: dict) -> None:
    """README.md and metadata.json naming the nnU-Net source (its folder's name, never a path of
    this machine) and the export's parity, in the layout `python -m training card` adds to."""
    versions = {
        **_versions(),
        "dynamic_network_architectures": importlib.metadata.version(
            "dynamic_network_architectures"
        ),
    }
    metadata = without_absolute_paths(
        {
            "name": "pantherseg",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "task": plan.task,
            "input": {
                "socket": plan.input_socket,
                "modality": "MRI",
                "pixel": "one 3D scalar image",
            },
            "output": {
                "socket": OUTPUT_SOCKET,
                "values": {"0": "background", "1": "tumor"},
            },
            "source": source,
            "folds": [f.file for f in plan.inference.folds],
            "export": export,
            "versions": versions,
            "intended_use": "research on pancreatic tumor segmentation in the PANTHER challenge; "
            "not a medical device",
        }
    )
    atomic_write_json(out / METADATA_FILE, metadata)
    inference, post = plan.inference, plan.postprocessing
    decision = "argmax" if post.decision == "argmax" else f"tumor probability >= {post.threshold}"
    differences = list(export["float16_max_relative_difference"].values())
    half = f"{max(differences):.2e}"
    pre = plan.preprocessing
    lines = [
        "# pantherseg model card (imported from nnU-Net v2)",
        "",
        f"- Task: {plan.task} ({plan.input_socket}); output: tumor mask, uint8 {{0, 1}}.",
        f"- Source: nnU-Net v2 model folder `{source['folder']}`: dataset {source['dataset']}, "
        f"trainer {source['trainer']}, plans {source['plans']}, configuration "
        f"{source['configuration']}.",
        f"- Fold(s) {', '.join(source['folds'])} from {source['checkpoint']}; plans.json sha256 "
        f"{source['plans_sha256']}.",
        f"- Network: {source['network'].rsplit('.', 1)[-1]}, classes {list(inference.classes)}, "
        f"patch {inference.patch_size_zyx} at spacing {pre.target_spacing_zyx} mm after "
        f"nnU-Net's transpose {pre.fixed_transpose}.",
        f"- Inference as nnU-Net's: tiles at step {inference.tile_step} blended by a Gaussian, "
        f"logits resampled back; mirroring in training on axes "
        f"{list(inference.mirror_axes) or 'none'}; precision on a GPU: {inference.precision}.",
        mirroring_line(plan, "as nnU-Net's predictor, unless the import was told --no-mirroring"),
        f"- Post-processing: {decision}, minimum component {post.min_component_mm3} mm^3, "
        f"pancreas guidance {'on' if post.pancreas_guidance.enabled else 'off'}, never empty "
        f"{'on' if post.never_empty else 'off'}.",
        f"- Export: largest ONNX logit difference "
        f"{max(export['max_relative_difference'].values()):.2e} of the logits (tolerance "
        f"{export['tolerance']}); in float16 {half}.",
        "",
        INTENDED_USE_HEADING,
        "",
        "Research on automatic pancreatic tumor segmentation (PANTHER challenge). Not a medical "
        "device; not for clinical decisions.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.",
    ]
    card = "\n".join(lines) + "\n"
    atomic_write_text(out / CARD_FILE, card)


def import_nnunet(folder: Path, out: Path, options: ImportOptions) -> Plan:
    """Writes `out`: one ONNX network per fold, plan.json and the model card. Everything the files
    alone decide is checked before any checkpoint is read."""
    folder, out = Path(folder), Path(out)
    plans = _read_json(folder / PLANS_FILE)
    dataset = _read_json(folder / DATASET_FILE)
    name = configuration_name(folder, options.configuration)
    configuration = resolve_configuration(plans, name, folder / PLANS_FILE)
    plan = translate_plan(plans, configuration, name, dataset, options, folder)
    # The options are checked before the export (mirroring waits for the checkpoints' axes).
    unmirrored = dataclasses.replace(plan.inference, test_time_mirroring=False)
    plan_from_json(
        json.loads(json.dumps(dataclasses.replace(plan, inference=unmirrored).to_json())),
        out / PLAN_FILE,
        require_folds=False,
    )
    checkpoints = _fold_checkpoints(folder, options.folds, options.checkpoint)
    architecture = configuration["architecture"]
    out.mkdir(parents=True, exist_ok=True)
    plan, record = _export_folds(checkpoints, architecture, plan, name, out, folder / PLANS_FILE)
    trainers = sorted({facts["trainer"] for facts in record["folds"].values()})
    source = {
        "framework": "nnU-Net v2",
        "folder": folder.resolve().name,
        "dataset": plans.get("dataset_name", "unknown"),
        "trainer": ", ".join(trainers),
        "plans": plans.get("plans_name", "unknown"),
        "configuration": name,
        "network": architecture.get("network_class_name"),
        "folds": list(checkpoints),
        "checkpoint": CHECKPOINT_FILES[options.checkpoint],
        "epochs": {fold: facts["epochs"] for fold, facts in record["folds"].items()},
        "labels": dataset["labels"],
        "plans_sha256": sha256_of(folder / PLANS_FILE),
        "dataset_json_sha256": sha256_of(folder / DATASET_FILE),
    }
    save_plan(plan, out)
    _write_model_card(plan, out, source, record["export"])
    return plan
