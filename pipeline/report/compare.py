"""The report.html of a `zoo compare` folder: every strategy side by side, on one self-contained page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.results import Metrics
from pipeline.core.rundir import CONFUSION_PLOT, RunDir
from pipeline.report.page import REPORT_FILE, bar, embedded_png, esc, fmt, page, percent, table
from zoo.errors import ZooError

COMPARE_FILE = "compare.json"


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ZooError(f"{path} is damaged ({exc}); run `zoo compare` again") from exc


def _run_dir(folder: Path, row: dict[str, Any]) -> Path:
    """A strategy's run, found beside the comparison even when the folder has moved since."""
    recorded = Path(row.get("run_dir") or "")
    beside = folder / recorded.name
    return beside if beside.is_dir() else recorded


def comparison_page(folder: Path) -> str:
    """The HTML of a comparison: the table, the overlaid curves, per-class F1 and confusion per strategy."""
    rows = _json(folder / COMPARE_FILE).get("runs") or []
    if not rows:
        raise ZooError(f"{folder / COMPARE_FILE} lists no runs; run `zoo compare` again")
    runs = [(row, _run_dir(folder, row)) for row in rows]
    first_run = RunDir(runs[0][1])
    first = first_run.record() if first_run.is_run() else None
    data = first.data if first else None
    model = (first.source.name if first else None) or "model"
    source = (data.source if data else None) or "?"
    metrics = {row["strategy"]: RunDir(run).metrics() for row, run in runs}
    sections = [
        ("table", "Strategies", _table(folder, runs, metrics)),
        (
            "curves",
            "Validation curves",
            embedded_png(folder / "compare.png", alt="validation curves of every strategy")
            or "<p>No compare.png.</p>",
        ),
        ("per-class", "Per-class F1", _per_class(metrics)),
        ("confusion", "Confusion matrices", _confusions(runs)),
    ]
    train, val, test = (data.train, data.val, data.test) if data else ("?", "?", "?")
    subtitle = (
        f"{len(rows)} strategies on one split of {esc(source)}: {esc(train)} train / "
        f"{esc(val)} val / {esc(test)} test images · {esc(folder)}"
    )
    return page(
        title=f"{model} → {Path(str(source)).name}: strategies compared",
        subtitle=subtitle,
        sections=sections,
    )


def _mistakes(metrics: Metrics | None) -> str:
    """Misclassified held-out images, from the confusion matrix."""
    matrix = metrics.confusion if metrics else None
    if not matrix:
        return "–"
    return str(sum(sum(row) - row[i] for i, row in enumerate(matrix)))


def _table(
    folder: Path, runs: list[tuple[dict[str, Any], Path]], metrics: dict[str, Metrics | None]
) -> str:
    best = max((row.get("test_accuracy") or 0.0 for row, _ in runs), default=0.0)
    body = []
    for row, run in runs:
        link = run / REPORT_FILE
        href = link.relative_to(folder).as_posix() if link.is_relative_to(folder) else link.as_uri()
        name = f'<a href="{esc(href)}">{esc(row["strategy"])}</a>'
        accuracy = row.get("test_accuracy")
        mark = " ★" if accuracy is not None and accuracy == best else ""
        body.append(
            (
                name,
                f"{bar(accuracy, 70)}{percent(accuracy)}{mark}",
                fmt(row.get("macro_f1"), digits=3),
                esc(row.get("metrics_split", "test")),
                _mistakes(metrics[row["strategy"]]),
                fmt(row.get("best_epoch")),
                esc(row.get("stopped", "")),
                f"{row.get('seconds', 0):.0f} s",
                f"{row.get('trainable_params', 0):,}",
            )
        )
    headers = [
        "strategy",
        "accuracy",
        "macro F1",
        "split",
        "mistakes",
        "best epoch",
        "stopped",
        "time",
        "trainable params",
    ]
    return table(headers, body, numeric=(1, 2, 4, 5, 7, 8), raw=True) + (
        '<p class="muted">Each strategy links to its own report, with its gallery of worst mistakes.</p>'
    )


def _per_class(metrics: dict[str, Metrics | None]) -> str:
    strategies = list(metrics)
    names = next((m.class_names for m in metrics.values() if m and m.class_names), [])
    rows = []
    for name in names:
        cells = [esc(name)]
        for strategy in strategies:
            figures = metrics[strategy].per_class if metrics[strategy] else {}
            f1 = (figures.get(name) or {}).get("f1-score")
            cells.append(f"{bar(f1, 50)}{fmt(f1, digits=3)}")
        rows.append(cells)
    return table(
        ["class", *strategies], rows, numeric=tuple(range(1, len(strategies) + 1)), raw=True
    )


def _confusions(runs: list[tuple[dict[str, Any], Path]]) -> str:
    figures = []
    for row, run in runs:
        image = embedded_png(
            RunDir(run).plot(CONFUSION_PLOT), alt=f"confusion matrix of {row['strategy']}"
        )
        figures.append(
            f"<figure><figcaption>{esc(row['strategy'])}</figcaption>{image or 'missing'}</figure>"
        )
    return f'<div class="plots">{"".join(figures)}</div>'
