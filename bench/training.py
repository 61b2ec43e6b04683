"""Training throughput: optimiser steps per second and the arithmetic rate they reach (TFLOP/s)
for both networks, and loader samples per second, at the PANTHER Task 1 spacing
(3.0 x 1.1875 x 1.1875 mm) or a configuration's plan, on the CPU and, when PyTorch sees one, on
the GPU.

- Steps: the configuration (training/default.yaml, or `--config`: network, loss, optimiser,
  batch `sampling.batch_size`, mixed precision on the GPU), one step as `training.trainer`
  takes it: forward, loss, backward, clipping, optimiser step. Random images with a tumor-sized
  label blob, so the boundary loss does its real work. Each row runs in fresh processes, so the
  peak memory reported is their own (GPU: the allocator's peak; CPU: the process's RSS). The
  floating-point operations of one step are counted by PyTorch's FlopCounterMode (convolutions
  and matrix products, forward and backward), so TFLOP/s says how much of the hardware's rate
  the step uses, and whether a slow run is the network's arithmetic or something else.
- Patches: `nnunet` is 48 x 192 x 224, the organisers' nnU-Net plan for this data; `planned` is
  what `training.planner` plans for the published Task 1 fingerprint
  (test/data/panther_task1_fingerprint.json) with the configuration (the default 16 GB budget,
  or the patch and spacing a `--config` fixes). The CPU runs the first only unless told.
- Variants, each its own row: `--channels-last` (NDHWC weights and batches, `optim.channels_last`),
  `--cpu-bfloat16` (CPU steps in bfloat16 autocast, `optim.cpu_bfloat16`),
  `--cudnn-benchmark` (cuDNN's algorithm autotuning, `optim.cudnn_benchmark`), and
  `--concurrent N` (N step processes at once on the same device, as folds trained side by side:
  steps / s is then the sum over the processes).
- Loader: `training.trainer.PatchDataset` (tumor-centred sampling and every augmentation of the
  configuration) over the cache of a few full-size phantoms preprocessed for the plan, in this
  process (0 workers) and with `sampling.workers` loader processes.

    python -m bench.training                      # CPU (1 timed step), and the GPU if any
    python -m bench.training --device cuda --steps 20
    python -m bench.training --threads 1          # CPU threads of the step processes
    python -m bench.training --config examples/demo_gpu.yaml --networks dynunet --patches planned \
        --device cuda --channels-last both --concurrent 1 3    # the demo model's questions
    python -m bench.training --config examples/demo_cpu.yaml --networks dynunet --patches planned \
        --device cpu --steps 5 --channels-last both --cpu-bfloat16 both --no-loader  # CPU demo

A CPU step that fails at the default batch (out of memory on a small machine) is measured again
at batch 1, and both rows are shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = ROOT / "test" / "data" / "panther_task1_fingerprint.json"
NETWORKS = ("attention_unet", "dynunet")
NNUNET_PATCH = (48, 192, 224)


def default_plan(patch: tuple[int, int, int] | None = None, config_path: str | None = None):
    """The planner's plan for the published Task 1 fingerprint and the configuration (the
    default, or the file `config_path`), with `patch` instead of the planned patch when given."""
    from training.config import load_config
    from training.data import Fingerprint
    from training.planner import plan_from_fingerprint

    config = load_config(Path(config_path) if config_path else None)
    fingerprint = Fingerprint.from_nnunet(json.loads(FINGERPRINT.read_text(encoding="utf-8")))
    plan = plan_from_fingerprint(fingerprint, config, "task1")
    if patch is not None:
        plan = dataclasses.replace(
            plan, inference=dataclasses.replace(plan.inference, patch_size_zyx=tuple(patch))
        )
    return config, plan


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One row of the step table: what each of its processes measures."""

    network: str
    device: str
    patch: str  # "nnunet" or "planned"
    steps: int
    warmup: int
    threads: int = 0  # CPU threads (0: PyTorch's default)
    batch: int = 0  # 0: the configuration's sampling.batch_size
    config: str | None = None
    channels_last: bool = False
    cpu_bfloat16: bool = False
    cudnn_benchmark: bool = True
    processes: int = 1
    barrier: str | None = None  # a folder where the processes meet before timing

    def describe(self) -> str:
        layout = "NDHWC" if self.channels_last else "NCDHW"
        layout += ", bfloat16" if self.cpu_bfloat16 else ""
        autotune = f", cuDNN autotune {'on' if self.cudnn_benchmark else 'off'}"
        return (
            f"{self.device} {self.network} {self.patch} {layout}"
            f"{autotune if self.device == 'cuda' else ''}, {self.processes} process(es): "
            f"1 counted + {self.warmup} + {self.steps} step(s)"
        )


def _meet(folder: str, processes: int) -> None:
    """Waits until all `processes` have arrived, so that concurrent processes time their steps
    together and not while another one is still importing or warming up."""
    import os

    Path(folder, f"ready-{os.getpid()}").touch()
    while len(list(Path(folder).glob("ready-*"))) < processes:
        time.sleep(0.01)


def step_child(spec: StepSpec) -> dict:
    """Runs in its own process: counts the operations of one step, then times `steps` training
    steps after `warmup` more."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from training.losses import build_loss
    from training.networks import build_network
    from training.trainer import _autocast, _optimizer, autocast_dtype, memory_layout

    if spec.threads:
        torch.set_num_threads(spec.threads)
    config, plan = default_plan(None if spec.patch == "planned" else NNUNET_PATCH, spec.config)
    config.network.name = spec.network
    config.optim.channels_last = spec.channels_last
    layout = memory_layout(config)
    torch_device = torch.device(spec.device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    torch.manual_seed(0)
    network = build_network(config.network, plan).to(torch_device, memory_format=layout).train()
    loss_function = build_loss(config.loss, plan)
    optimizer = _optimizer(config, network.parameters())
    precision = autocast_dtype(torch_device, config.optim.amp, spec.cpu_bfloat16)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
    batch, size = spec.batch or config.sampling.batch_size, plan.inference.patch_size_zyx
    images = torch.randn((batch, 1, *size), device=torch_device).to(memory_format=layout)
    labels = torch.zeros((batch, 1, *size), dtype=torch.long, device=torch_device)
    z, y, x = (s // 2 for s in size)
    labels[:, :, z - 4 : z + 4, y - 12 : y + 12, x - 12 : x + 12] = 1  # ~3 cm tumor

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(torch_device, precision):
            outputs = network(images)
        loss = loss_function(outputs, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        sync()
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(spec.warmup):
        step()
    if spec.barrier:
        _meet(spec.barrier, spec.processes)
    times = [step() for _ in range(spec.steps)]
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024**3
        hardware = torch.cuda.get_device_name(torch_device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        hardware = f"CPU, {torch.get_num_threads()} thread(s)"
    return {
        "seconds": times,
        "flop": counter.get_total_flops(),
        "peak_gib": peak,
        "parameters_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "patch": list(size),
        "batch": batch,
        "hardware": hardware,
        "precision": str(precision or torch.float32).removeprefix("torch."),
    }


def run_step(spec: StepSpec, timeout: int) -> dict:
    """`spec.processes` step processes started together; their rates add up."""
    with tempfile.TemporaryDirectory() as barrier:
        return _run_processes(dataclasses.replace(spec, barrier=barrier), timeout)


def _run_processes(spec: StepSpec, timeout: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.training",
        "--child",
        json.dumps(dataclasses.asdict(spec)),
    ]
    children = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(spec.processes)
    ]
    results = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=timeout)
            if child.returncode != 0:
                killed = child.returncode < 0 or "out of memory" in stderr.lower()
                lines = stderr.strip().splitlines() or ["no message"]
                return {"error": "killed (out of memory?)" if killed else lines[-1]}
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    result = dict(results[0])
    result["steps_per_second"] = sum(len(r["seconds"]) / sum(r["seconds"]) for r in results)
    result["mean_step_seconds"] = float(np.mean([np.mean(r["seconds"]) for r in results]))
    result["peak_gib"] = max(r["peak_gib"] for r in results)
    return result


def loader_throughput(
    cases: int, samples: int, workers: list[int], patch: str, config_path: str | None
) -> list[dict]:
    """Samples per second of PatchDataset over `cases` full-size phantoms."""
    import torch

    from pantherseg.phantoms.synthetic import write_dataset
    from training.cache import preprocess_dataset
    from training.data import discover
    from training.trainer import PatchDataset, epoch_loader

    config, plan = default_plan(None if patch == "planned" else NNUNET_PATCH, config_path)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        write_dataset(root, cases, seed=0, task="task1", size="full", progress=False)
        cached = preprocess_dataset(
            discover(root), plan, Path(folder) / "cache", jobs=2, progress=False
        )
        shapes = [c.record.resampled_shape for c in cached]
        dataset = PatchDataset(cached, config, plan, fold=0)
        dataset.epoch = 1
        batch = config.sampling.batch_size
        for n in workers:
            loader = epoch_loader(dataset, range(samples), batch, workers=n)
            start = time.perf_counter()
            count = sum(len(images) for images, _ in loader)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "workers": n,
                    "samples": count,
                    "per_second": count / seconds,
                    "threads": torch.get_num_threads(),
                    "shapes": shapes,
                    "patch": plan.inference.patch_size_zyx,
                }
            )
    return rows


def _choices(value: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[value]


def _print_steps(rows: list[tuple[StepSpec, dict]]) -> None:
    print(
        "| device | network | patch | batch | layout | cuDNN autotune | processes | params (M) "
        "| GFLOP / step | s / step | steps / s (all) | TFLOP/s (all) | peak GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec, r in rows:
        layout = "NDHWC" if spec.channels_last else "NCDHW"
        autotune = ("on" if spec.cudnn_benchmark else "off") if spec.device == "cuda" else ""
        head = f"{layout} | {autotune} | {spec.processes}"
        if "error" in r:
            batch = spec.batch or "default"
            print(f"| {spec.device} | {spec.network} | {spec.patch} | {batch} | {head} | "
                  f"| | {r['error']} | | | |")  # fmt: skip
            continue
        rate = r["steps_per_second"]
        print(
            f"| {r['hardware']}, {r['precision']} | {spec.network} | "
            f"{'x'.join(map(str, r['patch']))} | {r['batch']} | {head} | "
            f"{r['parameters_m']:.1f} | {r['flop'] / 1e9:.0f} | {r['mean_step_seconds']:.3f} | "
            f"{rate:.3g} | {rate * r['flop'] / 1e12:.3g} | {r['peak_gib']:.1f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--config", help="training YAML (default: training/default.yaml)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 1 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1, GPU 3)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument(
        "--patches",
        nargs="+",
        choices=["nnunet", "planned"],
        help="default: nnunet on the CPU, both on the GPU; the loader uses the first",
    )
    parser.add_argument("--channels-last", choices=["off", "on", "both"], default="off")
    parser.add_argument(
        "--cpu-bfloat16",
        choices=["off", "on", "both"],
        default="off",
        help="CPU steps in bfloat16 autocast (optim.cpu_bfloat16)",
    )
    parser.add_argument("--cudnn-benchmark", choices=["off", "on", "both"], default="on")
    parser.add_argument(
        "--concurrent", nargs="+", type=int, default=[1], help="step processes at once"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's)")
    parser.add_argument("--cases", type=int, default=3, help="full-size phantoms for the loader")
    parser.add_argument("--samples", type=int, default=24, help="patches drawn per loader run")
    parser.add_argument("--no-loader", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per step process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_child(StepSpec(**json.loads(args.child)))))
        return 0
    if min(args.concurrent) < 1:
        parser.error("--concurrent takes counts of 1 or more")

    import torch

    has_cuda = torch.cuda.is_available()
    devices = {"auto": ["cpu", "cuda"] if has_cuda else ["cpu"], "cpu": ["cpu"]}
    devices["cuda"] = ["cuda"]
    if args.device == "cuda" and not has_cuda:
        parser.error("PyTorch sees no CUDA device")
    config, planned = default_plan(config_path=args.config)
    print(
        f"{args.config or 'default configuration'}, PANTHER Task 1 fingerprint: spacing "
        f"{planned.preprocessing.target_spacing_zyx} mm, planned patch "
        f"{planned.inference.patch_size_zyx}, batch {config.sampling.batch_size}; "
        f"torch {torch.__version__}"
    )
    rows = []
    for device in devices[args.device]:
        gpu = device == "cuda"
        patches = args.patches or (["nnunet", "planned"] if gpu else ["nnunet"])
        variants = itertools.product(
            patches,
            args.networks,
            _choices(args.channels_last),
            [False] if gpu else _choices(args.cpu_bfloat16),
            _choices(args.cudnn_benchmark) if gpu else [True],
            args.concurrent,
        )
        for patch, name, channels_last, bfloat16, autotune, processes in variants:
            spec = StepSpec(
                name,
                device,
                patch,
                steps=args.steps or (20 if gpu else 1),
                warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
                threads=args.threads,
                config=args.config,
                channels_last=channels_last,
                cpu_bfloat16=bfloat16,
                cudnn_benchmark=autotune,
                processes=processes,
            )
            print(f"  {spec.describe()} ...", flush=True)
            result = run_step(spec, args.timeout)
            rows.append((spec, result))
            if "error" in result and not gpu:  # e.g. more memory than this machine has
                print(f"  {device} {name} {patch}: {result['error']}; again at batch 1")
                spec = dataclasses.replace(spec, batch=1)
                rows.append((spec, run_step(spec, args.timeout)))
    print()
    _print_steps(rows)
    if not args.no_loader:
        workers = sorted({0, config.sampling.workers})
        patch = (args.patches or ["nnunet"])[0]
        loader = loader_throughput(args.cases, args.samples, workers, patch, args.config)
        print()
        print(
            f"Loader: PatchDataset, the configuration's augmentation, patch "
            f"{'x'.join(map(str, loader[0]['patch']))}, {args.cases} full-size phantoms cached "
            f"at shapes {loader[0]['shapes']}"
        )
        print("| loader processes | samples | samples / s |")
        print("| --- | --- | --- |")
        for row in loader:
            print(f"| {row['workers'] or 'none (main process)'} | {row['samples']} | "
                  f"{row['per_second']:.2f} |")  # fmt: skip
        needed = [
            r["steps_per_second"] * r["batch"]
            for spec, r in rows
            if spec.device == "cuda" and spec.patch == patch and "error" not in r
        ]
        if needed:
            print(
                f"The GPU at the fastest step rate above consumes {max(needed):.1f} samples / s; "
                f"loader processes needed: about {math.ceil(max(needed) / loader[0]['per_second'])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
