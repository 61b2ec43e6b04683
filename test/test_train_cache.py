"""The preprocessed cache: it holds exactly what inference computes, and it is rebuilt only when
the plan or the label mode changes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import replace_label_value

import training.cache as cache_module
from pantherseg.inference.io import check_inference_image, read_image
from pantherseg.inference.preprocess import preprocess, preprocess_label
from pantherseg.phantoms.synthetic import write_dataset
from training.cache import (
    CacheError,
    load_cache_index,
    load_cached,
    preprocess_dataset,
)
from training.config import TrainingConfig
from training.data import discover, fingerprint
from training.planner import plan_from_fingerprint


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task1")
    write_dataset(root, 3, seed=3, task="task1", size="small", progress=False)
    # One case inside a zero border, so that cropping to the nonzero box really crops.
    path = root / "ImagesTr" / "10001_0001_0000.mha"
    image = sitk.ReadImage(str(path))
    padded = sitk.ConstantPad(image, (3, 2, 1), (4, 0, 2), 0)
    label_path = root / "LabelsTr" / "10001_0001.mha"
    label = sitk.ConstantPad(sitk.ReadImage(str(label_path)), (3, 2, 1), (4, 0, 2), 0)
    sitk.WriteImage(padded, str(path), useCompression=True)
    sitk.WriteImage(label, str(label_path), useCompression=True)
    return root


@pytest.fixture(scope="module")
def dataset(dataset_root):
    return discover(dataset_root)


@pytest.fixture(scope="module")
def plan(dataset):
    return plan_from_fingerprint(
        fingerprint(dataset, jobs=1, progress=False), TrainingConfig(), dataset.task
    )


@pytest.fixture(scope="module")
def built(dataset, plan, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    return cache_dir, preprocess_dataset(dataset, plan, cache_dir, jobs=2, progress=False)


def inference_input(path: Path, plan):
    """What pantherseg's inference feeds the network for this file."""
    image = read_image(path)
    array = check_inference_image(image, path)
    spacing = tuple(reversed(image.GetSpacing()))
    return preprocess(array, spacing, plan.preprocessing, direction_xyz=image.GetDirection())


def test_cached_image_equals_what_inference_computes(dataset, plan, built):
    _, cases = built
    assert [c.case_id for c in cases] == [c.case_id for c in dataset.labelled]
    for case, cached in zip(dataset.labelled, cases, strict=True):
        expected, record = inference_input(case.image, plan)
        image, _ = load_cached(cached)
        assert image.dtype == np.float32 and image.shape == (1, *expected.shape)
        assert np.array_equal(image[0], expected)
        assert cached.record == record
    padded = cases[1].record
    assert padded.crop_start != (0, 0, 0) and padded.cropped_shape != padded.original_shape


def test_cached_labels_tumor_mode(dataset, plan, built):
    _, cases = built
    for case, cached in zip(dataset.labelled, cases, strict=True):
        _, label = load_cached(cached, mmap=False)
        assert label.dtype == np.uint8 and not isinstance(label, np.memmap)
        assert set(np.unique(label).tolist()) <= {0, 1}
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        assert 2 in source  # the phantoms have a pancreas, and it was dropped
        expected = preprocess_label((source == 1).astype(np.uint8), cached.record)
        assert np.array_equal(label[0], expected)
        counts = np.bincount(label.ravel(), minlength=2)
        assert cached.class_voxels == {0: int(counts[0]), 1: int(counts[1])}
        assert cached.class_voxels[1] > 0


def test_cached_labels_three_class_mode(dataset, plan, tmp_path):
    cases = preprocess_dataset(
        dataset, plan, tmp_path, labels="tumor+pancreas", jobs=1, progress=False
    )
    for case, cached in zip(dataset.labelled, cases, strict=True):
        _, label = load_cached(cached)
        source = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        assert np.array_equal(label[0], preprocess_label(source, cached.record))
        assert set(cached.class_voxels) == {0, 1, 2} and cached.class_voxels[2] > 0


def test_files_and_index(plan, built):
    cache_dir, cases = built
    assert load_cache_index(cache_dir) == cases
    assert load_cache_index(cache_dir, plan, "tumor") == cases
    with pytest.raises(CacheError, match="other preprocessing settings or labels"):
        load_cache_index(cache_dir, plan, "tumor+pancreas")
    index = json.loads((cache_dir / "cache.json").read_text())
    assert index["complete"] and index["labels"] == "tumor" and len(index["key"]) == 64
    for case in cases:
        folder = cache_dir / case.case_id
        assert sorted(p.name for p in folder.iterdir()) == ["image.npy", "label.npy", "record.json"]
        image, label = load_cached(case)
        assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]


class Counting:
    """Wraps the per-case worker (jobs=1 runs it in this process) to count or interrupt it."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.original = cache_module._preprocess_case
        monkeypatch.setattr(cache_module, "_preprocess_case", self)

    def __call__(self, job):
        self.calls.append(job[0].case_id)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # as if the run were killed here
        return self.original(job)


def test_unchanged_plan_reuses_changed_plan_rebuilds(dataset, plan, tmp_path, monkeypatch):
    first = preprocess_dataset(dataset, plan, tmp_path, jobs=1, progress=False)
    stamp = {c.case_id: os.stat(c.image_path).st_mtime_ns for c in first}
    counter = Counting(monkeypatch)
    again = preprocess_dataset(dataset, plan, tmp_path, jobs=1, progress=False)
    assert counter.calls == [] and again == first
    assert {c.case_id: os.stat(c.image_path).st_mtime_ns for c in again} == stamp

    coarser = dataclasses.replace(
        plan,
        preprocessing=dataclasses.replace(
            plan.preprocessing,
            target_spacing_zyx=tuple(2 * s for s in plan.preprocessing.target_spacing_zyx),
        ),
    )
    rebuilt = preprocess_dataset(dataset, coarser, tmp_path, jobs=1, progress=False)
    assert counter.calls == [c.case_id for c in dataset.labelled]
    for old, new in zip(first, rebuilt, strict=True):
        assert load_cached(new)[0].shape[1:] == new.record.resampled_shape
        assert new.record.resampled_shape != old.record.resampled_shape
        assert new.record.target_spacing_zyx == coarser.preprocessing.target_spacing_zyx
        with pytest.raises(CacheError, match="rebuild the cache"):
            load_cached(old)  # the old description no longer matches the files

    counter.calls.clear()
    preprocess_dataset(dataset, coarser, tmp_path, labels="tumor+pancreas", jobs=1, progress=False)
    assert len(counter.calls) == 3  # another label mode is another cache


def test_a_killed_run_continues_where_it_stopped(dataset, plan, tmp_path, monkeypatch):
    counter = Counting(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(dataset, plan, tmp_path, jobs=1, progress=False)
    with pytest.raises(CacheError, match="incomplete"):
        load_cache_index(tmp_path)
    counter.calls.clear()
    counter.fail_at = None
    cases = preprocess_dataset(dataset, plan, tmp_path, jobs=1, progress=False)
    assert counter.calls == [c.case_id for c in dataset.labelled[1:]]
    assert load_cache_index(tmp_path) == cases


def test_replaced_source_file_is_preprocessed_again(dataset_root, plan, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    local = discover(root)
    preprocess_dataset(local, plan, tmp_path / "cache", jobs=1, progress=False)
    label_path = local.labelled[2].label
    label = sitk.ReadImage(str(label_path))
    sitk.WriteImage(sitk.Cast(label, sitk.sitkInt16), str(label_path))  # same values, new file
    counter = Counting(monkeypatch)
    preprocess_dataset(local, plan, tmp_path / "cache", jobs=1, progress=False)
    assert counter.calls == [local.labelled[2].case_id]


def test_failing_cases_are_named_after_the_others_finish(dataset_root, plan, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    local = discover(root)
    local.labelled[0].image.write_bytes(b"broken")
    with pytest.raises(CacheError, match=r"(?s)1 case\(s\).*case 10000_0001:.*cannot be read"):
        preprocess_dataset(local, plan, tmp_path / "cache", jobs=1, progress=False)
    done = sorted(p.parent.name for p in (tmp_path / "cache").glob("*/record.json"))
    assert done == ["10001_0001", "10002_0001"]


def test_label_value_outside_the_classes_is_an_error(dataset_root, plan, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    local = discover(root)
    label_path = local.labelled[1].label
    replace_label_value(label_path, 2, 5)
    with pytest.raises(CacheError, match=r"case 10001_0001:.*label values \[5\]"):
        preprocess_dataset(local, plan, tmp_path / "cache", jobs=1, progress=False)


def test_foreign_folders_survive_invalidation(dataset, plan, tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("do not delete")
    preprocess_dataset(dataset, plan, tmp_path, jobs=1, progress=False)
    assert (keep / "mine.txt").is_file()
    with pytest.raises(CacheError, match="no cache index"):
        load_cache_index(tmp_path / "elsewhere")
