"""Training throughput: optimiser steps per second for both networks and loader samples per
second, at the PANTHER Task 1 spacing (3.0 x 1.1875 x 1.1875 mm), on the CPU and, when PyTorch
sees one, the GPU.

- Steps: the default configuration (training/default.yaml: 32 base features, deep supervision,
  Dice + focal + boundary loss with tumor-slice weights, AdamW, gradient clipping, mixed
  precision on the GPU) at batch `sampling.batch_size`, one step as `training.trainer` takes it:
  forward, loss, backward, clipping, optimiser step. Random images with a tumor-sized label blob,
  so the boundary loss does its real work. Each (network, device, patch) runs in a fresh process,
  so the peak memory reported is its own (GPU: the allocator's peak; CPU: the process's RSS).
- Patches: `nnunet` is 48 x 192 x 224, the organisers' nnU-Net plan for this data; `planned` is
  what `training.planner` plans for the published Task 1 fingerprint
  (test/data/panther_task1_fingerprint.json) with the default 16 GB budget. The CPU runs the
  first only (the planned patch needs more memory than a small machine has, and minutes a step).
- Loader: `training.trainer.PatchDataset` (tumor-centred sampling and every augmentation of the
  default configuration) over the cache of a few full-size phantoms preprocessed for the plan,
  in this process (0 workers) and with `sampling.workers` loader processes.

    python -m bench.training                      # CPU (1 timed step), and the GPU if any
    python -m bench.training --device cuda --steps 20
    python -m bench.training --threads 1          # CPU threads of the step processes

A CPU step that fails at the default batch (out of memory on a small machine) is measured again
at batch 1, and both rows are shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = ROOT / "test" / "data" / "panther_task1_fingerprint.json"
NETWORKS = ("attention_unet", "dynunet")
NNUNET_PATCH = (48, 192, 224)


def default_plan(patch: tuple[int, int, int] | None = None):
    """The planner's plan for the published Task 1 fingerprint and the default configuration,
    with `patch` instead of the planned patch when given."""
    from training.config import load_config
    from training.data import Fingerprint
    from training.planner import plan_from_fingerprint

    config = load_config()
    fingerprint = Fingerprint.from_nnunet(json.loads(FINGERPRINT.read_text(encoding="utf-8")))
    plan = plan_from_fingerprint(fingerprint, config, "task1")
    if patch is not None:
        plan = dataclasses.replace(
            plan, inference=dataclasses.replace(plan.inference, patch_size_zyx=tuple(patch))
        )
    return config, plan


def step_child(
    name: str, device: str, patch: str, steps: int, warmup: int, threads: int, batch: int = 0
) -> dict:
    """Runs in its own process: times `steps` training steps after `warmup` ones, at the default
    batch or `batch`."""
    import resource

    import torch

    from training.losses import build_loss
    from training.networks import build_network
    from training.trainer import _autocast, _optimizer

    if threads:
        torch.set_num_threads(threads)
    config, plan = default_plan(None if patch == "planned" else NNUNET_PATCH)
    config.network.name = name
    torch_device = torch.device(device)
    torch.manual_seed(0)
    network = build_network(config.network, plan).to(torch_device).train()
    loss_function = build_loss(config.loss, plan)
    optimizer = _optimizer(config, network.parameters())
    amp = config.optim.amp and torch_device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    batch, size = batch or config.sampling.batch_size, plan.inference.patch_size_zyx
    images = torch.randn((batch, 1, *size), device=torch_device)
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
        with _autocast(torch_device, config.optim.amp):
            outputs = network(images)
        loss = loss_function(outputs, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024**3
        hardware = torch.cuda.get_device_name(torch_device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        hardware = f"CPU, {torch.get_num_threads()} thread(s)"
    return {
        "seconds": times,
        "peak_gib": peak,
        "parameters_m": sum(p.numel() for p in network.parameters()) / 1e6,
        "patch": list(size),
        "batch": batch,
        "hardware": hardware,
        "amp": amp,
    }


def run_step(name, device, patch, steps, warmup, threads, timeout, batch=0) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.training",
        "--child",
        json.dumps([name, device, patch, steps, warmup, threads, batch]),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if done.returncode != 0:
        killed = done.returncode < 0 or "out of memory" in done.stderr.lower()
        reason = "killed (out of memory?)" if killed else done.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def loader_throughput(cases: int, samples: int, workers: list[int]) -> list[dict]:
    """Samples per second of PatchDataset over `cases` full-size phantoms."""
    import torch

    from pantherseg.synthetic import write_dataset
    from training.cache import preprocess_dataset
    from training.data import discover
    from training.trainer import PatchDataset, epoch_loader

    config, plan = default_plan(NNUNET_PATCH)
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
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, help="timed steps (default: 1 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 1, GPU 3)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's)")
    parser.add_argument("--cases", type=int, default=3, help="full-size phantoms for the loader")
    parser.add_argument("--samples", type=int, default=24, help="patches drawn per loader run")
    parser.add_argument("--no-loader", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per step process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_child(*json.loads(args.child))))
        return 0

    import torch

    from training.config import load_config

    has_cuda = torch.cuda.is_available()
    devices = {"auto": ["cpu", "cuda"] if has_cuda else ["cpu"], "cpu": ["cpu"]}
    devices["cuda"] = ["cuda"]
    if args.device == "cuda" and not has_cuda:
        parser.error("PyTorch sees no CUDA device")
    _, planned = default_plan()
    print(
        f"PANTHER Task 1 plan: spacing {planned.preprocessing.target_spacing_zyx} mm, planned "
        f"patch {planned.inference.patch_size_zyx}, batch {load_config().sampling.batch_size}; "
        f"torch {torch.__version__}"
    )
    rows = []
    for device in devices[args.device]:
        gpu = device == "cuda"
        steps = args.steps or (20 if gpu else 1)
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        for patch in ["nnunet", "planned"] if gpu else ["nnunet"]:
            for name in args.networks:
                print(f"  {device} {name} {patch}: {warmup} + {steps} step(s) ...", flush=True)
                result = run_step(name, device, patch, steps, warmup, args.threads, args.timeout)
                rows.append((device, name, patch, result))
                if "error" in result and not gpu:  # e.g. more memory than this machine has
                    print(f"  {device} {name} {patch}: {result['error']}; again at batch 1")
                    result = run_step(name, device, patch, steps, warmup, args.threads,
                                      args.timeout, batch=1)  # fmt: skip
                    rows.append((device, name, patch, result))

    print()
    print("| device | network | patch | batch | params (M) | s / step | steps / s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for device, name, patch, r in rows:
        if "error" in r:
            print(f"| {device} | {name} | {patch} | default | | {r['error']} | | |")
            continue
        mean = sum(r["seconds"]) / len(r["seconds"])
        print(
            f"| {r['hardware']}{', AMP' if r['amp'] else ''} | {name} | "
            f"{'x'.join(map(str, r['patch']))} | {r['batch']} | {r['parameters_m']:.1f} | "
            f"{mean:.3f} | {1 / mean:.3g} | {r['peak_gib']:.1f} |"
        )
    if not args.no_loader:
        workers = sorted({0, load_config().sampling.workers})
        loader = loader_throughput(args.cases, args.samples, workers)
        print()
        print(
            f"Loader: PatchDataset, default augmentation, patch {'x'.join(map(str, NNUNET_PATCH))}"
            f", {args.cases} full-size phantoms cached at shapes {loader[0]['shapes']}"
        )
        print("| loader processes | samples | samples / s |")
        print("| --- | --- | --- |")
        for row in loader:
            print(f"| {row['workers'] or 'none (main process)'} | {row['samples']} | "
                  f"{row['per_second']:.2f} |")  # fmt: skip
        needed = [
            2 / (sum(r["seconds"]) / len(r["seconds"]))
            for device, _, patch, r in rows
            if device == "cuda" and patch == "nnunet" and "error" not in r
        ]
        if needed:
            print(
                f"A GPU at the fastest step rate above consumes {max(needed):.1f} samples / s; "
                f"loader processes needed: about {math.ceil(max(needed) / loader[0]['per_second'])}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
