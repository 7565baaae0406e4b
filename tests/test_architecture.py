"""The house rules of docs/ARCHITECTURE.md, checked from the source text alone (`ast`, no imports).

- No import cycle between modules of ldm/, autoencoder/, data_pipeline/, launch/ and bench/. Every
  `import` and `from ... import` counts, at module level and inside functions (a lazy import is still a
  dependency); relative imports are resolved; `from pkg import name` is an edge to `pkg.name` when that
  is a module, else to `pkg`. The implicit import of a parent package (`import a.b` runs `a/__init__`)
  is not an edge: package `__init__` files here hold no imports of their children.
- The one direction of imports: data_pipeline/ imports none of the others; autoencoder/ none but
  data_pipeline/; ldm/ may import autoencoder/ and data_pipeline/; nothing but launch/ itself and bench/
  imports launch/; inside launch/, each room imports only the rooms below it (`ROOMS`).
- No source file over `MAX_LINES` lines (tests and docs aside) unless its module docstring says why it
  must be one file, with the words "one file because".
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "data_pipeline", "launch", "bench")
MAX_LINES = 500
ONE_FILE_MARKER = "one file because"

# package -> the packages it may import (besides itself)
MAY_IMPORT = {
    "data_pipeline": set(),
    "autoencoder": {"data_pipeline"},
    "ldm": {"autoencoder", "data_pipeline"},
    "launch": {"ldm", "autoencoder", "data_pipeline", "bench"},
    "bench": {"ldm", "autoencoder", "data_pipeline", "launch"},
}
# launch/ room -> the rooms it may import (besides itself); `launch` is the package's own top level
ROOMS = {
    "report": set(),
    "runtime": {"report"},
    "interop": {"runtime"},
    "evaluate": {"runtime", "interop"},
    "plan": {"runtime"},
    "demo": {"runtime", "interop", "evaluate"},
    "cli": {"report", "runtime", "interop", "evaluate", "plan", "demo"},
    "launch": {"cli"},            # launch/__main__.py
}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies inside (None for third-party names)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in known else base)
            for t in targets:
                r = _resolve(t, known)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:   # Tarjan; the graph has a few hundred nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        members, start = set(comp), comp[0]
        # breadth-first from start back to start inside the component: a shortest cycle through it
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


def _room(mod: str) -> str:
    """`launch.runtime.train` -> runtime; the package itself and `launch.__main__` -> launch."""
    parts = mod.split(".")
    return "launch" if len(parts) == 1 or parts[1] == "__main__" else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_graph_sees_function_level_and_relative_imports(graph):
    assert len(graph) > 100
    # a lazy import inside a function and a relative one, both resolved
    assert "launch.cli" in graph["launch.__main__"]
    assert any(t.startswith("launch.runtime.") for t in graph["launch.cli.train"])


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_packages_import_in_one_direction(graph):
    bad = []
    for mod, targets in graph.items():
        src = mod.split(".")[0]
        for t in targets:
            dst = t.split(".")[0]
            if dst != src and dst not in MAY_IMPORT[src]:
                bad.append(f"{mod} imports {t} ({src}/ may import only {sorted(MAY_IMPORT[src]) or 'nothing'})")
    assert not bad, "\n".join(bad)


def test_launch_rooms_import_downwards(graph):
    bad = []
    for mod, targets in graph.items():
        if not mod.startswith("launch"):
            continue
        room = _room(mod)
        assert room in ROOMS, f"{mod}: launch/ has no room {room!r}; add it to ROOMS and docs/ARCHITECTURE.md"
        for t in targets:
            if t.split(".")[0] != "launch":
                continue
            other = _room(t)
            if other != room and other not in ROOMS[room]:
                bad.append(f"{mod} ({room}) imports {t} ({other})")
    assert not bad, "rooms importing upwards or sideways:\n" + "\n".join(bad)


def test_no_source_file_over_the_limit():
    long = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*")):
            if path.suffix not in (".py", ".sh") or not path.is_file():
                continue
            text = path.read_text()
            n = text.count("\n")
            if n <= MAX_LINES:
                continue
            if path.suffix == ".py":
                doc = ast.get_docstring(ast.parse(text)) or ""
            else:
                doc = "\n".join(line for line in text.splitlines()[:40] if line.startswith("#"))
            if ONE_FILE_MARKER not in " ".join(doc.lower().split()):
                long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert not long, (f"source files over {MAX_LINES} lines whose docstring does not say why they must be "
                      f"one file ('{ONE_FILE_MARKER} ...'):\n" + "\n".join(long))


def test_the_checker_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_architecture_page_names_every_room_and_nothing_cites_outside_the_repo():
    """docs/ARCHITECTURE.md is the repository's own map: each launch/ room has a row there, and no file
    cites a design document that is not in the repository."""
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = [room for room in ROOMS if room != "launch" and f"`launch/{room}/`" not in page]
    assert not missing, f"rooms without a row in docs/ARCHITECTURE.md: {missing}"
    on_disk = {p.name for p in (REPO / "launch").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert on_disk == set(ROOMS) - {"launch"}, on_disk
    outside = "DESIGN" + ".md"     # spelled apart so this file does not cite it either
    cites = [str(p.relative_to(REPO)) for pkg in PACKAGES + ("docs", "tests", "configs")
             for p in (REPO / pkg).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh")
             and outside in p.read_text(errors="ignore")]
    cites += [name for name in ("README.md", "Makefile") if outside in (REPO / name).read_text()]
    assert not cites, cites
