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
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from zoo.catalog import IMAGENET_PREPROCESS, ModelEntry, Preprocess, load_catalog
from zoo.errors import UnsupportedModel, ZooError
from zoo.legacy import runnable
from zoo.lookalike import Resemblance, resemblance
from zoo.onnxfile import load_onnx
from zoo.preprocess_auto import measure_presets
from zoo.quantized import refuse_quantized
from zoo.workspace import card_entry

if TYPE_CHECKING:
    import onnx

    from zoo.catalog import Catalog

log = logging.getLogger(__name__)

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
AUTO = "auto"  # --preprocess auto: measure the presets on sample photos (zoo.preprocess_auto)
# Flags without a preset or a known entry start from this: [0,1] pixels, 256/224, nothing subtracted.
_PLAIN = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_FLAG = {"preset": "preprocess"}  # request field -> its command-line flag
FLAGS_HINT = "--preprocess imagenet|inception|caffe|raw|auto (or --mean/--std/--size)"


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
    like: str | None = None  # a catalog entry whose preprocessing (and labels) to take

    @property
    def given(self) -> bool:
        """True when any flag was passed."""
        return any(v is not None for v in dataclasses.astuple(self))

    @property
    def says_normalisation(self) -> bool:
        """True when the flags say how pixel values are normalised (not only sizes or layout)."""
        said = (self.preset, self.mean, self.std, self.scale, self.bgr, self.like)
        return any(v is not None for v in said)

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
        like: str | None = None,
    ) -> PreprocessRequest:
        """A request from command-line text: `--mean 0.485,0.456,0.406`, `--scale 1/255`."""
        if preset is not None and preset not in (*PRESETS, AUTO):
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
            like=like or None,
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


def unknown_preprocess(
    name: str, *, commands: str = "zoo fetch or zoo adapt", resembles: Resemblance | None = None
) -> UnsupportedModel:
    """The error for a model nobody said how to preprocess for, with the catalog look-alike if any."""
    if resembles is not None:
        return UnsupportedModel(
            f"the zoo does not know how {name} preprocesses images, but {resembles.why}: pass "
            f"--like {resembles.entry} to {commands} to use that entry's preprocessing and "
            f"labels, or {FLAGS_HINT}"
        )
    return UnsupportedModel(
        f"the zoo does not know how {name} preprocesses images: pass {FLAGS_HINT} to {commands}"
    )


def like_entry(like: str, catalog: Catalog | None = None) -> ModelEntry:
    """The catalog entry `--like` names, refused when the zoo does not know its preprocessing."""

    entry = (catalog or load_catalog()).resolve(like)
    if entry.preprocess is None:
        raise ZooError(
            f"--like {like}: the catalog does not know how {entry.name} preprocesses images "
            f"either; pass {FLAGS_HINT}"
        )
    return entry


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
    catalog: Catalog | None = None,
) -> Preprocess:
    """The preprocessing to use: the preset or `base`, the flags over it, the graph's input for the rest.

    `base` is what is known for the model (catalog entry, exported metadata); when it is, its
    layout, channels and size are kept unless a flag says otherwise. `--like ENTRY` makes that
    entry's preprocessing the base.
    """
    if request.preset == AUTO:
        raise ZooError(
            f"--preprocess auto is measured from a model file by zoo fetch or zoo adapt, not by "
            f"{commands}; pass the preset it proposed"
        )
    if request.like is not None:
        base = like_entry(request.like, catalog).preprocess
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
    given = " ".join(f"--{_FLAG.get(k, k)} {v}" for k, v in request.to_dict().items())
    request, measured = settle_auto(request, model, name=name)
    signature = input_signature(model)
    preprocess = resolve_preprocess(base, request, signature, name=name)
    note = (
        f"given to zoo fetch: {given}" if given else "read from the file's zoo.preprocess metadata"
    ) + (f"; {measured}" if measured else "")
    if request.like is not None and entry is None:
        # The look-alike's record (classes, output kind, labels) for a file with its own sha256.
        entry = dataclasses.replace(
            like_entry(request.like), name=name, aliases=(), urls=(), sha256=sha256, size=size,
            path=None, archive=None, source="user", preprocess_confidence="user",
        )  # fmt: skip
    if entry is not None:
        return dataclasses.replace(
            entry, preprocess=preprocess, layout=preprocess.layout, preprocess_note=note
        )
    return _user_entry(model, name=name, sha256=sha256, size=size, preprocess=preprocess, labels=labels, note=note)  # fmt: skip


def _user_entry(
    model: onnx.ModelProto,
    *,
    name: str,
    sha256: str,
    size: int,
    preprocess: Preprocess,
    labels: Sequence[str],
    note: str,
) -> ModelEntry:
    """A catalog entry of a file the catalog does not know, with the preprocessing it was given."""
    signature = input_signature(model)
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

    request = PreprocessRequest.of(request)
    entry = card_entry(card, catalog)
    base = entry.preprocess if entry is not None else None
    if base is not None and not request.given:
        return base

    model = load_onnx(Path(model_path), load_external_data=False)  # the graph, not the weights
    if base is None:
        base, _ = exported_metadata(model)
    name = str(card.get("name") or Path(model_path).stem)
    try:
        if request.preset == AUTO:
            request, _ = settle_auto(request, load_onnx(Path(model_path)), name=name)
        return resolve_preprocess(
            base, request, input_signature(model), name=name, commands=commands, catalog=catalog
        )
    except UnsupportedModel:
        # No flag makes a quantized graph trainable: say what it is and which float model to fetch.
        refuse_quantized(
            model, label=name, sha256=card.get("sha256"), path=model_path, catalog=catalog
        )
        found = None if request.says_normalisation else resemblance(model, catalog)
        if found is not None:
            raise unknown_preprocess(name, commands=commands, resembles=found) from None
        raise


def settle_auto(
    request: PreprocessRequest, model: onnx.ModelProto, *, name: str
) -> tuple[PreprocessRequest, str]:
    """`--preprocess auto` replaced by the preset measured best, and the line of figures saying so.

    A request without `auto` comes back as it is. Where no preset is clearly best, or the model
    is not one photos can measure, UnsupportedModel says why, with the figures.
    """
    if request.preset != AUTO:
        return request, ""

    signature = input_signature(model)
    fitted = {
        preset: resolve_preprocess(
            None, dataclasses.replace(request, preset=preset), signature, name=name
        )
        for preset in PRESETS
    }
    measured = measure_presets(
        model, runnable(model).SerializeToString(), fitted, signature=signature, name=name
    )
    if measured.best is None:
        raise UnsupportedModel(
            f"--preprocess auto cannot tell how {name} preprocesses images: {measured.summary()}"
        )
    log.warning("%s: %s", name, measured.summary())
    return dataclasses.replace(request, preset=measured.best), measured.summary()


__all__ = [
    "FLAGS_HINT",
    "PRESETS",
    "PRESET_NAMES",
    "InputSignature",
    "PreprocessRequest",
    "Resemblance",
    "resemblance",
    "settle_auto",
    "exported_metadata",
    "fetched_entry",
    "input_signature",
    "model_preprocess",
    "resolve_preprocess",
    "unknown_preprocess",
]
