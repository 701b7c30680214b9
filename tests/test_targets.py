"""Deployment targets (pipeline/export/targets.py and the openvino and tflite targets): each one
converted, run in its own runtime and gated on a real run's held-out images; the preprocessing
inside the file agrees with Pillow's; a missing runtime or a failed conversion writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import zoo
from pipeline.core.metadata import read_metadata
from pipeline.data.images import center_crop, preprocess_image, resize_for
from pipeline.export.deploy import ExportSummary
from pipeline.export.embed import preprocess_graph
from pipeline.export.targets import TARGETS, DeployTarget, load_targets
from zoo.catalog import IMAGENET_PREPROCESS, Preprocess, load_catalog
from zoo.errors import UnsupportedModel, ZooError

MODEL = "efficientnet-lite0"
DIGITS = tuple(str(i) for i in range(10))


def _missing_or_skip(name: str) -> None:
    """Skip, saying what to install, where the target cannot run here."""
    target = load_targets()[name]
    why = target.missing()
    if why is not None:
        pytest.skip(f"{name}: {why}; {target.extra}")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> zoo.Run:
    """efficientnet-lite0 with a solved head on built-in digits at 32 px: a real run, quickly."""
    models_dir = tmp_path_factory.mktemp("targets")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return zoo.adapt(
        MODEL,
        data="builtin:digits",
        strategy="feature",
        image_size=32,
        train_per_class=20,
        models_dir=models_dir,
        out=models_dir / "digits",
    )


def _export(run: zoo.Run, **options: object) -> tuple[ExportSummary, list[str]]:
    lines: list[str] = []
    # The ONNX file's own logit gate is tested elsewhere (test_export); at 32 px it is tight.
    summary = zoo.export(run, models_dir=run.models_dir, log=lines.append, atol=1e-3, **options)
    return summary, lines


def _recorded_targets(run: zoo.Run) -> dict[str, dict]:
    exported = json.loads((run.dir / "export.json").read_text())
    return {t["target"]: t for t in exported["targets"]}


def _assert_unknown_described(run: zoo.Run, folder: Path) -> None:
    """preprocess.json and README.md say how to read the second output, with the file's threshold."""
    ood = read_metadata(run.dir / "model.onnx").ood
    assert ood is not None
    companions = json.loads((folder / "preprocess.json").read_text())
    assert companions["ood"] == {"output": "ood_score", "score": ood.score, "threshold": ood.threshold}  # fmt: skip
    readme = (folder / "README.md").read_text()
    assert "Output `ood_score`" in readme and f"{ood.threshold:.6g}" in readme and "unknown" in readme  # fmt: skip


@pytest.mark.slow
def test_openvino_target_is_gated_written_and_checked_again(digits_run: zoo.Run) -> None:
    _missing_or_skip("openvino")
    from pipeline.export.target_checks import check_written
    from pipeline.export.target_openvino import run_openvino

    summary, lines = _export(digits_run, targets="openvino")
    onnx, openvino = summary.targets
    assert (onnx.target, openvino.target) == ("onnx", "openvino") and onnx.passed
    assert openvino.passed, openvino.line()
    assert openvino.images == 256 and openvino.top1_agreement >= 0.995
    # The unknown score (the second output) reaches the app alike: same side of the threshold.
    assert openvino.unknown_agreement == 1.0 and openvino.max_score_diff <= 1e-4
    assert openvino.max_prob_diff <= 1e-3 and openvino.resize_agreement is None
    folder = digits_run.dir / "deploy" / "openvino"
    assert openvino.path == str(folder) and any(line.startswith("openvino: ") for line in lines)
    files = {p.name for p in folder.iterdir()}
    assert files == {"model.xml", "model.bin", "README.md", "labels.txt", "preprocess.json"}
    assert tuple((folder / "labels.txt").read_text().split()) == DIGITS
    assert "INFERENCE_PRECISION_HINT" in (folder / "README.md").read_text()
    _assert_unknown_described(digits_run, folder)
    import openvino as ov

    outputs = {name for out in ov.Core().read_model(folder / "model.xml").outputs for name in out.names}  # fmt: skip
    assert {"probs", "ood_score"} <= outputs
    assert 'element_type="f16"' not in (folder / "model.xml").read_text()  # float32 weights
    assert _recorded_targets(digits_run)["openvino"]["passed"] is True

    # The same gate, run again on the folder as written: a damaged IR fails it.
    from pipeline.export.deploy import gate_split, load_run
    from pipeline.export.deploy_targets import gate_images

    loaded = load_run(digits_run.dir, models_dir=digits_run.models_dir, catalog=load_catalog())
    images = gate_images(loaded.model, loaded.preprocess, gate_split(loaded.split)[1][:64])
    probs = run_openvino(folder / "model.xml", images.floats)
    assert np.abs(probs - images.reference).max() <= 1e-3
    assert check_written("openvino", folder, images).passed
    (folder / "model.xml").unlink()
    gone = check_written("openvino", folder, images)
    assert not gone.passed and "model.xml is missing" in gone.line()


@pytest.mark.slow
def test_tflite_target_takes_pixels_and_onnx_takes_any_size(digits_run: zoo.Run) -> None:
    _missing_or_skip("tflite")
    from ai_edge_litert.interpreter import Interpreter

    summary, lines = _export(digits_run, targets="tflite", embed_preprocess=True)
    onnx, tflite = summary.targets
    assert tflite.passed, tflite.line()
    assert tflite.embedded and tflite.top1_agreement >= 0.995 and tflite.max_prob_diff <= 1e-3
    assert tflite.unknown_agreement == 1.0 and tflite.max_score_diff <= 1e-4
    assert "unknown flag agreement 100.0%" in tflite.line()
    # onnxruntime runs the any-size graph: images at their own sizes agree with Pillow's path.
    assert onnx.passed and onnx.embedded and onnx.resize_agreement >= 0.99, onnx.line()
    folder = digits_run.dir / "deploy" / "tflite"
    assert {p.name for p in folder.iterdir()} == {"model.tflite", "README.md", "labels.txt", "preprocess.json"}  # fmt: skip
    assert json.loads((folder / "preprocess.json").read_text())["embedded"] is True
    assert "resizes and crops" in (folder / "README.md").read_text()
    _assert_unknown_described(digits_run, folder)
    detail = Interpreter(model_path=str(folder / "model.tflite")).get_input_details()[0]
    assert detail["dtype"] == np.uint8 and list(detail["shape_signature"]) == [-1, 32, 32, 3]

    # zoo predict and zoo evaluate feed the embedded model.onnx decoded pixels.
    model = digits_run.dir / "model.onnx"
    accuracy = zoo.evaluate(model, "builtin:digits").accuracy
    assert abs(accuracy - digits_run.metrics.accuracy) < 0.1  # all images vs the test split
    (top,) = zoo.predict(model, "builtin:digits#0", top_k=1)
    assert top[0][0] in DIGITS


def _photo(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """A smooth photo-like uint8 image (gradients and blobs), so resizes have something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    planes = [
        127 + 120 * np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y * rng.uniform(0.5, 2) + c)
        for c in range(channels)
    ]
    noisy = np.stack(planes, axis=-1) + rng.normal(0, 12, (height, width, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


PREPROCESSINGS = {
    "imagenet": IMAGENET_PREPROCESS,
    "direct": Preprocess(mean=(0.5,), std=(0.5,), resize=64, resize_mode="direct", crop=56),
    "caffe-bgr": Preprocess(mean=(104.0, 117.0, 123.0), std=(1.0,), scale=1.0, bgr=True),
    "gray": Preprocess(mean=(0.1307,), std=(0.3081,), resize=28, crop=28, channels=1),
    "nhwc": Preprocess(mean=(0.5,), std=(0.5,), resize=40, crop=32, layout="NHWC"),
}
SIZES = [(480, 640), (300, 200), (97, 131), (20, 20), (256, 256), (333, 250)]


@pytest.mark.parametrize("name", sorted(PREPROCESSINGS))
def test_embedded_preprocessing_agrees_with_pillow(name: str) -> None:
    """The any-size graph reproduces Pillow's two-pass uint8 resize (rounded after each pass);
    the fixed-size graph is Python's normalisation of the same pixels."""
    import onnxruntime as ort
    from PIL import Image

    pre = PREPROCESSINGS[name]
    run = {}
    for any_size in (True, False):
        graph = preprocess_graph(pre, any_size=any_size).SerializeToString()
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        run[any_size] = lambda pixels, s=session: s.run(None, {"pixels": pixels[None]})[0][0]
    level = 1 / 255 / min(pre.std) * (255 * pre.scale)  # one pixel level, in normalised units
    for index, (height, width) in enumerate(SIZES):
        pixels = _photo(height, width, pre.channels, index)
        img = Image.fromarray(pixels[:, :, 0] if pre.channels == 1 else pixels)
        expected = preprocess_image(img, pre)
        levels = np.abs(run[True](pixels) - expected) / level
        assert levels.max() <= 2.01 and (levels > 0.5).mean() < 0.02, (height, width)
        cropped = np.asarray(center_crop(resize_for(img, pre), pre.crop))
        fixed = run[False](cropped[:, :, None] if pre.channels == 1 else cropped)
        assert np.abs(fixed - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_embedded_preprocessing_on_real_photos(shared_dir: Path) -> None:
    """Photos of many sizes: the any-size graph's input to the classifier is Pillow's, but for
    exact ties (x.5) that Pillow's fixed-point weights settle either way: one level, ~1% of pixels."""
    import onnxruntime as ort

    from pipeline.data.images import open_image

    graph = preprocess_graph(IMAGENET_PREPROCESS).SerializeToString()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    photos = sorted((shared_dir / "datasets").rglob("*.jpg"))[::25]
    assert len(photos) > 40
    off = []
    for photo in photos:
        img = open_image(photo)
        out = session.run(None, {"pixels": np.asarray(img)[None]})[0][0]
        levels = np.abs(out - preprocess_image(img, IMAGENET_PREPROCESS)) * 0.229 * 255
        assert levels.max() <= 2.05, photo.name
        off.append((levels > 0.5).mean())
    assert max(off) < 0.05 and np.mean(off) < 0.015, (max(off), np.mean(off))


def test_verify_converts_to_openvino_and_refuses_any_size_files_there(tmp_path: Path) -> None:
    _missing_or_skip("openvino")
    from onnx_builders import CHANNELS, SIZE, gemm_head, save

    from pipeline.export.deploy_targets import embedded_file

    plain = save(gemm_head(), tmp_path / "tiny.onnx")
    checked = zoo.verify(plain, runtimes="ort,openvino").runtimes["openvino"]
    assert checked.passed and checked.max_abs <= 1e-3 and checked.n_inputs == 4, checked
    pre = Preprocess(mean=(0.5,), std=(0.25,), resize=SIZE + 2, crop=SIZE, channels=CHANNELS)
    any_size = embedded_file(plain, pre, any_size=True, out=tmp_path / "any.onnx")
    refused = zoo.verify(any_size, runtimes="ort,openvino").runtimes["openvino"]
    assert not refused.passed and "export with --target openvino" in refused.error
    fixed = embedded_file(plain, pre, any_size=False, out=tmp_path / "fixed.onnx")
    assert zoo.verify(fixed, runtimes="ort,openvino").runtimes["openvino"].passed


def _fake(name: str, *, missing: str | None, convert: object, run: object = None) -> DeployTarget:
    return DeployTarget(
        name=name,
        title=name,
        extra=f"pip install {name}-runtime",
        missing=lambda: missing,
        convert=convert,  # type: ignore[arg-type]
        run=run or (lambda path, inputs: np.zeros((len(inputs), 10))),  # type: ignore[arg-type]
    )


def _write_model(source: object, folder: Path) -> Path:
    (folder / "model.bin").write_bytes(b"a whole file")
    return folder / "model.bin"


def _drifting(path: Path, inputs: np.ndarray, *, output: str = "probs") -> np.ndarray:
    """onnxruntime's probabilities, 2e-3 off: a runtime that computes in low precision."""
    from pipeline.export.deploy_targets import run_onnxruntime
    from pipeline.export.targets import onnx_output

    source = path.parent.parent.parent / "model.onnx"
    if output != "probs":  # its unknown score as onnxruntime's
        return onnx_output(source, inputs, output)
    probs = run_onnxruntime(source, inputs)
    probs[:, 0] += 2e-3
    return probs


@pytest.mark.slow
def test_a_target_whose_unknown_score_moves_fails_the_gate(
    digits_run: zoo.Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.export.deploy_targets import run_onnxruntime

    def shifted(path: Path, inputs: np.ndarray, *, output: str = "probs") -> np.ndarray:
        source = path.parent.parent.parent / "model.onnx"
        if output == "probs":  # the same probabilities...
            return run_onnxruntime(source, inputs)
        ood = read_metadata(source).ood
        return np.full(len(inputs), 10 * ood.threshold)  # ...but every image "unknown"

    monkeypatch.setitem(TARGETS._entries, "shifted", _fake("shifted", missing=None, convert=_write_model, run=shifted))  # fmt: skip
    summary, _ = _export(digits_run, targets=["onnx", "shifted"])
    report = summary.targets[1]
    assert report.top1_agreement == 1.0 and report.unknown_agreement < 0.9
    assert not report.passed and "FAILED the gate" in report.line()
    assert "unknown flag agreement" in report.line()
    assert not (digits_run.dir / "deploy" / "shifted").exists()


@pytest.mark.slow
def test_missing_runtime_and_failed_conversion_leave_the_others(
    digits_run: zoo.Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(source: object, folder: Path) -> Path:
        (folder / "model.bin").write_bytes(b"half a file")
        raise UnsupportedModel("the converter refused op Foo; export without broken")

    load_targets()
    absent = _fake("absent", missing="absent-runtime is not installed", convert=half_then_fail)
    monkeypatch.setitem(TARGETS._entries, "absent", absent)
    monkeypatch.setitem(TARGETS._entries, "broken", _fake("broken", missing=None, convert=half_then_fail))  # fmt: skip
    drifting = _fake("drifting", missing=None, convert=_write_model, run=_drifting)
    monkeypatch.setitem(TARGETS._entries, "drifting", drifting)
    others = ["onnx", *(["openvino"] if TARGETS["openvino"].missing() is None else [])]
    summary, lines = _export(digits_run, targets=[*others, "absent", "broken", "drifting"])
    by_name = {r.target: r for r in summary.targets}
    assert list(by_name) == [*others, "absent", "broken", "drifting"]
    assert [line for line in lines if line.startswith("absent:")] == [
        "absent: not written (absent-runtime is not installed; pip install absent-runtime)"
    ]
    assert [line for line in lines if line.startswith("broken:")] == [
        "broken: not written (the converter refused op Foo; export without broken)"
    ]
    (drift_line,) = [line for line in lines if line.startswith("drifting:")]
    assert drift_line.startswith("drifting: FAILED the gate, not written (top-1 agreement")
    assert (
        1.9e-3 < by_name["drifting"].max_prob_diff < 2.1e-3 and "max |prob diff| 2." in drift_line
    )
    deploy = digits_run.dir / "deploy"
    assert not {"absent", "broken", "drifting"} & {p.name for p in deploy.iterdir()}
    assert not [p.name for p in deploy.iterdir() if p.name.startswith(".")]  # no staging left
    assert all(by_name[name].passed for name in others)
    assert (digits_run.dir / "model.onnx").is_file()
    assert all((deploy / name / "model.xml").is_file() for name in others if name == "openvino")
    recorded = _recorded_targets(digits_run)
    assert recorded["broken"]["passed"] is False and "Foo" in recorded["broken"]["skipped"]


def test_unknown_target_is_refused_before_anything_is_written(digits_run: zoo.Run) -> None:
    before = sorted(p.name for p in digits_run.dir.iterdir())
    with pytest.raises(ZooError, match="unknown target nope; choose from onnx, openvino"):
        _export(digits_run, targets="onnx,nope")
    assert sorted(p.name for p in digits_run.dir.iterdir()) == before


def test_a_quantized_file_is_judged_by_its_answers_in_another_runtime() -> None:
    """`zoo verify model.int8.onnx --runtimes openvino`: integer kernels round their own way."""
    from pipeline.export.target_checks import _agreement

    reference = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    near = reference + np.array([[-0.02, 0.01, 0.01], [0.02, -0.03, 0.01]])
    assert _agreement("openvino", near, reference, quantized=True).error is None
    assert "more than 0.001" in _agreement("openvino", near, reference).error  # a float file: no
    swapped = near[:, [1, 0, 2]]
    assert "top-1 agreement 0.0% on this INT8 file" in _agreement("tflite", swapped, reference, quantized=True).error  # fmt: skip
