"""What a backend holds of a chat, read into ``TEMP`` tables of the store's connection.

Private to the connection and gone when it closes: never part of the store file or its
schema. A chat's messages are read into them page by page, so memory stays constant
however large a chat is, and SQL then compares them with what the store holds.

- ``RemoteCopy`` (``remote_msgs``): the backend's messages of the chats being compared
  (chatsave.ops.compare; diff, sync, dedupe, gc and fetch read it).
- ``HeldIds`` (``backend_ids``): the ids the backend holds in a chat, and whether each is
  live, against what it confirmed (chatsave.ops.recheck).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from chatsave.store.answers import KEY
from chatsave.store.backend import BackendView
from chatsave.store.base import FINGERPRINT
from chatsave.store.store import Store

_REMOTE_MSGS = """CREATE TEMP TABLE IF NOT EXISTS remote_msgs (
    chat_id TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, rev INTEGER NOT NULL,
    content_hash TEXT NOT NULL, deleted INTEGER NOT NULL, fingerprint TEXT,
    created_at TEXT, body TEXT, PRIMARY KEY (chat_id, id))"""

_BACKEND_IDS = """CREATE TEMP TABLE IF NOT EXISTS backend_ids (
    chat_id TEXT NOT NULL, id TEXT NOT NULL, live INTEGER NOT NULL,
    PRIMARY KEY (chat_id, id)) WITHOUT ROWID"""


class CopiedMessage(NamedTuple):
    """One message of the backend's, as the copy keeps it. Without a usable time, role or
    content (a tombstone, or a backend answering nonsense) it has no ``fingerprint`` and
    takes no part in the search for duplicates; its ``body`` (wire JSON) is kept only
    when asked for."""

    chat_id: str
    id: str
    seq: int
    rev: int
    content_hash: str
    deleted: int
    fingerprint: str | None
    created_at: str | None
    body: str | None


class RemoteCopy:
    """The backend's messages of the chats being compared (``remote_msgs``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        with store.errors():
            store.conn.execute(_REMOTE_MSGS)

    def clear(self, chat_id: str) -> None:
        """Forget what was read of a chat."""
        with self.store.errors():
            self.store.conn.execute("DELETE FROM temp.remote_msgs WHERE chat_id = ?",
                                    (chat_id,))

    def add(self, rows: Sequence[CopiedMessage]) -> None:
        """Keep one page of the backend's messages."""
        with self.store.errors():
            self.store.conn.executemany(
                "INSERT OR REPLACE INTO temp.remote_msgs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)

    def standing(self, chat_id: str, buckets: Sequence[str] | None = None
                 ) -> Iterator[tuple[Any, ...]]:
        """(id, local hash, the backend's hash, rev, deleted there) of every message of a
        chat held here, in local order; the backend's part None where it has not the id.
        A cursor: streamed, not fetched whole, so memory does not grow with the chat.

        With ``buckets``, only those buckets of the chat were read (docs/protocol.md,
        "Buckets"): a message of another bucket is held by the backend as it is here (the
        bucket's digests agreed), so its backend hash is its own (rev and deleted None)."""
        with self.store.errors():
            if buckets is None:
                return self.store.conn.execute(
                    "SELECT m.id, m.content_hash, r.content_hash, r.rev, r.deleted"
                    " FROM messages m LEFT JOIN temp.remote_msgs r"
                    " ON r.chat_id = m.chat_id AND r.id = m.id"
                    " WHERE m.chat_id = ? ORDER BY m.ord", (chat_id,))
            marks = ",".join("?" * len(buckets))
            return self.store.conn.execute(
                "SELECT m.id, m.content_hash, CASE WHEN r.id IS NULL AND"
                f" substr(m.content_hash, 1, 2) NOT IN ({marks}) THEN m.content_hash"
                " ELSE r.content_hash END, r.rev, r.deleted"
                " FROM messages m LEFT JOIN temp.remote_msgs r"
                " ON r.chat_id = m.chat_id AND r.id = m.id"
                " WHERE m.chat_id = ? ORDER BY m.ord", (*buckets, chat_id))

    def shares_fingerprints(self, chat_id: str) -> bool:
        """Whether a live message read of the backend's chat shares its fingerprint with
        another one read, or with a message of another id held here. With only some buckets
        read, the search for retry copies on the backend's side could find one only then:
        the rest of its messages are this store's, which has no repeats."""
        if self.has_repeats(chat_id):
            return True
        conn = self.store.conn
        with self.store.errors():
            # One pass over the chat here (IN builds one index of what was read; a stored
            # fingerprint's bytes compared in upper-case hex), then the few messages it
            # finds are matched by id.
            shared = conn.execute(
                f"SELECT id, {FINGERPRINT} FROM messages WHERE chat_id = ?"
                " AND hex(fingerprint) IN (SELECT upper(fingerprint) FROM temp.remote_msgs"
                " WHERE chat_id = ? AND deleted = 0)", (chat_id, chat_id)).fetchall()
            for mid, fprint in shared:
                if conn.execute("SELECT 1 FROM temp.remote_msgs WHERE chat_id = ?"
                                " AND fingerprint = ? AND id != ? AND deleted = 0",
                                (chat_id, fprint, mid)).fetchone():
                    return True
        return False

    def only_there(self, chat_id: str) -> Iterator[tuple[Any, ...]]:
        """(id, hash, rev, deleted here) of the messages the backend holds live and this
        store does not, in the backend's order (a cursor, streamed)."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT r.id, r.content_hash, r.rev, t.id IS NOT NULL"
                " FROM temp.remote_msgs r LEFT JOIN messages m"
                " ON m.chat_id = r.chat_id AND m.id = r.id"
                " LEFT JOIN tombstones t ON t.chat_id = r.chat_id AND t.id = r.id"
                " WHERE r.chat_id = ? AND m.id IS NULL AND r.deleted = 0 ORDER BY r.seq",
                (chat_id,))

    def has_repeats(self, chat_id: str) -> bool:
        """Whether two live messages of the backend's share a fingerprint."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT 1 FROM temp.remote_msgs WHERE chat_id = ? AND deleted = 0 "
                "AND fingerprint IS NOT NULL GROUP BY fingerprint HAVING COUNT(*) > 1 "
                "LIMIT 1", (chat_id,)).fetchone() is not None

    def fingerprints(self, chat_id: str) -> Iterator[tuple[Any, ...]]:
        """(id, fingerprint, created_at, seq) of the backend's live messages that have a
        fingerprint, in time order (a cursor: read it inside ``errors()``)."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT id, fingerprint, created_at, seq FROM temp.remote_msgs "
                "WHERE chat_id = ? AND deleted = 0 AND fingerprint IS NOT NULL "
                "ORDER BY created_at, seq", (chat_id,))

    def live_entries(self, chat_id: str) -> Iterator[tuple[Any, ...]]:
        """(id, fingerprint, created_at, seq, content_hash, rev) of the backend's live
        messages of a chat (a cursor: read it inside ``errors()``)."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT id, fingerprint, created_at, seq, content_hash, rev"
                " FROM temp.remote_msgs WHERE chat_id = ? AND deleted = 0", (chat_id,))

    def live_hashes(self, chat_id: str) -> dict[str, str]:
        """id -> hash of the backend's live messages of a chat."""
        with self.store.errors():
            return dict(self.store.conn.execute(
                "SELECT id, content_hash FROM temp.remote_msgs WHERE chat_id = ?"
                " AND deleted = 0", (chat_id,)).fetchall())

    def entry(self, chat_id: str, message_id: str) -> tuple[int, int, str, int] | None:
        """(seq, rev, hash, deleted) of one message of the backend's, or None."""
        with self.store.errors():
            row = self.store.conn.execute(
                "SELECT seq, rev, content_hash, deleted FROM temp.remote_msgs"
                " WHERE chat_id = ? AND id = ?", (chat_id, message_id)).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def body(self, chat_id: str, message_id: str) -> str | None:
        """The wire JSON kept of one message of the backend's, or None."""
        with self.store.errors():
            row = self.store.conn.execute(
                "SELECT body FROM temp.remote_msgs WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return None if row is None else row[0]


class HeldIds:
    """The ids one backend holds in a chat (``backend_ids``), against what it confirmed."""

    def __init__(self, view: BackendView) -> None:
        self.view = view
        self.store = view.store
        with self.store.errors():
            self.store.conn.execute(_BACKEND_IDS)

    def clear(self, chat_id: str) -> None:
        """Forget what was read of a chat."""
        with self.store.errors():
            self.store.conn.execute("DELETE FROM temp.backend_ids WHERE chat_id = ?",
                                    (chat_id,))

    def add(self, chat_id: str, ids: Sequence[tuple[str, bool]]) -> None:
        """Keep one page of (id, live) the backend holds in a chat."""
        with self.store.errors():
            self.store.conn.executemany(
                "INSERT OR REPLACE INTO temp.backend_ids VALUES (?, ?, ?)",
                [(chat_id, mid, int(live)) for mid, live in ids])

    def lost(self, chat_id: str, *, live_only: bool) -> dict[str, str | None]:
        """id -> note of each confirmed message of a chat the backend no longer holds (with
        ``live_only``, no longer holds live)."""
        held = " AND b.live = 1" if live_only else ""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT r.id, r.reason FROM remote_state r WHERE r.backend_key = {KEY}"
                " AND r.chat_id = ? AND r.state = 'confirmed' AND NOT EXISTS (SELECT 1"
                f" FROM temp.backend_ids b WHERE b.chat_id = r.chat_id AND b.id = r.id{held})"
                " ORDER BY r.id", (self.view.backend_id, chat_id)).fetchall()
        return {mid: reason for mid, reason in rows}

    def clear_notes(self, chat_id: str, reason: str) -> None:
        """Clear the note ``reason`` from the confirmations in a chat that the backend holds
        (one transaction)."""
        with self.store.transaction() as conn:
            conn.execute(
                f"UPDATE remote_state SET reason = NULL WHERE backend_key = {KEY} AND chat_id = ?"
                " AND state = 'confirmed' AND reason = ? AND EXISTS (SELECT 1 FROM"
                " temp.backend_ids b WHERE b.chat_id = remote_state.chat_id"
                " AND b.id = remote_state.id)", (self.view.backend_id, chat_id, reason))
