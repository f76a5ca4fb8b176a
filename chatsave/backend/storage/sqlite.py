"""The SQLite storage engine: one file, WAL, synchronous=FULL, numbered migrations.

Every write is one ``BEGIN IMMEDIATE`` transaction, so writers (threads of one server or
several processes on one file) are serialised by SQLite's own lock, and a crash or kill
leaves the file as it was before the transaction (the OS drops a killed process's locks).
A writer waits at most ``busy_timeout_s`` for the lock, then the request is answered 503.
Reads run in deferred transactions and see one consistent snapshot (WAL lets them proceed
while a writer works).
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from chatsave.backend.storage.base import StorageError, StorageUnavailable, WriteTx
from chatsave.backend.storage.shared import SqlStorage, SqlTx
from chatsave.wal import set_wal

BUSY_TIMEOUT_S = 30.0
POOL_SIZE = 16


def _m0001_initial(conn: sqlite3.Connection) -> None:
    """Meta (backend id), chats, messages, idempotency records."""
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta (key, value) VALUES ('backend_id', ?)", (str(uuid.uuid4()),))
    conn.execute(
        """CREATE TABLE chats (
            user_id       TEXT NOT NULL,
            chat_id       TEXT NOT NULL,
            title         TEXT,
            version       INTEGER NOT NULL,
            message_count INTEGER NOT NULL,
            digest        TEXT NOT NULL,
            next_seq      INTEGER NOT NULL,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            PRIMARY KEY (user_id, chat_id)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        """CREATE TABLE messages (
            user_id      TEXT NOT NULL,
            chat_id      TEXT NOT NULL,
            id           TEXT NOT NULL,
            seq          INTEGER NOT NULL,
            rev          INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            deleted      INTEGER NOT NULL DEFAULT 0,
            body         TEXT,
            updated_at   REAL NOT NULL,
            deleted_at   REAL,
            PRIMARY KEY (user_id, chat_id, id),
            UNIQUE (user_id, chat_id, seq),
            FOREIGN KEY (user_id, chat_id) REFERENCES chats (user_id, chat_id)
        )"""
    )
    conn.execute("CREATE INDEX messages_tombstones ON messages (deleted_at) WHERE deleted = 1")
    conn.execute(
        """CREATE TABLE idempotency (
            user_id       TEXT NOT NULL,
            key           TEXT NOT NULL,
            fingerprint   TEXT NOT NULL,
            state         TEXT NOT NULL CHECK (state IN ('running', 'done')),
            lease_token   TEXT,
            lease_expires REAL,
            status        INTEGER,
            answer        TEXT,
            created_at    REAL NOT NULL,
            finished_at   REAL,
            PRIMARY KEY (user_id, key)
        ) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX idempotency_finished ON idempotency (finished_at)")
    conn.execute("CREATE INDEX idempotency_lease ON idempotency (lease_expires)")


MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("initial", _m0001_initial),
]
LATEST = len(MIGRATIONS)


def _translate(exc: sqlite3.Error, path: Path) -> StorageError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc):
        return StorageUnavailable(f"server database {path} is busy: {exc}")
    return StorageError(f"server database {path}: {exc} ({name or type(exc).__name__})")


class SqliteStorage(SqlStorage):
    """Storage in one SQLite file; opened (and migrated) on construction."""

    engine = "sqlite"

    def __init__(self, path: str | Path, *, pool_size: int = POOL_SIZE,
                 busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the directory for {self.path}: {exc}") from exc
        try:
            with self._connection() as conn:
                try:
                    set_wal(conn)
                except sqlite3.Error as exc:
                    raise _translate(exc, self.path) from exc
                self._migrate(conn)
                self.backend_id = self._read_backend_id(conn)
        except BaseException:
            self.close()
            raise

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy_timeout_s)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StorageError(f"server database {self.path} is closed")
        if not self._slots.acquire(timeout=self._busy_timeout_s):
            raise StorageUnavailable(f"no free connection to {self.path}")
        try:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            finally:
                if self._closed:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                else:
                    if conn.in_transaction:
                        conn.rollback()
                    self._pool.put(conn)
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's turn to write, waited for at most the busy timeout.

        SQLite takes one writer at a time. Threads of this process queue on a lock, woken
        the moment it is free; left to SQLite, they would poll its lock with sleeps of up
        to 100 ms (profiled: half the server's time under 4 concurrent saves). Other
        processes sharing the file still meet SQLite's busy handler.
        """
        if not self._writer.acquire(timeout=self._busy_timeout_s):
            raise StorageUnavailable(f"server database {self.path} is busy: another write "
                                     f"held it for {self._busy_timeout_s:g} s")
        try:
            yield
        finally:
            self._writer.release()

    @contextlib.contextmanager
    def _tx(self, mode: str = "IMMEDIATE", *, durable: bool = True
            ) -> Iterator[sqlite3.Connection]:
        with self._writing() if mode == "IMMEDIATE" else contextlib.nullcontext(), \
                self._connection() as conn:
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(f"BEGIN {mode}")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise _translate(exc, self.path) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if not durable:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA synchronous = FULL")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._tx("DEFERRED")

    def _change(self, *, durable: bool = True
                ) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._tx("IMMEDIATE", durable=durable)

    # -- schema ------------------------------------------------------------------------

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            self._create_migrations_table(conn)
            for number, (name, migration) in enumerate(MIGRATIONS, start=1):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if self._migration_due(conn, number, LATEST, f"server database {self.path}"):
                        migration(conn)
                        self._record_migration(conn, number, name)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc

    # -- what differs from PostgreSQL --------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[WriteTx]:
        # BEGIN IMMEDIATE takes the file's write lock: the records and chats read are locked.
        with self._tx("IMMEDIATE") as conn:
            yield SqlTx(conn, self.sql)

    def _live_lines(self, conn: sqlite3.Connection, user: str, chat_id: str
                    ) -> Iterator[str]:
        lines = conn.execute(
            "SELECT id || ':' || content_hash AS line FROM messages WHERE user_id = ? "
            "AND chat_id = ? AND deleted = 0 ORDER BY line", (user, chat_id))
        return (line for line, in lines)

    def _bucket_lines(self, conn: sqlite3.Connection, user: str, chat_id: str
                      ) -> Iterator[tuple[str, str]]:
        return iter(conn.execute(
            "SELECT substr(content_hash, 1, 2) AS bucket, id || ':' || content_hash AS line"
            " FROM messages WHERE user_id = ? AND chat_id = ? AND deleted = 0"
            " ORDER BY bucket, line", (user, chat_id)))

    def purge_tombstones(self, before: float) -> int:
        with self._tx("IMMEDIATE") as conn:
            cur = conn.execute("DELETE FROM messages WHERE deleted = 1 AND deleted_at < ?",
                               (before,))
            return cur.rowcount

    def housekeeping_due(self, interval_s: float, now: float) -> bool:
        with self._tx("IMMEDIATE") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'housekeeping_at'").fetchone()
            if row is not None and float(row[0]) + interval_s > now:
                return False
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('housekeeping_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (repr(now),))
            return True

    def ping(self) -> None:
        try:
            with self._connection() as conn:
                conn.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"server database {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def __repr__(self) -> str:
        return f"SqliteStorage({str(self.path)!r})"
