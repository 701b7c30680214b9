"""Import stage: normalisation, convertibility, trainable weights, probe and import fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnx_builders import (
    TINY_GRAPHS,
    build_torch,
    custom_domain,
    import_cached,
    input_size,
    opset7_classic,
    save,
)

import pipeline.convert as convert
from pipeline.convert import (
    FIDELITY_TOLERANCE,
    OpKey,
    import_model,
    normalise,
    unconvertible_ops,
    weight_initializers,
)
from pipeline.convert.probe import HEAD_KINDS, head_kind, probe, register_head_kind
from zoo.errors import ImportFidelityError, InvalidModelFile, UnsupportedModel

# Every architecture at opsets 13 and 17; a few also at 9 and 12 (older exporter paths).
ARCH_OPSETS = [
    (arch, opset)
    for arch in (
        "mobilenet_v2",
        "resnet18",
        "squeezenet1_0",
        "squeezenet1_1",
        "shufflenet_v2_x0_5",
        "googlenet",
        "densenet121",
        "efficientnet_b0",
        "efficientnet_lite0",
    )
    for opset in (13, 17)
] + [(arch, opset) for arch in ("mobilenet_v2", "resnet18", "squeezenet1_0") for opset in (9, 12)]
FAST = {("resnet18", 13), ("squeezenet1_1", 13), ("mobilenet_v2", 9)}


def arch_params(cases: list[tuple[str, int]]) -> list:
    """Parametrize (arch, opset), marking all but a few fast ones slow."""
    return [
        pytest.param(
            arch,
            opset,
            id=f"{arch}-{opset}",
            marks=() if (arch, opset) in FAST else pytest.mark.slow,
        )
        for arch, opset in cases
    ]


_imported = import_cached  # one import per architecture and opset for the whole session


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny workloads on a shared 2-core box: OpenMP threads spin-waiting on each other cost 100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def float_weight_count(model: onnx.ModelProto) -> int:
    """Elements of the float weights of a graph (BatchNorm statistics and scalars excluded)."""
    names = set(weight_initializers(model))
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer if init.name in names)


def trainable_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", list(TINY_GRAPHS))
def test_tiny_graph_imports_with_probe_and_fidelity(kind: str, tmp_path: Path) -> None:
    build, head, output_kind, layout = TINY_GRAPHS[kind]
    imported = import_model(save(build(), tmp_path / f"{kind}.onnx"))
    found = imported.probe
    assert (found.head_kind, found.output_kind, found.layout) == (head, output_kind, layout)
    assert found.num_classes == 5 and found.input_size == (8, 8) and found.channels == 3
    assert found.dynamic_batch
    assert imported.fidelity is not None
    assert imported.fidelity.max_abs <= FIDELITY_TOLERANCE
    assert imported.fidelity.top1_agreement == 1.0
    assert trainable_count(imported.module) == float_weight_count(imported.onnx_model)
    assert all(p.requires_grad for p in imported.module.parameters())


def test_probe_output_rank_and_feature_tensor(tmp_path: Path) -> None:
    four_d = probe(TINY_GRAPHS["conv_4d"][0]())
    assert four_d.output_rank == 4 and four_d.feature_spatial and four_d.feature_name == "features"
    assert four_d.feature_dim == 6
    flat = probe(TINY_GRAPHS["gemm"][0]())
    assert flat.output_rank == 2 and not flat.feature_spatial and flat.feature_name == "flat"
    nhwc = probe(TINY_GRAPHS["nhwc_softmax"][0]())
    assert nhwc.input_name == "images:0" and nhwc.output_name == "Softmax:0"
    assert not nhwc.dynamic_batch  # the raw graph fixes batch 1; normalise frees it


@pytest.mark.parametrize(("scale", "found"), [(1.5, True), (-1.0, False)])
def test_probe_sees_through_a_positive_logit_scale(scale: float, found: bool) -> None:
    # A temperature (zoo's own exports) or a logit scale keeps the winning class: the head is
    # found before it. A negative scale reverses the order, so it is no head's output.
    model = TINY_GRAPHS["gemm"][0]()
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    gemm.output[0] = "raw"
    model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "t"))
    model.graph.node.append(onnx.helper.make_node("Div", ["raw", "t"], ["scores"], name="T/Div"))
    if not found:
        with pytest.raises(UnsupportedModel, match="T/Div"):
            probe(model)
        return
    assert probe(model).head_nodes == ("fc/Gemm",)


def test_head_kind_registry_refuses_duplicates_and_names_missing_keys() -> None:
    assert {"gemm", "matmul_add", "conv1x1"} <= set(HEAD_KINDS)
    with pytest.raises(ValueError, match="gemm"):
        register_head_kind("gemm", layer="again")(lambda index, node: None)
    with pytest.raises(UnsupportedModel, match="'nope'"):
        head_kind("nope")


def test_opset7_ops_are_listed_then_upgraded() -> None:
    model = opset7_classic()
    missing = {(op.op_type, op.version) for op in unconvertible_ops(model)}
    assert {("BatchNormalization", 7), ("Gemm", 7), ("Dropout", 7), ("Flatten", 1)} <= missing
    normalised, notes = normalise(model)
    assert unconvertible_ops(normalised) == []
    assert any(note.startswith("upgraded from opset 7 to 13") for note in notes)
    assert normalised.opset_import[0].version == convert.TARGET_OPSET


def test_custom_domain_fails_before_any_conversion_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("conversion work started before the custom op was refused")

    monkeypatch.setattr(convert, "normalise", must_not_run)
    monkeypatch.setattr(convert, "convert_onnx", must_not_run)
    path = save(custom_domain(), tmp_path / "custom.onnx")
    with pytest.raises(UnsupportedModel) as error:
        import_model(path, name="fancy-net")
    message = str(error.value)
    for part in ("FancyPool", "com.example", "version 1", "fancy-net"):
        assert part in message
    assert unconvertible_ops(custom_domain()) == [OpKey("com.example", "FancyPool", 1)]


def test_shared_weights_are_folded_and_unshared() -> None:
    model = TINY_GRAPHS["shared_weights"][0]()
    normalised, notes = normalise(model)
    ops = {node.op_type for node in normalised.graph.node}
    assert "Identity" not in ops and "Constant" not in ops
    convs = [node for node in normalised.graph.node if node.op_type == "Conv"]
    weights = [node.input[1] for node in convs]
    assert len(set(weights)) == len(weights), "each conv has its own weight"
    assert any("1 Constant, 1 Identity" in note for note in notes), notes
    # The shared [4, 5, 1, 1] weight now has two copies, and the Constant bias became a weight.
    assert float_weight_count(normalised) == float_weight_count(model) + 4 * 5 + 4


def test_fixed_batch_reshape_is_freed(tmp_path: Path) -> None:
    imported = import_model(save(TINY_GRAPHS["fixed_batch"][0](), tmp_path / "fixed.onnx"))
    graph = imported.onnx_model.graph
    shapes = {init.name: numpy_helper.to_array(init).tolist() for init in graph.initializer}
    reshapes = {
        node.name: shapes[node.input[1]] for node in graph.node if node.op_type == "Reshape"
    }
    assert reshapes == {"flatten/Reshape": [0, -1], "gate/Reshape": [0, 6, 1, 1]}
    batch = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    fidelity = convert.check_fidelity(
        imported.module, imported.onnx_model, batch, input_name="image"
    )
    assert fidelity.n_inputs == 3 and fidelity.max_abs <= FIDELITY_TOLERANCE
    # The gate's ReduceMean over axes [0, 2, 3] no longer averages the images of a batch together.
    reduce = next(node for node in graph.node if node.op_type == "ReduceMean")
    assert list(onnx.helper.get_attribute_value(reduce.attribute[0])) == [2, 3]
    session = ort.InferenceSession(
        imported.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    together = session.run(None, {"image": batch})[0]
    alone = np.concatenate([session.run(None, {"image": batch[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_graph_that_mixes_the_images_of_a_batch_is_refused_at_import(tmp_path: Path) -> None:
    """A batch-of-1 gate whose reduction over axis 0 cannot be rewritten: one clear refusal."""
    from onnx import helper
    from onnx_builders import _init, _ints, backbone_nodes, make_model

    nodes, inits, features = backbone_nodes()
    nodes += [
        helper.make_node("ReduceMean", [features], ["v"], axes=[0, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["v", "ax"], ["gate"]),  # [C] -> [C, 1, 1], no Reshape
        helper.make_node("Mul", [features, "gate"], ["gated"]),
        helper.make_node("GlobalAveragePool", ["gated"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], transB=1),
    ]
    inits += [_ints("ax", [1, 2]), _init("fc.w", (5, 6), seed=1), _init("fc.b", (5,), seed=2)]
    model = make_model(nodes, inits, input_shape=[1, 3, 8, 8], output_shape=[1, 5])
    with pytest.raises(UnsupportedModel, match="changes with the other images of its batch"):
        import_model(save(model, tmp_path / "mixing.onnx"))


def test_matmul_weight_becomes_trainable_parameter_and_bn_stats_stay_buffers(
    tmp_path: Path,
) -> None:
    imported = import_model(save(TINY_GRAPHS["matmul_add"][0](), tmp_path / "mm.onnx"))
    names = dict(imported.module.named_parameters())
    initializer_params = [name for name in names if name.startswith("initializers.")]
    shapes = sorted(tuple(names[name].shape) for name in initializer_params)
    assert shapes == [(5,), (6, 5)]  # the MatMul weight and the Add bias
    bn = [m for m in imported.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 1
    assert {name for name, _ in bn[0].named_buffers()} >= {"running_mean", "running_var"}
    assert "running_mean" not in dict(bn[0].named_parameters())


def test_fidelity_gate_refuses_a_module_that_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_convert = convert.convert_onnx

    def broken(model: onnx.ModelProto) -> torch.fx.GraphModule:
        module = real_convert(model)
        with torch.no_grad():
            next(module.parameters()).add_(0.5)
        return module

    monkeypatch.setattr(convert, "convert_onnx", broken)
    with pytest.raises(ImportFidelityError, match="max difference"):
        import_model(save(TINY_GRAPHS["gemm"][0](), tmp_path / "gemm.onnx"))


def test_sample_inputs_are_compared_too(tmp_path: Path) -> None:
    images = np.random.default_rng(1).uniform(-2, 2, (4, 3, 8, 8)).astype(np.float32)
    imported = import_model(
        save(TINY_GRAPHS["gemm"][0](), tmp_path / "g.onnx"), sample_inputs=images
    )
    assert imported.fidelity is not None and imported.fidelity.n_inputs == 2 + 4


def test_non_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "page.onnx"
    path.write_bytes(b"<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(InvalidModelFile):
        import_model(path)


@pytest.mark.parametrize(("arch", "opset"), arch_params(ARCH_OPSETS))
def test_torchvision_arch_imports_faithfully(arch: str, opset: int, exported_onnx) -> None:
    imported = _imported(str(exported_onnx(arch, opset)))
    assert imported.fidelity is not None
    assert imported.fidelity.max_abs <= FIDELITY_TOLERANCE * max(1.0, imported.fidelity.scale)
    assert imported.fidelity.top1_agreement == 1.0
    count = trainable_count(imported.module)
    assert count == float_weight_count(imported.onnx_model)
    assert count == sum(p.numel() for p in build_torch(arch).parameters())
    found = imported.probe
    assert found.input_size == (input_size(arch),) * 2 and found.layout == "NCHW"
    assert found.num_classes == 1000 and found.dynamic_batch
    expected_head = "conv1x1" if arch.startswith("squeezenet") else "gemm"
    assert found.head_kind == expected_head
    if arch.startswith("squeezenet"):
        assert (
            found.feature_spatial
            and found.feature_dim == 512
            and found.output_kind == "relu_scores"
        )
    # The torch module accepts any batch size.
    batch = torch.randn(3, 3, input_size(arch), input_size(arch))
    with torch.no_grad():
        assert imported.module.eval()(batch).shape == (3, 1000)


@pytest.mark.slow
def test_efficientnet_lite0_probe_matches_the_bundled_model_shape(exported_onnx) -> None:
    found = _imported(str(exported_onnx("efficientnet_lite0", 13))).probe
    assert found.feature_dim == 1280 and not found.feature_spatial
    assert found.head_kind == "gemm" and found.num_classes == 1000


def chelsea_batch() -> np.ndarray:
    """scikit-image's cat photo, 224 px centre crop, ImageNet mean/std, NCHW."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    normalised = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return normalised.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.slow
def test_inspect_bundled_efficientnet_lite0(bundled_onnx: Path) -> None:
    import json

    from rich.console import Console

    from pipeline.surgery.inspect import inspect_model, render

    report = inspect_model(bundled_onnx, name="efficientnet-lite0")
    found = report.probe
    assert found.layout == "NCHW" and found.feature_dim == 1280 and not found.feature_spatial
    assert found.head_kind == "gemm" and found.num_classes == 1000 and "Linear" in report.head_layer
    assert len(report.blocks) >= 7
    assert report.fidelity is not None and report.fidelity.max_abs <= FIDELITY_TOLERANCE
    assert json.loads(json.dumps(report.to_dict()))["probe"]["feature_dim"] == 1280
    console = Console(record=True, width=120)
    render(report, console)
    text = console.export_text()
    assert "1280" in text and "blocks" in text


@pytest.mark.slow
def test_bundled_model_ranks_the_cat_photo_the_same(bundled_onnx: Path) -> None:
    images = chelsea_batch()
    imported = import_model(bundled_onnx, sample_inputs=images)
    assert imported.fidelity is not None and imported.fidelity.top1_agreement == 1.0
    with torch.no_grad():
        top3 = imported.module.eval()(torch.from_numpy(images))[0].topk(3).indices.tolist()
    assert set(top3) == {285, 282, 281}  # Egyptian cat, tiger cat, tabby
