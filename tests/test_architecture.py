"""ARCHITECTURE.md names only what exists: every identifier and path in backticks is in the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
CODE_DIRS = ("zoo", "pipeline", "tests", "bench")


def backticked(text: str) -> list[str]:
    """The spans in single backticks outside fenced blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def defined_names(root: Path = ROOT) -> set[str]:
    """Every module, class, function, method and module-level name the project defines."""
    names: set[str] = {"cli", "main"}
    files = [root / "cli.py", *(p for d in CODE_DIRS for p in (root / d).rglob("*.py"))]
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        names.update(parts)
        names.add(".".join(p for p in parts if p != "__init__"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
                names.update(t.attr for t in targets if isinstance(t, ast.Attribute))
    return names


def missing(spans: list[str], root: Path = ROOT) -> list[str]:
    """The spans that name neither a path in the tree, a command, nor a defined identifier."""
    names = defined_names(root)
    found = []
    for span in spans:
        if span.startswith(("zoo ", "make ", "-")) or " " in span:
            continue  # a command line or an option, not a name
        path = span.rstrip("/").removesuffix("=")  # `models_dir=`: a keyword argument
        if "/" in path or path.endswith((".py", ".md", ".json", ".toml")):
            if not (root / path).exists() and not (root / "pipeline" / path).exists():
                found.append(span)
            continue
        # dotted: every part must be defined (pipeline.train.loop, RunDir.record)
        if not all(part in names for part in re.split(r"[.()]+", path.strip("()")) if part):
            found.append(span)
    return found


def test_the_checker_flags_made_up_names(tmp_path: Path) -> None:
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "stage.py").write_text("class Real:\n    def method(self): ...\n")
    (tmp_path / "cli.py").write_text("")
    spans = ["pipeline/stage.py", "Real", "Real.method", "pipeline.stage", "method=", "Ghost", "pipeline/gone/", "zoo adapt", "--data", "ghost="]  # fmt: skip
    assert missing(spans, tmp_path) == ["Ghost", "pipeline/gone/", "ghost="]


def test_architecture_names_only_what_exists() -> None:
    spans = backticked(DOC.read_text(encoding="utf-8"))
    assert len(spans) > 20, "ARCHITECTURE.md names too little of the code"
    gone = missing(spans)
    assert not gone, f"ARCHITECTURE.md names what the code does not have: {gone}"


def test_the_makefiles_inline_python_imports_what_exists() -> None:
    """`make demo`'s one-liners import project names that a move must not leave behind."""
    import importlib

    text = (ROOT / "Makefile").read_text()
    imports = re.findall(r"from ((?:pipeline|zoo|bench)[\w.]*) import ([\w, ]+)", text)
    assert imports  # the demo does use some
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"Makefile: {module} has no {name}"
