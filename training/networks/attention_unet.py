"""The user's first model, kept readable and made plan-aware: a residual 3D U-Net with
squeeze-and-excitation, attention gates on the skip connections and deep supervision.

Changes from the first version: strides and kernels come from the plan (anisotropic pooling, 1-wide
kernels on a thick axis), downsampling is a strided convolution (nnU-Net style) instead of max
pooling, and upsampling is a transposed convolution with the level's own stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.networks.levels import Triple, check_levels


def _norm(channels: int) -> nn.Module:
    # Instance norm: batches are tiny (2 patches), batch statistics would be noise.
    return nn.InstanceNorm3d(channels, affine=True)


class SqueezeExcitation(nn.Module):
    """Channel re-weighting from a global average (Hu et al.): cheap global context per block."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.squeeze = nn.Conv3d(channels, hidden, 1)
        self.excite = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3, 4), keepdim=True)
        scale = torch.sigmoid(self.excite(torch.relu(self.squeeze(scale))))
        return x * scale


class ResidualSEBlock(nn.Module):
    """conv-norm-LeakyReLU, conv-norm, squeeze-and-excitation, plus a projected shortcut.

    SE re-weights the residual branch before the addition, as in SE-ResNet, so the shortcut stays
    an identity path. The first convolution carries the stride (downsampling)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: Triple, stride: Triple, residual: bool
    ) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, 1, padding, bias=False)
        self.norm2 = _norm(out_channels)
        self.se = SqueezeExcitation(out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut: nn.Module | None = None
        if residual:
            same = in_channels == out_channels and tuple(stride) == (1, 1, 1)
            self.shortcut = (
                nn.Identity()
                if same
                else nn.Sequential(
                    nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                    _norm(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.se(self.norm2(self.conv2(y)))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.act(y)


class AttentionGate(nn.Module):
    """Additive attention (Oktay et al.): the upsampled coarser decoder feature `gate` decides,
    voxel by voxel, how much of the skip feature passes. Both are at the skip's resolution (the
    gate has been through the transposed convolution), so no interpolation is needed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inter = max(channels // 2, 1)
        self.skip = nn.Conv3d(channels, inter, 1, bias=False)
        self.gate = nn.Conv3d(channels, inter, 1)
        self.psi = nn.Conv3d(inter, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(torch.relu(self.skip(skip) + self.gate(gate))))
        return skip * alpha


class AttentionUNet(nn.Module):
    """Residual SE U-Net with attention-gated skips; one head per decoder level when deep
    supervision is on (all heads in training, only the full-resolution head in eval)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        strides: Sequence[Triple],
        kernel_sizes: Sequence[Triple],
        features: Sequence[int],
        deep_supervision: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        levels = check_levels(strides, kernel_sizes, features)
        self.strides = [tuple(s) for s in strides]
        self.deep_supervision = deep_supervision
        widths = [in_channels, *features]
        self.encoder = nn.ModuleList(
            ResidualSEBlock(widths[i], widths[i + 1], kernel_sizes[i], strides[i], residual)
            for i in range(levels)
        )
        # Index i of the decoder lists belongs to level i (0 = full resolution).
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(
                features[i + 1], features[i], strides[i + 1], strides[i + 1], bias=False
            )
            for i in range(levels - 1)
        )
        self.gates = nn.ModuleList(AttentionGate(features[i]) for i in range(levels - 1))
        self.decoder = nn.ModuleList(
            ResidualSEBlock(2 * features[i], features[i], kernel_sizes[i], (1, 1, 1), residual)
            for i in range(levels - 1)
        )
        heads = levels - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(features[i], out_channels, 1) for i in range(heads))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()  # the bottleneck
        supervise = self.training and self.deep_supervision and len(self.heads) > 1
        outputs: list[torch.Tensor] = []
        for level in reversed(range(len(self.decoder))):
            up = self.upsample[level](x)
            skip = self.gates[level](skips[level], up)
            x = self.decoder[level](torch.cat([up, skip], dim=1))
            if supervise and level < len(self.heads):
                outputs.append(self.heads[level](x))
        if supervise:
            return outputs[::-1]  # finest first
        return self.heads[0](x)


def _init_weights(module: nn.Module) -> None:
    # He initialisation for LeakyReLU, as nnU-Net does.
    if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
