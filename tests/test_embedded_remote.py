"""The embedded remote: the server's code in-process, indistinguishable from HttpRemote."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.backend.storage import StorageError
from chatsave.backend.validation import fingerprint as request_fingerprint
from chatsave.errors import ChatsaveError, UnavailableError
from chatsave.remote import open_remote
from chatsave.remote.embedded import EmbeddedRemote, error_for_answer
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.app import ChatsaveApp
from tests.server_fixtures import AsgiClient

FAST = RetryPolicy(attempts=1)


def body(*ids: str) -> bytes:
    return json.dumps({"messages": [
        {"id": i, "role": "user", "content": "hi", "created_at": "2026-01-01T00:00:00Z"}
        for i in ids]}).encode()


@pytest.mark.parametrize("spec", ["plain", "file:", "file://"])
def test_opens_paths_and_file_urls(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "backend.db"
    location = {"plain": str(path), "file:": f"file:{path}", "file://": f"file://{path}"}[spec]
    with EmbeddedRemote(location) as remote:
        assert remote.path == path and remote.url == location
        remote.save("c1", body("m1"), "k")
    with open_remote(location) as again:
        assert isinstance(again, EmbeddedRemote)
        assert [m.id for m in again.messages("c1").messages] == ["m1"]


def test_same_data_as_a_server_on_the_same_file(tmp_path: Path,
                                                make_app: Callable[..., ChatsaveApp],
                                                asgi_client: Callable[..., AsgiClient]) -> None:
    path = tmp_path / "shared.db"
    with EmbeddedRemote(path) as remote:
        answer = remote.save("c1", body("m1", "m2"), "k1")
        backend_id = remote.capabilities().backend_id
    client = asgi_client(make_app(path))
    assert client.get("/api/v1/capabilities").json()["backend_id"] == backend_id
    replay = client.post("/api/v1/chats/c1/save", content=body("m1", "m2"),
                         headers={"Idempotency-Key": "k1"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert json.loads(replay.content) == answer.model_dump(), \
        "the embedded user is the server's tokenless user 'local'"


def test_unknown_chat_is_an_empty_page(tmp_path: Path) -> None:
    with EmbeddedRemote(tmp_path / "b.db") as remote:
        page = remote.messages("nope")
        assert (page.chat_id, page.version, page.messages, page.next) == ("nope", 0, [], None)


STATUSES = [400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503]


@pytest.mark.parametrize("status", STATUSES)
def test_errors_map_like_http_remote(status: int) -> None:
    envelope = {"error": {"code": "some_code", "message": "what happened", "details": None}}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=envelope, headers={"Retry-After": "1"})

    with HttpRemote("http://127.0.0.1:9", transport=httpx.MockTransport(answer),
                    policy=FAST) as http, pytest.raises(ChatsaveError) as over_http:
        http.save("c1", body("m1"), "k")
    mine = error_for_answer(status, envelope, {"Retry-After": "1"}, what="save request",
                            write=True)
    assert type(mine) is type(over_http.value), (status, mine, over_http.value)
    assert mine.exit_code == over_http.value.exit_code
    assert mine.details == {"status": status, "code": "some_code", "retry_after": 1.0,
                            "details": None}


def _old_running_record(path: Path, payload: bytes, expires: float) -> None:
    """The record a server of an earlier version left when it claimed the key with a lease
    and died before executing the request."""
    fingerprint = request_fingerprint("POST", "/api/v1/chats/c1/save", payload)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("INSERT INTO idempotency (user_id, key, fingerprint, state, "
                         "lease_token, lease_expires, created_at) "
                         "VALUES ('local', 'k', ?, 'running', 'old', ?, ?)",
                         (fingerprint, expires, time.time()))
    finally:
        conn.close()


def test_running_key_is_retried_like_http(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    payload = body("m1")
    with EmbeddedRemote(path, policy=RetryPolicy(attempts=3, base=0.01, cap=0.02)) as remote:
        # An older server claimed the key and died; its lease runs out in 0.5 s.
        _old_running_record(path, payload, time.time() + 0.5)
        started = time.monotonic()
        answer = remote.save("c1", payload, "k")
        assert [a.id for a in answer.saved] == ["m1"]
        assert time.monotonic() - started >= 0.9, "waited for Retry-After (1 s)"


def test_running_key_exhausts_retries(tmp_path: Path) -> None:
    payload = body("m1")
    path = tmp_path / "b.db"
    with EmbeddedRemote(path, policy=FAST) as remote:
        _old_running_record(path, payload, time.time() + 60)
        with pytest.raises(UnavailableError) as err:
            remote.save("c1", payload, "k")
    assert err.value.details["status"] == 409
    assert err.value.details["code"] == "idempotency_key_in_use"


def test_storage_failures_are_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(UnavailableError, match="cannot open the embedded backend"):
        EmbeddedRemote(bad)
    with EmbeddedRemote(tmp_path / "ok.db") as remote:
        def broken(*args: Any) -> Any:
            raise StorageError("disk I/O error")

        monkeypatch.setattr(remote.storage, "list_chats", broken)
        with pytest.raises(UnavailableError, match="disk I/O error"):
            remote.list_chats()


def test_housekeeping_runs_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    EmbeddedRemote(path).close()
    conn = sqlite3.connect(path)
    try:
        stamp = conn.execute("SELECT value FROM meta WHERE key = 'housekeeping_at'").fetchone()
    finally:
        conn.close()
    assert stamp is not None and abs(float(stamp[0]) - time.time()) < 60
