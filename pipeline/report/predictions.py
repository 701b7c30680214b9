"""predictions.csv: what the final evaluation said about each held-out image.

One row per image of the split the metrics were measured on (test, or val without a test split),
in split order: which image (its path relative to the data source, or a built-in ref such as
`builtin:digits#12`), its true and predicted class, the confidence of the prediction and the
image's cross-entropy loss. The report's gallery of worst mistakes is drawn from it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import ZooError
from zoo.files import atomic_write

if TYPE_CHECKING:
    from pipeline.data.split import Sample

PREDICTIONS_FILE = "predictions.csv"


@dataclass(frozen=True)
class ImagePrediction:
    """One held-out image as the final model saw it."""

    image: str  # path relative to the data source; absolute when outside it; or "builtin:<set>#<i>"
    label: str  # the true class name
    predicted: str  # the predicted class name
    confidence: float  # softmax probability of the predicted class
    loss: float  # cross-entropy of the true class: -log p(label)

    @property
    def correct(self) -> bool:
        return self.label == self.predicted


def data_root(source: str) -> Path | None:
    """The folder image refs are relative to: the source folder, or the CSV's folder; None for built-ins."""
    from pipeline.data.images import BUILTIN_PREFIX

    if not source or source.startswith(BUILTIN_PREFIX):
        return None
    path = Path(source)
    return path.parent if path.suffix.lower() == ".csv" else path


def relative_ref(ref: str, root: Path | None) -> str:
    """`ref` relative to the data root when it lies inside it, else unchanged."""
    if root is None or not Path(ref).is_absolute():
        return ref
    try:
        return Path(ref).relative_to(root).as_posix()
    except ValueError:
        return ref


def resolve_ref(image: str, source: str) -> str:
    """The readable ref of a predictions.csv `image` again (inverse of `relative_ref`)."""
    root = data_root(source)
    if root is None or Path(image).is_absolute():
        return image
    return str(root / image)


def image_predictions(
    samples: Sequence[Sample], logits: Any, *, class_names: Sequence[str], source: str
) -> list[ImagePrediction]:
    """Per-image records from the evaluation's logits, which come in `samples`' order."""
    import torch

    scores = torch.as_tensor(logits).float()
    if len(scores) != len(samples):
        raise ValueError(f"{len(scores)} logits for {len(samples)} held-out images")
    if not len(samples):
        return []
    log_probs = torch.log_softmax(scores, dim=1)
    best = log_probs.argmax(1).tolist()
    root = data_root(source)
    return [
        ImagePrediction(
            image=relative_ref(sample.ref, root),
            label=class_names[sample.label],
            predicted=class_names[index],
            confidence=math.exp(float(row[index])),
            loss=-float(row[sample.label]),
        )
        for sample, index, row in zip(samples, best, log_probs, strict=True)
    ]


def write_predictions(path: Path, predictions: Sequence[ImagePrediction]) -> None:
    """predictions.csv, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f.name for f in fields(ImagePrediction)])
    for record in predictions:
        image, label, predicted, confidence, loss = astuple(record)
        writer.writerow([image, label, predicted, f"{confidence:.6f}", f"{loss:.6f}"])
    text = buffer.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


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
