"""The `auto` strategy: what to freeze, decided from measurements on the validation split.

The probe, a linear head solved on frozen, cached features (pipeline.train.solve), takes seconds and
says how well the pretrained features fit the data. When it can be measured, `auto` fine-tunes
(the top blocks; every layer for large data the probe does badly on) and then settles on the
validation split: the fine-tune's checkpoint is kept when it scores at least the probe's
accuracy, else the probe's head on the frozen pretrained backbone (`settle`). A short fine-tune
used to predict the real one and predicted it badly (bench/RECIPE_NOTES.md). The test split
takes no part: the measurements never see it.

The pretrained head's mean confidence says something about similarity to ImageNet only when that
head is ImageNet's 1000-class one; for other heads it is reported as unused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from pipeline.core.sessions import ort_session
from pipeline.surgery import make_plan
from pipeline.train import fastpath
from pipeline.train.features import any_input_size
from pipeline.train.solve import LINEAR_MAX_EVALUATIONS, fit_linear, is_linear_head

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.core.samples import DataSplit
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Preprocess

SMALL_PER_CLASS = 100  # "small" data, as the transfer-learning notes put it
SIMILAR_CONFIDENCE = 0.25  # mean top-1 ImageNet probability above which data looks ImageNet-like
IMAGENET_CLASSES = 1000
UNLIKE_PROBE = 0.6  # probe validation accuracy below which large data trains every layer


@dataclass(frozen=True)
class AutoEvidence:
    """What `auto` measured on the validation split; written to run.json."""

    per_class: float  # training images per class
    probe_val_acc: float  # linear head on frozen features
    # The run's fine-tune at its checkpoint, once trained (`settle`); None before, or if not run.
    finetune_val_acc: float | None = None
    finetune_blocks: int | None = None  # None with finetune_val_acc: every layer trained
    confidence: float | None = None  # ImageNet head's mean top-1 probability (1000-class only)
    head_classes: int = IMAGENET_CLASSES  # classes of the pretrained head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def blocks_to_tune(per_class: float, num_blocks: int) -> int:
    """Top blocks `auto` fine-tunes: a few for small data, more for large."""
    return max(1, num_blocks // 4) if per_class < SMALL_PER_CLASS else max(2, num_blocks // 2)


def choose_strategy(evidence: AutoEvidence, *, num_blocks: int) -> tuple[str, int | None, str]:
    """(strategy, unfreeze, one-line reason with the numbers) from the measurements."""
    small = evidence.per_class < SMALL_PER_CLASS
    size = f"{evidence.per_class:.0f} training images per class"
    probe = f"probe {evidence.probe_val_acc:.3f}"
    if evidence.confidence is not None:
        similarity = f"ImageNet head's mean confidence {evidence.confidence:.2f}"
    else:
        similarity = (
            f"the pretrained head has {evidence.head_classes} classes, not ImageNet's "
            f"{IMAGENET_CLASSES}: its confidence is not used"
        )
    if math.isnan(evidence.probe_val_acc):
        return _rule_of_thumb(
            evidence, small=small, size=size, similarity=similarity, num_blocks=num_blocks
        )
    measured = f"validation accuracy: {probe}; {size}; {similarity}"
    then = "then keep it or the probe's head, whichever scores higher on validation"
    if not small and evidence.probe_val_acc < UNLIKE_PROBE:
        return "full", None, f"{measured}: the features fit badly, train every layer, {then}"
    k = blocks_to_tune(evidence.per_class, num_blocks)
    return "finetune", k, f"{measured}: fine-tune the top {k} blocks, {then}"


def settle(
    evidence: AutoEvidence, *, unfreeze: int | None, val_acc: float
) -> tuple[AutoEvidence, bool, str]:
    """After `auto`'s fine-tune: (evidence with its figure, keep the probe instead?, one line why).

    The fine-tune's checkpoint is kept when its validation accuracy reaches the probe's; else the
    probe's head on the frozen pretrained backbone scores higher on the same images and is kept.
    """
    settled = dataclasses.replace(evidence, finetune_val_acc=val_acc, finetune_blocks=unfreeze)
    trained = f"the top {unfreeze} blocks" if unfreeze else "every layer"
    figures = (
        f"validation accuracy: fine-tuning {trained} {val_acc:.3f}, "
        f"probe {evidence.probe_val_acc:.3f}"
    )
    if val_acc >= evidence.probe_val_acc:
        return settled, False, f"{figures}: the fine-tune is kept"
    return settled, True, f"{figures}: the probe's head on frozen features is kept"


def _rule_of_thumb(
    evidence: AutoEvidence, *, small: bool, size: str, similarity: str, num_blocks: int
) -> tuple[str, int | None, str]:
    """No validation split to measure on: size x ImageNet similarity (the confidence, if usable)."""
    similar = evidence.confidence is not None and evidence.confidence >= SIMILAR_CONFIDENCE
    why = f"no validation images to measure on; {size}; {similarity}"
    if small and similar:
        return "feature", None, f"{why}: train only a new head on frozen features"
    k = blocks_to_tune(evidence.per_class, num_blocks)
    if small or similar:
        return "finetune", k, f"{why}: fine-tune the top {k} blocks"
    return "full", None, f"{why}: fine-tune every layer from the pretrained start"


def imagenet_confidence(onnx_model: Any, *, input_name: str, batch: Any, output_kind: str) -> float:
    """Mean top-1 probability of the pretrained head on a batch: a cheap similarity estimate."""
    scores = ort_session(any_input_size(onnx_model)).run(
        None, {input_name: batch.astype(np.float32)}
    )[0]
    scores = scores.reshape(scores.shape[0], -1)
    if not output_kind.startswith("probabilities"):
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    return float(scores.max(1).mean())


def measure(
    *,
    imported: Any,
    adapted: nn.Module,
    split: DataSplit,
    preprocess: Preprocess,
    config: TrainConfig,
    cache_dir: Path,
    model_sha256: str,
    confidence: float | None,
    log: Callable[[str], None] = print,
) -> AutoEvidence:
    """The probe, scored on the validation split.

    Works on a copy of `adapted` and on a split without its test part.
    """
    blind = dataclasses.replace(split, test=[])  # nothing below can read the test split
    per_class = len(split.train) / max(1, len(split.class_names))
    probe_model = copy.deepcopy(adapted)
    setup = fastpath.prepare(
        strategy="feature",
        augment="none",
        imported=imported,
        adapted=probe_model,
        plan=make_plan(probe_model, "feature"),
        split=blind,
        preprocess=preprocess,
        config=config,
        cache_dir=cache_dir,
        model_sha256=model_sha256,
        log=_quiet,
    )
    if setup.head_features is None:  # no cacheable feature tensor: the rule of thumb decides
        probe_acc = float("nan")
    else:
        probe_acc = _probe_accuracy(probe_model, imported, len(split.class_names), setup)
    log(f"auto: probe validation accuracy {probe_acc:.3f}")
    return AutoEvidence(
        per_class=per_class,
        probe_val_acc=probe_acc,
        confidence=confidence,
        head_classes=imported.probe.num_classes,
    )


def _quiet(_: str) -> None:
    """The probe's own steps stay out of the run's log: only its figure is reported."""


def _probe_accuracy(
    probe_model: nn.Module, imported: Any, num_classes: int, setup: fastpath.TrainingSetup
) -> float:
    """The best validation accuracy of a linear head solved on the cached features."""
    # The probe is a linear head, whatever head the run trains (--hidden).
    linear = (
        probe_model.head[0]
        if is_linear_head(probe_model.head)
        else nn.Linear(imported.probe.feature_dim, num_classes)
    )
    solved = fit_linear(
        linear,
        train=setup.head_features[0],
        val=setup.head_features[1],
        max_evaluations=LINEAR_MAX_EVALUATIONS,
        log=_quiet,
    )
    return max(c.val_acc for c in solved.candidates)
