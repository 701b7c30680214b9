"""What a run measured, as its files hold it: metrics.json, history.csv and predictions.csv.

The records and their file formats live in the base layer so that a run directory can be read
back (pipeline.core.rundir) without the stages that wrote it: training fills the history,
the report stage computes the metrics and the per-image predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import atomic_write

# The split that metrics are measured on: "test" when the data has one; "val" for train/ + val/
# folders without test/ (the same images chose the best epoch, so the figures flatter the model);
# "all" for `zoo evaluate`, which uses every image of a source.
METRIC_SPLITS = ("test", "val", "all")


@dataclass(frozen=True)
class Metrics:
    """Figures on one split (see METRIC_SPLITS), as written to metrics.json."""

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    num_images: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    class_names: list[str]
    roc_auc: float | None = None  # binary tasks only
    split: str = "test"  # which images: one of METRIC_SPLITS
    # `zoo evaluate` of a file with an unknown score (zoo.ood), unless --no-reject: the images
    # past its threshold, and the accuracy on the others. The figures above count every image.
    unknown: int | None = None
    kept_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Metrics:
        """The figures `to_dict` wrote; other keys of metrics.json (`zoo adapt`'s extras) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class EpochRecord:
    """One row of history.csv."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: str  # the learning rate of each parameter group, lowest block first, ';'-joined
    trainable_params: int
    batch_size: int
    seconds: float


@dataclass(frozen=True)
class ImagePrediction:
    """One held-out image as the final model saw it (a row of predictions.csv)."""

    image: str  # path relative to the data source; absolute when outside it; or "builtin:<set>#<i>"
    label: str  # the true class name
    predicted: str  # the predicted class name
    confidence: float  # softmax probability of the predicted class
    loss: float  # cross-entropy of the true class: -log p(label)

    @property
    def correct(self) -> bool:
        return self.label == self.predicted


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def read_metrics(path: Path) -> Metrics:
    """metrics.json as `Metrics`; ZooError when it is damaged."""
    try:
        return Metrics.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ZooError(f"{path} is damaged ({exc}); re-run `zoo adapt`") from exc


def write_history(path: Path, history: Sequence[EpochRecord]) -> None:
    """history.csv: one row per epoch."""
    buffer = io.StringIO()
    fields = list(asdict(history[0]).keys()) if history else ["epoch"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for epoch in history:
        writer.writerow(asdict(epoch))
    _write_text(path, buffer.getvalue())


def read_history(path: Path) -> list[EpochRecord]:
    """The rows of a history.csv (written by `write_history`); ZooError when it is damaged."""
    kinds = {"int": int, "float": float, "str": str}
    types = {f.name: kinds.get(str(f.type), str) for f in dataclasses.fields(EpochRecord)}
    try:
        with open(path, newline="", encoding="utf-8") as rows:
            return [
                EpochRecord(**{name: kind(row[name]) for name, kind in types.items()})
                for row in csv.DictReader(rows)
            ]
    except (KeyError, ValueError, TypeError) as exc:
        raise ZooError(f"{path} is damaged ({exc}); re-run `zoo adapt`") from exc


def write_predictions(path: Path, predictions: Sequence[ImagePrediction]) -> None:
    """predictions.csv, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f.name for f in dataclasses.fields(ImagePrediction)])
    for prediction in predictions:
        image, label, predicted, confidence, loss = astuple(prediction)
        writer.writerow([image, label, predicted, f"{confidence:.6f}", f"{loss:.6f}"])
    _write_text(path, buffer.getvalue())


def read_predictions(path: Path) -> list[ImagePrediction]:
    """The records of a predictions.csv (written by `write_predictions`)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [
                ImagePrediction(
                    image=row["image"],
                    label=row["label"],
                    predicted=row["predicted"],
                    confidence=float(row["confidence"]),
                    loss=float(row["loss"]),
                )
                for row in csv.DictReader(handle)
            ]
    except (KeyError, ValueError, TypeError) as exc:
        raise ZooError(f"{path} is damaged ({exc}); re-run `zoo adapt`") from exc
