"""A tiny training setup shared by the trainer, cross-validation, export, CLI and DDP tests: four
small phantoms (plus one unlabelled scan), a plan with a 16 x 32 x 32 patch at 6 mm, and their
preprocessed cache, made once per test session. Tests must not change these files; each one
trains into its own tmp_path.

Use: `from training_fixtures import tiny_setup  # noqa: F401` makes the `tiny` fixture
available to a test module."""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pantherseg.inference.plan import Plan
from pantherseg.phantoms.synthetic import write_dataset
from training.cache import CachedCase, preprocess_dataset
from training.config import TrainingConfig, load_config
from training.data import Dataset, discover, fingerprint
from training.planner import plan_from_fingerprint

N_LABELLED = 4
UNLABELLED_DIR = "ImagesTr_unlabeled"

# Everything small: a few seconds per epoch on one CPU core.
TINY = {
    # One network with a tumor output: the tests of the two-stage pipeline ask for it themselves.
    "data": {"jobs": 1, "labels": "tumor"},
    "cascade": {"enabled": False},
    "plan": {
        "gpu_memory_gb": 1.2,
        "target_spacing_zyx": [6.0, 6.0, 6.0],
        "patch_size_zyx": [16, 32, 32],
    },
    "sampling": {"batch_size": 2, "workers": 0},
    # One mirrored axis: cross-validation measures test-time mirroring at twice the passes.
    "augmentation": {"probability": 0.2, "mirror_axes": [2]},
    "network": {"base_features": 4, "max_features": 8, "depth": 3},
    "optim": {"epochs": 1, "iterations_per_epoch": 2, "amp": False},
    "validation": {"batch_size": 2, "tile_step": 0.5},
    "cv": {"folds": 2, "thresholds": [0.5], "min_component_mm3": [0.0, 100.0]},
}


def _deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def tiny_values(**sections) -> dict:
    """TINY with some sections' keys changed, e.g. tiny_values(optim={"epochs": 2})."""
    return _deep_update(copy.deepcopy(TINY), sections)


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_values(**sections)), encoding="utf-8")
    return path


def tiny_config(**sections) -> TrainingConfig:
    """The tiny configuration through the real loader (defaults, then the overrides)."""
    with tempfile.TemporaryDirectory() as folder:
        return load_config(write_config(Path(folder) / "tiny.yaml", **sections))


@dataclass
class TinySetup:
    root: Path  # the dataset folder (PANTHER Task 1 layout, with one unlabelled scan)
    dataset: Dataset
    config: TrainingConfig
    config_path: Path
    plan: Plan
    cache_dir: Path
    cases: list[CachedCase]

    def split(self) -> tuple[list[CachedCase], list[CachedCase]]:
        """Three training cases and one validation case."""
        return self.cases[:-1], self.cases[-1:]


def make_tiny_dataset(root: Path, n_labelled: int = N_LABELLED, seed: int = 3) -> Path:
    """`n_labelled` small Task 1 phantoms and one more whose image sits, without its label, in
    ImagesTr_unlabeled/ (as PANTHER Task 1's unannotated scans)."""
    infos = write_dataset(
        root, n_labelled + 1, seed=seed, task="task1", size="small", progress=False
    )
    last = infos[-1]
    (root / UNLABELLED_DIR).mkdir()
    shutil.move(root / last["image"], root / UNLABELLED_DIR / Path(last["image"]).name)
    (root / last["label"]).unlink()
    return root


_BUILT: dict[Path, TinySetup] = {}


@pytest.fixture(scope="session", name="tiny")
def tiny_setup(tmp_path_factory) -> TinySetup:
    # Each test module that imports this fixture gets its own copy of it, so the setup itself is
    # kept here: built once per test session (per base temporary folder), whoever asks first.
    key = tmp_path_factory.getbasetemp()
    if key not in _BUILT:
        _BUILT[key] = _build(tmp_path_factory.mktemp("tiny_training"))
    return _BUILT[key]


def _build(base: Path) -> TinySetup:
    root = make_tiny_dataset(base / "data")
    config_path = write_config(base / "tiny.yaml")
    config = load_config(config_path)
    dataset = discover(root)
    plan = plan_from_fingerprint(fingerprint(dataset, jobs=1, progress=False), config, "task1")
    cache_dir = base / "cache"
    cases = preprocess_dataset(dataset, plan, cache_dir, jobs=1, progress=False)
    return TinySetup(root, dataset, config, config_path, plan, cache_dir, cases)
