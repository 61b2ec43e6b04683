"""The inference options that process.py and `pantherseg predict` share, declared once so that the
container's entrypoint and the command line cannot drift apart."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pantherseg.inference.engines import CPU_ENGINES
from pantherseg.inference.plan import MIRRORING_CHOICES, mirroring_letters_axes

if TYPE_CHECKING:
    from pantherseg.inference.pipeline import Segmenter


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the network runs: --device, --threads, --cpu-engine, --mirroring."""
    add_engine_options(parser)
    parser.add_argument(
        "--mirroring",
        type=_mirroring,
        default="plan",
        help="test-time mirroring: as the plan says (default), on (over every trained axis), off, "
        "or over the trained axes named by letters (z, y, x; e.g. yx: 4 passes instead of 8)",
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Where the network runs: --device, --threads, --cpu-engine."""
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the network")
    parser.add_argument(
        "--cpu-engine",
        choices=CPU_ENGINES,
        default="auto",
        help="what runs the network on the CPU: OpenVINO when installed (auto, the default; "
        "faster), openvino, or onnxruntime",
    )


def _mirroring(value: str) -> str:
    if value not in MIRRORING_CHOICES:
        try:
            mirroring_letters_axes(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return value


def load_segmenter(model_dir: Path, args: argparse.Namespace) -> Segmenter:
    """The model in `model_dir`, loaded as the options of `add_inference_options` ask. The
    pipeline is imported here, not at start-up: `pantherseg synth` and `evaluate` never need it
    (0.24 s of imports)."""
    from pantherseg.inference.pipeline import Segmenter

    return Segmenter.from_model_dir(
        model_dir,
        device=args.device,
        threads=args.threads,
        mirroring=args.mirroring,
        cpu_engine=args.cpu_engine,
    )
