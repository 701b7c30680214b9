"""Dynamic dimensions: a fixed batch of 1 freed, and sizes written as -1 or 0 named.

Zoo files fix the batch at 1 (57 of 94) and old converters write "any size" as -1 or 0; training
needs a free batch, and onnx2torch and onnxruntime need the others named rather than numbered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

BATCH_DIM_PARAM = "batch"


def symbolic_dims(model: onnx.ModelProto, notes: list[str]) -> None:
    """Name the dimensions written as -1 or 0 (older paddle2onnx, some tf2onnx), in place.

    Such files mean "any size" but say it with a number: constant folding and shape inference
    would then bake -1 or 0 into computed Reshape targets, which onnxruntime refuses ("Invalid
    Target shape product of 0"). A named dimension says the same thing in ONNX's own words.
    """
    graph = model.graph
    renamed = []
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not value.type.tensor_type.HasField("shape"):
            continue
        for position, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                dim.dim_param = BATCH_DIM_PARAM if position == 0 else f"{value.name}_dim{position}"
                renamed.append(value.name)
    inputs = sorted({value.name for value in graph.input} & set(renamed))
    if renamed:
        notes.append(
            f"named {len(renamed)} dimension(s) written as -1 or 0"
            + (f" (inputs {', '.join(inputs)})" if inputs else "")
        )


def make_batch_dynamic(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Free a fixed batch of 1 on inputs, outputs and Reshapes that hard-code it, e.g. to [1, -1]."""
    import onnx
    from onnx import numpy_helper

    initializer_names = {init.name for init in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    leading: dict[str, int | str | None] = {}
    for value in list(inferred.value_info) + list(inferred.input):
        dims = value.type.tensor_type.shape.dim
        first = (dims[0].dim_value or dims[0].dim_param) if len(dims) else None
        # A leading 1 (fixed batch) or a named dimension (declared dynamic batch) is the batch.
        leading[value.name] = first if first == 1 or isinstance(first, str) and first else None
    changed = []
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in initializer_names or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM_PARAM
            changed.append(value.name)
    by_name = {init.name: init for init in model.graph.initializer}
    reductions = _keep_batch_in_reductions(model, inferred, leading, by_name)
    reshapes = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in by_name or node.input[0] in by_name:
            continue
        shape = numpy_helper.to_array(by_name[node.input[1]])
        # Only where the data's leading axis is the batch: a [C] -> [1, C, 1, 1] broadcast stays.
        if shape.ndim != 1 or len(shape) < 2 or shape[0] != 1 or leading.get(node.input[0]) is None:
            continue
        shape = shape.copy()
        shape[0] = 0  # 0 copies the input's leading dimension (allowzero=0), which is the batch
        fixed = model.graph.initializer.add()
        fixed.CopyFrom(numpy_helper.from_array(shape, f"{node.input[1]}__batch{reshapes}"))
        node.input[1] = fixed.name
        reshapes += 1
    if changed or reshapes or reductions:
        del model.graph.value_info[:]
        kept = f", {reductions} reduction(s) kept off the batch axis" if reductions else ""
        notes.append(
            f"made the batch dimension dynamic ({', '.join(changed) or 'no I/O'}; "
            f"{reshapes} Reshape(s){kept})"
        )
    # data_prop resolves shapes computed by Shape->Gather->Concat chains (channel shuffles).
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


REDUCTIONS = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
}


def _keep_batch_in_reductions(
    model: onnx.ModelProto,
    inferred: onnx.GraphProto,
    leading: dict[str, int | str | None],
    by_name: dict[str, onnx.TensorProto],
) -> int:
    """Take axis 0 out of reductions over a fixed batch of 1, where that changes nothing at 1.

    At a batch of 1 a ReduceMean over axes [0, 2, 3] averages each image alone; with the batch
    freed it would average the images of a batch together. Without axis 0 it gives the same
    values at 1, and one row per image at N. Where keepdims=0 dropped the batch axis, the result
    keeps it instead, which only Reshapes that re-add a leading 1 may consume (they are then freed
    like the others). Other cases are left alone; the import refuses a model that still mixes
    the images of a batch (pipeline.convert).
    """
    from onnx import helper

    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in list(inferred.value_info) + list(inferred.input)
        if value.type.tensor_type.HasField("shape")
    }
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = 0
    for node in model.graph.node:
        data = node.input[0] if node.input else ""
        if node.op_type not in REDUCTIONS or leading.get(data) is None or data not in ranks:
            continue
        axes = _reduced_axes(node, by_name, ranks[data])
        if axes is None or 0 not in axes:
            continue
        keepdims = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get(
            "keepdims", 1
        )
        users = consumers.get(node.output[0], [])
        if not keepdims and not all(_reshape_to_leading_one(user, by_name) for user in users):
            continue
        _drop_axis_zero(model, node, [a for a in axes if a != 0], by_name)
        leading[node.output[0]] = 1
        kept += 1
    return kept


def _reduced_axes(
    node: onnx.NodeProto, by_name: dict[str, onnx.TensorProto], rank: int
) -> list[int] | None:
    """The axes a reduction reduces, non-negative; None when they are computed at run time or none."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    from_input = len(node.input) > 1 and node.input[1] != ""
    if from_input and node.input[1] not in by_name:
        return None  # axes computed at run time: nothing to rewrite safely
    axes = (
        numpy_helper.to_array(by_name[node.input[1]]).tolist()
        if from_input
        else list(attrs.get("axes", []))
    )
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return None
    return [a % rank for a in axes] if axes else list(range(rank))


def _drop_axis_zero(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    rest: list[int],
    by_name: dict[str, onnx.TensorProto],
) -> None:
    """Make a reduction reduce `rest` only (its axes less the batch axis), in place."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not rest:  # it reduced only the batch of 1: the values pass through unchanged
        node.op_type = "Identity"
        del node.input[1:]
        del node.attribute[:]
    elif len(node.input) > 1 and node.input[1] in by_name:
        fixed = model.graph.initializer.add()
        fixed.CopyFrom(
            numpy_helper.from_array(np.asarray(rest, dtype=np.int64), f"{node.input[1]}__batch")
        )
        node.input[1] = fixed.name
    else:
        for attribute in node.attribute:
            if attribute.name == "axes":
                attribute.CopyFrom(helper.make_attribute("axes", rest))


def _reshape_to_leading_one(node: onnx.NodeProto, by_name: dict[str, onnx.TensorProto]) -> bool:
    """A Reshape of its data input to a constant shape [1, ...]."""
    from onnx import numpy_helper

    if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in by_name:
        return False
    shape = numpy_helper.to_array(by_name[node.input[1]])
    return shape.ndim == 1 and len(shape) >= 2 and shape[0] == 1
