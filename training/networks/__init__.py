"""Segmentation networks, chosen by name in the training YAML (`network.name`).

Every network follows one contract so the trainer, the loss and the ONNX export need not know which
one they hold:

- constructor `(in_channels, out_channels, strides, kernel_sizes, features, deep_supervision,
  residual)`, with one entry per resolution level in `strides`, `kernel_sizes` and `features`;
- an attribute `deep_supervision: bool` (it may be switched off after construction, e.g. for
  export, but not on if the network was built without it);
- in `train()` mode with deep supervision, `forward` returns a list of logits, finest (full
  resolution) first, then each coarser decoder level at its own resolution; otherwise one tensor
  (B, K, *patch), so an exported eval-mode graph has exactly one output.

The topology (pooling per axis, kernel sizes) is the planner's: pool an axis while it stays large
enough and is not much coarser than the finest axis, so thick MRI slices are pooled later than the
in-plane axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from pantherseg.inference.plan import Plan
from training.config import NetworkConfig
from training.networks.attention_unet import AttentionUNet
from training.networks.dynunet import DynUNetSegmenter
from training.networks.levels import Triple
from training.planner import DEFAULT_MAX_LEVELS, conv_kernel_sizes, pooling_per_axis


class NetworkFactory(Protocol):
    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        strides: Sequence[Triple],
        kernel_sizes: Sequence[Triple],
        features: Sequence[int],
        deep_supervision: bool,
        residual: bool,
    ) -> torch.nn.Module: ...


NETWORKS: dict[str, NetworkFactory] = {
    "attention_unet": AttentionUNet,
    "dynunet": DynUNetSegmenter,
}


def network_topology(
    patch_size: Sequence[int], spacing: Sequence[float], depth: int | None = None
) -> tuple[list[Triple], list[Triple]]:
    """Strides and kernel sizes per resolution level, the first level (1, 1, 1).

    The rule is the planner's (`pooling_per_axis`, `conv_kernel_sizes`), so that the patch the
    planner sized is exactly the one the network pools. `depth` asks for that many levels; a patch
    too small for it is an error.
    """
    if depth is not None and depth < 2:
        raise ValueError(f"network depth must be at least 2 levels, got {depth}")
    pooling = pooling_per_axis(patch_size, spacing, max_levels=depth or DEFAULT_MAX_LEVELS)
    if len(pooling) + 1 < (depth or 2):
        raise ValueError(
            f"patch {tuple(patch_size)} at spacing {tuple(spacing)} allows only "
            f"{len(pooling) + 1} resolution level(s); asked for {depth or 2}"
        )
    return [(1, 1, 1), *pooling], conv_kernel_sizes(spacing, pooling)


def level_features(levels: int, base_features: int, max_features: int) -> list[int]:
    """Feature maps per level: doubling from `base_features`, capped at `max_features`."""
    return [min(base_features * 2**level, max_features) for level in range(levels)]


def output_channels(plan: Plan) -> int:
    """1 for a sigmoid network (the tumor logit), one per class for a softmax network."""
    if plan.inference.activation == "sigmoid":
        return 1
    return len(plan.inference.classes)


def build_network(config: NetworkConfig, plan: Plan) -> torch.nn.Module:
    """The network named in `config`, shaped for the plan's patch, spacing and output classes."""
    if config.name not in NETWORKS:
        raise ValueError(
            f"unknown network {config.name!r}; choose one of {', '.join(sorted(NETWORKS))}"
        )
    strides, kernels = network_topology(
        plan.inference.patch_size_zyx, plan.preprocessing.target_spacing_zyx, config.depth
    )
    features = level_features(len(strides), config.base_features, config.max_features)
    return NETWORKS[config.name](
        in_channels=1,
        out_channels=output_channels(plan),
        strides=strides,
        kernel_sizes=kernels,
        features=features,
        deep_supervision=config.deep_supervision,
        residual=config.residual,
    )


def describe_topology(
    strides: Sequence[Triple],
    kernels: Sequence[Triple],
    patch: Sequence[int],
    features: Sequence[int],
) -> str:
    """One line per level (size, stride, kernel, features): for logs and the model card."""
    size = list(patch)
    lines = []
    for level, (stride, kernel, width) in enumerate(zip(strides, kernels, features, strict=True)):
        size = [s // f for s, f in zip(size, stride, strict=True)]
        lines.append(
            f"level {level}: size {tuple(size)} stride {stride} kernel {kernel} features {width}"
        )
    return "\n".join(lines)
