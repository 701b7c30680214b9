"""The one oracle: does an exported ONNX file compute what the torch model computes?

`verify` runs the torch model and onnxruntime on the same inputs (real preprocessed images and a
few random tensors, at batch 1 and at batch N) and returns a `VerifyReport`. The export gate,
`zoo verify` and the tests all call it; nobody writes a second comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline.convert.cleanup import type_name
from pipeline.core.metadata import ModelMetadata, metadata_of, metadata_problems
from pipeline.core.sessions import as_input_type, create_session, default_providers
from pipeline.export.runtimes import (
    CHUNK,
    RuntimeReport,
    VerifyInputs,
    logits_of,
    run_session,
    runtime_check,
)
from zoo.errors import InvalidModelFile, NotFound
from zoo.onnxfile import load_onnx

if TYPE_CHECKING:
    import torch

PROBS_TOLERANCE = 1e-4  # how far the probs output may sum away from 1


@dataclass
class ProviderResult:
    """How one onnxruntime execution provider compares with torch."""

    provider: str
    n_inputs: int
    max_abs: float  # of |logits_onnx - logits_torch|
    mean_abs: float
    max_rel: float  # |a - b| / |b|, with |b| floored at 1e-12
    worst_excess: float  # max of |a-b| - (atol + rtol|b|); > 0 means the tolerance was broken
    top1_agreement: float  # fraction of inputs whose argmax agrees
    top5_agreement: float  # fraction whose top-5 indices (in order) agree
    probs_max_sum_error: float | None  # max |sum(probs) - 1|, None when the file has no probs
    accuracy_onnx: float | None  # on the labelled images, from onnxruntime
    accuracy_torch: float | None  # on the same images, from torch
    failures: list[str] = field(default_factory=list)
    # max |onnx - torch| of each output beyond the logits that the torch model also gives
    # (calibrated `probs`, `ood_score`), held to the same tolerance.
    outputs_max_abs: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class VerifyReport:
    """The gate's verdict: one `ProviderResult` per provider that could run."""

    onnx_path: str
    atol: float
    rtol: float
    results: list[ProviderResult]
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it did not run

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self) -> list[str]:
        return [f"{r.provider}: {msg}" for r in self.results for msg in r.failures]

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["passed"] = self.passed
        for result, out in zip(self.results, raw["results"], strict=True):
            out["passed"] = result.passed
        return raw

    def summary(self) -> str:
        """One line: the verdict and the worst difference."""
        if not self.results:
            return f"not verified: no provider could run ({'; '.join(self.skipped.values())})"
        worst = max(self.results, key=lambda r: r.max_abs)
        verdict = "PASSED" if self.passed else "FAILED"
        line = (
            f"{verdict}: max |diff| {worst.max_abs:.3g} (atol {self.atol:g}, rtol {self.rtol:g}) "
            f"over {worst.n_inputs} inputs on {', '.join(r.provider for r in self.results)}"
        )
        return line if self.passed else f"{line}; {'; '.join(self.failures)}"

    def rich_table(self) -> Any:
        """A rich Table of the per-provider figures, for the CLI to print in colour."""
        from rich.table import Table

        table = Table(title=f"ONNX vs torch: {Path(self.onnx_path).name}")
        for column in ("provider", "inputs", "max abs", "mean abs", "max rel", "top-1", "top-5"):
            table.add_column(column, justify="left" if column == "provider" else "right")
        table.add_column("acc onnx / torch", justify="right")
        table.add_column("verdict")
        for r in self.results:
            acc = (
                "-"
                if r.accuracy_onnx is None
                else f"{r.accuracy_onnx:.2%} / {r.accuracy_torch:.2%}"
            )
            table.add_row(
                r.provider.replace("ExecutionProvider", ""),
                str(r.n_inputs),
                f"{r.max_abs:.3g}",
                f"{r.mean_abs:.3g}",
                f"{r.max_rel:.3g}",
                f"{r.top1_agreement:.1%}",
                f"{r.top5_agreement:.1%}",
                acc,
                "pass" if r.passed else "FAIL",
            )
        return table

    def render(self) -> str:
        """The report as plain text: the table, then the verdict and any failures."""
        import io

        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=120, color_system=None, highlight=False)
        console.print(self.rich_table())
        for provider, why in self.skipped.items():
            console.print(f"{provider} skipped: {why}")
        console.print(self.summary())
        return buffer.getvalue()


@contextlib.contextmanager
def eval_on_cpu(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `model` in eval mode on the CPU for a while, then restore each module's mode and device."""
    from pipeline.surgery.plan import eval_mode

    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    device = None if tensor is None else tensor.device
    with eval_mode(model):
        if device is not None and device.type != "cpu":
            model.cpu()
        try:
            yield model
        finally:
            if device is not None and device.type != "cpu":
                model.to(device)


def torch_logits(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """The model's logits for `inputs`, in eval mode, without grad, float32, on the CPU."""
    import torch

    outputs = []
    with eval_on_cpu(model), torch.no_grad():
        for start in range(0, len(inputs), CHUNK):
            out = model(torch.from_numpy(inputs[start : start + CHUNK]))
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(torch.flatten(out, 1).float().numpy())
    return np.concatenate(outputs)


def torch_outputs(model: torch.nn.Module, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every output the exported graph has, from torch: `logits` alone for a plain model; all of
    `model.output_names` for one that computes them (pipeline.train.trust.TrustedModel)."""
    import torch

    if not hasattr(model, "outputs"):
        return {"logits": torch_logits(model, inputs)}
    names = tuple(model.output_names)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with eval_on_cpu(model), torch.no_grad():
        for start in range(0, len(inputs), CHUNK):
            computed = model.outputs(torch.from_numpy(inputs[start : start + CHUNK]))
            for name, value in zip(names, computed, strict=True):
                parts[name].append(value.float().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def _output_failures(
    result: ProviderResult,
    onnx_outputs: dict[str, np.ndarray],
    references: dict[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
) -> None:
    """Hold each output beyond the logits to the logits' tolerance, at batch N and at batch 1."""
    for name, reference in references.items():
        batched = onnx_outputs.get(f"{name}@batchN")
        if batched is None:
            result.failures.append(f"the file has no {name} output; torch computes one")
            continue
        single = onnx_outputs.get(f"{name}@batch1", batched[:0])
        got = np.concatenate([batched, single]).reshape(-1).astype(np.float64)
        want = np.concatenate([reference, reference[: len(single)]]).reshape(-1).astype(np.float64)
        if got.shape != want.shape or not (np.isfinite(got).all() and np.isfinite(want).all()):
            result.failures.append(f"{name}: shape or finiteness differs from torch's")
            continue
        diff = np.abs(got - want)
        result.outputs_max_abs[name] = float(diff.max()) if len(diff) else 0.0
        excess = diff - (atol + rtol * np.abs(want))
        if len(excess) and excess.max() > 0:
            worst = int(np.argmax(excess))
            result.failures.append(
                f"{name}: |diff| {diff[worst]:.3g} exceeds atol {atol:g} + rtol {rtol:g}·|{want[worst]:.4g}|"
            )


def failed_result(provider: str, n_inputs: int, message: str) -> ProviderResult:
    """A result for a provider whose outputs could not be compared at all."""
    inf = float("inf")
    return ProviderResult(
        provider, n_inputs, inf, inf, inf, inf, 0.0, 0.0, None, None, None, [message]
    )


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


class _Gap(NamedTuple):
    """onnxruntime's logits against torch's, element by element (batch N, then batch 1)."""

    diff: np.ndarray  # |onnx - torch|, in float64
    bound: np.ndarray  # atol + rtol|torch|: how far each element may differ
    torch_all: np.ndarray  # torch's logits, lined up with `diff`
    finite: bool  # False when either side has a NaN or an infinity

    @property
    def max_abs(self) -> float:
        return float(self.diff.max()) if self.finite else float("inf")

    @property
    def mean_abs(self) -> float:
        return float(self.diff.mean()) if self.finite else float("inf")

    @property
    def max_rel(self) -> float:
        if not self.finite:
            return float("inf")
        return float((self.diff / np.maximum(np.abs(self.torch_all), 1e-12)).max())

    @property
    def worst_excess(self) -> float:
        return float((self.diff - self.bound).max()) if self.finite else float("inf")

    def failure(self, n_inputs: int, *, atol: float, rtol: float) -> str | None:
        """Why the logits break the tolerance (the worst element), or None when they keep it."""
        if not self.finite:
            return "non-finite logits"
        if self.worst_excess <= 0:
            return None
        where = np.unravel_index(int(np.argmax(self.diff - self.bound)), self.diff.shape)
        return (
            f"|diff| {self.diff[where]:.3g} at input {where[0] % n_inputs} class {where[1]} exceeds "
            f"atol {atol:g} + rtol {rtol:g}·|{self.torch_all[where]:.4g}|"
        )


def _gap(
    batched: np.ndarray, single: np.ndarray, reference: np.ndarray, *, atol: float, rtol: float
) -> _Gap:
    onnx_all = np.concatenate([batched, single])
    torch_all = np.concatenate([reference, reference[: len(single)]])
    diff = np.abs(onnx_all.astype(np.float64) - torch_all)
    bound = atol + rtol * np.abs(torch_all)
    finite = bool(np.isfinite(onnx_all).all() and np.isfinite(torch_all).all())
    return _Gap(diff, bound, torch_all, finite)


class _Agreement(NamedTuple):
    """How often onnxruntime's ranking of the classes matches torch's."""

    top1: float  # at batch N
    top1_single: float  # at batch 1 (1.0 when batch 1 was not run)
    top5: float  # at batch N, the top-5 indices in order


def _agreement(batched: np.ndarray, single: np.ndarray, reference: np.ndarray) -> _Agreement:
    k = min(5, reference.shape[1])
    top1 = float(np.mean(batched.argmax(1) == reference.argmax(1)))
    top1_single = (
        np.mean(single.argmax(1) == reference[: len(single)].argmax(1)) if len(single) else 1.0
    )
    top5 = float(np.mean((_topk(batched, k) == _topk(reference, k)).all(axis=1)))
    return _Agreement(top1, top1_single, top5)


def _probs_sum_error(onnx_outputs: dict[str, np.ndarray]) -> float | None:
    """max |sum(probs) - 1| over the batch, None when the file has no probs output."""
    probs = onnx_outputs.get("probs@batchN")
    if probs is None:
        return None
    return float(np.abs(probs.reshape(len(probs), -1).sum(1) - 1.0).max())


def _accuracies(
    batched: np.ndarray, reference: np.ndarray, labels: np.ndarray | None
) -> tuple[float | None, float | None]:
    """(onnx, torch) accuracy on the labelled images, the first `len(labels)` inputs."""
    if labels is None or not len(labels):
        return None, None
    n = len(labels)
    acc_onnx = float(np.mean(batched[:n].argmax(1) == labels))
    acc_torch = float(np.mean(reference[:n].argmax(1) == labels))
    return acc_onnx, acc_torch


def compare_logits(
    provider: str,
    onnx_outputs: dict[str, np.ndarray],
    reference: np.ndarray,
    *,
    labels: np.ndarray | None,
    atol: float,
    rtol: float,
) -> ProviderResult:
    """Compare onnxruntime outputs (from `run_session`) with torch logits; the gate's rules live here."""
    batched = logits_of(onnx_outputs)
    single_key = "logits@batch1" if "logits@batch1" in onnx_outputs else None
    single = onnx_outputs[single_key].reshape(-1, batched.shape[1]) if single_key else batched[:0]
    if batched.shape != reference.shape:
        message = f"logits shape {batched.shape} differs from torch's {reference.shape}"
        return failed_result(provider, len(reference), message)
    gap = _gap(batched, single, reference, atol=atol, rtol=rtol)
    agreement = _agreement(batched, single, reference)
    probs_error = _probs_sum_error(onnx_outputs)
    acc_onnx, acc_torch = _accuracies(batched, reference, labels)
    failures: list[str] = []
    if (too_far := gap.failure(len(reference), atol=atol, rtol=rtol)) is not None:
        failures.append(too_far)
    if agreement.top1 < 1.0 or agreement.top1_single < 1.0:
        worst_top1 = min(agreement.top1, float(agreement.top1_single))
        failures.append(f"top-1 agreement {worst_top1:.1%}, not 100%")
    if probs_error is not None and not probs_error <= PROBS_TOLERANCE:
        failures.append(f"probs sum to 1 ± {probs_error:.3g}, not within {PROBS_TOLERANCE:g}")
    if acc_onnx is not None and acc_onnx != acc_torch:
        failures.append(f"test accuracy {acc_onnx:.2%} (onnx) differs from {acc_torch:.2%} (torch)")
    return ProviderResult(
        provider=provider,
        n_inputs=len(reference),
        max_abs=gap.max_abs,
        mean_abs=gap.mean_abs,
        max_rel=gap.max_rel,
        worst_excess=gap.worst_excess,
        top1_agreement=agreement.top1,
        top5_agreement=agreement.top5,
        probs_max_sum_error=probs_error,
        accuracy_onnx=acc_onnx,
        accuracy_torch=acc_torch,
        failures=failures,
    )


def verify(
    torch_model: torch.nn.Module,
    onnx_path: str | Path,
    inputs: VerifyInputs,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    providers: Sequence[str] | None = None,
) -> VerifyReport:
    """Compare `torch_model` with the ONNX file on `inputs` for each usable onnxruntime provider.

    A file whose input is not float32 (uint8, float16, float64) gets the inputs in its type, and
    torch the same values, so that both engines see one input.
    """
    batch = as_input_type(inputs.all_inputs, _file_input_type(onnx_path)).astype(np.float32)
    others = torch_outputs(torch_model, batch)
    reference = others.pop("logits").astype(np.float64)
    labels = None if inputs.labels is None else inputs.labels[: inputs.n_images]
    if providers is None:
        chosen, skipped = default_providers(onnx_path)
    else:
        chosen, skipped = list(providers), {}
    results: list[ProviderResult] = []
    for provider in chosen:
        try:
            session = create_session(onnx_path, provider)
        except NotFound as exc:
            skipped[provider] = str(exc).split(";")[0]
            continue
        try:
            outputs = run_session(session, batch)
        except (
            Exception
        ) as exc:  # a graph that loads but cannot run fails the gate, with the reason
            message = " ".join(str(exc).split())[:300]
            results.append(
                failed_result(provider, len(batch), f"onnxruntime failed to run: {message}")
            )
            continue
        result = compare_logits(provider, outputs, reference, labels=labels, atol=atol, rtol=rtol)
        if result.max_abs != float("inf"):  # logits that could be compared: the rest too
            _output_failures(result, outputs, others, atol=atol, rtol=rtol)
        results.append(result)
    return VerifyReport(
        onnx_path=str(onnx_path), atol=atol, rtol=rtol, results=results, skipped=skipped
    )


def _file_input_type(onnx_path: str | Path) -> str:
    """The numpy name of the element type the file's first input declares ('float32' if unreadable)."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        return type_name(graph.input[0].type.tensor_type.elem_type)
    except Exception:  # an unreadable file fails later, in onnxruntime, with its own message
        return "float32"


@dataclass
class FileReport:
    """`zoo verify MODEL.onnx`: metadata, the torch comparison if a model was given, other runtimes."""

    path: str
    metadata: ModelMetadata
    problems: list[str]  # metadata that does not fit the graph, outputs that make no sense
    torch_report: VerifyReport | None
    runtimes: dict[str, RuntimeReport]

    @property
    def passed(self) -> bool:
        torch_ok = self.torch_report is None or self.torch_report.passed
        return not self.problems and torch_ok and all(r.passed for r in self.runtimes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "passed": self.passed,
            "metadata": self.metadata.to_dict(),
            "problems": self.problems,
            "torch": None if self.torch_report is None else self.torch_report.to_dict(),
            "runtimes": {name: r.to_dict() for name, r in self.runtimes.items()},
        }

    def render(self) -> str:
        """Plain text: the torch table if any, then one line per runtime and per metadata problem."""
        lines = [self.torch_report.render().rstrip()] if self.torch_report else []
        for name, r in self.runtimes.items():
            if r.passed:
                detail = f"top-1 agreement {r.top1_agreement:.1%} over {r.n_inputs} inputs"
                if r.max_abs is not None:
                    detail += f", max |diff| {r.max_abs:.3g}"
            else:
                detail = r.error or f"top-1 agreement {r.top1_agreement:.1%}"
                if r.rejected:
                    detail = f"rejected {r.rejected}: {detail}"
            lines.append(f"{name}: {'pass' if r.passed else 'FAIL'} - {detail}")
        lines += [f"problem: {problem}" for problem in self.problems]
        lines.append(f"{self.path}: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _input_shape(graph_input: Any, metadata: ModelMetadata, onnx_path: Path) -> tuple[int, ...]:
    """One input's shape for random inputs: the graph's own when fixed, else the metadata's.

    The graph comes first, so that metadata describing another shape is reported as a problem.
    """
    dims = graph_input.type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if shape and all(d > 0 for d in shape):
        return shape
    if metadata.preprocess is not None:
        return metadata.preprocess.input_shape(metadata.layout)
    raise InvalidModelFile(
        f"{onnx_path} has no fixed input shape beyond the batch and no preprocessing metadata; "
        "pass --run RUN"
    )


def verify_file(
    onnx_path: str | Path,
    *,
    torch_model: torch.nn.Module | None = None,
    inputs: VerifyInputs | None = None,
    runtimes: Sequence[str] = ("ort",),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> FileReport:
    """Check a finished file: its metadata, torch agreement (if a model is given), other runtimes."""
    path = Path(onnx_path)
    model_file = load_onnx(path, load_external_data=False)  # weights are not needed here
    metadata = metadata_of(model_file)
    if inputs is None:
        inputs = VerifyInputs.random_only(_input_shape(model_file.graph.input[0], metadata, path))
    session = create_session(path, "CPUExecutionProvider")
    outputs = run_session(session, inputs.all_inputs)
    logits = logits_of(outputs)
    problems = metadata_problems(
        metadata, num_classes=logits.shape[1], input_shape=inputs.all_inputs.shape[1:]
    )
    if not np.isfinite(logits).all():
        problems.append("onnxruntime produced non-finite logits on the inputs")
    probs = outputs.get("probs@batchN")
    if probs is not None and not np.abs(probs.sum(1) - 1.0).max() <= PROBS_TOLERANCE:
        problems.append("the probs output does not sum to 1")
    torch_report = None
    if torch_model is not None:
        torch_report = verify(torch_model, path, inputs, atol=atol, rtol=rtol)
    reports = {name: runtime_check(name)(path, inputs) for name in runtimes if name != "ort"}
    return FileReport(str(path), metadata, problems, torch_report, reports)
