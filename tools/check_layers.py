"""Fails when the package's subpackages import each other in a cycle.

    python tools/check_layers.py [PACKAGE_DIR]      # default: multitask_moe

Every import counts, including the ones inside functions (deferring an import to call time
hides a cycle from Python but not from a reader), and `if TYPE_CHECKING:` ones. Edges go
between subpackages (multitask_moe/<sub>/...); the package's own __init__.py, which
re-exports the public API, is not a layer. Also fails on a cycle between modules through
module-level imports. Prints the subpackages bottom-up when the layering is clean.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from collections.abc import Iterator


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.Module, name: str, is_package: bool) -> Iterator[tuple[str, bool]]:
    """(imported module or name, at module level) for every import statement."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}", id(node) in top_level


def resolve(target: str, modules: set[str]) -> str | None:
    """The longest known module that `target` (a module, or a name inside one) is in."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def floors(graph: dict[str, set[str]]) -> list[list[str]]:
    """Nodes of an acyclic graph in floors: each floor imports only from the ones below."""
    remaining = set(graph).union(*graph.values())
    placed: set[str] = set()
    result = []
    while remaining:
        floor = sorted(n for n in remaining if graph.get(n, set()) <= placed)
        result.append(floor)
        placed.update(floor)
        remaining.difference_update(floor)
    return result


def check(package_dir: pathlib.Path) -> tuple[list[str], dict[str, set[str]]]:
    """(the layering problems of the package at `package_dir`, [] when clean; the graph of
    its subpackages)."""
    package_dir = package_dir.resolve()
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    package = package_dir.name
    subpackages: dict[str, set[str]] = {}
    module_graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parts = name.split(".")
        for target, top_level in imports(tree, name, path.name == "__init__.py"):
            found = resolve(target, modules)
            if found is None or found == name:
                continue
            if top_level:
                module_graph[name].add(found)
            source_sub, target_sub = parts[1:2], found.split(".")[1:2]
            if source_sub and target_sub and source_sub != target_sub:
                subpackages.setdefault(source_sub[0], set()).add(target_sub[0])
            if source_sub:
                subpackages.setdefault(source_sub[0], set())
    problems = []
    if cycle := find_cycle(subpackages):
        problems.append(f"{package}: subpackages import each other: {' -> '.join(cycle)}")
    if cycle := find_cycle(module_graph):
        problems.append(f"{package}: modules import each other at load: {' -> '.join(cycle)}")
    return problems, subpackages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", default="multitask_moe")
    package_dir = pathlib.Path(parser.parse_args().package)
    problems, subpackages = check(package_dir)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    for level, floor in enumerate(floors(subpackages)):
        print(f"floor {level}: {', '.join(floor)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
