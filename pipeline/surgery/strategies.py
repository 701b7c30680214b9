"""The training strategies, one registered `Strategy` each: what trains when, and its defaults.

Everything about a strategy is in its registration: the schedule of trainable blocks (used by the
freeze plan), the default epochs and learning-rate decay, whether it augments by default, whether
the cached fast path applies, and whether `auto` may choose it. `auto` itself is no registered
strategy: it measures, then picks one of those it may choose (pipeline.train.auto). This module
needs no torch; `zoo.options` writes the names out for `zoo --help` (tests/test_strategies.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core.registry import Registry

DEFAULT_FINETUNE_BLOCKS = 2

# A schedule maps (epoch, number of blocks, unfreeze K, every E) to how many top blocks train.
Schedule = Callable[[int, int, "int | None", int], int]


@dataclass(frozen=True)
class Strategy:
    """A training strategy: its schedule of trainable blocks and the defaults that suit it."""

    name: str
    description: str  # one line: what trains
    schedule: Schedule  # how many top blocks train at an epoch
    reinit: bool = False  # the weights start random (the architecture alone is kept)
    # --epochs when not given: the floor that small data raises (pipeline.train.strategy_choice).
    epochs: int = 10
    # --lr-decay when not given: the factor between neighbouring unfrozen blocks' learning rates.
    lr_decay: float = 1.0
    augments: bool = False  # light augmentation by default on photo data
    # What is frozen stays frozen for the whole run: onnxruntime can compute it once (or per
    # augmented batch) and torch trains only the top (pipeline.train.fastpath).
    fast_path: bool = False
    auto: bool = False  # `--strategy auto` may choose it


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(
    name: str,
    *,
    description: str,
    reinit: bool = False,
    epochs: int = 10,
    lr_decay: float = 1.0,
    augments: bool = False,
    fast_path: bool = False,
    auto: bool = False,
) -> Callable[[Schedule], Schedule]:
    """Register a strategy schedule under `name`; a second registration of the same name is refused."""
    return STRATEGIES.decorator(
        name,
        lambda schedule: Strategy(
            name,
            description,
            schedule,
            reinit=reinit,
            epochs=epochs,
            lr_decay=lr_decay,
            augments=augments,
            fast_path=fast_path,
            auto=auto,
        ),
    )


def get_strategy(name: str) -> Strategy:
    """Look up a strategy by name."""
    return STRATEGIES.lookup(name)


def strategy_names() -> list[str]:
    """Registered strategy names, in registration order."""
    return STRATEGIES.names()


def _limit(unfreeze: int | None, n_blocks: int, default: int) -> int:
    return max(0, min(n_blocks, default if unfreeze is None else unfreeze))


# Default epochs: the floor below which no run goes; small data raises it until the warm-up and
# cosine schedule get about 200 optimizer steps (pipeline.train.strategy_choice.default_epochs).
# 10 for the strategies that start from pretrained blocks, measured (bench/RECIPE_NOTES.md):
# flowers5 (600 training images, 19 steps an epoch) fine-tuning the top 4 blocks fits the training
# set by epoch 6 and peaks in validation loss at epoch 7-8 whether the schedule runs 10 or 20
# epochs (test 85.0% and 85.5%). Scratch starts from nothing and keeps 20; so does a `feature`
# head with --hidden, which trains by epochs (a linear one is solved to convergence).
# Default lr decay: the top unfrozen block learns at lr*d, the next at lr*d^2 (not below lr/100).
# Measured on built-in digits (64 px, 20 images per class, 15 epochs, finetune top 2 blocks):
# d=0.1 68% test accuracy, d=0.5 77%, d=1 83%. `full` is for data unlike ImageNet, where every
# layer must move: one rate for all (all digits, 20 epochs: 98% test accuracy).
# Augmentation: light by default where convolution layers train; `feature` solves its head on
# cached features of the unaugmented images (augmentation would defeat the cache).


@register_strategy(
    "feature",
    description="backbone frozen, only the new head trains",
    epochs=20,
    fast_path=True,
    auto=True,
)
def _feature(epoch: int, n_blocks: int, unfreeze: int | None, every: int) -> int:
    return 0


@register_strategy(
    "finetune",
    description="the head and the last K blocks train",
    lr_decay=0.5,
    augments=True,
    fast_path=True,
    auto=True,
)
def _finetune(epoch: int, n_blocks: int, unfreeze: int | None, every: int) -> int:
    return _limit(unfreeze, n_blocks, DEFAULT_FINETUNE_BLOCKS)


# The frozen part shrinks every E epochs: a prefix computed once would go stale, no fast path.
@register_strategy(
    "gradual",
    description="starts as feature; one more top block unfreezes every E epochs",
    lr_decay=0.5,
    augments=True,
)
def _gradual(epoch: int, n_blocks: int, unfreeze: int | None, every: int) -> int:
    return min(_limit(unfreeze, n_blocks, n_blocks), max(0, epoch) // max(1, every))


@register_strategy(
    "full",
    description="every weight trains from the pretrained values",
    augments=True,
    auto=True,
)
def _full(epoch: int, n_blocks: int, unfreeze: int | None, every: int) -> int:
    return n_blocks


@register_strategy(
    "scratch",
    description="same architecture, weights re-initialised, all train",
    reinit=True,
    epochs=20,
    augments=True,
)
def _scratch(epoch: int, n_blocks: int, unfreeze: int | None, every: int) -> int:
    return n_blocks
