"""Phantom generation speed: seconds to generate and to write one case per grid size.

Run: python -m bench.synth [--seed N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from pantherseg.phantoms.synthetic import generate_case

CASES = [
    # (row name, task, size, forced shape (z, y, x))
    ("small", "task1", "small", None),
    ("median 72x258x318", "task1", "full", (72, 258, 318)),
    ("largest 88x466x570", "task1", "full", (88, 466, 570)),
    ("task2 full (drawn)", "task2", "full", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  seed: {args.seed}")
    header = f"{'case':<22} {'shape (z, y, x)':<16} {'generate s':>10} {'write s':>8} {'MB':>6}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, task, size, shape in CASES:
            runs = []
            for _ in range(5 if size == "small" else 1):  # small: median of 5 (first call warms up)
                start = time.perf_counter()
                phantom = generate_case(args.seed, task, size, shape_zyx=shape)
                runs.append(time.perf_counter() - start)
            gen = statistics.median(runs)
            start = time.perf_counter()
            image_path = Path(tmp) / "image.mha"
            sitk.WriteImage(phantom.image, str(image_path), useCompression=True)
            sitk.WriteImage(phantom.label, str(Path(tmp) / "label.mha"), useCompression=True)
            write = time.perf_counter() - start
            mb = image_path.stat().st_size / 1e6
            dims = "x".join(str(v) for v in phantom.info["shape_zyx"])
            print(f"{name:<22} {dims:<16} {gen:>10.2f} {write:>8.2f} {mb:>6.1f}")


if __name__ == "__main__":
    main()
