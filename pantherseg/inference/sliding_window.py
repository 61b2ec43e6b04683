"""Patch-by-patch inference over a whole volume, with Gaussian blending, mirroring and ensembling.

The network only sees patches of its training size, so a volume is cut into overlapping tiles and
the tiles' logits are blended back together. Tiles are weighted by a Gaussian because a
convolutional network sees less context near a patch's border, so its predictions there are less
reliable. Everything here is engine-agnostic: a predictor is any callable that maps a batch of
patches to a batch of logits (an ONNX session, a mirrored or averaged wrapper, a test stub).

Arrays are channel-first: a volume is (C, Z, Y, X), a batch is (B, C, pz, py, px).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from numpy.typing import DTypeLike
from scipy import ndimage
from tqdm import tqdm

from pantherseg.inference.half_precision import add_in_float16, round_to_float16

Predictor = Callable[[np.ndarray], np.ndarray]
"""(B, C, *patch) float32 -> (B, K, *patch) float32 logits."""

_ACCUMULATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Per-voxel weight of a tile: trust the patch centre, where the network saw the most context.

    Peak 1 at the centre, sigma = patch * sigma_scale per axis; zeros (underflow far from the
    centre) are replaced by the smallest non-zero value so that every voxel keeps some weight and
    a voxel seen only by tile borders is still defined.
    """
    patch = _check_patch(patch_size)
    if (
        not (isinstance(sigma_scale, numbers.Real) and math.isfinite(sigma_scale))
        or sigma_scale <= 0
    ):
        raise ValueError(f"sigma_scale must be a positive finite number, got {sigma_scale!r}")
    profiles = []
    for size in patch:
        # Centre at (size - 1) / 2 so that the map is symmetric for even and odd sizes alike.
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
        profiles.append(np.exp(-0.5 * (coords / (size * sigma_scale)) ** 2))
    weights = _separable_map(profiles)
    weights = (weights / weights.max()).astype(np.float32)
    nonzero = weights > 0
    if not nonzero.all():
        weights[~nonzero] = weights[nonzero].min()
    return weights


def _separable_map(profiles: Sequence[np.ndarray]) -> np.ndarray:
    """The 3-D map whose value at (z, y, x) is profile_z[z] * profile_y[y] * profile_x[x],
    multiplied in that order (both tile weightings are separable Gaussians)."""
    return functools.reduce(np.multiply.outer, profiles)


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net v2's tile weights, value for value: a unit impulse at `patch // 2` smoothed by
    scipy's Gaussian filter (truncated at four sigma), scaled to a peak of 10 and rounded to
    float16, zeros raised to the smallest weight. Its imported models are matched exactly only
    with these (the analytic map above is centred between voxels and never truncated)."""
    patch = _check_patch(patch_size)
    # The filter is separable and the impulse too: filtering a line per axis and multiplying
    # the profiles in axis order gives gaussian_filter's values bit for bit (each output voxel
    # has one non-zero term per pass), in 0.03 s instead of 0.3 s at the baseline's patch.
    profiles = []
    for p in patch:
        line = np.zeros(p)
        line[p // 2] = 1
        profiles.append(ndimage.gaussian_filter1d(line, p * sigma_scale, mode="constant"))
    smoothed = _separable_map(profiles)
    # Through float32, as torch converts: rounding twice differs from once in a few voxels.
    weights = (smoothed / (smoothed.max() / 10)).astype(np.float32).astype(np.float16)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


def nnunet_tile_starts(
    shape: Sequence[int], patch_size: Sequence[int], step_fraction: float = 0.5
) -> list[list[int]]:
    """nnU-Net v2's tile positions: as many tiles as a step of `patch * step_fraction` needs,
    spread evenly and rounded to the nearest voxel (`tile_starts` floors instead)."""
    patch = _check_patch(patch_size)
    step_fraction = _check_step_fraction(step_fraction)
    starts = []
    for size, p in zip(shape, patch, strict=True):
        if size < p:
            raise ValueError(f"shape {tuple(shape)} is smaller than patch {patch}; pad it first")
        steps = int(np.ceil((size - p) / (p * step_fraction))) + 1
        width = (size - p) / (steps - 1) if steps > 1 else 0.0
        starts.append([int(np.round(width * i)) for i in range(steps)])
    return starts


def tile_starts(
    shape: Sequence[int], patch_size: Sequence[int], step_fraction: float = 0.5
) -> list[list[int]]:
    """Per axis, where tiles start: the fewest evenly spaced tiles that overlap enough.

    Consecutive starts differ by at most max(1, floor(patch * step_fraction)), so tiles overlap by
    at least (1 - step_fraction) of the patch (whenever a step of at least one voxel allows it).
    The first tile starts at 0 and the last ends at the border, so every voxel is covered.
    Requires shape >= patch on every axis (pad first).
    """
    patch = _check_patch(patch_size)
    step_fraction = _check_step_fraction(step_fraction)
    sizes = [operator.index(s) for s in shape]
    if len(sizes) != len(patch):
        raise ValueError(f"shape {tuple(sizes)} and patch {patch} differ in length")
    starts = []
    for size, p in zip(sizes, patch, strict=True):
        if size < p:
            raise ValueError(f"shape {tuple(sizes)} is smaller than patch {patch}; pad it first")
        span = size - p
        max_step = max(1, math.floor(p * step_fraction))
        n_steps = -(-span // max_step)  # ceil: the fewest steps no longer than max_step
        # Integer floor of i * span / n_steps: exact, and neighbouring steps differ by at most 1.
        starts.append([0] if n_steps == 0 else [i * span // n_steps for i in range(n_steps + 1)])
    return starts


def sliding_window_predict(
    volume: np.ndarray,
    predictor: Predictor,
    patch_size: Sequence[int],
    *,
    step_fraction: float = 0.5,
    batch_size: int = 1,
    sigma_scale: float = 1 / 8,
    accumulate_dtype: DTypeLike = np.float32,
    stitching: str = "pantherseg",
    progress: bool = False,
) -> np.ndarray:
    """Logits for a whole (C, Z, Y, X) volume from a predictor that only handles patches.

    Returns (K, Z, Y, X) float32: the Gaussian-weighted average of the tiles' logits. Normalising
    by the accumulated weights makes the result exactly a pointwise predictor's result, whatever
    the tiling. Volumes smaller than the patch are zero-padded (0 is the mean after z-score
    normalisation) and the result is cropped back. Memory stays at one (K, Z, Y, X) accumulator
    and one (Z, Y, X) weight array of `accumulate_dtype` (float16 halves it, at ~1e-3 relative
    precision) plus one batch of patches.

    `stitching="nnunet"` places and weights the tiles as nnU-Net v2 does (`nnunet_tile_starts`,
    `nnunet_gaussian`) and rounds every sum and the quotient to float16 as its predictor does,
    so that an imported nnU-Net model gives nnU-Net's logits. The sums are kept in float32
    (`add_in_float16`): float16 arrays took 1.07 s instead of 0.39 s to stitch the baseline's
    8 tiles of a median case, nearly all in conversions of float16 subnormals.
    """
    volume = np.asarray(volume)
    if volume.ndim != 4 or min(volume.shape) < 1:
        raise ValueError(f"volume must be 4D (C, Z, Y, X) with no empty axis, got {volume.shape}")
    patch = _check_patch(patch_size)
    step_fraction = _check_step_fraction(step_fraction)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if stitching not in ("pantherseg", "nnunet"):
        raise ValueError(f"stitching must be 'pantherseg' or 'nnunet', got {stitching!r}")
    half_sums = stitching == "nnunet"  # float32 arrays holding float16 values
    acc_dtype = np.dtype(np.float32 if half_sums else accumulate_dtype)
    if acc_dtype not in _ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype must be float32 or float16, got {acc_dtype}")

    channels, *spatial = volume.shape
    padded, crop = _pad_to_patch(volume, patch)
    padded_shape = padded.shape[1:]

    weights = _tile_weights(patch, sigma_scale, stitching, acc_dtype)
    placement = nnunet_tile_starts if stitching == "nnunet" else tile_starts
    weight_sum = np.zeros(padded_shape, dtype=acc_dtype)
    logit_sum: np.ndarray | None = None  # allocated once K is known from the first output
    weighted = None

    tiles = list(itertools.product(*placement(padded_shape, patch, step_fraction)))
    batch = np.empty((min(batch_size, len(tiles)), channels, *patch), dtype=np.float32)
    with tqdm(total=len(tiles), disable=not progress, unit="tile", desc="sliding window") as bar:
        for chunk in _chunks(tiles, batch_size):
            slices = [
                tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True)) for start in chunk
            ]
            inputs = batch[: len(chunk)]
            for i, region in enumerate(slices):
                inputs[i] = padded[(slice(None), *region)]
            logits = _check_output(predictor(inputs), len(chunk), patch, logit_sum)
            if logit_sum is None:
                logit_sum = np.zeros((logits.shape[1], *padded_shape), dtype=acc_dtype)
                weighted = np.empty(logits.shape[1:], dtype=np.float32)
            for i, region in enumerate(slices):
                np.multiply(logits[i], weights, out=weighted)
                tile_sum, tile_weight = logit_sum[(slice(None), *region)], weight_sum[region]
                if half_sums:
                    add_in_float16(tile_sum, weighted)
                    add_in_float16(tile_weight, weights)
                else:
                    tile_sum += weighted
                    tile_weight += weights
            bar.update(len(chunk))

    assert logit_sum is not None  # at least one tile always exists
    result = logit_sum[(slice(None), *crop)]
    norm = weight_sum[crop]
    if acc_dtype == np.float32:
        result /= norm  # in place: the accumulator becomes the output, no second full copy
        if half_sums:
            round_to_float16(result, out=result)  # the quotient in float16, as nnU-Net's
    else:
        result = np.divide(result, norm, dtype=np.float32)
    if spatial != list(padded_shape):
        result = np.ascontiguousarray(result)
    if not np.isfinite(result).all():
        if half_sums:  # nnU-Net's stitching rounds to float16 by design: no float32 to offer
            overflow = ", or nnU-Net's float16 sums overflowed (logits beyond float16's 65504)"
        elif acc_dtype == np.float16:
            overflow = ", or float16 accumulation overflowed (use float32)"
        else:
            overflow = ""
        raise ValueError(
            f"stitched logits are not finite: the predictor returned NaN/inf{overflow}"
        )
    return result


@functools.lru_cache(maxsize=8)
def _tile_weights(
    patch: tuple[int, int, int], sigma_scale: float, stitching: str, acc_dtype: np.dtype
) -> np.ndarray:
    """The float32 tile weights, read-only, computed once per patch and stitching: either map
    takes tens of milliseconds at the Task 1 baseline's patch, which every fold of every case
    would otherwise pay again."""
    if stitching == "nnunet":
        weights = nnunet_gaussian(patch, sigma_scale).astype(np.float32)
    else:
        # Raise tiny border weights to what the accumulator can hold, so a voxel seen only by
        # tile corners neither underflows to 0/0 in float16 nor loses all precision.
        weights = gaussian_importance_map(patch, sigma_scale)
        weights = np.maximum(weights, np.finfo(acc_dtype).eps).astype(np.float32)
    weights.flags.writeable = False
    return weights


def mirrored(predictor: Predictor, axes: Sequence[int]) -> Predictor:
    """Test-time mirroring: average the predictor over every combination of flips of `axes`.

    Spatial axes are 0=z, 1=y, 2=x; 2**len(axes) passes, each result flipped back before
    averaging, so a predictor that is already flip-equivariant is unchanged and one that is not
    becomes symmetric. Costs 2**len(axes) predictor calls per batch.
    """
    flips = [int(operator.index(a)) for a in axes]
    if len(set(flips)) != len(flips) or any(a not in (0, 1, 2) for a in flips):
        raise ValueError(f"mirror axes must be distinct spatial axes among 0, 1, 2, got {axes!r}")
    combos = [
        tuple(a + 2 for a in combo)
        for n in range(len(flips) + 1)
        for combo in itertools.combinations(flips, n)
    ]

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for combo in combos:
            view = np.flip(batch, combo) if combo else batch
            out = _as_logits(predictor(np.ascontiguousarray(view)), total, "mirrored")
            out = np.flip(out, combo) if combo else out
            if total is None:
                total = np.array(out, dtype=np.float32)  # own copy: the predictor's may be reused
            else:
                total += out
        assert total is not None
        total /= len(combos)
        return total

    return predict


def averaged(predictors: Sequence[Predictor]) -> Predictor:
    """Ensemble: the mean of several predictors' logits (cross-validation folds).

    Averaging logits per batch keeps a single stitching pass for all members.
    """
    members = list(predictors)
    if not members:
        raise ValueError("averaged needs at least one predictor")

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for member in members:
            out = _as_logits(member(batch), total, "averaged")
            if total is None:
                total = np.array(out, dtype=np.float32)
            else:
                total += out
        assert total is not None
        total /= len(members)
        return total

    return predict


def _check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """A patch of three positive ints; floats are refused rather than silently truncated."""
    try:
        items = list(patch_size)
        patch = tuple(operator.index(p) for p in items)
    except TypeError:
        raise ValueError(f"patch_size must be 3 positive integers, got {patch_size!r}") from None
    if len(patch) != 3 or any(p < 1 for p in patch) or any(isinstance(p, bool) for p in items):
        raise ValueError(f"patch_size must be 3 positive integers, got {patch_size!r}")
    return patch  # type: ignore[return-value]


def _check_step_fraction(step_fraction: float) -> float:
    if (
        isinstance(step_fraction, bool)
        or not isinstance(step_fraction, numbers.Real)
        or not 0 < step_fraction <= 1  # also refuses NaN
    ):
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction!r}")
    return float(step_fraction)


def _pad_to_patch(
    volume: np.ndarray, patch: tuple[int, int, int]
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Zero-pad axes shorter than the patch, centred as nnU-Net does; the crop undoes it.

    Only small volumes are copied; a volume at least as large as the patch is used as is.
    """
    spatial = volume.shape[1:]
    before = [max(p - s, 0) // 2 for s, p in zip(spatial, patch, strict=True)]
    after = [max(p - s, 0) - b for s, p, b in zip(spatial, patch, before, strict=True)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    if not any(before) and not any(after):
        return volume, crop  # type: ignore[return-value]
    padded = np.pad(
        volume.astype(np.float32, copy=False),
        [(0, 0), *zip(before, after, strict=True)],
        mode="constant",
        constant_values=0,
    )
    return padded, crop  # type: ignore[return-value]


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_output(
    out: object, batch: int, patch: tuple[int, int, int], logit_sum: np.ndarray | None
) -> np.ndarray:
    """A wrong output shape would broadcast silently or crash deep in numpy; say what came back."""
    logits = np.asarray(out, dtype=np.float32)
    expected_k = "K" if logit_sum is None else str(logit_sum.shape[0])
    if (
        logits.ndim != 5
        or logits.shape[0] != batch
        or tuple(logits.shape[2:]) != patch
        or logits.shape[1] < 1
        or (logit_sum is not None and logits.shape[1] != logit_sum.shape[0])
    ):
        raise ValueError(
            f"predictor returned shape {logits.shape} for a batch of {batch} patches of {patch}; "
            f"expected ({batch}, {expected_k}, {patch[0]}, {patch[1]}, {patch[2]})"
        )
    return logits


def _as_logits(out: object, previous: np.ndarray | None, who: str) -> np.ndarray:
    """Outputs of wrapped predictors must be 5D and agree, or flipping/averaging is meaningless."""
    logits = np.asarray(out, dtype=np.float32)
    if logits.ndim != 5 or (previous is not None and logits.shape != previous.shape):
        expected = "a 5D (B, K, z, y, x) array" if previous is None else f"shape {previous.shape}"
        raise ValueError(f"{who}: a predictor returned shape {logits.shape}, expected {expected}")
    return logits
