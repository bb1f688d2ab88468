"""Fail on an import cycle inside ``segflowd``, on the core importing a box, or on a module
over 500 lines.

Reads every module with :mod:`ast` (no import runs) and counts every import: top-level,
inside functions, and under ``if TYPE_CHECKING:`` alike, since a type-only cycle still
ties two modules together. The core is every module at the package root; the boxes are
its subpackages (``ingest``, ``segments``, ``flows``, ``delivery``, ``sources``,
``control``, ``cli``). Data flows from the boxes to the core, never back, except at the
top: ``daemon`` wires the boxes together and ``testing`` runs them (through the
``sim*`` modules of its Simulation).

Usage: ``python scripts/import_graph.py [PACKAGE_DIR]``; exits 1 and names each cycle or
crossing it finds.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Core modules that may import the boxes: ``simulation``, ``simengine``, ``simrefresh`` and
# ``simstore`` are the public Simulation that ``testing`` re-exports (they run the boxes,
# as ``daemon`` does).
TOP = {"daemon", "testing", "__main__", "simulation", "simengine", "simrefresh", "simstore"}
MAX_LINES = 500  # a module past this has grown a second concern: split it


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` at ``path`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports the module
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, set(c)) for c in components]


def _a_cycle(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest path from the first module back to itself, inside one component."""
    start = min(members)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(members)


def _is_core(path: Path, root: Path) -> bool:
    """A module at the package root (the package itself and migrations/ included)."""
    rel = path.relative_to(root).parts
    return len(rel) == 1 or rel[0] == "migrations"


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).parent.parent / "segflowd")
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph = {name: imports(path, name, known) for name, path in files.items()}
    problems = [" -> ".join(c) for c in find_cycles(graph)]
    pkg = root.name
    for name, deps in sorted(graph.items()):
        if _is_core(files[name], root) and name.rpartition(".")[2] not in TOP:
            for d in sorted(deps):
                if not _is_core(files[d], root):
                    problems.append(f"the core module {name} imports the box module {d}")
    for name, path in sorted(files.items()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{name} has {n} lines (at most {MAX_LINES}): split it")
    for p in problems:
        print(f"import graph: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"import graph: {len(graph)} modules of {pkg}, no cycle, the core imports no box, "
          f"none over {MAX_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
