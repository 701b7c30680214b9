"""Models as files: fetch one into the workspace, look inside it, rank several for your data."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.api._common import (
    CatalogLike,
    Log,
    PathLike,
    PreprocessLike,
    catalog_of,
    logger,
    models_dir_of,
    preprocess_request,
)
from zoo.cache import FetchResult
from zoo.errors import NotFound

if TYPE_CHECKING:
    from pipeline.core.diskcache import CacheEntry
    from pipeline.surgery.inspect import InspectReport
    from pipeline.train.rank import RankResult
    from zoo.catalog import ModelEntry


@dataclass(frozen=True)
class Model(FetchResult):
    """A model in the workspace: name, path of its model.onnx, sha256, size, where it came from."""

    @property
    def models_dir(self) -> Path:
        """The workspace it was fetched into (zoo.adapt's default for it)."""
        return self.card_path.parent.parent


def workspace_of(models_dir: PathLike | None, model: object) -> Path:
    """models_dir as given, else a fetched Model's own workspace, else $ZOO_MODELS_DIR or ./models."""
    if models_dir is None and isinstance(model, Model):
        return model.models_dir
    return models_dir_of(models_dir)


def fetch(
    source: str | os.PathLike,
    *,
    name: str | None = None,
    sha256: str | None = None,
    mirror: str | os.PathLike | None = None,
    force: bool = False,
    models_dir: PathLike | None = None,
    preprocess: PreprocessLike = None,
    catalog: CatalogLike = None,
    progress: bool | None = None,
) -> Model:
    """Fetch a model by catalog name or alias, local .onnx/.tar.gz path, or URL, checked by sha256.

    `mirror` defaults to $ZOO_MIRROR; `progress=True` shows a download bar on a terminal.

    >>> model = zoo.fetch("efficientnet-lite0")  # bundled: works offline  # doctest: +SKIP
    >>> model.path  # doctest: +SKIP
    PosixPath('models/efficientnet-lite0/model.onnx')
    """
    from zoo.cache import fetch as fetch_into

    result = fetch_into(
        os.fspath(source),
        models_dir=models_dir_of(models_dir),
        catalog=catalog_of(catalog),
        name=name,
        sha256=sha256,
        mirror=mirror if mirror is not None else os.environ.get("ZOO_MIRROR") or None,
        force=force,
        progress=bool(progress),
        preprocess=preprocess_request(preprocess),
    )
    return Model(**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)})


def inspect(
    name: str | os.PathLike | Model,
    *,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
) -> InspectReport:
    """Import a fetched model into PyTorch: its input, head, feature tensor and blocks.

    >>> zoo.inspect("efficientnet-lite0").head  # doctest: +SKIP
    """
    from pipeline.surgery.inspect import inspect_model
    from zoo.workspace import open_model

    reference = name.name if isinstance(name, Model) else name
    path, card = open_model(
        reference, models_dir=workspace_of(models_dir, name), catalog=catalog_of(catalog)
    )
    return inspect_model(path, name=card.get("name", os.fspath(reference)))


def rank(
    models: Sequence[str | Model] = (),
    *,
    data: PathLike = "builtin:digits",
    seed: int = 0,
    strict: bool = False,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
    log: Log | None = None,
    progress: bool | None = None,
) -> RankResult:
    """Rank models (default: every fetched one plus the bundled ones) by a linear probe on `data`.

    `progress=True` shows bars with the time left while images are checked and features computed.

    >>> zoo.rank(data="photos/").best.name  # doctest: +SKIP
    'efficientnet-lite0'
    """
    from pipeline.core.progress import showing
    from pipeline.train.rank import rank_models
    from zoo.console import stage_bar_factory

    with showing(stage_bar_factory() if progress else None):
        return rank_models(
            [m.name if isinstance(m, Model) else m for m in models],
            data=os.fspath(data),
            models_dir=workspace_of(models_dir, next(iter(models), None)),
            catalog=catalog_of(catalog),
            seed=seed,
            strict=strict,
            log=logger(log),
        )


def list_models(
    *, models_dir: PathLike | None = None, catalog: CatalogLike = None
) -> list[dict[str, Any]]:
    """The catalog, one row per model: name, family, opset, size, input, top-1, in_workspace.

    >>> [row["name"] for row in zoo.list_models() if row["in_workspace"]]  # doctest: +SKIP
    ['efficientnet-lite0']
    """
    from zoo.catalog import catalog_rows
    from zoo.workspace import list_workspace

    present = {m.name for m in list_workspace(models_dir_of(models_dir))}
    return catalog_rows(catalog_of(catalog), present=present)


def info(name: str, *, catalog: CatalogLike = None) -> ModelEntry:
    """One catalog entry in full (`name` may be an alias); NotFound when there is none.

    >>> zoo.info("mobilenet").name  # doctest: +SKIP
    'mobilenetv2-12'
    """
    if name.lower().endswith((".onnx", ".tar.gz", ".tgz")) or "/" in name or os.sep in name:
        raise NotFound(
            f"{name} is a file, and zoo info shows catalog entries; `zoo inspect {name}` describes "
            "a file, `zoo fetch` adds it to the workspace"
        )
    return catalog_of(catalog).resolve(name)


def cache_entries(*, models_dir: PathLike | None = None, clear: bool = False) -> list[CacheEntry]:
    """The workspace's cached features and frozen-prefix outputs, most recently used first.

    With `clear=True` they are removed (with temporaries that killed runs left) and the removed
    entries are returned. Runs compute them again when they need them.

    >>> sum(entry.bytes for entry in zoo.cache_entries())  # doctest: +SKIP
    24117248
    """
    from pipeline.core import diskcache

    where = models_dir_of(models_dir)
    found = diskcache.entries(where)
    if clear:
        diskcache.clear(where)
    return found
