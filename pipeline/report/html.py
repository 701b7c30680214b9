"""report.html: one self-contained page per run, to open and show a colleague.

It is drawn from what the run directory holds (run.json, split.json, metrics.json, history's
plots from pipeline.report.metrics, predictions.csv, and export.json / verification.json once the run
was exported or verified), so `zoo report RUN` can draw it again at any time. `zoo adapt`
writes it, `zoo export` and `zoo verify --run` refresh it; a report that cannot be drawn never
fails the command that asked for it (`refresh_report`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.core import runs
from pipeline.report.compare import COMPARE_FILE, comparison_page
from pipeline.report.export_section import (
    EXPORT_RECORD,
    VERIFY_RECORD,
    read_json,
    verification_section,
)
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
from pipeline.report.predictions import (
    PREDICTIONS_FILE,
    ImagePrediction,
    read_predictions,
    resolve_ref,
)
from zoo.errors import NotFound
from zoo.files import atomic_write, write_json

GALLERY_MAX = 24  # worst mistakes shown
GALLERY_MIN = 8  # filled with the hardest correct images when a run has fewer mistakes
CONFUSED_PAIRS = 10
PAIR_THUMBNAIL_PX = 48  # the example beside each confused pair

logger = logging.getLogger(__name__)


def write_report(run_dir: Path) -> Path:
    """Write RUN/report.html (a comparison folder's page for `zoo compare` output) and return its path."""
    folder = Path(run_dir)
    if (folder / COMPARE_FILE).is_file() and not (folder / runs.RUN_FILE).exists():
        text = comparison_page(folder)
    else:
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise NotFound(f"{folder} {what}; pass a run directory written by `zoo adapt`")
        text = run_page(folder, runs.read_run(folder))
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
    _record(Path(run_dir) / EXPORT_RECORD, {**summary.to_dict(), "exported": _now()}, log=log)


def record_verification(
    run_dir: Path, report: Any, *, log: Callable[[str], None] | None = None
) -> None:
    """verification.json in the run (a `FileReport` without its metadata), then the page again."""
    figures = {k: v for k, v in report.to_dict().items() if k != "metadata"}
    _record(Path(run_dir) / VERIFY_RECORD, {**figures, "checked": _now()}, log=log)


def _record(path: Path, payload: dict[str, Any], *, log: Callable[[str], None] | None) -> None:
    """The exported or verified file stands even when its run folder cannot take the record."""
    try:
        write_json(path, payload)
    except OSError as exc:
        (log or logger.warning)(f"{path.name} not written in {path.parent} ({exc})")
        return
    refresh_report(path.parent, log=log)


# ----------------------------------------------------------------------------- the run page


def run_page(run_dir: Path, record: dict[str, Any]) -> str:
    """The HTML of a run's report."""
    metrics = read_json(run_dir / "metrics.json")
    predictions = (
        read_predictions(run_dir / PREDICTIONS_FILE)
        if (run_dir / PREDICTIONS_FILE).exists()
        else None
    )
    model = (record.get("source") or {}).get("name") or "model"
    data = record.get("data") or {}
    source = data.get("source") or (record.get("options") or {}).get("data") or "?"
    strategy = record.get("strategy") or "?"
    sections = [
        ("model", "Model and data", _model_and_data(run_dir, record)),
        ("strategy", "Strategy and training", _strategy(record)),
        ("curves", "Loss and accuracy", _curves(run_dir, record)),
        ("metrics", "Per-class metrics and confusion matrix", _metrics(run_dir, metrics)),
    ]
    if metrics and len(metrics.get("class_names") or []) == 2:
        sections.append(("roc", "ROC curve", _roc(run_dir, metrics)))
    sections += [
        ("mistakes", "Worst mistakes", _mistakes(predictions, source=source, metrics=metrics)),
        ("confused", "Most confused classes", _confused(metrics, predictions, source=source)),
        ("verification", "Export and verification", verification_section(run_dir)),
    ]
    subtitle = (
        f"{esc(strategy)} on {esc(source)} · {esc(record.get('created', ''))} · "
        f"status {esc(record.get('status', '?'))} · {esc(run_dir)}"
    )
    return page(
        title=f"{model} → {Path(str(source)).name or source}",
        subtitle=subtitle,
        cards=_headline(record, metrics, predictions, export=read_json(run_dir / EXPORT_RECORD)),
        sections=sections,
    )


def _headline(
    record: dict[str, Any],
    metrics: dict[str, Any] | None,
    predictions: list[ImagePrediction] | None,
    *,
    export: dict[str, Any] | None,
) -> str:
    items = []
    if metrics:
        split = metrics.get("split", "test")
        items += [
            (percent(metrics.get("accuracy")), f"{split} accuracy"),
            (fmt(metrics.get("macro_f1"), digits=3), "macro F1"),
            (str(metrics.get("num_images", "–")), f"{split} images"),
        ]
    if predictions is not None:
        items.append((str(sum(not p.correct for p in predictions)), "mistakes"))
    items += [
        (str(record.get("num_classes", "–")), "classes"),
        (str(record.get("strategy", "–")), "strategy"),
        (f"{record['seconds']:.0f} s" if record.get("seconds") is not None else "–", "time"),
    ]
    if export is None:
        items.append(("–", "not exported yet"))
    else:
        passed = bool((export.get("verify") or {}).get("passed"))
        items.append(("verified" if passed else "unverified", "ONNX export"))
    return cards(items)


def _model_and_data(run_dir: Path, record: dict[str, Any]) -> str:
    source = record.get("source") or {}
    data = record.get("data") or {}
    preprocess = record.get("preprocess") or {}
    model = key_values(
        {
            "model": source.get("name"),
            "file": source.get("path"),
            "sha256": source.get("sha256"),
            "from": source.get("url"),
            "input": f"{preprocess.get('crop', '?')} px, {preprocess.get('layout', '?')}, "
            f"mean {preprocess.get('mean')}, std {preprocess.get('std')}",
        }
    )
    class_names = record.get("class_names") or []
    counts = _class_counts(run_dir, len(class_names))
    sizes = table(
        ["split", "images"],
        [(name, data.get(name)) for name in ("train", "val", "test", "skipped")],
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
        f"{model}<h3>Data: {esc(data.get('source', '?'))}</h3>{sizes}",
        f"<h3>{len(class_names)} classes</h3>{per_class}",
    )


def _class_counts(run_dir: Path, num_classes: int) -> dict[str, list[int]] | None:
    """Images per class and split, from split.json (None when it is missing or does not fit)."""
    split = read_json(run_dir / runs.SPLIT_FILE) or {}
    if len(split.get("class_names") or []) != num_classes:
        return None
    counts = {part: [0] * num_classes for part in ("train", "val", "test")}
    for part, per_class in counts.items():
        for _, label in split.get(part) or []:
            if 0 <= label < num_classes:
                per_class[label] += 1
    return counts


def _strategy(record: dict[str, Any]) -> str:
    options = record.get("options") or {}
    hyper = dict(record.get("hyperparameters") or {})
    head = record.get("head") or {}
    facts = {
        "strategy": record.get("strategy"),
        "why": record.get("strategy_reason"),
        "unfrozen blocks": record.get("unfreeze"),
        "training path": record.get("fast_path"),
        "augmentation": record.get("augment"),
        "device": record.get("device"),
        "epochs run": record.get("epochs_run"),
        "best epoch": record.get("best_epoch"),
        "stopped": record.get("stopped"),
        "time": f"{record['seconds']:.1f} s" if record.get("seconds") is not None else None,
        "started": record.get("created"),
        "train images per class (cap)": options.get("train_per_class"),
        "head": f"hidden {head.get('hidden') or 'none'}, dropout {head.get('dropout', 0)}",
    }
    body = columns(
        key_values({k: v for k, v in facts.items() if v is not None}),
        "<h3>Hyperparameters</h3>" + key_values(hyper),
    )
    head_fit = record.get("head_fit")
    if head_fit:
        body += f'<p class="note">The head was solved on cached features, not trained by epochs: {esc(head_fit.get("summary") or head_fit.get("method"))}</p>'
    auto = record.get("auto")
    if auto:
        body += "<h3>What <code>--strategy auto</code> measured</h3>" + key_values(auto)
    versions = record.get("versions") or {}
    if versions:
        body += "<details><summary>Versions</summary>" + key_values(versions) + "</details>"
    return body


def _curves(run_dir: Path, record: dict[str, Any]) -> str:
    image = embedded_png(run_dir / "curves.png", alt="loss and accuracy per epoch")
    if image is None:
        return warning("No curves.png: the run recorded no epoch.")
    note = ""
    if record.get("head_fit"):
        note = '<p class="muted">For a solved head an "epoch" is one pass of the solver over the cached features.</p>'
    return image + note


def _metrics(run_dir: Path, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return warning("No metrics.json: the run has not finished its final evaluation.")
    split = metrics.get("split", "test")
    body = ""
    if split == "val":
        body += warning(
            "The data has no test split: these figures are on the validation images, which also "
            "chose the best epoch, so they flatter the model. Add a test/ folder for an unbiased figure."
        )
    body += key_values(
        {
            f"{split} images": metrics.get("num_images"),
            "accuracy": metrics.get("accuracy"),
            "macro precision": metrics.get("macro_precision"),
            "macro recall": metrics.get("macro_recall"),
            "macro F1": metrics.get("macro_f1"),
        }
    )
    rows = []
    for name in metrics.get("class_names") or []:
        figures = (metrics.get("per_class") or {}).get(name) or {}
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
    confusion = embedded_png(run_dir / "confusion.png", alt="confusion matrix")
    return columns(body, confusion or warning("No confusion.png in the run."))


def _roc(run_dir: Path, metrics: dict[str, Any]) -> str:
    image = embedded_png(run_dir / "roc.png", alt="ROC curve")
    auc = metrics.get("roc_auc")
    caption = f"<p>Area under the curve: <b>{fmt(auc, digits=3)}</b> (positive class {esc(metrics['class_names'][1])}).</p>"
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
    predictions: list[ImagePrediction] | None, *, source: str, metrics: dict[str, Any] | None
) -> str:
    if predictions is None:
        return warning(
            f"No {PREDICTIONS_FILE}: this run predates per-image predictions; run `zoo adapt` again to see them."
        )
    split = (metrics or {}).get("split", "test")
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
    metrics: dict[str, Any], limit: int = CONFUSED_PAIRS
) -> list[tuple[str, str, int, float]]:
    """(true class, predicted class, count, share of the true class's images), most frequent first."""
    names = metrics.get("class_names") or []
    matrix = metrics.get("confusion") or []
    pairs = []
    for row, counts in enumerate(matrix):
        total = sum(counts)
        for col, count in enumerate(counts):
            if row != col and count:
                pairs.append((names[row], names[col], int(count), count / total))
    return sorted(pairs, key=lambda p: (-p[2], -p[3], p[0], p[1]))[:limit]


def _confused(
    metrics: dict[str, Any] | None, predictions: list[ImagePrediction] | None, *, source: str
) -> str:
    if not metrics:
        return warning("No metrics.json.")
    pairs = confused_pairs(metrics)
    if not pairs:
        return f"<p>No confusion: every {esc(metrics.get('split', 'test'))} image is classified correctly.</p>"
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
