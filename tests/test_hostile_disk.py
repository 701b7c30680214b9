"""A full disk, concurrent fetches and a damaged workspace: the previous good file always survives."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from httpserver import LocalServer, http_server, no_proxy, tiny_model_bytes

from cli import main
from pipeline.core.checkpoint import load_weights, save_weights
from zoo import download as download_module
from zoo.cache import fetch
from zoo.catalog import Catalog
from zoo.errors import ChecksumMismatch, DiskFull
from zoo.files import write_json
from zoo.workspace import open_model

__all__ = ["http_server", "no_proxy"]  # fixtures used by name

OLD = tiny_model_bytes(seed=6, features=2048)
NEW = tiny_model_bytes(seed=7, features=2048)


def files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts
    )


def test_disk_full_mid_download_keeps_the_previous_model(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    url = http_server.serve("/m.onnx", OLD)
    fetch(url, name="m", models_dir=models, catalog=Catalog([]), progress=False)
    before = {name: (models / name).read_bytes() for name in files(models)}
    http_server.serve("/m.onnx", NEW)
    written = {"bytes": 0}

    def fill_up(handle: object, chunk: bytes) -> None:
        room = 10_000 - written["bytes"]  # the disk fills after exactly 10 kB
        handle.write(chunk[:room])  # type: ignore[attr-defined]
        written["bytes"] += min(room, len(chunk))
        if len(chunk) > room:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "_write_chunk", fill_up)
    with pytest.raises(DiskFull, match="disk space"):
        fetch(url, name="m", models_dir=models, catalog=Catalog([]), force=True, progress=False)
    assert written["bytes"] == 10_000  # it really failed part-way
    assert {name: (models / name).read_bytes() for name in files(models)} == before
    assert open_model("m", models_dir=models, catalog=Catalog([])).path.read_bytes() == OLD


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 32)


def test_disk_full_mid_checkpoint_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    path = tmp_path / "best.safetensors"
    save_weights(_model(0), path)
    write_json(tmp_path / "run.json", {"epoch": 1})
    good = path.read_bytes()
    real_save = safetensors.torch.save_file

    def half_then_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real_save(tensors, filename, metadata=metadata)
        size = Path(filename).stat().st_size
        with open(filename, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(DiskFull, match="disk space"):
        save_weights(_model(1), path)
    monkeypatch.undo()

    def full_text(self: Path, text: str, encoding: str | None = None) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_text)
    with pytest.raises(DiskFull, match="disk space"):
        write_json(tmp_path / "run.json", {"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == good
    restored = _model(2)
    load_weights(restored, path)
    assert torch.equal(restored.weight, _model(0).weight)
    assert (tmp_path / "run.json").read_text().strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "run.json"]


def test_four_processes_fetching_at_once_end_with_one_good_file(
    http_server: LocalServer, tmp_path: Path
) -> None:
    big = tiny_model_bytes(seed=8, features=16384)  # 196 KiB, trickled over about half a second
    big_sha = hashlib.sha256(big).hexdigest()
    url = http_server.serve("/big.onnx", big, chunk_delay=0.5 / (len(big) // 4096 + 1))
    models = tmp_path / "models"
    target = models / "shared" / "model.onnx"
    seen: set[str] = set()
    stop = threading.Event()

    def read_whenever_there() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(hashlib.sha256(target.read_bytes()).hexdigest())
            time.sleep(0.002)

    reader = threading.Thread(target=read_whenever_there, daemon=True)
    reader.start()
    context = multiprocessing.get_context("spawn")
    kwargs = {"name": "shared", "models_dir": models, "catalog": Catalog([]), "progress": False}
    workers = [context.Process(target=fetch, args=(url,), kwargs=kwargs) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=90)
    time.sleep(0.1)
    stop.set()
    reader.join(timeout=5)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert seen == {big_sha}  # readers saw the model, and never a partial one
    assert files(models) == [f"blobs/{big_sha}", "shared/card.json", "shared/model.onnx"]
    assert 1 <= len(http_server.seen("/big.onnx")) <= 4


def test_corrupted_workspace_model_is_detected_on_use_and_force_repairs_it(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    source.write_bytes(OLD)
    models = tmp_path / "models"
    result = fetch(str(source), models_dir=models, catalog=Catalog([]), progress=False)
    with open(result.path, "r+b") as handle:  # bit rot, or an editor saving over it in place
        handle.seek(100)
        handle.write(b"\xff\xff\xff\xff")
    with pytest.raises(ChecksumMismatch, match="--force"):
        open_model("m", models_dir=models, catalog=Catalog([]))
    runner = CliRunner()
    used = runner.invoke(main, ["--models-dir", str(models), "inspect", "m"], catch_exceptions=False)  # fmt: skip
    assert used.exit_code == 1 and "zoo fetch m --force" in used.stderr
    repaired = runner.invoke(
        main,
        ["--models-dir", str(models), "fetch", str(source), "--force", "--json"],
        catch_exceptions=False,
    )
    assert repaired.exit_code == 0, repaired.stderr
    assert json.loads(repaired.stdout)["sha256"] == hashlib.sha256(OLD).hexdigest()
    assert open_model("m", models_dir=models, catalog=Catalog([])).path.read_bytes() == OLD
