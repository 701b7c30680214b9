"""Output for the command line: one JSON object with --json, readable tables otherwise.

Progress and human text go to stderr, so stdout stays clean for `--json` and for paths.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def stderr_console():  # noqa: ANN201 - rich is imported lazily to keep `zoo --help` fast
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A line of progress or explanation for the person at the terminal (stderr)."""
    stderr_console().print(message, markup=False)


def emit_json(payload: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table on stdout."""
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(highlight=False, width=max(120, Console().width)).print(grid)


def human_size(num_bytes: int | None) -> str:
    """'13.6 MB' style sizes (decimal units, as download sizes are usually quoted)."""
    if num_bytes is None:
        return "?"
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
