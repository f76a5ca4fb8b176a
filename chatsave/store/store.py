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
import os
import sqlite3
import stat
import uuid
from pathlib import Path

from chatsave import __version__
from chatsave.config import make_private_dirs
from chatsave.errors import StoreError, StoreMissingError
from chatsave.store.base import ChatRow as ChatRow
from chatsave.store.base import Stub as Stub
from chatsave.store.base import now_text
from chatsave.store.chats import Chats
from chatsave.store.checks import (
    _check_file,
    _check_store,
    _checking_connection,
    _refuse_leftovers,
    _translate,
)
from chatsave.store.gc import Housekeeping
from chatsave.store.lock import StoreLock
from chatsave.store.migrations import LATEST, current_version, migrate
from chatsave.store.status import Status
from chatsave.store.trash import Trash
from chatsave.wal import set_wal


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
            # Before any table: pages freed (answered outbox bodies) can be given back to
            # the file system after a save (Housekeeping.release_free_pages), not only by
            # gc's VACUUM. Only a new file can take it without a VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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


class Store(Trash, Chats, Status, Housekeeping):
    """An open local store. Use ``Store.open(path)``; close it (or use ``with``).

    Its queries are grouped by concern in the classes it is made of: messages
    (chatsave.store.messages) and the trash and tombstones (chatsave.store.trash), chats
    (chatsave.store.chats), runs and counts (chatsave.store.status), evicted bodies and
    what gc drops (chatsave.store.gc); the connection, its transactions and its errors are
    chatsave.store.base. What one backend said is chatsave.store.backend.
    """

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
