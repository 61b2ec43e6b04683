"""Training one fold: patches from the preprocessed cache, validation on whole cases through the
real pantherseg sliding window, checkpoints that a killed run resumes from exactly.

Exact resumption rests on two rules: every random draw of the data pipeline is seeded from
(seed, fold, epoch, item), never from a generator's running state, and the checkpoint written at
the end of each epoch holds everything else (weights, optimiser, scheduler, scaler, history).

Fine-tuning (`train_fold(..., init=CHECKPOINT)`, `--init` on the command line): before the first
epoch, every tensor of the checkpoint whose name and shape match the network's is loaded; the
others keep their fresh initialisation. Which tensors matched and which were skipped is logged and
written to `<fold>/init.json`. A resumed run continues from its own `last.pt` and ignores `init`.

Distributed training (`torchrun --nproc_per_node N -m training train ...`): one process per GPU
(NCCL), or per CPU process with gloo. Each process draws every N-th item of the epoch, so the N
processes together see the same patches as one process with an N times larger batch; gradients
are averaged by DistributedDataParallel, validation runs on rank 0 and its result is broadcast,
and only rank 0 writes checkpoints, logs and curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pantherseg.inference.files import atomic_output, atomic_write_json, atomic_write_text
from pantherseg.inference.localise import grown_box
from pantherseg.inference.pipeline import class_probabilities
from pantherseg.inference.plan import Plan, sha256_of
from pantherseg.inference.preprocess import Box
from pantherseg.inference.sliding_window import Predictor, sliding_window_predict
from pantherseg.scoring import metrics
from training.cache import CachedCase, load_cached
from training.config import TrainingConfig
from training.losses import build_loss
from training.networks import build_network
from training.regions import RegionSampling, foreground_box, region_box, window
from training.seeding import derived_seed, seed_everything
from training.transforms import FLOOR_KEY, train_transforms

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("pantherseg.training")

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
INIT_REPORT = "init.json"
TENSORBOARD_DIR = "tensorboard"
# Purposes mixed into derived seeds, so that streams for different uses never coincide.
_INIT, _SAMPLE, _AUGMENT = 1, 2, 3
# Rank 0 validates while the other processes wait for its result; whole-case validation of a
# large fold on a slow GPU must not trip the collective's timeout.
_DISTRIBUTED_TIMEOUT = timedelta(minutes=60)


class DeviceError(RuntimeError):
    """A device that was asked for and is not there."""


class PatchDataset(Dataset):
    """One epoch of training patches; item i of epoch e depends only on (seed, fold, e, i).

    With `region` (a two-stage model's main network) each patch comes from the case's true
    pancreas and tumor box grown by the margin and jittered, as the localiser's box would be."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        config: TrainingConfig,
        plan: Plan,
        fold: int,
        region: RegionSampling | None = None,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.region = region
        self.boxes: dict[str, Box | None] = {}
        # the z-score of raw zero, for label-intensity augmentation: the case's minimum, which a
        # region box inside the body does not reach
        self.floors: dict[str, float] = {}
        intensity = config.augmentation.label_intensity is not None
        if region or intensity:
            for case in cases:  # one read of each case for both
                image, label = load_cached(case)
                if region:
                    self.boxes[case.case_id] = foreground_box(label[0])
                if intensity:
                    self.floors[case.case_id] = float(image.min())
        self.spacing = plan.preprocessing.target_spacing_zyx
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
        box = self.boxes.get(case.case_id)
        if self.region is not None and box is not None:
            inside = window(region_box(box, self.spacing, label.shape[1:], self.region, rng))
            image, label = image[inside], label[inside]
        self.transforms.set_random_state(
            seed=derived_seed(self.seed, _AUGMENT, self.fold, self.epoch, index)
        )
        data = {"image": np.array(image), "label": np.array(label)}
        if case.case_id in self.floors:
            data[FLOOR_KEY] = self.floors[case.case_id]
        sample = self.transforms(data)
        if isinstance(sample, list):
            sample = sample[0]
        return torch.as_tensor(sample["image"]).float(), torch.as_tensor(sample["label"]).long()


def torch_predictor(
    network: torch.nn.Module, device: torch.device, amp: bool, cpu_bfloat16: bool | str = False
) -> Predictor:
    """The network as a pantherseg Predictor (numpy in, numpy logits out), in eval mode, in the
    precision `autocast_dtype` gives. Choices the exported model inherits (out-of-fold
    post-processing, boxes) keep `cpu_bfloat16` off: the ONNX model computes in float32."""
    dtype = autocast_dtype(device, amp, cpu_bfloat16)

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), _autocast(device, dtype):
            out = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        return out.float().cpu().numpy()

    return predict


def memory_layout(config: TrainingConfig) -> torch.memory_format:
    """The layout of weights and batches: channels-last (NDHWC) when `optim.channels_last`,
    since cuDNN's tensor-core convolutions work in it and convert every other layout first."""
    return torch.channels_last_3d if config.optim.channels_last else torch.contiguous_format


def native_cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16). Without it oneDNN
    emulates it: a step of the CPU demo network took 35 s in bfloat16 against 0.77 s in float32
    on a 2-core AMD EPYC with AVX2 only, where an AMX CPU takes 0.28 s."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype(device: torch.device, amp: bool, cpu_bfloat16: bool | str) -> torch.dtype | None:
    """The mixed precision on `device`: float16 on CUDA under `amp`, bfloat16 on the CPU under
    `cpu_bfloat16` (true, or "auto" where `native_cpu_bfloat16`: about 2.5x the float32 step rate
    of the CPU demo network, `python -m bench.training --cpu-bfloat16 both`), or None: float32."""
    if device.type == "cuda" and amp:
        return torch.float16
    wanted = cpu_bfloat16 is True or (cpu_bfloat16 == "auto" and native_cpu_bfloat16())
    if device.type == "cpu" and wanted:
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(
        device_type=device.type, dtype=dtype or torch.float16, enabled=dtype is not None
    )


def validate_cases(
    predictor: Predictor,
    cases: Sequence[CachedCase],
    plan: Plan,
    tile_step: float,
    batch_size: int,
    target: str = "tumor",
    region: RegionSampling | None = None,
) -> dict[str, float]:
    """Mean Dice and HD95 over whole validation cases on the network grid (threshold 0.5), of the
    tumor or of the foreground (every label: a localiser's target); within each case's true box
    grown by the margin when `region` is given (a two-stage model's main network)."""
    dices, hd95s = [], []
    spacing = plan.preprocessing.target_spacing_zyx
    for case in cases:
        image, label = load_cached(case, mmap=True)
        box = foreground_box(label[0]) if region is not None else None
        if box is not None:
            inside = window(grown_box(box, spacing, region.margin_mm, label.shape[1:]))
            image, label = image[inside], label[inside]
        truth = np.asarray(label[0]) > 0 if target == "foreground" else np.asarray(label[0]) == 1
        if not truth.any():
            continue  # the challenge metrics are undefined without a tumor: no inference either
        logits = sliding_window_predict(
            np.asarray(image, dtype=np.float32),
            predictor,
            plan.inference.patch_size_zyx,
            step_fraction=tile_step,
            batch_size=batch_size,
        )
        if target == "foreground":
            background = class_probabilities(logits, plan.inference, ["background"])
            found = background["background"] <= 0.5
        else:
            found = class_probabilities(logits, plan.inference, ["tumor"])["tumor"] >= 0.5
        scores = metrics.score_case(truth, found, spacing)
        dices.append(scores.dice)
        hd95s.append(scores.hd95)
    if not dices:
        return {"dice": math.nan, "hd95": math.nan}
    return {"dice": float(np.mean(dices)), "hd95": float(np.mean(hd95s))}


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this context started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> DistributedContext:
        """Set up by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on the CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=_DISTRIBUTED_TIMEOUT
            )
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def broadcast(self, value: object) -> object:
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def rank_indices(length: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """The items of an epoch of `length` that process `rank` of `world_size` trains on: every
    `world_size`-th one, the same number of whole batches on every process (DDP needs every
    process to take the same number of steps, or the gradient all-reduce waits forever)."""
    per_rank = length // world_size // batch_size * batch_size
    if per_rank == 0:
        raise ValueError(
            f"{length} patches per epoch cannot give each of {world_size} processes a batch of "
            f"{batch_size}: raise optim.iterations_per_epoch to at least {world_size}"
        )
    return list(range(rank, per_rank * world_size, world_size))


def epoch_loader(
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of `dataset[indices]` in order. Each item seeds itself from (seed, fold, epoch,
    index), so the batches are the same whatever the number of worker processes.

    OpenVINO's thread pool does not survive fork(): forked workers of a process that has run an
    OpenVINO engine (a session that segmented, then trains) crash. Such a process starts its
    workers from a fresh interpreter (forkserver) instead; the others fork, which is faster."""
    forked_safely = workers == 0 or "openvino" not in sys.modules
    return DataLoader(
        torch.utils.data.Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        multiprocessing_context=None if forked_safely else "forkserver",
    )


@dataclass
class InitReport:
    """What `load_matching_weights` took from a checkpoint."""

    source: str
    source_sha256: str = ""  # identifies the file after it moves or is replaced
    matched: list[str] = field(default_factory=list)
    # network tensor -> why it kept its own initialisation
    skipped: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors the network lacks

    def summary(self) -> str:
        return (
            f"{len(self.matched)} tensor(s) loaded from {self.source}, {len(self.skipped)} kept "
            f"their initialisation, {len(self.unused)} of the checkpoint unused"
        )


def _onnx_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The named weights of an ONNX network exported from PyTorch: its initializers, and the
    names the exporter gave to a tensor equal to another (an Identity node of an initializer; a
    residual block's two norm biases get equal gradients and stay equal). Deep-supervision heads
    are not in an exported network."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # protobuf raises several kinds for a file that is not ONNX
        raise ValueError(f"{path}: cannot be read as an ONNX model ({error})") from None
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    return tensors


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: this trainer's (`{"network": ...}`), a `{"state_dict": ...}`
    file, a bare state dict (the `module.` prefix of a saved DDP model is dropped), or an exported
    fold (`.onnx`)."""
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        return _onnx_tensors(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found") from None
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({error})") from None
    for key in ("network", "state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict):
        raise ValueError(f"{path}: holds no state dict of tensors")
    tensors = {}
    for name, value in content.items():
        if isinstance(value, torch.Tensor):
            tensors[name.removeprefix("module.")] = value
    return tensors


def load_matching_weights(network: torch.nn.Module, checkpoint: Path) -> InitReport:
    """Loads every tensor of `checkpoint` whose name and shape match `network`'s (fine-tuning
    from pretrained weights); the rest of the network keeps its initialisation. An error when
    nothing matches: that is the wrong file, not a fine-tuning."""
    source = _checkpoint_tensors(Path(checkpoint))
    own = network.state_dict()
    report = InitReport(str(checkpoint), sha256_of(Path(checkpoint)))
    take = {}
    for name, tensor in own.items():
        if name not in source:
            report.skipped[name] = "not in the checkpoint"
        elif tuple(source[name].shape) != tuple(tensor.shape):
            report.skipped[name] = (
                f"shape {tuple(source[name].shape)} in the checkpoint, {tuple(tensor.shape)} here"
            )
        else:
            take[name] = source[name].to(dtype=tensor.dtype)
            report.matched.append(name)
    report.unused = sorted(set(source) - set(own))
    # A module reachable by two paths (DynUNet's `skip_layers` chain) lists its tensors under both
    # names: a tensor loaded under one is not reported as kept under the other, nor twice.
    seen = {own[name].data_ptr() for name in report.matched}
    skipped, report.skipped = report.skipped, {}
    for name, why in skipped.items():
        if own[name].data_ptr() not in seen:
            seen.add(own[name].data_ptr())
            report.skipped[name] = why
    if not take:
        raise ValueError(
            f"{checkpoint}: no tensor matches the network by name and shape; is it a checkpoint "
            "of this network type?"
        )
    network.load_state_dict(take, strict=False)
    return report


def _save_atomically(state: dict, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _optimizer(config: TrainingConfig, parameters) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=o.lr, momentum=o.momentum, nesterov=True, weight_decay=o.weight_decay
        )
    raise ValueError(f"optim.optimizer must be 'adamw' or 'sgd', not {o.optimizer!r}")


def learning_rate_factor(epoch: int, config: TrainingConfig, epochs: int | None = None) -> float:
    """Multiplier of the base learning rate at the start of `epoch` for poly and cosine schedules
    over `epochs` (default optim.epochs), after a linear warm-up from a tenth of the rate."""
    o = config.optim
    if epoch < o.warmup_epochs:
        return 0.1 + 0.9 * epoch / o.warmup_epochs
    total = o.epochs if epochs is None else epochs
    progress = (epoch - o.warmup_epochs) / max(1, total - o.warmup_epochs)
    if o.scheduler == "poly":
        return (1 - min(progress, 1.0)) ** 0.9
    if o.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def _scheduler(
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    epochs: Callable[[], int] | None = None,
):
    """The learning-rate schedule; `epochs` gives the current planned epoch count when a time
    limit may shorten the run (poly and cosine then decay over the shorter run)."""
    o = config.optim
    if o.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=o.plateau_factor, patience=o.plateau_patience
        )
    if o.scheduler in ("poly", "cosine"):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda epoch: learning_rate_factor(epoch, config, epochs() if epochs else None),
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
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def planned_epochs(config: TrainingConfig, seconds: Sequence[float]) -> int:
    """How many epochs the fold trains, given the durations of the epochs run so far.

    optim.epochs, or, under optim.time_limit_minutes, as many as fit in the time left at the mean
    epoch time (validation included; the first epoch, which pays for start-up, only while it is
    the sole measure). Never fewer than the epochs run plus the next one, so a run overshoots the
    limit by at most one epoch.
    """
    limit = config.optim.time_limit_minutes
    if limit is None or not seconds:
        return config.optim.epochs
    typical = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))
    fit = len(seconds) + int((limit * 60.0 - sum(seconds)) // max(typical, 1e-9))
    return max(len(seconds) + 1, min(config.optim.epochs, fit))


@dataclass
class FoldResult:
    fold: int
    best_epoch: int
    best_dice: float
    epochs_run: int
    checkpoint: Path
    stopped_early: bool
    time_limited: bool = False  # optim.time_limit_minutes cut the run short of optim.epochs
    init: dict | None = None  # the InitReport of a fine-tuning, as a dict


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
    init: Path | None = None,
    region: RegionSampling | None = None,
) -> FoldResult:
    """Trains one fold into `out_dir`; `resume` continues from `out_dir/last.pt` exactly, `init`
    starts from the matching tensors of a checkpoint (fine-tuning), `region` samples patches and
    validates in the true boxes (a two-stage model's main network).

    Model selection: the epoch with the best validation Dice is saved as `best.pt` (without
    validation cases, the lowest training loss). When validation never yields a Dice (no tumor in
    any validation case), `best.pt` holds the last epoch's weights.
    """
    torch_device = resolve_device(device)
    context = DistributedContext.from_environment(torch_device)
    try:
        if torch_device.type == "cuda" and context.world_size > 1:
            torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(torch_device)
        return _train(
            config,
            plan,
            train_cases,
            val_cases,
            Path(out_dir),
            fold,
            torch_device,
            context,
            resume=resume,
            progress=progress,
            init=init,
            region=region,
        )
    finally:
        context.close()


def _train(
    config: TrainingConfig,
    plan: Plan,
    train_cases: Sequence[CachedCase],
    val_cases: Sequence[CachedCase],
    out_dir: Path,
    fold: int,
    torch_device: torch.device,
    context: DistributedContext,
    resume: bool,
    progress: bool,
    init: Path | None,
    region: RegionSampling | None,
) -> FoldResult:
    """train_fold once the device and the process group are set: starting weights (resumed,
    fine-tuned or fresh), then the epochs, with rank 0's TensorBoard log open throughout."""
    from torch.utils.tensorboard import SummaryWriter

    seed_everything(derived_seed(config.seed, _INIT, fold))
    network = build_network(config.network, plan)
    loss_function = build_loss(config.loss, plan)
    checkpoint = _last_checkpoint(out_dir, fold) if resume else None
    if checkpoint is None:
        state = _fresh_state(config)
        init_report = _start_afresh(network, init, out_dir, fold, context)
    else:
        state, init_report = _resume_from(checkpoint, network, config, out_dir, fold)
    context.barrier()
    run = _FoldRun(
        config,
        plan,
        fold,
        out_dir,
        torch_device,
        context,
        network,
        loss_function,
        state,
        checkpoint,
        train_cases,
        progress,
        region,
    )
    writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR)) if context.is_main else None
    try:
        stopped_early = run.train(val_cases, writer)
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
        state["epochs"] < config.optim.epochs,
        init_report,
    )


def _fresh_state(config: TrainingConfig) -> dict:
    """A run's progress before its first epoch; `last.pt` carries it from epoch to epoch."""
    return {
        "epoch": 0,
        "epochs": config.optim.epochs,  # lowered under optim.time_limit_minutes
        "best_dice": -math.inf,
        "best_epoch": 0,
        "stale_epochs": 0,
        "history": [],
    }


def _last_checkpoint(out_dir: Path, fold: int) -> dict | None:
    """What `--resume` continues from: `out_dir/last.pt`, or None when there is none."""
    last = out_dir / LAST_CHECKPOINT
    if not last.is_file():
        log.info("fold %d: nothing to resume in %s, starting afresh", fold, out_dir)
        return None
    return torch.load(last, map_location="cpu", weights_only=False)


def _resume_from(
    checkpoint: dict, network: torch.nn.Module, config: TrainingConfig, out_dir: Path, fold: int
) -> tuple[dict, dict | None]:
    """The weights, progress and fine-tuning report of the interrupted run; the optimiser,
    schedule and scaler are restored once they exist (`_FoldRun`)."""
    network.load_state_dict(checkpoint["network"])
    state = checkpoint["state"]
    if config.optim.time_limit_minutes is None or "epochs" not in state:
        state["epochs"] = config.optim.epochs  # a longer configuration continues the run
    log.info("fold %d: resuming after epoch %d", fold, state["epoch"])
    return state, read_init_report(out_dir)


def read_init_report(fold_dir: Path) -> dict | None:
    """The InitReport (as a dict) a fine-tuned fold's training wrote; None for a fold that
    started from random weights."""
    path = Path(fold_dir) / INIT_REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _start_afresh(
    network: torch.nn.Module,
    init: Path | None,
    out_dir: Path,
    fold: int,
    context: DistributedContext,
) -> dict | None:
    """Loads the matching tensors of `init` (fine-tuning), then, on rank 0, clears `out_dir` of an
    earlier run's files so that none is taken for this one's; the InitReport as a dict, if any."""
    report = None
    if init is not None:
        # Before anything in out_dir changes: a wrong --init must not cost the earlier run.
        report = load_matching_weights(network, Path(init))
    init_report = asdict(report) if report is not None else None
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT, HISTORY_FILE, INIT_REPORT):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
        if report is not None:
            log.info("fold %d: %s", fold, report.summary())
            for name, reason in report.skipped.items():
                log.info("  kept initialisation: %s (%s)", name, reason)
            atomic_write_text(out_dir / INIT_REPORT, json.dumps(init_report, indent=1) + "\n")
    return init_report


def _optimisation(
    config: TrainingConfig,
    network: torch.nn.Module,
    device: torch.device,
    epochs: Callable[[], int],
    checkpoint: dict | None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler]:
    """The optimiser, the learning-rate schedule (over `epochs()`, which the time limit may
    lower) and the mixed-precision loss scaler, as `checkpoint` left them on a resumed run."""
    optimizer = _optimizer(config, network.parameters())
    scheduler = _scheduler(config, optimizer, epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=config.optim.amp and device.type == "cuda")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
    return optimizer, scheduler, scaler


class _FoldRun:
    """The epochs of one fold once its starting weights are set. Holds what every epoch shares:
    the network on its device, the model that trains it (DDP-wrapped across processes), the
    optimiser, schedule and scaler (restored from `checkpoint` on a resumed run), this process's
    share of each epoch's patches, and `state`, the progress that `last.pt` records."""

    def __init__(
        self,
        config: TrainingConfig,
        plan: Plan,
        fold: int,
        out_dir: Path,
        device: torch.device,
        context: DistributedContext,
        network: torch.nn.Module,
        loss_function: torch.nn.Module,
        state: dict,
        checkpoint: dict | None,
        train_cases: Sequence[CachedCase],
        progress: bool,
        region: RegionSampling | None,
    ) -> None:
        self.config, self.plan, self.fold, self.out_dir = config, plan, fold, out_dir
        self.region = region
        self.device, self.context, self.progress = device, context, progress
        self.loss_function = loss_function
        self.state = state
        self.layout = memory_layout(config)
        self.precision = autocast_dtype(device, config.optim.amp, config.optim.cpu_bfloat16)
        if device.type == "cpu" and config.optim.cpu_bfloat16 and not native_cpu_bfloat16():
            if self.precision == torch.bfloat16:
                log.warning(
                    "optim.cpu_bfloat16: this CPU has no native bfloat16 (AMX or AVX-512 BF16): "
                    "emulated, a step can take tens of times as long as in float32; 'auto' "
                    "trains in float32 here"
                )
            else:
                log.info("optim.cpu_bfloat16 auto: float32 (no native bfloat16 on this CPU)")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = config.optim.cudnn_benchmark
        self.network = network.to(device, memory_format=self.layout)
        self.optimizer, self.scheduler, self.scaler = _optimisation(
            config, self.network, device, lambda: state["epochs"], checkpoint
        )
        self.model = self.network
        if context.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.dataset = PatchDataset(train_cases, config, plan, fold, region)
        self.indices = rank_indices(
            len(self.dataset), context.rank, context.world_size, config.sampling.batch_size
        )

    def train(self, val_cases: Sequence[CachedCase], writer: SummaryWriter | None) -> bool:
        """Epochs until the planned count or `optim.patience` epochs without improvement;
        whether it stopped early. `writer` is rank 0's TensorBoard log (None elsewhere)."""
        patience = self.config.optim.patience
        state = self.state
        while state["epoch"] < state["epochs"] and state["stale_epochs"] < patience:
            self._epoch(val_cases, writer)
        stopped_early = state["stale_epochs"] >= patience
        if stopped_early:
            log.info("fold %d: no improvement for %d epochs, stopped", self.fold, patience)
        return stopped_early

    def _epoch(self, val_cases: Sequence[CachedCase], writer: SummaryWriter | None) -> None:
        """Train, validate, update the schedule and the best epoch; rank 0 saves the result."""
        epoch = self.state["epoch"] + 1
        if self.config.optim.time_limit_minutes is not None:
            self._replan_epochs()
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
        train_loss = self._train_epoch(epoch)
        validation = self._validate(val_cases, epoch)
        # Without validation cases, the training loss stands in for model selection.
        score = validation["dice"] if val_cases else -train_loss
        self._step_schedule(score)
        improved = self._track_best(score, epoch)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_dice": validation["dice"],
            "val_hd95": validation["hd95"],
            "lr": lr,
            "seconds": time.perf_counter() - started,
        }
        self.state["history"].append(record)
        self.state["epoch"] = epoch
        if self.context.is_main:
            self._save_checkpoints(epoch, score, improved)
            self._report(record, writer)
        self.context.barrier()  # the checkpoint is complete before any process goes on

    def _replan_epochs(self) -> None:
        """Under optim.time_limit_minutes, the epoch count that fits, as rank 0 measured it."""
        seconds = [h["seconds"] for h in self.state["history"]]
        planned = self.context.broadcast(planned_epochs(self.config, seconds))
        if planned != self.state["epochs"] and self.context.is_main:
            log.info("fold %d: %d epochs fit in the time limit", self.fold, planned)
        self.state["epochs"] = planned

    def _train_epoch(self, epoch: int) -> float:
        """One pass over this process's patches of `epoch`; the mean loss over all processes."""
        self.dataset.epoch = epoch
        loader = epoch_loader(
            self.dataset,
            self.indices,
            self.config.sampling.batch_size,
            self.config.sampling.workers,
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        losses = []
        bar = tqdm(
            loader,
            desc=f"fold {self.fold} epoch {epoch}",
            unit="batch",
            disable=not (self.progress and self.context.is_main),
            leave=False,
        )
        for images, labels in bar:
            losses.append(self._step(images, labels))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        train_loss = float(np.mean(losses)) if losses else math.nan
        if self.context.world_size > 1:
            total = torch.tensor([train_loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            train_loss = float(total.item()) / self.context.world_size
        return train_loss

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimiser step on a batch (mixed precision, clipped gradients); its loss."""
        images = images.to(self.device, non_blocking=True, memory_format=self.layout)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.precision):
            outputs = self.model(images)
        loss = self.loss_function(outputs, labels)  # in float32 (the losses upcast)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _validate(self, val_cases: Sequence[CachedCase], epoch: int) -> dict[str, float]:
        """Dice and HD95 on whole validation cases, by rank 0 and shared with the others; NaN
        between every `validation.every_epochs` (the last epoch always validates)."""
        validation = {"dice": math.nan, "hd95": math.nan}
        due = epoch % self.config.validation.every_epochs == 0 or epoch == self.state["epochs"]
        if self.context.is_main and val_cases and due:
            self.network.eval()
            optim = self.config.optim
            predictor = torch_predictor(self.network, self.device, optim.amp, optim.cpu_bfloat16)
            validation = validate_cases(
                predictor,
                val_cases,
                self.plan,
                self.config.validation.tile_step,
                self.config.validation.batch_size,
                target=self.config.validation.target,
                region=self.region,
            )
        return self.context.broadcast(validation)

    def _step_schedule(self, score: float) -> None:
        """Sets the next epoch's learning rate; the plateau schedule waits for a score."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if not math.isnan(score):
                self.scheduler.step(score)
        else:
            self.scheduler.step()

    def _track_best(self, score: float, epoch: int) -> bool:
        """Whether `score` beats the best so far; counts the epochs without improvement."""
        improved = not math.isnan(score) and score > self.state["best_dice"]
        if improved:
            self.state.update(best_dice=score, best_epoch=epoch, stale_epochs=0)
        elif not math.isnan(score):
            self.state["stale_epochs"] += 1
        return improved

    def _save_checkpoints(self, epoch: int, score: float, improved: bool) -> None:
        """`best.pt` when the score improved, and `last.pt`, everything a resumed run needs."""
        best = self.out_dir / BEST_CHECKPOINT
        if improved or (self.state["best_epoch"] == 0 and not best.is_file()):
            # No score yet (validation without tumor): the latest weights stand in.
            _save_atomically(
                {"network": self.network.state_dict(), "epoch": epoch, "score": score}, best
            )
        _save_atomically(
            {
                "network": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "state": self.state,
            },
            self.out_dir / LAST_CHECKPOINT,
        )

    def _report(self, record: dict, writer: SummaryWriter) -> None:
        """The epoch in the history file, the curves, TensorBoard and the log."""
        history = self.state["history"]
        # Strict JSON for plotting tools and jq: an epoch without a validation Dice has null.
        atomic_write_json(self.out_dir / HISTORY_FILE, history, indent=1)
        plot_curves(history, self.out_dir / CURVES_FILE, f"fold {self.fold}")
        for key in ("train_loss", "val_dice", "val_hd95", "lr"):
            if not math.isnan(record[key]):
                writer.add_scalar(key, record[key], record["epoch"])
        writer.flush()
        log.info(
            "fold %d epoch %d: loss %.4f, val Dice %.4f, lr %.2e, %.1fs",
            self.fold,
            record["epoch"],
            record["train_loss"],
            record["val_dice"],
            record["lr"],
            record["seconds"],
        )


def resolve_device(device: str) -> torch.device:
    """'auto' picks the GPU when there is one; 'cuda' without one is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "device 'cuda' was asked for, but PyTorch sees no CUDA device (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cuda or cpu, not {device!r}")
    return torch.device(device)
