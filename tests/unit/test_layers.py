"""The package's layers, checked from the source: no import cycle anywhere in
``relay`` (imports under ``TYPE_CHECKING`` and inside functions count too), and
the bottom layers (``relay.ws``, ``relay.store``) import nothing from above them.

Read with ``ast``, not by importing: a cycle that Python happens to resolve
today (a late import, a ``TYPE_CHECKING`` block) is still a cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import relay

ROOT = Path(relay.__file__).parent

# What relay.ws and relay.store may import from relay: themselves, and the
# settings every layer reads.
BOTTOM = ("relay.ws", "relay.store")
BOTTOM_MAY_IMPORT = (*BOTTOM, "relay.config")


def module_name(path: Path) -> str:
    parts = ("relay", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The relay modules ``name`` imports, wherever in the file the import is."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from relay.ws import reactor` imports the module relay.ws.reactor
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected
    group of more than one module, or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_path_through(g, edges) for g in groups]


def _path_through(group: list[str], edges: Mapping[str, Iterable[str]]) -> list[str]:
    """A readable cycle inside ``group``: from its first module back to it."""
    members, start = set(group), group[0]
    seen, path = {start}, [start]
    while True:
        nxt = sorted(w for w in edges.get(path[-1], ()) if w in members)
        back = [w for w in nxt if w == start]
        if back:
            return [*path, start]
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # cannot happen in a strongly connected group; keep what we have
            return path
        seen.add(fresh[0])
        path.append(fresh[0])


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set[str]()}
    assert cycles(edges) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import relay.config\n"
        "from relay.ws import reactor\n"
        "from . import frames\n"
        "if TYPE_CHECKING:\n"
        "    from relay.ws.transport import Transport\n"
        "def late() -> None:\n"
        "    from relay.store import create_store\n"
    )
    known = ["relay.config", "relay.store", "relay.ws.frames", "relay.ws.reactor"]
    known += ["relay.ws.transport"]
    assert imports_of("relay.ws.m", source, known) == set(known)
    g = graph()
    assert "relay.daemon.server" in g["relay.daemon.cli"]  # inside a function
    assert len(g) > 80


def test_no_import_cycle_in_relay() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_bottom_layers_import_nothing_from_above() -> None:
    wrong = {
        f"{name} -> {target}"
        for name, targets in graph().items()
        if name.startswith(tuple(f"{b}." for b in BOTTOM)) or name in BOTTOM
        for target in targets
        if not (target in BOTTOM_MAY_IMPORT or target.startswith(tuple(f"{b}." for b in BOTTOM)))
    }
    assert not wrong, sorted(wrong)
