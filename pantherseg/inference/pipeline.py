"""One case from image to mask: preprocess, sliding window over the fold ensemble, map the tumor
probability back, post-process. Reading and writing files stays with the callers (`process.py`,
`pantherseg predict`), which share `segment_file`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pantherseg.inference.io import check_inference_image, read_image, write_mask
from pantherseg.inference.plan import MIRRORING_CHOICES, Plan, fold_paths, load_plan
from pantherseg.inference.postprocess import PostprocessReport, postprocess
from pantherseg.inference.preprocess import (
    PreprocessRecord,
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


def class_probabilities(
    logits: np.ndarray, plan: Plan, wanted: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-class probabilities from the network's averaged logits (K, Z, Y, X), only for the
    classes asked for, so that no full multi-class probability array is kept."""
    classes = plan.inference.classes
    if logits.shape[0] != len(classes):
        raise ValueError(
            f"the network gives {logits.shape[0]} output channels, the plan names {len(classes)} "
            f"classes {classes}"
        )
    out = {}
    if plan.inference.activation == "sigmoid":
        out["tumor"] = sigmoid(logits[0])
        return out
    peak = logits.max(axis=0)
    denominator = np.exp(logits - peak).sum(axis=0)
    for name in wanted:
        out[name] = np.exp(logits[classes.index(name)] - peak) / denominator
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp only ever sees non-positive numbers, so a logit of
    -100 gives 3.7e-44 quietly instead of numpy's overflow warning on stderr."""
    x = np.asarray(logits, dtype=np.float32)
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + small), small / (1.0 + small)).astype(np.float32)


def mirror_axes_to_use(plan: Plan, mirroring: str = "plan") -> tuple[int, ...]:
    """The axes test-time mirroring flips: the trained ones when the plan (by default) or the
    user asks for mirroring; asking for it from a network trained without flips is an error."""
    if mirroring not in MIRRORING_CHOICES:
        raise ValueError(f"mirroring must be one of {MIRRORING_CHOICES}, got {mirroring!r}")
    wanted = plan.inference.test_time_mirroring if mirroring == "plan" else mirroring == "on"
    if wanted and not plan.inference.mirror_axes:
        raise ValueError(
            "test-time mirroring was asked for, but the plan lists no axes the network was "
            "trained to mirror (inference.mirror_axes)"
        )
    return tuple(plan.inference.mirror_axes) if wanted else ()


class Segmenter:
    """A loaded model: the plan and its fold predictors, ready to segment any number of cases."""

    def __init__(
        self,
        plan: Plan,
        folds: Sequence[Predictor],
        description: str = "",
        on_gpu: bool = True,
        mirroring: str = "plan",
    ) -> None:
        if not folds:
            raise ValueError("a model needs at least one fold")
        self.plan = plan
        # Batching tiles pays on a GPU; on the CPU one tile at a time is faster and lighter.
        self.batch_size = plan.inference.batch_size if on_gpu else 1
        self.mirror_axes = mirror_axes_to_use(plan, mirroring)

        def flipped(predictor: Predictor) -> Predictor:
            return mirrored(predictor, self.mirror_axes) if self.mirror_axes else predictor

        if plan.inference.stitching == "nnunet":
            # nnU-Net stitches each fold on its own and averages the stitched logits.
            self.predictors = [flipped(fold) for fold in folds]
        else:  # one stitching pass: the folds' logits are averaged per tile
            self.predictors = [flipped(averaged(list(folds)) if len(folds) > 1 else folds[0])]
        flips = f"mirroring axes {list(self.mirror_axes)}" if self.mirror_axes else "no mirroring"
        self.description = f"{description}; {flips}" if description else flips

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        device: str = "auto",
        threads: int | None = None,
        mirroring: str = "plan",
    ) -> Segmenter:
        """Loads and checks the plan and every fold's ONNX weights."""
        from pantherseg.inference.engines import EngineError, OnnxEngine

        plan = load_plan(model_dir)
        half = plan.inference.precision == "float16"
        engines = [
            OnnxEngine(path, device=device, threads=threads, allow_fp16=half)
            for path in fold_paths(plan, model_dir)
        ]
        for engine, path in zip(engines, fold_paths(plan, model_dir), strict=True):
            if engine.patch_size not in (None, plan.inference.patch_size_zyx):
                raise EngineError(
                    f"{path}: the network takes patches of {engine.patch_size}, the plan says "
                    f"{plan.inference.patch_size_zyx}"
                )
            if engine.in_channels != 1:
                raise EngineError(f"{path}: the network takes {engine.in_channels} channels, not 1")
        providers = sorted({engine.provider for engine in engines})
        description = f"{len(engines)} fold(s) from {model_dir} on {', '.join(providers)}"
        return cls(
            plan,
            engines,
            description,
            on_gpu=providers != ["CPUExecutionProvider"],
            mirroring=mirroring,
        )

    def probabilities(
        self,
        image: np.ndarray,
        spacing_zyx: Sequence[float],
        direction_xyz: Sequence[float],
        progress: bool = False,
        timings: Timings | None = None,
    ) -> dict[str, np.ndarray]:
        """Tumor (and, when the network predicts it, pancreas) probability on the input's grid,
        keyed "tumor" and "pancreas"; with the argmax decision also "argmax_tumor", where tumor is
        the likeliest class. Cross-validation tunes post-processing on exactly these maps.
        """
        timings = timings if timings is not None else Timings()
        plan = self.plan
        with timings.stage("preprocess"):
            data, record = preprocess(
                image, spacing_zyx, plan.preprocessing, direction_xyz=direction_xyz
            )
        if record.transpose != (0, 1, 2):
            log.info(
                "array axes transposed by %s into the plan's patient-axis order %s",
                record.transpose,
                plan.preprocessing.patient_axes_zyx,
            )
        with timings.stage("network"):
            logits = self._stitched_logits(data[np.newaxis], progress)
        del data
        with timings.stage("restore"):
            return self._restored(logits, record)

    def _stitched_logits(self, volume: np.ndarray, progress: bool) -> np.ndarray:
        """(K, Z, Y, X) logits on the network's grid. With nnU-Net's stitching every fold is
        stitched on its own and the results are averaged in float16, as its predictor does."""
        inference = self.plan.inference
        total = None
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
            half = logits.astype(np.float16)
            total = half if total is None else total + half
        assert total is not None
        return (total / np.float16(len(self.predictors))).astype(np.float32)

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
                back.astype(np.float16).astype(np.float32), plan, wanted
            )
            restored = {name: uncrop(p, record) for name, p in probabilities.items()}
        else:
            restored = {
                name: restore(p, record, resampling)
                for name, p in class_probabilities(logits, plan, wanted).items()
            }
        out = {name: restored[name] for name in ("tumor", "pancreas") if name in restored}
        if by_argmax:  # outside the crop every class is 0 and the first, background, wins
            winner = np.stack([restored[name] for name in classes]).argmax(axis=0)
            out["argmax_tumor"] = winner == classes.index("tumor")
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
        and direction cosines."""
        timings = timings if timings is not None else Timings()
        restored = self.probabilities(image, spacing_zyx, direction_xyz, progress, timings)
        guided = self.plan.postprocessing.pancreas_guidance.enabled
        with timings.stage("postprocess"):
            mask, report = postprocess(
                restored["tumor"],
                spacing_zyx,
                self.plan.postprocessing,
                restored.get("pancreas") if guided else None,
                candidates=restored.get("argmax_tumor"),
            )
        return Segmentation(mask, report, timings)


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
