"""`zoo evaluate`: an exported (or any) ONNX file's metrics on every image of a data source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.results import Metrics
from pipeline.core.samples import Sample
from pipeline.core.sessions import fixed_batch, ort_session, run_batches
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
) -> Metrics:
    """`zoo evaluate`: metrics of the ONNX file alone on every image of a data source."""
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
    scores = run_batches(session, input_name=input_name, batches=batches)
    truth = np.array([remap[s.label] for s in samples])
    metrics = compute_metrics(truth, scores.reshape(len(samples), -1), labels, split="all")
    if plot is not None:
        plot_confusion(Path(plot), metrics, title=f"{onnx_path.name} on {split.source_name}")
    return metrics


def _batch(samples: list[Sample], preprocess: Preprocess, embedded: bool | None) -> np.ndarray:
    """The images as the file takes them: preprocessed in Python, or pixels (pipeline.export.embed)."""
    if embedded is None:
        return preprocessed_batch(samples, preprocess)
    return np.stack([image_input(open_for(s.ref, preprocess), preprocess, embedded=embedded) for s in samples])  # fmt: skip
