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

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from zoo.catalog import Preprocess

EMBED_OPSET = 18  # Resize with antialias
PIXELS = "pixels"  # the input: uint8 [N, H, W, C]
PROBS = "probs"  # the first output: softmax probabilities [N, classes]
PREFIX = "pre_"  # names of the preprocessing nodes and values


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
    inits.append(_const("no_roi", [], np.float32))
    inits.append(_const("no_scales", [], np.float32))
    nodes.append(
        _node(
            "Resize",
            ["rgb", "no_roi", "no_scales", "out_hw"],
            "resized_float",
            mode="linear",
            antialias=1,
            axes=[1, 2],
            coordinate_transformation_mode="half_pixel",
        )
    )
    inits += [_const("zero", 0.0, np.float32), _const("max", 255.0, np.float32)]
    nodes += [
        _node("Round", ["resized_float"], "resized_round"),
        _node("Clip", ["resized_round", "zero", "max"], "resized"),
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


def preprocess_graph(preprocess: Preprocess, *, any_size: bool = True) -> onnx.ModelProto:
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", EMBED_OPSET)])
    model.ir_version = 8
    return model


def _at_embed_opset(classifier: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in classifier.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= EMBED_OPSET:
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
    crop size) and gives `probs` first, then the classifier's other outputs.
    """
    classifier = _at_embed_opset(classifier)
    front = preprocess_graph(preprocess, any_size=any_size)
    front.ir_version = classifier.ir_version = max(classifier.ir_version, front.ir_version)
    input_name = classifier.graph.input[0].name
    outputs = [o.name for o in classifier.graph.output]
    ordered = [probs_output, *(o for o in outputs if o != probs_output)]
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
    merged.opset_import.append(helper.make_opsetid("", EMBED_OPSET))
    merged.opset_import.extend(
        o for o in classifier.opset_import if o.domain not in ("", "ai.onnx")
    )
    del merged.metadata_props[:]
    merged.metadata_props.extend(classifier.metadata_props)
    onnx.checker.check_model(merged)
    return merged
