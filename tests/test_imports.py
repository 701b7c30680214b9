"""The module graph of `zoo/` and `pipeline/` has no circles.

Every import counts, at module level and inside functions: a lazy import only postpones the
circle, the two modules still depend on each other. Imports under `if TYPE_CHECKING:` are left
out (they never run). `import zoo.catalog` and `from zoo.catalog import X` are edges to
`zoo.catalog` alone, not also to the package `zoo/__init__` that Python runs first: modelling that
would make every package's `__init__` part of every circle through it, which is not a design fact.
`from pipeline import runs` where `runs` is a submodule is an edge to `pipeline.core.runs`; `from zoo
import fetch` (a name, not a submodule) is an edge to `zoo/__init__`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "pipeline")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the scanned packages, by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """All import statements, at any depth, except those in `if TYPE_CHECKING:` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the `else:` branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The scanned modules that module `name` (at `path`) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from . import x, from ..a import b
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        # Iterative, so that a long chain of imports cannot hit the recursion limit.
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_circle_finder_finds_circles_and_only_them() -> None:
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),
        "x": {"y"},
        "y": {"x"},  # x <-> y
        "z": {"a"},  # into a circle, not part of it
    }
    assert circles(graph) == [["a", "b", "c"], ["x", "y"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_are_resolved_to_modules(tmp_path: Path) -> None:
    package = tmp_path / "pipeline"
    (package / "sub").mkdir(parents=True)
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "__init__.py").write_text("")
    (tmp_path / "zoo" / "errors.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (package / "sub" / "leaf.py").write_text("from .. import top\n")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import zoo.errors\n"
        "from zoo import fetch\n"
        "if TYPE_CHECKING:\n"
        "    from pipeline.sub import leaf\n"
        "def later():\n"
        "    from pipeline import sub\n"
    )
    graph = import_graph(tmp_path)
    assert graph["pipeline.top"] == {"zoo.errors", "zoo", "pipeline.sub"}
    assert graph["pipeline.sub.leaf"] == {"pipeline.top"}
    assert graph["pipeline.sub"] == {"pipeline.sub.leaf"}
    assert circles(graph) == [["pipeline.sub", "pipeline.sub.leaf", "pipeline.top"]]


def test_zoo_and_pipeline_import_without_circles() -> None:
    graph = import_graph()
    assert len(graph) > 30, "the scan found too few modules; did the layout change?"
    found = circles(graph)
    lines = []
    for component in found:
        members = set(component)
        edges = sorted(f"{m} -> {t}" for m in component for t in graph[m] if t in members)
        lines.append(f"{' <-> '.join(component)}: {'; '.join(edges)}")
    assert not found, "import circles:\n" + "\n".join(lines)


# The pipeline's stages in the order data flows; a stage imports only itself and earlier ones.
STAGES = ("core", "convert", "surgery", "data", "train", "export", "report")


def stage_of(module: str) -> int | None:
    """The rank of a `pipeline.<stage>...` module in STAGES; None for the conductor and `zoo`."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in STAGES:
        return None
    return STAGES.index(parts[1])


def backward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Each import of a stage module that reaches a later stage, or the conductor above them all."""
    found = []
    for module, targets in sorted(graph.items()):
        rank = stage_of(module)
        if rank is None:
            continue
        for target in sorted(targets):
            target_rank = stage_of(target)
            above = target.startswith("pipeline.") and target_rank is None
            if above or (target_rank is not None and target_rank > rank):
                found.append(f"{module} -> {target}")
    return found


def test_backward_import_finder_flags_later_stages_only() -> None:
    graph = {
        "pipeline.core.runs": {"zoo.errors"},
        "pipeline.train.loop": {
            "pipeline.core.runs",
            "pipeline.data.split",
            "pipeline.train.solve",
        },
        "pipeline.data.split": {"pipeline.report.metrics"},  # a later stage
        "pipeline.export.deploy": {"pipeline.adapt"},  # the conductor above every stage
        "pipeline.adapt": {"pipeline.report.html", "pipeline.train.loop"},  # the conductor may
    }
    assert backward_imports(graph) == [
        "pipeline.data.split -> pipeline.report.metrics",
        "pipeline.export.deploy -> pipeline.adapt",
    ]


def test_stages_import_only_earlier_stages() -> None:
    graph = import_graph()
    assert {stage_of(m) for m in graph} >= set(range(len(STAGES))), "a stage folder is missing"
    found = backward_imports(graph)
    assert not found, "stage imports against the data flow:\n" + "\n".join(found)


HEAVY = ("torch", "onnxruntime", "matplotlib")


@pytest.mark.parametrize(
    "code",
    [
        "import zoo",
        "import cli; from click.testing import CliRunner; CliRunner().invoke(cli.main, ['--help'])",
        "import cli; from click.testing import CliRunner; CliRunner().invoke(cli.main, ['adapt', '--help'])",
    ],
    ids=["import-zoo", "zoo-help", "zoo-adapt-help"],
)
def test_start_up_imports_no_heavy_library(code: str) -> None:
    """`import zoo` and `zoo --help` stay fast however imports move to the top of modules."""
    probe = f"import sys; {code}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
