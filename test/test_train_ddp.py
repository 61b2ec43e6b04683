"""Distributed training on the CPU: two processes with the gloo backend train one tiny epoch; both
end with the same weights (DDP averaged the gradients) and only rank 0 writes the fold's files.
Also `torchrun -m training cv` as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from training_fixtures import tiny_config, tiny_setup  # noqa: F401  (the `tiny` fixture)

import training.trainer as trainer_module
from training.trainer import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT, train_fold

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, config, plan, train, val, out_dir):
    """One torchrun-like process: the environment torchrun would set, then the trainer."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    networks, started = [], {}
    build = trainer_module.build_network

    def keep(*args, **kwargs):
        networks.append(build(*args, **kwargs))
        # The parameters this run starts from (no --init, no resume): training changes them in
        # place, buffers such as normalisation statistics would change without a step.
        started.update({k: p.detach().clone() for k, p in networks[-1].named_parameters()})
        return networks[-1]

    trainer_module.build_network = keep
    result = train_fold(config, plan, train, val, out_dir, device="cpu", progress=False)
    assert not torch.distributed.is_initialized()  # the trainer ended the group it began
    torch.save(
        {"network": networks[0].state_dict(), "started": started, "epochs": result.epochs_run},
        Path(out_dir).parent / f"rank{rank}.pt",
    )


@pytest.mark.parametrize("name", ["attention_unet", "dynunet"])
def test_two_gloo_processes_end_with_the_same_weights(tiny, tmp_path, name):
    # Two batches per epoch: one step in each process.
    config = tiny_config(network={"name": name}, optim={"iterations_per_epoch": 2})
    train, val = tiny.split()
    out_dir = tmp_path / "fold_0"
    mp.spawn(
        _worker,
        args=(free_port(), config, tiny.plan, train, val, str(out_dir)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["epochs"] for r in ranks] == [1, 1]
    saved = torch.load(out_dir / LAST_CHECKPOINT, weights_only=False)
    for key, value in saved["network"].items():
        assert torch.equal(ranks[0]["network"][key], value), key
        assert torch.equal(ranks[1]["network"][key], value), key
    started = ranks[0]["started"]
    assert started and set(started) <= set(saved["network"])
    changed = sum(not torch.equal(started[key], saved["network"][key]) for key in started)
    assert changed > 0  # it trained: an optimiser step moved the weights it started from
    assert (out_dir / BEST_CHECKPOINT).is_file()
    history = json.loads((out_dir / HISTORY_FILE).read_text())
    assert len(history) == 1 and history[0]["val_dice"] >= 0
    assert len(list((out_dir / "tensorboard").glob("events.*"))) == 1  # rank 0's only


def test_torchrun_cross_validation(tiny, tmp_path):
    """`torchrun -m training cv`: both folds trained by two processes, then out-of-fold
    prediction and the post-processing choice on rank 0 alone."""
    from training.__main__ import main

    work = tmp_path / "work"
    plan = ["plan", "--data", tiny.root, "--work", work, "--config", tiny.config_path]
    assert main([str(a) for a in plan]) == 0
    assert main(["preprocess", "--work", str(work)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "training", "cv", "--work", str(work), "--device", "cpu",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:  # hung: end torchrun and its workers, nothing else
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.count("fold 1: best validation Dice") == 1  # printed by rank 0 only
    assert stdout.count("post-processing t0.5") == 1
    for fold in (0, 1):
        assert (work / f"fold_{fold}" / LAST_CHECKPOINT).is_file()
        assert json.loads((work / f"fold_{fold}" / "result.json").read_text())["epochs_run"] == 1
    assert len(list((work / "out_of_fold").glob("*.npz"))) == len(tiny.cases)
    assert (work / "cross_validation.json").is_file()
