"""What every part of the Store stands on: its connection, transactions and errors.

The Store (chatsave.store.store) is composed of one class per concern (chats, messages,
trash, runs, gc), each holding the queries on its tables; all of them run on the
connection and inside the transactions defined here.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from chatsave.errors import StoreError
from chatsave.store.checks import _UNDECODABLE, _translate, recovery_hint


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_HASH_HEX = re.compile(r"[0-9a-f]{64}")


def hash_value(text: str | None) -> bytes | str | None:
    """A content hash as ``remote_state`` keeps it (docs/store.md, "Size"): 64 lowercase
    hex digits as their 32 bytes; anything else a backend answered (it never equals a hash
    computed here) as it came."""
    if text is not None and _HASH_HEX.fullmatch(text):
        return bytes.fromhex(text)
    return text


def hash_sql(column: str) -> str:
    """SQL reading a hash column kept by ``hash_value`` (or a fingerprint) as its text."""
    return f"(CASE WHEN typeof({column}) = 'blob' THEN lower(hex({column})) ELSE {column} END)"


#: a message's fingerprint (kept as its 32 bytes since migration 5) read as hex
FINGERPRINT = hash_sql("fingerprint")


# The text columns of a store that hold what came from outside, per table with the columns
# that name a row: where a value that is not UTF-8 is looked for. Fixed SQL: a column
# named by an error message never becomes part of a query.
_TEXT_COLUMNS = (
    ("messages", ("chat_id", "id"),
     ("chat_id", "id", "role", "content", "created_at", "type", "metadata", "attachments",
      "extra")),
    ("chats", ("chat_id",), ("chat_id", "title", "created_at")),
    ("trash", ("chat_id", "id"), ("chat_id", "id", "message", "reason")),
    ("tombstones", ("chat_id", "id"), ("chat_id", "id", "reason")),
)
# (table, column, key columns, the query reading the keys and that column as bytes)
_TEXT_READS = tuple(
    (table, column, keys,
     f"SELECT {', '.join(f'CAST({k} AS BLOB)' for k in (*keys, column))} FROM {table}")
    for table, keys, columns in _TEXT_COLUMNS for column in columns)


@dataclass(frozen=True)
class Stub:
    """A message whose body gc evicted: what is still known of it."""

    chat_id: str
    id: str
    content_hash: str
    fingerprint: str
    created_at: str
    size: int


@dataclass(frozen=True)
class ChatRow:
    chat_id: str
    title: str | None
    created_at: str | None
    updated_at: str
    messages: int


class StoreBase:
    """The connection of an open store, its transactions and the translation of its errors."""

    path: Path
    conn: sqlite3.Connection

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Translate sqlite3 errors raised inside into StoreError."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: sqlite3.Error) -> StoreError:
        """The StoreError for an sqlite3 error met on this store. A value SQLite holds that
        is not UTF-8 is named by its table, column, chat and message id, never quoted."""
        found = _UNDECODABLE.match(str(exc))
        if found is None:
            return _translate(exc, self.path)
        column = found["column"]
        rows: list[dict[str, str]] = []
        with contextlib.suppress(sqlite3.Error):
            rows = self._undecodable(column)
        where = "; ".join(
            " ".join(f"{k} {v!r}" if k != "table" else f"table {v}" for k, v in row.items())
            for row in rows[:5]) or f"column {column!r}"
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        return StoreError(
            f"the local store {self.path} holds text that is not UTF-8 (column {column!r}): "
            f"{where}{more}",
            hint=recovery_hint(self.path),
            details={"store": str(self.path), "column": column, "rows": rows[:100]})

    def _undecodable(self, column: str) -> list[dict[str, str]]:
        """Where a value of ``column`` is not UTF-8: table, and chat and message id where the
        table has them (read as bytes; an undecodable id is shown escaped)."""
        found: list[dict[str, str]] = []
        for table, text_column, keys, sql in _TEXT_READS:
            if text_column != column:
                continue
            for row in self.conn.execute(sql):
                value = row[-1]
                try:
                    if isinstance(value, bytes):
                        value.decode("utf-8")
                    continue
                except UnicodeDecodeError:
                    pass
                found.append({"table": table, **{
                    k: v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
                    for k, v in zip(keys, row, strict=False)}})
        return found

    @contextlib.contextmanager
    def rolled_back(self) -> Iterator[None]:
        """Writes made inside are seen inside, then undone: a dry run that must see what
        it would record to plan what follows (``save --from --dry-run``)."""
        with self.errors():
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One explicit write transaction: all of it is committed, or none of it.

        Inside an open transaction (a group of writes committed together) it joins it: the
        outer one commits or rolls back everything.
        """
        if self.conn.in_transaction:
            yield self.conn
            return
        with self.errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise

    def group_commit(self, interval: float = 0.25) -> GroupCommit:
        """Writes committed in groups, one commit per ``interval`` seconds (GroupCommit)."""
        return GroupCommit(self, interval)


class GroupCommit:
    """Writes recorded in groups: one commit (one fsync) per ``interval`` seconds, not one
    per write. ``with group:`` opens a transaction unless one is open, and commits it once
    it has been open ``interval`` seconds; ``commit()`` and ``rollback()`` end it at once.

    Save records the backend's answers so: losing a group (a crash) loses nothing, since
    its batches are still open in the outbox, and re-sending them under the same keys
    replays the backend's answers."""

    def __init__(self, store: StoreBase, interval: float = 0.25) -> None:
        self.store = store
        self.interval = interval
        self.started: float | None = None
        self.depth = 0  # ``with group:`` blocks open; only the outermost one commits

    def __enter__(self) -> GroupCommit:
        if self.started is None:
            with self.store.errors():
                self.store.conn.execute("BEGIN IMMEDIATE")
            self.started = time.monotonic()
        self.depth += 1
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self.depth -= 1
        if kind is None and self.depth == 0 and self.started is not None and \
                time.monotonic() - self.started >= self.interval:
            self.commit()

    def commit(self) -> None:
        if self.started is not None:
            self.started = None
            with self.store.errors():
                self.store.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.started is not None:
            self.started = None
            with contextlib.suppress(Exception):
                self.store.conn.execute("ROLLBACK")
