"""Data: `check` a data source for its own problems before training on it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from zoo.api._common import CatalogLike, Log, PathLike, catalog_of, logger
from zoo.api.models import Model, workspace_of
from zoo.options import CHECK, checked

if TYPE_CHECKING:
    from pipeline.data.check import DataCheck


def check(
    data: PathLike,
    model: Model | PathLike | None = None,
    *,
    seed: int = 0,
    strict: bool = False,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
    log: Log | None = None,
    progress: bool | None = None,
) -> DataCheck:
    """Duplicates (exact and near, within and across splits), likely label errors, class balance,
    images too small or of the wrong colour, classes too small to split: on the split that
    `zoo adapt --seed` makes, with `model`'s frozen features (default: the bundled
    EfficientNet-Lite0).

    >>> found = zoo.check("photos/")  # doctest: +SKIP
    >>> found.cross_split(), [s.ref for s in found.suspects[:3]]  # doctest: +SKIP
    ({'train-test': 2}, ['photos/ants/0013.jpg', ...])
    """
    from pipeline.check import CheckOptions, check_data
    from pipeline.core.progress import showing
    from zoo.console import stage_bar_factory
    from zoo.workspace import Workspace

    values = checked(
        {"data": os.fspath(data), "seed": seed, "strict": strict}, CHECK, command="zoo.check"
    )
    reference = (
        model.name
        if isinstance(model, Model)
        else (os.fspath(model) if model is not None else None)
    )
    workspace = Workspace.at(workspace_of(models_dir, model), catalog_of(catalog))
    with showing(stage_bar_factory() if progress else None):
        return check_data(
            CheckOptions(model=reference, **values), workspace=workspace, log=logger(log)
        )
