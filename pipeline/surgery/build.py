"""The adapted model built from an ONNX file: imported, then given a new head for N classes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from pipeline.convert import import_model
from pipeline.surgery.head import replace_head
from zoo.catalog import Preprocess
from zoo.errors import UnsupportedModel


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


def check_input_size(model: nn.Module, preprocess: Preprocess, model_name: str) -> None:
    """UnsupportedModel when the adapted model cannot take inputs of the preprocessing's size."""
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, *preprocess.input_shape()))
    except Exception as exc:
        raise UnsupportedModel(
            f"{model_name} does not accept {preprocess.crop}x{preprocess.crop} inputs ({type(exc).__name__}); "
            "drop --image-size or choose a size the model supports"
        ) from exc


class BuiltModel(NamedTuple):
    """The imported model, the adapted one (new head), and the preprocessing it trains with."""

    imported: Any
    adapted: nn.Module
    preprocess: Preprocess


def build_checked_model(
    onnx_path: Path,
    *,
    name: str,
    native: Preprocess,
    preprocess: Preprocess,
    sized: bool,
    num_classes: int,
    hidden: int | None,
    dropout: float,
    seed: int,
    import_cache: Path | None,
    log: Callable[[str], None],
) -> BuiltModel:
    """`build_model`, then the input size checked: `preprocess` at the data's size unless the graph
    takes only its own (`native`); `sized` when --image-size asked for this size."""
    imported, adapted = build_model(
        onnx_path,
        num_classes=num_classes,
        hidden=hidden,
        dropout=dropout,
        seed=seed,
        import_cache=import_cache,
    )
    # A graph that flattens to a fixed width (MNIST) takes its own size only, not the data's.
    if not sized and preprocess.crop != native.crop:
        try:
            check_input_size(adapted, preprocess, name)
        except UnsupportedModel:
            log(f"{name} takes only {native.crop} px inputs: using them, not the data's {preprocess.crop}")  # fmt: skip
            preprocess = native
    checked = imported.fidelity is not None and imported.probe.input_size == (preprocess.crop,) * 2
    if not checked:  # the fidelity check ran the graph at its own size; any other is tried here
        check_input_size(adapted, preprocess, name)
    return BuiltModel(imported, adapted, preprocess)
