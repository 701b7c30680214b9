"""The code's shape: short functions in `zoo/` and `pipeline/`, and a short conductor.

Counted from `def` to the function's last line, docstring included (decorators excluded).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_CONDUCTOR_LINES = 250


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for each function longer than `limit` lines."""
    found = []
    for package in ("zoo", "pipeline"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        where = path.relative_to(root)
                        found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_long_function_finder_counts_from_def_to_last_line(tmp_path: Path) -> None:
    package = tmp_path / "zoo"
    package.mkdir()
    (tmp_path / "pipeline").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(3))
    (package / "m.py").write_text(
        f'def short():\n    """Doc."""\n{body}\n\n\ndef other():\n    pass\n'
    )
    assert long_functions(tmp_path, limit=5) == []
    assert long_functions(tmp_path, limit=4) == ["zoo/m.py:1 short (5 lines)"]


def test_no_function_is_longer_than_sixty_lines() -> None:
    found = long_functions()
    assert not found, "functions over 60 lines:\n" + "\n".join(found)


def test_the_adapt_conductor_is_short() -> None:
    lines = len((ROOT / "pipeline" / "adapt.py").read_text().splitlines())
    assert lines < MAX_CONDUCTOR_LINES, f"pipeline/adapt.py has {lines} lines"
