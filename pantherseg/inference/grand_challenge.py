"""Where grand-challenge puts a job's input and expects its output.

grand-challenge writes `/input/inputs.json` (a list of socket values, each with its interface's
slug, kind and relative path) and places each image under `/input/<relative_path>/`. The output
mask goes to `/output/images/pancreatic-tumor-segmentation/`, exactly one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pantherseg.inference.io import ImageError, strip_image_suffix
from pantherseg.inference.plan import OUTPUT_SOCKET, TASK_SOCKETS

INPUTS_JSON = "inputs.json"
INPUT_SOCKETS = set(TASK_SOCKETS.values())
SOCKET_TASKS = {socket: task for task, socket in TASK_SOCKETS.items()}


class InputError(ValueError):
    """The input folder does not hold exactly one usable MRI image."""


@dataclass(frozen=True)
class InputImage:
    path: Path
    socket: str


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and strip_image_suffix(p.name))


def _from_inputs_json(input_dir: Path) -> list[InputImage]:
    path = input_dir / INPUTS_JSON
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot be parsed ({error})") from None
    if not isinstance(values, list):
        raise InputError(f"{path}: expected a list of socket values")
    found = []
    for value in values:
        interface = value.get("interface") if isinstance(value, dict) else None
        if not isinstance(interface, dict):
            raise InputError(f"{path}: a socket value without an 'interface' object")
        slug, relative = interface.get("slug", ""), interface.get("relative_path", "")
        if slug not in INPUT_SOCKETS:
            continue
        images = _images_in(input_dir / relative)
        if not images:
            raise InputError(f"{path}: socket {slug} has no image file in {input_dir / relative}")
        found.extend(InputImage(image, slug) for image in images)
    return found


def find_input_image(input_dir: Path) -> InputImage:
    """The job's one MRI image: from inputs.json when present, else `images/*mri*/`."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder does not exist")
    if (input_dir / INPUTS_JSON).is_file():
        found = _from_inputs_json(input_dir)
        where = f"{input_dir / INPUTS_JSON} (sockets {sorted(INPUT_SOCKETS)})"
    else:
        found = [
            InputImage(image, folder.name)
            for folder in sorted((input_dir / "images").glob("*mri*"))
            for image in _images_in(folder)
        ]
        where = f"{input_dir / 'images'}/*mri*/"
    if not found:
        raise InputError(f"no MRI image found in {where}")
    if len(found) > 1:
        names = ", ".join(str(f.path.relative_to(input_dir)) for f in found)
        raise InputError(f"expected one MRI image, found {len(found)}: {names}")
    return found[0]


def check_model_task(case: InputImage, model_socket: str, model_dir: Path) -> None:
    """Refuses an image of the other task: a Task 1 model on a T2 MR-Linac scan (or the reverse)
    would write a confident mask that means nothing. A socket no task names (a hand-made folder
    without inputs.json) is not refused."""
    task = SOCKET_TASKS.get(case.socket)
    if task is None or case.socket == model_socket:
        return
    model_task = SOCKET_TASKS.get(model_socket, "another task")
    raise InputError(
        f"{case.path}: a {task} image (socket {case.socket}), but the model in {model_dir} was "
        f"trained for {model_task} (socket {model_socket}): use the {task} algorithm "
        f"(./build.sh --task {task}) or a {task} model"
    )


def output_mask_path(output_dir: Path, input_image: Path) -> Path:
    """`<output>/images/pancreatic-tumor-segmentation/<input name>.mha`."""
    stem = strip_image_suffix(Path(input_image).name)
    if stem is None:
        raise ImageError(f"{input_image}: not an image file name")
    return Path(output_dir) / "images" / OUTPUT_SOCKET / f"{stem}.mha"
