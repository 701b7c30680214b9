"""The workspace's computed-array cache (`MODELS_DIR/.cache/`): listed, bounded and cleared.

Frozen features and frozen-prefix outputs are stored by `pipeline.train.features` under
`.cache/<kind>/<key>.npy`, the key naming everything they depend on (model sha256, cut point,
preprocessing, each image's path, size and mtime); checked imports of models (their normalised
graphs) under `.cache/imports/<key>.onnx`, the key naming the file's sha256 and the libraries.
Entries are written atomically, so a process killed while writing leaves only a hidden
`.<name>.*.tmp` file, which nothing reads; those are removed here once they are old enough that
no live writer can own them.

Each read touches the entry's mtime, so eviction drops the least recently used entries first
when the cache grows past its budget (`ZOO_CACHE_BUDGET_GB`, default 10 GB).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ZooError

CACHE_DIR = ".cache"
ENTRY_SUFFIXES = (".npy", ".onnx")  # arrays; normalised graphs of checked imports
BUDGET_ENV = "ZOO_CACHE_BUDGET_GB"
DEFAULT_BUDGET_GB = 10.0
STALE_TMP_SECONDS = 3600  # writing an entry takes seconds: a temporary file this old has no writer


@dataclass(frozen=True)
class CacheEntry:
    """One cached array file."""

    path: Path
    kind: str  # the folder under .cache: "features", ...
    bytes: int
    last_used: float  # seconds since the epoch (the file's mtime, touched on every read)

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "bytes": self.bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
        }


def cache_root(models_dir: str | os.PathLike[str]) -> Path:
    return Path(models_dir) / CACHE_DIR


def features_dir(models_dir: str | os.PathLike[str]) -> Path:
    """Where a workspace keeps cached features and frozen-prefix outputs."""
    return cache_root(models_dir) / "features"


def imports_dir(models_dir: str | os.PathLike[str]) -> Path:
    """Where a workspace keeps checked imports (`pipeline.convert.importcache`)."""
    return cache_root(models_dir) / "imports"


def budget_bytes() -> int:
    """The cache's size budget in bytes, from ZOO_CACHE_BUDGET_GB (default 10)."""
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        gigabytes = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError as exc:
        raise ZooError(
            f"{BUDGET_ENV}={raw!r} is not a number; set it to the cache budget in GB, e.g. 10"
        ) from exc
    if gigabytes < 0:
        raise ZooError(f"{BUDGET_ENV}={raw!r} is negative; set it to the cache budget in GB")
    return int(gigabytes * 1e9)


def entries(models_dir: str | os.PathLike[str]) -> list[CacheEntry]:
    """Every finished entry, most recently used first (temporary files are not entries)."""
    root = cache_root(models_dir)
    found = []
    if not root.is_dir():
        return found
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in kind_dir.iterdir():
            if path.name.startswith(".") or path.suffix not in ENTRY_SUFFIXES:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted or cleared by another process meanwhile
                continue
            found.append(CacheEntry(path, kind_dir.name, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda entry: entry.last_used, reverse=True)


def stale_temporaries(
    models_dir: str | os.PathLike[str], *, older_than: float = STALE_TMP_SECONDS
) -> list[Path]:
    """Temporary files left by writers that were killed (older than `older_than` seconds)."""
    root = cache_root(models_dir)
    if not root.is_dir():
        return []
    now = time.time()
    stale = []
    for path in root.glob("*/.*.tmp"):
        try:
            if now - path.stat().st_mtime >= older_than:
                stale.append(path)
        except FileNotFoundError:
            continue
    return stale


def touch(path: Path) -> None:
    """Mark an entry as just used (least-recently-used eviction reads the mtime)."""
    # A read-only cache, or an entry removed meanwhile, only loses its place in the order.
    with contextlib.suppress(OSError):
        os.utime(path)


def evict(models_dir: str | os.PathLike[str], *, budget: int | None = None) -> list[CacheEntry]:
    """Remove least recently used entries until the cache fits `budget` bytes; return them."""
    budget = budget_bytes() if budget is None else budget
    for path in stale_temporaries(models_dir):
        path.unlink(missing_ok=True)
    kept = entries(models_dir)
    total = sum(entry.bytes for entry in kept)
    removed = []
    while kept and total > budget:
        oldest = kept.pop()
        oldest.path.unlink(missing_ok=True)
        total -= oldest.bytes
        removed.append(oldest)
    return removed


def keep_within_budget(kind_dir: Path) -> None:
    """After a store into `MODELS_DIR/.cache/<kind>`: the cache is kept within its budget (LRU)."""
    root = Path(kind_dir).parent
    if root.name == CACHE_DIR:
        evict(root.parent)


def clear(models_dir: str | os.PathLike[str], *, kind: str | None = None) -> tuple[int, int]:
    """Remove every entry (of `kind` only, if given) and stale temporary files: (files, bytes)."""
    count = size = 0
    for entry in entries(models_dir):
        if kind is None or entry.kind == kind:
            entry.path.unlink(missing_ok=True)
            count += 1
            size += entry.bytes
    for path in stale_temporaries(models_dir):  # a younger one may belong to a running adapt
        path.unlink(missing_ok=True)
    return count, size
