"""Export an adapted torch model to a self-describing ONNX file, behind the verification gate.

The file gets two outputs (`logits` and `probs`), a dynamic batch, and `metadata_props` that name
the classes and the preprocessing, so that anyone holding only the `.onnx` can use it. It is
written under a temporary name in the target folder, verified there, and only then renamed into
place: a failed export never leaves a file that looks finished, nor touches an earlier good one.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The metadata format lives in pipeline.core.metadata (verify reads it too); the old names still work.
from pipeline.core.metadata import (  # noqa: F401
    KNOWN_KEYS,
    PREFIX,
    ModelMetadata,
    decode_metadata,
    encode_metadata,
    metadata_of,
    metadata_problems,
    read_metadata,
)
from pipeline.core.sessions import as_input_type
from pipeline.export.verify import VerifyInputs, VerifyReport, eval_on_cpu
from pipeline.export.verify import verify as run_gate
from zoo.errors import UnsupportedModel, VerificationFailed
from zoo.files import disk_errors, write_json

if TYPE_CHECKING:
    import onnx
    import torch

OUTPUT_NAMES = ("logits", "probs")
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf cannot serialise a single message past 2 GB
REPORT_NAME = "verify.json"


def zoo_version() -> str:
    """The installed version of the `zoo` tool."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zoo")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ExportResult:
    """What `export_model` wrote and how it was checked."""

    path: Path
    size: int  # bytes on disk, external data included
    opset: int
    input_name: str
    layout: str
    input_shape: tuple[int, ...]  # without the batch, in `layout` order
    num_classes: int
    verified: bool  # False only when the gate was skipped with verify=False
    report: VerifyReport | None
    report_path: Path | None  # verify.json beside the file
    external_data: Path | None  # the .data file, for models over the threshold
    slimmed: bool  # onnxslim simplified the graph (else its error is in notes)
    notes: list[str] = field(default_factory=list)


def output_names(model: Any) -> tuple[str, ...]:
    """The exported file's outputs: `logits`, `probs`, then any the model adds (`ood_score`)."""
    return tuple(getattr(model, "output_names", OUTPUT_NAMES))


class _WithProbs:
    """Builds the export wrapper lazily so importing this module does not import torch."""

    @staticmethod
    def wrap(model: torch.nn.Module, *, cast_input: bool = False) -> torch.nn.Module:
        import torch

        class WithProbs(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                if (
                    cast_input
                ):  # the file keeps its source's uint8/float64 input; torch computes in float32
                    x = x.to(torch.float32)
                # A model with its own outputs (pipeline.train.trust.TrustedModel: calibrated
                # probs, the unknown score) gives them all, `output_names` naming them.
                if hasattr(self.inner, "outputs"):
                    return tuple(self.inner.outputs(x))
                logits = torch.flatten(self.inner(x), 1)  # 4-D [B,N,1,1] heads become [B,N]
                return logits, torch.softmax(logits, dim=1)

        return WithProbs(model).eval()


def _let_onnx2torch_see_the_opset() -> None:
    """onnx2torch's converted Shape/Gather/Squeeze/Reduce modules read the export opset from
    `torch.onnx.symbolic_helper`, where torch >= 2.9 no longer keeps it; point them at its new home."""
    import torch.onnx.symbolic_helper as helper

    if hasattr(helper, "GLOBALS") or hasattr(helper, "_export_onnx_opset_version"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except (
        ImportError
    ):  # a torch that moved it again: converted models without those ops still export
        return
    helper.GLOBALS = GLOBALS


def _torch_export(model: torch.nn.Module, path: Path, *, input_name: str, input_shape: tuple[int, ...], opset: int, input_type: str = "float32") -> None:  # fmt: skip
    import numpy as np
    import torch

    _let_onnx2torch_see_the_opset()

    dummy = torch.from_numpy(
        as_input_type(np.random.default_rng(0).uniform(0, 255, (1, *input_shape)), input_type)
    )
    outputs = output_names(model)
    dynamic = {name: {0: "batch"} for name in (input_name, *outputs)}
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy; dynamo needs onnxscript, which we do not ship.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _WithProbs.wrap(model, cast_input=input_type != "float32"),
            (dummy,),
            str(path),
            input_names=[input_name],
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _slim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The onnxslim-simplified graph if it checks, else the original and why."""
    import onnx
    import onnxslim

    try:
        slimmed = onnxslim.slim(model)
        onnx.checker.check_model(slimmed, full_check=True)
    except Exception as exc:  # any failure of an optional simplification keeps the plain graph
        return (
            model,
            f"onnxslim failed ({type(exc).__name__}: {str(exc)[:200]}); kept the unslimmed graph",
        )
    return slimmed, None


def _serialized_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # protobuf refuses to size messages past its limit
        return EXTERNAL_DATA_THRESHOLD + 1


@dataclass(frozen=True)
class _Staging:
    """The target file, and the temporary folder beside it where the export is written and verified.

    The external-data file must already carry its final name inside the graph, so both files are
    written and verified in the folder before either moves.
    """

    out: Path
    work: Path

    @classmethod
    def beside(cls, out: Path) -> _Staging:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
        work.mkdir()
        return cls(out, work)

    @property
    def data_name(self) -> str:
        return f"{self.out.name}.data"

    @property
    def staged(self) -> Path:
        return self.work / self.out.name

    @property
    def data_path(self) -> Path:
        return self.out.parent / self.data_name

    def publish(self, *, external: bool) -> int:
        """Rename the staged file (and its data file) into place; their size on disk in bytes."""
        with disk_errors(self.out, next_step="export to another folder"):
            if external:
                # The data file moves first: the graph that names it must never arrive before it.
                os.replace(self.work / self.data_name, self.data_path)
            os.replace(self.staged, self.out)
        if not external:
            self.data_path.unlink(missing_ok=True)  # a stale file from an earlier export
        return self.out.stat().st_size + (self.data_path.stat().st_size if external else 0)


def export_model(
    model: torch.nn.Module,
    out_path: str | os.PathLike[str],
    *,
    input_name: str,
    layout: str,
    input_shape: Sequence[int],
    opset: int = 17,
    metadata: Mapping[str, Any],
    verify_inputs: VerifyInputs | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    verify: bool = True,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD,
    input_type: str | None = None,
) -> ExportResult:
    """Export `model` (input -> logits) to `out_path` with logits+probs outputs, metadata and the gate.

    The input keeps `input_type` (default: the element type of the model's source file, from its
    probe), so a file that took uint8 or float64 images still does, with a Cast inside.
    """
    if input_type is None:
        input_type = getattr(getattr(model, "probe", None), "input_type", "float32")
    shape = _checked_shape(layout, input_shape, verify_inputs)
    staging = _Staging.beside(Path(out_path))
    notes: list[str] = []
    try:
        graph, slimmed = _build_graph(model, staging.work, input_name=input_name, input_shape=shape, opset=opset, notes=notes, input_type=input_type)  # fmt: skip
        num_classes = _attach_metadata(graph, metadata, input_name=input_name, layout=layout, shape=shape, notes=notes)  # fmt: skip
        external = _serialized_size(graph) > external_data_threshold_bytes
        _save_checked(graph, staging.staged, data_name=staging.data_name if external else None)
        report = report_path = None
        if verify:
            report, report_path = _gate(model, staging.staged, staging.out, verify_inputs, shape, atol=atol, rtol=rtol, notes=notes)  # fmt: skip
        else:
            notes.append(
                "verification skipped (verify=False): the file was not compared with torch"
            )
        size = staging.publish(external=external)
        return ExportResult(
            path=staging.out,
            size=size,
            opset=opset,
            input_name=input_name,
            layout=layout,
            input_shape=shape,
            num_classes=num_classes,
            verified=verify,
            report=report,
            report_path=report_path,
            external_data=staging.data_path if external else None,
            slimmed=slimmed,
            notes=notes,
        )
    finally:
        shutil.rmtree(staging.work, ignore_errors=True)


def _checked_shape(
    layout: str, input_shape: Sequence[int], verify_inputs: VerifyInputs | None
) -> tuple[int, ...]:
    """The input shape as ints, once the layout and the verify inputs' shape are known to fit."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
    shape = tuple(int(d) for d in input_shape)
    if verify_inputs is not None and verify_inputs.all_inputs.shape[1:] != shape:
        raise ValueError(
            f"verify inputs have shape {verify_inputs.all_inputs.shape[1:]}, the model takes {shape}"
        )
    return shape


def _attach_metadata(
    graph: onnx.ModelProto,
    metadata: Mapping[str, Any],
    *,
    input_name: str,
    layout: str,
    shape: tuple[int, ...],
    notes: list[str],
) -> int:
    """Describe the graph with `metadata` (noting what does not fit it); its number of classes."""
    num_classes = graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    labels = metadata.get("labels") or metadata.get(PREFIX + "labels")
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {num_classes} outputs")
    props = encode_metadata({"version": zoo_version(), "input_name": input_name, "layout": layout, **metadata})  # fmt: skip
    _describe(graph, props, num_classes=num_classes)
    notes += [f"metadata: {problem}" for problem in metadata_problems(decode_metadata(props), num_classes=num_classes, input_shape=shape)]  # fmt: skip
    return num_classes


def _build_graph(
    model: torch.nn.Module,
    work: Path,
    *,
    input_name: str,
    input_shape: tuple[int, ...],
    opset: int,
    notes: list[str],
    input_type: str = "float32",
) -> tuple[onnx.ModelProto, bool]:
    """Trace the model with a probs output, then simplify; returns the graph and whether slim worked."""
    import onnx

    with eval_on_cpu(model):
        try:
            _torch_export(model, work / "raw.onnx", input_name=input_name, input_shape=input_shape, opset=opset, input_type=input_type)  # fmt: skip
        except Exception as exc:
            raise UnsupportedModel(
                f"torch.onnx.export failed at opset {opset} ({type(exc).__name__}: {str(exc)[:300]}); "
                "try another --opset (13 is the most widely supported)"
            ) from exc
    graph, slim_note = _slim(onnx.load(str(work / "raw.onnx")))
    if slim_note:
        notes.append(slim_note)
    return graph, slim_note is None


def _describe(graph: onnx.ModelProto, props: Mapping[str, str], *, num_classes: int) -> None:
    """Write the metadata_props, producer and doc string that make the file self-describing."""
    del graph.metadata_props[:]
    for key, value in sorted(props.items()):
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "zoo"
    graph.producer_version = zoo_version()
    graph.doc_string = (
        f"zoo classifier: {num_classes} classes; outputs logits and probs [batch, {num_classes}]; "
        "metadata_props zoo.labels and zoo.preprocess say how to use it"
    )
    if len(graph.graph.output) > 2:  # the unknown score: zoo.ood says how to read it
        graph.doc_string += f"; {graph.graph.output[2].name} [batch] with its threshold in zoo.ood"


def _save_checked(graph: onnx.ModelProto, staged: Path, *, data_name: str | None) -> None:
    """Save (with external data named `data_name`, if given) and run the full ONNX checker."""
    import onnx

    with disk_errors(staged, next_step="export to another folder"):
        if data_name:
            onnx.save(graph, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=0)  # fmt: skip
        else:
            onnx.save(graph, str(staged))
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as exc:
        raise VerificationFailed(
            f"the exported graph fails onnx.checker ({str(exc)[:300]}); report this with the model name"
        ) from exc


def _gate(
    model: torch.nn.Module,
    staged: Path,
    out: Path,
    inputs: VerifyInputs | None,
    shape: tuple[int, ...],
    *,
    atol: float,
    rtol: float,
    notes: list[str],
) -> tuple[VerifyReport, Path]:
    """Run the oracle on the staged file; write verify.json; raise VerificationFailed on failure."""
    if inputs is None:
        notes.append("verified on random tensors only: no test images were given")
        inputs = VerifyInputs.random_only(shape)
    report = run_gate(model, staged, inputs, atol=atol, rtol=rtol)
    report.onnx_path = str(out)  # the staged name is gone by the time anyone reads the report
    report_path = out.parent / REPORT_NAME
    payload = {**report.to_dict(), "written": report.passed}
    with disk_errors(report_path, next_step="export to another folder"):
        write_json(report_path, payload)
    if not report.passed:
        reason = "; ".join(report.failures) or report.summary()
        raise VerificationFailed(
            f"the exported ONNX does not match the torch model ({reason}); {out.name} was not written, "
            f"see {report_path}"
        )
    return report, report_path
