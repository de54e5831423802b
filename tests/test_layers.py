"""Imports run one way: the layer table in docs/design.md, checked against every import in the source.

The check reads the code as text (``ast``), so lazy imports inside functions are seen as well as
top-level ones, and nothing is imported to check it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "voidprompt"
DESIGN = ROOT / "docs" / "design.md"


def read_layers(text: str) -> tuple[dict[str, int], set[str]]:
    """``{unit: layer}`` and the exempt units, from the ```layers block of the design notes."""
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    if block is None:
        raise AssertionError("docs/design.md has no ```layers block")
    layers: dict[str, int] = {}
    exempt: set[str] = set()
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        key, _, names = line.partition(":")
        if key.strip() == "exempt":
            exempt.update(names.split())
        else:
            for name in names.split():
                layers[name] = int(key)
    return layers, exempt


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """``voidprompt.lab.run`` -> ``lab``; the package itself -> ``voidprompt``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The voidprompt modules ``module`` imports (each target resolved to a module that exists)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "voidprompt":
                    yield _existing(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "voidprompt":
                continue
            for alias in node.names:
                # ``from voidprompt.pipeline import engine`` imports the submodule itself.
                submodule = f"{target}.{alias.name}"
                yield (submodule if submodule in known else _existing(target, known)), node.lineno


def _existing(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, dict[str, int]]:
    modules = all_modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(module, path, known):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def test_the_layer_table_names_every_unit() -> None:
    layers, exempt = read_layers(DESIGN.read_text(encoding="utf-8"))
    units = {unit_of(m) for m in all_modules()}
    missing = sorted(units - set(layers) - exempt)
    assert not missing, f"units missing from the layer table in docs/design.md: {missing}"


def test_no_module_imports_from_a_higher_layer() -> None:
    layers, exempt = read_layers(DESIGN.read_text(encoding="utf-8"))
    wrong = []
    for module, edges in import_graph().items():
        source = unit_of(module)
        if source in exempt:
            continue
        for target, line in edges.items():
            dest = unit_of(target)
            if dest in exempt and source not in exempt:
                wrong.append(f"{module}:{line} imports {target} (exempt units are for tests only)")
            elif dest != source and layers[dest] > layers[source]:
                wrong.append(f"{module}:{line} imports {target} (layer {layers[dest]} > {layers[source]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_between_modules() -> None:
    graph = {module: set(edges) for module, edges in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycles_between_units() -> None:
    units: dict[str, set[str]] = {}
    for module, edges in import_graph().items():
        source = unit_of(module)
        units.setdefault(source, set()).update(unit_of(t) for t in edges if unit_of(t) != source)
    cycles = _cycles(units)
    assert not cycles, "units that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


# The checker itself, on made-up graphs: it must find what it is for.
@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, []),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_layer_table_reader() -> None:
    layers, exempt = read_layers("x\n```layers\n0: a b\n1: c\nexempt: t\n```\n")
    assert layers == {"a": 0, "b": 0, "c": 1}
    assert exempt == {"t"}
