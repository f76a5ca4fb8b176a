"""Every error the app produces is the JSON envelope; every limit answers with a clear error."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.backend.settings import ServerSettings
from chatsave.server.app import ChatsaveApp
from tests.faults import Fault, Faults
from tests.server_fixtures import AsgiClient, LiveServer, ServeProcess

MiB = 1024 * 1024


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "details"}
    assert doc["error"]["code"] == code and doc["error"]["message"]
    return doc["error"]  # type: ignore[no-any-return]


def save_body(n: int = 1, size: int = 5) -> bytes:
    return json.dumps({"messages": [
        {"id": f"m{i}", "role": "user", "content": "x" * size,
         "created_at": "2026-01-01T00:00:00Z"} for i in range(n)]}).encode()


@pytest.fixture
def small(make_app: Callable[..., ChatsaveApp]) -> ChatsaveApp:
    return make_app(settings=ServerSettings(rate_per_s=0, housekeeping_interval_s=0,
                                            max_body_bytes=64 * 1024, max_batch_messages=10,
                                            max_header_bytes=4096))


@pytest.fixture
def client(small: ChatsaveApp, asgi_client: Callable[..., AsgiClient]) -> AsgiClient:
    return asgi_client(small)


def test_framework_errors_use_the_envelope(client: AsgiClient) -> None:
    assert_envelope(client.get("/nowhere"), 404, "not_found")
    assert_envelope(client.get("/api/v1/chats/c1/save"), 405, "method_not_allowed")
    r = client.request("PUT", "/api/v1/capabilities")
    assert_envelope(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET"
    err = assert_envelope(client.get("/api/v1/chats?limit=abc"), 422, "invalid_request")
    assert err["details"][0]["loc"] == ["query", "limit"]
    assert_envelope(client.get("/api/v1/chats/c1/messages?after=-1"), 422, "invalid_request")
    assert_envelope(client.get("/api/v1/chats/c1/messages"), 404, "not_found")
    assert_envelope(client.post("/api/v1/digests", content=b"[1,"), 400, "malformed_json")
    assert_envelope(client.post("/api/v1/digests", content=b'{"chat_ids": "x"}'), 422,
                    "invalid_request")
    assert_envelope(client.post("/api/v1/chats/c1/save", content=b"NaN",
                                headers={"Idempotency-Key": "k"}), 400, "malformed_json")
    assert_envelope(client.post("/api/v1/chats/c1/save", content=b"[]",
                                headers={"Idempotency-Key": "k"}), 422, "invalid_request")
    assert_envelope(client.post("/api/v1/chats/undefined/save", content=save_body(),
                                headers={"Idempotency-Key": "k"}), 422, "invalid_chat_id")


@pytest.mark.parametrize("segment", ["a%0Ab", "%3B%0A", "%0A", "c1%0D"])
def test_a_chat_id_with_a_line_break_is_an_invalid_chat_id_not_a_missing_route(
        client: AsgiClient, segment: str) -> None:
    """Starlette's ``path`` parameter stops at a line break, which made such ids a 404
    "no such endpoint" (found by the schemathesis run): every chat route answers 422."""
    key = {"Idempotency-Key": "k"}
    assert_envelope(client.get(f"/api/v1/chats/{segment}/messages"), 422, "invalid_chat_id")
    for route in (f"/api/v1/chats/{segment}/save", f"/api/chats/{segment}/save"):
        assert_envelope(client.post(route, content=save_body(), headers=key), 422,
                        "invalid_chat_id")
    assert_envelope(client.post(f"/api/v1/chats/{segment}/delete", content=b'{"ids": ["m"]}',
                                headers=key), 422, "invalid_chat_id")
    assert_envelope(client.get(f"/api/v1/chats/{segment}/elsewhere"), 404, "not_found")


def test_unexpected_exception_is_a_500_envelope(small: ChatsaveApp, client: AsgiClient,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(small.state.service, "list_chats", broken)
    with caplog.at_level(logging.ERROR, logger="chatsave.server"):
        r = client.get("/api/v1/chats")
    err = assert_envelope(r, 500, "internal")
    assert "boom" not in json.dumps(err), "no internals in the answer"
    assert "boom" in caplog.text, "but the traceback is logged"


def test_storage_unavailable_is_503(small: ChatsaveApp, client: AsgiClient,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from chatsave.backend.storage import StorageUnavailable

    def down(*args: Any) -> Any:
        raise StorageUnavailable("database is gone")

    monkeypatch.setattr(small.state.storage, "list_chats", down)
    monkeypatch.setattr(small.state.storage, "ping", down)
    r = client.get("/api/v1/chats")
    assert_envelope(r, 503, "storage_unavailable")
    assert r.headers["retry-after"] == "1"
    assert_envelope(client.get("/api/v1/health"), 503, "storage_unavailable")


def test_batch_and_body_limits(client: AsgiClient) -> None:
    r = client.post("/api/v1/chats/c1/save", content=save_body(11),
                    headers={"Idempotency-Key": "k"})
    err = assert_envelope(r, 413, "batch_too_large")
    assert err["details"] == {"limit": 10}
    r = client.post("/api/v1/chats/c1/save", content=save_body(1, 70 * 1024),
                    headers={"Idempotency-Key": "k"})
    assert_envelope(r, 413, "body_too_large")

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/api/v1/chats/c1/save", content=stream(), headers={"Idempotency-Key": "k"})
    assert_envelope(r, 413, "body_too_large")
    exact = b" " * (64 * 1024 - len(save_body())) + save_body()
    assert len(exact) == 64 * 1024
    r = client.post("/api/v1/chats/c1/save", content=exact, headers={"Idempotency-Key": "k"})
    assert r.status_code == 200, "a body of exactly the limit is accepted"


def test_header_limit(client: AsgiClient) -> None:
    r = client.get("/api/v1/capabilities", headers={"X-Big": "y" * 5000})
    err = assert_envelope(r, 431, "headers_too_large")
    assert err["details"] == {"limit": 4096}
    r = client.get("/api/v1/chats?after=" + "z" * 5000)
    assert_envelope(r, 431, "headers_too_large")


def test_rate_limit_per_token(make_app: Callable[..., ChatsaveApp],
                              asgi_client: Callable[..., AsgiClient],
                              tokens_file: Callable[..., Any]) -> None:
    path, tokens = tokens_file("alice", "bob")
    app = make_app(settings=ServerSettings(rate_per_s=0.5, rate_burst=2,
                                           housekeeping_interval_s=0), tokens=path)
    alice, bob = asgi_client(app, tokens["alice"]), asgi_client(app, tokens["bob"])
    statuses = [alice.get("/api/v1/chats").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = alice.get("/api/v1/chats")
    err = assert_envelope(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1 and err["details"]["retry_after"] > 0
    assert bob.get("/api/v1/chats").status_code == 200, "buckets are per token"
    assert alice.get("/api/v1/capabilities").status_code == 200, "public endpoints are free"


def test_overload_is_503(make_app: Callable[..., ChatsaveApp],
                         start_server: Callable[[Any], LiveServer]) -> None:
    faults = Faults()
    app = make_app(settings=ServerSettings(rate_per_s=0, housekeeping_interval_s=0,
                                           max_in_flight=1), faults=faults)
    server = start_server(app)
    faults.script(Fault.stall(1.0, "before_headers"), path="/chats$")
    slow: list[int] = []
    thread = threading.Thread(target=lambda: slow.append(
        httpx.get(server.url + "/api/v1/chats", timeout=10).status_code))
    thread.start()
    deadline = time.monotonic() + 5
    while not faults.requests(path="/chats$") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    r = httpx.get(server.url + "/api/v1/capabilities", timeout=10)
    assert_envelope(r, 503, "overloaded")
    assert r.headers["retry-after"] == "1"
    thread.join(10)
    assert slow == [200]
    assert httpx.get(server.url + "/api/v1/capabilities", timeout=10).status_code == 200


def test_auth_errors_use_the_envelope(make_app: Callable[..., ChatsaveApp],
                                      asgi_client: Callable[..., AsgiClient],
                                      tokens_file: Callable[..., Any]) -> None:
    path, _ = tokens_file("alice")
    app = make_app(tokens=path)
    anonymous, wrong = asgi_client(app), asgi_client(app, "not-a-token")
    r = anonymous.get("/api/v1/chats")
    assert_envelope(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    r = wrong.post("/api/v1/chats/c1/save", content=save_body(),
                   headers={"Idempotency-Key": "k"})
    assert_envelope(r, 401, "unauthorized")
    assert "invalid_token" in r.headers["www-authenticate"]
    assert_envelope(anonymous.get("/nowhere"), 401, "unauthorized")
    assert anonymous.get("/api/v1/capabilities").status_code == 200
    assert anonymous.get("/api/v1/health").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200


# -- over real sockets ------------------------------------------------------------------------


def _read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def test_declared_oversize_is_refused_before_reading(live_server: LiveServer) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/v1/chats/c1/save HTTP/1.1\r\nHost: x\r\n"
                     b"Idempotency-Key: k\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        started = time.monotonic()
        status, _, payload = _read_response(sock)
    assert status == 413 and time.monotonic() - started < 5
    assert json.loads(payload)["error"]["code"] == "body_too_large"


def test_streamed_oversize_over_http(live_server: LiveServer) -> None:
    limit = live_server.service.settings.max_body_bytes

    def stream() -> Iterator[bytes]:
        for _ in range(3 * limit // MiB):
            yield b" " * MiB

    r = httpx.post(live_server.url + "/api/v1/chats/c1/save", content=stream(),
                   headers={"Idempotency-Key": "k"}, timeout=30)
    assert_envelope(r, 413, "body_too_large")
    again = httpx.get(live_server.url + "/api/v1/health", timeout=10)
    assert again.status_code == 200


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0]) * 1024
    return out


def _peak_during(pid: int, action: Callable[[], Any]) -> int:
    """Peak resident memory of ``pid`` above its level before ``action``, in bytes."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status(pid)["VmRSS"]
        action()
        return _status(pid)["VmHWM"] - base
    except OSError:  # no clear_refs: sample instead
        base = _status(pid)["VmRSS"]
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _status(pid)["VmRSS"])
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            action()
        finally:
            done.set()
            sampler.join()
        return peak - base


def test_oversized_body_does_not_grow_server_memory(
        tmp_path: Path, spawn_server: Callable[..., ServeProcess]) -> None:
    server = spawn_server(tmp_path / "mem.db")
    limit = 8 * MiB  # the default
    caps = httpx.get(server.url + "/api/v1/capabilities", timeout=10).json()
    assert caps["max_body_bytes"] == limit

    def post(total: int) -> httpx.Response:
        def stream() -> Iterator[bytes]:
            sent = 0
            while sent < total:
                chunk = b" " * min(256 * 1024, total - sent)
                sent += len(chunk)
                yield chunk

        return httpx.post(server.url + "/api/v1/chats/c1/save", content=stream(),
                          headers={"Idempotency-Key": "k"}, timeout=60)

    for _ in range(2):  # warm up allocators and code paths
        post(1024)
    answers: list[httpx.Response] = []
    huge = _peak_during(server.pid, lambda: answers.append(post(160 * MiB)))
    assert_envelope(answers[-1], 413, "body_too_large")
    assert huge < 2 * limit, f"server grew by {huge / MiB:.1f} MiB for a 160 MiB body"
    # The measurement can see a buffered body: one just under the limit is held whole.
    under = _peak_during(server.pid, lambda: answers.append(post(limit - 1024)))
    assert answers[-1].status_code == 400  # spaces are not JSON, but it was read
    assert under > limit / 2, f"measured only {under / MiB:.1f} MiB for an 8 MiB body"


def test_huge_header_section_is_cut_off(tmp_path: Path,
                                        spawn_server: Callable[..., ServeProcess]) -> None:
    server = spawn_server(tmp_path / "headers.db")
    r = httpx.get(server.url + "/api/v1/capabilities", headers={"X-Big": "a" * 300_000},
                  timeout=10)
    assert_envelope(r, 431, "headers_too_large")
    port = int(server.url.rsplit(":", 1)[1])

    def flood() -> None:  # 64 MiB of one header, never finished
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(256):
                    sock.sendall(b"a" * 256 * 1024)
            except OSError:
                return  # refused and closed, as it should be
            raise AssertionError("the server read 64 MiB of headers")

    growth = _peak_during(server.pid, flood)
    assert growth < 4 * MiB, f"server grew by {growth / MiB:.1f} MiB for a 64 MiB header"
    assert httpx.get(server.url + "/api/v1/health", timeout=10).status_code == 200
