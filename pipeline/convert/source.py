"""The model a run adapts: named, the latest fetched, or the one a resumed run started from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import runs
from pipeline.core.options import AdaptOptions
from pipeline.core.record import RunRecord, SourceRecord
from pipeline.core.rundir import RunDir
from zoo.cache import open_or_build
from zoo.catalog import Preprocess
from zoo.errors import NotFound, ZooError
from zoo.preprocess import model_preprocess
from zoo.workspace import Workspace


@dataclass
class OpenedSource:
    """The model a run adapts, and what is known of it before the run directory is claimed."""

    onnx_path: Path
    card: dict[str, Any]
    name: str
    record: SourceRecord  # run.json's source: name, path, sha256, url
    native: Preprocess  # the model's own preprocessing (with --preprocess and friends applied)

    @property
    def sha256(self) -> str:
        return self.card.get("sha256") or ""


def _named_or_latest(
    model_ref: str | None, *, workspace: Workspace, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any], str]:
    """The model to adapt (the most recently fetched when none is named): path, card, name."""
    if model_ref is None:
        latest = workspace.latest()
        if latest is None:
            raise NotFound(
                f"no model in {workspace.models_dir} yet; fetch one first, e.g. `zoo fetch efficientnet-lite0` (works offline)"
            )
        model_ref = latest.name
        log(f"using {model_ref}, the model fetched most recently into {workspace.models_dir}")
    onnx_path, card = open_or_build(model_ref, models_dir=workspace.models_dir, catalog=workspace.catalog)  # fmt: skip
    return onnx_path, card, card.get("name", Path(model_ref).stem)


def _resumed(
    previous: RunRecord, *, run_dir: Path, workspace: Workspace, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any], str]:
    """The model a run started from (its recorded sha256), never merely the latest fetched."""
    source = previous.source
    if not (source.name or source.path or source.sha256):
        raise ZooError(
            f"{RunDir(run_dir).record_file} does not say which model the run trained; start a new run"
        )
    opened = runs.open_source(
        source, models_dir=workspace.models_dir, catalog=workspace.catalog, run_dir=run_dir
    )
    name = source.name or opened.card.get("name") or Path(opened.path).stem
    sha256 = opened.card.get("sha256") or ""
    where = (
        ""
        if Path(opened.path).parent.name != "blobs"
        else f" (from its blob: {name} now names another file)"
    )
    log(f"resuming with {name} (sha256 {sha256[:12]}…), the model this run started from{where}")
    return opened.path, opened.card, name


def open_source(
    options: AdaptOptions,
    previous: RunRecord | None,
    *,
    workspace: Workspace,
    log: Callable[[str], None],
) -> OpenedSource:
    """The model to adapt and its preprocessing: known before a run directory is claimed, so that
    a model nobody said how to feed leaves nothing behind."""
    if previous is not None:
        onnx_path, card, name = _resumed(
            previous, run_dir=options.out, workspace=workspace, log=log
        )
    else:
        onnx_path, card, name = _named_or_latest(options.model, workspace=workspace, log=log)
    native = model_preprocess(
        card, onnx_path, catalog=workspace.catalog, request=options.preprocess
    )
    return OpenedSource(onnx_path, card, name, runs.source_record(onnx_path, card, name), native)
