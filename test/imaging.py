"""Building SimpleITK images with a chosen geometry, for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def make_image(
    array: np.ndarray,
    spacing_xyz=(1.25, 1.25, 3.0),
    origin=(10.0, -5.0, 2.0),
    direction=IDENTITY,
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def write_image(path: Path, array: np.ndarray, **geometry) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_image(array, **geometry), str(path), useCompression=True)
    return path


def rotation(axis, degrees: float) -> tuple[float, ...]:
    """An oblique direction matrix: a rotation about `axis`, row-major as SimpleITK wants."""
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    matrix = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple(matrix.ravel())


def phantom(shape=(12, 40, 44), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy body at about 100 with a bright block that model_factory's threshold network finds;
    the image and the block's mask."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, shape).astype(np.float32)
    truth = np.zeros(shape, dtype=bool)
    z, y, x = (max(1, s // 3) for s in shape)
    truth[z : 2 * z, y : 2 * y, x : 2 * x] = True
    image[truth] = 400
    return image, truth


def replace_label_value(path: Path, old: int, new: int) -> None:
    """Rewrites a label file with `old` voxels set to `new`, keeping its geometry: a broken
    ground truth for validation tests."""
    label = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(label)
    array[array == old] = new
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(label)
    sitk.WriteImage(changed, str(path))
