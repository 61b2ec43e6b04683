"""From trained folds to the model folder inference reads: ONNX weights, plan.json, model card.

Each fold is exported in eval mode (one output, deep supervision off) with a fixed patch size and a
dynamic batch, then run in onnxruntime through pantherseg's own engine against the PyTorch network
on random and real patches; a difference above the tolerance stops the export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

import pantherseg
from pantherseg.engines import OnnxEngine
from pantherseg.io import atomic_write_text
from pantherseg.plan import FoldWeights, Plan, save_plan, sha256_of
from training.config import TrainingConfig
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


def parity(network: torch.nn.Module, onnx_path: Path, patches: Sequence[np.ndarray]) -> float:
    """Largest |PyTorch - onnxruntime| logit difference over the given (B, 1, *patch) batches."""
    engine = OnnxEngine(onnx_path, device="cpu")
    worst = 0.0
    with torch.no_grad():
        for batch in patches:
            expected = network(torch.from_numpy(batch)).numpy()
            worst = max(worst, float(np.abs(engine(batch) - expected).max()))
    return worst


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
    folds, differences, written = [], {}, []
    try:
        for index, checkpoint in enumerate(fold_checkpoints):
            network = load_network(checkpoint, config, plan)
            path = model_dir / f"fold_{index}.onnx"
            written.append(path)
            export_onnx(network, plan, path, config.export.opset)
            worst = parity(network, path, parity_batches(plan, real_patches, seed=index))
            differences[path.name] = worst
            log.info("%s: largest |torch - onnxruntime| difference %.2e", path.name, worst)
            if not worst <= config.export.tolerance:
                raise ExportError(
                    f"{path.name}: onnxruntime differs from PyTorch by {worst:.3g}, more than the "
                    f"tolerance {config.export.tolerance}"
                )
            folds.append(FoldWeights(path.name, sha256_of(path)))
    except BaseException:
        # No half-exported model: every fold of this export goes, the ones that passed too.
        for path in written:
            path.unlink(missing_ok=True)
        raise
    training = {
        **plan.training,
        "export": {"max_abs_difference": differences, "opset": config.export.opset},
    }
    if provenance:
        training.update(provenance)
    exported = dataclasses.replace(
        plan, inference=dataclasses.replace(plan.inference, folds=tuple(folds)), training=training
    )
    save_plan(exported, model_dir)
    write_model_card(exported, config, model_dir)
    return exported


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


def write_model_card(plan: Plan, config: TrainingConfig, model_dir: Path) -> None:
    """`README.md` for people and `metadata.json` for programs, beside the weights."""
    cv = plan.training.get("cross_validation", {})
    data = plan.training.get("data", {})
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
        "folds": [f.file for f in plan.inference.folds],
        "data": data,
        "cross_validation": cv,
        "versions": _versions(),
        "intended_use": "research on pancreatic tumor segmentation in the PANTHER challenge; "
        "not a medical device",
    }
    atomic_write_text(model_dir / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {value:.4f} |"
        for name, value in cv.get("aggregates", {}).items()
        if isinstance(value, int | float)
    )
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
  {plan.preprocessing.target_spacing_zyx} mm (z, y, x); mirroring axes
  {list(plan.inference.mirror_axes) or "none"}.
- Post-processing (chosen on out-of-fold predictions): threshold
  {plan.postprocessing.threshold}, minimum component {plan.postprocessing.min_component_mm3} mm^3,
  pancreas guidance {"on" if plan.postprocessing.pancreas_guidance.enabled else "off"},
  never empty {"on" if plan.postprocessing.never_empty else "off"}.
- Training data: {data.get("description", "see metadata.json")}.
{warning}

## Cross-validation (out-of-fold, challenge metrics)

| metric | value |
| --- | --- |
{rows or "| (not run) | |"}

## Intended use

Research on automatic pancreatic tumor segmentation (PANTHER challenge). Not a medical device; not
for clinical decisions.

Versions: {", ".join(f"{k} {v}" for k, v in metadata["versions"].items())}.
"""
    atomic_write_text(model_dir / "README.md", card)
