"""The fast paths train the same model as the plain path: cached features and the frozen prefix.

With the same data, seed and initial weights, a head trained on onnxruntime's cached features
(and the top blocks trained on a cached frozen prefix) must end where training the whole model
end to end on images ends; only float rounding between onnxruntime and torch may differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from pipeline.core.samples import DataSplit
from pipeline.data.sources import load_source
from pipeline.data.split import subsample_per_class
from pipeline.surgery import make_plan
from pipeline.surgery.build import build_model
from pipeline.train import fastpath
from pipeline.train.fastpath import prepare
from pipeline.train.loop import TrainConfig, TrainState, fit
from zoo.catalog import Preprocess, load_catalog
from zoo.workspace import open_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPOCHS = 2
SIZE = 64
# The fast paths see onnxruntime's features, the plain path torch's: they differ by ~1e-6,
# and two epochs of Adam carry that into the weights without amplifying it much.
WEIGHT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundled(bundled_workspace: Path) -> tuple[Path, str, Preprocess]:
    """The bundled model's file, sha256 and preprocessing at 64 px."""
    path, card = open_model(
        "efficientnet-lite0", models_dir=bundled_workspace, catalog=load_catalog()
    )
    return path, card["sha256"], Preprocess.from_dict(card["entry"]["preprocess"]).at_size(SIZE)


@pytest.fixture(scope="module")
def digits() -> DataSplit:
    """Digits with 4 training, 2 validation and 2 test images per class."""
    split = load_source("builtin:digits", seed=0)
    return dataclasses.replace(
        split,
        train=subsample_per_class(split.train, 4, seed=0),
        val=subsample_per_class(split.val, 2, seed=0),
        test=subsample_per_class(split.test, 2, seed=0),
    )


class Trained(NamedTuple):
    weights: dict[str, torch.Tensor]  # the adapted model's state after training
    trainable: set[str]  # names of the parameters that trained
    state: TrainState
    path: str  # the setup's description
    logged: list[str]


def train(
    *,
    strategy: str,
    unfreeze: int | None,
    fast: bool,
    bundled: tuple[Path, str, Preprocess],
    split: DataSplit,
    folder: Path,
    augment: str = "none",
) -> Trained:
    """Build the adapted model from the seed, then train it for EPOCHS on the chosen path."""
    onnx_path, sha256, preprocess = bundled
    imported, adapted = build_model(
        onnx_path, num_classes=len(split.class_names), hidden=None, dropout=0.0, seed=0
    )
    plan = make_plan(adapted, strategy, unfreeze=unfreeze)
    # SGD, not Adam: Adam turns noise-level gradients into +-lr steps whose sign flips on the 1e-6
    # differences between onnxruntime and torch, which would hide what this test looks for.
    config = TrainConfig(
        epochs=EPOCHS, batch_size=8, lr=0.05, optimizer="sgd", seed=0, device="cpu"
    )
    logged: list[str] = []
    setup = prepare(
        strategy=strategy,
        augment=augment,
        imported=imported,
        adapted=adapted,
        plan=plan,
        split=split,
        preprocess=preprocess,
        config=config,
        cache_dir=folder / "cache",
        model_sha256=sha256,
        log=logged.append,
        fast=fast,
    )
    state = fit(
        setup.model,
        setup.plan,
        make_train_loader=setup.make_train_loader,
        val_loader=setup.val_loader,
        config=config,
        run_dir=folder,
        saved_model=adapted,
        log=lambda _: None,
    )
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    weights = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
    return Trained(weights, trainable, state, setup.description, logged)


def max_weight_diff(a: Trained, b: Trained, names: set[str]) -> float:
    return max(float((a.weights[n] - b.weights[n]).abs().max()) for n in names)


PER_BATCH = "augmented images through the frozen part in onnxruntime, per batch"


@pytest.mark.parametrize(
    ("strategy", "unfreeze", "augment", "budget_gb", "fast_description"),
    [
        ("feature", None, "none", None, "cached onnxruntime features"),
        # The prefix is cached on disk and read back by rows.
        ("finetune", 2, "none", None, "frozen prefix cached by onnxruntime"),
        # No room in the cache budget: the same prefix runs per batch for every split.
        ("finetune", 2, "none", "0", "frozen prefix cached by onnxruntime"),
        # Augmented: the same seeded draws reach both paths, the prefix runs per batch.
        ("finetune", 2, "light", None, PER_BATCH),
        ("feature", None, "strong", None, PER_BATCH),
    ],
)
def test_fast_path_trains_what_the_plain_path_trains(
    strategy: str,
    unfreeze: int | None,
    augment: str,
    budget_gb: str | None,
    fast_description: str,
    bundled: tuple[Path, str, Preprocess],
    digits: DataSplit,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if budget_gb is not None:
        monkeypatch.setenv("ZOO_CACHE_BUDGET_GB", budget_gb)
    # Exactness is checked on float32 prefixes; float16 storage has its own test below.
    monkeypatch.setattr(fastpath, "PREFIX_STORAGE", "float32")
    runs = {
        fast: train(
            strategy=strategy,
            unfreeze=unfreeze,
            fast=fast,
            bundled=bundled,
            split=digits,
            folder=tmp_path / ("fast" if fast else "plain"),
            augment=augment,
        )
        for fast in (True, False)
    }
    fast, plain = runs[True], runs[False]
    assert fast.path == fast_description
    no_room = any("does not fit the cache budget" in line for line in fast.logged)
    assert no_room == (budget_gb == "0"), fast.logged
    cached = list((tmp_path / "fast" / "cache").glob("*.npy"))
    assert bool(cached) == (budget_gb != "0"), cached
    assert plain.path == "images through the whole model"
    assert fast.trainable == plain.trainable
    head = {n for n in fast.trainable if n.startswith("head.")}
    assert head and (strategy == "feature") == (fast.trainable == head)
    # The weights really moved: a path that trained nothing would agree trivially.
    _, initial = build_model(bundled[0], num_classes=10, hidden=None, dropout=0.0, seed=0)
    start = {k: v.detach() for k, v in initial.state_dict().items()}
    moved = max(float((plain.weights[n] - start[n]).abs().max()) for n in head)
    assert moved > 1e-3
    # Every weight that trained, and every BatchNorm statistic, ends in the same place.
    head_diff = max_weight_diff(fast, plain, head)
    all_diff = max(float((fast.weights[k] - plain.weights[k]).abs().max()) for k in plain.weights)
    print(
        f"{strategy}: head moved {moved:.3g}; fast vs plain max |diff| head {head_diff:.3g}, "
        f"every tensor {all_diff:.3g}"
    )
    assert head_diff <= WEIGHT_TOLERANCE
    # BatchNorm running variances reach the hundreds: compare every tensor relative to its size.
    excess = {
        key: float(((fast.weights[key] - value).abs() - 1e-3 * value.abs()).max())
        for key, value in plain.weights.items()
        if value.is_floating_point()
    }
    worst = max(excess, key=excess.get)
    assert excess[worst] <= WEIGHT_TOLERANCE, (worst, excess[worst])
    # The frozen weights did not change at all on either path.
    frozen = {n for n, _ in initial.named_parameters()} - fast.trainable
    assert frozen and max_weight_diff(plain, runs[True], frozen) == 0.0
    assert max(float((plain.weights[n] - start[n]).abs().max()) for n in frozen) == 0.0
    assert [r.epoch for r in fast.state.history] == [r.epoch for r in plain.state.history] == [1, 2]
    for f, p in zip(fast.state.history, plain.state.history, strict=True):
        assert f.val_loss == pytest.approx(p.val_loss, rel=LOSS_TOLERANCE), (f, p)
        assert f.train_loss == pytest.approx(p.train_loss, rel=LOSS_TOLERANCE), (f, p)
        assert f.val_acc == p.val_acc and f.train_acc == p.train_acc
    assert fast.state.best_epoch == plain.state.best_epoch


def test_float16_prefix_cache_trains_close_to_float32(
    bundled: tuple[Path, str, Preprocess], digits: DataSplit, tmp_path: Path
) -> None:
    """The on-disk prefix is float16 (half the disk and reads): training ends close to float32.

    Measured here: the head's weights move 0.29 in two epochs and land within 0.004 of the
    float32 run (1.3%), the same validation accuracy.
    """
    runs = {}
    for storage in ("float16", "float32"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fastpath, "PREFIX_STORAGE", storage)
            runs[storage] = train(
                strategy="finetune",
                unfreeze=2,
                fast=True,
                bundled=bundled,
                split=digits,
                folder=tmp_path / storage,
            )
    half, full = runs["float16"], runs["float32"]
    stored = list((tmp_path / "float16" / "cache").glob("*.npy"))
    assert stored and all(np.load(p, mmap_mode="r").dtype == np.float16 for p in stored)
    head = {n for n in full.trainable if n.startswith("head.")}
    assert 0 < max_weight_diff(half, full, head) <= 0.02
    for h, f in zip(half.state.history, full.state.history, strict=True):
        assert h.val_loss == pytest.approx(f.val_loss, rel=0.02)


def test_feature_cache_key_follows_the_image_files(tmp_path: Path) -> None:
    """A photo replaced under the same name gets new features; an untouched one keeps its key."""
    import os

    from pipeline.train.features import cache_key

    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"one")
    common = {"model_sha256": "0" * 64, "feature_name": "pooled", "preprocess": {"crop": 224}}
    first = cache_key(refs=[str(photo), "builtin:digits#0"], **common)
    assert cache_key(refs=[str(photo), "builtin:digits#0"], **common) == first
    photo.write_bytes(b"other photo")
    os.utime(photo, ns=(1, 1))
    assert cache_key(refs=[str(photo), "builtin:digits#0"], **common) != first


def test_prefetching_keeps_the_order_stays_one_ahead_and_raises_where_the_batch_failed() -> None:
    import time

    from pipeline.core.sessions import prefetched

    assert list(prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]
    produced: list[int] = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i

    items = prefetched(source())
    assert next(items) == 0
    time.sleep(0.1)
    assert len(produced) <= 2  # one batch ahead, never the whole data set in memory
    items.close()

    def failing():
        yield 1
        raise ValueError("cut.jpg: image file is truncated")

    items = prefetched(failing())
    assert next(items) == 1
    with pytest.raises(ValueError, match="truncated"):
        next(items)
