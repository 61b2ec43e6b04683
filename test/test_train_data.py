"""Training data: layout discovery, per-case validation, and the fingerprint the planner reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import write_image

from pantherseg.inference.preprocess import nonzero_box
from pantherseg.phantoms.synthetic import write_dataset
from training.data import (
    Case,
    DatasetError,
    Fingerprint,
    discover,
    fingerprint,
    validate,
)

REFERENCE = Path(__file__).parent / "data" / "panther_task1_fingerprint.json"


@pytest.fixture(scope="module")
def task1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task1")
    write_dataset(root, 3, seed=1, task="task1", size="small", progress=False)
    return root


@pytest.fixture(scope="module")
def task2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task2")
    write_dataset(root, 2, seed=2, task="task2", size="small", progress=False)
    return root


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def as_nnunet(source: Path, target: Path, channel: str = "MRI", labels=None) -> Path:
    """The Task 2 phantoms rewritten as an nnU-Net raw dataset."""
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    for image in sorted((source / "ImagesTr").iterdir()):
        shutil.copy(image, target / "imagesTr" / image.name)
    for label in sorted((source / "LabelsTr").iterdir()):
        shutil.copy(label, target / "labelsTr" / label.name)
    description = {
        "channel_names": {"0": channel},
        "labels": labels or {"background": 0, "tumor": 1, "pancreas": 2},
        "numTraining": 2,
        "file_ending": ".mha",
    }
    (target / "dataset.json").write_text(json.dumps(description))
    return target


# --------------------------------------------------------------------------------------------
# discover
# --------------------------------------------------------------------------------------------


def test_discovers_panther_task1(task1):
    dataset = discover(task1)
    assert (dataset.layout, dataset.task) == ("panther-task1", "task1")
    assert [c.case_id for c in dataset.labelled] == ["10000_0001", "10001_0001", "10002_0001"]
    first = dataset.labelled[0]
    assert first.image == task1 / "ImagesTr" / "10000_0001_0000.mha"
    assert first.label == task1 / "LabelsTr" / "10000_0001.mha"
    assert dataset.unlabelled == []


def test_a_dataset_json_beside_panther_folders_changes_nothing(task1, tmp_path):
    root = copy_dataset(task1, tmp_path / "ds")
    (root / "dataset.json").write_text("{}")
    assert discover(root).layout == "panther-task1"


def test_discovers_panther_task2(task2):
    dataset = discover(task2)
    assert (dataset.layout, dataset.task) == ("panther-task2", "task2")
    assert [c.case_id for c in dataset.labelled] == ["10000", "10001"]
    assert dataset.labelled[1].label == task2 / "LabelsTr" / "10001.mha"


def test_task_override_must_match_task1_naming(task1, task2):
    with pytest.raises(DatasetError, match=r"<id>_0001_0000.*10000_0000\.mha"):
        discover(task2, task="task1")
    relabelled = discover(task1, task="task2")  # Task 2 naming accepts any case id
    assert (relabelled.layout, relabelled.task) == ("panther-task2", "task2")
    with pytest.raises(DatasetError, match="task must be one of"):
        discover(task1, task="task3")


def test_unlabelled_folder_accepts_any_image_names(task1, tmp_path):
    root = copy_dataset(task1, tmp_path / "ds")
    unlabelled = root / "ImagesTr_unlabeled"
    (unlabelled / "sub").mkdir(parents=True)
    source = root / "ImagesTr" / "10000_0001_0000.mha"
    shutil.copy(source, unlabelled / "20000_0002_0000.mha")
    shutil.copy(source, unlabelled / "sub" / "scan-b.mha")
    (unlabelled / "notes.txt").write_text("not an image")
    (root / "ImagesTr" / "._10000_0001_0000.mha").write_bytes(b"macOS metadata")
    dataset = discover(root)
    assert [(c.case_id, c.label) for c in dataset.unlabelled] == [
        ("20000_0002", None),
        ("scan-b", None),
    ]
    assert len(dataset.labelled) == 3


def test_image_without_label_and_orphan_label_are_named(task1, tmp_path):
    root = copy_dataset(task1, tmp_path / "ds")
    (root / "LabelsTr" / "10001_0001.mha").unlink()
    with pytest.raises(DatasetError, match=r"without a label: 10001_0001_0000\.mha"):
        discover(root)
    root = copy_dataset(task1, tmp_path / "ds2")
    (root / "ImagesTr" / "10002_0001_0000.mha").unlink()
    with pytest.raises(DatasetError, match=r"without an image: 10002_0001\.mha"):
        discover(root)


def test_missing_or_empty_folders(task1, tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        discover(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a dataset folder"):
        discover(tmp_path / "plain")
    root = copy_dataset(task1, tmp_path / "nolabels")
    shutil.rmtree(root / "LabelsTr")
    with pytest.raises(DatasetError, match=r"LabelsTr: folder not found"):
        discover(root)
    root = copy_dataset(task1, tmp_path / "empty")
    for path in (root / "ImagesTr").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"ImagesTr: no image files found"):
        discover(root)


def test_image_names_need_the_channel_suffix(task2, tmp_path):
    root = copy_dataset(task2, tmp_path / "ds")
    (root / "ImagesTr" / "10000_0000.mha").rename(root / "ImagesTr" / "10000.mha")
    with pytest.raises(DatasetError, match=r"must end in _0000.*10000\.mha"):
        discover(root)


def test_discovers_nnunet_dataset(task2, tmp_path):
    dataset = discover(as_nnunet(task2, tmp_path / "nn"))
    assert (dataset.layout, dataset.task) == ("nnunet", "task1")  # "MRI" says nothing: default
    assert [c.case_id for c in dataset.labelled] == ["10000", "10001"]
    assert dataset.labelled[0].image.parent.name == "imagesTr"
    t2 = discover(as_nnunet(task2, tmp_path / "t2", channel="T2w"))
    assert t2.task == "task2"
    assert discover(tmp_path / "t2", task="task1").task == "task1"


def test_nnunet_v1_labels_and_file_ending_filter(task2, tmp_path):
    root = as_nnunet(task2, tmp_path / "nn", labels={"0": "background", "1": "tumor"})
    shutil.copy(root / "imagesTr" / "10000_0000.mha", root / "imagesTr" / "extra_0000.nii.gz")
    dataset = discover(root)  # the .nii.gz file is not of this dataset's file ending
    assert [c.case_id for c in dataset.labelled] == ["10000", "10001"]


def test_nnunet_multichannel_is_refused(task2, tmp_path):
    root = as_nnunet(task2, tmp_path / "files")
    shutil.copy(root / "imagesTr" / "10000_0000.mha", root / "imagesTr" / "10000_0001.mha")
    with pytest.raises(DatasetError, match=r"multi-channel.*10000_0001\.mha"):
        discover(root)
    root = as_nnunet(task2, tmp_path / "json")
    description = json.loads((root / "dataset.json").read_text())
    description["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match="multi-channel datasets are not supported"):
        discover(root)


def test_nnunet_bad_descriptions(task2, tmp_path):
    root = as_nnunet(task2, tmp_path / "broken")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset\.json: cannot be read as JSON"):
        discover(root)
    (root / "dataset.json").write_text("[]")
    with pytest.raises(DatasetError, match="JSON object"):
        discover(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"needs a dataset\.json"):
        discover(root)
    swapped = as_nnunet(task2, tmp_path / "swapped", labels={"background": 0, "tumor": 2})
    with pytest.raises(DatasetError, match="tumor=2"):
        discover(swapped)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


def test_clean_phantoms_have_no_errors(task1):
    problems = validate(discover(task1), jobs=1, progress=False)
    assert [p for p in problems if p.severity == "error"] == []


def _array(shape=(6, 10, 12), value=100.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (value + rng.normal(0, 10, shape)).astype(np.float32)


def _label(shape=(6, 10, 12), values=(1,)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        label[2 + i, 3:6, 3:6] = v
    return label


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """A Task 2 layout with one problem per case (the case id says which)."""
    root = tmp_path_factory.mktemp("broken")

    def case(case_id, image, label, image_geometry=None, label_geometry=None):
        write_image(root / "ImagesTr" / f"{case_id}_0000.mha", image, **(image_geometry or {}))
        write_image(root / "LabelsTr" / f"{case_id}.mha", label, **(label_geometry or {}))

    case("good", _array(), _label())
    case("pancreas", _array(), _label(values=(1, 2)))
    case("empty", _array(), _label(values=()))
    case("spacing", _array(), _label(), label_geometry={"spacing_xyz": (1.25, 1.25, 3.001)})
    case("origin", _array(), _label(), label_geometry={"origin": (10.0, -5.0, 2.01)})
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    case("direction", _array(), _label(), label_geometry={"direction": flipped})
    case("size", _array(), _label(shape=(6, 10, 13)))
    case("value3", _array(), _label(values=(1, 3)))
    nan = _array()
    nan[0, 0, 0] = np.nan
    case("nan", nan, _label())
    flat_image = sitk.GetImageFromArray(_array((10, 12)))
    sitk.WriteImage(flat_image, str(root / "ImagesTr" / "flat_0000.mha"))
    flat_label = np.zeros((10, 12), np.uint8)
    flat_label[3:6, 3:6] = 1
    sitk.WriteImage(sitk.GetImageFromArray(flat_label), str(root / "LabelsTr" / "flat.mha"))
    write_image(root / "LabelsTr" / "garbage.mha", _label())
    (root / "ImagesTr" / "garbage_0000.mha").write_bytes(b"this is not an image")
    return root


def test_validate_reports_each_problem_on_its_case(broken):
    dataset = discover(broken)
    problems = validate(dataset, labels="tumor", jobs=2, progress=False)
    by_case: dict[str, list] = {}
    for p in problems:
        by_case.setdefault(p.case_id, []).append(p)
    errors = {c for c, ps in by_case.items() if any(p.severity == "error" for p in ps)}
    assert errors == {"spacing", "origin", "direction", "size", "value3", "nan", "flat", "garbage"}
    assert "good" not in by_case and "pancreas" not in by_case
    assert [(p.problem, p.severity) for p in by_case["empty"]] == [("no tumor voxel", "warning")]

    def text(case_id):
        return " | ".join(p.problem for p in by_case[case_id] if p.severity == "error")

    assert "spacing" in text("spacing")
    assert "origin" in text("origin")
    assert "direction" in text("direction")
    assert "size" in text("size")
    assert "values 3 outside" in text("value3")
    assert "NaN" in text("nan")
    assert "2D" in text("flat")
    assert "cannot be read" in text("garbage")


def test_validate_three_class_mode_warns_about_missing_pancreas(broken):
    dataset = discover(broken)
    chosen = [c for c in dataset.labelled if c.case_id in ("good", "pancreas")]
    dataset.labelled = chosen
    problems = validate(dataset, labels="tumor+pancreas", jobs=1, progress=False)
    assert [(p.case_id, p.problem, p.severity) for p in problems] == [
        ("good", "no pancreas voxel", "warning")
    ]
    with pytest.raises(ValueError, match="labels must be one of"):
        validate(dataset, labels="pancreas", progress=False)


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


def test_fingerprint_matches_direct_computation(task1):
    dataset = discover(task1)
    fp = fingerprint(dataset, jobs=1, progress=False)
    assert fp.case_ids == [c.case_id for c in dataset.labelled]
    pooled = []
    for case, spacing, shape in zip(
        dataset.labelled, fp.spacings_zyx, fp.shapes_after_crop_zyx, strict=True
    ):
        image = sitk.ReadImage(str(case.image))
        array = sitk.GetArrayFromImage(image)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        assert spacing == tuple(reversed(image.GetSpacing()))
        start, stop = nonzero_box(array)
        assert shape == tuple(b - a for a, b in zip(start, stop, strict=True))
        pooled.append(array[label > 0].astype(np.float64))
    values = np.concatenate(pooled)
    assert values.size < 3 * 10_000  # small phantoms: every foreground voxel is used
    stats = fp.foreground_intensity
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std())
    assert stats["median"] == pytest.approx(np.median(values))
    assert (stats["min"], stats["max"]) == (values.min(), values.max())
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(values, 99.5))


def test_fingerprint_samples_large_foregrounds_reproducibly(tmp_path):
    shape = (20, 40, 40)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    label = np.ones(shape, np.uint8)  # 32000 foreground voxels, more than the 10000 sampled
    for case_id in ("a", "b"):
        write_image(tmp_path / "ImagesTr" / f"{case_id}_0000.mha", image)
        write_image(tmp_path / "LabelsTr" / f"{case_id}.mha", label)
    dataset = discover(tmp_path)
    serial = fingerprint(dataset, jobs=1, progress=False)
    parallel = fingerprint(dataset, jobs=2, progress=False)
    assert serial == parallel
    stats = serial.foreground_intensity
    assert stats["min"] >= 1 and stats["max"] <= image.max()
    assert stats["mean"] == pytest.approx(image.mean(), rel=0.02)
    assert stats["mean"] != pytest.approx(image.mean(), rel=1e-9)  # a sample, not everything


def test_fingerprint_json_round_trip(task2):
    fp = fingerprint(discover(task2), jobs=1, progress=False)
    again = Fingerprint.from_json(json.loads(json.dumps(fp.to_json())))
    assert again == fp
    with pytest.raises(DatasetError, match="not a fingerprint"):
        Fingerprint.from_json({"case_ids": ["a"]})
    with pytest.raises(DatasetError, match="1 cases, 2 spacings"):
        Fingerprint(["a"], [(1, 1, 1), (1, 1, 1)], [(2, 2, 2)], {})
    with pytest.raises(DatasetError, match="positive"):
        Fingerprint(["a"], [(1, 0, 1)], [(2, 2, 2)], {})


def test_reads_the_organisers_nnunet_fingerprint():
    fp = Fingerprint.from_nnunet(json.loads(REFERENCE.read_text()))
    assert len(fp.case_ids) == len(set(fp.case_ids)) == 92
    # nnU-Net's array order is (z, y, x): the 3 mm slice spacing comes first.
    assert fp.spacings_zyx[0] == (3.0, 1.1875, 1.1875)
    assert all(s[0] >= 3.0 > s[1] for s in fp.spacings_zyx)
    assert tuple(np.median(np.asarray(fp.shapes_after_crop_zyx), axis=0)) == (72, 258, 318)
    assert fp.foreground_intensity["mean"] == pytest.approx(207.0989, abs=1e-3)
    assert fp.foreground_intensity["percentile_99_5"] == 484.0
    with pytest.raises(DatasetError, match="missing"):
        Fingerprint.from_nnunet({"spacings": []})


def test_case_is_a_value():
    case = Case("a", Path("x_0000.mha"), None)
    assert case == Case("a", Path("x_0000.mha"), None)
    with pytest.raises(AttributeError):
        case.case_id = "b"  # frozen: cases are shared between processes as plain values
