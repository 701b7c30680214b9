"""The command line end to end: fetch -> adapt -> export -> verify -> predict -> evaluate, offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main


def zoo(*args: str, models_dir: Path | None = None) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    prefix = ["--models-dir", str(models_dir)] if models_dir else []
    result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_list_and_info_json() -> None:
    code, out, _ = zoo("list", "--json")
    assert code == 0
    names = [m["name"] for m in json.loads(out)["models"]]
    assert "efficientnet-lite0" in names and len(names) >= 26
    code, out, _ = zoo("info", "mobilenet", "--json")
    entry = json.loads(out)
    assert entry["name"] == "mobilenetv2-12"
    assert entry["sha256"] == "c0c3f76d93fa3fd6580652a45618618a220fced18babf65774ed169de0432ad5"
    assert entry["urls"][0].startswith("https://huggingface.co/")


def test_errors_are_one_line_without_traceback(tmp_path) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import cli; cli.run()",
            "--models-dir",
            str(tmp_path),
            "info",
            "nosuchmodel",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: no model named 'nosuchmodel'")
    assert "Traceback" not in process.stderr
    # (No model at all is no error now: zoo adapt then takes the best bundled model by probe.)
    code, _, err = zoo("adapt", "nosuchmodel", "--classes", "10", models_dir=tmp_path)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "zoo fetch nosuchmodel" in err


@pytest.mark.parametrize("command", ["predict", "verify", "evaluate"])
def test_an_image_given_as_the_model_is_named_as_one(tmp_path: Path, command: str) -> None:
    from PIL import Image

    photo = tmp_path / "daisy.jpg"
    Image.new("RGB", (32, 32), "yellow").save(photo)
    extra = {"predict": [str(photo)], "verify": [], "evaluate": ["--data", str(tmp_path)]}[command]
    code, _, err = zoo(command, str(photo), *extra, models_dir=tmp_path / "m")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "daisy.jpg is a JPEG image, not an ONNX model" in err and "zoo fetch" not in err


@pytest.mark.parametrize("batch", [1, 3])
def test_evaluate_and_predict_feed_a_fixed_batch_file_its_own_batch(
    tmp_path: Path, batch: int
) -> None:
    from PIL import Image

    from tests.onnx_builders import gemm_head, save

    data = tmp_path / "data"
    for label in range(3):  # 7 images: not a multiple of 3
        (data / str(label)).mkdir(parents=True)
        for i in range(2 + (label == 0)):
            Image.new("RGB", (12, 12), (80 * label, 40 * i, 200)).save(
                data / str(label) / f"{i}.png"
            )
    dynamic = save(gemm_head(), tmp_path / "dynamic.onnx")
    fixed = save(gemm_head(batch=batch), tmp_path / "fixed.onnx")
    results = []
    for model in (dynamic, fixed):
        code, out, err = zoo(
            "evaluate", str(model), "--data", str(data), "--preprocess", "imagenet", "--json",
            models_dir=tmp_path / "m",
        )  # fmt: skip
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["num_images"] == results[1]["num_images"] == 7
    # The scores of every image, in the data's order.
    assert results[1]["confusion"] == results[0]["confusion"]
    assert results[1]["roc_auc"] == pytest.approx(results[0]["roc_auc"])
    predicted = [
        zoo("predict", str(model), str(data / "1"), "--preprocess", "imagenet", "--json")
        for model in (dynamic, fixed)
    ]
    assert predicted[0][0] == predicted[1][0] == 0, predicted[1][2]
    probs = [
        [{t["label"]: t["probability"] for t in p["top"]} for p in json.loads(out)["predictions"]]
        for _, out, _ in predicted
    ]
    assert len(probs[1]) == 2 and all(f == pytest.approx(d) for f, d in zip(*probs, strict=True))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bundled_workspace: Path) -> Path:
    models_dir = tmp_path_factory.mktemp("cli")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return models_dir


@pytest.mark.slow
def test_adapt_export_predict_evaluate(workspace: Path, tmp_path: Path) -> None:
    code, out, err = zoo(
        "adapt",
        "--classes",
        "10",
        "--strategy",
        "feature",
        "--epochs",
        "8",
        "--lr",
        "3e-3",
        "--json",
        models_dir=workspace,
    )
    assert code == 0, err
    summary = json.loads(out)
    run = Path(summary["run_dir"])
    assert summary["fast_path"] == "cached onnxruntime features"
    assert summary["test_accuracy"] > 0.75 and summary["test_images"] == 359
    for name in (
        "checkpoint.safetensors",
        "run.json",
        "split.json",
        "history.csv",
        "metrics.json",
        "curves.png",
        "confusion.png",
    ):
        assert (run / name).exists(), name
    assert run.name == "efficientnet-lite0-digits-10c"
    # A second run never overwrites the first.
    code, out, _ = zoo(
        "adapt",
        "--classes",
        "10",
        "--strategy",
        "feature",
        "--epochs",
        "1",
        "--json",
        models_dir=workspace,
    )
    assert code == 0 and json.loads(out)["run_dir"].endswith("efficientnet-lite0-digits-10c-2")
    # --classes must match the data.
    code, _, err = zoo("adapt", "--classes", "3", "--epochs", "1", models_dir=workspace)
    assert code == 1 and "--classes 3" in err and "10 classes" in err

    code, out, err = zoo("export", str(run), "--json", models_dir=workspace)
    assert code == 0, err
    exported = json.loads(out)
    assert exported["verified"] and exported["verify"]["passed"]
    model = Path(exported["path"])
    assert model == run / "model.onnx"

    code, out, err = zoo(
        "verify",
        str(model),
        "--run",
        str(run),
        "--runtimes",
        "ort,opencv",
        "--json",
        models_dir=workspace,
    )
    assert code == 0, err
    verified = json.loads(out)
    assert verified["runtimes"]["opencv"]["passed"] and verified["torch"]["passed"]
    assert verified["problems"] == [] and verified["metadata"]["labels"]

    from pipeline.core.samples import DataSplit
    from pipeline.data.images import open_image

    split = DataSplit.load(run / "split.json")
    images = []
    for ref, label in split.test[:5]:
        path = tmp_path / f"digit-{label}-{len(images)}.png"
        open_image(ref).save(path)
        images.append((path, str(label)))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, out, _ = zoo(
        "predict", str(model), str(tmp_path), "--top-k", "2", "--json", models_dir=workspace
    )
    assert code == 0
    predictions = {Path(p["image"]).name: p for p in json.loads(out)["predictions"]}
    assert "error" in predictions["broken.png"]
    right = sum(predictions[path.name]["top"][0]["label"] == label for path, label in images)
    assert right >= 3

    code, out, err = zoo(
        "evaluate", str(model), "--data", "builtin:digits", "--json", models_dir=workspace
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["num_images"] == 1797 and metrics["accuracy"] > 0.5
    assert Path(metrics["plot"]).exists()
