"""process.py end to end: the grand-challenge layout in, exactly one correct mask out, and a clear
failure with no output for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imaging import IDENTITY, make_image, rotation, write_image
from model_factory import threshold_model_dir

import process
from pantherseg.io import Geometry
from pantherseg.plan import PLAN_FILE

REPO = Path(__file__).resolve().parents[1]
SOCKET_DIR = Path("images") / "abdominal-t1-mri"
OUTPUT_DIR = Path("images") / "pancreatic-tumor-segmentation"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return threshold_model_dir(tmp_path_factory.mktemp("model"))


def phantom(shape=(12, 40, 44), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy body at about 100 with a bright block the threshold network will find."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, shape).astype(np.float32)
    truth = np.zeros(shape, dtype=bool)
    z, y, x = (max(1, s // 3) for s in shape)
    truth[z : 2 * z, y : 2 * y, x : 2 * x] = True
    image[truth] = 400
    return image, truth


def job(tmp_path: Path, array: np.ndarray, name="case.mha", inputs_json=True, **geometry) -> Path:
    root = tmp_path / "input"
    write_image(root / SOCKET_DIR / name, array, **geometry)
    if inputs_json:
        socket = {
            "interface": {
                "slug": "abdominal-t1-mri",
                "kind": "Image",
                "relative_path": str(SOCKET_DIR),
            },
            "image": {"name": name},
        }
        (root / "inputs.json").write_text(json.dumps([socket]))
    return root


def run(tmp_path: Path, input_dir: Path, model_dir: Path, *extra: str) -> int:
    args = ["--input", str(input_dir), "--output", str(tmp_path / "output")]
    return process.main([*args, "--model", str(model_dir), "--device", "cpu", *extra])


def outputs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "output").rglob("*") if p.is_file())


def test_one_mask_with_the_input_geometry(tmp_path, model_dir, capsys):
    image, truth = phantom()
    input_dir = job(tmp_path, image.astype(np.int16), name="abc-123.mha")
    assert run(tmp_path, input_dir, model_dir) == 0
    written = outputs(tmp_path)
    assert written == [tmp_path / "output" / OUTPUT_DIR / "abc-123.mha"]
    mask_image = sitk.ReadImage(str(written[0]))
    source = sitk.ReadImage(str(input_dir / SOCKET_DIR / "abc-123.mha"))
    assert mask_image.GetPixelID() == sitk.sitkUInt8
    assert Geometry.of(mask_image) == Geometry.of(source)
    mask = sitk.GetArrayFromImage(mask_image)
    assert set(np.unique(mask).tolist()) == {0, 1}
    dice = 2 * np.sum(mask.astype(bool) & truth) / (mask.sum() + truth.sum())
    assert dice > 0.9
    assert "wrote" in capsys.readouterr().out


def test_glob_fallback_without_inputs_json(tmp_path, model_dir):
    image, _ = phantom()
    input_dir = job(tmp_path, image, inputs_json=False)
    assert run(tmp_path, input_dir, model_dir) == 0
    assert [p.name for p in outputs(tmp_path)] == ["case.mha"]


directions = st.sampled_from(
    [
        IDENTITY,
        (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
        (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0),
        rotation((1, 1, 0), 23.0),
        rotation((0.2, -1, 0.5), -17.0),
    ]
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.tuples(st.integers(3, 14), st.integers(5, 45), st.integers(5, 45)),
    spacing=st.tuples(st.floats(0.6, 1.4), st.floats(0.6, 1.4), st.floats(2.0, 4.0)),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    direction=directions,
    dtype=st.sampled_from([np.int16, np.uint16, np.float32, np.float64, np.int32]),
)
def test_geometry_survives_any_grid(
    tmp_path_factory, model_dir, shape, spacing, origin, direction, dtype
):
    tmp_path = tmp_path_factory.mktemp("job")
    image, _ = phantom(shape)
    input_dir = job(
        tmp_path, image.astype(dtype), spacing_xyz=spacing, origin=origin, direction=direction
    )
    assert run(tmp_path, input_dir, model_dir) == 0
    (written,) = outputs(tmp_path)
    mask_image = sitk.ReadImage(str(written))
    source = sitk.ReadImage(str(input_dir / SOCKET_DIR / "case.mha"))
    assert Geometry.of(mask_image) == Geometry.of(source)
    assert sitk.GetArrayFromImage(mask_image).any()  # never empty


def write_raw(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def sitk_job(tmp_path: Path, image: sitk.Image) -> Path:
    root = tmp_path / "input"
    (root / SOCKET_DIR).mkdir(parents=True)
    sitk.WriteImage(image, str(root / SOCKET_DIR / "case.mha"))
    return root


def with_voxel(value: float) -> np.ndarray:
    image, _ = phantom()
    image[2, 3, 4] = value
    return image


def two_images(tmp_path: Path) -> Path:
    root = job(tmp_path, phantom()[0])
    write_image(root / SOCKET_DIR / "other.mha", phantom()[0])
    return root


def empty_socket(tmp_path: Path) -> Path:
    (tmp_path / "input" / SOCKET_DIR).mkdir(parents=True)
    return tmp_path / "input"


def text_file(tmp_path: Path) -> Path:
    write_raw(tmp_path / "input" / SOCKET_DIR / "case.mha", b"this is not an image\n")
    return tmp_path / "input"


def truncated(tmp_path: Path) -> Path:
    root = job(tmp_path, phantom()[0])
    path = root / SOCKET_DIR / "case.mha"
    path.write_bytes(path.read_bytes()[:-2000])
    return root


def broken_json(tmp_path: Path) -> Path:
    root = job(tmp_path, phantom()[0])
    (root / "inputs.json").write_text("[{")
    return root


SKEW = (1.0, 0.3, 0, 0, 1.0, 0, 0, 0, 1.0)
# Each bad job folder (built on demand) and a fragment of the message it must produce.
BAD_INPUTS = {
    "no input folder": (lambda t: t / "missing", "does not exist"),
    "no image": (empty_socket, "no MRI image"),
    "two images": (two_images, "found 2"),
    "not an image": (text_file, "cannot be read"),
    "truncated": (truncated, "cannot be read"),
    "2D": (lambda t: sitk_job(t, sitk.GetImageFromArray(phantom()[0][0])), "3D"),
    "vector": (
        lambda t: sitk_job(t, sitk.GetImageFromArray(np.stack([phantom()[0]] * 2, -1), True)),
        "one value per voxel",
    ),
    "4D": (lambda t: sitk_job(t, sitk.JoinSeries([make_image(phantom()[0])] * 2)), "found 4D"),
    "NaN": (lambda t: job(t, with_voxel(np.nan)), "NaN or infinite"),
    "Inf": (lambda t: job(t, with_voxel(-np.inf)), "NaN or infinite"),
    "constant": (lambda t: job(t, np.full((8, 20, 20), 7, np.int16)), "constant"),
    "non-orthogonal": (lambda t: job(t, phantom()[0], direction=SKEW), "orthonormal"),
    "broken inputs.json": (broken_json, "cannot be parsed"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_no_output(tmp_path, model_dir, capsys, name):
    build, message = BAD_INPUTS[name]
    input_dir = build(tmp_path)
    assert run(tmp_path, input_dir, model_dir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("process.py: error:")
    assert message in err[0]
    assert outputs(tmp_path) == []


def test_changed_weights_fail_before_any_output(tmp_path, model_dir, capsys):
    copy = tmp_path / "model"
    copy.mkdir()
    for item in model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    (copy / "fold_0.onnx").write_bytes((copy / "fold_0.onnx").read_bytes() + b"\0")
    image, _ = phantom()
    assert run(tmp_path, job(tmp_path, image), copy) == 1
    assert "sha256" in capsys.readouterr().err
    assert outputs(tmp_path) == []


def test_output_path_blocked_by_a_file(tmp_path, model_dir, capsys):
    image, _ = phantom()
    write_raw(tmp_path / "output" / "images", b"a file where a folder must go")
    assert run(tmp_path, job(tmp_path, image), model_dir) == 1
    assert "cannot create the output folder" in capsys.readouterr().err
    assert not (tmp_path / "output" / OUTPUT_DIR).exists()


def test_missing_plan_is_a_clear_failure(tmp_path, capsys):
    image, _ = phantom()
    assert run(tmp_path, job(tmp_path, image), tmp_path / "no-model") == 1
    assert PLAN_FILE in capsys.readouterr().err


def test_command_line_exit_status(tmp_path, model_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "process.py"),
            "--input",
            str(tmp_path / "nothing"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_make_image_helper_round_trips_geometry():
    image = make_image(np.zeros((2, 3, 4), np.uint8), direction=rotation((0, 0, 1), 30))
    assert np.allclose(
        np.asarray(image.GetDirection()).reshape(3, 3)
        @ np.asarray(image.GetDirection()).reshape(3, 3).T,
        np.eye(3),
    )
