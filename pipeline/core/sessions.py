"""onnxruntime sessions: made where asked, fed in the element type and batch the file declares.

Every stage that runs an ONNX file goes through these: the frozen-feature cache (train), the export
gate and quantization (export), and prediction. They live in the base layer so that no stage has to
import a later one to run a graph.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from zoo.errors import InvalidModelFile, NotFound
from zoo.onnxfile import runnable_source

if TYPE_CHECKING:
    import onnx

T = TypeVar("T")


def create_session(onnx_path: str | Path, provider: str) -> Any:
    """An onnxruntime session that really runs on `provider`; NotFound says why not.

    A file that even the CPU provider cannot load raises InvalidModelFile instead. A file older than
    opset 7 runs as its upgraded copy (zoo.legacy), as everywhere else.
    """
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise NotFound(f"{provider} is not in this onnxruntime build; use CPUExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a missing CUDA library is reported by us, not as log spam
    # TF32 would round float32 matmuls to 10 mantissa bits and break a 1e-4 tolerance on its own.
    candidates: list[Any] = [(provider, {"use_tf32": "0"}), provider]
    if provider != "CUDAExecutionProvider":
        candidates = [provider]
    last_error: Exception | None = None
    source = runnable_source(onnx_path)
    for candidate in candidates:
        try:
            session = ort.InferenceSession(source, options, providers=[candidate])
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            if provider == "CPUExecutionProvider":
                message = " ".join(str(exc).split())[:300]
                raise InvalidModelFile(
                    f"onnxruntime cannot load {onnx_path} ({message}); re-export it with zoo export"
                ) from exc
            last_error = exc
            continue
        if session.get_providers()[0] == provider:
            return session
        last_error = RuntimeError(f"onnxruntime fell back to {session.get_providers()[0]}")
    raise NotFound(f"{provider} cannot run here ({last_error}); use CPUExecutionProvider")


def _missing_cuda_driver() -> str | None:
    """Why CUDA cannot work here, checked before onnxruntime tries and logs a page of errors."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    return None


def default_providers(onnx_path: str | Path) -> tuple[list[str], dict[str, str]]:
    """CPU always; CUDA too when onnxruntime lists it and a session can really be made on it."""
    import onnxruntime as ort

    skipped: dict[str, str] = {}
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        missing = _missing_cuda_driver()
        if missing:
            skipped["CUDAExecutionProvider"] = missing
            return providers, skipped
        try:
            create_session(onnx_path, "CUDAExecutionProvider")
            providers.append("CUDAExecutionProvider")
        except NotFound as exc:
            skipped["CUDAExecutionProvider"] = str(exc).split(";")[0]
    return providers, skipped


# onnxruntime's names of element types that numpy spells differently.
_ORT_TYPE_NAMES = {"float": "float32", "double": "float64"}


def session_input_type(session: Any) -> str:
    """The numpy name of the element type a session's first input takes, e.g. 'float32', 'uint8'."""
    name = session.get_inputs()[0].type.removeprefix("tensor(").removesuffix(")")
    return _ORT_TYPE_NAMES.get(name, name)


def as_input_type(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` in the element type a file declares for its input; integers are rounded and clipped."""
    target = np.dtype(dtype)
    if target.kind in "iu":
        info = np.iinfo(target)
        return np.clip(np.rint(values), info.min, info.max).astype(target)
    return np.asarray(values).astype(target, copy=False)


def fixed_batch(session: Any) -> int | None:
    """The batch size the graph's input fixes (most zoo originals: 1), or None when it is free."""
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def run_fixed(
    session: Any, names: list[str] | None, feed: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """`session.run`, with a batch shorter than the graph's fixed batch filled up with copies of
    its last input; the outputs of the copies are dropped."""
    ((name, batch),) = feed.items()
    size = fixed_batch(session)
    if size is None or len(batch) == size:
        return session.run(names, feed)
    padded = np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])
    return [output[: len(batch)] for output in session.run(names, {name: padded})]


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
    """Concatenate the first output of `session` over the batches, fed in its input's element type."""
    outputs = list(run_each(session, input_name=input_name, batches=batches))
    return np.concatenate(outputs) if outputs else np.empty((0,), dtype=np.float32)


def run_each(
    session: Any, *, input_name: str, batches: Iterable[np.ndarray]
) -> Iterator[np.ndarray]:
    """The first output of `session` for each batch, the next batch prepared meanwhile.

    Preparing a batch (decoding and preprocessing images) runs in one thread beside onnxruntime:
    on phone photos with 2 cores, 8 % less time per photo than one after the other; a DataLoader
    worker process gained nothing there (bench/RECIPE_NOTES.md, "Loading in parallel").
    """
    dtype = session_input_type(session)  # a uint8 or float64 input, as some exports declare
    for batch in prefetched(batches):
        feed = {input_name: np.ascontiguousarray(as_input_type(batch, dtype))}
        yield run_fixed(session, None, feed)[0]  # a short batch for a fixed-batch file is filled


def run_outputs(
    session: Any, *, input_name: str, batches: Iterable[np.ndarray], names: Sequence[str]
) -> list[np.ndarray]:
    """The outputs `names` of `session`, each concatenated over the batches (as `run_batches`)."""
    dtype = session_input_type(session)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for batch in prefetched(batches):
        feed = {input_name: np.ascontiguousarray(as_input_type(batch, dtype))}
        for part, value in zip(parts, run_fixed(session, list(names), feed), strict=True):
            part.append(value)
    return [np.concatenate(p) if p else np.empty((0,), dtype=np.float32) for p in parts]


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """`items`, each computed in a worker thread while the caller works on the one before."""
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoo-prefetch") as pool:
        pending = pool.submit(next, source, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, source, _END)
            yield item  # type: ignore[misc]


_END = object()
