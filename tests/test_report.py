"""Reports: metrics match scikit-learn's definitions, and every file a run promises is written."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.results import EpochRecord
from pipeline.report.metrics import compute_metrics, plot_comparison, write_run_report


def _history(n: int = 3) -> list[EpochRecord]:
    return [
        EpochRecord(i, 1.0 / i, 0.5 + i / 10, 1.2 / i, 0.4 + i / 10, "0.001", 100, 8, 0.5)
        for i in range(1, n + 1)
    ]


def test_metrics_of_a_known_confusion() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    metrics = compute_metrics(labels, scores, ["a", "b", "c"])
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.per_class["b"]["recall"] == pytest.approx(1.0)
    assert metrics.per_class["b"]["precision"] == pytest.approx(2 / 3)
    assert metrics.macro_recall == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics.roc_auc is None


def test_binary_task_gets_roc(tmp_path) -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([[2.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 0.2]])
    metrics = write_run_report(
        tmp_path,
        history=_history(),
        labels=labels,
        scores=scores,
        class_names=["cat", "dog"],
        title="t",
    )
    assert metrics.roc_auc == pytest.approx(1.0)
    for name in ("history.csv", "metrics.json", "curves.png", "confusion.png", "roc.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc,lr,trainable_params")
    assert len(rows) == 4


def test_multiclass_has_no_roc_and_comparison_plot(tmp_path) -> None:
    labels = np.array([0, 1, 2])
    write_run_report(
        tmp_path,
        history=_history(),
        labels=labels,
        scores=np.eye(3),
        class_names=["0", "1", "2"],
        title="t",
    )
    assert not (tmp_path / "roc.png").exists()
    plot_comparison(
        tmp_path / "compare.png", {"feature": _history(), "scratch": _history(2)}, title="c"
    )
    assert (tmp_path / "compare.png").stat().st_size > 0
