"""The verification oracle: it passes a faithful export and catches a file that differs."""

from __future__ import annotations

import copy
import functools
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

from pipeline.export.verify import VerifyInputs, compare_logits, eval_on_cpu, verify, verify_file
from zoo.catalog import IMAGENET_PREPROCESS
from zoo.errors import InvalidModelFile

SIZE = 64
SHAPE = (3, SIZE, SIZE)
NUM_CLASSES = 5
LABELS = ["ant", "bee", "cat", "dog", "eel"]

# --- shared builders (test_export imports these) ------------------------------------------------


def lively(
    model: torch.nn.Module, shape: tuple[int, ...] = SHAPE, seed: int = 0
) -> torch.nn.Module:
    """Random weights whose logits depend on the input: fit BatchNorm statistics to random data.

    torchvision's initialisation leaves a random mobilenet_v2 with identical ~1e-9 logits for
    every input, which no comparison could tell apart; real statistics fix that.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5)  # logits of order 1-10, so top-1 is not a near tie
    return model.eval()


@functools.cache
def _built(kind: str, seed: int) -> torch.nn.Module:
    # Building and calibrating costs more CPU than exporting; tests get deep copies of one build.
    torch.manual_seed(seed)
    if kind == "converted":
        return _convert(_built("mobilenet_v2", seed))
    factory = getattr(torchvision.models, kind)
    return lively(factory(num_classes=NUM_CLASSES), seed=seed)


def mobilenet(seed: int = 0) -> torch.nn.Module:
    return copy.deepcopy(_built("mobilenet_v2", seed))


def resnet(seed: int = 0) -> torch.nn.Module:
    return copy.deepcopy(_built("resnet18", seed))


def converted_mobilenet(seed: int = 0) -> torch.nn.Module:
    """A mobilenet_v2 taken through ONNX and back with onnx2torch, as the import stage does."""
    return copy.deepcopy(_built("converted", seed))


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """A few-kilobyte CNN with BatchNorm, for tests about files rather than architectures."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, NUM_CLASSES),
    )
    return lively(model, seed=seed)


def _convert(model: torch.nn.Module) -> torch.nn.Module:
    import onnx2torch
    import onnxslim

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (torch.randn(1, *SHAPE),), buffer, input_names=["input"],
                          output_names=["out"], opset_version=13, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}})  # fmt: skip
    # onnxslim removes the Identity/Constant weight sharing that onnx2torch trips over.
    return onnx2torch.convert(onnxslim.slim(onnx.load_from_string(buffer.getvalue()))).eval()


def image_inputs(n: int = 6, *, shape: tuple[int, ...] = SHAPE, seed: int = 1) -> VerifyInputs:
    """Stand-ins for a preprocessed labelled test split, plus two random tensors."""
    images = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    return VerifyInputs.from_arrays(
        images, labels=np.arange(n) % NUM_CLASSES, n_random=2, seed=seed
    )


def export_plain(model: torch.nn.Module, path: Path, *, opset: int = 17) -> Path:
    """An ONNX file with logits+probs outputs but no gate, made by export_model's own graph."""
    from pipeline.export.write import export_model

    export_model(model, path, input_name="input", layout="NCHW", input_shape=SHAPE, opset=opset,
                 metadata={"labels": LABELS, "preprocess": IMAGENET_PREPROCESS.at_size(SIZE)},
                 verify=False)  # fmt: skip
    return path


def perturb_bias(path: Path, *, delta: float = 0.5) -> None:
    """Add `delta` to the first entry of the classifier's bias initializer, in place."""
    model = onnx.load(str(path))
    for index, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.shape == (NUM_CLASSES,):
            values = values.copy()
            values[0] += delta
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
            onnx.save(model, str(path))
            return
    raise AssertionError("no classifier bias found")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = mobilenet()
    return model, export_plain(model, tmp_path_factory.mktemp("verify") / "model.onnx")


# --- the oracle ------------------------------------------------------------------------------


def test_verify_passes_faithful_export(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    inputs = image_inputs()
    report = verify(model, path, inputs)
    assert report.passed, report.render()
    cpu = report.results[0]
    assert cpu.provider == "CPUExecutionProvider"
    assert cpu.n_inputs == 8 and cpu.top1_agreement == 1.0 and cpu.top5_agreement == 1.0
    assert 0 <= cpu.max_abs <= 1e-4 + 1e-3 * 10 and cpu.worst_excess <= 0
    assert cpu.accuracy_onnx == cpu.accuracy_torch is not None
    assert cpu.probs_max_sum_error is not None and cpu.probs_max_sum_error < 1e-5
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["passed"] is True and payload["results"][0]["passed"] is True
    text = report.render()
    assert "CPU" in text and "PASSED" in text


def test_cuda_is_used_or_skipped_with_a_reason(exported: tuple[torch.nn.Module, Path]) -> None:
    import onnxruntime as ort

    model, path = exported
    report = verify(model, path, image_inputs(2))
    ran = [r.provider for r in report.results]
    assert ran[0] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "CUDAExecutionProvider" in ran or report.skipped["CUDAExecutionProvider"]
    forced = verify(model, path, image_inputs(2), providers=["CUDAExecutionProvider"])
    if not forced.results:  # no usable GPU here: nothing ran, so nothing passed
        assert not forced.passed and "CUDAExecutionProvider" in forced.skipped
        assert "not verified" in forced.summary()


def test_perturbed_weight_fails_with_the_difference(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:  # fmt: skip
    model, path = exported
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes())
    perturb_bias(broken, delta=0.5)
    report = verify(model, broken, image_inputs(), providers=["CPUExecutionProvider"])
    assert not report.passed
    cpu = report.results[0]
    assert cpu.max_abs == pytest.approx(0.5, abs=1e-3)
    assert any("exceeds atol" in failure and "class 0" in failure for failure in cpu.failures)
    assert "FAILED" in report.render()


def test_a_tiny_difference_inside_tolerance_passes(exported: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:  # fmt: skip
    model, path = exported
    nudged = tmp_path / "nudged.onnx"
    nudged.write_bytes(path.read_bytes())
    perturb_bias(nudged, delta=5e-5)
    assert verify(model, nudged, image_inputs(), providers=["CPUExecutionProvider"]).passed


def test_a_file_that_cannot_run_fails_the_gate(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    wrong = VerifyInputs.random_only((3, SIZE // 2, SIZE // 2))  # the file takes 64x64, not 32x32
    report = verify(model, path, wrong, providers=["CPUExecutionProvider"])
    assert not report.passed and "onnxruntime failed to run" in report.failures[0]


def _outputs(logits: np.ndarray, probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    outputs = {"logits@batchN": logits, "logits@batch1": logits[:2]}
    if probs is not None:
        outputs["probs@batchN"] = probs
    return outputs


def test_compare_logits_rules() -> None:
    reference = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    softmax = np.exp(reference) / np.exp(reference).sum(1, keepdims=True)
    labels = np.array([0, 1, 0])
    same = compare_logits("cpu", _outputs(reference.copy(), softmax), reference, labels=labels, atol=1e-4, rtol=1e-3)  # fmt: skip
    assert same.passed and same.accuracy_onnx == same.accuracy_torch == pytest.approx(2 / 3)
    # A top-1 flip inside a loose tolerance still fails, and so does the accuracy it changes.
    flipped = reference.copy()
    flipped[2] = [2.1, 0.0, 2.0]
    loose = compare_logits("cpu", _outputs(flipped), reference, labels=labels, atol=1.0, rtol=0.0)
    assert not loose.passed
    assert any("top-1" in f for f in loose.failures) and any(
        "accuracy" in f for f in loose.failures
    )
    bad_probs = compare_logits("cpu", _outputs(reference, softmax * 1.1), reference, labels=None, atol=1e-4, rtol=1e-3)  # fmt: skip
    assert any("probs" in f for f in bad_probs.failures)
    nan = reference.copy()
    nan[0, 0] = np.nan
    assert "non-finite logits" in compare_logits("cpu", _outputs(nan), reference, labels=None, atol=1, rtol=1).failures  # fmt: skip
    wrong_shape = compare_logits("cpu", _outputs(reference[:, :2]), reference, labels=None, atol=1, rtol=1)  # fmt: skip
    assert not wrong_shape.passed and "shape" in wrong_shape.failures[0]


def test_verify_inputs() -> None:
    images = torch.zeros(3, *SHAPE)
    inputs = VerifyInputs.from_arrays(images, labels=torch.tensor([0, 1, 2]), n_random=2)
    assert inputs.all_inputs.shape == (5, *SHAPE) and inputs.all_inputs.dtype == np.float32
    assert inputs.labels is not None and inputs.labels.tolist() == [0, 1, 2]
    assert inputs.all_inputs[3:].std() > 0.5  # the random tensors are not zeros
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        VerifyInputs.from_arrays(images, labels=[0, 1])
    assert VerifyInputs.random_only((1, 4, 4), count=3).all_inputs.shape == (3, 1, 4, 4)


def test_eval_on_cpu_restores_each_module_mode() -> None:
    model = mobilenet()
    model.train()
    model.features.eval()  # a frozen backbone keeps BatchNorm in eval while the head trains
    with eval_on_cpu(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.classifier.training and not model.features[0].training


# --- zoo verify MODEL.onnx ---------------------------------------------------------------------


def test_verify_file_without_torch(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    report = verify_file(path, runtimes=("ort", "opencv"))
    assert report.passed, report.render()
    assert report.torch_report is None and report.runtimes["opencv"].passed
    assert report.metadata.labels == tuple(LABELS)
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True
    assert "opencv: pass" in report.render()


def test_verify_file_with_torch_model(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    report = verify_file(path, torch_model=model, inputs=image_inputs())
    assert report.passed and report.torch_report is not None and report.torch_report.passed
    assert report.runtimes == {}


def test_verify_file_flags_missing_metadata(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "bare", [x], [y])
    path = tmp_path / "bare.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.31 accepts; helper writes the newest
    onnx.save(model, str(path))
    report = verify_file(path)
    assert not report.passed
    assert any("zoo.labels" in p for p in report.problems) and any(
        "zoo.preprocess" in p for p in report.problems
    )


def test_verify_file_takes_the_graphs_shape_and_the_metadatas_where_the_graph_has_none(
    exported: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    from pipeline.export.write import encode_metadata

    _, path = exported
    model = onnx.load(str(path))
    # Metadata that describes 32 px inputs on a 64 px graph is a problem, not a crash.
    del model.metadata_props[:]
    wrong = {"labels": LABELS, "preprocess": IMAGENET_PREPROCESS.at_size(32).to_dict()}
    for key, value in encode_metadata(wrong).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    report = verify_file(tmp_path / "wrong.onnx")
    assert not report.passed
    assert report.problems == [
        f"input shape {SHAPE} does not match the preprocessing's (3, 32, 32)"
    ]
    # A graph without fixed spatial dims is fed inputs of the metadata's shape.
    model = onnx.load(str(path))
    for dim, name in zip(
        model.graph.input[0].type.tensor_type.shape.dim[2:], ("h", "w"), strict=True
    ):
        dim.dim_param = name
    onnx.save(model, str(tmp_path / "dynamic.onnx"))
    report = verify_file(tmp_path / "dynamic.onnx")
    assert report.passed, report.render()


def test_unloadable_file_is_an_invalid_model(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input"], ["logits"])], "odd", [x], [y]
    )
    path = tmp_path / "odd.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    with pytest.raises(InvalidModelFile, match="onnxruntime cannot load"):
        verify_file(path)
