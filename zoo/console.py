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


class _EpochBar:
    """A transient rich progress bar for one epoch: batches done, running loss and accuracy."""

    def __init__(self, epoch: int, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn(f"epoch {epoch}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f}"),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        )
        self._task = self._progress.add_task("train", total=total, loss=0.0, acc=0.0)
        self._progress.start()

    def update(self, batch: int, loss: float, accuracy: float) -> None:
        self._progress.update(self._task, advance=1, loss=loss, acc=accuracy)

    def close(self) -> None:
        self._progress.stop()


def epoch_bar_factory():  # noqa: ANN201
    """A factory of per-epoch progress bars, for pipeline.train.loop.fit."""
    return _EpochBar


class _StageBar:
    """A transient rich bar for one long stage: items done, rate, time remaining."""

    def __init__(self, description: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total)
        self._progress.start()

    def advance(self, amount: int = 1) -> None:
        self._progress.update(self._task, advance=amount)

    def close(self) -> None:
        self._progress.stop()


def stage_bar_factory():  # noqa: ANN201
    """A factory of progress bars for the long stages (pipeline.core.progress.showing)."""
    return _StageBar


def int8_line(summary: dict[str, Any]) -> str:
    """The line `zoo export --quantize int8` prints, from its summary's `int8` entry."""
    accuracy = ""
    if summary.get("accuracy_int8") is not None and summary.get("accuracy_fp32") is not None:
        accuracy = f", accuracy {summary['accuracy_int8']:.2f}% vs {summary['accuracy_fp32']:.2f}% fp32"  # fmt: skip
    agreement = summary.get("top1_agreement")
    agreed = f", top-1 agreement {agreement:.1%}" if agreement is not None else ""
    return f"int8: {summary['path']} ({summary['ratio']:.0%} of fp32){accuracy}{agreed}"
