"""The workspace's array cache: entries listed, least recently used evicted, killed writes ignored."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import diskcache
from pipeline.train import features


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


@pytest.mark.slow
def test_two_concurrent_adapts_on_the_same_data_both_finish(
    tmp_path: Path, bundled_workspace: Path
) -> None:
    """Two `zoo adapt` processes share one workspace cache: both finish, the entry is sound."""
    import json
    import shutil
    import subprocess
    import sys

    from image_builders import write_rgb

    models_dir = tmp_path / "models"
    shutil.copytree(bundled_workspace, models_dir)
    data = tmp_path / "photos"
    for label in range(2):
        for index in range(6):
            write_rgb(data / f"c{label}" / f"{index}.png", size=(40, 32), seed=10 * label + index)
    command = [sys.executable, "-c", "import cli; cli.run()", "--models-dir", str(models_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                *command,
                "adapt",
                "efficientnet-lite0",
                "--data",
                str(data),
                "--strategy",
                "feature",
                "--out",
                str(tmp_path / f"run{i}"),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    results = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert json.loads(out)["strategy"] == "feature"
    from pipeline.convert import importcache

    cached = diskcache.entries(models_dir)
    # The data check's file facts (pipeline.data.facts) are cached beside the features.
    assert {entry.kind for entry in cached} == {"features", "imports", "facts"}
    load = {
        "features": features.load_cached,
        "imports": importcache.load,
        "facts": lambda folder, key: np.load(folder / f"{key}.npy", allow_pickle=False),
    }
    assert all(load[e.kind](e.path.parent, e.path.stem) is not None for e in cached)
    assert not list((models_dir / ".cache").glob("*/.*.tmp"))  # no temporary left behind


def test_zoo_cache_lists_and_clears(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from cli import main

    paths = [_store(tmp_path, f"k{i}", 10, used=1_000 + i) for i in range(2)]
    runner = CliRunner()
    listed = runner.invoke(main, ["--models-dir", str(tmp_path), "cache"])
    assert listed.exit_code == 0, listed.output
    assert "2 entries" in listed.output and listed.output.index("k1") < listed.output.index("k0")
    assert all(p.exists() for p in paths)
    cleared = runner.invoke(main, ["--models-dir", str(tmp_path), "cache", "--clear", "--json"])
    assert cleared.exit_code == 0, cleared.output
    assert [e["path"] for e in json.loads(cleared.output)["entries"]] == [
        str(p) for p in paths[::-1]
    ]
    assert not any(p.exists() for p in paths)
    empty = runner.invoke(main, ["--models-dir", str(tmp_path), "cache", "--json"])
    assert json.loads(empty.output) == {"cleared": False, "entries": []}


def test_rows_stream_to_disk_and_read_back_by_index(tmp_path: Path) -> None:
    """Prefix outputs are written batch by batch and read a few rows at a time, as float32."""
    data = np.random.default_rng(0).normal(size=(37, 3, 4, 4)).astype(np.float32)
    batches = (data[i : i + 8] for i in range(0, len(data), 8))
    rows = features.store_rows(tmp_path, "key", batches, count=len(data), dtype="float16")
    assert len(rows) == 37 and rows.shape == (37, 3, 4, 4)
    picked = rows.take([36, 0, 17])
    assert picked.dtype == np.float32
    np.testing.assert_allclose(picked, data[[36, 0, 17]], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(
        np.load(tmp_path / "key.npy")[[5]].astype(np.float32), rows.take([5])
    )
    again = features.open_rows(tmp_path, "key")
    assert again is not None and np.array_equal(again.take([3]), rows.take([3]))


def test_rows_that_do_not_add_up_are_dropped_and_never_half_written(tmp_path: Path) -> None:
    data = np.ones((10, 6), np.float32)
    with pytest.raises(ValueError, match="9 rows computed for 10"):
        features.store_rows(tmp_path, "short", iter([data[:9]]), count=10, dtype="float32")
    assert list(tmp_path.iterdir()) == []  # neither an entry nor a temporary is left
    features.store_rows(tmp_path, "cut", iter([data]), count=10, dtype="float32")
    path = tmp_path / "cut.npy"
    path.write_bytes(path.read_bytes()[:-7])  # the file system lost its tail
    assert features.open_rows(tmp_path, "cut") is None and not path.exists()


def test_an_entry_evicted_while_read_stays_readable(tmp_path: Path) -> None:
    rows = features.store_rows(
        tmp_path, "key", iter([np.arange(12.0).reshape(3, 4)]), count=3, dtype="float32"
    )
    (tmp_path / "key.npy").unlink()  # another run's eviction
    assert rows.take([2]).tolist() == [[8.0, 9.0, 10.0, 11.0]]


# --- checked imports (pipeline.convert.importcache) -----------------------------------------------


def _import_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> tuple[object, object]:
    """Import once (stored), then again with the import itself made to fail (so: from the cache)."""
    import pipeline.convert as convert

    cache = diskcache.imports_dir(tmp_path / "models")
    first = convert.import_model(model_path, cache_dir=cache)

    def no_import(*args: object, **kwargs: object) -> None:
        raise AssertionError("imported again instead of reusing the cached import")

    with monkeypatch.context() as patched:
        patched.setattr(convert, "_import_file", no_import)
        second = convert.import_model(model_path, cache_dir=cache)
    return first, second


def test_a_checked_import_is_reused_with_its_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from onnx_builders import CHANNELS, SIZE, opset7_classic, save

    path = save(opset7_classic(), tmp_path / "classic.onnx")
    first, second = _import_twice(tmp_path, monkeypatch, path)
    assert second.source_opset == first.source_opset == 7  # the file's own opset, not the target
    assert second.notes == first.notes and second.notes  # the upgrade is still reported
    assert second.fidelity == first.fidelity
    assert second.probe == first.probe
    assert not any(p.key == "zoo.import_verdict" for p in second.onnx_model.metadata_props)
    x = torch.randn(3, CHANNELS, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(first.module(x), second.module(x))
    # every float weight stays trainable after a cached import too
    assert [n for n, _ in first.module.named_parameters()] == [
        n for n, _ in second.module.named_parameters()
    ]
    [entry] = diskcache.entries(tmp_path / "models")
    assert entry.kind == "imports" and entry.path.suffix == ".onnx"


def test_another_file_or_a_damaged_entry_is_imported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnx_builders import gemm_head, save

    import pipeline.convert as convert

    cache = diskcache.imports_dir(tmp_path / "models")
    path = save(gemm_head(), tmp_path / "m.onnx")
    convert.import_model(path, cache_dir=cache)
    [entry] = list(cache.glob("*.onnx"))
    entry.write_bytes(entry.read_bytes()[:100])  # cut, as by a full disk under another tool
    imported = convert.import_model(path, cache_dir=cache)
    assert imported.fidelity is not None
    assert convert.importcache.load(cache, entry.stem) is not None  # stored whole again
    save(gemm_head(softmax=True), path)  # other bytes under the same name: another entry
    convert.import_model(path, cache_dir=cache)
    assert len(list(cache.glob("*.onnx"))) == 2


def test_an_entry_that_parses_but_does_not_fit_is_replaced_and_a_folder_is_a_clear_error(
    tmp_path: Path,
) -> None:
    import onnx
    from onnx_builders import gemm_head, save

    import pipeline.convert as convert
    from zoo.errors import ZooError

    cache = diskcache.imports_dir(tmp_path / "models")
    path = save(gemm_head(), tmp_path / "m.onnx")
    key = convert.importcache.cache_key(
        path, opset=convert.TARGET_OPSET, tolerance=convert.FIDELITY_TOLERANCE
    )
    convert.importcache.store(cache, key, onnx.load(str(path)), {"written by": "another version"})
    imported = convert.import_model(path, cache_dir=cache)
    assert imported.fidelity is not None and imported.fidelity.n_inputs > 0
    _, verdict = convert.importcache.load(cache, key)
    assert set(verdict) == {"fidelity", "notes", "source_opset"}  # stored afresh
    with pytest.raises(ZooError, match="not a file"):
        convert.import_model(tmp_path, cache_dir=cache)
