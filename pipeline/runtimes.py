"""Running an ONNX file: onnxruntime sessions that really run where asked, and other runtimes.

`create_session`/`run_session` are what the oracle in `pipeline.verify`, quantization and
benchmarks use to run a file; `RUNTIME_CHECKS` is a registry of second runtimes (OpenCV DNN) that
`zoo verify --runtimes ort,opencv` checks against onnxruntime, so deployment targets can grow.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.registry import Registry
from zoo.errors import InvalidModelFile, NotFound

BATCH1_COUNT = 4  # the first few inputs also run one by one, to catch batch-dependent graphs
CHUNK = 64  # the largest batch handed to either engine at once, to bound memory


@dataclass
class VerifyInputs:
    """What both engines see: preprocessed test images (with labels if known) plus random tensors."""

    images: np.ndarray | None = None  # float32 [N, ...] in the model's layout, already preprocessed
    labels: np.ndarray | None = None  # int [N] class indices of `images`, or None
    random: np.ndarray | None = None  # float32 [R, ...] random tensors of the same shape

    @classmethod
    def from_arrays(
        cls, images: Any, labels: Any = None, *, n_random: int = 2, seed: int = 0
    ) -> VerifyInputs:
        """Wrap preprocessed images (numpy or torch), adding `n_random` standard-normal tensors."""
        image_array = _as_float32(images)
        label_array = None if labels is None else np.asarray(_to_numpy(labels)).astype(np.int64)
        if label_array is not None and len(label_array) != len(image_array):
            raise ValueError(f"{len(label_array)} labels for {len(image_array)} images")
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((n_random, *image_array.shape[1:])).astype(np.float32)
        return cls(images=image_array, labels=label_array, random=noise if n_random else None)

    @classmethod
    def random_only(cls, shape: Sequence[int], *, count: int = 4, seed: int = 0) -> VerifyInputs:
        """Only random tensors of one input `shape` (without batch): for when no images are at hand."""
        rng = np.random.default_rng(seed)
        return cls(random=rng.standard_normal((count, *shape)).astype(np.float32))

    @property
    def all_inputs(self) -> np.ndarray:
        parts = [a for a in (self.images, self.random) if a is not None and len(a)]
        if not parts:
            raise ValueError("VerifyInputs holds no inputs")
        return np.concatenate(parts).astype(np.float32, copy=False)

    @property
    def n_images(self) -> int:
        return 0 if self.images is None else len(self.images)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _as_float32(value: Any) -> np.ndarray:
    return np.ascontiguousarray(_to_numpy(value), dtype=np.float32)


def create_session(onnx_path: str | Path, provider: str) -> Any:
    """An onnxruntime session that really runs on `provider`; NotFound says why not.

    A file that even the CPU provider cannot load raises InvalidModelFile instead. A file older than
    opset 7 runs as its upgraded copy (zoo.legacy), as everywhere else.
    """
    import onnxruntime as ort

    from zoo.onnxfile import runnable_source

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
    import ctypes

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


def run_session(session: Any, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of `session` by name, at batch 1 for the first few inputs and batch N for all."""
    input_name = session.get_inputs()[0].name
    inputs = as_input_type(inputs, session_input_type(session))  # a uint8/float64 input included
    names = [o.name for o in session.get_outputs()]
    # A file with a fixed batch (most zoo originals: 1) takes its inputs that many at a time.
    chunk = fixed_batch(session) or CHUNK
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(inputs), chunk):
        chunks.append(run_fixed(session, names, {input_name: inputs[start : start + chunk]}))
    batched = {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}
    singles = [
        run_fixed(session, names, {input_name: inputs[i : i + 1]})
        for i in range(min(BATCH1_COUNT, len(inputs)))
    ]
    single = {name: np.concatenate([s[i] for s in singles]) for i, name in enumerate(names)}
    return {
        **{f"{k}@batchN": v for k, v in batched.items()},
        **{f"{k}@batch1": v for k, v in single.items()},
    }


def logits_of(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The batch-N logits [N, C] from `run_session` outputs (a file without `logits`: its first output)."""
    logits = outputs.get("logits@batchN")
    if logits is None:
        logits = next(v for k, v in outputs.items() if k.endswith("@batchN"))
    return logits.reshape(len(logits), -1)


# --- other runtimes: a registry, so `zoo verify --runtimes ort,opencv` can grow ----------------


@dataclass
class RuntimeReport:
    """Whether another runtime loads the file and agrees with onnxruntime on top-1."""

    runtime: str
    loaded: bool
    n_inputs: int = 0
    top1_agreement: float | None = None
    max_abs: float | None = None  # of its logits against onnxruntime's
    error: str | None = None  # why it failed to load or run
    rejected: str | None = None  # the op or layer it refused, when its message names one

    @property
    def passed(self) -> bool:
        return self.loaded and self.error is None and self.top1_agreement == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


RuntimeCheck = Callable[[Path, VerifyInputs], RuntimeReport]
# onnxruntime itself is the reference every check compares with, not an entry of the registry.
RUNTIME_CHECKS: Registry[RuntimeCheck] = Registry("runtime check", also=("ort",))


def register_runtime(name: str) -> Callable[[RuntimeCheck], RuntimeCheck]:
    """Register a second-runtime check under `name`; duplicates are refused."""
    return RUNTIME_CHECKS.decorator(name)


def runtime_check(name: str) -> RuntimeCheck:
    """The check registered under `name`; NotFound lists the known ones."""
    return RUNTIME_CHECKS.lookup(name)


_CV2_PATTERNS = (
    re.compile(r"Node \[([\w.]+)@[^\]]*\]:\(([^)]*)\)"),  # Node [Op@ai.onnx]:(onnx_node!name)
    re.compile(r'Can\'t create layer "([^"]+)" of type "([^"]+)"'),
    re.compile(r"[Uu]nsupported (?:operation|layer|op)(?: type)?[:\s]+['\"]?([\w.]+)"),
)
# OpenCV 5.1 lists every op type it has no layer for, one per line ("> \tBernoulli"), no node names.
_CV2_UNSUPPORTED_LIST = re.compile(r"Unsupported operations:((?:\s*>\s*[A-Za-z][\w.]*)+)")


def describe_cv2_error(
    message: str, nodes_of: Callable[[str], list[str]] | None = None
) -> str | None:
    """The ops and nodes OpenCV's error message names as rejected, or None.

    Where the message names op types alone (OpenCV 5.1), `nodes_of(op)` names the graph's nodes.
    """
    listed = _CV2_UNSUPPORTED_LIST.search(message)
    if listed:
        described = []
        for op in dict.fromkeys(re.findall(r"[A-Za-z][\w.]*", listed.group(1))):
            nodes = nodes_of(op) if nodes_of else []
            more = ", …" if len(nodes) > 3 else ""
            described.append(f"{op} ({', '.join(nodes[:3])}{more})" if nodes else op)
        return ", ".join(described)
    for pattern in _CV2_PATTERNS:
        match = pattern.search(message)
        if match:
            groups = [g for g in match.groups() if g]
            if pattern is _CV2_PATTERNS[1]:
                groups.reverse()  # type first, like the other patterns
            return " ".join([groups[0], *(f"({g})" for g in groups[1:])])
    return None


def _nodes_by_op(source: str | bytes) -> dict[str, list[str]]:
    """The graph's node names by op type (a node's first output where it has no name)."""
    import onnx

    from zoo.onnxfile import load_onnx

    model = (
        load_onnx(source, load_external_data=False)
        if isinstance(source, str)
        else onnx.load_from_string(source)
    )
    nodes: dict[str, list[str]] = {}
    for node in model.graph.node:
        nodes.setdefault(node.op_type, []).append(node.name or node.output[0])
    return nodes


@register_runtime("opencv")
def check_runtime_opencv(onnx_path: str | Path, inputs: VerifyInputs) -> RuntimeReport:
    """Load the file with cv2.dnn, run it, and compare its top-1 with onnxruntime on the CPU."""
    import cv2

    from zoo.onnxfile import runnable_source

    batch = inputs.all_inputs
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    # OpenCV logs its own parse errors to stderr; the report carries them instead.
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    loaded = False
    source: str | bytes = str(onnx_path)
    try:
        source = runnable_source(
            onnx_path
        )  # an opset-1..6 file is read upgraded, as by onnxruntime
        net = cv2.dnn.readNetFromONNX(
            source if isinstance(source, str) else np.frombuffer(source, dtype=np.uint8)
        )
        loaded = True
        names = list(net.getUnconnectedOutLayersNames())
        net.setInput(batch)
        outs = net.forward(names)
        logits = np.asarray(outs[names.index("logits") if "logits" in names else 0])
    except cv2.error as exc:
        message = " ".join(str(exc).split())
        graph = functools.cache(lambda: _nodes_by_op(source))  # read once, only if ops are listed
        rejected = describe_cv2_error(message, lambda op: graph().get(op, []))
        # OpenCV 5.1 reads any graph and refuses its unsupported ops only when the net is first
        # used: a refused op means the file did not load, whenever OpenCV says so.
        return RuntimeReport(
            "opencv", loaded and rejected is None, error=message[-500:], rejected=rejected
        )
    finally:
        logging.setLogLevel(level)
    session = create_session(onnx_path, "CPUExecutionProvider")
    reference = logits_of(run_session(session, batch))
    logits = logits.reshape(len(batch), -1)
    return RuntimeReport(
        runtime="opencv",
        loaded=True,
        n_inputs=len(batch),
        top1_agreement=float(np.mean(logits.argmax(1) == reference.argmax(1))),
        max_abs=float(np.abs(logits - reference).max()),
    )
