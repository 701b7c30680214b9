"""The workspace's array cache: entries listed, least recently used evicted, killed writes ignored."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import diskcache, features


def _store(models_dir: Path, key: str, rows: int, *, used: float) -> Path:
    features.store_cached(
        models_dir / ".cache" / "features", key, np.zeros((rows, 100), np.float32)
    )
    path = models_dir / ".cache" / "features" / f"{key}.npy"
    os.utime(path, (used, used))
    return path


def test_entries_list_most_recent_first_and_reads_refresh_the_order(tmp_path: Path) -> None:
    old = _store(tmp_path, "old", 10, used=1_000)
    new = _store(tmp_path, "new", 10, used=2_000)
    assert [e.path for e in diskcache.entries(tmp_path)] == [new, old]
    assert features.load_cached(old.parent, "old") is not None  # a read counts as a use
    assert [e.path for e in diskcache.entries(tmp_path)] == [old, new]
    assert {e.kind for e in diskcache.entries(tmp_path)} == {"features"}


def test_eviction_drops_the_least_recently_used_until_within_budget(tmp_path: Path) -> None:
    paths = [_store(tmp_path, f"k{i}", 100, used=1_000 + i) for i in range(4)]
    size = paths[0].stat().st_size
    removed = diskcache.evict(tmp_path, budget=2 * size)
    assert [e.path for e in removed] == paths[:2]
    assert [p.exists() for p in paths] == [False, False, True, True]


def test_storing_keeps_the_workspace_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _store(tmp_path, "first", 1000, used=1_000)
    monkeypatch.setenv(diskcache.BUDGET_ENV, str(1.5 * first.stat().st_size / 1e9))
    second = _store(tmp_path, "second", 1000, used=time.time())
    assert not first.exists() and second.exists()


def test_a_bad_budget_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.errors import ZooError

    monkeypatch.setenv(diskcache.BUDGET_ENV, "lots")
    with pytest.raises(ZooError, match="ZOO_CACHE_BUDGET_GB"):
        diskcache.budget_bytes()


def test_a_write_killed_midway_is_never_trusted(tmp_path: Path) -> None:
    """A killed writer leaves a hidden temporary (never read) or, at worst, a cut file (dropped)."""
    folder = tmp_path / ".cache" / "features"
    folder.mkdir(parents=True)
    tmp = folder / ".key.npy.abc123.tmp"
    tmp.write_bytes(b"\x93NUMPY half")
    assert features.load_cached(folder, "key") is None
    assert diskcache.entries(tmp_path) == []
    whole = _store(tmp_path, "cut", 50, used=1_000)
    whole.write_bytes(whole.read_bytes()[:100])  # as if the file system lost its tail
    assert features.load_cached(folder, "cut") is None and not whole.exists()
    # The temporary goes once it is old enough to have no live writer.
    os.utime(tmp, (1_000, 1_000))
    assert diskcache.clear(tmp_path) == (0, 0) and not tmp.exists()


def test_clear_removes_every_entry(tmp_path: Path) -> None:
    paths = [_store(tmp_path, f"k{i}", 10, used=1_000 + i) for i in range(3)]
    count, size = diskcache.clear(tmp_path)
    assert count == 3 and not any(p.exists() for p in paths)
    assert size > 0 and diskcache.entries(tmp_path) == []
