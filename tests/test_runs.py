"""Run directories: --resume continues the run's own model whatever was fetched since, and every
data layout either trains to a finished run (measured on the split it has) or fails in one line.

The models are tiny built graphs fetched through a private catalog, so each run takes a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from image_builders import make_image_folder, write_rgb
from onnx_builders import SIZE, gemm_head, matmul_head, save

from cli import main
from pipeline.core import runs
from pipeline.core.record import SourceRecord
from pipeline.train.loop import RESUME_POINT
from zoo.catalog import IMAGENET_PREPROCESS
from zoo.files import sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _entry(name: str, onnx_path: Path) -> dict:
    """A private catalog entry for a built graph (ImageNet preprocessing at the graph's size)."""
    return {
        "name": name,
        "urls": [str(onnx_path)],
        "sha256": sha256_file(onnx_path),
        "size": onnx_path.stat().st_size,
        "opset": 13,
        "input": {"name": "image", "shape": [None, 3, SIZE, SIZE], "layout": "NCHW"},
        "output_kind": "logits",
        "num_classes": 5,
        "preprocess": {**IMAGENET_PREPROCESS.at_size(SIZE).to_dict(), "confidence": "high"},
        "licence": "MIT",
    }


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(workspace holding tiny-a, private catalog of tiny-a and tiny-b); copy before writing."""
    folder = tmp_path_factory.mktemp("tiny-zoo")
    entries = [
        _entry(name, save(build(), folder / f"{name}.onnx"))
        for name, build in (("tiny-a", gemm_head), ("tiny-b", matmul_head))
    ]
    catalog = folder / "catalog.json"
    catalog.write_text(json.dumps({"models": entries}))
    models_dir = folder / "models"
    code, _, err = zoo("fetch", "tiny-a", models_dir=models_dir, catalog=catalog)
    assert code == 0, err
    return models_dir, catalog


@pytest.fixture
def workspace(tiny_zoo: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the tiny workspace, and the catalog."""
    models_dir = tmp_path / "models"
    shutil.copytree(tiny_zoo[0], models_dir, symlinks=True)
    return models_dir, tiny_zoo[1]


def zoo(*args: str, models_dir: Path, catalog: Path) -> tuple[int, str, str]:
    """The CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(
        main,
        ["--models-dir", str(models_dir), "--catalog", str(catalog), *args],
        catch_exceptions=False,
    )
    return result.exit_code, result.stdout, result.stderr


def one_line(text: str) -> str:
    """Log text with rich's line wrapping undone."""
    return " ".join(text.split())


def assert_no_internal_error(err: str) -> None:
    assert "internal error" not in err and "Traceback" not in err, err


# --- resume ---------------------------------------------------------------------------------

# A real `zoo adapt` process that stalls right after logging epoch 1 (its resume point is on
# disk by then), so that the test can kill it there every time, however fast the epochs are.
CHILD = """
import sys, time
import zoo.console as console
real_info = console.info
def info(message):
    real_info(message)
    if message.lstrip().startswith("epoch   1/"):
        sys.stderr.flush()
        time.sleep(600)
console.info = info
import cli
sys.argv = ["zoo", *{args!r}]
cli.run()
"""


def _kill_after_epoch_one(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(args=args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        for line in child.stderr:
            seen.append(line)
            if line.lstrip().startswith("epoch   1/"):
                break
        else:
            pytest.fail("the run ended before epoch 1 was logged:\n" + "".join(seen))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


@pytest.fixture
def killed_run(workspace: tuple[Path, Path], tmp_path: Path) -> Path:
    """A run of tiny-a started WITHOUT naming the model, killed after epoch 1 of 3."""
    models_dir, catalog = workspace
    data = make_image_folder(tmp_path / "photos", {"a": 5, "b": 5})
    run = tmp_path / "run"
    _kill_after_epoch_one(
        [
            "--models-dir", str(models_dir), "--catalog", str(catalog), "adapt",
            "--data", str(data), "--strategy", "full", "--epochs", "3", "--device", "cpu",
            "--out", str(run),
        ]
    )  # fmt: skip
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "training" and record["options"]["model"] is None
    assert record["source"]["name"] == "tiny-a"
    assert record["source"]["sha256"] == sha256_file(models_dir / "tiny-a" / "model.onnx")
    assert (run / RESUME_POINT).is_file() and not (run / "metrics.json").exists()
    return run


def _resume(run: Path, models_dir: Path, catalog: Path) -> tuple[dict, str]:
    code, out, err = zoo(
        "adapt", "--out", str(run), "--resume", "--json", models_dir=models_dir, catalog=catalog
    )
    assert code == 0, err
    return json.loads(out), one_line(err)


@pytest.mark.slow
def test_resume_continues_the_runs_own_model_after_another_is_fetched(
    workspace: tuple[Path, Path], killed_run: Path
) -> None:
    models_dir, catalog = workspace
    own_sha = json.loads((killed_run / "run.json").read_text())["source"]["sha256"]
    code, _, err = zoo("fetch", "tiny-b", models_dir=models_dir, catalog=catalog)
    assert code == 0, err  # tiny-b is now the model fetched most recently
    summary, log = _resume(killed_run, models_dir, catalog)
    assert "resuming with tiny-a" in log and "resuming after epoch 1 of 3" in log
    assert summary["model"] == "tiny-a" and summary["epochs_run"] == 3
    record = json.loads((killed_run / "run.json").read_text())
    assert record["status"] == "done" and record["source"]["sha256"] == own_sha
    # tiny-b has a MatMul head: had it been opened, the saved Gemm weights would not load.
    code, _, err = zoo("export", str(killed_run), models_dir=models_dir, catalog=catalog)
    assert code == 0, err


@pytest.mark.slow
def test_resume_finds_the_blob_when_the_name_holds_another_file_and_says_when_it_is_gone(
    workspace: tuple[Path, Path], killed_run: Path, tmp_path: Path
) -> None:
    models_dir, catalog = workspace
    other = save(matmul_head(), tmp_path / "other.onnx")
    code, _, err = zoo("fetch", str(other), "--name", "tiny-a", "--force", models_dir=models_dir, catalog=catalog)  # fmt: skip
    assert code == 0, err
    # A run.json written before this change: no model named, the source by sha256 alone.
    record = json.loads((killed_run / "run.json").read_text())
    own_sha = record["source"]["sha256"]
    record["source"].update(name="renamed-since", path=str(tmp_path / "moved.onnx"))
    (killed_run / "run.json").write_text(json.dumps(record))
    summary, log = _resume(killed_run, models_dir, catalog)
    assert "from its blob" in log and summary["epochs_run"] == 3
    assert json.loads((killed_run / "run.json").read_text())["source"]["sha256"] == own_sha
    code, _, err = zoo("export", str(killed_run), models_dir=models_dir, catalog=catalog)
    assert code == 0, err

    (models_dir / "blobs" / own_sha).unlink()
    code, _, err = zoo("adapt", "--out", str(killed_run), "--resume", models_dir=models_dir, catalog=catalog)  # fmt: skip
    assert code != 0
    assert_no_internal_error(err)
    assert len(err.strip().splitlines()) == 1 and "is no longer in" in err and own_sha[:12] in err


def test_open_source_refuses_a_same_named_file_with_another_sha256(
    workspace: tuple[Path, Path], tmp_path: Path
) -> None:
    from zoo.catalog import load_catalog
    from zoo.errors import NotFound

    models_dir, catalog_file = workspace
    catalog = load_catalog(catalog_file)
    path = models_dir / "tiny-a" / "model.onnx"
    source = SourceRecord(name="tiny-a", path=str(path), sha256="0" * 64)
    with pytest.raises(NotFound, match="no longer in"):
        runs.open_source(source, models_dir=models_dir, catalog=catalog, run_dir=tmp_path)
    source = dataclasses.replace(source, sha256=sha256_file(path))
    assert (
        runs.open_source(source, models_dir=models_dir, catalog=catalog, run_dir=tmp_path).path
        == path
    )


# --- data layouts ---------------------------------------------------------------------------


def _pair(root: Path, train: dict, val: dict, *, val_name: str = "val") -> None:
    make_image_folder(root / "train", train)
    make_image_folder(root / val_name, val)


def _loose(folder: Path, n: int = 3) -> None:
    for i in range(n):
        write_rgb(folder / f"loose{i}.png", seed=500 + i)


AB = {"a": 4, "b": 4}
AB_SMALL = {"a": 2, "b": 2}
# name -> (builder, expected: the metrics split on success or a regex of the one-line error,
#          a text the log must hold, or None)
LAYOUTS: dict[str, tuple[Callable[[Path], None], str, str | None]] = {
    "train+val": (lambda r: _pair(r, AB, AB_SMALL), "val", "no test split"),
    "train+valid+test": (
        lambda r: (_pair(r, AB, AB_SMALL, val_name="valid"), make_image_folder(r / "test", AB_SMALL)),
        "test",
        None,
    ),
    "train+test": (lambda r: (make_image_folder(r / "train", AB), make_image_folder(r / "test", AB_SMALL)), "test", None),
    "train only": (lambda r: make_image_folder(r / "train", AB), "val", "no test split"),
    "unknown folders beside": (
        lambda r: (_pair(r, AB, AB_SMALL), make_image_folder(r / "test_simple", AB_SMALL), (r / "extra").mkdir()),
        "val",
        "extra/, test_simple/",
    ),
    "empty val": (lambda r: (make_image_folder(r / "train", AB), (r / "val").mkdir()), "val", "holds no images"),
    "empty test": (lambda r: (_pair(r, AB, AB_SMALL), (r / "test").mkdir()), "val", "holds no images"),
    "classes differ": (lambda r: _pair(r, {"a": 4, "b": 4, "c": 4}, AB_SMALL), "val", None),
    "nested class folders": (
        lambda r: (make_image_folder(r / "train" / "a" / "2019", {"x": 3}), make_image_folder(r / "train" / "b", {"y": 3}), make_image_folder(r / "val", AB_SMALL)),
        "val",
        None,
    ),
    "class only in val": (lambda r: _pair(r, AB, {"a": 1, "b": 1, "c": 1}), r"class 'c' has no readable training images", None),
    "single class": (lambda r: _pair(r, {"a": 4}, {"a": 2}), "only one class", None),
    "classes beside train": (
        lambda r: (_pair(r, AB, AB_SMALL), make_image_folder(r, {"cats": 3})),
        r"both split folders .* and class folders \(cats/\)",
        None,
    ),
    "split of loose images": (lambda r: (_loose(r / "train"), make_image_folder(r / "val", AB_SMALL)), "holds images directly, not class folders", None),
    "val and valid": (lambda r: (_pair(r, AB, AB_SMALL), make_image_folder(r / "valid", AB_SMALL)), "keep one of them", None),
    "one folder deeper": (lambda r: _pair(r / "photos", AB, AB_SMALL), r"only one class \('photos'\).*pass .*photos", None),
    "loose images only": (_loose, "no readable images", None),
    "one image per class": (lambda r: make_image_folder(r, {"a": 1, "b": 1}), "no validation images", None),
    "empty class folder in val": (lambda r: (make_image_folder(r / "train", AB), (r / "val" / "b").mkdir(parents=True)), "holds no images; add images", None),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_trains_or_fails_in_one_line(
    layout: str, workspace: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir, catalog = workspace
    build, expected, logged = LAYOUTS[layout]
    data = tmp_path / "data"
    data.mkdir()
    build(data)
    run = tmp_path / "run"
    code, out, err = zoo(
        "adapt", "--data", str(data), "--strategy", "feature", "--epochs", "1", "--out", str(run), "--json",
        models_dir=models_dir, catalog=catalog,
    )  # fmt: skip
    assert_no_internal_error(err)
    if expected in ("val", "test"):
        assert code == 0, err
        assert json.loads(out)["metrics_split"] == expected
        assert json.loads((run / "metrics.json").read_text())["split"] == expected
    else:
        assert code != 0
        errors = [line for line in err.splitlines() if line.startswith("zoo: error:")]
        assert len(errors) == 1, err
        assert re.search(expected, errors[0]), errors[0]
    if logged:
        assert logged in one_line(err + caplog.text)  # warnings reach stderr through logging


@pytest.mark.slow
def test_train_val_folder_without_test_is_measured_on_val_and_exports(
    workspace: tuple[Path, Path], tmp_path: Path
) -> None:
    models_dir, catalog = workspace
    data = tmp_path / "ants-bees"
    _pair(data, {"ants": 6, "bees": 6}, {"ants": 3, "bees": 3})
    run = tmp_path / "run"
    code, out, err = zoo(
        "adapt", "--data", str(data), "--strategy", "full", "--epochs", "2", "--out", str(run), "--json",
        models_dir=models_dir, catalog=catalog,
    )  # fmt: skip
    assert code == 0, err
    assert "no test split in ants-bees: the metrics are on the 6 validation images" in one_line(err)
    _check_val_run(run, n_val=6, models_dir=models_dir, catalog=catalog)
    code, out, err = zoo("evaluate", str(run / "model.onnx"), "--data", str(data), "--json", models_dir=models_dir, catalog=catalog)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["num_images"] == 18 and json.loads(out)["split"] == "all"


def _check_val_run(run: Path, *, n_val: int, models_dir: Path, catalog: Path) -> None:
    """metrics.json on the validation split; export's gate and verify --run on those images."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_images"] == n_val
    assert json.loads((run / "run.json").read_text())["metrics_split"] == "val"
    code, _, err = zoo("export", str(run), models_dir=models_dir, catalog=catalog)
    assert code == 0, err
    assert f"checking it on {n_val} validation images" in one_line(err)
    code, out, err = zoo("verify", str(run / "model.onnx"), "--run", str(run), "--json", models_dir=models_dir, catalog=catalog)  # fmt: skip
    assert code == 0, err
    from pipeline.export.write import read_metadata

    assert read_metadata(run / "model.onnx").metrics["split"] == "val"


@pytest.mark.slow
def test_train_val_folder_of_real_textures_completes_and_exports(
    shared_dir: Path, workspace: tuple[Path, Path], tmp_path: Path
) -> None:
    models_dir, catalog = workspace
    textures = shared_dir / "datasets" / "textures10"
    data = tmp_path / "textures"
    classes = sorted(p.name for p in textures.iterdir() if p.is_dir())[:4]
    for name in classes:
        photos = sorted(p for p in (textures / name).iterdir() if p.is_file())
        for part, chosen in (("train", photos[:6]), ("val", photos[6:9])):
            (data / part / name).mkdir(parents=True)
            for photo in chosen:
                shutil.copy(photo, data / part / name / photo.name)
    run = tmp_path / "run"
    code, _, err = zoo(
        "adapt", "--data", str(data), "--strategy", "feature", "--epochs", "3", "--out", str(run),
        models_dir=models_dir, catalog=catalog,
    )  # fmt: skip
    assert code == 0, err
    _check_val_run(run, n_val=3 * len(classes), models_dir=models_dir, catalog=catalog)
