"""report.html: one self-contained page per run, to open and show a colleague.

It is drawn from what the run directory holds (pipeline.core.rundir: run.json, split.json,
metrics.json, history's plots from pipeline.report.metrics, predictions.csv, and export.json /
verification.json once the run was exported or verified), so `zoo report RUN` can draw it again
at any time. `zoo adapt` writes it, `zoo export` and `zoo verify --run` refresh it; a report that
cannot be drawn never fails the command that asked for it (`refresh_report`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core.record import RunRecord
from pipeline.core.results import ImagePrediction, Metrics
from pipeline.core.rundir import (
    CONFUSION_PLOT,
    CURVES_PLOT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    ROC_PLOT,
    RunDir,
)
from pipeline.report.check_section import data_check_section
from pipeline.report.compare import COMPARE_FILE, comparison_page
from pipeline.report.export_section import verification_section
from pipeline.report.heatmaps import heatmaps_section
from pipeline.report.page import (
    REPORT_FILE,
    bar,
    cards,
    columns,
    embedded_png,
    esc,
    fmt,
    key_values,
    page,
    percent,
    table,
    thumbnail,
    warning,
)
from pipeline.report.predictions import resolve_ref
from pipeline.report.trust_section import trust_section
from pipeline.train.solve import is_solve
from zoo.errors import NotFound, ZooError
from zoo.files import atomic_write, write_json

GALLERY_MAX = 24  # worst mistakes shown
GALLERY_MIN = 8  # filled with the hardest correct images when a run has fewer mistakes
CONFUSED_PAIRS = 10
PAIR_THUMBNAIL_PX = 48  # the example beside each confused pair
# What a solved head's "epochs" are, said once on the page (the curves count the same passes).
SOLVE_NOTE = (
    "The head was solved on cached features by L-BFGS, not trained by epochs. A solver pass "
    "evaluates the loss once on all the training features; the curves show every pass, and the "
    "head kept is the solution, the last pass (a lower validation loss on the way is not a point "
    "the solver stops at)."
)

logger = logging.getLogger(__name__)


def write_report(run_dir: Path) -> Path:
    """Write RUN/report.html (a comparison folder's page for `zoo compare` output) and return its path."""
    folder = Path(run_dir)
    if (folder / COMPARE_FILE).is_file() and not RunDir(folder).record_file.exists():
        text = comparison_page(folder)
    else:
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise NotFound(f"{folder} {what}; pass a run directory written by `zoo adapt`")
        text = run_page(folder, RunDir(folder).record())
    path = folder / REPORT_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def refresh_report(run_dir: Path, *, log: Callable[[str], None] | None = None) -> Path | None:
    """`write_report` for commands whose own work is done: a failure is one logged line, not an error."""
    try:
        return write_report(run_dir)
    except Exception as exc:  # the run, export or verification stands without its page
        reason = " ".join(str(exc).split())[:200]
        (log or logger.warning)(
            f"{REPORT_FILE} not written ({type(exc).__name__}: {reason}); `zoo report {run_dir}` retries"
        )
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_export(run_dir: Path, summary: Any, *, log: Callable[[str], None] | None = None) -> None:
    """export.json in the run (an `ExportSummary`'s figures, with the time), then the page again."""
    _record(RunDir(run_dir).export_file, {**summary.to_dict(), "exported": _now()}, log=log)


def record_verification(
    run_dir: Path, report: Any, *, log: Callable[[str], None] | None = None
) -> None:
    """verification.json in the run (a `FileReport` without its metadata), then the page again."""
    figures = {k: v for k, v in report.to_dict().items() if k != "metadata"}
    _record(RunDir(run_dir).verification_file, {**figures, "checked": _now()}, log=log)


def _record(path: Path, payload: dict[str, Any], *, log: Callable[[str], None] | None) -> None:
    """The exported or verified file stands even when its run folder cannot take the record."""
    try:
        write_json(path, payload)
    except OSError as exc:
        (log or logger.warning)(f"{path.name} not written in {path.parent} ({exc})")
        return
    refresh_report(path.parent, log=log)


# ----------------------------------------------------------------------------- the run page


def run_page(run_dir: Path, record: RunRecord) -> str:
    """The HTML of a run's report."""
    run = RunDir(run_dir)
    metrics, predictions = run.metrics(), run.predictions()
    model = record.source.name or "model"
    source = record.data_source or "?"
    sections = [
        ("model", "Model and data", _model_and_data(run, record)),
        ("data", "Data check", data_check_section(run_dir)),
        ("strategy", "Strategy and training", _strategy(record, solve=_is_solve(run))),
        ("curves", "Loss and accuracy", _curves(run)),
        ("metrics", "Per-class metrics and confusion matrix", _metrics(run, metrics)),
    ]
    if metrics and len(metrics.class_names) == 2:
        sections.append(("roc", "ROC curve", _roc(run, metrics)))
    sections += [
        ("mistakes", "Worst mistakes", _mistakes(predictions, source=source, metrics=metrics)),
        ("confused", "Most confused classes", _confused(metrics, predictions, source=source)),
        ("trust", "Calibration and unknown inputs", trust_section(run_dir, record)),
        ("heatmaps", "Where the model looked", heatmaps_section(run_dir)),
        ("verification", "Export and verification", verification_section(run_dir)),
    ]
    subtitle = (
        f"{esc(record.strategy or '?')} on {esc(source)} · {esc(record.created)} · "
        f"status {esc(record.status)} · {esc(run_dir)}"
    )
    return page(
        title=f"{model} → {Path(str(source)).name or source}",
        subtitle=subtitle,
        cards=_headline(record, metrics, predictions, export=run.exported()),
        sections=sections,
    )


def _headline(
    record: RunRecord,
    metrics: Metrics | None,
    predictions: list[ImagePrediction] | None,
    *,
    export: dict[str, Any] | None,
) -> str:
    items = []
    if metrics:
        items += [
            (percent(metrics.accuracy), f"{metrics.split} accuracy"),
            (fmt(metrics.macro_f1, digits=3), "macro F1"),
            (str(metrics.num_images), f"{metrics.split} images"),
        ]
    if predictions is not None:
        items.append((str(sum(not p.correct for p in predictions)), "mistakes"))
    items += [
        (str(_or_dash(record.num_classes)), "classes"),
        (str(_or_dash(record.strategy)), "strategy"),
        (f"{record.seconds:.0f} s" if record.seconds is not None else "–", "time"),
    ]
    if export is None:
        items.append(("–", "not exported yet"))
    else:
        passed = bool((export.get("verify") or {}).get("passed"))
        items.append(("verified" if passed else "unverified", "ONNX export"))
    return cards(items)


def _or_dash(value: Any) -> Any:
    return "–" if value is None else value


def _model_and_data(run: RunDir, record: RunRecord) -> str:
    source, data, preprocess = record.source, record.data, record.preprocess
    model = key_values(
        {
            "model": source.name,
            "file": source.path,
            "sha256": source.sha256,
            "from": source.url,
            "input": f"{preprocess.crop} px, {preprocess.layout}, "
            f"mean {list(preprocess.mean)}, std {list(preprocess.std)}"
            if preprocess
            else "? px, ?, mean None, std None",
        }
    )
    class_names = record.class_names or []
    counts = _class_counts(run, len(class_names))
    sizes = table(
        ["split", "images"],
        [
            (name, getattr(data, name) if data else None)
            for name in ("train", "val", "test", "skipped")
        ],
        numeric=(1,),
    )
    if counts:
        per_class = table(
            ["class", "train", "val", "test"],
            [
                (name, *(counts[part][i] for part in ("train", "val", "test")))
                for i, name in enumerate(class_names)
            ],
            numeric=(1, 2, 3),
        )
    else:
        per_class = (
            '<div class="classes">'
            + "".join(f"<span>{esc(c)}</span>" for c in class_names)
            + "</div>"
        )
    return columns(
        f"{model}<h3>Data: {esc(data.source if data else '?')}</h3>{sizes}",
        f"<h3>{len(class_names)} classes</h3>{per_class}",
    )


def _class_counts(run: RunDir, num_classes: int) -> dict[str, list[int]] | None:
    """Images per class and split, from split.json (None when it is missing or does not fit)."""
    if not run.split_file.is_file():
        return None
    split = run.split()
    if len(split.class_names) != num_classes:
        return None
    counts = {part: [0] * num_classes for part in ("train", "val", "test")}
    for part, per_class in counts.items():
        for _, label in getattr(split, part):
            if 0 <= label < num_classes:
                per_class[label] += 1
    return counts


def _strategy(record: RunRecord, *, solve: bool = False) -> str:
    head = record.head
    facts = {
        "strategy": record.strategy,
        "why": record.strategy_reason,
        "unfrozen blocks": record.unfreeze,
        "training path": record.fast_path,
        "augmentation": record.augment,
        "device": record.device,
        **_passes(record, solve=solve),
        "stopped": record.stopped,
        "time": f"{record.seconds:.1f} s" if record.seconds is not None else None,
        "started": record.created or None,
        "train images per class (cap)": record.train_per_class,
        "head": f"hidden {head.hidden or 'none'}, dropout {head.dropout}"
        if head
        else "hidden none, dropout 0",
    }
    body = columns(
        key_values({k: v for k, v in facts.items() if v is not None}),
        "<h3>Hyperparameters</h3>" + key_values(dict(record.hyperparameters or {})),
    )
    if record.head_fit:
        solved = esc(record.head_fit.get("summary") or record.head_fit.get("method"))
        body += f'<p class="note">{SOLVE_NOTE if solve else "The head was trained on cached features."} {solved}</p>'
    if record.auto:
        body += "<h3>What <code>--strategy auto</code> measured</h3>" + key_values(record.auto)
    if record.versions:
        body += "<details><summary>Versions</summary>" + key_values(record.versions) + "</details>"
    return body


def _is_solve(run: RunDir) -> bool:
    """Whether the run's head was solved by L-BFGS (its history counts solver passes, not epochs)."""
    try:
        return is_solve(run.history())
    except ZooError:  # a damaged history.csv: the page says epochs, as it would have
        return False


def _passes(record: RunRecord, *, solve: bool) -> dict[str, Any]:
    """The epochs run and the one kept; for a solve, its passes and the solution (the last)."""
    if solve:
        solution = f"pass {record.best_epoch}, the last" if record.best_epoch else None
        return {"solver passes": record.epochs_run, "solution": solution}
    return {"epochs run": record.epochs_run, "best epoch": record.best_epoch}


def _curves(run: RunDir) -> str:
    image = embedded_png(run.plot(CURVES_PLOT), alt="loss and accuracy per epoch")
    if image is None:
        return warning(f"No {CURVES_PLOT}: the run recorded no epoch.")
    return image


def _metrics(run: RunDir, metrics: Metrics | None) -> str:
    if not metrics:
        return warning(f"No {METRICS_FILE}: the run has not finished its final evaluation.")
    split = metrics.split
    body = ""
    if split == "val":
        body += warning(
            "The data has no test split: these figures are on the validation images, which also "
            "chose the best epoch, so they flatter the model. Add a test/ folder for an unbiased figure."
        )
    body += key_values(
        {
            f"{split} images": metrics.num_images,
            "accuracy": metrics.accuracy,
            "macro precision": metrics.macro_precision,
            "macro recall": metrics.macro_recall,
            "macro F1": metrics.macro_f1,
        }
    )
    rows = []
    for name in metrics.class_names:
        figures = metrics.per_class.get(name) or {}
        f1 = figures.get("f1-score")
        rows.append(
            (
                esc(name),
                fmt(figures.get("precision"), digits=3),
                fmt(figures.get("recall"), digits=3),
                f"{bar(f1)}{fmt(f1, digits=3)}",
                fmt(int(figures.get("support", 0))),
            )
        )
    body += table(
        ["class", "precision", "recall", "F1", "images"], rows, numeric=(1, 2, 4), raw=True
    )
    confusion = embedded_png(run.plot(CONFUSION_PLOT), alt="confusion matrix")
    return columns(body, confusion or warning(f"No {CONFUSION_PLOT} in the run."))


def _roc(run: RunDir, metrics: Metrics) -> str:
    image = embedded_png(run.plot(ROC_PLOT), alt="ROC curve")
    caption = f"<p>Area under the curve: <b>{fmt(metrics.roc_auc, digits=3)}</b> (positive class {esc(metrics.class_names[1])}).</p>"
    if image is None:
        return warning("No ROC curve: the held-out images hold only one of the two classes.")
    return caption + image


def gallery_items(predictions: Sequence[ImagePrediction]) -> list[ImagePrediction]:
    """The worst mistakes by loss; with fewer than GALLERY_MIN, the hardest correct images after them."""
    by_loss = sorted(predictions, key=lambda p: -p.loss)
    mistakes = [p for p in by_loss if not p.correct][:GALLERY_MAX]
    if len(mistakes) >= GALLERY_MIN:
        return mistakes
    return mistakes + [p for p in by_loss if p.correct][: GALLERY_MIN - len(mistakes)]


def _mistakes(
    predictions: list[ImagePrediction] | None, *, source: str, metrics: Metrics | None
) -> str:
    if predictions is None:
        return warning(
            f"No {PREDICTIONS_FILE}: this run predates per-image predictions; run `zoo adapt` again to see them."
        )
    split = metrics.split if metrics else "test"
    wrong = sum(not p.correct for p in predictions)
    chosen = gallery_items(predictions)
    intro = (
        f"<p>{wrong} of {len(predictions)} {esc(split)} images are misclassified. "
        f"Shown: the {min(wrong, GALLERY_MAX)} with the highest loss"
    )
    if len(chosen) > min(wrong, GALLERY_MAX):
        intro += ", then the hardest correct images (green)"
    figures = "".join(_thumbnail_figure(p, source) for p in chosen)
    return f'{intro}.</p><div class="gallery">{figures}</div>'


def _thumbnail_figure(prediction: ImagePrediction, source: str) -> str:
    uri = thumbnail(resolve_ref(prediction.image, source))
    name = Path(prediction.image).name if "/" in prediction.image else prediction.image
    image = (
        f'<img alt="{esc(prediction.image)}" src="{uri}">'
        if uri
        else '<div class="missing">image not found</div>'
    )
    state = "correct" if prediction.correct else "mistake"
    verdict_line = (
        "correct" if prediction.correct else f"predicted <b>{esc(prediction.predicted)}</b>"
    )
    return (
        f'<figure class="thumb {state}" data-true="{esc(prediction.label)}" '
        f'data-predicted="{esc(prediction.predicted)}" data-confidence="{prediction.confidence:.4f}">'
        f"{image}<figcaption>true <b>{esc(prediction.label)}</b><br>{verdict_line}<br>"
        f"confidence {prediction.confidence:.0%}<br>loss {prediction.loss:.2f}"
        f'<div class="name" title="{esc(prediction.image)}">{esc(name)}</div></figcaption></figure>'
    )


def confused_pairs(
    metrics: Metrics, limit: int = CONFUSED_PAIRS
) -> list[tuple[str, str, int, float]]:
    """(true class, predicted class, count, share of the true class's images), most frequent first."""
    names = metrics.class_names
    pairs = []
    for row, counts in enumerate(metrics.confusion):
        total = sum(counts)
        for col, count in enumerate(counts):
            if row != col and count:
                pairs.append((names[row], names[col], int(count), count / total))
    return sorted(pairs, key=lambda p: (-p[2], -p[3], p[0], p[1]))[:limit]


def _confused(
    metrics: Metrics | None, predictions: list[ImagePrediction] | None, *, source: str
) -> str:
    if not metrics:
        return warning(f"No {METRICS_FILE}.")
    pairs = confused_pairs(metrics)
    if not pairs:
        return f"<p>No confusion: every {esc(metrics.split)} image is classified correctly.</p>"
    rows = [
        (
            esc(t),
            esc(p),
            str(n),
            f"{bar(share, 60)}{percent(share)}",
            _example(predictions, t, p, source),
        )  # fmt: skip
        for t, p, n, share in pairs
    ]
    return table(
        ["true class", "predicted as", "images", "share of the true class", "worst example"],
        rows,
        numeric=(2,),
        raw=True,
    )


def _example(predictions: list[ImagePrediction] | None, label: str, predicted: str, source: str) -> str:  # fmt: skip
    """A small thumbnail of the highest-loss image of `label` taken for `predicted`."""
    matching = [p for p in predictions or [] if p.label == label and p.predicted == predicted]
    if not matching:
        return ""
    worst = max(matching, key=lambda p: p.loss)
    uri = thumbnail(resolve_ref(worst.image, source), size=PAIR_THUMBNAIL_PX)
    return (
        f'<img class="pair" alt="{esc(worst.image)}" title="{esc(worst.image)}" src="{uri}">'
        if uri
        else ""
    )
