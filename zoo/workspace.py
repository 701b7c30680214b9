"""The workspace as it is on disk: the models `zoo fetch` put there, found and opened again.

    MODELS_DIR/blobs/<sha256>       the truth: one file per distinct content
    MODELS_DIR/<name>/model.onnx    a hard link to its blob (a copy where links fail)
    MODELS_DIR/<name>/card.json     where it came from, its sha256, its catalog entry, when

Writing into it is `zoo.cache.fetch`; this module only reads, and checks each sha256 again.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from zoo.catalog import Catalog, ModelEntry
from zoo.errors import ChecksumMismatch, InvalidModelFile, NotFound, ZooError
from zoo.files import sha256_file

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
BLOBS = "blobs"
CACHE_DIR = ".cache"  # derived data, safe to delete: features and checked imports
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


@dataclass(frozen=True)
class WorkspaceModel:
    """One fetched model, as `zoo list --workspace` shows it."""

    name: str
    path: Path
    sha256: str
    fetched_at: str


class OpenedModel(NamedTuple):
    """A verified model file and its card."""

    path: Path
    card: dict[str, Any]


@dataclass(frozen=True)
class Workspace:
    """A models folder and the catalog its names resolve against: the pair every command needs.

    The library passes one of these instead of `models_dir` and `catalog` side by side; the public
    API still takes `models_dir=` and `catalog=` and builds it.
    """

    models_dir: Path
    catalog: Catalog

    @classmethod
    def at(cls, models_dir: str | os.PathLike[str], catalog: Catalog) -> Workspace:
        return cls(Path(models_dir).expanduser(), catalog)

    @property
    def blobs_dir(self) -> Path:
        """Content-addressed model files, one per sha256."""
        return self.models_dir / BLOBS

    @property
    def cache_dir(self) -> Path:
        return self.models_dir / CACHE_DIR

    @property
    def features_dir(self) -> Path:
        """Cached frozen features and frozen-prefix outputs."""
        return self.cache_dir / "features"

    @property
    def imports_dir(self) -> Path:
        """Checked imports (normalised graphs and their verdicts)."""
        return self.cache_dir / "imports"

    def open(self, name_or_path: str | os.PathLike[str]) -> OpenedModel:
        """A workspace model (or a plain .onnx path) and its card, its sha256 checked again now."""
        return open_model(name_or_path, models_dir=self.models_dir, catalog=self.catalog)

    def models(self) -> list[WorkspaceModel]:
        return list_workspace(self.models_dir)

    def latest(self) -> WorkspaceModel | None:
        return latest_model(self.models_dir)


def check_name(name: str) -> str:
    """A workspace name is a plain folder name; refuse anything else."""
    if not _NAME.fullmatch(name) or name == BLOBS or ".." in name:
        raise ZooError(
            f"{name!r} cannot name a model in the workspace; choose a name of letters, digits, "
            "'.', '_', '+' and '-' (e.g. --name my-model)"
        )
    return name


def default_name(path_or_url: str) -> str:
    """The name a file or URL is stored under when no --name is given."""
    base = PurePosixPath(urllib.parse.urlparse(path_or_url).path).name or "model"
    for suffix in (*ARCHIVE_SUFFIXES, ".onnx"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._+-]", "-", base).strip(".-") or "model"


def read_card(folder: Path) -> dict[str, Any] | None:
    """A folder's card.json, or None when it is missing or damaged."""
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and isinstance(card.get("sha256"), str) else None


def card_entry(card: dict[str, Any], catalog: Catalog) -> ModelEntry | None:
    """The catalog entry of a card: the one it records, else the one whose sha256 the file has.

    Cards written before files were known by their sha256 say `"entry": null` for a catalog file.
    """
    raw = card.get("entry")
    if isinstance(raw, dict):
        try:
            return ModelEntry.from_dict(raw)
        except (TypeError, ValueError, KeyError):
            pass  # a card from another version: the catalog's own entry, if any, is as good
    return catalog.by_sha256(card.get("sha256"))


def _workspace_folder(name_or_path: str, *, models_dir: Path, catalog: Catalog) -> Path | None:
    """The workspace folder for a name, an alias or a path to a workspace model."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir() and (candidate / CARD_FILE).is_file():
        return candidate
    if (
        candidate.is_file()
        and candidate.name == MODEL_FILE
        and (candidate.parent / CARD_FILE).is_file()
    ):
        return candidate.parent
    if _NAME.fullmatch(name_or_path) and (models_dir / name_or_path / CARD_FILE).is_file():
        return models_dir / name_or_path
    try:
        entry = catalog.resolve(name_or_path)
    except NotFound:
        return None
    folder = models_dir / entry.name
    return folder if (folder / CARD_FILE).is_file() else None


def open_model(
    name_or_path: str | os.PathLike[str], *, models_dir: str | os.PathLike[str], catalog: Catalog
) -> OpenedModel:
    """A workspace model (or a plain .onnx path) and its card, its sha256 checked again now."""
    models_dir = Path(models_dir).expanduser()
    text = os.fspath(name_or_path)
    folder = _workspace_folder(text, models_dir=models_dir, catalog=catalog)
    if folder is None:
        path = Path(text).expanduser()
        if path.is_file():
            card = {
                "name": default_name(text),
                "source": path.resolve().as_uri(),
                "source_url": path.resolve().as_uri(),
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
                "entry": None,
                "fetched_at": None,
            }
            return OpenedModel(path, card)
        run = path / "run.json"
        # A run directory or a folder named as a path: fetching it would not help.
        if path.is_dir() and (run.is_file() or "/" in text or os.sep in text):
            what = "a run of `zoo adapt`" if run.is_file() else "a folder"
            exported = path / MODEL_FILE
            instead = f"pass {exported}" if exported.is_file() else "pass an .onnx file"
            raise NotFound(
                f"{text} is {what}, not a model: {instead}, or a fetched model's name (zoo list)"
            )
        raise NotFound(
            f"no model {text!r} in the workspace {models_dir}; run `zoo fetch {text}` first"
        )
    card = read_card(folder)
    name = folder.name
    if card is None:
        raise InvalidModelFile(
            f"{folder / CARD_FILE} is missing or damaged; run `zoo fetch {name} --force`"
        )
    path = folder / MODEL_FILE
    if not path.is_file():
        raise NotFound(f"{path} is missing; run `zoo fetch {name} --force`")
    actual = sha256_file(path)
    if actual != card["sha256"]:
        raise ChecksumMismatch(
            f"{path} has sha256 {actual}, but was fetched as {card['sha256']}: it was changed or damaged; "
            f"run `zoo fetch {name} --force`"
        )
    return OpenedModel(path, card)


def list_workspace(models_dir: str | os.PathLike[str]) -> list[WorkspaceModel]:
    """Every fetched model in the workspace, by name."""
    models_dir = Path(models_dir).expanduser()
    if not models_dir.is_dir():
        return []
    found = []
    for folder in sorted(models_dir.iterdir()):
        if not folder.is_dir() or folder.name.startswith(".") or folder.name == BLOBS:
            continue
        card = read_card(folder)
        if card is None or not (folder / MODEL_FILE).is_file():
            continue
        found.append(
            WorkspaceModel(
                name=folder.name,
                path=folder / MODEL_FILE,
                sha256=card["sha256"],
                fetched_at=str(card.get("fetched_at") or ""),
            )
        )
    return found


def latest_model(models_dir: str | os.PathLike[str]) -> WorkspaceModel | None:
    """The most recently fetched model, or None in an empty workspace."""

    def when(model: WorkspaceModel) -> datetime:
        try:
            return datetime.fromisoformat(model.fetched_at)
        except ValueError:
            return datetime.min.replace(tzinfo=timezone.utc)

    models = list_workspace(models_dir)
    return max(models, key=when) if models else None
