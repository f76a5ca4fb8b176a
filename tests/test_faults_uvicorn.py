"""Requests uvicorn itself refuses, sent over raw sockets to a real server on 127.0.0.1: the
answer is a 400 in the JSON error envelope (not uvicorn's text/plain), the connection is
closed, and the server goes on serving.

With a uvicorn other than the release the adaptation was written for, uvicorn's own answer
stands and ``serve`` warns that it does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from chatsave.server import run
from chatsave.server.run import NoDelayH11Protocol, NoDelayHttpToolsProtocol, unparsable_note
from tests.server_fixtures import wait_until

SAVE = b"POST /api/v1/chats/c1/save HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
MALFORMED = {
    "100-KB-URL": b"GET /api/v1/health?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "negative-content-length": SAVE + b"Content-Length: -5\r\n\r\n",
    "content-length-and-chunked": SAVE + b"Content-Length: 5\r\nTransfer-Encoding: chunked"
                                         b"\r\n\r\n0\r\n\r\n",
    "two-content-lengths": SAVE + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "bad-chunk": SAVE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "NUL-in-path": b"GET /api/v1/hea\x00lth HTTP/1.1\r\nHost: x\r\n\r\n",
}


def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; read until the server closes (bounded: 10 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # closed while we were still sending: its answer is already there
        with contextlib.suppress(OSError):
            sock.sendall(request)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def envelope_code(name: str, status: int, headers: dict[str, str], body: bytes) -> str:
    """The code of a 4xx answer in the error envelope (asserted to be one)."""
    assert 400 <= status < 500, (name, status)
    assert headers["content-type"] == "application/json", (name, body)
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details"}, (name, body)
    return str(error["code"])


def assert_still_serving(url: str) -> None:
    assert httpx.get(f"{url}/api/v1/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("name", list(MALFORMED))
def test_chatsave_serve_answers_malformed_requests_in_the_envelope(
        spawn_server: Callable[..., Any], tmp_path: Path, name: str) -> None:
    server = spawn_server(tmp_path / "server.db")
    status, headers, body = exchange(server.url, MALFORMED[name])
    code = envelope_code(name, status, headers, body)
    # A URL that long may meet the header-size cap first: a 431, in the envelope too.
    assert (status, code) in {(400, "malformed_http"), (431, "headers_too_large")}
    if code == "malformed_http":
        assert headers["connection"] == "close"
        assert "not valid HTTP/1.1" in json.loads(body)["error"]["message"]
    if name != "100-KB-URL":
        assert code == "malformed_http"
    assert_still_serving(server.url)


class _Uvicorn:
    """uvicorn over the app of ``chatsave serve`` in a thread, with a given protocol class."""

    def __init__(self, app: Any, protocol: type) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, http=protocol, loop="asyncio", log_config=None,
                                access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 15, "uvicorn")
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def serve_with(make_app: Callable[..., Any]) -> Iterator[Callable[[type], _Uvicorn]]:
    started: list[_Uvicorn] = []

    def factory(protocol: type) -> _Uvicorn:
        started.append(_Uvicorn(make_app(), protocol))
        return started[-1]

    yield factory
    for server in started:
        server.stop()


@pytest.mark.parametrize("protocol", [NoDelayHttpToolsProtocol, NoDelayH11Protocol],
                         ids=["httptools", "h11"])
def test_both_protocols_answer_in_the_envelope(serve_with: Callable[[type], _Uvicorn],
                                               protocol: type) -> None:
    assert protocol.adapted, "the installed uvicorn is the one the adaptation targets"
    server = serve_with(protocol)
    codes = {name: envelope_code(name, *exchange(server.url, request))
             for name, request in MALFORMED.items()}
    # h11 reads Content-Length beside chunked framing as the chunked body (RFC 9112 6.3):
    # the app then refuses that body itself, in the envelope as ever.
    refused_by_the_app = {"content-length-and-chunked": "malformed_json",
                          "100-KB-URL": "headers_too_large"}
    for name, code in codes.items():
        assert code in ("malformed_http", refused_by_the_app.get(name)), (name, code)
    assert "malformed_http" in codes.values()
    assert_still_serving(server.url)


@pytest.mark.parametrize("protocol", [NoDelayHttpToolsProtocol, NoDelayH11Protocol],
                         ids=["httptools", "h11"])
def test_another_uvicorn_falls_back_to_its_own_answer_and_serve_says_so(
        serve_with: Callable[[type], _Uvicorn], monkeypatch: pytest.MonkeyPatch,
        protocol: type) -> None:
    monkeypatch.setattr(protocol, "adapted", False)
    monkeypatch.setattr(run, "_PROTOCOL_CLASS", protocol)
    note = unparsable_note()
    assert note is not None and run.ADAPTED_UVICORN in note and uvicorn.__version__ in note
    assert "text/plain" in note
    server = serve_with(protocol)
    status, headers, body = exchange(server.url, MALFORMED["two-content-lengths"])
    assert status == 400 and headers["content-type"].startswith("text/plain")
    assert body == b"Invalid HTTP request received."
    assert_still_serving(server.url)


def test_the_installed_uvicorn_needs_no_note() -> None:
    assert unparsable_note() is None
