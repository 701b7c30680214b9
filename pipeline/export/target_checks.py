"""`zoo verify FILE.onnx --runtimes openvino,tflite,web`: the deployment targets as runtime checks.

Without a run, each check converts the file with the target's own tool in a temporary folder and
compares the target's runtime with onnxruntime on the same inputs (`RUNTIME_CHECKS`, beside
OpenCV's). With `--run RUN`, `verify_written` checks RUN/deploy/<target>/ as `zoo export` wrote
it, against the run's PyTorch model on its held-out images: the export gate, run again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.metadata import read_metadata
from pipeline.export.deploy_targets import embedded_file, gate_images, run_onnxruntime
from pipeline.export.embed import embedded_input
from pipeline.export.runtimes import RUNTIME_CHECKS, RuntimeCheck, RuntimeReport, VerifyInputs
from pipeline.export.targets import (
    MAX_PROB_DIFF,
    MIN_TOP1_AGREEMENT,
    DeployTarget,
    GateImages,
    TargetInput,
    TargetReport,
    compare_probs,
    load_targets,
    require,
    target_missing,
    target_names,
)
from zoo.catalog import Preprocess
from zoo.errors import UnsupportedModel
from zoo.onnxfile import load_onnx
from zoo.quantized import quantized_ops

if TYPE_CHECKING:
    from pipeline.core.samples import Sample
    from pipeline.export.deploy import LoadedRun

RANDOM_PIXELS = 4  # random images for a file that takes pixels, when no run gives real ones
INT8_MIN_TOP1 = 0.99  # a quantized file in another runtime: the share of inputs with the same top-1


def file_embedded(onnx_path: Path) -> bool | None:
    """None for a file with a float input; for one that takes pixels, whether it takes any size."""
    graph_input = load_onnx(onnx_path, load_external_data=False).graph.input[0]
    tensor = graph_input.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    element = "tensor(uint8)" if tensor.elem_type == 2 else "other"
    return embedded_input(graph_input.name, element, shape)


def pixel_inputs(onnx_path: Path, *, any_size: bool) -> VerifyInputs:
    """Random uint8-valued images of the size the file's preprocessing resizes to (or crops)."""
    pre = _preprocess_of(onnx_path)
    side = max(pre.resize, pre.crop) if any_size else pre.crop
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (RANDOM_PIXELS, side, side, pre.channels))
    return VerifyInputs(random=pixels.astype(np.float32))


def _preprocess_of(onnx_path: Path) -> Preprocess:
    """The file's preprocessing from its metadata, else a neutral one of its input's shape."""
    metadata = read_metadata(onnx_path)
    if metadata.preprocess is not None:
        return metadata.preprocess
    dims = load_onnx(onnx_path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    channels, size = (dims[1].dim_value or 3), (dims[-1].dim_value or 224)
    return Preprocess(mean=(0.0,), std=(1.0,), resize=size, crop=size, channels=channels)


def _source(
    onnx_path: Path, target: DeployTarget, inputs: VerifyInputs, work: Path
) -> tuple[TargetInput, np.ndarray]:
    """What the target converts (the file, or it behind its preprocessing) and what it runs on."""
    metadata = read_metadata(onnx_path)
    pre = _preprocess_of(onnx_path)
    labels = metadata.labels or tuple(str(i) for i in range(2))
    kind = file_embedded(onnx_path)
    if kind is None and not target.embed_by_default:
        name = load_onnx(onnx_path, load_external_data=False).graph.input[0].name
        return TargetInput(onnx_path, pre, labels, name), inputs.all_inputs
    if kind and not target.takes_any_size:
        raise UnsupportedModel(
            f"{target.title} has no antialiased Resize, so this any-size file would give wrong "
            f"answers there; export with --target {target.name}, which embeds the fixed-size graph"
        )
    if kind is None:  # the web page takes pixels: the file behind its preprocessing
        any_size = target.takes_any_size
        onnx_path = embedded_file(onnx_path, pre, any_size=any_size, out=work / "embedded.onnx")
        inputs = pixel_inputs(onnx_path, any_size=any_size)
    batch = np.clip(np.rint(inputs.all_inputs), 0, 255).astype(np.uint8)
    return TargetInput(onnx_path, pre, labels, "pixels", embedded=True), batch


def _agreement(
    name: str, probs: np.ndarray, reference: np.ndarray, *, quantized: bool = False
) -> RuntimeReport:
    """The target's probabilities against onnxruntime's, as a runtime check's report.

    A quantized file is judged as zoo judges INT8 against fp32: each runtime rounds its integer
    kernels its own way, so the answer (top-1, 99%) must agree, not the fourth decimal.
    """
    report = compare_probs(TargetReport(name), reference, probs, [str(i) for i in range(len(probs))])  # fmt: skip
    error = None
    if quantized and report.top1_agreement < INT8_MIN_TOP1:
        error = f"top-1 agreement {report.top1_agreement:.1%} on this INT8 file, under {INT8_MIN_TOP1:.0%}"  # fmt: skip
    elif not quantized and report.max_prob_diff > MAX_PROB_DIFF:
        error = f"probabilities differ by up to {report.max_prob_diff:.2e}, more than {MAX_PROB_DIFF:g}"  # fmt: skip
    return RuntimeReport(name, True, report.images, report.top1_agreement, report.max_prob_diff, error)  # fmt: skip


def target_check(name: str) -> RuntimeCheck:
    """A runtime check that converts the file to target `name` in a temporary folder and runs it."""

    def check(onnx_path: str | Path, inputs: VerifyInputs) -> RuntimeReport:
        target = require(name)
        why = target_missing(name)
        if why is not None:
            return RuntimeReport(name, loaded=False, error=why)
        with tempfile.TemporaryDirectory(prefix=f"zoo-verify-{name}-") as tmp:
            work = Path(tmp)
            (work / "out").mkdir()
            try:
                source, batch = _source(Path(onnx_path), target, inputs, work)
                probs = target.run(target.convert(source, work / "out"), batch)
                reference = run_onnxruntime(source.onnx_path, batch)
            except Exception as exc:  # the converter's or runtime's own error fails this check
                message = " ".join(str(exc).split())[:400]
                return RuntimeReport(name, loaded=False, error=message)
        quantized = bool(quantized_ops(load_onnx(Path(onnx_path))))
        return _agreement(name, probs, reference, quantized=quantized)

    return check


def register_target_checks() -> None:
    """One runtime check per deployment target, beside OpenCV's (idempotent)."""
    for name in target_names():
        if name not in RUNTIME_CHECKS:
            RUNTIME_CHECKS.add(name, target_check(name))


def _as_runtime_report(name: str, report: TargetReport) -> RuntimeReport:
    checked = RuntimeReport(
        name,
        loaded=report.skipped is None,
        n_inputs=report.images,
        top1_agreement=report.top1_agreement,
        max_abs=report.max_prob_diff,
        error=None if report.passed else report.line(),
        min_top1_agreement=MIN_TOP1_AGREEMENT,
    )
    return checked


def check_written(name: str, folder: Path, images: GateImages) -> TargetReport:
    """The export gate again on RUN/deploy/<name>/ as written, against PyTorch."""
    target = require(name)
    report = TargetReport(name, path=str(folder))
    why = target_missing(name)
    main = folder / target.main_file
    if why is not None or not main.is_file():
        report.skipped = why or f"{main} is missing; write it with `zoo export RUN --target {name}`"
        return report
    report.embedded = bool(json.loads((folder / "preprocess.json").read_text()).get("embedded"))
    any_size = report.embedded and target.takes_any_size
    batch = images.inputs(embedded=report.embedded, any_size=any_size)
    try:
        compare_probs(report, images.reference, target.run(main, batch), images.names)
        if any_size:
            probs = np.asarray(target.run(main, images.decoded))
            same = probs.argmax(axis=1) == images.reference.argmax(axis=1)
            report.resize_agreement = float(same.mean())
    except Exception as exc:  # a runtime that cannot run the file fails the check, with why
        report.skipped = " ".join(str(exc).split())[:400]
    return report


def verify_written(
    loaded: LoadedRun,
    onnx_path: Path,
    samples: Sequence[Sample],
    runtimes: Sequence[str],
) -> dict[str, RuntimeReport]:
    """`zoo verify FILE --run RUN --runtimes ...`: each target's folder in RUN/deploy as written,
    and for a FILE that takes pixels, onnxruntime on it ("ort"), each against PyTorch."""
    from pipeline.export.deploy_targets import deploy_dir_of, onnx_figures

    names = [r for r in runtimes if r in load_targets()]
    kind = file_embedded(onnx_path)
    if not names and kind is None:
        return {}
    images = gate_images(loaded.model, loaded.preprocess, samples)
    reports = {n: check_written(n, deploy_dir_of(loaded.run_dir) / n, images) for n in names}
    if kind is not None:
        reports["ort"] = onnx_figures(onnx_path, images, embedded=True, any_size=kind)
    return {name: _as_runtime_report(name, report) for name, report in reports.items()}
