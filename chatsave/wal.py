"""Opening SQLite files in WAL mode when other connections may be opening them too."""

from __future__ import annotations

import sqlite3
import time


def set_wal(conn: sqlite3.Connection, attempts: int = 100) -> None:
    """Switch a connection's file to WAL (a no-op when it already is).

    The switch needs a moment alone with the file and SQLite's busy handler does not wait
    for it, so concurrent openers (a server's pool, two chatsave processes) retry.
    """
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)
