"""Preprocessing and its inverse: shapes, statistics, and the exact way back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imaging import IDENTITY

from pantherseg.inference.plan import Normalization, Preprocessing, Resampling
from pantherseg.inference.preprocess import (
    nonzero_box,
    normalize,
    preprocess,
    preprocess_label,
    resample,
    resampled_shape,
    restore,
    through_plane_axis,
)


def test_nonzero_box_and_empty_image():
    image = np.zeros((5, 6, 7))
    image[1:3, 2, 3:6] = 4
    assert nonzero_box(image) == ((1, 2, 3), (3, 3, 6))
    assert nonzero_box(np.zeros((2, 3, 4))) == ((0, 0, 0), (2, 3, 4))


def test_zscore_with_clipping_and_nonzero_mask():
    rng = np.random.default_rng(0)
    image = rng.normal(300, 50, (10, 20, 20)).astype(np.float32)
    image[0, 0, 0] = 1e6  # one absurd voxel must not dominate
    plain = normalize(image, Normalization(clip_percentiles=(0.5, 99.5)))
    assert plain.dtype == np.float32
    assert abs(plain.mean()) < 1e-3 and abs(plain.std() - 1) < 1e-3
    assert plain.max() < 4
    body = image.copy()
    body[:, :5] = 0
    masked = normalize(body, Normalization(clip_percentiles=None, nonzero_only=True))
    assert np.all(masked[:, :5] == 0)
    assert abs(masked[:, 5:].mean()) < 1e-3
    with pytest.raises(ValueError, match="scheme"):
        normalize(image, Normalization(scheme="minmax"))


def test_resampled_shape_keeps_extent():
    assert resampled_shape((72, 258, 318), (3.0, 1.0, 1.0), (3.0, 1.5, 1.5)) == (72, 172, 212)
    assert resampled_shape((1, 2, 2), (1, 1, 1), (5, 5, 5)) == (1, 1, 1)


def test_anisotropy_decides_the_thick_axis():
    assert through_plane_axis((3.0, 1.19, 1.19), (3.0, 1.19, 1.19), 3.0) is None
    assert through_plane_axis((5.0, 0.8, 0.8), (3.0, 1.0, 1.0), 3.0) == 0
    assert through_plane_axis((0.9, 0.9, 4.0), (1, 1, 1), 3.0) == 2


def test_separate_through_plane_order_uses_nearest_across_slices():
    array = np.zeros((4, 6, 6), dtype=np.float32)
    array[2] = 1.0
    out = resample(array, (8, 6, 6), order=3, through_plane=0, through_plane_order=0)
    assert set(np.unique(out).tolist()) == {0.0, 1.0}  # no interpolation between slices
    smooth = resample(array, (8, 6, 6), order=1)
    assert len(np.unique(smooth)) > 2


def smooth_field(shape, spacing):
    """A smooth function of physical position, sampled at voxel centres."""
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    z, y, x = grids
    return (0.5 + 0.4 * np.sin(z / 17.0) * np.cos(y / 23.0 + x / 31.0)).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(3, 20), st.integers(3, 40), st.integers(3, 40)),
    spacing=st.tuples(st.floats(1.0, 5.0), st.floats(0.6, 2.0), st.floats(0.6, 2.0)),
    target=st.tuples(st.floats(1.0, 5.0), st.floats(0.6, 2.0), st.floats(0.6, 2.0)),
    pad=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
)
def test_restore_maps_back_onto_the_exact_input_grid(shape, spacing, target, pad):
    rng = np.random.default_rng(1)
    image = np.zeros(tuple(n + 2 * p for n, p in zip(shape, pad, strict=True)), np.float32)
    inner = tuple(slice(p, p + n) for n, p in zip(shape, pad, strict=True))
    image[inner] = rng.uniform(10, 500, shape)
    settings_ = Preprocessing(target_spacing_zyx=target)
    data, record = preprocess(image, spacing, settings_, direction_xyz=IDENTITY)
    assert data.shape == record.resampled_shape
    assert data.dtype == np.float32
    assert record.crop == inner
    # A smooth probability on the network grid comes back close to the same function on the
    # input grid, and exactly zero outside the crop.
    network_field = smooth_field(record.resampled_shape, record.target_spacing_zyx)
    actual_spacing = [
        n * s / m for n, s, m in zip(shape, spacing, record.resampled_shape, strict=True)
    ]
    back = restore(network_field, record, Resampling())
    assert back.shape == image.shape and back.dtype == np.float32
    outside = np.ones(image.shape, bool)
    outside[inner] = False
    assert np.all(back[outside] == 0)
    expected = smooth_field(shape, spacing)
    coarse = max(max(a / s for a, s in zip(actual_spacing, spacing, strict=True)), 1.0)
    assert np.abs(back[inner] - expected).max() < 0.05 * coarse


def test_labels_follow_the_image_grid():
    rng = np.random.default_rng(2)
    image = rng.uniform(1, 100, (10, 30, 30)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[3:6, 5:25, 5:26] = 1
    label[6:8, 2:28, 2:28] = 2
    settings_ = Preprocessing(target_spacing_zyx=(3.0, 1.5, 1.5))
    data, record = preprocess(image, (3.0, 1.0, 1.0), settings_, direction_xyz=IDENTITY)
    resampled = preprocess_label(label, record)
    assert resampled.shape == data.shape
    assert set(np.unique(resampled).tolist()) == {0, 1, 2}
    volume_before = (label == 1).sum() * 3.0
    volume_after = (resampled == 1).sum() * 3.0 * 1.5 * 1.5
    assert volume_after == pytest.approx(volume_before, rel=0.1)
    with pytest.raises(ValueError, match="label shape"):
        preprocess_label(label[:-1], record)


def test_restore_refuses_a_wrong_grid():
    _, record = preprocess(
        np.ones((4, 8, 8), np.float32) + np.arange(8),
        (1, 1, 1),
        Preprocessing(target_spacing_zyx=(1, 1, 1)),
        direction_xyz=IDENTITY,
    )
    with pytest.raises(ValueError, match="preprocessed grid"):
        restore(np.zeros((4, 8, 7), np.float32), record, Resampling())
