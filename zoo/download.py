"""Downloading a file so that it is either complete and checked, or not there at all.

Every URL is streamed into a unique hidden temporary file beside the destination while its
sha256 is computed; the file gets its final name with `os.replace` only once its size and
hash check out, so an interrupted or wrong download never replaces a good file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zoo.errors import ChecksumMismatch, DiskFull, DownloadError
from zoo.files import disk_errors
from zoo.onnxfile import describe_non_model

CHUNK_SIZE = 1 << 16
HEAD_SIZE = 1024  # bytes looked at to recognise an HTML page or a Git LFS pointer
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0  # seconds; a server asking for longer is treated as down
USER_AGENT = "zoo-fetch/0.1 (+https://github.com/onnx/models)"
WAYS_OUT = (
    "check your network, pass `--mirror DIR` (a folder or URL holding the zoo's files), "
    "or use a bundled offline model (`efficientnet-lite0`, `efficientnet-lite1`, `efficientnet-lite2`)"
)


@dataclass(frozen=True)
class DownloadResult:
    """What was downloaded: the URL that worked, and the file's sha256 and size."""

    url: str
    sha256: str
    size: int


class _UrlFailed(Exception):
    """This URL will not give the file; `retry` says whether trying it again may help."""

    def __init__(
        self,
        reason: str,
        *,
        retry: bool = False,
        unreachable: bool = False,
        mismatch: bool = False,
        wait: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.unreachable = unreachable  # the host cannot be reached at all: skip its other URLs
        self.mismatch = mismatch  # the file arrived but its size or sha256 is wrong
        self.wait = wait  # seconds the server asked us to wait (Retry-After)


class _Dropped(Exception):
    """The connection ended before the whole body arrived; what was written can be resumed."""


def _write_chunk(handle: BinaryIO, chunk: bytes) -> None:
    """Write one chunk to the temporary file (the seam where tests simulate a full disk)."""
    handle.write(chunk)


class _Sink:
    """The temporary file being filled, with its running sha256 and byte count."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle = handle
        self.path = path
        self.validator: str | None = None  # ETag or Last-Modified, sent as If-Range on resume
        self.restart()

    def restart(self) -> None:
        """Start over from byte zero (the server ignored our Range request)."""
        self.handle.seek(0)
        self.handle.truncate()
        self.digest = hashlib.sha256()
        self.written = 0
        self.head = b""
        self.head_checked = False

    def write(self, chunk: bytes) -> None:
        with disk_errors(self.path):
            _write_chunk(self.handle, chunk)
        self.digest.update(chunk)
        self.written += len(chunk)
        if not self.head_checked:
            self.head += chunk[: HEAD_SIZE - len(self.head)]
            if len(self.head) >= HEAD_SIZE:
                self.check_head()

    def check_head(self) -> None:
        """Refuse an HTML error page or Git LFS pointer served in place of the file."""
        self.head_checked = True
        what = describe_non_model(self.head)
        if what is not None:
            raise _UrlFailed(f"served {what}")

    def finish(self) -> None:
        if not self.head_checked:
            self.check_head()
        with disk_errors(self.path):
            self.handle.flush()
            os.fsync(self.handle.fileno())


class _Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool, label: str) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(label, total=None)
            self._bar.start()

    def update(self, *, completed: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class _TimedHTTPConnection(http.client.HTTPConnection):
    """Connects within the connect timeout, then waits up to the read timeout for each read."""

    read_timeout: float = 30.0

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _TimedHTTPSConnection(http.client.HTTPSConnection):
    read_timeout: float = 30.0

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """A urllib opener (redirects, proxies from the environment) with a separate read timeout."""
    http_class = type("_Conn", (_TimedHTTPConnection,), {"read_timeout": read_timeout})
    https_class = type("_Conns", (_TimedHTTPSConnection,), {"read_timeout": read_timeout})

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_class, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(https_class, req, context=ssl.create_default_context())

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _describe_connect_error(reason: object) -> _UrlFailed:
    """Classify why a connection could not be made; none of these are worth retrying."""
    if isinstance(reason, socket.gaierror):
        return _UrlFailed("host name not found (no network or DNS?)", unreachable=True)
    if isinstance(reason, ConnectionRefusedError):
        return _UrlFailed("connection refused", unreachable=True)
    if isinstance(reason, TimeoutError):
        return _UrlFailed("connection timed out", unreachable=True)
    if isinstance(reason, ssl.SSLError):
        return _UrlFailed(f"TLS error ({reason})")
    if isinstance(reason, OSError) and reason.errno in (
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    ):
        return _UrlFailed("network unreachable", unreachable=True)
    if isinstance(reason, OSError):
        # A reset while connecting is transient; anything else we do not know is worth one retry too.
        return _UrlFailed(f"connection failed ({reason})", retry=True)
    return _UrlFailed(f"cannot open ({reason})")


def _http_failure(exc: urllib.error.HTTPError) -> _UrlFailed:
    wait = None
    retry_after = exc.headers.get("Retry-After") if exc.headers else None
    if retry_after and retry_after.strip().isdigit():
        wait = float(retry_after)
    retry = exc.code in RETRY_STATUSES and (wait is None or wait <= MAX_RETRY_AFTER)
    return _UrlFailed(f"HTTP {exc.code} {exc.reason}", retry=retry, wait=wait)


def _content_range_start(value: str | None) -> int | None:
    """The first byte of a 'bytes START-END/TOTAL' header, or None when unreadable."""
    if not value or not value.startswith("bytes "):
        return None
    start = value[6:].split("-", 1)[0]
    return int(start) if start.isdigit() else None


@dataclass(frozen=True)
class _HttpPolicy:
    """How long to wait for a server, and how often to try it again."""

    connect_timeout: float
    read_timeout: float
    retries: int  # attempts after the first that gain no bytes before a URL is given up
    backoff: float  # seconds before the first retry; doubled for each failure in a row


def _request(url: str, sink: _Sink) -> urllib.request.Request:
    """The GET for `url`, asking only for the bytes `sink` lacks when it already holds some."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if sink.written:
        headers["Range"] = f"bytes={sink.written}-"
        if sink.validator:
            # If the file changed on the server since the first request, it answers 200 with all of it.
            headers["If-Range"] = sink.validator
    return urllib.request.Request(url, headers=headers)


def _open(
    request: urllib.request.Request, sink: _Sink, policy: _HttpPolicy
) -> http.client.HTTPResponse:
    """Send `request`, turning each way it can fail into _Dropped or _UrlFailed."""
    try:
        return _opener(policy.read_timeout).open(request, timeout=policy.connect_timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and sink.written:
            sink.restart()  # our partial file no longer lines up with the server's
            raise _Dropped("range not satisfiable") from exc
        raise _http_failure(exc) from exc
    except urllib.error.URLError as exc:
        raise _describe_connect_error(exc.reason) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _UrlFailed(f"connection failed before the response ({exc!r})", retry=True) from exc


def _line_up(response: http.client.HTTPResponse, sink: _Sink) -> int | None:
    """Make `sink` match where the answer's body starts; the file's full size if announced."""
    status = response.status
    if status == 206:
        if _content_range_start(response.headers.get("Content-Range")) != sink.written:
            sink.restart()  # resumed somewhere else than asked: start over without Range
            raise _Dropped("server resumed at the wrong byte")
    elif status == 200:
        if sink.written:
            sink.restart()  # Range was ignored: the body is the whole file again
    else:
        raise _UrlFailed(f"unexpected HTTP {status} answer", retry=True)
    length = response.headers.get("Content-Length")
    total = sink.written + int(length) if length and length.isdigit() else None
    if status == 200:
        sink.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
    return total


def _read_body(
    response: http.client.HTTPResponse,
    sink: _Sink,
    *,
    total: int | None,
    expected_size: int | None,
    bar: _Progress,
) -> None:
    """Append the body to `sink` chunk by chunk; _Dropped if it ends before `total` bytes."""
    while True:
        try:
            # read1: what has arrived, so a stall loses nothing already received.
            chunk = response.read1(CHUNK_SIZE)
        except (OSError, http.client.HTTPException) as exc:
            raise _Dropped(f"connection lost after {sink.written} bytes ({exc!r})") from exc
        if not chunk:
            break
        sink.write(chunk)
        if (
            sink.head_checked
            and total is not None
            and expected_size is not None
            and total != expected_size
        ):
            raise _UrlFailed(
                f"server announces {total} bytes, expected {expected_size}", mismatch=True
            )
        bar.update(completed=sink.written, total=total or expected_size)
    if total is not None and sink.written < total:
        raise _Dropped(f"connection closed after {sink.written} of {total} bytes")


def _stream_http(
    url: str, sink: _Sink, *, policy: _HttpPolicy, expected_size: int | None, bar: _Progress
) -> None:
    """One request: append to `sink`, resuming with Range if it already holds bytes.

    Raises _Dropped when the body ends early (resumable), _UrlFailed otherwise.
    """
    response = _open(_request(url, sink), sink, policy)
    with response:
        total = _line_up(response, sink)
        bar.update(completed=sink.written, total=total or expected_size)
        _read_body(response, sink, total=total, expected_size=expected_size, bar=bar)


def _fetch_http(
    url: str, sink: _Sink, *, policy: _HttpPolicy, expected_size: int | None, bar: _Progress
) -> None:
    """Fetch one URL into `sink`, retrying transient failures and resuming dropped bodies."""
    failures_in_a_row = 0
    while True:
        before = sink.written
        try:
            _stream_http(url, sink, policy=policy, expected_size=expected_size, bar=bar)
            return
        except _Dropped as exc:
            failure = _UrlFailed(str(exc), retry=True)
        except _UrlFailed as exc:
            failure = exc
        if not failure.retry:
            raise failure
        # Bytes gained since the last attempt mean the link works, just flakily: keep resuming.
        failures_in_a_row = 0 if sink.written > before else failures_in_a_row + 1
        if failures_in_a_row > policy.retries:
            raise _UrlFailed(f"{failure.reason}, after {policy.retries + 1} attempts")
        delay = policy.backoff * (2 ** max(failures_in_a_row - 1, 0))
        time.sleep(min(max(delay, failure.wait or 0.0), MAX_RETRY_AFTER))


def _local_path(url: str) -> Path | None:
    """The file a local path or file:// URL names; None for network URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if len(parsed.scheme) > 1:
        raise _UrlFailed(f"unsupported URL scheme {parsed.scheme!r}")
    return Path(url)  # a plain path (a one-letter "scheme" is a Windows drive)


def _copy_local(source: Path, sink: _Sink, bar: _Progress) -> None:
    """Copy a local file into `sink` with the same checks as a download."""
    if not source.is_file():
        raise _UrlFailed("no such file")
    try:
        with open(source, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            for chunk in iter(lambda: handle.read(CHUNK_SIZE * 16), b""):
                sink.write(chunk)
                bar.update(completed=sink.written, total=total)
    except (_UrlFailed, DiskFull):
        raise
    except OSError as exc:
        raise _UrlFailed(f"cannot read ({exc.strerror or exc})") from exc


def _check(sink: _Sink, *, sha256: str | None, size: int | None) -> str:
    actual = sink.digest.hexdigest()
    if size is not None and sink.written != size:
        raise _UrlFailed(f"got {sink.written} bytes, expected {size}", mismatch=True)
    if sha256 is not None and actual != sha256.lower():
        raise _UrlFailed(
            f"sha256 {actual} differs from the expected {sha256.lower()}", mismatch=True
        )
    return actual


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).netloc.lower()


def _download_one(
    url: str,
    dest: Path,
    *,
    policy: _HttpPolicy,
    sha256: str | None,
    size: int | None,
    progress: bool,
    label: str,
) -> DownloadResult:
    """Fetch `url` into a temporary file beside `dest`, check it, and move it into place."""
    with disk_errors(dest):
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    bar = _Progress(progress, label)
    try:
        with os.fdopen(fd, "w+b") as handle:
            sink = _Sink(handle, tmp)
            source = _local_path(url)
            if source is None:
                _fetch_http(url, sink, policy=policy, expected_size=size, bar=bar)
            else:
                _copy_local(source, sink, bar)
            sink.finish()
            actual = _check(sink, sha256=sha256, size=size)
            written = sink.written
        os.replace(tmp, dest)
        return DownloadResult(url=url, sha256=actual, size=written)
    finally:
        bar.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def download(
    urls: Sequence[str] | str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    label: str | None = None,
) -> DownloadResult:
    """Fetch the first of `urls` (http(s), file:// or local paths) that gives a checked file, into `dest`.

    `dest` is replaced atomically, and only by a file whose size and sha256 check out. `label`
    names the file in messages and on the progress bar (default: the name of `dest`).
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    label = label or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    policy = _HttpPolicy(connect_timeout, read_timeout, retries, backoff)
    failures: list[tuple[str, _UrlFailed]] = []
    unreachable: set[str] = set()
    for url in urls:
        host = _host(url)
        if host and host in unreachable:
            failures.append((url, _UrlFailed(f"skipped, {host} was unreachable")))
            continue
        try:
            return _download_one(
                url, dest, policy=policy, sha256=sha256, size=size, progress=progress, label=label
            )
        except _UrlFailed as exc:
            failures.append((url, exc))
            if exc.unreachable and host:
                unreachable.add(host)
    raise _all_failed(label, failures)


def _all_failed(label: str, failures: list[tuple[str, _UrlFailed]]) -> OSError:
    """One line naming each URL tried and why it failed, ending with the ways out."""
    if not failures:
        return DownloadError(f"no URL to download {label} from; {WAYS_OUT}")
    tried = "; ".join(f"{url} ({failure.reason})" for url, failure in failures)
    error: DownloadError | ChecksumMismatch
    if all(failure.mismatch for _, failure in failures):
        error = ChecksumMismatch(
            f"could not get a verified {label}: every source gave a different file: {tried}; "
            f"the source may have changed, or {WAYS_OUT}"
        )
    else:
        error = DownloadError(f"could not download {label}: {tried}; {WAYS_OUT}")
    error.tried = tried  # type: ignore[attr-defined]  # lets a caller merge two attempts into one line
    return error
