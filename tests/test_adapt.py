"""`zoo adapt` and `zoo compare` end to end on the bundled model: awkward data, every strategy,
`auto`, a run killed mid-epoch and resumed, and the one-line errors of bad data."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from image_builders import build_awkward_folder, make_image_folder, write_rgb

from cli import main
from pipeline.adapt import AdaptOptions, AdaptResult, adapt
from pipeline.core.samples import DataSplit
from pipeline.export.deploy import load_run
from pipeline.surgery.build import build_model
from pipeline.train.auto import AutoEvidence, choose_strategy, settle
from pipeline.train.loop import RESUME_POINT
from zoo.catalog import Catalog, load_catalog

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "efficientnet-lite0"
ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = (
    "run.json",
    "split.json",
    "checkpoint.safetensors",
    "last.safetensors",
    "history.csv",
    "metrics.json",
    "curves.png",
    "confusion.png",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> Path:
    models_dir = tmp_path_factory.mktemp("adapt")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return models_dir


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def zoo(*args: str, models_dir: Path) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(
        main, ["--models-dir", str(models_dir), *args], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def one_line(text: str) -> str:
    """Log text with rich's line wrapping undone."""
    return " ".join(text.split())


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def resume_epoch(run_dir: Path) -> int:
    """Epochs completed according to the resume point."""
    from safetensors import safe_open

    with safe_open(str(run_dir / RESUME_POINT), framework="pt") as handle:
        return json.loads(handle.metadata()["state"])["epoch"]


# --- awkward data --------------------------------------------------------------------------


@pytest.mark.slow
def test_awkward_image_folder_trains_and_reports_bad_files(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "photos dé test"
    expected = build_awkward_folder(data)
    code, out, err = zoo(
        "adapt", MODEL, "--data", str(data), "--strategy", "feature", "--epochs", "1", "--json",
        models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    run = Path(summary["run_dir"])
    assert run.parent == workspace and run.name.isascii()
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "done" and record["epochs_run"] >= 1
    assert record["class_names"] == ["café au lait", "plain", "猫"]
    # The three unreadable files are counted, named in the log, and listed in the split.
    assert record["data"]["skipped"] == len(expected["bad"]) == 3
    log = one_line(err)
    assert "skipped 3 unreadable file(s)" in log
    for bad in expected["bad"]:
        assert Path(bad).name in log
    split = DataSplit.load(run / "split.json")
    assert sorted(path for path, _ in split.skipped) == sorted(expected["bad"])
    # Every good file is used (CMYK, RGBA, 16-bit, palette, EXIF, 1x1, BMP, WebP, a symlink);
    # hidden files, .DS_Store, non-images and .git are not even listed.
    used = [s.ref for s in split.train + split.val + split.test]
    assert sorted(map(os.path.realpath, used)) == sorted(map(os.path.realpath, expected["good"]))
    assert not set(used) & set(expected["ignored"])
    assert record["data"]["train"] + record["data"]["val"] + record["data"]["test"] == 12
    assert summary["test_images"] == len(split.test) > 0
    for name in RUN_FILES:
        assert (run / name).is_file(), name


@pytest.mark.slow
def test_augmented_digits_train_without_flips_unless_asked(workspace: Path) -> None:
    base = ("adapt", MODEL, "--strategy", "feature", "--epochs", "1", "--train-per-class", "2")
    code, out, err = zoo(*base, "--augment", "light", "--json", models_dir=workspace)
    assert code == 0, err
    # Augmented images change every epoch, so the features cannot be cached: on the CPU each
    # batch goes through the frozen backbone in onnxruntime.
    assert json.loads(out)["fast_path"] == (
        "augmented images through the frozen part in onnxruntime, per batch"
    )
    assert "no horizontal flips: mirrored digits images change class" in one_line(err)
    code, _, err = zoo(*base, "--augment", "light", "--flip", models_dir=workspace)
    assert code == 0, err
    assert "no horizontal flips" not in one_line(err)
    code, _, err = zoo(*base, "--augment", "none", models_dir=workspace)
    assert code == 0 and "no horizontal flips" not in one_line(err)


# --- every strategy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strategy_runs(workspace: Path, catalog: Catalog) -> dict[str, AdaptResult]:
    """Each strategy trained for 2 epochs on 3 digits per class, once for the tests below."""
    results = {}
    for strategy, unfreeze in [
        ("feature", None),
        ("finetune", 2),
        ("gradual", None),
        ("full", None),
        ("scratch", None),
    ]:
        options = AdaptOptions(
            model=MODEL,
            classes=10,
            strategy=strategy,
            unfreeze=unfreeze,
            epochs=2,
            train_per_class=3,
            device="cpu",
            out=workspace / "strategies" / strategy,
        )
        results[strategy] = adapt(
            options, models_dir=workspace, catalog=catalog, log=lambda _: None
        )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["feature", "finetune", "gradual", "full", "scratch"])
def test_every_strategy_completes_and_writes_its_run(
    strategy: str, strategy_runs: dict[str, AdaptResult]
) -> None:
    result = strategy_runs[strategy]
    assert result.strategy == strategy and result.strategy_reason == "chosen with --strategy"
    if strategy == "feature":  # solved to convergence, one history row per L-BFGS pass
        assert result.stopped.startswith("converged after") and result.epochs_run > 2
        assert "lbfgs" in history(result.run_dir)[0]["lr"]
    else:
        assert result.epochs_run == 2 and result.stopped == "epochs done"
    for name in RUN_FILES:
        assert (result.run_dir / name).is_file(), name
    rows = history(result.run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, result.epochs_run + 1))
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["status"] == "done" and record["strategy"] == strategy
    assert record["data"]["train"] == 30 and record["preprocess"]["crop"] == 64
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 359 == result.metrics.num_images


@pytest.mark.slow
def test_trainable_parameters_follow_the_strategy(
    workspace: Path, strategy_runs: dict[str, AdaptResult]
) -> None:
    trainable = {
        s: [int(r["trainable_params"]) for r in history(result.run_dir)]
        for s, result in strategy_runs.items()
    }
    _, model = build_model(
        workspace / MODEL / "model.onnx", num_classes=10, hidden=None, dropout=0.0, seed=0
    )
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert set(trainable["feature"]) == {head}
    assert head < trainable["finetune"][0] == trainable["finetune"][1] < total
    assert trainable["gradual"][0] == head < trainable["gradual"][1] < total  # grows
    assert trainable["full"] == trainable["scratch"] == [total, total]


@pytest.mark.slow
def test_scratch_leaves_the_pretrained_weights_and_feature_keeps_them(
    workspace: Path, catalog: Catalog, strategy_runs: dict[str, AdaptResult]
) -> None:
    _, pretrained = build_model(
        workspace / MODEL / "model.onnx", num_classes=10, hidden=None, dropout=0.0, seed=0
    )
    reference = dict(pretrained.backbone.named_parameters())
    weights = {}
    for strategy in ("scratch", "feature", "full"):
        loaded = load_run(strategy_runs[strategy].run_dir, models_dir=workspace, catalog=catalog)
        weights[strategy] = dict(loaded.model.backbone.named_parameters())
    matrices = [n for n, p in reference.items() if p.dim() >= 2]
    assert len(matrices) > 30
    for name in matrices:
        assert torch.equal(weights["feature"][name], reference[name]), name
        # Re-initialised, not fine-tuned: far from the pretrained values everywhere.
        assert not torch.allclose(weights["scratch"][name], reference[name], atol=1e-3), name
    # Fine-tuning from pretrained weights stays close to them after two epochs.
    drift = max(float((weights["full"][n] - reference[n]).abs().max()) for n in matrices)
    assert 0 < drift < 0.1


# --- auto -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_run(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    """`zoo adapt --json` with the default strategy on 3 digits per class: (summary, run.json, log)."""
    run = tmp_path_factory.mktemp("auto") / "run"
    code, out, err = zoo(
        "adapt", MODEL, "--classes", "10", "--train-per-class", "3", "--epochs", "1",
        "--out", str(run), "--json",
        models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out), json.loads((run / "run.json").read_text()), one_line(err)


@pytest.mark.slow
def test_auto_says_which_strategy_and_why(auto_run: tuple[dict, dict, str]) -> None:
    summary, record, log = auto_run
    strategy, reason = record["strategy"], record["strategy_reason"]
    assert summary["strategy"] == strategy and summary["strategy_reason"] == reason
    assert "3 training images per class" in reason and "validation accuracy: probe" in reason
    # The choice is the documented rule applied to the probe run.json records, then settled
    # against the fine-tune's own validation accuracy.
    evidence = AutoEvidence(**record["auto"])
    assert 0 < evidence.probe_val_acc <= 1 and evidence.finetune_val_acc is not None
    measured = dataclasses.replace(evidence, finetune_val_acc=None, finetune_blocks=None)
    first, unfreeze, first_reason = choose_strategy(measured, num_blocks=len(record["blocks"]))
    assert first == "finetune" and evidence.finetune_blocks == unfreeze == 2
    _, keep_probe, why = settle(measured, unfreeze=unfreeze, val_acc=evidence.finetune_val_acc)
    assert reason == f"{first_reason}; {why}"
    assert f"strategy auto -> {first}: {first_reason}" in log and f"auto: {why}" in log
    assert (strategy, record["unfreeze"]) == (("feature", None) if keep_probe else (first, 2))
    assert record["status"] == "done"
    # --epochs 1 bounds epoch-trained strategies; a `feature` head is solved to convergence.
    assert record["epochs_run"] == 1 or strategy == "feature"


@pytest.mark.slow
def test_auto_keeps_the_probe_when_its_fine_tune_scores_lower(
    workspace: Path, catalog: Catalog, strategy_runs: dict[str, AdaptResult]
) -> None:
    """A fine-tune that cannot learn (lr 1e-9) loses to the probe on validation: the run ends as
    `feature` would have, pretrained weights and all."""
    run_dir = workspace / "auto-frozen-lr"
    options = AdaptOptions(
        model=MODEL, classes=10, lr=1e-9, epochs=1, train_per_class=3, device="cpu", out=run_dir
    )
    result = adapt(options, models_dir=workspace, catalog=catalog, log=lambda _: None)
    assert result is not None and result.strategy == "feature"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["strategy"] == "feature" and record["unfreeze"] is None
    assert record["augment"] == "none" and record["status"] == "done"
    assert record["auto"]["finetune_val_acc"] < record["auto"]["probe_val_acc"]
    assert record["strategy_reason"].endswith("the probe's head on frozen features is kept")
    feature = strategy_runs["feature"]
    assert result.metrics.accuracy == pytest.approx(feature.metrics.accuracy, abs=1e-9)
    _, pretrained = build_model(
        workspace / MODEL / "model.onnx", num_classes=10, hidden=None, dropout=0.0, seed=0
    )
    kept = load_run(run_dir, models_dir=workspace, catalog=catalog).model
    for name, weight in pretrained.backbone.named_parameters():
        assert torch.equal(dict(kept.backbone.named_parameters())[name], weight), name


@pytest.mark.slow
def test_auto_reports_imagenet_confidence_for_an_imagenet_head(
    auto_run: tuple[dict, dict, str],
) -> None:
    _, record, _ = auto_run
    assert 0 < record["auto"]["confidence"] < 1 and record["auto"]["head_classes"] == 1000
    assert "ImageNet head's mean confidence" in record["strategy_reason"]


# --- kill and resume --------------------------------------------------------------------------


def _cli(models_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.run()", "--models-dir", str(models_dir), *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_epochs(
    workspace: Path, catalog: Catalog, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    options = ["--strategy", "full", "--epochs", "3", "--train-per-class", "5", "--device", "cpu"]
    process = subprocess.Popen(
        _cli(workspace, "adapt", MODEL, *options, "--out", str(run)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=180)
            assert line is not None, "the run ended before epoch 1 was logged:\n" + "".join(seen)
            seen.append(line)
            if line.lstrip().startswith("epoch   1/3"):
                break
        # Epoch 1 is saved and logged; epoch 2 (50 images, then 359 to validate) takes seconds.
        threading.Event().wait(0.3)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert resume_epoch(run) == 1
    assert not (run / "history.csv").exists() and not (run / "metrics.json").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "training"

    resumed = subprocess.run(
        _cli(workspace, "adapt", "--out", str(run), "--resume", "--json"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1 of 3" in one_line(resumed.stderr)
    assert "epoch   1/3" not in resumed.stderr  # epoch 1 is not trained again
    summary = json.loads(resumed.stdout)
    assert summary["epochs_run"] == 3 and summary["strategy"] == "full"
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert resume_epoch(run) == 3
    assert json.loads((run / "run.json").read_text())["status"] == "done"

    # The same run without the kill: each epoch's randomness depends on (seed, epoch) alone.
    straight = adapt(
        AdaptOptions(
            model=MODEL,
            strategy="full",
            epochs=3,
            train_per_class=5,
            device="cpu",
            out=tmp_path / "straight",
        ),
        models_dir=workspace,
        catalog=catalog,
        log=lambda _: None,
    )
    for got, want in zip(rows, straight.history, strict=True):
        assert float(got["val_loss"]) == pytest.approx(want.val_loss, rel=1e-4)
        assert float(got["train_loss"]) == pytest.approx(want.train_loss, rel=1e-4)


# --- compare ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_writes_plot_and_table(workspace: Path, tmp_path: Path) -> None:
    folder = tmp_path / "comparison"
    code, out, err = zoo(
        "compare", MODEL, "--strategies", "scratch,feature", "--epochs", "1",
        "--train-per-class", "3", "--out", str(folder), "--json",
        models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    table = json.loads((folder / "compare.json").read_text())
    assert table == json.loads(out)
    assert [r["strategy"] for r in table["runs"]] == ["scratch", "feature"]
    for row in table["runs"]:
        run = Path(row["run_dir"])
        assert run == folder / row["strategy"] and (run / "checkpoint.safetensors").is_file()
        assert 0 <= row["test_accuracy"] <= 1
    by_strategy = {row["strategy"]: row for row in table["runs"]}
    assert by_strategy["scratch"]["epochs_run"] == 1
    # The solved feature head ignores --epochs: L-BFGS runs until it converges.
    assert by_strategy["feature"]["stopped"].startswith("converged after")
    # Both runs trained on the very same split.
    splits = {(folder / s / "split.json").read_text() for s in ("scratch", "feature")}
    assert len(splits) == 1
    plot = folder / "compare.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert Path(table["plot"]) == plot
    assert (
        "feature/report.html" in (folder / "report.html").read_text()
    )  # tests/test_report_html.py


# --- errors -------------------------------------------------------------------------------------


def test_classes_mismatch_names_both_numbers(workspace: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "two", {"cat": 5, "dog": 5})
    code, out, err = zoo(
        "adapt", MODEL, "--data", str(data), "--classes", "5", models_dir=workspace
    )
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("zoo: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "--classes 5" in errors[0] and "2 classes (cat, dog)" in errors[0]


def _bad_sources(root: Path) -> dict[str, tuple[Path, str]]:
    """Data sources that cannot train, and the words their error must contain."""
    empty = root / "empty"
    empty.mkdir()
    only_bad = root / "only-bad"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "a" / "x.png").write_bytes(b"")
    (only_bad / "b").mkdir()
    (only_bad / "b" / "y.jpg").write_bytes(b"not a jpeg")
    single = root / "single"
    for i in range(4):
        write_rgb(single / "cat" / f"{i}.png", seed=i)
    return {
        "empty": (empty, "no readable images found"),
        "unreadable": (only_bad, "no readable images"),
        "single class": (single, "only one class ('cat')"),
        "missing": (root / "nowhere", "does not exist"),
    }


@pytest.mark.parametrize("kind", ["empty", "unreadable", "single class", "missing"])
def test_bad_data_is_a_one_line_error(kind: str, workspace: Path, tmp_path: Path) -> None:
    data, words = _bad_sources(tmp_path)[kind]
    code, out, err = zoo("adapt", MODEL, "--data", str(data), "--epochs", "1", models_dir=workspace)
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("zoo: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0]  # the error is the last word, no traceback
    assert "Traceback" not in err


def test_default_epochs_give_small_data_enough_steps() -> None:
    from pipeline.train.strategy_choice import default_epochs

    # flowers5: 600 images, 19 steps an epoch -> 11 epochs; textures10: 240 images -> capped at 20.
    assert default_epochs("finetune", train_images=600, batch_size=32) == 11
    assert default_epochs("finetune", train_images=240, batch_size=32) == 20
    assert default_epochs("full", train_images=100_000, batch_size=32) == 10
    assert default_epochs("scratch", train_images=100_000, batch_size=32) == 20
