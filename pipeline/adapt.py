"""`zoo adapt`: a fetched zoo model, a data source and a strategy in; a run directory out.

The stages in order: resolve the model and data, import and cut the head, choose what trains,
train (on cached onnxruntime features when the backbone is frozen and the data fixed), test, report.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import runs
from pipeline.core.record import RecordedChoice, RunRecord, SourceRecord
from pipeline.core.results import write_predictions
from pipeline.core.rundir import LiveRecord, RunDir
from pipeline.surgery.build import build_model
from pipeline.surgery.strategies import get_strategy, strategy_names
from pipeline.train.loop import TrainConfig, TrainState, count_trainable
from pipeline.train.strategy_choice import (
    AUTO,
    StrategyChoice,
    calibrate_scratch,
    default_augment,
    default_epochs,
    resolve_strategy,
    settle_auto,
    settles,
)
from zoo.catalog import Preprocess
from zoo.errors import DataError, NotFound, UnsupportedModel, ZooError

if TYPE_CHECKING:
    from torch import nn

    from pipeline.core.distributed import DistContext
    from pipeline.core.results import Metrics
    from pipeline.core.samples import DataSplit
    from pipeline.train.loop import EvalResult
    from zoo.catalog import Catalog
    from zoo.preprocess import PreprocessRequest

# What --strategy takes: `auto`, then the registered strategies (zoo.options writes them out).
STRATEGIES = (AUTO, *strategy_names())


@dataclass(frozen=True)
class AdaptOptions:
    """Everything `zoo adapt` takes; defaults are the documented ones."""

    model: str | None = None  # workspace name or .onnx path; None: the most recently fetched
    data: str = "builtin:digits"
    classes: int | None = None
    strategy: str = "auto"
    unfreeze: int | None = None
    unfreeze_every: int = 1
    # None: by strategy (default_epochs). A `feature` head on cached features is solved instead.
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 3e-4
    lr_decay: float | None = None  # None: by strategy (its registered lr_decay)
    optimizer: str = "adam"
    patience: int = 10
    label_smoothing: float = 0.0
    augment: str | None = None  # None: by strategy and data (default_augment)
    flip: bool | None = None  # horizontal flips in augmentation; None: unless the data forbids them
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    out: Path | None = None
    resume: bool = False
    strict: bool = False
    train_per_class: int | None = None
    hidden: int | None = None
    dropout: float = 0.0
    # --preprocess/--mean/--std/... over what is known of the model (a PreprocessRequest, or its
    # to_dict() when a run is resumed from run.json); None: the model's known preprocessing.
    preprocess: PreprocessRequest | Mapping[str, Any] | None = None


@dataclass
class AdaptResult:
    """What a finished run reports (also printed with --json)."""

    run_dir: Path
    model_name: str
    strategy: str
    strategy_reason: str
    device: str
    fast_path: str
    epochs_run: int
    best_epoch: int
    stopped: str
    seconds: float
    trainable_params: int
    metrics: Metrics
    history: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model": self.model_name,
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "device": self.device,
            "fast_path": self.fast_path,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
            "trainable_params": self.trainable_params,
            "test_accuracy": self.metrics.accuracy,  # on metrics_split's images
            "macro_f1": self.metrics.macro_f1,
            "test_images": self.metrics.num_images,
            "metrics_split": self.metrics.split,
        }


def _resolve_preprocess(native: Preprocess, split: DataSplit, image_size: int | None) -> Preprocess:
    """The model's own preprocessing at the size this run trains at (--image-size, else the data's)."""
    size = image_size or split.recommended_size
    return native.at_size(size) if size and size != native.crop else native


def prepare_data(options: AdaptOptions, *, run_dir: Path | None) -> DataSplit:
    """The split: reloaded from the run when resuming, else loaded, checked and maybe subsampled."""
    from pipeline.data.sources import load_source
    from pipeline.data.split import subsample_per_class

    if run_dir is not None and RunDir(run_dir).split_file.exists():
        return RunDir(run_dir).split()
    split = load_source(options.data, seed=options.seed, strict=options.strict)
    if not split.val:  # the best epoch is chosen on it
        raise DataError(
            f"no validation images in {options.data}: every class has a single image; add at "
            "least one more image per class (or a val/ folder)"
        )
    found = len(split.class_names)
    if options.classes is not None and options.classes != found:
        shown = ", ".join(split.class_names[:12]) + (" …" if found > 12 else "")
        raise DataError(
            f"--classes {options.classes} was given, but {options.data} has {found} classes ({shown}); "
            "fix --classes or the data"
        )
    if options.train_per_class:
        split = dataclasses.replace(
            split,
            train=subsample_per_class(split.train, options.train_per_class, seed=options.seed),
        )
    return split


def _check_input_size(model: nn.Module, preprocess: Preprocess, model_name: str) -> None:
    import torch

    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(2, *preprocess.input_shape()))
    except Exception as exc:
        raise UnsupportedModel(
            f"{model_name} does not accept {preprocess.crop}x{preprocess.crop} inputs ({type(exc).__name__}); "
            "drop --image-size or choose a size the model supports"
        ) from exc


def _open_source_model(
    model_ref: str | None, *, models_dir: Path, catalog: Catalog, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any], str]:
    """The model to adapt (the most recently fetched when none is named): path, card, name."""
    from zoo.workspace import latest_model, open_model

    if model_ref is None:
        latest = latest_model(models_dir)
        if latest is None:
            raise NotFound(
                f"no model in {models_dir} yet; fetch one first, e.g. `zoo fetch efficientnet-lite0` (works offline)"
            )
        model_ref = latest.name
        log(f"using {model_ref}, the model fetched most recently into {models_dir}")
    onnx_path, card = open_model(model_ref, models_dir=models_dir, catalog=catalog)
    return onnx_path, card, card.get("name", Path(model_ref).stem)


def _resumed_options(options: AdaptOptions, previous: RunRecord) -> AdaptOptions:
    """The options a run was started with, for --resume (fields this version lacks are left out)."""
    known = {f.name for f in dataclasses.fields(AdaptOptions)} - {"out", "resume"}
    recorded = {k: v for k, v in previous.options.items() if k in known}
    return dataclasses.replace(options, **recorded, resume=True, out=options.out)


def _open_resumed_model(
    previous: RunRecord,
    *,
    run_dir: Path,
    models_dir: Path,
    catalog: Catalog,
    log: Callable[[str], None],
) -> tuple[Path, dict[str, Any], str]:
    """The model a run started from (its recorded sha256), never merely the latest fetched."""
    source = previous.source
    if not (source.name or source.path or source.sha256):
        raise ZooError(
            f"{RunDir(run_dir).record_file} does not say which model the run trained; start a new run"
        )
    opened = runs.open_source(source, models_dir=models_dir, catalog=catalog, run_dir=run_dir)
    name = source.name or opened.card.get("name") or Path(opened.path).stem
    sha256 = opened.card.get("sha256") or ""
    where = (
        ""
        if Path(opened.path).parent.name != "blobs"
        else f" (from its blob: {name} now names another file)"
    )
    log(f"resuming with {name} (sha256 {sha256[:12]}…), the model this run started from{where}")
    return opened.path, opened.card, name


def _claim_run(
    options: AdaptOptions,
    *,
    split: DataSplit | None,
    models_dir: Path,
    model_name: str,
    log: Callable[[str], None],
) -> tuple[Path, DataSplit]:
    """The run directory (--out, or a new one named after model and data) with its split saved."""
    run_dir = runs.claim_out_dir(options.out, resume=options.resume) if options.out else None
    split = split or prepare_data(options, run_dir=run_dir)
    if run_dir is None:
        base = f"{runs.slug(model_name)}-{runs.slug(split.source_name)}-{len(split.class_names)}c"
        run_dir = runs.new_run_dir(models_dir, base)
    if split.skipped:
        names = ", ".join(Path(p).name for p, _ in split.skipped[:3])
        more = " …" if len(split.skipped) > 3 else ""
        log(f"skipped {len(split.skipped)} unreadable file(s): {names}{more}")
    RunDir(run_dir).write_split(split)
    return run_dir, split


def _train_config(
    options: AdaptOptions, strategy: str, device: str, *, train_images: int
) -> TrainConfig:
    """The hyperparameters of a run with `strategy`: the options, defaults filled in by strategy."""
    epochs = options.epochs or default_epochs(
        strategy, train_images=train_images, batch_size=options.batch_size
    )
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
    )


def _flip(options: AdaptOptions, split: DataSplit, log: Callable[[str], None]) -> bool:
    """Horizontal flips in augmentation: as --flip/--no-flip says, else unless the data forbids them."""
    from pipeline.data.sources import mirror_safe

    if options.flip is not None:
        return options.flip
    safe = mirror_safe(split)
    if not safe and options.augment not in (None, "none"):
        log(
            f"no horizontal flips: mirrored {split.source_name} images change class (--flip forces them)"
        )
    return safe


@dataclass
class OpenedSource:
    """The model a run adapts, and what is known of it before the run directory is claimed."""

    onnx_path: Path
    card: dict[str, Any]
    name: str
    record: SourceRecord  # run.json's source: name, path, sha256, url
    native: Preprocess  # the model's own preprocessing (with --preprocess and friends applied)


@dataclass(frozen=True)
class _Run:
    """What every stage of one run shares once the run directory and the split are settled."""

    options: AdaptOptions
    previous: RunRecord | None  # run.json of the run being resumed; None for a new run
    source: OpenedSource
    run_dir: Path
    split: DataSplit
    models_dir: Path
    log: Callable[[str], None]
    dist: DistContext

    @property
    def cache_dir(self) -> Path:
        from pipeline.core.diskcache import features_dir

        return features_dir(self.models_dir)

    @property
    def import_cache_dir(self) -> Path:
        from pipeline.core.diskcache import imports_dir

        return imports_dir(self.models_dir)


class _Laps:
    """Seconds spent in each stage of a run, for run.json's "timings" (benchmarks read them)."""

    def __init__(self, started: float) -> None:
        self.last = started
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 2)
        self.last = now


def adapt(
    options: AdaptOptions,
    *,
    models_dir: Path,
    catalog: Catalog,
    log: Callable[[str], None] = print,
    progress: bool = False,
    split: DataSplit | None = None,
    dist: DistContext | None = None,
) -> AdaptResult | None:
    """Run `zoo adapt` end to end and return its summary (None on workers other than the main one).

    Under `dist` (a worker of a distributed run) the main worker alone touches the run directory
    and hands the others what they need from it.
    """
    from pipeline.core.distributed import SINGLE
    from pipeline.core.progress import showing
    from zoo.console import stage_bar_factory

    with showing(stage_bar_factory() if progress else None):
        return _adapt(
            options,
            models_dir=models_dir,
            catalog=catalog,
            log=log,
            progress=progress,
            split=split,
            dist=dist or SINGLE,
        )


def _adapt(
    options: AdaptOptions,
    *,
    models_dir: Path,
    catalog: Catalog,
    log: Callable[[str], None],
    progress: bool,
    split: DataSplit | None,
    dist: DistContext,
) -> AdaptResult | None:
    from pipeline.core.device import hold_freed_memory
    from pipeline.surgery import discover_blocks
    from pipeline.train.loop import resolve_device

    started = time.perf_counter()
    laps = _Laps(started)
    hold_freed_memory()  # each training step reuses what the last one freed
    _import_libraries()
    laps("imports")
    models_dir = Path(models_dir)
    options, previous = _previous_run(options, dist)
    source = _open_source(options, previous, models_dir=models_dir, catalog=catalog, log=log)
    run_dir, split = _shared_run_dir(options, source, split, models_dir, dist=dist, log=log)
    run = _Run(options, previous, source, run_dir, split, models_dir, log, dist)
    laps("data")

    device = resolve_device(options.device)
    imported, adapted, preprocess = _build_checked_model(run)
    blocks = discover_blocks(adapted)
    laps("model")
    # Workers must agree even if their onnxruntime scores differ in the last bit.
    choice = dist.broadcast_object(
        _choose_strategy(run, imported, adapted, preprocess, device, num_blocks=len(blocks))
    )
    laps("choose")
    # `auto` compares its fine-tune with the probe's head on the pretrained weights, kept aside.
    pretrained = copy.deepcopy(adapted) if settles(choice) else None
    plan = _freeze_plan(run, adapted, choice, preprocess)
    config = _train_config(options, choice.strategy, device, train_images=len(split.train))
    record = _start_record(run, choice, [b.name for b in blocks], config, preprocess, imported)

    setup = _training_setup(
        run, record, choice.strategy, imported, adapted, plan, preprocess, config
    )
    laps("cache")
    record.update(timings=laps.seconds)  # filled as the run goes; run.json has them when done
    if not dist.is_main and not setup.dist.enabled:
        return None  # the features are shared out; the main worker trains the head on its own
    state = _train(run, setup, adapted, config, record, progress=progress)
    if pretrained is not None:
        choice, keep_probe = _settle(run, choice, state, record)
        # The probe's head on the pretrained weights, solved again on the cached features.
        if keep_probe:
            adapted = pretrained
            plan = _freeze_plan(run, adapted, choice, preprocess)
            config = _train_config(options, "feature", device, train_images=len(split.train))
            record.update(hyperparameters=dataclasses.asdict(config))
            setup = _training_setup(
                run, record, "feature", imported, adapted, plan, preprocess, config
            )
            if not dist.is_main and not setup.dist.enabled:
                return None
            state = _train(run, setup, adapted, config, record, progress=progress)
    laps("train")
    metrics_split, scored = final_evaluation(setup, split, config=config, log=log)
    laps("evaluate")
    if not dist.is_main:
        return None  # the metrics are the main worker's to write and report
    seconds = time.perf_counter() - started
    metrics = _write_results(run, record, state, scored, metrics_split, setup, choice, seconds)
    return AdaptResult(
        run_dir=run_dir,
        model_name=source.name,
        strategy=choice.strategy,
        strategy_reason=choice.reason,
        device=device,
        fast_path=setup.description,
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        stopped=state.stopped,
        seconds=seconds,
        trainable_params=max(
            (r.trainable_params for r in state.history), default=count_trainable(adapted)
        ),
        metrics=metrics,
        history=state.history,
    )


# --- the stages of adapt(), in the order they run ------------------------------------------------


def _import_libraries() -> None:
    """Import what every run needs before the first stage, so that run.json's timings give each
    stage its own work: onnx2torch brings torchvision and, through it, torch._dynamo (about 3 s
    of a process's start-up that no cache can save)."""
    import onnx2torch  # noqa: F401
    import onnxruntime  # noqa: F401


def _previous_run(
    options: AdaptOptions, dist: DistContext
) -> tuple[AdaptOptions, RunRecord | None]:
    """With --resume: the run's options and its run.json (read by the main worker); else None."""
    if not options.resume:
        return options, None
    if options.out is None:
        raise ZooError("--resume needs --out RUN_DIR, the run to continue")
    previous = dist.broadcast_object(RunDir(options.out).record() if dist.is_main else None)
    return _resumed_options(options, previous), previous


def _open_source(
    options: AdaptOptions,
    previous: RunRecord | None,
    *,
    models_dir: Path,
    catalog: Catalog,
    log: Callable[[str], None],
) -> OpenedSource:
    """The model to adapt and its preprocessing: known before a run directory is claimed, so that
    a model nobody said how to feed leaves nothing behind."""
    from zoo.preprocess import model_preprocess

    if previous is not None:
        onnx_path, card, name = _open_resumed_model(
            previous, run_dir=options.out, models_dir=models_dir, catalog=catalog, log=log
        )
    else:
        onnx_path, card, name = _open_source_model(
            options.model, models_dir=models_dir, catalog=catalog, log=log
        )
    native = model_preprocess(card, onnx_path, catalog=catalog, request=options.preprocess)
    return OpenedSource(onnx_path, card, name, runs.source_record(onnx_path, card, name), native)


def _shared_run_dir(
    options: AdaptOptions,
    source: OpenedSource,
    split: DataSplit | None,
    models_dir: Path,
    *,
    dist: DistContext,
    log: Callable[[str], None],
) -> tuple[Path, DataSplit]:
    """The run directory and split, claimed by the main worker and the same for all workers,
    whatever each machine's disk holds."""
    run_dir = None
    if dist.is_main:
        run_dir, split = _claim_run(
            options, split=split, models_dir=models_dir, model_name=source.name, log=log
        )
        if not options.resume:  # the model is on record before anything can interrupt the run
            RunDir(run_dir).write_record(runs.first_record(options, source=source.record))
    return dist.broadcast_object((run_dir, split))


def _build_checked_model(run: _Run) -> tuple[Any, nn.Module, Preprocess]:
    """The imported model, the adapted one (new head), and the preprocessing it trains with."""
    options, native = run.options, run.source.native
    if run.previous and run.previous.preprocess:  # a resumed run keeps what it trained with
        preprocess = run.previous.preprocess
    else:
        preprocess = _resolve_preprocess(native, run.split, options.image_size)
    imported, adapted = build_model(
        run.source.onnx_path,
        num_classes=len(run.split.class_names),
        hidden=options.hidden,
        dropout=options.dropout,
        seed=options.seed,
        import_cache=run.import_cache_dir,
    )
    # A graph that flattens to a fixed width (MNIST) takes its own size only, not the data's.
    if options.image_size is None and preprocess.crop != native.crop:
        try:
            _check_input_size(adapted, preprocess, run.source.name)
        except UnsupportedModel:
            run.log(
                f"{run.source.name} takes only {native.crop} px inputs: using them, not the data's {preprocess.crop}"
            )
            preprocess = native
    checked = imported.fidelity is not None and imported.probe.input_size == (preprocess.crop,) * 2
    if not checked:  # the fidelity check ran the graph at its own size; any other is tried here
        _check_input_size(adapted, preprocess, run.source.name)
    return imported, adapted, preprocess


def _choose_strategy(
    run: _Run,
    imported: Any,
    adapted: nn.Module,
    preprocess: Preprocess,
    device: str,
    *,
    num_blocks: int,
) -> StrategyChoice:
    """--strategy as given, a resumed run's own choice, or `auto`'s (pipeline.train.strategy_choice)."""
    options, split = run.options, run.split
    return resolve_strategy(
        strategy=options.strategy,
        unfreeze=options.unfreeze,
        previous=run.previous.to_dict() if run.previous else {},
        imported=imported,
        adapted=adapted,
        split=split,
        native=run.source.native,
        preprocess=preprocess,
        config=_train_config(options, "finetune", device, train_images=len(split.train)),
        num_blocks=num_blocks,
        cache_dir=run.cache_dir,
        model_sha256=run.source.card.get("sha256") or "",
        log=run.log,
    )


def _freeze_plan(
    run: _Run, adapted: nn.Module, choice: StrategyChoice, preprocess: Preprocess
) -> Any:
    """What trains at each epoch; `scratch` also re-initialises the weights here."""
    from pipeline.surgery import make_plan

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
    run: _Run,
    choice: StrategyChoice,
    blocks: list[str],
    config: TrainConfig,
    preprocess: Preprocess,
    imported: Any,
) -> LiveRecord:
    """run.json as training starts (written by the main worker), and the line that announces it."""
    split = run.split
    started = runs.start_record(
        run.options,
        previous=run.previous,
        source=run.source.record,
        choice=RecordedChoice(*choice),
        blocks=blocks,
        config=config,
        preprocess=preprocess,
        imported=imported,
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


def _training_setup(
    run: _Run,
    record: LiveRecord,
    strategy: str,
    imported: Any,
    adapted: nn.Module,
    plan: Any,
    preprocess: Preprocess,
    config: TrainConfig,
) -> Any:
    """Augmentation, then the fastest path for the batches (pipeline.train.fastpath)."""
    from pipeline.train import fastpath

    options = run.options
    augment = options.augment or default_augment(strategy, run.split)
    if options.augment is None and augment != "none":
        run.log(f"{augment} augmentation of the training images (--augment none turns it off)")
    record.update(augment=augment)
    return fastpath.prepare(
        strategy=strategy,
        augment=augment,
        flip=_flip(options, run.split, run.log),
        imported=imported,
        adapted=adapted,
        plan=plan,
        split=run.split,
        preprocess=preprocess,
        config=config,
        cache_dir=run.cache_dir,
        model_sha256=run.source.card.get("sha256") or "",
        log=run.log,
        dist=run.dist,
    )


def _train(
    run: _Run,
    setup: Any,
    adapted: nn.Module,
    config: TrainConfig,
    record: LiveRecord,
    *,
    progress: bool,
) -> TrainState:
    """Train by epochs (pipeline.train.loop), or solve a head on cached features (pipeline.train.solve)."""
    if setup.head_features is not None:
        # Only the head trains, on features that never change: solve it (seconds) instead.
        from pipeline.train.solve import fit_head

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
    from pipeline.train.loop import fit
    from zoo.console import epoch_bar_factory

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
    run: _Run, choice: StrategyChoice, state: TrainState, record: LiveRecord
) -> tuple[StrategyChoice, bool]:
    """`auto`'s fine-tune against the probe (pipeline.train.strategy_choice), and run.json
    updated with the choice that stands."""
    choice, keep_probe = settle_auto(choice, state, dist=run.dist, log=run.log)
    record.update(choice.to_dict())
    if run.dist.is_main:  # a resume after this point continues with what was kept
        record.save()
    return choice, keep_probe


def final_evaluation(
    setup: Any, split: DataSplit, *, config: TrainConfig, log: Callable[[str], None]
) -> tuple[str, EvalResult]:
    """The best weights on the test split ("test"), or on validation when there is none ("val")."""
    from pipeline.train.loop import evaluate

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


def _write_results(
    run: _Run,
    record: LiveRecord,
    state: TrainState,
    scored: EvalResult,
    metrics_split: str,
    setup: Any,
    choice: StrategyChoice,
    seconds: float,
) -> Metrics:
    """The plots, metrics, per-image predictions and report.html, and run.json marked done."""
    from pipeline.report.heatmaps import write_heatmaps
    from pipeline.report.html import refresh_report
    from pipeline.report.metrics import write_run_report
    from pipeline.report.predictions import image_predictions

    metrics = write_run_report(
        run.run_dir,
        history=state.history,
        labels=scored.labels.numpy(),
        scores=scored.logits.numpy(),
        class_names=run.split.class_names,
        title=f"{run.source.name} → {run.split.source_name}, {choice.strategy}",
        split=metrics_split,
        extra={"best_epoch": state.best_epoch, "strategy": choice.strategy},
    )
    held_out = run.split.test if metrics_split == "test" else run.split.val
    predictions = image_predictions(
        held_out, scored.logits, class_names=run.split.class_names, source=run.split.source
    )
    # The report's worst mistakes.
    write_predictions(RunDir(run.run_dir).predictions_file, predictions)
    record.update(
        status="done",
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped=state.stopped,
        fast_path=setup.description,
        test_accuracy=metrics.accuracy,
        metrics_split=metrics.split,
        seconds=round(seconds, 2),
    )
    record.save()
    write_heatmaps(run.run_dir, models_dir=run.models_dir, log=run.log)  # where it looked
    refresh_report(
        run.run_dir, log=run.log
    )  # report.html; a failure to draw it is logged, not raised
    return metrics
