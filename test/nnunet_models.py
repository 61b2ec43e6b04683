"""nnU-Net v2 trained-model folders for tests, made with nnU-Net's own code from real plans.

A folder looks like what `nnUNetv2_train` leaves: `plans.json`, `dataset.json` and
`fold_k/checkpoint_final.pth` (nnU-Net's checkpoint dictionary). The network comes from
nnU-Net's `get_network_from_plans`, so the importer (which builds it with
dynamic-network-architectures alone) is checked against nnU-Net's construction too. Real plans
are shrunk (fewer, narrower stages, a small patch) so that a CPU predicts in seconds; everything
else (classes, normalisation, resampling, spacing, topology rules) stays as planned.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
BASELINE_PLANS = DATA / "panther_baseline_task1_plans.json"
RESENC_PLANS = DATA / "nnunet_resenc_l_iso1mm_plans.json"
LABELS = {"background": 0, "tumor": 1, "pancreas": 2}


def shrunk_plans(source: Path, configuration: str, patch: list[int], stages: int = 3) -> dict:
    """The plans with `configuration` made small: `stages` stages of 4, 8, 16... features and
    the given patch; the stages' kernels and strides are the planned ones."""
    plans = json.loads(source.read_text())
    plans.pop("README", None)
    config = plans["configurations"][configuration]
    while "architecture" not in config:  # inherits_from: shrink the parent
        config = plans["configurations"][config["inherits_from"]]
    config["patch_size"] = list(patch)
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs["n_stages"] = stages
    kwargs["features_per_stage"] = [4 * 2**i for i in range(stages)]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = kwargs[key][:stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: stages - 1]
    return plans


def cpu_predictor(folder: Path, folds: tuple[int, ...], mirroring: bool):
    """nnU-Net's own predictor on `folder`, as its defaults run it (tile step 0.5, Gaussian),
    on the CPU: the reference the import is held to."""
    predictor = bare_cpu_predictor(mirroring)
    predictor.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
    return predictor


def bare_cpu_predictor(mirroring: bool):
    """`nnUNetPredictor` with its default inference settings on the CPU, no model loaded yet."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    return nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )


def trained_folder(
    root: Path,
    plans: dict,
    configuration: str,
    labels: dict[str, int] = LABELS,
    folds: tuple[int, ...] = (0,),
    mirror_axes: tuple[int, ...] = (0, 1, 2),
    class_bias: tuple[float, ...] = (0.0, 2.0, 1.0),
) -> Path:
    """`root/<Trainer>__<Plans>__<configuration>/` with one checkpoint per fold. Weights are
    nnU-Net's initialisation scaled up (logits of tens, far from ties) and the output layer's
    bias set per class, so that every class wins somewhere."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = {
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".mha",
    }
    folder = root / f"nnUNetTrainer__{plans['plans_name']}__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    manager = PlansManager(copy.deepcopy(plans))
    config = manager.get_configuration(configuration)
    for fold in folds:
        torch.manual_seed(100 + fold)
        network = get_network_from_plans(
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            1,
            len(labels),
            allow_init=True,
            deep_supervision=True,
        )
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.mul_(3.0)
            network.decoder.seg_layers[-1].bias.copy_(torch.tensor(class_bias[: len(labels)]))
        checkpoint = {
            "network_weights": network.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 1,
            "init_args": {
                "plans": plans,
                "configuration": configuration,
                "fold": fold,
                "dataset_json": dataset,
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": mirror_axes,
        }
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
