"""Where the model looked: class-activation heatmaps (LayerCAM) over a few held-out images, for report.html.

`zoo adapt` and `zoo report` compute them (`write_heatmaps`) on the worst mistakes and the most
confident correct images of each class, and keep them in RUN/heatmaps.json with their thumbnails;
the page (`heatmaps_section`) only reads that file, so `zoo export` and `zoo verify` redraw it
without a model. The maps come from the grad-cam package (pytorch_grad_cam); this module chooses
the layer and the images and draws the thumbnails.

The layer is the backbone's last spatial feature map: the feature tensor that fed the old head
when it is spatial, else (a head after a global pool and flatten, as in EfficientNet-Lite0) the
last four-dimensional tensor of the converted graph; where that map is coarser than
`FINE_SIDE` cells a side (4x4 at 128 px, 7x7 at 224), the last map of twice its resolution before
it (stride 16). An identity module is tapped onto that value, so the library hooks a module
whatever onnx2torch made the value with (a module or a function).

The method is LayerCAM (Jiang et al. 2021): each cell weighted by its own positive gradient, not
one weight a channel as Grad-CAM does, which keeps the place at the finer layer. Its maps are then
put on the image where each cell really looks (`cell_centres`), not on an even grid. Measured on
EfficientNet-Lite0 fine-tuned on images whose class is a coloured patch alone (tests/test_heatmaps,
80 images at 128 px), share of peaks inside the patch: Grad-CAM on the last map 29%; LayerCAM on
the stride-16 map 81%; placed by the cells' centres 98.8%. At 224 px (48 images) the same steps
give 25%, 65% and 75% (every red patch found, half of the blue ones).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.results import ImagePrediction
from pipeline.core.rundir import RunDir
from pipeline.data.images import center_crop, normalize, open_for, resize_for
from pipeline.export.deploy import load_run
from pipeline.report.page import THUMBNAIL_PX, data_uri, esc, warning
from pipeline.report.predictions import resolve_ref
from zoo.catalog import Catalog, Preprocess, load_catalog
from zoo.errors import UnsupportedModel, ZooError
from zoo.files import write_json

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

HEATMAPS_FILE = "heatmaps.json"  # in the run directory: a HeatmapRecord
SCHEMA_VERSION = 1
MAX_MISTAKES = 8  # the worst mistakes, by loss
CORRECT_PER_CLASS = 2  # the most confident correct images of each class...
MAX_CORRECT = 16  # ...up to this many in all
BATCH = 8  # images per backward pass
BUDGET_S = 20.0  # no new batch starts after this long: a slow machine shows fewer maps, not waits
TAP = "cam_tap"  # the identity module the library hooks
METHOD = "LayerCAM"
FINE_SIDE = 8  # a last map with fewer cells a side is passed over for the stride-16 one
OVERLAY_PREFIX = "data:image/jpeg;base64,"  # the only thing the page embeds from the file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heatmap:
    """One image: what the run predicted for it, and where the model looked."""

    image: str  # as in predictions.csv: relative to the data source, or a built-in ref
    label: str  # the true class
    predicted: str  # the class the map is of
    confidence: float  # of the prediction
    peak: tuple[float, float]  # (x, y) of the hottest point, fractions of the input crop
    overlay: str  # a JPEG data URI: the input crop with the map over it

    @property
    def correct(self) -> bool:
        return self.label == self.predicted


@dataclass(frozen=True)
class HeatmapRecord:
    """heatmaps.json: the maps of one run, as the page shows them."""

    method: str  # e.g. "LayerCAM (grad-cam 1.5.7)"
    layer: str  # the tensor the maps were taken at, with its size
    seconds: float  # to compute them, model rebuilt included
    heatmaps: list[Heatmap]
    schema: int = SCHEMA_VERSION

    def save(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> HeatmapRecord:
        """The record `save` wrote; ZooError when it is damaged or of another schema."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            if raw.get("schema") != SCHEMA_VERSION:
                raise ValueError(f"schema {raw.get('schema')!r}, not {SCHEMA_VERSION}")
            maps = [Heatmap(**{**h, "peak": tuple(h["peak"])}) for h in raw["heatmaps"]]
            if not all(h.overlay.startswith(OVERLAY_PREFIX) for h in maps):
                raise ValueError("an overlay is not an embedded JPEG")
            return cls(raw["method"], raw["layer"], float(raw["seconds"]), maps)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ZooError(f"{path} is damaged ({exc}); `zoo report` computes it again") from exc


# ----------------------------------------------------------------------------- the layer


def _spatial_nodes(backbone: fx.GraphModule, *, until: fx.Node | None = None) -> list[fx.Node]:
    """The nodes whose value is an [N, C, H, W] map with more than one position, in graph order
    (up to `until`, included).

    The shapes are ShapeProp's, run before. A transpose (a TF export going back to channels-last
    before its pool) is passed over: its input is the same map, in the convolutions' layout.
    """
    found = []
    for node in backbone.graph.nodes:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        if node.op in ("placeholder", "get_attr", "output") or shape is None or len(shape) != 4:
            continue
        module = backbone.get_submodule(node.target) if node.op == "call_module" else None
        if "Transpose" in type(module).__name__ or node.target in ("permute", "transpose"):
            continue
        if shape[2] * shape[3] > 1:
            found.append(node)
        if node is until:
            break
    return found


def _last_spatial_node(backbone: fx.GraphModule) -> fx.Node:
    """The last node whose value is an NCHW map with more than one position."""
    found = _spatial_nodes(backbone)
    if not found:
        raise UnsupportedModel(
            "the model has no spatial feature map to draw a heatmap on; the report shows none"
        )
    return found[-1]


def _finer(backbone: fx.GraphModule, value: fx.Node) -> fx.Node:
    """`value`, or where its NCHW map is coarser than FINE_SIDE a side, the last map before it
    with at least twice its height and width (the stage before the last downsampling)."""
    height, width = value.meta["tensor_meta"].shape[2:]
    if min(height, width) >= FINE_SIDE:
        return value
    finer = [
        node
        for node in _spatial_nodes(backbone, until=value)
        if node.meta["tensor_meta"].shape[2] >= 2 * height
        and node.meta["tensor_meta"].shape[3] >= 2 * width
    ]
    return finer[-1] if finer else value


def _tapped(backbone: fx.GraphModule, value: fx.Node) -> fx.GraphModule:
    """A copy of `backbone`'s graph with an identity module after `value`, sharing its weights."""
    from torch import fx, nn

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(backbone.graph, env))
    copied = env[value]
    with graph.inserting_after(copied):
        tap = graph.call_module(TAP, (copied,))
    copied.replace_all_uses_with(tap)
    tap.args = (copied,)
    owners: dict[str, Any] = {TAP: nn.Identity()}
    for node in graph.nodes:
        if node.op == "call_module" and node.target != TAP:
            owners[node.target] = backbone.get_submodule(node.target)
        elif node.op == "get_attr":
            owners[node.target] = operator.attrgetter(node.target)(backbone)
    return fx.GraphModule(owners, graph)


class CamTarget(NamedTuple):
    """An adapted model made ready for the CAM library."""

    model: nn.Module  # takes NCHW images, whatever the model's own layout
    layer: nn.Module  # the identity tapped onto the map
    reshape: Callable[[torch.Tensor], torch.Tensor] | None  # a channels-last map to NCHW
    name: str  # the map's value in the graph and its size, for the page
    # Where each row and each column of map cells looks in the input, in pixels (`cell_centres`).
    centres: tuple[np.ndarray, np.ndarray]


def cam_target(adapted: nn.Module, example: torch.Tensor, *, layout: str) -> CamTarget:
    """`adapted` (an AdaptedModel) with its last spatial map tapped; `example`: an NCHW batch."""
    import torch
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp
    from torchvision.ops import Permute

    backbone = adapted.backbone
    steps = [Permute([0, 2, 3, 1])] if layout == "NHWC" else []
    with torch.no_grad():
        ShapeProp(backbone).propagate(nn.Sequential(*steps)(example[:1]))
    value, channels_last, onnx_value = _map_value(adapted)
    shape = value.meta["tensor_meta"].shape
    channels, height, width = (shape[3], shape[1], shape[2]) if channels_last else shape[1:]
    name = f"{onnx_value} ({channels} channels, {height}×{width})"
    model = nn.Sequential(*steps, _tapped(backbone, value), adapted.pool, adapted.head).eval()
    tap = model[len(steps)].get_submodule(TAP)
    tap.register_forward_hook(_start_gradient)
    reshape = _channels_first if channels_last else None
    centres = cell_centres(model, tap, reshape, tuple(example.shape[1:]))
    return CamTarget(model, tap, reshape, name, centres)


def cell_centres(
    model: nn.Module, tap: nn.Module, reshape: Callable | None, image_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Where each row and each column of the tapped map looks in the input, in pixels.

    A cell's effective receptive field (Luo et al. 2016): the gradient of the row's (column's)
    activations with respect to random input images, and the centre of its upper half. It is not
    where the cell sits on an even grid: padding and strides of TF-style convolutions put
    EfficientNet-Lite0's cells about 14 px up and left of it at stride 16, and its border cells
    further in; upsampled on the even grid the maps' peaks land a cell off the object.
    """
    import torch

    grabbed: dict[str, torch.Tensor] = {}
    hook = tap.register_forward_hook(lambda _m, inputs, _o: grabbed.__setitem__("map", inputs[0]))
    noise = torch.randn(4, *image_shape, generator=torch.Generator().manual_seed(0))
    noise.requires_grad_(True)
    try:
        with torch.enable_grad():
            model(noise)
            cells = reshape(grabbed["map"]) if reshape is not None else grabbed["map"]
            return tuple(_axis_centres(cells, noise, axis) for axis in (2, 3))  # type: ignore[return-value]
    finally:
        hook.remove()


def _axis_centres(cells: torch.Tensor, inputs: torch.Tensor, axis: int) -> np.ndarray:
    """`cell_centres` along one axis: 2 for rows (y), 3 for columns (x)."""
    import torch

    count, size = cells.shape[axis], inputs.shape[axis]
    positions = np.arange(size, dtype=np.float64)
    even = (np.arange(count) + 0.5) * size / count - 0.5  # where an even grid puts them
    found = even.copy()
    for index in range(count):
        (gradient,) = torch.autograd.grad(cells.narrow(axis, index, 1).abs().sum(), inputs, retain_graph=True)  # fmt: skip
        profile = gradient.abs().sum(dim=(0, 1, 5 - axis)).double().numpy()
        upper = np.clip(profile - 0.5 * profile.max(), 0, None)
        if upper.sum() > 0:
            found[index] = float((upper * positions).sum() / upper.sum())
    # In order, as the cells are: a dead cell keeps its even-grid place.
    return np.maximum.accumulate(found + np.arange(count) * 1e-6)


def _map_value(adapted: nn.Module) -> tuple[fx.Node, bool, str]:
    """The value to draw on (shapes propagated), whether it is channels-last, and its ONNX name."""
    backbone = adapted.backbone
    if adapted.probe.feature_spatial:
        value = next(n for n in backbone.graph.nodes if n.op == "output").args[0]
        channels_last = bool(getattr(adapted.pool, "channels_last", False))
        shape = value.meta["tensor_meta"].shape
        if channels_last and shape[1] * shape[2] > 1:
            return value, True, adapted.probe.feature_name
        if not channels_last and shape[2] * shape[3] > 1:
            finer = _finer(backbone, value)
            if finer is value:
                return value, False, adapted.probe.feature_name
            return finer, False, _onnx_name(adapted, finer)
    # A pooled feature tensor: the map before the pool.
    value = _finer(backbone, _last_spatial_node(backbone))
    return value, False, _onnx_name(adapted, value)


def _onnx_name(adapted: nn.Module, value: fx.Node) -> str:
    return (adapted.onnx_outputs.get(value.target) or (value.name,))[0]


def _start_gradient(_tap: nn.Module, _inputs: Any, features: torch.Tensor) -> torch.Tensor:
    """The CAM needs d(score)/d(map) alone: the gradient starts at the map, so the backward pass
    runs from the head back to the map only, never further (and frozen weights cannot stop it)."""
    return features.detach().requires_grad_(True)


def _channels_first(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)


def class_activation_maps(target: CamTarget, images: torch.Tensor) -> np.ndarray:
    """[N, H, W] LayerCAM maps in [0, 1] of each image's predicted class, at the images' size:
    the library's maps at the map's own size, placed on the image by `target.centres`."""
    # Imported here: drawing a page from heatmaps.json needs none of it (OpenCV, SciPy, ttach).
    from pytorch_grad_cam import LayerCAM

    rows, columns = target.centres

    class CellLayerCAM(LayerCAM):  # the maps at one value a cell, not resized on an even grid
        def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
            return len(columns), len(rows)

    cam = CellLayerCAM(
        model=target.model, target_layers=[target.layer], reshape_transform=target.reshape
    )
    try:
        cells = cam(input_tensor=images, targets=[_predicted_probability] * len(images))
    finally:
        cam.activations_and_grads.release()
    return np.stack([_placed(c, rows, columns, images.shape[2:]) for c in cells])


def _placed(cells: np.ndarray, rows: np.ndarray, columns: np.ndarray, size: Sequence[int]) -> np.ndarray:  # fmt: skip
    """A [h, w] map resampled (bilinear) to [H, W] pixels, each cell at its measured centre."""
    height, width = (int(v) for v in size)
    across = np.stack([np.interp(np.arange(width), columns, row) for row in cells])
    placed = np.stack([np.interp(np.arange(height), rows, col) for col in across.T], axis=1)
    top = placed.max()
    return (placed / top if top > 0 else placed).astype(np.float32)


def _predicted_probability(logits: torch.Tensor) -> torch.Tensor:
    """The target of one image's map: the softmax probability of its predicted class.

    Its gradient weighs the class's evidence against the other classes'. The raw logit's does not:
    whatever all the logits share (the background, with two classes) would light up as well.
    """
    import torch

    return torch.softmax(logits, dim=-1).max()


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the hottest pixel's centre, as fractions of the map's width and height."""
    row, col = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
    return (float(col) + 0.5) / heatmap.shape[1], (float(row) + 0.5) / heatmap.shape[0]


def input_crops(refs: Sequence[str], preprocess: Preprocess) -> tuple[list[Image.Image], torch.Tensor]:  # fmt: skip
    """Each image's eval crop as the model sees it before normalisation, and the NCHW batch."""
    import torch

    crops = [center_crop(resize_for(open_for(r, preprocess), preprocess), preprocess.crop) for r in refs]  # fmt: skip
    channels_first = dataclasses.replace(preprocess, layout="NCHW")
    return crops, torch.from_numpy(np.stack([normalize(c, channels_first) for c in crops]))


def overlay(crop: Image.Image, heatmap: np.ndarray, *, size: int = THUMBNAIL_PX) -> str:
    """A JPEG data URI of `crop` with `heatmap` over it and its peak circled, `size` px wide."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(crop.convert("RGB"), dtype=np.float32) / 255
    drawn = Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55))
    drawn = drawn.resize((size, size), Image.Resampling.BILINEAR)
    x, y = peak(heatmap)
    radius = max(3, size // 24)
    ImageDraw.Draw(drawn).ellipse(
        (x * size - radius, y * size - radius, x * size + radius, y * size + radius),
        outline=(255, 255, 255),
        width=2,
    )
    buffer = io.BytesIO()
    drawn.save(buffer, format="JPEG", quality=80)
    return data_uri(buffer.getvalue(), "image/jpeg")


# ----------------------------------------------------------------------------- the run's maps


def chosen(predictions: Sequence[ImagePrediction]) -> list[ImagePrediction]:
    """The worst mistakes by loss, then the most confident correct images of each class."""
    mistakes = sorted((p for p in predictions if not p.correct), key=lambda p: -p.loss)
    by_class: dict[str, list[ImagePrediction]] = {}
    for prediction in sorted((p for p in predictions if p.correct), key=lambda p: -p.confidence):
        by_class.setdefault(prediction.label, []).append(prediction)
    # Rank by rank, so that with many classes each shows one before any shows two.
    correct = [
        images[rank]
        for rank in range(CORRECT_PER_CLASS)
        for images in by_class.values()
        if rank < len(images)
    ][:MAX_CORRECT]
    order = {label: index for index, label in enumerate(by_class)}
    return mistakes[:MAX_MISTAKES] + sorted(correct, key=lambda p: (order[p.label], -p.confidence))


class _Readable(NamedTuple):
    prediction: ImagePrediction
    crop: Image.Image  # what the model saw, before normalisation
    inputs: torch.Tensor  # [1, C, H, W]


def _readable(
    predictions: Sequence[ImagePrediction], preprocess: Preprocess, *, source: str
) -> list[_Readable]:
    """The images that can still be read (moved or deleted ones: the gallery says so already)."""
    found = []
    for prediction in predictions:
        try:
            crops, inputs = input_crops([resolve_ref(prediction.image, source)], preprocess)
        except (ZooError, OSError):
            continue
        found.append(_Readable(prediction, crops[0], inputs))
    return found


def compute_heatmaps(
    model: nn.Module,
    preprocess: Preprocess,
    predictions: Sequence[ImagePrediction],
    *,
    source: str,
    budget_s: float = BUDGET_S,
) -> tuple[list[Heatmap], str]:
    """The maps of `chosen(predictions)`, and the name of the layer they were taken at."""
    import torch

    readable = _readable(chosen(predictions), preprocess, source=source)
    if not readable:
        return [], ""
    target = cam_target(model, readable[0].inputs, layout=preprocess.layout)
    started = time.perf_counter()
    maps: list[Heatmap] = []
    for start in range(0, len(readable), BATCH):
        if time.perf_counter() - started > budget_s:
            break
        batch = readable[start : start + BATCH]
        cams = class_activation_maps(target, torch.cat([item.inputs for item in batch]))
        for item, heatmap in zip(batch, cams, strict=True):
            p = item.prediction
            maps.append(
                Heatmap(
                    p.image,
                    p.label,
                    p.predicted,
                    p.confidence,
                    peak(heatmap),
                    overlay(item.crop, heatmap),
                )  # fmt: skip
            )
    return maps, target.name


def write_heatmaps(
    run_dir: Path,
    *,
    models_dir: Path,
    catalog: Catalog | None = None,
    log: Callable[[str], None] | None = None,
) -> Path | None:
    """RUN/heatmaps.json from the run's best weights; None when there is nothing to draw.

    A failure is one logged line, not an error: the run and its page stand without the maps.
    """
    run = RunDir(run_dir)
    if not run.is_run() or not run.best_checkpoint.is_file():
        return None  # not a run, or one that never finished an epoch
    predictions = run.predictions()
    if not predictions:
        return None
    started = time.perf_counter()
    try:
        loaded = load_run(run.path, models_dir=models_dir, catalog=catalog or load_catalog())
        maps, layer = compute_heatmaps(
            loaded.model, loaded.preprocess, predictions, source=loaded.record.data_source or ""
        )
        record = HeatmapRecord(_method(), layer, round(time.perf_counter() - started, 2), maps)
        record.save(run.path / HEATMAPS_FILE)
    except Exception as exc:  # as refresh_report: the run and its page stand without the maps
        reason = " ".join(str(exc).split())[:200]
        (log or logger.warning)(
            f"heatmaps not computed ({type(exc).__name__}: {reason}); `zoo report {run_dir}` retries"
        )
        return None
    return run.path / HEATMAPS_FILE


def _method() -> str:
    try:
        return f"{METHOD} (grad-cam {version('grad-cam')})"
    except PackageNotFoundError:
        return METHOD


# ----------------------------------------------------------------------------- the section


def heatmaps_section(run_dir: Path) -> str:
    """The page's "Where the model looked": the stored maps, or what to run to get them."""
    path = Path(run_dir) / HEATMAPS_FILE
    if not path.is_file():
        return warning(
            f"No heatmaps yet: <code>zoo report {esc(run_dir)}</code> computes them from the run's "
            "best weights (the model it was trained from must be in the workspace)."
        )
    try:
        record = HeatmapRecord.load(path)
    except ZooError as exc:
        return warning(esc(exc))
    if not record.heatmaps:
        return warning("No held-out image could be read to draw a heatmap on.")
    wrong = sum(not h.correct for h in record.heatmaps)
    shown = (
        f"the {wrong} worst mistakes (red frame), then the most confident correct images of each "
        "class (green frame)"
        if wrong
        else "the most confident correct images of each class"
    )
    intro = (
        f"<p>{esc(record.method)} of the predicted class at the backbone's last feature map, "
        f"<code>{esc(record.layer)}</code>: red where the evidence for the prediction lies, the "
        f"circle at its peak. Shown: {shown}; {len(record.heatmaps)} images in "
        f"{record.seconds:.1f} s.</p>"
    )
    figures = "".join(_figure(h) for h in record.heatmaps)
    return f'{intro}<div class="gallery">{figures}</div>'


def _figure(heatmap: Heatmap) -> str:
    state = "correct" if heatmap.correct else "mistake"
    verdict = "correct" if heatmap.correct else f"predicted <b>{esc(heatmap.predicted)}</b>"
    name = Path(heatmap.image).name if "/" in heatmap.image else heatmap.image
    return (
        f'<figure class="cam {state}" data-true="{esc(heatmap.label)}" '
        f'data-predicted="{esc(heatmap.predicted)}" data-peak="{heatmap.peak[0]:.3f},{heatmap.peak[1]:.3f}">'
        f'<img alt="heatmap of {esc(heatmap.image)}" src="{esc(heatmap.overlay)}">'
        f"<figcaption>true <b>{esc(heatmap.label)}</b><br>{verdict}, {heatmap.confidence:.0%}"
        f'<div class="name" title="{esc(heatmap.image)}">{esc(name)}</div></figcaption></figure>'
    )
