"""Reports: the evidence a practitioner needs after a run (history, metrics, curves, confusion, ROC)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.results import Metrics, write_history
from pipeline.core.rundir import CONFUSION_PLOT, CURVES_PLOT, ROC_PLOT, RunDir
from pipeline.train.solve import is_solve
from zoo.files import atomic_write, write_json

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.results import EpochRecord


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], *, split: str = "test"
) -> Metrics:
    """Accuracy, macro precision/recall/F1, per-class report, confusion matrix, ROC AUC if binary."""
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    scores = np.asarray(scores)
    predictions = scores.argmax(1) if len(scores) else np.empty(0, dtype=int)
    indices = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=indices, average="macro", zero_division=0
    )
    report = classification_report(
        labels,
        predictions,
        labels=indices,
        target_names=list(class_names),
        output_dict=True,
        zero_division=0,
    )
    per_class = {name: {k: float(v) for k, v in report[name].items()} for name in class_names}
    roc_auc = None
    if len(class_names) == 2 and len(set(labels.tolist())) == 2:
        roc_auc = float(roc_auc_score(labels, _softmax(scores)[:, 1]))
    return Metrics(
        accuracy=float(accuracy_score(labels, predictions)) if len(labels) else float("nan"),
        macro_precision=float(precision),
        macro_recall=float(recall),
        macro_f1=float(f1),
        num_images=int(len(labels)),
        per_class=per_class,
        confusion=confusion_matrix(labels, predictions, labels=indices).tolist(),
        class_names=list(class_names),
        roc_auc=roc_auc,
        split=split,
    )


def _softmax(scores: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _figure():  # noqa: ANN202 - matplotlib is imported lazily, with a backend that needs no screen
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    plt = _figure()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def kept_epoch(history: Sequence[EpochRecord]) -> tuple[int, str]:
    """The epoch whose weights the run kept, and its label on the curves.

    A training keeps its lowest validation loss ("best epoch"); a solve keeps its solution, the
    last pass, whatever the validation loss did on the way (pipeline.train.solve.is_solve).
    """
    if is_solve(history):
        return history[-1].epoch, f"solution: pass {history[-1].epoch}"
    best = min(history, key=lambda r: r.val_loss)
    return best.epoch, f"best epoch {best.epoch}"


def plot_curves(path: Path, history: Sequence[EpochRecord], *, title: str) -> None:
    """curves.png: loss and accuracy per epoch (per pass of a solver), train against validation.

    The line marks the weights kept: the lowest validation loss of a training, the last pass of
    a solve (pipeline.train.solve.is_solve says what a pass is), as run.json's best_epoch says.
    """
    plt = _figure()
    step = "solver pass" if is_solve(history) else "epoch"
    epochs = [r.epoch for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r.train_loss for r in history], "o-", label="train")
    loss_ax.plot(epochs, [r.val_loss for r in history], "o-", label="validation")
    loss_ax.set(xlabel=step, ylabel="cross-entropy loss", title="Loss")
    acc_ax.plot(epochs, [r.train_acc for r in history], "o-", label="train")
    acc_ax.plot(epochs, [r.val_acc for r in history], "o-", label="validation")
    acc_ax.set(xlabel=step, ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    if history:
        kept, mark = kept_epoch(history)
        for ax in (loss_ax, acc_ax):
            ax.axvline(kept, color="grey", linestyle=":", label=mark)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_confusion(path: Path, metrics: Metrics, *, title: str) -> None:
    """confusion.png: true class per row, predicted per column, counts in the cells."""
    import numpy as np

    plt = _figure()
    matrix = np.asarray(metrics.confusion)
    size = max(4.0, 0.5 * len(metrics.class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ticks = range(len(metrics.class_names))
    ax.set_xticks(ticks, metrics.class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, metrics.class_names)
    ax.set(
        xlabel="predicted class",
        ylabel="true class",
        title=f"{title}\n{metrics.split} accuracy {metrics.accuracy:.3f} ({metrics.num_images} images)",
    )
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if count > threshold else "black",
        )
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save_figure(fig, path)


def plot_roc(
    path: Path, labels: np.ndarray, scores: np.ndarray, *, title: str, positive: str
) -> None:
    """roc.png for binary tasks."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _figure()
    probabilities = _softmax(scores)[:, 1]
    fpr, tpr, _ = roc_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(labels, probabilities):.3f}")
    ax.plot([0, 1], [0, 1], "k--", alpha=0.4, label="chance")
    ax.set(xlabel="false positive rate", ylabel=f"true positive rate ({positive})", title=title)
    ax.legend(loc="lower right")
    _save_figure(fig, path)


def write_run_report(
    run_dir: Path,
    *,
    history: Sequence[EpochRecord],
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    title: str,
    split: str = "test",
    extra: dict[str, Any] | None = None,
) -> Metrics:
    """history.csv, metrics.json, curves.png, confusion.png (and roc.png for two classes)."""
    metrics = compute_metrics(labels, scores, class_names, split=split)
    run = RunDir(run_dir)
    write_history(run.history_file, history)
    write_json(run.metrics_file, {**metrics.to_dict(), **(extra or {})})
    if history:
        plot_curves(run.plot(CURVES_PLOT), history, title=title)
    plot_confusion(run.plot(CONFUSION_PLOT), metrics, title=title)
    if metrics.roc_auc is not None:
        plot_roc(run.plot(ROC_PLOT), labels, scores, title=title, positive=class_names[1])
    return metrics


def plot_comparison(path: Path, histories: dict[str, Sequence[EpochRecord]], *, title: str) -> None:
    """compare.png: validation loss and accuracy of several strategies, overlaid."""
    plt = _figure()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        epochs = [r.epoch for r in history]
        loss_ax.plot(epochs, [r.val_loss for r in history], "o-", label=name)
        acc_ax.plot(epochs, [r.val_acc for r in history], "o-", label=name)
    loss_ax.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
    acc_ax.set(
        xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy", ylim=(0, 1.02)
    )
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save_figure(fig, path)
