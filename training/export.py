"""From trained folds to the model folder inference reads: ONNX weights, plan.json, model card.

Each fold is exported in eval mode (one output, deep supervision off) with a fixed patch size and a
dynamic batch, then run in onnxruntime through pantherseg's own engine against the PyTorch network
on random and real patches; a difference above the tolerance (relative to the logits' size)
stops the export. The network in half precision is compared too: the plan allows a GPU to run it
in float16 only when that difference is within its own tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pantherseg.inference.engines import OnnxEngine
from pantherseg.inference.files import atomic_output
from pantherseg.inference.plan import FoldWeights, Inference, Plan, save_plan, sha256_of
from training.config import TrainingConfig
from training.model_card import write_model_card
from training.networks import build_network
from training.trainer import read_init_report

log = logging.getLogger("pantherseg.training")

ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"


class ExportError(RuntimeError):
    """An export whose ONNX network does not reproduce the PyTorch one."""


def load_network(checkpoint: Path, config: TrainingConfig, plan: Plan) -> torch.nn.Module:
    """The fold's network with its best weights, in eval mode on the CPU."""
    network = build_network(config.network, plan)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    network.load_state_dict(state["network"])
    return network.eval()


def export_onnx(network: torch.nn.Module, plan: Plan, path: Path, opset: int) -> Path:
    """Writes the network as ONNX (atomically) with a dynamic batch and the plan's patch size."""
    dummy = torch.zeros((1, 1, *plan.inference.patch_size_zyx), dtype=torch.float32)
    with atomic_output(path) as tmp, torch.no_grad():
        torch.onnx.export(
            network.eval(),
            (dummy,),
            str(tmp),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


@dataclasses.dataclass(frozen=True)
class Parity:
    """How far onnxruntime's logits are from PyTorch's. The relative figure is what the tolerance
    bounds: a trained network's logits reach tens, where float32's rounding alone differs by
    about 1e-5 of the value, while an export fault differs by the value's own size."""

    max_abs_difference: float
    max_relative_difference: float  # |difference| / max(1, largest |logit|), per batch


def _compare(
    network: torch.nn.Module,
    other: Callable[[np.ndarray], np.ndarray],
    patches: Sequence[np.ndarray],
) -> Parity:
    """The largest logit differences between the float32 network and `other` over the batches."""
    worst_abs = worst_relative = 0.0
    with torch.no_grad():
        for batch in patches:
            expected = network(torch.from_numpy(batch)).numpy()
            difference = float(np.abs(other(batch) - expected).max())
            if not math.isfinite(difference):  # NaN compares false, so it would pass for zero
                difference = math.inf
            worst_abs = max(worst_abs, difference)
            scale = max(1.0, float(np.abs(expected).max()))
            worst_relative = max(worst_relative, difference / scale)
    return Parity(worst_abs, worst_relative)


def parity(network: torch.nn.Module, onnx_path: Path, patches: Sequence[np.ndarray]) -> Parity:
    """The largest |PyTorch - onnxruntime| logit differences over the (B, 1, *patch) batches."""
    return _compare(network, OnnxEngine(onnx_path, device="cpu"), patches)


def _stored_in_float16(value: Any) -> Any:
    """A tensor (or a module's tuple or list of them) rounded to float16 and back, overflow to
    infinity: what half-precision storage of weights, input and layer outputs leaves."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.half().float()
    if isinstance(value, tuple | list):
        return type(value)(_stored_in_float16(v) for v in value)
    return value


def half_precision_parity(network: torch.nn.Module, patches: Sequence[np.ndarray]) -> Parity:
    """How far the network's logits move when its weights, its input and every module's output
    are stored in float16 while each layer computes in float32, as half-precision GPU kernels
    accumulate: whether a GPU may run it in half precision (TensorRT fp16). Emulated in float32
    because PyTorch's CPU float16 convolutions are not vectorised without AVX-512 FP16 (a 3-D
    convolution took 175 times its float32 time on an Ice Lake Xeon, and the full-size nnU-Net
    baseline's check more than 15 minutes), and so that every layer is measurable (the CPU has no
    float16 average pooling). The figure bounds the network's sensitivity to half precision
    (overflow, rounding), not one GPU's kernels."""
    half = copy.deepcopy(network).eval()
    with torch.no_grad():
        for tensor in (*half.parameters(), *half.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(_stored_in_float16(tensor))
    for module in half.modules():
        module.register_forward_hook(lambda _module, _inputs, output: _stored_in_float16(output))

    def predict(batch: np.ndarray) -> np.ndarray:
        return half(_stored_in_float16(torch.from_numpy(batch))).numpy()

    return _compare(network, predict, patches)


def parity_batches(plan: Plan, real: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Two random batches (batch 1 and 2, so the dynamic batch is exercised) and real patches."""
    rng = np.random.default_rng(seed)
    patch = plan.inference.patch_size_zyx
    batches = [rng.standard_normal((n, 1, *patch)).astype(np.float32) for n in (1, 2)]
    return batches + [np.array(p, dtype=np.float32) for p in real]  # copies: mmaps are read-only


@dataclasses.dataclass(frozen=True)
class ExportedFold:
    weights: FoldWeights
    parity: Parity
    half_difference: float  # relative float16 logit difference (infinite where float16 overflows)


def export_checked_fold(
    network: torch.nn.Module,
    plan: Plan,
    path: Path,
    batches: Sequence[np.ndarray],
    tolerance: float,
    opset: int,
) -> ExportedFold:
    """Exports one fold and checks it on `batches`: onnxruntime within `tolerance` of PyTorch's
    logits (relative to their size; ExportError otherwise), and how far float16 strays (on the
    last batch, a real patch when there are some)."""
    export_onnx(network, plan, path, opset)
    found = parity(network, path, batches)
    log.info(
        "%s: largest |torch - onnxruntime| logit difference %.2e (%.2e of the logits)",
        path.name,
        found.max_abs_difference,
        found.max_relative_difference,
    )
    if not found.max_relative_difference <= tolerance:
        raise ExportError(
            f"{path.name}: onnxruntime differs from PyTorch by "
            f"{found.max_relative_difference:.3g} of the largest logit "
            f"({found.max_abs_difference:.3g}), more than the tolerance {tolerance}"
        )
    half = half_precision_parity(network, batches[-1:]).max_relative_difference
    return ExportedFold(FoldWeights(path.name, sha256_of(path)), found, half)


@contextlib.contextmanager
def removed_on_failure() -> Iterator[list[Path]]:
    """A list to put every written fold in: if the block fails, they all go, the ones that passed
    their checks too, so that no half-exported model is left."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def export_record(
    exported: Sequence[ExportedFold], tolerance: float, fp16_tolerance: float, opset: int
) -> tuple[dict[str, Any], bool]:
    """The model card's `export` section, and whether half precision is allowed on a GPU: only
    when every fold's float16 logits were measured within `fp16_tolerance`."""
    half = {fold.weights.file: fold.half_difference for fold in exported}
    fp16 = all(v <= fp16_tolerance for v in half.values())
    log.info(
        "half precision: %s on a GPU (tolerance %s of the logits)",
        "allowed" if fp16 else "not allowed",
        fp16_tolerance,
    )
    record = {
        "max_abs_difference": {f.weights.file: f.parity.max_abs_difference for f in exported},
        "max_relative_difference": {
            f.weights.file: f.parity.max_relative_difference for f in exported
        },
        "float16_max_relative_difference": half,
        "tolerance": tolerance,
        "float16_tolerance": fp16_tolerance,
        "opset": opset,
    }
    return record, fp16


@dataclasses.dataclass(frozen=True)
class LocaliserCheckpoints:
    """A two-stage model's localiser folds, with the configuration and plan they trained with
    (its work folder's) and real patches of its grid for the parity check."""

    checkpoints: Sequence[Path]
    config: TrainingConfig
    plan: Plan
    real_patches: Sequence[np.ndarray] = ()


def _export_folds(
    checkpoints: Sequence[Path],
    config: TrainingConfig,
    plan: Plan,
    paths: Sequence[Path],
    real_patches: Sequence[np.ndarray],
    written: list[Path],
) -> list[ExportedFold]:
    exported = []
    for index, (checkpoint, path) in enumerate(zip(checkpoints, paths, strict=True)):
        written.append(path)
        exported.append(
            export_checked_fold(
                load_network(checkpoint, config, plan),
                plan,
                path,
                parity_batches(plan, real_patches, seed=index),
                config.export.tolerance,
                config.export.opset,
            )
        )
    return exported


def initialisation_record(
    checkpoints: Sequence[Path], exported: Sequence[ExportedFold]
) -> dict[str, dict[str, Any]]:
    """What each fine-tuned fold started from, by exported file, from the `init.json` training
    wrote beside its checkpoint (a fold without one started from random weights), so that the card
    names the model a fine-tuning depends on instead of leaving it to hand-written text."""
    record = {}
    for checkpoint, fold in zip(checkpoints, exported, strict=True):
        report = read_init_report(Path(checkpoint).parent)
        if report is not None:
            record[fold.weights.file] = {
                "source": report["source"],
                "source_sha256": report.get("source_sha256", ""),  # absent before 2026-12-02
                "loaded_tensors": len(report["matched"]),
                "kept_initialisation": sorted(report["skipped"]),
            }
    return record


def _with_folds(inference: Inference, exported: Sequence[ExportedFold], fp16: bool) -> Inference:
    return dataclasses.replace(
        inference,
        folds=tuple(fold.weights for fold in exported),
        precision="float16" if fp16 else "float32",
    )


def export_model(
    fold_checkpoints: Sequence[Path],
    config: TrainingConfig,
    plan: Plan,
    model_dir: Path,
    real_patches: Sequence[np.ndarray] = (),
    provenance: dict[str, Any] | None = None,
    localiser: LocaliserCheckpoints | None = None,
) -> Plan:
    """Exports every fold (a two-stage model's localiser folds too, as `localiser_fold_k.onnx`),
    checks parity, and writes plan.json and the model card (with `provenance`: the planner's
    figures, the data, cross-validation). Each stage allows half precision only if every one of
    its folds' float16 logits stays within `export.fp16_tolerance`."""
    model_dir = Path(model_dir)
    if not fold_checkpoints:
        raise ExportError("no fold checkpoints to export")
    if (localiser is None) != (plan.localiser is None):
        raise ExportError(
            "the plan has a localiser, but no localiser folds were given"
            if localiser is None
            else "localiser folds were given, but the plan has no localiser"
        )
    settings = config.export
    paths = [model_dir / f"fold_{k}.onnx" for k in range(len(fold_checkpoints))]
    with removed_on_failure() as written:
        exported = _export_folds(fold_checkpoints, config, plan, paths, real_patches, written)
        if localiser is not None:
            local_paths = [
                model_dir / f"localiser_fold_{k}.onnx" for k in range(len(localiser.checkpoints))
            ]
            local_exported = _export_folds(
                localiser.checkpoints,
                localiser.config,
                localiser.plan,
                local_paths,
                localiser.real_patches,
                written,
            )
    export, fp16 = export_record(
        exported, settings.tolerance, settings.fp16_tolerance, settings.opset
    )
    record = {
        **(provenance or {}),
        "export": export,
        "initialisation": initialisation_record(fold_checkpoints, exported),
    }
    result = dataclasses.replace(plan, inference=_with_folds(plan.inference, exported, fp16))
    if localiser is not None and plan.localiser is not None:
        local = localiser.config.export
        record["localiser_export"], local_fp16 = export_record(
            local_exported, local.tolerance, local.fp16_tolerance, local.opset
        )
        stage = dataclasses.replace(
            plan.localiser,
            inference=_with_folds(plan.localiser.inference, local_exported, local_fp16),
        )
        result = dataclasses.replace(result, localiser=stage)
        local_init = initialisation_record(localiser.checkpoints, local_exported)
        record["initialisation"].update(local_init)
    save_plan(result, model_dir)
    write_model_card(result, config, model_dir, record)
    return result
