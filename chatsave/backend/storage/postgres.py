"""The PostgreSQL storage engine: psycopg 3 with a connection pool, its own migrations.

Any number of server processes may share one database: writers of one chat are serialised
by a row lock on the chat (``SELECT ... FOR UPDATE``), writers of one idempotency key by a
row lock on its record (or, for a new key, by the unique key (user, key) its insert
waits on), and migrations by an advisory lock. A writer waits at most ``timeout_s`` for a
lock, then the request is answered 503. Nothing that matters is kept in process memory.

PostgreSQL text cannot hold U+0000, which a chat title may contain: titles are stored
escaped (a backslash doubled, U+0000 as a backslash and a zero; ``_escape``) and decoded on
read, so both engines keep exactly the title they were sent. Every other text column holds
ids that cannot contain control characters, or JSON text, which escapes U+0000.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

from chatsave.backend.storage.base import StorageError, StorageUnavailable, WriteTx
from chatsave.backend.storage.shared import Dialect, SqlStorage, SqlTx

try:  # the "postgres" extra
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - depends on the installation
    psycopg = None  # type: ignore[assignment]

_MIGRATION_LOCK = 0x63686174  # "chat": pg_advisory_xact_lock key for migrations

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("initial", [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE chats (
            user_id       TEXT COLLATE "C" NOT NULL,
            chat_id       TEXT COLLATE "C" NOT NULL,
            title         TEXT,
            version       BIGINT NOT NULL,
            message_count BIGINT NOT NULL,
            digest        TEXT NOT NULL,
            next_seq      BIGINT NOT NULL,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            PRIMARY KEY (user_id, chat_id)
        )""",
        """CREATE TABLE messages (
            user_id      TEXT COLLATE "C" NOT NULL,
            chat_id      TEXT COLLATE "C" NOT NULL,
            id           TEXT COLLATE "C" NOT NULL,
            seq          BIGINT NOT NULL,
            rev          BIGINT NOT NULL,
            content_hash TEXT NOT NULL,
            deleted      BOOLEAN NOT NULL DEFAULT FALSE,
            body         TEXT,
            updated_at   DOUBLE PRECISION NOT NULL,
            deleted_at   DOUBLE PRECISION,
            PRIMARY KEY (user_id, chat_id, id),
            UNIQUE (user_id, chat_id, seq),
            FOREIGN KEY (user_id, chat_id) REFERENCES chats (user_id, chat_id)
        )""",
        "CREATE INDEX messages_tombstones ON messages (deleted_at) WHERE deleted",
        """CREATE TABLE idempotency (
            user_id       TEXT COLLATE "C" NOT NULL,
            key           TEXT COLLATE "C" NOT NULL,
            fingerprint   TEXT NOT NULL,
            state         TEXT NOT NULL CHECK (state IN ('running', 'done')),
            lease_token   TEXT,
            lease_expires DOUBLE PRECISION,
            status        INTEGER,
            answer        TEXT,
            created_at    DOUBLE PRECISION NOT NULL,
            finished_at   DOUBLE PRECISION,
            PRIMARY KEY (user_id, key)
        )""",
        "CREATE INDEX idempotency_finished ON idempotency (finished_at)",
        "CREATE INDEX idempotency_lease ON idempotency (lease_expires)",
    ]),
    # Titles are stored escaped (_escape): a backslash already stored becomes two.
    ("title_escapes", [
        "UPDATE chats SET title = replace(title, '\\', '\\\\') WHERE strpos(title, '\\') > 0",
    ]),
]
LATEST = len(MIGRATIONS)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


#: seconds a health check waits for a pooled connection
PING_TIMEOUT_S = 3.0


def _translate(exc: Exception, url: str) -> StorageError:
    if isinstance(exc, PoolTimeout | psycopg.OperationalError):
        return StorageUnavailable(f"PostgreSQL at {_redact(url)} is unavailable: {exc}")
    return StorageError(f"PostgreSQL at {_redact(url)}: {exc}")


_ESCAPED = re.compile(r"\\([\\0])")


def _escape(title: str | None) -> str | None:
    """A title as stored: PostgreSQL text cannot hold U+0000, so it is written ``\\0``
    (and a backslash ``\\\\``, so that the form decodes back to the title it came from)."""
    if title is None or ("\\" not in title and "\0" not in title):
        return title
    return title.replace("\\", "\\\\").replace("\0", "\\0")


def _unescape(stored: str | None) -> str | None:
    """The title a stored (escaped) form stands for."""
    if stored is None or "\\" not in stored:
        return stored
    return _ESCAPED.sub(lambda m: "\0" if m.group(1) == "0" else "\\", stored)


class PgDialect(Dialect):
    """PostgreSQL's spelling of the shared SQL: ``%s``, row locks, arrays, escaped titles."""

    PLACEHOLDER = "%s"
    ID_CHUNK = 1000

    # Writers of one key queue on its record's row lock (a new key: on its unique index).
    GET_RECORD = Dialect.GET_RECORD.replace("?", "%s") + " FOR UPDATE"
    # Writers of one chat queue on its row lock.
    LOCK_CHAT = Dialect.LOCK_CHAT.replace("?", "%s") + " FOR UPDATE"

    @staticmethod
    def in_list(count: int) -> str:
        return "= ANY(%s)"  # one array parameter, whatever ``count``

    @staticmethod
    def in_args(values: list[str]) -> tuple[Any, ...]:
        return (values,)

    store_title = staticmethod(_escape)
    read_title = staticmethod(_unescape)


class PostgresStorage(SqlStorage):
    """Storage in a PostgreSQL database given by a ``postgresql://`` URL."""

    engine = "postgresql"
    sql = PgDialect

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10,
                 timeout_s: float = 30.0) -> None:
        if psycopg is None:  # pragma: no cover - depends on the installation
            raise StorageError(
                "PostgreSQL support is not installed; install chatsave[postgres]")
        self.url = url
        self._timeout_s = timeout_s
        self._lock_timeout_ms = max(1, int(timeout_s * 1000))
        try:
            self._pool = ConnectionPool(
                url, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False,
                kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                name="chatsave-server")
            self._pool.open(wait=True, timeout=timeout_s)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._pool.close()
            raise _translate(exc, url) from exc
        try:
            self._migrate()
            with self._tx() as conn:
                self.backend_id = self._read_backend_id(conn)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise _translate(exc, self.url) from exc

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        return self._tx()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[Any]:
        # The pool's wait is inside the try: a pool with no free connection is the storage
        # being unavailable (503), like in _tx, not an internal error.
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise _translate(exc, self.url) from exc

    def _change(self, *, durable: bool = True) -> contextlib.AbstractContextManager[Any]:
        return self._tx()

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._create_migrations_table(conn)
        for number, (name, statements) in enumerate(MIGRATIONS, start=1):
            with self._tx() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                if not self._migration_due(conn, number, LATEST,
                                           f"PostgreSQL database {_redact(self.url)}"):
                    continue
                for statement in statements:
                    conn.execute(statement)
                if number == 1:
                    conn.execute("INSERT INTO meta (key, value) VALUES ('backend_id', %s)",
                                 (str(uuid.uuid4()),))
                self._record_migration(conn, number, name)

    @contextlib.contextmanager
    def write(self) -> Iterator[WriteTx]:
        with self._tx() as conn:
            # A writer queued behind another (the same chat, the same key) gives up after
            # the timeout instead of waiting as long as the other holds its locks.
            conn.execute("SELECT set_config('lock_timeout', %s, true)",
                         (f"{self._lock_timeout_ms}ms",))
            yield SqlTx(conn, self.sql)

    def _live_lines(self, conn: Any, user: str, chat_id: str) -> Iterator[str]:
        # "C" is byte-wise order (sorted()).
        rows = _streamed(conn, "SELECT id || ':' || content_hash FROM messages"
                         " WHERE user_id = %s AND chat_id = %s AND NOT deleted"
                         " ORDER BY (id || ':' || content_hash) COLLATE \"C\"", (user, chat_id))
        return (r[0] for r in rows)

    def _bucket_lines(self, conn: Any, user: str, chat_id: str) -> Iterator[tuple[str, str]]:
        rows = _streamed(conn, "SELECT substr(content_hash, 1, 2), id || ':' || content_hash"
                         " FROM messages WHERE user_id = %s AND chat_id = %s AND NOT deleted"
                         " ORDER BY substr(content_hash, 1, 2) COLLATE \"C\","
                         " (id || ':' || content_hash) COLLATE \"C\"", (user, chat_id))
        return ((r[0], r[1]) for r in rows)

    def purge_tombstones(self, before: float) -> int:
        # Chat by chat, each under its chat's row lock (the order writers lock in), so a
        # purge never deadlocks with a save touching the same rows.
        with self._tx() as conn:
            chats = conn.execute(
                "SELECT DISTINCT user_id, chat_id FROM messages WHERE deleted "
                "AND deleted_at < %s", (before,)).fetchall()
        total = 0
        for user, chat_id in chats:
            with self._tx() as conn:
                conn.execute("SELECT 1 FROM chats WHERE user_id = %s AND chat_id = %s "
                             "FOR UPDATE", (user, chat_id))
                cur = conn.execute(
                    "DELETE FROM messages WHERE user_id = %s AND chat_id = %s AND deleted "
                    "AND deleted_at < %s", (user, chat_id, before))
                total += int(cur.rowcount)
        return total

    def housekeeping_due(self, interval_s: float, now: float) -> bool:
        with self._tx() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('housekeeping_at', '0') "
                         "ON CONFLICT (key) DO NOTHING")
            row = conn.execute("SELECT value FROM meta WHERE key = 'housekeeping_at' "
                               "FOR UPDATE").fetchone()
            if float(row[0]) + interval_s > now:
                return False
            conn.execute("UPDATE meta SET value = %s WHERE key = 'housekeeping_at'",
                         (repr(now),))
            return True

    def ping(self) -> None:
        # A health check answers within seconds (a load balancer's check times out), not
        # after the pool's full wait for a connection.
        try:
            with self._pool.connection(timeout=min(PING_TIMEOUT_S, self._timeout_s)) as conn:
                conn.execute("SELECT 1").fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise _translate(exc, self.url) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStorage({_redact(self.url)!r})"


def _streamed(conn: Any, sql: str, args: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``sql`` through a server-side cursor: streamed, whatever their number."""
    with conn.cursor(name=f"stream_{uuid.uuid4().hex}") as cur:
        cur.itersize = 2000
        cur.execute(sql, args)
        yield from cur
