"""The localiser's box: where on its coarse grid the pancreas (and tumor) is, whether that is
plausible, and the box in input voxels grown by the margin that the main network then sees.

A localiser that finds nothing plausible is never silent: the main network runs over the whole
image and the reason is logged, so a missed pancreas costs time, not the tumor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pantherseg.inference.plan import Localiser
from pantherseg.inference.preprocess import Box


@dataclass(frozen=True)
class Localisation:
    """`box`: the input voxels (start, stop per axis, file order) the main network runs on;
    None for the whole image, with `reason` saying why. `core`: the box of the region found,
    before the margin."""

    box: Box | None
    reason: str = ""
    foreground_ml: float = 0.0
    extent_mm: float = 0.0
    core: Box | None = None

    def describe(self, shape: Sequence[int]) -> str:
        if self.box is None:
            return f"localiser: {self.reason}; the region network runs over the whole image"
        size = [b - a for a, b in zip(*self.box, strict=True)]
        share = float(np.prod(size)) / float(np.prod(shape))
        return (
            f"localiser: pancreas region of {self.foreground_ml:.1f} mL, longest side "
            f"{self.extent_mm:.0f} mm; box {size} voxels from {list(self.box[0])} "
            f"({share:.1%} of the image)"
        )


def locate_foreground(
    foreground: np.ndarray, spacing_zyx: Sequence[float], localiser: Localiser
) -> Localisation:
    """The box (on the localiser's grid) of the pancreas region: the largest 26-connected
    component of `foreground` and every other one at least `component_share` of its volume (a
    coarse localiser may split one pancreas in two), or no box with the reason when there is none
    or it is implausible."""
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return Localisation(None, "no pancreas found")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    kept = np.flatnonzero(sizes >= localiser.component_share * sizes.max())
    boxes = [ndimage.find_objects(labels)[k] for k in kept]
    start = tuple(min(b[axis].start for b in boxes) for axis in range(3))
    stop = tuple(max(b[axis].stop for b in boxes) for axis in range(3))
    millilitres = float(sizes[kept].sum()) * float(np.prod(spacing_zyx)) / 1000.0
    extent = max((b - a) * float(d) for a, b, d in zip(start, stop, spacing_zyx, strict=True))
    if millilitres < localiser.min_foreground_ml:
        reason = (
            f"the pancreas region found holds {millilitres:.2f} mL, less than the plausible "
            f"{localiser.min_foreground_ml:g} mL"
        )
        return Localisation(None, reason, millilitres, extent)
    if extent > localiser.max_extent_mm:
        reason = (
            f"the pancreas region found is {extent:.0f} mm long, more than the plausible "
            f"{localiser.max_extent_mm:g} mm"
        )
        return Localisation(None, reason, millilitres, extent)
    return Localisation((start, stop), "", millilitres, extent)


def margin_voxels(margin_mm: float, spacing_mm: float) -> int:
    """A margin in mm as whole voxels, rounded up (a margin of exactly n voxels stays n)."""
    return math.ceil(margin_mm / spacing_mm - 1e-9)


def grown_box(
    box: Box, spacing_zyx: Sequence[float], margin_mm: float, shape: Sequence[int]
) -> Box:
    """`box` grown by `margin_mm` on every side (rounded up to whole voxels), within the image."""
    margins = [margin_voxels(margin_mm, s) for s in spacing_zyx]
    start = tuple(max(0, a - m) for a, m in zip(box[0], margins, strict=True))
    stop = tuple(min(n, b + m) for b, m, n in zip(box[1], margins, shape, strict=True))
    return start, stop
