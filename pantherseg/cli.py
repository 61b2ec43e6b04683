"""The `pantherseg` command: `synth` makes phantoms, `predict` segments, `evaluate` scores,
`choose-mirroring` measures test-time mirroring, `upgrade-plan` converts an older model's plan.

Each subcommand turns an expected failure (bad input, unreadable file) into one line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pantherseg import __version__
from pantherseg.inference.io import ImageError
from pantherseg.inference.options import (
    add_engine_options,
    add_inference_options,
    load_segmenter,
)


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic PANTHER-like phantoms with labels",
        description="Writes ImagesTr/ and LabelsTr/ in the PANTHER layout, plus phantoms.json.",
    )
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("-n", "--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--task", choices=["task1", "task2"], default="task1")
    p.add_argument(
        "--size",
        choices=["full", "small"],
        default="full",
        help="'small' makes coarse, tiny volumes for fast tests",
    )
    p.add_argument("--first-id", type=int, default=10000, help="id of the first case")
    p.add_argument(
        "-j", "--jobs", type=int, default=1, help="processes generating cases side by side"
    )
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from pantherseg.phantoms.synthetic import write_dataset

    infos = write_dataset(
        args.out,
        args.cases,
        seed=args.seed,
        task=args.task,
        size=args.size,
        first_id=args.first_id,
        jobs=args.jobs,
    )
    print(f"wrote {len(infos)} {args.task} phantoms to {args.out}")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score prediction folders against ground truth with the challenge's metrics",
        description=(
            "Matches cases by id, checks grids, scores Dice, surface Dice, HD95, MASD and tumor "
            "burden, writes metrics.csv and summary.json, and ranks several folders the "
            "challenge's way."
        ),
    )
    p.add_argument(
        "--pred", type=Path, nargs="+", required=True, help="one or more folders of predicted masks"
    )
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth labels")
    p.add_argument(
        "--names", nargs="+", help="a name per prediction folder (default: folder names)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="where metrics.csv and summary.json go (default ./evaluation)",
    )
    p.add_argument(
        "--convention",
        choices=["zyx", "xyz", "both"],
        default="zyx",
        help="spacing order: zyx is correct, xyz reproduces the organisers' script",
    )
    p.add_argument("--tolerance", type=float, default=5.0, help="surface Dice tolerance in mm")
    p.add_argument(
        "--volume-bands",
        type=float,
        nargs="+",
        metavar="ML",
        help="edges of the tumor-volume bands the means are also given for (default: 2 5 10, "
        "pantherseg.scoring.metrics.TUMOR_VOLUME_BANDS_ML)",
    )
    p.add_argument("--jobs", type=int, default=1, help="cases scored in parallel")
    p.add_argument("--report", type=Path, help="also write an HTML report with images here")
    p.add_argument(
        "--images", type=Path, help="folder of the input images, for the report's overlays"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-case table")
    p.set_defaults(run=_run_evaluate)


def _method_names(pred_dirs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(pred_dirs):
            raise ValueError(f"--names has {len(names)} names for {len(pred_dirs)} --pred folders")
        chosen = list(names)
    else:
        chosen = [d.resolve().name for d in pred_dirs]
        if len(set(chosen)) < len(chosen):
            chosen = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in pred_dirs]
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"method names must differ, got {chosen}; use --names")
    return chosen


def _run_evaluate(args: argparse.Namespace) -> int:
    from pantherseg.scoring import evaluate, metrics

    conventions = ["zyx", "xyz"] if args.convention == "both" else [args.convention]
    if args.tolerance <= 0:
        raise ValueError(f"--tolerance must be positive, got {args.tolerance}")
    volume_bands = args.volume_bands or metrics.TUMOR_VOLUME_BANDS_ML
    metrics.volume_band_bounds(volume_bands)  # before any case is scored
    names = _method_names(args.pred, args.names)
    evaluations = [
        evaluate.evaluate_folder(
            pred,
            args.gt,
            name,
            conventions,
            args.tolerance,
            jobs=max(1, args.jobs),
            progress=not args.quiet,
            volume_bands_ml=volume_bands,
        )
        for pred, name in zip(args.pred, names, strict=True)
    ]
    evaluate.write_results(evaluations, args.out, args.tolerance)
    for evaluation in evaluations:
        if not args.quiet:
            print(f"\n{evaluation.name} ({evaluation.pred_dir})")
            print(evaluate.format_case_table(evaluation, conventions[0]))
        for line in evaluation.problems():
            print(f"warning: {evaluation.name}: {line}", file=sys.stderr)
    for convention in conventions:
        print()
        print(evaluate.format_summary_table(evaluations, convention))
        print()
        print(evaluate.format_volume_table(evaluations, convention))
    print(f"\nper-case metrics: {args.out / 'metrics.csv'}\nsummary: {args.out / 'summary.json'}")
    if args.report:
        from pantherseg.scoring.report import write_report

        page = write_report(
            evaluations, args.report, images_dir=args.images, convention=conventions[0]
        )
        print(f"report: {page}")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment image files or folders of images with an exported model",
        description="Runs the container's inference path on each image; one mask per image.",
    )
    p.add_argument("inputs", type=Path, nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the masks")
    p.add_argument(
        "--model",
        type=Path,
        default=Path("model"),
        help="folder with plan.json and the ONNX folds (default ./model)",
    )
    add_inference_options(p)
    p.set_defaults(run=_run_predict)


def _collect_images(inputs: Sequence[Path]) -> list[Path]:
    from pantherseg.inference.io import list_images, strip_image_suffix

    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(list_images(item).values())
        elif item.is_file() and strip_image_suffix(item.name):
            files.append(item)
        else:
            raise ImageError(f"{item}: neither an image file nor a folder")
    if not files:
        raise ImageError(f"no image files in {', '.join(map(str, inputs))}")
    stems = [strip_image_suffix(f.name) for f in files]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ImageError(f"several inputs would write the same mask: {', '.join(repeated)}")
    return files


def _run_predict(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from pantherseg.inference.engines import EngineError
    from pantherseg.inference.io import strip_image_suffix
    from pantherseg.inference.pipeline import segment_file

    # Progress and the log go to stdout, as in process.py: stderr is for failures only.
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
    files = _collect_images(args.inputs)
    try:
        segmenter = load_segmenter(args.model, args)
    except EngineError as error:
        raise ValueError(str(error)) from None
    print(f"model: {segmenter.description}")
    failures = []
    for path in tqdm(files, desc="segmenting", unit="case", file=sys.stdout):
        target = args.output / f"{strip_image_suffix(path.name)}.mha"
        try:
            segment_file(segmenter, path, target)
        except (ImageError, ValueError) as error:
            failures.append(f"{path}: {error}")
            tqdm.write(f"failed: {path}: {error}", file=sys.stderr)
    print(f"{len(files) - len(failures)} of {len(files)} masks written to {args.output}")
    return 1 if failures else 0


def _add_choose_mirroring(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "choose-mirroring",
        help="measure which axes test-time mirroring should flip, on labelled tuning cases",
        description="Segments the tuning cases with every set of the trained mirror axes (the "
        "network runs once per distinct flipped tile), scores them, and chooses by fixed rules: "
        "mirroring goes on if all axes raise mean Dice by --min-gain with HD95 at most "
        "--hd95-slack mm worse; then the set with the fewest passes within --tolerance Dice and "
        "--hd95-slack mm of all axes, finding as many tumors of 2 mL or more, with no more "
        "fallbacks. Writes choice.json, choice.md (the table) and the masks to OUT; resumes.",
    )
    p.add_argument("model", type=Path, help="model folder holding plan.json")
    p.add_argument(
        "tuning", type=Path, help="labelled cases (ImagesTr/, LabelsTr/) no other choice used"
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for the results")
    p.add_argument("--cases", type=int, help="only the first CASES cases (by case id)")
    p.add_argument(
        "--apply", action="store_true", help="write the choice into the model's plan.json"
    )
    # The rule's defaults live in mirror_choice.Rule, imported only when the command runs.
    p.add_argument("--min-gain", type=float, help="Dice gain that turns mirroring on (0.005)")
    p.add_argument("--tolerance", type=float, help="Dice below all axes' a set may be (0.002)")
    p.add_argument("--hd95-slack", type=float, help="HD95 worse in mm a set may be (0.5)")
    add_engine_options(p)
    p.set_defaults(run=_run_choose_mirroring)


def _run_choose_mirroring(args: argparse.Namespace) -> int:
    import logging

    from pantherseg import mirror_choice
    from pantherseg.mirror_choice import TABLE_FILE, Rule, choose_mirroring

    # Its own lines and the progress bar; not each of the eight segmentations' lines per case.
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
    logging.getLogger(mirror_choice.__name__).setLevel(logging.INFO)
    if args.cases is not None and args.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {args.cases}")
    given = {
        "min_gain": args.min_gain,
        "tolerance": args.tolerance,
        "hd95_slack_mm": args.hd95_slack,
    }
    rule = Rule(**{name: value for name, value in given.items() if value is not None})
    chosen, _ = choose_mirroring(
        args.model,
        args.tuning,
        args.out,
        rule,
        limit=args.cases,
        apply=args.apply,
        device=args.device,
        threads=args.threads,
        cpu_engine=args.cpu_engine,
    )
    print((args.out / TABLE_FILE).read_text(), end="")
    choice = f"mirroring over {chosen} ({2 ** len(chosen)} passes)" if chosen else "no mirroring"
    where = f"written into {args.model / 'plan.json'}" if args.apply else "plan.json unchanged"
    print(f"chosen: {choice}; {where}")
    return 0


def _add_upgrade_plan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upgrade-plan",
        help="convert a model's version 1 plan.json to the current format, in place",
        description="Moves the plan's training provenance to metadata.json and adds what version "
        "2 records; the weights are not touched.",
    )
    p.add_argument("model", type=Path, help="model folder holding plan.json")
    p.add_argument(
        "--mirror-axes",
        type=int,
        nargs="*",
        choices=[0, 1, 2],
        help="the axes (z=0, y=1, x=2) training mirrored, which version 1 did not record "
        "(the training YAML's augmentation.mirror_axes); default: the axes inference mirrored",
    )
    p.set_defaults(run=_run_upgrade_plan)


def _run_upgrade_plan(args: argparse.Namespace) -> int:
    from pantherseg.plan_upgrade import upgrade_model_dir

    path = upgrade_model_dir(args.model, args.mirror_axes)
    print(f"{path}: upgraded to the current plan format; provenance moved to metadata.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pantherseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pantherseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_synth(subparsers)
    _add_evaluate(subparsers)
    _add_predict(subparsers)
    _add_choose_mirroring(subparsers)
    _add_upgrade_plan(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageError, ValueError, OSError) as error:
        print(f"pantherseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pantherseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
