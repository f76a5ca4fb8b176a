"""The server's storage engines: schema and migrations, backend id, idempotency records,
concurrency, titles."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsave.backend.storage import (
    MessageRow,
    Storage,
    StorageError,
    StorageUnavailable,
    open_storage,
    sqlite_path,
)
from chatsave.backend.storage import postgres as pg_engine
from chatsave.backend.storage import sqlite as sqlite_engine
from chatsave.backend.storage.base import EMPTY_DIGEST, IdempotencyRecord
from chatsave.errors import UsageError
from chatsave.model import chat_digest
from tests.server_fixtures import PgCluster

TABLES = {"meta", "schema_migrations", "chats", "messages", "idempotency"}
COLUMNS = {
    "chats": {"user_id", "chat_id", "title", "version", "message_count", "digest", "next_seq",
              "created_at", "updated_at"},
    "messages": {"user_id", "chat_id", "id", "seq", "rev", "content_hash", "deleted", "body",
                 "updated_at", "deleted_at"},
    "idempotency": {"user_id", "key", "fingerprint", "state", "lease_token", "lease_expires",
                    "status", "answer", "created_at", "finished_at"},
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        return cluster.create_database()
    return str(tmp_path / "server.db")


@pytest.fixture
def storage(location: str) -> Iterator[Storage]:
    store = open_storage(location)
    yield store
    store.close()


def _schema(location: str) -> dict[str, set[str]]:
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location) as conn:
            rows = conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema = 'public'").fetchall()
    else:
        conn = sqlite3.connect(location)
        try:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            rows = [(t, c[1]) for t in tables for c in conn.execute(f"PRAGMA table_info({t})")]
        finally:
            conn.close()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out


def test_blank_database_is_migrated(location: str, storage: Storage) -> None:
    schema = _schema(location)
    assert set(schema) == TABLES
    for table, columns in COLUMNS.items():
        assert schema[table] == columns
    engine = pg_engine if storage.engine == "postgresql" else sqlite_engine
    assert storage.schema_version() == engine.LATEST == len(engine.MIGRATIONS)


def test_backend_id_is_fixed_at_creation(location: str, storage: Storage) -> None:
    first = storage.backend_id
    with open_storage(location) as again:
        assert again.backend_id == first
        assert again.schema_version() == storage.schema_version()


def test_newer_schema_is_refused(location: str, storage: Storage) -> None:
    with storage.write() as tx:
        conn: Any = tx.conn  # type: ignore[attr-defined]
        mark = "%s" if storage.engine == "postgresql" else "?"
        conn.execute(f"INSERT INTO schema_migrations (version, name, applied_at) "
                     f"VALUES (99, 'future', {mark})", ("2099",))
    with pytest.raises(StorageError, match="newer than this chatsave knows"):
        open_storage(location)


def test_concurrent_opens_migrate_once(location: str) -> None:
    errors: list[BaseException] = []
    ids: list[str] = []

    def open_one() -> None:
        try:
            with open_storage(location) as store:
                ids.append(store.backend_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(set(ids)) == 1 and len(ids) == 6


def test_write_rolls_back_on_error(storage: Storage) -> None:
    with pytest.raises(RuntimeError), storage.write() as tx:
        chat = tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
        tx.insert_messages("u", "c1", [MessageRow("m1", 1, 1, "h", False, "{}", 0.0)])
        chat.version = 1
        tx.save_chat(chat)
        raise RuntimeError("abort")
    assert storage.get_chats("u", ["c1"]) == {}
    with storage.write() as tx:
        assert tx.lock_chat("u", "c1") is None


def test_rows_round_trip(storage: Storage) -> None:
    with storage.write() as tx:
        chat = tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
        assert (chat.version, chat.message_count, chat.digest, chat.next_seq) == \
            (0, 0, EMPTY_DIGEST, 1)
        tx.insert_messages("u", "c1", [
            MessageRow("m1", 1, 1, "h1", False, '{"a":"\\u0000"}', 1.5),
            MessageRow("m2", 2, 3, "h2", True, None, 2.5, 2.5)])
        chat.title, chat.version, chat.next_seq = '"T"', 1, 3
        tx.save_chat(chat)
    assert storage.compute_digest("u", "c1") == (1, chat_digest([("m1", "h1")]))
    assert storage.compute_digest("u", "nope") is None
    chat_row, rows = storage.read_messages("u", "c1", 0, 10, include_deleted=True)
    assert chat_row is not None and (chat_row.title, chat_row.version) == ('"T"', 1)
    assert [(r.id, r.seq, r.rev, r.deleted, r.body) for r in rows] == \
        [("m1", 1, 1, False, '{"a":"\\u0000"}'), ("m2", 2, 3, True, None)]
    _, live = storage.read_messages("u", "c1", 0, 10, include_deleted=False)
    assert [r.id for r in live] == ["m1"]
    assert storage.read_messages("other", "c1", 0, 10, True) == (None, [])
    assert storage.purge_tombstones(3.0) == 1
    assert [r.id for r in storage.read_messages("u", "c1", 0, 10, True)[1]] == ["m1"]


def test_streamed_digest_sorts_like_python(storage: Storage) -> None:
    """The database orders id:hash lines byte-wise, exactly as sorted() does."""
    ids = ["a", "a-b", "a:b", "a.b", "B", "b", "é", "z\u4e2d", "~x", "a b", "😀"]
    with storage.write() as tx:
        tx.create_chat("u", "c", "2026-01-01T00:00:00.000Z")
        tx.insert_messages("u", "c", [MessageRow(mid, n, 1, f"h{n}", False, "{}", 0.0)
                                      for n, mid in enumerate(ids, start=1)])
    expected = chat_digest((mid, f"h{n}") for n, mid in enumerate(ids, start=1))
    assert storage.compute_digest("u", "c") == (0, expected)
    storage.store_digests("u", [("c", 0, expected)])
    assert storage.get_chats("u", ["c"])["c"].digest == expected
    storage.store_digests("u", [("c", 7, "stale")])  # another version: not remembered
    assert storage.get_chats("u", ["c"])["c"].digest == expected


def test_chat_ids_order_bytewise(storage: Storage) -> None:
    names = ["b", "B", "a", "a.b", "a-b", "~", "0", "a:b", "a@b", "_"]
    with storage.write() as tx:
        for name in names:
            tx.create_chat("u", name, "2026-01-01T00:00:00.000Z")
    listed = [c.chat_id for c in storage.list_chats("u", None, 100)]
    assert listed == sorted(names, key=lambda s: s.encode())
    after_a = listed[listed.index("a") + 1:]
    assert [c.chat_id for c in storage.list_chats("u", "a", 3)] == after_a[:3]


def test_record_lifecycle(storage: Storage) -> None:
    with storage.write() as tx:
        assert tx.get_record("u", "k") is None
        assert tx.put_record("u", "k", "fp", 200, '{"ok": 1}', 100.0, replace=False)
        assert not tx.put_record("u", "k", "other", 200, "{}", 100.0, replace=False), \
            "a key has one record"
        assert tx.put_record("v", "k", "fp2", 200, '{"v": 1}', 101.0, replace=False), \
            "keys are per user"
    with storage.write() as tx:
        found = tx.get_record("u", "k")
        assert found == IdempotencyRecord("fp", "done", None, 200, '{"ok": 1}')
        assert tx.put_record("u", "k", "fp", 200, '{"ok": 2}', 110.0, replace=True)
    with storage.write() as tx:
        assert tx.get_record("u", "k") == IdempotencyRecord("fp", "done", None, 200,
                                                            '{"ok": 2}')
    assert storage.purge_idempotency(105.0) == 1, "v's record finished at 101, u's at 110"
    assert storage.purge_idempotency(1000.0) == 1
    with storage.write() as tx:
        assert tx.get_record("u", "k") is None


def test_record_rolls_back_with_the_write(storage: Storage) -> None:
    """A request that dies inside its transaction leaves no record: nothing to wait for."""
    with pytest.raises(RuntimeError), storage.write() as tx:
        tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
        tx.put_record("u", "k", "fp", 200, "{}", 100.0, replace=False)
        raise RuntimeError("killed")
    with storage.write() as tx:
        assert tx.get_record("u", "k") is None and tx.lock_chat("u", "c1") is None


def test_concurrent_writers_of_one_key_serialise(storage: Storage) -> None:
    """Writers that lock the chat first and then read the key's record: exactly one finds
    no record and writes it, every other one finds that committed record."""
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def write() -> None:
        barrier.wait(10)
        with storage.write() as tx:
            if tx.lock_chat("u", "c1") is None:
                tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
            if tx.get_record("u", "same") is not None:
                outcomes.append("found")
            elif tx.put_record("u", "same", "fp", 200, "{}", 50.0, replace=False):
                outcomes.append("written")
            else:
                outcomes.append("lost")

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["found"] * 7 + ["written"]


def test_insert_of_a_key_committed_meanwhile_is_refused(storage: Storage) -> None:
    """Two writers of one key on different chats (no common chat lock): the second insert
    reports the first writer's record instead of failing."""
    first_in = threading.Event()
    release = threading.Event()
    second: list[bool] = []

    def other() -> None:
        first_in.wait(10)
        with storage.write() as tx:
            second.append(tx.put_record("u", "k", "fp-b", 200, "{}", 2.0, replace=False))

    thread = threading.Thread(target=other)
    thread.start()
    with storage.write() as tx:
        assert tx.put_record("u", "k", "fp-a", 200, "{}", 1.0, replace=False)
        first_in.set()
        release.wait(0.3)  # the other writer queues meanwhile
    thread.join(30)
    assert second == [False]
    with storage.write() as tx:
        found = tx.get_record("u", "k")
        assert found is not None and found.fingerprint == "fp-a"


def test_waiting_writer_gives_up_after_the_timeout(location: str) -> None:
    """A writer queued behind a transaction that does not end answers 'unavailable' after
    the storage's timeout instead of waiting as long as the other holds its locks."""
    if location.startswith("postgresql://"):
        store = pg_engine.PostgresStorage(location, timeout_s=1.0)
    else:
        store = sqlite_engine.SqliteStorage(location, busy_timeout_s=1.0)
    try:
        with store.write() as tx:
            tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
        errors: list[BaseException] = []
        holding = threading.Event()
        done = threading.Event()

        def holder() -> None:
            with store.write() as tx:
                tx.lock_chat("u", "c1")
                holding.set()
                done.wait(10)

        thread = threading.Thread(target=holder)
        thread.start()
        holding.wait(10)
        started = time.monotonic()
        try:
            with store.write() as tx:
                tx.lock_chat("u", "c1")
        except StorageUnavailable as exc:
            errors.append(exc)
        waited = time.monotonic() - started
        done.set()
        thread.join(10)
        assert len(errors) == 1 and 0.8 <= waited < 5, (errors, waited)
    finally:
        store.close()


def test_housekeeping_due_is_claimed_once(storage: Storage) -> None:
    assert storage.housekeeping_due(60, 1000.0)
    assert not storage.housekeeping_due(60, 1030.0)
    assert storage.housekeeping_due(60, 1061.0)


def test_closed_storage_refuses(location: str) -> None:
    store = open_storage(location)
    store.close()
    with pytest.raises(StorageError):
        store.list_chats("u", None, 1)


def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "s.db"
    with open_storage(f"file:{path}") as store:
        conn: Any = None
        with store.write() as tx:
            conn = tx.conn  # type: ignore[attr-defined]
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert path.exists()


def test_sqlite_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=r"bad\.db"):
        open_storage(bad)


def test_sqlite_path_forms(tmp_path: Path) -> None:
    assert sqlite_path("file:rel/x.db") == Path("rel/x.db")
    assert sqlite_path("file:/abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("file:///abs/x%20y.db") == Path("/abs/x y.db")
    assert sqlite_path("file://localhost/abs/x.db") == Path("/abs/x.db")
    assert sqlite_path(tmp_path / "x.db") == tmp_path / "x.db"
    with pytest.raises(UsageError, match="another host"):
        sqlite_path("file://server/x.db")
    with pytest.raises(UsageError):
        sqlite_path("")


@pytest.mark.postgres
def test_postgres_unreachable_is_unavailable(pg_cluster: PgCluster) -> None:
    port = pg_cluster.port
    url = f"postgresql://postgres:secret@127.0.0.1:{port + 1 if port < 65535 else 1}/none"
    with pytest.raises(StorageUnavailable) as err:
        pg_engine.PostgresStorage(url, timeout_s=1)
    assert "secret" not in str(err.value), "the password is never shown"


TITLES = ["plain", "nul\x00inside", "\x00", "back\\slash", "\\0 is not a NUL", "\\\x00\\\\0",
          "tab\tand\u2028line", "😀 \\u0000"]


def test_titles_round_trip_exactly(storage: Storage) -> None:
    """Whatever a title holds (U+0000 and backslashes included), it reads back the same."""
    with storage.write() as tx:
        for n, title in enumerate(TITLES):
            chat = tx.create_chat("u", f"c{n}", "2026-01-01T00:00:00.000Z")
            chat.title = title
            tx.save_chat(chat)
    found = storage.get_chats("u", [f"c{n}" for n in range(len(TITLES))])
    assert [found[f"c{n}"].title for n in range(len(TITLES))] == TITLES
    assert [c.title for c in storage.list_chats("u", None, 100)] == \
        [TITLES[n] for n in sorted(range(len(TITLES)), key=lambda n: f"c{n}")]
    with storage.write() as tx:
        assert [tx.lock_chat("u", f"c{n}").title  # type: ignore[union-attr]
                for n in range(len(TITLES))] == TITLES


@pytest.mark.postgres
def test_postgres_titles_stored_before_escaping_are_migrated(
        pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    url = pg_cluster.create_database()
    with monkeypatch.context() as patch:
        patch.setattr(pg_engine, "MIGRATIONS", pg_engine.MIGRATIONS[:1])
        patch.setattr(pg_engine, "LATEST", 1)
        with open_storage(url) as old:
            assert old.schema_version() == 1
    with psycopg.connect(url, autocommit=True) as conn:  # titles as version 1 stored them
        conn.execute("INSERT INTO chats VALUES ('u', 'c1', %s, 1, 0, '', 1, 'x', 'x'), "
                     "('u', 'c2', 'no escapes', 1, 0, '', 1, 'x', 'x'), "
                     "('u', 'c3', NULL, 1, 0, '', 1, 'x', 'x')", ("a\\0b\\\\c\\",))
    with open_storage(url) as store:
        assert store.schema_version() == pg_engine.LATEST == 2
        found = store.get_chats("u", ["c1", "c2", "c3"])
        assert [found[c].title for c in ("c1", "c2", "c3")] == \
            ["a\\0b\\\\c\\", "no escapes", None]
    with open_storage(url) as again:
        assert again.get_chats("u", ["c1"])["c1"].title == "a\\0b\\\\c\\", "migrated once"


@pytest.mark.postgres
def test_postgres_pool_exhausted_is_unavailable_on_every_path(pg_cluster: PgCluster) -> None:
    """With every pooled connection held, each read and write gives up after the timeout as
    StorageUnavailable (a 503 to the client, with Retry-After), never another error."""
    from chatsave.backend.service import Service

    url = pg_cluster.create_database()
    storage = pg_engine.PostgresStorage(url, max_size=1, timeout_s=0.3)
    try:
        with storage.write() as tx:
            tx.create_chat("u", "c1", "2026-01-01T00:00:00.000Z")
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with storage.write():
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(10)
            reads = {
                "read_messages": lambda: storage.read_messages("u", "c1", 0, 10, False),
                "list_chats": lambda: storage.list_chats("u", None, 10),
                "get_chats": lambda: storage.get_chats("u", ["c1"]),
                "compute_digest": lambda: storage.compute_digest("u", "c1"),
                "write": lambda: storage.write().__enter__(),
                "ping": storage.ping,
            }
            for call in reads.values():
                with pytest.raises(StorageUnavailable):
                    call()
            status, answer, headers = Service(storage).messages("u", "c1")
            assert status == 503 and answer["error"]["code"] == "storage_unavailable"
            assert "Retry-After" in headers
        finally:
            release.set()
            holder.join(10)
        assert storage.read_messages("u", "c1", 0, 10, False)[0] is not None
    finally:
        storage.close()
        pg_cluster.drop_database(url)
