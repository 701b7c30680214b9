"""zoo.download against a real HTTP server on 127.0.0.1: every way a download goes wrong."""

from __future__ import annotations

import errno
import hashlib
import time
from pathlib import Path

import pytest
from httpserver import HTML_PAGE, LFS_POINTER, LocalServer, Reply, free_port, http_server, no_proxy

from zoo import download as download_module
from zoo.download import DownloadResult, download
from zoo.errors import ChecksumMismatch, DiskFull, DownloadError

__all__ = ["http_server", "no_proxy"]  # fixtures used by name

MODEL = bytes(range(256)) * 64  # 16 KiB: several chunks, so drops happen mid-body
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
FAST = {"retries": 2, "backoff": 0.01, "progress": False}
PREVIOUS = b"a good file fetched earlier"


def leftovers(folder: Path, keep: str = "model.onnx") -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name != keep)


def test_success_with_sha256(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/m.onnx", MODEL)
    dest = tmp_path / "model.onnx"
    result = download([url], dest, sha256=MODEL_SHA, size=len(MODEL), **FAST)
    assert result == DownloadResult(url=url, sha256=MODEL_SHA, size=len(MODEL))
    assert dest.read_bytes() == MODEL
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("replies", "error", "says", "requests"),
    [
        pytest.param(Reply(MODEL), ChecksumMismatch, "sha256", 1, id="wrong-sha256"),
        pytest.param(
            Reply(MODEL[:5000], content_length=len(MODEL), honour_range=False),
            DownloadError,
            "connection closed after 5000",
            4,
            id="truncated",
        ),
        pytest.param(Reply(b"gone", status=404), DownloadError, "HTTP 404", 1, id="404"),
        pytest.param(Reply(b"denied", status=403), DownloadError, "HTTP 403", 1, id="403"),
        pytest.param(Reply(b"oops", status=500), DownloadError, "HTTP 500", 3, id="500-forever"),
        pytest.param(Reply(HTML_PAGE), DownloadError, "HTML page", 1, id="html-200"),
        pytest.param(Reply(LFS_POINTER), DownloadError, "Git LFS pointer", 1, id="lfs-200"),
        pytest.param(Reply(b""), DownloadError, "empty file", 1, id="empty-200"),
    ],
)
def test_failure_leaves_nothing_and_keeps_previous_file(
    http_server: LocalServer,
    tmp_path: Path,
    replies: Reply,
    error: type[Exception],
    says: str,
    requests: int,
) -> None:
    url = http_server.script("/m.onnx", replies)
    dest = tmp_path / "model.onnx"
    dest.write_bytes(PREVIOUS)
    wrong_sha = hashlib.sha256(b"something else").hexdigest()
    started = time.monotonic()
    with pytest.raises(error) as caught:
        download([url], dest, sha256=wrong_sha if error is ChecksumMismatch else None, **FAST)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert says in message and url in message and "--mirror" in message
    assert "\n" not in message
    assert dest.read_bytes() == PREVIOUS
    assert leftovers(tmp_path) == []
    assert len(http_server.seen("/m.onnx")) == requests


def test_500_then_recovery(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.script("/m.onnx", [Reply(status=500), Reply(status=503), Reply(MODEL)])
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.sha256 == MODEL_SHA
    assert len(http_server.seen("/m.onnx")) == 3


def test_404_moves_on_to_next_url(http_server: LocalServer, tmp_path: Path) -> None:
    missing = http_server.serve("/missing.onnx", b"", status=404)
    good = http_server.serve("/m.onnx", MODEL)
    result = download([missing, good], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.url == good
    assert len(http_server.seen("/missing.onnx")) == 1  # a 404 is not retried


def test_wrong_file_moves_on_to_next_url(http_server: LocalServer, tmp_path: Path) -> None:
    wrong = http_server.serve("/wrong.onnx", MODEL[::-1])
    short = http_server.serve("/short.onnx", MODEL[:100])
    good = http_server.serve("/m.onnx", MODEL)
    result = download(
        [wrong, short, good], tmp_path / "model.onnx", sha256=MODEL_SHA, size=len(MODEL), **FAST
    )
    assert result.url == good
    assert (tmp_path / "model.onnx").read_bytes() == MODEL


def test_follows_redirect(http_server: LocalServer, tmp_path: Path) -> None:
    target = http_server.serve("/cdn/blob", MODEL)
    url = http_server.serve("/resolve/main/m.onnx", b"", status=302, location=target)
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.url == url
    assert (tmp_path / "model.onnx").read_bytes() == MODEL
    assert len(http_server.seen("/cdn/blob")) == 1


def test_resume_after_redirect_keeps_the_range(http_server: LocalServer, tmp_path: Path) -> None:
    target = http_server.script("/cdn/blob", [Reply(MODEL, drop_after=9000), Reply(MODEL)])
    url = http_server.serve("/resolve/main/m.onnx", b"", status=302, location=target)
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.size == len(MODEL)
    assert http_server.seen("/cdn/blob")[1].headers["Range"] == "bytes=9000-"


def test_dropped_connection_resumes_with_range(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.script("/m.onnx", [Reply(MODEL, drop_after=6000), Reply(MODEL)])
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.sha256 == MODEL_SHA and result.size == len(MODEL)
    first, second = http_server.seen("/m.onnx")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=6000-"
    assert second.headers["If-Range"] == '"v1"'


def test_stalled_body_hits_read_timeout_then_resumes(
    http_server: LocalServer, tmp_path: Path
) -> None:
    url = http_server.script("/m.onnx", [Reply(MODEL, drop_after=6000, stall=5.0), Reply(MODEL)])
    started = time.monotonic()
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, read_timeout=0.3, **FAST)
    assert time.monotonic() - started < 3
    assert result.size == len(MODEL)
    assert http_server.seen("/m.onnx")[1].headers["Range"] == "bytes=6000-"


def test_range_ignored_restarts_from_zero(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.script(
        "/m.onnx", [Reply(MODEL, drop_after=6000), Reply(MODEL, honour_range=False)]
    )
    result = download([url], tmp_path / "model.onnx", sha256=MODEL_SHA, **FAST)
    assert result.size == len(MODEL)
    assert (tmp_path / "model.onnx").read_bytes() == MODEL
    assert http_server.seen("/m.onnx")[1].headers["Range"] == "bytes=6000-"


def test_announced_size_mismatch_is_refused_early(http_server: LocalServer, tmp_path: Path) -> None:
    url = http_server.serve("/m.onnx", MODEL)
    with pytest.raises(ChecksumMismatch, match=f"announces {len(MODEL)} bytes, expected 10"):
        download([url], tmp_path / "model.onnx", size=10, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_no_network_fails_fast_naming_every_url(no_proxy: None, tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_port()}/m.onnx"
    unresolvable = "http://nonexistent.invalid/m.onnx"
    also_unresolvable = "http://nonexistent.invalid/other.onnx"
    started = time.monotonic()
    # The production defaults: no retry tuning, the point is that offline is quick anyway.
    with pytest.raises(DownloadError) as caught:
        download(
            [refused, unresolvable, also_unresolvable], tmp_path / "model.onnx", progress=False
        )
    # Offline must be quick: no retries for refused connections or unknown hosts (10 s is the spec).
    assert time.monotonic() - started < 5
    message = str(caught.value)
    for url in (refused, unresolvable, also_unresolvable):
        assert url in message
    assert "connection refused" in message and "host name not found" in message
    assert "--mirror" in message and "efficientnet-lite0" in message
    assert list(tmp_path.iterdir()) == []


def test_disk_full_removes_temp_and_keeps_previous(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = http_server.serve("/m.onnx", MODEL)
    dest = tmp_path / "model.onnx"
    dest.write_bytes(PREVIOUS)
    temporaries: list[str] = []

    def full_disk(handle: object, chunk: bytes) -> None:
        temporaries.extend(leftovers(tmp_path))  # the temporary file being written, right now
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "_write_chunk", full_disk)
    with pytest.raises(DiskFull, match="disk space"):
        download([url], dest, **FAST)
    assert len(temporaries) == 1 and temporaries[0].startswith(".model.onnx.")
    assert dest.read_bytes() == PREVIOUS
    assert leftovers(tmp_path) == []


def test_local_path_and_file_url(tmp_path: Path) -> None:
    source = tmp_path / "mirror" / "m.onnx"
    source.parent.mkdir()
    source.write_bytes(MODEL)
    out = tmp_path / "out"
    missing = str(tmp_path / "mirror" / "missing.onnx")
    result = download([missing, str(source)], out / "a.onnx", sha256=MODEL_SHA, **FAST)
    assert result.url == str(source) and (out / "a.onnx").read_bytes() == MODEL
    result = download([source.as_uri()], out / "b.onnx", sha256=MODEL_SHA, **FAST)
    assert (out / "b.onnx").read_bytes() == MODEL
    with pytest.raises(ChecksumMismatch, match="sha256"):
        download([str(source)], out / "c.onnx", sha256="0" * 64, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx"]
