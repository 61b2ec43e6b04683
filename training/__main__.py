"""`python -m training plan|preprocess|train|cv|export|all`: the training workflow, one step per
command, everything kept in one work folder so that each step can be rerun or resumed.

    python -m training plan --data PANTHER_Task1 --work work/ [--config my.yaml]
    python -m training preprocess --work work/
    python -m training cv --work work/            # trains every fold, then tunes post-processing
    python -m training export --work work/ --out model/
    python -m training all --data PANTHER_Task1 --work work/ --out model/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import yaml

from pantherseg.io import atomic_write_text
from pantherseg.plan import PLAN_FILE, Plan, load_plan, save_plan
from training.config import ConfigError, TrainingConfig, load_config

log = logging.getLogger("pantherseg.training")

CONFIG_FILE = "config.yaml"
DATASET_FILE = "dataset.json"
FINGERPRINT_FILE = "fingerprint.json"
CACHE_DIR = "cache"
OOF_DIR = "out_of_fold"
CV_SUMMARY = "cross_validation.json"
FOLD_RESULT = "result.json"
SYNTHETIC_MARKER = "phantoms.json"  # written by `pantherseg synth`


class WorkflowError(ValueError):
    """A step asked for before the steps it needs, or on a dataset with errors."""


def _work_config(work: Path) -> TrainingConfig:
    path = work / CONFIG_FILE
    if not path.is_file():
        raise WorkflowError(f"{work}: no {CONFIG_FILE}; run `python -m training plan` first")
    return load_config(path)


def _work_plan(work: Path) -> Plan:
    if not (work / PLAN_FILE).is_file():
        raise WorkflowError(f"{work}: no {PLAN_FILE}; run `python -m training plan` first")
    return load_plan(work, verify_weights=False)


def _work_dataset(work: Path):
    from training.data import discover

    path = work / DATASET_FILE
    if not path.is_file():
        raise WorkflowError(f"{work}: no {DATASET_FILE}; run `python -m training plan` first")
    saved = json.loads(path.read_text(encoding="utf-8"))
    return discover(Path(saved["root"]), task=saved["task"])


def cmd_plan(args: argparse.Namespace) -> int:
    from training.data import discover, fingerprint, validate
    from training.planner import plan_from_fingerprint

    config = load_config(args.config)
    dataset = discover(args.data, task=args.task)
    print(
        f"{dataset.root}: {dataset.layout}, {len(dataset.labelled)} labelled and "
        f"{len(dataset.unlabelled)} unlabelled cases"
    )
    problems = validate(dataset, labels=config.data.labels, jobs=config.data.jobs)
    for problem in problems:
        print(f"{problem.severity}: {problem.case_id}: {problem.problem}", file=sys.stderr)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise WorkflowError(f"{len(errors)} case(s) have errors (listed above); fix or remove them")
    fp = fingerprint(dataset, jobs=config.data.jobs)
    plan = plan_from_fingerprint(fp, config, dataset.task)
    data = {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "cases": len(dataset.labelled),
        "synthetic": (dataset.root / SYNTHETIC_MARKER).is_file(),
        "description": f"{len(dataset.labelled)} labelled cases, {dataset.layout} layout"
        + (" (synthetic phantoms)" if (dataset.root / SYNTHETIC_MARKER).is_file() else ""),
    }
    plan = dataclasses.replace(plan, training={**plan.training, "data": data})
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(work / FINGERPRINT_FILE, json.dumps(fp.to_json(), indent=1) + "\n")
    atomic_write_text(
        work / DATASET_FILE,
        json.dumps(
            {"root": str(dataset.root.resolve()), "task": dataset.task, "layout": dataset.layout},
            indent=1,
        )
        + "\n",
    )
    save_plan(plan, work)
    print(
        f"plan: spacing {plan.preprocessing.target_spacing_zyx} mm, patch "
        f"{plan.inference.patch_size_zyx}, {plan.inference.activation} over "
        f"{plan.inference.classes}; written to {work / PLAN_FILE}"
    )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from training.cache import preprocess_dataset

    config, plan = _work_config(args.work), _work_plan(args.work)
    cached = preprocess_dataset(
        _work_dataset(args.work),
        plan,
        args.work / CACHE_DIR,
        labels=config.data.labels,
        jobs=config.data.jobs,
    )
    print(f"{len(cached)} cases preprocessed in {args.work / CACHE_DIR}")
    return 0


def _cached_by_id(work: Path) -> dict:
    from training.cache import load_cache_index

    if not (work / CACHE_DIR).is_dir():
        raise WorkflowError(f"{work}: no cache; run `python -m training preprocess` first")
    return {c.case_id: c for c in load_cache_index(work / CACHE_DIR)}


def _train_one(
    work: Path, fold: int, config: TrainingConfig, plan: Plan, device: str, resume: bool
) -> dict:
    from training.crossval import SPLITS_FILE, load_or_make_splits
    from training.trainer import train_fold

    cached = _cached_by_id(work)
    splits = load_or_make_splits(work / SPLITS_FILE, list(cached), config.cv.folds, config.cv.seed)
    if not 0 <= fold < len(splits):
        raise WorkflowError(f"fold {fold} does not exist; folds are 0..{len(splits) - 1}")
    split = splits[fold]
    result = train_fold(
        config,
        plan,
        [cached[c] for c in split["train"]],
        [cached[c] for c in split["val"]],
        work / f"fold_{fold}",
        fold=fold,
        device=device,
        resume=resume,
    )
    summary = {**dataclasses.asdict(result), "checkpoint": str(result.checkpoint)}
    atomic_write_text(work / f"fold_{fold}" / FOLD_RESULT, json.dumps(summary, indent=1) + "\n")
    print(
        f"fold {fold}: best validation Dice {result.best_dice:.4f} at epoch "
        f"{result.best_epoch} of {result.epochs_run}"
    )
    return summary


def cmd_train(args: argparse.Namespace) -> int:
    _train_one(
        args.work,
        args.fold,
        _work_config(args.work),
        _work_plan(args.work),
        args.device,
        args.resume,
    )
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from training.crossval import (
        SPLITS_FILE,
        load_or_make_splits,
        predict_out_of_fold,
        select_postprocessing,
    )
    from training.export import load_network
    from training.trainer import resolve_device

    work = args.work
    config, plan = _work_config(work), _work_plan(work)
    cached = _cached_by_id(work)
    splits = load_or_make_splits(work / SPLITS_FILE, list(cached), config.cv.folds, config.cv.seed)
    for fold in range(len(splits)):
        if (work / f"fold_{fold}" / FOLD_RESULT).is_file() and args.resume:
            print(f"fold {fold}: already trained")
            continue
        _train_one(work, fold, config, plan, args.device, args.resume)
    networks = [
        load_network(work / f"fold_{k}" / "best.pt", config, plan) for k in range(len(splits))
    ]
    dataset = _work_dataset(work)
    cases = {c.case_id: c for c in dataset.labelled}
    device = resolve_device(args.device)
    oof = predict_out_of_fold(
        plan, networks, splits, cases, work / OOF_DIR, device, amp=config.optim.amp
    )
    name, settings, table = select_postprocessing(config, plan, oof, cases, jobs=config.data.jobs)
    cv = {"selected": name, "aggregates": table[name], "folds": len(splits), "variants": table}
    plan = dataclasses.replace(
        plan, postprocessing=settings, training={**plan.training, "cross_validation": cv}
    )
    save_plan(plan, work)
    atomic_write_text(work / CV_SUMMARY, json.dumps(cv, indent=1) + "\n")
    s = table[name]
    print(
        f"post-processing {name}: out-of-fold Dice {s['dice']:.4f}, surface Dice "
        f"{s['surface_dice']:.4f}, HD95 {s['hd95']:.2f} mm, MASD {s['masd']:.2f} mm, tumor "
        f"burden RMSE {s['tumor_burden_rmse']:.0f} mm^3 ({s['n_cases']} cases)"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.cache import load_cached
    from training.export import export_model

    work = args.work
    config, plan = _work_config(work), _work_plan(work)
    checkpoints = sorted(work.glob("fold_*/best.pt"), key=lambda p: int(p.parent.name[5:]))
    if not checkpoints:
        raise WorkflowError(f"{work}: no trained fold (fold_*/best.pt); run train or cv first")
    if "cross_validation" not in plan.training:
        log.warning("exporting without cross-validation: post-processing keeps plan defaults")
    real = []
    for case in list(_cached_by_id(work).values())[:2]:
        image, _ = load_cached(case, mmap=True)
        patch = plan.inference.patch_size_zyx
        if all(s >= p for s, p in zip(image.shape[1:], patch, strict=True)):
            real.append(np.asarray(image[None, :, : patch[0], : patch[1], : patch[2]]))
    exported = export_model(checkpoints, config, plan, args.out, real_patches=real)
    print(f"exported {len(exported.inference.folds)} fold(s) to {args.out}")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    for step in (cmd_plan, cmd_preprocess, cmd_cv, cmd_export):
        step(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, run, help_text: str, data=False, out=False, device=False):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--work", type=Path, required=True, help="work folder of this training")
        if data:
            p.add_argument("--data", type=Path, required=True, help="dataset folder")
            p.add_argument("--config", type=Path, help="YAML overriding training/default.yaml")
            p.add_argument("--task", choices=["task1", "task2"], help="override the detected task")
        if out:
            p.add_argument("--out", type=Path, required=True, help="model folder to write")
        if device:
            p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
            p.add_argument("--resume", action="store_true", help="continue interrupted training")
        p.set_defaults(run=run)
        return p

    add("plan", cmd_plan, "check the dataset, fingerprint it and write plan.json", data=True)
    add("preprocess", cmd_preprocess, "preprocess every case once into the cache")
    train = add("train", cmd_train, "train one fold", device=True)
    train.add_argument("--fold", type=int, required=True)
    add("cv", cmd_cv, "train all folds, predict out-of-fold, choose post-processing", device=True)
    add("export", cmd_export, "export the folds to ONNX with plan.json and a model card", out=True)
    add(
        "all",
        cmd_all,
        "plan, preprocess, cv and export in one go",
        data=True,
        out=True,
        device=True,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return args.run(args)
    except (WorkflowError, ConfigError, ValueError, OSError) as error:
        print(f"python -m training {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
