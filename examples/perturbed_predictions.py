"""Writes stand-in "predictions" made by perturbing phantom tumor labels, for demonstrating the
evaluation before a trained model exists.

Three methods, each a folder of masks named like container outputs (`<case>_0000.mha`):
`exact` (the tumor label itself), `eroded` (one voxel thinner) and `shifted` (moved two voxels
in-plane). Their scores show how the metrics react; they say nothing about a model.

    python examples/perturbed_predictions.py PHANTOM_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pantherseg.inference.io import list_images, read_image


def eroded(tumor: np.ndarray) -> np.ndarray:
    thinner = ndimage.binary_erosion(tumor)
    return thinner if thinner.any() else tumor  # a tiny tumor would vanish


PERTURBATIONS = {
    "exact": lambda tumor: tumor,
    "eroded": eroded,
    "shifted": lambda tumor: np.roll(tumor, 2, axis=2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phantoms", type=Path, help="folder with LabelsTr/ from pantherseg synth")
    parser.add_argument("out", type=Path, help="folder for one sub-folder per perturbation")
    args = parser.parse_args()
    labels = list_images(args.phantoms / "LabelsTr")
    for case_id, path in labels.items():
        label = read_image(path)
        tumor = sitk.GetArrayFromImage(label) == 1
        for name, perturb in PERTURBATIONS.items():
            mask = sitk.GetImageFromArray(perturb(tumor).astype(np.uint8))
            mask.CopyInformation(label)
            (args.out / name).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(mask, str(args.out / name / f"{case_id}_0000.mha"), True)
    print(f"wrote {len(labels)} cases x {len(PERTURBATIONS)} perturbations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
