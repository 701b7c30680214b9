"""Training: `adapt` one model to your images (in this process, or on workers), `compare` strategies."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.api._common import (
    CatalogLike,
    Log,
    PathLike,
    PreprocessLike,
    catalog_file,
    catalog_of,
    logger,
    preprocess_flags,
    preprocess_request,
    silent,
)
from zoo.api.models import Model, workspace_of
from zoo.api.runs import Run
from zoo.errors import InvalidOption
from zoo.options import ADAPT, COMPARE, LAUNCH, PREPROCESS, checked, command_line

if TYPE_CHECKING:
    from pipeline.adapt import AdaptOptions
    from pipeline.compare import ComparisonResult
    from pipeline.core.distributed import Launch


def _model_ref(model: Model | PathLike | None) -> str | None:
    """The workspace name (of a fetched Model) or path that pipeline.adapt opens."""
    if isinstance(model, Model):
        return model.name
    return os.fspath(model) if model is not None else None


def adapt(
    model: Model | PathLike | None = None,
    *,
    data: PathLike,
    classes: int | None = None,
    strategy: str = "auto",
    epochs: int | None = None,
    models_dir: PathLike | None = None,
    out: PathLike | None = None,
    progress: bool | None = None,
    log: Log | None = None,
    catalog: CatalogLike = None,
    preprocess: PreprocessLike = None,
    worker_argv: Sequence[str] | None = None,
    **options: Any,
) -> Run:
    """Fine-tune `model` (default: the latest fetched) on `data` and return the finished run.

    `options` are those of `zoo adapt` by their Python names, with its defaults: unfreeze,
    batch_size, lr, optimizer, patience, augment, flip, image_size, device, seed,
    train_per_class, hidden, dropout, resume, nproc, sync_bn, ... (InvalidOption for others).
    With nproc or nnodes above 1, workers started by torch's launcher run `zoo adapt` with
    `worker_argv` (default: a command line made of these arguments) and print as it does.

    >>> run = zoo.adapt(zoo.fetch("efficientnet-lite0"), data="builtin:digits", epochs=2)  # doctest: +SKIP
    >>> run.metrics.accuracy  # doctest: +SKIP
    0.87
    """
    from pipeline.adapt import AdaptOptions
    from pipeline.core.distributed import Launch

    given = dict(data=data, classes=classes, strategy=strategy, epochs=epochs, out=out, **options)
    values = checked(given, ADAPT, command="zoo.adapt")
    launch = Launch(**{name: values.pop(name) for name in LAUNCH})
    sync_bn = values.pop("sync_bn")
    where = workspace_of(models_dir, model)
    request = AdaptOptions(
        model=_model_ref(model), preprocess=preprocess_request(preprocess), **values
    )
    if launch.requested:
        argv = worker_argv or _worker_argv(
            request, sync_bn=sync_bn, models_dir=where, catalog=catalog
        )
        return _launched(request, launch, argv=argv, models_dir=where, catalog=catalog)
    return _adapted_here(
        request, sync_bn=sync_bn, models_dir=where, catalog=catalog, log=log, progress=progress
    )


def _adapted_here(
    options: AdaptOptions,
    *,
    sync_bn: bool,
    models_dir: Path,
    catalog: CatalogLike,
    log: Log | None,
    progress: bool | None,
) -> Run:
    """The run trained by this process: alone, or as one worker of a distributed run.

    Only rank 0 holds the result; the Run of another worker has no directory to give.
    """
    from pipeline.adapt import adapt as adapt_run
    from pipeline.core import distributed

    dist = distributed.init_from_env(device=options.device, sync_bn=sync_bn)
    try:
        with distributed.peers_watched(dist):
            result = adapt_run(
                options,
                models_dir=models_dir,
                catalog=catalog_of(catalog),
                log=logger(log) if dist.is_main else silent,
                progress=bool(progress) and dist.is_main,
                dist=dist,
            )
    finally:
        distributed.shutdown(dist)
    run_dir = result.run_dir if result is not None else None
    return Run(run_dir, models_dir=models_dir, catalog=catalog, summary=result)


def _launched(
    options: AdaptOptions,
    launch: Launch,
    *,
    argv: Sequence[str],
    models_dir: Path,
    catalog: CatalogLike,
) -> Run:
    """Start the workers, wait for them, and open the run that rank 0 wrote (when it is here)."""
    from pipeline.core import distributed, runs

    before = set(runs.list_runs(models_dir))
    distributed.launch(launch, argv=list(argv), out=options.out)
    if options.out is not None:
        return Run(options.out, models_dir=models_dir, catalog=catalog)
    new = [run for run in runs.list_runs(models_dir) if run not in before]
    # On a machine other than node 0 the run directory is node 0's: nothing new here.
    return Run(new[-1] if new else None, models_dir=models_dir, catalog=catalog)


def _worker_argv(
    options: AdaptOptions, *, sync_bn: bool, models_dir: Path, catalog: CatalogLike
) -> list[str]:
    """The `zoo adapt` command line that repeats `options` in each worker process."""
    if catalog is not None and catalog_file(catalog) is None:
        raise InvalidOption(
            "workers of a distributed run read the catalog from a file; pass catalog= as a path"
        )
    argv = ["--models-dir", str(models_dir)]
    if catalog_file(catalog):
        argv += ["--catalog", str(catalog_file(catalog))]
    values = {**dataclasses.asdict(options), "sync_bn": sync_bn}
    argv += ["adapt", *command_line(values, (o for o in ADAPT if o.name not in LAUNCH))]
    argv += command_line(preprocess_flags(options.preprocess), PREPROCESS)
    return argv + (["--", options.model] if options.model else [])


def compare(
    model: Model | PathLike | None = None,
    *,
    data: PathLike,
    strategies: str | Sequence[str] = ("scratch", "feature", "finetune", "gradual"),
    models_dir: PathLike | None = None,
    out: PathLike | None = None,
    progress: bool | None = None,
    log: Log | None = None,
    catalog: CatalogLike = None,
    preprocess: PreprocessLike = None,
    **options: Any,
) -> ComparisonResult:
    """Train several strategies on one split with the same options; a table and plot side by side.

    `options` are the training options of `zoo.adapt` (not resume nor the distributed ones).

    >>> result = zoo.compare(data="builtin:digits", strategies="feature,finetune", epochs=3)  # doctest: +SKIP
    >>> [row["test_accuracy"] for row in result.rows()]  # doctest: +SKIP
    [0.91, 0.88]
    """
    from pipeline.adapt import AdaptOptions
    from pipeline.compare import compare as compare_strategies
    from pipeline.compare import parse_strategies

    values = checked(dict(data=data, out=out, **options), COMPARE, command="zoo.compare")
    names = parse_strategies(strategies if isinstance(strategies, str) else ",".join(strategies))
    request = AdaptOptions(
        model=_model_ref(model), preprocess=preprocess_request(preprocess), **values
    )
    return compare_strategies(
        request,
        names,
        models_dir=workspace_of(models_dir, model),
        catalog=catalog_of(catalog),
        log=logger(log),
        progress=bool(progress),
    )
