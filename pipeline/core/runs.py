"""Run directories: naming without overwriting, finding the latest, the run's record as it starts.

What a run directory holds, and how each file is read back, is `pipeline.core.rundir`; run.json's
fields are `pipeline.core.record.RunRecord`.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.record import (
    DataRecord,
    HeadRecord,
    RecordedChoice,
    RunRecord,
    SourceRecord,
)
from pipeline.core.rundir import RUN_FILE, RunDir
from zoo.errors import ChecksumMismatch, InvalidModelFile, NotFound, ZooError
from zoo.files import sha256_file
from zoo.workspace import BLOBS, OpenedModel, list_workspace, open_model

if TYPE_CHECKING:
    from pipeline.core.options import AdaptOptions
    from pipeline.core.samples import DataSplit
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Catalog, Preprocess
    from zoo.workspace import OpenedModel


def slug(text: str) -> str:
    """A folder-safe short name: letters, digits, '.', '-' and '_' only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned[:60] or "data"


def new_run_dir(models_dir: Path, base_name: str) -> Path:
    """MODELS_DIR/<base_name>, or <base_name>-2, -3, … when taken: a run never overwrites another."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    for index in range(1, 10_000):
        candidate = models_dir / (base_name if index == 1 else f"{base_name}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ZooError(f"too many runs named {base_name} in {models_dir}; pass --out DIR")


def claim_out_dir(out: Path, *, resume: bool) -> Path:
    """The user's --out: must be new or empty unless resuming; with --resume it must be a run."""
    out = Path(out)
    if resume:
        if not RunDir(out).record_file.exists():
            raise NotFound(
                f"{out} is not a run directory (no {RUN_FILE}); drop --resume to start a new run there"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise ZooError(
            f"{out} already holds files; choose another --out, or add --resume to continue the run there"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def list_runs(models_dir: Path) -> list[Path]:
    """Run directories in the workspace, oldest first (by run.json's modification time)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    runs = [p.parent for p in models_dir.glob(f"*/{RUN_FILE}")]
    runs += [p.parent for p in models_dir.glob(f"*/*/{RUN_FILE}")]  # runs inside comparison folders
    return sorted(set(runs), key=lambda p: (p / RUN_FILE).stat().st_mtime)


def latest_run(models_dir: Path) -> Path:
    """The most recent run in the workspace."""
    runs = [r for r in list_runs(models_dir) if RunDir(r).best_checkpoint.exists()]
    if not runs:
        raise NotFound(f"no finished run in {models_dir}; train one first with `zoo adapt`")
    return runs[-1]


def source_record(path: Path, card: dict[str, Any], name: str) -> SourceRecord:
    """run.json's `source`: the model file a run trains from, by workspace name, path and sha256."""
    return SourceRecord(
        name=name, path=str(path), sha256=card.get("sha256"), url=card.get("source_url")
    )


def open_source(
    source: SourceRecord, *, models_dir: Path, catalog: Catalog, run_dir: Path
) -> OpenedModel:
    """The very file a run was trained from, whatever was fetched since.

    Tried in order: its workspace name, any other name holding the same sha256, the path it was
    opened from, and its blob; each only when its sha256 is the recorded one (runs written
    before sha256s were recorded take the name or path as it is).
    """

    models_dir = Path(models_dir).expanduser()
    name, path, sha256 = source.name, source.path, source.sha256
    refs = [r for r in (name, path) if r]
    if sha256:
        refs[1:1] = [str(m.path.parent) for m in list_workspace(models_dir) if m.sha256 == sha256]
    for ref in refs:
        try:
            opened = open_model(ref, models_dir=models_dir, catalog=catalog)
        except (NotFound, ChecksumMismatch, InvalidModelFile):
            continue
        if not sha256 or opened.card.get("sha256") == sha256:
            return opened
    blob = models_dir / BLOBS / (sha256 or "")
    if sha256 and blob.is_file() and sha256_file(blob) == sha256:
        card = {
            "name": name or "model",
            "sha256": sha256,
            "entry": None,
            "source_url": source.url,
        }
        return OpenedModel(blob, card)
    again = name if name and _in_catalog(name, catalog) else source.url or path or name
    raise NotFound(
        f"the model {Path(run_dir).name} was trained from ({name or path}, sha256 {(sha256 or '?')[:12]}…) "
        f"is no longer in {models_dir}; fetch it again (zoo fetch {again}) and retry"
    )


def _in_catalog(name: str, catalog: Catalog) -> bool:
    try:
        catalog.resolve(name)
    except NotFound:
        return False
    return True


def versions() -> dict[str, str]:
    """Python and the packages a run depends on, for run.json."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in (
        "zoo",
        "torch",
        "torchvision",
        "onnx",
        "onnxruntime-gpu",
        "onnx2torch",
        "onnxslim",
        "timm",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def first_record(options: AdaptOptions, *, source: SourceRecord) -> RunRecord:
    """run.json as a run is claimed: its options and its model, so that --resume finds both."""
    return RunRecord(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        status="starting",
        source=source,
        options=_options_record(options),
    )


def _options_record(options: AdaptOptions) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(options).items()
        if k not in ("out", "resume")
    }


def start_record(
    options: AdaptOptions,
    *,
    previous: RunRecord | None,
    source: SourceRecord,
    choice: RecordedChoice,
    blocks: list[str],
    config: TrainConfig,
    preprocess: Preprocess,
    imported: Any,
    split: DataSplit,
) -> RunRecord:
    """run.json as `zoo adapt` starts training: enough to export, resume or reproduce the run."""
    created = previous.created if previous and previous.created else None
    return RunRecord(
        created=created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        status="training",
        source=source,
        options=_options_record(options),
        blocks=blocks,
        hyperparameters=dataclasses.asdict(config),
        preprocess=preprocess,
        input_name=imported.probe.input_name,
        class_names=split.class_names,
        num_classes=len(split.class_names),
        head=HeadRecord(hidden=options.hidden, dropout=options.dropout),
        data=DataRecord(
            source=split.source or options.data,
            train=len(split.train),
            val=len(split.val),
            test=len(split.test),
            skipped=len(split.skipped),
        ),
        seed=options.seed,
        device=config.device,
        versions=versions(),
        import_fidelity=dataclasses.asdict(imported.fidelity) if imported.fidelity else None,
    ).with_choice(choice)
