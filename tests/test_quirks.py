"""Heads and element types as real exports have them, through fetch -> inspect -> adapt -> export -> verify.

Issue 12 (items 4-5): weights computed by constant sub-graphs, heads behind Casts, Transposes and
Softmaxes, NHWC inputs, float16/float64 parts and uint8/float64 inputs. Each quirk is a tiny graph
built here (tests/onnx_builders.py), fetched through a private catalog entry that carries its
preprocessing; the real CNTK file (the zoo's mnist-8) runs when ../shared is present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx_builders import TINY_GRAPHS, save

from cli import main
from pipeline.convert import import_model
from pipeline.convert.normalisation import normalise
from pipeline.convert.probe import probe
from zoo.files import sha256_file

# Preprocessing of each quirk's catalog entry (8 px digits): Caffe BGR 0-255 minus means for the
# NHWC export, ImageNet mean/std, plain [0,1], and 0-255 for the uint8 input.
CAFFE = {"mean": [103.939, 116.779, 123.68], "std": [1, 1, 1], "scale": 1.0, "bgr": True}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 1 / 255}
UNIT = {"mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1 / 255}
PIXELS = {"mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0}
# quirk -> (preprocessing, catalog output kind, element type the export must keep)
QUIRKS = {
    "nhwc_cast_chain": (CAFFE, "probabilities", onnx.TensorProto.FLOAT),
    "softmax_4d_transposed": (IMAGENET, "probabilities-4d", onnx.TensorProto.FLOAT),
    "reshaped_matmul_weight": (UNIT, "logits", onnx.TensorProto.FLOAT),
    "float64_input": (UNIT, "logits", onnx.TensorProto.DOUBLE),
    "uint8_input": (PIXELS, "logits", onnx.TensorProto.UINT8),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zoo(*args: str, models_dir: Path, catalog: Path | None = None) -> tuple[int, str, str]:
    prefix = ["--models-dir", str(models_dir)] + (["--catalog", str(catalog)] if catalog else [])
    result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def catalog_entry(
    name: str, path: Path, preprocess: dict, *, layout: str, output_kind: str
) -> dict:
    """A private catalog entry for a local file: a file:// URL, its sha256 and its preprocessing."""
    size = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    side = (size[1] if layout == "NHWC" else size[2]).dim_value or 8
    return {
        "name": name,
        "urls": [path.resolve().as_uri()],
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "output_kind": output_kind,
        "num_classes": 5,
        "input": {"layout": layout},
        "preprocess": {
            **preprocess,
            "resize": side,
            "resize_mode": "direct",
            "crop": side,
            "layout": layout,
            "channels": 3,
            "confidence": "high",
        },
        "licence": "test",
    }


def source_weight_count(model: onnx.ModelProto) -> int:
    """Elements of the source's float initializers (weights, however they are computed later)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in floats)


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_every_weight_of_a_quirky_graph_trains(quirk: str, tmp_path: Path) -> None:
    build, head_kind, output_kind, layout = TINY_GRAPHS[quirk]
    source = build()
    imported = import_model(save(source, tmp_path / f"{quirk}.onnx"))
    parameters = list(imported.module.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in parameters)
    # BatchNorm's running statistics are buffers, everything else in the file is a weight.
    bn_stats = sum(b.numel() for name, b in imported.module.named_buffers() if "running" in name)
    assert sum(p.numel() for p in parameters) == source_weight_count(source) - bn_stats
    found = imported.probe
    assert (found.head_kind, found.output_kind, found.layout) == (head_kind, output_kind, layout)
    assert found.num_classes == 5 and found.feature_dim == 6
    assert imported.fidelity is not None and imported.fidelity.top1_agreement == 1.0


def test_probe_finds_the_head_behind_casts_transposes_and_softmax() -> None:
    normalised = normalise(TINY_GRAPHS["nhwc_cast_chain"][0]())[0]
    nhwc = probe(normalised)
    assert nhwc.head_nodes == ("/fc/MatMul", "/fc/Add")
    producer = {out: node for node in normalised.graph.node for out in node.output}
    assert producer[nhwc.feature_name].op_type == "Flatten"  # the Casts in between are gone
    assert nhwc.layout == "NHWC" and nhwc.output_kind == "probabilities"
    # Even without normalisation the walk goes through the Casts to the same head.
    raw = probe(TINY_GRAPHS["nhwc_cast_chain"][0]())
    assert (
        raw.head_nodes == ("/fc/MatMul", "/Cast_305", "/fc/Add") and raw.feature_name == "flat_c2"
    )
    four_d = probe(TINY_GRAPHS["softmax_4d_transposed"][0]())
    assert four_d.head_nodes == ("cls/Conv",) and four_d.feature_name == "pooled"
    assert four_d.output_kind == "probabilities" and four_d.output_rank == 4
    cntk = probe(normalise(TINY_GRAPHS["reshaped_matmul_weight"][0]())[0])
    assert cntk.head_nodes == ("Times", "Plus") and cntk.feature_name == "flat"
    assert cntk.output_kind == "logits" and cntk.dynamic_batch


def test_weight_chains_fold_and_trailing_no_ops_are_skipped(tmp_path: Path) -> None:
    """A MatMul weight stored as float64 [1, 5, 6] and computed by Squeeze -> Transpose -> Cast, and
    an output behind Dropout and Identity."""
    from onnx import helper, numpy_helper

    model = TINY_GRAPHS["matmul_add"][0]()
    graph = model.graph
    weight = next(init for init in graph.initializer if init.name == "fc.w")
    stored = numpy_helper.to_array(weight).T[None].astype(np.float64)
    weight.CopyFrom(numpy_helper.from_array(stored, "fc.w_stored"))
    graph.initializer.append(numpy_helper.from_array(np.asarray([0], dtype=np.int64), "axis0"))
    add = next(node for node in graph.node if node.op_type == "Add")
    add.output[0] = "added"
    chain = [
        helper.make_node("Squeeze", ["fc.w_stored", "axis0"], ["w_sq"], name="w/Squeeze"),
        helper.make_node("Transpose", ["w_sq"], ["w_t"], name="w/Transpose", perm=[1, 0]),
        helper.make_node("Cast", ["w_t"], ["fc.w"], name="w/Cast", to=onnx.TensorProto.FLOAT),
    ]
    tail = [
        helper.make_node("Dropout", ["added"], ["dropped"], name="drop/Dropout"),
        helper.make_node("Identity", ["dropped"], ["scores"], name="out/Identity"),
    ]
    nodes = chain + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    normalised = normalise(model)[0]
    assert probe(normalised).head_nodes == ("fc/MatMul", "fc/Add")
    imported = import_model(save(model, tmp_path / "chain.onnx"))
    assert not {"Squeeze", "Transpose", "Cast", "Dropout", "Identity"} & {
        node.op_type for node in imported.onnx_model.graph.node
    }
    bn_stats = sum(b.numel() for name, b in imported.module.named_buffers() if "running" in name)
    trainable = sum(p.numel() for p in imported.module.parameters() if p.requires_grad)
    assert trainable == source_weight_count(model) - bn_stats
    assert imported.probe.head_kind == "matmul_add" and imported.fidelity.top1_agreement == 1.0


def test_log_softmax_output_counts_as_logits() -> None:
    model = TINY_GRAPHS["gemm_softmax"][0]()
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    softmax.op_type = "LogSoftmax"
    assert probe(model).output_kind == "logits"


def test_normalise_folds_computed_weights_and_drops_redundant_casts() -> None:
    normalised, notes = normalise(TINY_GRAPHS["reshaped_matmul_weight"][0]())
    initializers = {init.name: list(init.dims) for init in normalised.graph.initializer}
    assert initializers["fc.w"] == [6, 5] and "fc.w4d" not in initializers
    assert not any(node.op_type == "Reshape" and node.input[0] == "fc.w4d" for node in normalised.graph.node)  # fmt: skip
    assert any("explicit" in note for note in notes)  # SAME_UPPER became pads
    chain, _ = normalise(TINY_GRAPHS["nhwc_cast_chain"][0]())
    assert not [node for node in chain.graph.node if node.op_type == "Cast"]
    mixed, notes = normalise(TINY_GRAPHS["uint8_input"][0]())
    types = {init.data_type for init in mixed.graph.initializer if init.name != "s1.b"}
    assert onnx.TensorProto.FLOAT16 not in types and onnx.TensorProto.DOUBLE not in types
    assert mixed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not [node for node in mixed.graph.node if node.op_type == "Cast"]
    assert probe(mixed).input_type == "uint8"


@pytest.mark.slow
@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_quirky_graph_goes_through_the_cli_chain(quirk: str, tmp_path: Path) -> None:
    build, head_kind, _, layout = TINY_GRAPHS[quirk]
    preprocess, output_kind, input_type = QUIRKS[quirk]
    path = save(build(), tmp_path / f"{quirk}.onnx")
    catalog = tmp_path / "catalog.json"
    entry = catalog_entry(quirk, path, preprocess, layout=layout, output_kind=output_kind)
    catalog.write_text(json.dumps({"models": [entry]}))
    models = tmp_path / "models"

    code, _, err = zoo("fetch", quirk, models_dir=models, catalog=catalog)
    assert code == 0, err
    code, out, err = zoo("inspect", quirk, "--json", models_dir=models, catalog=catalog)
    assert code == 0, err
    found = json.loads(out)["probe"]
    assert (found["head_kind"], found["layout"]) == (head_kind, layout)
    run = tmp_path / "run"
    code, out, err = zoo(
        "adapt", quirk, "--data", "builtin:digits", "--epochs", "1", "--strategy", "full",
        "--train-per-class", "8", "--out", str(run), "--json",
        models_dir=models, catalog=catalog,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["epochs_run"] == 1
    code, out, err = zoo("export", str(run), "--json", models_dir=models, catalog=catalog)
    assert code == 0, err
    exported = json.loads(out)
    assert exported["verified"] and exported["verify"]["passed"]
    graph = onnx.load(exported["path"]).graph
    assert graph.input[0].type.tensor_type.elem_type == input_type  # the source's input type
    code, out, err = zoo(
        "verify", exported["path"], "--run", str(run), "--json", models_dir=models, catalog=catalog
    )
    assert code == 0, err
    assert json.loads(out)["passed"]
    # The deployed file alone, fed in its own input type (uint8, float64) by predict and evaluate.
    code, out, err = zoo(
        "evaluate", exported["path"], "--data", "builtin:digits", "--json",
        models_dir=models, catalog=catalog,
    )  # fmt: skip
    assert code == 0, err
    assert 0 <= json.loads(out)["accuracy"] <= 1


MNIST_SHA = "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"


def test_real_mnist8_imports_with_trainable_weights(shared_dir: Path) -> None:
    import onnxruntime as ort

    path = shared_dir / "models" / "mnist-8.onnx"
    imported = import_model(path)
    found = imported.probe
    assert (found.head_kind, found.head_nodes) == ("matmul_add", ("Times212", "Plus214"))
    assert found.feature_dim == 256 and found.num_classes == 10 and found.channels == 1
    shapes = sorted(tuple(p.shape) for p in imported.module.parameters())
    assert (256, 10) in shapes and (1, 10) in shapes  # the reshaped weight and the [1, 10] bias
    assert all(p.requires_grad for p in imported.module.parameters())
    # The converted model agrees with onnxruntime on the original file (batch 1, as it is fixed).
    digits = np.random.default_rng(0).uniform(0, 1, (3, 1, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for image in digits:
            expected = session.run(None, {"Input3": image})[0]
            actual = imported.module(torch.from_numpy(image)).numpy()
            assert np.abs(expected - actual).max() < 1e-4


@pytest.mark.slow
def test_real_mnist8_adapts_and_exports(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "models" / "mnist-8.onnx"
    if sha256_file(source) != MNIST_SHA:
        pytest.skip("../shared/models/mnist-8.onnx is not the zoo's file")
    mirror = tmp_path / "mirror" / "validated/vision/classification/mnist/model"
    mirror.mkdir(parents=True)
    shutil.copy(source, mirror / "mnist-8.onnx")
    models = tmp_path / "models"
    code, _, err = zoo("fetch", "mnist-8", "--mirror", str(tmp_path / "mirror"), models_dir=models)
    assert code == 0, err
    code, out, err = zoo("inspect", "mnist-8", "--json", models_dir=models)
    assert code == 0, err
    assert json.loads(out)["probe"]["head_kind"] == "matmul_add"
    run = tmp_path / "run"
    code, out, err = zoo(
        "adapt", "mnist-8", "--data", "builtin:digits", "--epochs", "3", "--out", str(run),
        "--json", models_dir=models,
    )  # fmt: skip
    assert code == 0, err
    accuracy = json.loads(out)["test_accuracy"]
    print(f"mnist-8 on builtin digits, 3 epochs: test accuracy {accuracy:.3f}")
    assert accuracy > 0.5
    code, out, err = zoo("export", str(run), "--json", models_dir=models)
    assert code == 0, err
    assert json.loads(out)["verify"]["passed"]
