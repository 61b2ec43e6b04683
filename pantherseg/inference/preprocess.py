"""Preprocessing and its inverse: the one implementation that training and inference share.

Forward: transpose the array axes into the plan's patient-axis order, crop to the image's nonzero
box, normalise intensities, resample to the plan's spacing. Every step is recorded, so that
`restore` maps a network output on the resampled grid back onto the input's exact voxel grid.
Nothing is reoriented: the transpose only reorders array axes (no flip, no interpolation), so a
file whose slices lie along another array axis reaches the network as the same physical image,
and its mask goes back in the file's own order (nnU-Net transposes the same way, by a fixed order
from its plan; here the order comes from each image's direction cosines).

Resampling is written on scipy.ndimage.zoom rather than SimpleITK because the anisotropic case
needs different interpolation orders per axis (smooth in-plane, nearest or linear across thick
slices), which a single SimpleITK resampler cannot do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pantherseg.inference.plan import Normalization, Preprocessing, Resampling

# A box of voxels: start and stop index per array axis.
Box = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class PreprocessRecord:
    """What `preprocess` did to one image, enough to undo it. `original_shape` is the input's
    (file order); `transpose` takes it to the plan's axis order, in which every other field is."""

    original_shape: tuple[int, int, int]
    transpose: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    original_spacing_zyx: tuple[float, float, float]
    target_spacing_zyx: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    @property
    def grid_spacing_zyx(self) -> tuple[float, float, float]:
        """The resampled grid's actual spacing: the target spacing up to the rounding of the
        grid size to whole voxels."""
        return tuple(
            n * s / r
            for n, s, r in zip(
                self.cropped_shape, self.original_spacing_zyx, self.resampled_shape, strict=True
            )
        )

    @property
    def transposed_shape(self) -> tuple[int, int, int]:
        return tuple(self.original_shape[a] for a in self.transpose)

    @property
    def inverse_transpose(self) -> tuple[int, int, int]:
        return tuple(int(a) for a in np.argsort(self.transpose))


def patient_axes(direction_xyz: Sequence[float]) -> tuple[int, int, int]:
    """The patient axis (0 left-right, 1 posterior-anterior, 2 inferior-superior) that each array
    axis (z, y, x) runs along: of the six assignments, the one whose direction cosines are largest
    in sum, so that an oblique image is assigned as its acquisition plane suggests."""
    cosines = np.abs(np.asarray(direction_xyz, dtype=np.float64).reshape(3, 3))
    # Column j of ITK's direction matrix is index axis j (x, y, z); array axis a is index axis 2-a.
    return max(
        itertools.permutations(range(3)),
        key=lambda axes: sum(cosines[axes[a], 2 - a] for a in range(3)),
    )


def axis_transpose(
    direction_xyz: Sequence[float], plan_axes: Sequence[int]
) -> tuple[int, int, int]:
    """The array transpose that brings an image with these direction cosines into the plan's
    patient-axis order: `array.transpose(result)` runs along `plan_axes`."""
    own = patient_axes(direction_xyz)
    return tuple(own.index(axis) for axis in plan_axes)


def nonzero_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and stop of the smallest box holding every nonzero voxel (the whole image if none)."""
    starts, stops = [], []
    for axis in range(image.ndim):
        others = tuple(a for a in range(image.ndim) if a != axis)
        hits = np.flatnonzero(np.any(image != 0, axis=others))
        if hits.size == 0:
            return (0,) * image.ndim, tuple(image.shape)
        starts.append(int(hits[0]))
        stops.append(int(hits[-1]) + 1)
    return tuple(starts), tuple(stops)


def body_mask(image: np.ndarray) -> np.ndarray:
    """The nonzero voxels with their enclosed holes filled: the body, as nnU-Net takes it."""
    return ndimage.binary_fill_holes(image != 0)


def normalize(
    image: np.ndarray, settings: Normalization, window: tuple[slice, ...] | None = None
) -> np.ndarray:
    """Per-image z-score after optional percentile clipping, as float32 ("none": the values
    themselves, as float32), of the whole image or of `window` of it.

    The statistics always come from the whole image, so that a region is normalised exactly as
    it is within the whole (a two-stage model's main network trains on whole images). With
    `nonzero_only` they come from the body (`body_mask`) and the background stays 0, so that a
    large empty field of view does not dilute them.
    """
    window = window if window is not None else (slice(None),) * image.ndim
    if settings.scheme == "none":
        return image[window].astype(np.float32, copy=True)
    if settings.scheme != "zscore":
        raise ValueError(f"unknown normalisation scheme {settings.scheme!r}")
    whole = image.astype(np.float32, copy=False)
    inside = body_mask(whole) if settings.nonzero_only else None
    sample = whole[inside] if inside is not None else whole.ravel()
    if sample.size == 0:
        sample = whole.ravel()
    data = whole[window].astype(np.float32, copy=True)
    if settings.clip_percentiles is not None:
        low, high = np.percentile(sample, settings.clip_percentiles)
        np.clip(data, low, high, out=data)
        sample = np.clip(sample, low, high)
    mean = float(sample.mean(dtype=np.float64))
    std = float(sample.std(dtype=np.float64))
    data -= mean
    data /= max(std, 1e-8)
    if inside is not None:
        data[~inside[window]] = 0.0
    return data


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The grid size that covers the same extent at the target spacing (at least one voxel)."""
    return tuple(
        max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True)
    )


def through_plane_axis(
    spacing: Sequence[float], target_spacing: Sequence[float], threshold: float
) -> int | None:
    """The axis to resample on its own, nnU-Net's rule: the image's grid decides when it is
    anisotropic beyond `threshold`, else the target's; the coarsest axis of the grid that decides,
    and None when that grid's coarsest spacing is shared by two axes (a (0.5, 2, 2) grid has no
    single thick axis) or when neither grid is anisotropic."""
    for grid in (spacing, target_spacing):
        if max(grid) / min(grid) > threshold:
            coarsest = [axis for axis, s in enumerate(grid) if s == max(grid)]
            return coarsest[0] if len(coarsest) == 1 else None
    return None


def _zoom_axes(array: np.ndarray, new_shape: Sequence[int], axes: Sequence[int], order: int):
    factors = [1.0] * array.ndim
    for axis in axes:
        factors[axis] = new_shape[axis] / array.shape[axis]
    if all(f == 1.0 for f in factors):
        return array
    # grid_mode aligns the outer voxel edges, so the physical extent is kept exactly.
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    expected = tuple(new_shape[a] if a in axes else array.shape[a] for a in range(array.ndim))
    if out.shape != expected:  # zoom rounds its output size; it must be the one asked for
        raise RuntimeError(f"resampling produced {out.shape}, expected {expected}")
    return out


def resample(
    array: np.ndarray,
    new_shape: Sequence[int],
    order: int,
    through_plane: int | None = None,
    through_plane_order: int = 0,
    clip: bool = False,
) -> np.ndarray:
    """Resamples a 3D array to `new_shape`, separately across the thick-slice axis if given.

    `clip` keeps the smooth (in-plane) interpolation within the values it interpolates, per
    slice when the thick axis goes on its own: cubic splines overshoot at edges, and nnU-Net's
    resampling (scikit-image's resize) clips them this way.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(array.shape) == new_shape:
        return array
    if through_plane is None:
        out = _zoom_axes(array, new_shape, (0, 1, 2), order)
        return np.clip(out, array.min(), array.max(), out=out) if clip else out
    in_plane = tuple(a for a in range(3) if a != through_plane)
    resized = _zoom_axes(array, new_shape, in_plane, order)
    if clip:
        low, high = array.min(axis=in_plane, keepdims=True), array.max(axis=in_plane, keepdims=True)
        resized = np.clip(resized, low, high)
    return _zoom_axes(resized, new_shape, (through_plane,), through_plane_order)


def preprocess(
    image: np.ndarray,
    spacing_zyx: Sequence[float],
    settings: Preprocessing,
    *,
    direction_xyz: Sequence[float],
    region: Box | None = None,
) -> tuple[np.ndarray, PreprocessRecord]:
    """Network input (float32, on the target grid, in the plan's axis order) and the record to
    map outputs back. `spacing_zyx` and `direction_xyz` are the image's, as in its file.

    `region` (start and stop voxel indices in the file's axis order) limits the output to that
    box of the image (within its nonzero box): a two-stage model's main network sees only what
    its localiser found. The intensities are normalised with the whole image's statistics, and
    the record's crop is the region, so `restore` places outputs back exactly.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {image.shape}")
    transpose = settings.fixed_transpose or axis_transpose(direction_xyz, settings.patient_axes_zyx)
    image = image.transpose(transpose)
    spacing_zyx = [spacing_zyx[a] for a in transpose]
    start, stop = nonzero_box(image) if settings.crop_to_nonzero else ((0, 0, 0), image.shape)
    crop_start, crop_stop = start, stop
    if region is not None:
        crop_start = tuple(max(a, region[0][t]) for a, t in zip(start, transpose, strict=True))
        crop_stop = tuple(min(b, region[1][t]) for b, t in zip(stop, transpose, strict=True))
        if any(b <= a for a, b in zip(crop_start, crop_stop, strict=True)):
            raise ValueError(f"the region {region} holds none of the image's nonzero voxels")
    cropped_shape = [b - a for a, b in zip(crop_start, crop_stop, strict=True)]
    record = PreprocessRecord(
        original_shape=tuple(int(image.shape[a]) for a in np.argsort(transpose)),
        transpose=transpose,
        crop_start=tuple(int(a) for a in crop_start),
        crop_stop=tuple(int(b) for b in crop_stop),
        original_spacing_zyx=tuple(float(s) for s in spacing_zyx),
        target_spacing_zyx=tuple(float(s) for s in settings.target_spacing_zyx),
        resampled_shape=resampled_shape(cropped_shape, spacing_zyx, settings.target_spacing_zyx),
    )
    rs = settings.resampling
    thick = through_plane_axis(
        record.original_spacing_zyx, record.target_spacing_zyx, rs.anisotropy_threshold
    )
    window = tuple(
        slice(a - s, b - s) for a, b, s in zip(crop_start, crop_stop, start, strict=True)
    )
    body = image[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    normalized = normalize(body, settings.normalization, window)
    data = resample(
        normalized,
        record.resampled_shape,
        rs.image_order,
        thick,
        rs.through_plane_order,
        clip=rs.clip_image,
    )
    return data.astype(np.float32, copy=False), record


def grid_box_to_input(start: Sequence[int], stop: Sequence[int], record: PreprocessRecord) -> Box:
    """A box [start, stop) of voxels on the preprocessed grid as the smallest box of input
    voxels that covers it, in the file's axis order. Resampling aligns the outer voxel edges
    (`_zoom_axes`), so grid voxel i spans input voxels [i * f, (i + 1) * f) of the crop, with f
    the ratio of the cropped to the resampled size."""
    lows, highs = [], []
    for axis in range(3):  # integer arithmetic: an edge on an input voxel edge stays there
        cropped, resampled = record.cropped_shape[axis], record.resampled_shape[axis]
        offset = record.crop_start[axis]
        lows.append(offset + max(0, start[axis] * cropped // resampled))
        highs.append(offset + min(cropped, -(-stop[axis] * cropped // resampled)))
    inverse = record.inverse_transpose
    return tuple(lows[a] for a in inverse), tuple(highs[a] for a in inverse)


def preprocess_label(label: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """A label map on the same grid as `preprocess`'s image output.

    Each label is resampled as a linear indicator and the largest wins, which keeps small
    structures' boundaries where nearest-neighbour resampling would shift them by up to a voxel.
    """
    if tuple(label.shape) != record.original_shape:
        raise ValueError(f"label shape {label.shape} differs from image {record.original_shape}")
    cropped = label.transpose(record.transpose)[record.crop]
    if tuple(cropped.shape) == record.resampled_shape:
        return cropped.copy()
    values = [int(v) for v in np.unique(cropped)]
    best = np.full(record.resampled_shape, 0.5, dtype=np.float32)  # a label needs > 0.5 to win
    out = np.zeros(record.resampled_shape, dtype=label.dtype)
    for value in values:
        if value == 0:
            continue
        indicator = resample((cropped == value).astype(np.float32), record.resampled_shape, 1)
        wins = indicator > best
        out[wins] = value
        best[wins] = indicator[wins]
    return out


def resample_back(
    values: np.ndarray, record: PreprocessRecord, resampling: Resampling
) -> np.ndarray:
    """A network output (probability or logit) on the resampled grid, back on the cropped input
    grid, float32. Outputs vary smoothly, so one order serves all axes unless the resampling asks
    for nnU-Net's rule (the thick axis on its own, `probability_through_plane_order`)."""
    if tuple(values.shape) != record.resampled_shape:
        raise ValueError(
            f"network output shape {values.shape} differs from the preprocessed grid "
            f"{record.resampled_shape}"
        )
    thick = None
    if resampling.probability_through_plane_order is not None:
        # From the network's grid back to the image's: the same rule, the grids swapped.
        thick = through_plane_axis(
            record.target_spacing_zyx, record.original_spacing_zyx, resampling.anisotropy_threshold
        )
    return resample(
        values.astype(np.float32, copy=False),
        record.cropped_shape,
        resampling.probability_order,
        thick,
        resampling.probability_through_plane_order or 0,
    )


def uncrop(values: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Values on the cropped grid, placed on the input's full grid (zero outside the crop) in the
    file's own axis order."""
    full = np.zeros(record.transposed_shape, dtype=values.dtype)
    full[record.crop] = values
    return np.ascontiguousarray(full.transpose(record.inverse_transpose))


def restore(
    probability: np.ndarray, record: PreprocessRecord, resampling: Resampling
) -> np.ndarray:
    """A probability map on the resampled grid, back on the input's full grid in the file's axis
    order (zero outside the crop), as float32."""
    return uncrop(np.clip(resample_back(probability, record, resampling), 0.0, 1.0), record)
