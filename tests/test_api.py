"""`import zoo`: the Python API end to end on the bundled model, its errors, and its silence."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import zoo
from cli import main
from pipeline.adapt import AdaptOptions
from pipeline.core.results import EpochRecord
from zoo.errors import DataError, InvalidModelFile, InvalidOption, NotFound, ZooError
from zoo.preprocess import PreprocessRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet-lite0"
CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> Path:
    models_dir = tmp_path_factory.mktemp("api")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return models_dir


@pytest.fixture(scope="module")
def tinted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of 8 noisy 40x40 PNGs each, every class tinted by its own channel."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tinted")
    rng = np.random.default_rng(0)
    for channel, name in [(2, "blue"), (1, "green"), (0, "red")]:
        (root / name).mkdir()
        for index in range(8):
            pixels = rng.integers(0, 120, (40, 40, 3))
            pixels[..., channel] += 135
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


def nothing_printed(capsys: pytest.CaptureFixture[str]) -> None:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "", captured


# --- the module ----------------------------------------------------------------------------


def test_import_zoo_stays_light() -> None:
    probe = (
        "import sys, zoo; "
        "print('torch' in sys.modules, any(m.startswith('pipeline') for m in sys.modules), "
        "zoo.adapt.__module__, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False", "zoo.api.training", "False"], done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nosuchname'"):
        zoo.nosuchname  # noqa: B018


@pytest.mark.parametrize("name", zoo.__all__)
def test_every_public_name_is_typed_and_has_an_example(name: str) -> None:
    value = getattr(zoo, name)
    assert value.__doc__ and value.__doc__.strip()
    if inspect.isclass(value):
        return
    assert ">>> " in value.__doc__, f"zoo.{name} has no example"
    signature = inspect.signature(value)
    assert signature.return_annotation is not inspect.Signature.empty
    untyped = [p.name for p in signature.parameters.values() if p.annotation is p.empty]
    assert untyped == []


def test_options_have_the_pipelines_defaults_and_names() -> None:
    import dataclasses

    from pipeline import adapt as pipeline_adapt
    from zoo.options import ADAPT, COMPARE, LAUNCH, STRATEGIES

    fields = {f.name: f.default for f in dataclasses.fields(AdaptOptions)}
    declared = {o.name: o.default for o in ADAPT if o.name not in (*LAUNCH, "sync_bn")}
    assert set(declared) == set(fields) - {"model", "preprocess"}
    assert declared == {name: fields[name] for name in declared}
    assert {o.name for o in COMPARE} == set(declared) - {"strategy", "resume"}
    assert STRATEGIES == pipeline_adapt.STRATEGIES


def test_cli_is_a_thin_layer_over_the_api() -> None:
    source = (ROOT / "cli.py").read_text()
    assert len(source.splitlines()) < 450
    # No command reaches past the API into the pipeline's training or export functions.
    for internal in (
        "pipeline.adapt",
        "pipeline.export.deploy",
        "pipeline.compare",
        "pipeline.train.rank",
    ):
        assert internal not in source


# --- errors --------------------------------------------------------------------------------


def test_unknown_or_bad_options_are_one_clear_error(workspace: Path) -> None:
    before = sorted(p.name for p in workspace.iterdir())
    with pytest.raises(InvalidOption, match="zoo.adapt has no option batchsize") as caught:
        zoo.adapt(MODEL, data="builtin:digits", batchsize=8, models_dir=workspace)
    assert isinstance(caught.value, ZooError) and isinstance(caught.value, TypeError)
    assert "batch_size" in str(caught.value)  # the message lists the real names
    with pytest.raises(InvalidOption, match="epochs=0"):
        zoo.adapt(MODEL, data="builtin:digits", epochs=0, models_dir=workspace)
    with pytest.raises(InvalidOption, match="optimizer='lbfgs'"):
        zoo.adapt(MODEL, data="builtin:digits", optimizer="lbfgs", models_dir=workspace)
    with pytest.raises(InvalidOption, match="strict=1 must be True or False"):
        zoo.adapt(MODEL, data="builtin:digits", strict=1, models_dir=workspace)
    with pytest.raises(InvalidOption, match="zoo.compare has no option resume"):
        zoo.compare(MODEL, data="builtin:digits", resume=True, models_dir=workspace)
    with pytest.raises(InvalidOption, match="preprocess has no option meen"):
        zoo.predict(workspace / MODEL / "model.onnx", "x.png", preprocess={"meen": "0.5"})
    with pytest.raises(ZooError, match="unknown strategies"):
        zoo.compare(MODEL, data="builtin:digits", strategies="feature,magic", models_dir=workspace)
    assert sorted(p.name for p in workspace.iterdir()) == before  # nothing was started


def test_failures_raise_the_zoo_hierarchy(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a run"):
        zoo.open_run(tmp_path)
    with pytest.raises(NotFound, match="no model named 'nosuchmodel'"):
        zoo.info("nosuchmodel")
    with pytest.raises(
        NotFound, match="is a file, and zoo info shows catalog entries; `zoo inspect"
    ):
        zoo.info(str(tmp_path / "model.onnx"))
    # (No model at all is no error now: adapt takes the best bundled model by probe.)
    with pytest.raises(NotFound, match="zoo fetch nosuchmodel"):
        zoo.adapt("nosuchmodel", data="builtin:digits", models_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        zoo.adapt(MODEL, data=tmp_path / "nodata", models_dir=workspace)
    with pytest.raises(InvalidModelFile):
        zoo.predict(tmp_path / "missing.onnx", "x.png")


# --- the whole chain -----------------------------------------------------------------------


@pytest.mark.slow
def test_adapt_open_export_predict_verify_evaluate(
    workspace: Path, tinted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = zoo.adapt(
        MODEL,
        data=tinted,
        strategy="feature",
        image_size=64,
        models_dir=workspace,
        out=tmp_path / "run",
    )
    nothing_printed(capsys)
    assert run.dir == tmp_path / "run" and run.strategy == "feature"
    assert run.summary is not None and run.summary.run_dir == run.dir
    metrics = run.metrics
    assert metrics.class_names == CLASSES and np.asarray(metrics.confusion).shape == (3, 3)
    assert set(metrics.per_class) == set(CLASSES) and 0.0 <= metrics.macro_f1 <= 1.0
    assert metrics.accuracy == pytest.approx(run.summary.metrics.accuracy)
    assert run.history and all(isinstance(r, EpochRecord) for r in run.history)
    assert [r.epoch for r in run.history] == list(range(1, len(run.history) + 1))
    assert run.report_path == run.dir / "report.html"

    again = zoo.open_run(run.dir, models_dir=workspace)
    assert again.summary is None and again.metrics == metrics
    assert again.history == run.history and again.strategy == "feature"
    assert again.record.class_names == CLASSES

    model = again.export()
    assert model == run.dir / "model.onnx" and model.is_file()
    image = tinted / "red" / "0.png"
    (top,) = again.predict(image, top_k=2)
    assert len(top) == 2 and {label for label, _ in top} <= set(CLASSES)
    assert top[0][1] >= top[1][1] and 0.0 < top[0][1] <= 1.0
    assert zoo.predict(model, [image, tinted / "blue" / "0.png"], top_k=1)[0] == [top[0]]

    (tmp_path / "photos").mkdir()
    shutil.copy(image, tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "b.png").write_bytes(b"not an image")
    found = zoo.predictions(model, tmp_path / "photos", top_k=1)
    assert [Path(p.image).name for p in found] == ["a.png", "b.png"]
    assert found[0].error is None and found[1].error
    with pytest.raises(DataError, match="b.png is unreadable"):
        zoo.predict(model, tmp_path / "photos")

    report = zoo.verify(model, run=again, runtimes="ort")
    assert report.passed
    scored = zoo.evaluate(model, tinted)
    assert scored.num_images == 24 and scored.class_names == CLASSES
    nothing_printed(capsys)


@pytest.mark.slow
def test_log_is_opt_in_and_compare_returns_each_run(
    workspace: Path, tinted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    result = zoo.compare(
        MODEL,
        data=tinted,
        strategies=["feature"],
        image_size=64,
        train_per_class=3,
        models_dir=workspace,
        out=tmp_path / "cmp",
        log=lines.append,
    )
    nothing_printed(capsys)
    assert any(line.startswith("adapting efficientnet-lite0 to 3 classes") for line in lines)
    assert [row["strategy"] for row in result.rows()] == ["feature"]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    assert zoo.open_run(tmp_path / "cmp" / "feature").strategy == "feature"


@pytest.mark.slow
def test_fetch_inspect_rank_and_list(
    workspace: Path, tinted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = zoo.fetch(MODEL, models_dir=workspace)
    assert isinstance(model, zoo.Model) and model.cached and model.models_dir == workspace
    assert model.path == workspace / MODEL / "model.onnx"
    assert zoo.inspect(model).name == MODEL
    ranked = zoo.rank([model], data=tinted, models_dir=workspace)
    assert ranked.best is not None and ranked.best.name == MODEL
    rows = {row["name"]: row for row in zoo.list_models(models_dir=workspace)}
    assert rows[MODEL]["in_workspace"] and not rows["mobilenetv2-12"]["in_workspace"]
    assert zoo.info("mobilenet").name == "mobilenetv2-12"
    nothing_printed(capsys)


# --- distributed runs from Python ----------------------------------------------------------


def test_worker_command_line_gives_the_same_options_back(tmp_path: Path) -> None:
    """The command line zoo.adapt hands to workers, parsed by the CLI, is the call's options."""
    import click

    from zoo.api.training import _worker_argv

    request = AdaptOptions(
        model="m.onnx",
        data="photos",
        classes=3,
        flip=False,
        strict=True,
        lr=0.01,
        out=tmp_path / "run",
        preprocess=PreprocessRequest.from_flags(preset="caffe", mean="1,2,3", bgr=False),
    )
    argv = _worker_argv(request, sync_bn=True, models_dir=tmp_path, catalog=None)
    seen: dict[str, object] = {}
    adapt = main.commands["adapt"]
    original = adapt.callback

    @click.pass_context
    def capture(ctx: click.Context, **values: object) -> None:
        seen.update(ctx.parent.params, **ctx.params)

    adapt.callback = capture
    try:
        CliRunner().invoke(main, argv, catch_exceptions=False)
    finally:
        adapt.callback = original
    assert seen["models_dir"] == tmp_path and seen["model"] == "m.onnx"
    assert seen["classes"] == 3 and seen["lr"] == 0.01 and seen["out"] == tmp_path / "run"
    assert seen["flip"] is False and seen["strict"] is True and seen["sync_bn"] is True
    flags = {key: seen[key] for key in ("preset", "mean", "std", "scale", "size", "resize")}
    flags.update(bgr=seen["bgr"], layout=seen["layout"], channels=seen["channels"])
    assert PreprocessRequest.from_flags(**flags) == request.preprocess
    assert seen["preset"] == "caffe" and seen["bgr"] is False and seen["std"] is None
    assert seen["nproc"] == 1 and seen["resume"] is False and seen["image_size"] is None


# --- real photos (../shared) ---------------------------------------------------------------


@pytest.mark.slow
def test_textures10_feature_run_exports_predicts_and_reads_back(
    shared_dir: Path, tmp_path: Path, bundled_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(bundled_workspace, models_dir, symlinks=True)
    data = shared_dir / "datasets" / "textures10"
    run = zoo.adapt(
        zoo.fetch(MODEL, models_dir=models_dir),
        data=data,
        strategy="feature",
        epochs=3,
        models_dir=models_dir,
    )
    nothing_printed(capsys)
    assert run.dir.parent == models_dir and run.strategy == "feature"
    assert len(run.metrics.class_names) == 10 and run.metrics.accuracy > 0.5
    exported = run.export()
    assert exported.is_file()
    images = sorted(p for p in (data / run.metrics.class_names[0]).iterdir() if p.is_file())[:3]
    tops = run.predict(images, top_k=3)
    assert len(tops) == 3 and all(len(top) == 3 for top in tops)
    again = zoo.open_run(run.dir)
    assert again.metrics == run.metrics and again.history == run.history
    assert zoo.verify(exported, run=again, models_dir=models_dir).passed
