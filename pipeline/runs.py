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
    from pipeline.data import DataSplit
    from pipeline.train import TrainConfig
    from zoo.catalog import Preprocess

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
    except FileNotFoundError as exc:
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
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(options).items()
            if k not in ("out", "resume")
        },
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
