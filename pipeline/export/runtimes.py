"""Running an ONNX file: onnxruntime sessions that really run where asked, and other runtimes.

`create_session`/`run_session` are what the oracle in `pipeline.export.verify`, quantization and
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

from pipeline.core.registry import Registry
from pipeline.core.sessions import (
    as_input_type,
    create_session,
    fixed_batch,
    run_fixed,
    session_input_type,
)

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
    min_top1_agreement: float = 1.0  # deployment targets: their gate's 99.5%

    @property
    def passed(self) -> bool:
        return (
            self.loaded
            and self.error is None
            and self.top1_agreement is not None
            and self.top1_agreement >= self.min_top1_agreement
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


RuntimeCheck = Callable[[Path, VerifyInputs], RuntimeReport]
# onnxruntime itself is the reference every check compares with, not an entry of the registry.
RUNTIME_CHECKS: Registry[RuntimeCheck] = Registry("runtime check", also=("ort",))


def register_runtime(name: str) -> Callable[[RuntimeCheck], RuntimeCheck]:
    """Register a second-runtime check under `name`; duplicates are refused."""
    return RUNTIME_CHECKS.decorator(name)


def runtime_check(name: str) -> RuntimeCheck:
    """The check registered under `name`; NotFound lists the known ones.

    The deployment targets' checks (openvino, tflite, web) are registered by
    `pipeline.export.target_checks.register_target_checks`, which `zoo verify` calls first.
    """
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
