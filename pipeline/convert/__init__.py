"""Import stage: a zoo ONNX classifier becomes a trainable torch.fx module that matches onnxruntime.

`normalise` (in `pipeline.convert.normalisation`) prepares the graph; this module converts it, keeps
every float weight trainable and measures import fidelity against onnxruntime.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.convert import importcache
from pipeline.convert.normalisation import (
    BATCH_DIM_PARAM,
    CONFIG_OPS,
    ONNX_DOMAINS,
    TARGET_OPSET,
    OpKey,
    describe_ops,
    normalise,
    refuse_custom_domains,
    unconvertible_ops,
    weight_initializers,
)
from pipeline.convert.probe import probe
from zoo.errors import ImportFidelityError, UnsupportedModel, ZooError
from zoo.legacy import UnupgradableModel, default_opset, refusal
from zoo.onnxfile import load_onnx, runnable_source
from zoo.quantized import refuse_quantized

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import onnx
    from torch import fx

    from pipeline.convert.probe import ProbeResult

__all__ = [
    "BATCH_DIM_PARAM",
    "CONFIG_OPS",
    "FIDELITY_TOLERANCE",
    "ONNX_DOMAINS",
    "TARGET_OPSET",
    "Fidelity",
    "ImportedModel",
    "OpKey",
    "check_fidelity",
    "convert_onnx",
    "import_model",
    "normalise",
    "sample_batch",
    "unconvertible_ops",
    "weight_initializers",
]

FIDELITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Fidelity:
    """How closely the converted module matches onnxruntime on the same inputs."""

    max_abs: float  # largest absolute difference over all outputs
    top1_agreement: float  # fraction of samples whose arg-max class agrees
    n_inputs: int  # number of samples compared
    # Largest absolute onnxruntime output: above 1 the tolerance is relative to it.
    scale: float = 1.0


@dataclass
class ImportedModel:
    """A converted model with its normalised ONNX graph, probe result and fidelity figures."""

    module: fx.GraphModule
    onnx_model: onnx.ModelProto
    probe: ProbeResult
    fidelity: Fidelity | None
    notes: list[str] = field(default_factory=list)
    name: str = "model"
    source_opset: int = 0  # the file's own opset; onnx_model is at TARGET_OPSET when it was older


def _buffers_to_parameters(module: fx.GraphModule, onnx_model: onnx.ModelProto) -> int:
    """Turn float initializer buffers that are ONNX weights into trainable parameters."""
    import torch
    from onnx2torch.onnx_graph import OnnxGraph

    weights = set(weight_initializers(onnx_model))
    onnx_nodes = OnnxGraph(onnx_model.graph).nodes
    try:
        container = module.get_submodule("initializers")
    except AttributeError:
        return 0  # no computed-operand initializers at all
    converted = 0
    for node in module.graph.nodes:
        if node.op != "get_attr" or not node.target.startswith("initializers."):
            continue
        names = set()
        for user in node.users:
            if user.op != "call_module" or user.target not in onnx_nodes:
                continue
            onnx_inputs = onnx_nodes[user.target].input_values
            for position, arg in enumerate(user.args):
                if arg is node and position < len(onnx_inputs):
                    names.add(onnx_inputs[position])
        attr = node.target.split(".", 1)[1]
        tensor = container._buffers.get(attr)
        if tensor is None or not tensor.is_floating_point() or not names or not names <= weights:
            continue
        del container._buffers[attr]
        container.register_parameter(attr, torch.nn.Parameter(tensor.clone()))
        converted += 1
    return converted


def convert_onnx(onnx_model: onnx.ModelProto) -> fx.GraphModule:
    """Convert a normalised graph with onnx2torch, keeping every float weight trainable."""
    from onnx2torch import convert

    try:
        module = convert(onnx_model)
    except (NotImplementedError, KeyError, ValueError) as exc:
        raise UnsupportedModel(
            f"onnx2torch could not convert the graph ({type(exc).__name__}: {exc}); pick another model"
        ) from exc
    _buffers_to_parameters(module, onnx_model)
    return module


def sample_batch(probe: ProbeResult, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random standard-normal inputs in the model's layout and size."""
    import numpy as np

    height, width = probe.input_size
    shape = (
        (batch, height, width, probe.channels)
        if probe.layout == "NHWC"
        else (batch, probe.channels, height, width)
    )
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check_fidelity(
    module: fx.GraphModule,
    onnx_model: onnx.ModelProto,
    inputs: np.ndarray,
    *,
    input_name: str,
) -> Fidelity:
    """Run onnxruntime (CPU) and the torch module on the same inputs and compare their outputs."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.log_severity_level = 3  # an initializer normalisation left unused is no news to a user
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    reference = session.run(None, {input_name: inputs})[0]
    _refuse_batch_mixing(session, inputs, reference, input_name=input_name)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        output = module(torch.from_numpy(inputs))
    module.train(was_training)
    if isinstance(output, (tuple, list)):
        output = output[0]
    actual = output.detach().numpy()
    if actual.shape != reference.shape:
        raise ImportFidelityError(
            f"the converted model outputs shape {actual.shape}, onnxruntime {reference.shape}; "
            "report this model, it cannot be imported"
        )
    flat_ref = reference.reshape(len(reference), -1)
    flat_act = actual.reshape(len(actual), -1)
    return Fidelity(
        max_abs=float(np.max(np.abs(flat_ref - flat_act))) if flat_ref.size else 0.0,
        top1_agreement=float(np.mean(flat_ref.argmax(1) == flat_act.argmax(1))),
        n_inputs=len(inputs),
        scale=float(np.max(np.abs(flat_ref))) if flat_ref.size else 0.0,
    )


def _refuse_batch_mixing(
    session: Any, inputs: np.ndarray, batched: np.ndarray, *, input_name: str
) -> None:
    """Fail when an image's output depends on the other images of its batch.

    A graph written for a batch of exactly 1 may reduce or reshape over axis 0 (a ReduceMean over
    axes [0, 2, 3], say); once its batch is freed, training batches would mix their images and
    the export gate would fail only after training. Two images alone against the batch say so
    at import.
    """
    import numpy as np

    if len(inputs) < 2:
        return  # a single image has no batch to be mixed with
    for index in range(2):
        alone = session.run(None, {input_name: inputs[index : index + 1]})[0]
        difference = float(np.max(np.abs(alone - batched[index : index + 1]), initial=0.0))
        scale = float(np.max(np.abs(alone), initial=0.0))
        if difference > FIDELITY_TOLERANCE * max(1.0, scale):
            raise UnsupportedModel(
                f"the model's output for one image changes with the other images of its batch "
                f"(by up to {difference:.3g}): its graph assumes a batch of 1 (e.g. a reduction "
                "over axis 0), so it cannot be trained in batches; export it from its framework "
                "with a dynamic batch, or pick another model"
            )


def import_model(
    onnx_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    check_fidelity: bool = True,
    sample_inputs: np.ndarray | None = None,
    cache_dir: Path | None = None,
) -> ImportedModel:
    """Load, normalise, convert and check an ONNX classifier against onnxruntime.

    With `cache_dir`, a checked import is kept there and a later import of the same bytes (with
    the same libraries) converts the stored normalised graph instead (`importcache`).
    """
    name = name or os.path.splitext(os.path.basename(os.fspath(onnx_path)))[0]
    if cache_dir is None or not check_fidelity or sample_inputs is not None:
        return _import_file(
            onnx_path, name=name, check_fidelity=check_fidelity, sample_inputs=sample_inputs
        )

    try:
        key = importcache.cache_key(onnx_path, opset=TARGET_OPSET, tolerance=FIDELITY_TOLERANCE)
    except OSError:  # not a readable file: the import says so in its own words
        return _import_file(onnx_path, name=name, check_fidelity=True, sample_inputs=None)
    cached = importcache.load(cache_dir, key)
    if cached is not None:
        try:
            return _from_cache(*cached, name=name)
        except Exception:  # an entry that parses but does not convert: never fail a run over it
            importcache.discard(cache_dir, key)
    imported = _import_file(onnx_path, name=name, check_fidelity=True, sample_inputs=None)
    verdict = {
        "fidelity": dataclasses.asdict(imported.fidelity),
        "notes": list(imported.notes),
        "source_opset": imported.source_opset,
    }
    importcache.store(cache_dir, key, imported.onnx_model, verdict)
    return imported


def _from_cache(
    normalised: onnx.ModelProto, verdict: dict[str, Any], *, name: str
) -> ImportedModel:
    """A checked import again, from its stored normalised graph: converted, not re-checked."""

    return ImportedModel(
        convert_onnx(normalised),
        normalised,
        probe(normalised),
        Fidelity(**verdict["fidelity"]),
        list(verdict["notes"]),
        name,
        source_opset=int(verdict["source_opset"]),
    )


def _import_file(
    onnx_path: str | os.PathLike[str],
    *,
    name: str,
    check_fidelity: bool,
    sample_inputs: np.ndarray | None,
) -> ImportedModel:

    model = load_onnx(onnx_path)
    refuse_quantized(
        model, label=name, path=onnx_path
    )  # before its QLinear ops read as "custom operators"
    refuse_custom_domains(model, name)
    try:
        return _import_checked(
            model, name=name, check_fidelity=check_fidelity, sample_inputs=sample_inputs
        )
    except UnupgradableModel as exc:
        raise refusal(exc, name=name) from exc
    except ZooError:
        raise
    except Exception as exc:  # onnx, onnx2torch or torch.fx fail in many ways: say so once
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        if _onnxruntime_opens(onnx_path):
            # The file is sound: what failed is zoo's rewrite of it, and fetching again won't help.
            raise UnsupportedModel(
                f"model {name!r} runs in onnxruntime, but normalising it for PyTorch failed "
                f"({type(exc).__name__}: {detail}); the file is not damaged: report this model "
                "with that line, or pick another model"
            ) from exc
        raise UnsupportedModel(
            f"model {name!r} could not be imported ({type(exc).__name__}: {detail}); "
            "the file may be damaged: fetch it again with --force, or pick another model"
        ) from exc


def _onnxruntime_opens(onnx_path: str | os.PathLike[str]) -> bool:
    """True when onnxruntime loads the original file (its own opset upgrade aside)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # its complaints are the question asked, not news
    try:
        ort.InferenceSession(
            runnable_source(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    except Exception:  # any refusal means: not a file onnxruntime takes as it is
        return False
    return True


def _import_checked(
    model: onnx.ModelProto, *, name: str, check_fidelity: bool, sample_inputs: np.ndarray | None
) -> ImportedModel:

    normalised, notes = normalise(model)
    missing = unconvertible_ops(normalised)
    if missing:
        raise UnsupportedModel(
            f"model {name!r} uses operators onnx2torch cannot convert: {describe_ops(missing)}; "
            "pick another model or opset from `zoo list`"
        )
    found = probe(normalised)  # a graph without a recognisable head fails before converting
    module = convert_onnx(normalised)
    fidelity = None
    if check_fidelity:
        fidelity = _measure(module, normalised, found, sample_inputs)
        if fidelity.max_abs > FIDELITY_TOLERANCE * max(1.0, fidelity.scale):
            raise ImportFidelityError(
                f"model {name!r} converts with a max difference of {fidelity.max_abs:.3g} from onnxruntime "
                f"(tolerance {FIDELITY_TOLERANCE:g}); report it and pick another model or opset"
            )
    return ImportedModel(
        module, normalised, found, fidelity, notes, name, source_opset=default_opset(model)
    )


def _measure(
    module: fx.GraphModule,
    onnx_model: onnx.ModelProto,
    found: ProbeResult,
    sample_inputs: np.ndarray | None,
) -> Fidelity:
    """Compare on random inputs, plus any real-looking inputs given, and merge the figures."""
    import numpy as np

    batches = [sample_batch(found)]
    if sample_inputs is not None:
        batches.append(np.asarray(sample_inputs, dtype=np.float32))
    results = [
        check_fidelity(module, onnx_model, batch, input_name=found.input_name) for batch in batches
    ]
    n_inputs = sum(result.n_inputs for result in results)
    return Fidelity(
        max_abs=max(result.max_abs for result in results),
        top1_agreement=sum(r.top1_agreement * r.n_inputs for r in results) / n_inputs,
        n_inputs=n_inputs,
        scale=max(result.scale for result in results),
    )
