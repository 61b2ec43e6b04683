"""Static checks of the container files (Dockerfile, requirements.txt, .dockerignore, scripts).

The image itself is built and run by ./test.sh (CI: .ci/container.sh); these checks catch the
mistakes that would only show there, or only on grand-challenge, in milliseconds.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SCRIPTS = ["build.sh", "test.sh", "export.sh", ".ci/container.sh", "docker/standin-base.sh"]

# onnxruntime-gpu wheels on PyPI link one CUDA major: up to 1.26 CUDA 12, from 1.27 CUDA 13
# (read from the wheels' metadata; 1.31.1's CUDA provider needs libcudart.so.13). A base image
# with another CUDA major leaves the GPU unused: onnxruntime quietly falls back to the CPU.
ORT_GPU_FIRST_CUDA13 = (1, 27)
DEFAULT_CUDA = 12  # grand-challenge's driver is not published; CUDA 12 runs on more of them


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def requirements(*files: str) -> dict[str, Requirement]:
    """The pins of requirements.txt plus the given files (default: the default CUDA build's)."""
    reqs = {}
    for name in ("requirements.txt", *(files or (f"requirements-cuda{DEFAULT_CUDA}.txt",))):
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                reqs[req.name.lower()] = req
    return reqs


def build_arg_default(name: str) -> str:
    for keyword, args in instructions():
        if keyword == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}=... in the Dockerfile")


def build_sh_cuda_versions() -> dict[int, str]:
    """./build.sh's --cuda choices: CUDA major -> the base's CUDA version."""
    found = re.findall(r"^\s*(\d+)\) CUDA_VERSION=(\S+) ;;", (REPO / "build.sh").read_text(), re.M)
    return {int(major): version for major, version in found}


def pinned_version(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not pinned with =="
    return specs[0].version


def stages() -> list[tuple[str, str | None, list[str]]]:
    """(image, alias, flags) of each FROM."""
    result = []
    for keyword, args in instructions():
        if keyword == "FROM":
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            alias = rest[2] if len(rest) == 3 and rest[1].upper() == "AS" else None
            result.append((rest[0], alias, flags))
    return result


def base_image(cuda_version: str | None = None) -> str:
    """The one image pulled from a registry (every later stage builds on an earlier one), for a
    CUDA version (default: the Dockerfile's)."""
    found = stages()
    aliases = {alias for _, alias, _ in found if alias}
    assert all(image in aliases for image, _, _ in found[1:]), "one external base expected"
    version = cuda_version or build_arg_default("CUDA_VERSION")
    return found[0][0].replace("${CUDA_VERSION}", version)


def test_base_is_a_pinned_amd64_cuda_cudnn_runtime():
    assert "--platform=linux/amd64" in stages()[0][2]
    name, _, tag = base_image().partition(":")
    assert name == "nvidia/cuda"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", tag), tag


def test_every_cuda_build_pairs_its_base_with_a_matching_onnxruntime_gpu():
    """./build.sh --cuda N builds on CUDA N and installs requirements-cudaN.txt, whose
    onnxruntime-gpu must be built for CUDA N; the default (the Dockerfile's) is CUDA 12."""
    choices = build_sh_cuda_versions()
    assert set(choices) == {12, 13}
    assert choices[DEFAULT_CUDA] == build_arg_default("CUDA_VERSION")
    for major, cuda_version in choices.items():
        version = pinned_version(requirements(f"requirements-cuda{major}.txt")["onnxruntime-gpu"])
        major_minor = tuple(int(part) for part in version.split(".")[:2])
        built_for = 13 if major_minor >= ORT_GPU_FIRST_CUDA13 else 12
        assert built_for == major, f"onnxruntime-gpu {version} is built for CUDA {built_for}"
        tag = base_image(cuda_version).partition(":")[2]
        assert int(tag.split(".")[0]) == major, tag
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert '-r "/opt/app/requirements-cuda${CUDA_VERSION%%.*}.txt"' in runs


def test_requirements_pin_the_package_dependencies():
    reqs = requirements()
    for req in reqs.values():
        pinned_version(req)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        dependency = Requirement(line)
        name = dependency.name.lower()
        # The image carries the GPU build of onnxruntime: same module, same version.
        in_image = reqs.get("onnxruntime-gpu" if name == "onnxruntime" else name)
        assert in_image is not None, f"{dependency.name} is missing from requirements.txt"
        assert pinned_version(in_image) == pinned_version(dependency), (
            f"requirements.txt pins {in_image}, pyproject.toml {dependency}"
        )
    assert "onnxruntime" not in reqs, "onnxruntime and onnxruntime-gpu would shadow each other"
    heavy = {"torch", "monai", "matplotlib", "surface-distance"}
    assert not heavy & set(reqs), "training and evaluation packages do not belong in the image"


def test_runs_as_a_numeric_non_root_user_with_an_exec_form_entrypoint():
    found = instructions()
    users = [args for keyword, args in found if keyword == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}
    entrypoint = [args for keyword, args in found if keyword == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    command = json.loads(entrypoint[0])  # exec form is a JSON array
    assert command[-1] == "/opt/app/process.py"
    assert command[0].endswith("python")
    assert found[-1][0] == "ENTRYPOINT"
    envs = " ".join(args for keyword, args in found if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs


def test_installs_lean():
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert "--no-install-recommends" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert "--no-cache-dir" in runs
    assert "-r /opt/app/requirements.txt" in runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_and_executable(script):
    path = REPO / script
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


def test_test_sh_runs_the_container_as_grand_challenge_does():
    text = (REPO / "test.sh").read_text()
    for flag in (
        "--network none",
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "--pids-limit 256",
        "--shm-size 128m",
        '"$2:/input:ro"',
    ):
        assert flag in text, flag


@pytest.mark.parametrize("script", ["build.sh", "export.sh"])
@pytest.mark.parametrize("task", ["3", "task3", ""])
def test_an_unknown_task_is_refused_before_docker_runs(script, task, tmp_path):
    """One image per task: a typo must not build (or export) the default task's image."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no docker on PATH: it must not be needed
    for tool in ("bash", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [shutil.which("bash"), str(REPO / script), "--task", task],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"{script}: --task")
    assert result.stdout == ""


def test_each_task_bakes_its_own_model():
    """The Dockerfile keeps models/<TASK>/ as /opt/app/model and drops the other task's; build.sh
    passes TASK, and the build context holds models/."""
    steps = instructions()
    assert ("ARG", "TASK=task1") in steps
    run = next(args for keyword, args in steps if keyword == "RUN" and "models/$TASK" in args)
    assert 'mv "/opt/app/models/$TASK" /opt/app/model' in run
    assert "rm -rf /opt/app/models" in run
    assert '--build-arg "TASK=$TASK"' in (REPO / "build.sh").read_text()
    assert "!models/" in (REPO / ".dockerignore").read_text().splitlines()
    for task in ("task1", "task2"):
        assert (REPO / "models" / task / "plan.json").is_file()
        assert json.loads((REPO / "models" / task / "plan.json").read_text())["task"] == task
