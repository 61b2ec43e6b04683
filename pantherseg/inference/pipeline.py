"""One case from image to mask: for a two-stage model the localiser's box first, then preprocess,
sliding window over the fold ensemble (within the box), map the tumor probability back,
post-process. Reading and writing files stays with the callers (`process.py`,
`pantherseg predict`), which share `segment_file`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pantherseg.inference.half_precision import add_in_float16, round_to_float16
from pantherseg.inference.io import check_inference_image, read_image, write_mask
from pantherseg.inference.localise import Localisation, grown_box, locate_foreground
from pantherseg.inference.plan import (
    AXIS_LETTERS,
    MIRRORING_CHOICES,
    Inference,
    Localiser,
    Plan,
    Preprocessing,
    fold_paths,
    load_plan,
    mirroring_letters_axes,
    planned_test_time_axes,
)
from pantherseg.inference.postprocess import PostprocessReport, postprocess
from pantherseg.inference.preprocess import (
    Box,
    PreprocessRecord,
    grid_box_to_input,
    preprocess,
    resample_back,
    restore,
    uncrop,
)
from pantherseg.inference.sliding_window import (
    Predictor,
    averaged,
    mirrored,
    sliding_window_predict,
)

if TYPE_CHECKING:
    from pantherseg.inference.engines import Engine

log = logging.getLogger("pantherseg")


@dataclass
class Timings:
    """Wall-clock seconds per stage, in the order the stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return f"{parts}; total {total:.2f}s"


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 {0, 1} on the input grid
    report: PostprocessReport
    timings: Timings
    localisation: Localisation


def class_probabilities(
    logits: np.ndarray, inference: Inference, wanted: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-class probabilities from the network's averaged logits (K, Z, Y, X), only for the
    classes asked for, so that no full multi-class probability array is kept."""
    classes = inference.classes
    if logits.shape[0] != len(classes):
        raise ValueError(
            f"the network gives {logits.shape[0]} output channels, the plan names {len(classes)} "
            f"classes {classes}"
        )
    out = {}
    if inference.activation == "sigmoid":
        out["tumor"] = sigmoid(logits[0])
        return out
    # Class by class, elementwise, each exponential computed once: twice as fast as reducing
    # over the leading class axis, with the same values and the same order of summation. Only
    # the wanted classes' exponentials are kept; the others are added and dropped.
    peak = functools.reduce(np.maximum, logits)
    wanted_indices = {classes.index(name) for name in wanted}
    kept: dict[int, np.ndarray] = {}
    denominator: np.ndarray | None = None
    for index, channel in enumerate(logits):
        exponential = np.exp(channel - peak)
        if denominator is None:
            denominator = exponential.copy() if index in wanted_indices else exponential
        else:
            denominator += exponential
        if index in wanted_indices:
            kept[index] = exponential
    for name in wanted:
        share = kept[classes.index(name)]
        out[name] = np.divide(share, denominator, out=share)
    return out


def is_argmax(maps: Sequence[np.ndarray], index: int) -> np.ndarray:
    """Where `maps[index]` is the largest of the maps, ties won by the first as numpy's argmax
    wins them: comparisons map by map, over ten times faster than argmax over a stacked class
    axis on a full-size case, and no stacked copy."""
    wins = np.ones(maps[index].shape, dtype=bool)
    for other, values in enumerate(maps):
        if other != index:
            beats = np.greater if other < index else np.greater_equal
            wins &= beats(maps[index], values)
    return wins


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp only ever sees non-positive numbers, so a logit of
    -100 gives 3.7e-44 quietly instead of numpy's overflow warning on stderr."""
    x = np.asarray(logits, dtype=np.float32)
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + small), small / (1.0 + small)).astype(np.float32)


def mirror_axes_to_use(inference: Inference, mirroring: str = "plan") -> tuple[int, ...]:
    """The axes test-time mirroring flips: by the plan (the default), its test-time axes (all
    the trained ones unless it names fewer); "on", every trained axis; "off", none; axis letters
    ("yx"), those axes, which training must have flipped. Asking for mirroring from a network
    trained without flips is an error."""
    if mirroring not in MIRRORING_CHOICES:
        axes = mirroring_letters_axes(mirroring)
        if not set(axes) <= set(inference.mirror_axes):
            trained = "".join(AXIS_LETTERS[a] for a in inference.mirror_axes) or "none"
            raise ValueError(
                f"test-time mirroring over {mirroring} was asked for, but the network was trained "
                f"to mirror only the axes {trained} (inference.mirror_axes)"
            )
        return axes
    wanted = inference.test_time_mirroring if mirroring == "plan" else mirroring == "on"
    if wanted and not inference.mirror_axes:
        raise ValueError(
            "test-time mirroring was asked for, but the plan lists no axes the network was "
            "trained to mirror (inference.mirror_axes)"
        )
    if mirroring == "plan":
        return planned_test_time_axes(inference)
    return tuple(inference.mirror_axes) if wanted else ()


class NetworkStage:
    """One network on its own grid: preprocessing, then the sliding window over its folds."""

    def __init__(
        self,
        preprocessing: Preprocessing,
        inference: Inference,
        folds: Sequence[Predictor],
        on_gpu: bool,
        mirroring: str,
    ) -> None:
        if not folds:
            raise ValueError("a model needs at least one fold")
        self.preprocessing = preprocessing
        self.inference = inference
        # Batching tiles pays on a GPU; on the CPU one tile at a time is faster and lighter.
        self.batch_size = inference.batch_size if on_gpu else 1
        self.mirror_axes = mirror_axes_to_use(inference, mirroring)

        def flipped(predictor: Predictor) -> Predictor:
            return mirrored(predictor, self.mirror_axes) if self.mirror_axes else predictor

        if inference.stitching == "nnunet":
            # nnU-Net stitches each fold on its own and averages the stitched logits.
            self.predictors = [flipped(fold) for fold in folds]
        else:  # one stitching pass: the folds' logits are averaged per tile
            self.predictors = [flipped(averaged(list(folds)) if len(folds) > 1 else folds[0])]

    def logits(
        self,
        image: np.ndarray,
        spacing_zyx: Sequence[float],
        direction_xyz: Sequence[float],
        progress: bool,
        timings: Timings,
        region: Box | None = None,
    ) -> tuple[np.ndarray, PreprocessRecord]:
        """(K, Z, Y, X) logits on the network's grid and the record that maps them back."""
        with timings.stage("preprocess"):
            data, record = preprocess(
                image, spacing_zyx, self.preprocessing, direction_xyz=direction_xyz, region=region
            )
        if record.transpose != (0, 1, 2):
            log.info(
                "array axes transposed by %s into the plan's patient-axis order %s",
                record.transpose,
                self.preprocessing.patient_axes_zyx,
            )
        with timings.stage("network"):
            logits = self._stitched_logits(data[np.newaxis], progress)
        return logits, record

    def _stitched_logits(self, volume: np.ndarray, progress: bool) -> np.ndarray:
        """With nnU-Net's stitching every fold is stitched on its own and the results are
        summed and divided in float16, as its predictor does."""
        inference = self.inference
        total: np.ndarray | None = None
        for predictor in self.predictors:
            logits = sliding_window_predict(
                volume,
                predictor,
                inference.patch_size_zyx,
                step_fraction=inference.tile_step,
                batch_size=self.batch_size,
                sigma_scale=inference.gaussian_sigma_scale,
                stitching=inference.stitching,
                progress=progress,
            )
            if len(self.predictors) == 1:
                return logits
            if total is None:
                total = logits  # already float16 values: the stitching rounded them
            else:
                add_in_float16(total, logits)
        assert total is not None
        total /= np.float32(len(self.predictors))
        return round_to_float16(total, out=total)


class Segmenter:
    """A loaded model: the plan and its fold predictors (with a localiser's, for a two-stage
    model), ready to segment any number of cases."""

    def __init__(
        self,
        plan: Plan,
        folds: Sequence[Predictor],
        description: str = "",
        on_gpu: bool = True,
        mirroring: str = "plan",
        localiser_folds: Sequence[Predictor] = (),
    ) -> None:
        self.plan = plan
        self.region = NetworkStage(
            plan.preprocessing, plan.inference, folds, on_gpu=on_gpu, mirroring=mirroring
        )
        self.localiser = None
        if plan.localiser is not None:
            # The localiser mirrors as its plan says: `mirroring` is the main network's choice.
            self.localiser = NetworkStage(
                plan.localiser.preprocessing,
                plan.localiser.inference,
                localiser_folds,
                on_gpu=on_gpu,
                mirroring="plan",
            )
        elif localiser_folds:
            raise ValueError("localiser weights were given, but the plan has no localiser")
        axes = self.region.mirror_axes
        flips = f"mirroring axes {list(axes)}" if axes else "no mirroring"
        stages = "two stages (localiser, then region)" if self.localiser else "one stage"
        self.description = f"{description}; {stages}; {flips}" if description else flips

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        device: str = "auto",
        threads: int | None = None,
        mirroring: str = "plan",
        cpu_engine: str = "auto",
    ) -> Segmenter:
        """Loads and checks the plan and every fold's ONNX weights (on the CPU in `cpu_engine`,
        see `engines.load_engine`)."""
        plan = load_plan(model_dir)
        engines = load_fold_engines(plan, model_dir, device, threads, cpu_engine)
        return cls(
            plan,
            engines[0],
            describe_engines(engines, model_dir),
            on_gpu=any(engine.on_gpu for stage in engines for engine in stage),
            mirroring=mirroring,
            localiser_folds=engines[1] if len(engines) > 1 else (),
        )

    def locate(
        self,
        image: np.ndarray,
        spacing_zyx: Sequence[float],
        direction_xyz: Sequence[float],
        progress: bool = False,
        timings: Timings | None = None,
    ) -> Localisation:
        """The box the main network runs in, from the localiser (a single-stage model, or a
        localiser that finds nothing plausible: the whole image, with the reason)."""
        if self.localiser is None or self.plan.localiser is None:
            return Localisation(None, "single-stage model")
        return locate(
            self.localiser,
            self.plan.localiser,
            image,
            spacing_zyx,
            direction_xyz,
            progress,
            timings if timings is not None else Timings(),
        )

    def probabilities(
        self,
        image: np.ndarray,
        spacing_zyx: Sequence[float],
        direction_xyz: Sequence[float],
        progress: bool = False,
        timings: Timings | None = None,
        region: Box | None = None,
    ) -> dict[str, np.ndarray]:
        """Tumor (and, when the network predicts it, pancreas) probability on the input's grid,
        keyed "tumor" and "pancreas"; with the argmax decision also "argmax_tumor", where tumor is
        the likeliest class. Within `region` (from `locate`) when given, zero outside it.
        Cross-validation tunes post-processing on exactly these maps.
        """
        timings = timings if timings is not None else Timings()
        logits, record = self.region.logits(
            image, spacing_zyx, direction_xyz, progress, timings, region=region
        )
        with timings.stage("restore"):
            return self._restored(logits, record)

    def _restored(self, logits: np.ndarray, record: PreprocessRecord) -> dict[str, np.ndarray]:
        """Tumor (and pancreas) probability on the input grid; with the argmax decision also
        `argmax_tumor`, where tumor is the most probable class. Restoring logits resamples every
        class's logits back (rounded to float16, as nnU-Net keeps them) before the activation."""
        plan = self.plan
        classes = plan.inference.classes
        by_argmax = plan.postprocessing.decision == "argmax"
        wanted = [c for c in classes if c != "background"] if not by_argmax else list(classes)
        resampling = plan.preprocessing.resampling
        if plan.inference.restore == "logits":
            back = np.stack([resample_back(channel, record, resampling) for channel in logits])
            del logits
            probabilities = class_probabilities(
                round_to_float16(back, out=back), plan.inference, wanted
            )
            restored = {name: uncrop(p, record) for name, p in probabilities.items()}
        else:
            restored = {
                name: restore(p, record, resampling)
                for name, p in class_probabilities(logits, plan.inference, wanted).items()
            }
        out = {name: restored[name] for name in ("tumor", "pancreas") if name in restored}
        if by_argmax:  # outside the crop every class is 0 and the first, background, wins
            maps = [restored[name] for name in classes]
            out["argmax_tumor"] = is_argmax(maps, classes.index("tumor"))
        return out

    def segment(
        self,
        image: np.ndarray,
        spacing_zyx: Sequence[float],
        direction_xyz: Sequence[float],
        progress: bool = False,
        timings: Timings | None = None,
    ) -> Segmentation:
        """The tumor mask of one image given as a (z, y, x) float32 array with its file's spacing
        and direction cosines: located first when the model has two stages."""
        timings = timings if timings is not None else Timings()
        found = self.locate(image, spacing_zyx, direction_xyz, progress, timings)
        if self.localiser is not None:
            log.info("%s", found.describe(image.shape))
        restored = self.probabilities(
            image, spacing_zyx, direction_xyz, progress, timings, region=found.box
        )
        guided = self.plan.postprocessing.pancreas_guidance.enabled
        with timings.stage("postprocess"):
            mask, report = postprocess(
                restored["tumor"],
                spacing_zyx,
                self.plan.postprocessing,
                restored.get("pancreas") if guided else None,
                candidates=restored.get("argmax_tumor"),
            )
        return Segmentation(mask, report, timings, found)


def locate(
    stage: NetworkStage,
    localiser: Localiser,
    image: np.ndarray,
    spacing_zyx: Sequence[float],
    direction_xyz: Sequence[float],
    progress: bool,
    timings: Timings,
) -> Localisation:
    """The localiser's box in input voxels grown by the margin (its stages timed with a
    "localiser" prefix), or no box with the reason. Training calls it with each fold's network
    to run the whole chain out of fold."""
    stage_timings = Timings()
    logits, record = stage.logits(image, spacing_zyx, direction_xyz, progress, stage_timings)
    for name, seconds in stage_timings.seconds.items():
        key = f"localiser {name}"
        timings.seconds[key] = timings.seconds.get(key, 0.0) + seconds
    with timings.stage("localiser box"):
        background = class_probabilities(logits, localiser.inference, ["background"])
        found = locate_foreground(
            background["background"] <= 1.0 - localiser.threshold,
            record.grid_spacing_zyx,
            localiser,
        )
        if found.box is None:
            return found
        core = grid_box_to_input(*found.box, record)
        box = grown_box(core, spacing_zyx, localiser.margin_mm, image.shape)
        return dataclasses.replace(found, box=box, core=core)


def load_fold_engines(
    plan: Plan,
    model_dir: Path,
    device: str = "auto",
    threads: int | None = None,
    cpu_engine: str = "auto",
) -> list[list[Engine]]:
    """Every fold's network, checked against the plan: the main stage's, then the localiser's
    when the model has two stages."""
    from pantherseg.inference.engines import load_engine

    stages = [plan.inference] + ([plan.localiser.inference] if plan.localiser else [])
    engines: list[list[Engine]] = []
    for inference in stages:
        half = inference.precision == "float16"
        paths = fold_paths(inference, model_dir)
        loaded = [
            load_engine(path, device, threads, allow_fp16=half, cpu_engine=cpu_engine)
            for path in paths
        ]
        for engine, path in zip(loaded, paths, strict=True):
            _check_engine(engine, path, inference)
        engines.append(loaded)
    return engines


def describe_engines(engines: Sequence[Sequence[Engine]], model_dir: Path) -> str:
    """How many folds, from where, on which providers: the log's first line about a model."""
    providers = sorted({engine.provider for stage in engines for engine in stage})
    return f"{len(engines[0])} fold(s) from {model_dir} on {', '.join(providers)}"


def _check_engine(engine: Engine, path: Path, inference: Inference) -> None:
    from pantherseg.inference.engines import EngineError

    if engine.patch_size not in (None, inference.patch_size_zyx):
        raise EngineError(
            f"{path}: the network takes patches of {engine.patch_size}, the plan says "
            f"{inference.patch_size_zyx}"
        )
    if engine.in_channels != 1:
        raise EngineError(f"{path}: the network takes {engine.in_channels} channels, not 1")


def segment_file(
    segmenter: Segmenter, input_path: Path, output_path: Path, progress: bool = False
) -> Segmentation:
    """Reads, checks, segments and writes one case; logs the time of each stage."""
    timings = Timings()
    with timings.stage("read"):
        image = read_image(input_path)
        array = check_inference_image(image, input_path)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    result = segmenter.segment(
        array, spacing_zyx, image.GetDirection(), progress=progress, timings=timings
    )
    with timings.stage("write"):
        write_mask(result.mask, image, output_path)
    voxels = int(result.mask.sum())
    log.info(
        "%s: %d tumor voxels (%.2f mL) in %d component(s)%s; %s",
        input_path.name,
        voxels,
        voxels * float(np.prod(spacing_zyx)) / 1000,
        result.report.kept or (1 if result.report.fallback else 0),
        f" [empty result avoided: {result.report.fallback}]" if result.report.fallback else "",
        timings.summary(),
    )
    return result
