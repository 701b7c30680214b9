"""The preprocessing inside the file: a graph that takes decoded pixels and gives probabilities.

`embed_preprocess` puts in front of a classifier what `pipeline.data.images.preprocess_image` does
in Python (Pillow): resize (shorter side, or both sides), centre crop, scaling, normalisation,
channel order and layout. An app then feeds uint8 pixels, NHWC, of any size, and reads softmax
probabilities as the first output.

Pillow's bilinear downscale is a filter whose support grows with the scale; ONNX `Resize` with
`antialias=1` (opset 18) is defined to do the same, so the resize runs in the graph at any input
size. The resized pixels are rounded and clipped to 0-255 as Pillow's uint8 result is, and the
centre crop rounds half to even as Python's `round` does (ONNX `Round` does too).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter
from PIL import Image

from pipeline.core.trust import OOD_OUTPUT
from pipeline.data.images import center_crop, preprocess_image, resize_for
from zoo.catalog import Preprocess

EMBED_OPSET = 18  # Resize with antialias
PIXELS = "pixels"  # the input: uint8 [N, H, W, C]
TIE = 2e-4  # float32 error of a resized pixel (~255 * 2^-23 per term) that still counts as a tie
PROBS = "probs"  # the first output: softmax probabilities [N, classes]
PREFIX = "pre_"  # names of the preprocessing nodes and values
INPUT_NAME_KEY = "zoo.input_name"  # metadata: the file's input, `pixels` once embedded
EMBEDDED_KEY = "zoo.embedded"  # metadata: {"input": "uint8 NHWC", "any_size": bool}
PREPROCESS_KEY = "zoo.preprocess"  # metadata: the preprocessing inside, for a file without it


def _const(name: str, values: np.ndarray | list[float] | list[int], dtype: type) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), PREFIX + name)


def _node(op: str, inputs: list[str], output: str, **attrs: object) -> onnx.NodeProto:
    names = [n if n == PIXELS or n == "" or n.startswith(PREFIX) else PREFIX + n for n in inputs]
    return helper.make_node(op, names, [PREFIX + output], name=PREFIX + output, **attrs)


def _resize_nodes(preprocess: Preprocess) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """float NHWC `rgb` -> `resized`: shorter side (or both sides) to the resize size, as Pillow."""
    size = max(preprocess.resize, preprocess.crop)
    inits = [_const("size", [size], np.int64), _const("hw", [1, 2], np.int64)]
    nodes = [
        _node("Shape", ["rgb"], "shape"),
        _node("Gather", ["shape", "hw"], "in_hw", axis=0),  # [H, W]
    ]
    if preprocess.resize_mode == "direct":
        nodes.append(_node("Concat", ["size", "size"], "out_hw", axis=0))
    else:  # torchvision's Resize(int): the shorter side -> size, the longer truncated
        nodes += [
            _node("ReduceMin", ["in_hw"], "short", keepdims=1),
            _node("Mul", ["in_hw", "size"], "scaled"),
            _node("Div", ["scaled", "short"], "floor_hw"),  # integer division: floor
            _node("Max", ["floor_hw", "size"], "out_hw"),
        ]
    inits += [
        _const("no_roi", [], np.float32),
        _const("no_scales", [], np.float32),
        _const("h_index", [0], np.int64),
        _const("w_index", [1], np.int64),
        _const("half", 0.5 + TIE, np.float32),
        _const("zero", 0.0, np.float32),
        _const("max", 255.0, np.float32),
    ]
    nodes += [
        _node("Gather", ["out_hw", "w_index"], "out_w", axis=0),
        _node("Gather", ["out_hw", "h_index"], "out_h", axis=0),
    ]
    # Pillow resizes an 8-bit image in two passes, the width first, and rounds each pass to
    # uint8 (half up, then clipped): one 2-D resize rounded once differs by one level in ~15% of
    # the pixels, enough to flip the top-1 of a few percent of small upscaled images. Pillow sums
    # in fixed point, so the exact halves of upscales by simple ratios (1.2x: weights 1/4, 3/4)
    # are ties it rounds up; float32 lands them a few 1e-6 below, hence `TIE`.
    for axis, size_name, stage in ((2, "out_w", "wide"), (1, "out_h", "resized")):
        source = "rgb" if axis == 2 else "wide"
        nodes += [
            _node(
                "Resize",
                [source, "no_roi", "no_scales", size_name],
                f"{stage}_float",
                mode="linear",
                antialias=1,
                axes=[axis],
                coordinate_transformation_mode="half_pixel",
                exclude_outside=1,  # as Pillow: taps past the border dropped, the rest reweighted
            ),
            _node("Add", [f"{stage}_float", "half"], f"{stage}_half"),
            _node("Floor", [f"{stage}_half"], f"{stage}_round"),
            _node("Clip", [f"{stage}_round", "zero", "max"], stage),
        ]
    return nodes, inits


def _crop_nodes(crop: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """`resized` -> `cropped`: the centre crop x crop square, placed as torchvision places it."""
    inits = [
        _const("crop", [crop, crop], np.int64),
        _const("two", [2.0, 2.0], np.float32),
    ]
    nodes = [
        _node("Shape", ["resized"], "resized_shape"),
        _node("Gather", ["resized_shape", "hw"], "resized_hw", axis=0),
        _node("Sub", ["resized_hw", "crop"], "margin"),
        _node("Cast", ["margin"], "margin_float", to=TensorProto.FLOAT),
        _node("Div", ["margin_float", "two"], "half_margin"),
        _node("Round", ["half_margin"], "start_float"),  # half to even, as Python's round
        _node("Cast", ["start_float"], "start", to=TensorProto.INT64),
        _node("Add", ["start", "crop"], "end"),
        _node("Slice", ["resized", "start", "end", "hw"], "cropped"),
    ]
    return nodes, inits


def _normalise_nodes(preprocess: Preprocess) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """`cropped` -> the model's input tensor: x = (pixel * scale - mean) / std, in its layout."""
    channels = preprocess.channels
    mean = np.broadcast_to(np.asarray(preprocess.mean, np.float32), (channels,))
    std = np.broadcast_to(np.asarray(preprocess.std, np.float32), (channels,))
    # One multiply and one add: pixel * (scale / std) + (-mean / std).
    inits = [
        _const("gain", np.float32(preprocess.scale) / std, np.float32),
        _const("offset", -mean / std, np.float32),
    ]
    nodes = [
        _node("Mul", ["cropped", "gain"], "gained"),
        _node("Add", ["gained", "offset"], "normalised"),
    ]
    if preprocess.layout == "NCHW":
        nodes.append(_node("Transpose", ["normalised"], "model_input", perm=[0, 3, 1, 2]))
    else:
        nodes.append(_node("Identity", ["normalised"], "model_input"))
    return nodes, inits


def preprocess_graph(
    preprocess: Preprocess, *, any_size: bool = True, opset: int = EMBED_OPSET
) -> onnx.ModelProto:
    """The preprocessing alone: uint8 NHWC pixels -> the model's float input.

    `any_size`: the graph resizes and crops images of any size; otherwise it takes the crop size
    (crop x crop), resized and cropped by the app, for runtimes without an antialiased resize.
    """
    nodes = [_node("Cast", [PIXELS], "pixels_float", to=TensorProto.FLOAT)]
    inits: list[TensorProto] = []
    if preprocess.bgr and preprocess.channels == 3:
        inits.append(_const("bgr", [2, 1, 0], np.int64))
        nodes.append(_node("Gather", ["pixels_float", "bgr"], "rgb", axis=3))
    else:
        nodes.append(_node("Identity", ["pixels_float"], "rgb"))
    parts = [_resize_nodes(preprocess), _crop_nodes(preprocess.crop)] if any_size else []
    if not any_size:
        nodes.append(_node("Identity", ["rgb"], "cropped"))
    for part_nodes, part_inits in [*parts, _normalise_nodes(preprocess)]:
        nodes += part_nodes
        inits += part_inits
    size, channels = preprocess.crop, preprocess.channels
    height, width = ("height", "width") if any_size else (size, size)
    pixels = helper.make_tensor_value_info(
        PIXELS, TensorProto.UINT8, ["batch", height, width, channels]
    )
    shape = ["batch", channels, size, size] if preprocess.layout == "NCHW" else ["batch", size, size, channels]  # fmt: skip
    output = helper.make_tensor_value_info(PREFIX + "model_input", TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "zoo_preprocess", [pixels], [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_embed_opset(classifier: onnx.ModelProto) -> onnx.ModelProto:
    if _opset_of(classifier) >= EMBED_OPSET:
        return classifier
    return version_converter.convert_version(classifier, EMBED_OPSET)


def embed_preprocess(
    classifier: onnx.ModelProto,
    preprocess: Preprocess,
    *,
    probs_output: str = PROBS,
    any_size: bool = True,
) -> onnx.ModelProto:
    """`classifier` (float input -> outputs incl. `probs_output`) behind its preprocessing.

    The result takes uint8 pixels [N, H, W, C] named `pixels` (any H, W with `any_size`, else the
    crop size) and gives `probs` first, the unknown score second when the classifier has one
    (`ood_score`, pipeline.train.trust), then its other outputs.
    """
    # Only the antialiased Resize needs opset 18; the fixed-size graph keeps the file's opset,
    # which its converters (OpenVINO, onnx2tf) already took.
    classifier = _at_embed_opset(classifier) if any_size else classifier
    opset = max(_opset_of(classifier), EMBED_OPSET if any_size else 13)
    front = preprocess_graph(preprocess, any_size=any_size, opset=opset)
    front.ir_version = classifier.ir_version = max(classifier.ir_version, front.ir_version)
    input_name = classifier.graph.input[0].name
    outputs = [o.name for o in classifier.graph.output]
    second = [o for o in outputs if o == OOD_OUTPUT]
    ordered = [probs_output, *second, *(o for o in outputs if o not in (probs_output, OOD_OUTPUT))]
    merged = compose.merge_models(
        front,
        classifier,
        io_map=[(PREFIX + "model_input", input_name)],
        outputs=ordered,
    )
    by_name = {o.name: o for o in merged.graph.output}
    del merged.graph.output[:]
    merged.graph.output.extend(by_name[name] for name in ordered)  # probabilities first
    del merged.opset_import[:]
    merged.opset_import.append(helper.make_opsetid("", opset))
    merged.opset_import.extend(
        o for o in classifier.opset_import if o.domain not in ("", "ai.onnx")
    )
    del merged.metadata_props[:]
    merged.metadata_props.extend(
        p for p in classifier.metadata_props if p.key not in (INPUT_NAME_KEY, EMBEDDED_KEY)
    )
    merged.metadata_props.add(key=INPUT_NAME_KEY, value=PIXELS)
    embedded = {"input": "uint8 NHWC", "any_size": any_size}
    merged.metadata_props.add(key=EMBEDDED_KEY, value=json.dumps(embedded, sort_keys=True))
    if not any(p.key == PREPROCESS_KEY for p in merged.metadata_props):  # what the graph does
        merged.metadata_props.add(key=PREPROCESS_KEY, value=json.dumps(preprocess.to_dict()))
    onnx.checker.check_model(merged)
    return merged


def embedded_input(name: str, element_type: str, shape: list[object]) -> bool | None:
    """None unless an input (as onnxruntime describes it) takes embedded pixels; then whether it
    takes any size (True) or only the crop size (False)."""
    if name != PIXELS or element_type != "tensor(uint8)" or len(shape) != 4:
        return None
    return not all(isinstance(d, int) and d > 0 for d in shape[1:3])


def pixels_for(img: Image.Image, preprocess: Preprocess, *, any_size: bool) -> np.ndarray:
    """uint8 [H, W, C] for an embedded file: the decoded image itself (any size), or Pillow's
    resize and centre crop of it, as the app does for a fixed-size file."""
    if not any_size:
        img = center_crop(resize_for(img, preprocess), preprocess.crop)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def image_input(img: Image.Image, preprocess: Preprocess, *, embedded: bool | None) -> np.ndarray:
    """One decoded image as a file takes it: the Python preprocessing (`embedded` None), or the
    pixels of a file with the preprocessing inside (`embedded`: whether it takes any size)."""
    if embedded is None:
        return preprocess_image(img, preprocess)
    return pixels_for(img, preprocess, any_size=embedded)
