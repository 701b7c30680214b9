"""`--preprocess auto`: which preset a file the zoo does not know was trained with, measured.

Each preset of `zoo.preprocess.PRESETS` feeds the same natural photos (scikit-image's sample
images, shipped inside that package) to the model's own pretrained head in onnxruntime. The photos
show things ImageNet has classes for (a cat, a cup of coffee, a rocket, a motorcycle), so the
score is the probability the head gives the right classes: fed the way it was trained, a model
recognises them; fed otherwise (BGR for RGB, 0-255 for [0,1]) it does not. Mean top-1 confidence
alone was tried first and does not separate presets: a model fed wrongly is often just as sure.
The preset clearly ahead is proposed, with every figure. Only an ImageNet head (1000 classes) on a
three-channel input says something this way; any other model is told why it cannot be measured.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.errors import UnsupportedModel

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from PIL import Image

    from zoo.catalog import Preprocess
    from zoo.preprocess import InputSignature

# scikit-image's bundled colour photos of things ImageNet has classes for, and those classes:
# each photo is used whole, mirrored and centre-cropped to 80%, 15 views in all, no download.
PHOTOS: dict[str, tuple[int, ...]] = {
    "chelsea.png": (281, 282, 283, 284, 285),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee.png": (504, 967, 968),  # coffee mug, espresso, cup
    "rocket.jpg": (657, 744, 812),  # missile, projectile, space shuttle
    "motorcycle_left.png": (665, 670),  # moped, motor scooter
    "motorcycle_right.png": (665, 670),
}
IMAGENET_CLASSES = 1000
# The best preset must beat the runner-up by this factor of mean confidence to be called clearly best.
CLEAR_MARGIN = 1.25


@dataclass(frozen=True)
class PresetMeasurement:
    """Mean probability a model's own head gives the right classes of the sample photos, per preset."""

    scores: dict[str, float]  # preset -> mean probability of the right classes, best first
    photos: int  # images each preset was measured on
    best: str | None  # the clearly best preset, None when none is

    def figures(self) -> str:
        """'imagenet 0.62, inception 0.41, ...'."""
        return ", ".join(f"{name} {score:.2f}" for name, score in self.scores.items())

    def summary(self) -> str:
        """One line with every figure and what to pass."""
        measured = (
            f"measured: {self.figures()} mean probability of the right class "
            f"on {self.photos} photos"
        )
        if self.best is None:
            top = max(self.scores.values())
            fit = [name for name, score in self.scores.items() if score * CLEAR_MARGIN >= top]
            out = [name for name in self.scores if name not in fit]
            ruled_out = f"; {', '.join(out)} ruled out" if out else ""
            return (
                f"{measured}; no preset is clearly best ({', '.join(fit)} within "
                f"{CLEAR_MARGIN:g}x of each other{ruled_out}): pass --preprocess with the one "
                "its source documents, or --mean/--std"
            )
        return f"{measured}; using --preprocess {self.best} (pass another preset to override)"


def sample_photos() -> list[tuple[Image.Image, tuple[int, ...]]]:
    """The sample views as RGB images, each with the ImageNet classes it shows."""
    import skimage
    from PIL import Image, ImageOps

    folder = Path(skimage.__file__).parent / "data"
    views = []
    for name, classes in PHOTOS.items():
        with Image.open(folder / name) as image:
            image = image.convert("RGB")
        width, height = image.size
        inner = image.crop((width // 10, height // 10, width - width // 10, height - height // 10))
        views += [(image, classes), (ImageOps.mirror(image), classes), (inner, classes)]
    return views


def _refusal(name: str, why: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"--preprocess auto cannot tell how {name} preprocesses images: {why}; "
        "pass --preprocess imagenet|inception|caffe|raw or --mean/--std as its source documents"
    )


def _check_measurable(
    model: onnx.ModelProto, signature: InputSignature | None, name: str
) -> tuple[str, int]:
    """The input name and class count of a model whose preprocessing photos can reveal."""
    if signature is None or signature.layout is None:
        raise _refusal(name, "its input is not an image batch it declares as NCHW or NHWC")
    if signature.channels == 1:
        raise _refusal(name, "it takes one channel (grayscale), not natural colour photos")
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    classes = max(dims[1:], default=0) if len(dims) > 1 else 0
    if classes and classes != IMAGENET_CLASSES:
        raise _refusal(
            name,
            f"its head has {classes} classes, not ImageNet's {IMAGENET_CLASSES}, so its "
            "scores on photos of everyday objects say nothing about how it wants its input",
        )
    return signature.name, classes


def _probabilities(outputs: np.ndarray) -> np.ndarray:
    """[N, classes] probabilities: the outputs as they are when they already are, else softmaxed."""
    import numpy as np

    rows = outputs.reshape(len(outputs), -1).astype(np.float64)
    if rows.min() >= 0 and np.allclose(rows.sum(1), 1.0, atol=1e-3):
        return rows
    shifted = np.exp(rows - rows.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def measure_presets(
    model: onnx.ModelProto,
    source: str | os.PathLike[str] | bytes,
    presets: Mapping[str, Preprocess],
    *,
    signature: InputSignature | None,
    name: str,
) -> PresetMeasurement:
    """Mean top-1 confidence of the model's head on the sample photos under each preset.

    `model` is the graph (to read its input and head), `source` what onnxruntime opens;
    `presets` are the presets already fitted to the graph's input (`signature`).
    """
    import numpy as np

    input_name, classes = _check_measurable(model, signature, name)
    run = _session(source)
    views = sample_photos()
    scores: dict[str, float] = {}
    for preset, preprocess in presets.items():
        inputs = _inputs([image for image, _ in views], preprocess)
        outputs = np.concatenate([run(input_name, image[None]) for image in inputs])
        if outputs.reshape(len(outputs), -1).shape[1] != (classes or IMAGENET_CLASSES):
            raise _refusal(name, f"its output has {outputs[0].size} values, not ImageNet's 1000")
        probabilities = _probabilities(outputs)
        right = [probabilities[i, list(known)].sum() for i, (_, known) in enumerate(views)]
        scores[preset] = float(np.mean(right))
    ranked = dict(sorted(scores.items(), key=lambda item: -item[1]))
    first, second = list(ranked.values())[:2]
    best = next(iter(ranked)) if first >= CLEAR_MARGIN * second else None
    return PresetMeasurement(ranked, len(views), best)


def _inputs(photos: list[Image.Image], preprocess: Preprocess) -> list[np.ndarray]:
    """The photos as the model's inputs under one preprocessing (the pipeline's own steps)."""
    from pipeline.data.images import preprocess_image

    return [preprocess_image(photo, preprocess) for photo in photos]


def _session(source: str | os.PathLike[str] | bytes) -> Callable[[str, np.ndarray], np.ndarray]:
    """A function running the model's first output on one input, in onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.log_severity_level = 3
    session = ort.InferenceSession(
        source if isinstance(source, bytes) else os.fspath(source),
        options,
        providers=["CPUExecutionProvider"],
    )
    first = session.get_outputs()[0].name

    def run(input_name: str, batch: np.ndarray) -> np.ndarray:
        return session.run([first], {input_name: batch})[0]

    return run
