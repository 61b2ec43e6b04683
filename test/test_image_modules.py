"""The image holds only what process.py imports, and all of it imports with the image's
requirements alone.

The build context is what `.dockerignore` allows; the modules process.py needs are found by
following its `pantherseg` imports (function-level ones included) through the source. Each module
of the image is then imported in a fresh interpreter that sees a copy of the image's files and
refuses every third-party package that requirements.txt does not list, as the image would.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "process.py"
PACKAGE = "pantherseg"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _matches(path: str, pattern: str) -> bool:
    """Docker's matching for the patterns this project uses: a path, a folder (and all below),
    a glob, or `**/` for any depth."""
    pattern = pattern.rstrip("/")
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(_matches("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/")


def build_context(root: Path = REPO) -> list[str]:
    """Relative paths of the files the image gets: the last matching pattern decides."""
    patterns = dockerignore_patterns()
    tops = {p[1:].split("/")[0] for p in patterns if p.startswith("!")}
    found = []
    for top in sorted(tops):
        start = root / top
        candidates = [start] if start.is_file() else sorted(start.rglob("*"))
        for path in candidates:
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            included = False
            for pattern in patterns:
                negated = pattern.startswith("!")
                if _matches(rel, pattern.lstrip("!")):
                    included = negated
            if included:
                found.append(rel)
    return found


def _module_file(name: str, root: Path) -> Path | None:
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(entry: Path, root: Path = REPO) -> set[str]:
    """Every `pantherseg` module reachable from `entry` by import statements anywhere in the
    code, with the packages that hold them."""
    needed: set[str] = set()
    todo = [entry]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                path = _module_file(module, root)
                if path is not None and module not in needed:
                    needed.add(module)
                    todo.append(path)
    return needed


def _module_name(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def requirement_names() -> set[str]:
    """Every distribution the image's requirement files pin (the shared ones and a CUDA build's:
    both builds install the same module names)."""
    names = set()
    for path in sorted(REPO.glob("requirements*.txt")):
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name = re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]
                names.add(name.lower().replace("_", "-"))
    return names


def allowed_top_level_modules() -> set[str]:
    """Import names of the distributions requirements.txt lists (onnxruntime-gpu installs the
    same `onnxruntime` module as the CPU build installed here)."""
    wanted = requirement_names()
    if "onnxruntime-gpu" in wanted:
        wanted |= {"onnxruntime"}
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in wanted for d in dists)
    }


CHECKER = r"""
import importlib, importlib.machinery, json, sys, sysconfig
allowed = set(json.loads(sys.argv[1]))
stdlib = sysconfig.get_paths()["stdlib"]
def in_stdlib(name, path):
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    origin = (spec.origin or "") if spec else ""
    return origin.startswith(stdlib) and "-packages" not in origin
class OnlyTheImagesRequirements:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return None
        if in_stdlib(name, path):  # private stdlib modules such as _sysconfigdata_*
            return None
        raise ModuleNotFoundError(f"{name}: not in the image's requirements", name=name)
sys.meta_path.insert(0, OnlyTheImagesRequirements())
failed = {}
for module in json.loads(sys.argv[2]):
    try:
        importlib.import_module(module)
    except Exception as error:
        failed[module] = f"{type(error).__name__}: {error}"
print(json.dumps(failed))
"""


def import_with_image_requirements(
    root: Path, modules: list[str], own: tuple[str, ...] = (PACKAGE, "process")
) -> dict[str, str]:
    """Modules that fail to import from `root` when only the image's requirements (and the
    project's own top-level modules `own`) exist."""
    allowed = sorted(allowed_top_level_modules() | set(own))
    site = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(root), *site])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", CHECKER, json.dumps(allowed), json.dumps(modules)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_build_context_is_an_allow_list():
    assert dockerignore_patterns()[0] == "*"
    context = build_context()
    assert ENTRYPOINT in context and "requirements.txt" in context
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]


def test_the_image_holds_exactly_the_modules_process_py_imports():
    in_image = {_module_name(p) for p in build_context() if p.endswith(".py")} - {"process"}
    needed = imported_modules(REPO / ENTRYPOINT)
    assert "pantherseg.inference.pipeline" in needed and "pantherseg.inference.engines" in needed
    assert in_image == needed, (
        f"in the image but not imported: {sorted(in_image - needed)}; "
        f"imported but not in the image: {sorted(needed - in_image)}"
    )


def test_every_module_of_the_image_imports_with_its_requirements_alone(tmp_path):
    for rel in build_context():
        if rel.endswith(".py"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp_path / rel)
    modules = sorted(_module_name(p) for p in build_context() if p.endswith(".py"))
    assert import_with_image_requirements(tmp_path, modules) == {}


def test_the_import_check_catches_a_module_the_image_could_not_import():
    """The tools beside the core need matplotlib (report) or torch (training): refused here."""
    modules = ["pantherseg.scoring.report", "training.trainer"]
    failed = import_with_image_requirements(REPO, modules, own=(PACKAGE, "training"))
    assert "matplotlib" in failed["pantherseg.scoring.report"]
    assert "torch" in failed["training.trainer"]


@pytest.mark.parametrize("pattern", ["pantherseg/", "pantherseg/scoring/"])
def test_widening_the_allow_list_is_caught(tmp_path, pattern, monkeypatch):
    """A context that ships the tools too no longer equals what process.py imports."""
    ignore = (
        (REPO / ".dockerignore").read_text().replace("!pantherseg/inference/\n", f"!{pattern}\n")
    )
    monkeypatch.setattr(
        sys.modules[__name__],
        "dockerignore_patterns",
        lambda: [
            line.strip()
            for line in ignore.splitlines()
            if line.strip() and not line.startswith("#")
        ],
    )
    in_image = {_module_name(p) for p in build_context() if p.endswith(".py")} - {"process"}
    assert in_image - imported_modules(REPO / ENTRYPOINT)
