"""Any classifier, second round (issue 27): heads and file quirks still refused, preprocessing measured.

Each class of failure is a tiny graph built here: a Keras/tf2onnx-style NHWC grayscale network whose
head is a 3x3 conv averaged over space, a paddle2onnx-style graph with dims written as -1 and 0,
an older revision of a catalog file (its names and shapes, another sha256), and a Git LFS pointer
whose oid is a catalog file's. Each goes through fetch -> inspect -> adapt -> export -> verify ->
predict on the command line, or gets its one-line message. `--preprocess auto` runs on the bundled
EfficientNet-Lite0 and, when ../shared is present, on the real third-party files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from legacy_builders import legacy_classifier
from onnx import TensorProto, helper
from onnx_builders import NUM_CLASSES, SIZE, _init, _ints, backbone_nodes

from cli import main
from pipeline.convert import import_model
from pipeline.convert.normalisation import normalise
from pipeline.convert.probe import probe
from zoo.catalog import load_catalog
from zoo.errors import UnsupportedModel
from zoo.lookalike import resembling
from zoo.preprocess import PRESETS, PreprocessRequest, input_signature, resolve_preprocess

MNIST8_SHA = "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zoo(*args: str, models_dir: Path) -> tuple[int, str]:
    """Exit code and everything printed (stdout, then stderr)."""
    result = CliRunner().invoke(main, ["--models-dir", str(models_dir), *args])
    return result.exit_code, result.stdout + result.stderr


def exported_path(out: str) -> str:
    """The path `zoo export --json` printed (its JSON object comes first, stderr after it)."""
    return json.JSONDecoder().raw_decode(out[out.index("{") :])[0]["path"]


def _model(nodes, inits, inputs, outputs, *, opset: int, producer: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, producer, inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer
    )
    model.ir_version = 7
    return model


def keras_conv_head(*, pooled: bool = True) -> onnx.ModelProto:
    """NHWC grayscale -> Transpose -> two 3x3 convs -> 3x3 conv (5 filters) -> mean over space -> Softmax.

    As tf2onnx writes a Keras all-convolutional classifier; without `pooled` the last conv's map
    is flattened instead (a conv acting as a dense layer), which is not a pooled conv head.
    """
    conv = {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], name="Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "c1.w", "c1.b"], ["c1"], name="conv2d/Conv2D", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv2d/Relu"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2d_1/Conv2D", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="conv2d_1/Relu"),
        helper.make_node("Conv", ["r2", "k.w", "k.b"], ["cls"], name="conv2d_2/Conv2D", **conv),
        helper.make_node("Transpose", ["cls"], ["nhwc"], name="Conv2D__20", perm=[0, 2, 3, 1]),
    ]
    if pooled:
        nodes.append(
            helper.make_node(
                "ReduceMean", ["nhwc"], ["scores"], name="gap/Mean", axes=[1, 2], keepdims=0
            )
        )
    else:
        nodes.append(helper.make_node("Flatten", ["nhwc"], ["scores"], name="flatten", axis=1))
    nodes.append(helper.make_node("Softmax", ["scores"], ["predictions"], name="softmax", axis=-1))
    inits = [
        _init("c1.w", (4, 1, 3, 3), seed=1),
        _init("c1.b", (4,), seed=2),
        _init("c2.w", (6, 4, 3, 3), seed=3),
        _init("c2.b", (6,), seed=4),
        _init("k.w", (NUM_CLASSES, 6, 3, 3), seed=5),
        _init("k.b", (NUM_CLASSES,), seed=6),
    ]
    classes = NUM_CLASSES if pooled else NUM_CLASSES * SIZE * SIZE
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__6", SIZE, SIZE, 1])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__7", classes])],
        opset=13,
        producer="tf2onnx",
    )


def minus_one_dims(dims: tuple[int, ...] = (-1, 3, -1, 0)) -> onnx.ModelProto:
    """A paddle2onnx-style graph: dims written as -1 and 0, a flatten computed from Shape."""
    nodes, inits, features = backbone_nodes("x")
    nodes += [
        helper.make_node("GlobalAveragePool", [features], ["pooled"], name="pool"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["pooled", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "fc.b"], ["logits"], name="fc/Add"),
        helper.make_node("Softmax", ["logits"], ["scores"], name="softmax", axis=1),
    ]
    inits += [
        _ints("zero", [0]),
        _ints("minus_one", [-1]),
        _init("fc.w", (6, NUM_CLASSES), seed=11),
        _init("fc.b", (NUM_CLASSES,), seed=12),
    ]
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [dims[0], NUM_CLASSES])],
        opset=11,
        producer="PaddlePaddle",
    )


def old_mnist() -> onnx.ModelProto:
    """A CNTK MNIST at opset 1 with the catalog's names and shapes, but not any catalog file."""
    model = legacy_classifier("cntk", 1, size=28, classes=10)
    for node in model.graph.node:
        node.output[:] = ["Plus214_Output_0" if o == "Plus214" else o for o in node.output]
    model.graph.output[0].name = "Plus214_Output_0"
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def photo(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- the head


def test_a_pooled_kxk_conv_head_is_found_and_its_input_is_the_feature_tensor() -> None:
    found = probe(keras_conv_head())
    assert (found.head_kind, found.layout, found.channels) == ("conv_kxk", "NHWC", 1)
    assert (found.feature_name, found.feature_dim, found.num_classes) == ("r2", 6, NUM_CLASSES)
    assert found.feature_spatial and found.output_kind == "probabilities"


def test_a_kxk_conv_whose_map_is_flattened_is_no_pooled_head() -> None:
    with pytest.raises(UnsupportedModel, match="no known classifier head"):
        probe(keras_conv_head(pooled=False))


# ----------------------------------------------------------------------------- -1 and 0 dims


def test_dims_written_as_minus_one_or_zero_become_named(tmp_path: Path) -> None:
    normalised, notes = normalise(minus_one_dims())
    dims = normalised.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]
    assert any("-1 or 0" in note for note in notes)
    imported = import_model(save(minus_one_dims(), tmp_path / "paddle.onnx"))
    assert imported.probe.dynamic_batch and imported.fidelity.top1_agreement == 1.0


def test_a_file_onnxruntime_runs_is_never_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.convert as convert

    def broken(_model):  # noqa: ANN001, ANN202 - zoo's own rewrite failing, as in issue 27
        raise RuntimeError("Reshape: Invalid Target shape product of 0")

    monkeypatch.setattr(convert, "normalise", broken)
    with pytest.raises(UnsupportedModel) as raised:
        import_model(save(minus_one_dims((-1, 3, -1, -1)), tmp_path / "runs.onnx"))
    assert "normalising it for PyTorch failed" in str(raised.value)
    assert "may be damaged" not in str(raised.value)
    # A graph onnxruntime itself refuses (a batch of 0 flattened by a Reshape) may be damaged.
    with pytest.raises(UnsupportedModel, match="may be damaged"):
        import_model(save(minus_one_dims((0, 3, 8, 8)), tmp_path / "refused.onnx"))


# ----------------------------------------------------------------------------- the CLI chain


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "size"),
    [(keras_conv_head, ()), (minus_one_dims, ("--size", "16"))],
    ids=["kxk", "-1"],
)
def test_each_class_goes_through_the_cli_chain(build, size: tuple, tmp_path: Path) -> None:  # noqa: ANN001
    models, run = tmp_path / "models", tmp_path / "run"
    path = save(build(), tmp_path / "model.onnx")
    code, out = zoo("fetch", str(path), "--preprocess", "raw", *size, models_dir=models)
    assert code == 0, out
    code, out = zoo("inspect", "model", "--json", models_dir=models)
    assert code == 0, out
    code, out = zoo(
        "adapt", "model", "--data", "builtin:digits", "--epochs", "1", "--train-per-class", "8",
        "--out", str(run), "--json", models_dir=models,
    )  # fmt: skip
    assert code == 0, out
    code, out = zoo("export", str(run), "--json", models_dir=models)
    assert code == 0, out
    exported = exported_path(out)
    code, out = zoo("verify", exported, "--run", str(run), "--json", models_dir=models)
    assert code == 0, out
    code, out = zoo("predict", exported, str(photo(tmp_path)), "--json", models_dir=models)
    assert code == 0, out


# ----------------------------------------------------------------------------- older revisions


def test_an_older_revision_is_told_which_entry_it_resembles(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = save(old_mnist(), tmp_path / "mnist-2018.onnx")
    code, out = zoo("fetch", str(path), models_dir=models)
    assert code == 0, out
    code, out = zoo("adapt", "mnist-2018", "--data", "builtin:digits", models_dir=models)
    assert code != 0
    assert "resembles mnist-" in out and "--like mnist-" in out


def test_resembling_takes_the_nearest_opset_of_the_same_names_and_shapes() -> None:
    found = resembling(
        load_catalog(),
        input_name="Input3",
        input_shape=(1, 1, 28, 28),
        output_name="Plus214_Output_0",
        output_shape=(1, 10),
        opset=1,
    )
    assert [entry.name for entry in found][:1] == ["mnist-7"]
    assert not resembling(
        load_catalog(),
        input_name="Input3",
        input_shape=(1, 3, 28, 28),
        output_name="Plus214_Output_0",
        output_shape=(1, 10),
        opset=1,
    )


@pytest.mark.slow
def test_like_gives_an_older_revision_its_entrys_preprocessing_and_labels(tmp_path: Path) -> None:
    models, run = tmp_path / "models", tmp_path / "run"
    path = save(old_mnist(), tmp_path / "mnist-2018.onnx")
    code, out = zoo("fetch", str(path), "--like", "mnist-7", models_dir=models)
    assert code == 0, out
    card = json.loads((models / "mnist-2018" / "card.json").read_text())
    assert card["entry"]["num_classes"] == 10 and card["entry"]["preprocess"]["channels"] == 1
    assert "mnist-7" in card["entry"]["preprocess_note"]
    code, out = zoo("inspect", "mnist-2018", models_dir=models)
    assert code == 0, out
    code, out = zoo(
        "adapt", "mnist-2018", "--data", "builtin:digits", "--epochs", "1",
        "--train-per-class", "8", "--out", str(run), models_dir=models,
    )  # fmt: skip
    assert code == 0, out
    code, out = zoo("export", str(run), "--json", models_dir=models)
    assert code == 0, out
    exported = exported_path(out)
    code, out = zoo("verify", exported, "--run", str(run), models_dir=models)
    assert code == 0, out
    # The original file, predicted with the look-alike's preprocessing and its 10 labels.
    code, out = zoo(
        "predict", str(path), str(photo(tmp_path)), "--like", "mnist-7", "--json",
        models_dir=models,
    )  # fmt: skip
    assert code == 0, out


# ----------------------------------------------------------------------------- LFS pointers


def test_an_lfs_pointer_to_a_catalog_file_names_the_model(tmp_path: Path) -> None:
    pointer = tmp_path / "mnist-8.onnx"
    pointer.write_text(
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{MNIST8_SHA}\nsize 26454\n"
    )
    for command in ("fetch", "inspect", "adapt"):
        code, out = zoo(command, str(pointer), models_dir=tmp_path / "models")
        assert code != 0
        line = out.strip().splitlines()[-1]
        assert "Git LFS pointer to the catalog's mnist-8" in line, line
        assert "`zoo fetch mnist-8`" in line
    unknown = tmp_path / "other.onnx"
    unknown.write_text(pointer.read_text().replace(MNIST8_SHA, "0" * 64))
    code, out = zoo("fetch", str(unknown), models_dir=tmp_path / "models")
    assert code != 0 and "Git LFS pointer" in out and "mnist-8" not in out


# ----------------------------------------------------------------------------- --preprocess auto


def _measure(model: onnx.ModelProto, source: Path | bytes, name: str):  # noqa: ANN202
    """What --preprocess auto measures, the presets fitted to the graph's input as zoo fits them."""
    from zoo.preprocess_auto import measure_presets

    signature = input_signature(model)
    fitted = {
        preset: resolve_preprocess(None, PreprocessRequest(preset=preset), signature, name=name)
        for preset in PRESETS
    }
    return measure_presets(model, source, fitted, signature=signature, name=name)


def test_auto_says_why_it_cannot_tell_for_a_grayscale_or_non_imagenet_model(
    tmp_path: Path,
) -> None:
    grey = keras_conv_head()
    with pytest.raises(UnsupportedModel, match="one channel"):
        _measure(grey, grey.SerializeToString(), "grey")
    colour = minus_one_dims((1, 3, 32, 32))
    with pytest.raises(UnsupportedModel, match="5 classes, not ImageNet's 1000"):
        _measure(colour, colour.SerializeToString(), "colour")
    models = tmp_path / "models"
    code, out = zoo("fetch", str(save(colour, tmp_path / "c.onnx")), "--preprocess", "auto",
                    models_dir=models)  # fmt: skip
    assert code != 0 and "--preprocess auto cannot tell" in out


@pytest.mark.slow
def test_auto_measures_the_bundled_model_and_rules_caffe_out(
    bundled_onnx: Path, tmp_path: Path
) -> None:
    resaved = tmp_path / "lite0.onnx"
    onnx.save(onnx.load(bundled_onnx), resaved)  # another sha256: the catalog does not know it
    model = onnx.load(resaved)
    measured = _measure(model, resaved, "lite0")
    print(measured.summary())
    assert set(measured.scores) == set(PRESETS) and measured.photos == 15
    assert list(measured.scores)[-1] == "caffe"  # BGR 0-255 for an RGB [0,1] model: worst
    assert measured.scores["imagenet"] > 2 * measured.scores["caffe"]


@pytest.mark.parametrize("name", ["pp-lcnet-orientation.onnx", "cifar10-resnet20.onnx"])
def test_auto_cannot_tell_for_real_non_imagenet_heads(shared_dir: Path, name: str) -> None:
    path = shared_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = onnx.load(path)
    with pytest.raises(UnsupportedModel, match="not ImageNet's 1000"):
        _measure(model, path, name)
