"""The rewrites `zoo.legacy.upgrade_opset` makes before and after onnx's version converter.

Each takes the model in place and returns the phrases that say what it changed, for the notes.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from zoo.errors import UnupgradableModel

if TYPE_CHECKING:
    import onnx

ONNX_DOMAINS = ("", "ai.onnx")
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
# Attributes that opsets before 7 had and later ones dropped, per op ("*": any op).
OLD_ATTRIBUTES = {
    "*": ("consumed_inputs",),
    "BatchNormalization": ("is_test", "spatial"),
    "Dropout": ("is_test",),
    "Gemm": ("broadcast",),
    "Add": ("broadcast", "axis"),
    "Sub": ("broadcast", "axis"),
    "Mul": ("broadcast", "axis"),
    "Div": ("broadcast", "axis"),
    "Pow": ("broadcast", "axis"),
    "Reshape": ("shape",),
}


def old_idioms(model: onnx.ModelProto) -> list[str]:
    """Phrases naming each old attribute the upgrade drops, with how many nodes had it."""
    found: Counter[tuple[str, str]] = Counter()
    for node in model.graph.node:
        if node.domain not in ONNX_DOMAINS:
            continue
        names = {attr.name for attr in node.attribute}
        for attr in (*OLD_ATTRIBUTES["*"], *OLD_ATTRIBUTES.get(node.op_type, ())):
            if attr in names:
                found[(node.op_type, attr)] += 1
    by_op: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for (op, attr), count in found.items():
        by_op.setdefault(op, []).append(attr)
        counts[op] = max(counts.get(op, 0), count)
    phrases = []
    for op, attrs in by_op.items():
        what = (
            "shape attribute made an input" if attrs == ["shape"] else f"{'/'.join(attrs)} dropped"
        )
        plural = "s" if counts[op] > 1 else ""
        phrases.append(f"{op} {what} ({counts[op]} node{plural})")
    return phrases


def drop_untyped_value_info(model: onnx.ModelProto) -> list[str]:
    """Remove value_info entries whose element type is undefined: onnxruntime refuses them."""
    graph = model.graph
    kept = [value for value in graph.value_info if _typed(value)]
    dropped = len(graph.value_info) - len(kept)
    if not dropped:
        return []
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return [f"{dropped} value_info entr{'ies' if dropped > 1 else 'y'} of undefined type dropped"]


def _typed(value: onnx.ValueInfoProto) -> bool:
    kind = value.type.WhichOneof("value")
    return kind != "tensor_type" or value.type.tensor_type.elem_type != 0


def inference_mode(model: onnx.ModelProto, opset: int) -> list[str]:
    """Run BatchNormalization/Dropout as at inference: is_test=1, training-only outputs unused dropped.

    Caffe2 wrote Dropout with its mask as a second output that nothing reads; onnx2torch converts
    a Dropout with two outputs into something that no longer matches onnxruntime.
    """
    used = {name for node in model.graph.node for name in node.input}
    used |= {value.name for value in model.graph.output}
    to_inference = outputs_dropped = 0
    for node in model.graph.node:
        if node.op_type not in ("BatchNormalization", "Dropout") or node.domain not in ONNX_DOMAINS:
            continue
        for attr in node.attribute:
            if attr.name == "is_test" and attr.i == 0:
                attr.i = 1
                to_inference += 1
        extra = [name for name in node.output[1:] if name in used]
        if extra:
            raise UnupgradableModel(
                opset, f"{node.op_type} feeds its training-only output {extra[0]!r} to the graph"
            )
        if len(node.output) > 1:
            del node.output[1:]
            outputs_dropped += 1
    notes = []
    if to_inference:
        notes.append(
            f"{to_inference} training-mode node{'s' if to_inference > 1 else ''} set to inference"
        )
    if outputs_dropped:
        notes.append(
            f"unused training outputs of {outputs_dropped} node{'s' if outputs_dropped > 1 else ''} dropped"
        )
    return notes


def name_nodes(model: onnx.ModelProto) -> list[str]:
    """Name unnamed nodes after their first output, as the old exporters did not name them.

    Module names in the importer come from node names; "conv1_1" and "fire2_squeeze" show where a
    layer sits, where the importer's fallbacks ("Conv_7") do not.
    """
    taken = {node.name for node in model.graph.node if node.name}
    named = 0
    for node in model.graph.node:
        if node.name or not node.output or not node.output[0] or node.output[0] in taken:
            continue
        node.name = node.output[0]
        taken.add(node.name)
        named += 1
    return (
        [f"{named} unnamed node{'s' if named > 1 else ''} named after their outputs"]
        if named
        else []
    )


class _SoftmaxDetour(NamedTuple):
    """The converter's Flatten -> Softmax -> Reshape(Shape(source)) around one Softmax."""

    flatten: onnx.NodeProto
    reshape: onnx.NodeProto
    shape_node: onnx.NodeProto
    source: str  # the tensor flattened, and whose shape the Reshape restores
    axis: int  # the Flatten's axis: the axis a plain Softmax runs over


def plain_softmax(model: onnx.ModelProto) -> list[str]:
    """Undo the converter's Flatten -> Softmax -> Reshape(Shape) where a plain Softmax is the same.

    Before opset 13 Softmax(axis=a) flattened the axes from `a` on; the converter keeps that with
    Shape/Flatten/Reshape around a last-axis Softmax. When every axis after `a` has size 1 (a 4-D
    [N, K, 1, 1] SqueezeNet output), Softmax over axis `a` alone is the same and heads stay simple.
    """
    graph = model.graph
    shapes = _inferred_dims(model)
    if shapes is None:
        return []
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed: list[onnx.NodeProto] = []
    simplified = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        detour = _softmax_detour(softmax, producers, consumers, shapes)
        if detour is None:
            continue
        softmax.input[0] = detour.source
        softmax.output[0] = detour.reshape.output[0]
        for attr in softmax.attribute:
            if attr.name == "axis":
                attr.i = detour.axis
        removed += [detour.flatten, detour.reshape, detour.shape_node]
        simplified += 1
    if not simplified:
        return []
    kept = [node for node in graph.node if not any(node is r for r in removed)]
    del graph.node[:]
    graph.node.extend(kept)
    return [f"{simplified} Softmax over trailing 1x1 axes kept as one node"]


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | None]] | None:
    """Each tensor's dims after shape inference (None for an unknown dim); None if inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return None
    return {
        value.name: [
            d.dim_value if d.HasField("dim_value") else None
            for d in value.type.tensor_type.shape.dim
        ]
        for value in [*inferred.input, *inferred.value_info, *inferred.output]
        if value.type.tensor_type.HasField("shape")
    }


def _softmax_detour(
    softmax: onnx.NodeProto,
    producers: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    shapes: dict[str, list[int | None]],
) -> _SoftmaxDetour | None:
    """The detour around `softmax` when only trailing size-1 axes are flattened, else None."""
    flatten = producers.get(softmax.input[0])
    users = consumers.get(softmax.output[0], [])
    if flatten is None or flatten.op_type != "Flatten" or len(users) != 1:
        return None
    reshape = users[0]
    shape_node = producers.get(reshape.input[1]) if len(reshape.input) > 1 else None
    if reshape.op_type != "Reshape" or shape_node is None or shape_node.op_type != "Shape":
        return None
    source = flatten.input[0]
    axis = next((a.i for a in flatten.attribute if a.name == "axis"), 1)
    dims = shapes.get(source)
    if (
        shape_node.input[0] != source
        or dims is None
        or any(d != 1 for d in dims[axis % len(dims) + 1 :])
    ):
        return None
    if (
        len(consumers.get(flatten.output[0], [])) != 1
        or len(consumers.get(shape_node.output[0], [])) != 1
    ):
        return None
    return _SoftmaxDetour(flatten, reshape, shape_node, source, axis)


def broadcast_axes(model: onnx.ModelProto, opset: int) -> list[str]:
    """Rewrite Add/Mul/...(broadcast=1, axis=k) at opset 6 into numpy broadcasting, in place.

    Before opset 7, B's first axis lined up with A's axis k (a [C] bias over NCHW at axis 1); from
    opset 7 B lines up with A's last axes, so B needs trailing 1s: an initializer is reshaped (its
    values stay a weight the importer trains), any other tensor goes through an Unsqueeze. The
    converter's own rewrite unsqueezes to A's full rank whatever the axis, which is wrong for these.
    """
    import onnx

    candidates = [
        (index, node)
        for index, node in enumerate(model.graph.node)
        if node.op_type in BROADCAST_OPS
        and node.domain in ONNX_DOMAINS
        and any(a.name == "axis" for a in node.attribute)
        and any(a.name == "broadcast" and a.i == 1 for a in node.attribute)
    ]
    if not candidates:
        return []
    ranks = _ranks(onnx.shape_inference.infer_shapes(model).graph)
    initializers = {init.name: init for init in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    reshaped = unsqueezed = 0
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for index, node in candidates:
        trailing = _drop_axis(node, ranks, opset)
        if trailing <= 0:
            continue  # B already lines up with A's last axes
        bias = initializers.get(node.input[1])
        if bias is not None and uses[bias.name] == 1:
            _append_ones(model, bias, trailing)
            reshaped += 1
            continue
        inserts.append((index, _unsqueeze_b(node, ranks[node.input[1]], trailing, unsqueezed)))
        unsqueezed += 1
    if inserts:
        _insert_before(model, inserts)
    return _broadcast_notes(reshaped=reshaped, unsqueezed=unsqueezed)


def _drop_axis(node: onnx.NodeProto, ranks: dict[str, int], opset: int) -> int:
    """Remove `node`'s axis attribute; how many trailing 1s B needs to line up as it did."""
    axis = next(a.i for a in node.attribute if a.name == "axis")
    rank_a, rank_b = ranks.get(node.input[0]), ranks.get(node.input[1])
    if rank_a is None or rank_b is None:
        raise UnupgradableModel(
            opset, f"{node.op_type} broadcasts along axis {axis} of a tensor of unknown rank"
        )
    trailing = rank_a - (axis % rank_a if rank_a else 0) - rank_b
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept)
    return trailing


def _append_ones(model: onnx.ModelProto, bias: onnx.TensorProto, trailing: int) -> None:
    """Give an initializer `trailing` axes of size 1, keeping its values."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(bias)
    shaped = array.reshape(*array.shape, *[1] * trailing)
    bias.CopyFrom(numpy_helper.from_array(shaped, bias.name))
    _set_input_shape(model, bias.name, list(bias.dims))


def _unsqueeze_b(node: onnx.NodeProto, rank_b: int, trailing: int, number: int) -> onnx.NodeProto:
    """Feed `node` its B through a new Unsqueeze adding `trailing` axes; that Unsqueeze."""
    from onnx import helper

    aligned = f"{node.input[1]}__aligned{number}"
    axes = list(range(rank_b, rank_b + trailing))
    unsqueeze = helper.make_node("Unsqueeze", [node.input[1]], [aligned], axes=axes)
    node.input[1] = aligned
    return unsqueeze


def _broadcast_notes(*, reshaped: int, unsqueezed: int) -> list[str]:
    notes = []
    if reshaped:
        notes.append(
            f"{reshaped} broadcast initializer{'s' if reshaped > 1 else ''} given trailing 1s"
        )
    if unsqueezed:
        notes.append(f"{unsqueezed} broadcast input{'s' if unsqueezed > 1 else ''} unsqueezed")
    return notes


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in [*graph.input, *graph.value_info, *graph.output]
        if value.type.tensor_type.HasField("shape")
    }
    ranks.update({init.name: len(init.dims) for init in graph.initializer})
    return ranks


def _insert_before(model: onnx.ModelProto, inserts: list[tuple[int, onnx.NodeProto]]) -> None:
    """Put each new node just before the node at its index (the list is rebuilt once)."""
    before: dict[int, list[onnx.NodeProto]] = {}
    for index, new in inserts:
        before.setdefault(index, []).append(new)
    nodes = []
    for index, node in enumerate(model.graph.node):
        nodes += before.get(index, [])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _set_input_shape(model: onnx.ModelProto, name: str, dims: list[int]) -> None:
    """Old files list initializers as graph inputs too; keep that entry's shape in step."""
    from onnx import helper

    for value in model.graph.input:
        if value.name == name:
            value.CopyFrom(
                helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, dims)
            )
