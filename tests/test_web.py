"""The `web` target: its folder, its node gate, and the page itself in a real headless chromium.

The page must see the pixels zoo's Python path sees (decoded at natural size, EXIF applied,
transparency on white, Pillow's luma for one-channel models) and run the same wasm as the gate.
Tests that need node or the browser skip, saying why, where those are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from browser import browser_missing, classify_in_page, serve_folder
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cli import main
from pipeline.core.metadata import encode_metadata, metadata_of, read_metadata
from pipeline.core.samples import DataSplit
from pipeline.data.images import open_image
from pipeline.export import target_web
from pipeline.export.embed import PIXELS, embed_preprocess
from pipeline.export.target_web import convert_web, run_web, serve_command, web_missing
from pipeline.export.targets import TargetInput, require, target_missing
from zoo.catalog import Preprocess
from zoo.errors import UnsupportedModel, ZooError

needs_node = pytest.mark.skipif(web_missing() is not None, reason=f"web target: {web_missing()}")
needs_browser = pytest.mark.skipif(
    web_missing() is not None or browser_missing() is not None,
    reason=f"web page: {web_missing() or browser_missing()}",
)
MODEL = "efficientnet-lite0"
PAGE_FILES = {"index.html", "model.onnx", "labels.txt", "preprocess.json", "README.md"}
PAGE_FILES |= set(target_web.RUNTIME_FILES)


def tiny_classifier(preprocess: Preprocess, labels: list[str], *, seed: int = 0) -> onnx.ModelProto:  # fmt: skip
    """Every input pixel weighs on every class (Flatten -> MatMul), so a pixel out of place shows."""
    channels, size = preprocess.channels, preprocess.crop
    rng = np.random.default_rng(seed)
    features = channels * size * size
    weight = rng.standard_normal((features, len(labels))) * 3 / np.sqrt(features)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(labels)]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(labels)]),
        ],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {"labels": labels, "preprocess": preprocess, "run": "tiny-run"}
    for key, value in encode_metadata(metadata).items():
        model.metadata_props.add(key=key, value=value)
    return model


def web_folder(model: onnx.ModelProto, folder: Path) -> Path:
    """What `zoo export --target web` writes: `model` behind its preprocessing, then the page."""
    metadata = metadata_of(model)
    folder.mkdir(parents=True)
    embedded = folder.parent / f"{folder.name}-embedded.onnx"
    onnx.save(embed_preprocess(model, metadata.preprocess), embedded)
    source = TargetInput(embedded, metadata.preprocess, metadata.labels, PIXELS, embedded=True)
    convert_web(source, folder)
    return folder


def ort_probs(model_path: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {PIXELS: pixels})[0]


# --- without node: what is missing, and refusals ---------------------------------------------


def test_missing_runtime_is_one_line_saying_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(target_web, "RUNTIME_DIR", tmp_path / "node_modules" / "onnxruntime-web")
    monkeypatch.setattr(target_web.shutil, "which", lambda name: "/usr/bin/node")
    line = target_missing("web")
    assert line is not None and "\n" not in line
    assert "onnxruntime-web is not installed" in line and line.endswith(target_web.HOW_TO_GET)
    source = TargetInput(tmp_path / "m.onnx", Preprocess((0.5,), (0.5,)), ("a",), PIXELS, True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ZooError, match=r"^web: onnxruntime-web is not installed .*npm ci"):
        convert_web(source, out)
    assert list(out.iterdir()) == []  # nothing half-written
    monkeypatch.setattr(target_web.shutil, "which", lambda name: None)
    assert "node is not on PATH" in (target_missing("web") or "")


def test_a_stale_install_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "onnxruntime-web"
    fake.mkdir()
    (fake / "package.json").write_text(json.dumps({"version": "1.0.0"}))
    monkeypatch.setattr(target_web, "RUNTIME_DIR", fake)
    monkeypatch.setattr(target_web.shutil, "which", lambda name: "/usr/bin/node")
    assert f"not the pinned {target_web.pinned_version()}" in (web_missing() or "")


def test_the_page_needs_the_preprocessing_inside(tmp_path: Path) -> None:
    source = TargetInput(tmp_path / "m.onnx", Preprocess((0.5,), (0.5,)), ("a",), "x", False)
    with pytest.raises(UnsupportedModel, match="--embed-preprocess"):
        convert_web(source, tmp_path)


def test_registered_as_an_any_size_target_that_says_how_to_serve() -> None:
    web = require("web")
    assert web.embed_by_default and web.takes_any_size and web.run is run_web
    assert web.usage is serve_command
    assert "python -m http.server -d RUN/deploy/web" in serve_command(Path("RUN/deploy/web"))


def test_without_a_browser_the_page_tests_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import browser

    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    assert "apt-get install chromium" in (browser.browser_missing() or "")


def test_the_runtime_is_pinned_exactly() -> None:
    package = json.loads((target_web.WEB_DIR / "package.json").read_text())
    lock = json.loads((target_web.WEB_DIR / "package-lock.json").read_text())
    pinned = package["dependencies"]["onnxruntime-web"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)  # no ^ or ~: npm ci installs this one
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == pinned


# --- the node gate: the page's wasm, in node ----------------------------------------------------

RGB = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=20, crop=16)
GRAY = Preprocess(mean=(0.5,), std=(0.25,), resize=20, crop=16, channels=1)
BGR = Preprocess(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=1.0, bgr=True, resize=18, crop=16, resize_mode="direct")  # fmt: skip
LABELS = ["cat", "dog", "café au lait", "<b>bold</b>", "猫"]


@needs_node
@pytest.mark.parametrize("preprocess", [RGB, GRAY, BGR], ids=["rgb", "gray", "bgr"])
def test_node_gate_gives_onnxruntimes_probabilities(preprocess: Preprocess, tmp_path: Path) -> None:  # fmt: skip
    model_path = tmp_path / "embedded.onnx"
    onnx.save(embed_preprocess(tiny_classifier(preprocess, LABELS), preprocess), model_path)
    rng = np.random.default_rng(1)
    sizes = [(17, 16), (40, 25), (16, 90), (120, 121)]  # up and down, both orientations
    images = [rng.integers(0, 256, (h, w, preprocess.channels), dtype=np.uint8) for h, w in sizes]
    probs = run_web(model_path, images)
    reference = np.concatenate([ort_probs(model_path, image[None]) for image in images])
    assert probs.shape == (len(images), len(LABELS))
    np.testing.assert_allclose(probs, reference, atol=1e-6)
    assert len({tuple(p.argmax(keepdims=True)) for p in probs}) > 1  # not one constant answer
    same_size = np.stack([images[0]] * 3)  # an array [N, H, W, C]: still one image a run
    np.testing.assert_allclose(run_web(model_path, same_size), reference[[0, 0, 0]], atol=1e-6)


@needs_node
def test_node_gate_runs_a_plain_file_and_reads_its_probs(tmp_path: Path) -> None:
    """`zoo verify --runtimes web` on a file without the preprocessing: float input, probs output."""
    path = tmp_path / "plain.onnx"
    onnx.save(tiny_classifier(RGB, LABELS), path)
    inputs = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(["probs"], {"x": inputs})[0]
    np.testing.assert_allclose(run_web(path, inputs), reference, atol=1e-6)
    # Another output by name (the gate reads `ood_score` so): its values as they are, no softmax.
    logits = session.run(["logits"], {"x": inputs})[0]
    np.testing.assert_allclose(
        run_web(path, inputs, output="logits"), logits.reshape(-1), atol=1e-5
    )
    with pytest.raises(ZooError, match="has no ood_score output"):
        run_web(path, inputs, output="ood_score")


@needs_node
def test_node_gate_failure_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(tiny_classifier(RGB, LABELS), path)
    wrong = [np.zeros((1, 3, 5, 5), np.float32)]  # not the model's input shape
    with pytest.raises(ZooError, match=r"^web: onnxruntime-web could not run model.onnx \(.*zoo verify`$"):  # fmt: skip
        run_web(path, wrong)


@needs_node
def test_the_folder_holds_everything_and_nothing_remote(tmp_path: Path) -> None:
    folder = web_folder(tiny_classifier(GRAY, LABELS), tmp_path / "web")
    assert {p.name for p in folder.iterdir()} == PAGE_FILES
    assert (folder / "labels.txt").read_text(encoding="utf-8").splitlines() == LABELS
    preprocess = json.loads((folder / "preprocess.json").read_text())
    assert preprocess["channels"] == 1 and preprocess["embedded"] is True
    assert "ood" not in preprocess  # a file without an unknown score: nothing to say of one
    page = (folder / "index.html").read_text()
    assert "<title>tiny-run · image classifier</title>" in page  # the run's name, escaped
    assert not re.search(
        r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", page
    )
    assert "numThreads = 1" in page and "wasmPaths" in page
    readme = (folder / "README.md").read_text()
    for fact in ("python -m http.server", "**uint8**", "**NHWC**", "[1, H, W, 1]", "**any size**",
                 "**first output is the probabilities**", "ort.InferenceSession.create('model.onnx')"):  # fmt: skip
        assert fact in readme, fact
    assert "ood_score" not in readme
    embedded = onnx.load(folder / "model.onnx")
    assert embedded.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert embedded.graph.output[0].name == "probs"


# --- the page in headless chromium ---------------------------------------------------------------


def awkward_images(folder: Path) -> list[Path]:
    """Images a person drops: sizes up and down, transparency, gray, a photo, an EXIF rotation."""
    folder.mkdir()
    rng = np.random.default_rng(3)

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()

    Image.fromarray(noise(13, 20, 3)).save(folder / "small.png")
    Image.fromarray(noise(200, 300, 3)).save(folder / "wide.png")
    alpha = noise(40, 30, 4)
    alpha[:20, :, 3] = 0  # the top half transparent: white, as zoo's Python path composites it
    Image.fromarray(alpha, "RGBA").save(folder / "alpha.png")
    Image.fromarray(noise(50, 41, 1), "L").save(folder / "gray.png")
    from skimage import data as samples

    Image.fromarray(samples.chelsea()).save(folder / "photo.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(samples.coffee()[:200, :300]).save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


@needs_browser
@pytest.mark.parametrize("preprocess", [RGB, GRAY], ids=["rgb", "gray"])
def test_page_sees_the_pixels_zoo_sees(preprocess: Preprocess, tmp_path: Path) -> None:
    """Canvas decoding, compositing, luma and NHWC in the page give onnxruntime's probabilities."""
    folder = web_folder(tiny_classifier(preprocess, LABELS), tmp_path / "web")
    images = awkward_images(tmp_path / "images")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with serve_folder(folder) as url:
        page = classify_in_page(url, [*images, broken])
    assert page.status == "ready", page.status_text
    row = next(r for r in page.rows if r["name"] == broken.name)
    assert row["state"] == "error" and row["error"]  # shown on its card; the others go on
    assert page.labels == LABELS  # escaped, in order
    assert all(u.startswith((url, "blob:" + url[:-1])) for u in page.fetched), page.fetched
    assert {u.removeprefix(url) for u in page.fetched} >= {"model.onnx", *target_web.RUNTIME_FILES}
    for image in images:
        pixels = np.asarray(open_image(image, channels=preprocess.channels))
        pixels = pixels.reshape(1, *pixels.shape[:2], preprocess.channels)
        reference = ort_probs(folder / "model.onnx", pixels)[0]
        top3 = page.top3(image.name)
        order = np.argsort(-reference)[:3]
        assert [t["label"] for t in top3] == [LABELS[i] for i in order], image.name
        shown = np.array([t["probability"] for t in top3])
        np.testing.assert_allclose(shown, reference[order], atol=1e-6, err_msg=image.name)


# --- end to end: a run's page against `zoo predict` ----------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path, bundled_workspace: Path) -> Path:
    models_dir = tmp_path / "models"
    shutil.copytree(bundled_workspace, models_dir, symlinks=True)
    return models_dir


def zoo(*args: str, models_dir: Path) -> str:
    """Run the CLI in-process; its stdout, after checking it succeeded."""
    result = CliRunner().invoke(main, ["--models-dir", str(models_dir), *args])
    assert result.exit_code == 0, result.stderr or result.output
    return result.stdout


def predict_json(model: Path, images: list[Path], models_dir: Path) -> dict[str, dict]:
    out = zoo("predict", str(model), *map(str, images), "--top-k", "2", "--json", models_dir=models_dir)  # fmt: skip
    return {Path(p["image"]).name: p for p in json.loads(out)["predictions"]}


def top1_of_predict(model: Path, images: list[Path], models_dir: Path) -> dict[str, dict]:
    return {name: p["top"] for name, p in predict_json(model, images, models_dir).items()}


def assert_page_agrees_with_predict(
    run: Path, images: list[Path], models_dir: Path, *, count: int = 10
) -> set[str]:
    """The run's web page in chromium: the same top-1 as `zoo predict` on each image, and the same
    images "unknown" (past the file's threshold); the names of those."""
    folder = web_folder(onnx.load(run / "model.onnx"), run / "deploy" / "web")
    predicted = predict_json(run / "model.onnx", images, models_dir)
    with serve_folder(folder) as url:
        page = classify_in_page(url, images, screenshot=run / "page.png")
    assert page.status == "ready", page.status_text
    assert page.labels == list(read_metadata(run / "model.onnx").labels)  # from the metadata
    shown = {row["name"]: row.get("top1") for row in page.rows}
    expected = {name: p["top"][0]["label"] for name, p in predicted.items()}
    assert shown == expected
    unknown = {name for name, p in predicted.items() if p["unknown"]}
    assert {row["name"] for row in page.rows if row.get("unknown") == "true"} == unknown
    assert all("oodScore" in row for row in page.rows)  # the file's second output, read
    assert len(page.rows) == len(images) == count
    return unknown


@needs_browser
@pytest.mark.slow
def test_page_agrees_with_zoo_predict_on_generated_digits(
    workspace: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    run = tmp_path / "digits"
    zoo("adapt", MODEL, "--strategy", "feature", "--epochs", "3", "--train-per-class", "8",
        "--out", str(run), models_dir=workspace)  # fmt: skip
    zoo("export", str(run), models_dir=workspace)
    split = DataSplit.load(run / "split.json")
    candidates = tmp_path / "candidates"
    candidates.mkdir()
    for index, (ref, _) in enumerate(split.test[:30]):
        digit = open_image(ref).resize((40 + 7 * index, 30 + 11 * (index % 9)), Image.BICUBIC)
        digit.save(candidates / f"digit{index:02d}.{'jpg' if index % 4 == 0 else 'png'}")
    # Ten the model is decided about: the page resizes in the graph, within one grey level of
    # Pillow, so a near tie could go either way without anything being wrong.
    tops = top1_of_predict(run / "model.onnx", sorted(candidates.iterdir()), workspace)
    margin = {name: top[0]["probability"] - top[1]["probability"] for name, top in tops.items()}
    chosen = sorted(sorted(margin, key=margin.get, reverse=True)[:10])
    # And a picture of nothing the model knows: a smooth colour field.
    stranger = candidates / "stranger.png"
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    field = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                      np.full((160, 160), 200.0)], axis=2)  # fmt: skip
    Image.fromarray(field.astype(np.uint8)).save(stranger)
    images = [candidates / name for name in chosen] + [stranger]
    unknown = assert_page_agrees_with_predict(run, images, workspace, count=11)
    # Both answers occur (these digits are stretched past anything in the 8 a class it saw), so the
    # page's "unknown" was checked against zoo predict's either way.
    assert 0 < len(unknown) < len(images)


@needs_browser
@pytest.mark.slow
def test_page_agrees_with_zoo_predict_on_real_photos(
    shared_dir: Path, workspace: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    """flowers5: adapted on 8 photos a class (quick), then 2 other photos a class in the page."""
    data, photos = tmp_path / "flowers", []
    for folder in sorted((shared_dir / "datasets" / "flowers5").iterdir()):
        files = sorted(folder.iterdir())
        (data / folder.name).mkdir(parents=True)
        for path in files[:8]:
            shutil.copyfile(path, data / folder.name / path.name)
        photos += files[-2:]
    run = tmp_path / "run"
    zoo("adapt", MODEL, "--data", str(data), "--strategy", "feature", "--out", str(run),
        models_dir=workspace)  # fmt: skip
    zoo("export", str(run), models_dir=workspace)
    assert_page_agrees_with_predict(run, photos, workspace)
