"""What a backend said about each message (``remote_state``): its answers recorded, one
transaction per answer with the batch it closes, and the states set or forgotten by
sync, recheck and dedupe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatsave.errors import StoreError
from chatsave.store.base import hash_value, now_text
from chatsave.store.outbox import Batch, Outbox

# (id, state, rev, content hash, reason) of one message, as ``remote_state`` holds it.
StateRow = tuple[str, str, int | None, str | None, str | None]
# SQL naming the backend of a ``remote_state`` row by its id (one parameter): rows are keyed
# by the backend's number (``backends.backend_key``); an unknown backend has none, so nothing.
KEY = "(SELECT backend_key FROM backends WHERE backend_id = ?)"


@dataclass
class Tally:
    """What one answer confirmed, per outcome."""

    saved: int = 0
    unchanged: int = 0
    conflicts: int = 0
    rejected: int = 0
    unacknowledged: int = 0


def _unmentioned(sent: dict[str, str], seen: set[str], reason: str, tally: Tally,
                 problems: list[dict[str, Any]]) -> None:
    """Count and list what was sent and the answer did not mention (``seen``)."""
    for mid in sent:
        if mid not in seen:
            tally.unacknowledged += 1
            problems.append({"type": "unconfirmed", "id": mid, "reason": reason,
                             "content_hash": sent[mid]})


class Answers(Outbox):
    """The ``remote_state`` writes of one backend (a part of BackendView)."""

    def _state(self, conn: Any, chat_id: str, rows: list[StateRow]) -> None:
        now = now_text()
        key = self.backend_key(conn)
        conn.executemany(
            "INSERT INTO remote_state (backend_key, chat_id, id, state, rev, content_hash,"
            " reason, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (backend_key, chat_id, id) DO UPDATE SET state = excluded.state,"
            " rev = excluded.rev, content_hash = excluded.content_hash,"
            " reason = excluded.reason, updated_at = excluded.updated_at",
            [(key, chat_id, mid, state, rev, hash_value(chash), reason, now)
             for mid, state, rev, chash, reason in rows])

    def backend_key(self, conn: Any) -> int:
        """This backend's number in ``backends`` (registered before anything is recorded)."""
        row = conn.execute("SELECT backend_key FROM backends WHERE backend_id = ?",
                           (self.backend_id,)).fetchone()
        if row is None:
            raise StoreError(f"backend {self.backend_id!r} is not registered in the store",
                             hint="this is a bug in chatsave: please report it")
        return int(row[0])

    def record_save(self, batch: Batch, answer: Any) -> tuple[Tally, list[dict[str, Any]]]:
        """Record an accepted SaveAnswer for ``batch`` (one transaction) and close the batch.

        A message counts as confirmed only when the answer lists its id with the hash that
        was sent. Returns the tally and the per-message problems (conflicts, rejections,
        ids the answer left out or acknowledged with another hash).
        """
        sent = dict(batch.items)
        tally = Tally()
        problems: list[dict[str, Any]] = []
        rows: list[StateRow] = []
        seen: set[str] = set()
        for outcome in ("saved", "unchanged"):
            for ack in getattr(answer, outcome):
                if ack.id not in sent or ack.id in seen:
                    continue
                seen.add(ack.id)
                if ack.content_hash != sent[ack.id]:
                    problems.append({"type": "unconfirmed", "id": ack.id,
                                     "reason": "acknowledged with another content hash",
                                     "content_hash": sent[ack.id],
                                     "remote_hash": ack.content_hash})
                    tally.unacknowledged += 1
                    continue
                rows.append((ack.id, "confirmed", ack.rev, ack.content_hash, None))
                setattr(tally, outcome, getattr(tally, outcome) + 1)
        for conflict in answer.conflicts:
            if conflict.id not in sent or conflict.id in seen:
                continue
            seen.add(conflict.id)
            rows.append((conflict.id, "conflict", conflict.rev, conflict.content_hash,
                         conflict.reason))
            tally.conflicts += 1
            problems.append({"type": "conflict", "id": conflict.id, "reason": conflict.reason,
                             "content_hash": sent[conflict.id],
                             "remote_hash": conflict.content_hash, "rev": conflict.rev})
        for rejected in answer.rejected:
            if rejected.id not in sent or rejected.id in seen:
                continue
            seen.add(rejected.id)
            rows.append((rejected.id, "rejected", None, sent[rejected.id], rejected.reason))
            tally.rejected += 1
            problems.append({"type": "rejected", "id": rejected.id, "reason": rejected.reason,
                             "content_hash": sent[rejected.id]})
        _unmentioned(sent, seen, "the answer did not mention it", tally, problems)
        self._record(batch, rows)
        return tally, problems

    def reject_batch(self, batch: Batch, reason: str) -> None:
        """The backend refused the whole request (422): its messages are rejected, kept here."""
        with self.store.transaction() as conn:
            self._state(conn, batch.chat_id,
                        [(mid, "rejected", None, chash, reason) for mid, chash in batch.items])
            self._close(batch, reason)

    def reject_local(self, chat_id: str, message_id: str, content_hash: str,
                     reason: str) -> None:
        """A message this backend cannot take at all (too large for its limits)."""
        with self.store.transaction() as conn:
            self._state(conn, chat_id, [(message_id, "rejected", None, content_hash, reason)])

    def record_delete(self, batch: Batch, answer: Any) -> tuple[Tally, list[dict[str, Any]]]:
        """Record a DeleteAnswer (one transaction) and close the batch."""
        sent = dict(batch.items)
        tally = Tally()
        problems: list[dict[str, Any]] = []
        rows: list[StateRow] = []
        seen: set[str] = set()
        for ack in answer.deleted:
            if ack.id in sent and ack.id not in seen:
                seen.add(ack.id)
                rows.append((ack.id, "deleted", ack.rev, ack.content_hash, None))
                tally.saved += 1
        for mid in answer.missing:
            if mid in sent and mid not in seen:
                seen.add(mid)
                rows.append((mid, "deleted", None, sent[mid], "missing on the backend"))
                tally.unchanged += 1
        for conflict in answer.conflicts:
            if conflict.id in sent and conflict.id not in seen:
                seen.add(conflict.id)
                reason = f"deleted here, changed on the backend ({conflict.reason})"
                rows.append((conflict.id, "conflict", conflict.rev, conflict.content_hash,
                             reason))
                tally.conflicts += 1
                problems.append({"type": "conflict", "id": conflict.id, "reason": reason,
                                 "content_hash": sent[conflict.id],
                                 "remote_hash": conflict.content_hash, "rev": conflict.rev})
        _unmentioned(sent, seen, "the delete answer did not mention it", tally, problems)
        self._record(batch, rows)
        return tally, problems

    def _record(self, batch: Batch, rows: list[StateRow]) -> None:
        """Record what an answer said and close its batch (one transaction)."""
        with self.store.transaction() as conn:
            self._state(conn, batch.chat_id, rows)
            self._close(batch, None)

    # ------------------------------------------------------- per-message state
    def set_states(self, chat_id: str, rows: list[StateRow]) -> None:
        """Record (id, state, rev, hash, reason) rows (inside a transaction)."""
        if rows:
            self._state(self.store.conn, chat_id, rows)

    def forget(self, chat_id: str, ids: list[str]) -> None:
        """Drop what this backend said about these messages (inside a transaction)."""
        self.store.conn.executemany(
            f"DELETE FROM remote_state WHERE backend_key = {KEY} AND chat_id = ? AND id = ?",
            [(self.backend_id, chat_id, mid) for mid in ids])

    def clear_notes(self, chat_ids: list[str], reason: str) -> None:
        """Clear the note ``reason`` from the confirmations in these chats (inside a
        transaction)."""
        self.store.conn.executemany(
            f"UPDATE remote_state SET reason = NULL WHERE backend_key = {KEY} AND chat_id = ?"
            " AND state = 'confirmed' AND reason = ?",
            [(self.backend_id, chat_id, reason) for chat_id in chat_ids])

    def note_confirmed(self, ids: list[tuple[str, str]], reason: str) -> None:
        """Note ``reason`` on these (chat, id) confirmations (inside a transaction)."""
        self.store.conn.executemany(
            f"UPDATE remote_state SET reason = ? WHERE backend_key = {KEY} AND chat_id = ?"
            " AND id = ? AND state = 'confirmed'",
            [(reason, self.backend_id, chat_id, mid) for chat_id, mid in ids])
