"""Probe an ONNX classifier: input layout and size, output kind, the head and the feature tensor it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.convert.cleanup import source_input_type
from pipeline.core.registry import Registry
from zoo.errors import UnsupportedModel

if TYPE_CHECKING:
    import onnx

DEFAULT_SIZE = 224
# Ops that pass a tensor on without computing anything a head cares about (type, shape, axis order).
PASSTHROUGH_OPS = frozenset(
    {"Identity", "Dropout", "Cast", "Transpose", "Flatten", "Reshape", "Squeeze", "Unsqueeze"}
)
# Ops that may follow the classifier without changing which class wins (pooling, reshapes, activations).
TRAILING_OPS = PASSTHROUGH_OPS | {"Softmax", "LogSoftmax", "Relu"} | {"GlobalAveragePool", "AveragePool", "ReduceMean"}  # fmt: skip
OUTPUT_KINDS = ("logits", "probabilities", "relu_scores")
CONV_KINDS = frozenset({"conv1x1", "conv_kxk"})  # heads whose feature tensor is a spatial map


class HeadMatch(NamedTuple):
    """What a head-kind matcher found: the feature tensor, the head's nodes and its size."""

    feature_name: str  # ONNX value the head reads
    node_names: tuple[str, ...]  # ONNX node names of the head, input side first
    num_classes: int
    feature_dim: int


class HeadKind(NamedTuple):
    """A kind of classifier head and the function that recognises it at the last scoring node."""

    name: str
    layer: str  # what the head is in torch terms, for reports
    match: Callable[[GraphIndex, onnx.NodeProto], HeadMatch | None]


HEAD_KINDS: Registry[HeadKind] = Registry("head kind", error=UnsupportedModel)


def register_head_kind(
    name: str, *, layer: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a head matcher under `name`; a second registration of the same name is refused."""
    return HEAD_KINDS.decorator(name, lambda match: HeadKind(name, layer, match))


def head_kind(name: str) -> HeadKind:
    """Look up a head kind by name."""
    return HEAD_KINDS.lookup(name)


@dataclass(frozen=True)
class ProbeResult:
    """What the pipeline needs to know about a classifier graph."""

    input_name: str
    layout: str  # "NCHW" or "NHWC"
    input_size: tuple[int, int]  # (height, width); 224 where the graph leaves it open
    channels: int
    output_name: str
    output_kind: str  # "logits", "probabilities" (a trailing Softmax) or "relu_scores" (SqueezeNet)
    output_rank: int  # 2, or 4 for [N, C, 1, 1] outputs (SqueezeNet 1.0, DenseNet)
    head_kind: str  # a key of HEAD_KINDS
    head_nodes: tuple[str, ...]  # ONNX node names of the old head
    feature_name: str  # ONNX value feeding the head: cut here to compute cached features
    feature_spatial: bool  # True when the feature tensor is [N, C, H, W] and needs global pooling
    feature_dim: int  # channels of the feature tensor, e.g. 1280 for EfficientNet-Lite0
    num_classes: int  # classes of the old head
    dynamic_batch: bool  # whether the graph input's batch dimension is free
    # Element type the source file declares for its input (numpy name): a uint8 or float64 input is
    # imported as float32 and declared again by the export, with a Cast inside.
    input_type: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON."""
        from dataclasses import asdict

        return asdict(self)


class GraphIndex:
    """Producers, consumers, initializers and inferred shapes of one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {value.name for value in graph.output}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.shapes: dict[str, list[int | str]] = {}
        for value in list(graph.value_info) + list(graph.input) + list(graph.output):
            if value.type.tensor_type.HasField("shape"):
                self.shapes[value.name] = [
                    dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
                    for dim in value.type.tensor_type.shape.dim
                ]
        for name, init in self.initializers.items():
            self.shapes[name] = list(init.dims)

    def weight_dims(self, name: str) -> list[int] | None:
        """Dimensions of an initializer, or None when `name` is computed."""
        init = self.initializers.get(name)
        return list(init.dims) if init is not None else None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@register_head_kind("gemm", layer="Linear (Gemm)")
def _match_gemm(index: GraphIndex, node: onnx.NodeProto) -> HeadMatch | None:
    if node.op_type != "Gemm" or _attr(node, "transA", 0):
        return None
    dims = index.weight_dims(node.input[1])
    if dims is None or len(dims) != 2:
        return None
    out_dim, in_dim = (dims[0], dims[1]) if _attr(node, "transB", 0) else (dims[1], dims[0])
    return HeadMatch(node.input[0], (node.name,), out_dim, in_dim)


@register_head_kind("matmul_add", layer="Linear (MatMul+Add)")
def _match_matmul(index: GraphIndex, node: onnx.NodeProto) -> HeadMatch | None:
    nodes = [node]
    if node.op_type == "Add":
        computed = [name for name in node.input if name not in index.initializers]
        if len(computed) != 1 or computed[0] not in index.producer:
            return None
        node = index.producer[computed[0]]
        while node.op_type in ("Cast", "Identity") and node.input[0] in index.producer:
            nodes.insert(0, node)  # a Cast between MatMul and Add belongs to the old head
            node = index.producer[node.input[0]]
        nodes.insert(0, node)
    if node.op_type != "MatMul":
        return None
    dims = index.weight_dims(node.input[1])
    if dims is None or len(dims) != 2:
        return None
    return HeadMatch(node.input[0], tuple(n.name for n in nodes), dims[1], dims[0])


@register_head_kind("conv1x1", layer="1x1 Conv")
def _match_conv(index: GraphIndex, node: onnx.NodeProto) -> HeadMatch | None:
    if node.op_type != "Conv":
        return None
    dims = index.weight_dims(node.input[1])
    if dims is None or len(dims) != 4 or dims[2:] != [1, 1] or _attr(node, "group", 1) != 1:
        return None
    return HeadMatch(node.input[0], (node.name,), dims[0], dims[1])


# Ops after a k x k scoring conv that average its map over space: what makes it a classifier head.
SPATIAL_POOLS = frozenset({"GlobalAveragePool", "AveragePool", "ReduceMean"})


@register_head_kind("conv_kxk", layer="k x k Conv + global pool")
def _match_conv_kxk(index: GraphIndex, node: onnx.NodeProto) -> HeadMatch | None:
    """A k x k scoring conv averaged over space (all-convolutional nets, Keras via tf2onnx).

    Its input is the feature tensor, pooled: a linear head on the pooled input equals the conv
    followed by the average except at the borders, where the conv sees padding (zoo replaces it
    so; the closing note of issue 27 measured both). A conv whose map is not averaged (a conv
    acting as a dense layer over the whole map) is not matched: pooling first would be wrong.
    """
    if node.op_type != "Conv" or _attr(node, "group", 1) != 1:
        return None
    dims = index.weight_dims(node.input[1])
    if dims is None or len(dims) != 4 or dims[2:] == [1, 1]:
        return None
    if not _pooled_downstream(index, node.output[0]):
        return None
    return HeadMatch(node.input[0], (node.name,), dims[0], dims[1])


def _pooled_downstream(index: GraphIndex, value: str) -> bool:
    """True when `value` reaches the graph output through trailing ops, one a spatial average."""
    pooled = False
    while value not in index.outputs:
        users = index.consumers.get(value, [])
        if len(users) != 1 or users[0].op_type not in TRAILING_OPS:
            return False
        pooled = pooled or users[0].op_type in SPATIAL_POOLS
        value = users[0].output[0]
    return pooled


def _input_layout(index: GraphIndex, name: str, dims: list[int | str]) -> str:
    """NHWC when the last axis looks like channels or a leading Transpose moves it to NCHW."""
    pending, seen = [name], set()
    while pending:  # through Casts and Identities: uint8 inputs are cast before the Transpose
        for node in index.consumers.get(pending.pop(), []):
            if node.op_type == "Transpose" and list(_attr(node, "perm", [])) == [0, 3, 1, 2]:
                return "NHWC"
            if node.op_type in ("Cast", "Identity") and node.output[0] not in seen:
                seen.add(node.output[0])
                pending.append(node.output[0])
    if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def probe(model_or_imported: Any) -> ProbeResult:
    """Find the input layout and size, the output kind, the classifier head and its feature tensor."""
    import onnx

    model = getattr(model_or_imported, "onnx_model", model_or_imported)
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    index = GraphIndex(model)
    inputs = [value for value in model.graph.input if value.name not in index.initializers]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise UnsupportedModel(
            f"expected one image input, found {len(inputs)}; only single-input classifiers are supported"
        )
    input_name = inputs[0].name
    dims = index.shapes.get(input_name, [])
    if len(dims) != 4:
        raise UnsupportedModel(
            f"input {input_name!r} has shape {dims}, not an image batch; pick an image classifier"
        )
    layout = _input_layout(index, input_name, dims)
    spatial = dims[1:3] if layout == "NHWC" else dims[2:4]
    channels = dims[3] if layout == "NHWC" else dims[1]
    size = tuple(d if isinstance(d, int) and d > 0 else DEFAULT_SIZE for d in spatial)
    output_name = model.graph.output[0].name
    node, output_kind = _walk_back(index, output_name)
    for kind in HEAD_KINDS.values():
        found = kind.match(index, node)
        if found is not None:
            break
    else:
        raise UnsupportedModel(
            f"no known classifier head ({', '.join(HEAD_KINDS)}) ends at node {node.name or node.op_type!r}; "
            "this model cannot be adapted"
        )
    feature_shape = index.shapes.get(found.feature_name, [])
    return ProbeResult(
        input_name=input_name,
        layout=layout,
        input_size=(int(size[0]), int(size[1])),
        channels=int(channels) if isinstance(channels, int) else 3,
        output_name=output_name,
        output_kind=output_kind,
        output_rank=len(index.shapes.get(output_name, [])) or 2,
        head_kind=kind.name,
        head_nodes=found.node_names,
        feature_name=found.feature_name,
        feature_spatial=len(feature_shape) > 2 or kind.name in CONV_KINDS,
        feature_dim=int(found.feature_dim),
        num_classes=int(found.num_classes),
        dynamic_batch=not isinstance(dims[0], int) or dims[0] == 0,
        input_type=source_input_type(model),
    )


def _positive_scalar(index: GraphIndex, name: str) -> bool:
    """Whether `name` is one constant number above zero (an initializer or a Constant node)."""
    from onnx import numpy_helper

    init = index.initializers.get(name)
    producer = index.producer.get(name)
    if init is None and producer is not None and producer.op_type == "Constant":
        init = next((a.t for a in producer.attribute if a.name == "value"), None)
    if init is None:
        return False
    value = numpy_helper.to_array(init)
    return value.size == 1 and float(value.reshape(())) > 0


def _walk_back(index: GraphIndex, output_name: str) -> tuple[onnx.NodeProto, str]:
    """Skip trailing softmax/ReLU/pool/reshape/cast nodes and positive scalings (a temperature) to the
    last scoring node.

    A Softmax on any axis makes the output probabilities; a LogSoftmax gives log-probabilities,
    which are logits as far as the arg-max and a softmax go.
    """
    kind = "logits"
    name = output_name
    while True:
        node = index.producer.get(name)
        if node is None:
            raise UnsupportedModel(
                f"output {output_name!r} is not computed by any node; the graph is broken"
            )
        if node.op_type in ("Div", "Mul") and _positive_scalar(index, node.input[1]):
            name = node.input[0]  # a temperature or a logit scale: the same class wins
            continue
        if node.op_type not in TRAILING_OPS:
            return node, kind
        if node.op_type == "Softmax" and kind == "logits":
            kind = "probabilities"
        elif node.op_type == "Relu" and kind == "logits":
            kind = "relu_scores"
        name = node.input[0]
