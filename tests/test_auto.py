"""`--strategy auto`: the choice follows validation measurements and never reads the test split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.core.samples import DataSplit, Sample
from pipeline.data.sources import load_source
from pipeline.data.split import subsample_per_class
from pipeline.surgery import discover_blocks
from pipeline.surgery.build import build_model
from pipeline.train.auto import AutoEvidence, choose_strategy, measure, settle
from pipeline.train.loop import TrainConfig
from zoo.catalog import Preprocess, load_catalog
from zoo.workspace import open_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCKS = 9


def test_auto_fine_tunes_then_keeps_what_scores_higher_on_validation() -> None:
    small = AutoEvidence(per_class=24, probe_val_acc=0.80, confidence=0.4)
    strategy, unfreeze, reason = choose_strategy(small, num_blocks=BLOCKS)
    assert (strategy, unfreeze) == ("finetune", 2)
    assert "probe 0.800" in reason and "24 training images per class" in reason
    assert "whichever scores higher on validation" in reason
    large = AutoEvidence(per_class=500, probe_val_acc=0.9, confidence=0.4)
    assert choose_strategy(large, num_blocks=BLOCKS)[:2] == ("finetune", 4)
    # Large data on which the frozen features do badly: every layer trains.
    unlike = AutoEvidence(per_class=500, probe_val_acc=0.4, confidence=0.1)
    assert choose_strategy(unlike, num_blocks=BLOCKS)[:2] == ("full", None)
    # Once trained: the fine-tune stands when it reaches the probe, else the probe's head.
    for val_acc, keep_probe in [(0.86, False), (0.80, False), (0.79, True)]:
        settled, kept, why = settle(small, unfreeze=2, val_acc=val_acc)
        assert kept is keep_probe and settled.finetune_val_acc == val_acc
        assert f"fine-tuning the top 2 blocks {val_acc:.3f}, probe 0.800" in why
    assert "every layer 0.500" in settle(unlike, unfreeze=None, val_acc=0.5)[2]


def test_confidence_is_used_only_for_an_imagenet_head() -> None:
    imagenet = AutoEvidence(per_class=24, probe_val_acc=0.8, confidence=0.42)
    orientation = AutoEvidence(per_class=24, probe_val_acc=0.8, confidence=None, head_classes=4)
    assert "mean confidence 0.42" in choose_strategy(imagenet, num_blocks=BLOCKS)[2]
    reason = choose_strategy(orientation, num_blocks=BLOCKS)[2]
    assert "4 classes, not ImageNet's 1000: its confidence is not used" in reason


@pytest.fixture(scope="module")
def bundled(bundled_workspace: Path) -> tuple[Path, str, Preprocess]:
    path, card = open_model(
        "efficientnet-lite0", models_dir=bundled_workspace, catalog=load_catalog()
    )
    return path, card["sha256"], Preprocess.from_dict(card["entry"]["preprocess"]).at_size(64)


@pytest.mark.slow
def test_poisoned_test_split_does_not_change_the_choice(
    bundled: tuple[Path, str, Preprocess], tmp_path: Path
) -> None:
    onnx_path, sha256, preprocess = bundled
    split: DataSplit = load_source("builtin:digits", seed=0)
    split = dataclasses.replace(
        split,
        train=subsample_per_class(split.train, 4, seed=0),
        val=subsample_per_class(split.val, 2, seed=0),
        test=subsample_per_class(split.test, 3, seed=0),
    )
    # Wrong labels, and files that do not exist: reading either would change or break the result.
    poisoned = dataclasses.replace(
        split,
        test=[
            Sample(str(tmp_path / f"missing-{i}.png"), (s.label + 3) % 10)
            for i, s in enumerate(split.test)
        ],
    )
    results = []
    for data in (split, poisoned):
        imported, adapted = build_model(onnx_path, num_classes=10, hidden=None, dropout=0.0, seed=0)
        evidence = measure(
            imported=imported,
            adapted=adapted,
            split=data,
            preprocess=preprocess,
            config=TrainConfig(batch_size=8, seed=0, device="cpu"),
            cache_dir=tmp_path / "cache",
            model_sha256=sha256,
            confidence=None,
            log=lambda _: None,
        )
        # The measurements work on copies: the model to train is left as it was built.
        assert all(not p.grad for p in adapted.parameters() if p.grad is not None)
        results.append(
            (evidence, choose_strategy(evidence, num_blocks=len(discover_blocks(adapted))))
        )
    assert results[0] == results[1]
    evidence = results[0][0]
    assert 0 < evidence.probe_val_acc <= 1 and evidence.finetune_val_acc is None


def test_without_validation_images_the_rule_of_thumb_decides() -> None:
    blind = AutoEvidence(per_class=24, probe_val_acc=float("nan"), confidence=0.4)
    strategy, _, reason = choose_strategy(blind, num_blocks=BLOCKS)
    assert strategy == "feature" and reason.startswith("no validation images to measure on")
    other_head = dataclasses.replace(blind, confidence=None, head_classes=4)
    assert choose_strategy(other_head, num_blocks=BLOCKS)[:2] == ("finetune", 2)
