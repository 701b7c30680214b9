"""The `auto` strategy: what to freeze, decided from measurements on the validation split.

Two cheap measurements replace the rule of thumb's guesses:
- the probe: a linear head solved on frozen, cached features (pipeline.solve), seconds;
- a short fine-tune of the top blocks on the cached frozen prefix, starting from the probe's head
  (fastai's "head first, then unfreeze"), where the training split is small enough for it.
Fine-tuning is chosen when it beats the probe on validation by a margin; large data the probe
does badly on trains every layer. The test split takes no part: the measurements never see it.

The pretrained head's mean confidence says something about similarity to ImageNet only when that
head is ImageNet's 1000-class one; for other heads it is reported as unused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from pipeline.data import DataSplit
    from pipeline.train import TrainConfig
    from zoo.catalog import Preprocess

SMALL_PER_CLASS = 100  # "small" data, as the transfer-learning notes put it
SIMILAR_CONFIDENCE = 0.25  # mean top-1 ImageNet probability above which data looks ImageNet-like
IMAGENET_CLASSES = 1000
FINETUNE_MARGIN = 0.02  # validation accuracy fine-tuning must add over the probe to be chosen
UNLIKE_PROBE = 0.6  # probe validation accuracy below which large data trains every layer
MEASURE_EPOCHS = 4  # epochs of the short fine-tune
MEASURE_MAX_TRAIN = 5000  # beyond this many training images the short fine-tune is skipped


@dataclass(frozen=True)
class AutoEvidence:
    """What `auto` measured on the validation split; written to run.json."""

    per_class: float  # training images per class
    probe_val_acc: float  # linear head on frozen features
    finetune_val_acc: float | None = None  # short fine-tune of the top `finetune_blocks`
    finetune_blocks: int | None = None
    confidence: float | None = None  # ImageNet head's mean top-1 probability (1000-class only)
    head_classes: int = IMAGENET_CLASSES  # classes of the pretrained head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measured_blocks(per_class: float, num_blocks: int) -> int:
    """Top blocks the short fine-tune trains: a few for small data, more for large."""
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
    if evidence.finetune_val_acc is not None:
        k = evidence.finetune_blocks
        measured = (
            f"validation accuracy: {probe}, fine-tuning the top {k} blocks "
            f"{evidence.finetune_val_acc:.3f}; {size}; {similarity}"
        )
        if evidence.finetune_val_acc >= evidence.probe_val_acc + FINETUNE_MARGIN:
            if not small and evidence.probe_val_acc < UNLIKE_PROBE:
                return (
                    "full",
                    None,
                    f"{measured}: fine-tuning helps and the features fit badly, train every layer",
                )
            return "finetune", k, f"{measured}: fine-tune the top {k} blocks"
        return "feature", None, f"{measured}: fine-tuning adds too little, train only a new head"
    # Too much data to measure a fine-tune quickly: the rule of thumb, on the measured probe.
    if not small and evidence.probe_val_acc < UNLIKE_PROBE:
        return (
            "full",
            None,
            f"validation accuracy: {probe} on {size} ({similarity}): train every layer",
        )
    k = max(2, num_blocks // 2)
    return (
        "finetune",
        k,
        f"validation accuracy: {probe} on {size} ({similarity}): fine-tune the top {k} blocks",
    )


def _rule_of_thumb(
    evidence: AutoEvidence, *, small: bool, size: str, similarity: str, num_blocks: int
) -> tuple[str, int | None, str]:
    """No validation split to measure on: size x ImageNet similarity (the confidence, if usable)."""
    similar = evidence.confidence is not None and evidence.confidence >= SIMILAR_CONFIDENCE
    why = f"no validation images to measure on; {size}; {similarity}"
    if small and similar:
        return "feature", None, f"{why}: train only a new head on frozen features"
    k = max(1, num_blocks // 4) if small else max(2, num_blocks // 2)
    if small or similar:
        return "finetune", k, f"{why}: fine-tune the top {k} blocks"
    return "full", None, f"{why}: fine-tune every layer from the pretrained start"


def imagenet_confidence(onnx_model: Any, *, input_name: str, batch: Any, output_kind: str) -> float:
    """Mean top-1 probability of the pretrained head on a batch: a cheap similarity estimate."""
    import numpy as np

    from pipeline.features import any_input_size, ort_session

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
    num_blocks: int,
    confidence: float | None,
    log: Callable[[str], None] = print,
) -> AutoEvidence:
    """The probe and, budget allowing, a short fine-tune, both scored on the validation split.

    Works on copies of `adapted` and on a split without its test part.
    """
    from pipeline import fastpath
    from pipeline.solve import fit_linear, is_linear_head
    from pipeline.surgery.plan import make_plan
    from pipeline.train import fit

    blind = dataclasses.replace(split, test=[])  # nothing below can read the test split
    per_class = len(split.train) / max(1, len(split.class_names))
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    common = dict(
        imported=imported,
        split=blind,
        preprocess=preprocess,
        config=config,
        cache_dir=cache_dir,
        model_sha256=model_sha256,
        log=quiet,
    )
    probe_model = copy.deepcopy(adapted)
    setup = fastpath.prepare(
        strategy="feature",
        augment="none",
        adapted=probe_model,
        plan=make_plan(probe_model, "feature"),
        **common,
    )
    if setup.head_features is None:  # no cacheable feature tensor: the rule of thumb decides
        probe_acc = float("nan")
    else:
        from torch import nn

        # The probe is a linear head; a --hidden head keeps its own initial weights for the fine-tune.
        linear = (
            probe_model.head[0]
            if is_linear_head(probe_model.head)
            else nn.Linear(imported.probe.feature_dim, len(split.class_names))
        )
        solved = fit_linear(
            linear,
            train=setup.head_features[0],
            val=setup.head_features[1],
            max_evaluations=1000,
            log=quiet,
        )
        probe_acc = max(c.val_acc for c in solved.candidates)
    evidence = AutoEvidence(
        per_class=per_class,
        probe_val_acc=probe_acc,
        confidence=confidence,
        head_classes=imported.probe.num_classes,
    )
    if len(split.train) > MEASURE_MAX_TRAIN or not split.val or probe_acc != probe_acc:
        return evidence
    k = measured_blocks(per_class, num_blocks)
    tuned = copy.deepcopy(probe_model)  # starts from the probe's head: head first, then unfreeze
    plan = make_plan(tuned, "finetune", unfreeze=k)
    short = dataclasses.replace(config, epochs=MEASURE_EPOCHS, patience=MEASURE_EPOCHS)
    setup = fastpath.prepare(
        strategy="finetune", augment="none", adapted=tuned, plan=plan, **{**common, "config": short}
    )
    log(
        f"auto: probe validation accuracy {probe_acc:.3f}; measuring a short fine-tune of the top {k} blocks"
    )
    with tempfile.TemporaryDirectory(prefix="zoo-auto-") as scratch:
        state = fit(
            setup.model,
            setup.plan,
            make_train_loader=setup.make_train_loader,
            val_loader=setup.val_loader,
            config=short,
            run_dir=Path(scratch),
            saved_model=tuned,
            log=quiet,
        )
    tuned_acc = state.history[state.best_epoch - 1].val_acc if state.best_epoch else probe_acc
    return dataclasses.replace(evidence, finetune_val_acc=tuned_acc, finetune_blocks=k)
