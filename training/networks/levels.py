"""What every network's constructor shares: the per-level description of a U-Net."""

from __future__ import annotations

from collections.abc import Sequence

Triple = tuple[int, int, int]


def check_levels(
    strides: Sequence[Triple], kernel_sizes: Sequence[Triple], features: Sequence[int]
) -> int:
    """The number of resolution levels, after checking the three lists describe the same ones."""
    levels = len(strides)
    if not levels == len(kernel_sizes) == len(features) or levels < 2:
        raise ValueError("strides, kernel_sizes and features need one entry per level (>= 2)")
    return levels
