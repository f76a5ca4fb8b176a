"""The local store: one SQLite file holding chats, messages and everything needed to resume.

WAL, ``synchronous=FULL``, foreign keys on; every change happens inside an explicit
transaction, so a crash, kill -9 or full disk leaves the store as it was before the
change. sqlite3 errors are translated into StoreError (exit 10) by chatsave.store.checks.

A new store is built in a temporary file next to it and linked into place once its schema
is committed, so a store file is either absent or whole; it is created 0600 (its ``-wal``
and ``-shm`` files take the same mode), and directories created for it are 0700: it
holds other people's conversations.

So only a path where nothing exists becomes a new store; a file there that is not a whole
chatsave store is refused and left as it was (chatsave.store.checks).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import stat
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatsave import __version__
from chatsave.errors import StoreError, StoreMissingError
from chatsave.model import Message, canonical_json
from chatsave.store.checks import (
    _UNDECODABLE,
    _check_file,
    _check_store,
    _checking_connection,
    _refuse_leftovers,
    _translate,
    recovery_hint,
)
from chatsave.store.lock import StoreLock
from chatsave.store.migrations import LATEST, current_version, migrate
from chatsave.wal import set_wal


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each 0700 whatever the umask (those
    that exist are left as they are)."""
    missing: list[Path] = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(d, 0o700)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)




def _create(path: Path, target: int) -> bool:
    """Create the store at ``path``: schema committed in a private temporary file in the same
    directory, then linked into place. False when another process created it meanwhile
    (theirs is kept; it is whole too)."""
    try:
        make_private_dirs(path.parent)
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {path.parent}: {exc.strerror}",
                         hint="check the path and its permissions") from exc
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
            os.fchmod(fd, 0o600)  # the umask can only take bits away; make it exact
            os.close(fd)
            conn = sqlite3.connect(tmp, isolation_level=None, timeout=30.0)
        except OSError as exc:
            raise StoreError(f"cannot create the store {path}: {exc.strerror}",
                             hint="check the path and its permissions") from exc
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        try:
            Store._prepare(path, conn, target)
        except sqlite3.Error as exc:
            raise _translate(exc, path) from exc
        finally:
            conn.close()  # the last connection: the WAL is checkpointed into the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a store created meanwhile
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    except OSError as exc:
        raise StoreError(f"cannot create the store {path}: {exc.strerror}",
                         hint="check free disk space, the path and its permissions") from exc
    finally:
        for leftover in (tmp, *(Path(f"{tmp}{s}") for s in ("-wal", "-shm", "-journal"))):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _open_to_others(path: Path) -> list[tuple[Path, int]]:
    """The store's files (the store, its -wal and -shm) that group or others have any
    permission on, with their modes."""
    found = []
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            mode = candidate.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                found.append((candidate, mode))
    return found


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


class Store:
    """An open local store. Use ``Store.open(path)``; close it (or use ``with``)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.lock = StoreLock(path)
        # Set by open(): whether this open created the file, and which of its files other
        # users may read. ``exists`` is False only for a blank() stand-in.
        self.created = False
        self.open_to_others: list[tuple[Path, int]] = []
        self.exists = True

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, target: int = LATEST,
             create: bool = True) -> Store:
        """Open and migrate the store at ``path``.

        A store that does not exist is created (``create``), atomically and private (see
        ``_create``); without ``create`` it is StoreMissingError and nothing is written. A
        file that exists and is not a whole chatsave store is StoreError, and nothing is
        written to it (``_check_file``, ``_check_store``).
        ``created`` tells which happened; ``open_to_others`` lists the store's files that
        other users may read (an existing store is never chmod-ed behind its owner's back).
        """
        p = Path(path).expanduser()
        if p.is_dir():
            raise StoreError(f"the store path {p} is a directory; it was left as it is",
                             hint="--store takes the path of a chatsave store file")
        created = False
        if not p.exists():
            if not create:
                raise StoreMissingError(
                    f"no store at {p} yet",
                    hint="a command that writes (import, save, sync, fetch) creates it; "
                    "if you expected one here, check --store, CHATSAVE_STORE or CHATSAVE_HOME")
            _refuse_leftovers(p)
            created = _create(p, target)
        else:
            _check_file(p)
        try:
            # mode=rw: opening never creates a file; only _create does, atomically.
            conn = sqlite3.connect(f"{p.absolute().as_uri()}?mode=rw", uri=True,
                                   isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise _translate(exc, p) from exc
        try:
            if not created:
                with _checking_connection(p, conn) as checking:
                    _check_store(checking, p)
            store = cls._prepare(p, conn, target)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, p) from exc
        except BaseException:
            conn.close()
            raise
        store.created = created
        store.open_to_others = [] if created else _open_to_others(p)
        return store

    @classmethod
    def blank(cls, path: str | os.PathLike[str]) -> Store:
        """An empty store, in memory, standing in for the missing one at ``path``: what a
        read-only look at a store that does not exist yet sees. Nothing is written."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        store = cls._prepare(Path(path).expanduser(), conn, LATEST)
        store.exists = False
        return store

    @classmethod
    def _prepare(cls, path: Path, conn: sqlite3.Connection, target: int) -> Store:
        """Set a fresh connection up and bring its schema to ``target``."""
        set_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn, target=target, path=str(path))
        store = cls(path, conn)
        store._ensure_meta()
        return store

    def _ensure_meta(self) -> None:
        if self.conn.execute("SELECT 1 FROM meta WHERE key = 'store_id'").fetchone():
            return
        with self.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?), "
                "('created_at', ?), ('created_by', ?)",
                (str(uuid.uuid4()), now_text(), f"chatsave/{__version__}"),
            )

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return current_version(self.conn)

    # ------------------------------------------------------------ transactions
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

    # ------------------------------------------------------------------- chats
    def upsert_chat(self, chat_id: str, title: str | None = None,
                    created_at: str | None = None) -> None:
        """Record a chat (inside a transaction); a known title is only replaced by a new one."""
        self.conn.execute(
            "INSERT INTO chats (chat_id, title, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (chat_id) DO UPDATE SET "
            "title = COALESCE(excluded.title, chats.title), "
            "created_at = COALESCE(chats.created_at, excluded.created_at)",
            (chat_id, title, created_at, now_text()),
        )

    def touch_chat(self, chat_id: str) -> None:
        self.conn.execute("UPDATE chats SET updated_at = ? WHERE chat_id = ?",
                          (now_text(), chat_id))

    def chat_ids(self) -> list[str]:
        with self.errors():
            return [r[0] for r in self.conn.execute("SELECT chat_id FROM chats ORDER BY chat_id")]

    def chats(self, chat_ids: Sequence[str] | None = None) -> list[ChatRow]:
        sql = ("SELECT c.chat_id, c.title, c.created_at, c.updated_at, "
               "(SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.chat_id) FROM chats c")
        with self.errors():
            if chat_ids is None:
                rows = self.conn.execute(sql + " ORDER BY c.chat_id").fetchall()
            else:
                rows = [r for cid in chat_ids
                        for r in self.conn.execute(sql + " WHERE c.chat_id = ?", (cid,))]
        return [ChatRow(*r) for r in rows]

    def has_chat(self, chat_id: str) -> bool:
        with self.errors():
            return self.conn.execute("SELECT 1 FROM chats WHERE chat_id = ?",
                                     (chat_id,)).fetchone() is not None

    # ---------------------------------------------------------------- messages
    def add_messages(self, chat_id: str, messages: Sequence[Message],
                     run_id: int | None = None) -> list[tuple[str, str | None]]:
        """Record messages of one chat (inside a transaction).

        Returns one outcome per message: ("added", None), ("unchanged", None),
        ("conflict", existing_hash) when the id already holds other content, or
        ("deleted", None) when the id was deleted here earlier (never resurrected).
        """
        outcomes: list[tuple[str, str | None]] = []
        if not messages:
            return outcomes
        conn = self.conn
        tomb = {r[0] for r in conn.execute("SELECT id FROM tombstones WHERE chat_id = ?",
                                           (chat_id,))}
        for msg in messages:
            if msg.id in tomb:
                outcomes.append(("deleted", None))
                continue
            meta = canonical_json(msg.metadata)
            att = canonical_json(msg.attachments)
            extra = canonical_json(msg.extra)
            size = len(msg.content.encode("utf-8")) + len(meta) + len(att) + len(extra) + 96
            cur = conn.execute(
                "INSERT INTO messages (chat_id, id, role, content, created_at, type, metadata,"
                " attachments, extra, inexact, content_hash, fingerprint, size, run_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (chat_id, id) DO NOTHING",
                (chat_id, msg.id, msg.role, msg.content, msg.created_at_text, msg.type, meta,
                 att, extra, int(msg.inexact), msg.content_hash, msg.fingerprint, size, run_id),
            )
            if cur.rowcount == 1:
                outcomes.append(("added", None))
                continue
            row = conn.execute("SELECT content_hash FROM messages WHERE chat_id = ? AND id = ?",
                               (chat_id, msg.id)).fetchone()
            if row[0] == msg.content_hash:
                outcomes.append(("unchanged", None))
            else:
                outcomes.append(("conflict", row[0]))
        return outcomes

    _FIELDS = ("chat_id", "id", "role", "content", "created_at", "type", "metadata",
               "attachments", "extra", "inexact", "content_hash", "fingerprint", "size",
               "evicted")

    @classmethod
    def columns(cls, alias: str = "") -> str:
        """The message columns that row_to_message reads, optionally table-qualified."""
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + f for f in cls._FIELDS)

    @staticmethod
    def row_to_message(row: Sequence[Any]) -> Message | Stub:
        (chat_id, id_, role, content, created_at, type_, meta, att, extra, inexact, chash,
         fprint, size, evicted) = row
        if evicted:
            return Stub(chat_id, id_, chash, fprint, created_at, size)
        try:
            return Message.model_construct(
                chat_id=chat_id, id=id_, role=role, content=content,
                created_at=datetime.fromisoformat(created_at), type=type_,
                metadata=json.loads(meta), attachments=json.loads(att), extra=json.loads(extra),
                inexact=bool(inexact),
            )
        except (ValueError, TypeError) as exc:
            # Not str(exc): the parsers quote the value they could not read.
            raise StoreError(
                f"message {id_!r} of chat {chat_id!r} in the local store cannot be read "
                f"(a damaged time, metadata, attachments or extra: {type(exc).__name__})",
                hint="the store is damaged: chatsave salvage --help says how to recover it",
                details={"chat_id": chat_id, "id": id_}) from None

    def iter_messages(self, chat_id: str, *, page: int = 1000) -> Iterator[Message | Stub]:
        """The messages of one chat in local order, read page by page (bounded memory)."""
        last = 0
        while True:
            with self.errors():
                rows = self.conn.execute(
                    f"SELECT ord, {self.columns()} FROM messages WHERE chat_id = ? AND ord > ? "
                    "ORDER BY ord LIMIT ?", (chat_id, last, page)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self.row_to_message(row[1:])
            last = rows[-1][0]

    def get_message(self, chat_id: str, message_id: str) -> Message | Stub | None:
        with self.errors():
            row = self.conn.execute(
                f"SELECT {self.columns()} FROM messages WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return None if row is None else self.row_to_message(row)

    # ------------------------------------------------------------- id mappings
    def mapped_id(self, original: str, kind: str = "chat") -> str | None:
        with self.errors():
            row = self.conn.execute(
                "SELECT mapped FROM id_mappings WHERE kind = ? AND original = ?",
                (kind, original)).fetchone()
        return None if row is None else str(row[0])

    def original_id(self, mapped: str, kind: str = "chat") -> str | None:
        with self.errors():
            row = self.conn.execute(
                "SELECT original FROM id_mappings WHERE kind = ? AND mapped = ?",
                (kind, mapped)).fetchone()
        return None if row is None else str(row[0])

    def record_mapping(self, original: str, mapped: str, source: str | None,
                       run_id: int | None, kind: str = "chat") -> None:
        """Record original -> mapped (inside a transaction); the first mapping stays."""
        self.conn.execute(
            "INSERT INTO id_mappings (kind, original, mapped, source, created_at, run_id)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, original) DO NOTHING",
            (kind, original, mapped, source, now_text(), run_id),
        )

    def mappings(self, kind: str = "chat") -> list[tuple[str, str, str | None]]:
        """(original, mapped, source) of every mapping of one kind.

        Kinds: ``chat``, an id a backend uses that chatsave cannot (a remote writes back
        to the original); ``derived``, an id made for a chat found without one (the
        original is what it was derived from, the source where the chat was found).
        """
        with self.errors():
            return [(r[0], r[1], r[2]) for r in self.conn.execute(
                "SELECT original, mapped, source FROM id_mappings WHERE kind = ? "
                "ORDER BY original", (kind,))]

    # ------------------------------------------------------------ current chat
    def set_current_chat(self, chat_id: str, source: str | None, run_id: int | None,
                         place: str = "browser") -> None:
        """Record the user's current chat in ``place`` (inside a transaction)."""
        self.conn.execute(
            "INSERT INTO current_chat (place, chat_id, source, recorded_at, run_id)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (place) DO UPDATE SET"
            " chat_id = excluded.chat_id, source = excluded.source,"
            " recorded_at = excluded.recorded_at, run_id = excluded.run_id",
            (place, chat_id, source, now_text(), run_id))

    def current_chat(self, place: str = "browser") -> str | None:
        """The current chat last recorded for ``place``, or None."""
        with self.errors():
            row = self.conn.execute("SELECT chat_id FROM current_chat WHERE place = ?",
                                    (place,)).fetchone()
        return None if row is None else str(row[0])

    # -------------------------------------------------------------------- runs
    def start_run(self, command: str, args: dict[str, Any]) -> int:
        """Record the start of a mutating command (its own transaction unless inside one)."""
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (command, args, started_at, pid, host, version)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (command, json.dumps(args, sort_keys=True, default=str), now_text(),
                 os.getpid(), socket.gethostname(), __version__),
            )
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET finished_at = ?, exit_code = ?, summary = ? WHERE run_id = ?",
                (now_text(), exit_code, json.dumps(summary, sort_keys=True, default=str),
                 run_id),
            )

    def runs(self, limit: int = 5) -> list[dict[str, Any]]:
        with self.errors():
            rows = self.conn.execute(
                "SELECT run_id, command, started_at, finished_at, exit_code FROM runs "
                "ORDER BY run_id DESC LIMIT ?", (limit,)).fetchall()
        keys = ("run_id", "command", "started_at", "finished_at", "exit_code")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------- stats
    def file_size(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(str(self.path) + suffix)
        return total

    def counts(self, chat_id: str | None = None) -> dict[str, int]:
        """Counts of what the store holds (all chats, or one)."""
        where, args = ("WHERE chat_id = ?", (chat_id,)) if chat_id else ("", ())
        with self.errors():
            chats = self.conn.execute(f"SELECT COUNT(*) FROM chats {where}", args).fetchone()[0]
            msg = self.conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(evicted), 0), COALESCE(SUM(size), 0),"
                f" COALESCE(SUM(inexact), 0) FROM messages {where}", args).fetchone()
            trash = self.conn.execute(f"SELECT COUNT(*) FROM trash {where}", args).fetchone()[0]
            tomb = self.conn.execute(f"SELECT COUNT(*) FROM tombstones {where}",
                                     args).fetchone()[0]
        return {"chats": int(chats), "messages": int(msg[0]), "evicted": int(msg[1]),
                "message_bytes": int(msg[2]), "inexact_times": int(msg[3]),
                "in_trash": int(trash), "tombstones": int(tomb)}

    def message_keys(self, chat_id: str) -> Iterable[tuple[str, str]]:
        """(id, content_hash) of every message of a chat, in local order."""
        with self.errors():
            yield from self.conn.execute(
                "SELECT id, content_hash FROM messages WHERE chat_id = ? ORDER BY ord",
                (chat_id,))

    def backend_states(self, chat_id: str | None = None) -> list[dict[str, Any]]:
        """Per known backend: pending push, conflicts, rejected, tombstones to send, last sync."""
        chat_filter = "AND m.chat_id = :chat" if chat_id else ""
        sql = f"""
            SELECT b.backend_id, b.url, b.last_sync,
              (SELECT COUNT(*) FROM messages m WHERE 1 {chat_filter} AND NOT EXISTS (
                  SELECT 1 FROM remote_state r WHERE r.backend_id = b.backend_id
                   AND r.chat_id = m.chat_id AND r.id = m.id
                   AND ((r.state = 'confirmed' AND r.content_hash = m.content_hash)
                        OR r.state IN ('conflict', 'rejected')))),
              (SELECT COUNT(*) FROM remote_state r WHERE r.backend_id = b.backend_id
                   AND r.state = 'conflict' {chat_filter.replace('m.', 'r.')}),
              (SELECT COUNT(*) FROM remote_state r WHERE r.backend_id = b.backend_id
                   AND r.state = 'rejected' {chat_filter.replace('m.', 'r.')}),
              (SELECT COUNT(*) FROM tombstones m WHERE 1 {chat_filter} AND NOT EXISTS (
                  SELECT 1 FROM remote_state r WHERE r.backend_id = b.backend_id
                   AND r.chat_id = m.chat_id AND r.id = m.id AND r.state = 'deleted'))
            FROM backends b ORDER BY b.last_seen DESC"""
        with self.errors():
            rows = self.conn.execute(sql, {"chat": chat_id}).fetchall()
        keys = ("backend_id", "url", "last_sync", "pending_push", "conflicts", "rejected",
                "pending_deletes")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------- deletions
    def trash_messages(self, chat_id: str, ids: Sequence[str], reason: str,
                       run_id: int | None, *, tombstone: bool = True) -> list[tuple[str, str]]:
        """Move messages to the trash (inside a transaction); return (id, hash) of those moved.

        With ``tombstone`` the ids are also remembered as deleted here, so no import or
        sync brings them back; without it (a version replaced by another) only the old
        version is kept in the trash.
        """
        moved: list[tuple[str, str]] = []
        now = now_text()
        for message_id in ids:
            row = self.conn.execute(
                f"SELECT {self.columns()} FROM messages WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
            if row is None:
                continue
            item = self.row_to_message(row)
            if isinstance(item, Stub):
                body = {"chat_id": chat_id, "id": message_id, "evicted": True}
            else:
                body = item.to_wire()
            chash = row[10]
            self.conn.execute(
                "INSERT INTO trash (chat_id, id, content_hash, message, deleted_at, reason,"
                " run_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chat_id, message_id, chash, json.dumps(body, ensure_ascii=False), now, reason,
                 run_id))
            self.conn.execute("DELETE FROM messages WHERE chat_id = ? AND id = ?",
                              (chat_id, message_id))
            if tombstone:
                self.conn.execute(
                    "INSERT INTO tombstones (chat_id, id, content_hash, deleted_at, reason,"
                    " run_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (chat_id, id) DO UPDATE"
                    " SET content_hash = excluded.content_hash,"
                    " deleted_at = excluded.deleted_at, reason = excluded.reason,"
                    " run_id = excluded.run_id",
                    (chat_id, message_id, chash, now, reason, run_id))
            moved.append((message_id, chash))
        if moved:
            # A save still open that carries one of them would write what is no longer held
            # here; and once the message is restored from the trash, it would re-send that
            # old write (no base_rev) past the deletion the backend holds, and lose to it.
            # Abandoned now, not at its next send; what else it carried is planned again.
            self.conn.execute(
                "UPDATE outbox SET state = 'abandoned', last_error = ?, updated_at = ?"
                " WHERE chat_id = ? AND kind = 'save' AND state = 'open' AND EXISTS ("
                "   SELECT 1 FROM json_each(outbox.message_ids) j"
                "   WHERE json_extract(j.value, '$[0]') IN (SELECT value FROM json_each(?)))",
                ("a message it carries left the store (trash)", now, chat_id,
                 json.dumps([mid for mid, _ in moved])))
        return moved

    def replace_message(self, message: Message, run_id: int | None, reason: str) -> None:
        """Replace a message's content by another version of it (inside a transaction).

        The old version goes to the trash (undoable); the message keeps its place. A
        message deleted here comes back (``bring_back``), and the deleted version the
        trash holds is marked as replaced (``reason``).
        """
        old = self.conn.execute("SELECT ord FROM messages WHERE chat_id = ? AND id = ?",
                                (message.chat_id, message.id)).fetchone()
        if old is None:
            self.bring_back(message, run_id, replaced=reason)
            return
        self.trash_messages(message.chat_id, [message.id], reason, run_id, tombstone=False)
        self.conn.execute("DELETE FROM tombstones WHERE chat_id = ? AND id = ?",
                          (message.chat_id, message.id))
        self.add_messages(message.chat_id, [message], run_id)
        self.conn.execute("UPDATE messages SET ord = ? WHERE chat_id = ? AND id = ?",
                          (old[0], message.chat_id, message.id))

    def bring_back(self, message: Message, run_id: int | None, *,
                   replaced: str | None = None) -> None:
        """Make a message that left this store (deleted here) live again (inside a
        transaction): its tombstone goes, and it takes its place among the chat's messages
        by time, not after the last one recorded.

        The trash then stops saying it is deleted: an entry holding this very version is
        removed (it is live again), and with ``replaced`` (why another version came back)
        an entry holding another version says that it was replaced.
        """
        chat_id, mid = message.chat_id, message.id
        self.conn.execute("DELETE FROM tombstones WHERE chat_id = ? AND id = ?", (chat_id, mid))
        if self.add_messages(chat_id, [message], run_id) == [("added", None)]:
            self._place_by_time(chat_id, mid, message.created_at_text)
        self.conn.execute("DELETE FROM trash WHERE chat_id = ? AND id = ? AND content_hash = ?",
                          (chat_id, mid, message.content_hash))
        if replaced:
            self.conn.execute("UPDATE trash SET reason = COALESCE(reason || '; then ', '') || ?"
                              " WHERE chat_id = ? AND id = ?", (replaced, chat_id, mid))

    def _place_by_time(self, chat_id: str, message_id: str, created_at: str) -> None:
        """Move a message just recorded (the last of the local order) before the chat's
        first message, in local order, whose time is later than its own.

        ``ord`` is the store's rowid, shared by every chat: the message takes a free number
        between its neighbours (the one it had before it was deleted is free, unless
        reused); when there is none, the chat's messages that follow it move to the end.
        """
        conn = self.conn
        row = conn.execute("SELECT ord FROM messages INDEXED BY messages_chat_ord"
                           " WHERE chat_id = ? AND created_at > ? AND id != ? ORDER BY ord"
                           " LIMIT 1", (chat_id, created_at, message_id)).fetchone()
        following = row[0] if row is not None else None
        if following is None:
            return  # the latest of its chat: last is its place
        before = conn.execute("SELECT MAX(ord) FROM messages WHERE chat_id = ? AND ord < ?",
                              (chat_id, following)).fetchone()[0] or 0
        free = conn.execute(
            "SELECT MIN(x) FROM (SELECT ? + 1 AS x UNION ALL SELECT ord + 1 FROM messages"
            " WHERE ord > ? AND ord < ?) WHERE x < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE ord = x)",
            (before, before, following, following)).fetchone()[0]
        if free is None:
            top = conn.execute("SELECT MAX(ord) FROM messages").fetchone()[0]
            later = [r[0] for r in conn.execute(
                "SELECT ord FROM messages WHERE chat_id = ? AND ord >= ? AND id != ?"
                " ORDER BY ord", (chat_id, following, message_id))]
            conn.executemany("UPDATE messages SET ord = ? WHERE ord = ?",
                             [(top + 1 + i, ord_) for i, ord_ in enumerate(later)])
            free = following
        conn.execute("UPDATE messages SET ord = ? WHERE chat_id = ? AND id = ?",
                     (free, chat_id, message_id))

    def keep_in_trash(self, message: Message, reason: str, run_id: int | None) -> bool:
        """Keep a version of a message that is not the one held here in the trash (inside
        a transaction), where ``trash restore`` can take it; False when it is there."""
        return self.add_trash(message.chat_id, message.id, message.content_hash,
                              json.dumps(message.to_wire(), ensure_ascii=False), now_text(),
                              reason, run_id)

    def add_trash(self, chat_id: str, message_id: str, content_hash: str, body: str,
                  deleted_at: str, reason: str | None, run_id: int | None) -> bool:
        """Record a trash entry as it is (inside a transaction), unless the trash holds this
        version of the message already; True when recorded."""
        cur = self.conn.execute(
            "INSERT INTO trash (chat_id, id, content_hash, message, deleted_at, reason, run_id)"
            " SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM trash"
            " WHERE chat_id = ? AND id = ? AND content_hash = ?)",
            (chat_id, message_id, content_hash, body, deleted_at, reason, run_id, chat_id,
             message_id, content_hash))
        return cur.rowcount == 1

    def add_tombstone(self, chat_id: str, message_id: str, content_hash: str | None,
                      deleted_at: str, reason: str | None, run_id: int | None) -> bool:
        """Remember a message as deleted here (inside a transaction), unless this store holds
        it live or remembers it already; True when recorded."""
        cur = self.conn.execute(
            "INSERT INTO tombstones (chat_id, id, content_hash, deleted_at, reason, run_id)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM messages"
            " WHERE chat_id = ? AND id = ?) ON CONFLICT (chat_id, id) DO NOTHING",
            (chat_id, message_id, content_hash, deleted_at, reason, run_id, chat_id,
             message_id))
        return cur.rowcount == 1

    def tombstone(self, chat_id: str, message_id: str) -> str | None:
        """The content hash remembered for a message deleted here, or None."""
        with self.errors():
            row = self.conn.execute(
                "SELECT content_hash FROM tombstones WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return None if row is None else str(row[0])

    # ------------------------------------------------------------------ edits
    # The trash reason of a version replaced by an edit made here; ``trash restore`` of such
    # an entry puts it back over the version that replaced it (which takes its place there).
    EDITED = "replaced by an edit here"

    def edit_message(self, message: Message, run_id: int | None,
                     reason: str = f"{EDITED} (import --update)") -> None:
        """Take ``message`` as an edit of the version held under its id (inside a
        transaction): the old version goes to the trash (an open save carrying it is
        abandoned), and what each backend said of it stays, so that the edit is sent
        against the revision a backend confirmed (``base_rev``); only a rejection, which
        was about the old content, is forgotten: the edit is sent like a new message."""
        self.replace_message(message, run_id, reason)
        self.conn.execute(
            "DELETE FROM remote_state WHERE chat_id = ? AND id = ? AND state = 'rejected'",
            (message.chat_id, message.id))
