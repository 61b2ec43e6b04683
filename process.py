"""Container entrypoint: segment the pancreatic tumor in the job's one MRI image.

Reads /input (inputs.json, else images/*mri*/), writes exactly one uint8 mask to
/output/images/pancreatic-tumor-segmentation/<input name>.mha, and exits 0. On any failure (an
image of the task the model was not trained for among them) it prints one line on stderr, exits
non-zero, and leaves no output file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from pantherseg.inference.grand_challenge import (
    SOCKET_TASKS,
    check_model_task,
    find_input_image,
    output_mask_path,
)
from pantherseg.inference.options import add_inference_options, load_segmenter
from pantherseg.inference.pipeline import segment_file
from pantherseg.inference.plan import PLAN_FILE, load_plan

GRAND_CHALLENGE_MODEL = Path("/opt/ml/model")
BAKED_MODEL = Path(__file__).resolve().parent / "model"


def default_model_dir() -> Path:
    """Uploaded weights (extracted by grand-challenge to /opt/ml/model) win over baked ones."""
    if (GRAND_CHALLENGE_MODEL / PLAN_FILE).is_file():
        return GRAND_CHALLENGE_MODEL
    return BAKED_MODEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"), help="default /input")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="default /output")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"model folder (default {GRAND_CHALLENGE_MODEL} if it holds a plan, "
        f"else {BAKED_MODEL})",
    )
    add_inference_options(parser)
    parser.add_argument("--traceback", action="store_true", help="print tracebacks of failures")
    return parser.parse_args(argv)


def _check_writable(folder: Path) -> None:
    """Fails before the expensive work if the mask could not be written anyway, and creates
    nothing: a failed job leaves the output folder as it found it (the writer makes the folders)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"{folder}: cannot create the output folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == folder:
            raise OSError(f"{folder}: output folder is not writable")
        raise OSError(f"{folder}: cannot create the output folder ({existing} is not writable)")


def run(args: argparse.Namespace) -> Path:
    case = find_input_image(args.input)
    output = output_mask_path(args.output, case.path)
    _check_writable(output.parent)
    model_dir = args.model or default_model_dir()
    # The plan alone says the model's task: an image of the other task is refused before any
    # fold's weights are loaded and compiled (and checksummed: loading the segmenter does that).
    model_socket = load_plan(model_dir, verify_weights=False).input_socket
    check_model_task(case, model_socket, model_dir)
    segmenter = load_segmenter(model_dir, args)
    log = logging.getLogger("pantherseg")
    log.info("input %s (%s); model: %s", case.path, case.socket, segmenter.description)
    if case.socket not in SOCKET_TASKS:
        log.warning(
            "the input's folder %s names no task; the model was trained for %s",
            case.socket,
            model_socket,
        )
    segment_file(segmenter, case.path, output)
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Progress goes to stdout: grand-challenge marks anything on stderr as a warning.
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        output = run(args)
    except Exception as error:  # every failure must become one line and a non-zero exit
        if args.traceback:
            traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"process.py: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
