"""process.py end to end: the grand-challenge layout in, exactly one correct mask out, and a clear
failure with no output for every bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imaging import IDENTITY, make_image, phantom, rotation, write_image
from model_factory import threshold_model_dir
from scipy.spatial.transform import Rotation

import process
from pantherseg.inference.io import Geometry
from pantherseg.inference.plan import PLAN_FILE

REPO = Path(__file__).resolve().parents[1]
SOCKET_DIR = Path("images") / "abdominal-t1-mri"
OUTPUT_DIR = Path("images") / "pancreatic-tumor-segmentation"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return threshold_model_dir(tmp_path_factory.mktemp("model"))


def job(
    tmp_path: Path,
    array: np.ndarray,
    name="case.mha",
    inputs_json=True,
    slug="abdominal-t1-mri",
    **geometry,
) -> Path:
    root = tmp_path / "input"
    write_image(root / "images" / slug / name, array, **geometry)
    if inputs_json:
        socket = {
            "interface": {
                "slug": slug,
                "kind": "Image",
                "relative_path": f"images/{slug}",
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


def left_behind(tmp_path: Path) -> list[Path]:
    """Everything a failed job left under the output folder, empty folders included."""
    return sorted((tmp_path / "output").rglob("*"))


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


def test_other_sockets_in_inputs_json_are_ignored(tmp_path, model_dir):
    """A phase may pass more than the MRI: a JSON value socket and other images are listed in
    inputs.json beside it, in any order; the MRI alone is segmented (its grid, not the other
    image's 6 x 5 x 4, and its name)."""
    image, _ = phantom()
    root = job(tmp_path, image.astype(np.int16), name="mri-uuid.mha")
    (mri_socket,) = json.loads((root / "inputs.json").read_text())
    clinical = {"age": 63, "sex": "F", "ca19-9": 412.0}
    (root / "clinical-information.json").write_text(json.dumps(clinical))
    other = write_image(root / "images" / "pancreas-prior" / "prior-uuid.mha", np.ones((4, 5, 6)))
    sockets = [
        {
            "interface": {
                "slug": "clinical-information",
                "kind": "Anything",
                "super_kind": "Value",
                "relative_path": "clinical-information.json",
            },
            "value": clinical,
            "image": None,
            "file": None,
        },
        {
            "interface": {
                "slug": "pancreas-prior",
                "kind": "Segmentation",
                "super_kind": "Image",
                "relative_path": str(other.parent.relative_to(root)),
            },
            "image": {"name": other.name},
            "value": None,
        },
        mri_socket,
    ]
    (root / "inputs.json").write_text(json.dumps(sockets))
    assert run(tmp_path, root, model_dir) == 0
    assert outputs(tmp_path) == [tmp_path / "output" / OUTPUT_DIR / "mri-uuid.mha"]
    mask_image = sitk.ReadImage(str(outputs(tmp_path)[0]))
    assert Geometry.of(mask_image) == Geometry.of(
        sitk.ReadImage(str(root / SOCKET_DIR / "mri-uuid.mha"))
    )


@pytest.mark.parametrize(
    "interface",
    [{"slug": "operator-notes"}, {"kind": "String"}, {}],
    ids=["slug only", "no slug", "empty"],
)
def test_sockets_with_sparse_interfaces_are_skipped(tmp_path, model_dir, interface):
    """Only an MRI socket needs a relative path; another socket's interface may lack any field
    this code does not use without failing the job."""
    image, _ = phantom()
    root = job(tmp_path, image)
    sockets = json.loads((root / "inputs.json").read_text())
    sockets.insert(0, {"interface": interface, "value": "free text"})
    (root / "inputs.json").write_text(json.dumps(sockets))
    assert run(tmp_path, root, model_dir) == 0
    assert [p.name for p in outputs(tmp_path)] == ["case.mha"]


@pytest.fixture
def model_places(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """The image's baked model (one fold) and grand-challenge's /opt/ml/model, both in tmp_path;
    the upload folder starts absent."""
    baked = threshold_model_dir(tmp_path / "app" / "model")
    uploaded = tmp_path / "opt" / "ml" / "model"
    monkeypatch.setattr(process, "BAKED_MODEL", baked)
    monkeypatch.setattr(process, "GRAND_CHALLENGE_MODEL", uploaded)
    return baked, uploaded


def model_used_by_default(tmp_path: Path, caplog) -> str:
    """Runs process.py as the container does (no --model); the model part of its log line."""
    caplog.set_level(logging.INFO, logger="pantherseg")
    image, _ = phantom()
    args = ["--input", str(job(tmp_path, image)), "--output", str(tmp_path / "output")]
    assert process.main([*args, "--device", "cpu"]) == 0
    assert [p.name for p in outputs(tmp_path)] == ["case.mha"]
    (line,) = [m for m in caplog.messages if "; model: " in m]
    return line.split("; model: ", 1)[1]


def test_uploaded_model_takes_precedence_over_the_baked_one(tmp_path, model_places, caplog):
    """grand-challenge extracts an uploaded model tarball to /opt/ml/model: a user who uploads
    new weights must get them, not the ones baked into the image."""
    _, uploaded = model_places
    threshold_model_dir(uploaded, n_folds=2)
    assert model_used_by_default(tmp_path, caplog).startswith(f"2 fold(s) from {uploaded} ")


@pytest.mark.parametrize("upload", ["absent", "empty", "weights without a plan"])
def test_baked_model_without_a_plan_in_opt_ml_model(tmp_path, model_places, caplog, upload):
    """No plan at /opt/ml/model (no upload, or nothing usable in it): the baked model runs."""
    baked, uploaded = model_places
    if upload != "absent":
        uploaded.mkdir(parents=True)
    if upload == "weights without a plan":
        threshold_model_dir(tmp_path / "elsewhere", n_folds=2)
        for item in (tmp_path / "elsewhere").glob("*.onnx"):
            (uploaded / item.name).write_bytes(item.read_bytes())
    assert model_used_by_default(tmp_path, caplog).startswith(f"1 fold(s) from {baked} ")


directions = st.sampled_from(
    [
        IDENTITY,
        (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
        (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0),
        rotation((1, 1, 0), 23.0),
        rotation((0.2, -1, 0.5), -17.0),
        # Slices along array x (or y): the same anatomy stored in another array axis order,
        # which preprocessing transposes into the plan's order and back.
        (0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0),
        (1.0, 0, 0, 0, 0, -1.0, 0, 1.0, 0),
    ]
)
# Spacings (x, y, z): thick slices along z, or tied coarsest axes with no single thick axis.
spacings = st.one_of(
    st.tuples(st.floats(0.6, 1.4), st.floats(0.6, 1.4), st.floats(2.0, 4.0)),
    st.sampled_from([(2.0, 2.0, 0.5), (0.5, 2.0, 2.0), (2.0, 0.5, 2.0), (1.0, 1.0, 1.0)]),
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.tuples(st.integers(3, 14), st.integers(5, 45), st.integers(5, 45)),
    spacing=spacings,
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    direction=directions,
    dtype=st.sampled_from([np.int16, np.uint16, np.float32, np.float64, np.int32]),
)
def test_geometry_survives_any_grid(
    tmp_path_factory, model_dir, shape, spacing, origin, direction, dtype
):
    tmp_path = tmp_path_factory.mktemp("job")
    image, truth = phantom(shape)
    input_dir = job(
        tmp_path, image.astype(dtype), spacing_xyz=spacing, origin=origin, direction=direction
    )
    assert run(tmp_path, input_dir, model_dir) == 0
    (written,) = outputs(tmp_path)
    mask_image = sitk.ReadImage(str(written))
    source = sitk.ReadImage(str(input_dir / SOCKET_DIR / "case.mha"))
    assert Geometry.of(mask_image) == Geometry.of(source)
    mask = sitk.GetArrayFromImage(mask_image).astype(bool)
    assert mask.any()  # never empty
    # On the bright block, whatever the axis order, wherever the block spans at least two voxels
    # of the coarsest target spacing (3 mm) on every axis: a smaller one cannot survive resampling.
    block_mm = [n // 3 * s for n, s in zip(shape, reversed(spacing), strict=True)]
    if min(block_mm) >= 6.0:
        assert (mask & truth).sum() >= 0.5 * mask.sum()


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
    assert left_behind(tmp_path) == []


def test_changed_weights_fail_before_any_output(tmp_path, model_dir, capsys):
    copy = tmp_path / "model"
    copy.mkdir()
    for item in model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    (copy / "fold_0.onnx").write_bytes((copy / "fold_0.onnx").read_bytes() + b"\0")
    image, _ = phantom()
    assert run(tmp_path, job(tmp_path, image), copy) == 1
    assert "sha256" in capsys.readouterr().err
    assert left_behind(tmp_path) == []


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


@pytest.mark.parametrize(("axis", "degrees"), [((0, 0, 1), 30.0), ((0.2, -1, 0.5), -17.0)])
def test_image_helpers_round_trip_the_rotation_they_are_given(tmp_path, axis, degrees):
    """The geometry tests above are only as good as the oblique grids the helpers build: the
    direction read back from the file must be the rotation asked for, not merely orthonormal."""
    unit = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    expected = Rotation.from_rotvec(np.radians(degrees) * unit).as_matrix()
    assert not np.allclose(expected, expected.T)  # a transposed matrix would be caught
    geometry = {"spacing_xyz": (0.7, 1.1, 3.5), "origin": (-12.5, 40.0, 7.25)}
    path = write_image(
        tmp_path / "oblique.mha",
        np.zeros((2, 3, 4), np.uint8),
        direction=rotation(axis, degrees),
        **geometry,
    )
    image = sitk.ReadImage(str(path))
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), expected, rtol=0, atol=1e-12)
    assert image.GetSize() == (4, 3, 2)
    assert np.allclose(image.GetSpacing(), geometry["spacing_xyz"], rtol=0, atol=1e-12)
    assert np.allclose(image.GetOrigin(), geometry["origin"], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("model_task", "slug", "image_task"),
    [("task2", "abdominal-t1-mri", "task1"), ("task1", "abdominal-t2-mri", "task2")],
)
def test_an_image_of_the_other_task_is_refused(tmp_path, capsys, model_task, slug, image_task):
    """grand-challenge takes one algorithm per task; a model of the other task would still write
    a mask, so the socket decides and the job fails with one line naming both tasks."""
    other = threshold_model_dir(tmp_path / "model", task=model_task)
    assert run(tmp_path, job(tmp_path, phantom()[0], slug=slug), other) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("process.py: error:")
    assert f"a {image_task} image (socket {slug})" in line
    assert f"trained for {model_task}" in line and f"--task {image_task}" in line
    assert left_behind(tmp_path) == []


def test_the_other_task_is_refused_before_any_weights_load(tmp_path, capsys, monkeypatch):
    """The plan names the model's task, so the refusal costs no fold loading or compiling."""
    other = threshold_model_dir(tmp_path / "model", task="task2")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the task was checked")

    monkeypatch.setattr("pantherseg.inference.engines.load_engine", no_loading)
    assert run(tmp_path, job(tmp_path, phantom()[0], slug="abdominal-t1-mri"), other) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "a task1 image (socket abdominal-t1-mri)" in line and "trained for task2" in line


def test_a_task_2_image_with_a_task_2_model_is_segmented(tmp_path, capsys):
    task2 = threshold_model_dir(tmp_path / "model", task="task2")
    assert run(tmp_path, job(tmp_path, phantom()[0], slug="abdominal-t2-mri"), task2) == 0
    assert capsys.readouterr().err == ""
    assert [p.relative_to(tmp_path / "output") for p in outputs(tmp_path)] == [
        OUTPUT_DIR / "case.mha"
    ]


def test_a_folder_that_names_no_task_is_segmented_with_a_warning(
    tmp_path, model_dir, capsys, caplog
):
    """Without inputs.json any images/*mri*/ folder is read; one no task names is not refused."""
    root = job(tmp_path, phantom()[0], inputs_json=False, slug="my-mri")
    with caplog.at_level(logging.INFO, logger="pantherseg"):
        assert run(tmp_path, root, model_dir) == 0
    assert capsys.readouterr().err == ""
    assert "the input's folder my-mri names no task" in caplog.text
    assert len(outputs(tmp_path)) == 1
