"""Which strategy a run trains with, and the defaults that follow from it.

`resolve_strategy` takes --strategy as given, a resumed run's own choice, or what `auto` measured
on the validation split (pipeline.train.auto; never on test). Once `auto`'s fine-tune has
trained, `settle_auto` weighs it against the probe. The strategies themselves, with their
defaults, are registered in pipeline.surgery.strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pipeline.core.distributed import Workers
from pipeline.core.record import RecordedChoice
from pipeline.data.images import BUILTIN_PREFIX
from pipeline.surgery import calibrate_scales, get_strategy
from pipeline.train.auto import (
    IMAGENET_CLASSES,
    AutoEvidence,
    choose_strategy,
    imagenet_confidence,
    measure,
    settle,
)
from pipeline.train.features import preprocessed_batch

if TYPE_CHECKING:
    from torch import nn

    from pipeline.core.samples import DataSplit
    from pipeline.train.loop import TrainConfig, TrainState
    from zoo.catalog import Preprocess

AUTO = "auto"  # measures, then picks one of the registered strategies that allow it
# Epochs when --epochs is not given: the strategy's floor, raised until the warm-up and cosine
# schedule get enough optimizer steps to run their course. Measured (bench/RECIPE_NOTES.md):
# textures10 (240 images, 8 steps an epoch) lost 1.9 points on the mean of the seeds that
# fine-tune at 10 epochs (80 steps) against 20 (160).
MAX_DEFAULT_EPOCHS = 20
MIN_DEFAULT_STEPS = 200


class StrategyChoice(NamedTuple):
    """What trains, and why: given with --strategy, measured by `auto`, or kept by --resume."""

    strategy: str
    unfreeze: int | None
    reason: str
    evidence: dict[str, Any] | None  # what `auto` measured; None otherwise

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "strategy_reason": self.reason,
            "unfreeze": self.unfreeze,
            "auto": self.evidence,
        }


class Settled(NamedTuple):
    """`auto`'s choice once its fine-tune has trained."""

    choice: StrategyChoice  # what stands: the fine-tune, or `feature` for the probe's head
    keep_probe: bool  # the probe's head on the frozen pretrained backbone scored higher


def default_epochs(strategy: str, *, train_images: int, batch_size: int) -> int:
    """--epochs when not given: the strategy's floor, raised until about 200 steps (at most 20)."""
    floor = get_strategy(strategy).epochs
    steps_per_epoch = max(1, math.ceil(train_images / batch_size))
    return max(floor, min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_DEFAULT_STEPS / steps_per_epoch)))


def default_augment(strategy: str, split: DataSplit) -> str:
    """--augment when not given: light for photo data where the strategy augments, else none.

    Built-in sets like digits are not photos and stay unaugmented.
    """
    photos = not split.source.startswith(BUILTIN_PREFIX)
    return "light" if photos and get_strategy(strategy).augments else "none"


def resolve_strategy(
    *,
    strategy: str,
    unfreeze: int | None,
    resumed: RecordedChoice | None,
    imported: Any,
    adapted: nn.Module,
    split: DataSplit,
    native: Preprocess,
    preprocess: Preprocess,
    config: TrainConfig,
    num_blocks: int,
    cache_dir: Path,
    model_sha256: str,
    log: Callable[[str], None],
) -> StrategyChoice:
    """--strategy as given; `auto` measured on the validation split; a resumed run's own choice.

    `resumed` is the choice a resumed run made (None for a new run); `config` the hyperparameters
    `auto`'s probe is measured with.
    """
    if resumed is not None:  # a resumed run keeps its choice, even one `auto` made
        return StrategyChoice(*resumed)
    if strategy != AUTO:
        return StrategyChoice(strategy, unfreeze, "chosen with --strategy", None)
    confidence = None
    if imported.probe.num_classes == IMAGENET_CLASSES:
        # Judge similarity at the model's own input size: at other sizes the ImageNet head is
        # confidently wrong about almost anything (digits: 0.46 at 64 px, 0.09 at 224 px).
        confidence = imagenet_confidence(
            imported.onnx_model,
            input_name=imported.probe.input_name,
            batch=preprocessed_batch(split.train[:64], native),
            output_kind=imported.probe.output_kind,
        )
    evidence = measure(
        imported=imported,
        adapted=adapted,
        split=split,
        preprocess=preprocess,
        config=config,
        cache_dir=cache_dir,
        model_sha256=model_sha256,
        confidence=confidence,
        log=log,
    )
    chosen, unfreeze, reason = choose_strategy(evidence, num_blocks=num_blocks)
    log(f"strategy auto -> {chosen}: {reason}")
    return StrategyChoice(chosen, unfreeze, reason, evidence.to_dict())


def settles(choice: StrategyChoice) -> bool:
    """Whether the run is `auto`'s fine-tune that settles against the probe once trained."""
    evidence = choice.evidence
    return (
        evidence is not None
        and choice.strategy != "feature"
        and evidence.get("finetune_val_acc") is None
        and not math.isnan(evidence["probe_val_acc"])
    )


def settle_auto(
    choice: StrategyChoice, state: TrainState, *, dist: Workers, log: Callable[[str], None]
) -> Settled:
    """`auto`'s fine-tune against the probe on validation (pipeline.train.auto.settle).

    Every worker gets the main worker's word.
    """
    settled = None
    if dist.is_main:
        evidence = AutoEvidence(**choice.evidence)
        val_acc = state.history[state.best_epoch - 1].val_acc if state.best_epoch else -1.0
        evidence, keep_probe, why = settle(evidence, unfreeze=choice.unfreeze, val_acc=val_acc)
        log(f"auto: {why}")
        strategy, unfreeze = ("feature", None) if keep_probe else (choice.strategy, choice.unfreeze)
        reason = f"{choice.reason}; {why}"
        settled = Settled(
            StrategyChoice(strategy, unfreeze, reason, evidence.to_dict()), keep_probe
        )
    return dist.broadcast_object(settled)


def calibrate_scratch(adapted: nn.Module, split: DataSplit, preprocess: Preprocess) -> int:
    """Scale the re-initialised layers to unit variance on up to 32 training images, spread over the split."""
    samples = split.train[:: max(1, len(split.train) // 32)][:32]
    return calibrate_scales(adapted, torch.from_numpy(preprocessed_batch(samples, preprocess)))
