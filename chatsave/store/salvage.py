"""Reading what SQLite can still read of a damaged store file (``chatsave salvage``).

Design: docs/reliability.md, "A damaged store"; what is done with what is read:
chatsave.ops.salvage.

The damaged file is never written: it is copied (with its WAL and journal, which hold its
last transactions) into a private temporary directory, and only the copy is opened. Each
table is read by ranges of rowids; a range SQLite cannot read is halved until the rows it
can still read are read, one by one if need be. The store's indexes, which live on pages
of their own, say which rows existed: the messages that could not be read are named by
chat and id.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from chatsave.errors import InputError, StoreError
from chatsave.store.checks import error_text

# Rows read per query while a range reads whole.
_CHUNK = 256


class ChatRecord(NamedTuple):
    rowid: int
    chat_id: Any
    title: Any
    created_at: Any


class MessageRecord(NamedTuple):
    """A row of a damaged ``messages`` table, as read: any value may be of any type."""

    rowid: int
    chat_id: Any
    id: Any
    role: Any
    content: Any
    created_at: Any
    type: Any
    metadata: Any
    attachments: Any
    extra: Any
    inexact: Any
    content_hash: Any
    evicted: Any


class TrashRecord(NamedTuple):
    rowid: int
    chat_id: Any
    id: Any
    content_hash: Any
    message: Any
    deleted_at: Any
    reason: Any


class TombstoneRecord(NamedTuple):
    chat_id: Any
    id: Any
    content_hash: Any
    deleted_at: Any
    reason: Any


# The columns read, in the order of the records' fields after the rowid.
_MESSAGE_FIELDS = ("chat_id", "id", "role", "content", "created_at", "type", "metadata",
                   "attachments", "extra", "inexact", "content_hash", "evicted")
_TRASH_FIELDS = ("chat_id", "id", "content_hash", "message", "deleted_at", "reason")
_CHAT_FIELDS = ("chat_id", "title", "created_at")
# The SQL is fixed text: names read from a damaged file never become part of a query.
# Per table: the read of a range of rowids, and of the largest rowid.
_ROW_READS: dict[str, tuple[str, str]] = {
    "chats": (f"SELECT rowid, {', '.join(_CHAT_FIELDS)} FROM chats"
              " WHERE rowid BETWEEN ? AND ? ORDER BY rowid", "SELECT MAX(rowid) FROM chats"),
    "messages": (f"SELECT rowid, {', '.join(_MESSAGE_FIELDS)} FROM messages"
                 " WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                 "SELECT MAX(rowid) FROM messages"),
    "trash": (f"SELECT rowid, {', '.join(_TRASH_FIELDS)} FROM trash"
              " WHERE rowid BETWEEN ? AND ? ORDER BY rowid", "SELECT MAX(rowid) FROM trash"),
}
_RECORDS: dict[str, Any] = {"chats": ChatRecord, "messages": MessageRecord,
                            "trash": TrashRecord}
# Per table: its indexes in a chatsave store (chatsave.store.migrations), each with the
# query that lists the table's rowids from that index alone (indexes live on pages of
# their own: they still read when the table's pages do not).
_ROWID_READS: dict[str, tuple[tuple[str, str], ...]] = {
    "chats": (("sqlite_autoindex_chats_1",
               "SELECT rowid FROM chats INDEXED BY sqlite_autoindex_chats_1"),),
    "messages": (("sqlite_autoindex_messages_1",
                  "SELECT rowid FROM messages INDEXED BY sqlite_autoindex_messages_1"),
                 ("messages_chat_ord",
                  "SELECT rowid FROM messages INDEXED BY messages_chat_ord")),
    "trash": (("trash_run", "SELECT rowid FROM trash INDEXED BY trash_run"),),
}
# The (chat_id, id) of each message rowid, from the unique index on them.
_MESSAGE_NAMES_INDEX = "sqlite_autoindex_messages_1"
_MESSAGE_NAMES = ("SELECT rowid, chat_id, id FROM messages"
                  " INDEXED BY sqlite_autoindex_messages_1")
_TOMBSTONES = "SELECT chat_id, id, content_hash, deleted_at, reason FROM tombstones"


@dataclass
class TableRead:
    """What could be read of one table: its rows (records, rowid first), and the rowids
    that could not be read: those an index lists, or, when no index reads, every rowid up
    to the largest known whose read failed (some may never have existed)."""

    table: str
    rows: list[Any] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    whole_table_unreadable: bool = False


@contextlib.contextmanager
def damaged_copy(path: Path) -> Iterator[DamagedStore]:
    """The damaged store at ``path``, read from a private copy of it (and of its WAL and
    journal): SQLite replays those into the copy, never into the original."""
    if not path.exists():
        raise InputError(f"no file at {path}", hint="name the damaged store file")
    if path.is_dir():
        raise InputError(f"{path} is a directory", hint="name the damaged store file")
    with tempfile.TemporaryDirectory(prefix="chatsave-salvage-") as tmp:  # 0700
        copy = Path(tmp) / "damaged.db"
        try:
            shutil.copyfile(path, copy)
            for suffix in ("-wal", "-journal"):
                beside = Path(f"{path}{suffix}")
                if beside.is_file():
                    shutil.copyfile(beside, Path(f"{copy}{suffix}"))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}",
                             hint="check its owner and permissions (ls -l)") from exc
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            # Check each page's cells as it is read: damage is an error, not garbage rows.
            conn.execute("PRAGMA cell_size_check = ON")
            yield DamagedStore(conn, path)
        finally:
            conn.close()


def _nothing_readable(path: Path, why: str) -> StoreError:
    return StoreError(f"nothing in {path} can be read: {why}",
                      hint="what the backend confirmed comes back with chatsave sync --all; "
                      "what it never confirmed is lost with this file",
                      details={"source": str(path)})


def _known_rowids(conn: sqlite3.Connection, table: str, indexes: Sequence[str]
                  ) -> set[int] | None:
    """The rowids of ``table`` as one of its indexes (of those the file has) lists them, or
    None when none reads."""
    for index, sql in _ROWID_READS[table]:
        if index not in indexes:
            continue
        with contextlib.suppress(sqlite3.DatabaseError):
            return {int(r[0]) for r in conn.execute(sql)}
    return None


def read_table(conn: sqlite3.Connection, table: str, indexes: Sequence[str]) -> TableRead:
    """Every row of ``table`` (chats, messages or trash) SQLite can still read, by rowid
    ranges halved where they fail; ``indexes``: the indexes the file has on it."""
    read = TableRead(table)
    reads = _ROW_READS[table]
    known = _known_rowids(conn, table, indexes)
    top: int | None = max(known) if known else None
    with contextlib.suppress(sqlite3.DatabaseError):
        top = max(top or 0, int(conn.execute(reads[1]).fetchone()[0] or 0))
    if top is None:
        read.whole_table_unreadable = True
        return read
    pending = [(lo, min(lo + _CHUNK - 1, top)) for lo in range(1, top + 1, _CHUNK)]
    pending.reverse()
    failed: list[int] = []
    while pending:
        lo, hi = pending.pop()
        try:
            read.rows.extend(conn.execute(reads[0], (lo, hi)).fetchall())
        except sqlite3.DatabaseError:
            if lo == hi:
                failed.append(lo)
                continue
            mid = (lo + hi) // 2
            pending += [(mid + 1, hi), (lo, mid)]
    got = {int(r[0]) for r in read.rows}
    read.unreadable = (sorted(known - got) if known is not None
                       else failed)
    read.rows = [_RECORDS[table]._make(r) for r in read.rows]
    return read


class DamagedStore:
    """The tables of a damaged store that can still be read. ``check()`` first: it reads
    the schema, and refuses a file that has none or no messages table."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.tables: dict[str, list[str]] = {}

    def check(self) -> None:
        """Read the tables of the damaged store and their indexes; refused when its schema
        cannot be read or it holds no messages table."""
        try:
            found: dict[str, list[str]] = {}
            for type_, name, table in self.conn.execute(
                    "SELECT type, name, tbl_name FROM sqlite_master ORDER BY type DESC"):
                if type_ == "table":
                    found.setdefault(str(name), [])
                elif type_ == "index" and str(table) in found:
                    found[str(table)].append(str(name))
        except sqlite3.DatabaseError as exc:
            raise _nothing_readable(self.path, error_text(exc)) from exc
        if not found:
            raise _nothing_readable(self.path,
                                    "no table (an empty file, or its schema is lost)")
        if "messages" not in found:
            raise InputError(f"{self.path} holds no chatsave messages table: not a chatsave "
                             "store, or its schema is lost",
                             hint="what the backend confirmed comes back with chatsave sync "
                             "--all")
        self.tables = found

    def chats(self) -> TableRead | None:
        """The chats that read (``ChatRecord``); None when the file has no chats table."""
        return self._read("chats")

    def messages(self) -> TableRead:
        """The messages that read (``MessageRecord``)."""
        return read_table(self.conn, "messages", self.tables["messages"])

    def trash(self) -> TableRead | None:
        """The trash entries that read (``TrashRecord``); None without a trash table."""
        return self._read("trash")

    def _read(self, table: str) -> TableRead | None:
        if table not in self.tables:
            return None
        return read_table(self.conn, table, self.tables[table])

    def message_names(self) -> dict[int, tuple[str, str]]:
        """(chat_id, id) per message rowid, from the index on them (when it reads)."""
        if _MESSAGE_NAMES_INDEX in self.tables["messages"]:
            with contextlib.suppress(sqlite3.DatabaseError):
                rows = self.conn.execute(_MESSAGE_NAMES).fetchall()
                return {int(r[0]): (str(r[1]), str(r[2])) for r in rows}
        return {}

    def tombstones(self) -> TableRead | None:
        """The tombstones (``TombstoneRecord``), all or none: unreadable as a whole when
        any page fails; None without a tombstones table."""
        if "tombstones" not in self.tables:
            return None
        read = TableRead("tombstones")
        try:
            read.rows = [TombstoneRecord._make(r)
                         for r in self.conn.execute(_TOMBSTONES).fetchall()]
        except sqlite3.DatabaseError:
            read.whole_table_unreadable = True
        return read
