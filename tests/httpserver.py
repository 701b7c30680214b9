"""A scripted HTTP server on 127.0.0.1 for download tests, and the tiny ONNX models it serves.

Each path gets a list of responses, used in order (the last one repeats), so a test can say
"500 twice, then the file" or "drop the connection half-way, then honour the Range request".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4bf2b6a0a8c3f3f6b0b1f1b2a4fce4d9d1f1e8e3c2b6a2d1f0e9c8b7a6f5e4d3\n"
    b"size 13964571\n"
)
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Log in to continue</body></html>\n"


def tiny_model_bytes(*, seed: int = 0, features: int = 4) -> bytes:
    """A valid, tiny ONNX classifier (Gemm) serialised to bytes; `seed` varies the weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((3, features)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class Reply:
    """One scripted answer.

    body: the bytes of the file; status: the HTTP status; content_length: announce this many
    bytes instead of len(body); drop_after: send only this many bytes, then close the
    connection; honour_range: answer `Range: bytes=N-` with 206; location: redirect target;
    chunk_delay: seconds to sleep between 4 KiB chunks (makes downloads overlap); stall:
    seconds to go silent, connection open, before closing (after drop_after bytes, if set).
    """

    body: bytes = b""
    status: int = 200
    content_length: int | None = None
    drop_after: int | None = None
    honour_range: bool = True
    location: str | None = None
    chunk_delay: float = 0.0
    stall: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    """A request the server received."""

    path: str
    headers: dict[str, str]


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 with scripted replies per path."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def script(self, path: str, replies: Reply | Sequence[Reply]) -> str:
        """Answer `path` with these replies in order (the last repeats); returns its URL."""
        self.routes[path] = [replies] if isinstance(replies, Reply) else list(replies)
        return self.url(path)

    def serve(self, path: str, body: bytes, **options: object) -> str:
        """Serve `body` at `path` (Reply options apply); returns its URL."""
        return self.script(path, Reply(body=body, **options))  # type: ignore[arg-type]

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def _next_reply(self, path: str) -> Reply | None:
        with self._lock:
            replies = self.routes.get(path)
            if not replies:
                return None
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                pass  # keep test output clean

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                with server._lock:
                    server.requests.append(Seen(self.path, dict(self.headers.items())))
                reply = server._next_reply(self.path)
                if reply is None:
                    reply = Reply(body=b"not found", status=404)
                self._answer(reply)

            def _answer(self, reply: Reply) -> None:
                body, status, first = reply.body, reply.status, 0
                requested = self.headers.get("Range", "")
                if reply.honour_range and status == 200 and requested.startswith("bytes="):
                    first = int(requested[6:].split("-", 1)[0])
                    status = 206
                self.send_response(status)
                if reply.location:
                    self.send_header("Location", reply.location)
                remaining = body[first:]
                length = reply.content_length if reply.content_length is not None else len(body)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
                    length -= first
                self.send_header("Content-Length", str(length))
                self.send_header("ETag", '"v1"')
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if reply.drop_after is not None:
                    remaining = remaining[: max(reply.drop_after - first, 0)]
                for start in range(0, len(remaining), 4096):
                    self.wfile.write(remaining[start : start + 4096])
                    if reply.chunk_delay:
                        self.wfile.flush()
                        time.sleep(reply.chunk_delay)
                self.wfile.flush()
                if reply.stall:
                    time.sleep(reply.stall)
                self.close_connection = True

        return Handler

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def http_server(no_proxy: None) -> Iterator[LocalServer]:
    """A LocalServer running for one test."""
    with LocalServer() as server:
        yield server


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound and released at once)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep requests to 127.0.0.1 off any proxy configured in the environment."""
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
