"""Files that look like a catalog entry without being it: older or other revisions of zoo files.

The zoo re-exported its models at several opsets; a user may hold a revision the catalog has no
sha256 for (the first MNIST, 2018, opset 1). Its graph still has the entry's input and output
names and shapes, which is what is compared here (the catalog records no op sequences). What is
found is only ever offered (`--like ENTRY`), never applied silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import onnx

    from zoo.catalog import Catalog, ModelEntry


class Resemblance(NamedTuple):
    """Which catalog entry a file the zoo does not know looks like, and why it says so."""

    entry: str  # the entry to pass to --like; "ENTRY" when several differ
    why: str  # 'it resembles mnist-8 (same input ...)'


def _same_dims(declared: tuple[int | None, ...] | None, actual: tuple[int | None, ...]) -> bool:
    """Shapes agree where both say a size (a dynamic batch matches a fixed one)."""
    if declared is None or len(declared) != len(actual):
        return False
    return all(a is None or b is None or a == b for a, b in zip(declared, actual, strict=True))


def resembling(
    catalog: Catalog,
    *,
    input_name: str,
    input_shape: tuple[int | None, ...],
    output_name: str,
    output_shape: tuple[int | None, ...],
    opset: int,
) -> list[ModelEntry]:
    """Entries with known preprocessing whose graph has these input/output names and shapes.

    Nearest opset first: a file the catalog does not know by its sha256 that matches is most
    likely another revision of that model (the zoo re-exported its files at several opsets).
    """
    classes = max((d for d in output_shape[1:] if d), default=None)
    found = [
        entry
        for entry in catalog.values()
        if entry.preprocess is not None
        and entry.input_name == input_name
        and entry.output_name == output_name
        and _same_dims(entry.input_shape, input_shape)
        and (classes is None or entry.num_classes == classes)
    ]
    return sorted(found, key=lambda entry: (abs((entry.opset or 0) - opset), -(entry.opset or 0)))


def resemblance(model: onnx.ModelProto, catalog: Catalog) -> Resemblance | None:
    """The catalog entry the graph looks like an older revision of (names and shapes), if any."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    if not inputs or not model.graph.output:
        return None
    found = resembling(
        catalog,
        input_name=inputs[0].name,
        input_shape=_dims(inputs[0]),
        output_name=model.graph.output[0].name,
        output_shape=_dims(model.graph.output[0]),
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
    )
    if not found:
        return None
    same = f"same input {inputs[0].name} and output {model.graph.output[0].name}, names and shapes"
    if len({entry.preprocess for entry in found}) > 1:
        names = ", ".join(entry.name for entry in found[:4])
        why = f"it looks like several catalog entries that preprocess differently ({names}; {same})"
        return Resemblance("ENTRY", why)
    why = f"it resembles {found[0].name} ({same}; another sha256, so an older or other revision)"
    return Resemblance(found[0].name, why)


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in value.type.tensor_type.shape.dim
    )
