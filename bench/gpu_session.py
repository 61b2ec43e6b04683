"""One prepared GPU session: inference and training figures in one call, written as JSON.

A lent GPU comes for minutes at a time, so everything the GPU issue asks is measured by this one
script, inside a time budget, and every figure lands in one JSON file (rewritten atomically after
each section, so a run cut short still leaves what it measured):

- `inference`: the organisers' baseline network (test/data/panther_baseline_task1_plans.json,
  3d_fullres PlainConvUNet, translated by `training.nnunet_import`) on a synthetic median Task 1
  case through pantherseg's `Segmenter` with `training.trainer.torch_predictor` folds (copies of
  one randomly initialised network: timing does not depend on the weights), 8 mirrors, tile step
  0.5: seconds end to end and per stage, peak memory, forwards (tiles x passes) and the pure
  network time of that many forwards, so the share spent outside the network shows.
- `inference_batched`: the same, with every mirror stacked into one batch on the device and the
  folds averaged there (one stitching pass instead of one per fold).
- `inference_task2`: the batched path on a median Task 2 grid (bench.inference.TASK2_GRIDS, the
  phantoms' protocol) at Task 2's 2.0 x 1.0 x 1.0 mm, the same network planned at that spacing
  (no Task 2 nnU-Net plan is public here): one stage over the whole image, what the two-stage
  model's region stage saves from.
- `training`: `bench.training.step_child` (the demo network of examples/demo_gpu.yaml at its
  patch and batch) in a fresh process per variant: AMP fp16, bf16 autocast, channels-last and
  torch.compile; a failure is recorded, not raised.

    python -m bench.gpu_session --out figures.json                 # GPU preset, 480 s budget
    python -m bench.gpu_session --out f.json --preset cpu-small --device cpu

Without SimpleITK (the GPU image lacks it) a placeholder module lets pantherseg import: no file
is read or written here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np

from bench.inference import GRIDS, SPACING_ZYX, TASK2_GRIDS, TASK2_SPACING_ZYX, at_spacing
from bench.training import ROOT, StepSpec
from pantherseg.inference.files import atomic_write_text
from pantherseg.inference.sliding_window import Predictor

if TYPE_CHECKING:
    import torch

    from pantherseg.inference.plan import Plan

DEMO_CONFIG = ROOT / "examples" / "demo_gpu.yaml"
CONFIGURATION = "3d_fullres"
LABELS = {"background": 0, "tumor": 1, "pancreas": 2}
# name -> (autocast dtype, channels-last, torch.compile)
TRAINING_VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "amp_fp16": ("float16", False, False),
    "bf16": ("bfloat16", False, False),
    "channels_last": ("float16", True, False),
    "compile": ("float16", False, True),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one session: the real ones for a GPU, tiny ones for a CPU test."""

    shape_zyx: tuple[int, int, int]
    task2_shape_zyx: tuple[int, int, int]
    patch_zyx: tuple[int, int, int] | None  # None: the plans' own (48 x 192 x 224)
    stages: int | None  # None: the plans' own network (~30 M parameters)
    folds: int
    network_repeats: int  # timed forwards for the pure network time
    train_overrides: dict[str, Any]  # applied over examples/demo_gpu.yaml
    steps: int
    warmup: int
    compile_backend: str
    inference_min_s: float  # budget an inference section needs to start
    training_min_s: float  # likewise, per training variant
    training_cap_s: float  # the most one training variant may take


PRESETS = {
    "gpu": Preset(
        shape_zyx=GRIDS["median"],
        task2_shape_zyx=TASK2_GRIDS["median"],
        patch_zyx=None,
        stages=None,
        folds=3,
        network_repeats=10,
        train_overrides={},
        steps=10,
        warmup=3,
        compile_backend="inductor",
        inference_min_s=60,
        training_min_s=40,
        training_cap_s=200,
    ),
    "cpu-small": Preset(
        shape_zyx=(20, 48, 48),
        task2_shape_zyx=(28, 56, 64),
        patch_zyx=(16, 32, 32),
        stages=3,
        folds=2,
        network_repeats=2,
        train_overrides={
            "plan": {"target_spacing_zyx": [3.0, 1.5, 1.5], "patch_size_zyx": [16, 32, 32]},
            "sampling": {"batch_size": 2},
            "network": {"base_features": 4, "max_features": 16},
        },
        steps=1,
        warmup=0,
        compile_backend="eager",  # dynamo's tracing without minutes of C++ compilation
        inference_min_s=2,
        training_min_s=2,
        training_cap_s=60,
    ),
}


# name, batched, task: in the order they run
INFERENCE_SECTIONS = (
    ("inference", False, "task1"),
    ("inference_batched", True, "task1"),
    ("inference_task2", True, "task2"),
)


class Budget:
    """Seconds left of the session; sections that need more than is left are skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def allow_missing_simpleitk() -> str:
    """pantherseg's pipeline and training's planner import SimpleITK for file I/O that this
    script never does; without it a placeholder that fails on use stands in."""
    try:
        import SimpleITK as sitk
    except ImportError:
        placeholder = types.ModuleType("SimpleITK")

        def missing(name: str) -> Any:
            raise AttributeError(f"SimpleITK is not installed (wanted SimpleITK.{name})")

        placeholder.__getattr__ = missing  # type: ignore[method-assign]
        sys.modules["SimpleITK"] = placeholder
        return "absent: placeholder module, no file I/O"
    return sitk.Version.VersionString()


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(
                query, capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def baseline_model(preset: Preset) -> tuple[Plan, torch.nn.Module]:
    """Our plan for the organisers' baseline configuration and its (untrained) network."""
    sys.path.insert(0, str(ROOT / "test"))
    from nnunet_models import BASELINE_PLANS, shrunk_plans

    from training.nnunet_import import (
        ImportOptions,
        build_network,
        resolve_configuration,
        translate_plan,
    )

    if preset.patch_zyx is None:
        plans = json.loads(BASELINE_PLANS.read_text(encoding="utf-8"))
        plans.pop("README", None)
    else:
        plans = shrunk_plans(BASELINE_PLANS, CONFIGURATION, list(preset.patch_zyx), preset.stages)
    configuration = resolve_configuration(plans, CONFIGURATION, BASELINE_PLANS)
    dataset = {"channel_names": {"0": "MRI"}, "labels": LABELS, "file_ending": ".mha"}
    plan = translate_plan(
        plans, configuration, CONFIGURATION, dataset, ImportOptions(), BASELINE_PLANS.parent
    )
    plan = dataclasses.replace(
        plan, inference=dataclasses.replace(plan.inference, mirror_axes=(0, 1, 2))
    )
    network = build_network(configuration["architecture"], 1, len(LABELS), BASELINE_PLANS)
    return plan, network


def synthetic_case(shape: tuple[int, int, int]) -> np.ndarray:
    """An MRI-like positive array (no zeros, so cropping to nonzero keeps the whole grid)."""
    rng = np.random.default_rng(0)
    return rng.normal(200, 60, shape).clip(1).astype(np.float32)


def counted(predictor: Predictor, tally: dict[str, float]) -> Predictor:
    """The predictor, counting the patches it is given and the seconds it takes (with the
    host-device copies), so the Segmenter's tiles x passes need not be recomputed."""

    def predict(batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = predictor(batch)
        tally["calls"] += 1
        tally["patches"] += len(batch)
        tally["predictor_s"] += time.perf_counter() - start
        return out

    return predict


def batched_predictor(
    networks: Sequence[torch.nn.Module], device: torch.device, amp: bool, axes: Sequence[int]
) -> Predictor:
    """Every mirror of a batch in one forward per fold, flipped back and averaged on the device;
    one copy in and one out per batch instead of one per fold and mirror."""
    import torch

    from training.trainer import _autocast, autocast_dtype

    precision = autocast_dtype(device, amp, cpu_bfloat16=False)
    combos = [
        tuple(a + 2 for a in c)
        for n in range(len(axes) + 1)
        for c in itertools.combinations(axes, n)
    ]

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), _autocast(device, precision):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            stacked = torch.cat([x.flip(c) if c else x for c in combos])
            total = torch.zeros((), device=device)
            for network in networks:
                outs = network(stacked).float().chunk(len(combos))
                total = total + sum(
                    o.flip(c) if c else o for o, c in zip(outs, combos, strict=True)
                )
            return (total / (len(networks) * len(combos))).cpu().numpy()

    return predict


def network_seconds(
    network: torch.nn.Module,
    device: torch.device,
    amp: bool,
    patch: Sequence[int],
    repeats: int,
    batch: int = 1,
) -> float:
    """Mean seconds of one forward of `batch` patches already on the device (synchronised)."""
    import torch

    from training.trainer import _autocast, autocast_dtype

    x = torch.randn((batch, 1, *patch), device=device)
    times = []
    with torch.inference_mode(), _autocast(device, autocast_dtype(device, amp, False)):
        for _ in range(repeats + 1):  # the first one warms up (cuDNN's choices, caches)
            start = time.perf_counter()
            network(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The caching allocator's peak on a GPU; the process's peak RSS (VmHWM) on the CPU."""
    import torch

    if device.type == "cuda":
        return {
            "kind": "cuda max_memory_allocated",
            "gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    return {"kind": "process VmHWM (includes everything imported)", "gib": kib / 2**20}


def measure_inference(
    preset: Preset, device_name: str, batched: bool, task: str = "task1"
) -> dict[str, Any]:
    """One case of the task through the Segmenter: end to end, per stage, memory and network
    share. Task 2's case and plan are at Task 2's spacing, so nothing is resampled for it."""
    import torch

    from pantherseg.inference.pipeline import Segmenter, Timings
    from training.trainer import torch_predictor

    device = torch.device(device_name)
    amp = device.type == "cuda"  # as nnU-Net predicts: fp16 autocast on a GPU
    torch.backends.cudnn.benchmark = False  # nnU-Net's predictor leaves autotuning off
    torch.manual_seed(0)
    started = time.perf_counter()
    plan, network = baseline_model(preset)
    shape, spacing = preset.shape_zyx, SPACING_ZYX
    if task == "task2":
        shape, spacing = preset.task2_shape_zyx, TASK2_SPACING_ZYX
        plan = at_spacing(plan, spacing)
    network = network.to(device).eval()
    folds = [network] * preset.folds  # copies of one network: the same time as trained folds
    patch, axes = plan.inference.patch_size_zyx, plan.inference.mirror_axes
    tally = {"calls": 0.0, "patches": 0.0, "predictor_s": 0.0}
    if batched:
        predictors = [counted(batched_predictor(folds, device, amp, axes), tally)]
        segmenter = Segmenter(plan, predictors, "batched on device", mirroring="off")
        passes, per_call = len(folds) * 2 ** len(axes), len(folds)  # per patch, per call
        forward_batch = segmenter.region.batch_size * 2 ** len(axes)
    else:
        predictors = [counted(torch_predictor(n, device, amp), tally) for n in folds]
        segmenter = Segmenter(plan, predictors, "torch_predictor folds", mirroring="on")
        passes, per_call, forward_batch = 1, 1, segmenter.region.batch_size
    repeats = preset.network_repeats
    one_forward = network_seconds(network, device, amp, patch, repeats, forward_batch)
    build_s = time.perf_counter() - started
    image = synthetic_case(shape)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings = Timings()
    start = time.perf_counter()
    result = segmenter.segment(image, spacing, (1, 0, 0, 0, 1, 0, 0, 0, 1), timings=timings)
    end_to_end = time.perf_counter() - start
    pure = tally["calls"] * per_call * one_forward
    return {
        "status": "ok",
        "model": {
            "plans": f"test/data/panther_baseline_task1_plans.json {CONFIGURATION}"
            + ("" if preset.patch_zyx is None else f", shrunk to {preset.stages} stages"),
            "network": type(network).__name__,
            "parameters_m": sum(p.numel() for p in network.parameters()) / 1e6,
            "patch_zyx": list(patch),
            "folds": f"{len(folds)} copies of one randomly initialised network",
            "mirror_axes": list(axes),
            "tile_step": plan.inference.tile_step,
            "stitching": "one pass over fold-and-mirror means"
            if batched
            else f"{plan.inference.stitching} (each fold stitched on its own)",
            "autocast_fp16": amp,
            "description": segmenter.description,
        },
        "case": {"task": task, "shape_zyx": list(image.shape), "spacing_zyx": list(spacing)},
        "build_and_warmup_s": build_s,
        "end_to_end_s": end_to_end,
        "stages_s": dict(timings.seconds),
        "peak_memory": peak_memory(device),
        "tiles_x_passes": int(tally["patches"]) * passes,
        "network_forwards": int(tally["calls"]) * per_call,
        "forward_batch": forward_batch,
        "one_forward_s": one_forward,
        "predictor_calls_s": tally["predictor_s"],
        "network_only_s": pure,
        "share_outside_network": max(0.0, 1 - pure / end_to_end),
        "tumor_voxels": int(result.mask.sum()),
    }


def training_config(preset: Preset, folder: Path) -> str:
    """examples/demo_gpu.yaml with the preset's overrides, as a file `step_child` reads."""
    import yaml

    if not preset.train_overrides:
        return str(DEMO_CONFIG)
    config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    for section, values in preset.train_overrides.items():
        config.setdefault(section, {}).update(values)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@contextlib.contextmanager
def variant_patches(dtype: str, compile_backend: str | None) -> Iterator[None]:
    """`step_child` as it is, with bf16 autocast or a compiled network swapped in: it imports
    `_autocast` and `build_network` when called, so patching their modules reaches it."""
    import torch

    import training.networks
    import training.trainer

    with contextlib.ExitStack() as stack:
        if dtype == "bfloat16":

            def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
                return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None)

            stack.enter_context(mock.patch.object(training.trainer, "_autocast", autocast))
        if compile_backend:
            build = training.networks.build_network

            def compiled(config: Any, plan: Plan) -> Any:
                return torch.compile(build(config, plan), backend=compile_backend)

            stack.enter_context(mock.patch.object(training.networks, "build_network", compiled))
        yield


def training_child(payload: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: one variant's steps, by `bench.training.step_child`."""
    allow_missing_simpleitk()
    from bench.training import step_child

    started = time.perf_counter()
    with variant_patches(payload["dtype"], payload["compile_backend"]):
        result = step_child(StepSpec(**payload["spec"]))
    result["wall_s"] = time.perf_counter() - started
    return result


def measure_training(payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """A training variant in a fresh process (its own peak memory, and a hung compilation can
    be stopped): steps/s and TFLOP/s, or why not."""
    command = [sys.executable, "-m", "bench.gpu_session", "--training-child", json.dumps(payload)]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"over {timeout:.0f} s (budget or cap)"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"status": "failed", "reason": lines[-1][:500]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = result.pop("seconds")
    rate = len(seconds) / sum(seconds)
    return {
        "status": "ok",
        "steps_per_second": rate,
        "mean_step_s": float(np.mean(seconds)),
        "tflop_per_s": rate * result["flop"] / 1e12,
        **result,
    }


def run_session(
    preset_name: str, device: str, budget_s: float, out: Path, only: list[str] | None = None
) -> dict[str, Any]:
    """Every section in turn while the budget lasts; the JSON is rewritten after each."""
    budget = Budget(budget_s)
    preset = PRESETS[preset_name]
    figures: dict[str, Any] = {
        "preset": preset_name,
        "device": device,
        "budget_s": budget_s,
        "simpleitk": allow_missing_simpleitk(),
        "environment": environment(device),
    }

    def save() -> None:
        figures["elapsed_s"] = budget.elapsed()
        atomic_write_text(out, json.dumps(figures, indent=1) + "\n")

    def skip_reason(name: str, needed: float) -> str | None:
        if only is not None and name not in only:
            return "not asked for (--only)"
        if budget.left() < needed:
            return f"budget: {max(0.0, budget.left()):.0f} s left, {needed:.0f} s needed"
        return None

    for name, batched, task in INFERENCE_SECTIONS:
        reason = skip_reason(name, preset.inference_min_s)
        if reason:
            figures[name] = {"status": "skipped", "reason": reason}
            continue
        try:
            figures[name] = measure_inference(preset, device, batched, task)
        except Exception as error:  # one failure must not lose the others
            figures[name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        save()
    figures["training"] = {}
    with tempfile.TemporaryDirectory() as folder:
        config = training_config(preset, Path(folder))
        for name, (dtype, channels_last, compiled) in TRAINING_VARIANTS.items():
            reason = skip_reason("training", preset.training_min_s)
            if reason:
                figures["training"][name] = {"status": "skipped", "reason": reason}
                continue
            spec = StepSpec(
                "dynunet",
                device,
                "planned",
                steps=preset.steps,
                warmup=preset.warmup,
                config=config,
                channels_last=channels_last,
            )
            payload = {
                "spec": dataclasses.asdict(spec),
                "dtype": dtype,
                "compile_backend": preset.compile_backend if compiled else None,
            }
            timeout = min(preset.training_cap_s, budget.left() - 1)
            figures["training"][name] = {
                "autocast": dtype if device == "cuda" or dtype == "bfloat16" else "off (CPU)",
                "channels_last": channels_last,
                "compile_backend": payload["compile_backend"],
                **measure_training(payload, timeout),
            }
            save()
    save()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where the JSON of figures goes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if seen")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget")
    sections = [name for name, _, _ in INFERENCE_SECTIONS]
    parser.add_argument("--only", nargs="+", choices=[*sections, "training"])
    parser.add_argument("--training-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.training_child:
        print(json.dumps(training_child(json.loads(args.training_child))))
        return 0
    if args.out is None:
        parser.error("--out is required")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA device")
    figures = run_session(args.preset, device, args.budget_s, args.out, args.only)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
