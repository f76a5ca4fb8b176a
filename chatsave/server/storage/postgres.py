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
from datetime import UTC, datetime
from typing import Any

from chatsave.model import digest_of_sorted_lines
from chatsave.server.storage.base import (
    EMPTY_DIGEST,
    ChatRow,
    IdempotencyRecord,
    MessageRow,
    Storage,
    StorageError,
    StorageUnavailable,
    WriteTx,
    chunks,
)

try:  # the "postgres" extra
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - depends on the installation
    psycopg = None  # type: ignore[assignment]

_MIGRATION_LOCK = 0x63686174  # "chat": pg_advisory_xact_lock key for migrations
_ID_CHUNK = 1000

_CHAT_COLS = ("user_id, chat_id, title, version, message_count, digest, next_seq, "
              "created_at, updated_at")
_MSG_COLS = "id, seq, rev, content_hash, deleted, body, updated_at, deleted_at"

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


def _chat(row: Any) -> ChatRow:
    return ChatRow(user=row[0], chat_id=row[1], title=_unescape(row[2]), version=row[3],
                   message_count=row[4], digest=row[5], next_seq=row[6], created_at=row[7],
                   updated_at=row[8])


def _message(row: Any) -> MessageRow:
    return MessageRow(id=row[0], seq=row[1], rev=row[2], content_hash=row[3],
                      deleted=bool(row[4]), body=row[5], updated_at=row[6], deleted_at=row[7])


class _PgTx(WriteTx):
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def get_record(self, user: str, key: str) -> IdempotencyRecord | None:
        row = self.conn.execute(
            "SELECT fingerprint, state, lease_expires, status, answer FROM idempotency "
            "WHERE user_id = %s AND key = %s FOR UPDATE", (user, key)).fetchone()
        return IdempotencyRecord(*row) if row else None

    def put_record(self, user: str, key: str, fingerprint: str, status: int, answer: str,
                   now: float, *, replace: bool) -> bool:
        if replace:
            cur = self.conn.execute(
                "UPDATE idempotency SET fingerprint = %s, state = 'done', status = %s, "
                "answer = %s, finished_at = %s, lease_token = NULL, lease_expires = NULL "
                "WHERE user_id = %s AND key = %s",
                (fingerprint, status, answer, now, user, key))
        else:
            # Waits for a concurrent transaction inserting the same key; if it commits,
            # nothing is inserted here.
            cur = self.conn.execute(
                "INSERT INTO idempotency (user_id, key, fingerprint, state, status, answer, "
                "created_at, finished_at) VALUES (%s, %s, %s, 'done', %s, %s, %s, %s) "
                "ON CONFLICT (user_id, key) DO NOTHING",
                (user, key, fingerprint, status, answer, now, now))
        return bool(cur.rowcount == 1)

    def lock_chat(self, user: str, chat_id: str) -> ChatRow | None:
        row = self.conn.execute(
            f"SELECT {_CHAT_COLS} FROM chats WHERE user_id = %s AND chat_id = %s FOR UPDATE",
            (user, chat_id)).fetchone()
        return _chat(row) if row else None

    def create_chat(self, user: str, chat_id: str, now_text: str) -> ChatRow:
        self.conn.execute(
            "INSERT INTO chats (user_id, chat_id, title, version, message_count, digest, "
            "next_seq, created_at, updated_at) VALUES (%s, %s, NULL, 0, 0, %s, 1, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (user, chat_id, EMPTY_DIGEST, now_text, now_text))
        found = self.lock_chat(user, chat_id)
        assert found is not None
        return found

    def get_messages(self, user: str, chat_id: str, ids: list[str]) -> dict[str, MessageRow]:
        out: dict[str, MessageRow] = {}
        for part in chunks(ids, _ID_CHUNK):
            rows = self.conn.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE user_id = %s AND chat_id = %s "
                "AND id = ANY(%s)", (user, chat_id, part))
            for row in rows:
                msg = _message(row)
                out[msg.id] = msg
        return out

    def insert_messages(self, user: str, chat_id: str, rows: list[MessageRow]) -> None:
        if not rows:
            return
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO messages (user_id, chat_id, id, seq, rev, content_hash, deleted, "
                "body, updated_at, deleted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(user, chat_id, row.id, row.seq, row.rev, row.content_hash, row.deleted,
                  row.body, row.updated_at, row.deleted_at) for row in rows])

    def update_message(self, user: str, chat_id: str, row: MessageRow) -> None:
        self.conn.execute(
            "UPDATE messages SET rev = %s, content_hash = %s, deleted = %s, body = %s, "
            "updated_at = %s, deleted_at = %s WHERE user_id = %s AND chat_id = %s AND id = %s",
            (row.rev, row.content_hash, row.deleted, row.body, row.updated_at,
             row.deleted_at, user, chat_id, row.id))

    def save_chat(self, row: ChatRow) -> None:
        self.conn.execute(
            "UPDATE chats SET title = %s, version = %s, message_count = %s, digest = %s, "
            "next_seq = %s, updated_at = %s WHERE user_id = %s AND chat_id = %s",
            (_escape(row.title), row.version, row.message_count, row.digest, row.next_seq,
             row.updated_at, row.user, row.chat_id))


class PostgresStorage(Storage):
    """Storage in a PostgreSQL database given by a ``postgresql://`` URL."""

    engine = "postgresql"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10,
                 timeout_s: float = 30.0) -> None:
        if psycopg is None:  # pragma: no cover - depends on the installation
            raise StorageError(
                "PostgreSQL support is not installed; install chatsave[postgres]")
        self.url = url
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
                self.backend_id = conn.execute(
                    "SELECT value FROM meta WHERE key = 'backend_id'").fetchone()[0]
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

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        for number, (name, statements) in enumerate(MIGRATIONS, start=1):
            with self._tx() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                current = conn.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
                if current > LATEST:
                    raise StorageError(
                        f"PostgreSQL database {_redact(self.url)} has schema version {current}, "
                        f"newer than this chatsave knows ({LATEST}); upgrade chatsave")
                if current >= number:
                    continue
                for statement in statements:
                    conn.execute(statement)
                if number == 1:
                    conn.execute("INSERT INTO meta (key, value) VALUES ('backend_id', %s)",
                                 (str(uuid.uuid4()),))
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) "
                    "VALUES (%s, %s, %s)", (number, name, datetime.now(UTC).isoformat()))

    def schema_version(self) -> int:
        with self._tx() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

    @contextlib.contextmanager
    def write(self) -> Iterator[WriteTx]:
        with self._tx() as conn:
            # A writer queued behind another (the same chat, the same key) gives up after
            # the timeout instead of waiting as long as the other holds its locks.
            conn.execute("SELECT set_config('lock_timeout', %s, true)",
                         (f"{self._lock_timeout_ms}ms",))
            yield _PgTx(conn)

    def compute_digest(self, user: str, chat_id: str) -> tuple[int, str] | None:
        with self._tx() as conn:
            row = conn.execute("SELECT version FROM chats WHERE user_id = %s AND chat_id = %s",
                               (user, chat_id)).fetchone()
            if row is None:
                return None
            # A server-side cursor streams the lines; "C" is byte-wise order (sorted()).
            with conn.cursor(name=f"digest_{uuid.uuid4().hex}") as cur:
                cur.itersize = 2000
                cur.execute(
                    "SELECT id || ':' || content_hash FROM messages WHERE user_id = %s "
                    "AND chat_id = %s AND NOT deleted "
                    "ORDER BY (id || ':' || content_hash) COLLATE \"C\"",
                    (user, chat_id))
                return int(row[0]), digest_of_sorted_lines(r[0] for r in cur)

    def store_digests(self, user: str, digests: list[tuple[str, int, str]]) -> None:
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany("UPDATE chats SET digest = %s WHERE user_id = %s AND chat_id = %s "
                            "AND version = %s",
                            [(digest, user, chat_id, version)
                             for chat_id, version, digest in digests])

    def list_chats(self, user: str, after: str | None, limit: int) -> list[ChatRow]:
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {_CHAT_COLS} FROM chats WHERE user_id = %s AND chat_id > %s "
                "ORDER BY chat_id LIMIT %s", (user, after or "", limit)).fetchall()
        return [_chat(r) for r in rows]

    def get_chats(self, user: str, chat_ids: list[str]) -> dict[str, ChatRow]:
        out: dict[str, ChatRow] = {}
        with self._tx() as conn:
            for part in chunks(chat_ids, _ID_CHUNK):
                for row in conn.execute(
                        f"SELECT {_CHAT_COLS} FROM chats WHERE user_id = %s "
                        "AND chat_id = ANY(%s)", (user, part)):
                    chat = _chat(row)
                    out[chat.chat_id] = chat
        return out

    def read_messages(self, user: str, chat_id: str, after: int, limit: int,
                      include_deleted: bool) -> tuple[ChatRow | None, list[MessageRow]]:
        with self._pool.connection() as conn:
            try:
                with conn.transaction():
                    # One snapshot for the chat row and the page.
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    row = conn.execute(
                        f"SELECT {_CHAT_COLS} FROM chats WHERE user_id = %s AND chat_id = %s",
                        (user, chat_id)).fetchone()
                    if row is None:
                        return None, []
                    live = "" if include_deleted else " AND NOT deleted"
                    rows = conn.execute(
                        f"SELECT {_MSG_COLS} FROM messages WHERE user_id = %s AND chat_id = %s "
                        f"AND seq > %s{live} ORDER BY seq LIMIT %s",
                        (user, chat_id, after, limit)).fetchall()
            except psycopg.Error as exc:
                raise _translate(exc, self.url) from exc
        return _chat(row), [_message(r) for r in rows]

    def purge_idempotency(self, before: float) -> int:
        with self._tx() as conn:
            cur = conn.execute(
                "DELETE FROM idempotency WHERE (state = 'done' AND finished_at < %s) "
                "OR (state = 'running' AND lease_expires < %s)", (before, before))
            return int(cur.rowcount)

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
        with self._tx() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStorage({_redact(self.url)!r})"
