"""Normalising zoo ONNX graphs so onnx2torch converts them: opsets, constants, shared weights, batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.convert.batch import BATCH_DIM_PARAM, make_batch_dynamic, symbolic_dims
from pipeline.convert.cleanup import explicit_pads, fold_and_prune, to_float32
from zoo.errors import UnsupportedModel
from zoo.legacy import TARGET_OPSET

if TYPE_CHECKING:
    import onnx

ONNX_DOMAINS = ("", "ai.onnx")
# onnx2torch documents opsets 9-16 as tested and recommends 13 (zoo.legacy.TARGET_OPSET): older
# files are upgraded to it.
MIN_CONVERTIBLE_OPSET = 9
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
    symbolic_dims(normalised, notes)
    to_float32(normalised, notes)
    normalised = fold_and_prune(normalised, notes) or normalised
    _fold_constants(normalised, notes)  # what onnxslim did not take, e.g. when it failed
    _unshare_weights(normalised, notes)
    normalised = explicit_pads(normalised, notes)
    normalised = make_batch_dynamic(normalised, notes)
    _complete_shapes(normalised, notes)
    return normalised, notes
