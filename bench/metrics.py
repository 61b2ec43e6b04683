"""How long scoring one full-size Task 1 case takes, against the reference package.

Prints seconds per case for three predictions on the largest Task 1 grid (88 x 466 x 570): a good
one, one with scattered false positives over the whole volume (the slow case, since the bounding
box of both masks becomes the whole image), and file reading plus scoring through
`evaluate.score_pair`.

    python -m bench.metrics [--no-reference]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pantherseg.scoring import evaluate, metrics

SHAPE = (88, 466, 570)
SPACING = (3.0, 1.1875, 1.1875)


def tumor(shape, centre, radius_mm, spacing, rng) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt(
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    )
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 40
    return r < radius_mm + wobble


def timed(function, *args, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-reference", action="store_true", help="skip the reference package")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    gt = tumor(SHAPE, (44, 230, 290), 17.0, SPACING, rng)
    good = ndimage.binary_dilation(tumor(SHAPE, (45, 232, 288), 16.0, SPACING, rng))
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), 1.5)
    scattered = good | (noise > np.quantile(noise, 0.995))
    print(f"grid {SHAPE}, spacing {SPACING} mm; tumor {gt.sum() * np.prod(SPACING) / 1000:.1f} mL")
    print(f"scattered prediction: {scattered.mean() * 100:.1f} % of voxels")
    rows = []
    for name, pred in (("good prediction", good), ("scattered false positives", scattered)):
        ours = timed(metrics.score_case, gt, pred, SPACING)
        reference = float("nan")
        if not args.no_reference:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
            from reference_metrics import reference_scores

            reference = timed(reference_scores, gt, pred, SPACING, repeats=1)
        rows.append((name, ours, reference))
    with tempfile.TemporaryDirectory() as tmp:
        for array, file_name in ((gt, "gt.mha"), (good, "pred.mha")):
            image = sitk.GetImageFromArray(array.astype(np.uint8))
            image.SetSpacing(SPACING[::-1])
            sitk.WriteImage(image, str(Path(tmp) / file_name), useCompression=True)
        files = ("case", Path(tmp) / "gt.mha", Path(tmp) / "pred.mha")
        rows.append(("read both files + score (good)", timed(evaluate.score_pair, *files), None))
    print(f"\n{'case':<34}{'pantherseg s':>14}{'reference s':>14}")
    for name, ours, reference in rows:
        ref = "" if reference is None else f"{reference:.2f}"
        print(f"{name:<34}{ours:>14.2f}{ref:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
