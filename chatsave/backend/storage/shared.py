"""What the SQLite and PostgreSQL engines share: the SQL both run, and the methods running it.

``Dialect`` holds every SQL text the two engines have in common, written once in SQLite's
spelling (``?`` placeholders). PostgreSQL's dialect is a subclass that names its own
placeholder (every text it does not write itself is respelled with it when the class is
made) and writes the few texts that differ by more: row locks (``FOR UPDATE``), id lists
(``= ANY(array)``), titles (escaped). ``SqlTx`` and ``SqlStorage`` run the texts over any
DB-API connection; an engine keeps what really differs: connections, transactions and
locking, migrations, the digest query, purging tombstones and claiming housekeeping.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, ClassVar

from chatsave.backend.storage.base import (
    EMPTY_DIGEST,
    ChatRow,
    IdempotencyRecord,
    MessageRow,
    Storage,
    StorageError,
    WriteTx,
    chunks,
)
from chatsave.model import bucket_digests, digest_of_sorted_lines

CHAT_COLS = ("user_id, chat_id, title, version, message_count, digest, next_seq, "
             "created_at, updated_at")
MSG_COLS = "id, seq, rev, content_hash, deleted, body, updated_at, deleted_at"


class Dialect:
    """The SQL texts both engines run, in SQLite's spelling; a subclass spells them its way.

    A subclass sets ``PLACEHOLDER``: every text (an upper-case ``str`` attribute of this
    class) that the subclass does not set itself is written again with that placeholder in
    place of each ``?`` (no text holds a ``?`` or a ``%`` that is not a placeholder).
    """

    PLACEHOLDER = "?"
    #: ids one statement looks up (the engine's limit on parameters)
    ID_CHUNK = 500

    GET_RECORD = ("SELECT fingerprint, state, lease_expires, status, answer FROM idempotency "
                  "WHERE user_id = ? AND key = ?")
    FINISH_RECORD = ("UPDATE idempotency SET fingerprint = ?, state = 'done', status = ?, "
                     "answer = ?, finished_at = ?, lease_token = NULL, lease_expires = NULL "
                     "WHERE user_id = ? AND key = ?")
    INSERT_RECORD = ("INSERT INTO idempotency (user_id, key, fingerprint, state, status, "
                     "answer, created_at, finished_at) VALUES (?, ?, ?, 'done', ?, ?, ?, ?) "
                     "ON CONFLICT (user_id, key) DO NOTHING")
    PURGE_RECORDS = ("DELETE FROM idempotency WHERE (state = 'done' AND finished_at < ?) "
                     "OR (state = 'running' AND lease_expires < ?)")

    CHAT = f"SELECT {CHAT_COLS} FROM chats WHERE user_id = ? AND chat_id = ?"
    #: the chat row, locked against other writers (SQLite: the write holds the file's lock)
    LOCK_CHAT = CHAT
    #: followed by ``in_list``
    CHATS_WHERE_ID = f"SELECT {CHAT_COLS} FROM chats WHERE user_id = ? AND chat_id"
    LIST_CHATS = (f"SELECT {CHAT_COLS} FROM chats WHERE user_id = ? AND chat_id > ? "
                  "ORDER BY chat_id LIMIT ?")
    INSERT_CHAT = ("INSERT INTO chats (user_id, chat_id, title, version, message_count, "
                   "digest, next_seq, created_at, updated_at) "
                   "VALUES (?, ?, NULL, 0, 0, ?, 1, ?, ?) ON CONFLICT DO NOTHING")
    SAVE_CHAT = ("UPDATE chats SET title = ?, version = ?, message_count = ?, digest = ?, "
                 "next_seq = ?, updated_at = ? WHERE user_id = ? AND chat_id = ?")
    CHAT_VERSION = "SELECT version FROM chats WHERE user_id = ? AND chat_id = ?"
    STORE_DIGEST = ("UPDATE chats SET digest = ? WHERE user_id = ? AND chat_id = ? "
                    "AND version = ?")

    #: followed by ``in_list``
    MESSAGES_WHERE_ID = (f"SELECT {MSG_COLS} FROM messages WHERE user_id = ? AND chat_id = ? "
                         "AND id")
    READ_MESSAGES = (f"SELECT {MSG_COLS} FROM messages WHERE user_id = ? AND chat_id = ? "
                     "AND seq > ? ORDER BY seq LIMIT ?")
    #: followed by ``in_list`` and ``BUCKETS_PAGE``: the live messages of some buckets
    #: (docs/protocol.md, "Buckets"), with every tombstone (``_ALL``) or without
    READ_BUCKETS_ALL = (f"SELECT {MSG_COLS} FROM messages WHERE user_id = ? AND chat_id = ? "
                        "AND seq > ? AND (deleted OR substr(content_hash, 1, 2)")
    READ_BUCKETS_LIVE = (f"SELECT {MSG_COLS} FROM messages WHERE user_id = ? "
                         "AND chat_id = ? AND seq > ? AND (NOT deleted AND "
                         "substr(content_hash, 1, 2)")
    BUCKETS_PAGE = ") ORDER BY seq LIMIT ?"
    READ_LIVE_MESSAGES = (f"SELECT {MSG_COLS} FROM messages WHERE user_id = ? AND chat_id = ? "
                          "AND seq > ? AND NOT deleted ORDER BY seq LIMIT ?")
    INSERT_MESSAGES = ("INSERT INTO messages (user_id, chat_id, id, seq, rev, content_hash, "
                       "deleted, body, updated_at, deleted_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    UPDATE_MESSAGE = ("UPDATE messages SET rev = ?, content_hash = ?, deleted = ?, body = ?, "
                      "updated_at = ?, deleted_at = ? "
                      "WHERE user_id = ? AND chat_id = ? AND id = ?")

    CREATE_MIGRATIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER "
                         "PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
    CURRENT_VERSION = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
    RECORD_MIGRATION = ("INSERT INTO schema_migrations (version, name, applied_at) "
                        "VALUES (?, ?, ?)")
    SCHEMA_VERSION = "SELECT MAX(version) FROM schema_migrations"
    BACKEND_ID = "SELECT value FROM meta WHERE key = 'backend_id'"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        for name, text in vars(Dialect).items():
            if name.isupper() and isinstance(text, str) and name not in own:
                setattr(cls, name, text.replace("?", cls.PLACEHOLDER))

    @staticmethod
    def in_list(count: int) -> str:
        """The test that the column before it is one of ``count`` values (``in_args``)."""
        return f"IN ({','.join('?' * count)})"

    @staticmethod
    def in_args(values: list[str]) -> tuple[Any, ...]:
        """The parameters ``in_list`` takes for ``values``."""
        return tuple(values)

    @staticmethod
    def store_title(title: str | None) -> str | None:
        """A title as the engine stores it."""
        return title

    @staticmethod
    def read_title(stored: str | None) -> str | None:
        """The title a stored one stands for."""
        return stored

    @classmethod
    def chat(cls, row: Any) -> ChatRow:
        return ChatRow(user=row[0], chat_id=row[1], title=cls.read_title(row[2]),
                       version=row[3], message_count=row[4], digest=row[5], next_seq=row[6],
                       created_at=row[7], updated_at=row[8])

    @staticmethod
    def message(row: Any) -> MessageRow:
        return MessageRow(id=row[0], seq=row[1], rev=row[2], content_hash=row[3],
                          deleted=bool(row[4]), body=row[5], updated_at=row[6],
                          deleted_at=row[7])


class SqlTx(WriteTx):
    """One write transaction on ``conn``, in the engine's dialect ``sql``.

    The engine's transaction holds the locks ``GET_RECORD`` and ``LOCK_CHAT`` need: SQLite's
    write lock on the file, or PostgreSQL's row locks, which they take.
    """

    def __init__(self, conn: Any, sql: type[Dialect]) -> None:
        self.conn = conn
        self.sql = sql

    def get_record(self, user: str, key: str) -> IdempotencyRecord | None:
        row = self.conn.execute(self.sql.GET_RECORD, (user, key)).fetchone()
        return IdempotencyRecord(*row) if row else None

    def put_record(self, user: str, key: str, fingerprint: str, status: int, answer: str,
                   now: float, *, replace: bool) -> bool:
        if replace:
            cur = self.conn.execute(self.sql.FINISH_RECORD,
                                    (fingerprint, status, answer, now, user, key))
        else:
            # PostgreSQL waits for a concurrent transaction inserting the same key; if it
            # commits, nothing is inserted here. (SQLite has one writer at a time.)
            cur = self.conn.execute(self.sql.INSERT_RECORD,
                                    (user, key, fingerprint, status, answer, now, now))
        return bool(cur.rowcount == 1)

    def lock_chat(self, user: str, chat_id: str) -> ChatRow | None:
        row = self.conn.execute(self.sql.LOCK_CHAT, (user, chat_id)).fetchone()
        return self.sql.chat(row) if row else None

    def create_chat(self, user: str, chat_id: str, now_text: str) -> ChatRow:
        self.conn.execute(self.sql.INSERT_CHAT,
                          (user, chat_id, EMPTY_DIGEST, now_text, now_text))
        found = self.lock_chat(user, chat_id)
        assert found is not None
        return found

    def get_messages(self, user: str, chat_id: str, ids: list[str]) -> dict[str, MessageRow]:
        sql = self.sql
        out: dict[str, MessageRow] = {}
        for part in chunks(ids, sql.ID_CHUNK):
            rows = self.conn.execute(f"{sql.MESSAGES_WHERE_ID} {sql.in_list(len(part))}",
                                     (user, chat_id, *sql.in_args(part)))
            for row in rows:
                msg = sql.message(row)
                out[msg.id] = msg
        return out

    def insert_messages(self, user: str, chat_id: str, rows: list[MessageRow]) -> None:
        if not rows:
            return
        with contextlib.closing(self.conn.cursor()) as cur:
            cur.executemany(self.sql.INSERT_MESSAGES,
                            [(user, chat_id, row.id, row.seq, row.rev, row.content_hash,
                              row.deleted, row.body, row.updated_at, row.deleted_at)
                             for row in rows])

    def update_message(self, user: str, chat_id: str, row: MessageRow) -> None:
        self.conn.execute(self.sql.UPDATE_MESSAGE,
                          (row.rev, row.content_hash, row.deleted, row.body, row.updated_at,
                           row.deleted_at, user, chat_id, row.id))

    def save_chat(self, row: ChatRow) -> None:
        self.conn.execute(self.sql.SAVE_CHAT,
                          (self.sql.store_title(row.title), row.version, row.message_count,
                           row.digest, row.next_seq, row.updated_at, row.user, row.chat_id))


class SqlStorage(Storage):
    """The reads and plain writes both engines run alike; transactions come from the engine."""

    sql: ClassVar[type[Dialect]] = Dialect

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A connection in a read transaction."""

    def _snapshot(self) -> AbstractContextManager[Any]:
        """A connection in a read transaction whose statements all see one snapshot."""
        return self._read()

    @abc.abstractmethod
    def _change(self, *, durable: bool = True) -> AbstractContextManager[Any]:
        """A connection in a write transaction outside requests (housekeeping, caches).

        ``durable=False``: what it writes may be lost in a crash (an engine may skip the sync).
        """

    @abc.abstractmethod
    def _live_lines(self, conn: Any, user: str, chat_id: str) -> Iterator[str]:
        """The ``id:content_hash`` lines of the chat's live messages in byte-wise order,
        streamed in the read transaction ``conn``."""

    @abc.abstractmethod
    def _bucket_lines(self, conn: Any, user: str, chat_id: str) -> Iterator[tuple[str, str]]:
        """(bucket, line) of the chat's live messages ordered by bucket, then line
        (model.bucket_digests), streamed in the read transaction ``conn``."""

    def _live_digest(self, conn: Any, user: str, chat_id: str) -> str:
        """The digest of the chat's live messages, streamed in the read transaction ``conn``."""
        return digest_of_sorted_lines(self._live_lines(conn, user, chat_id))

    # -- schema: each engine runs its migrations, in its transactions, with these --------

    def _create_migrations_table(self, conn: Any) -> None:
        conn.execute(self.sql.CREATE_MIGRATIONS)

    def _migration_due(self, conn: Any, number: int, latest: int, where: str) -> bool:
        """Whether migration ``number`` is still to apply; refuse a schema newer than
        ``latest`` (``where`` names the database in the message)."""
        current = conn.execute(self.sql.CURRENT_VERSION).fetchone()[0]
        if current > latest:
            raise StorageError(f"{where} has schema version {current}, newer than this "
                               f"chatsave knows ({latest}); upgrade chatsave")
        return bool(current < number)

    def _record_migration(self, conn: Any, number: int, name: str) -> None:
        conn.execute(self.sql.RECORD_MIGRATION, (number, name, datetime.now(UTC).isoformat()))

    def _read_backend_id(self, conn: Any) -> str:
        return str(conn.execute(self.sql.BACKEND_ID).fetchone()[0])

    # -- the interface -------------------------------------------------------------------

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(self.sql.SCHEMA_VERSION).fetchone()[0])

    def compute_digest(self, user: str, chat_id: str) -> tuple[int, str] | None:
        with self._read() as conn:
            row = conn.execute(self.sql.CHAT_VERSION, (user, chat_id)).fetchone()
            if row is None:
                return None
            return int(row[0]), self._live_digest(conn, user, chat_id)

    def bucket_digests(self, user: str, chat_id: str) -> tuple[int, dict[str, str]] | None:
        with self._snapshot() as conn:
            row = conn.execute(self.sql.CHAT_VERSION, (user, chat_id)).fetchone()
            if row is None:
                return None
            return int(row[0]), bucket_digests(self._bucket_lines(conn, user, chat_id))

    def store_digests(self, user: str, digests: list[tuple[str, int, str]]) -> None:
        # A cache of what the messages say: lost, it is computed again.
        with self._change(durable=False) as conn, contextlib.closing(conn.cursor()) as cur:
            cur.executemany(self.sql.STORE_DIGEST,
                            [(digest, user, chat_id, version)
                             for chat_id, version, digest in digests])

    def list_chats(self, user: str, after: str | None, limit: int) -> list[ChatRow]:
        with self._read() as conn:
            rows = conn.execute(self.sql.LIST_CHATS, (user, after or "", limit)).fetchall()
        return [self.sql.chat(r) for r in rows]

    def get_chats(self, user: str, chat_ids: list[str]) -> dict[str, ChatRow]:
        sql = self.sql
        out: dict[str, ChatRow] = {}
        with self._read() as conn:
            for part in chunks(chat_ids, sql.ID_CHUNK):
                for row in conn.execute(f"{sql.CHATS_WHERE_ID} {sql.in_list(len(part))}",
                                        (user, *sql.in_args(part))):
                    chat = sql.chat(row)
                    out[chat.chat_id] = chat
        return out

    def read_messages(self, user: str, chat_id: str, after: int, limit: int,
                      include_deleted: bool, buckets: list[str] | None = None
                      ) -> tuple[ChatRow | None, list[MessageRow]]:
        sql = self.sql
        if buckets is None:
            page = sql.READ_MESSAGES if include_deleted else sql.READ_LIVE_MESSAGES
            args: tuple[Any, ...] = (user, chat_id, after, limit)
        else:
            first = sql.READ_BUCKETS_ALL if include_deleted else sql.READ_BUCKETS_LIVE
            page = f"{first} {sql.in_list(len(buckets))}{sql.BUCKETS_PAGE}"
            args = (user, chat_id, after, *sql.in_args(buckets), limit)
        with self._snapshot() as conn:
            row = conn.execute(sql.CHAT, (user, chat_id)).fetchone()
            if row is None:
                return None, []
            rows = conn.execute(page, args).fetchall()
        return sql.chat(row), [sql.message(r) for r in rows]

    def purge_idempotency(self, before: float) -> int:
        with self._change() as conn:
            return int(conn.execute(self.sql.PURGE_RECORDS, (before, before)).rowcount)

