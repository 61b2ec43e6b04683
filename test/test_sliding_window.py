"""Sliding-window stitching, tiling, Gaussian weights, mirroring and ensembling."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pantherseg.inference.sliding_window import (
    averaged,
    gaussian_importance_map,
    mirrored,
    sliding_window_predict,
    tile_starts,
)

RNG = np.random.default_rng(0)


def pointwise(weight: np.ndarray, bias: np.ndarray):
    """A 1x1x1 convolution: the stitched output must equal it exactly, whatever the tiling."""

    def predict(batch: np.ndarray) -> np.ndarray:
        return (
            np.einsum("kc,bczyx->bkzyx", weight, batch) + bias[None, :, None, None, None]
        ).astype(np.float32)

    return predict


def x_ramp(batch: np.ndarray) -> np.ndarray:
    """Position-dependent: input plus the x index within the patch, so mirroring changes it."""
    ramp = np.arange(batch.shape[-1], dtype=np.float32)
    return (batch + ramp).astype(np.float32)


def coverage(shape, patch, step_fraction) -> np.ndarray:
    counts = np.zeros(shape, dtype=int)
    for start in itertools.product(*tile_starts(shape, patch, step_fraction)):
        counts[tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))] += 1
    return counts


dims = st.integers(1, 13)
patch_dims = st.integers(2, 7)
steps = st.sampled_from([0.25, 1 / 3, 0.5, 0.7, 1.0])


# --- tile_starts -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), patch=st.integers(1, 64), step=st.floats(0.01, 1.0))
def test_tile_starts_properties(size: int, patch: int, step: float) -> None:
    size = max(size, patch)
    starts = tile_starts([size, 1, 1], [patch, 1, 1], step)[0]
    assert starts[0] == 0
    assert starts[-1] == size - patch
    assert all(isinstance(s, int) for s in starts)
    diffs = np.diff(starts)
    assert (diffs > 0).all(), "strictly increasing, no duplicate tiles"
    max_step = max(1, int(np.floor(patch * step)))
    assert (diffs <= max_step).all()
    if patch * step >= 1:
        # consecutive tiles overlap by at least (1 - step) of the patch
        assert (patch - diffs >= (1 - step) * patch - 1e-9).all()
    if len(starts) > 1:
        # the fewest tiles: one fewer could not keep every step within max_step
        assert (size - patch) > (len(starts) - 2) * max_step
        assert diffs.max() - diffs.min() <= 1, "evenly spaced"


def test_tile_starts_examples() -> None:
    assert tile_starts([10, 8, 9], [4, 8, 4], 0.5) == [[0, 2, 4, 6], [0], [0, 1, 3, 5]]
    assert tile_starts([5, 5, 5], [5, 5, 5], 1.0) == [[0], [0], [0]]
    assert tile_starts([9, 9, 9], [5, 5, 5], 1.0) == [[0, 4]] * 3


def test_tile_starts_rejects_small_shape_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="smaller than patch"):
        tile_starts([3, 8, 8], [4, 4, 4])
    with pytest.raises(ValueError, match="step_fraction"):
        tile_starts([8, 8, 8], [4, 4, 4], 0)
    with pytest.raises(ValueError, match="differ in length"):
        tile_starts([8, 8], [4, 4, 4])


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(dims, dims, dims),
    patch=st.tuples(patch_dims, patch_dims, patch_dims),
    step=steps,
)
def test_every_voxel_is_covered(shape, patch, step) -> None:
    shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    assert coverage(shape, patch, step).min() >= 1


# --- gaussian_importance_map ---------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(1, 1, 1), (4, 5, 6), (16, 32, 31), (48, 192, 224)])
def test_gaussian_map_properties(patch) -> None:
    g = gaussian_importance_map(patch)
    assert g.shape == patch
    assert g.dtype == np.float32
    assert g.max() == pytest.approx(1.0)
    assert (g > 0).all()
    for axis in range(3):  # symmetric about the centre on every axis
        np.testing.assert_array_equal(g, np.flip(g, axis))
    centre = tuple((p - 1) // 2 for p in patch)
    assert g[centre] == g.max()
    # the peak is at the centre and weight decreases outwards along each axis
    for axis in range(3):
        line = g[tuple(slice(None) if a == axis else c for a, c in enumerate(centre))]
        half = line[: (len(line) + 1) // 2]
        assert (np.diff(half) >= 0).all()


def test_gaussian_map_sigma_and_underflow() -> None:
    g = gaussian_importance_map((1, 1, 81), sigma_scale=1 / 8)
    sigma = 81 / 8
    # one sigma from the centre the weight is exp(-1/2)
    assert g[0, 0, 40 + 10] == pytest.approx(np.exp(-0.5 * (10 / sigma) ** 2), rel=1e-5)
    # a tiny sigma underflows to zero far from the centre: replaced by the smallest non-zero value
    sharp = gaussian_importance_map((1, 1, 201), sigma_scale=1 / 200)
    assert (sharp > 0).all()
    assert sharp[0, 0, 0] == sharp[0, 0, -1] == sharp.min() < 1e-30
    assert np.count_nonzero(sharp == sharp.min()) > 2, "the underflowed tail was filled in"
    with pytest.raises(ValueError):
        gaussian_importance_map((4, 4, 4), sigma_scale=0)
    with pytest.raises(ValueError):
        gaussian_importance_map((4, 4))


# --- sliding_window_predict ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(dims, dims, dims),
    patch=st.tuples(patch_dims, patch_dims, patch_dims),
    step=steps,
    batch_size=st.integers(1, 5),
    channels=st.integers(1, 2),
    classes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_stitching_is_exact_for_a_pointwise_network(
    shape, patch, step, batch_size, channels, classes, seed
) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(classes, channels)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    volume = rng.normal(size=(channels, *shape)).astype(np.float32)
    predictor = pointwise(weight, bias)
    out = sliding_window_predict(
        volume, predictor, patch, step_fraction=step, batch_size=batch_size
    )
    expected = predictor(volume[None])[0]
    assert out.shape == (classes, *shape)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(dims, dims, dims),
    patch=st.tuples(patch_dims, patch_dims, patch_dims),
    step=steps,
    seed=st.integers(0, 2**16),
)
def test_stitching_with_float16_accumulation(shape, patch, step, seed) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(2, 1)).astype(np.float32)
    bias = rng.normal(size=2).astype(np.float32)
    volume = rng.normal(size=(1, *shape)).astype(np.float32)
    predictor = pointwise(weight, bias)
    out = sliding_window_predict(
        volume, predictor, patch, step_fraction=step, batch_size=2, accumulate_dtype=np.float16
    )
    expected = predictor(volume[None])[0]
    assert out.dtype == np.float32
    # Summing n float16 terms in sequence loses up to about n half-ulps (2**-11 each); a voxel
    # gets one term per tile covering it (counted on the padded grid the tiles run over).
    shape = tuple(max(n, p) for n, p in zip(shape, patch, strict=True))
    starts = tile_starts(shape, patch, step)
    overlap = np.prod(
        [
            max(sum(1 for s in axis if s <= v < s + p) for v in range(n))
            for axis, p, n in zip(starts, patch, shape, strict=True)
        ]
    )
    tolerance = max(5e-3, float(overlap) * 2.0**-11)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 7, 3), (5, 40, 37), (12, 3, 50), (11, 13, 17)], ids=str
)
def test_small_and_odd_volumes_are_padded_and_cropped(shape) -> None:
    patch = (6, 8, 8)
    weight = np.array([[2.0], [-1.0]], dtype=np.float32)
    bias = np.array([0.5, 1.5], dtype=np.float32)
    volume = RNG.normal(size=(1, *shape)).astype(np.float32)
    out = sliding_window_predict(volume, pointwise(weight, bias), patch, batch_size=3)
    np.testing.assert_allclose(out, pointwise(weight, bias)(volume[None])[0], atol=1e-5)


def test_padding_is_zero_and_keeps_every_input_value() -> None:
    volume = RNG.uniform(1, 2, size=(1, 2, 3, 4)).astype(np.float32)
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return batch

    sliding_window_predict(volume, record, (4, 4, 4))
    (batch,) = seen
    assert batch.shape == (1, 1, 4, 4, 4)
    assert np.count_nonzero(batch) == volume.size
    assert batch.sum() == pytest.approx(volume.sum())


def test_tiles_are_batched() -> None:
    volume = RNG.normal(size=(1, 20, 20, 20)).astype(np.float32)
    patch = (8, 8, 8)
    sizes = []

    def record(batch: np.ndarray) -> np.ndarray:
        sizes.append(batch.shape[0])
        assert batch.dtype == np.float32
        return np.repeat(batch, 2, axis=1)

    out = sliding_window_predict(volume, record, patch, batch_size=4)
    n_tiles = int(np.prod([len(s) for s in tile_starts(volume.shape[1:], patch)]))
    assert sum(sizes) == n_tiles
    assert all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
    assert len(sizes) == -(-n_tiles // 4)
    np.testing.assert_allclose(out, np.repeat(volume, 2, axis=0), atol=1e-5)


def test_non_float32_volume_and_progress_bar(capsys) -> None:
    volume = RNG.integers(0, 5, size=(1, 9, 9, 9)).astype(np.int16)
    out = sliding_window_predict(volume, lambda b: b, (4, 4, 4), progress=True)
    np.testing.assert_allclose(out, volume.astype(np.float32), atol=1e-5)
    assert "tile" in capsys.readouterr().err


def test_gaussian_weighting_prefers_the_tile_centre() -> None:
    """A predictor that returns a different constant per tile: at a voxel near one tile's centre
    and another's border, the first tile must dominate the blend."""
    volume = np.zeros((1, 4, 4, 16), dtype=np.float32)
    calls = []

    def per_tile_constant(batch: np.ndarray) -> np.ndarray:
        calls.append(len(calls))
        return np.full((batch.shape[0], 1, *batch.shape[2:]), float(len(calls) - 1), np.float32)

    out = sliding_window_predict(volume, per_tile_constant, (4, 4, 8), step_fraction=0.5)
    assert tile_starts((4, 4, 16), (4, 4, 8))[2] == [0, 4, 8]
    # voxel x=4 is at the left border of tile 1 and near the centre of tile 0 (x 0..7): x=3.5
    assert out[0, 0, 0, 3] < 0.5
    # the middle of tile 1 (x 4..11) is dominated by tile 1 even though tiles 0 and 2 cover it
    assert out[0, 0, 0, 7] == pytest.approx(1.0, abs=0.05)
    # monotone along x since tiles are numbered left to right
    assert (np.diff(out[0, 0, 0]) >= -1e-6).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"volume": np.zeros((8, 8, 8), np.float32)}, "4D"),
        ({"volume": np.zeros((1, 0, 8, 8), np.float32)}, "4D"),
        ({"patch_size": (4, 4)}, "patch_size"),
        ({"patch_size": (4, 0, 4)}, "patch_size"),
        ({"patch_size": (4, -1, 4)}, "patch_size"),
        ({"patch_size": (4.0, 4, 4)}, "patch_size"),
        ({"step_fraction": 0}, "step_fraction"),
        ({"step_fraction": 1.5}, "step_fraction"),
        ({"step_fraction": float("nan")}, "step_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"accumulate_dtype": np.float64}, "accumulate_dtype"),
        ({"accumulate_dtype": np.int32}, "accumulate_dtype"),
    ],
)
def test_arguments_are_validated(kwargs, message) -> None:
    args = {"volume": np.zeros((1, 8, 8, 8), np.float32), "patch_size": (4, 4, 4)}
    args.update(kwargs)
    volume = args.pop("volume")
    patch = args.pop("patch_size")
    with pytest.raises(ValueError, match=message):
        sliding_window_predict(volume, lambda b: b, patch, **args)


@pytest.mark.parametrize(
    ("bad", "shape_text"),
    [
        (lambda b: b[:, :, :-1], "(1, 1, 3, 4, 4)"),  # wrong spatial size
        (lambda b: b[0], "(1, 4, 4, 4)"),  # lost the batch axis
        (lambda b: np.concatenate([b, b]), "(2, 1, 4, 4, 4)"),  # wrong batch size
        (lambda b: b[:, :0], "(1, 0, 4, 4, 4)"),  # no classes
    ],
)
def test_bad_predictor_output_is_rejected(bad, shape_text) -> None:
    volume = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="predictor returned shape") as info:
        sliding_window_predict(volume, bad, (4, 4, 4))
    assert shape_text in str(info.value)


def test_changing_class_count_is_rejected() -> None:
    calls = []

    def fickle(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        return np.repeat(batch, len(calls), axis=1)

    with pytest.raises(ValueError, match=r"expected \(1, 1, 4, 4, 4\)"):
        sliding_window_predict(np.zeros((1, 8, 4, 4), np.float32), fickle, (4, 4, 4))


def test_non_finite_logits_fail_loudly() -> None:
    with pytest.raises(ValueError, match=r"not finite: the predictor returned NaN/inf$"):
        sliding_window_predict(np.zeros((1, 4, 4, 4), np.float32), lambda b: b + np.nan, (4, 4, 4))


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({"accumulate_dtype": np.float16}, r"float16 accumulation overflowed \(use float32\)"),
        ({"stitching": "nnunet"}, r"nnU-Net's float16 sums overflowed"),
    ],
)
def test_float16_overflow_names_the_stitching_that_overflowed(kwargs: dict, hint: str) -> None:
    """Finite logits beyond float16's range overflow the half-precision sums; the message says
    which, and offers float32 only where the caller can choose it."""
    volume = np.zeros((1, 4, 4, 4), np.float32)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=hint):
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow warning comes first
        sliding_window_predict(volume, lambda b: b + 1e5, (4, 4, 4), **kwargs)


# --- mirroring and ensembling --------------------------------------------------------------------


def test_mirroring_over_x_averages_the_ramp() -> None:
    batch = RNG.normal(size=(3, 1, 2, 3, 6)).astype(np.float32)
    out = mirrored(x_ramp, axes=[2])(batch)
    # passes: input + ramp, and flip(flip(input) + ramp) = input + reversed ramp -> mean (px-1)/2
    np.testing.assert_allclose(out, batch + 2.5, atol=1e-6)
    assert out.dtype == np.float32


def test_mirroring_over_other_axes_leaves_an_x_ramp_alone() -> None:
    batch = RNG.normal(size=(2, 1, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(mirrored(x_ramp, axes=[0, 1])(batch), x_ramp(batch), atol=1e-6)


def test_mirroring_over_no_axes_is_the_plain_predictor() -> None:
    batch = RNG.normal(size=(2, 1, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(mirrored(x_ramp, axes=[])(batch), x_ramp(batch))


def test_mirroring_runs_every_flip_combination() -> None:
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        assert batch.flags.c_contiguous
        return batch

    batch = RNG.normal(size=(1, 1, 2, 3, 4)).astype(np.float32)
    out = mirrored(record, axes=[0, 1, 2])(batch)
    assert len(seen) == 8
    expected = {
        np.flip(batch, [a + 2 for a in combo]).tobytes()
        for n in range(4)
        for combo in itertools.combinations(range(3), n)
    }
    assert {s.tobytes() for s in seen} == expected, "each of the eight flips exactly once"
    np.testing.assert_allclose(out, batch, atol=1e-6)


def test_mirroring_a_flip_equivariant_predictor_changes_nothing() -> None:
    weight = RNG.normal(size=(3, 2)).astype(np.float32)
    bias = RNG.normal(size=3).astype(np.float32)
    plain = pointwise(weight, bias)
    batch = RNG.normal(size=(2, 2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(mirrored(plain, axes=(0, 1, 2))(batch), plain(batch), atol=1e-5)


def test_mirrored_sliding_window_of_the_ramp() -> None:
    """Mirroring composes with stitching: the x ramp averages to its mean in every tile."""
    volume = RNG.normal(size=(1, 7, 9, 13)).astype(np.float32)
    out = sliding_window_predict(volume, mirrored(x_ramp, [2]), (4, 4, 6), batch_size=2)
    np.testing.assert_allclose(out, volume + 2.5, atol=1e-5)


@pytest.mark.parametrize("axes", [[3], [-1], [0, 0], [1.0]])
def test_mirror_axes_are_validated(axes) -> None:
    with pytest.raises((ValueError, TypeError)):
        mirrored(x_ramp, axes)


def test_averaged_is_the_mean_of_members() -> None:
    a = pointwise(np.array([[1.0], [2.0]], np.float32), np.array([0.0, 1.0], np.float32))
    b = pointwise(np.array([[3.0], [-2.0]], np.float32), np.array([2.0, -1.0], np.float32))
    batch = RNG.normal(size=(2, 1, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(averaged([a, b])(batch), (a(batch) + b(batch)) / 2, atol=1e-6)
    np.testing.assert_allclose(averaged([a])(batch), a(batch), atol=1e-6)
    volume = batch[0]
    out = sliding_window_predict(volume, averaged([a, b]), (2, 3, 3), batch_size=3)
    np.testing.assert_allclose(out, ((a(batch) + b(batch)) / 2)[0], atol=1e-5)


def test_averaged_rejects_empty_and_disagreeing_members() -> None:
    with pytest.raises(ValueError):
        averaged([])
    batch = np.zeros((1, 1, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match="averaged"):
        averaged([lambda b: b, lambda b: np.repeat(b, 2, axis=1)])(batch)
    with pytest.raises(ValueError, match="mirrored"):
        mirrored(lambda b: b[0], [0])(batch)


def test_members_outputs_are_not_modified() -> None:
    """Wrappers must not write into an array the predictor might reuse (an engine's buffer)."""
    cached = np.ones((1, 1, 2, 2, 2), np.float32)
    averaged([lambda b: cached, lambda b: cached * 3])(cached)
    mirrored(lambda b: cached, [0])(cached)
    np.testing.assert_array_equal(cached, 1)


@pytest.mark.parametrize("stitching", ["nnunet", "pantherseg"])
def test_tile_weights_are_computed_once_per_patch(monkeypatch, stitching: str) -> None:
    """Every fold of every case reuses the weights (tens of milliseconds a patch), and the
    shared array cannot be changed by a caller."""
    from pantherseg.inference import sliding_window

    sliding_window._tile_weights.cache_clear()
    calls = []
    for name in ("nnunet_gaussian", "gaussian_importance_map"):
        real = getattr(sliding_window, name)
        monkeypatch.setattr(
            sliding_window, name, lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k)
        )
    volume = RNG.normal(size=(1, 9, 10, 11)).astype(np.float32)
    predict = pointwise(np.ones((2, 1), np.float32), np.zeros(2, np.float32))
    first = sliding_window_predict(volume, predict, (4, 6, 5), stitching=stitching)
    second = sliding_window_predict(volume, predict, (4, 6, 5), stitching=stitching)
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1
    sliding_window_predict(volume, predict, (5, 6, 5), stitching=stitching)
    assert len(calls) == 2
    weights = sliding_window._tile_weights((4, 6, 5), 1 / 8, stitching, np.dtype(np.float16))
    with pytest.raises(ValueError, match="read-only"):
        weights[0, 0, 0] = 0
