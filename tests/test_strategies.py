"""The strategies: one registered `Strategy` each, the one source of their names and defaults."""

from __future__ import annotations

import pytest

from pipeline.surgery.strategies import STRATEGIES, get_strategy, register_strategy, strategy_names
from pipeline.train.auto import AutoEvidence, choose_strategy
from pipeline.train.strategy_choice import AUTO, default_augment, default_epochs


def test_the_command_line_offers_auto_and_the_registered_strategies() -> None:
    from pipeline import adapt
    from zoo import options

    # zoo.options writes the names out so that `zoo --help` imports no torch.
    assert options.STRATEGIES == (AUTO, *strategy_names()) == adapt.STRATEGIES
    assert tuple(options.STRATEGY.type.choices) == options.STRATEGIES


def test_each_strategy_is_registered_once() -> None:
    names = strategy_names()
    assert len(names) == len(set(names)) == len(STRATEGIES) and AUTO not in names
    before = dict(STRATEGIES)
    with pytest.raises(ValueError, match="strategy 'finetune' is already registered"):
        register_strategy("finetune", description="again", epochs=3)(lambda e, n, k, every: 0)
    assert dict(STRATEGIES) == before and get_strategy("finetune").epochs == 10


def test_the_registry_holds_each_strategys_defaults() -> None:
    facts = {
        name: (s.epochs, s.lr_decay, s.augments, s.fast_path, s.auto, s.reinit)
        for name, s in STRATEGIES.items()
    }
    assert facts == {
        "feature": (20, 1.0, False, True, True, False),
        "finetune": (10, 0.5, True, True, True, False),
        "gradual": (10, 0.5, True, False, False, False),
        "full": (10, 1.0, True, False, True, False),
        "scratch": (20, 1.0, True, False, False, True),
    }
    assert default_epochs("feature", train_images=100_000, batch_size=32) == 20
    assert default_epochs("gradual", train_images=100_000, batch_size=32) == 10


def test_default_augmentation_follows_the_strategy_and_the_data() -> None:
    class Split:
        def __init__(self, source: str) -> None:
            self.source = source

    photos, digits = Split("/data/flowers"), Split("builtin:digits")
    augmented = {name for name in strategy_names() if default_augment(name, photos) == "light"}
    assert augmented == {name for name, s in STRATEGIES.items() if s.augments}
    assert {default_augment(name, digits) for name in strategy_names()} == {"none"}


@pytest.mark.parametrize("per_class", [5, 99, 100, 5000])
@pytest.mark.parametrize("probe", [float("nan"), 0.1, 0.59, 0.6, 0.99])
@pytest.mark.parametrize("confidence", [None, 0.1, 0.9])
def test_auto_chooses_only_strategies_that_allow_it(
    per_class: int, probe: float, confidence: float | None
) -> None:
    evidence = AutoEvidence(per_class=per_class, probe_val_acc=probe, confidence=confidence)
    strategy, _, _ = choose_strategy(evidence, num_blocks=9)
    assert get_strategy(strategy).auto, strategy
