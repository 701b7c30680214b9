"""Normalising zoo ONNX graphs so onnx2torch converts them: opsets, constants, shared weights, batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.convert.cleanup import explicit_pads, fold_and_prune, to_float32
from zoo.errors import UnsupportedModel
from zoo.legacy import TARGET_OPSET

if TYPE_CHECKING:
    import onnx

ONNX_DOMAINS = ("", "ai.onnx")
# onnx2torch documents opsets 9-16 as tested and recommends 13 (zoo.legacy.TARGET_OPSET): older
# files are upgraded to it.
MIN_CONVERTIBLE_OPSET = 9
BATCH_DIM_PARAM = "batch"
# Inputs of these ops are configuration (shapes, scales, clip bounds), never trainable weights.
CONFIG_OPS = frozenset(
    {"Reshape", "Resize", "Upsample", "Clip", "Pad", "Slice", "Expand", "Tile", "ConstantOfShape"}
    | {"Range", "Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum", "Gather", "Split", "TopK"}
)
BN_STAT_INPUTS = (3, 4)  # running mean and variance of BatchNormalization


class OpKey(NamedTuple):
    """One operator as onnx2torch's registry keys it."""

    domain: str
    op_type: str
    version: int


def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in ((domain,) if domain not in ONNX_DOMAINS else ONNX_DOMAINS):
            return entry.version
    return 0


def _registry() -> dict[Any, Any]:
    import onnx2torch.node_converters  # noqa: F401  (importing fills the registry)
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    return _CONVERTER_REGISTRY


def _op_key(node: onnx.NodeProto, opset: int) -> OpKey:
    """The key onnx2torch looks up for `node`: its schema's since-version at the model's opset."""
    from onnx import defs

    domain = node.domain if node.domain not in ONNX_DOMAINS else ""
    try:
        version = defs.get_schema(node.op_type, opset, domain).since_version
    except (RuntimeError, defs.SchemaError):
        version = opset
    return OpKey(domain, node.op_type, version)


def unconvertible_ops(model: onnx.ModelProto) -> list[OpKey]:
    """Every (domain, op type, since-version) of the graph that onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import OperationDescription

    registry = _registry()
    opsets = {entry.domain or "": entry.version for entry in model.opset_import}
    missing: set[OpKey] = set()
    for node in model.graph.node:
        domain = node.domain if node.domain not in ONNX_DOMAINS else ""
        key = _op_key(node, opsets.get(domain, opsets.get("ai.onnx", 0)))
        if OperationDescription(key.domain, key.op_type, key.version) not in registry:
            missing.add(key)
    return sorted(missing)


def describe_ops(ops: list[OpKey]) -> str:
    return ", ".join(
        f"{op.op_type} (domain {op.domain or 'ai.onnx'!r}, version {op.version})" for op in ops
    )


def refuse_custom_domains(model: onnx.ModelProto, name: str) -> None:
    """Fail before any work when the graph uses operators outside the standard ONNX domain."""
    custom = [op for op in unconvertible_ops(model) if op.domain not in ONNX_DOMAINS]
    if custom:
        raise UnsupportedModel(
            f"model {name!r} uses custom operators onnx2torch cannot convert: {describe_ops(custom)}; "
            "pick another model from `zoo list`"
        )


def _upgrade_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Upgrade to TARGET_OPSET files older than onnx2torch takes or with op versions it lacks.

    Opset 1-6 files (old idioms, no onnxruntime kernels) and opset-7/8 files (BatchNormalization-7,
    Gemm-7, Dropout-7, Flatten-1) go through the one upgrade path, `zoo.legacy.upgrade_opset`.
    """
    from zoo.legacy import upgrade_opset

    opset = _opset(model)
    if opset >= MIN_CONVERTIBLE_OPSET and not unconvertible_ops(model):
        return model
    upgrade = upgrade_opset(model, target=TARGET_OPSET)
    if upgrade.upgraded:
        notes.append(upgrade.summary())
    return upgrade.model


def _ir_version_of(model: onnx.ModelProto) -> int:
    """The IR version that the model's standard opset came with (at least 4)."""
    from onnx import helper

    return max(4, helper.OP_SET_ID_VERSION_MAP.get(("ai.onnx", _opset(model)), 4))


def _fold_constants(model: onnx.ModelProto, notes: list[str]) -> None:
    """Turn Constant nodes into initializers and bypass Identity nodes of initializers, in place.

    torch's legacy exporter shares identical weights through Identity/Constant nodes; onnx2torch then
    fails looking up a Conv bias. This does what `onnxslim.slim` does for them without fusing anything
    else (fusing BatchNorm into Conv would change which weights train).
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    renamed: dict[str, str] = {}
    kept = []
    n_constants = n_identities = 0
    for node in graph.node:
        inputs = [renamed.get(name, name) for name in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if (
            node.op_type == "Constant"
            and node.output[0] not in outputs
            and len(node.attribute) == 1
        ):
            attr = node.attribute[0]
            if attr.name == "value":
                tensor = numpy_helper.from_array(numpy_helper.to_array(attr.t), node.output[0])
                graph.initializer.append(tensor)
                initializers.add(node.output[0])
                n_constants += 1
                continue
        if (
            node.op_type == "Identity"
            and node.input[0] in initializers
            and node.output[0] not in outputs
        ):
            renamed[node.output[0]] = node.input[0]
            n_identities += 1
            continue
        kept.append(node)
    if n_constants or n_identities:
        del graph.node[:]
        graph.node.extend(kept)
        notes.append(
            f"folded {n_constants} Constant and {n_identities} Identity nodes into initializers"
        )


def weight_initializers(model: onnx.ModelProto) -> list[str]:
    """Names of the float initializers that are weights: not BatchNorm statistics, scalars or shapes."""
    from onnx import TensorProto

    floats = {
        init.name: init
        for init in model.graph.initializer
        if init.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    }
    excluded: set[str] = set()
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if node.op_type in CONFIG_OPS and index > 0:
                excluded.add(name)
            if node.op_type == "BatchNormalization" and index in BN_STAT_INPUTS:
                excluded.add(name)
    names = []
    for name, init in floats.items():
        numel = 1
        for dim in init.dims:
            numel *= dim
        if name not in excluded and numel > 1:
            names.append(name)
    return names


def _unshare_weights(model: onnx.ModelProto, notes: list[str]) -> None:
    """Give every consumer of a shared weight its own copy, as the original network had."""
    weights = set(weight_initializers(model)) | _bn_stats(model)
    by_name = {init.name: init for init in model.graph.initializer}
    seen: set[str] = set()
    n_copies = 0
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in weights:
                continue
            if name in seen:
                copy = model.graph.initializer.add()
                copy.CopyFrom(by_name[name])
                copy.name = f"{name}__copy{n_copies}"
                node.input[index] = copy.name
                n_copies += 1
            seen.add(node.input[index])
    if n_copies:
        notes.append(f"un-shared {n_copies} weight uses so each layer trains its own copy")


def _bn_stats(model: onnx.ModelProto) -> set[str]:
    return {
        node.input[index]
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for index in BN_STAT_INPUTS
        if index < len(node.input)
    }


def _make_batch_dynamic(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
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


def _complete_shapes(model: onnx.ModelProto, notes: list[str]) -> None:
    """Record shapes that ONNX inference could not derive, by running onnxruntime once.

    onnx2torch needs the rank of BatchNormalization inputs; channel shuffles compute their
    Reshape targets with Shape/Div/Cast chains that static inference does not follow.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    known = {
        value.name for value in model.graph.value_info if value.type.tensor_type.HasField("shape")
    }
    known |= {value.name for value in model.graph.output} | {
        init.name for init in model.graph.initializer
    }
    missing = [out for node in model.graph.node for out in node.output if out and out not in known]
    if not missing:
        return
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    del probe_model.graph.output[:]
    probe_model.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(name) for name in missing
    )
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = np.zeros(dims, dtype=np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    try:
        session = ort.InferenceSession(
            probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        results = session.run(missing, feeds)
    except Exception:  # shapes stay unknown; conversion reports what it cannot handle
        return
    existing = {value.name: value for value in model.graph.value_info}
    for name, array in zip(missing, results, strict=True):
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            continue
        dims: list[int | str] = list(array.shape)
        if len(dims) >= 2:
            dims[0] = BATCH_DIM_PARAM  # a float tensor of rank >= 2 carries the batch first
        info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)
        if name in existing:
            existing[name].CopyFrom(info)
        else:
            model.graph.value_info.append(info)
    notes.append(f"recorded {len(missing)} tensor shapes that static inference left open")


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


def _symbolic_dims(model: onnx.ModelProto, notes: list[str]) -> None:
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


def normalise(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Return a copy upgraded to a convertible opset, with constants folded and a dynamic batch."""
    import onnx

    notes: list[str] = []
    normalised = onnx.ModelProto()
    normalised.CopyFrom(model)
    normalised = _upgrade_opset(normalised, notes)
    # Initializers listed as graph inputs (old exporters) would become placeholders in torch,
    # and constant folding would take them for inputs a user may override.
    init_names = {init.name for init in normalised.graph.initializer}
    graph_inputs = [value for value in normalised.graph.input if value.name not in init_names]
    if len(graph_inputs) != len(normalised.graph.input):
        del normalised.graph.input[:]
        normalised.graph.input.extend(graph_inputs)
        notes.append("removed initializers from the graph inputs")
    # Below IR 4 an initializer must also be an input: shape inference ignores the others.
    normalised.ir_version = max(normalised.ir_version, _ir_version_of(normalised))
    _symbolic_dims(normalised, notes)
    to_float32(normalised, notes)
    normalised = fold_and_prune(normalised, notes) or normalised
    _fold_constants(normalised, notes)  # what onnxslim did not take, e.g. when it failed
    _unshare_weights(normalised, notes)
    normalised = explicit_pads(normalised, notes)
    normalised = _make_batch_dynamic(normalised, notes)
    _complete_shapes(normalised, notes)
    return normalised, notes
