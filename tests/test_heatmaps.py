"""report.html's "Where the model looked": Grad-CAM maps, their layer, their images, their section.

Fast tests take the layer of every tiny graph, check the maps on a hand-built model whose evidence
is known (a red and a blue detector), and draw the section from a stored record. The slow ones
fine-tune the bundled EfficientNet-Lite0 on images whose class is decided by a coloured patch alone
(acceptance 6 of issue 26) and read the maps back from the run and its report.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx_builders import TINY_GRAPHS, save
from PIL import Image
from torch import fx, nn

from cli import main
from pipeline.convert import import_model
from pipeline.core.checkpoint import BEST_CHECKPOINT
from pipeline.core.results import ImagePrediction, write_predictions
from pipeline.export.deploy import load_run
from pipeline.report import heatmaps
from pipeline.report.heatmaps import (
    HEATMAPS_FILE,
    Heatmap,
    HeatmapRecord,
    cam_target,
    chosen,
    class_activation_maps,
    heatmaps_section,
    input_crops,
    peak,
    write_heatmaps,
)
from pipeline.report.html import write_report
from pipeline.surgery.head import AdaptedModel, GlobalPool, replace_head
from zoo.catalog import load_catalog

MODEL = "efficientnet-lite0"
MAX_BYTES = 5 * 1024 * 1024


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("kind", sorted(TINY_GRAPHS))
def test_the_map_is_the_last_spatial_feature_map(kind: str, tmp_path: Path) -> None:
    imported = import_model(save(TINY_GRAPHS[kind][0](), tmp_path / f"{kind}.onnx"))
    adapted = replace_head(imported, imported.probe, 3).eval()
    probe = imported.probe
    images = torch.randn(2, probe.channels, *probe.input_size)  # NCHW, whatever the model's layout
    target = cam_target(adapted, images, layout=probe.layout)
    # The value before the global pool (a gate or a sum where the graph has one), at full size.
    expected = {"fixed_batch": "gated", "shared_weights": "summed"}.get(kind, "features")
    assert target.name.startswith(f"{expected} (") and target.name.endswith("8×8)"), target.name
    own = images.permute(0, 2, 3, 1) if probe.layout == "NHWC" else images
    with torch.no_grad():  # the same logits: only a tap was added
        torch.testing.assert_close(target.model(images), adapted(own))
    maps = class_activation_maps(target, images)
    assert maps.shape == (2, *probe.input_size) and maps.min() >= 0 and maps.max() <= 1


class _ColourDetectors(nn.Module):
    """A red and a blue detector per 8x8 cell: evidence that lies exactly where the colour is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]])[..., None, None])  # fmt: skip
        self.pool = nn.AvgPool2d(8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(images)))


def _detector_model() -> AdaptedModel:
    """Class 0 "red" and class 1 "blue", each from its own detector (the test images' only evidence)."""
    head = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        head[0].bias.zero_()
    probe = types.SimpleNamespace(feature_spatial=True, feature_name="detectors")
    backbone = fx.symbolic_trace(_ColourDetectors())
    return AdaptedModel(backbone, GlobalPool(), head, probe=probe, onnx_outputs={}).eval()


def _patch_batch(count: int, *, side: int = 128, patch: int = 24) -> tuple[torch.Tensor, list]:
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for i in range(count):
        image = rng.normal(0, 0.1, (3, side, side)).astype(np.float32)
        x, y = rng.integers(0, side - patch, 2)
        image[:, y : y + patch, x : x + patch] = np.array([1.0, 0, 0] if i % 2 else [0, 0, 1.0])[:, None, None]  # fmt: skip
        images.append(image)
        boxes.append((x / side, y / side, (x + patch) / side, (y + patch) / side))
    return torch.from_numpy(np.stack(images)), boxes


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_cells_are_placed_where_they_look() -> None:
    """A map whose cells look 4 px up and left of the even grid (a padded shift before the pool)."""
    from pipeline.report.heatmaps import cell_centres

    class Shift(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (4, 0, 4, 0))[:, :, :32, :32]

    tap = nn.Identity()
    model = nn.Sequential(Shift(), nn.AvgPool2d(8), tap, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))  # fmt: skip
    rows, columns = cell_centres(model, tap, None, (3, 32, 32))
    even = np.arange(4) * 8 + 3.5
    np.testing.assert_allclose(rows[1:], even[1:] - 4, atol=1e-3)
    np.testing.assert_allclose(columns, rows)
    assert rows[0] == pytest.approx(1.5, abs=1e-3)  # the first cell sees the 4 pixels left of it
    # Without the shift: the even grid.
    plain = nn.Sequential(nn.AvgPool2d(8), tap, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))  # fmt: skip
    np.testing.assert_allclose(cell_centres(plain, tap, None, (3, 32, 32))[0], even, atol=1e-3)


def test_the_peak_falls_where_the_evidence_is() -> None:
    images, boxes = _patch_batch(12)
    target = cam_target(_detector_model(), images, layout="NCHW")
    assert target.name == "detectors (2 channels, 16×16)"
    maps = class_activation_maps(target, images)
    assert all(_inside(peak(m), box) for m, box in zip(maps, boxes, strict=True))


def test_peak_is_the_hottest_pixel_as_fractions() -> None:
    heatmap = np.zeros((10, 20), dtype=np.float32)
    heatmap[7, 3] = 1.0
    assert peak(heatmap) == pytest.approx((3.5 / 20, 7.5 / 10))


# ----------------------------------------------------------------------------- the images


def _prediction(image: str, label: str, predicted: str, confidence: float) -> ImagePrediction:
    loss = -np.log(confidence if label == predicted else (1 - confidence) / 2)
    return ImagePrediction(image, label, predicted, confidence, float(loss))


def test_worst_mistakes_then_the_most_confident_correct_images_of_each_class() -> None:
    rng = np.random.default_rng(1)
    predictions = [
        _prediction(f"{c}/{i}.png", c, c if i % 3 else "x", float(rng.uniform(0.4, 0.99)))
        for c in ("a", "b", "c")
        for i in range(12)
    ]
    picked = chosen(predictions)
    mistakes = [p for p in picked if not p.correct]
    worst = sorted((p for p in predictions if not p.correct), key=lambda p: -p.loss)
    assert mistakes == worst[: heatmaps.MAX_MISTAKES]
    correct = picked[len(mistakes) :]
    assert all(p.correct for p in correct)
    for label in ("a", "b", "c"):
        mine = [p for p in correct if p.label == label]
        best = sorted((p for p in predictions if p.correct and p.label == label), key=lambda p: -p.confidence)  # fmt: skip
        assert mine == best[: heatmaps.CORRECT_PER_CLASS]


def test_many_classes_show_one_each_before_any_shows_two() -> None:
    predictions = [_prediction(f"{c}/{i}.png", str(c), str(c), 0.9 - i / 10) for c in range(20) for i in range(3)]  # fmt: skip
    picked = chosen(predictions)
    assert len(picked) == heatmaps.MAX_CORRECT
    assert len({p.label for p in picked}) == min(20, heatmaps.MAX_CORRECT)


def test_input_crops_are_what_the_model_sees(tmp_path: Path) -> None:
    preprocess = load_catalog().get(MODEL).preprocess.at_size(32)
    pixels = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crops, batch = input_crops([str(tmp_path / "wide.png")], preprocess)
    assert crops[0].size == (32, 32) and batch.shape == (1, 3, 32, 32)
    from pipeline.data.images import open_for, preprocess_image

    expected = preprocess_image(open_for(str(tmp_path / "wide.png"), preprocess), preprocess)
    np.testing.assert_allclose(batch[0].numpy(), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the section


class _Figures(HTMLParser):
    """The heatmap figures of a page: their attributes and image sources."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self.tags: set[str] = set()
        self._open: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.add(tag)
        if tag == "figure" and "cam" in (values.get("class") or "").split():
            self._open = {**values, "img": None}
            self.figures.append(self._open)
        elif tag == "img" and self._open is not None:
            self._open["img"] = values.get("src")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._open = None


def _overlay(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), colour).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _record(names: list[tuple[str, str]]) -> HeatmapRecord:
    maps = [
        Heatmap(f"{label}/{i}.png", label, predicted, 0.8, (0.25, 0.75), _overlay((200, 0, 0)))
        for i, (label, predicted) in enumerate(names)
    ]
    return HeatmapRecord("LayerCAM (grad-cam 1.5.7)", "/bn2/act/Clip_output_0 (1280 channels, 7×7)", 1.5, maps)  # fmt: skip


def test_the_section_shows_each_stored_map(tmp_path: Path) -> None:
    record = _record([("<i>cat</i>", "dog"), ("dog", "dog"), ("cat", "cat")])
    record.save(tmp_path / HEATMAPS_FILE)
    assert HeatmapRecord.load(tmp_path / HEATMAPS_FILE) == record
    page = _Figures(heatmaps_section(tmp_path))
    assert [f["class"] for f in page.figures] == ["cam mistake", "cam correct", "cam correct"]
    assert page.figures[0]["data-true"] == "<i>cat</i>" and "i" not in page.tags  # escaped
    assert all(f["data-peak"] == "0.250,0.750" for f in page.figures)
    assert all(f["img"].startswith("data:image/jpeg;base64,") for f in page.figures)
    text = heatmaps_section(tmp_path)
    assert "/bn2/act/Clip_output_0" in text and "the 1 worst mistakes" in text


def test_without_maps_the_section_says_how_to_get_them(tmp_path: Path) -> None:
    assert "zoo report" in heatmaps_section(tmp_path) and not _Figures(heatmaps_section(tmp_path)).figures  # fmt: skip
    (tmp_path / HEATMAPS_FILE).write_text("{not json", encoding="utf-8")
    assert "is damaged" in heatmaps_section(tmp_path)
    # An overlay that is not an embedded JPEG would load something from elsewhere: refused.
    record = dataclasses.asdict(_record([("a", "a")]))
    raw = {**record, "heatmaps": [{**record["heatmaps"][0], "overlay": "https://example.com/x.png"}]}  # fmt: skip
    (tmp_path / HEATMAPS_FILE).write_text(json.dumps(raw), encoding="utf-8")
    assert "is damaged" in heatmaps_section(tmp_path) and "example.com" not in heatmaps_section(tmp_path)  # fmt: skip


def test_write_heatmaps_passes_over_what_is_no_finished_run(tmp_path: Path) -> None:
    lines: list[str] = []
    assert write_heatmaps(tmp_path / "missing", models_dir=tmp_path, log=lines.append) is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}", encoding="utf-8")
    assert write_heatmaps(run, models_dir=tmp_path, log=lines.append) is None  # no checkpoint
    assert not lines
    # A run whose model is gone: one line saying so, and the run is left as it was.
    (run / BEST_CHECKPOINT).write_bytes(b"x")
    write_predictions(run / "predictions.csv", [_prediction("a/0.png", "a", "a", 0.9)])
    assert write_heatmaps(run, models_dir=tmp_path, log=lines.append) is None
    assert (
        len(lines) == 1 and lines[0].startswith("heatmaps not computed (") and "\n" not in lines[0]
    )
    assert not (run / HEATMAPS_FILE).exists()


# ----------------------------------------------------------------------------- a fine-tuned run

SIDE, PATCH = 128, 40  # the model's input and the patch, in pixels
PER_CLASS = 40
# Two colours decide the class; a third class without a patch makes the model find both colours
# (with two classes alone, "blue" can be learnt as "no red anywhere", which has no place to show).
COLOURS = {"blue": (40, 70, 230), "none": None, "red": (230, 40, 40)}


def _patch_image(rng: np.random.Generator, colour, *, resize: int) -> tuple[Image.Image, tuple]:  # noqa: ANN001
    """A smooth grey background with a textured patch; the box in the centre crop the model sees."""
    grey = rng.integers(100, 160, (resize // 16, resize // 16), dtype=np.uint8)
    background = Image.fromarray(grey).resize((resize, resize), Image.Resampling.BILINEAR)
    pixels = np.repeat(np.asarray(background)[:, :, None], 3, axis=2).astype(np.float32)
    offset = round((resize - SIDE) / 2)
    x, y = (int(v) for v in rng.integers(offset, offset + SIDE - PATCH + 1, 2))
    if colour is not None:
        shade = rng.uniform(0.35, 1.0, (PATCH, PATCH, 1))
        pixels[y : y + PATCH, x : x + PATCH] = shade * np.asarray(colour, dtype=np.float32)
    box = ((x - offset) / SIDE, (y - offset) / SIDE, (x - offset + PATCH) / SIDE, (y - offset + PATCH) / SIDE)  # fmt: skip
    return Image.fromarray(pixels.astype(np.uint8)), box


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path, one_torch_thread: None) -> tuple[Path, Path, dict]:  # fmt: skip
    """EfficientNet-Lite0 fine-tuned on patch images; (run, workspace, patch box of each image)."""
    root = tmp_path_factory.mktemp("patches")
    workspace = root / "models"
    shutil.copytree(bundled_workspace, workspace, symlinks=True)
    resize = load_catalog().get(MODEL).preprocess.at_size(SIDE).resize
    rng = np.random.default_rng(0)
    boxes = {}
    for name, colour in COLOURS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image, box = _patch_image(rng, colour, resize=resize)
            image.save(root / "data" / name / f"{i}.png")
            boxes[f"{name}/{i}.png"] = box if colour is not None else None
    run = root / "run"
    result = CliRunner().invoke(
        main,
        ["--models-dir", str(workspace), "adapt", MODEL, "--data", str(root / "data"),
         "--strategy", "finetune", "--image-size", str(SIDE), "--epochs", "12", "--augment", "none",
         "--device", "cpu", "--out", str(run)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "heatmaps not computed" not in result.stderr
    return run, workspace, boxes


@pytest.mark.slow
def test_the_report_of_a_fine_tuned_run_shows_its_heatmaps(patch_run: tuple[Path, Path, dict]) -> None:  # fmt: skip
    run, workspace, boxes = patch_run
    record = HeatmapRecord.load(run / HEATMAPS_FILE)
    # The last map is 4x4 at 128 px: the maps are drawn at the stride-16 one before it.
    assert record.layer.endswith("channels, 8×8)") and record.method.startswith("LayerCAM (")
    assert record.heatmaps and len(record.heatmaps) <= heatmaps.MAX_MISTAKES + heatmaps.MAX_CORRECT
    path = write_report(run)
    text = path.read_text(encoding="utf-8")
    page = _Figures(text)
    assert len(page.figures) == len(record.heatmaps)
    for figure in page.figures:
        image = Image.open(io.BytesIO(base64.b64decode(figure["img"].split(",", 1)[1])))
        assert image.format == "JPEG" and image.size == (128, 128)
    assert path.stat().st_size < MAX_BYTES
    assert not re.search(r"(src|href)=\"(?!data:|#)", text) and "https://" not in text
    # `zoo report` draws them again from the best weights, to the same maps.
    result = CliRunner().invoke(main, ["--models-dir", str(workspace), "report", str(run)])
    assert result.exit_code == 0 and "heatmaps not computed" not in result.stderr
    again = HeatmapRecord.load(run / HEATMAPS_FILE)
    assert [h.peak for h in again.heatmaps] == [h.peak for h in record.heatmaps]


@pytest.mark.slow
def test_the_peak_falls_inside_the_patch(patch_run: tuple[Path, Path, dict]) -> None:
    run, workspace, boxes = patch_run
    loaded = load_run(run, models_dir=workspace, catalog=load_catalog())
    names = [name for name, box in boxes.items() if box is not None]
    _, images = input_crops([str(run.parent / "data" / n) for n in names], loaded.preprocess)
    target = cam_target(loaded.model, images, layout=loaded.preprocess.layout)
    maps = np.concatenate([class_activation_maps(target, images[i : i + 16]) for i in range(0, len(images), 16)])  # fmt: skip
    inside = [_inside(peak(m), boxes[n]) for m, n in zip(maps, names, strict=True)]
    print(f"heatmap peaks inside the patch: {np.mean(inside):.1%} of {len(inside)}")
    assert np.mean(inside) >= 0.9, f"{np.mean(inside):.0%} of the peaks inside the patch"
