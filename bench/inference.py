"""Per-case inference time by stage and peak memory, on the median and the largest Task 1 grid.

The network is the training package's default (attention U-Net, 32 base features) exported to
ONNX with random weights (timing does not depend on the weights), planned at the PANTHER Task 1
spacing. Each configuration runs in a fresh process that imports only pantherseg (as the
container does), so its peak RSS is the container's.

    python -m bench.inference                 # 1 fold, no TTA, both grids, CPU
    python -m bench.inference --ensemble 5    # also 5 folds with 8-fold mirroring
    python -m bench.inference --device cuda   # onnxruntime-gpu, where installed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pantherseg.inference.plan import Plan

GRIDS = {"median": (72, 258, 318), "largest": (88, 466, 570)}
SPACING_ZYX = (3.0, 1.1875, 1.1875)
PATCH = (48, 192, 224)  # what the organisers' nnU-Net plan chose for this spacing
# Task 2 (T2 MR-Linac): 2.0 x 1.0 x 1.0 mm (CONTRACT.md); real grid sizes are not published, so
# these are the phantoms' Task 2 protocol (170-240 mm of slices, 300-360 x 380-450 mm in-plane).
TASK2_GRIDS = {"median": (102, 330, 415), "largest": (120, 360, 450)}
TASK2_SPACING_ZYX = (2.0, 1.0, 1.0)


def at_spacing(plan: Plan, spacing_zyx: Sequence[float]) -> Plan:
    """The plan with its network grid at `spacing_zyx`: the Task 1 baseline's plan standing in for
    a Task 2 one (no Task 2 nnU-Net plan is public), so a case at that spacing is not resampled."""
    spacing = tuple(float(v) for v in spacing_zyx)
    preprocessing = dataclasses.replace(plan.preprocessing, target_spacing_zyx=spacing)
    return dataclasses.replace(plan, preprocessing=preprocessing)


def build_model(model_dir: Path, folds: int, mirror: bool) -> None:
    """Exports the default network (random weights) `folds` times and writes a plan."""
    import torch

    from pantherseg.inference.plan import (
        FoldWeights,
        Inference,
        Plan,
        Preprocessing,
        save_plan,
        sha256_of,
    )
    from training.config import load_config
    from training.export import export_onnx
    from training.networks import build_network

    config = load_config()
    plan = Plan(
        task="task1",
        preprocessing=Preprocessing(target_spacing_zyx=SPACING_ZYX),
        inference=Inference(
            patch_size_zyx=PATCH,
            folds=(),
            mirror_axes=(0, 1, 2),
            test_time_mirroring=mirror,
        ),
    )
    torch.manual_seed(0)
    network = build_network(config.network, plan).eval()
    parameters = sum(p.numel() for p in network.parameters())
    first = export_onnx(network, plan, model_dir / "fold_0.onnx", config.export.opset)
    files = [first]
    for k in range(1, folds):  # identical weights cost the same time as trained ones
        copy = model_dir / f"fold_{k}.onnx"
        copy.write_bytes(first.read_bytes())
        files.append(copy)
    folds_ = tuple(FoldWeights(f.name, sha256_of(f)) for f in files)
    save_plan(
        dataclasses.replace(plan, inference=dataclasses.replace(plan.inference, folds=folds_)),
        model_dir,
    )
    print(
        f"network: {config.network.name}, {config.network.base_features} base features, "
        f"{parameters / 1e6:.1f} M parameters, patch {PATCH}"
    )


CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np, SimpleITK as sitk
from pantherseg.inference.pipeline import Segmenter, segment_file
model, image_path, out, device = sys.argv[1:5]
start = time.perf_counter()
segmenter = Segmenter.from_model_dir(Path(model), device=device)
load = time.perf_counter() - start
result = segment_file(segmenter, Path(image_path), Path(out))
# VmHWM: this process's own peak. ru_maxrss would include the parent's peak at fork time,
# which Linux carries across exec (here: the parent that loaded torch to export the network).
status = Path("/proc/self/status").read_text()
peak = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))) / 1024**2
print(json.dumps({"load": load, **result.timings.seconds, "peak_gib": peak,
                  "provider": segmenter.description}))
"""


def make_case(path: Path, shape: tuple[int, int, int]) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    image = rng.normal(200, 60, shape).clip(0).astype(np.int16)
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing(SPACING_ZYX[::-1])
    sitk.WriteImage(itk, str(path), useCompression=True)


def run(model_dir: Path, image: Path, out: Path, device: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(image), str(out), device],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["end_to_end"] = time.perf_counter() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=0,
        help="also time this many folds with mirroring (default: skip)",
    )
    parser.add_argument("--grids", nargs="+", choices=list(GRIDS), default=list(GRIDS))
    args = parser.parse_args()
    configs = [("1 fold, no TTA", 1, False)]
    if args.ensemble:
        configs.append((f"{args.ensemble} folds + 8x TTA", args.ensemble, True))
    stages = ["load", "read", "preprocess", "network", "restore", "postprocess", "write"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, shape in GRIDS.items():
            if name in args.grids:
                make_case(tmp / f"{name}.mha", shape)
        for label, folds, mirror in configs:
            model_dir = tmp / f"model_{folds}_{mirror}"
            build_model(model_dir, folds, mirror)
            for name in args.grids:
                figures = run(model_dir, tmp / f"{name}.mha", tmp / f"out_{name}.mha", args.device)
                rows.append((f"{name} {GRIDS[name]}", label, figures))
    print(f"\ndevice {args.device}; seconds per stage; peak RSS of the inference process")
    header = f"{'grid':<26}{'configuration':<22}" + "".join(f"{s:>12}" for s in stages)
    header += f"{'total':>10}{'peak GiB':>10}"
    print(header)
    print("-" * len(header))
    for grid, label, f in rows:
        cells = "".join(f"{f.get(s, 0.0):>12.2f}" for s in stages)
        print(f"{grid:<26}{label:<22}{cells}{f['end_to_end']:>10.1f}{f['peak_gib']:>10.2f}")
    print(f"\nexecution provider: {rows[0][2]['provider']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
