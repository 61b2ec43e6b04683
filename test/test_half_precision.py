"""Float16 rounding in float32 arithmetic gives numpy's float16 conversion, value for value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pantherseg.inference.half_precision import FLOAT16_MAX, add_in_float16, round_to_float16


def numpys(values: np.ndarray) -> np.ndarray:
    """The reference: float32 to float16 and back through numpy (the CPU's instruction)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf is expected
        return values.astype(np.float16).astype(np.float32)


def assert_same_values(ours: np.ndarray, reference: np.ndarray) -> None:
    same = (ours == reference) | (np.isnan(ours) & np.isnan(reference))
    assert same.all(), f"{(~same).sum()} differ, first at {np.argwhere(~same)[:3].tolist()}"


def every_float16_and_the_ties_between() -> np.ndarray:
    """Every finite float16, each midpoint between neighbours (ties: to even) and the float32
    values just either side of each midpoint, both signs, subnormals and the overflow edge."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    above = np.nextafter(mids, np.float32(np.inf))
    below = np.nextafter(mids, np.float32(-np.inf))
    edges = np.array([65519.996, 65520, 65536, -65520, 1e30, -3e38, np.inf, -np.inf, np.nan])
    return np.concatenate([finite, mids, above, below, edges.astype(np.float32)])


def test_every_float16_every_tie_and_the_overflow_edge() -> None:
    values = every_float16_and_the_ties_between()
    assert_same_values(round_to_float16(values), numpys(values))


def test_random_float32_bit_patterns() -> None:
    bits = np.random.default_rng(7).integers(0, 1 << 32, 2_000_000, dtype=np.uint64)
    values = bits.astype(np.uint32).view(np.float32)
    assert_same_values(round_to_float16(values), numpys(values))


# Blocks of whole sub-arrays, rows longer than a block, one long axis, a single small block.
@pytest.mark.parametrize("shape", [(3, 40, 70, 90), (2, 300_000), (700_000,), (5, 1, 7)])
def test_in_place_on_a_strided_view_across_blocks(shape: tuple[int, ...]) -> None:
    """In place, on a non-contiguous view (the sliding window's use), whole or split into
    blocks: every value rounded, nothing outside the view touched."""
    rng = np.random.default_rng(len(shape))
    whole = (rng.standard_normal((*shape[:-1], shape[-1] + 3)) * 1e-4).astype(np.float32)
    before = whole.copy()
    view = whole[..., 1:-2]
    expected = numpys(view)
    assert round_to_float16(view, out=view) is view
    assert_same_values(view, expected)
    assert_same_values(whole[..., :1], before[..., :1])
    assert_same_values(whole[..., -2:], before[..., -2:])


@pytest.mark.parametrize("shape", [(3, 40, 70, 90), (1000,)])
def test_adding_is_numpys_float16_in_place_addition(shape: tuple[int, ...]) -> None:
    """`add_in_float16(total, x)` is `total16 += x` on a float16 array (the sum in float32,
    rounded), over a strided view and across blocks, subnormal sums and overflow included."""
    rng = np.random.default_rng(sum(shape))
    scale = np.exp(rng.uniform(-20, 11, shape)).astype(np.float32)  # 2e-9 to 6e4
    start = (rng.standard_normal(shape) * scale).astype(np.float16)
    addend = (rng.standard_normal(shape) * scale).astype(np.float32)
    expected = start.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf is expected
        expected += addend
    whole = np.zeros((*shape[:-1], shape[-1] + 2), np.float32)
    total = whole[..., 1:-1]
    total[...] = start
    assert add_in_float16(total, addend) is total
    assert_same_values(total, expected.astype(np.float32))
    assert not whole[..., 0].any() and not whole[..., -1].any()
    assert np.isinf(total).any() and (np.abs(total[total != 0]) < 2**-14).any()


def test_overflow_becomes_infinity_with_its_sign() -> None:
    values = np.array([FLOAT16_MAX, 65519.0, 65520.0, -70000.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(
        round_to_float16(values), [FLOAT16_MAX, FLOAT16_MAX, np.inf, -np.inf, 1.0]
    )


def test_refuses_what_it_cannot_round_exactly() -> None:
    with pytest.raises(TypeError, match="float32"):
        round_to_float16(np.ones(3))  # float64: rounding via float32 would round twice
    with pytest.raises(ValueError, match="out must be float32"):
        round_to_float16(np.ones(3, np.float32), out=np.empty(4, np.float32))
    with pytest.raises(TypeError, match="addend must be float32"):
        add_in_float16(np.ones(3, np.float32), np.ones(3))
    with pytest.raises(ValueError, match="addend has shape"):
        add_in_float16(np.ones(3, np.float32), np.ones(4, np.float32))
