"""The store's state for one backend: what it confirmed, the outbox of write requests, conflicts.

Everything is keyed by the backend's ``backend_id`` (from its capabilities), never by URL:
what one backend confirmed never counts for another.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from chatsave.model import Message, digest_of_sorted_lines
from chatsave.store.store import Store, now_text

# JSON text of a string, as the wire writes it (compact, UTF-8 kept).
_JSON_TEXT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_INEXACT = ',"inexact":true'


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


@dataclass
class Tally:
    """What one answer confirmed, per outcome."""

    saved: int = 0
    unchanged: int = 0
    conflicts: int = 0
    rejected: int = 0
    unacknowledged: int = 0


def recorded_urls(store: Store) -> list[str]:
    """The URLs (as last written) of every backend this store has used."""
    with store.errors():
        return [str(r[0]) for r in store.conn.execute("SELECT url FROM backends")]


class BackendView:
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

    # ----------------------------------------------------------------- reading
    def open_batches(self, chat_ids: set[str] | None = None) -> list[BatchRef]:
        """Batches recorded but not yet answered (a run was interrupted), oldest first."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT batch_id, chat_id, json_array_length(message_ids), length(body), kind "
                "FROM outbox WHERE backend_id = ? AND state = 'open' "
                "ORDER BY batch_id", (self.backend_id,)).fetchall()
        refs = [BatchRef(*r) for r in rows]
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
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT batch_id, chat_id, json_array_length(message_ids), length(body), kind "
                "FROM outbox WHERE backend_id = ? AND state = 'open' "
                "ORDER BY batch_id", (self.backend_id,)).fetchall()
        stale = [BatchRef(*r) for r in rows
                 if (chat_ids is None or r[1] in chat_ids) and self._stale(BatchRef(*r))]
        if stale:
            with self.store.transaction() as conn:
                conn.executemany(
                    "UPDATE outbox SET state = 'abandoned', last_error = ?, updated_at = ?"
                    " WHERE batch_id = ?",
                    [("its messages changed here before it was answered", now_text(),
                      ref.batch_id) for ref in stale])
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

    def pending(self, chat_id: str, *, retry_rejected: bool = False,
                exclude: set[str] | None = None, page: int = 1000) -> Iterator[Message]:
        """Live messages of a chat this backend has not confirmed with their current hash,
        in local order, read page by page. Conflicts wait for sync; rejected ones wait for
        ``retry_rejected``."""
        last = 0
        cols = Store.columns("m")
        while True:
            with self.store.errors():
                rows = self.store.conn.execute(
                    f"SELECT m.ord, {cols} FROM messages m LEFT JOIN remote_state r"
                    " ON r.backend_id = ? AND r.chat_id = m.chat_id AND r.id = m.id"
                    " WHERE m.chat_id = ? AND m.ord > ? AND m.evicted = 0 AND ("
                    "   r.state IS NULL"
                    "   OR (r.state = 'confirmed' AND r.content_hash != m.content_hash)"
                    "   OR (r.state = 'rejected' AND ?))"
                    " ORDER BY m.ord LIMIT ?",
                    (self.backend_id, chat_id, last, int(retry_rejected), page)).fetchall()
            if not rows:
                return
            for row in rows:
                item = Store.row_to_message(row[1:])
                if isinstance(item, Message) and not (exclude and item.id in exclude):
                    yield item
            last = rows[-1][0]

    def pending_pieces(self, chat_id: str, *, retry_rejected: bool = False,
                       exclude: set[str] | None = None, page: int = 1000
                       ) -> Iterator[tuple[str, str, str]]:
        """What ``pending`` yields, as (id, content hash, JSON text of the message on the
        wire with its content_hash), built straight from the stored columns: the stored
        metadata, attachments and extra are JSON already, and the stored hash is the one
        computed when the message was recorded. No Message object, no re-hashing.

        A message this backend confirmed at a known revision in another version was edited
        here since (``import --update``, a ``trash restore`` of a replaced version): it goes
        with that revision as its ``base_rev``, so it overwrites only the version confirmed,
        and a backend that changed meanwhile answers a conflict."""
        text = _JSON_TEXT
        last = 0
        while True:
            with self.store.errors():
                rows = self.store.conn.execute(
                    "SELECT m.ord, m.chat_id, m.id, m.role, m.content, m.created_at, m.type,"
                    " m.metadata, m.attachments, m.extra, m.inexact, m.content_hash,"
                    " CASE WHEN r.state = 'confirmed' THEN r.rev END"
                    " FROM messages m LEFT JOIN remote_state r"
                    " ON r.backend_id = ? AND r.chat_id = m.chat_id AND r.id = m.id"
                    " WHERE m.chat_id = ? AND m.ord > ? AND m.evicted = 0 AND ("
                    "   r.state IS NULL"
                    "   OR (r.state = 'confirmed' AND r.content_hash != m.content_hash)"
                    "   OR (r.state = 'rejected' AND ?))"
                    " ORDER BY m.ord LIMIT ?",
                    (self.backend_id, chat_id, last, int(retry_rejected), page)).fetchall()
            if not rows:
                return
            for (_, cid, mid, role, content, created, type_, meta, att, extra, inexact,
                 chash, edited_from) in rows:
                if exclude and mid in exclude:
                    continue
                flag = _INEXACT if inexact else ""
                base = f',"base_rev":{int(edited_from)}' if edited_from is not None else ""
                piece = (f'{{"chat_id":{text(cid)},"id":{text(mid)},"role":{text(role)},'
                         f'"content":{text(content)},"created_at":"{created}",'
                         f'"type":{text(type_)},"metadata":{meta},"attachments":{att},'
                         f'"extra":{extra}{flag},"content_hash":"{chash}"{base}}}')
                yield mid, chash, piece
            last = rows[-1][0]

    def chat_counts(self, chat_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Per chat: messages confirmed, pending (deletions included), in conflict, rejected."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT m.chat_id,"
                " SUM(r.state = 'confirmed' AND r.content_hash = m.content_hash),"
                " SUM(r.state IS NULL OR r.state = 'deleted' OR (r.state = 'confirmed'"
                "     AND r.content_hash != m.content_hash)),"
                " SUM(r.state = 'conflict'), SUM(r.state = 'rejected')"
                " FROM messages m LEFT JOIN remote_state r ON r.backend_id = ?"
                " AND r.chat_id = m.chat_id AND r.id = m.id GROUP BY m.chat_id",
                (self.backend_id,)).fetchall()
            # Messages deleted here count too, though they have no live row: a deletion
            # this backend has not confirmed yet is pending (it still holds the version
            # deleted here), and one it refused (it holds another version) is a conflict.
            deleted = self.store.conn.execute(
                "SELECT r.chat_id,"
                " SUM(r.state = 'confirmed' AND r.content_hash = t.content_hash),"
                " SUM(r.state = 'conflict')"
                " FROM remote_state r JOIN tombstones t ON t.chat_id = r.chat_id AND t.id = r.id"
                " WHERE r.backend_id = ? GROUP BY r.chat_id", (self.backend_id,)).fetchall()
        wanted = set(chat_ids) if chat_ids is not None else None
        keys = ("confirmed", "pending_push", "conflicts", "rejected")
        out = {r[0]: {k: int(v or 0) for k, v in zip(keys, r[1:], strict=True)}
               for r in rows if wanted is None or r[0] in wanted}
        for chat_id, pending, conflicts in deleted:
            if (pending or conflicts) and (wanted is None or chat_id in wanted):
                counts = out.setdefault(chat_id, dict.fromkeys(keys, 0))
                counts["pending_push"] += int(pending or 0)
                counts["conflicts"] += int(conflicts or 0)
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
            conn.execute("UPDATE outbox SET state = 'abandoned', last_error = ?, updated_at = ?"
                         " WHERE batch_id = ?", (reason, now_text(), batch.batch_id))

    def _state(self, conn: Any, chat_id: str, rows: list[tuple[str, str, int | None,
                                                             str | None, str | None]]) -> None:
        now = now_text()
        conn.executemany(
            "INSERT INTO remote_state (backend_id, chat_id, id, state, rev, content_hash,"
            " reason, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (backend_id, chat_id, id) DO UPDATE SET state = excluded.state,"
            " rev = excluded.rev, content_hash = excluded.content_hash,"
            " reason = excluded.reason, updated_at = excluded.updated_at",
            [(self.backend_id, chat_id, mid, state, rev, chash, reason, now)
             for mid, state, rev, chash, reason in rows])

    def record_save(self, batch: Batch, answer: Any) -> tuple[Tally, list[dict[str, Any]]]:
        """Record an accepted SaveAnswer for ``batch`` (one transaction) and close the batch.

        A message counts as confirmed only when the answer lists its id with the hash that
        was sent. Returns the tally and the per-message problems (conflicts, rejections,
        ids the answer left out or acknowledged with another hash).
        """
        sent = dict(batch.items)
        tally = Tally()
        problems: list[dict[str, Any]] = []
        rows: list[tuple[str, str, int | None, str | None, str | None]] = []
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
        for mid in sent:
            if mid not in seen:
                tally.unacknowledged += 1
                problems.append({"type": "unconfirmed", "id": mid,
                                 "reason": "the answer did not mention it",
                                 "content_hash": sent[mid]})
        with self.store.transaction() as conn:
            self._state(conn, batch.chat_id, rows)
            conn.execute("UPDATE outbox SET state = 'done', attempts = attempts + 1,"
                         " last_error = NULL, updated_at = ? WHERE batch_id = ?",
                         (now_text(), batch.batch_id))
        return tally, problems

    def reject_batch(self, batch: Batch, reason: str) -> None:
        """The backend refused the whole request (422): its messages are rejected, kept here."""
        with self.store.transaction() as conn:
            self._state(conn, batch.chat_id,
                        [(mid, "rejected", None, chash, reason) for mid, chash in batch.items])
            conn.execute("UPDATE outbox SET state = 'done', attempts = attempts + 1,"
                         " last_error = ?, updated_at = ? WHERE batch_id = ?",
                         (reason, now_text(), batch.batch_id))

    def reject_local(self, chat_id: str, message_id: str, content_hash: str,
                     reason: str) -> None:
        """A message this backend cannot take at all (too large for its limits)."""
        with self.store.transaction() as conn:
            self._state(conn, chat_id, [(message_id, "rejected", None, content_hash, reason)])

    # ------------------------------------------------------- per-message state
    def states(self, chat_id: str) -> dict[str, tuple[str, int | None, str | None]]:
        """id -> (state, rev, content_hash) of what this backend said about a chat's messages."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT id, state, rev, content_hash FROM remote_state"
                " WHERE backend_id = ? AND chat_id = ?", (self.backend_id, chat_id)).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def confirmed_chats(self, chat_ids: set[str] | None = None) -> set[str]:
        """The chats (of ``chat_ids``; None: any) holding messages this backend confirmed."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT DISTINCT chat_id FROM remote_state WHERE backend_id = ?"
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
                    "SELECT id || ':' || content_hash AS line FROM remote_state"
                    " WHERE backend_id = ? AND chat_id = ? AND state = 'confirmed'"
                    " ORDER BY line", (self.backend_id, chat_id))
                first = cur.fetchone()
                if first is not None:
                    out[chat_id] = digest_of_sorted_lines(
                        itertools.chain((first[0],), (line for line, in cur)))
        return out

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
                "SELECT DISTINCT chat_id FROM remote_state WHERE backend_id = ?"
                " AND state = 'confirmed' AND reason IS NOT NULL",
                (self.backend_id,)).fetchall()
        return {r[0] for r in rows}

    def clear_notes(self, chat_ids: list[str], reason: str) -> None:
        """Clear the note ``reason`` from the confirmations in these chats (inside a
        transaction)."""
        self.store.conn.executemany(
            "UPDATE remote_state SET reason = NULL WHERE backend_id = ? AND chat_id = ?"
            " AND state = 'confirmed' AND reason = ?",
            [(self.backend_id, chat_id, reason) for chat_id in chat_ids])

    def note_confirmed(self, ids: list[tuple[str, str]], reason: str) -> None:
        """Note ``reason`` on these (chat, id) confirmations (inside a transaction)."""
        self.store.conn.executemany(
            "UPDATE remote_state SET reason = ? WHERE backend_id = ? AND chat_id = ?"
            " AND id = ? AND state = 'confirmed'",
            [(reason, self.backend_id, chat_id, mid) for chat_id, mid in ids])

    def set_states(self, chat_id: str,
                   rows: list[tuple[str, str, int | None, str | None, str | None]]) -> None:
        """Record (id, state, rev, hash, reason) rows (inside a transaction)."""
        if rows:
            self._state(self.store.conn, chat_id, rows)

    def forget(self, chat_id: str, ids: list[str]) -> None:
        """Drop what this backend said about these messages (inside a transaction)."""
        self.store.conn.executemany(
            "DELETE FROM remote_state WHERE backend_id = ? AND chat_id = ? AND id = ?",
            [(self.backend_id, chat_id, mid) for mid in ids])

    def pending_deletes(self, chat_id: str) -> list[tuple[str, int, str]]:
        """Messages deleted here whose deleted version this backend still holds live:
        (id, rev it holds, hash). Deletes are sent only against a known revision."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT t.id, r.rev, t.content_hash FROM tombstones t JOIN remote_state r"
                " ON r.backend_id = ? AND r.chat_id = t.chat_id AND r.id = t.id"
                " WHERE t.chat_id = ? AND r.state = 'confirmed' AND r.rev IS NOT NULL"
                " AND r.content_hash = t.content_hash ORDER BY t.id",
                (self.backend_id, chat_id)).fetchall()
        return [(r[0], int(r[1]), r[2]) for r in rows]

    def chats_with_work(self) -> set[str]:
        """Chats holding something to act on with this backend beyond agreement: a live
        message not confirmed with its current hash (new, changed, in conflict, rejected,
        restored from the trash), or a deleted one not remembered as deleted there (a
        delete to send, a conflict to settle, a deletion confirmed without a revision).
        One pass over the store, so that sync skips the per-message work for the rest."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT m.chat_id FROM messages m LEFT JOIN remote_state r"
                " ON r.backend_id = ? AND r.chat_id = m.chat_id AND r.id = m.id"
                " WHERE r.state IS NULL OR r.state != 'confirmed'"
                " OR r.content_hash != m.content_hash"
                " UNION SELECT t.chat_id FROM tombstones t JOIN remote_state r"
                " ON r.backend_id = ? AND r.chat_id = t.chat_id AND r.id = t.id"
                " WHERE r.state != 'deleted'", (self.backend_id, self.backend_id)).fetchall()
        return {r[0] for r in rows}

    def waiting_restores(self, chat_id: str) -> list[tuple[str, int]]:
        """Messages live here that this backend deleted (at a known revision): restored
        here from the trash, to be restored there against that revision. (id, rev)."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT m.id, r.rev FROM messages m JOIN remote_state r"
                " ON r.backend_id = ? AND r.chat_id = m.chat_id AND r.id = m.id"
                " WHERE m.chat_id = ? AND r.state = 'deleted' AND r.rev IS NOT NULL"
                " AND m.evicted = 0 ORDER BY m.ord",
                (self.backend_id, chat_id)).fetchall()
        return [(r[0], int(r[1])) for r in rows]

    def record_delete(self, batch: Batch, answer: Any) -> tuple[Tally, list[dict[str, Any]]]:
        """Record a DeleteAnswer (one transaction) and close the batch."""
        sent = dict(batch.items)
        tally = Tally()
        problems: list[dict[str, Any]] = []
        rows: list[tuple[str, str, int | None, str | None, str | None]] = []
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
        for mid in sent:
            if mid not in seen:
                tally.unacknowledged += 1
                problems.append({"type": "unconfirmed", "id": mid,
                                 "reason": "the delete answer did not mention it",
                                 "content_hash": sent[mid]})
        with self.store.transaction() as conn:
            self._state(conn, batch.chat_id, rows)
            conn.execute("UPDATE outbox SET state = 'done', attempts = attempts + 1,"
                         " last_error = NULL, updated_at = ? WHERE batch_id = ?",
                         (now_text(), batch.batch_id))
        return tally, problems


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
