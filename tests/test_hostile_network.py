"""Hostile and broken servers on 127.0.0.1, through `zoo.cache.fetch`: every failure is bounded in
time and one clear line, and the workspace gains a model only when it is complete and verified."""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import pytest
from httpserver import LocalServer, Reply, http_server, no_proxy, tiny_model_bytes

from zoo import cache
from zoo.cache import fetch
from zoo.catalog import Catalog
from zoo.download import download
from zoo.errors import ChecksumMismatch, DownloadError

__all__ = ["http_server", "no_proxy"]  # fixtures used by name

MODEL = tiny_model_bytes(seed=5, features=2048)  # ~25 KiB: several 4 KiB chunks to drop between
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
MAX_SECONDS = 6.0


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production download code, with test-sized timeouts and back-off."""
    monkeypatch.setattr(
        cache, "download", functools.partial(download, read_timeout=0.5, retries=2, backoff=0.01)
    )


def workspace_files(models: Path) -> list[str]:
    """Everything in the workspace but lock files: temporaries would show up here."""
    return sorted(
        str(p.relative_to(models))
        for p in models.rglob("*")
        if p.is_file() and ".locks" not in p.parts
    )


def fetch_url(server: LocalServer, replies: Reply | list[Reply], models: Path, **kwargs: object):
    url = server.script("/m.onnx", replies)
    return fetch(url, name="m", models_dir=models, catalog=Catalog([]), progress=False, **kwargs)  # fmt: skip


FAILURES = {
    "404": (Reply(b"gone", status=404), DownloadError, "HTTP 404", 1),
    "500-forever": (Reply(b"oops", status=500), DownloadError, "HTTP 500", 3),
    "stalled-body": (Reply(MODEL, drop_after=5000, stall=30), DownloadError, "timed out", 3),
    "content-length-too-long": (
        Reply(MODEL, content_length=len(MODEL) + 1000, honour_range=False),
        DownloadError,
        "connection closed after",
        3,
    ),
    "content-length-too-short": (
        Reply(MODEL, content_length=len(MODEL) - 1000),
        ChecksumMismatch,
        "sha256",
        1,
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_bounded_clear_and_leave_nothing(
    case: str, http_server: LocalServer, tmp_path: Path, quick: None
) -> None:
    reply, error, says, requests = FAILURES[case]
    models = tmp_path / "models"
    started = time.monotonic()
    with pytest.raises(error) as caught:
        fetch_url(http_server, reply, models, sha256=MODEL_SHA)
    assert time.monotonic() - started < MAX_SECONDS
    message = str(caught.value)
    assert says in message and "\n" not in message and "--mirror" in message, message
    assert workspace_files(models) == []  # no model, no blob, no temporary
    # A body that made progress earns fresh retries (resumed with Range), so count a range there.
    assert requests <= len(http_server.seen("/m.onnx")) <= requests + 2


SUCCESSES = {
    "500-then-recovery": ([Reply(status=500), Reply(status=503), Reply(MODEL)], None),
    "dropped-then-range": ([Reply(MODEL, drop_after=9000), Reply(MODEL)], "bytes=9000-"),
    "range-ignored": (
        [Reply(MODEL, drop_after=9000), Reply(MODEL, honour_range=False)],
        "bytes=9000-",
    ),  # fmt: skip
    "slow-trickle": (Reply(MODEL, chunk_delay=0.1), None),  # 0.1 s per chunk < 0.5 s read timeout
}


@pytest.mark.parametrize("case", list(SUCCESSES))
def test_recoverable_trouble_ends_with_the_verified_file(
    case: str, http_server: LocalServer, tmp_path: Path, quick: None
) -> None:
    replies, second_range = SUCCESSES[case]
    models = tmp_path / "models"
    started = time.monotonic()
    result = fetch_url(http_server, replies, models, sha256=MODEL_SHA)
    assert time.monotonic() - started < MAX_SECONDS
    assert result.path.read_bytes() == MODEL and result.sha256 == MODEL_SHA
    assert workspace_files(models) == [f"blobs/{MODEL_SHA}", "m/card.json", "m/model.onnx"]
    if second_range:
        assert http_server.seen("/m.onnx")[1].headers["Range"] == second_range


def test_a_failed_refetch_keeps_the_verified_model(
    http_server: LocalServer, tmp_path: Path, quick: None
) -> None:
    models = tmp_path / "models"
    fetch_url(http_server, Reply(MODEL), models)
    before = {name: (models / name).read_bytes() for name in workspace_files(models)}
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch_url(http_server, Reply(status=500), models, force=True)
    assert {name: (models / name).read_bytes() for name in workspace_files(models)} == before
