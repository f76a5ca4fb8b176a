"""Idempotency-Key on the wire: missing, replay, reuse, running, concurrency, kills, retention."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.backend.service import Service
from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage import Storage, open_storage
from chatsave.backend.validation import fingerprint
from chatsave.server.app import ChatsaveApp
from tests.faults import Fault, Faults
from tests.server_fixtures import AsgiClient, LiveServer, PgCluster, ServeProcess, wait_until

SAVE = "/api/v1/chats/c1/save"


def msg(mid: str, content: str = "hello", chat: str = "c1", **extra: Any) -> dict[str, Any]:
    return {"chat_id": chat, "id": mid, "role": "user", "content": content,
            "created_at": "2026-01-01T10:00:00.000Z", **extra}


def body(*ids: str, chat: str = "c1") -> bytes:
    return json.dumps({"messages": [msg(i, chat=chat) for i in ids]}).encode()


def revs(service: Service, user: str = "local", chat: str = "c1") -> dict[str, int]:
    status, page, _ = service.messages(user, chat, include_deleted=True)
    assert status == 200, page
    return {m["id"]: m["rev"] for m in page["messages"]}


@pytest.fixture
def app(make_app: Callable[..., ChatsaveApp]) -> ChatsaveApp:
    return make_app()


@pytest.fixture
def client(app: ChatsaveApp, asgi_client: Callable[..., AsgiClient]) -> AsgiClient:
    return asgi_client(app)


def test_missing_key_is_400(client: AsgiClient, app: ChatsaveApp) -> None:
    for headers in ({}, {"Idempotency-Key": "  "}):
        r = client.post(SAVE, content=body("m1"), headers=headers)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "idempotency_key_missing"
    r = client.post("/api/v1/chats/c1/delete", content=b'{"ids": ["m1"]}')
    assert r.status_code == 400
    assert app.state.storage.get_chats("local", ["c1"]) == {}


def test_invalid_key_is_400(client: AsgiClient) -> None:
    r = client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "x" * 256})
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_invalid"


def test_replay_is_byte_identical_and_marked(client: AsgiClient, app: ChatsaveApp) -> None:
    first = client.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "k1"})
    second = client.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert revs(app.state.service) == {"m1": 1, "m2": 1}


def test_same_key_other_body_is_422(client: AsgiClient, app: ChatsaveApp) -> None:
    client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k1"})
    r = client.post(SAVE, content=body("m2"), headers={"Idempotency-Key": "k1"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    other_path = client.post("/api/v1/chats/c2/save", content=body("m1"),
                             headers={"Idempotency-Key": "k1"})
    assert other_path.status_code == 422, "the fingerprint covers the path"
    assert revs(app.state.service) == {"m1": 1}


def test_keys_are_scoped_to_the_request_kind(client: AsgiClient) -> None:
    client.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "k1"})
    r = client.post("/api/v1/chats/c1/delete", content=b'{"ids": ["m1"]}',
                    headers={"Idempotency-Key": "k1"})
    assert r.status_code == 422


def _write_locked(db: Path) -> bool:
    """True while a transaction holds the SQLite file's write lock (a request inside it)."""
    conn = sqlite3.connect(db, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def test_same_key_while_running_waits_and_replays(live_server: LiveServer) -> None:
    live_server.faults.script(Fault.hang(1.5), path="/save$")
    results: list[httpx.Response] = []

    def first() -> None:
        results.append(httpx.post(live_server.url + SAVE, content=body("m1"),
                                  headers={"Idempotency-Key": "slow"}, timeout=20))

    thread = threading.Thread(target=first)
    thread.start()
    db = live_server.storage.path  # type: ignore[attr-defined]
    wait_until(lambda: _write_locked(db), 10, "the first request to hold its transaction")
    started = time.monotonic()
    second = httpx.post(live_server.url + SAVE, content=body("m1"),
                        headers={"Idempotency-Key": "slow"}, timeout=20)
    thread.join(20)
    assert results[0].status_code == 200 and "idempotent-replayed" not in results[0].headers
    assert second.status_code == 200 and second.headers["idempotent-replayed"] == "true", \
        "the second request queued behind the first and replays its answer"
    assert second.content == results[0].content
    assert time.monotonic() - started < 10
    assert revs(live_server.service) == {"m1": 1}
    assert live_server.faults.attempts("slow") == 2


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres",
                                                           marks=pytest.mark.postgres)])
def test_fifty_concurrent_requests_one_key(engine: str, request: pytest.FixtureRequest,
                                           tmp_path: Path,
                                           make_app: Callable[..., ChatsaveApp],
                                           start_server: Callable[[Any], LiveServer]) -> None:
    location = request.getfixturevalue("pg_url") if engine == "postgres" \
        else str(tmp_path / "s.db")
    server = start_server(make_app(location))
    payload = body(*[f"m{i}" for i in range(20)])
    barrier = threading.Barrier(50)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait(10)
            for _attempt in range(500):
                r = client.post(SAVE, content=payload, headers={"Idempotency-Key": "one"})
                if r.status_code != 409:
                    return r
                time.sleep(0.01)
        raise AssertionError("still 409 after 500 attempts")

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.content for r in answers}) == 1, "every 200 answer is identical"
    executed = [r for r in answers if "idempotent-replayed" not in r.headers]
    assert len(executed) == 1, "exactly one request executed, the others replayed"
    doc = answers[0].json()
    assert len(doc["saved"]) == 20 and doc["version"] == 1
    service = server.service
    assert set(revs(service).values()) == {1}
    assert service.storage.get_chats("local", ["c1"])["c1"].version == 1


def test_replay_under_another_users_token(make_app: Callable[..., ChatsaveApp],
                                          asgi_client: Callable[..., AsgiClient],
                                          tokens_file: Callable[..., Any]) -> None:
    path, tokens = tokens_file("alice", "bob")
    app = make_app(tokens=path)
    alice, bob = asgi_client(app, tokens["alice"]), asgi_client(app, tokens["bob"])
    a1 = alice.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "shared"})
    assert a1.status_code == 200
    b1 = bob.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "shared"})
    assert b1.status_code == 200 and "idempotent-replayed" not in b1.headers, \
        "bob's key is his own: executed for him, not a replay of alice's answer"
    b2 = bob.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "shared"})
    assert b2.status_code == 422, "bob's own record, now with another body"
    a2 = alice.post(SAVE, content=body("m1"), headers={"Idempotency-Key": "shared"})
    assert a2.headers.get("idempotent-replayed") == "true" and a2.content == a1.content
    service = app.state.service
    assert revs(service, "alice") == {"m1": 1} and revs(service, "bob") == {"m1": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        store = open_storage(cluster.create_database())
    else:
        store = open_storage(tmp_path / "s.db")
    yield store
    store.close()


def _old_running_record(storage: Storage, key: str, fingerprint: str,
                        expires: float) -> None:
    """The record a server of an earlier version wrote when it claimed ``key`` with a lease
    before executing the request."""
    with storage.write() as tx:
        sql = ("INSERT INTO idempotency (user_id, key, fingerprint, state, lease_token, "
               "lease_expires, created_at) VALUES ('local', ?, ?, 'running', 'old', ?, ?)")
        if storage.engine == "postgresql":
            sql = sql.replace("?", "%s")
        tx.conn.execute(sql, (key, fingerprint, expires, expires - 60))  # type: ignore[attr-defined]


def test_old_running_records_are_honoured_until_they_expire(storage: Storage) -> None:
    clock = Clock()
    service = Service(storage, clock=clock)
    payload = body("m1")
    _old_running_record(storage, "k", fingerprint("POST", SAVE, payload), clock.now + 30)
    status, answer, headers = service.save("local", "c1", payload, "k")
    assert status == 409 and answer["error"]["code"] == "idempotency_key_in_use"
    assert 1 <= int(headers["Retry-After"]) <= 5
    clock.now += 31
    status, answer, _ = service.save("local", "c1", payload, "k")
    assert status == 200 and [a["id"] for a in answer["saved"]] == ["m1"], \
        "an expired lease is as good as no record"
    status, replay, headers = service.save("local", "c1", payload, "k")
    assert (status, replay, headers.get("Idempotent-Replayed")) == (200, answer, "true")
    _old_running_record(storage, "k2", "another request", clock.now - 1)
    status, answer, _ = service.save("local", "c1", payload, "k2")
    assert status == 200 and [a["id"] for a in answer["unchanged"]] == ["m1"], \
        "an expired record of another request does not make the key reused"
    assert revs(service) == {"m1": 1}


def test_housekeeping_purges_records_and_tombstones(storage: Storage) -> None:
    clock = Clock()
    settings = ServerSettings(tombstone_retention_s=7 * 86400, housekeeping_interval_s=3600)
    service = Service(storage, settings, clock=clock)
    assert service.save("local", "c1", body("m1", "m2"), "k1")[0] == 200
    assert service.delete("local", "c1", b'{"ids": ["m2"]}', "k2")[0] == 200
    clock.now += 86400 - 10
    assert service.housekeeping() == {"idempotency_records": 0, "tombstones": 0}
    _, _, headers = service.save("local", "c1", body("m1", "m2"), "k1")
    assert headers.get("Idempotent-Replayed") == "true", "kept for the retention period"
    clock.now += 20
    assert service.maybe_housekeep() == {"idempotency_records": 2, "tombstones": 0}
    assert service.maybe_housekeep() is None, "not due again before the interval"
    _status, answer, headers = service.save("local", "c1", body("m1", "m2"), "k1")
    assert "Idempotent-Replayed" not in headers, "purged: the key executes afresh"
    assert [c["reason"] for c in answer["conflicts"]] == ["deleted"]
    clock.now += 7 * 86400
    assert service.maybe_housekeep() == {"idempotency_records": 1, "tombstones": 1}
    assert revs(service) == {"m1": 1}


def test_alias_derives_a_key_from_the_content(client: AsgiClient, app: ChatsaveApp) -> None:
    web = {"data": {"name": "Web chat", "messages": [
        {"sender": "user", "text": "hi", "timestamp": 1767261600000},
        {"sender": "bot", "text": "hello!", "timestamp": "2026-01-01T10:00:01Z", "foo": 1},
    ]}}
    first = client.post("/api/chats/web-1/save", json=web)
    assert first.status_code == 200, first.text
    assert len(first.json()["saved"]) == 2
    retry = client.post("/api/chats/web-1/save", content=json.dumps(web, indent=2).encode())
    assert retry.headers.get("idempotent-replayed") == "true", \
        "the same messages (even re-serialised) derive the same key"
    assert retry.content == first.content
    web["data"]["messages"][1]["foo"] = 2  # type: ignore[index]
    changed = client.post("/api/chats/web-1/save", json=web)
    assert "idempotent-replayed" not in changed.headers
    assert [c["reason"] for c in changed.json()["conflicts"]] == [], \
        "extra fields are not content: same hash, unchanged"
    assert len(changed.json()["unchanged"]) == 2
    plain = client.post("/api/chats/web-1/save",
                        json={"messages": [{"role": "user", "content": "x", "created_at": 5}]},
                        headers={"Idempotency-Key": "web-key"})
    assert plain.status_code == 200 and len(plain.json()["saved"]) == 1
    reused = client.post("/api/chats/web-1/save", json={"messages": []},
                         headers={"Idempotency-Key": "web-key"})
    assert reused.status_code == 422
    info = app.state.storage.get_chats("local", ["web-1"])["web-1"]
    assert (info.title, info.message_count, info.version) == ("Web chat", 3, 2)


def test_alias_derived_key_replays_only_while_the_answer_is_true(
        client: AsgiClient, app: ChatsaveApp) -> None:
    web = {"messages": [{"id": "w1", "role": "user", "content": "hi", "timestamp": 1}]}
    first = client.post("/api/chats/web-3/save", json=web)
    assert [a["id"] for a in first.json()["saved"]] == ["w1"]
    retry = client.post("/api/chats/web-3/save", json=web)
    assert retry.headers.get("idempotent-replayed") == "true" and retry.content == first.content, \
        "a blind retry with nothing changed in between is a replay"
    deleted = client.post("/api/v1/chats/web-3/delete", content=b'{"ids": ["w1"]}',
                          headers={"Idempotency-Key": "del"})
    assert [d["id"] for d in deleted.json()["deleted"]] == ["w1"]
    again = client.post("/api/chats/web-3/save", json=web)
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers, \
        "the stored answer (saved) is no longer true: the save executes again"
    doc = again.json()
    assert doc["saved"] == [] and [(c["id"], c["reason"]) for c in doc["conflicts"]] == \
        [("w1", "deleted")]
    assert doc["version"] == deleted.json()["version"]
    blind = client.post("/api/chats/web-3/save", json=web)
    assert blind.headers.get("idempotent-replayed") == "true" and blind.content == again.content
    assert revs(app.state.service, chat="web-3") == {"w1": 2}, "still a tombstone, no duplicate"
    info = app.state.storage.get_chats("local", ["web-3"])["web-3"]
    assert (info.message_count, info.version) == (0, 2)


def test_alias_explicit_key_replays_after_changes(client: AsgiClient) -> None:
    web = {"messages": [{"id": "w1", "role": "user", "content": "hi", "timestamp": 1}]}
    first = client.post("/api/chats/web-4/save", json=web, headers={"Idempotency-Key": "mine"})
    assert [a["id"] for a in first.json()["saved"]] == ["w1"]
    client.post("/api/v1/chats/web-4/delete", content=b'{"ids": ["w1"]}',
                headers={"Idempotency-Key": "del"})
    again = client.post("/api/chats/web-4/save", json=web, headers={"Idempotency-Key": "mine"})
    assert again.headers.get("idempotent-replayed") == "true" and again.content == first.content, \
        "an explicit key is the client's own: its answer replays whatever happened since"


def test_alias_rejects_items_like_import(client: AsgiClient) -> None:
    r = client.post("/api/chats/web-2/save", json={"messages": [
        {"role": "user", "sender": "bot", "text": "?", "timestamp": 1},
        {"id": "ok", "role": "user", "text": "fine", "timestamp": 1},
        {"id": "x", "role": "user", "content": "no time"},
    ]})
    assert r.status_code == 200
    doc = r.json()
    assert [a["id"] for a in doc["saved"]] == ["ok"]
    reasons = [x["reason"] for x in doc["rejected"]]
    assert "conflicting role" in reasons[0] and "timestamp" in reasons[1]
    bad = client.post("/api/chats/web-2/save", json={"nothing": []})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_lost_ack_then_retry_executes_once(live_server: LiveServer) -> None:
    live_server.faults.script(Fault.lost_ack(), path="/save$")
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        with pytest.raises(httpx.TransportError):
            client.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "lost"})
        assert revs(live_server.service) == {"m1": 1, "m2": 1}, "the write was applied"
        retry = client.post(SAVE, content=body("m1", "m2"), headers={"Idempotency-Key": "lost"})
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert [a["id"] for a in retry.json()["saved"]] == ["m1", "m2"]
    assert live_server.faults.attempts("lost") == 2


def test_partial_commit_then_retry_completes(live_server: LiveServer) -> None:
    live_server.faults.script(Fault.partial(2), path="/save$")
    ids = [f"m{i}" for i in range(5)]
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        failed = client.post(SAVE, content=body(*ids), headers={"Idempotency-Key": "part"})
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "fault_injected"
        assert revs(live_server.service) == {"m0": 1, "m1": 1}, "only the first two landed"
        retry = client.post(SAVE, content=body(*ids), headers={"Idempotency-Key": "part"})
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    doc = retry.json()
    assert [a["id"] for a in doc["unchanged"]] == ["m0", "m1"]
    assert [a["id"] for a in doc["saved"]] == ["m2", "m3", "m4"]
    assert set(revs(live_server.service).values()) == {1}


def _kill_mid_request_then_retry(db: str, spawn_server: Callable[..., ServeProcess],
                                 held: Callable[[], bool]) -> None:
    """A save held inside its transaction (hang fault), its server SIGKILLed, a new server on
    the same database: the same request (key and body) is answered within 5 s and the
    messages are saved exactly once."""
    first = spawn_server(db, faults=True)
    httpx.post(first.url + "/_faults/script", json={"faults": [Fault.hang(60).to_json()],
                                                    "path": "/save$"}, timeout=5)
    payload = body("m1", "m2")
    failures: list[BaseException] = []

    def doomed() -> None:
        try:
            httpx.post(first.url + SAVE, content=payload, headers={"Idempotency-Key": "k"},
                       timeout=30)
        except httpx.TransportError as exc:
            failures.append(exc)

    thread = threading.Thread(target=doomed)
    thread.start()
    wait_until(held, 15, "the save to hold its transaction")
    first.kill()
    thread.join(10)
    assert failures, "the killed server never answered"

    second = spawn_server(db)
    started = time.monotonic()
    retry = httpx.post(second.url + SAVE, content=payload, headers={"Idempotency-Key": "k"},
                       timeout=10)
    assert time.monotonic() - started < 5, "the dead request held nothing up"
    assert retry.status_code == 200, retry.text
    assert "idempotent-replayed" not in retry.headers, "the dead request committed nothing"
    assert [a["id"] for a in retry.json()["saved"]] == ["m1", "m2"]
    again = httpx.post(second.url + SAVE, content=payload, headers={"Idempotency-Key": "k"},
                       timeout=10)
    assert again.headers.get("idempotent-replayed") == "true" and again.content == retry.content
    page = httpx.get(second.url + "/api/v1/chats/c1/messages?include_deleted=true",
                     timeout=10).json()
    assert [(m["id"], m["rev"]) for m in page["messages"]] == [("m1", 1), ("m2", 1)]


def test_killed_server_leaves_nothing_behind_sqlite(
        tmp_path: Path, spawn_server: Callable[..., ServeProcess]) -> None:
    db = tmp_path / "killed.db"
    _kill_mid_request_then_retry(str(db), spawn_server,
                                 lambda: db.exists() and _write_locked(db))


@pytest.mark.postgres
def test_killed_server_leaves_nothing_behind_postgres(
        pg_url: str, spawn_server: Callable[..., ServeProcess]) -> None:
    import psycopg

    def held() -> bool:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND query LIKE 'SELECT%%idempotency%%'"
            ).fetchone()
        return bool(row and row[0])

    _kill_mid_request_then_retry(pg_url, spawn_server, held)


def test_faults_log_counts_attempts(live_server: LiveServer) -> None:
    faults: Faults = live_server.faults
    faults.script(Fault.error(503), Fault.error(503), path="/save$")
    statuses = []
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        for _ in range(3):
            statuses.append(client.post(SAVE, content=body("m1"),
                                        headers={"Idempotency-Key": "k"}).status_code)
    assert statuses == [503, 503, 200]
    assert faults.attempts("k") == 3
    assert [r.fault for r in faults.requests("POST", "/save$")] == ["error", "error", "ok"]
    assert [r.status for r in faults.log] == [503, 503, 200]


def test_new_key_after_release_on_error(app: ChatsaveApp, client: AsgiClient) -> None:
    # A delete on a chat that does not exist answers 404 and keeps no record: once the chat
    # exists, the same key executes.
    r = client.post("/api/v1/chats/c9/delete", content=b'{"ids": ["m1"]}',
                    headers={"Idempotency-Key": "d"})
    assert r.status_code == 404
    saved = client.post("/api/v1/chats/c9/save", content=body("m1", chat="c9"),
                        headers={"Idempotency-Key": "s"})
    assert saved.json()["saved"], saved.text
    r = client.post("/api/v1/chats/c9/delete", content=b'{"ids": ["m1"]}',
                    headers={"Idempotency-Key": "d"})
    assert r.status_code == 200 and [d["id"] for d in r.json()["deleted"]] == ["m1"]
    assert str(uuid.UUID(app.state.storage.backend_id))
