"""Builders of tiny ONNX classifier graphs and torchvision/timm exports, shared by the tests."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NUM_CLASSES = 5
CHANNELS = 3
SIZE = 8


def _init(
    name: str, shape: tuple[int, ...], *, seed: int, positive: bool = False
) -> onnx.TensorProto:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.5
    return numpy_helper.from_array(np.abs(values) + 0.5 if positive else values, name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def make_model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    *,
    input_shape: list[int | str],
    output_shape: list[int | str],
    opset: int = 13,
    input_name: str = "image",
    output_name: str = "scores",
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """A checked single-input, single-output model from nodes and initializers."""
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape)],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(domain, v) for domain, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests")
    model.ir_version = 7 if opset < 15 else 8
    if not extra_opsets:
        onnx.checker.check_model(model)
    return model


def backbone_nodes(
    source: str = "image", *, width: int = 6, bn_version_attrs: dict | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Stem conv+BN+ReLU and two named conv stages; returns nodes, initializers and the NCHW output."""
    nodes = [
        helper.make_node(
            "Conv",
            [source, "stem.w", "stem.b"],
            ["stem_c"],
            name="stem/conv/Conv",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
        ),
        helper.make_node(
            "BatchNormalization",
            ["stem_c", "stem.bn.g", "stem.bn.b", "stem.bn.m", "stem.bn.v"],
            ["stem_n"],
            name="stem/bn/BatchNormalization",
            **(bn_version_attrs or {}),
        ),
        helper.make_node("Relu", ["stem_n"], ["stem_r"], name="stem/relu/Relu"),
        helper.make_node(
            "Conv",
            ["stem_r", "s1.w", "s1.b"],
            ["s1_c"],
            name="stage1/conv/Conv",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
        ),
        helper.make_node("Relu", ["s1_c"], ["s1_r"], name="stage1/relu/Relu"),
        helper.make_node(
            "Conv", ["s1_r", "s2.w", "s2.b"], ["s2_c"], name="stage2/conv/Conv", kernel_shape=[1, 1]
        ),
        helper.make_node("Relu", ["s2_c"], ["features"], name="stage2/relu/Relu"),
    ]
    inits = [
        _init("stem.w", (4, CHANNELS, 3, 3), seed=1),
        _init("stem.b", (4,), seed=2),
        _init("stem.bn.g", (4,), seed=3, positive=True),
        _init("stem.bn.b", (4,), seed=4),
        _init("stem.bn.m", (4,), seed=5),
        _init("stem.bn.v", (4,), seed=6, positive=True),
        _init("s1.w", (5, 4, 3, 3), seed=7),
        _init("s1.b", (5,), seed=8),
        _init("s2.w", (width, 5, 1, 1), seed=9),
        _init("s2.b", (width,), seed=10),
    ]
    return nodes, inits, "features"


def _pooled(features: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            "GlobalAveragePool", [features], ["pooled"], name="pool/GlobalAveragePool"
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten/Flatten", axis=1),
    ]


def gemm_head(*, batch: int | str = "N", softmax: bool = False) -> onnx.ModelProto:
    """Backbone -> GAP -> Flatten -> Gemm (transB) [-> Softmax]."""
    nodes, inits, features = backbone_nodes()
    nodes += _pooled(features)
    nodes.append(
        helper.make_node(
            "Gemm",
            ["flat", "fc.w", "fc.b"],
            ["logits" if softmax else "scores"],
            name="fc/Gemm",
            transB=1,
        )
    )
    if softmax:
        nodes.append(
            helper.make_node("Softmax", ["logits"], ["scores"], name="softmax/Softmax", axis=1)
        )
    inits += [_init("fc.w", (NUM_CLASSES, 6), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes, inits, input_shape=[batch, CHANNELS, SIZE, SIZE], output_shape=[batch, NUM_CLASSES]
    )


def matmul_head() -> onnx.ModelProto:
    """Backbone -> GAP -> Flatten -> MatMul + Add."""
    nodes, inits, features = backbone_nodes()
    nodes += _pooled(features)
    nodes += [
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "fc.b"], ["scores"], name="fc/Add"),
    ]
    inits += [_init("fc.w", (6, NUM_CLASSES), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes, inits, input_shape=["N", CHANNELS, SIZE, SIZE], output_shape=["N", NUM_CLASSES]
    )


def conv_head(*, pool: str = "global", four_d: bool = False) -> onnx.ModelProto:
    """Backbone -> 1x1 Conv -> ReLU -> GlobalAveragePool/AveragePool [-> Flatten], SqueezeNet style."""
    nodes, inits, features = backbone_nodes()
    nodes += [
        helper.make_node(
            "Conv",
            [features, "cls.w", "cls.b"],
            ["cls_c"],
            name="classifier/conv/Conv",
            kernel_shape=[1, 1],
        ),
        helper.make_node("Relu", ["cls_c"], ["cls_r"], name="classifier/relu/Relu"),
    ]
    pooled = "cls_p" if not four_d else "scores"
    if pool == "global":
        nodes.append(
            helper.make_node(
                "GlobalAveragePool", ["cls_r"], [pooled], name="classifier/pool/GlobalAveragePool"
            )
        )
    else:
        nodes.append(
            helper.make_node(
                "AveragePool",
                ["cls_r"],
                [pooled],
                name="classifier/pool/AveragePool",
                kernel_shape=[SIZE, SIZE],
            )
        )
    if not four_d:
        nodes.append(
            helper.make_node(
                "Flatten", ["cls_p"], ["scores"], name="classifier/flatten/Flatten", axis=1
            )
        )
    inits += [
        _init("cls.w", (NUM_CLASSES, 6, 1, 1), seed=13),
        _init("cls.b", (NUM_CLASSES,), seed=14),
    ]
    out_shape: list[int | str] = ["N", NUM_CLASSES, 1, 1] if four_d else ["N", NUM_CLASSES]
    return make_model(nodes, inits, input_shape=["N", CHANNELS, SIZE, SIZE], output_shape=out_shape)


def nhwc_softmax() -> onnx.ModelProto:
    """NHWC input with a leading Transpose, MatMul+Add head and a Softmax, like EfficientNet-Lite4."""
    nodes, inits, features = backbone_nodes("nchw")
    nodes.insert(
        0,
        helper.make_node(
            "Transpose", ["images:0"], ["nchw"], name="transpose/Transpose", perm=[0, 3, 1, 2]
        ),
    )
    nodes += _pooled(features)
    nodes += [
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "fc.b"], ["logits"], name="fc/Add"),
        helper.make_node("Softmax", ["logits"], ["Softmax:0"], name="softmax/Softmax", axis=-1),
    ]
    inits += [_init("fc.w", (6, NUM_CLASSES), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes,
        inits,
        input_shape=[1, SIZE, SIZE, CHANNELS],
        output_shape=[1, NUM_CLASSES],
        input_name="images:0",
        output_name="Softmax:0",
    )


def fixed_batch_reshape() -> onnx.ModelProto:
    """A fixed batch of 1, a Reshape to [1, -1] before the Gemm and a [C] -> [1, C, 1, 1] broadcast."""
    nodes, inits, features = backbone_nodes()
    nodes += [
        # A channel gate from a [C] vector: its Reshape to [1, C, 1, 1] has no batch to free.
        helper.make_node(
            "ReduceMean",
            [features],
            ["gate_vec"],
            name="gate/ReduceMean",
            axes=[0, 2, 3],
            keepdims=0,
        ),
        helper.make_node("Reshape", ["gate_vec", "gate_shape"], ["gate"], name="gate/Reshape"),
        helper.make_node("Mul", [features, "gate"], ["gated"], name="gate/Mul"),
        helper.make_node("GlobalAveragePool", ["gated"], ["pooled"], name="pool/GlobalAveragePool"),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="fc/Gemm", transB=1),
    ]
    inits += [
        _ints("gate_shape", [1, 6, 1, 1]),
        _ints("flat_shape", [1, -1]),
        _init("fc.w", (NUM_CLASSES, 6), seed=11),
        _init("fc.b", (NUM_CLASSES,), seed=12),
    ]
    return make_model(
        nodes, inits, input_shape=[1, CHANNELS, SIZE, SIZE], output_shape=[1, NUM_CLASSES]
    )


def opset7_classic() -> onnx.ModelProto:
    """Opset 7 with BatchNormalization-7, Flatten-1, Dropout-7 and Gemm-7, as old zoo files have."""
    nodes, inits, features = backbone_nodes()
    nodes += _pooled(features)
    nodes += [
        helper.make_node("Dropout", ["flat"], ["dropped"], name="drop/Dropout", ratio=0.5),
        helper.make_node("Gemm", ["dropped", "fc.w", "fc.b"], ["scores"], name="fc/Gemm", transB=1),
    ]
    inits += [_init("fc.w", (NUM_CLASSES, 6), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes, inits, input_shape=[1, CHANNELS, SIZE, SIZE], output_shape=[1, NUM_CLASSES], opset=7
    )


def shared_weights() -> onnx.ModelProto:
    """Weights shared through an Identity node and a bias given by a Constant node (legacy exporter)."""
    nodes, inits, features = backbone_nodes(width=4)
    # stage3 is a 1x1 conv from the stage1 output (5 channels) that reuses stage2's [4, 5, 1, 1] weight.
    nodes += [
        helper.make_node("Identity", ["s2.w"], ["s3.w"], name="Identity_0"),
        helper.make_node(
            "Constant", [], ["s3.b"], name="Constant_0", value=_init("s3.b.value", (4,), seed=20)
        ),
        helper.make_node(
            "Conv", ["s1_r", "s3.w", "s3.b"], ["s3_c"], name="stage3/conv/Conv", kernel_shape=[1, 1]
        ),
        helper.make_node("Add", [features, "s3_c"], ["summed"], name="stage3/add/Add"),
    ]
    nodes += _pooled("summed")
    nodes.append(
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="fc/Gemm", transB=1)
    )
    inits += [_init("fc.w", (NUM_CLASSES, 4), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes, inits, input_shape=["N", CHANNELS, SIZE, SIZE], output_shape=["N", NUM_CLASSES]
    )


def custom_domain() -> onnx.ModelProto:
    """A graph with an operator from a custom domain that no converter knows."""
    nodes, inits, features = backbone_nodes()
    nodes.append(
        helper.make_node("FancyPool", [features], ["pooled"], name="fancy", domain="com.example")
    )
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten/Flatten"))
    nodes.append(
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["scores"], name="fc/Gemm", transB=1)
    )
    inits += [_init("fc.w", (NUM_CLASSES, 6), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes,
        inits,
        input_shape=["N", CHANNELS, SIZE, SIZE],
        output_shape=["N", NUM_CLASSES],
        extra_opsets={"com.example": 1},
    )


def nhwc_cast_chain() -> onnx.ModelProto:
    """NHWC input and a MatMul+Add+Softmax head behind chains of Casts, as a PyTorch export of a
    third-party classifier has them (float -> float16 -> float included)."""
    nodes, inits, features = backbone_nodes("nchw")
    nodes.insert(
        0, helper.make_node("Transpose", ["input"], ["nchw"], name="/Transpose", perm=[0, 3, 1, 2])
    )
    nodes += _pooled(features)

    def cast(source: str, target: str, to: int, index: int) -> onnx.NodeProto:
        return helper.make_node("Cast", [source], [target], name=f"/Cast_{index}", to=to)

    nodes += [
        cast("flat", "flat_c0", TensorProto.FLOAT, 300),
        cast("flat_c0", "flat_c1", TensorProto.FLOAT16, 301),
        cast("flat_c1", "flat_c2", TensorProto.FLOAT, 302),
        helper.make_node("MatMul", ["flat_c2", "fc.w"], ["mm"], name="/fc/MatMul"),
        cast("mm", "mm_c", TensorProto.FLOAT, 305),
        helper.make_node("Add", ["mm_c", "fc.b"], ["logits"], name="/fc/Add"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="/Softmax", axis=-1),
        cast("probs", "probs_c", TensorProto.FLOAT, 307),
        cast("probs_c", "output", TensorProto.FLOAT, 308),
    ]
    inits += [_init("fc.w", (6, NUM_CLASSES), seed=11), _init("fc.b", (NUM_CLASSES,), seed=12)]
    return make_model(
        nodes,
        inits,
        input_shape=["batch", SIZE, SIZE, CHANNELS],
        output_shape=["batch", NUM_CLASSES],
        input_name="input",
        output_name="output",
    )


def softmax_4d_transposed() -> onnx.ModelProto:
    """A 1x1 Conv head with a 4-D [N, C, 1, 1] Softmax output that an export wrapped in Transposes."""
    nodes, inits, features = backbone_nodes()
    nodes += [
        helper.make_node("GlobalAveragePool", [features], ["pooled"], name="pool/GAP"),
        helper.make_node(
            "Conv", ["pooled", "cls.w", "cls.b"], ["cls"], name="cls/Conv", kernel_shape=[1, 1]
        ),
        helper.make_node("Transpose", ["cls"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Softmax", ["nhwc"], ["soft"], name="softmax", axis=3),
        helper.make_node("Transpose", ["soft"], ["scores"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    inits += [
        _init("cls.w", (NUM_CLASSES, 6, 1, 1), seed=13),
        _init("cls.b", (NUM_CLASSES,), seed=14),
    ]
    return make_model(
        nodes,
        inits,
        input_shape=["N", CHANNELS, SIZE, SIZE],
        output_shape=["N", NUM_CLASSES, 1, 1],
    )


def reshaped_matmul_weight() -> onnx.ModelProto:
    """CNTK style (the zoo's mnist-8): SAME auto_pad, a fixed batch of 1, a MatMul weight computed by a
    Reshape of an initializer, a [1, N] bias, initializers listed as inputs, IR version 3."""
    nodes, inits, features = backbone_nodes()
    stem = nodes[0]
    kept = [attr for attr in stem.attribute if attr.name != "pads"]
    del stem.attribute[:]
    stem.attribute.extend([*kept, helper.make_attribute("auto_pad", "SAME_UPPER")])
    nodes += [
        helper.make_node("GlobalAveragePool", [features], ["pooled"], name="pool/GAP"),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="Times_reshape0"),
        helper.make_node("Reshape", ["fc.w4d", "fc.w_shape"], ["fc.w"], name="Times_reshape1"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="Times"),
        helper.make_node("Add", ["mm", "fc.b"], ["scores"], name="Plus"),
    ]
    inits += [
        _ints("flat_shape", [1, 6]),
        _init("fc.w4d", (6, 1, 1, NUM_CLASSES), seed=11),
        _ints("fc.w_shape", [6, NUM_CLASSES]),
        _init("fc.b", (1, NUM_CLASSES), seed=12),
    ]
    model = make_model(
        nodes, inits, input_shape=[1, CHANNELS, SIZE, SIZE], output_shape=[1, NUM_CLASSES], opset=8
    )
    for init in inits:  # old exporters list every initializer as a graph input too
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    model.ir_version = 3
    return model


def mixed_precision(input_type: int = TensorProto.DOUBLE) -> onnx.ModelProto:
    """An input of another type (float64, uint8) cast to float, a bias stored in float64 and cast,
    and a head computed in float16 (Cast to float16, fp16 weights, Cast back)."""
    nodes, inits, features = backbone_nodes("image_f")
    nodes.insert(0, helper.make_node("Cast", ["image"], ["image_f"], name="cast_in", to=1))
    bias = next(init for init in inits if init.name == "s1.b")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float64), "s1.b64"))
    nodes.insert(0, helper.make_node("Cast", ["s1.b64"], ["s1.b"], name="cast_bias", to=1))
    nodes += _pooled(features)
    half = TensorProto.FLOAT16
    nodes += [
        helper.make_node("Cast", ["flat"], ["flat16"], name="to_half", to=half),
        helper.make_node("MatMul", ["flat16", "fc.w"], ["mm"], name="fc/MatMul"),
        helper.make_node("Add", ["mm", "fc.b"], ["logits16"], name="fc/Add"),
        helper.make_node("Cast", ["logits16"], ["scores"], name="to_float", to=1),
    ]
    inits += [
        numpy_helper.from_array(
            numpy_helper.to_array(_init("fc.w", (6, NUM_CLASSES), seed=11)).astype(np.float16),
            "fc.w",
        ),  # fmt: skip
        numpy_helper.from_array(
            numpy_helper.to_array(_init("fc.b", (NUM_CLASSES,), seed=12)).astype(np.float16), "fc.b"
        ),  # fmt: skip
    ]
    model = make_model(
        nodes, inits, input_shape=["N", CHANNELS, SIZE, SIZE], output_shape=["N", NUM_CLASSES]
    )
    model.graph.input[0].type.tensor_type.elem_type = input_type
    onnx.checker.check_model(model)
    return model


# name -> (builder, head kind, output kind, layout)
TINY_GRAPHS: dict[str, tuple[Callable[[], onnx.ModelProto], str, str, str]] = {
    "gemm": (gemm_head, "gemm", "logits", "NCHW"),
    "gemm_softmax": (lambda: gemm_head(softmax=True), "gemm", "probabilities", "NCHW"),
    "matmul_add": (matmul_head, "matmul_add", "logits", "NCHW"),
    "conv_gap": (conv_head, "conv1x1", "relu_scores", "NCHW"),
    "conv_avgpool": (lambda: conv_head(pool="average"), "conv1x1", "relu_scores", "NCHW"),
    "conv_4d": (lambda: conv_head(four_d=True), "conv1x1", "relu_scores", "NCHW"),
    "nhwc_softmax": (nhwc_softmax, "matmul_add", "probabilities", "NHWC"),
    "fixed_batch": (fixed_batch_reshape, "gemm", "logits", "NCHW"),
    "opset7": (opset7_classic, "gemm", "logits", "NCHW"),
    "shared_weights": (shared_weights, "gemm", "logits", "NCHW"),
    # Quirks of real exports (issue 12): heads behind other nodes, computed weights, element types.
    "nhwc_cast_chain": (nhwc_cast_chain, "matmul_add", "probabilities", "NHWC"),
    "softmax_4d_transposed": (softmax_4d_transposed, "conv1x1", "probabilities", "NCHW"),
    "reshaped_matmul_weight": (reshaped_matmul_weight, "matmul_add", "logits", "NCHW"),
    "float64_input": (mixed_precision, "matmul_add", "logits", "NCHW"),
    "uint8_input": (lambda: mixed_precision(TensorProto.UINT8), "matmul_add", "logits", "NCHW"),
}


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` and return the path."""
    onnx.save(model, str(path))
    return path


# arch -> (constructor keyword arguments, smallest input size that keeps every pooling valid)
TORCHVISION_ARCHS: dict[str, tuple[dict, int]] = {
    "mobilenet_v2": ({}, 32),
    "resnet18": ({}, 32),
    "squeezenet1_0": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 32),
    "densenet121": ({}, 32),
    "efficientnet_b0": ({}, 32),
}


def build_torch(arch: str):
    """A torchvision (or timm, for efficientnet_lite0) model with random weights in eval mode."""
    import torch

    torch.manual_seed(0)
    if arch == "efficientnet_lite0":
        import timm

        model = timm.create_model("efficientnet_lite0", pretrained=False)
    else:
        import torchvision

        kwargs, _ = TORCHVISION_ARCHS[arch]
        model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    model.eval()
    # Random BatchNorm statistics, so that a converter mixing them up cannot pass by accident.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def input_size(arch: str) -> int:
    """Smallest input side the tests use for `arch`."""
    return 32 if arch == "efficientnet_lite0" else TORCHVISION_ARCHS[arch][1]


def export_arch(arch: str, opset: int, path: Path) -> Path:
    """Export `arch` with random weights and BatchNorm kept unfused (no constant folding)."""
    import torch

    model = build_torch(arch)
    size = input_size(arch)
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        torch.randn(1, 3, size, size),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    path.write_bytes(buffer.getvalue())
    return path


class ExportCache:
    """Exports each (arch, opset) once per test session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[tuple[str, int], Path] = {}

    def __call__(self, arch: str, opset: int) -> Path:
        key = (arch, opset)
        if key not in self.paths:
            self.paths[key] = export_arch(arch, opset, self.folder / f"{arch}-{opset}.onnx")
        return self.paths[key]


@functools.cache
def import_cached(path: str):
    """`pipeline.convert.import_model(path)`, once per session (callers must not mutate the result)."""
    from pipeline.convert import import_model

    return import_model(path)


def add_output(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate value `value` (cheaper than Extractor)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_empty_tensor_value_info(value))
    return copy
