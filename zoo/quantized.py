"""Quantized classifiers, recognised and refused: `zoo` adapts float models only.

The zoo's own int8 (QLinear) and QDQ files are known by sha256 (`data/quantized.json`, with the
fp32 model each was made from); any other file is known by its operators. Either way the user is
told which float model to bring instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.catalog import load_catalog
from zoo.errors import NotFound, UnsupportedModel
from zoo.files import sha256_file

if TYPE_CHECKING:
    import onnx

    from zoo.catalog import Catalog

QUANTIZED_FILE = Path(__file__).with_name("data") / "quantized.json"
# Operators that only quantized graphs hold; QuantizeLinear/DequantizeLinear count as a pair (QDQ).
INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# How quantized files are usually named after their float model: mobilenetv2-12-int8, resnet_qdq.
_QUANTIZED_SUFFIX = re.compile(r"[-_.](u?int8|qdq|qoperator|quant(ized)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class QuantizedFile:
    """One of the zoo's quantized files."""

    name: str  # e.g. shufflenet-v2-12-int8
    sha256: str
    kind: str  # "int8 (QLinear ops)" or "QDQ"
    fp32_sibling: str  # the catalog entry it was quantized from


@lru_cache(maxsize=1)
def known_quantized() -> dict[str, QuantizedFile]:
    """The zoo's quantized files by sha256."""
    raw = json.loads(QUANTIZED_FILE.read_text())
    return {
        item["sha256"].lower(): QuantizedFile(
            item["name"], item["sha256"].lower(), item["kind"], item["fp32_sibling"]
        )
        for item in raw
    }


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The operators that make `model` a quantized graph (empty for a float model)."""
    # A damaged name is bytes, not text (protobuf hands invalid UTF-8 over as it is).
    ops = {node.op_type for node in model.graph.node if isinstance(node.op_type, str)}
    found = {op for op in ops if op.startswith("QLinear")} | (ops & INTEGER_OPS)
    if ops >= QDQ_OPS:
        found |= QDQ_OPS
    return sorted(found)


def _float_name(label: str) -> str:
    """`shufflenet-v2-12-int8.onnx` -> `shufflenet-v2-12`: the name its float model would have."""
    stem = Path(label).name
    for suffix in (".onnx", ".tar.gz", ".tgz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return _QUANTIZED_SUFFIX.sub("", stem)


def _sibling(label: str, catalog: Catalog | None) -> str | None:
    if catalog is None:
        catalog = load_catalog()
    try:
        return catalog.resolve(_float_name(label)).name
    except NotFound:
        return None


def refuse_known_quantized(sha256: str | None, *, label: str) -> None:
    """Refuse one of the zoo's own quantized files, naming its fp32 sibling."""
    known = known_quantized().get((sha256 or "").lower())
    if known is None:
        return
    qlinear = "int8" in known.kind.lower()
    kind, ops = ("int8", "QLinear ops") if qlinear else ("QDQ", "QuantizeLinear/DequantizeLinear")
    raise UnsupportedModel(
        f"{label} is the zoo's {kind}-quantized {known.fp32_sibling} ({ops}): "
        f"fetch `{known.fp32_sibling}` (fp32) instead; zoo adapts float models only"
    )


def refuse_quantized(
    model: onnx.ModelProto,
    *,
    label: str,
    sha256: str | None = None,
    path: str | os.PathLike[str] | None = None,
    catalog: Catalog | None = None,
) -> None:
    """Refuse a quantized graph (a zoo file by sha256, any other by its operators) in one line.

    `path` is hashed only when the graph is quantized, to name the zoo file whatever it is called.
    """
    refuse_known_quantized(sha256, label=label)
    ops = quantized_ops(model)
    if not ops:
        return
    if sha256 is None and path is not None:
        refuse_known_quantized(sha256_file(path), label=label)
    shown = ", ".join(ops[:4]) + (" …" if len(ops) > 4 else "")
    sibling = _sibling(label, catalog)
    next_step = (
        f"fetch `{sibling}` (fp32) instead"
        if sibling
        else "bring the float (fp32) model it was quantized from"
    )
    raise UnsupportedModel(
        f"{label} is a quantized model ({shown}): {next_step}; zoo adapts float models only"
    )


__all__ = ["QuantizedFile", "known_quantized", "quantized_ops", "refuse_quantized"]
