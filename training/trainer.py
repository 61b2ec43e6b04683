"""Training one fold: patches from the preprocessed cache, validation on whole cases through the
real pantherseg sliding window, checkpoints that a killed run resumes from exactly.

Exact resumption rests on two rules: every random draw of the data pipeline is seeded from
(seed, fold, epoch, item), never from a generator's running state, and the checkpoint written at
the end of each epoch holds everything else (weights, optimiser, scheduler, scaler, history).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from pantherseg import metrics
from pantherseg.pipeline import class_probabilities
from pantherseg.plan import Plan
from pantherseg.sliding_window import Predictor, sliding_window_predict
from training.cache import CachedCase, load_cached
from training.config import TrainingConfig
from training.losses import build_loss
from training.networks import build_network
from training.seeding import derived_seed, seed_everything
from training.transforms import train_transforms

log = logging.getLogger("pantherseg.training")

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
# Purposes mixed into derived seeds, so that streams for different uses never coincide.
_INIT, _SAMPLE, _AUGMENT = 1, 2, 3


class PatchDataset(Dataset):
    """One epoch of training patches; item i of epoch e depends only on (seed, fold, e, i)."""

    def __init__(
        self, cases: Sequence[CachedCase], config: TrainingConfig, plan: Plan, fold: int
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.transforms = train_transforms(config, plan)
        self.length = config.optim.iterations_per_epoch * config.sampling.batch_size
        self.seed = config.seed
        self.fold = fold
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(derived_seed(self.seed, _SAMPLE, self.fold, self.epoch, index))
        case = self.cases[int(rng.integers(len(self.cases)))]
        image, label = load_cached(case, mmap=True)
        self.transforms.set_random_state(
            seed=derived_seed(self.seed, _AUGMENT, self.fold, self.epoch, index)
        )
        sample = self.transforms({"image": np.array(image), "label": np.array(label)})
        if isinstance(sample, list):
            sample = sample[0]
        return torch.as_tensor(sample["image"]).float(), torch.as_tensor(sample["label"]).long()


def torch_predictor(network: torch.nn.Module, device: torch.device, amp: bool) -> Predictor:
    """The network as a pantherseg Predictor (numpy in, numpy logits out), in eval mode."""

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), _autocast(device, amp):
            out = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        return out.float().cpu().numpy()

    return predict


def _autocast(device: torch.device, amp: bool):
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


def validate_cases(
    predictor: Predictor, cases: Sequence[CachedCase], plan: Plan, tile_step: float, batch_size: int
) -> dict[str, float]:
    """Mean Dice and HD95 over whole validation cases on the network grid (threshold 0.5)."""
    dices, hd95s = [], []
    spacing = plan.preprocessing.target_spacing_zyx
    for case in cases:
        image, label = load_cached(case, mmap=True)
        logits = sliding_window_predict(
            np.asarray(image, dtype=np.float32),
            predictor,
            plan.inference.patch_size_zyx,
            step_fraction=tile_step,
            batch_size=batch_size,
        )
        tumor = class_probabilities(logits, plan, ["tumor"])["tumor"] >= 0.5
        truth = np.asarray(label[0]) == 1
        if not truth.any():
            continue  # the challenge metrics are undefined without a tumor
        scores = metrics.score_case(truth, tumor, spacing)
        dices.append(scores.dice)
        hd95s.append(scores.hd95)
    if not dices:
        return {"dice": math.nan, "hd95": math.nan}
    return {"dice": float(np.mean(dices)), "hd95": float(np.mean(hd95s))}


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> DistributedContext:
        """Set up by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on the CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, value: object) -> object:
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _save_atomically(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _optimizer(config: TrainingConfig, parameters) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay
        )
    raise ValueError(f"optim.optimizer must be 'adamw' or 'sgd', not {o.optimizer!r}")


def learning_rate_factor(epoch: int, config: TrainingConfig) -> float:
    """Multiplier of the base learning rate at the start of `epoch` for poly and cosine schedules,
    after a linear warm-up from a tenth of the rate."""
    o = config.optim
    if epoch < o.warmup_epochs:
        return 0.1 + 0.9 * epoch / o.warmup_epochs
    progress = (epoch - o.warmup_epochs) / max(1, o.epochs - o.warmup_epochs)
    if o.scheduler == "poly":
        return (1 - min(progress, 1.0)) ** 0.9
    if o.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def _scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer):
    o = config.optim
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=o.plateau_factor, patience=o.plateau_patience
        )
    if o.scheduler in ("poly", "cosine"):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: learning_rate_factor(epoch, config)
        )
    raise ValueError(f"optim.scheduler must be plateau, poly or cosine, not {o.scheduler!r}")


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss, validation Dice and learning rate per epoch, for a person to glance at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker=".")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [h["val_dice"] for h in history], marker=".", color="tab:green")
    axes[1].set_title("validation Dice")
    axes[1].set_ylim(0, 1)
    axes[2].plot(epochs, [h["lr"] for h in history], marker=".", color="tab:orange")
    axes[2].set_title("learning rate")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_dice: float
    epochs_run: int
    checkpoint: Path
    stopped_early: bool


def train_fold(
    config: TrainingConfig,
    plan: Plan,
    train_cases: Sequence[CachedCase],
    val_cases: Sequence[CachedCase],
    out_dir: Path,
    fold: int = 0,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> FoldResult:
    """Trains one fold into `out_dir`; `resume` continues from `out_dir/last.pt` exactly."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    torch_device = resolve_device(device)
    context = DistributedContext.from_environment(torch_device)
    if torch_device.type == "cuda" and context.world_size > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(derived_seed(config.seed, _INIT, fold))
    network = build_network(config.network, plan).to(torch_device)
    loss_function = build_loss(config.loss, plan)
    optimizer = _optimizer(config, network.parameters())
    scheduler = _scheduler(config, optimizer)
    use_amp = config.optim.amp and torch_device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "best_dice": -math.inf, "best_epoch": 0, "stale_epochs": 0, "history": []}
    last = out_dir / LAST_CHECKPOINT
    if resume and last.is_file():
        checkpoint = torch.load(last, map_location=torch_device, weights_only=False)
        network.load_state_dict(checkpoint["network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["state"]
        log.info("fold %d: resuming after epoch %d", fold, state["epoch"])
    elif resume:
        log.info("fold %d: nothing to resume in %s, starting afresh", fold, out_dir)
    model = network
    if context.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[torch_device.index] if torch_device.type == "cuda" else None
        )
    dataset = PatchDataset(train_cases, config, plan, fold)
    indices = list(range(context.rank, len(dataset), context.world_size))
    writer = SummaryWriter(str(out_dir / "tensorboard")) if context.is_main else None
    stopped_early = False
    try:
        while state["epoch"] < config.optim.epochs:
            epoch = state["epoch"] + 1
            started = time.perf_counter()
            dataset.epoch = epoch
            loader = DataLoader(
                torch.utils.data.Subset(dataset, indices),
                batch_size=config.sampling.batch_size,
                shuffle=False,
                num_workers=config.sampling.workers,
                pin_memory=torch_device.type == "cuda",
                drop_last=True,
            )
            model.train()
            losses = []
            bar = tqdm(
                loader,
                desc=f"fold {fold} epoch {epoch}",
                unit="batch",
                disable=not (progress and context.is_main),
                leave=False,
            )
            for images, labels in bar:
                images = images.to(torch_device, non_blocking=True)
                labels = labels.to(torch_device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(torch_device, config.optim.amp):
                    loss = loss_function(model(images), labels)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), config.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            train_loss = float(np.mean(losses)) if losses else math.nan
            if context.world_size > 1:
                total = torch.tensor([train_loss], device=torch_device)
                dist.all_reduce(total)
                train_loss = float(total.item()) / context.world_size
            validation = {"dice": math.nan, "hd95": math.nan}
            due = epoch % config.validation.every_epochs == 0 or epoch == config.optim.epochs
            if context.is_main and val_cases and due:
                network.eval()
                predictor = torch_predictor(network, torch_device, config.optim.amp)
                validation = validate_cases(
                    predictor,
                    val_cases,
                    plan,
                    config.validation.tile_step,
                    config.validation.batch_size,
                )
            validation = context.broadcast(validation)
            # Without validation cases, the training loss stands in for model selection.
            score = validation["dice"] if val_cases else -train_loss
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if not math.isnan(score):
                    scheduler.step(score)
            else:
                scheduler.step()
            improved = not math.isnan(score) and score > state["best_dice"]
            if improved:
                state.update(best_dice=score, best_epoch=epoch, stale_epochs=0)
            elif not math.isnan(score):
                state["stale_epochs"] += 1
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_dice": validation["dice"],
                "val_hd95": validation["hd95"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            state["history"].append(record)
            state["epoch"] = epoch
            if context.is_main:
                if improved:
                    _save_atomically(
                        {"network": network.state_dict(), "epoch": epoch, "score": score},
                        out_dir / BEST_CHECKPOINT,
                    )
                _save_atomically(
                    {
                        "network": network.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "state": state,
                    },
                    last,
                )
                (out_dir / HISTORY_FILE).write_text(json.dumps(state["history"], indent=1))
                plot_curves(state["history"], out_dir / CURVES_FILE, f"fold {fold}")
                for key in ("train_loss", "val_dice", "val_hd95", "lr"):
                    if not math.isnan(record[key]):
                        writer.add_scalar(key, record[key], epoch)
                log.info(
                    "fold %d epoch %d: loss %.4f, val Dice %.4f, lr %.2e, %.1fs",
                    fold,
                    epoch,
                    train_loss,
                    validation["dice"],
                    record["lr"],
                    record["seconds"],
                )
            if context.world_size > 1:
                dist.barrier()
            if state["stale_epochs"] >= config.optim.patience:
                stopped_early = True
                log.info(
                    "fold %d: no improvement for %d epochs, stopping", fold, config.optim.patience
                )
                break
    finally:
        if writer is not None:
            writer.close()
    return FoldResult(
        fold,
        state["best_epoch"],
        state["best_dice"],
        state["epoch"],
        out_dir / BEST_CHECKPOINT,
        stopped_early,
    )


def resolve_device(device: str) -> torch.device:
    """'auto' picks the GPU when there is one; 'cuda' without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cuda or cpu, not {device!r}")
    return torch.device(device)
