"""`python -m training`: the whole workflow on a tiny dataset, `all` in one go, self-training with
pseudo-labels and fine-tuning, and exit status 2 with a clear message for what a user gets wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from imaging import replace_label_value
from training_fixtures import UNLABELLED_DIR, tiny_setup, write_config  # noqa: F401

from pantherseg.inference.io import Geometry
from pantherseg.inference.plan import load_plan
from training.__main__ import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORK_FILES = [
    "config.yaml",
    "dataset.json",
    "fingerprint.json",
    "planning.json",
    "plan.json",
    "cache/cache.json",
    "splits.json",
    "fold_0/best.pt",
    "fold_0/last.pt",
    "fold_0/result.json",
    "fold_1/best.pt",
    "fold_1/result.json",
    "cross_validation.json",
]
MODEL_FILES = ["fold_0.onnx", "fold_1.onnx", "plan.json", "README.md", "metadata.json"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def check_trained(work, model, n_cases):
    for name in WORK_FILES:
        assert (work / name).is_file(), name
    assert len(list((work / "out_of_fold").glob("*.npz"))) == n_cases
    assert len(list((work / "out_of_fold_mirrored").glob("*.npz"))) == n_cases
    for name in MODEL_FILES:
        assert (model / name).is_file(), name
    cv = json.loads((work / "cross_validation.json").read_text())
    exported = load_plan(model)  # with the sha256 of both folds
    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["cross_validation"]["selected"] == cv["selected"]
    assert exported.postprocessing.threshold == 0.5  # the only threshold tried
    assert exported.inference.test_time_mirroring is cv["test_time_mirroring"]
    # Both with and without mirroring were scored; the winner's name says which it chose.
    assert {"t0.5_min0", "mirrored_t0.5_min0"} <= set(cv["variants"])
    assert cv["test_time_mirroring"] is cv["selected"].startswith("mirrored_")
    assert exported.inference.mirror_axes == (2,)
    assert metadata["data"]["synthetic"] is True
    assert metadata["planning"]["fingerprint_cases"] == n_cases
    for shipped in MODEL_FILES:  # nothing of the training machine's folders ships
        if shipped.endswith((".json", ".md")):
            assert str(work.parent) not in (model / shipped).read_text(), shipped


def test_plan_preprocess_cv_export(tiny, tmp_path, capsys):
    work, model = tmp_path / "work", tmp_path / "model"
    assert run("plan", "--data", tiny.root, "--work", work, "--config", tiny.config_path) == 0
    assert run("preprocess", "--work", work) == 0
    assert run("cv", "--work", work, "--device", "cpu") == 0
    assert run("export", "--work", work, "--out", model) == 0
    check_trained(work, model, len(tiny.dataset.labelled))
    assert json.loads((model / "metadata.json").read_text())["initialisation"] == {}
    assert "- Initialisation: every fold from random weights." in (model / "README.md").read_text()
    out = capsys.readouterr().out
    assert "4 labelled and 1 unlabelled cases" in out and "out-of-fold Dice" in out
    assert "exported 2 fold(s)" in out
    # A rerun with --resume keeps the trained folds and their predictions.
    stamp = (work / "fold_0" / "best.pt").stat().st_mtime_ns
    assert run("cv", "--work", work, "--device", "cpu", "--resume") == 0
    assert (work / "fold_0" / "best.pt").stat().st_mtime_ns == stamp
    assert "fold 0: already trained" in capsys.readouterr().out
    # Without --resume the folds are trained again, and their old predictions are not reused.
    oof = next((work / "out_of_fold").glob("*.npz"))
    oof.write_bytes(b"stale")
    assert run("cv", "--work", work, "--device", "cpu") == 0
    assert (work / "fold_0" / "best.pt").stat().st_mtime_ns != stamp
    assert (
        np.load(oof)["tumor"].shape
        == sitk.ReadImage(str(tiny.dataset.labelled[0].image)).GetSize()[::-1]
    )


def test_all_then_pseudo_labels_and_a_fine_tuned_second_round(tiny, tmp_path):
    work, model = tmp_path / "work", tmp_path / "model"
    common = ["--config", tiny.config_path, "--device", "cpu"]
    assert run("all", "--data", tiny.root, "--work", work, "--out", model, *common) == 0
    check_trained(work, model, len(tiny.dataset.labelled))

    pseudo = tmp_path / "pseudo"
    assert run("pseudo-label", "--work", work, "--out", pseudo, "--device", "cpu") == 0
    (source,) = (tiny.root / UNLABELLED_DIR).iterdir()
    case_id = source.name.removesuffix("_0000.mha")
    label_path = pseudo / "LabelsTr" / f"{case_id}.mha"
    label, image = sitk.ReadImage(str(label_path)), sitk.ReadImage(str(source))
    assert not Geometry.of(image).differences(Geometry.of(label))
    assert set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) <= {0, 1}
    assert (pseudo / "ImagesTr" / f"{case_id}_0000.mha").read_bytes() == source.read_bytes()
    manifest = json.loads((pseudo / "pseudo_labels.json").read_text())
    assert [c["case_id"] for c in manifest["cases"]] == [case_id] and manifest["folds"] == 2

    second = tmp_path / "work2"
    args = ["--data", tiny.root, "--work", second, "--config", tiny.config_path]
    assert run("plan", *args, "--extra-labelled", pseudo) == 0
    described = json.loads((second / "dataset.json").read_text())
    assert described["extra_labelled"][0]["cases"] == [case_id]
    # The plan is fingerprinted on the annotated cases alone.
    assert load_plan(second, verify_weights=False).preprocessing == tiny.plan.preprocessing
    assert run("preprocess", "--work", second) == 0
    assert len(json.loads((second / "cache" / "cache.json").read_text())["cases"]) == 5
    init = work / "fold_0" / "best.pt"
    assert run("cv", "--work", second, "--device", "cpu", "--init", init) == 0
    splits = json.loads((second / "splits.json").read_text())
    assert sorted(c for s in splits for c in s["val"]) == [
        c.case_id for c in tiny.dataset.labelled
    ]  # the pseudo-labelled case only ever trains
    assert len(list((second / "out_of_fold").glob("*.npz"))) == 4
    report = json.loads((second / "fold_1" / "init.json").read_text())
    assert report["skipped"] == {} and report["source"] == str(init)
    result = json.loads((second / "fold_1" / "result.json").read_text())
    assert result["init"]["matched"] == report["matched"]
    assert torch.load(second / "fold_1" / "best.pt", weights_only=False)["network"]

    # From an exported model folder, fold k starts from the model's own fold k.
    assert run("cv", "--work", second, "--device", "cpu", "--init", model) == 0
    for fold in (0, 1):
        report = json.loads((second / f"fold_{fold}" / "init.json").read_text())
        assert report["source"] == str(model / f"fold_{fold}.onnx") and report["matched"]
    # Its export names what each fold started from (the file, without this machine's folders).
    assert run("export", "--work", second, "--out", tmp_path / "model2") == 0
    started = json.loads((tmp_path / "model2" / "metadata.json").read_text())["initialisation"]
    shipped = {f.file: f.sha256 for f in load_plan(model).inference.folds}
    reports = [json.loads((second / f"fold_{k}" / "init.json").read_text()) for k in (0, 1)]
    assert started == {
        f"fold_{k}.onnx": {
            "source": f"fold_{k}.onnx",
            "source_sha256": shipped[f"fold_{k}.onnx"],
            "loaded_tensors": len(reports[k]["matched"]),
            "kept_initialisation": sorted(reports[k]["skipped"]),
        }
        for k in (0, 1)
    }
    card = (tmp_path / "model2" / "README.md").read_text()
    sha = shipped["fold_0.onnx"][:12]
    assert f"- Fine-tuned: fold_0.onnx from `fold_0.onnx` (sha256 {sha}..." in card


def test_steps_out_of_order_are_exit_2(tiny, tmp_path, capsys):
    work = tmp_path / "work"
    assert run("preprocess", "--work", work) == 2
    assert "run `python -m training plan` first" in capsys.readouterr().err
    assert run("plan", "--data", tiny.root, "--work", work, "--config", tiny.config_path) == 0
    assert run("cv", "--work", work, "--device", "cpu") == 2
    assert "run `python -m training preprocess` first" in capsys.readouterr().err
    assert run("preprocess", "--work", work) == 0
    assert run("export", "--work", work, "--out", tmp_path / "model") == 2
    assert "no trained fold" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    assert run("pseudo-label", "--work", work, "--out", tmp_path / "pseudo") == 2
    assert "no trained folds" in capsys.readouterr().err
    assert run("train", "--work", work, "--fold", "7", "--device", "cpu") == 2
    assert "fold 7 does not exist" in capsys.readouterr().err
    missing = tmp_path / "nowhere.pt"
    assert run("train", "--work", work, "--fold", "0", "--device", "cpu", "--init", missing) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    shipped = Path(__file__).resolve().parents[1] / "models" / "task1"  # 3 folds against 2
    assert run("cv", "--work", work, "--device", "cpu", "--init", shipped) == 2
    assert "a model of 3 fold(s)" in capsys.readouterr().err
    assert run("cv", "--work", work, "--device", "cpu", "--init", work) == 2  # a work folder
    assert "takes a checkpoint file or an exported model folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run("cv", "--work", work, "--device", "cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (work / "fold_0").exists()


def test_bad_config_key_is_exit_2(tiny, tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", optim={"epoch": 3})
    assert run("plan", "--data", tiny.root, "--work", tmp_path / "work", "--config", config) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.epoch'" in err and str(config) in err
    assert not (tmp_path / "work").exists()


def test_dataset_with_an_error_case_is_exit_2(tiny, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny.root, root)
    label_path = root / "LabelsTr" / "10001_0001.mha"
    replace_label_value(label_path, 2, 5)
    work = tmp_path / "work"
    assert run("plan", "--data", root, "--work", work, "--config", tiny.config_path) == 2
    err = capsys.readouterr().err
    assert "error: 10001_0001:" in err and "label values 5" in err
    assert "1 case(s) have errors" in err
    assert not (work / "plan.json").exists()


def test_config_values_are_checked_by_type(tmp_path):
    from training.config import ConfigError, load_config

    # YAML 1.1 reads 1e-4 as a string; it means a number.
    (tmp_path / "a.yaml").write_text("optim: {lr: 1e-4}\n")
    assert load_config(tmp_path / "a.yaml").optim.lr == 1e-4
    with pytest.raises(ConfigError, match=r"'optim\.epochs' must be a whole number, got 2\.5"):
        load_config(write_config(tmp_path / "b.yaml", optim={"epochs": 2.5}))
    with pytest.raises(ConfigError, match=r"'optim\.amp' must be true or false"):
        load_config(write_config(tmp_path / "c.yaml", optim={"amp": "yes please"}))
    with pytest.raises(ConfigError, match=r"'cv\.thresholds' must be a list"):
        load_config(write_config(tmp_path / "d.yaml", cv={"thresholds": 0.5}))


def test_cpu_bfloat16_takes_true_false_or_auto(tmp_path):
    from training.config import ConfigError, load_config

    for value in (True, False, "auto"):
        path = write_config(tmp_path / f"{value}.yaml", optim={"cpu_bfloat16": value})
        assert load_config(path).optim.cpu_bfloat16 == value
    with pytest.raises(ConfigError, match=r"cpu_bfloat16 must be true, false or 'auto', not 'on'"):
        load_config(write_config(tmp_path / "on.yaml", optim={"cpu_bfloat16": "on"}))
    with pytest.raises(ConfigError, match=r"'optim\.cpu_bfloat16' must be true or false or a str"):
        load_config(write_config(tmp_path / "one.yaml", optim={"cpu_bfloat16": 1}))


def test_label_intensity_settings_are_checked(tmp_path):
    from training.config import ConfigError, load_config

    good = load_config(
        write_config(tmp_path / "a.yaml", augmentation={"label_intensity": [0.6, 1.3]})
    )
    assert good.augmentation.label_intensity == [0.6, 1.3]
    bad = [
        ({"label_intensity": [1.3, 0.6]}, "0 < low <= high"),
        ({"label_intensity": [0.0, 1.0]}, "0 < low <= high"),
        ({"label_intensity_classes": ["liver"]}, "must name tumor and/or pancreas"),
        ({"label_intensity_probability": 1.5}, r"must be in \[0, 1\]"),
    ]
    for index, (values, message) in enumerate(bad):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path / f"b{index}.yaml", augmentation=values))


def test_a_config_builds_on_its_base(tmp_path):
    from training.config import ConfigError, load_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.5, epochs: 7}\nsampling: {batch_size: 3}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\noptim: {lr: 0.25}\n")
    (tmp_path / "top.yaml").write_text("base: sub/mid.yaml\nsampling: {batch_size: 4}\n")
    config = load_config(tmp_path / "top.yaml")
    # Each file overrides what it names and keeps the rest of the chain below it.
    assert (config.optim.lr, config.optim.epochs, config.sampling.batch_size) == (0.25, 7, 4)
    (tmp_path / "top2.yaml").write_text("base: loop.yaml\n")
    bad = {
        "loop.yaml": ("base: top2.yaml\n", "comes back to this file"),
        "lost.yaml": ("base: missing.yaml\n", r"lost\.yaml: 'base' names .*missing\.yaml, not a"),
        "odd.yaml": ("base: [a.yaml]\n", "'base' must be a file name"),
        "typo.yaml": (
            "base: base.yaml\noptim: {lr_typo: 1}\n",
            r"typo\.yaml: unknown key 'optim\.",
        ),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / name)


def test_task2_demo_config_changes_only_the_label_intensity_and_the_grid():
    """Task 2's region folds train from random weights on a grid of its own 2 mm slices (the
    fine-tuned edition, on Task 1's grid, lost the comparison in models/task2/README.md)."""
    from training.config import load_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    task1 = dataclasses.asdict(load_config(examples / "demo_cpu.yaml"))
    task2 = dataclasses.asdict(load_config(examples / "demo_cpu_task2.yaml"))
    changed = {
        k for k in task1["augmentation"] if task1["augmentation"][k] != task2["augmentation"][k]
    }
    assert changed == {"label_intensity", "label_intensity_classes"}
    assert task2["augmentation"]["label_intensity_classes"] == ["tumor"]
    assert task1["network"]["base_features"] == task2["network"]["base_features"] == 12
    # Task 2's 2 mm slices keep their resolution; the patch keeps its voxels.
    assert task1["plan"]["target_spacing_zyx"] == [3.0, 1.5, 1.5]
    assert task2["plan"]["target_spacing_zyx"] == [2.0, 1.5, 1.5]
    assert task1["plan"]["patch_size_zyx"] == task2["plan"]["patch_size_zyx"]
    for config in (task1, task2):
        config.pop("augmentation"), config["plan"].pop("target_spacing_zyx")
    assert task1 == task2
    script = (examples / "train_demo_cpu.sh").read_text()
    assert script.count("INIT=${INIT:-}") == 2 and '--init "$INIT"' in script


def test_only_training_runs_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run("export", "--work", tmp_path, "--out", tmp_path / "model") == 2
    assert "only train and cv run under torchrun" in capsys.readouterr().err


def test_folds_side_by_side_train_the_same_networks(tiny, tmp_path, capsys, monkeypatch):
    """cv.parallel_folds 2: both folds train at once in processes of their own and come out as
    they do one after the other (one thread each here, as in this test's own process)."""
    import training.__main__ as workflow

    monkeypatch.setattr(workflow, "threads_per_fold", lambda parallel: 1)
    side = write_config(tmp_path / "side.yaml", cv={"parallel_folds": 2})
    works = {}
    for name, config in (("in turn", tiny.config_path), ("side by side", side)):
        work = works[name] = tmp_path / name.replace(" ", "_")
        assert run("plan", "--data", tiny.root, "--work", work, "--config", config) == 0
        assert run("preprocess", "--work", work) == 0
        assert run("cv", "--work", work, "--device", "cpu") == 0
    assert "folds 0, 1: 2 side by side, 1 CPU thread(s) each" in capsys.readouterr().out
    one, two = works["in turn"], works["side by side"]
    for fold in (0, 1):
        histories = [json.loads((w / f"fold_{fold}/history.json").read_text()) for w in (one, two)]
        for epoch in (*histories[0], *histories[1]):
            epoch.pop("seconds")
        assert histories[0] == histories[1]
        a, b = (torch.load(w / f"fold_{fold}" / "best.pt")["network"] for w in (one, two))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cv = [json.loads((w / "cross_validation.json").read_text()) for w in (one, two)]
    assert cv[0]["aggregates"] == cv[1]["aggregates"]


def test_folds_side_by_side_are_refused_under_torchrun(tiny, tmp_path, capsys, monkeypatch):
    import argparse

    import training.__main__ as workflow

    side = write_config(tmp_path / "side.yaml", cv={"parallel_folds": 2})
    work = tmp_path / "work"
    assert run("plan", "--data", tiny.root, "--work", work, "--config", side) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = argparse.Namespace(work=work, device="cpu", resume=False, init=None)
    with pytest.raises(workflow.WorkflowError, match="under torchrun every process trains"):
        workflow.cmd_cv(args)


def test_parallel_folds_must_be_at_least_one(tmp_path):
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"cv\.parallel_folds must be at least 1, not 0"):
        load_config(write_config(tmp_path / "zero.yaml", cv={"parallel_folds": 0}))


def test_folds_side_by_side_run_from_the_command_line(tiny, tmp_path):
    """`python -m training cv` itself: its worker processes find the fold function by name
    (a function of a module run with -m cannot be pickled by reference)."""
    import subprocess
    import sys

    side = write_config(tmp_path / "side.yaml", cv={"parallel_folds": 2})
    work = tmp_path / "work"
    assert run("plan", "--data", tiny.root, "--work", work, "--config", side) == 0
    assert run("preprocess", "--work", work) == 0
    done = subprocess.run(
        [sys.executable, "-m", "training", "cv", "--work", str(work), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "folds 0, 1: 2 side by side" in done.stdout
    assert "out-of-fold Dice" in done.stdout
    for fold in (0, 1):
        assert (work / f"fold_{fold}" / "result.json").is_file()
