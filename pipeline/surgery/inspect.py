"""`zoo inspect`: what the pipeline sees in a model (probe, blocks, import fidelity)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.convert import import_model
from pipeline.convert.probe import head_kind
from pipeline.surgery import discover_blocks, replace_head
from zoo.legacy import ORT_MIN_OPSET, default_opset

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.convert import Fidelity
    from pipeline.convert.probe import ProbeResult


@dataclass(frozen=True)
class BlockInfo:
    """One backbone block as reported: its name, layer count and parameter count."""

    name: str
    num_layers: int
    num_params: int


@dataclass
class InspectReport:
    """Everything `zoo inspect` shows about one model."""

    name: str
    probe: ProbeResult
    head_layer: str  # the old head in torch terms, e.g. "Linear (Gemm)"
    blocks: list[BlockInfo]
    fidelity: Fidelity | None
    num_params: int  # trainable parameters of the converted model, old head included
    notes: list[str] = field(default_factory=list)
    opset: int = 0  # the file's own opset
    upgraded_opset: int | None = None  # what onnxruntime and the importer saw, when it was older

    def opset_line(self) -> str:
        """E.g. "3 (upgraded to 13 for onnxruntime and the importer)"."""
        if self.upgraded_opset is None:
            return str(self.opset)
        readers = "onnxruntime and the importer" if self.opset < ORT_MIN_OPSET else "the importer"
        return f"{self.opset} (upgraded to {self.upgraded_opset} for {readers})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for --json."""
        return {
            "name": self.name,
            "probe": self.probe.to_dict(),
            "head_layer": self.head_layer,
            "blocks": [asdict(block) for block in self.blocks],
            "fidelity": asdict(self.fidelity) if self.fidelity else None,
            "num_params": self.num_params,
            "notes": list(self.notes),
            "opset": self.opset,
            "upgraded_opset": self.upgraded_opset,
            "opset_line": self.opset_line(),
        }


def inspect_model(onnx_path: str | os.PathLike[str], *, name: str | None = None) -> InspectReport:
    """Import the model, probe it and discover its blocks."""

    imported = import_model(onnx_path, name=name)
    # A throw-away head only to cut the backbone; blocks are counted on the adapted backbone.
    adapted = replace_head(imported, imported.probe, 2)
    blocks = [
        BlockInfo(block.name, len(block.module_names), block.num_params)
        for block in discover_blocks(adapted)
    ]
    return InspectReport(
        name=imported.name,
        probe=imported.probe,
        head_layer=head_kind(imported.probe.head_kind).layer,
        blocks=blocks,
        fidelity=imported.fidelity,
        num_params=sum(p.numel() for p in imported.module.parameters() if p.requires_grad),
        notes=list(imported.notes),
        opset=imported.source_opset,
        upgraded_opset=_upgraded_to(imported.source_opset, default_opset(imported.onnx_model)),
    )


def _upgraded_to(source: int, seen: int) -> int | None:
    return seen if source and seen != source else None


def render(report: InspectReport, console: Console) -> None:
    """Print the report as a summary table and a table of blocks."""
    from rich.table import Table

    probe = report.probe
    summary = Table(title=f"{report.name}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    height, width = probe.input_size
    summary.add_row("opset", report.opset_line())
    summary.add_row("input", f"{probe.input_name} {probe.layout} {probe.channels}x{height}x{width}")
    summary.add_row("batch", "dynamic" if probe.dynamic_batch else "fixed")
    summary.add_row(
        "output", f"{probe.output_name} ({probe.output_kind}, rank {probe.output_rank})"
    )
    summary.add_row("head", f"{report.head_layer} over {probe.num_classes} classes")
    spatial = "spatial, pooled" if probe.feature_spatial else "flat"
    summary.add_row("features", f"{probe.feature_name} ({probe.feature_dim} wide, {spatial})")
    summary.add_row("parameters", f"{report.num_params:,}")
    if report.fidelity is not None:
        fid = report.fidelity
        summary.add_row(
            "import fidelity",
            f"max |diff| {fid.max_abs:.2e}, top-1 agreement {fid.top1_agreement:.0%} on {fid.n_inputs} inputs",
        )
    for note in report.notes:
        summary.add_row("normalised", note)
    console.print(summary)
    blocks = Table(title=f"{len(report.blocks)} blocks (bottom to top)")
    blocks.add_column("#", justify="right")
    blocks.add_column("block")
    blocks.add_column("layers", justify="right")
    blocks.add_column("parameters", justify="right")
    for number, block in enumerate(report.blocks, start=1):
        blocks.add_row(str(number), block.name, str(block.num_layers), f"{block.num_params:,}")
    console.print(blocks)
