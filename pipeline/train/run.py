"""The training stage of one run: choose what trains, train it (or solve its head), settle `auto`,
and score the best weights on the held-out split.

`RunContext` is what every stage of one run shares once the run directory and the split are
settled; `train_run` is the whole stage, `final_evaluation` its last step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from pipeline.convert.source import OpenedSource
from pipeline.core import runs
from pipeline.core.distributed import DistContext
from pipeline.core.options import AdaptOptions
from pipeline.core.record import RecordedChoice, RunRecord
from pipeline.core.rundir import LiveRecord, RunDir
from pipeline.core.samples import DataSplit
from pipeline.data.check import class_balance
from pipeline.data.prepare import flip_for
from pipeline.surgery import discover_blocks, make_plan
from pipeline.surgery.build import BuiltModel
from pipeline.surgery.strategies import get_strategy
from pipeline.train import fastpath
from pipeline.train.balance import plan_balance
from pipeline.train.loop import EvalResult, TrainConfig, TrainState, evaluate, fit
from pipeline.train.solve import fit_head
from pipeline.train.strategy_choice import (
    StrategyChoice,
    calibrate_scratch,
    default_augment,
    default_epochs,
    resolve_strategy,
    settle_auto,
    settles,
)
from zoo.catalog import Preprocess
from zoo.console import epoch_bar_factory
from zoo.workspace import Workspace


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares once the run directory and the split are settled."""

    options: AdaptOptions
    previous: RunRecord | None  # run.json of the run being resumed; None for a new run
    source: OpenedSource
    run_dir: Path
    split: DataSplit
    workspace: Workspace
    log: Callable[[str], None]
    dist: DistContext


class Trained(NamedTuple):
    """What training left: the choice that stands, the model, its setup and its history."""

    choice: StrategyChoice
    adapted: nn.Module
    config: TrainConfig
    setup: Any  # fastpath.TrainingSetup
    state: TrainState
    record: LiveRecord


def train_config(run: RunContext, strategy: str, device: str) -> TrainConfig:
    """The hyperparameters of a run with `strategy`: the options, defaults filled in by strategy
    and, for unequal classes, by the data (pipeline.train.balance)."""
    options, split = run.options, run.split
    epochs = options.epochs or default_epochs(
        strategy, train_images=len(split.train), batch_size=options.batch_size
    )
    balance = plan_balance(options.balance, class_balance(split), workers=run.dist.world_size)
    return TrainConfig(
        epochs=epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        lr_decay=get_strategy(strategy).lr_decay if options.lr_decay is None else options.lr_decay,
        optimizer=options.optimizer,
        patience=options.patience,
        label_smoothing=options.label_smoothing,
        seed=options.seed,
        device=device,
        amp=device == "cuda",
        # oneDNN's depthwise convolutions run faster channels-last: a whole-model step of
        # EfficientNet-Lite0 on the 2-core CPU 1.7x at 224 px, 1.4x at 128 (batch 32).
        channels_last=device in ("cuda", "cpu"),
        balance=balance.mode,
        class_weights=balance.class_weights,
    )


def _choose(run: RunContext, built: BuiltModel, device: str, *, num_blocks: int) -> StrategyChoice:
    """--strategy as given, a resumed run's own choice, or `auto`'s (pipeline.train.strategy_choice)."""
    options, split = run.options, run.split
    return resolve_strategy(
        strategy=options.strategy,
        unfreeze=options.unfreeze,
        resumed=run.previous.choice if run.previous else None,
        imported=built.imported,
        adapted=built.adapted,
        split=split,
        native=run.source.native,
        preprocess=built.preprocess,
        config=train_config(run, "finetune", device),
        num_blocks=num_blocks,
        cache_dir=run.workspace.features_dir,
        model_sha256=run.source.sha256,
        log=run.log,
    )


def _freeze_plan(
    run: RunContext, adapted: nn.Module, choice: StrategyChoice, preprocess: Preprocess
) -> Any:
    """What trains at each epoch; `scratch` also re-initialises the weights here."""
    plan = make_plan(
        adapted, choice.strategy, unfreeze=choice.unfreeze, every=run.options.unfreeze_every
    )
    if plan.strategy.reinit:
        scaled = calibrate_scratch(adapted, run.split, preprocess)
        run.log(
            f"scratch: random weights, {scaled} layers scaled to unit variance on training images"
        )
    return plan


def _start_record(
    run: RunContext,
    choice: StrategyChoice,
    blocks: list[str],
    config: TrainConfig,
    built: BuiltModel,  # fmt: skip
) -> LiveRecord:
    """run.json as training starts (written by the main worker), and the line that announces it."""
    split, preprocess = run.split, built.preprocess
    started = runs.start_record(
        run.options,
        previous=run.previous,
        source=run.source.record,
        choice=RecordedChoice(*choice),
        blocks=blocks,
        config=config,
        preprocess=preprocess,
        imported=built.imported,
        split=split,
    )
    if run.dist.enabled:
        started = dataclasses.replace(started, distributed=run.dist.to_dict())
    record = LiveRecord(RunDir(run.run_dir), started, writes=run.dist.is_main)
    record.save()
    run.log(
        f"adapting {run.source.name} to {len(split.class_names)} classes ({len(split.train)} train / {len(split.val)} val / "
        f"{len(split.test)} test images, {preprocess.crop} px) with {choice.strategy} on {config.device}; run: {run.run_dir}"
    )
    return record


def _setup(
    run: RunContext,
    record: LiveRecord,
    strategy: str,
    built: BuiltModel,
    adapted: nn.Module,
    plan: Any,
    config: TrainConfig,  # fmt: skip
) -> Any:
    """Augmentation, then the fastest path for the batches (pipeline.train.fastpath)."""
    options = run.options
    augment = options.augment or default_augment(strategy, run.split)
    if options.augment is None and augment != "none":
        run.log(f"{augment} augmentation of the training images (--augment none turns it off)")
    record.update(augment=augment)
    return fastpath.prepare(
        strategy=strategy,
        augment=augment,
        flip=flip_for(options, run.split, run.log),
        imported=built.imported,
        adapted=adapted,
        plan=plan,
        split=run.split,
        preprocess=built.preprocess,
        config=config,
        cache_dir=run.workspace.features_dir,
        model_sha256=run.source.sha256,
        log=run.log,
        dist=run.dist,
    )


def _fit(
    run: RunContext,
    setup: Any,
    adapted: nn.Module,
    config: TrainConfig,
    record: LiveRecord,
    *,
    progress: bool,  # fmt: skip
) -> TrainState:
    """Train by epochs (pipeline.train.loop), or solve a head on cached features (pipeline.train.solve)."""
    if setup.head_features is not None:
        # Only the head trains, on features that never change: solve it (seconds) instead.
        solved = fit_head(
            setup.model.head,
            train=setup.head_features[0],
            val=setup.head_features[1],
            config=config,
            max_epochs=None,  # a convex solve runs to convergence, whatever --epochs says
            run_dir=run.run_dir,
            saved_model=adapted,
            log=run.log,
        )
        record.update(head_fit=solved.to_dict())
        return solved.state
    return fit(
        setup.model,
        setup.plan,
        make_train_loader=setup.make_train_loader,
        val_loader=setup.val_loader,
        config=config,
        run_dir=run.run_dir,
        resume=run.options.resume,
        saved_model=adapted,
        log=run.log,
        progress_factory=epoch_bar_factory() if progress else None,
        dist=setup.dist,
    )


def _settle(
    run: RunContext, choice: StrategyChoice, state: TrainState, record: LiveRecord
) -> tuple[StrategyChoice, bool]:
    """`auto`'s fine-tune against the probe (pipeline.train.strategy_choice), and run.json
    updated with the choice that stands."""
    choice, keep_probe = settle_auto(choice, state, dist=run.dist, log=run.log)
    record.update(choice.to_dict())
    if run.dist.is_main:  # a resume after this point continues with what was kept
        record.save()
    return choice, keep_probe


def _probe_again(
    run: RunContext,
    trained: Trained,
    built: BuiltModel,
    pretrained: nn.Module,
    device: str,
    *,
    progress: bool,  # fmt: skip
) -> Trained | None:
    """The probe's head on the pretrained weights, solved again on the cached features."""
    plan = _freeze_plan(run, pretrained, trained.choice, built.preprocess)
    config = train_config(run, "feature", device)
    trained.record.update(hyperparameters=dataclasses.asdict(config))
    setup = _setup(run, trained.record, "feature", built, pretrained, plan, config)
    if not run.dist.is_main and not setup.dist.enabled:
        return None
    state = _fit(run, setup, pretrained, config, trained.record, progress=progress)
    return trained._replace(adapted=pretrained, config=config, setup=setup, state=state)


def train_run(
    run: RunContext, built: BuiltModel, device: str, *, laps: Callable[[str], Any], progress: bool
) -> Trained | None:
    """The training stage; None on a worker whose part ends once the features are shared out."""
    blocks = discover_blocks(built.adapted)
    # Workers must agree even if their onnxruntime scores differ in the last bit.
    choice = run.dist.broadcast_object(_choose(run, built, device, num_blocks=len(blocks)))
    laps("choose")
    # `auto` compares its fine-tune with the probe's head on the pretrained weights, kept aside.
    pretrained = copy.deepcopy(built.adapted) if settles(choice) else None
    adapted = built.adapted
    plan = _freeze_plan(run, adapted, choice, built.preprocess)
    config = train_config(run, choice.strategy, device)
    record = _start_record(run, choice, [b.name for b in blocks], config, built)
    setup = _setup(run, record, choice.strategy, built, adapted, plan, config)
    record.update(timings=laps("cache"))  # filled as the run goes; run.json has them when done
    if not run.dist.is_main and not setup.dist.enabled:
        return None  # the features are shared out; the main worker trains the head on its own
    state = _fit(run, setup, adapted, config, record, progress=progress)
    trained = Trained(choice, adapted, config, setup, state, record)
    if pretrained is not None:
        choice, keep_probe = _settle(run, choice, state, record)
        trained = trained._replace(choice=choice)
        if keep_probe:
            return _probe_again(run, trained, built, pretrained, device, progress=progress)
    return trained


def final_evaluation(
    setup: Any, split: DataSplit, *, config: TrainConfig, log: Callable[[str], None]
) -> tuple[str, EvalResult]:
    """The best weights on the test split ("test"), or on validation when there is none ("val")."""
    # Without a test split (train/ + val/ folders) the validation images are all there is to report.
    metrics_split = "test" if split.test else "val"
    if metrics_split == "val":
        log(
            f"no test split in {split.source_name}: the metrics are on the {len(split.val)} validation "
            "images, which also chose the best epoch (add a test/ folder for an unbiased figure)"
        )
    scored = evaluate(
        setup.model,
        setup.test_loader if metrics_split == "test" else setup.val_loader,
        config=config,
        dist=setup.dist,
    )
    return metrics_split, scored
