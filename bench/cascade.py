"""Two-stage (localiser, then region network in its box) against single-stage inference, CPU.

The two-stage issue promises that running the full-resolution network only around the pancreas
makes a median Task 1 case take <= 30 s end to end within 3 GiB, and the largest <= 60 s. This
measures both paths through pantherseg's `Segmenter` on a synthetic phantom (image, tumor and
pancreas labels) at the plan's spacing, 1 fold, no mirroring, ONNX Runtime on the CPU:

- region network: the organisers' baseline plan (3d_fullres PlainConvUNet, patch 48 x 192 x 224,
  about 30 M parameters), translated by `training.nnunet_import`, exported with random weights;
- localiser: a small PlainConvUNet (4 stages, 16 features first) on a 4 mm grid with a patch that
  covers the median image, softmax over background, tumor and pancreas, random weights.

Random weights cannot localise, so the region stage is timed on the box a working localiser
would give: the phantom's TRUE pancreas + tumor box grown by the 30 mm margin (`grown_box`). The
localiser (preprocess, network, box step) still runs on the same image in the same process, and
is timed on its own stages; the box it finds with random weights is recorded and then replaced
by the true one. Timing does not depend on the weights; the box's size does, so the figures hold
for a localiser whose box is as tight as the truth plus the margin.

Task 2 (`--task task2`): the same two networks on Task 2's 2.0 x 1.0 x 1.0 mm spacing (CONTRACT.md);
no Task 2 nnU-Net plan is public here, so the Task 1 baseline's network and patch stand in for its
region network, and its grids are those of the phantoms' Task 2 protocol (170-240 mm of 2 mm
slices, field of view 300-360 x 380-450 mm at 1 mm): real Task 2 grid sizes are not published.

Each variant runs once in a fresh interpreter (`bench.nnunet.run_child`): its peak RSS is that
process's own VmHWM. End to end is the image in memory to the mask in memory (every stage the
`Segmenter` times); interpreter start, model load and reading the file are reported apart and
excluded, and no mask file is written.

    python -m bench.cascade                          # median grid, threads = usable cores
    python -m bench.cascade --grid largest --json largest.json
    python -m bench.cascade --task task2 --grid largest   # Task 2 (T2 MR-Linac) geometry
    python -m bench.cascade --shape 32 96 112 --region-patch 16 64 64 --features 2 \\
        --localiser-features 4 --localiser-patch 16 32 32      # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.inference import GRIDS, SPACING_ZYX, TASK2_GRIDS, TASK2_SPACING_ZYX, at_spacing
from bench.nnunet import run_child

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = "3d_fullres"
LABELS = {"background": 0, "tumor": 1, "pancreas": 2}
LOCALISER_STAGES = 4
REGION_WEIGHTS = "fold_0.onnx"
LOCALISER_WEIGHTS = "localiser_fold_0.onnx"
VARIANTS = ("single", "cascade")
# From the two-stage issue: end-to-end seconds and peak RSS (GiB) of the two-stage path on Task 1's
# grids; Task 2 has no such targets.
TARGETS: dict[str, dict[str, float]] = {
    "median": {"end_to_end_s": 30.0, "peak_gib": 3.0},
    "largest": {"end_to_end_s": 60.0},
}


@dataclasses.dataclass(frozen=True)
class TaskGeometry:
    """A task's spacing (the phantom is written at the region network's own spacing, so that it
    does not resample), its named grids and the localiser patch that covers the median one on
    the 4 mm grid."""

    spacing_zyx: tuple[float, float, float]
    grids: dict[str, tuple[int, int, int]]
    localiser_patch: tuple[int, int, int]


GEOMETRY = {
    "task1": TaskGeometry(SPACING_ZYX, GRIDS, (56, 80, 96)),
    "task2": TaskGeometry(TASK2_SPACING_ZYX, TASK2_GRIDS, (56, 96, 112)),
}
BOX_NOTE = (
    "box: true pancreas + {margin:g} mm margin, localiser timed separately with random weights"
)
STAGE_ORDER = (
    "localiser preprocess",
    "localiser network",
    "localiser box",
    "preprocess",
    "network",
    "restore",
    "postprocess",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The networks' sizes: the real ones by default, tiny ones for a test."""

    region_patch: tuple[int, int, int] = (48, 192, 224)
    features: int = 32  # the region network's first stage; the baseline doubles to 320
    localiser_patch: tuple[int, int, int] = GEOMETRY["task1"].localiser_patch
    localiser_features: int = 16
    localiser_spacing_mm: float = 4.0
    margin_mm: float = 30.0


# ---------------------------------------------------------------- phantom and the true box


def write_phantom(
    folder: Path, shape: tuple[int, int, int], seed: int, task: str = "task1"
) -> dict[str, Any]:
    """A synthetic case of the task on the plan's own spacing (so the region network does not
    resample, as in bench.nnunet), written as image.mha and label.mha; its pancreas + tumor box in
    voxels."""
    import SimpleITK as sitk

    from pantherseg.phantoms.synthetic import PANCREAS, TUMOR, generate_case

    phantom = generate_case(seed, task, shape_zyx=shape, direction="lps")
    folder.mkdir(parents=True, exist_ok=True)
    for name, itk in (("image", phantom.image), ("label", phantom.label)):
        itk.SetSpacing(GEOMETRY[task].spacing_zyx[::-1])
        sitk.WriteImage(itk, str(folder / f"{name}.mha"), useCompression=True)
    label = sitk.GetArrayFromImage(phantom.label)
    return {
        "seed": seed,
        "box": foreground_box(label > 0),
        "tumor_voxels": int((label == TUMOR).sum()),
        "pancreas_voxels": int((label == PANCREAS).sum()),
        "image_shape": list(label.shape),
    }


def foreground_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and stop per axis of the mask's bounding box (the phantom always has a pancreas)."""
    import numpy as np

    hits = np.argwhere(mask)
    if hits.size == 0:
        raise ValueError("the phantom has no pancreas or tumor voxels")
    return tuple(int(v) for v in hits.min(axis=0)), tuple(int(v) + 1 for v in hits.max(axis=0))


def box_figures(box: Sequence[Sequence[int]], shape: Sequence[int]) -> dict[str, Any]:
    """The box's size in voxels and its share of the image's voxels."""
    size = [int(b - a) for a, b in zip(*box, strict=True)]
    return {
        "start": list(box[0]),
        "stop": list(box[1]),
        "size": size,
        "share": math.prod(size) / math.prod(shape),
    }


# ---------------------------------------------------------------- models


def architectures(sizes: Sizes) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The baseline plans (with the region network's features scaled when asked), and the region
    and localiser architecture sections: the localiser is the baseline's kind of network with
    `LOCALISER_STAGES` isotropic stages, so the two differ in size only."""
    sys.path.insert(0, str(ROOT / "test"))
    from nnunet_models import BASELINE_PLANS

    plans = json.loads(BASELINE_PLANS.read_text(encoding="utf-8"))
    plans.pop("README", None)  # the organisers' file carries a note nnU-Net does not expect
    configuration = plans["configurations"][CONFIGURATION]
    configuration["patch_size"] = list(sizes.region_patch)
    region = configuration["architecture"]
    kwargs = region["arch_kwargs"]
    kwargs["features_per_stage"] = [
        min(sizes.features * 2**i, 10 * sizes.features) for i in range(kwargs["n_stages"])
    ]  # 32 gives the baseline's 32, 64, 128, 256, 320, 320
    localiser = copy.deepcopy(region)
    stages = LOCALISER_STAGES
    localiser["arch_kwargs"].update(
        n_stages=stages,
        features_per_stage=[sizes.localiser_features * 2**i for i in range(stages)],
        kernel_sizes=[[3, 3, 3]] * stages,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
        n_conv_per_stage=[2] * stages,
        n_conv_per_stage_decoder=[2] * (stages - 1),
    )
    return plans, region, localiser


def downsampling(architecture: dict[str, Any]) -> tuple[int, int, int]:
    """How much the network shrinks each axis: a patch must be a multiple of it."""
    total = [1, 1, 1]
    for stride in architecture["arch_kwargs"]["strides"]:
        total = [t * s for t, s in zip(total, stride, strict=True)]
    return tuple(total)


def build_models(
    work: Path, sizes: Sizes, threads: int, spacing_zyx: Sequence[float] = SPACING_ZYX
) -> dict[str, Any]:
    """`work/single` (the region network alone, as today) and `work/cascade` (the same network
    with a localiser section), the region network at `spacing_zyx`: random weights, exported to
    ONNX; returns the model figures."""
    import torch

    from pantherseg.inference.plan import (
        FoldWeights,
        Inference,
        Localiser,
        Preprocessing,
        save_plan,
        sha256_of,
    )
    from training.config import ExportConfig
    from training.export import export_onnx
    from training.nnunet_import import (
        ImportOptions,
        build_network,
        resolve_configuration,
        translate_plan,
    )

    sys.path.insert(0, str(ROOT / "test"))
    from nnunet_models import BASELINE_PLANS

    plans, region_arch, localiser_arch = architectures(sizes)
    configuration = resolve_configuration(plans, CONFIGURATION, BASELINE_PLANS)
    dataset = {"channel_names": {"0": "MRI"}, "labels": LABELS, "file_ending": ".mha"}
    options = ImportOptions(test_time_mirroring=False)
    plan = translate_plan(
        plans, configuration, CONFIGURATION, dataset, options, BASELINE_PLANS.parent
    )
    plan = at_spacing(plan, spacing_zyx)
    localiser_inference = Inference(
        patch_size_zyx=sizes.localiser_patch,
        folds=(),
        batch_size=1,
        activation="softmax",
        classes=tuple(LABELS),
    )
    spacing = (sizes.localiser_spacing_mm,) * 3
    localiser_preprocessing = Preprocessing(target_spacing_zyx=spacing)
    single, cascade = work / "single", work / "cascade"
    single.mkdir(parents=True, exist_ok=True)
    cascade.mkdir(parents=True, exist_ok=True)
    opset = ExportConfig().opset
    parameters = {}
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        # nnU-Net's InstanceNorm tracks no running statistics, so torch's remark is moot here.
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        for name, architecture, stage_plan, path in (
            ("region", region_arch, plan, single / REGION_WEIGHTS),
            (
                "localiser",
                localiser_arch,
                dataclasses.replace(plan, inference=localiser_inference),
                cascade / LOCALISER_WEIGHTS,
            ),
        ):
            network = build_network(architecture, 1, len(LABELS), BASELINE_PLANS)
            parameters[name] = sum(p.numel() for p in network.parameters())
            export_onnx(network, stage_plan, path, opset)
            del network
    link(single / REGION_WEIGHTS, cascade / REGION_WEIGHTS)
    region_folds = (FoldWeights(REGION_WEIGHTS, sha256_of(single / REGION_WEIGHTS)),)
    plan = dataclasses.replace(
        plan, inference=dataclasses.replace(plan.inference, folds=region_folds)
    )
    save_plan(plan, single)
    localiser_folds = (FoldWeights(LOCALISER_WEIGHTS, sha256_of(cascade / LOCALISER_WEIGHTS)),)
    localiser = Localiser(
        localiser_preprocessing,
        dataclasses.replace(localiser_inference, folds=localiser_folds),
        margin_mm=sizes.margin_mm,
    )
    save_plan(dataclasses.replace(plan, localiser=localiser), cascade)
    return {
        "region": {
            "network": "baseline plans 3d_fullres PlainConvUNet",
            "parameters": parameters["region"],
            "patch_zyx": list(sizes.region_patch),
            "features_per_stage": region_arch["arch_kwargs"]["features_per_stage"],
            "stitching": plan.inference.stitching,
        },
        "localiser": {
            "network": f"PlainConvUNet, {LOCALISER_STAGES} stages",
            "parameters": parameters["localiser"],
            "patch_zyx": list(sizes.localiser_patch),
            "features_per_stage": localiser_arch["arch_kwargs"]["features_per_stage"],
            "spacing_mm": sizes.localiser_spacing_mm,
            "classes": list(LABELS),
        },
    }


def link(source: Path, target: Path) -> None:
    """A second name for one weight file (a copy where hard links are not allowed)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


# ---------------------------------------------------------------- the child: one variant


def child(
    variant: str, model: Path, image_path: Path, report: Path, box: list[int], threads: int
) -> None:
    """One variant in this (fresh) process: load, read, segment in memory; figures to `report`.
    For the cascade the localiser's own box (random weights) is recorded, then the true box
    grown by the margin is what the region network sees."""
    from bench.gpu_session import counted
    from pantherseg.inference.io import check_inference_image, read_image
    from pantherseg.inference.localise import Localisation
    from pantherseg.inference.pipeline import Segmenter, Timings

    started = time.perf_counter()
    segmenter = Segmenter.from_model_dir(model, device="cpu", threads=threads, mirroring="off")
    loaded = time.perf_counter() - started
    tallies = {}
    for name, stage in (("region", segmenter.region), ("localiser", segmenter.localiser)):
        if stage is not None:
            tallies[name] = {"calls": 0, "patches": 0, "predictor_s": 0.0}
            stage.predictors = [counted(p, tallies[name]) for p in stage.predictors]
    timings = Timings()
    with timings.stage("read"):
        image = read_image(image_path)
        array = check_inference_image(image, image_path)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    found: dict[str, Any] = {}
    if variant == "cascade":
        locate = segmenter.locate
        true_box = (tuple(box[:3]), tuple(box[3:]))

        def located(*args: Any, **kwargs: Any) -> Localisation:
            own = locate(*args, **kwargs)  # timed: localiser preprocess, network, box
            found.update(box=own.box, reason=own.reason, foreground_ml=own.foreground_ml)
            return Localisation(true_box, "true pancreas + tumor box grown by the margin")

        segmenter.locate = located  # segment() calls it first, then the region network
    result = segmenter.segment(array, spacing_zyx, image.GetDirection(), timings=timings)
    seconds = dict(timings.seconds)
    read = seconds.pop("read")
    figures = {
        "load_s": loaded,
        "read_s": read,
        "stages_s": seconds,
        "end_to_end_s": sum(seconds.values()),
        "tiles": {name: tally["patches"] for name, tally in tallies.items()},
        "tumor_voxels": int(result.mask.sum()),
        "description": segmenter.description,
    }
    if found:
        figures["localiser_own_box"] = found
    report.write_text(json.dumps(figures, default=list), encoding="utf-8")


# ---------------------------------------------------------------- the benchmark


def grid_name(shape: Sequence[int], task: str = "task1") -> str | None:
    grids = GEOMETRY[task].grids
    return next((name for name, grid in grids.items() if tuple(grid) == tuple(shape)), None)


def benchmark(
    work: Path,
    shape: tuple[int, int, int],
    threads: int,
    sizes: Sizes,
    variants: Sequence[str] = VARIANTS,
    seed: int = 0,
    task: str = "task1",
) -> dict[str, Any]:
    """Phantom, models, then each variant in its own process; every figure in one dict."""
    from pantherseg.inference.localise import grown_box

    spacing = GEOMETRY[task].spacing_zyx
    load_before = os.getloadavg()
    print(f"{task} phantom {shape} (seed {seed})...", flush=True)
    phantom = write_phantom(work / "case", shape, seed, task)
    box = grown_box(phantom["box"], spacing, sizes.margin_mm, shape)
    print("building and exporting the networks (random weights)...", flush=True)
    models = build_models(work / "models", sizes, threads, spacing)
    runs: dict[str, Any] = {}
    for variant in variants:
        print(f"running the {variant} variant in a fresh process...", flush=True)
        report = work / f"{variant}.json"
        argv = [
            "--child",
            variant,
            str(work / "models" / variant),
            str(work / "case" / "image.mha"),
            str(report),
            "--box",
            *(str(v) for v in (*box[0], *box[1])),
            "--threads",
            str(threads),
        ]
        runs[variant] = run_child("bench.cascade", argv, work / f"{variant}.log")
        run = runs[variant]
        run.update(json.loads(report.read_text(encoding="utf-8")))
        run["network_s_per_tile"] = run["stages_s"]["network"] / max(1, run["tiles"]["region"])
        # Cores the rest of the machine kept busy on average: above ~0.1, the figures are slower
        # than on a quiet machine (the ONNX Runtime threads had to share the cores).
        run["others_cores"] = run["others_cpu_s"] / run["wall_s"]
    grid = grid_name(shape, task)
    result = {
        "task": task,
        "shape_zyx": list(shape),
        "grid": grid,
        "spacing_zyx": list(spacing),
        "threads": threads,
        "usable_cores": len(os.sched_getaffinity(0)),
        "phantom": phantom,
        "pancreas_tumor_box": box_figures(phantom["box"], shape),
        "box": box_figures(box, shape),
        "margin_mm": sizes.margin_mm,
        "box_note": BOX_NOTE.format(margin=sizes.margin_mm),
        "models": models,
        "variants": runs,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "targets": TARGETS.get(grid or "", {}) if task == "task1" else {},
    }
    if "single" in runs and "cascade" in runs:
        result["speedup"] = runs["single"]["end_to_end_s"] / runs["cascade"]["end_to_end_s"]
        result["speedup_wall"] = runs["single"]["wall_s"] / runs["cascade"]["wall_s"]
    return result


# ---------------------------------------------------------------- the table


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def target_cell(value: float | None, limit: float | None, unit: str) -> str:
    if limit is None:
        return ""
    if value is None:
        return f"target <= {limit:g} {unit}"
    verdict = "met" if value <= limit else "MISSED"
    return f"target <= {limit:g} {unit}: {verdict}"


def print_table(result: dict[str, Any]) -> None:
    """Per stage seconds of both variants side by side, the totals against the issue's targets,
    the box, and how busy the machine was."""
    z, y, x = result["shape_zyx"]
    sz, sy, sx = result["spacing_zyx"]
    region, localiser = result["models"]["region"], result["models"]["localiser"]
    grid = f" ({result['task']} {result['grid']} grid)" if result["grid"] else ""
    print(
        f"\n{result['task']} case {z} x {y} x {x} (z, y, x){grid} at {sz} x {sy} x {sx} mm, "
        "synthetic phantom "
        f"seed {result['phantom']['seed']}; CPU, {result['threads']} threads "
        f"({result['usable_cores']} usable cores), 1 fold, no mirroring"
    )
    print(
        f"region network: {region['network']}, {region['parameters'] / 1e6:.1f} M parameters, "
        f"patch {' x '.join(map(str, region['patch_zyx']))}, {region['stitching']} stitching"
    )
    print(
        f"localiser: {localiser['network']}, features {localiser['features_per_stage']}, "
        f"{localiser['parameters'] / 1e6:.2f} M parameters, {localiser['spacing_mm']:g} mm grid, "
        f"patch {' x '.join(map(str, localiser['patch_zyx']))}, softmax over "
        f"{', '.join(localiser['classes'])}"
    )
    box, truth = result["box"], result["pancreas_tumor_box"]
    print(result["box_note"])
    print(
        f"box: {' x '.join(map(str, box['size']))} voxels from {box['start']}, "
        f"{box['share']:.1%} of the image (pancreas + tumor alone: "
        f"{' x '.join(map(str, truth['size']))}, {truth['share']:.1%})"
    )
    runs = result["variants"]
    columns = [v for v in VARIANTS if v in runs]
    titles = {"single": "single stage", "cascade": "two stages"}
    header = f"{'seconds':<28}" + "".join(f"{titles[v]:>14}" for v in columns) + "   target"
    print(header)
    print("-" * len(header))
    for stage in STAGE_ORDER:
        values = [runs[v]["stages_s"].get(stage) for v in columns]
        if any(value is not None for value in values):
            print(f"{stage:<28}" + "".join(f"{cell(v):>14}" for v in values))
    targets = result["targets"]
    cascade = runs.get("cascade", {})

    def row(label: str, key: str, digits: int = 2, target: str = "") -> None:
        print(
            f"{label:<28}" + "".join(f"{cell(runs[v][key], digits):>14}" for v in columns), end=""
        )
        print(f"   {target}" if target else "")

    row(
        "end to end (in memory)",
        "end_to_end_s",
        target=target_cell(cascade.get("end_to_end_s"), targets.get("end_to_end_s"), "s"),
    )
    print("-" * len(header))
    row("model load", "load_s")
    row("file read", "read_s")
    row("child wall (all of it)", "wall_s", 1)
    row("child CPU", "cpu_s", 1)
    row(
        "peak RSS GiB",
        "peak_gib",
        target=target_cell(cascade.get("peak_gib"), targets.get("peak_gib"), "GiB"),
    )
    row("others' CPU s meanwhile", "others_cpu_s", 1)
    row("others' busy cores (mean)", "others_cores")
    row("network s per region tile", "network_s_per_tile")
    tiles = {v: runs[v]["tiles"] for v in columns}
    print(
        f"{'tiles (region / localiser)':<28}"
        + "".join(
            f"{str(t.get('region', '-')) + ' / ' + str(t.get('localiser', '-')):>14}"
            for t in tiles.values()
        )
    )
    if "speedup" in result:
        print(
            f"speed-up of two stages: {result['speedup']:.2f}x end to end, "
            f"{result['speedup_wall']:.2f}x child wall"
        )
    own = cascade.get("localiser_own_box")
    if own:
        found = own["box"] if own["box"] is not None else own["reason"]
        print(f"the random-weight localiser's own box (not used): {found}")
    busy = max(runs[v]["others_cores"] for v in columns)
    if busy > 0.1:
        print(
            f"NOTE: other processes kept up to {busy:.2f} of {result['usable_cores']} cores busy "
            "during a variant; its seconds are longer than on a quiet machine"
        )
    before, after = result["load_average"]["before"], result["load_average"]["after"]
    print(
        "end to end: every Segmenter stage from the image in memory to the mask in memory; "
        "interpreter start, model load and file read excluded (shown apart), no file written"
    )
    print(
        f"load average (1, 5, 15 min) before {', '.join(f'{v:.2f}' for v in before)}; after "
        f"{', '.join(f'{v:.2f}' for v in after)}"
    )


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with the hidden --child, one variant) and prints the table."""
    defaults = Sizes()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="ONNX Runtime threads (default: the usable cores)",
    )
    parser.add_argument(
        "--task",
        choices=list(GEOMETRY),
        default="task1",
        help="the task's spacing, grids and phantom (default task1)",
    )
    parser.add_argument("--grid", choices=list(GRIDS), default="median")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="image grid instead of --grid"
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--region-patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=defaults.region_patch,
        help="region network patch (default: the baseline's 48 192 224)",
    )
    parser.add_argument(
        "--features",
        type=int,
        default=defaults.features,
        help="region network's first-stage features (default 32: the baseline's)",
    )
    parser.add_argument(
        "--localiser-patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="default: one that covers the task's median grid on the 4 mm grid",
    )
    parser.add_argument("--localiser-features", type=int, default=defaults.localiser_features)
    parser.add_argument("--localiser-spacing", type=float, default=defaults.localiser_spacing_mm)
    parser.add_argument("--margin-mm", type=float, default=defaults.margin_mm)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--box", type=int, nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.child:
        variant, model, image, report = args.child
        child(variant, Path(model), Path(image), Path(report), args.box, args.threads)
        return 0
    geometry = GEOMETRY[args.task]
    sizes = Sizes(
        region_patch=tuple(args.region_patch),
        features=args.features,
        localiser_patch=tuple(args.localiser_patch or geometry.localiser_patch),
        localiser_features=args.localiser_features,
        localiser_spacing_mm=args.localiser_spacing,
        margin_mm=args.margin_mm,
    )
    check_patches(parser, sizes)
    shape = tuple(args.shape) if args.shape else geometry.grids[args.grid]
    run = (args.threads, sizes, args.variants, args.seed, args.task)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = benchmark(args.keep.resolve(), shape, *run)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = benchmark(Path(tmp), shape, *run)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def check_patches(parser: argparse.ArgumentParser, sizes: Sizes) -> None:
    """Each patch must be a multiple of its network's downsampling, or the export fails late."""
    _, region, localiser = architectures(sizes)
    for name, patch, architecture in (
        ("--region-patch", sizes.region_patch, region),
        ("--localiser-patch", sizes.localiser_patch, localiser),
    ):
        factors = downsampling(architecture)
        if any(p % f for p, f in zip(patch, factors, strict=True)):
            parser.error(f"{name} {list(patch)} must be a multiple of {list(factors)}")
    if sizes.features < 1 or sizes.localiser_features < 1:
        parser.error("features must be at least 1")


if __name__ == "__main__":
    sys.exit(main())
