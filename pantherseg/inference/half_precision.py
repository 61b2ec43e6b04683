"""Float16 rounding in float32 arithmetic, for nnU-Net's half-precision stitching.

nnU-Net v2 accumulates tile logits, tile weights and fold sums in float16, so an imported model
reproduces its logits only when every sum is rounded to float16 as its predictor rounds it.
numpy rounds through the CPU's conversion instruction, which takes a microcode assist for every
result that is a float16 subnormal (magnitude under 2**-14): near tile borders, where nnU-Net's
Gaussian is tiny, most results are, and converting one 3-class tile of the PANTHER baseline
(48 x 192 x 224) took 0.25 s instead of 0.015 s (measured on a 2-core Xeon). Rounding with two
float32 additions gives the same values in about 0.01 s and keeps them in float32, where the rest
of the pipeline wants them; numpy has no other float16 rounding and the container no other
array library.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

FLOAT16_MAX = 65504.0
_EXPONENT_BITS = np.int32(0x7F800000)
# Bits of 2**-14 (float16's smallest normal: below it the float16 step is fixed at 2**-24) and of
# 2**16 (beyond it everything overflows anyway; the cap keeps the shift below float32's range).
_SMALLEST_NORMAL_BITS = np.int32(0x38800000)
_CAP_BITS = np.int32(0x47800000)
# Added to the bits of a power of two 2**e, gives those of 1.5 * 2**(e + 13), whose float32 step
# is 2**(e - 10): float16's step between 2**e and 2**(e + 1).
_SHIFT_BITS = np.int32((13 << 23) | (1 << 22))
_BLOCK = 1 << 18  # values per block: 1 MiB of float32


def round_to_float16(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`values.astype(np.float16).astype(np.float32)`, value for value (round to nearest, ties to
    even, overflow to infinity; a negative number that rounds to zero gives +0.0, not -0.0),
    without the CPU's penalty on float16 subnormals. `values` must be float32; `out` may be
    `values` itself (rounded in place) or any float32 array of its shape."""
    values = _float32(values, "values")
    if out is None:
        out = np.empty_like(values)
    elif out.shape != values.shape or out.dtype != np.float32:
        raise ValueError(
            f"out must be float32 of shape {values.shape}, got {out.dtype} {out.shape}"
        )
    return _blockwise(values, out, None)


def add_in_float16(total: np.ndarray, addend: np.ndarray) -> np.ndarray:
    """`total += addend` in place, the sum rounded to float16 as float16 arithmetic rounds it
    (numpy's and torch's: computed in float32, then rounded): nnU-Net's sums of tiles, weights
    and folds. Both float32 and of one shape; `total` holds float16 values and keeps them."""
    total, addend = _float32(total, "total"), _float32(addend, "addend")
    if addend.shape != total.shape:
        raise ValueError(f"addend has shape {addend.shape}, total {total.shape}")
    return _blockwise(total, total, addend)


def _float32(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32 (rounding through another type rounds twice), "
            f"got {values.dtype}"
        )
    return values


def _blockwise(values: np.ndarray, out: np.ndarray, addend: np.ndarray | None) -> np.ndarray:
    """`out` = float16 rounding of `values` (+ `addend`), block by block, each block small
    enough to stay in the CPU's cache with its scratch: full-size passes and a full-size scratch
    array cost more in memory traffic and page faults than the arithmetic."""
    scratch = np.empty(min(values.size, _BLOCK), dtype=np.int32)
    addends = _blocks(addend) if addend is not None else (None for _ in _blocks(values))
    with np.errstate(invalid="ignore"):  # a signalling NaN stays NaN, as in the conversion
        for block, block_out, block_addend in zip(
            _blocks(values), _blocks(out), addends, strict=True
        ):
            if block_addend is not None:
                np.add(block, block_addend, out=block_out)
                block = block_out
            _round_block(block, block_out, scratch[: block.size].reshape(block.shape))
    # Overflow is rare: two reductions find it; fmax and fmin skip NaN, which stays NaN anyway.
    if out.size and max(np.fmax.reduce(out, axis=None), -np.fmin.reduce(out, axis=None)) > (
        FLOAT16_MAX
    ):
        beyond = np.abs(out) > FLOAT16_MAX
        out[beyond] = np.copysign(np.inf, out[beyond])
    return out


def _round_block(values: np.ndarray, out: np.ndarray, shift: np.ndarray) -> None:
    """Per value, c = 1.5 * 2**(e + 13) for its binade 2**e (at least 2**-14): c + x lies in c's
    binade, whose float32 step is float16's step at x, so the addition rounds x as float16 would
    (ties to even, since c is an even number of steps) and the subtraction is exact."""
    np.bitwise_and(values.view(np.int32), _EXPONENT_BITS, out=shift)
    np.clip(shift, _SMALLEST_NORMAL_BITS, _CAP_BITS, out=shift)
    shift += _SHIFT_BITS
    shift_values = shift.view(np.float32)
    np.add(values, shift_values, out=out)
    out -= shift_values


def _blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views that tile `array` in order, each of at most `_BLOCK` values: runs of whole
    sub-arrays along the leading axis, split further when one is too big."""
    if array.size <= _BLOCK:
        yield array
        return
    inner = array[0].size if array.ndim > 1 else 1
    if inner > _BLOCK:
        for sub in array:
            yield from _blocks(sub)
        return
    step = _BLOCK // inner
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]
