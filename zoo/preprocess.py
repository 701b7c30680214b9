"""Preprocessing for files the catalog does not know: presets, the user's flags, and the graph's input.

Where preprocessing comes from, first found wins, then the user's flags are laid over it:
`--preprocess PRESET`, the catalog entry (the card's, else the one whose sha256 the file has),
the `zoo.preprocess` metadata a `zoo export`ed file carries, and otherwise nothing: the user is
told which flags to pass. Layout, channels and a fixed input size come from the graph's input
whenever the numbers are not the catalog's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from zoo.catalog import IMAGENET_PREPROCESS, ModelEntry, Preprocess
from zoo.errors import UnsupportedModel, ZooError

if TYPE_CHECKING:
    import onnx

    from zoo.catalog import Catalog

PRESETS: dict[str, Preprocess] = {
    # RGB on [0,1], ImageNet mean/std; shorter side 256, centre crop 224 (torchvision, timm).
    "imagenet": IMAGENET_PREPROCESS,
    # RGB, (x/255 - 0.5) / 0.5, i.e. [-1, 1] (Inception, TensorFlow slim models).
    "inception": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    # BGR on 0-255 minus the ImageNet pixel means, no std (Caffe, VGG as first published).
    "caffe": Preprocess(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0, bgr=True),
    # RGB on [0,1], nothing subtracted; the image resized straight to the input size.
    "raw": Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=224, resize_mode="direct"),
}
PRESET_NAMES = tuple(PRESETS)
# Flags without a preset or a known entry start from this: [0,1] pixels, 256/224, nothing subtracted.
_PLAIN = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_FLAG = {"preset": "preprocess"}  # request field -> its command-line flag
FLAGS_HINT = "--preprocess imagenet|inception|caffe|raw (or --mean/--std/--size)"


@dataclass(frozen=True)
class PreprocessRequest:
    """What the user said about preprocessing on the command line; None: not said."""

    preset: str | None = None  # one of PRESETS
    mean: tuple[float, ...] | None = None  # 1 value (all channels) or one per channel
    std: tuple[float, ...] | None = None
    scale: float | None = None  # multiplies 0-255 pixels first
    size: int | None = None  # the model's input size (centre crop)
    resize: int | None = None  # the resize step's target
    bgr: bool | None = None  # True: channel 0 is blue
    layout: str | None = None  # NCHW or NHWC
    channels: int | None = None  # 1 or 3

    @property
    def given(self) -> bool:
        """True when any flag was passed."""
        return any(v is not None for v in dataclasses.astuple(self))

    @property
    def says_normalisation(self) -> bool:
        """True when the flags say how pixel values are normalised (not only sizes or layout)."""
        return any(v is not None for v in (self.preset, self.mean, self.std, self.scale, self.bgr))

    def to_dict(self) -> dict[str, Any]:
        """The flags given, JSON-ready (stored in run.json's options)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def of(cls, raw: PreprocessRequest | Mapping[str, Any] | None) -> PreprocessRequest:
        """A request from itself, from `to_dict`'s output (a resumed run's options) or None."""
        if isinstance(raw, PreprocessRequest):
            return raw
        values = dict(raw or {})
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @classmethod
    def from_flags(
        cls,
        *,
        preset: str | None = None,
        mean: str | None = None,
        std: str | None = None,
        scale: str | None = None,
        size: int | str | None = None,
        resize: int | str | None = None,
        bgr: bool | None = None,
        layout: str | None = None,
        channels: int | str | None = None,
    ) -> PreprocessRequest:
        """A request from command-line text: `--mean 0.485,0.456,0.406`, `--scale 1/255`."""
        if preset is not None and preset not in PRESETS:
            raise ZooError(f"--preprocess {preset!r} is not a preset; choose one of {FLAGS_HINT}")
        return cls(
            preset=preset,
            mean=_numbers("--mean", mean),
            std=_numbers("--std", std),
            scale=_fraction("--scale", scale),
            size=int(size) if size else None,
            resize=int(resize) if resize else None,
            bgr=bgr,
            layout=layout.upper() if layout else None,
            channels=int(channels) if channels else None,
        )


def _fraction(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise ZooError(f"{flag} {text!r} is not a number; write e.g. {flag} 1/255") from exc
    if value <= 0:
        raise ZooError(f"{flag} must be positive (got {text}); write e.g. {flag} 1/255")
    return value


def _numbers(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(Fraction(part.strip())) for part in text.split(",") if part.strip())
    except (ValueError, ZeroDivisionError) as exc:
        raise ZooError(
            f"{flag} {text!r} is not a list of numbers; write e.g. {flag} 0.485,0.456,0.406"
        ) from exc
    if len(values) not in (1, 3):
        raise ZooError(f"{flag} takes 1 or 3 comma-separated numbers, got {len(values)} ({text})")
    if flag == "--std" and any(v <= 0 for v in values):
        raise ZooError(f"--std values must be positive (got {text})")
    return values


class InputSignature(NamedTuple):
    """What a graph's image input says about itself; None where its dims do not tell."""

    name: str
    layout: str | None  # NCHW or NHWC
    channels: int | None  # 1 or 3
    size: int | None  # a fixed, square spatial size


def input_signature(model: onnx.ModelProto) -> InputSignature | None:
    """The first graph input that is not an initializer, read from its declared dims."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if not inputs:
        return None
    value = inputs[0]
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in value.type.tensor_type.shape.dim
    ]
    if len(dims) != 4:
        return InputSignature(value.name, None, None, None)
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first:  # [N, C, H, W]; a 3x3 image in NHWC is not a classifier's input
        layout, channels, height, width = "NCHW", dims[1], dims[2], dims[3]
    elif last:
        layout, channels, height, width = "NHWC", dims[3], dims[1], dims[2]
    else:
        return InputSignature(value.name, None, None, None)
    size = height if height is not None and height == width else None
    return InputSignature(value.name, layout, channels, size)


def exported_metadata(model: onnx.ModelProto) -> tuple[Preprocess | None, tuple[str, ...]]:
    """The preprocessing and labels a `zoo export`ed file carries (`zoo.preprocess`, `zoo.labels`)."""
    props = {p.key: p.value for p in model.metadata_props}
    preprocess, labels = None, ()
    try:
        raw = json.loads(props.get("zoo.preprocess") or "null")
        preprocess = Preprocess.from_dict(raw) if isinstance(raw, Mapping) else None
    except (ValueError, TypeError, KeyError):
        preprocess = None  # damaged metadata is no metadata: the user is asked for flags
    try:
        raw_labels = json.loads(props.get("zoo.labels") or "[]")
        labels = tuple(str(label) for label in raw_labels) if isinstance(raw_labels, list) else ()
    except ValueError:
        labels = ()
    return preprocess, labels


def unknown_preprocess(name: str, *, commands: str = "zoo fetch or zoo adapt") -> UnsupportedModel:
    """The error for a model nobody said how to preprocess for."""
    return UnsupportedModel(
        f"the zoo does not know how {name} preprocesses images: pass {FLAGS_HINT} to {commands}"
    )


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels  # an RGB preset for a grayscale model


def _check_against_graph(
    request: PreprocessRequest, signature: InputSignature | None, *, name: str
) -> None:
    """Refuse flags that contradict the graph's fixed input: onnxruntime would only say 'invalid'."""
    if signature is None:
        return
    for flag, asked, fixed in (
        ("--size", request.size, signature.size),
        ("--layout", request.layout, signature.layout),
        ("--channels", request.channels, signature.channels),
    ):
        if asked is not None and fixed is not None and asked != fixed:
            raise ZooError(
                f"{name} has {flag[2:]} {fixed} (fixed in its graph), not {flag} {asked}; "
                f"drop {flag} or pass {flag} {fixed}"
            )


def resolve_preprocess(
    base: Preprocess | None,
    request: PreprocessRequest,
    signature: InputSignature | None,
    *,
    name: str,
    commands: str = "zoo fetch or zoo adapt",
) -> Preprocess:
    """The preprocessing to use: the preset or `base`, the flags over it, the graph's input for the rest.

    `base` is what is known for the model (catalog entry, exported metadata); when it is, its
    layout, channels and size are kept unless a flag says otherwise.
    """
    if request.preset is not None:
        start, known_geometry = PRESETS[request.preset], False
    elif base is not None:
        start, known_geometry = base, True
    elif request.says_normalisation:
        start, known_geometry = _PLAIN, False
    else:
        raise unknown_preprocess(name, commands=commands)
    _check_against_graph(request, signature, name=name)
    graph = signature if signature is not None and not known_geometry else None
    layout = request.layout or (graph and graph.layout) or start.layout
    channels = request.channels or (graph and graph.channels) or start.channels
    size = request.size or (graph and graph.size) or start.crop
    preprocess = dataclasses.replace(
        start.at_size(size) if size != start.crop else start,
        layout=layout,
        channels=channels,
        mean=_per_channel(request.mean or start.mean, channels),
        std=_per_channel(request.std or start.std, channels),
    )
    if preprocess.resize_mode == "direct":
        preprocess = dataclasses.replace(preprocess, resize=preprocess.crop)
    changes: dict[str, Any] = {"scale": request.scale, "bgr": request.bgr, "resize": request.resize}
    preprocess = dataclasses.replace(
        preprocess, **{k: v for k, v in changes.items() if v is not None}
    )
    if preprocess.resize < preprocess.crop:
        raise ZooError(
            f"--resize {preprocess.resize} is smaller than the input size {preprocess.crop}; "
            "pass a --resize of at least --size"
        )
    return preprocess


def _output_classes(model: onnx.ModelProto) -> int:
    """The class count the first output declares (its largest fixed dim), 0 when it does not say."""
    if not model.graph.output:
        return 0
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    return max(dims[1:], default=0) if len(dims) > 1 else 0


def fetched_entry(
    entry: ModelEntry | None,
    model: onnx.ModelProto,
    *,
    name: str,
    sha256: str,
    size: int,
    request: PreprocessRequest,
) -> ModelEntry | None:
    """The catalog entry a card records: the known one with the flags over it, else a user entry.

    A file the catalog does not know gets an entry of its own (source "user") when the flags or
    its `zoo export` metadata say how it preprocesses images; otherwise None, and adapt asks.
    """
    if entry is not None and entry.preprocess is not None and not request.given:
        return entry
    exported, labels = exported_metadata(model)
    base = entry.preprocess if entry is not None and entry.preprocess else exported
    if base is None and not request.says_normalisation:
        return entry
    signature = input_signature(model)
    preprocess = resolve_preprocess(base, request, signature, name=name)
    given = " ".join(f"--{_FLAG.get(k, k)} {v}" for k, v in request.to_dict().items())
    note = (
        f"given to zoo fetch: {given}" if given else "read from the file's zoo.preprocess metadata"
    )
    if entry is not None:
        return dataclasses.replace(
            entry, preprocess=preprocess, layout=preprocess.layout, preprocess_note=note
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    shape = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in model.graph.input[0].type.tensor_type.shape.dim
    ]
    return ModelEntry(
        name=name,
        family=name,
        urls=(),
        sha256=sha256,
        size=size,
        opset=opset,
        input_name=signature.name if signature else None,
        input_shape=tuple(shape) if signature else None,
        layout=preprocess.layout,
        output_kind="unknown",  # found by probing the graph at import
        num_classes=len(labels) or _output_classes(model),
        preprocess=preprocess,
        preprocess_confidence="user",
        preprocess_note=note,
        top1=None,
        licence="unknown",
        source="user",
    )


def model_preprocess(
    card: Mapping[str, Any],
    model_path: str | os.PathLike[str],
    *,
    catalog: Catalog,
    request: PreprocessRequest | Mapping[str, Any] | None = None,
    commands: str = "zoo fetch or zoo adapt",
) -> Preprocess:
    """How a workspace model preprocesses images: its entry (by card, else sha256), its metadata, the flags."""
    from zoo.workspace import card_entry

    request = PreprocessRequest.of(request)
    entry = card_entry(card, catalog)
    base = entry.preprocess if entry is not None else None
    if base is not None and not request.given:
        return base
    from zoo.onnxfile import load_onnx

    model = load_onnx(Path(model_path), load_external_data=False)  # the graph, not the weights
    if base is None:
        base, _ = exported_metadata(model)
    name = str(card.get("name") or Path(model_path).stem)
    try:
        return resolve_preprocess(
            base, request, input_signature(model), name=name, commands=commands
        )
    except UnsupportedModel:
        from zoo.quantized import refuse_quantized

        # No flag makes a quantized graph trainable: say what it is and which float model to fetch.
        refuse_quantized(
            model, label=name, sha256=card.get("sha256"), path=model_path, catalog=catalog
        )
        raise


__all__ = [
    "FLAGS_HINT",
    "PRESETS",
    "PRESET_NAMES",
    "InputSignature",
    "PreprocessRequest",
    "exported_metadata",
    "fetched_entry",
    "input_signature",
    "model_preprocess",
    "resolve_preprocess",
    "unknown_preprocess",
]
