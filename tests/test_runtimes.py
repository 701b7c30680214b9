"""Running files: onnxruntime sessions, and OpenCV DNN as the second runtime, through the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_verify import export_plain, image_inputs, mobilenet

from pipeline.core.sessions import create_session
from pipeline.export.runtimes import (
    RuntimeReport,
    check_runtime_opencv,
    describe_cv2_error,
    register_runtime,
    run_session,
    runtime_check,
)
from pipeline.export.verify import VerifyInputs
from zoo.errors import InvalidModelFile, NotFound


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = mobilenet()
    return model, export_plain(model, tmp_path_factory.mktemp("runtimes") / "model.onnx")


# --- onnxruntime sessions ------------------------------------------------------------------------


def test_run_session_gives_batch1_and_batchN_outputs(
    exported: tuple[torch.nn.Module, Path],
) -> None:
    _, path = exported
    batch = image_inputs().all_inputs
    outputs = run_session(create_session(path, "CPUExecutionProvider"), batch)
    assert outputs["logits@batchN"].shape[0] == len(batch)
    assert outputs["logits@batch1"].shape[0] == 4  # the first few, one by one
    np.testing.assert_allclose(outputs["logits@batch1"], outputs["logits@batchN"][:4], atol=1e-4)


def test_create_session_errors(tmp_path: Path, exported: tuple[torch.nn.Module, Path]) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InvalidModelFile, match="re-export it with zoo export"):
        create_session(broken, "CPUExecutionProvider")
    with pytest.raises(NotFound, match="use CPUExecutionProvider"):
        create_session(exported[1], "NoSuchExecutionProvider")


# --- OpenCV, the second runtime ----------------------------------------------------------------


def test_opencv_loads_and_agrees(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    report = check_runtime_opencv(path, image_inputs())
    assert report.loaded and report.error is None, report
    assert report.top1_agreement == 1.0 and report.n_inputs == 8 and report.passed
    assert report.max_abs is not None and report.max_abs < 1e-3


def _bernoulli_model(path: Path) -> Path:
    """A valid graph with an op that onnxruntime runs and OpenCV has no layer for."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Bernoulli", ["input"], ["logits"], name="coin_flip")
    graph = helper.make_graph([node], "coin", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_opencv_names_the_rejected_op(tmp_path: Path) -> None:
    path = _bernoulli_model(tmp_path / "coin.onnx")
    report = check_runtime_opencv(path, VerifyInputs(random=np.full((1, 4), 0.5, np.float32)))
    assert not report.loaded and not report.passed
    assert (
        report.rejected is not None
        and "Bernoulli" in report.rejected
        and "coin_flip" in report.rejected
    )


def test_describe_cv2_error() -> None:
    old = 'error: (-2:Unspecified error) Can\'t create layer "onnx_node!head" of type "Einsum" in function'
    assert describe_cv2_error(old) == "Einsum (onnx_node!head)"
    assert (
        describe_cv2_error("Node [Gelu@ai.onnx]:(onnx_node!/act/Gelu) parse error")
        == "Gelu (onnx_node!/act/Gelu)"
    )
    assert describe_cv2_error("(-215:Assertion failed) tensor.has_shape()") is None


def test_describe_cv2_error_of_opencv_5_1_lists_ops_and_names_their_nodes() -> None:
    """OpenCV 5.1 names op types only, one per line, when the net is first used."""
    raw = (
        "OpenCV(5.1.0) net_impl.cpp:1588: error: (-2:Unspecified error) in function 'setInput'\n"
        "> DNN/ONNX: the model 'm.onnx' cannot be loaded by the DNN engine. Unsupported "
        "operations:\n> \tBernoulli\n> \tEinsum\n> "
    )
    message = " ".join(raw.split())  # as check_runtime_opencv reads it
    nodes = {"Bernoulli": ["coin_flip"], "Einsum": ["e1", "e2", "e3", "e4"]}
    assert (
        describe_cv2_error(message, lambda op: nodes[op])
        == "Bernoulli (coin_flip), Einsum (e1, e2, e3, …)"
    )
    assert describe_cv2_error(message) == "Bernoulli, Einsum"


def test_runtime_registry() -> None:
    assert runtime_check("opencv") is check_runtime_opencv
    with pytest.raises(NotFound, match="choose from ort, opencv"):
        runtime_check("coreml")
    with pytest.raises(ValueError, match="already registered"):
        register_runtime("opencv")(lambda path, inputs: RuntimeReport("x", False))
