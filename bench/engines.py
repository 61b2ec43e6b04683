"""Seconds per tile of each CPU engine (onnxruntime, OpenVINO) on ONNX networks, and how far apart
their logits are: what `engines.load_engine`'s choice of OpenVINO on the CPU rests on.

Random tiles of the network's patch (or `--patch` where the file leaves it dynamic); each engine
runs one untimed batch, then the best of `--repeats` timed ones.

    python -m bench.engines                                  # the shipped Task 1 model's fold 0
    python -m bench.engines work/model/fold_0.onnx --threads 2   # e.g. bench.nnunet --keep work/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from pantherseg.inference.engines import Engine, OnnxEngine, OpenVinoEngine
from pantherseg.inference.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "task1"


def best_seconds(engine: Engine, batch: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """The fastest of `repeats` runs after one untimed run, and the logits."""
    logits = engine(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine(batch)
        times.append(time.perf_counter() - start)
    return min(times), logits


def default_networks() -> list[tuple[Path, tuple[int, int, int]]]:
    """Fold 0 of each stage of the shipped Task 1 model, with its plan's patch."""
    plan = load_plan(DEFAULT_MODEL)
    stages = [plan.inference] + ([plan.localiser.inference] if plan.localiser else [])
    return [(DEFAULT_MODEL / s.folds[0].file, s.patch_size_zyx) for s in stages]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="*", help="ONNX files (default: the demo's)")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: the engines' own")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    networks = [(path, tuple(args.patch) if args.patch else None) for path in args.models]
    rng = np.random.default_rng(0)
    print("| network | tile | onnxruntime s | OpenVINO s | speed-up | max logit difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path, patch in networks or default_networks():
        ours = OnnxEngine(path, device="cpu", threads=args.threads)
        other = OpenVinoEngine(path, threads=args.threads)
        patch = patch or ours.patch_size
        if patch is None:
            parser.error(f"{path}: the patch is dynamic; give --patch")
        batch = rng.normal(size=(args.batch, ours.in_channels, *patch)).astype(np.float32)
        ort_s, ort_logits = best_seconds(ours, batch, args.repeats)
        ov_s, ov_logits = best_seconds(other, batch, args.repeats)
        relative = np.abs(ov_logits - ort_logits).max() / max(1.0, np.abs(ort_logits).max())
        tile = f"{args.batch} x {' x '.join(map(str, patch))}"
        print(
            f"| {path} | {tile} | {ort_s:.3f} | {ov_s:.3f} | {ort_s / ov_s:.2f}x | "
            f"{relative:.1e} of the largest |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
