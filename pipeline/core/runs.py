"""Run directories: naming without overwriting, finding the latest, run.json written and read back."""

from __future__ import annotations

import dataclasses
import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import NotFound, ZooError

if TYPE_CHECKING:
    from pipeline.adapt import AdaptOptions
    from pipeline.data.split import DataSplit
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Catalog, Preprocess
    from zoo.workspace import OpenedModel

RUN_FILE = "run.json"
SPLIT_FILE = "split.json"


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
        if not (out / RUN_FILE).exists():
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


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run directory, with a clear error when it is not one."""
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NotFound(
            f"{run_dir} is not a run of `zoo adapt` (no {RUN_FILE}); pass a run directory"
        ) from exc
    except ValueError as exc:
        raise ZooError(f"{path} is damaged ({exc}); re-run `zoo adapt`") from exc


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
    runs = [r for r in list_runs(models_dir) if (r / "checkpoint.safetensors").exists()]
    if not runs:
        raise NotFound(f"no finished run in {models_dir}; train one first with `zoo adapt`")
    return runs[-1]


def source_record(path: Path, card: dict[str, Any], name: str) -> dict[str, Any]:
    """run.json's `source`: the model file a run trains from, by workspace name, path and sha256."""
    return {
        "name": name,
        "path": str(path),
        "sha256": card.get("sha256"),
        "url": card.get("source_url"),
    }


def open_source(
    source: dict[str, Any], *, models_dir: Path, catalog: Catalog, run_dir: Path
) -> OpenedModel:
    """The very file a run was trained from, whatever was fetched since.

    Tried in order: its workspace name, any other name holding the same sha256, the path it was
    opened from, and its blob; each only when its sha256 is the recorded one (runs written
    before sha256s were recorded take the name or path as it is).
    """
    from zoo.errors import ChecksumMismatch, InvalidModelFile
    from zoo.files import sha256_file
    from zoo.workspace import BLOBS, OpenedModel, list_workspace, open_model

    models_dir = Path(models_dir).expanduser()
    name, path, sha256 = source.get("name"), source.get("path"), source.get("sha256")
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
            "source_url": source.get("url"),
        }
        return OpenedModel(blob, card)
    again = name if name and _in_catalog(name, catalog) else source.get("url") or path or name
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


def first_record(options: AdaptOptions, *, source: dict[str, Any]) -> dict[str, Any]:
    """run.json as a run is claimed: its options and its model, so that --resume finds both."""
    return {
        "tool": "zoo",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "starting",
        "source": source,
        "options": _options_record(options),
    }


def _options_record(options: AdaptOptions) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(options).items()
        if k not in ("out", "resume")
    }


def start_record(
    options: AdaptOptions,
    *,
    previous: dict[str, Any],
    source: dict[str, Any],
    choice: dict[str, Any],
    blocks: list[str],
    config: TrainConfig,
    preprocess: Preprocess,
    imported: Any,
    split: DataSplit,
) -> dict[str, Any]:
    """run.json as `zoo adapt` starts training: enough to export, resume or reproduce the run."""
    return {
        "tool": "zoo",
        "created": previous.get("created")
        or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "training",
        "source": source,
        "options": _options_record(options),
        **choice,
        "blocks": blocks,
        "hyperparameters": dataclasses.asdict(config),
        "preprocess": preprocess.to_dict(),
        "input_name": imported.probe.input_name,
        "class_names": split.class_names,
        "num_classes": len(split.class_names),
        "head": {"hidden": options.hidden, "dropout": options.dropout},
        "data": {
            "source": split.source or options.data,
            "train": len(split.train),
            "val": len(split.val),
            "test": len(split.test),
            "skipped": len(split.skipped),
        },
        "seed": options.seed,
        "device": config.device,
        "versions": versions(),
        "import_fidelity": dataclasses.asdict(imported.fidelity) if imported.fidelity else None,
    }
