"""report.html: one self-contained page per run (and per comparison), parsed back with html.parser.

Fast tests draw the page from a run folder built here (images, predictions and plots of a made-up
evaluation); slow ones train the bundled model on built-in digits and on a two-class folder, export
and verify it, and one trains on the real textures10 photos (acceptance 2 of issue 14).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from image_builders import write_rgb
from PIL import Image

from cli import main
from pipeline.core import rundir
from pipeline.core.results import (
    EpochRecord,
    ImagePrediction,
    read_predictions,
    write_history,
    write_predictions,
)
from pipeline.core.rundir import PREDICTIONS_FILE, RunDir
from pipeline.core.samples import DataSplit, Sample
from pipeline.report import html as report_html
from pipeline.report.html import REPORT_FILE, gallery_items, refresh_report, write_report
from pipeline.report.metrics import kept_epoch, write_run_report
from pipeline.report.predictions import image_predictions

MODEL = "efficientnet-lite0"
MAX_BYTES = 5 * 1024 * 1024
RUN_SECTIONS = ("model", "data", "strategy", "curves", "metrics", "mistakes", "confused", "trust", "heatmaps", "verification")  # fmt: skip


class Page(HTMLParser):
    """What a test needs from a report: section ids, every URL-bearing attribute, the gallery."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []
        self.thumbs: list[dict] = []  # attrs of each gallery figure, plus its img src and caption
        self.headings: list[str] = []
        self._figure: dict | None = None
        self._heading: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(values.get("id") or "")
        for name in ("src", "href", "srcset", "data", "action", "poster"):
            if values.get(name):
                self.urls.append((tag, name, values[name] or ""))
        if tag == "figure" and "thumb" in (values.get("class") or "").split():
            self._figure = {**values, "img": None, "caption": ""}
            self.thumbs.append(self._figure)
        elif tag == "img" and self._figure is not None:
            self._figure["img"] = values.get("src")
        if tag in ("h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        if tag in ("h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._figure is not None:
            self._figure["caption"] += data
        if self._heading is not None:
            self._heading.append(data)


def parse(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def assert_self_contained(path: Path, page: Page) -> None:
    """Under 5 MB, no script, stylesheet or frame, and every image a data: URI."""
    assert path.stat().st_size < MAX_BYTES
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for tag, attribute, value in page.urls:
        if tag == "a" and attribute == "href":  # navigation: in-page anchors or sibling reports
            assert not value.startswith(("http:", "https:", "//")), value
        else:
            assert value.startswith("data:image/"), (tag, attribute, value[:80])
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "url(" not in text


def parse_cells(text: str) -> list[list[str]]:
    """The text of each cell of the first table's body rows."""
    body = text.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [
        [re.sub("<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)
    ]


def decoded(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header in ("data:image/jpeg;base64", "data:image/png;base64"), header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def zoo(*args: str, models_dir: Path | None = None) -> tuple[int, str, str]:
    prefix = ["--models-dir", str(models_dir)] if models_dir else []
    result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ----------------------------------------------------------------------------- a made-up run


def _history(epochs: int = 4) -> list[EpochRecord]:
    return [
        EpochRecord(e, 1.5 / e, 0.4 + e / 10, 1.6 / e, 0.3 + e / 10, "0.001", 1000, 8, 0.2)
        for e in range(1, epochs + 1)
    ]


def build_run(
    root: Path, class_names: list[str], *, per_class: int = 6, accuracy: float = 0.5, seed: int = 0
) -> Path:
    """A finished run folder as `zoo adapt` leaves it, from noise images and chosen logits."""
    data, run = root / "data", root / "run"
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    samples = []
    for label, name in enumerate(class_names):
        for i in range(per_class):
            path = write_rgb(data / name / f"im {i}.png", size=(48, 32), seed=seed * 1000 + label * 100 + i)  # fmt: skip
            samples.append(Sample(str(path), label))
    n = len(class_names)
    logits = rng.normal(0, 1, (len(samples), n))
    # The first `accuracy` of each class's images are right, the rest taken for the next class.
    for row, sample in enumerate(samples):
        right = (row % per_class) < round(accuracy * per_class)
        logits[row, sample.label if right else (sample.label + 1) % n] += 4 + row % 3
    split = DataSplit(class_names, [], samples[:n], samples, "data", source=str(data))
    split.save(run / "split.json")
    labels = np.array([s.label for s in samples])
    write_run_report(run, history=_history(), labels=labels, scores=logits, class_names=class_names, title="t")  # fmt: skip
    predictions = image_predictions(samples, logits, class_names=class_names, source=str(data))
    write_predictions(run / PREDICTIONS_FILE, predictions)
    record = {
        "tool": "zoo",
        "created": "2026-12-01T00:00:00+00:00",
        "status": "done",
        "source": {"name": MODEL, "path": "/m/model.onnx", "sha256": "ab" * 32, "url": "bundled:x"},
        "strategy": "finetune",
        "strategy_reason": "probe 0.512 < 0.9: the frozen features are not enough",
        "unfreeze": 2,
        "hyperparameters": {"epochs": 4, "lr": 0.0003, "batch_size": 8, "optimizer": "adam"},
        "preprocess": {"crop": 224, "layout": "NCHW", "mean": [0.5] * 3, "std": [0.25] * 3},
        "class_names": class_names,
        "num_classes": n,
        "head": {"hidden": None, "dropout": 0.0},
        "data": {"source": str(data), "train": 0, "val": n, "test": len(samples), "skipped": 0},
        "device": "cpu",
        "seconds": 12.5,
        "epochs_run": 4,
        "best_epoch": 4,
        "stopped": "finished 4 epochs",
    }
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    return run


@pytest.fixture
def made_up_run(tmp_path: Path) -> Path:
    return build_run(tmp_path, ["cat", "dog", "eel"], per_class=6, accuracy=0.5)


def test_page_has_every_section_and_embeds_everything(made_up_run: Path) -> None:
    path = write_report(made_up_run)
    assert path == made_up_run / REPORT_FILE
    page = parse(path)
    assert page.sections == list(RUN_SECTIONS)  # three classes: no ROC
    assert_self_contained(path, page)
    text = path.read_text(encoding="utf-8")
    for fact in ("probe 0.512 &lt; 0.9", "finetune", "cpu", "12.5 s", "efficientnet-lite0", "cat", "eel"):  # fmt: skip
        assert fact in text, fact
    # The curves and the confusion matrix, drawn by pipeline.report.metrics.
    assert text.count("data:image/png;base64") == 2
    assert "Not exported yet" in text


def test_gallery_shows_the_worst_mistakes_with_labels(made_up_run: Path) -> None:
    predictions = read_predictions(made_up_run / PREDICTIONS_FILE)
    mistakes = sorted((p for p in predictions if not p.correct), key=lambda p: -p.loss)
    assert len(mistakes) == 9  # half of 18
    page = parse(write_report(made_up_run))
    assert len(page.thumbs) == 9
    assert [t["data-true"] for t in page.thumbs] == [p.label for p in mistakes]
    assert [t["data-predicted"] for t in page.thumbs] == [p.predicted for p in mistakes]
    for thumb in page.thumbs:
        assert thumb["class"] == "thumb mistake"
        assert thumb["data-true"] != thumb["data-predicted"]
        assert f"true {thumb['data-true']}" in thumb["caption"]
        assert f"predicted {thumb['data-predicted']}" in thumb["caption"]
        assert "confidence" in thumb["caption"] and 0 < float(thumb["data-confidence"]) <= 1
        image = decoded(thumb["img"])
        assert image.format == "JPEG" and max(image.size) == 128


def test_predictions_hold_identity_label_confidence_and_loss(made_up_run: Path) -> None:
    predictions = read_predictions(made_up_run / PREDICTIONS_FILE)
    assert len(predictions) == 18
    assert predictions[0].image == "cat/im 0.png"  # relative to the data source
    for record in predictions:
        assert 0 < record.confidence <= 1 and record.loss >= 0
        if record.correct:  # the true class is the prediction: loss is -log(confidence)
            assert record.loss == pytest.approx(-math.log(record.confidence), abs=1e-5)
        else:
            assert record.loss > -math.log(record.confidence)
    metrics = json.loads((made_up_run / "metrics.json").read_text())
    wrong = sum(sum(row) - row[i] for i, row in enumerate(metrics["confusion"]))
    assert wrong == sum(not p.correct for p in predictions)


def test_few_mistakes_are_filled_with_the_hardest_correct_images(tmp_path: Path) -> None:
    run = build_run(tmp_path, ["a", "b"], per_class=8, accuracy=7 / 8)
    page = parse(write_report(run))
    states = [t["class"] for t in page.thumbs]
    assert states == ["thumb mistake"] * 2 + ["thumb correct"] * 6
    assert all("correct" in t["caption"] for t in page.thumbs[2:])
    picked = gallery_items(read_predictions(run / PREDICTIONS_FILE))
    correct = [p.loss for p in picked if p.correct]
    assert correct == sorted(correct, reverse=True)


def test_two_classes_get_a_roc_curve(tmp_path: Path) -> None:
    run = build_run(tmp_path, ["no", "yes"], per_class=6, accuracy=0.7)
    path = write_report(run)
    page = parse(path)
    assert page.sections == [*RUN_SECTIONS[:5], "roc", *RUN_SECTIONS[5:]]
    assert path.read_text(encoding="utf-8").count("data:image/png;base64") == 3
    assert "Area under the curve" in path.read_text(encoding="utf-8")


def test_hostile_class_names_and_paths_are_escaped(tmp_path: Path) -> None:
    names = ["<img src=x onerror=alert(1)>", 'a "quoted" & <i>bold']
    run = build_run(tmp_path, names, per_class=4, accuracy=0.5)
    path = write_report(run)
    page = parse(path)
    assert_self_contained(path, page)  # no img but the embedded ones
    assert "i" not in page.tags
    assert {t["data-true"] for t in page.thumbs} == set(names)  # attributes decode back exactly
    assert "&lt;img src=x" in path.read_text(encoding="utf-8")


def test_moved_images_leave_a_placeholder_not_an_error(made_up_run: Path) -> None:
    shutil.rmtree(made_up_run.parent / "data")
    page = parse(write_report(made_up_run))
    assert len(page.thumbs) == 9 and all(t["img"] is None for t in page.thumbs)
    assert "image not found" in (made_up_run / REPORT_FILE).read_text(encoding="utf-8")


def test_most_confused_pairs_are_listed_by_count(tmp_path: Path) -> None:
    run = build_run(tmp_path, ["a", "b", "c"], per_class=6, accuracy=0.5)
    pairs = report_html.confused_pairs(RunDir(run).metrics())
    # Every mistake of class i went to class i+1: three pairs of three images, half of each class.
    assert pairs == [("a", "b", 3, 0.5), ("b", "c", 3, 0.5), ("c", "a", 3, 0.5)]
    text = write_report(run).read_text(encoding="utf-8")
    assert "share of the true class" in text
    assert text.count('<img class="pair"') == 3  # the worst example of each pair


def test_a_report_that_cannot_be_drawn_is_one_logged_line(made_up_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def broken(*_: object) -> str:
        raise RuntimeError("drawing failed\nsecond line")

    monkeypatch.setattr(report_html, "run_page", broken)
    lines: list[str] = []
    assert refresh_report(made_up_run, log=lines.append) is None
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "report.html not written (RuntimeError: drawing failed second line)" in lines[0]
    with pytest.raises(RuntimeError):  # asked for directly, the bug surfaces
        write_report(made_up_run)


def test_zoo_report_rewrites_the_page_and_prints_its_path(made_up_run: Path) -> None:
    code, out, err = zoo("report", str(made_up_run))
    assert code == 0, err
    assert out.strip() == str(made_up_run / REPORT_FILE)
    assert parse(made_up_run / REPORT_FILE).sections == list(RUN_SECTIONS)


@pytest.mark.parametrize("kind", ["empty", "missing", "damaged", "file"])
def test_zoo_report_on_a_folder_that_is_no_run_is_one_line(kind: str, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    if kind == "file":
        folder.write_text("not a run")
    elif kind != "missing":
        folder.mkdir()
    if kind == "damaged":
        (folder / "run.json").write_text("{not json", encoding="utf-8")
    code, out, err = zoo("report", str(folder))
    assert code != 0 and not out
    assert err.startswith("zoo: error: ") and err.count("\n") == 1, err
    assert "internal error" not in err and not (tmp_path / "folder" / REPORT_FILE).exists()


def test_export_and_verify_records_are_shown(made_up_run: Path) -> None:
    result = {
        "provider": "CPUExecutionProvider", "n_inputs": 20, "max_abs": 3e-6, "top1_agreement": 1.0,
        "top5_agreement": 1.0, "accuracy_onnx": 0.5, "accuracy_torch": 0.5, "failures": [], "passed": True,
    }  # fmt: skip
    report = {"atol": 1e-4, "rtol": 1e-3, "results": [result], "passed": True}

    class Summary:
        def to_dict(self) -> dict:
            return {"path": "/x/model.onnx", "verified": True, "size": 2_000_000, "opset": 17, "verify": report}  # fmt: skip

    report_html.record_export(made_up_run, Summary())
    text = (made_up_run / REPORT_FILE).read_text(encoding="utf-8")
    assert 'Export: <span class="verdict pass">PASSED' in text and "2.00 MB" in text
    assert "Not exported yet" not in text
    # A later export that failed the gate (verify.json beside the file, written: false) shows too.
    failed = {**report, "results": [{**result, "failures": ["max |diff| 0.3 > atol"], "passed": False}]}  # fmt: skip
    (made_up_run / "verify.json").write_text(json.dumps({**failed, "written": False}))
    text = write_report(made_up_run).read_text(encoding="utf-8")
    assert 'Last export: <span class="verdict fail">FAILED' in text and "max |diff| 0.3" in text


def test_comparison_page_puts_strategies_side_by_side(tmp_path: Path) -> None:
    folder = tmp_path / "compare"
    rows = []
    for index, strategy in enumerate(("scratch", "feature")):
        run = build_run(
            tmp_path / strategy, ["a", "b", "c"], accuracy=0.3 + 0.4 * index, seed=index
        )
        shutil.move(run, folder / strategy)
        rows.append({"strategy": strategy, "test_accuracy": 0.3 + 0.4 * index, "macro_f1": 0.5, "run_dir": str(folder / strategy), "seconds": 3.0, "trainable_params": 10})  # fmt: skip
    write_report(folder / "feature")
    (folder / "compare.json").write_text(json.dumps({"folder": str(folder), "runs": rows}))
    path = write_report(folder)
    page = parse(path)
    assert page.sections == ["table", "curves", "per-class", "confusion"]
    assert_self_contained(path, page)
    assert [u for u in page.urls if u[0] == "a" and "/" in u[2]] == [("a", "href", "scratch/report.html"), ("a", "href", "feature/report.html")]  # fmt: skip
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64") == 2  # both confusion matrices (no compare.png here)
    assert "70.0% ★" in text  # the best strategy is marked
    mistakes = [parse_cells(text)[row][4] for row in (0, 1)]
    assert mistakes == ["12", "6"]  # of 18 images: 2 and 4 of each class right


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> Path:
    models_dir = tmp_path_factory.mktemp("report")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return models_dir


@pytest.fixture(scope="module")
def digits_run(workspace: Path, one_torch_thread: None) -> Path:
    """The bundled model adapted to built-in digits from 2 images per class: many mistakes."""
    run = workspace / "digits-run"
    code, _, err = zoo(
        "adapt", MODEL, "--strategy", "feature", "--train-per-class", "2", "--out", str(run),
        models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    assert "not written" not in err
    return run


@pytest.mark.slow
def test_adapt_writes_predictions_and_the_report(digits_run: Path) -> None:
    split = DataSplit.load(digits_run / "split.json")
    predictions = read_predictions(digits_run / PREDICTIONS_FILE)
    assert [p.image for p in predictions] == [s.ref for s in split.test]  # builtin:digits#<index>
    assert [p.label for p in predictions] == [split.class_names[s.label] for s in split.test]
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert sum(p.correct for p in predictions) == round(metrics["accuracy"] * len(predictions))
    path = digits_run / REPORT_FILE
    page = parse(path)
    assert page.sections == list(RUN_SECTIONS)
    assert_self_contained(path, page)
    worst = sorted((p for p in predictions if not p.correct), key=lambda p: -p.loss)
    assert len(worst) > report_html.GALLERY_MAX  # far more mistakes than shown
    shown = worst[: report_html.GALLERY_MAX]
    assert [(t["data-true"], t["data-predicted"]) for t in page.thumbs] == [(p.label, p.predicted) for p in shown]  # fmt: skip
    for thumb in page.thumbs:
        assert thumb["img"] and decoded(thumb["img"]).size == (128, 128)  # 8x8 digits, grown


@pytest.mark.slow
def test_export_and_verify_refresh_the_report(digits_run: Path, workspace: Path) -> None:
    code, _, err = zoo("export", str(digits_run), models_dir=workspace)
    assert code == 0, err
    exported = json.loads((digits_run / rundir.EXPORT_RECORD).read_text())
    assert exported["verified"] and exported["verify"]["passed"]
    text = (digits_run / REPORT_FILE).read_text(encoding="utf-8")
    assert 'Export: <span class="verdict pass">PASSED' in text and "Not exported yet" not in text
    code, _, err = zoo("verify", str(digits_run / "model.onnx"), "--run", str(digits_run), models_dir=workspace)  # fmt: skip
    assert code == 0, err
    assert json.loads((digits_run / rundir.VERIFY_RECORD).read_text())["passed"]
    text = (digits_run / REPORT_FILE).read_text(encoding="utf-8")
    assert '<code>zoo verify</code>: <span class="verdict pass">PASSED' in text


@pytest.mark.slow
def test_a_two_class_run_reports_its_roc_curve(workspace: Path, tmp_path: Path, one_torch_thread: None) -> None:  # fmt: skip
    data = tmp_path / "two"
    for label, name in enumerate(("heads", "tails")):
        for i in range(8):
            write_rgb(data / name / f"{i}.png", size=(40, 30), seed=label * 50 + i)
    run = tmp_path / "run"
    code, _, err = zoo(
        "adapt", MODEL, "--data", str(data), "--strategy", "feature", "--image-size", "64",
        "--out", str(run), models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    page = parse(run / REPORT_FILE)
    assert "roc" in page.sections and (run / "roc.png").is_file()
    assert len(page.thumbs) == min(report_html.GALLERY_MIN, len(read_predictions(run / PREDICTIONS_FILE)))  # fmt: skip
    assert all(t["img"] for t in page.thumbs)  # relative paths found again under the data folder


@pytest.mark.slow
def test_real_textures_report_shows_at_least_eight_mistakes(shared_dir: Path, workspace: Path, one_torch_thread: None) -> None:  # fmt: skip
    run = workspace / "textures"
    code, _, err = zoo(
        "adapt", MODEL, "--data", str(shared_dir / "datasets" / "textures10"), "--strategy", "feature",
        "--out", str(run), models_dir=workspace,
    )  # fmt: skip
    assert code == 0, err
    path = run / REPORT_FILE
    page = parse(path)
    assert page.sections == list(RUN_SECTIONS)
    assert_self_contained(path, page)
    mistakes = [t for t in page.thumbs if t["class"] == "thumb mistake"]
    assert len(mistakes) >= 8 and all(t["img"] for t in mistakes)
    for thumb in mistakes:
        assert f"true {thumb['data-true']}" in thumb["caption"]
    if shutil.which("chromium"):
        assert_renders(path, run / "shot.png")


def assert_renders(path: Path, shot: Path) -> None:
    """The page in a real headless browser: a screenshot that is not blank."""
    subprocess.run(
        ["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
         "--window-size=1280,3000", path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and images, not a white page


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium to render the page")
def test_page_renders_in_a_headless_browser(made_up_run: Path) -> None:
    assert_renders(write_report(made_up_run), made_up_run / "shot.png")


def test_predictions_csv_round_trips(tmp_path: Path) -> None:
    records = [ImagePrediction("a/1.png", "a", "b", 0.75, 1.5), ImagePrediction("builtin:digits#3", "3", "3", 0.5, 0.69)]  # fmt: skip
    write_predictions(tmp_path / "p.csv", records)
    assert read_predictions(tmp_path / "p.csv") == records
    with open(tmp_path / "p.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["image", "label", "predicted", "confidence", "loss"]


# ----------------------------------------------------------------------------- a solved head


def _solve_history(passes: int = 19, lowest: int = 8) -> list[EpochRecord]:
    """An L-BFGS solve's passes, its validation loss lowest at pass `lowest` and not at the last."""
    return [
        EpochRecord(p, 1.0 / p, 0.9, 0.5 + abs(p - lowest) / 100, 0.8, "lbfgs wd=0.01", 10, 8, 0.01)
        for p in range(1, passes + 1)
    ]


def test_a_solve_keeps_its_last_pass_and_a_training_its_lowest_loss() -> None:
    assert kept_epoch(_solve_history()) == (19, "solution: pass 19")
    assert kept_epoch(_history()) == (4, "best epoch 4")  # validation loss falls every epoch
    training = [EpochRecord(e, 1.0, 0.5, abs(e - 3) + 1.0, 0.5, "0.001", 10, 8, 0.1) for e in range(1, 7)]  # fmt: skip
    assert kept_epoch(training) == (3, "best epoch 3")


def test_a_solved_head_says_what_its_passes_are_once(tmp_path: Path) -> None:
    run = build_run(tmp_path, ["a", "b", "c"])
    write_history(run / rundir.HISTORY_FILE, _solve_history())
    record = json.loads((run / "run.json").read_text())
    summary = (
        "head solved with L-BFGS on standardised features; weight decay 0.01 picked on validation"
    )
    record.update(strategy="feature", epochs_run=19, best_epoch=19, stopped="converged after 19 passes of L-BFGS", head_fit={"method": "lbfgs", "summary": summary})  # fmt: skip
    (run / "run.json").write_text(json.dumps(record), encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    assert "<th>solver passes</th><td>19</td>" in text
    assert "<th>solution</th><td>pass 19, the last</td>" in text
    assert "best epoch" not in text and "epochs run" not in text
    assert text.count("A solver pass evaluates the loss once") == 1 and summary in text
    # Trained by epochs, the same page keeps its words.
    build_run(tmp_path / "trained", ["a", "b"])
    text = write_report(tmp_path / "trained" / "run").read_text(encoding="utf-8")
    assert "<th>best epoch</th><td>4</td>" in text and "solver pass" not in text
