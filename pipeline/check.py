"""`zoo check`: a data source's own problems, found before anything trains on it; and the same
check at the start of `zoo adapt`, on the frozen features of the model it adapts.

    split = load_source(..., group_by=split_grouper(...))   data   duplicates kept in one part
    check = check_split(split, cache=...)                   train  files, twins, labels, balance

`zoo adapt` writes the result as RUN/check.json and logs its lines; a check that cannot run is
one line in the log, never the end of the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.rundir import RunDir
from pipeline.data.check import CHECK_FILE, DataCheck
from pipeline.data.facts import facts_dir
from pipeline.data.prepare import resolve_preprocess
from pipeline.data.sources import load_source
from pipeline.train.balance import plan_balance
from pipeline.train.check import check_split
from pipeline.train.features import FeatureCache
from pipeline.train.grouping import split_grouper
from zoo.bundled import DEFAULT_BUNDLED
from zoo.cache import open_or_build
from zoo.errors import ZooError
from zoo.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.surgery.build import BuiltModel
    from pipeline.train.run import RunContext


@dataclass(frozen=True)
class CheckOptions:
    """What `zoo check` takes."""

    data: str
    model: str | None = None  # workspace name or .onnx path; None: the bundled EfficientNet-Lite0
    seed: int = 0  # the split checked: the one `zoo adapt --seed` makes
    strict: bool = False  # refuse unreadable files instead of skipping them


def check_data(
    options: CheckOptions, *, workspace: Workspace, log: Callable[[str], None]
) -> DataCheck:
    """Load and split `options.data` as `zoo adapt` would, and check it."""
    grouper = split_grouper(workspace, log)
    split = load_source(options.data, seed=options.seed, strict=options.strict, group_by=grouper)
    if options.model is None:
        cache, name = grouper.feature_cache(), DEFAULT_BUNDLED
    else:
        cache, name = _model_cache(options.model, workspace, log)
    cache = dataclasses.replace(cache, preprocess=resolve_preprocess(cache.preprocess, split, None))
    return check_split(
        split,
        cache=cache,
        facts_dir=facts_dir(workspace.models_dir),
        model_name=name,
        split_fixed=split.given_split,
        seed=options.seed,
    )


def _model_cache(
    model: str, workspace: Workspace, log: Callable[[str], None]
) -> tuple[FeatureCache, str]:
    """The frozen backbone of a workspace model (or .onnx file), at its own preprocessing."""
    from pipeline.train.rank import native_preprocess, open_backbone

    path, card = open_or_build(model, models_dir=workspace.models_dir, catalog=workspace.catalog)
    name = card.get("name") or Path(model).stem
    return (
        FeatureCache(
            imported=open_backbone(path, name=name),
            preprocess=native_preprocess(card, path, catalog=workspace.catalog),
            cache_dir=workspace.features_dir,
            model_sha256=card.get("sha256") or "",
            log=log,
        ),
        name,
    )


def check_at_start(run: RunContext, built: BuiltModel) -> DataCheck | None:
    """`zoo adapt`'s check (a RunContext and its BuiltModel): RUN/check.json and its lines logged.

    On the adapted model's own features, which a `feature` run reads from the same cache entries.
    Only the main worker checks; a resumed run keeps the check it started with.
    """
    where = RunDir(run.run_dir).path / CHECK_FILE
    if not run.dist.is_main or (run.previous is not None and where.is_file()):
        return None
    cache = FeatureCache(
        imported=built.imported,
        preprocess=built.preprocess,
        cache_dir=run.workspace.features_dir,
        model_sha256=run.source.sha256,
        log=run.log,
    )
    try:
        check = check_split(
            run.split,
            cache=cache,
            facts_dir=facts_dir(run.workspace.models_dir),
            model_name=run.source.name,
            split_fixed=run.split.given_split,
            seed=run.options.seed,
        )
        check.save(where)
    except (ZooError, OSError, ValueError, RuntimeError) as exc:
        first = " ".join(str(exc).split())[:160]
        run.log(f"data check skipped ({type(exc).__name__}: {first}); `zoo check` runs it alone")
        return None
    for line in check.notes:
        run.log(line)
    plan = plan_balance(run.options.balance, check.balance, workers=run.dist.world_size)
    if plan.reason:
        run.log(plan.reason)
    return check
