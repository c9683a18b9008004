"""The package's import structure (docs/architecture.md): no cycle among wmdp's modules, no module
importing another's private name, and layers that only point down.

Every import counts, at any depth of the code: inside a function, under `if TYPE_CHECKING:`, a
package's `__init__` importing its modules and a module importing from its package's
`__init__`. A lazy import of a heavy library (torch, transformers, matplotlib) is no edge here;
a lazy import of a wmdp module is an edge like any other, so it cannot hide a cycle.

Reads only src/wmdp (no import of wmdp, no torch): a second.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "wmdp"

# Lowest first. A module may import from its own layer and the layers below it, never above.
# A name is a module or a package (everything in it); the longest name that matches a module
# decides its layer. Keep in step with the table in docs/architecture.md.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["errors", "io", "config", "progress", "distributed", "stats",
                    "optimizer_settings"]),
    ("models", ["checkpoint", "model_spec", "models", "prefix", "layers"]),
    ("data", ["data", "tasks"]),
    ("measure", ["scoring", "perplexity", "evaluate", "lmeval_bridge", "chat"]),
    ("unlearn", ["unlearn"]),
    ("sandbox", ["sandbox"]),
    ("audit", ["audit", "protocol_plot"]),
    ("plan", ["plan"]),
    ("report", ["robustness", "report_render", "report_tasks", "report_plots", "report",
                "compare"]),
    ("pipeline", ["preflight", "pipeline", "sweep"]),
    ("cli", ["cli_errors", "cli", "__main__", ""]),  # "": the package's own __init__ (its API)
]


@dataclass(frozen=True)
class Import:
    source: str      # the importing module, "wmdp.scoring"
    target: str      # the imported module, "wmdp.unlearn.parallel"
    name: str        # what the line names: "wmdp.unlearn.parallel.is_sharded"
    where: str       # "src/wmdp/scoring.py:244"

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.name}"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module that defines `name` (a module, or a name inside one)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> list[Import]:
    """Every import of a wmdp module by another, at any depth."""
    found = []
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        where_file = path.relative_to(SRC.parent)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up `level - 1` more
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = owner(name, mods) if name.split(".")[0] == PACKAGE else None
                if target is not None and target != module:
                    found.append(Import(module, target, name, f"{where_file}:{node.lineno}"))
    return found


def by_line(edges: Iterable[Import]) -> list[Import]:
    """One Import per line and target module, naming everything that line takes from it."""
    merged: dict[tuple[str, str], list[Import]] = {}
    for e in edges:
        merged.setdefault((e.where, e.target), []).append(e)
    out = []
    for (where, target), group in merged.items():
        names = [e.name.removeprefix(target + ".") for e in group if e.name != target]
        name = target + (f" ({', '.join(names)})" if names else "")
        out.append(Import(group[0].source, target, name, where))
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    rest = module.removeprefix(PACKAGE).removeprefix(".")
    best = None
    for i, (layer, names) in enumerate(LAYERS):
        for name in names:
            if rest == name or (name and rest.startswith(name + ".")):
                if best is None or len(name) > best[0]:
                    best = (len(name), i, layer)
    return None if best is None else best[1:]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    if missing:
        pytest.fail("modules in no layer (add them to LAYERS here and to docs/architecture.md): "
                    + ", ".join(missing), pytrace=False)


def test_the_docs_show_these_layers():
    """docs/architecture.md's table: a row per layer, in this order, naming these modules."""
    rows = [line.split("|")[1:3] for line in (ROOT / "docs" / "architecture.md").read_text()
            .splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    shown = [(layer.strip(), [m.removesuffix("/*").removeprefix("wmdp/__init__")
                              for m in re.findall(r"`([^`]+)`", names)]) for layer, names in rows]
    assert shown == LAYERS


def test_no_import_cycles():
    edges = imports(modules())
    found = cycles(edges)
    lines = []
    for component in found:
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        lines += [f"  {e}" for e in by_line(e for e in edges
                                              if e.source in members and e.target in members)]
    if found:
        pytest.fail(f"{len(found)} import cycle(s), each with the imports that close it (move the "
                    "shared piece one layer lower, or merge the modules):\n" + "\n".join(lines),
                    pytrace=False)


def private_imports(mods: dict[str, Path]) -> list[Import]:
    """`from X import _name` where X is another module (a private submodule is no name)."""
    return [e for e in imports(mods) if e.name not in mods
            and (leaf := e.name.rpartition(".")[2]).startswith("_") and not leaf.startswith("__")]


def upward_imports(mods: dict[str, Path]) -> list[str]:
    up = []
    for e in by_line(imports(mods)):
        source, target = layer_of(e.source), layer_of(e.target)
        if source and target and target[0] > source[0]:
            up.append(f"{e}  ({source[1]} -> {target[1]})")
    return up


def test_no_private_names_across_modules():
    bad = private_imports(modules())
    if bad:
        pytest.fail(f"{len(bad)} import(s) of another module's private name (make it public API "
                    "of the lower module):\n" + "\n".join(f"  {e}" for e in bad), pytrace=False)


def test_layers_only_point_down():
    up = upward_imports(modules())
    if up:
        pytest.fail(f"{len(up)} import(s) of a higher layer (layers, lowest first: "
                    + ", ".join(layer for layer, _ in LAYERS) + "):\n"
                    + "\n".join(f"  {u}" for u in up), pytrace=False)


def test_the_check_sees_what_it_must(tmp_path, monkeypatch):
    """The walk itself, on a made-up package: a cycle through a function-level import and a
    package's __init__, a relative private import, an upward import under TYPE_CHECKING."""
    src = tmp_path / "src"
    pkg = src / PACKAGE
    (pkg / "unlearn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "io.py").write_text("from typing import TYPE_CHECKING\n"
                               "if TYPE_CHECKING:\n    from wmdp.report import Doc\n")
    (pkg / "report.py").write_text("import os\nimport wmdp.unlearn.undo\n")
    (pkg / "unlearn" / "__init__.py").write_text("from wmdp.unlearn.registry import METHODS\n")
    (pkg / "unlearn" / "registry.py").write_text("from . import undo\n")
    (pkg / "unlearn" / "undo.py").write_text(
        "from ..errors import _helper, __doc__\n\ndef f():\n    from wmdp.unlearn import resolve\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", src)
    mods = modules()
    edges = imports(mods)
    assert {(e.source, e.target) for e in edges} == {
        ("wmdp.io", "wmdp.report"), ("wmdp.report", "wmdp.unlearn.undo"),
        ("wmdp.unlearn", "wmdp.unlearn.registry"), ("wmdp.unlearn.registry", "wmdp.unlearn.undo"),
        ("wmdp.unlearn.undo", "wmdp.errors"), ("wmdp.unlearn.undo", "wmdp.unlearn")}
    assert cycles(edges) == [["wmdp.unlearn", "wmdp.unlearn.registry", "wmdp.unlearn.undo"]]
    assert [str(e) for e in private_imports(mods)] == [
        "src/wmdp/unlearn/undo.py:1: wmdp.unlearn.undo imports wmdp.errors._helper"]
    assert upward_imports(mods) == [
        "src/wmdp/io.py:3: wmdp.io imports wmdp.report (Doc)  (foundation -> report)"]
