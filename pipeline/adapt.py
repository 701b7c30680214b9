"""`zoo adapt`: a fetched zoo model, a data source and a strategy in; a run directory out.

The conductor: each step is one stage's function, in the order data flows (pipeline/__init__.py).

    options, previous = previous_run(...)        core     --resume reads the run's own options
    source = open_source(...)                    convert  the model and its preprocessing
    run_dir, split = shared_run_dir(...)         data     the split, the run directory claimed
    built = build_checked_model(...)             surgery  imported, new head, input size checked
    trained = train_run(...)                     train    choose, train or solve, settle `auto`
    scored = final_evaluation(...)               train    the best weights on the held-out split
    fit_trust(...)                               train    calibration and the unknown threshold
    metrics = write_results(...)                 report   plots, metrics, predictions, report.html
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.check import check_at_start
from pipeline.convert.source import open_source
from pipeline.core.device import hold_freed_memory
from pipeline.core.distributed import SINGLE, DistContext
from pipeline.core.options import AdaptOptions, previous_run
from pipeline.core.progress import showing
from pipeline.core.results import Metrics
from pipeline.core.samples import DataSplit
from pipeline.data.prepare import prepare_data, resolve_preprocess, shared_run_dir
from pipeline.report.results import write_results
from pipeline.surgery.build import BuiltModel, build_checked_model
from pipeline.surgery.strategies import strategy_names
from pipeline.train.grouping import split_grouper
from pipeline.train.loop import count_trainable, resolve_device
from pipeline.train.rank import pick_bundled
from pipeline.train.run import RunContext, Trained, final_evaluation, train_run
from pipeline.train.strategy_choice import AUTO
from pipeline.train.trust import fit_trust
from zoo.catalog import Catalog
from zoo.console import stage_bar_factory
from zoo.workspace import Workspace

__all__ = ["STRATEGIES", "AdaptOptions", "AdaptResult", "adapt", "prepare_data"]

# What --strategy takes: `auto`, then the registered strategies (zoo.options writes them out).
STRATEGIES = (AUTO, *strategy_names())


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


class _Laps:
    """Seconds spent in each stage of a run, for run.json's "timings" (benchmarks read them)."""

    def __init__(self, started: float) -> None:
        self.last = started
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> dict[str, float]:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 2)
        self.last = now
        return self.seconds


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
    workspace = Workspace.at(models_dir, catalog)
    with showing(stage_bar_factory() if progress else None):
        return _adapt(options, workspace, log=log, progress=progress, split=split, dist=dist or SINGLE)  # fmt: skip


def _import_libraries() -> None:
    """Import what every run needs before the first stage, so that run.json's timings give each
    stage its own work: onnx2torch brings torchvision and, through it, torch._dynamo (about 3 s
    of a process's start-up that no cache can save)."""
    import onnx2torch  # noqa: F401
    import onnxruntime  # noqa: F401


def _open_run(
    options: AdaptOptions,
    workspace: Workspace,
    split: DataSplit | None,
    *,
    log: Callable[[str], None],
    dist: DistContext,  # fmt: skip
) -> RunContext:
    """The model, the split and the run directory: everything known before the model is built."""
    options, previous = previous_run(options, dist)
    if options.model is None and previous is None and workspace.latest() is None:
        # Nothing named, nothing fetched: the bundled model that probes best on these images.
        model = pick_bundled(data=options.data, seed=options.seed, strict=options.strict, workspace=workspace, log=log)  # fmt: skip
        options = dataclasses.replace(options, model=dist.broadcast_object(model))
    source = open_source(options, previous, workspace=workspace, log=log)
    grouper = split_grouper(workspace, log)  # duplicates kept inside one part of the split
    run_dir, split = shared_run_dir(options, source.record, split, workspace.models_dir, dist=dist, log=log, group_by=grouper)  # fmt: skip
    return RunContext(options, previous, source, run_dir, split, workspace, log, dist)


def _build(run: RunContext) -> BuiltModel:
    """The adapted model, at the size the run trains at (a resumed run keeps what it trained with)."""
    options, source = run.options, run.source
    if run.previous and run.previous.preprocess:
        preprocess = run.previous.preprocess
    else:
        preprocess = resolve_preprocess(source.native, run.split, options.image_size)
    return build_checked_model(
        source.onnx_path,
        name=source.name,
        native=source.native,
        preprocess=preprocess,
        sized=options.image_size is not None,
        num_classes=len(run.split.class_names),
        hidden=options.hidden,
        dropout=options.dropout,
        seed=options.seed,
        import_cache=run.workspace.imports_dir,
        log=run.log,
    )


def _adapt(
    options: AdaptOptions,
    workspace: Workspace,
    *,
    log: Callable[[str], None],
    progress: bool,
    split: DataSplit | None,
    dist: DistContext,  # fmt: skip
) -> AdaptResult | None:
    started = time.perf_counter()
    laps = _Laps(started)
    hold_freed_memory()  # each training step reuses what the last one freed
    _import_libraries()
    laps("imports")
    run = _open_run(options, workspace, split, log=log, dist=dist)
    laps("data")
    device = resolve_device(run.options.device)
    built = _build(run)
    check_at_start(run, built)  # the data's own problems: RUN/check.json, and the log lines
    laps("model")
    trained = train_run(run, built, device, laps=laps, progress=progress)
    if trained is None:
        return None  # a worker whose part ended with the shared features
    laps("train")
    metrics_split, scored = final_evaluation(trained.setup, run.split, config=trained.config, log=log)  # fmt: skip
    # Calibration and the unknown threshold, recorded with run.json's next save.
    fit_trust(trained.setup, record=trained.record, held_out_split=metrics_split, keep=run.options.keep, config=trained.config, log=log)  # fmt: skip
    laps("evaluate")
    if not dist.is_main:
        return None  # the metrics are the main worker's to write and report
    seconds = time.perf_counter() - started
    metrics = write_results(run, trained, scored, metrics_split, seconds=seconds)
    return _result(run, trained, metrics, device=device, seconds=seconds)


def _result(
    run: RunContext, trained: Trained, metrics: Metrics, *, device: str, seconds: float
) -> AdaptResult:
    state = trained.state
    return AdaptResult(
        run_dir=run.run_dir,
        model_name=run.source.name,
        strategy=trained.choice.strategy,
        strategy_reason=trained.choice.reason,
        device=device,
        fast_path=trained.setup.description,
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        stopped=state.stopped,
        seconds=seconds,
        trainable_params=max(
            (r.trainable_params for r in state.history), default=count_trainable(trained.adapted)
        ),
        metrics=metrics,
        history=state.history,
    )
