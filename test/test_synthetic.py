"""Tests of the phantom generator: determinism, geometry, labels, intensities, file layout."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pantherseg.phantoms.synthetic import (
    DIRECTION_KINDS,
    Phantom,
    case_file_names,
    case_seed,
    generate_case,
    write_dataset,
)

REPO = Path(__file__).resolve().parents[1]


def arrays(p: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(p.image), sitk.GetArrayFromImage(p.label)


def geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def tumor_components(label: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(label == 1)


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["task1", "task2"])
def test_same_seed_gives_the_same_case_in_another_process(tmp_path, task):
    """Only the seed may decide a phantom: not what ran before, the global random generators, nor
    the hash seed. A fresh `pantherseg synth` process with its own PYTHONHASHSEED must write exactly
    what this process generates after other work, with the global generators moved."""
    command = ["synth", str(tmp_path), "-n", "2", "--seed", "11", "--task", task, "--size", "small"]
    subprocess.run(
        [sys.executable, "-m", "pantherseg.cli", *command],
        env=dict(os.environ, PYTHONHASHSEED="12345"),
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    written = json.loads((tmp_path / "phantoms.json").read_text())
    generate_case(3, task, "small")  # other work first
    np.random.random(), random.random()  # the global generators move on
    for k in (1, 0):  # and the cases in the other order
        info = written[k]
        here = generate_case(case_seed(11, k), task, "small")
        assert info["seed"] == case_seed(11, k)
        assert {key: info[key] for key in here.info} == json.loads(json.dumps(here.info))
        for key, image in (("image", here.image), ("label", here.label)):
            there = sitk.ReadImage(str(tmp_path / info[key]))
            np.testing.assert_array_equal(
                sitk.GetArrayFromImage(there), sitk.GetArrayFromImage(image)
            )
            assert_same_geometry(there, image)


def test_different_seeds_differ():
    a, b = generate_case(1, "task1", "small"), generate_case(2, "task1", "small")
    ia, la = arrays(a)
    ib, lb = arrays(b)
    assert geometry(a.image) != geometry(b.image) or not np.array_equal(ia, ib)
    assert ia.shape != ib.shape or not np.array_equal(la, lb)
    assert a.info["origin_xyz"] != b.info["origin_xyz"]


def test_case_seed_depends_on_seed_and_index_only():
    seeds = {case_seed(s, k) for s in range(3) for k in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("task", ["task1", "task2"])
def test_small_geometry_and_labels(seed, task):
    p = generate_case(seed, task, "small")
    img, lab = p.image, p.label
    assert img.GetPixelID() == sitk.sitkInt16
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(img, lab)
    nx, ny, nz = img.GetSize()
    assert 20 <= nz <= 28
    assert 48 <= ny <= 80 and 48 <= nx <= 80
    sx, sy, sz = img.GetSpacing()
    assert 5.5 <= sz <= 6.5
    assert sx == sy and 2.5 <= sx <= 7.5
    d = np.array(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
    assert abs(abs(np.linalg.det(d)) - 1.0) < 1e-9
    assert p.info["direction"] in DIRECTION_KINDS
    assert p.info["shape_zyx"] == [nz, ny, nx]
    np.testing.assert_allclose(p.info["spacing_zyx"], [sz, sy, sx])
    np.testing.assert_allclose(p.info["origin_xyz"], img.GetOrigin())
    np.testing.assert_allclose(p.info["direction_matrix"], img.GetDirection())
    arr, label = arrays(p)
    assert set(np.unique(label)) <= {0, 1, 2}
    assert (label == 2).sum() > 0, "pancreas missing"
    assert arr.min() >= 0
    assert p.info["n_tumors"] == tumor_components(label)[1]
    json.dumps(p.info)


def test_direction_kinds_are_the_documented_matrices():
    expected = {
        "lps": np.eye(3),
        "ras": np.diag([-1.0, -1.0, 1.0]),
        "flip-x": np.diag([-1.0, 1.0, 1.0]),
        "flip-y": np.diag([1.0, -1.0, 1.0]),
        "flip-z": np.diag([1.0, 1.0, -1.0]),
    }
    for kind, mat in expected.items():
        p = generate_case(3, "task1", "small", direction=kind)
        assert p.info["direction"] == kind
        np.testing.assert_array_equal(np.array(p.image.GetDirection()).reshape(3, 3), mat)
    d = np.array(generate_case(3, "task1", "small", direction="oblique").image.GetDirection())
    d = d.reshape(3, 3)
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
    angle = np.degrees(np.arccos(np.clip((np.trace(d) - 1) / 2, -1, 1)))
    assert 1.0 < angle <= 25.5


def test_directions_vary_across_seeds():
    kinds = {generate_case(s, "task1", "small").info["direction"] for s in range(16)}
    assert {"lps", "oblique"} <= kinds
    assert len(kinds) >= 4


@pytest.mark.parametrize(("kind", "axes"), [("flip-x", (2,)), ("flip-z", (0,)), ("ras", (1, 2))])
def test_flipped_direction_flips_array_content(kind, axes):
    """The anatomy lives in physical space: a mirrored grid over the same region mirrors the
    array; the label must match exactly once flipped back, and differ without flipping."""
    ref = generate_case(4, "task1", "small", direction="lps", motion=False)
    flp = generate_case(4, "task1", "small", direction=kind, motion=False)
    ia, la = arrays(ref)
    ib, lb = arrays(flp)
    assert ia.shape == ib.shape
    back = np.flip(lb, axes)
    assert (back == la).mean() > 0.999
    panc, panc_flipped = la == 2, lb == 2
    dice_raw = 2 * (panc & panc_flipped).sum() / (panc.sum() + panc_flipped.sum())
    assert dice_raw < 0.5, "flipping the direction did not change the array"
    corr_back = np.corrcoef(ia.ravel(), np.flip(ib, axes).ravel())[0, 1]
    corr_raw = np.corrcoef(ia.ravel(), ib.ravel())[0, 1]
    assert corr_back > 0.9
    assert corr_back > corr_raw + 0.15
    # the same physical point carries the same label
    for idx in [(5, 7, 3), (40, 30, 10), (20, 50, 15)]:
        pt = ref.label.TransformIndexToPhysicalPoint(idx)
        j = flp.label.TransformPhysicalPointToIndex(pt)
        assert la[idx[2], idx[1], idx[0]] == lb[j[2], j[1], j[0]]


def test_oblique_grid_samples_the_same_anatomy():
    ref = generate_case(5, "task1", "small", direction="lps", motion=False)
    obl = generate_case(5, "task1", "small", direction="oblique", motion=False)
    res = sitk.Resample(obl.label, ref.label, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayFromImage(ref.label) == 2
    b = sitk.GetArrayFromImage(res) == 2
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.6
    assert not np.array_equal(arrays(ref)[1].shape, arrays(obl)[1].shape) or not np.array_equal(
        arrays(ref)[1], arrays(obl)[1]
    )


@pytest.mark.parametrize("direction", ["lps", "oblique"])
@pytest.mark.parametrize("task", ["task1", "task2"])
def test_body_fits_field_of_view(direction, task):
    for seed in range(4):
        p = generate_case(seed, task, "small", direction=direction, motion=False)
        img = arrays(p)[0].astype(float)
        border = np.concatenate(
            [img[:, 0].ravel(), img[:, -1].ravel(), img[:, :, 0].ravel(), img[:, :, -1].ravel()]
        )
        assert np.percentile(border, 99) < 100.0, "the body touches the edge of the grid"


def test_forced_shape():
    p = generate_case(2, "task1", "small", shape_zyx=(22, 50, 66))
    assert p.image.GetSize() == (66, 50, 22)
    assert p.info["shape_zyx"] == [22, 50, 66]


# ---------------------------------------------------------------------------------------------
# tumors and intensities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("task", ["task1", "task2"])
def test_requested_tumor_count_and_contact_with_pancreas(n, task):
    for seed in range(3):
        p = generate_case(100 + seed, task, "small", n_tumors=n)
        _, label = arrays(p)
        comps, found = tumor_components(label)
        assert found == n
        assert p.info["n_tumors"] == n
        assert len(p.info["tumor_volumes_ml"]) == n
        grown = ndimage.binary_dilation(label == 2, iterations=1)
        for c in range(1, found + 1):
            assert np.any(grown & (comps == c)), "tumor does not touch the pancreas"
        vox_ml = np.prod(p.image.GetSpacing()) / 1000.0
        sizes = sorted(np.bincount(comps.ravel())[1:] * vox_ml)
        np.testing.assert_allclose(sorted(p.info["tumor_volumes_ml"]), sizes, atol=1e-3)


def test_tumor_probabilities_are_configurable():
    assert all(
        generate_case(s, "task1", "small", tumor_probs=(1.0, 0.0, 0.0)).info["n_tumors"] == 0
        for s in range(3)
    )
    assert all(
        generate_case(s, "task1", "small", tumor_probs=(0.0, 0.0, 1.0)).info["n_tumors"] == 2
        for s in range(3)
    )
    counts = [generate_case(s, "task1", "small").info["n_tumors"] for s in range(12)]
    assert counts.count(1) >= 6  # default favours one tumor


@pytest.mark.parametrize("seed", range(5))
def test_task1_tumor_darker_than_pancreas_and_plausible_range(seed):
    p = generate_case(seed, "task1", "small", n_tumors=1, motion=False)
    img, label = arrays(p)
    img = img.astype(float)
    tumor, panc = img[label == 1].mean(), img[label == 2].mean()
    assert tumor < panc
    assert 60.0 < tumor < 480.0  # real Task 1 tumor voxels: mean 207, 99.5th percentile 484
    assert 100.0 < panc < 900.0
    corners = np.concatenate([img[:, :3, :3].ravel(), img[:, -3:, -3:].ravel()])
    assert np.median(corners) < 40.0, "background is not near zero"
    assert np.percentile(img, 99.9) < 1500.0
    assert img.max() < 3000.0


def test_task2_contrast_is_t2_like():
    p = generate_case(8, "task2", "small", n_tumors=1, motion=False)
    img, label = arrays(p)
    img = img.astype(float)
    assert 100.0 < img[label == 2].mean() < 600.0
    assert np.percentile(img, 99.9) > 700.0  # bright fluid (stomach, CSF, gallbladder)
    corners = np.concatenate([img[:, :3, :3].ravel(), img[:, -3:, -3:].ravel()])
    assert np.median(corners) < 50.0


def test_motion_flag_changes_image_not_label():
    still = generate_case(9, "task1", "small", motion=False)
    moving = generate_case(9, "task1", "small", motion=True)
    assert still.info["motion"] is False and moving.info["motion"] is True
    i0, l0 = arrays(still)
    i1, l1 = arrays(moving)
    np.testing.assert_array_equal(l0, l1)
    assert np.abs(i0.astype(float) - i1.astype(float)).mean() > 3.0


def test_small_case_is_fast():
    start = time.perf_counter()
    generate_case(11, "task1", "small")
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_full_size_cases():
    for task, seed in (("task1", 3), ("task2", 5)):
        p = generate_case(seed, task, "full", n_tumors=2)
        img, label = arrays(p)
        assert_same_geometry(p.image, p.label)
        nx, ny, nz = p.image.GetSize()
        sx, sy, sz = p.image.GetSpacing()
        if task == "task1":
            assert 64 <= nz <= 88 and 220 <= ny <= 470 and 310 <= nx <= 570
            assert 3.0 <= sz <= 3.5 and 0.69 <= sx <= 1.3125 and sx == sy
            assert img[label == 1].mean() < img[label == 2].mean()
        else:
            assert 1.8 <= sz <= 2.2 and 0.9 <= sx <= 1.1 and sx == sy
        assert p.info["n_tumors"] == 2
        assert all(0.5 <= v <= 40.0 for v in p.info["tumor_volumes_ml"])
        # the body fits the field of view: the border of every slice is background
        border = np.concatenate(
            [img[:, 0].ravel(), img[:, -1].ravel(), img[:, :, 0].ravel(), img[:, :, -1].ravel()]
        )
        assert np.percentile(border, 95) < 80.0
    largest = generate_case(6, "task1", "full", shape_zyx=(88, 466, 570), n_tumors=1)
    assert largest.image.GetSize() == (570, 466, 88)
    vols = largest.info["tumor_volumes_ml"]
    assert len(vols) == 1 and 0.5 <= vols[0] <= 40.0


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_case_file_names():
    assert case_file_names("10003", "task1") == ("10003_0001_0000.mha", "10003_0001.mha")
    assert case_file_names("10003", "task2") == ("10003_0000.mha", "10003.mha")
    with pytest.raises(ValueError, match="task"):
        case_file_names("10003", "task3")


@pytest.mark.parametrize("task", ["task1", "task2"])
def test_write_dataset_layout(tmp_path, task):
    infos = write_dataset(
        tmp_path, 2, seed=5, task=task, size="small", first_id=123, progress=False
    )
    ids = ["00123", "00124"]
    assert [i["case_id"] for i in infos] == ids
    expected = {case_file_names(c, task) for c in ids}
    images = sorted(p.name for p in (tmp_path / "ImagesTr").iterdir())
    labels = sorted(p.name for p in (tmp_path / "LabelsTr").iterdir())
    assert images == sorted(e[0] for e in expected)
    assert labels == sorted(e[1] for e in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ImagesTr", "LabelsTr", "phantoms.json"]
    on_disk = json.loads((tmp_path / "phantoms.json").read_text())
    assert on_disk == infos
    for k, info in enumerate(on_disk):
        assert info["task"] == task and info["size"] == "small"
        assert info["seed"] == case_seed(5, k)
        img = sitk.ReadImage(str(tmp_path / info["image"]))
        lab = sitk.ReadImage(str(tmp_path / info["label"]))
        assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
        assert_same_geometry(img, lab)
        assert list(img.GetSize()[::-1]) == info["shape_zyx"]
        label = sitk.GetArrayFromImage(lab)
        assert set(np.unique(label)) <= {0, 1, 2}
        assert tumor_components(label)[1] == info["n_tumors"]
        fresh = generate_case(info["seed"], task, "small")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arrays(fresh)[0])
    raw = (tmp_path / "ImagesTr" / images[0]).read_bytes()
    assert b"CompressedData = True" in raw[:2000]


def test_case_k_does_not_depend_on_n_cases(tmp_path):
    one = write_dataset(tmp_path / "a", 1, seed=3, size="small", progress=False)
    three = write_dataset(tmp_path / "b", 3, seed=3, size="small", progress=False)
    assert one[0] == three[0]
    a = sitk.ReadImage(str(tmp_path / "a" / one[0]["image"]))
    b = sitk.ReadImage(str(tmp_path / "b" / three[0]["image"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert three[1]["seed"] != three[0]["seed"]


def test_parallel_generation_writes_the_same_dataset(tmp_path):
    serial = write_dataset(tmp_path / "serial", 3, seed=5, size="small", progress=False)
    parallel = write_dataset(tmp_path / "parallel", 3, seed=5, size="small", progress=False, jobs=2)
    assert parallel == serial  # same order, same descriptions
    assert json.loads((tmp_path / "parallel" / "phantoms.json").read_text()) == serial
    for info in serial:
        for key in ("image", "label"):
            a = sitk.ReadImage(str(tmp_path / "serial" / info[key]))
            b = sitk.ReadImage(str(tmp_path / "parallel" / info[key]))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "task3"}, "task"),
        ({"size": "huge"}, "size"),
        ({"n_tumors": 3}, "n_tumors"),
        ({"n_tumors": -1}, "n_tumors"),
        ({"n_tumors": 1.0}, "n_tumors"),
        ({"n_tumors": True}, "n_tumors"),
        ({"direction": "sideways"}, "direction"),
        ({"shape_zyx": (2, 50, 50)}, "shape_zyx"),
        ({"tumor_probs": (0.0, 0.0, 0.0)}, "tumor_probs"),
        ({"motion_prob": 1.5}, "motion_prob"),
    ],
)
def test_generate_case_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_case(0, **{"size": "small", **kwargs})


def test_generate_case_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        generate_case(-1, size="small")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_cases": 0}, "n_cases"),
        ({"n_cases": -2}, "n_cases"),
        ({"n_cases": 1, "task": "t1"}, "task"),
        ({"n_cases": 1, "size": "medium"}, "size"),
        ({"n_cases": 1, "jobs": 0}, "jobs"),
    ],
)
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
