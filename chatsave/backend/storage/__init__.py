"""Server-side storage engines: SQLite (default) and PostgreSQL, opened by ``open_storage``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from chatsave.backend.storage.base import (
    ChatRow,
    IdempotencyRecord,
    MessageRow,
    Storage,
    StorageError,
    StorageUnavailable,
    WriteTx,
)
from chatsave.errors import UsageError

__all__ = [
    "ChatRow",
    "IdempotencyRecord",
    "MessageRow",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "WriteTx",
    "is_postgres_url",
    "open_storage",
    "sqlite_path",
]


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """True for ``postgresql://`` and ``postgres://`` URLs."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def sqlite_path(location: str | os.PathLike[str]) -> Path:
    """The file a path or ``file:`` URL names (``file:rel``, ``file:/abs``, ``file:///abs``)."""
    text = os.fspath(location)
    if text.startswith("file:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file: URL {text!r} names another host ({parts.netloc})",
                             hint="use file:///absolute/path or a plain path")
        path = unquote(parts.path) if parts.netloc or text.startswith("file://") else \
            unquote(text[len("file:"):])
        if not path:
            raise UsageError(f"file: URL {text!r} names no file")
        return Path(path)
    if not text:
        raise UsageError("empty database path")
    return Path(text)


def open_storage(location: str | os.PathLike[str]) -> Storage:
    """Open (creating and migrating if needed) the database at ``location``.

    A ``postgresql://`` URL selects PostgreSQL; anything else is a SQLite file path or a
    ``file:`` URL.
    """
    if is_postgres_url(location):
        from chatsave.backend.storage.postgres import PostgresStorage

        return PostgresStorage(str(location))
    from chatsave.backend.storage.sqlite import SqliteStorage

    return SqliteStorage(sqlite_path(location))
