"""The trainer: a smoke epoch writes everything, a killed run resumes exactly, early stopping,
learning-rate schedules, device errors, worker-independent sampling, fine-tuning from a
checkpoint."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from strict_json import read_strict_json
from training_fixtures import tiny_config, tiny_setup  # noqa: F401  (the `tiny` fixture)

import training.trainer as trainer_module
from training.config import TrainingConfig
from training.networks import build_network
from training.trainer import (
    BEST_CHECKPOINT,
    CURVES_FILE,
    HISTORY_FILE,
    INIT_REPORT,
    LAST_CHECKPOINT,
    DeviceError,
    PatchDataset,
    _optimizer,
    _scheduler,
    epoch_loader,
    learning_rate_factor,
    load_matching_weights,
    planned_epochs,
    rank_indices,
    resolve_device,
    train_fold,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["network"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_one_epoch_writes_checkpoints_history_curves_and_tensorboard(tiny, tmp_path):
    train, val = tiny.split()
    result = train_fold(tiny.config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT, HISTORY_FILE, CURVES_FILE):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob(".*partial*"))
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1]
    assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_dice"] <= 1
    assert history[0]["lr"] == pytest.approx(tiny.config.optim.lr)
    assert (result.epochs_run, result.best_epoch, result.stopped_early) == (1, 1, False)
    assert result.checkpoint == tmp_path / BEST_CHECKPOINT
    assert result.best_dice == pytest.approx(history[0]["val_dice"])
    # The best weights load into a fresh network of the configuration.
    build_network(tiny.config.network, tiny.plan).load_state_dict(weights(result.checkpoint))


def test_killed_run_resumes_exactly(tiny, tmp_path, monkeypatch):
    """Two epochs straight equal one epoch, a kill, and a resumed run: same weights bit for bit,
    same losses, same optimiser and scheduler (cosine with warm-up, so the schedule matters)."""
    config = tiny_config(optim={"epochs": 2, "scheduler": "cosine", "warmup_epochs": 1})
    train, val = tiny.split()
    straight = train_fold(
        config, tiny.plan, train, val, tmp_path / "a", device="cpu", progress=False
    )

    real_plot = trainer_module.plot_curves

    def killed_after_first_checkpoint(history, path, title):
        real_plot(history, path, title)
        raise KeyboardInterrupt  # as if the process were killed once last.pt is written

    monkeypatch.setattr(trainer_module, "plot_curves", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_fold(config, tiny.plan, train, val, tmp_path / "b", device="cpu", progress=False)
    monkeypatch.setattr(trainer_module, "plot_curves", real_plot)
    assert torch.load(tmp_path / "b" / LAST_CHECKPOINT, weights_only=False)["state"]["epoch"] == 1
    resumed = train_fold(
        config, tiny.plan, train, val, tmp_path / "b", device="cpu", progress=False, resume=True
    )

    a = torch.load(tmp_path / "a" / LAST_CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "b" / LAST_CHECKPOINT, weights_only=False)
    assert_same_weights(a["network"], b["network"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    moments_a = a["optimizer"]["state"]
    moments_b = b["optimizer"]["state"]
    for key in moments_a:
        assert torch.equal(moments_a[key]["exp_avg"], moments_b[key]["exp_avg"])
    history_a = json.loads((tmp_path / "a" / HISTORY_FILE).read_text())
    history_b = json.loads((tmp_path / "b" / HISTORY_FILE).read_text())
    for key in ("epoch", "train_loss", "val_dice", "lr"):
        assert [h[key] for h in history_a] == [h[key] for h in history_b], key
    assert (straight.best_epoch, straight.best_dice) == (resumed.best_epoch, resumed.best_dice)
    assert_same_weights(weights(tmp_path / "a" / BEST_CHECKPOINT), weights(resumed.checkpoint))


def test_one_epoch_then_resume_to_two_equals_two_straight(tiny, tmp_path):
    """The plain way: a run configured for one epoch, continued by a run configured for two
    (plateau schedule, which does not depend on the epoch count)."""
    two = tiny_config(optim={"epochs": 2})
    train, val = tiny.split()
    train_fold(two, tiny.plan, train, val, tmp_path / "a", device="cpu", progress=False)
    train_fold(tiny.config, tiny.plan, train, val, tmp_path / "b", device="cpu", progress=False)
    train_fold(
        two, tiny.plan, train, val, tmp_path / "b", device="cpu", progress=False, resume=True
    )
    assert_same_weights(
        weights(tmp_path / "a" / LAST_CHECKPOINT), weights(tmp_path / "b" / LAST_CHECKPOINT)
    )
    losses = [
        [h["train_loss"] for h in json.loads((tmp_path / d / HISTORY_FILE).read_text())]
        for d in ("a", "b")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_channels_last_trains_the_same_network(tiny, tmp_path, monkeypatch):
    """optim.channels_last changes where the numbers sit in memory, not what is learnt: the
    network trains in NDHWC and its weights match the standard layout's to float32 rounding.
    With SGD: Adam takes a step of the learning rate's size even for a gradient of rounding
    size (whose sign the layout's kernels may flip), which made this differ by 1.7e-4 on an
    AVX2 CPU."""
    built = []
    real_build = trainer_module.build_network

    def remembered(config, plan):
        built.append(real_build(config, plan))
        return built[-1]

    monkeypatch.setattr(trainer_module, "build_network", remembered)
    train, val = tiny.split()
    # "c": the standard layout at half the learning rate, to show that training moved the
    # weights far beyond the tolerance the two layouts are held to.
    runs = (("a", False, 0.02), ("b", True, 0.02), ("c", False, 0.01))
    for name, channels_last, lr in runs:
        optim = {"channels_last": channels_last, "optimizer": "sgd", "lr": lr}
        config = tiny_config(optim=optim)
        train_fold(config, tiny.plan, train, val, tmp_path / name, device="cpu", progress=False)

    def kernels(network):  # those whose layouts differ: several input channels and voxels
        return [
            p for p in network.parameters() if p.dim() == 5 and min(p.shape[1], p[0, 0].numel()) > 1
        ]

    standard_kernels, channels_last_kernels = (kernels(network) for network in built[:2])
    assert standard_kernels and all(p.is_contiguous() for p in standard_kernels)
    assert len(channels_last_kernels) == len(standard_kernels)
    assert all(
        p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
        for p in channels_last_kernels
    )
    standard, channels_last, slower = (
        weights(tmp_path / d / LAST_CHECKPOINT) for d in ("a", "b", "c")
    )
    assert standard.keys() == channels_last.keys()
    for name in standard:
        torch.testing.assert_close(channels_last[name], standard[name], rtol=1e-3, atol=1e-4)
    moved = max((standard[n] - slower[n]).abs().max().item() for n in standard)
    assert moved > 10 * 1e-4  # 3.5e-3 measured: the comparison above would see a real change


def test_a_fresh_run_replaces_an_earlier_runs_files(tiny, tmp_path):
    train, val = tiny.split()
    train_fold(tiny.config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    (tmp_path / BEST_CHECKPOINT).write_bytes(b"stale")
    train_fold(tiny.config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    weights(tmp_path / BEST_CHECKPOINT)  # rewritten, loadable
    assert len(json.loads((tmp_path / HISTORY_FILE).read_text())) == 1
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_early_stopping_with_patience_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(
        trainer_module, "validate_cases", lambda *args, **kwargs: {"dice": 0.5, "hd95": 3.0}
    )
    config = tiny_config(optim={"epochs": 5, "patience": 1})
    train, val = tiny.split()
    result = train_fold(config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 1
    # A resumed run that had stopped early stays stopped.
    again = train_fold(
        config, tiny.plan, train, val, tmp_path, device="cpu", progress=False, resume=True
    )
    assert again.stopped_early and again.epochs_run == 2


def test_without_a_dice_the_last_weights_are_the_best(tiny, tmp_path, monkeypatch):
    # Validation cases without tumor give no Dice; best.pt must still exist for export.
    monkeypatch.setattr(
        trainer_module, "validate_cases", lambda *a, **k: {"dice": math.nan, "hd95": math.nan}
    )
    train, val = tiny.split()
    result = train_fold(tiny.config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    assert result.best_epoch == 0 and result.checkpoint.is_file()
    assert_same_weights(weights(result.checkpoint), weights(tmp_path / LAST_CHECKPOINT))
    # history.json stays strict JSON (jq, JavaScript): no Dice is null, not Python's NaN.
    history = read_strict_json(tmp_path / HISTORY_FILE)
    assert [h["val_dice"] for h in history] == [None] * len(history) and history


def test_planned_epochs_fit_the_time_limit():
    config = tiny_config(optim={"epochs": 10, "time_limit_minutes": 1.0})
    assert planned_epochs(config, []) == 10  # nothing measured yet
    assert planned_epochs(config, [15.0]) == 4  # 45 s left at 15 s an epoch: 3 more
    # The first epoch's start-up cost stops counting once there are others to go by.
    assert planned_epochs(config, [30.0, 10.0, 10.0]) == 4
    assert planned_epochs(config, [30.0, 30.0, 30.0]) == 4  # over time: one epoch more at most
    assert planned_epochs(config, [1.0, 1.0]) == 10  # never more than optim.epochs
    assert planned_epochs(tiny_config(optim={"epochs": 10}), [500.0]) == 10  # no limit


def test_time_limit_shortens_the_run_and_its_schedule(tiny, tmp_path, monkeypatch):
    """Epochs that take 15 s (a fake clock) under a one-minute limit: four epochs, the poly
    schedule decaying over four, the last epoch validated, and a resumed run stays finished."""
    ticks = itertools.count(step=15.0)
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    config = tiny_config(
        optim={"epochs": 10, "time_limit_minutes": 1.0, "scheduler": "poly", "patience": 100}
    )
    train, val = tiny.split()
    result = train_fold(config, tiny.plan, train, val, tmp_path, device="cpu", progress=False)
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert result.time_limited and result.epochs_run == 4 and len(history) == 4
    assert [h["seconds"] for h in history] == [15.0] * 4
    # The rate of epoch 4 was set after epoch 3, once the plan said four epochs.
    lr = config.optim.lr
    assert history[3]["lr"] == pytest.approx(lr * learning_rate_factor(3, config, epochs=4))
    assert history[3]["lr"] < lr * learning_rate_factor(3, config)  # faster than over ten
    assert math.isfinite(history[3]["val_dice"])
    again = train_fold(
        config, tiny.plan, train, val, tmp_path, device="cpu", progress=False, resume=True
    )
    assert again.epochs_run == 4 and again.time_limited


def test_time_limit_must_be_positive(tmp_path):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="time_limit_minutes must be positive"):
        tiny_config(optim={"time_limit_minutes": 0})


def schedule(config: TrainingConfig, scores=None) -> list[float]:
    """The learning rate of each epoch, as the trainer steps the scheduler."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = _optimizer(config, [parameter])
    scheduler = _scheduler(config, optimizer)
    rates = []
    for epoch in range(config.optim.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scores is None:
            scheduler.step()
        else:
            scheduler.step(scores[epoch])
    return rates


def test_poly_schedule():
    config = tiny_config(optim={"scheduler": "poly", "epochs": 10, "lr": 0.01, "optimizer": "sgd"})
    expected = [0.01 * (1 - e / 10) ** 0.9 for e in range(10)]
    assert schedule(config) == pytest.approx(expected)
    assert learning_rate_factor(10, config) == 0.0


def test_cosine_schedule_with_warmup():
    config = tiny_config(optim={"scheduler": "cosine", "epochs": 12, "warmup_epochs": 2})
    factors = [r / config.optim.lr for r in schedule(config)]
    assert factors[:3] == pytest.approx([0.1, 0.55, 1.0])  # linear warm-up from a tenth
    assert factors[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(10)])
    assert factors[7] == pytest.approx(0.5)  # halfway


def test_plateau_schedule_halves_after_patience():
    config = tiny_config(
        optim={"scheduler": "plateau", "epochs": 8, "plateau_patience": 2, "plateau_factor": 0.5}
    )
    rates = schedule(config, scores=[0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3])
    lr = config.optim.lr
    # Better at epochs 0, 1 and 5; the rate halves after the third epoch without improvement.
    assert rates == pytest.approx([lr, lr, lr, lr, lr, lr / 2, lr / 2, lr / 2])


def test_unknown_schedule_or_optimizer_is_an_error():
    with pytest.raises(ValueError, match=r"optim\.scheduler"):
        schedule(tiny_config(optim={"scheduler": "step"}))
    with pytest.raises(ValueError, match=r"optim\.optimizer"):
        schedule(tiny_config(optim={"optimizer": "adam"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"'cuda' was asked for.*no CUDA device.*--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        resolve_device("tpu")


def test_patches_depend_on_seed_fold_epoch_index_not_on_workers(tiny):
    config = tiny_config(sampling={"batch_size": 2}, optim={"iterations_per_epoch": 3})
    dataset = PatchDataset(tiny.cases, config, tiny.plan, fold=1)
    dataset.epoch = 4
    indices = list(range(len(dataset)))
    batches = {
        workers: list(epoch_loader(dataset, indices, 2, workers=workers)) for workers in (0, 2)
    }
    assert len(batches[0]) == len(batches[2]) == 3
    for (image0, label0), (image2, label2) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(image0, image2) and torch.equal(label0, label2)
    image, label = dataset[3]  # alone, out of order
    assert torch.equal(image, batches[0][1][0][1]) and torch.equal(label, batches[0][1][1][1])
    dataset.epoch = 5
    assert not torch.equal(dataset[3][0], image)  # another epoch, another patch
    other_fold = PatchDataset(tiny.cases, config, tiny.plan, fold=0)
    other_fold.epoch = 4
    assert not torch.equal(other_fold[3][0], image)


def test_rank_indices_give_every_process_the_same_number_of_batches():
    parts = [rank_indices(14, rank, 4, 2) for rank in range(4)]
    assert [len(p) for p in parts] == [2, 2, 2, 2]  # 3 items each would leave an odd batch
    assert sorted(i for p in parts for i in p) == list(range(8))
    assert rank_indices(6, 0, 1, 2) == list(range(6))
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        rank_indices(4, 0, 4, 2)


def test_init_loads_matching_tensors_and_reports_the_rest(tiny, tmp_path):
    train, val = tiny.split()
    source = tmp_path / "pretrained"
    train_fold(tiny.config, tiny.plan, train, val, source, device="cpu", progress=False)
    pretrained = weights(source / BEST_CHECKPOINT)

    # Same architecture: everything matches; a zero-epoch run keeps exactly the loaded weights.
    zero = tiny_config(optim={"epochs": 0})
    result = train_fold(
        zero,
        tiny.plan,
        train,
        val,
        tmp_path / "same",
        device="cpu",
        progress=False,
        init=source / BEST_CHECKPOINT,
    )
    assert result.init["skipped"] == {} and len(result.init["matched"]) == len(pretrained)
    network = build_network(tiny.config.network, tiny.plan)
    report = load_matching_weights(network, source / BEST_CHECKPOINT)
    assert_same_weights(network.state_dict(), pretrained)
    assert report.unused == []

    # Wider deeper levels: the full-resolution level matches, the wider ones are skipped.
    wider = tiny_config(network={"max_features": 16})
    result = train_fold(
        wider,
        tiny.plan,
        train,
        val,
        tmp_path / "wider",
        device="cpu",
        progress=False,
        init=source / BEST_CHECKPOINT,
    )
    report = json.loads((tmp_path / "wider" / INIT_REPORT).read_text())
    assert report == result.init
    assert "encoder.0.conv1.weight" in report["matched"]
    assert "shape" in report["skipped"]["encoder.2.conv1.weight"]
    assert report["skipped"] and report["matched"]

    # A bare state dict of a DDP model (module. prefix) is understood too.
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in pretrained.items()}, bare)
    assert len(load_matching_weights(network, bare).matched) == len(pretrained)


def test_init_from_an_exported_fold_loads_every_weight_it_holds(tmp_path):
    """The shipped Task 1 demo's fold 1, read back from its ONNX file: every tensor of the
    network but the deep-supervision heads (which export drops) comes back exactly, including
    those the exporter stored once for two names (equal norm biases, as an Identity node)."""
    import onnx
    from onnx import numpy_helper

    from pantherseg.inference.plan import load_plan
    from training.config import load_config

    model = Path(__file__).resolve().parents[1] / "models" / "task1"
    config = load_config(model.parents[1] / "examples" / "demo_cpu.yaml")
    network = build_network(config.network, load_plan(model))
    report = load_matching_weights(network, model / "fold_1.onnx")
    heads = {n for n in network.state_dict() if n.startswith("deep_supervision_heads.")}
    assert heads and set(report.skipped) == heads and not report.unused
    graph = onnx.load(str(model / "fold_1.onnx")).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    assert any(name in report.matched for name in aliases)  # the Identity path is exercised
    state = network.state_dict()
    for name in report.matched:
        expected = stored[aliases.get(name, name)]
        assert torch.equal(state[name], torch.from_numpy(expected.copy())), name
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot be read as an ONNX model"):
        load_matching_weights(network, tmp_path / "junk.onnx")


def test_init_from_an_unrelated_checkpoint_is_an_error(tiny, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, path)
    network = build_network(tiny.config.network, tiny.plan)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_matching_weights(network, path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint"):
        load_matching_weights(network, tmp_path / "junk.pt")


def test_validation_runs_no_network_on_a_case_without_a_tumor(tiny, monkeypatch):
    """A tumor-free case has no Dice to add, so it costs no sliding window either; the case with
    a tumor is scored as before."""
    import numpy as np

    shape = tiny.plan.inference.patch_size_zyx
    tumor = np.zeros((1, *shape), np.uint8)
    tumor[0, 2:5, 2:6, 2:6] = 1
    labels = {"empty": np.zeros((1, *shape), np.uint8), "tumor": tumor}
    monkeypatch.setattr(
        trainer_module,
        "load_cached",
        lambda case, mmap=True: (labels[case.case_id].astype(np.float32), labels[case.case_id]),
    )
    seen = []

    def predictor(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        classes = tiny.plan.inference.classes
        logits = np.zeros((batch.shape[0], len(classes), *batch.shape[2:]), np.float32)
        logits[:, classes.index("tumor")] = 10 * batch[:, 0] - 5  # where the image (label) says
        return logits

    cases = [SimpleNamespace(case_id="empty"), SimpleNamespace(case_id="tumor")]
    scores = trainer_module.validate_cases(predictor, cases, tiny.plan, 0.5, 1)
    assert scores["dice"] == 1.0
    assert len(seen) == 1 and seen[0].max() == 1.0  # only the tumor case went through


def test_cpu_bfloat16_trains_and_validates_in_bfloat16_and_keeps_float32_weights(
    tiny, tmp_path, monkeypatch
):
    """optim.cpu_bfloat16 runs the network's convolutions in bfloat16 on the CPU, training steps
    and validation alike; the weights the checkpoint keeps (and ONNX exports) stay float32,
    and without the option everything is float32."""
    seen = {}
    real_build = trainer_module.build_network

    def watched(config, plan):
        network = real_build(config, plan)

        def record(module, inputs, output):
            first = output[0] if isinstance(output, list) else output  # deep supervision: a list
            key = (module.training, first.dtype)
            seen[key] = seen.get(key, 0) + 1

        network.register_forward_hook(record)
        return network

    monkeypatch.setattr(trainer_module, "build_network", watched)
    train, val = tiny.split()
    for name, bfloat16 in (("float32", False), ("bfloat16", True)):
        seen.clear()
        config = tiny_config(optim={"cpu_bfloat16": bfloat16})
        train_fold(config, tiny.plan, train, val, tmp_path / name, device="cpu", progress=False)
        dtype = torch.bfloat16 if bfloat16 else torch.float32
        assert {key[1] for key in seen} == {dtype}, name
        assert {key[0] for key in seen} == {True, False}, name  # training and validation
        history = json.loads((tmp_path / name / HISTORY_FILE).read_text())
        assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_dice"] <= 1
        saved = weights(tmp_path / name / LAST_CHECKPOINT)
        assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}


def test_autocast_precision_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer_module.autocast_dtype(cpu, amp=True, cpu_bfloat16=False) is None
    assert trainer_module.autocast_dtype(cpu, amp=False, cpu_bfloat16=True) == torch.bfloat16
    assert trainer_module.autocast_dtype(cuda, amp=True, cpu_bfloat16=True) == torch.float16
    assert trainer_module.autocast_dtype(cuda, amp=False, cpu_bfloat16=True) is None


@pytest.mark.parametrize("native", [True, False])
def test_auto_cpu_bfloat16_follows_the_hardware(native, monkeypatch):
    """'auto' trains in bfloat16 only where the CPU computes it natively (emulated bfloat16 took
    45 times a float32 step); true forces it anyway, and a GPU is not affected."""
    monkeypatch.setattr(trainer_module, "native_cpu_bfloat16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = torch.bfloat16 if native else None
    assert trainer_module.autocast_dtype(cpu, amp=False, cpu_bfloat16="auto") == expected
    assert trainer_module.autocast_dtype(cpu, amp=False, cpu_bfloat16=True) == torch.bfloat16
    assert trainer_module.autocast_dtype(cuda, amp=True, cpu_bfloat16="auto") == torch.float16


def test_a_process_that_ran_openvino_starts_loader_workers_afresh(tiny, tmp_path):
    """OpenVINO's thread pool does not survive fork(): after an OpenVINO engine ran here (as in a
    session that segmented, then trains), the workers come from a fresh interpreter and give
    the same batches as the main process."""
    import numpy as np
    from test_engines import conv_model

    from pantherseg.inference.engines import OpenVinoEngine

    engine = OpenVinoEngine(conv_model(tmp_path / "net.onnx"), threads=1)
    engine(np.ones((1, 2, 4, 4, 4), np.float32))
    config = tiny_config(sampling={"batch_size": 2}, optim={"iterations_per_epoch": 2})
    dataset = PatchDataset(tiny.cases, config, tiny.plan, fold=0)
    indices = list(range(len(dataset)))
    loader = epoch_loader(dataset, indices, 2, workers=2)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    alone = list(epoch_loader(dataset, indices, 2, workers=0))
    for (image, label), (image0, label0) in zip(loader, alone, strict=True):
        assert torch.equal(image, image0) and torch.equal(label, label0)
