"""MONAI's DynUNet (the nnU-Net topology) behind this package's network contract.

MONAI's DynUNet, in training mode with deep supervision, upsamples every head to full resolution
and stacks them into one tensor. Here the heads are returned at their native resolution instead
(a list, finest first), like `attention_unet` and nnU-Net: the loss then max-pools the label to
each head's size, which keeps small tumors visible on coarse levels and costs no upsampling.
The native head outputs are the ones DynUNet keeps in its `heads` list during `forward`;
`test_train_networks` checks their shapes so a change in MONAI is caught.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet

from training.networks.levels import Triple, check_levels


class DynUNetSegmenter(DynUNet):
    """DynUNet with one output head per decoder level: the full-resolution output plus
    `deep_supr_num = levels - 2` deep-supervision heads (MONAI's maximum)."""

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
        levels = check_levels(strides, kernel_sizes, features)
        extra_heads = levels - 2
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[list(k) for k in kernel_sizes],
            strides=[list(s) for s in strides],
            upsample_kernel_size=[list(s) for s in strides[1:]],
            filters=list(features),
            norm_name=("instance", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision and extra_heads > 0,
            deep_supr_num=max(extra_heads, 1),
            res_block=residual,
            trans_bias=False,
        )
        self._has_heads = deep_supervision and extra_heads > 0
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            # Filled by the skip layers during this forward, finest extra head first.
            return [out, *(self.heads if self._has_heads else [])]
        return out
