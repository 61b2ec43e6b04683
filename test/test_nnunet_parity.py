"""An imported nnU-Net v2 model gives nnU-Net's own masks: `python -m training import-nnunet`
then `process.py` (with each CPU engine: OpenVINO and onnxruntime), against `nnUNetPredictor` on
the same images.

Two real plans, shrunk to run on a CPU (test/nnunet_models.py): the PANTHER organisers' baseline
(3d_fullres, 3 x 1.1875 x 1.1875 mm, PlainConvUNet, two folds, mirroring) and a ResEnc-L plan at
1 mm isotropic like the winner's (ResidualEncoderUNet, configuration 3d_fullres_iso1x1x1
inheriting 3d_fullres, mirroring switched off at import as the winner ran it). Images of odd sizes
whose spacing needs resampling, with thick and very thick slices, oblique and flipped directions.
nnU-Net ignores the direction cosines and so does an imported plan (its fixed transpose).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from imaging import rotation, write_image
from nnunet_models import (
    BASELINE_PLANS,
    RESENC_PLANS,
    bare_cpu_predictor,
    cpu_predictor,
    shrunk_plans,
    trained_folder,
)

import process
from pantherseg.inference.pipeline import Segmenter
from pantherseg.inference.plan import load_plan
from training.__main__ import main as training_main

SOCKET = Path("images") / "abdominal-t1-mri"
OUTPUT = Path("images") / "pancreatic-tumor-segmentation"
FLIPPED = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
IMAGES = {
    # (z, y, x) shape, spacing (x, y, z), direction
    "odd sizes, thick slices": ((13, 41, 47), (1.3, 1.1, 3.5), rotation((0.2, -1, 0.4), 12.0)),
    "very thick slices, flipped": ((9, 36, 38), (0.9, 0.95, 4.5), FLIPPED),
    "near the plan's grid": ((21, 30, 33), (1.2, 1.2, 3.0), rotation((1, 1, 0), -25.0)),
}
MODELS = {
    "baseline": (BASELINE_PLANS, "3d_fullres", [16, 48, 64], (0, 1), True),
    "resenc-l iso 1 mm": (RESENC_PLANS, "3d_fullres_iso1x1x1", [32, 32, 32], (0,), False),
}
MIN_AGREEMENT = 0.9995


def scene(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Noise with a few bright and dark blocks: structure for the random network to react to."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 25, shape).astype(np.float32)
    z, y, x = shape
    image[z // 4 : 3 * z // 4, y // 3 : 2 * y // 3, x // 4 : x // 2] += 180
    image[: z // 2, : y // 4, 2 * x // 3 :] -= 60
    return image


@pytest.fixture(scope="module", params=list(MODELS))
def models(request, tmp_path_factory):
    """The nnU-Net trained folder, nnU-Net's predictor on it, and our imported model folder."""
    source, configuration, patch, folds, mirroring = MODELS[request.param]
    root = tmp_path_factory.mktemp("nnunet")
    plans = shrunk_plans(source, configuration, patch)
    folder = trained_folder(root / "results", plans, configuration, folds=folds)
    predictor = cpu_predictor(folder, folds, mirroring)
    model = root / "model"
    argv = ["import-nnunet", str(folder), "--out", str(model), "--folds", *map(str, folds)]
    assert training_main([*argv, *([] if mirroring else ["--no-mirroring"])]) == 0
    return predictor, model


@pytest.mark.parametrize("cpu_engine", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_process_py_reproduces_nnunets_masks(models, name, cpu_engine, tmp_path):
    predictor, model = models
    shape, spacing_xyz, direction = IMAGES[name]
    image = scene(shape, seed=len(name))
    path = write_image(
        tmp_path / "input" / SOCKET / "case.mha",
        image,
        spacing_xyz=spacing_xyz,
        direction=direction,
    )
    # nnU-Net's SimpleITK reader gives this array and this (z, y, x) spacing.
    read = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(read).astype(np.float32)
    spacing_zyx = list(reversed(read.GetSpacing()))
    theirs, probabilities = predictor.predict_single_npy_array(
        array[None], {"spacing": spacing_zyx}, None, None, True
    )
    tumor = theirs == 1
    assert 0.02 < tumor.mean() < 0.9, "the network must predict tumor somewhere, not everywhere"

    out = tmp_path / "output"
    argv = ["--input", str(tmp_path / "input"), "--output", str(out), "--model", str(model)]
    assert process.main([*argv, "--device", "cpu", "--cpu-engine", cpu_engine]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUT / "case.mha"))).astype(bool)
    agreement = (ours == tumor).mean()
    assert agreement >= MIN_AGREEMENT, f"{agreement:.5f} of voxels agree"

    segmenter = Segmenter.from_model_dir(model, device="cpu", cpu_engine=cpu_engine)
    ours_p = segmenter.probabilities(array, spacing_zyx, read.GetDirection())
    assert np.abs(ours_p["tumor"] - probabilities[1]).max() < 0.02
    assert np.abs(ours_p["pancreas"] - probabilities[2]).max() < 0.02


def test_the_import_carries_nnunets_inference_settings(models):
    _, model = models
    plan = load_plan(model)
    assert plan.preprocessing.fixed_transpose == (0, 1, 2)
    assert plan.inference.stitching == "nnunet" and plan.inference.restore == "logits"
    assert plan.postprocessing.decision == "argmax"
    assert plan.inference.classes == ("background", "tumor", "pancreas")
    assert plan.inference.mirror_axes == (0, 1, 2)


@pytest.mark.parametrize(
    "patch, sigma_scale",
    [((48, 192, 224), 1 / 8), ((40, 56, 64), 1 / 8), ((17, 33, 8), 0.3), ((2, 1, 9), 0.05)],
)
def test_tile_weights_are_nnunets_bit_for_bit(patch, sigma_scale):
    """nnU-Net's Gaussian, computed here from separable profiles, equals its predictor's own map
    (the baseline's patch, the localiser's, and odd ones)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    from pantherseg.inference.sliding_window import nnunet_gaussian

    theirs = compute_gaussian(patch, sigma_scale, 10, torch.float16, torch.device("cpu")).numpy()
    ours = nnunet_gaussian(patch, sigma_scale)
    assert ours.dtype == np.float16 and ours.shape == patch
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


class _NumpyNetwork(torch.nn.Module):
    """A numpy function as a torch module, so that nnU-Net's predictor and ours stitch the very
    same tile logits and any difference is the stitching's."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.function(x.numpy()))


def _tile_logits(batch: np.ndarray) -> np.ndarray:
    """Three classes that depend on the voxel and on its place in the tile (a misplaced tile
    shows), one of them tiny: where nnU-Net's Gaussian is small too, the float16 sums are
    subnormal, the case a fast float16 rounding could get wrong."""
    x = batch[:, 0]
    z, y, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in x.shape[1:]), indexing="ij")
    logits = [3 * x + 5 * z, np.sin(2 * x) - 4 * y * w, 1e-4 * (x + w)]
    return np.stack(logits, axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "shape, patch",
    [((13, 41, 47), (8, 16, 24)), ((5, 30, 9), (8, 16, 12)), ((20, 20, 20), (20, 20, 20))],
)
def test_nnunet_stitching_is_nnunets_bit_for_bit(shape, patch):
    """`stitching="nnunet"` gives nnU-Net's sliding-window logits exactly: its tile places, its
    Gaussian, its float16 sums and quotient (odd sizes, padding, a single tile)."""
    from types import SimpleNamespace

    from pantherseg.inference.sliding_window import sliding_window_predict

    predictor = bare_cpu_predictor(mirroring=False)
    predictor.network = _NumpyNetwork(_tile_logits)
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=3)
    predictor.allowed_mirroring_axes = None
    volume = np.random.default_rng(sum(shape)).normal(size=(1, *shape)).astype(np.float32)

    theirs = predictor.predict_sliding_window_return_logits(torch.from_numpy(volume))
    ours = sliding_window_predict(volume, _tile_logits, patch, stitching="nnunet")
    assert theirs.dtype == torch.float16 and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.float().numpy())
    assert (np.abs(ours[2]) < 2**-14).any(), "some sums must be float16 subnormals"
