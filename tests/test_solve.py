"""The `feature` head solver: the optimum scikit-learn finds, folded into a head on raw features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.samples import DataSplit
from pipeline.data.sources import load_source
from pipeline.data.split import subsample_per_class
from pipeline.surgery import make_head
from pipeline.train.fastpath import preprocessed_batch
from pipeline.train.loop import BEST_CHECKPOINT, RESUME_POINT, TrainConfig
from pipeline.train.solve import (
    FeatureSet,
    fit_head,
    fit_linear,
    fold_standardisation,
    is_linear_head,
)
from zoo.catalog import Preprocess, load_catalog
from zoo.workspace import open_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64


@pytest.fixture(scope="module")
def digit_features(bundled_workspace: Path) -> dict[str, FeatureSet]:
    """Frozen efficientnet-lite0 features (onnxruntime) of digits: 6 train, 3 val, 5 test per class."""
    import onnx

    from pipeline.convert.normalisation import normalise
    from pipeline.convert.probe import probe
    from pipeline.core import sessions
    from pipeline.train import features

    path, card = open_model(
        "efficientnet-lite0", models_dir=bundled_workspace, catalog=load_catalog()
    )
    preprocess = Preprocess.from_dict(card["entry"]["preprocess"]).at_size(SIZE)
    model, _ = normalise(onnx.load(path))
    found = probe(model)
    session = sessions.ort_session(
        features.cut_at(model, input_name=found.input_name, output_name=found.feature_name)
    )
    split: DataSplit = load_source("builtin:digits", seed=0)
    parts = {
        "train": subsample_per_class(split.train, 6, seed=0),
        "val": subsample_per_class(split.val, 3, seed=0),
        "test": subsample_per_class(split.test, 5, seed=0),
    }
    result = {}
    for name, samples in parts.items():
        batch = preprocessed_batch(samples, preprocess)
        values = session.run(None, {found.input_name: batch})[0].reshape(len(samples), -1)
        result[name] = FeatureSet(
            torch.from_numpy(values.copy()), torch.tensor([s.label for s in samples])
        )
    return result


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def test_linear_head_reaches_the_scikit_learn_optimum(
    digit_features: dict[str, FeatureSet],
) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, val, test = digit_features["train"], digit_features["val"], digit_features["test"]
    linear = nn.Linear(train.features.shape[1], 10)
    fitted = fit_linear(linear, train=train, val=val, max_evaluations=1000, log=lambda _: None)
    assert fitted.state.stopped.startswith("converged")
    # The same objective in scikit-learn's terms: C = 1 / (weight decay * N).
    scaler = StandardScaler().fit(train.features.numpy())
    reference = LogisticRegression(
        C=1.0 / (fitted.weight_decay * len(train.labels)), max_iter=10_000, tol=1e-8
    ).fit(scaler.transform(train.features.numpy()), train.labels.numpy())
    expected = reference.predict_proba(scaler.transform(test.features.numpy()))
    with torch.no_grad():
        logits = linear(test.features)  # raw features: the standardisation is folded in
    got = torch.softmax(logits.double(), 1).numpy()
    assert np.abs(got - expected).max() < 1e-2  # the same optimum, to solver tolerance
    ours = accuracy(logits, test.labels)
    theirs = float((expected.argmax(1) == test.labels.numpy()).mean())
    assert abs(ours - theirs) <= 0.01
    assert ours > 0.5  # ten classes: the features do carry the digits


def test_folding_keeps_the_logits() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    raw = torch.randn(20, 6) * 40 + 7
    mean, std = raw.mean(0), raw.std(0, unbiased=False)
    expected = linear((raw - mean) / std)
    fold_standardisation(linear, mean, std)
    assert torch.allclose(linear(raw), expected, atol=1e-4)


def test_hidden_head_trains_with_adam_and_writes_the_checkpoints(
    digit_features: dict[str, FeatureSet], tmp_path: Path
) -> None:
    train, val, test = digit_features["train"], digit_features["val"], digit_features["test"]
    torch.manual_seed(0)
    head = make_head(train.features.shape[1], 10, hidden=32, dropout=0.2)
    assert not is_linear_head(head) and is_linear_head(make_head(5, 2))
    saved = nn.Module()
    saved.head = head
    fitted = fit_head(
        head,
        train=train,
        val=val,
        config=TrainConfig(lr=1e-3, batch_size=16, seed=0),
        max_epochs=60,
        run_dir=tmp_path,
        saved_model=saved,
        log=lambda _: None,
    )
    assert fitted.method == "adam" and 1 <= fitted.state.best_epoch <= fitted.state.epoch <= 60
    assert [r.epoch for r in fitted.state.history] == list(range(1, fitted.state.epoch + 1))
    assert (tmp_path / BEST_CHECKPOINT).is_file() and (tmp_path / RESUME_POINT).is_file()
    head.eval()
    with torch.no_grad():
        assert accuracy(head(test.features), test.labels) > 0.4


def test_epochs_cap_the_solver(digit_features: dict[str, FeatureSet]) -> None:
    train, val = digit_features["train"], digit_features["val"]
    linear = nn.Linear(train.features.shape[1], 10)
    fitted = fit_linear(linear, train=train, val=val, max_evaluations=3, log=lambda _: None)
    assert fitted.state.epoch == 3 and fitted.state.stopped == "epochs done"
    assert [r.epoch for r in fitted.state.history] == [1, 2, 3]
    assert dataclasses.asdict(fitted.state.history[0])["lr"].startswith("lbfgs")
