"""Tiny classifiers in the idioms of the ONNX Model Zoo's opset 1-6 files, each with a modern twin.

The zoo's oldest files (2017, Caffe2 and CNTK exporters) use what later opsets removed:
`consumed_inputs` on BatchNormalization/Relu/Add/Sum/Dropout, `is_test` and `spatial` on
BatchNormalization and Dropout, Reshape with a `shape` attribute, `broadcast`/`axis` on Gemm and the
arithmetic ops, initializers listed as graph inputs, unnamed nodes, and value_info entries whose
element type is undefined (0). `legacy_classifier(kind, opset)` writes one network in those idioms at
opsets 1-6; at opset 13 it writes the same network (same weights) in today's idioms, the reference an
upgraded copy must match.

Kinds mirror the zoo's families at opsets 1-6:
- caffe: AlexNet/CaffeNet/ZFNet/GoogLeNet/VGG/R-CNN: Conv+bias, Relu, LRN, MaxPool, an inception-like
  Concat, AveragePool, Reshape to [1, C], Gemm (broadcast, transB), Dropout (is_test), Softmax;
- bn: DenseNet/ResNet50-caffe2/Inception-v2: Conv without bias, BatchNormalization (consumed_inputs,
  is_test, spatial), Relu, a residual Sum, GlobalAveragePool, Reshape, Gemm, Softmax;
- squeeze: SqueezeNet 1.0: Conv, Relu, MaxPool, fire Concat, Dropout, 1x1 Conv, GlobalAveragePool,
  Softmax over a 4-D [1, K, 1, 1] output;
- shuffle: ShuffleNet v1: grouped Conv, channel shuffle (Reshape 5-D, Transpose, Reshape), BatchNorm,
  Add, AveragePool, Flatten, Gemm, Softmax;
- cntk: MNIST-1: grayscale input, Conv without bias plus Add(broadcast, axis) of a [C] bias, MaxPool,
  Reshape to [1, -1], MatMul by a Reshape of an initializer, Add of a [1, K] bias (logits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KINDS = ("caffe", "bn", "squeeze", "shuffle", "cntk")
LEGACY_IR_VERSION = 3  # what the 2017 exporters wrote; onnx still loads it
MODERN_OPSET = 13


class _Graph:
    """Collects nodes and initializers of one network, old or modern idioms by `opset`."""

    def __init__(self, opset: int, seed: int) -> None:
        self.opset = opset
        self.old = opset < 7
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.untyped: list[str] = []  # intermediate values old files list with element type 0
        self.count = 0

    def weight(self, name: str, shape: tuple[int, ...], *, fan_in: int | None = None) -> str:
        scale = np.sqrt(2.0 / fan_in) if fan_in else 0.1
        values = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def positive(self, name: str, shape: tuple[int, ...]) -> str:
        values = (self.rng.uniform(0.5, 1.5, shape)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], out: str, *, outputs: int = 1, **attrs) -> str:
        names = [out] + [f"{out}_extra{i}" for i in range(1, outputs)]
        # The old exporters left nodes unnamed; modern ones name them.
        name = "" if self.old else f"{out}/{op}"
        self.nodes.append(helper.make_node(op, inputs, names, name=name, **attrs))
        return out

    def consumed(self, n_inputs: int, consumed: tuple[int, ...] = ()) -> dict:
        """`consumed_inputs` as opset < 6 wrote it (gone since opset 6)."""
        if self.opset >= 6:
            return {}
        return {"consumed_inputs": [1 if i in consumed else 0 for i in range(n_inputs)]}

    def conv(
        self, x: str, out: str, cin: int, cout: int, k: int, *, bias: bool = True, group: int = 1
    ) -> str:
        w = self.weight(f"{out}_w", (cout, cin // group, k, k), fan_in=cin // group * k * k)
        inputs = [x, w] + ([self.weight(f"{out}_b", (cout,))] if bias else [])
        pad = k // 2
        return self.node(
            "Conv", inputs, out, kernel_shape=[k, k], pads=[pad] * 4, strides=[1, 1], group=group
        )

    def relu(self, x: str, out: str) -> str:
        return self.node("Relu", [x], out, **self.consumed(1, (0,)))

    def batch_norm(self, x: str, out: str, channels: int) -> str:
        inputs = [
            x,
            self.positive(f"{out}_s", (channels,)),
            self.weight(f"{out}_bias", (channels,)),
            self.weight(f"{out}_rm", (channels,)),
            self.positive(f"{out}_riv", (channels,)),
        ]
        attrs: dict = {"epsilon": 1e-5}
        if self.old:
            # Caffe2 wrote all three: statistics as consumed inputs, test mode, per-channel.
            attrs |= {"is_test": 1, "spatial": 1, **self.consumed(5, (3, 4))}
        return self.node("BatchNormalization", inputs, out, **attrs)

    def reshape(self, x: str, out: str, shape: list[int]) -> str:
        if self.opset < 5:
            return self.node("Reshape", [x], out, shape=shape)
        target = numpy_helper.from_array(np.asarray(shape, dtype=np.int64), f"{out}_shape")
        self.inits.append(target)
        return self.node("Reshape", [x, target.name], out)

    def dropout(self, x: str, out: str) -> str:
        if self.old:
            return self.node(
                "Dropout", [x], out, outputs=2, ratio=0.5, is_test=1, **self.consumed(1)
            )
        return self.node("Dropout", [x], out)

    def gemm(self, x: str, out: str, cin: int, cout: int) -> str:
        w = self.weight(f"{out}_w", (cout, cin), fan_in=cin)
        b = self.weight(f"{out}_b", (cout,))
        attrs = {"transB": 1} | ({"broadcast": 1} if self.old else {})
        return self.node("Gemm", [x, w, b], out, **attrs)

    def bias_add(self, x: str, out: str, channels: int) -> str:
        """A per-channel bias: Add(broadcast=1, axis=1) of a [C] vector before opset 7."""
        if self.old:
            b = self.weight(f"{out}_b", (channels,))
            return self.node("Add", [x, b], out, broadcast=1, axis=1, **self.consumed(2))
        b = self.weight(f"{out}_b", (channels, 1, 1))
        return self.node("Add", [x, b], out)


def _caffe(g: _Graph, size: int, classes: int) -> tuple[str, list[int]]:
    x = g.relu(g.conv("data_0", "conv1_1", 3, 8, 3), "conv1_2")
    x = g.node("LRN", [x], "norm1_1", size=3, alpha=1e-4, beta=0.75, bias=1.0)
    x = g.node("MaxPool", [x], "pool1_1", kernel_shape=[2, 2], strides=[2, 2])
    g.untyped.append(x)
    # An inception-style pair of branches joined on the channel axis.
    left = g.relu(g.conv(x, "inc_1x1_1", 8, 4, 1), "inc_1x1_2")
    right = g.relu(g.conv(x, "inc_3x3_1", 8, 4, 3), "inc_3x3_2")
    x = g.node("Concat", [left, right], "inc_output_1", axis=1)
    half = size // 2
    x = g.node("AveragePool", [x], "pool5_1", kernel_shape=[half, half], strides=[1, 1])
    x = g.reshape(x, "OC2_DUMMY_0", [1, 8])
    x = g.relu(g.gemm(x, "fc6_1", 8, 8), "fc6_2")
    x = g.dropout(x, "fc6_3")
    x = g.gemm(x, "fc7_1", 8, classes)
    return g.node("Softmax", [x], "prob_1", axis=1), [1, classes]


def _bn(g: _Graph, size: int, classes: int) -> tuple[str, list[int]]:
    x = g.relu(
        g.batch_norm(g.conv("data_0", "conv1_1", 3, 8, 3, bias=False), "conv1_bn", 8), "conv1_2"
    )
    g.untyped.append(x)
    y = g.relu(g.batch_norm(g.conv(x, "res2_a", 8, 8, 3, bias=False), "res2_a_bn", 8), "res2_a_r")
    y = g.batch_norm(g.conv(y, "res2_b", 8, 8, 1, bias=False), "res2_b_bn", 8)
    x = g.relu(g.node("Sum", [x, y], "res2_sum", **g.consumed(2, (0,))), "res2_relu")
    x = g.node("GlobalAveragePool", [x], "pool5_1")
    x = g.reshape(x, "OC2_DUMMY_1", [1, 8])
    x = g.gemm(x, "pred_1", 8, classes)
    return g.node("Softmax", [x], "softmax_1"), [1, classes]


def _squeeze(g: _Graph, size: int, classes: int) -> tuple[str, list[int]]:
    x = g.relu(g.conv("data_0", "conv1_1", 3, 8, 3), "conv1_2")
    x = g.node("MaxPool", [x], "pool1_1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    squeezed = g.relu(g.conv(x, "fire2_squeeze", 8, 4, 1), "fire2_squeeze_r")
    g.untyped.append(squeezed)
    left = g.relu(g.conv(squeezed, "fire2_e1", 4, 6, 1), "fire2_e1_r")
    right = g.relu(g.conv(squeezed, "fire2_e3", 4, 6, 3), "fire2_e3_r")
    x = g.node("Concat", [left, right], "fire2_concat", axis=1)
    x = g.dropout(x, "fire9_drop")
    x = g.relu(g.conv(x, "conv10_1", 12, classes, 1), "conv10_2")
    x = g.node("GlobalAveragePool", [x], "pool10_1")
    return g.node("Softmax", [x], "softmaxout_1", axis=1), [1, classes, 1, 1]


def _shuffle(g: _Graph, size: int, classes: int) -> tuple[str, list[int]]:
    x = g.relu(
        g.batch_norm(g.conv("data_0", "conv1", 3, 8, 3, bias=False), "conv1_bn", 8), "conv1_r"
    )
    y = g.batch_norm(g.conv(x, "gconv1", 8, 8, 1, bias=False, group=2), "gconv1_bn", 8)
    # Channel shuffle of 2 groups of 4, as Caffe2's ChannelShuffle was exported.
    y = g.reshape(y, "shuffle_5d", [1, 2, 4, size, size])
    y = g.node("Transpose", [y], "shuffle_t", perm=[0, 2, 1, 3, 4])
    y = g.reshape(y, "shuffle_4d", [1, 8, size, size])
    g.untyped.append(y)
    y = g.batch_norm(g.conv(y, "dwconv", 8, 8, 3, bias=False, group=8), "dwconv_bn", 8)
    x = g.relu(g.node("Add", [x, y], "unit_add", **g.consumed(2)), "unit_relu")
    x = g.node("AveragePool", [x], "pool_1", kernel_shape=[size, size], strides=[1, 1])
    x = g.node("Flatten", [x], "flat_1", axis=1)
    x = g.gemm(x, "fc_1", 8, classes)
    return g.node("Softmax", [x], "softmax_1"), [1, classes]


def _cntk(g: _Graph, size: int, classes: int) -> tuple[str, list[int]]:
    x = g.bias_add(g.conv("Input3", "Convolution28", 1, 8, 5, bias=False), "Plus30", 8)
    x = g.relu(x, "ReLU32")
    x = g.node("MaxPool", [x], "Pooling66", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    g.untyped.append(x)
    x = g.relu(
        g.bias_add(g.conv(x, "Convolution110", 8, 4, 5, bias=False), "Plus112", 4), "ReLU114"
    )
    quarter = size // 2
    flat = 4 * quarter * quarter
    x = g.reshape(x, "Pooling160_reshape0", [1, flat])
    weight = g.weight("Parameter193", (4, quarter, quarter, classes), fan_in=flat)
    weight = g.reshape(weight, "Parameter193_reshape1", [flat, classes])
    x = g.node("MatMul", [x, weight], "Times212")
    bias = g.weight("Parameter194", (1, classes))
    return g.node("Add", [x, bias], "Plus214", **g.consumed(2)), [1, classes]


_BODIES = {"caffe": _caffe, "bn": _bn, "squeeze": _squeeze, "shuffle": _shuffle, "cntk": _cntk}


def legacy_classifier(
    kind: str, opset: int, *, size: int = 16, classes: int = 3, seed: int = 0
) -> onnx.ModelProto:
    """One tiny classifier of `kind` at `opset` (1-6: old idioms; 13: today's), same weights."""
    g = _Graph(opset, seed)
    channels = 1 if kind == "cntk" else 3
    input_name = "Input3" if kind == "cntk" else "data_0"
    output, output_shape = _BODIES[kind](g, size, classes)
    inputs = [
        helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, channels, size, size])
    ]
    if g.old:
        # IR version 3 lists every initializer as a graph input too.
        inputs += [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.inits
        ]
    graph = helper.make_graph(
        g.nodes,
        f"legacy_{kind}",
        inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        g.inits,
    )
    if g.old:
        graph.value_info.extend(
            helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in g.untyped
        )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="legacy-builders"
    )
    model.ir_version = LEGACY_IR_VERSION if g.old else 7
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` as it is (no checker: old idioms are what it is about)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
