"""The adapted model built from an ONNX file: imported, then given a new head for N classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.convert import import_model
from pipeline.surgery.head import replace_head


def build_model(
    onnx_path: Path,
    *,
    num_classes: int,
    hidden: int | None,
    dropout: float,
    seed: int,
    import_cache: Path | None = None,
) -> tuple[Any, nn.Module]:
    """Import the zoo model and give it a new head; returns (imported, adapted model).

    `import_cache`: a workspace's cache of checked imports, reused by later runs.
    """
    imported = import_model(onnx_path, cache_dir=import_cache)
    torch.manual_seed(seed)  # the new head's initial weights depend on the seed alone
    adapted = replace_head(imported, imported.probe, num_classes, hidden=hidden, dropout=dropout)
    return imported, adapted
