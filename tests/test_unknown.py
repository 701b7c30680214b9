""" "None of these": the unknown scores, their threshold, the score in the exported graph, and
`zoo predict` / `zoo evaluate` saying `unknown` (or not, with --no-reject)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from sklearn.covariance import ledoit_wolf
from test_calibration import TinyAdapted
from test_verify import LABELS, NUM_CLASSES, SHAPE, SIZE, image_inputs

import zoo
from cli import main
from pipeline.core.metadata import read_metadata
from pipeline.core.rundir import RunDir
from pipeline.core.sessions import create_session
from pipeline.core.trust import OOD_OUTPUT, CalibrationRecord, OodRecord
from pipeline.data.images import open_image
from pipeline.export.embed import embed_preprocess
from pipeline.export.verify import verify
from pipeline.export.write import export_model
from pipeline.train.ood import (
    DEFAULT_SCORE,
    KNN_BANK,
    SCORES,
    auroc,
    fit_score,
    load_score,
    score,
    threshold_for,
)
from pipeline.train.trust import TrustedModel
from zoo.catalog import IMAGENET_PREPROCESS
from zoo.errors import DataError, ZooError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "efficientnet-lite0"


def clusters(n: int = 300, dim: int = 12, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes in `dim` dimensions with correlated axes, away from the origin
    (as pooled activations are)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    mixing = rng.normal(size=(dim, dim)) * 0.5
    offsets = rng.normal(size=(3, dim)) * 2.0 + 10.0
    return rng.normal(size=(n, dim)) @ mixing + offsets[labels], labels


def far_from(features: np.ndarray, *, seed: int = 1) -> np.ndarray:
    """Points pointing elsewhere: one large axis each, unlike any class."""
    rng = np.random.default_rng(seed)
    far = rng.normal(size=features.shape)
    far[np.arange(len(far)), rng.integers(0, features.shape[1], len(far))] += 40.0
    return far


def test_mahalanobis_is_the_squared_distance_to_the_nearest_class_mean() -> None:
    features, labels = clusters()
    scorer = fit_score("mahalanobis", features, labels, 3)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    covariance, _ = ledoit_wolf(features - means[labels], assume_centered=True)
    precision = np.linalg.inv(covariance)
    query = features[:7] + 1.5
    expected = [min((q - m) @ precision @ (q - m) for m in means) for q in query]
    np.testing.assert_allclose(score(scorer, query, np.zeros((7, 3))), expected, rtol=1e-4)


@pytest.mark.parametrize("name", list(SCORES))
def test_every_score_ranks_far_inputs_higher_and_loads_back(name: str) -> None:
    features, labels = clusters()
    logits = np.eye(3)[labels] * 6.0  # confident on the training classes
    scorer = fit_score(name, features[:200], labels[:200], 3)
    far = far_from(features[200:])
    far_logits = np.full((len(far), 3), 1.0)  # unsure far away
    known = score(scorer, features[200:], logits[200:])
    unknown = score(scorer, far, far_logits)
    assert auroc(known, unknown) > 0.99, name
    again = load_score(name, scorer.state_dict())
    np.testing.assert_allclose(score(again, far, far_logits), unknown, rtol=1e-6)


def test_the_threshold_keeps_the_share_asked_for() -> None:
    scores = np.random.default_rng(0).normal(size=200)
    threshold = threshold_for(scores, 0.95)
    assert np.mean(scores <= threshold) == 0.955  # the 191st of 200: ceil(0.95 * 201)
    assert threshold_for(scores[:19], 0.95) == scores[:19].max()  # ceil(0.95 * 20) = 19
    assert threshold_for(scores, 1.0) == scores.max()
    for keep in (0.0, 1.5):
        with pytest.raises(DataError, match="give a number in"):
            threshold_for(scores, keep)
    with pytest.raises(DataError, match="add a val/ folder"):
        threshold_for(np.zeros(0), 0.95)
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0 and auroc([2.0], [1.0]) == 0.0


def test_knn_keeps_a_bank_of_every_class_within_its_limit() -> None:
    labels = np.repeat(np.arange(3), [3000, 40, 5])
    features = np.random.default_rng(0).normal(size=(len(labels), 4)) + 5.0
    scorer = fit_score("knn", features, labels, 3)
    assert scorer.bank.shape == (4, KNN_BANK)
    bank = scorer.bank.numpy().T
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for label in (1, 2):  # the small classes are kept whole
        gaps = np.abs(unit[labels == label][:, None, :] - bank[None]).max(axis=2).min(axis=1)
        assert gaps.max() < 1e-5, label
    again = fit_score("knn", features, labels, 3)
    assert torch.equal(again.bank, scorer.bank)  # the same bank every time


def test_an_unknown_score_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(DataError, match="choose from max_softmax, energy, mahalanobis, knn"):
        fit_score("magic", np.zeros((4, 2)), np.zeros(4, np.int64), 1)
    with pytest.raises(DataError, match="add training images"):
        fit_score("mahalanobis", np.zeros((1, 2)), np.zeros(1, np.int64), 1)


def trusted_tiny(seed: int = 0, *, threshold: float = 50.0) -> TrustedModel:
    """A small model with a temperature and a Mahalanobis score fitted on random images."""
    inner = TinyAdapted(seed).eval()
    with torch.no_grad():
        images = torch.from_numpy(image_inputs(40, seed=seed + 5).all_inputs)
        features = inner.embed(images).numpy()
        labels = inner(images).argmax(1).numpy()
    scorer = fit_score("mahalanobis", features, labels, NUM_CLASSES)
    ood = OodRecord(score="mahalanobis", threshold=threshold, keep=0.95)
    return TrustedModel(inner, calibration=CalibrationRecord(temperature=1.7), ood=ood, scorer=scorer)  # fmt: skip


def export_tiny(model: TrustedModel, path: Path) -> Path:
    metadata = {"labels": LABELS, "preprocess": IMAGENET_PREPROCESS.at_size(SIZE), **model.metadata()}  # fmt: skip
    export_model(model, path, input_name="input", layout="NCHW", input_shape=SHAPE, metadata=metadata, verify_inputs=image_inputs())  # fmt: skip
    return path


def test_the_score_is_an_output_of_the_graph_and_the_oracle_checks_it(tmp_path: Path) -> None:
    model = trusted_tiny()
    path = export_tiny(model, tmp_path / "model.onnx")
    session = create_session(path, "CPUExecutionProvider")
    assert [o.name for o in session.get_outputs()] == ["logits", "probs", OOD_OUTPUT]
    batch = image_inputs().all_inputs
    outputs = dict(zip(["logits", "probs", OOD_OUTPUT], session.run(None, {"input": batch}), strict=True))  # fmt: skip
    with torch.no_grad():
        expected = model.outputs(torch.from_numpy(batch))[2].numpy()
    np.testing.assert_allclose(outputs[OOD_OUTPUT], expected, rtol=1e-4)
    written = read_metadata(path)
    assert written.ood == model.ood and written.ood.output == OOD_OUTPUT
    assert "ood_score [batch]" in onnx.load(str(path)).doc_string
    # The same file against a model whose score was fitted elsewhere: the oracle says so.
    other = trusted_tiny(seed=0)
    other.scorer = fit_score("mahalanobis", np.random.default_rng(3).normal(size=(40, 16)), np.arange(40) % NUM_CLASSES, NUM_CLASSES)  # fmt: skip
    report = verify(other, path, image_inputs())
    assert not report.passed and any(OOD_OUTPUT in f for f in report.failures), report.failures
    assert verify(model, path, image_inputs()).passed


def test_the_embedded_graph_gives_probs_then_the_score(tmp_path: Path) -> None:
    path = export_tiny(trusted_tiny(), tmp_path / "model.onnx")
    merged = embed_preprocess(onnx.load(str(path)), IMAGENET_PREPROCESS.at_size(SIZE))
    assert [o.name for o in merged.graph.output] == ["probs", OOD_OUTPUT, "logits"]


def test_keep_chooses_the_threshold_again_from_the_validation_scores() -> None:
    model = trusted_tiny()
    model.val_scores = np.arange(1.0, 101.0)
    assert model.with_keep(0.5).threshold == 51.0 and model.ood.keep == 0.5  # ceil(0.5 * 101)
    assert model.metadata()["ood"]["threshold"] == 51.0 and model.ood.val_kept == 0.51
    bare = TrustedModel(TinyAdapted())
    with pytest.raises(ZooError, match="re-run `zoo adapt`"):
        bare.with_keep(0.9)
    assert bare.metadata() == {} and bare.output_names == ("logits", "probs")


# --- end to end: the bundled model on built-in digits, unknown images made here -------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> zoo.Run:
    models_dir = tmp_path_factory.mktemp("unknown")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    out = models_dir / "digits-run"
    run = zoo.adapt(MODEL, data="builtin:digits", strategy="feature", train_per_class=20, models_dir=models_dir, out=out)  # fmt: skip
    run.export()
    return run


def unknown_images(folder: Path) -> list[Path]:
    """Coloured noise and stripes: nothing like a white digit on black."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(6):
        pixels = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
        if index % 2:
            pixels[:, ::8] = [255, 40 * index, 0]
        paths.append(folder / f"odd-{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def digit_images(run: zoo.Run, folder: Path, count: int = 6) -> list[Path]:
    """Training digits saved as files (they score below the threshold)."""

    folder.mkdir(exist_ok=True)
    paths = []
    for sample in RunDir(run.dir).split().train[:count]:
        paths.append(folder / f"{sample.ref.rsplit('#', 1)[-1]}.png")
        open_image(sample.ref, channels=3).save(paths[-1])
    return paths


@pytest.mark.slow
def test_a_run_records_both_and_predict_says_unknown(digits_run: zoo.Run, tmp_path: Path) -> None:
    record = digits_run.record
    assert record.calibration is not None and record.calibration.temperature > 0
    assert sum(record.calibration.after.counts) == record.data.test
    assert record.ood.score == DEFAULT_SCORE and record.ood.val_kept >= 0.95
    assert (digits_run.dir / "trust.safetensors").is_file()
    assert "Calibration and unknown inputs" in (digits_run.dir / "report.html").read_text()
    model = digits_run.dir / "model.onnx"
    assert read_metadata(model).ood.threshold == pytest.approx(record.ood.threshold)
    odd, digits = unknown_images(tmp_path / "odd"), digit_images(digits_run, tmp_path / "known", 10)
    found = zoo.predictions(model, [*odd, *digits], top_k=1)
    assert all(p.unknown for p in found[: len(odd)]) and all(p.ood_score for p in found)
    known = [Path(p.image) for p in found[len(odd) :] if not p.unknown]
    assert len(known) >= 8, found  # training digits: a rare odd one may score past it
    assert zoo.predict(model, odd[:1])[0][0][0] == "unknown"
    assert not any(p.unknown for p in zoo.predictions(model, odd, reject=False))
    result = CliRunner().invoke(main, ["predict", str(model), str(odd[0]), str(known[0])])
    assert result.exit_code == 0, result.output
    assert "odd-0.png: unknown" in result.output and "unknown" not in result.output.splitlines()[-1]
    result = CliRunner().invoke(main, ["predict", str(model), str(odd[0]), "--no-reject"])
    assert "unknown" not in result.output


@pytest.mark.slow
def test_evaluate_counts_unknown_and_export_keep_rechooses(digits_run: zoo.Run, tmp_path: Path) -> None:  # fmt: skip
    model = digits_run.dir / "model.onnx"
    scored = zoo.evaluate(model, "builtin:digits")
    assert scored.unknown is not None and 0 < scored.unknown < scored.num_images * 0.2
    assert 0.0 < scored.kept_accuracy <= 1.0
    assert zoo.evaluate(model, "builtin:digits", reject=False).unknown is None
    result = CliRunner().invoke(main, ["evaluate", str(model), "--data", "builtin:digits", "--plot", str(tmp_path / "c.png")])  # fmt: skip
    assert result.exit_code == 0 and "unknown: " in result.output, result.output
    half = tmp_path / "half.onnx"
    zoo.export(digits_run, out=half, keep=0.5, models_dir=digits_run.models_dir)
    stored = read_metadata(half).ood
    assert stored.keep == 0.5 and stored.threshold < digits_run.record.ood.threshold
    assert json.loads((digits_run.dir / "run.json").read_text())["ood"]["keep"] == 0.95
