"""One physical image, one mask, whatever the axis order of its file; nnU-Net's rule for grids
without a single thick axis.

A file may store the same image with its slices along any array axis (the direction cosines say
which patient axis each array axis runs along). Preprocessing transposes every image into the
plan's patient-axis order and the mask back, so the network always sees the same array.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import IDENTITY, rotation, write_image
from model_factory import threshold_model_dir

from pantherseg.inference.io import Geometry
from pantherseg.inference.pipeline import Segmenter, segment_file
from pantherseg.inference.plan import Preprocessing, Resampling
from pantherseg.inference.preprocess import (
    axis_transpose,
    patient_axes,
    preprocess,
    restore,
    through_plane_axis,
)

SPACING_XYZ = (1.2, 1.2, 3.0)  # Task 1's anisotropy: thick slices along array z


def permuted_geometry(direction_xyz, spacing_xyz, order):
    """Direction and spacing of `array.transpose(order)` as the same physical image: the
    direction columns and spacings follow their array axes (ITK index axis j is array axis 2-j)."""
    matrix = np.asarray(direction_xyz, dtype=np.float64).reshape(3, 3)
    index_axes = [2 - order[2 - j] for j in range(3)]
    return tuple(matrix[:, index_axes].ravel()), tuple(spacing_xyz[j] for j in index_axes)


def tumor_phantom() -> np.ndarray:
    """Noise around 100 with an off-centre, asymmetric bright block (the threshold network's
    tumor), so that any transposition mistake moves the mask."""
    image = np.random.default_rng(3).normal(100, 5, (14, 36, 40)).astype(np.float32)
    image[3:8, 5:20, 22:35] = 400
    image[8:10, 5:9, 22:26] = 400
    return image


def test_patient_axes_follow_the_direction_cosines():
    assert patient_axes(IDENTITY) == (2, 1, 0)  # array z runs inferior-superior
    assert patient_axes(rotation((0, 0, 1), 20.0)) == (2, 1, 0)  # oblique in-plane
    assert patient_axes((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)) == (2, 1, 0)  # flips do not matter
    for order in itertools.permutations(range(3)):
        direction, _ = permuted_geometry(IDENTITY, SPACING_XYZ, order)
        assert patient_axes(direction) == tuple((2, 1, 0)[a] for a in order)
        assert axis_transpose(direction, (2, 1, 0)) == tuple(int(a) for a in np.argsort(order))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Segmenter:
    model = threshold_model_dir(tmp_path_factory.mktemp("model"), target_spacing_zyx=(3, 1.5, 1.5))
    return Segmenter.from_model_dir(model, device="cpu")


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("direction", [IDENTITY, rotation((0.3, -1, 0.4), 14.0)])
def test_one_physical_image_gets_one_mask_whatever_the_array_order(
    tmp_path: Path, segmenter: Segmenter, order, direction
):
    image = tumor_phantom()
    reference = write_image(
        tmp_path / "zyx.mha", image, spacing_xyz=SPACING_XYZ, direction=direction
    )
    permuted_direction, permuted_spacing = permuted_geometry(direction, SPACING_XYZ, order)
    permuted = write_image(
        tmp_path / "permuted.mha",
        np.ascontiguousarray(image.transpose(order)),
        spacing_xyz=permuted_spacing,
        direction=permuted_direction,
    )
    # The same voxels in the same places: a physical point maps to the same intensity.
    a, b = sitk.ReadImage(str(reference)), sitk.ReadImage(str(permuted))
    point = a.TransformIndexToPhysicalPoint((30, 9, 5))
    assert a[a.TransformPhysicalPointToIndex(point)] == b[b.TransformPhysicalPointToIndex(point)]

    expected = segment_file(segmenter, reference, tmp_path / "out" / "zyx.mha").mask
    got = segment_file(segmenter, permuted, tmp_path / "out" / "permuted.mha").mask
    assert expected.sum() > 100
    np.testing.assert_array_equal(got.transpose(np.argsort(order)), expected)
    written = sitk.ReadImage(str(tmp_path / "out" / "permuted.mha"))
    assert Geometry.of(written) == Geometry.of(b)


def test_a_tied_coarse_spacing_has_no_thick_axis():
    # (0.5, 2, 2): two axes share the coarsest spacing, so nothing is resampled on its own.
    assert through_plane_axis((0.5, 2.0, 2.0), (1.0, 1.0, 1.0), 3.0) is None
    assert through_plane_axis((2.0, 0.5, 2.0), (3.0, 1.0, 1.0), 3.0) is None
    # The image's grid decides when it is anisotropic, else the target's, on its own axes.
    assert through_plane_axis((3.0, 0.8, 0.8), (1.0, 1.0, 1.0), 3.0) == 0
    assert through_plane_axis((1.0, 1.0, 1.0), (1.0, 1.0, 4.0), 3.0) == 2
    assert through_plane_axis((1.0, 1.1, 1.0), (1.0, 1.0, 1.0), 3.0) is None


def test_a_tied_spacing_image_round_trips(tmp_path: Path, segmenter: Segmenter):
    image = np.random.default_rng(4).normal(100, 5, (40, 16, 18)).astype(np.float32)
    image[10:25, 4:10, 5:12] = 400
    path = write_image(tmp_path / "tied.mha", image, spacing_xyz=(2.0, 2.0, 0.5))
    result = segment_file(segmenter, path, tmp_path / "out.mha")
    written = sitk.ReadImage(str(tmp_path / "out.mha"))
    assert Geometry.of(written) == Geometry.of(sitk.ReadImage(str(path)))
    truth = image > 300
    overlap = 2 * (result.mask.astype(bool) & truth).sum() / (result.mask.sum() + truth.sum())
    assert overlap > 0.8


def test_restore_undoes_the_transpose():
    direction, spacing_xyz = permuted_geometry(IDENTITY, SPACING_XYZ, (2, 0, 1))
    image = np.zeros((9, 10, 11), np.float32)
    image[1:8, 2:9, 1:10] = np.random.default_rng(0).uniform(1, 2, (7, 7, 9))
    settings = Preprocessing(target_spacing_zyx=(3.0, 1.2, 1.2))
    data, record = preprocess(
        image, tuple(reversed(spacing_xyz)), settings, direction_xyz=direction
    )
    assert record.transpose == (1, 2, 0) and data.shape == (7, 9, 7)  # crop, transposed
    marker = np.zeros(record.resampled_shape, np.float32)
    marker[0, 0, 0] = 1.0  # the first voxel of the crop, in the plan's order
    back = restore(marker, record, Resampling(probability_order=0))
    assert back.shape == image.shape
    assert tuple(int(i) for i in np.argwhere(back == 1.0)[0]) == (1, 2, 1)
