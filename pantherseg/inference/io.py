"""Reading images, describing their geometry, and naming cases.

Every error names the file and the problem, so that a user with hundreds of cases knows which one
to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pantherseg.inference.files import atomic_output

IMAGE_SUFFIXES = (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd")
SPACING_TOLERANCE_MM = 1e-4  # the evaluation rejects larger spacing differences
# nnU-Net and PANTHER name image files <case>_<channel>.ext; the only channel here is 0000.
CHANNEL_SUFFIX = "_0000"


class ImageError(ValueError):
    """An input image that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels are in space. Arrays are (z, y, x); SimpleITK's own order is kept
    for origin and direction so they can be copied back without conversion."""

    size_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction_xyz: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            size_zyx=tuple(int(s) for s in reversed(image.GetSize())),
            spacing_zyx=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin_xyz=tuple(float(o) for o in image.GetOrigin()),
            direction_xyz=tuple(float(d) for d in image.GetDirection()),
        )

    def differences(self, other: Geometry, spacing_tol: float = SPACING_TOLERANCE_MM) -> list[str]:
        """Human-readable differences that matter to the evaluation (size, spacing), then to
        display (origin, direction); empty when the grids agree."""
        problems = []
        if self.size_zyx != other.size_zyx:
            problems.append(f"size (z, y, x) {other.size_zyx} != {self.size_zyx}")
        if not np.allclose(self.spacing_zyx, other.spacing_zyx, rtol=0, atol=spacing_tol):
            problems.append(f"spacing (z, y, x) {other.spacing_zyx} != {self.spacing_zyx}")
        if not np.allclose(self.origin_xyz, other.origin_xyz, rtol=0, atol=1e-3):
            problems.append(f"origin {other.origin_xyz} != {self.origin_xyz}")
        if not np.allclose(self.direction_xyz, other.direction_xyz, rtol=0, atol=1e-5):
            problems.append("direction cosines differ")
        return problems


def strip_image_suffix(name: str) -> str | None:
    """The file name without its image extension, or None when it is not an image file name."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem. Two files with one stem (a.mha and a.nii.gz) are an error
    because either could be the one meant."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = strip_image_suffix(path.name)
        if stem is None or not path.is_file():
            continue
        if stem in found:
            raise ImageError(
                f"{folder}: two images for case {stem!r}: {found[stem].name}, {path.name}"
            )
        found[stem] = path
    return found


def read_image(path: Path) -> sitk.Image:
    """A 3D single-component image, or an ImageError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageError(f"{path}: cannot be read as an image ({reason})") from None
    if image.GetDimension() != 3:
        raise ImageError(f"{path}: expected a 3D image, found {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{path}: expected one value per voxel, found {image.GetNumberOfComponentsPerPixel()}"
        )
    return image


MAX_VOXELS = 1024**3 // 2  # a 512 Mi-voxel volume is far beyond any abdominal MRI
MAX_AXIS = 4096


def check_inference_image(image: sitk.Image, path: Path) -> np.ndarray:
    """The image's voxels as float32 (z, y, x), after checking the image is one a model can
    segment: sane size and spacing, an orthonormal direction, finite and non-constant values."""
    size = image.GetSize()
    if any(s < 2 for s in size) or any(s > MAX_AXIS for s in size):
        raise ImageError(f"{path}: image size {size} is outside 2..{MAX_AXIS} voxels per axis")
    if int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise ImageError(f"{path}: image of {size} voxels is too large")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(f"{path}: spacing {tuple(spacing)} must be positive and finite")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ImageError(f"{path}: direction cosines are not orthonormal: {direction.tolist()}")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise ImageError(f"{path}: origin {image.GetOrigin()} is not finite")
    array = sitk.GetArrayFromImage(image)
    if np.iscomplexobj(array):
        raise ImageError(f"{path}: complex pixel type {image.GetPixelIDTypeAsString()}")
    data = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ImageError(f"{path}: {bad} voxels are NaN or infinite")
    if float(data.min()) == float(data.max()):
        raise ImageError(f"{path}: the image is constant ({float(data.min())}): nothing to segment")
    return data


def write_mask(mask: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    """Writes a uint8 {0, 1} mask on the reference image's grid, compressed and atomically.

    The geometry is copied from the reference and checked again on the written image, because a
    mask on any other grid is rejected by the evaluation.
    """
    path = Path(path)
    if mask.dtype != np.uint8 or not set(np.unique(mask).tolist()) <= {0, 1}:
        raise ValueError(f"{path}: a mask must be uint8 with values 0 and 1")
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(reference)
    differences = Geometry.of(reference).differences(Geometry.of(out), spacing_tol=0.0)
    if differences:
        raise ValueError(f"{path}: mask geometry differs from the input: {'; '.join(differences)}")
    with atomic_output(path) as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)
    return path
