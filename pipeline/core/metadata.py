"""What a zoo-exported ONNX file says about itself: class names, preprocessing, source, metrics.

Written into `metadata_props` by `pipeline.export.write`, read back by `pipeline.export.verify`, `zoo deploy`
and anyone holding only the `.onnx` file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.trust import OodRecord
from zoo.catalog import Preprocess
from zoo.onnxfile import load_onnx

if TYPE_CHECKING:
    import onnx

PREFIX = "zoo."
# Friendly metadata keys that have a typed field in ModelMetadata.
KNOWN_KEYS = (
    "labels",
    "preprocess",
    "source",
    "strategy",
    "metrics",
    "version",
    "input_name",
    "layout",
    "calibration",
    "ood",
)


@dataclass
class ModelMetadata:
    """What a zoo-exported file says about itself, decoded from its `metadata_props`."""

    labels: tuple[str, ...] = ()  # class names in output order
    preprocess: Preprocess | None = None  # how an image becomes the input
    source: dict[str, Any] = field(default_factory=dict)  # the pretrained model: name, url, sha256
    strategy: str | None = None  # how it was adapted (feature, finetune, ...)
    metrics: dict[str, Any] = field(default_factory=dict)  # test metrics of the run
    version: str | None = None  # zoo version that wrote the file
    input_name: str | None = None
    layout: str | None = None  # NCHW or NHWC
    calibration: dict[str, Any] = field(default_factory=dict)  # the temperature, ECE before/after
    ood: OodRecord | None = None  # the unknown score's output and threshold; None: no such output
    extra: dict[str, Any] = field(default_factory=dict)  # other zoo.* keys, JSON-decoded
    raw: dict[str, str] = field(default_factory=dict)  # every metadata_props entry as stored

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["preprocess"] = None if self.preprocess is None else self.preprocess.to_dict()
        raw["labels"] = list(self.labels)
        return raw


def encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """`metadata_props` for `metadata`: keys get the `zoo.` prefix; non-strings become JSON."""
    props: dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, Preprocess):
            value = value.to_dict()
        name = key if key.startswith(PREFIX) else PREFIX + key
        props[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return props


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value  # plain strings are stored as they are


def decode_metadata(props: Mapping[str, str]) -> ModelMetadata:
    """The `ModelMetadata` that `metadata_props` describe (missing keys stay empty)."""
    values = {k[len(PREFIX) :]: _decode(v) for k, v in props.items() if k.startswith(PREFIX)}
    pre = values.get("preprocess")
    # Plain-text fields are read as stored: a strategy such as "1" must not become a number.
    texts = {k: props.get(PREFIX + k) for k in ("strategy", "version", "input_name", "layout")}
    return ModelMetadata(
        labels=tuple(str(label) for label in values.get("labels") or ()),
        preprocess=Preprocess.from_dict(pre) if isinstance(pre, Mapping) else None,
        source=dict(values["source"]) if isinstance(values.get("source"), Mapping) else {},
        metrics=dict(values["metrics"]) if isinstance(values.get("metrics"), Mapping) else {},
        calibration=dict(calib) if isinstance(calib := values.get("calibration"), Mapping) else {},
        ood=_ood_of(values.get("ood")),
        extra={k: v for k, v in values.items() if k not in KNOWN_KEYS},
        raw=dict(props),
        **texts,
    )


def _ood_of(value: Any) -> OodRecord | None:
    """zoo.ood as a record; None when absent or not one (such a file predicts without rejecting)."""
    try:
        return OodRecord.from_dict(value) if isinstance(value, Mapping) else None
    except (KeyError, TypeError, ValueError):
        return None


def read_metadata(onnx_path: str | os.PathLike[str]) -> ModelMetadata:
    """Labels, preprocessing, source and metrics of a zoo-exported file, read from its metadata."""

    return metadata_of(load_onnx(onnx_path, load_external_data=False))  # weights not needed


def metadata_of(model: onnx.ModelProto) -> ModelMetadata:
    """`read_metadata` for a model already loaded."""
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def metadata_problems(
    metadata: ModelMetadata, *, num_classes: int, input_shape: Sequence[int]
) -> list[str]:
    """What in `metadata` would mislead a user of the file (input_shape without batch)."""
    problems: list[str] = []
    if not metadata.labels:
        problems.append("no class names (zoo.labels); pass the labels when exporting")
    elif len(metadata.labels) != num_classes:
        problems.append(f"{len(metadata.labels)} class names for {num_classes} outputs")
    pre = metadata.preprocess
    if pre is None:
        problems.append("no preprocessing (zoo.preprocess); pass it when exporting")
        return problems
    if "embedded" in metadata.extra:  # it takes uint8 pixels NHWC and preprocesses them itself
        return problems
    layout = metadata.layout or pre.layout
    if pre.layout != layout:
        problems.append(f"preprocessing says {pre.layout} but the file says {layout}")
    expected = pre.input_shape(layout)
    if tuple(input_shape) != expected:
        problems.append(
            f"input shape {tuple(input_shape)} does not match the preprocessing's {expected}"
        )
    return problems
