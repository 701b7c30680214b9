"""Graph clean-up before conversion: one element type, folded constant weights, no redundant nodes.

Real exports compute weights with small constant sub-graphs (CNTK reshapes its MatMul weight,
converters transpose or cast theirs), wrap tensors in Casts and Identities, and some compute in
float16 or float64 or take uint8 images. onnx2torch would keep a computed weight as a frozen buffer
and a head behind such nodes is hard to find, so the graph is brought to float32 and onnxslim folds
the constants and drops the no-op nodes; only what onnxslim lacks is written here.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

# metadata_props key of a normalised graph whose input type was changed to float32: the source's type.
SOURCE_INPUT_TYPE_KEY = "zoo.source_input_type"
# onnxslim passes that would change which weights train (Conv+BN fusion, tied or merged weights).
SLIM_SKIPPED = ["graph_fusion", "subexpression_elimination", "weight_tying"]
# Ops whose attribute names an output element type.
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype"}


def _float_types() -> frozenset[int]:
    from onnx import TensorProto

    return frozenset({TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


def type_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type, e.g. 'float32', 'uint8'."""
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type).name


def _tensor_to_float32(tensor: onnx.TensorProto) -> None:
    import numpy as np
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def to_float32(model: onnx.ModelProto, notes: list[str]) -> None:
    """Make a graph that computes partly in float16/float64 compute in float32, in place.

    A uint8/int/float16/float64 image input whose every consumer is a Cast becomes a float32 input
    (its Cast then casts float to float and is removed); the source type is kept in metadata_props
    so that the export can declare it again.
    """
    from onnx import TensorProto

    floats = _float_types()
    graph = model.graph
    n_weights = 0
    for init in graph.initializer:
        if init.data_type in floats:
            _tensor_to_float32(init)
            n_weights += 1
    n_nodes = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == DTYPE_ATTRS.get(node.op_type) and attr.i in floats:
                attr.i = TensorProto.FLOAT
                n_nodes += 1
            elif attr.name == "value" and attr.t.data_type in floats:  # Constant, ConstantOfShape
                _tensor_to_float32(attr.t)
                n_nodes += 1
    for value in list(graph.value_info) + list(graph.output):
        if value.type.tensor_type.elem_type in floats:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    initializer_names = {init.name for init in graph.initializer}
    for value in graph.input:
        tensor_type = value.type.tensor_type
        if value.name in initializer_names or tensor_type.elem_type == TensorProto.FLOAT:
            continue
        consumers = [node for node in graph.node if value.name in node.input]
        cast_only = consumers and all(node.op_type == "Cast" for node in consumers)
        if tensor_type.elem_type in floats or cast_only:
            source = type_name(tensor_type.elem_type)
            tensor_type.elem_type = TensorProto.FLOAT
            model.metadata_props.add(key=SOURCE_INPUT_TYPE_KEY, value=source)
            notes.append(f"input {value.name!r} is {source}: imported as float32")
    if n_weights or n_nodes:
        notes.append(
            f"computes in float32: converted {n_weights} float16/float64 weights and {n_nodes} nodes"
        )


def source_input_type(model: onnx.ModelProto) -> str:
    """The element type the source file declared for its input, as a numpy name."""
    for prop in model.metadata_props:
        if prop.key == SOURCE_INPUT_TYPE_KEY:
            return prop.value
    initializer_names = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializer_names:
            return type_name(value.type.tensor_type.elem_type or 1)
    return "float32"


def fold_and_prune(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto | None:
    """onnxslim's constant folding and dead-node elimination only; None when onnxslim fails.

    Folding turns weights computed from initializers (Reshape/Transpose/Cast/Unsqueeze chains,
    Constant nodes) into initializers; elimination drops Identity, Dropout, Casts to the type a
    tensor already has, identity Transposes and other no-ops. Fusions stay off: folding BatchNorm
    into Conv or tying equal weights would change which weights train.
    """
    import onnx
    import onnxslim

    before = Counter(node.op_type for node in model.graph.node)
    try:
        typed = onnx.shape_inference.infer_shapes(model)  # Cast elimination needs element types
        slimmed = onnxslim.slim(typed, skip_optimizations=SLIM_SKIPPED, no_shape_infer=True)
    except Exception:  # a graph onnxslim cannot take is folded by hand (see normalisation)
        return None
    if slimmed is None:
        return None
    produced = {out for node in slimmed.graph.node for out in node.output}
    kept = [value for value in slimmed.graph.value_info if value.name in produced]
    del slimmed.graph.value_info[:]
    slimmed.graph.value_info.extend(kept)
    del slimmed.metadata_props[:]
    slimmed.metadata_props.extend(model.metadata_props)
    removed = before - Counter(node.op_type for node in slimmed.graph.node)
    if removed:
        listed = ", ".join(f"{count} {op}" for op, count in sorted(removed.items()))
        notes.append(f"folded constants and removed no-op nodes ({listed})")
    return slimmed


AUTO_PAD_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})


def explicit_pads(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Replace `auto_pad` SAME_UPPER/SAME_LOWER (CNTK, TF exports) by explicit pads, which onnx2torch needs.

    The pads are those of the graph's own input size; with a stride of 1 they hold for any size.
    """
    import onnx

    if not any(
        attr.name == "auto_pad" and attr.s in (b"SAME_UPPER", b"SAME_LOWER")
        for node in model.graph.node
        if node.op_type in AUTO_PAD_OPS
        for attr in node.attribute
    ):
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in list(inferred.graph.value_info) + list(inferred.graph.input)
    }
    initializers = {init.name: list(init.dims) for init in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        auto = next((a for a in node.attribute if a.name == "auto_pad"), None)
        if node.op_type not in AUTO_PAD_OPS or auto is None or auto.s not in (b"SAME_UPPER", b"SAME_LOWER"):  # fmt: skip
            continue
        spatial = shapes.get(node.input[0], [])[2:]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = attrs.get("kernel_shape") or initializers.get(node.input[1], [])[2:]
        if not spatial or not all(spatial) or len(kernel) != len(spatial):
            continue  # unknown sizes: left to onnx2torch, which says what it cannot convert
        strides = attrs.get("strides") or [1] * len(spatial)
        dilations = attrs.get("dilations") or [1] * len(spatial)
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto.s == b"SAME_UPPER" else large)
            ends.append(large if auto.s == b"SAME_UPPER" else small)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))
        changed += 1
    if changed:
        notes.append(f"made the SAME padding of {changed} node(s) explicit")
    return model
