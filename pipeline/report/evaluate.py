"""`zoo evaluate`: an exported (or any) ONNX file's metrics on every image of a data source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.metadata import read_metadata
from pipeline.core.results import Metrics
from pipeline.core.samples import Sample
from pipeline.core.sessions import fixed_batch, ort_session, run_outputs
from pipeline.core.trust import OodRecord
from pipeline.data.images import open_for
from pipeline.data.sources import load_source
from pipeline.export.deploy import labels_and_preprocess
from pipeline.export.embed import embedded_input, image_input
from pipeline.report.metrics import compute_metrics, plot_confusion
from pipeline.train.fastpath import preprocessed_batch
from zoo.catalog import Catalog, Preprocess
from zoo.errors import DataError
from zoo.onnxfile import load_runnable
from zoo.preprocess import PreprocessRequest


def evaluate_file(
    onnx_path: Path,
    data: str,
    *,
    catalog: Catalog,
    plot: Path | None = None,
    seed: int = 0,
    preprocess: PreprocessRequest | None = None,
    reject: bool = True,
) -> Metrics:
    """`zoo evaluate`: metrics of the ONNX file alone on every image of a data source.

    With `reject` and a file that computes an unknown score (zoo.ood), the metrics also count
    the images past its threshold and give the accuracy on the rest.
    """
    onnx_path = Path(onnx_path)
    labels, preprocess, input_name = labels_and_preprocess(onnx_path, catalog, preprocess)
    split = load_source(data, seed=seed)
    samples = split.train + split.val + split.test
    unknown = [name for name in split.class_names if name not in labels]
    if unknown:
        raise DataError(
            f"{data} has classes the model does not know ({', '.join(unknown[:5])}); "
            f"the model's classes are {', '.join(labels[:10])}"
        )
    remap = [labels.index(name) for name in split.class_names]
    session = ort_session(load_runnable(onnx_path))
    first = session.get_inputs()[0]  # with the preprocessing inside, it takes decoded pixels
    embedded = embedded_input(first.name, first.type, list(first.shape))
    # A fixed-batch file (most zoo originals: 1) takes that many; any-size pixels one at a time.
    step = 1 if embedded else fixed_batch(session) or 64
    batches = (
        _batch(samples[i : i + step], preprocess, embedded) for i in range(0, len(samples), step)
    )
    ood = read_metadata(onnx_path).ood if reject else None
    names = [session.get_outputs()[0].name, *_ood_output(session, ood)]
    scores, *ood_scores = run_outputs(session, input_name=input_name, batches=batches, names=names)
    truth = np.array([remap[s.label] for s in samples])
    metrics = compute_metrics(truth, scores.reshape(len(samples), -1), labels, split="all")
    if ood_scores and ood is not None:
        metrics = _with_unknown(
            metrics, scores.reshape(len(samples), -1), truth, ood_scores[0], ood
        )
    if plot is not None:
        plot_confusion(Path(plot), metrics, title=f"{onnx_path.name} on {split.source_name}")
    return metrics


def _batch(samples: list[Sample], preprocess: Preprocess, embedded: bool | None) -> np.ndarray:
    """The images as the file takes them: preprocessed in Python, or pixels (pipeline.export.embed)."""
    if embedded is None:
        return preprocessed_batch(samples, preprocess)
    return np.stack([image_input(open_for(s.ref, preprocess), preprocess, embedded=embedded) for s in samples])  # fmt: skip


def _ood_output(session: Any, ood: OodRecord | None) -> list[str]:
    """[the unknown score's output] when the file computes the score its metadata names."""
    names = {o.name for o in session.get_outputs()}
    return [ood.output] if ood is not None and ood.output in names else []


def _with_unknown(
    metrics: Metrics, scores: np.ndarray, truth: np.ndarray, ood_scores: np.ndarray, ood: OodRecord
) -> Metrics:
    """The metrics with the images past the unknown threshold counted, and the accuracy on the rest."""
    past = ood_scores.reshape(-1) > ood.threshold
    kept = ~past
    correct = scores.argmax(axis=1) == truth
    accuracy = float(correct[kept].mean()) if kept.any() else None
    return dataclasses.replace(metrics, unknown=int(past.sum()), kept_accuracy=accuracy)
