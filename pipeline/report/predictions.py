"""predictions.csv: what the final evaluation said about each held-out image.

One row per image of the split the metrics were measured on (test, or val without a test split),
in split order: which image (its path relative to the data source, or a built-in ref such as
`builtin:digits#12`), its true and predicted class, the confidence of the prediction and the
image's cross-entropy loss. The report's gallery of worst mistakes is drawn from it. The row
(`ImagePrediction`) and the file's format are pipeline.core.results; this module makes the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.results import ImagePrediction
from pipeline.data.images import BUILTIN_PREFIX

if TYPE_CHECKING:
    from pipeline.core.samples import Sample


def data_root(source: str) -> Path | None:
    """The folder image refs are relative to: the source folder, or the CSV's folder; None for built-ins."""

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
