"""From trained folds to the model folder inference reads: ONNX weights, plan.json, model card.

Each fold is exported in eval mode (one output, deep supervision off) with a fixed patch size and a
dynamic batch, then run in onnxruntime through pantherseg's own engine against the PyTorch network
on random and real patches; a difference above the tolerance (relative to the logits' size)
stops the export.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pantherseg.engines import OnnxEngine
from pantherseg.plan import FoldWeights, Plan, save_plan, sha256_of
from training.config import TrainingConfig
from training.model_card import write_model_card
from training.networks import build_network

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
    tmp = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Parity:
    """How far onnxruntime's logits are from PyTorch's. The relative figure is what the tolerance
    bounds: a trained network's logits reach tens, where float32's rounding alone differs by
    about 1e-5 of the value, while an export fault differs by the value's own size."""

    max_abs_difference: float
    max_relative_difference: float  # |difference| / max(1, largest |logit|), per batch


def parity(network: torch.nn.Module, onnx_path: Path, patches: Sequence[np.ndarray]) -> Parity:
    """The largest |PyTorch - onnxruntime| logit differences over the (B, 1, *patch) batches."""
    engine = OnnxEngine(onnx_path, device="cpu")
    worst_abs = worst_relative = 0.0
    with torch.no_grad():
        for batch in patches:
            expected = network(torch.from_numpy(batch)).numpy()
            difference = float(np.abs(engine(batch) - expected).max())
            worst_abs = max(worst_abs, difference)
            scale = max(1.0, float(np.abs(expected).max()))
            worst_relative = max(worst_relative, difference / scale)
    return Parity(worst_abs, worst_relative)


def parity_batches(plan: Plan, real: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Two random batches (batch 1 and 2, so the dynamic batch is exercised) and real patches."""
    rng = np.random.default_rng(seed)
    patch = plan.inference.patch_size_zyx
    batches = [rng.standard_normal((n, 1, *patch)).astype(np.float32) for n in (1, 2)]
    return batches + [np.array(p, dtype=np.float32) for p in real]  # copies: mmaps are read-only


def export_model(
    fold_checkpoints: Sequence[Path],
    config: TrainingConfig,
    plan: Plan,
    model_dir: Path,
    real_patches: Sequence[np.ndarray] = (),
    provenance: dict | None = None,
) -> Plan:
    """Exports every fold, checks parity, and writes plan.json and the model card."""
    model_dir = Path(model_dir)
    if not fold_checkpoints:
        raise ExportError("no fold checkpoints to export")
    folds, absolute, relative, written = [], {}, {}, []
    try:
        for index, checkpoint in enumerate(fold_checkpoints):
            network = load_network(checkpoint, config, plan)
            path = model_dir / f"fold_{index}.onnx"
            written.append(path)
            export_onnx(network, plan, path, config.export.opset)
            found = parity(network, path, parity_batches(plan, real_patches, seed=index))
            absolute[path.name] = found.max_abs_difference
            relative[path.name] = found.max_relative_difference
            log.info(
                "%s: largest |torch - onnxruntime| logit difference %.2e (%.2e of the logits)",
                path.name,
                found.max_abs_difference,
                found.max_relative_difference,
            )
            if not found.max_relative_difference <= config.export.tolerance:
                raise ExportError(
                    f"{path.name}: onnxruntime differs from PyTorch by "
                    f"{found.max_relative_difference:.3g} of the largest logit "
                    f"({found.max_abs_difference:.3g}), more than the tolerance "
                    f"{config.export.tolerance}"
                )
            folds.append(FoldWeights(path.name, sha256_of(path)))
    except BaseException:
        # No half-exported model: every fold of this export goes, the ones that passed too.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    training = {
        **plan.training,
        "export": {
            "max_abs_difference": absolute,
            "max_relative_difference": relative,
            "opset": config.export.opset,
        },
    }
    if provenance:
        training.update(provenance)
    exported = dataclasses.replace(
        plan, inference=dataclasses.replace(plan.inference, folds=tuple(folds)), training=training
    )
    save_plan(exported, model_dir)
    write_model_card(exported, config, model_dir)
    return exported
