"""`pantherseg predict` as a user runs it, in its own process: a folder of images in, one mask per
image on that image's grid out, and a clear failure that names the file it could not segment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from imaging import phantom, rotation, write_image
from model_factory import threshold_model_dir

import process
from pantherseg.cli import build_parser
from pantherseg.inference.io import Geometry
from pantherseg.scoring.metrics import dice

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return threshold_model_dir(tmp_path_factory.mktemp("model"))


def predict(*args: Path | str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pantherseg.cli", "predict", *map(str, args)]
    return subprocess.run(
        [*command, "--device", "cpu"], capture_output=True, text=True, check=False, cwd=REPO
    )


def files_under(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_folder_of_images_gives_one_mask_per_image_on_its_grid(tmp_path, model_dir):
    """Two cases on different grids (one oblique, one NIfTI): each mask is uint8 {0, 1}, named
    after its image, on exactly that image's grid, and finds the bright block; a clean run says
    nothing on stderr, where users and schedulers look for errors."""
    cases = {
        "a.mha": phantom((12, 40, 44), seed=1),
        "b.nii.gz": phantom((12, 36, 30), seed=2),
    }
    grids = {
        "a.mha": {},
        "b.nii.gz": {
            "spacing_xyz": (1.1, 1.4, 3.0),
            "origin": (-50.0, 20.0, 100.0),
            "direction": rotation((0.2, -1, 0.5), -17.0),
        },
    }
    for name, (image, _) in cases.items():
        write_image(tmp_path / "images" / name, image.astype(np.int16), **grids[name])
    result = predict(tmp_path / "images", "-o", tmp_path / "masks", "--model", model_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert files_under(tmp_path / "masks") == [Path("a.mha"), Path("b.mha")]
    for name, (_, truth) in cases.items():
        mask_image = sitk.ReadImage(str(tmp_path / "masks" / f"{name.split('.')[0]}.mha"))
        source = sitk.ReadImage(str(tmp_path / "images" / name))
        assert mask_image.GetPixelID() == sitk.sitkUInt8
        assert Geometry.of(mask_image) == Geometry.of(source)
        mask = sitk.GetArrayFromImage(mask_image)
        assert set(np.unique(mask).tolist()) == {0, 1}
        assert dice(truth, mask.astype(bool)) > 0.9


def write_text_as_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not an image\n")
    return path


def write_2d_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(phantom()[0][0]), str(path))
    return path


# Each bad input (built in a folder, returns what to pass) and a fragment of its error message.
BAD_INPUTS = {
    "text file named .mha": (lambda d: write_text_as_image(d / "case.mha").parent, "be read"),
    "2D image": (lambda d: write_2d_image(d / "slice.mha").parent, "3D"),
    "not an image name": (lambda d: write_text_as_image(d / "notes.txt"), "neither an image"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_named_with_a_nonzero_exit_and_no_output(tmp_path, model_dir, name):
    build, reason = BAD_INPUTS[name]
    given = build(tmp_path / "inputs")
    bad_file = given if given.is_file() else next(given.iterdir())
    result = predict(given, "-o", tmp_path / "masks", "--model", model_dir)
    assert result.returncode != 0
    failure = [line for line in result.stderr.splitlines() if str(bad_file) in line]
    assert failure and reason in failure[0]
    assert not (tmp_path / "masks").exists() or files_under(tmp_path / "masks") == []


def test_a_bad_image_among_good_ones_leaves_no_mask_of_its_own(tmp_path, model_dir):
    """The good case is still segmented, but the run fails, names the bad file, and leaves
    nothing (not even a temporary file) for it."""
    write_image(tmp_path / "images" / "good.mha", phantom()[0])
    bad = write_2d_image(tmp_path / "images" / "bad.mha")
    result = predict(tmp_path / "images", "-o", tmp_path / "masks", "--model", model_dir)
    assert result.returncode != 0
    assert any(str(bad) in line and "3D" in line for line in result.stderr.splitlines())
    assert files_under(tmp_path / "masks") == [Path("good.mha")]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "good.mha"))).any()


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--device", "cpu", "--threads", "1", "--cpu-engine", "onnxruntime", "--mirroring", "off"],
        ["--device", "cuda", "--cpu-engine", "openvino", "--mirroring", "on"],
        ["--mirroring", "yx"],
    ],
)
def test_process_and_predict_read_the_inference_options_alike(options):
    """The container's entrypoint and `pantherseg predict` load a model with the same choices
    from the same flags (declared once, in `pantherseg.inference.options`)."""
    container = process.parse_args(options)
    command_line = build_parser().parse_args(["predict", "x.mha", "-o", "out", *options])
    for name in ("device", "threads", "cpu_engine", "mirroring"):
        assert getattr(container, name) == getattr(command_line, name), name


@pytest.mark.parametrize("value", ["xx", "xw", "", "all"])
def test_a_mirroring_that_names_no_axes_is_refused_by_both_entry_points(value, capsys):
    for parse in (
        lambda: process.parse_args(["--mirroring", value]),
        lambda: build_parser().parse_args(["predict", "x.mha", "-o", "o", "--mirroring", value]),
    ):
        with pytest.raises(SystemExit) as exited:
            parse()
        assert exited.value.code == 2
        assert "distinct axis letters among z, y, x" in capsys.readouterr().err


def test_an_unknown_cpu_engine_is_refused_by_both_entry_points(capsys):
    for parse in (
        lambda: process.parse_args(["--cpu-engine", "tvm"]),
        lambda: build_parser().parse_args(["predict", "x.mha", "-o", "o", "--cpu-engine", "tvm"]),
    ):
        with pytest.raises(SystemExit) as exited:
            parse()
        assert exited.value.code == 2
        assert "invalid choice: 'tvm'" in capsys.readouterr().err
