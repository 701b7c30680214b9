"""Static INT8 quantisation of an exported fp32 file, calibrated on the user's training images.

An INT8 model cannot match fp32 to 1e-4, so it is judged differently: by how much test accuracy
it loses (at most one point by default) and how often its top-1 agrees with the fp32 file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.convert.probe import probe
from pipeline.core.sessions import create_session
from pipeline.core.trust import OOD_OUTPUT
from pipeline.export.runtimes import logits_of, run_session
from pipeline.export.verify import VerifyInputs
from zoo.errors import DataError, UnsupportedModel
from zoo.onnxfile import load_onnx

if TYPE_CHECKING:
    import onnx

CALIBRATION_BATCH = 16  # images per calibration step; min/max statistics do not depend on it
MAX_ACCURACY_DROP = 1.0  # percentage points an INT8 file may lose against its fp32 source


@dataclass
class QuantizeResult:
    """The INT8 file written and how it compares in size with its fp32 source."""

    path: Path
    size: int  # bytes
    fp32_size: int  # bytes

    @property
    def ratio(self) -> float:
        return self.size / self.fp32_size


@dataclass
class Int8Report:
    """INT8 against fp32 on the same labelled inputs."""

    n_inputs: int
    top1_agreement: float  # fraction of inputs with the same argmax
    accuracy_fp32: float | None  # on labelled images, percent
    accuracy_int8: float | None
    max_drop: float  # allowed drop, percentage points

    @property
    def drop(self) -> float | None:
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_fp32 - self.accuracy_int8

    @property
    def passed(self) -> bool:
        drop = self.drop
        if drop is None:  # no labels: the same one point, as disagreement with fp32 on top-1
            return 100.0 * (1.0 - self.top1_agreement) <= self.max_drop
        return drop <= self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "drop": self.drop, "passed": self.passed}


def default_int8_path(fp32_path: str | os.PathLike[str]) -> Path:
    """`model.onnx` -> `model.int8.onnx` in the same folder."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix or '.onnx'}")


def _calibration_reader(calibration: np.ndarray, input_name: str) -> Any:
    """A CalibrationDataReader that feeds the images to onnxruntime in small batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = (
                {input_name: calibration[start : start + CALIBRATION_BATCH]}
                for start in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return Reader()


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    calibration: np.ndarray,
    input_name: str,
    per_channel: bool = True,
) -> QuantizeResult:
    """Write a static INT8 (QDQ) copy of `fp32_path`, calibrated on preprocessed training images."""
    source = Path(fp32_path)
    out = Path(out_path) if out_path is not None else default_int8_path(source)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if len(calibration) == 0:
        raise DataError(
            "no calibration images for INT8 quantisation; give the training split at least one image"
        )
    fp32 = load_onnx(source)  # refuses non-models and external data outside the folder
    work = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    work.mkdir(parents=True)
    try:
        prepared = _prepare(source, work / "prepared.onnx")
        reader = _calibration_reader(calibration, input_name)
        staged = work / out.name
        _quantize_static(prepared, staged, reader, per_channel=per_channel)
        _describe_like(staged, fp32)
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(path=out, size=out.stat().st_size, fp32_size=source.stat().st_size)


def _prepare(source: Path, prepared: Path) -> Path:
    """Copy `source` to `prepared`, shape-inferred and optimised where onnxruntime manages to."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # Shape inference and graph optimisation first, as onnxruntime recommends for QDQ.
        quant_pre_process(str(source), str(prepared))
    except Exception:  # optional: quantising the plain graph still works
        shutil.copyfile(source, prepared)
    return prepared


def _float_nodes(prepared: Path) -> list[str]:
    """The nodes quantisation must leave in float: every Softmax and the classifier head."""
    import onnx

    # Probabilities stay float: a quantised Softmax output no longer sums to 1. So does the
    # classifier: its input features are quantised with one scale for all of them, and a head
    # solved on standardised features gives the low-variance ones the largest weights (the
    # bundled Lite0's feature head on digits: 74% INT8 against 94% fp32, 93% with it float).
    prepared_model = onnx.load(str(prepared))
    softmax = [n.name for n in prepared_model.graph.node if n.op_type == "Softmax"]
    return softmax + _head_nodes(prepared_model) + _score_only_nodes(prepared_model)


def _score_only_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes that compute the unknown score (pipeline.train.trust) and nothing else: float,
    because its threshold was chosen on the float score, in units that one int8 scale would blur."""
    producer = {value: node for node in model.graph.node for value in node.output}

    def ancestors(value: str) -> set[str]:
        found: set[str] = set()
        stack = [value]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in found:
                found.add(node.name)
                stack.extend(node.input)
        return found

    outputs = [o.name for o in model.graph.output]
    if OOD_OUTPUT not in outputs:
        return []
    shared = set().union(*(ancestors(o) for o in outputs if o != OOD_OUTPUT))
    return sorted(ancestors(OOD_OUTPUT) - shared)


def _quantize_static(prepared: Path, staged: Path, reader: Any, *, per_channel: bool) -> None:
    """Quantise `prepared` into `staged` as QDQ; UnsupportedModel when onnxruntime cannot."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    keep_float = _float_nodes(prepared)
    try:
        quantize_static(
            str(prepared),
            str(staged),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # U8S8: unsigned activations, signed weights, the pair x86 VNNI multiplies natively.
            # Measured on this AMD EPYC (efficientnet-lite0, 224 px, onnxruntime 1.31): batch 1
            # 2.1 ms against 5.5 ms for S8S8 and 4.7 ms for fp32; S8S8 was slower than fp32.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_float,
        )
    except Exception as exc:
        raise UnsupportedModel(
            f"INT8 quantisation failed ({type(exc).__name__}: {str(exc)[:300]}); use the fp32 file"
        ) from exc


def _describe_like(staged: Path, fp32: onnx.ModelProto) -> None:
    """Give the INT8 file its source's zoo.* metadata and producer, marked as quantised; check it."""
    import onnx

    # quantize_static drops the zoo.* metadata; the INT8 file must describe itself too.
    quantized = onnx.load(str(staged))
    del quantized.metadata_props[:]
    for prop in fp32.metadata_props:
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="zoo.quantization", value="int8-static-qdq")
    quantized.producer_name = fp32.producer_name or "zoo"
    quantized.producer_version = fp32.producer_version
    quantized.doc_string = fp32.doc_string
    onnx.save(quantized, str(staged))
    onnx.checker.check_model(str(staged))


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """The classifier's last layer (pipeline.convert.probe finds it), or nothing when no head is found."""
    try:
        return list(probe(model).head_nodes)
    except UnsupportedModel:
        return []


def _logits(path: Path, batch: np.ndarray) -> np.ndarray:
    return logits_of(run_session(create_session(path, "CPUExecutionProvider"), batch))


def compare_int8(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    inputs: VerifyInputs,
    *,
    max_drop: float = MAX_ACCURACY_DROP,
) -> Int8Report:
    """Accuracy of both files on the labelled images and their top-1 agreement on all inputs."""
    batch = inputs.all_inputs
    fp32_logits = _logits(Path(fp32_path), batch)
    int8_logits = _logits(Path(int8_path), batch)
    acc_fp32 = acc_int8 = None
    if inputs.labels is not None and inputs.n_images:
        n = inputs.n_images
        acc_fp32 = 100.0 * float(np.mean(fp32_logits[:n].argmax(1) == inputs.labels))
        acc_int8 = 100.0 * float(np.mean(int8_logits[:n].argmax(1) == inputs.labels))
    return Int8Report(
        n_inputs=len(batch),
        top1_agreement=float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1))),
        accuracy_fp32=acc_fp32,
        accuracy_int8=acc_int8,
        max_drop=max_drop,
    )
