"""The preprocessed cache: every labelled case on the plan's grid, computed once, memory-mapped by
the data loaders.

Preprocessing goes through `pantherseg.inference.preprocess.preprocess` on exactly the array
inference reads (`pantherseg.inference.io.read_image` + `check_inference_image`), so the network
trains on what it will be given; a test proves the arrays are equal. Layout:

    <cache>/cache.json               what the cache was built for (hash of the plan's
                                     preprocessing section and the label mode) and its cases
    <cache>/<case_id>/image.npy      float32 (1, Z, Y, X)
    <cache>/<case_id>/label.npy      uint8 (1, Z, Y, X): {0, 1} for "tumor", {0, 1, 2} for
                                     "tumor+pancreas"
    <cache>/<case_id>/record.json    the PreprocessRecord, class voxel counts, cache key, sources

Every file is written under a temporary name and renamed, record.json last, so a case with a
record is complete. A changed plan or label mode empties the cache; an unchanged one is reused,
and a run that was killed continues with the cases not done yet. A case whose image or label file
changed since (path, size or modification time) is preprocessed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pantherseg.inference.files import atomic_output, atomic_write_text
from pantherseg.inference.io import (
    Geometry,
    ImageError,
    check_inference_image,
    read_image,
)
from pantherseg.inference.plan import Plan, Preprocessing
from pantherseg.inference.preprocess import PreprocessRecord, preprocess, preprocess_label
from pantherseg.parallel import parallel_map
from training.data import LABEL_MODES, PANCREAS, TUMOR, Case, Dataset

CACHE_FORMAT = "pantherseg-cache"
CACHE_VERSION = 2  # 2: records carry the axis transpose
INDEX_FILE = "cache.json"
IMAGE_FILE, LABEL_FILE, RECORD_FILE = "image.npy", "label.npy", "record.json"
_CASE_FILES = (IMAGE_FILE, LABEL_FILE, RECORD_FILE)


class CacheError(RuntimeError):
    """A cache that cannot be built or read; the message names the case or the file."""


@dataclass(frozen=True)
class CachedCase:
    case_id: str
    image_path: Path
    label_path: Path
    record: PreprocessRecord
    class_voxels: dict[int, int]  # label value -> voxels on the preprocessed grid


def cache_key(preprocessing: Preprocessing, labels: str) -> str:
    """Hash of everything that changes the cached arrays: the preprocessing settings, the label
    mode and this cache's format version."""
    content = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "preprocessing": asdict(preprocessing),
        "labels": labels,
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        np.save(tmp, array, allow_pickle=False)


def _source(path: Path) -> dict[str, Any]:
    """Enough to notice that a source file was replaced after it was cached."""
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _label_values(label: np.ndarray, where: Path) -> np.ndarray:
    values = np.unique(label)
    bad = sorted(set(values.tolist()) - {0, TUMOR, PANCREAS})
    if bad:
        raise CacheError(f"{where}: label values {bad} outside 0, 1 tumor, 2 pancreas")
    return label.astype(np.uint8, copy=False)


def _preprocess_case(job: tuple[Case, Preprocessing, str, str, str]) -> tuple[str, str | None]:
    """Preprocesses one case into its folder; returns (case id, error message or None).

    Errors come back as messages rather than exceptions, so the other cases still finish and a
    rerun has only the failed ones left.
    """
    case, preprocessing, labels, key, folder = job
    try:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD_FILE).unlink(missing_ok=True)  # a redone case is incomplete until the end
        image = read_image(case.image)
        array = check_inference_image(image, case.image)  # exactly what inference computes with
        spacing_zyx = tuple(reversed(image.GetSpacing()))
        data, record = preprocess(
            array, spacing_zyx, preprocessing, direction_xyz=image.GetDirection()
        )
        del array

        label_image = read_image(case.label)
        differences = Geometry.of(image).differences(Geometry.of(label_image))
        if differences:
            raise CacheError(f"{case.label}: differs from the image: {'; '.join(differences)}")
        label = _label_values(sitk.GetArrayFromImage(label_image), case.label)
        if labels == "tumor":
            # Pancreas dropped before resampling: the tumor mask is its own indicator > 0.5,
            # not whatever survives the competition with the pancreas.
            label = (label == TUMOR).astype(np.uint8)
        target = preprocess_label(label, record).astype(np.uint8, copy=False)
        counts = np.bincount(target.ravel(), minlength=3 if labels == "tumor+pancreas" else 2)

        _save_npy(out / IMAGE_FILE, data[np.newaxis])
        _save_npy(out / LABEL_FILE, target[np.newaxis])
        content = {
            "case_id": case.case_id,
            "cache_key": key,
            "record": asdict(record),
            "class_voxels": {str(v): int(n) for v, n in enumerate(counts)},
            "sources": {"image": _source(case.image), "label": _source(case.label)},
        }
        atomic_write_text(out / RECORD_FILE, json.dumps(content, indent=1) + "\n")
        return case.case_id, None
    except (ImageError, CacheError, ValueError, OSError, RuntimeError) as error:
        return case.case_id, f"case {case.case_id}: {error}"


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_done(case: Case, folder: Path, key: str) -> bool:
    record = _read_record(folder)
    if record is None or record.get("cache_key") != key:
        return False
    if not all((folder / name).is_file() for name in (IMAGE_FILE, LABEL_FILE)):
        return False
    try:
        sources = {"image": _source(case.image), "label": _source(case.label)}
    except OSError:
        return False
    return record.get("sources") == sources


def _cached_case(folder: Path) -> CachedCase:
    record = _read_record(folder)
    if record is None:
        raise CacheError(f"{folder / RECORD_FILE}: missing or not valid JSON; rebuild the cache")
    try:
        fields = record["record"]
        preprocess_record = PreprocessRecord(
            **{name: tuple(value) for name, value in fields.items()}
        )
        return CachedCase(
            case_id=str(record["case_id"]),
            image_path=folder / IMAGE_FILE,
            label_path=folder / LABEL_FILE,
            record=preprocess_record,
            class_voxels={int(v): int(n) for v, n in record["class_voxels"].items()},
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CacheError(f"{folder / RECORD_FILE}: not a cache record ({error!r})") from None


def _clear(cache_dir: Path) -> None:
    """Removes cached cases (folders holding only cache files), nothing else."""
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        names = {p.name for p in folder.iterdir()}
        ours = all(n in _CASE_FILES or (n.startswith(".") and ".partial" in n) for n in names)
        if ours:
            shutil.rmtree(folder)


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((cache_dir / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(data, dict) and data.get("format") == CACHE_FORMAT
    return data if ok else None


def _write_index(
    cache_dir: Path, key: str, plan: Plan, labels: str, cases: list[str], complete: bool
) -> None:
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key,
        "labels": labels,
        "preprocessing": asdict(plan.preprocessing),
        "complete": complete,
        "cases": cases,
    }
    atomic_write_text(cache_dir / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def _case_folder(cache_dir: Path, case_id: str) -> Path:
    if not case_id or case_id in (".", "..") or "/" in case_id or "\\" in case_id:
        raise CacheError(f"case id {case_id!r} cannot name a cache folder")
    return cache_dir / case_id


def preprocess_dataset(
    dataset: Dataset,
    plan: Plan,
    cache_dir: Path,
    labels: str = "tumor",
    jobs: int = 2,
    progress: bool = True,
) -> list[CachedCase]:
    """Every labelled case of `dataset` preprocessed for `plan` into `cache_dir`, reusing what an
    earlier run with the same plan and label mode left there. Cases that fail are reported
    together, after the others are done."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if not dataset.labelled:
        raise CacheError(f"{dataset.root}: no labelled cases to preprocess")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(plan.preprocessing, labels)
    index = _read_index(cache_dir)
    if index is None or index.get("key") != key:
        _clear(cache_dir)  # another plan's arrays, or of unknown origin

    folders = {c.case_id: _case_folder(cache_dir, c.case_id) for c in dataset.labelled}
    pending = [
        (case, plan.preprocessing, labels, key, str(folders[case.case_id]))
        for case in dataset.labelled
        if not _is_done(case, folders[case.case_id], key)
    ]
    if pending:
        _write_index(cache_dir, key, plan, labels, [], complete=False)
    failures = [
        message
        for _, message in parallel_map(_preprocess_case, pending, jobs, progress, "preprocessing")
        if message is not None
    ]
    if failures:
        raise CacheError(
            f"{len(failures)} case(s) could not be preprocessed:\n" + "\n".join(failures)
        )
    case_ids = [c.case_id for c in dataset.labelled]
    _write_index(cache_dir, key, plan, labels, case_ids, complete=True)
    return [_cached_case(folders[c]) for c in case_ids]


def load_cache_index(
    cache_dir: Path, plan: Plan | None = None, labels: str | None = None
) -> list[CachedCase]:
    """The cases of a complete cache, in the order they were preprocessed. Given a plan (and
    label mode, default "tumor"), also checks that the cache was built for them, so that a
    trainer cannot read arrays made for another plan."""
    cache_dir = Path(cache_dir)
    index = _read_index(cache_dir)
    if index is None:
        raise CacheError(f"{cache_dir / INDEX_FILE}: no cache index (run preprocessing first)")
    if not index.get("complete"):
        raise CacheError(f"{cache_dir}: the cache is incomplete (run preprocessing again)")
    if plan is not None and index.get("key") != cache_key(plan.preprocessing, labels or "tumor"):
        raise CacheError(
            f"{cache_dir}: built for other preprocessing settings or labels "
            f"({index.get('labels')!r}); run preprocessing again"
        )
    return [_cached_case(_case_folder(cache_dir, c)) for c in index.get("cases", [])]


def load_cached(case: CachedCase, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image (1, Z, Y, X) float32 and label (1, Z, Y, X) uint8; memory-mapped by default, so
    that data-loader workers share the page cache instead of each holding copies."""
    mode = "r" if mmap else None
    image = np.load(case.image_path, mmap_mode=mode, allow_pickle=False)
    label = np.load(case.label_path, mmap_mode=mode, allow_pickle=False)
    expected = (1, *case.record.resampled_shape)
    if image.shape != expected or label.shape != expected:
        raise CacheError(
            f"case {case.case_id}: cached arrays {image.shape}, {label.shape} differ from the "
            f"record's {expected}; rebuild the cache"
        )
    if image.dtype != np.float32 or label.dtype != np.uint8:
        raise CacheError(
            f"case {case.case_id}: cached arrays have dtypes {image.dtype}, "
            f"{label.dtype}; rebuild the cache"
        )
    return image, label
