"""Salvage: what SQLite can still read of a damaged store, recorded in a whole one.

Design: docs/reliability.md, "A damaged store".

The damaged file is never written: it is copied (with its WAL and journal, which hold its
last transactions) into a private temporary directory, and only the copy is opened. Each
table is read by ranges of rowids; a range SQLite cannot read is halved until the rows it
can still read are read, one by one if need be. The store's indexes, which live on pages
of their own, say which rows existed: the messages that could not be read are named by
chat and id.

Every message read is validated as ``import`` validates it (the model, and its content
hash against the hash it was stored with). Salvaged messages are pending: never
confirmed here, they are pushed again by save or sync, and the backend's save, an upsert
by id, keeps one copy. A message the target store already holds is not added again; one
it holds with other content keeps the target's version and the salvaged one goes to the
trash. Evicted messages have no body to salvage: the backend confirmed them, and sync
brings them back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chatsave.errors import ExitCode, InputError, StoreError
from chatsave.model import Message, chat_id_problem
from chatsave.ops.result import RunResult
from chatsave.store.checks import error_text
from chatsave.store.store import Store

Emit = Callable[..., None]
# Rows read per query while a range reads whole.
_CHUNK = 256
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
SALVAGED_REASON = "salvaged: another version of it is in this store"


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class TableRead:
    """What could be read of one table: its rows (rowid first), and the rowids that could
    not be read: those an index lists, or, when no index reads, every rowid up to the
    largest known whose read failed (some may never have existed)."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    whole_table_unreadable: bool = False


@contextlib.contextmanager
def damaged_copy(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a private copy of the damaged store at ``path`` (and of its WAL and
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
            yield conn
        finally:
            conn.close()


def _tables(conn: sqlite3.Connection, path: Path) -> dict[str, list[str]]:
    """The tables of the damaged store and their indexes; refused when its schema cannot be
    read or it holds no messages table."""
    try:
        found: dict[str, list[str]] = {}
        for type_, name, table in conn.execute(
                "SELECT type, name, tbl_name FROM sqlite_master ORDER BY type DESC"):
            if type_ == "table":
                found.setdefault(str(name), [])
            elif type_ == "index" and str(table) in found:
                found[str(table)].append(str(name))
    except sqlite3.DatabaseError as exc:
        raise _nothing_readable(path, error_text(exc)) from exc
    if not found:
        raise _nothing_readable(path, "no table (an empty file, or its schema is lost)")
    if "messages" not in found:
        raise InputError(f"{path} holds no chatsave messages table: not a chatsave store, or "
                         "its schema is lost",
                         hint="what the backend confirmed comes back with chatsave sync --all")
    return found


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
    read = TableRead()
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
    return read


def _message(row: tuple[Any, ...]) -> tuple[Message | None, str | None]:
    """The message a row of the damaged store holds, or why it is invalid (the fields at
    fault, never their values)."""
    (_, chat_id, id_, role, content, created_at, type_, meta, att, extra, inexact, chash,
     _evicted) = row
    try:
        message = Message.model_validate({
            "chat_id": chat_id, "id": id_, "role": role, "content": content,
            "created_at": created_at, "type": type_, "metadata": json.loads(meta),
            "attachments": json.loads(att), "extra": json.loads(extra),
            "inexact": bool(inexact)})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return None, f"invalid {', '.join(fields)}"
    except (ValueError, TypeError):
        return None, "damaged metadata, attachments or extra (not JSON)"
    if message.content_hash != chash:
        return None, "its content does not match the hash it was stored with"
    return message, None


@dataclass
class _Salvager:
    store: Store
    source: Path
    emit: Emit
    run_id: int | None
    result: RunResult = field(default_factory=lambda: RunResult("salvage"))

    def run(self, conn: sqlite3.Connection) -> None:
        tables = _tables(conn, self.source)
        titles = self._chats(conn, tables)
        self._messages(conn, tables, titles)
        if "trash" in tables:
            self._trash(conn, tables)
        if "tombstones" in tables:
            self._tombstones(conn)

    def _unreadable_table(self, table: str) -> None:
        self.result.details.setdefault("unreadable_tables", []).append(table)
        self.emit("unreadable", table=table)

    def _chats(self, conn: sqlite3.Connection, tables: dict[str, list[str]]
               ) -> dict[str, tuple[str | None, str | None]]:
        """(title, created_at) per readable chat."""
        if "chats" not in tables:
            return {}
        read = read_table(conn, "chats", tables["chats"])
        if read.whole_table_unreadable:
            self._unreadable_table("chats")
        self.result.counters["unreadable_chats"] += len(read.unreadable)
        return {str(r[1]): (r[2], r[3]) for r in read.rows
                if isinstance(r[1], str) and chat_id_problem(r[1]) is None}

    def _messages(self, conn: sqlite3.Connection, tables: dict[str, list[str]],
                  titles: dict[str, tuple[str | None, str | None]]) -> None:
        c = self.result.counters
        read = read_table(conn, "messages", tables["messages"])
        if read.whole_table_unreadable:
            self._unreadable_table("messages")
        names = self._message_names(conn, tables["messages"])
        for rowid in read.unreadable:
            c["unreadable"] += 1
            chat_id, id_ = names.get(rowid, (None, None))
            self.emit("unreadable", table="messages", chat_id=chat_id, id=id_)
            self.result.details.setdefault("unreadable_messages", []).append(
                {"chat_id": chat_id, "id": id_})
        by_chat: dict[str, list[Message]] = {}
        for row in read.rows:
            c["read"] += 1
            chat_id, id_ = row[1], row[2]
            if row[-1]:
                c["evicted"] += 1
                continue
            message, why = _message(row)
            if message is None:
                c["invalid"] += 1
                shown = {"chat_id": chat_id if isinstance(chat_id, str) else None,
                         "id": id_ if isinstance(id_, str) else None, "reason": why}
                self.emit("invalid", **shown)
                self.result.details.setdefault("invalid_messages", []).append(shown)
                continue
            by_chat.setdefault(message.chat_id, []).append(message)
        for chat_id, messages in by_chat.items():
            title, created_at = titles.get(chat_id, (None, None))
            self.store.upsert_chat(chat_id, title, created_at)
            for message, (outcome, _) in zip(
                    messages, self.store.add_messages(chat_id, messages, self.run_id),
                    strict=True):
                self._outcome(message, outcome)
        self.result.details["chats"] = len(by_chat)

    def _outcome(self, message: Message, outcome: str) -> None:
        c = self.result.counters
        if outcome == "added":
            c["salvaged"] += 1
            c["written"] += 1
            c["pending_push"] += 1
        elif outcome == "unchanged":
            c["unchanged"] += 1
        elif outcome == "deleted":
            c["deleted_here"] += 1
        else:
            c["conflicts"] += 1
            self.store.keep_in_trash(message, SALVAGED_REASON, self.run_id)
            self.emit("conflict", chat_id=message.chat_id, id=message.id,
                      content_hash=message.content_hash, kept="trash")

    @staticmethod
    def _message_names(conn: sqlite3.Connection, indexes: Sequence[str]
                       ) -> dict[int, tuple[str, str]]:
        """(chat_id, id) per message rowid, from the index on them (when it reads)."""
        if _MESSAGE_NAMES_INDEX in indexes:
            with contextlib.suppress(sqlite3.DatabaseError):
                rows = conn.execute(_MESSAGE_NAMES).fetchall()
                return {int(r[0]): (str(r[1]), str(r[2])) for r in rows}
        return {}

    def _trash(self, conn: sqlite3.Connection, tables: dict[str, list[str]]) -> None:
        read = read_table(conn, "trash", tables["trash"])
        if read.whole_table_unreadable:
            self._unreadable_table("trash")
        self.result.counters["unreadable_trash"] += len(read.unreadable)
        for _, chat_id, id_, chash, body, deleted_at, reason in read.rows:
            if not all(isinstance(v, str) for v in (chat_id, id_, chash, body, deleted_at)):
                self.result.counters["invalid_trash"] += 1
                continue
            if self.store.add_trash(chat_id, id_, chash, body, deleted_at, reason,
                                    self.run_id):
                self.result.counters["trash_salvaged"] += 1

    def _tombstones(self, conn: sqlite3.Connection) -> None:
        try:
            rows = conn.execute("SELECT chat_id, id, content_hash, deleted_at, reason "
                                "FROM tombstones").fetchall()
        except sqlite3.DatabaseError:
            self._unreadable_table("tombstones")
            return
        for chat_id, id_, chash, deleted_at, reason in rows:
            if self.store.add_tombstone(chat_id, id_, chash, deleted_at, reason, self.run_id):
                self.result.counters["tombstones_salvaged"] += 1


def salvage(store: Store, source: Path, *, dry_run: bool = False, emit: Emit = _no_emit,
            run_args: dict[str, Any] | None = None) -> RunResult:
    """Record in ``store`` what can still be read of the damaged store at ``source``.

    Exit 0 when every row was read and salvaged (or already held); 1 when rows could not be
    read or were invalid (skipped input, listed); 6 when some held other content here (the
    salvaged version is in the trash). One transaction: all of it is recorded, or none.
    """
    recording = store.rolled_back() if dry_run else store.transaction()
    with damaged_copy(source) as conn, recording:
        run_id = None if dry_run else store.start_run("salvage", run_args or {})
        salvager = _Salvager(store, source, emit, run_id)
        salvager.run(conn)
        result = salvager.result
        _finish(result, source, dry_run)
        if run_id is not None:
            store.finish_run(run_id, int(result.exit_code), result.summary())
    return result


def _finish(result: RunResult, source: Path, dry_run: bool) -> None:
    c, d = result.counters, result.details
    for name in ("salvaged", "unreadable", "invalid", "evicted", "conflicts"):
        c[name] += 0
    d.update(source=str(source), dry_run=dry_run)
    if dry_run:
        c["would_write"] = c.pop("written", 0)
    lost = c["unreadable"] + c["invalid"] + c["unreadable_chats"] + c["unreadable_trash"]
    if lost or d.get("unreadable_tables"):
        result.flag(ExitCode.DIFFERENCES)
    if c["conflicts"]:
        result.flag(ExitCode.CONFLICTS)
