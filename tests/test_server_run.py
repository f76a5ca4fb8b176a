"""Running the server: serve's guards, TCP_NODELAY, workers, the access log, shared PostgreSQL."""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatsave.backend.service import Service
from chatsave.backend.storage import open_storage
from chatsave.errors import ListenError, UsageError
from chatsave.server.app import ChatsaveApp
from chatsave.server.run import HTTP_PROTOCOL, is_loopback, listen_sockets, main, serve, url_of
from tests.server_fixtures import AsgiClient, ServeProcess, wait_until


def test_serve_refuses_open_host_without_tokens(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(UsageError, match="without authentication"):
            serve(host, 0, tmp_path / "s.db")
    assert not (tmp_path / "s.db").exists(), "refused before touching anything"
    with pytest.raises(UsageError, match="no tokens file"):
        serve("0.0.0.0", 0, tmp_path / "s.db", tokens_file=tmp_path / "none.json")
    with pytest.raises(UsageError, match="workers"):
        serve("127.0.0.1", 0, tmp_path / "s.db", workers=0)


def test_serve_refuses_a_busy_port_before_touching_anything(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for workers in (1, 2):
            with pytest.raises(ListenError, match=f"^127.0.0.1:{port} is already in use"):
                serve("127.0.0.1", port, tmp_path / "s.db", workers=workers)
    assert not (tmp_path / "s.db").exists()


def test_listen_sockets() -> None:
    sockets = listen_sockets("127.0.0.1", 0)
    try:
        assert len(sockets) == 1 and sockets[0].getsockname()[0] == "127.0.0.1"
        port = sockets[0].getsockname()[1]
        assert url_of(sockets[0]) == f"http://127.0.0.1:{port}"
        with pytest.raises(ListenError, match="already in use"):
            listen_sockets("127.0.0.1", port)
    finally:
        sockets[0].close()
    with pytest.raises(ListenError, match="not an address of this machine"):
        listen_sockets("192.0.2.1", 0)  # TEST-NET-1: never local
    with pytest.raises(ListenError, match=r"cannot listen on no-such-host\.invalid"):
        listen_sockets("no-such-host.invalid", 0)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert all(is_loopback(h) for h in ("LOCALHOST", "localhost."))
    # A name a system resolver may send to DNS is not taken on trust.
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "host.example",
                                            "app.localhost", "localhost.example"))


def test_main_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--db", str(tmp_path / "s.db"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: refusing to listen on 0.0.0.0") and "hint: add --tokens" in err


def _nodelay_of_accepted(app: Any, http: Any) -> list[int]:
    """TCP_NODELAY of the server side of a connection, with uvicorn's multi-worker style
    listening socket (created without an explicit protocol, as uvicorn's bind_socket does)."""
    listener = socket.socket(family=socket.AF_INET)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=http, loop="asyncio", log_config=None,
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, "uvicorn to start")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/api/v1/health").status_code == 200
            connections = list(server.server_state.connections)
            return [c.transport.get_extra_info("socket").getsockopt(  # type: ignore[attr-defined]
                socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in connections]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def test_accepted_sockets_have_tcp_nodelay(make_app: Callable[..., ChatsaveApp]) -> None:
    app = make_app()
    assert _nodelay_of_accepted(app, HTTP_PROTOCOL) == [1]
    # The control: uvicorn's own protocol on such a socket leaves Nagle on (the upstream
    # bug this guards against), so the assertion above can fail.
    assert _nodelay_of_accepted(app, H11Protocol) == [0]


def test_workers_keep_small_requests_fast(tmp_path: Path,
                                          spawn_server: Callable[..., ServeProcess]) -> None:
    server = spawn_server(tmp_path / "w.db", workers=2)
    timings = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(30):  # small answers, no disk writes: only the network is measured
            started = time.perf_counter()
            r = client.get("/api/v1/capabilities")
            timings.append(time.perf_counter() - started)
            assert r.status_code == 200
    # With Nagle on, each request waits for a delayed ACK (~40 ms).
    assert statistics.median(timings[5:]) < 0.02, timings


def test_access_log_one_line_without_bodies_or_tokens(
        make_app: Callable[..., ChatsaveApp], asgi_client: Callable[..., AsgiClient],
        tokens_file: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    path, tokens = tokens_file("alice")
    client = asgi_client(make_app(tokens=path), tokens["alice"])
    secret_body = {"messages": [{"id": "m1", "role": "user", "content": "SECRETBODY",
                                 "created_at": "2026-01-01T00:00:00Z"}]}
    with caplog.at_level(logging.INFO, logger="chatsave.server.access"):
        client.post("/api/v1/chats/c1/save", json=secret_body, headers={"Idempotency-Key": "k"})
        client.get("/api/v1/chats/c1/messages?include_deleted=1")
        asgi_client(make_app(tokens=path), "bad-token").get("/api/v1/chats")
    lines = [r.getMessage() for r in caplog.records if r.name == "chatsave.server.access"]
    assert len(lines) == 3
    assert lines[0].startswith("POST /api/v1/chats/c1/save 200 ") and \
        " user=alice id=" in lines[0]
    assert lines[1].startswith("GET /api/v1/chats/c1/messages 200 "), "no query string"
    assert lines[2].startswith("GET /api/v1/chats 401 ") and " user=- id=" in lines[2]
    text = "\n".join(lines) + caplog.text
    assert "SECRETBODY" not in text and tokens["alice"] not in text and "bad-token" not in text


@pytest.mark.postgres
def test_two_servers_one_postgres_overlapping_batches(
        pg_url: str, spawn_server: Callable[..., ServeProcess]) -> None:
    servers = [spawn_server(pg_url), spawn_server(pg_url)]
    ids = [f"m{i:03d}" for i in range(120)]

    def wire(mid: str) -> dict[str, Any]:
        return {"id": mid, "role": "user", "content": f"text of {mid}",
                "created_at": "2026-01-01T00:00:00Z"}

    def client_run(n: int) -> list[dict[str, Any]]:
        answers = []
        with httpx.Client(timeout=30) as client:
            for b in range(6):
                start = (n * 7 + b * 13) % 80
                batch = ids[start:start + 40]
                server = servers[(n + b) % 2]
                for chat in ("shared", f"own-{n % 2}"):
                    r = client.post(f"{server.url}/api/v1/chats/{chat}/save",
                                    json={"messages": [wire(m) for m in batch]},
                                    headers={"Idempotency-Key": uuid.uuid4().hex})
                    assert r.status_code == 200, r.text
                    answers.append(r.json())
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [a for run in pool.map(client_run, range(8)) for a in run]

    with open_storage(pg_url) as store:
        service = Service(store)
        for chat in ("shared", "own-0", "own-1"):
            saved = [a["id"] for ans in answers if ans["chat_id"] == chat for a in ans["saved"]]
            assert len(saved) == len(set(saved)), f"{chat}: a message was saved twice"
            _status, page, _ = service.messages("local", chat, include_deleted=True)
            stored = page["messages"]
            assert sorted(m["id"] for m in stored) == sorted(saved)
            assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
            assert {m["rev"] for m in stored} == {1}
            unchanged = sum(len(ans["unchanged"]) for ans in answers if ans["chat_id"] == chat)
            sent = sum(len(ans["saved"]) + len(ans["unchanged"]) for ans in answers
                       if ans["chat_id"] == chat)
            assert sent == len(saved) + unchanged
            versions = {ans["version"] for ans in answers if ans["chat_id"] == chat
                        and ans["saved"]}
            assert len(versions) == sum(1 for ans in answers if ans["chat_id"] == chat
                                        and ans["saved"]), "each changing request: own version"
