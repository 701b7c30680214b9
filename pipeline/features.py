"""The frozen backbone, run once: onnxruntime on the ONNX graph cut at the feature tensor, cached.

A frozen backbone never needs gradients, and on a CPU onnxruntime runs it several times faster
than PyTorch. With no augmentation its outputs do not change between epochs, so they are computed
once per (model, preprocessing, file list) and kept on disk; training the head then costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx


def cut_at(model: onnx.ModelProto, *, input_name: str, output_name: str) -> onnx.ModelProto:
    """The sub-graph from the model input to `output_name` (the feature tensor)."""
    from onnx.utils import Extractor

    inferred = model
    try:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help for the extractor, not a requirement
        inferred = model
    return Extractor(inferred).extract_model([input_name], [output_name])


def ort_session(model: onnx.ModelProto, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session over an in-memory model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_batches(session: Any, *, input_name: str, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate the first output of `session` over the batches."""
    import numpy as np

    outputs = [
        session.run(None, {input_name: np.ascontiguousarray(b, dtype=np.float32)})[0]
        for b in batches
    ]
    return np.concatenate(outputs) if outputs else np.empty((0,), dtype=np.float32)


def cache_key(
    *, model_sha256: str, feature_name: str, preprocess: dict[str, Any], refs: Sequence[str]
) -> str:
    """What the cached features depend on: the model, the cut, the preprocessing and the images."""
    payload = json.dumps(
        {"model": model_sha256, "cut": feature_name, "pre": preprocess, "refs": list(refs)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_cached(cache_dir: Path, key: str) -> np.ndarray | None:
    import numpy as np

    path = Path(cache_dir) / f"{key}.npy"
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, never trusted
        return None


def store_cached(cache_dir: Path, key: str, features: np.ndarray) -> None:
    import numpy as np

    from pipeline.checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, features, allow_pickle=False)

    atomic_write(Path(cache_dir) / f"{key}.npy", write)


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))
