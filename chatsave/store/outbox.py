"""The outbox: every write request to a backend, recorded with its exact body and
Idempotency-Key before it is first sent, so that a rerun re-sends the same body under
the same key. Once answered (or abandoned) a batch keeps its key, state and times, not its
body nor its message ids: nothing sends it again."""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass

from chatsave.store.base import now_text
from chatsave.store.store import Store

#: What an answered or abandoned batch keeps (``_empty``).
_KEPT = "batch_id, backend_id, chat_id, kind, idempotency_key, attempts, created_at, run_id"


def _empty(conn: sqlite3.Connection, batch_id: int, state: str, error: str | None,
           now: str, *, attempted: bool) -> None:
    """Close a batch: an answered or abandoned batch is never sent again, so its body goes
    (it was most of the store's size after a save), and its (id, hash) pairs (what the
    backend said of each message is in remote_state); its key, state and times stay, for
    gc and the record. Deleted and inserted again, not updated: SQLite leaves a row that
    an UPDATE shrinks alone on its page, so each emptied batch kept a whole page."""
    row = conn.execute(f"SELECT {_KEPT} FROM outbox WHERE batch_id = ?",
                       (batch_id,)).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM outbox WHERE batch_id = ?", (batch_id,))
    conn.execute(
        f"INSERT INTO outbox ({_KEPT}, body, message_ids, state, last_error, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, X'', '[]', ?, ?, ?)",
        (*row[:5], row[5] + attempted, *row[6:], state, error, now))


@dataclass
class Batch:
    """One write request in the outbox: its exact body and Idempotency-Key."""

    batch_id: int
    chat_id: str
    kind: str
    key: str
    body: bytes
    items: list[tuple[str, str]]  # (message id, content hash sent)
    attempts: int = 0


@dataclass(frozen=True)
class BatchRef:
    """A batch in the outbox, without its body (queues hold these: bounded memory)."""

    batch_id: int
    chat_id: str
    messages: int
    size: int
    kind: str = "save"


class Outbox:
    """The ``outbox`` rows of one backend (a part of BackendView)."""

    store: Store
    backend_id: str

    # ----------------------------------------------------------------- reading
    def _open_refs(self) -> list[BatchRef]:
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT batch_id, chat_id, json_array_length(message_ids), length(body), kind "
                "FROM outbox WHERE backend_id = ? AND state = 'open' "
                "ORDER BY batch_id", (self.backend_id,)).fetchall()
        return [BatchRef(*r) for r in rows]

    def open_batches(self, chat_ids: set[str] | None = None) -> list[BatchRef]:
        """Batches recorded but not yet answered (a run was interrupted), oldest first."""
        refs = self._open_refs()
        if chat_ids is not None:
            refs = [b for b in refs if b.chat_id in chat_ids]
        return [ref for ref in refs if not self._stale(ref)]

    def _stale(self, ref: BatchRef) -> bool:
        """Whether a batch no longer says what this store holds: a save carrying a message
        deleted or replaced here since it was recorded, a delete of one restored here.
        Re-sending it would write what the store no longer holds (a deleted message back
        on the backend); what it carried that is still pending is planned again instead."""
        items = self.load(ref).items
        with self.store.errors():
            if ref.kind == "save":
                held = {mid: chash for mid, chash in self.store.message_keys(ref.chat_id)}
                return any(held.get(mid) != chash for mid, chash in items)
            gone = {r[0] for r in self.store.conn.execute(
                "SELECT id FROM tombstones WHERE chat_id = ?", (ref.chat_id,))}
            return any(mid not in gone for mid, _ in items)

    def abandon_stale(self, chat_ids: set[str] | None = None) -> int:
        """Mark the open batches that ``open_batches`` leaves out as abandoned (not sent)."""
        stale = [ref for ref in self._open_refs()
                 if (chat_ids is None or ref.chat_id in chat_ids) and self._stale(ref)]
        if stale:
            now = now_text()
            with self.store.transaction() as conn:
                for ref in stale:
                    _empty(conn, ref.batch_id, "abandoned",
                           "its messages changed here before it was answered", now,
                           attempted=False)
        return len(stale)

    def load(self, ref: BatchRef) -> Batch:
        """The whole batch: exact body, key and the (id, hash) pairs it carries."""
        with self.store.errors():
            r = self.store.conn.execute(
                "SELECT batch_id, chat_id, kind, idempotency_key, body, message_ids, attempts "
                "FROM outbox WHERE batch_id = ?", (ref.batch_id,)).fetchone()
        return Batch(r[0], r[1], r[2], r[3], bytes(r[4]),
                     [(i, h) for i, h in json.loads(r[5])], r[6])

    def ids_in(self, refs: list[BatchRef]) -> set[str]:
        """Message ids carried by these batches."""
        out: set[str] = set()
        for ref in refs:
            out.update(mid for mid, _ in self.load(ref).items)
        return out

    # ----------------------------------------------------------------- writing
    def add_batch(self, chat_id: str, kind: str, body: bytes, items: list[tuple[str, str]],
                  run_id: int | None) -> BatchRef:
        """Record a batch and its Idempotency-Key (committed before it is ever sent)."""
        key = str(uuid.uuid4())
        now = now_text()
        with self.store.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO outbox (backend_id, chat_id, kind, idempotency_key, body,"
                " message_ids, created_at, updated_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.backend_id, chat_id, kind, key, body, json.dumps(items), now, now, run_id))
        return BatchRef(int(cur.lastrowid or 0), chat_id, len(items), len(body), kind)

    def note_attempt(self, batch: Batch, error: str | None) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ?,"
                         " updated_at = ? WHERE batch_id = ?", (error, now_text(), batch.batch_id))

    def abandon(self, batch: Batch, reason: str) -> None:
        """Give up a batch the backend never applied (413: it is split and re-recorded)."""
        with self.store.transaction() as conn:
            _empty(conn, batch.batch_id, "abandoned", reason, now_text(), attempted=False)

    def _close(self, batch: Batch, error: str | None) -> None:
        """Mark a batch answered (inside the transaction recording its answer)."""
        _empty(self.store.conn, batch.batch_id, "done", error, now_text(), attempted=True)
