"""The tests' fault hooks (tests/faults.py): every fault kind, as a client over a real socket
sees it, and the installed server without any of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import chatsave
from chatsave.server.app import ChatsaveApp
from tests.faults import Fault, FaultAbort, Faults
from tests.server_fixtures import AsgiClient, LiveServer

SAVE = "/api/v1/chats/c1/save"


def body(*ids: str) -> bytes:
    return json.dumps({"messages": [
        {"id": i, "role": "user", "content": "hello", "created_at": "2026-01-01T00:00:00Z"}
        for i in ids]}).encode()


def stored(server: LiveServer) -> list[str]:
    status, page, _ = server.service.messages("local", "c1")
    return [m["id"] for m in page["messages"]] if status == 200 else []


def caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@pytest.fixture
def client(live_server: LiveServer) -> Any:
    with httpx.Client(base_url=live_server.url, timeout=10) as c:
        yield c


def test_error_fault(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.error(503, retry_after=1), Fault.error(429, retry_after=None))
    r = client.get("/api/v1/chats")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "fault_injected"
    r = client.get("/api/v1/chats")
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert client.get("/api/v1/chats").status_code == 200


def test_reset_is_a_tcp_reset(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.reset(), path="/save$")
    with pytest.raises(httpx.TransportError) as err:
        client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k"})
    assert caused_by(err.value, ConnectionResetError), repr(err.value)
    assert stored(live_server) == [], "reset before the app: nothing written"
    assert client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k"}).status_code \
        == 200


def test_cut_after_n_bytes(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.cut(100), path="/save$")
    received = b""
    with pytest.raises(httpx.RemoteProtocolError), client.stream(
            "POST", SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "k"}) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += chunk
    assert len(received) == 100
    assert stored(live_server) == ["m1", "m2"], "the write happened; only the reply was cut"
    replay = client.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "k"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content.startswith(received)


def test_stall_before_headers(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.stall(1.0), path="/save$")
    with pytest.raises(httpx.ReadTimeout):
        client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k"},
                    timeout=httpx.Timeout(10, read=0.3))
    assert stored(live_server) == ["m1"], "the app ran; the reply was held"


def test_stall_after_headers(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.stall(1.0, "after_headers"))
    started = time.monotonic()
    with client.stream("GET", "/api/v1/chats", timeout=httpx.Timeout(10, read=0.3)) as r:
        assert r.status_code == 200 and time.monotonic() - started < 0.9
        with pytest.raises(httpx.ReadTimeout):
            r.read()


def test_stall_before_app(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.stall(0.5, "before_app"))
    started = time.monotonic()
    assert client.get("/api/v1/chats").status_code == 200
    assert time.monotonic() - started >= 0.5


def test_partial_then_reset(live_server: LiveServer, client: httpx.Client) -> None:
    live_server.faults.script(Fault.partial(1, then="reset"), path="/save$")
    with pytest.raises(httpx.TransportError):
        client.post(SAVE, content=body("a", "b", "c"), headers={"Idempotency-Key": "k"})
    assert stored(live_server) == ["a"]


def test_scripted_sequence_then_ok(live_server: LiveServer) -> None:
    """503 + Retry-After, reset, cut after 100 bytes, stall, OK: a retrying client gets
    through with one key, and the batch is stored exactly once."""
    faults = live_server.faults
    faults.script(Fault.error(503, retry_after=1), Fault.reset(), Fault.cut(100),
                  Fault.stall(1.0), Fault.ok(), method="POST", path="/save$")
    outcomes: list[str] = []
    final = None
    with httpx.Client(base_url=live_server.url, timeout=httpx.Timeout(5, read=0.5)) as client:
        for _attempt in range(10):
            try:
                r = client.post(SAVE, content=body("m1", "m2"),
                                headers={"Idempotency-Key": "seq"})
                r.read()
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)
                continue
            outcomes.append(str(r.status_code))
            if r.status_code == 200:
                final = r
                break
    assert outcomes == ["503", "ReadError", "RemoteProtocolError", "ReadTimeout", "200"]
    assert final is not None and final.headers["idempotent-replayed"] == "true"
    assert faults.attempts("seq") == 5 and faults.pending() == 0
    assert [r.fault for r in faults.log] == ["error", "reset", "cut", "stall", "ok"]
    _status, page, _ = live_server.service.messages("local", "c1")
    assert [(m["id"], m["rev"]) for m in page["messages"]] == [("m1", 1), ("m2", 1)]


def test_rules_match_method_and_path(live_server: LiveServer, client: httpx.Client) -> None:
    faults = live_server.faults
    faults.script(Fault.error(500), method="POST", path="/save$")
    assert client.get("/api/v1/chats").status_code == 200
    assert client.post("/api/v1/digests", json={"chat_ids": []}).status_code == 200
    r = client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k"})
    assert r.status_code == 500
    assert [(r.method, r.fault) for r in faults.requests()] == \
        [("GET", "ok"), ("POST", "ok"), ("POST", "error")]
    faults.clear()
    assert faults.log == [] and faults.pending() == 0


def test_http_control(make_app: Callable[..., ChatsaveApp],
                      start_server: Callable[[Any], LiveServer]) -> None:
    server = start_server(make_app(faults=Faults(http_control=True)))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        r = client.post("/_faults/script", json={"faults": [Fault.error(502).to_json()],
                                                 "method": "GET"})
        assert r.json() == {"pending": 1}
        assert client.get("/api/v1/chats").status_code == 502
        log = client.get("/_faults/log").json()
        assert [(x["path"], x["fault"], x["status"]) for x in log["requests"]] == \
            [("/api/v1/chats", "error", 502)]
        assert client.post("/_faults/script", json={"faults": [{"kind": "nope"}]}) \
            .status_code == 422
        assert client.post("/_faults/clear").json() == {"pending": 0}
        assert client.get("/_faults/log").json()["requests"] == []


def test_faults_are_off_by_default(live_server: LiveServer, make_app: Callable[..., ChatsaveApp],
                                   start_server: Callable[[Any], LiveServer]) -> None:
    plain = start_server(make_app())
    assert httpx.post(plain.url + "/_faults/clear", timeout=10).status_code == 404
    assert httpx.post(live_server.url + "/_faults/clear", timeout=10).status_code == 404, \
        "the control endpoint needs http_control=True"


def test_the_installed_server_has_no_fault_switch() -> None:
    """Fault injection lives in tests/ only: no flag of the server turns it on, and no module
    of the package carries the fault kinds, their control endpoints or their error code."""
    ran = subprocess.run([sys.executable, "-m", "chatsave.server.run", "--db", "x.db",
                          "--test-faults"], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2 and "unrecognized arguments: --test-faults" in ran.stderr
    package = Path(chatsave.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for marker in ("_faults", "fault_injected", "test_faults", "WriteFault", "hang_s"):
            assert marker not in text, f"{path.relative_to(package)} mentions {marker}"


def test_in_process_reset_raises(make_app: Callable[..., ChatsaveApp],
                                 asgi_client: Callable[..., AsgiClient]) -> None:
    faults = Faults()
    client = asgi_client(make_app(faults=faults))
    faults.script(Fault.reset())
    with pytest.raises(FaultAbort):
        client.get("/api/v1/chats")
    assert client.get("/api/v1/chats").status_code == 200


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="where"):
        Fault.stall(1, where="sideways")
    assert Fault.from_json(Fault.partial(3, then="reset").to_json()) == \
        Fault.partial(3, then="reset")
