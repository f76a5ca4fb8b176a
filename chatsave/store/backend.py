"""The store's state for one backend: what it confirmed, the outbox of write requests, conflicts.

Everything is keyed by the backend's ``backend_id`` (from its capabilities), never by URL:
what one backend confirmed never counts for another.

``BackendView`` is made of one class per concern: the outbox (chatsave.store.outbox),
the answers recorded and the states set (chatsave.store.answers), what is pending
(chatsave.store.pending); here are the backend's row, its confirmations read, the checks
of what it holds and the chats' agreement recorded by sync (``sync_state``).
"""

from __future__ import annotations

import itertools
from typing import Any

from chatsave.model import EMPTY_DIGEST, digest_of_sorted_lines
from chatsave.store.answers import KEY, Answers
from chatsave.store.answers import Tally as Tally
from chatsave.store.base import hash_sql
from chatsave.store.outbox import Batch as Batch
from chatsave.store.outbox import BatchRef as BatchRef
from chatsave.store.pending import Pending
from chatsave.store.store import Store, now_text


def recorded_urls(store: Store) -> list[str]:
    """The URLs (as last written) of every backend this store has used."""
    with store.errors():
        return [str(r[0]) for r in store.conn.execute("SELECT url FROM backends")]


class BackendView(Answers, Pending):
    """The local store as seen for one backend."""

    def __init__(self, store: Store, backend_id: str) -> None:
        self.store = store
        self.backend_id = backend_id

    @classmethod
    def register(cls, store: Store, backend_id: str, url: str) -> BackendView:
        now = now_text()
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO backends (backend_id, url, first_seen, last_seen) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (backend_id) DO UPDATE SET url = excluded.url, "
                "last_seen = excluded.last_seen", (backend_id, url, now, now))
        return cls(store, backend_id)

    # ------------------------------------------------------- per-message state
    def states(self, chat_id: str) -> dict[str, tuple[str, int | None, str | None]]:
        """id -> (state, rev, content_hash) of what this backend said about a chat's messages."""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT id, state, rev, {hash_sql('content_hash')} FROM remote_state"
                f" WHERE backend_key = {KEY} AND chat_id = ?",
                (self.backend_id, chat_id)).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def state_of(self, chat_id: str, message_id: str) -> dict[str, Any] | None:
        """What this backend last said about one message: state, rev, content_hash and
        reason (None: nothing)."""
        with self.store.errors():
            row = self.store.conn.execute(
                f"SELECT state, rev, {hash_sql('content_hash')}, reason FROM remote_state"
                f" WHERE backend_key = {KEY} AND chat_id = ? AND id = ?",
                (self.backend_id, chat_id, message_id)).fetchone()
        if row is None:
            return None
        return {"state": row[0], "rev": row[1], "content_hash": row[2], "reason": row[3]}

    def confirmed_chats(self, chat_ids: set[str] | None = None) -> set[str]:
        """The chats (of ``chat_ids``; None: any) holding messages this backend confirmed."""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT DISTINCT chat_id FROM remote_state WHERE backend_key = {KEY}"
                " AND state = 'confirmed'", (self.backend_id,)).fetchall()
        return {r[0] for r in rows if chat_ids is None or r[0] in chat_ids}

    def confirmed_digests(self, chat_ids: set[str]) -> dict[str, str]:
        """Per chat of ``chat_ids`` holding messages this backend confirmed: the chat digest
        of the (id, hash) pairs it confirmed, the digest it has while it holds just those.

        The lines are sorted by SQLite and hashed as they stream (memory stays flat)."""
        out: dict[str, str] = {}
        with self.store.errors():
            for chat_id in sorted(chat_ids):
                cur = self.store.conn.execute(
                    f"SELECT id || ':' || {hash_sql('content_hash')} AS line"
                    f" FROM remote_state WHERE backend_key = {KEY} AND chat_id = ?"
                    " AND state = 'confirmed'"
                    " ORDER BY line", (self.backend_id, chat_id))
                first = cur.fetchone()
                if first is not None:
                    out[chat_id] = digest_of_sorted_lines(
                        itertools.chain((first[0],), (line for line, in cur)))
        return out

    def evictable(self, chat_id: str) -> list[tuple[str, int, str, str]]:
        """(id, size, content hash, created_at) of a chat's bodies held here that this
        backend confirmed by their hash, oldest first: what gc may evict."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT m.id, m.size, m.content_hash, m.created_at FROM messages m"
                f" JOIN remote_state r ON r.backend_key = {KEY} AND r.chat_id = m.chat_id"
                " AND r.id = m.id AND r.state = 'confirmed'"
                f" AND {hash_sql('r.content_hash')} = m.content_hash"
                " WHERE m.chat_id = ? AND m.evicted = 0 ORDER BY m.created_at, m.ord",
                (self.backend_id, chat_id)).fetchall()

    # ---------------------------------------------------- what it still holds
    def checks(self) -> dict[str, tuple[str, str]]:
        """chat -> (backend digest, confirmed digest) of the last check that found this
        backend holding everything it confirmed in the chat while their digests differed."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT chat_id, backend_digest, confirmed_digest FROM backend_checks"
                " WHERE backend_id = ?", (self.backend_id,)).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def note_checked(self, chat_id: str, backend_digest: str, confirmed_digest: str) -> None:
        """Remember that, at these digests, this backend held all it confirmed in a chat."""
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO backend_checks (backend_id, chat_id, backend_digest,"
                " confirmed_digest, checked_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (backend_id, chat_id) DO UPDATE SET"
                " backend_digest = excluded.backend_digest,"
                " confirmed_digest = excluded.confirmed_digest,"
                " checked_at = excluded.checked_at",
                (self.backend_id, chat_id, backend_digest, confirmed_digest, now_text()))

    def noted_chats(self) -> set[str]:
        """The chats with a confirmation of this backend that carries a note."""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT DISTINCT chat_id FROM remote_state WHERE backend_key = {KEY}"
                " AND state = 'confirmed' AND reason IS NOT NULL",
                (self.backend_id,)).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------- chats agreed (sync_state)
    def synced_digests(self) -> dict[str, str | None]:
        """chat -> the local digest when sync last found it in agreement with this backend."""
        with self.store.errors():
            return dict(self.store.conn.execute(
                "SELECT chat_id, digest FROM sync_state WHERE backend_id = ?",
                (self.backend_id,)).fetchall())

    def synced_chats(self) -> list[str]:
        """The chats sync found in agreement with this backend while they held messages (a
        chat synced while it was empty may be unknown to the backend)."""
        with self.store.errors():
            return [r[0] for r in self.store.conn.execute(
                "SELECT chat_id FROM sync_state WHERE backend_id = ? AND digest != ?",
                (self.backend_id, EMPTY_DIGEST))]

    def agreements(self) -> set[tuple[str, int | None, str | None]]:
        """(chat, backend version, local digest) of every chat's last agreement."""
        with self.store.errors():
            return {(r[0], r[1], r[2]) for r in self.store.conn.execute(
                "SELECT chat_id, version, digest FROM sync_state WHERE backend_id = ?",
                (self.backend_id,))}

    def record_agreements(self, rows: list[tuple[str, int, str]], now: str,
                          synced: bool) -> None:
        """Record (chat, backend version, local digest) agreements reached at ``now``, and
        with ``synced`` the backend's last sync (one transaction)."""
        with self.store.transaction() as conn:
            conn.executemany(
                "INSERT INTO sync_state (backend_id, chat_id, version, digest, synced_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (backend_id, chat_id) DO UPDATE SET"
                " version = excluded.version, digest = excluded.digest,"
                " synced_at = excluded.synced_at",
                [(self.backend_id, chat_id, version, digest, now)
                 for chat_id, version, digest in rows])
            if synced:
                conn.execute("UPDATE backends SET last_sync = ? WHERE backend_id = ?",
                             (now, self.backend_id))


def replaced_backend(store: Store, url: str, backend_id: str) -> str | None:
    """The backend id this store synced with at ``url`` when ``url`` now answers as another
    backend it never synced with (a replaced or reset server), else None."""
    with store.errors():
        row = store.conn.execute(
            "SELECT b.backend_id FROM backends b WHERE b.url = ? AND b.backend_id != ?"
            " AND EXISTS (SELECT 1 FROM sync_state s WHERE s.backend_id = b.backend_id)"
            " AND NOT EXISTS (SELECT 1 FROM sync_state s WHERE s.backend_id = ?)",
            (url, backend_id, backend_id)).fetchone()
    return None if row is None else str(row[0])
