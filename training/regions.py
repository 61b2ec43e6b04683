"""The boxes a two-stage model's main network trains and validates in: the true pancreas and tumor
box of a cached case grown by the margin inference adds to the localiser's box, with each side
moved at random by up to the localiser's measured error, so that training sees boxes like the ones
inference will give it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pantherseg.inference.localise import margin_voxels
from pantherseg.inference.preprocess import Box, nonzero_box


@dataclass(frozen=True)
class RegionSampling:
    """`margin_mm` grows the true box on every side; `jitter_mm` moves each side by a uniform
    draw in [-jitter, +jitter] mm (training only)."""

    margin_mm: float
    jitter_mm: float = 0.0


def foreground_box(label: np.ndarray) -> Box | None:
    """The box of every labelled voxel (any label > 0) of a (Z, Y, X) label map; None if none."""
    foreground = np.asarray(label) > 0
    if not foreground.any():
        return None
    return nonzero_box(foreground)


def region_box(
    box: Box,
    spacing_zyx: Sequence[float],
    shape: Sequence[int],
    sampling: RegionSampling,
    rng: np.random.Generator | None = None,
) -> Box:
    """`box` grown by the margin (rounded up to whole voxels) with each side moved by the jitter
    when `rng` is given, within the image and never empty; without `rng`, `grown_box`."""
    start, stop = [], []
    for axis in range(3):
        sides = []
        for _ in range(2):
            shift = rng.uniform(-sampling.jitter_mm, sampling.jitter_mm) if rng else 0.0
            sides.append(margin_voxels(sampling.margin_mm + shift, spacing_zyx[axis]))
        low = min(max(0, box[0][axis] - sides[0]), shape[axis] - 1)
        high = max(min(shape[axis], box[1][axis] + sides[1]), low + 1)
        start.append(low)
        stop.append(high)
    return tuple(start), tuple(stop)


def window(box: Box) -> tuple[slice, slice, slice]:
    """The array index of a box, channel axis first: `array[window(box)]` of a (C, Z, Y, X)."""
    return (slice(None), *(slice(a, b) for a, b in zip(*box, strict=True)))
