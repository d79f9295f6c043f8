"""`make lint` (ruff check, ruff format --check, the layering check) passes, and the layering
check fails on the cycles it exists to catch."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import check_layers  # noqa: E402


def test_make_lint_passes():
    result = subprocess.run(
        ["make", "-s", "lint"], cwd=REPO, capture_output=True, text=True, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The package's floors, bottom-up: the sparse layers sit on parallel, below the models;
    # core, the foundation, on the models; train, evolution and lifecycle side by side on
    # core (one floor: none of them imports another).
    floor_of = {
        name: int(line.split(":")[0].split()[1])
        for line in result.stdout.splitlines()
        if line.startswith("floor")
        for name in line.split(": ")[1].split(", ")
    }
    assert floor_of["moe"] > floor_of["parallel"] >= floor_of["errors"] == 0
    assert floor_of["models"] > max(floor_of["moe"], floor_of["data"])
    assert floor_of["core"] > floor_of["models"]
    assert floor_of["train"] == floor_of["evolution"] == floor_of["lifecycle"] > floor_of["core"]


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    package = root / "pkg"
    for name, source in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for directory in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return package


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "low/ops.py": "def f():\n    from pkg.high import layer\n    return layer\n",
            "high/layer.py": "from pkg.low.ops import f\n",
        },
    )
    problems, _ = check_layers.check(package)
    assert problems == ["pkg: subpackages import each other: high -> low -> high"]


def test_relative_imports_and_module_cycles_are_found(tmp_path):
    package = write_package(
        tmp_path,
        {"sub/a.py": "from . import b\n", "sub/b.py": "from .a import x\n"},
    )
    problems, graph = check_layers.check(package)
    assert problems == [
        "pkg: modules import each other at load: pkg.sub.a -> pkg.sub.b -> pkg.sub.a"
    ]


def test_a_clean_package_prints_its_floors(tmp_path):
    package = write_package(
        tmp_path,
        {
            "low/ops.py": "X = 1\n",
            "mid/m.py": "from pkg.low import ops\n",
            "top/t.py": "import pkg.mid.m\n",
        },
    )
    problems, graph = check_layers.check(package)
    assert problems == []
    assert check_layers.floors(graph) == [["low"], ["mid"], ["top"]]
