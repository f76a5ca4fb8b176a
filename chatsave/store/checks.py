"""Is this file a whole chatsave store, and what does an sqlite3 error mean.

A file at a store's path that is not a whole chatsave store (empty, truncated, damaged
pages, another program's database) is refused before anything writes to it, and left byte
for byte as it was: what it still holds is salvaged from it (``chatsave salvage``), never
overwritten by a fresh schema (docs/reliability.md, "A damaged store"). sqlite3 errors are
translated here into StoreError (exit 10); they name tables, columns, chats and message ids,
never the text of a row: a store holds other people's conversations, and errors end up in
logs and tickets.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatsave.errors import StoreError, StoreFullError
from chatsave.store.migrations import current_version

_FULL_CODES = {"SQLITE_FULL"}
_IO_PREFIX = "SQLITE_IOERR"


# Python's sqlite3 quotes the undecodable value itself: "Could not decode to UTF-8
# column 'content' with text '...'". The value is a row's text: it never reaches an error.
_ROW_TEXT = re.compile(r" with text '.*\Z", re.DOTALL)
_UNDECODABLE = re.compile(r"Could not decode to UTF-8 column '(?P<column>[^']*)'")
# What a store file starts with, and what its 100-byte header says (SQLite's file format).
_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100


def error_text(exc: sqlite3.Error) -> str:
    """What an sqlite3 error says, without any row content it quotes."""
    return _ROW_TEXT.sub("", str(exc))


def recovery_hint(path: Path) -> str:
    """How to get a damaged store's messages back: the backend's from a new store, the
    others from what SQLite can still read of the damaged file."""
    aside = shlex.quote(f"{path}.damaged")
    return (f"move it aside (mv {shlex.quote(str(path))} {aside}): chatsave sync --all then "
            "makes a new store and brings back everything the backend confirmed, and "
            f"chatsave salvage {aside} recovers from the damaged file what was never "
            "confirmed, wherever SQLite can still read it")


def damaged_error(path: Path, reason: str, details: dict[str, Any] | None = None
                  ) -> StoreError:
    """The error for a store file that is not a whole chatsave store (left as it is)."""
    return StoreError(f"the local store {path} is corrupt or not a chatsave store: {reason}; "
                      "it was left as it is",
                      hint=recovery_hint(path),
                      details={"store": str(path), "reason": reason, **(details or {})})


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = error_text(exc)
    if name in _FULL_CODES or "disk is full" in text:
        return StoreFullError(
            f"the local store {path} is full: {text}",
            hint="free disk space (or raise the file size limit) and rerun; nothing was "
            "half-written",
        )
    if name.startswith(_IO_PREFIX):
        return StoreError(
            f"cannot write the local store {path}: {text} ({name})",
            hint="check free disk space, file size limits (ulimit -f) and permissions; "
            "nothing was half-written",
        )
    if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT") \
            or "not a database" in text:
        return damaged_error(path, text)
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return StoreError(
            f"the local store {path} is busy: {text}",
            hint="another program holds a database lock on it; rerun later",
        )
    if name in ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM"):
        return StoreError(
            f"cannot open the local store {path} for writing: {text}",
            hint="check the path and its permissions",
        )
    return StoreError(f"local store {path}: {text}")


def _sidecars(path: Path) -> list[tuple[Path, int]]:
    """The store's WAL and rollback journal, where they exist and hold something, with their
    sizes: what SQLite would replay into the file at ``path`` on opening it."""
    found = []
    for candidate in (Path(f"{path}-wal"), Path(f"{path}-journal")):
        with contextlib.suppress(OSError):
            size = candidate.stat().st_size
            if size:
                found.append((candidate, size))
    return found


def _header_problem(header: bytes, size: int) -> str | None:
    """What keeps a file of ``size`` bytes starting with ``header`` from being a whole SQLite
    database, or None."""
    if size == 0:
        return "the file is empty (0 bytes)"
    if not header.startswith(_MAGIC) and not _MAGIC.startswith(header):
        return "it is not an SQLite database"
    if len(header) < _HEADER_SIZE:
        return f"it is truncated ({size} bytes, less than a database header)"
    page = int.from_bytes(header[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return "its header is damaged (no valid page size)"
    if size % page:
        return f"it is truncated ({size} bytes, not a whole number of {page}-byte pages)"
    # Not the header's page count against the size: a checkpoint by another process writes
    # the header before it grows the file, so a store being written would be refused.
    # A file cut at a page boundary is found by PRAGMA quick_check (_check_store), which
    # reads a consistent snapshot.
    return None


def _check_file(path: Path) -> None:
    """Refuse the existing file at ``path`` unless its bytes can be a whole SQLite database.

    Plain reads only: SQLite is never let near a file refused here, since it takes an empty
    file for a new database (deleting a WAL it finds beside one) and replays a WAL or
    journal into the file it opens.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"the store path {path} is not a regular file",
                             hint="--store takes the path of a chatsave store file")
        with open(path, "rb") as fh:
            header = fh.read(_HEADER_SIZE)
    except OSError as exc:
        raise StoreError(f"cannot read the local store {path}: {exc.strerror}; it was left "
                         "as it is",
                         hint="check its owner and permissions (ls -l): the user running "
                         "chatsave needs to read and write it") from exc
    reason = _header_problem(header, info.st_size)
    if reason is None:
        return
    beside = _sidecars(path)
    if beside:
        reason += "; " + ", ".join(f"{p.name} ({size} bytes) beside it is left as it is too"
                                   for p, size in beside)
    raise damaged_error(path, reason, {"size": info.st_size,
                                       "beside": {p.name: size for p, size in beside}})


# The tables every chatsave store has once its first migration ran. A chatsave backend's
# file has some of them too (not runs or id_mappings): it is no store.
_STORE_TABLES = frozenset({"meta", "chats", "messages", "id_mappings", "runs"})


def _check_store(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse an SQLite database at ``path`` that is not a whole chatsave store. Reads only.

    ``PRAGMA quick_check`` reads every page (a fraction of a second for a store of a hundred
    megabytes): a damaged page found only later, by a command that has already written
    its run to the store, would have been written around.
    """
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        tables = {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = (current_version(conn) if "schema_migrations" in tables else None)
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT"):
            raise damaged_error(path, error_text(exc)) from exc
        raise
    if problems != ["ok"]:
        raise damaged_error(path, f"SQLite finds {len(problems)} problem(s) in its pages",
                            {"problems": problems[:20]})
    if version is None or (version > 0 and not _STORE_TABLES.issubset(tables)):
        kind = ("a chatsave backend's database" if "idempotency" in tables
                else "an SQLite database without any table" if not tables
                else "an SQLite database of another kind")
        raise StoreError(
            f"{path} is not a chatsave store: it is {kind}; it was left as it is",
            hint="check --store, CHATSAVE_STORE and CHATSAVE_HOME (a backend is named with "
            "--remote); if it was your store, " + recovery_hint(path),
            details={"store": str(path), "reason": f"not a chatsave store: {kind}"})


@contextlib.contextmanager
def _checking_connection(path: Path, conn: sqlite3.Connection
                         ) -> Iterator[sqlite3.Connection]:
    """The connection to check the existing store at ``path`` on, before ``conn`` writes.

    ``conn`` itself, unless a WAL lies beside the store (a run killed before its last
    checkpoint): the last read-write connection to close checkpoints the WAL into the file,
    which must stay as it is if it is refused. A read-only one then, closed after the check.
    """
    if not any(p.name.endswith("-wal") for p, _ in _sidecars(path)):
        yield conn
        return
    reader = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                             isolation_level=None, timeout=30.0)
    try:
        yield reader
    finally:
        reader.close()


def _refuse_leftovers(path: Path) -> None:
    """Refuse to create a store at ``path`` where a WAL or journal of a removed store lies:
    SQLite would replay it into the new store (or delete it), and it may hold messages."""
    beside = _sidecars(path)
    if beside:
        names = ", ".join(f"{p} ({size} bytes)" for p, size in beside)
        raise StoreError(
            f"no store at {path}, but {names} is there: left by a store that was removed "
            "or moved; a new store is not made over it, and it was left as it is",
            hint=f"if the store was moved, move {beside[0][0].name} with it; if it was lost, "
            "move the leftover aside too and run the command again: chatsave sync --all "
            "brings back everything the backend confirmed",
            details={"store": str(path), "beside": {p.name: size for p, size in beside}})
