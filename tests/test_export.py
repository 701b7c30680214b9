"""Exporting adapted models: the graph, the metadata, the atomic write, the gate, INT8."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_verify import (
    LABELS,
    NUM_CLASSES,
    SHAPE,
    SIZE,
    converted_mobilenet,
    image_inputs,
    mobilenet,
    resnet,
    tiny_cnn,
)

from pipeline.core.sessions import create_session
from pipeline.export.quantize import Int8Report, compare_int8, default_int8_path, quantize_int8
from pipeline.export.verify import VerifyInputs, verify
from pipeline.export.write import (
    REPORT_NAME,
    ExportResult,
    decode_metadata,
    encode_metadata,
    export_model,
    read_metadata,
)
from zoo.catalog import IMAGENET_PREPROCESS, Preprocess
from zoo.errors import UnsupportedModel, VerificationFailed
from zoo.onnxfile import load_onnx

PREPROCESS = IMAGENET_PREPROCESS.at_size(SIZE)
SOURCE = {"name": "mobilenetv2-12", "url": "https://example.invalid/m.onnx", "sha256": "ab" * 32}
METADATA = {
    "labels": LABELS,
    "preprocess": PREPROCESS,
    "source": SOURCE,
    "strategy": "finetune",
    "metrics": {"accuracy": 0.8, "macro_f1": 0.75},
    "run": "20261122-2300-finetune",
}


def export(model: torch.nn.Module, path: Path, **overrides: object) -> ExportResult:
    kwargs: dict = dict(input_name="input", layout="NCHW", input_shape=SHAPE, metadata=METADATA, verify_inputs=image_inputs())  # fmt: skip
    kwargs.update(overrides)
    return export_model(model, path, **kwargs)


def run_ort(path: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = create_session(path, "CPUExecutionProvider")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: batch}), strict=True))


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "mobilenet_v2": mobilenet,
    "resnet18": resnet,
    "onnx2torch": converted_mobilenet,
}


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("kind", list(MODELS))
def test_export_passes_the_gate(kind: str, opset: int, tmp_path: Path) -> None:
    model = MODELS[kind]()
    model.train()  # a training-mode model must still export in inference form
    result = export(model, tmp_path / "model.onnx", opset=opset)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert result.verified and result.report is not None and result.report.passed, result.report
    assert result.path == tmp_path / "model.onnx" and result.size == result.path.stat().st_size
    assert result.num_classes == NUM_CLASSES and result.opset == opset and result.slimmed
    assert folder_names(tmp_path) == ["model.onnx", REPORT_NAME]  # no temporary left behind
    assert json.loads((tmp_path / REPORT_NAME).read_text())["passed"] is True
    graph = onnx.load(str(result.path))
    assert graph.opset_import[0].version == opset
    assert [o.name for o in graph.graph.output] == ["logits", "probs"]
    assert graph.graph.input[0].name == "input"
    # BatchNorm is folded into the convolutions, as eval mode allows.
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}
    # Dynamic batch: the same file runs at batch 1 and 3, and agrees with torch on both.
    batch = image_inputs(3).images
    assert batch is not None
    outputs = run_ort(result.path, batch)
    assert outputs["logits"].shape == outputs["probs"].shape == (3, NUM_CLASSES)
    assert run_ort(result.path, batch[:1])["logits"].shape == (1, NUM_CLASSES)
    np.testing.assert_allclose(outputs["probs"].sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(outputs["logits"], model(torch.from_numpy(batch)).numpy(), atol=1e-4, rtol=1e-3)  # fmt: skip


@pytest.mark.parametrize("opset", [11, 18])
def test_other_opsets(opset: int, tmp_path: Path) -> None:
    # Opset 11 also checks the gate without test images: it falls back to random tensors.
    inputs = None if opset == 11 else image_inputs()
    result = export(resnet(), tmp_path / "model.onnx", opset=opset, verify_inputs=inputs)
    assert result.report is not None and result.report.passed
    assert onnx.load(str(result.path)).opset_import[0].version == opset
    assert any("random tensors only" in note for note in result.notes) == (inputs is None)


class ToNCHW(torch.nn.Module):
    """A model that takes NHWC input, like EfficientNet-Lite4."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_nhwc_keeps_layout_and_input_name(tmp_path: Path) -> None:
    model = ToNCHW(mobilenet()).eval()
    nhwc = (SIZE, SIZE, 3)
    images = np.random.default_rng(3).standard_normal((4, *nhwc)).astype(np.float32)
    inputs = VerifyInputs.from_arrays(images, labels=[0, 1, 2, 3])
    result = export(model, tmp_path / "model.onnx", input_name="images:0", layout="NHWC",
                    input_shape=nhwc, verify_inputs=inputs,
                    metadata={**METADATA, "preprocess": dataclasses.replace(PREPROCESS, layout="NHWC")})  # fmt: skip
    assert result.report is not None and result.report.passed and not result.notes
    graph_input = onnx.load(str(result.path)).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images:0"
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
    metadata = read_metadata(result.path)
    assert metadata.layout == "NHWC" and metadata.input_name == "images:0"
    assert metadata.preprocess is not None and metadata.preprocess.layout == "NHWC"


def test_metadata_round_trips(tmp_path: Path) -> None:
    result = export(tiny_cnn(), tmp_path / "model.onnx", verify=False)
    metadata = read_metadata(result.path)
    assert metadata.labels == tuple(LABELS)
    assert metadata.preprocess == PREPROCESS
    assert metadata.source == SOURCE and metadata.strategy == "finetune"
    assert metadata.metrics == {"accuracy": 0.8, "macro_f1": 0.75}
    assert metadata.version and metadata.input_name == "input" and metadata.layout == "NCHW"
    assert metadata.extra == {"run": "20261122-2300-finetune"}
    raw = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(raw["zoo.labels"]) == LABELS
    assert Preprocess.from_dict(json.loads(raw["zoo.preprocess"])) == PREPROCESS
    model = onnx.load(str(result.path))
    assert model.producer_name == "zoo" and "zoo.labels" in model.doc_string
    assert json.dumps(metadata.to_dict())  # serialisable for `zoo info --json`


def test_metadata_encoding_keeps_strings() -> None:
    props = encode_metadata({"strategy": "1", "zoo.note": "plain", "count": 3, "skip": None})
    assert props == {"zoo.strategy": "1", "zoo.note": "plain", "zoo.count": "3"}
    decoded = decode_metadata(props)
    assert decoded.strategy == "1" and decoded.extra == {"note": "plain", "count": 3}


def test_verify_false_skips_the_gate(tmp_path: Path) -> None:
    result = export(tiny_cnn(), tmp_path / "model.onnx", verify=False)
    assert not result.verified and result.report is None and result.report_path is None
    assert any("verification skipped" in note for note in result.notes)
    assert folder_names(tmp_path) == ["model.onnx"]


class DiffersInExport(torch.nn.Module):
    """A model whose traced graph differs from its eager forward: exactly what the gate is for."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        if torch.onnx.is_in_onnx_export():
            logits = logits + torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0])
        return logits


def test_failed_gate_leaves_no_file_and_keeps_the_good_one(tmp_path: Path) -> None:
    inner = tiny_cnn()
    good = export(inner, tmp_path / "model.onnx")
    good_bytes = good.path.read_bytes()
    with pytest.raises(VerificationFailed, match="was not written") as caught:
        export(DiffersInExport(inner), tmp_path / "model.onnx")
    assert "exceeds atol" in str(caught.value)
    assert good.path.read_bytes() == good_bytes  # the earlier good file is untouched
    assert folder_names(tmp_path) == ["model.onnx", REPORT_NAME]
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    assert report["passed"] is False and report["written"] is False
    assert report["results"][0]["max_abs"] == pytest.approx(0.5, abs=1e-3)
    # Into an empty folder: nothing that looks finished, only the failing report.
    fresh = tmp_path / "fresh"
    with pytest.raises(VerificationFailed):
        export(DiffersInExport(inner), fresh / "model.onnx")
    assert folder_names(fresh) == [REPORT_NAME]


class BreaksInExport(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this op has no ONNX symbolic")
        return self.inner(x)


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(
        UnsupportedModel, match="torch.onnx.export failed at opset 17.*no ONNX symbolic"
    ):
        export(BreaksInExport(tiny_cnn()), tmp_path / "model.onnx")
    assert folder_names(tmp_path) == []


def test_label_count_must_match(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 labels for a model with 5 outputs"):
        export(
            tiny_cnn(), tmp_path / "model.onnx", metadata={**METADATA, "labels": ["a", "b", "c"]}
        )
    assert folder_names(tmp_path) == []


def test_slim_failure_keeps_the_plain_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxslim

    def broken_slim(*args: object, **kwargs: object) -> None:
        raise RuntimeError("slim broke")

    monkeypatch.setattr(onnxslim, "slim", broken_slim)
    result = export(tiny_cnn(), tmp_path / "model.onnx")
    assert not result.slimmed and any("slim broke" in note for note in result.notes)
    assert result.report is not None and result.report.passed


def test_external_data_beside_the_model(tmp_path: Path) -> None:
    model = tiny_cnn()
    result = export(model, tmp_path / "model.onnx", external_data_threshold_bytes=1000)
    assert result.external_data == tmp_path / "model.onnx.data"
    assert folder_names(tmp_path) == ["model.onnx", "model.onnx.data", REPORT_NAME]
    data_size = result.external_data.stat().st_size
    assert data_size > 10_000 and result.path.stat().st_size < data_size
    assert result.size == result.path.stat().st_size + data_size
    loaded = load_onnx(result.path)  # refuses data outside the folder; this one is beside it
    assert sum(len(t.raw_data) for t in loaded.graph.initializer) > 10_000
    assert read_metadata(result.path).labels == tuple(LABELS)
    assert result.report is not None and result.report.passed
    # The folder moves as a whole: the graph names its data file relative to itself.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (tmp_path / name).rename(moved / name)
    assert verify(
        model, moved / "model.onnx", image_inputs(), providers=["CPUExecutionProvider"]
    ).passed
    # A later export that fits in one file removes the stale data file.
    export(model, moved / "model.onnx")
    assert folder_names(moved) == ["model.onnx", REPORT_NAME]
    assert folder_names(tmp_path) == ["moved", REPORT_NAME]


# --- INT8 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantize_int8(tmp_path: Path) -> None:
    fp32 = export(mobilenet(), tmp_path / "model.onnx", verify=False).path
    calibration = np.random.default_rng(7).standard_normal((24, *SHAPE)).astype(np.float32)
    result = quantize_int8(fp32, calibration=calibration, input_name="input")
    assert result.path == default_int8_path(fp32) == tmp_path / "model.int8.onnx"
    assert result.fp32_size == fp32.stat().st_size and result.size == result.path.stat().st_size
    assert result.ratio <= 0.35, result
    quantized = onnx.load(str(result.path))
    ops = {node.op_type for node in quantized.graph.node}
    assert {
        "QuantizeLinear",
        "DequantizeLinear",
    } <= ops  # static QDQ: activations are quantised too
    int8_weights = [t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(t.dims) for t in int8_weights) > 2_000_000
    # The classifier stays float: its weight is a float initializer, not a DequantizeLinear output.
    floats = {t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    gemms = [n for n in quantized.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 1 and gemms[0].input[1] in floats, gemms
    metadata = read_metadata(result.path)
    assert metadata.labels == tuple(LABELS) and metadata.preprocess == PREPROCESS
    assert metadata.extra.get("quantization") == "int8-static-qdq"
    outputs = run_ort(result.path, calibration[:3])
    assert outputs["logits"].shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(outputs["probs"].sum(1), 1.0, atol=1e-3)
    report = compare_int8(fp32, result.path, image_inputs(12))
    assert (
        report.n_inputs == 14
        and report.accuracy_fp32 is not None
        and report.accuracy_int8 is not None
    )
    assert report.top1_agreement >= 0.5
    assert folder_names(tmp_path) == ["model.int8.onnx", "model.onnx"]


def test_int8_report_judges_accuracy_drop() -> None:
    assert Int8Report(10, 0.5, 80.0, 79.0, max_drop=1.0).passed  # agreement alone does not fail it
    assert not Int8Report(10, 1.0, 80.0, 78.5, max_drop=1.0).passed
    assert Int8Report(10, 1.0, None, None, max_drop=1.0).passed  # unlabelled: top-1 agreement
    assert not Int8Report(10, 0.9, None, None, max_drop=1.0).passed
    assert Int8Report(10, 1.0, 80.0, 79.0, max_drop=1.0).to_dict()["drop"] == pytest.approx(1.0)
