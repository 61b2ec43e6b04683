"""`python -m training plan|preprocess|train|cv|export|all`: the training workflow, one step per
command, everything kept in one work folder so that each step can be rerun or resumed.

    python -m training plan --data PANTHER_Task1 --work work/ [--config my.yaml]
    python -m training preprocess --work work/
    python -m training cv --work work/            # trains every fold, then tunes post-processing
    python -m training export --work work/ --out model/
    python -m training all --data PANTHER_Task1 --work work/ --out model/
    python -m training card --model model/ --evaluation eval/summary.json --title "Held-out"
    python -m training import-nnunet results/Dataset094_X/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --folds 0 1 2 --checkpoint final --out model/   # ship folds trained with nnU-Net v2

Two stages (the default, `cascade` in the configuration): `plan` also plans a localiser on a
coarse grid in `<work>/localiser/` (a work folder of its own), `preprocess` caches both, `cv`
trains the localiser's folds on the same split, measures their out-of-fold boxes
(`<work>/cascade.json`), trains the main network in jittered true boxes and predicts out of fold
in the localiser's boxes; `export` ships both stages.

Several GPUs: `torchrun --nproc_per_node 4 -m training train --work work/ --fold 0` (or `cv`);
every process trains, rank 0 validates and writes, and `cv` predicts out-of-fold on rank 0 only.
Several folds at once on one machine: `cv.parallel_folds` (`training.side_by_side`).

Beyond the baseline (flags; see also training/default.yaml):

- Fine-tuning: `train --init CHECKPOINT` or `cv --init CHECKPOINT` starts every fold from the
  tensors of CHECKPOINT that match the network by name and shape (pretrained weights, a fold of
  an earlier run, or an exported `.onnx` fold); `<work>/fold_k/init.json` lists what was loaded
  and what was skipped. `--init MODEL_DIR` (an exported model) starts fold k from the model's
  fold k instead: with the same split, no fold then starts from weights that saw its validation
  cases.
- Self-training on the unlabelled scans (PANTHER Task 1's ImagesTr_unlabeled/):
      python -m training pseudo-label --work work/ --out pseudo/
  segments every unlabelled image of the work's dataset with the cross-validation ensemble (all
  folds, the post-processing `cv` chose) and writes a dataset folder in the PANTHER layout:
  pseudo/ImagesTr/<id>_0000.<ext> (a link to, or copy of, the image), pseudo/LabelsTr/<id>.<ext>
  (1 tumor, 0 elsewhere) and pseudo/pseudo_labels.json. A second round trains on both:
      python -m training plan --data PANTHER_Task1 --work work2/ --extra-labelled pseudo/
      python -m training preprocess --work work2/
      python -m training cv --work work2/ [--init work/fold_0/best.pt]
  Extra labelled cases join every fold's training set and are never validated on: the split,
  the out-of-fold predictions and the post-processing choice use the annotated cases only, and
  the plan (spacing, patch, normalisation) is fingerprinted on them alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from pantherseg.inference.files import atomic_write_json, atomic_write_text
from pantherseg.inference.plan import (
    PLAN_FILE,
    Localiser,
    Plan,
    PlanError,
    fold_paths,
    load_plan,
    save_plan,
)
from training.config import ConfigError, TrainingConfig, load_config
from training.records import (
    MIRRORED_PREFIX,
    Cascade,
    CrossValidation,
    Planning,
    RecordError,
    localiser_work,
)
from training.regions import RegionSampling
from training.side_by_side import (
    FoldProcessError,
    configure_logging,
    threads_per_fold,
    train_side_by_side,
)

log = logging.getLogger("pantherseg.training")

CONFIG_FILE = "config.yaml"
DATASET_FILE = "dataset.json"
FINGERPRINT_FILE = "fingerprint.json"
CACHE_DIR = "cache"
OOF_DIR = "out_of_fold"
OOF_MIRRORED_DIR = "out_of_fold_mirrored"
FOLD_RESULT = "result.json"
SYNTHETIC_MARKER = "phantoms.json"  # written by `pantherseg synth`


class WorkflowError(ValueError):
    """A step asked for before the steps it needs, or on a dataset with errors."""


def _is_main_process() -> bool:
    """False in every torchrun process but rank 0: those train and nothing else."""
    return int(os.environ.get("RANK", "0")) == 0


def _under_torchrun() -> bool:
    """True in the processes torchrun starts for more than one device."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _print_error(command: str, error: BaseException | str) -> None:
    """A user error as one line on stderr (the caller then exits with status 2)."""
    print(f"python -m training {command}: error: {error}", file=sys.stderr)


def _work_config(work: Path) -> TrainingConfig:
    path = work / CONFIG_FILE
    if not path.is_file():
        raise WorkflowError(f"{work}: no {CONFIG_FILE}; run `python -m training plan` first")
    return load_config(path)


def _work_plan(work: Path) -> Plan:
    if not (work / PLAN_FILE).is_file():
        raise WorkflowError(f"{work}: no {PLAN_FILE}; run `python -m training plan` first")
    return load_plan(work, verify_weights=False)


def _work_description(work: Path) -> dict:
    path = work / DATASET_FILE
    if not path.is_file():
        raise WorkflowError(f"{work}: no {DATASET_FILE}; run `python -m training plan` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _work_dataset(work: Path):
    """The annotated dataset the work folder was planned on."""
    from training.data import discover

    saved = _work_description(work)
    return discover(Path(saved["root"]), task=saved["task"])


def _work_extra_cases(work: Path) -> list:
    """The extra labelled cases (`plan --extra-labelled`), found again in their folders."""
    from training.data import discover

    cases = []
    for extra in _work_description(work).get("extra_labelled", []):
        found = {c.case_id: c for c in discover(Path(extra["root"])).labelled}
        missing = sorted(set(extra["cases"]) - set(found))
        if missing:
            raise WorkflowError(
                f"{extra['root']}: cases planned as extra labelled data are gone: "
                f"{', '.join(missing)}; run `python -m training plan` again"
            )
        cases += [found[c] for c in extra["cases"]]
    return cases


def _extra_ids(work: Path) -> set[str]:
    return {c for e in _work_description(work).get("extra_labelled", []) for c in e["cases"]}


def _extra_labelled(folders: list[Path], dataset, labels: str, jobs: int) -> list[dict]:
    """Checks each extra labelled dataset folder like the main one; their descriptions."""
    from training.data import discover, validate

    taken = {c.case_id for c in dataset.labelled}
    described = []
    for folder in folders:
        extra = discover(folder)
        ids = [c.case_id for c in extra.labelled]
        clash = sorted(taken & set(ids))
        if clash:
            raise WorkflowError(
                f"{folder}: case ids already in the training data: {', '.join(clash[:10])}"
            )
        taken |= set(ids)
        problems = validate(extra, labels=labels, jobs=jobs)
        for problem in problems:
            print(
                f"{problem.severity}: {folder}: {problem.case_id}: {problem.problem}",
                file=sys.stderr,
            )
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise WorkflowError(f"{folder}: {len(errors)} extra case(s) have errors (listed above)")
        print(f"{extra.root}: {len(ids)} extra labelled cases ({extra.layout} layout)")
        described.append({"root": str(extra.root.resolve()), "cases": ids})
    return described


def cmd_plan(args: argparse.Namespace) -> int:
    from training.data import discover, fingerprint, validate
    from training.planner import plan_with_facts

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
    folders = list(getattr(args, "extra_labelled", None) or [])
    extra = _extra_labelled(folders, dataset, config.data.labels, config.data.jobs)
    fp = fingerprint(dataset, jobs=config.data.jobs)  # the annotated cases alone
    plan, figures = plan_with_facts(fp, config, dataset.task)
    stages = _plan_localiser(fp, config, plan, dataset.task) if config.cascade.enabled else None
    data = {
        "root": dataset.root.name,  # provenance for the model card: no path of this machine
        "layout": dataset.layout,
        "cases": len(dataset.labelled),
        "synthetic": (dataset.root / SYNTHETIC_MARKER).is_file(),
        "description": f"{len(dataset.labelled)} labelled cases, {dataset.layout} layout"
        + (" (synthetic phantoms)" if (dataset.root / SYNTHETIC_MARKER).is_file() else "")
        + (
            f", plus {sum(len(e['cases']) for e in extra)} extra labelled (e.g. pseudo-labelled)"
            if extra
            else ""
        ),
    }
    if extra:
        data["extra_labelled_cases"] = sum(len(e["cases"]) for e in extra)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write_text(work / FINGERPRINT_FILE, json.dumps(fp.to_json(), indent=1) + "\n")
    atomic_write_text(
        work / DATASET_FILE,
        json.dumps(
            {
                "root": str(dataset.root.resolve()),
                "task": dataset.task,
                "layout": dataset.layout,
                "extra_labelled": extra,
            },
            indent=1,
        )
        + "\n",
    )
    Planning(figures=figures, data=data).save(work)
    if stages is not None:
        plan = _write_localiser_work(work, stages, plan, data)
    save_plan(plan, work)
    print(
        f"plan: spacing {plan.preprocessing.target_spacing_zyx} mm, patch "
        f"{plan.inference.patch_size_zyx}, {plan.inference.activation} over "
        f"{plan.inference.classes}; written to {work / PLAN_FILE}"
    )
    if plan.localiser is not None:
        print(
            f"localiser: spacing {plan.localiser.preprocessing.target_spacing_zyx} mm, patch "
            f"{plan.localiser.inference.patch_size_zyx}, box margin {plan.localiser.margin_mm:g} "
            f"mm; its work folder is {localiser_work(work)}"
        )
    return 0


def _plan_localiser(fp, config: TrainingConfig, plan: Plan, task: str) -> tuple:
    """The localiser's configuration, plan and planning figures (two-stage models)."""
    from training.cascade import localiser_config, localiser_spacing
    from training.planner import plan_with_facts

    if config.data.labels != "tumor+pancreas":
        raise WorkflowError(
            "the two-stage pipeline (cascade.enabled) needs data.labels: tumor+pancreas, since "
            "its box is the pancreas; set cascade.enabled: false for a tumor-only network"
        )
    local = localiser_config(config)
    local.plan.target_spacing_zyx = list(
        localiser_spacing(
            fp, plan.preprocessing.target_spacing_zyx, config.cascade.localiser_voxels
        )
    )
    local_plan, figures = plan_with_facts(fp, local, task)
    return local, local_plan, figures


def _write_localiser_work(work: Path, stages: tuple, plan: Plan, data: dict) -> Plan:
    """`<work>/localiser/`: a work folder for the localiser (configuration, plan, dataset, the
    planner's figures); the main plan, with its localiser section."""
    local, local_plan, figures = stages
    folder = localiser_work(work)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(local.to_dict(), sort_keys=False))
    atomic_write_text(folder / DATASET_FILE, (work / DATASET_FILE).read_text(encoding="utf-8"))
    Planning(figures=figures, data=data).save(folder)
    save_plan(local_plan, folder)
    localiser = Localiser(
        preprocessing=local_plan.preprocessing,
        inference=local_plan.inference,
        margin_mm=local.cascade.margin_mm,
    )
    return dataclasses.replace(plan, localiser=localiser)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from training.cache import preprocess_dataset

    config, plan = _work_config(args.work), _work_plan(args.work)
    dataset = _work_dataset(args.work)
    extra = _work_extra_cases(args.work)
    if extra:
        dataset = dataclasses.replace(dataset, labelled=dataset.labelled + extra)
    works = [(args.work, config, plan)]
    if plan.localiser is not None:
        folder = localiser_work(args.work)
        works.append((folder, _work_config(folder), _work_plan(folder)))
    for work, stage_config, stage_plan in works:
        cached = preprocess_dataset(
            dataset,
            stage_plan,
            work / CACHE_DIR,
            labels=stage_config.data.labels,
            jobs=stage_config.data.jobs,
        )
        print(f"{len(cached)} cases preprocessed in {work / CACHE_DIR}")
    return 0


def _cached_by_id(work: Path) -> dict:
    from training.cache import load_cache_index

    if not (work / CACHE_DIR).is_dir():
        raise WorkflowError(f"{work}: no cache; run `python -m training preprocess` first")
    return {c.case_id: c for c in load_cache_index(work / CACHE_DIR)}


def _splits(work: Path, config: TrainingConfig, cached: dict) -> list[dict[str, list[str]]]:
    """The saved k-fold split of the annotated cases (extra labelled ones are never validated on),
    made by rank 0 when there is none yet."""
    from training.crossval import SPLITS_FILE, load_or_make_splits

    extra = _extra_ids(work)
    annotated = [c for c in cached if c not in extra]
    path = work / SPLITS_FILE
    if _is_main_process():
        splits = load_or_make_splits(path, annotated, config.cv.folds, config.cv.seed)
    _wait_for_rank_zero()
    if not _is_main_process():
        splits = load_or_make_splits(path, annotated, config.cv.folds, config.cv.seed)
    return splits


def _wait_for_rank_zero() -> None:
    """A barrier among torchrun's processes (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _train_one(
    work: Path,
    fold: int,
    config: TrainingConfig,
    plan: Plan,
    device: str,
    resume: bool,
    init: Path | None = None,
    region=None,
    progress: bool = True,
) -> dict:
    from training.trainer import train_fold

    cached = _cached_by_id(work)
    splits = _splits(work, config, cached)
    if not 0 <= fold < len(splits):
        raise WorkflowError(f"fold {fold} does not exist; folds are 0..{len(splits) - 1}")
    split = splits[fold]
    init = fold_init(init, fold, len(splits))
    extra = sorted(_extra_ids(work) & set(cached))
    result = train_fold(
        config,
        plan,
        [cached[c] for c in [*split["train"], *extra]],
        [cached[c] for c in split["val"]],
        work / f"fold_{fold}",
        fold=fold,
        device=device,
        resume=resume,
        init=init,
        region=region,
        progress=progress,
    )
    summary = {**dataclasses.asdict(result), "checkpoint": str(result.checkpoint)}
    if _is_main_process():
        atomic_write_json(work / f"fold_{fold}" / FOLD_RESULT, summary, indent=1)
        print(
            f"fold {fold}: best validation Dice {result.best_dice:.4f} at epoch "
            f"{result.best_epoch} of {result.epochs_run}"
        )
    return summary


def fold_init(init: Path | None, fold: int, folds: int) -> Path | None:
    """The weights fold `fold` starts from: `init` itself, or, when `init` is an exported model
    folder, that model's fold `fold` (its weights checked against the plan). Fold by fold, so that
    when both models share the split, no fold starts from weights that saw its validation cases
    and the out-of-fold figures stay out of fold."""
    if init is None or not init.is_dir():
        return init
    try:
        paths = fold_paths(load_plan(init).inference, init)
    except PlanError as error:
        raise WorkflowError(
            f"--init takes a checkpoint file or an exported model folder; {error}"
        ) from None
    if len(paths) != folds:
        raise WorkflowError(
            f"{init}: a model of {len(paths)} fold(s); fine-tuning from a model folder starts "
            f"fold k from its fold k, so it needs as many folds as this split ({folds})"
        )
    return paths[fold]


def _fold_process(
    fold: int,
    work: Path,
    config: TrainingConfig,
    plan: Plan,
    device: str,
    resume: bool,
    init: Path | None,
    region,
) -> None:
    """One fold in a process of its own (`cv.parallel_folds`): epoch log lines instead of a
    progress bar (several bars would overwrite each other), and a user error as a message and
    exit status 2, as in the main process."""
    try:
        _train_one(work, fold, config, plan, device, resume, init, region, progress=False)
    except _expected_errors() as error:
        _print_error("cv", f"fold {fold}: {error}")
        sys.exit(2)


def _train_folds(
    work: Path,
    splits: list[dict[str, list[str]]],
    config: TrainingConfig,
    plan: Plan,
    args: argparse.Namespace,
    parallel: int,
    name: str = "fold",
    init: Path | None = None,
    region=None,
) -> bool:
    """Trains the folds of `splits` (with --resume, those not trained yet), `parallel` at a time
    side by side; True if any was. Out-of-fold predictions of a fold's cases are deleted before
    it trains: they belong to its earlier model."""
    pending = []
    for fold in range(len(splits)):
        if (work / f"fold_{fold}" / FOLD_RESULT).is_file() and args.resume:
            print(f"{name} {fold}: already trained")
        else:
            pending.append(fold)
    if _is_main_process():
        for fold in pending:
            _forget_out_of_fold(args.work, splits[fold]["val"])
    parallel = min(parallel, len(pending))
    if parallel <= 1:
        for fold in pending:
            _train_one(work, fold, config, plan, args.device, args.resume, init, region)
        return bool(pending)
    threads = threads_per_fold(parallel)
    print(
        f"{name}s {', '.join(map(str, pending))}: {parallel} side by side, {threads} CPU "
        f"thread(s) each"
    )
    arguments = {
        "work": work,
        "config": config,
        "plan": plan,
        "device": args.device,
        "resume": args.resume,
        "init": init,
        "region": region,
    }
    train_side_by_side("training.__main__:_fold_process", arguments, pending, parallel, threads)
    return True


def cmd_train(args: argparse.Namespace) -> int:
    plan, region = _work_plan(args.work), None
    if plan.localiser is not None:
        cascade = Cascade.load(args.work)
        if cascade is None:
            raise WorkflowError(
                f"{args.work} plans two stages, and the main network trains in the boxes the "
                f"localiser gives: train the localiser's folds first (`train --work "
                f"{localiser_work(args.work)} --fold k`), then `cv --resume` measures its boxes "
                "(and trains what is left); or run `cv` alone"
            )
        region = RegionSampling(cascade.margin_mm, cascade.jitter_mm)
    _train_one(
        args.work,
        args.fold,
        _work_config(args.work),
        plan,
        args.device,
        args.resume,
        args.init,
        region,
    )
    return 0


def _fold_checkpoints(work: Path, folds: int) -> list[Path]:
    paths = [work / f"fold_{k}" / "best.pt" for k in range(folds)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WorkflowError(
            f"{work}: fold(s) not trained ({', '.join(missing)}); run `python -m training cv` "
            "(or `train --fold k`) first"
        )
    return paths


def cmd_cv(args: argparse.Namespace) -> int:
    from training.cascade import boxes_of
    from training.crossval import predict_out_of_fold, select_postprocessing
    from training.export import load_network
    from training.trainer import resolve_device

    work = args.work
    config, plan = _work_config(work), _work_plan(work)
    if config.cv.parallel_folds > 1 and _under_torchrun():
        raise WorkflowError(
            "cv.parallel_folds trains folds side by side in processes of their own; under "
            "torchrun every process trains the same fold: set it to 1"
        )
    cached = _cached_by_id(work)
    splits = _splits(work, config, cached)
    resolve_device(args.device)  # a missing GPU is reported before any fold is trained
    fold_init(args.init, 0, len(splits))  # and so is a model folder that does not fit
    dataset = _work_dataset(work)
    cases = {c.case_id: c for c in dataset.labelled}
    region, regions = None, None
    if plan.localiser is not None:
        plan, cascade = _cv_localiser(args, config, plan, splits, cases)
        region = RegionSampling(cascade.margin_mm, cascade.jitter_mm)
        regions = boxes_of(cascade)
    parallel = config.cv.parallel_folds
    _train_folds(work, splits, config, plan, args, parallel, init=args.init, region=region)
    if not _is_main_process():
        return 0  # out-of-fold prediction and selection are rank 0's
    networks = [load_network(path, config, plan) for path in _fold_checkpoints(work, len(splits))]
    device = resolve_device(args.device)
    oof = predict_out_of_fold(
        plan, networks, splits, cases, work / OOF_DIR, device, amp=config.optim.amp, regions=regions
    )
    oof_mirrored = []
    if config.cv.measure_mirroring and plan.inference.mirror_axes:
        oof_mirrored = predict_out_of_fold(
            plan,
            networks,
            splits,
            cases,
            work / OOF_MIRRORED_DIR,
            device,
            amp=config.optim.amp,
            mirroring="on",
            regions=regions,
        )
    name, settings, table = select_postprocessing(
        config, plan, oof, cases, jobs=config.data.jobs, mirrored_files=oof_mirrored
    )
    mirrored = name.startswith(MIRRORED_PREFIX)
    cv = CrossValidation(
        folds=len(splits),
        selected=name,
        test_time_mirroring=mirrored,
        aggregates=table[name],
        variants=table,
    )
    inference = dataclasses.replace(plan.inference, test_time_mirroring=mirrored)
    save_plan(dataclasses.replace(plan, postprocessing=settings, inference=inference), work)
    cv.save(work)
    s = table[name]
    print(
        f"post-processing {name}: out-of-fold Dice {s['dice']:.4f}, surface Dice "
        f"{s['surface_dice']:.4f}, HD95 {s['hd95']:.2f} mm, MASD {s['masd']:.2f} mm, tumor "
        f"burden RMSE {s['tumor_burden_rmse']:.0f} mm^3 ({s['n_cases']} cases); test-time "
        f"mirroring {'on' if mirrored else 'off'}" + ("" if oof_mirrored else " (not measured)")
    )
    return 0


def _forget_out_of_fold(work: Path, case_ids: list[str]) -> None:
    """Out-of-fold predictions of an earlier model of these cases' fold are stale now."""
    for case_id, folder in itertools.product(case_ids, (OOF_DIR, OOF_MIRRORED_DIR)):
        (work / folder / f"{case_id}.npz").unlink(missing_ok=True)


def _cv_localiser(
    args: argparse.Namespace, config: TrainingConfig, plan: Plan, splits: list, cases: dict
):
    """The localiser's folds on the main split, their out-of-fold boxes and what they show
    (`<work>/cascade.json`); the plan with the localiser's plausibility limits."""
    from training.cascade import localise_out_of_fold, measure, plausibility
    from training.crossval import SPLITS_FILE
    from training.export import load_network
    from training.trainer import resolve_device

    work, folder = args.work, localiser_work(args.work)
    local_config, local_plan = _work_config(folder), _work_plan(folder)
    if _is_main_process() and not (folder / SPLITS_FILE).is_file():
        atomic_write_text(folder / SPLITS_FILE, (work / SPLITS_FILE).read_text(encoding="utf-8"))
    _wait_for_rank_zero()
    parallel = config.cv.parallel_folds
    retrained = _train_folds(  # their cases' out-of-fold predictions go: their boxes change
        folder, splits, local_config, local_plan, args, parallel, name="localiser fold"
    )
    cascade = Cascade.load(work)
    if cascade is None or retrained:
        if _is_main_process():
            min_ml, max_mm = plausibility(list(cases.values()))
            localiser = dataclasses.replace(
                plan.localiser, min_foreground_ml=min_ml, max_extent_mm=max_mm
            )
            networks = [
                load_network(path, local_config, local_plan)
                for path in _fold_checkpoints(folder, len(splits))
            ]
            found = localise_out_of_fold(
                localiser,
                networks,
                splits,
                cases,
                resolve_device(args.device),
                amp=local_config.optim.amp,
            )
            cascade = measure(found, cases, localiser, config.cascade.jitter_mm)
            cascade.save(work)
            _print_cascade(cascade)
        _wait_for_rank_zero()
        cascade = Cascade.load(work)
    assert cascade is not None
    # The plan takes its limits from cascade.json, the one record of them: whether they were just
    # measured, or a run stopped before the plan was written, or cascade.json was copied into a
    # freshly planned work folder.
    localiser = dataclasses.replace(
        plan.localiser,
        min_foreground_ml=cascade.min_foreground_ml,
        max_extent_mm=cascade.max_extent_mm,
    )
    if localiser != plan.localiser:
        plan = dataclasses.replace(plan, localiser=localiser)
        if _is_main_process():
            save_plan(plan, work)
    _wait_for_rank_zero()
    return plan, cascade


def _print_cascade(cascade: Cascade) -> None:
    recall = cascade.recall
    if recall["cases"]:
        print(
            f"localiser, out of fold: {recall['mean']:.1%} of tumor voxels inside the boxes on "
            f"average, worst {recall['min']:.1%} ({recall['worst_case']}); "
            f"{recall['whole_image_fallbacks']} case(s) fell back to the whole image; the main "
            f"network trains on true boxes +{cascade.margin_mm:g} mm, sides jittered by up to "
            f"{cascade.jitter_mm:g} mm"
        )


def _real_patches(work: Path, plan: Plan) -> list[np.ndarray]:
    """Up to two patches of real cached cases for the export's parity check."""
    from training.cache import load_cached

    real = []
    for case in list(_cached_by_id(work).values())[:2]:
        image, _ = load_cached(case, mmap=True)
        patch = plan.inference.patch_size_zyx
        if all(s >= p for s, p in zip(image.shape[1:], patch, strict=True)):
            real.append(np.asarray(image[None, :, : patch[0], : patch[1], : patch[2]]))
    return real


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import LocaliserCheckpoints, export_model

    work = args.work
    config, plan = _work_config(work), _work_plan(work)
    planning, cv = Planning.load(work), CrossValidation.load(work)
    if cv is not None:
        checkpoints = _fold_checkpoints(work, cv.folds)
    else:
        checkpoints = sorted(
            work.glob("fold_*/best.pt"), key=lambda p: int(p.parent.name.removeprefix("fold_"))
        )
        if not checkpoints:
            raise WorkflowError(
                f"{work}: no trained fold (fold_*/best.pt); run `python -m training cv` first"
            )
        log.warning("exporting without cross-validation: post-processing keeps plan defaults")
    provenance = {"planning": planning.figures, "data": planning.data}
    if cv is not None:
        provenance["cross_validation"] = dataclasses.asdict(cv)
    localiser = None
    if plan.localiser is not None:
        cascade = Cascade.load(work)
        if cascade is None:
            raise WorkflowError(
                f"{work}: the localiser's boxes were never measured; run `python -m training cv`"
            )
        provenance["cascade"] = dataclasses.asdict(cascade)
        folder = localiser_work(work)
        local_plan = _work_plan(folder)
        localiser = LocaliserCheckpoints(
            _fold_checkpoints(folder, len(checkpoints)),
            _work_config(folder),
            local_plan,
            _real_patches(folder, local_plan),
        )
    exported = export_model(
        checkpoints,
        config,
        plan,
        args.out,
        real_patches=_real_patches(work, plan),
        provenance=provenance,
        localiser=localiser,
    )
    stages = " with their localiser" if exported.localiser is not None else ""
    print(f"exported {len(exported.inference.folds)} fold(s){stages} to {args.out}")
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from training.crossval import SPLITS_FILE
    from training.export import load_network
    from training.self_training import write_pseudo_labels
    from training.trainer import resolve_device

    work = args.work
    config, plan = _work_config(work), _work_plan(work)
    if plan.localiser is not None:
        raise WorkflowError(
            f"{work} is a two-stage model: pseudo-labels hold the tumor alone, and a two-stage "
            "round needs pancreas labels too; pseudo-label with a single-stage work folder "
            "(cascade.enabled: false)"
        )
    if not (work / SPLITS_FILE).is_file():
        raise WorkflowError(f"{work}: no trained folds; run `python -m training cv` first")
    splits = json.loads((work / SPLITS_FILE).read_text(encoding="utf-8"))
    dataset = _work_dataset(work)
    if not dataset.unlabelled:
        raise WorkflowError(
            f"{dataset.root}: no unlabelled images (expected a folder such as "
            "ImagesTr_unlabeled/ beside ImagesTr/)"
        )
    cv = CrossValidation.load(work)
    if cv is None:
        log.warning("pseudo-labelling without cross-validation: post-processing keeps defaults")
    networks = [load_network(path, config, plan) for path in _fold_checkpoints(work, len(splits))]
    written = write_pseudo_labels(
        plan,
        networks,
        dataset.unlabelled,
        args.out,
        resolve_device(args.device),
        amp=config.optim.amp,
        postprocessing_name=cv.selected if cv is not None else "plan default",
    )
    print(
        f"{len(written)} pseudo-label(s) from a {len(networks)}-fold ensemble in {args.out}; "
        f"train on them with `python -m training plan ... --extra-labelled {args.out}`"
    )
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pantherseg.inference.plan import CARD_FILE
    from training.model_card import record_evaluation

    record_evaluation(args.model, args.evaluation, args.title, args.note or "")
    print(f"{args.model / CARD_FILE}: section '{args.title}' written")
    return 0


def cmd_import_nnunet(args: argparse.Namespace) -> int:
    from pantherseg.inference.plan import describe_test_time_mirroring
    from training.nnunet_import import ImportOptions, import_nnunet

    options = ImportOptions(
        configuration=args.configuration,
        folds=tuple(args.folds) if args.folds else None,
        checkpoint=args.checkpoint,
        task=args.task,
        tile_step=args.tile_step,
        test_time_mirroring=not args.no_mirroring,
        tumor_label=args.tumor_label,
        pancreas_label=args.pancreas_label,
        threshold=args.threshold,
        min_component_mm3=args.min_component_mm3,
        pancreas_guidance=args.pancreas_guidance,
        never_empty=not args.allow_empty,
    )
    plan = import_nnunet(args.model_folder, args.out, options)
    print(
        f"imported {len(plan.inference.folds)} fold(s) into {args.out}: classes "
        f"{list(plan.inference.classes)}, patch {plan.inference.patch_size_zyx} at spacing "
        f"{plan.preprocessing.target_spacing_zyx} mm, test-time mirroring "
        f"{describe_test_time_mirroring(plan.inference)}, precision "
        f"{plan.inference.precision}"
    )
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    for step in (cmd_plan, cmd_preprocess, cmd_cv, cmd_export):
        step(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, run, help_text: str, data=False, out=False, device=False, init=False):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--work", type=Path, required=True, help="work folder of this training")
        if data:
            p.add_argument("--data", type=Path, required=True, help="dataset folder")
            p.add_argument("--config", type=Path, help="YAML overriding training/default.yaml")
            p.add_argument("--task", choices=["task1", "task2"], help="override the detected task")
            p.add_argument(
                "--extra-labelled",
                type=Path,
                action="append",
                metavar="DIR",
                help="another dataset folder (e.g. from pseudo-label) whose cases join every "
                "fold's training set; repeatable",
            )
        if out:
            p.add_argument("--out", type=Path, required=True, help=out)
        if device:
            p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
        if init:
            p.add_argument("--resume", action="store_true", help="continue interrupted training")
            p.add_argument(
                "--init",
                type=Path,
                metavar="CHECKPOINT",
                help="fine-tune: start from the tensors of CHECKPOINT (a .pt checkpoint or an "
                "exported .onnx fold) that match by name and shape; an exported model folder "
                "starts fold k from its own fold k",
            )
        p.set_defaults(run=run)
        return p

    model = "model folder to write"
    add("plan", cmd_plan, "check the dataset, fingerprint it and write plan.json", data=True)
    add("preprocess", cmd_preprocess, "preprocess every case once into the cache")
    train = add("train", cmd_train, "train one fold", device=True, init=True)
    train.add_argument("--fold", type=int, required=True)
    add(
        "cv",
        cmd_cv,
        "train all folds, predict out-of-fold, choose post-processing",
        device=True,
        init=True,
    )
    add("export", cmd_export, "export the folds to ONNX with plan.json and a model card", out=model)
    add(
        "pseudo-label",
        cmd_pseudo_label,
        "segment the dataset's unlabelled images with the cross-validation ensemble",
        out="dataset folder to write (PANTHER layout) for plan --extra-labelled",
        device=True,
    )
    card = sub.add_parser(
        "card", help="record a `pantherseg evaluate` summary in an exported model's card"
    )
    card.add_argument("--model", type=Path, required=True, help="exported model folder")
    card.add_argument("--evaluation", type=Path, required=True, help="summary.json to record")
    card.add_argument("--title", required=True, help="section title, e.g. 'Held-out cases'")
    card.add_argument("--note", help="a sentence above the table (data, seeds, commands)")
    card.set_defaults(run=cmd_card)
    nnunet = sub.add_parser(
        "import-nnunet", help="ship the folds of a trained nnU-Net v2 model (ONNX, plan.json, card)"
    )
    nnunet.add_argument(
        "model_folder", type=Path, help="nnU-Net's <Trainer>__<Plans>__<configuration> folder"
    )
    nnunet.add_argument("--out", type=Path, required=True, help=model)
    nnunet.add_argument(
        "--configuration", help="nnU-Net configuration (default: from the folder's name)"
    )
    nnunet.add_argument(
        "--folds", nargs="+", metavar="FOLD", help="folds to ship (default: every fold_<number>)"
    )
    nnunet.add_argument("--checkpoint", choices=["final", "best"], default="final")
    nnunet.add_argument("--task", choices=["task1", "task2"], default="task1")
    nnunet.add_argument("--tile-step", type=float, default=0.5, help="tile step, patch fraction")
    nnunet.add_argument(
        "--no-mirroring", action="store_true", help="no test-time mirroring (nnU-Net mirrors)"
    )
    nnunet.add_argument("--tumor-label", metavar="NAME", help="dataset.json label of the tumor")
    nnunet.add_argument("--pancreas-label", metavar="NAME", help="label of the pancreas")
    nnunet.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="tumor where its probability reaches T (default: nnU-Net's argmax)",
    )
    nnunet.add_argument("--min-component-mm3", type=float, default=0.0)
    nnunet.add_argument(
        "--pancreas-guidance", action="store_true", help="keep tumor near predicted pancreas"
    )
    nnunet.add_argument(
        "--allow-empty", action="store_true", help="allow an empty mask (default: never empty)"
    )
    nnunet.set_defaults(run=cmd_import_nnunet)
    add(
        "all",
        cmd_all,
        "plan, preprocess, cv and export in one go",
        data=True,
        out=model,
        device=True,
        init=True,
    )
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "wrong input or order of steps" (exit 2 with the message) rather than
    a bug (a traceback). Modules not imported yet cannot have raised theirs."""
    kinds: list[type[BaseException]] = [
        WorkflowError,
        ConfigError,
        RecordError,
        FoldProcessError,
        ValueError,
        OSError,
    ]
    for module, name in (
        ("training.cache", "CacheError"),
        ("training.export", "ExportError"),
        ("training.trainer", "DeviceError"),
        ("training.nnunet_import", "NnunetImportError"),
    ):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


DISTRIBUTED_COMMANDS = ("train", "cv")


def _run(args: argparse.Namespace) -> int:
    """The command; under torchrun (WORLD_SIZE > 1) inside one process group for the whole
    command, so that the trainer and the steps around it share it."""
    if not _under_torchrun():
        return args.run(args)
    if args.command not in DISTRIBUTED_COMMANDS:
        raise WorkflowError(
            f"only {' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun; run "
            f"`python -m training {args.command}` in a single process"
        )
    from training.trainer import DistributedContext, resolve_device

    context = DistributedContext.from_environment(resolve_device(args.device))
    try:
        return args.run(args)
    finally:
        context.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return _run(args)
    except Exception as error:
        if not isinstance(error, _expected_errors()):
            raise
        _print_error(args.command, error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
