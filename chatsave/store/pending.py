"""What is left to do with one backend, derived from the messages, tombstones and what the
backend said (docs/store.md, "States that are derived, not stored"): messages pending,
deletes and restores to send, conflicts and rejections waiting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from chatsave.model import Message
from chatsave.store.answers import KEY
from chatsave.store.base import hash_sql
from chatsave.store.store import Store

# JSON text of a string, as the wire writes it (compact, UTF-8 kept).
_JSON_TEXT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_INEXACT = ',"inexact":true'
# A confirmation's hash is read as text (``hash_sql``) where it meets a message's.
_R_HASH = hash_sql("r.content_hash")
# Every message here with what this backend said of it, if anything (backend_id first).
_WITH_STATE = (" FROM messages m LEFT JOIN remote_state r"
               f" ON r.backend_key = {KEY} AND r.chat_id = m.chat_id AND r.id = m.id")
# A message this backend has not confirmed with its current hash (of ``_WITH_STATE``).
_UNSETTLED = f"(r.state IS NULL OR r.state != 'confirmed' OR {_R_HASH} != m.content_hash)"
# The live messages of a chat a backend has not confirmed with their current hash, in
# local order after an ``ord``: (backend_id, chat_id, ord, retry_rejected, page size).
_PENDING = (_WITH_STATE +
            " WHERE m.chat_id = ? AND m.ord > ? AND m.evicted = 0 AND ("
            "   r.state IS NULL"
            f"   OR (r.state = 'confirmed' AND {_R_HASH} != m.content_hash)"
            "   OR (r.state = 'rejected' AND ?))"
            " ORDER BY m.ord LIMIT ?")
# Their ord and what row_to_message reads.
_PENDING_MESSAGES = f"SELECT m.ord, {Store.columns('m')}" + _PENDING
# Their ord, the columns of a message on the wire, and the revision this backend
# confirmed of another version of it (an edit made here since).
_PENDING_PIECES = ("SELECT m.ord, m.chat_id, m.id, m.role, m.content, m.created_at, m.type,"
                   " m.metadata, m.attachments, m.extra, m.inexact, m.content_hash,"
                   " CASE WHEN r.state = 'confirmed' THEN r.rev END" + _PENDING)


# The rows of some chats only (their ids as one JSON array: any number is one parameter).
_IN_CHATS = " IN (SELECT value FROM json_each(?))"
_ONLY_M = "m.chat_id" + _IN_CHATS
_ONLY_R = "r.chat_id" + _IN_CHATS
_ONLY_T = "t.chat_id" + _IN_CHATS


def _chats_arg(chat_ids: list[str] | None) -> tuple[str, ...]:
    """The parameter of ``_IN_CHATS`` (none for every chat)."""
    return () if chat_ids is None else (json.dumps(chat_ids),)


class Pending:
    """The reads of what is pending for one backend (a part of BackendView)."""

    store: Store
    backend_id: str

    def _pending_pages(self, chat_id: str, retry_rejected: bool, page: int, *,
                       pieces: bool) -> Iterator[list[Any]]:
        """The pending messages of a chat, page by page (``_PENDING_PIECES`` with
        ``pieces``, else ``_PENDING_MESSAGES``)."""
        sql = _PENDING_PIECES if pieces else _PENDING_MESSAGES
        last = 0
        while True:
            with self.store.errors():
                rows = self.store.conn.execute(
                    sql, (self.backend_id, chat_id, last, int(retry_rejected), page)).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def pending(self, chat_id: str, *, retry_rejected: bool = False,
                exclude: set[str] | None = None, page: int = 1000) -> Iterator[Message]:
        """Live messages of a chat this backend has not confirmed with their current hash,
        in local order, read page by page. Conflicts wait for sync; rejected ones wait for
        ``retry_rejected``."""
        for rows in self._pending_pages(chat_id, retry_rejected, page, pieces=False):
            for row in rows:
                item = Store.row_to_message(row[1:])
                if isinstance(item, Message) and not (exclude and item.id in exclude):
                    yield item

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
        for rows in self._pending_pages(chat_id, retry_rejected, page, pieces=True):
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

    def chat_counts(self, chat_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Per chat: messages confirmed, pending (deletions included), in conflict, rejected.
        Of ``chat_ids`` only (read by the chats' index), or of every chat (one pass)."""
        if chat_ids is not None and not chat_ids:
            return {}
        args = _chats_arg(chat_ids)
        only, only_r = (_ONLY_M, _ONLY_R) if chat_ids is not None else ("1", "1")
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT m.chat_id,"
                f" SUM(r.state = 'confirmed' AND {_R_HASH} = m.content_hash),"
                " SUM(r.state IS NULL OR r.state = 'deleted' OR (r.state = 'confirmed'"
                f"     AND {_R_HASH} != m.content_hash)),"
                " SUM(r.state = 'conflict'), SUM(r.state = 'rejected')"
                f"{_WITH_STATE} WHERE {only} GROUP BY m.chat_id",
                (self.backend_id, *args)).fetchall()
            # Messages deleted here count too, though they have no live row: a deletion
            # this backend has not confirmed yet is pending (it still holds the version
            # deleted here), and one it refused (it holds another version) is a conflict.
            deleted = self.store.conn.execute(
                "SELECT r.chat_id,"
                f" SUM(r.state = 'confirmed' AND {_R_HASH} = t.content_hash),"
                " SUM(r.state = 'conflict')"
                " FROM remote_state r JOIN tombstones t ON t.chat_id = r.chat_id AND t.id = r.id"
                f" WHERE r.backend_key = {KEY} AND {only_r} GROUP BY r.chat_id",
                (self.backend_id, *args)).fetchall()
        keys = ("confirmed", "pending_push", "conflicts", "rejected")
        out = {r[0]: {k: int(v or 0) for k, v in zip(keys, r[1:], strict=True)}
               for r in rows}
        for chat_id, pending, conflicts in deleted:
            if pending or conflicts:
                counts = out.setdefault(chat_id, dict.fromkeys(keys, 0))
                counts["pending_push"] += int(pending or 0)
                counts["conflicts"] += int(conflicts or 0)
        return out

    def unsettled_buckets(self, chat_id: str) -> set[str]:
        """The buckets (a hash's first two hex digits: docs/protocol.md) of the messages
        live here, stubs included, that this backend has not confirmed with their current
        hash: a sync reading the chat by buckets reads these too, so that what it records
        of such a message carries the backend's revision."""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT DISTINCT substr(m.content_hash, 1, 2){_WITH_STATE}"
                f" WHERE m.chat_id = ? AND {_UNSETTLED}",
                (self.backend_id, chat_id)).fetchall()
        return {r[0] for r in rows}

    def pending_deletes(self, chat_id: str) -> list[tuple[str, int, str]]:
        """Messages deleted here whose deleted version this backend still holds live:
        (id, rev it holds, hash). Deletes are sent only against a known revision."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT t.id, r.rev, t.content_hash FROM tombstones t JOIN remote_state r"
                f" ON r.backend_key = {KEY} AND r.chat_id = t.chat_id AND r.id = t.id"
                " WHERE t.chat_id = ? AND r.state = 'confirmed' AND r.rev IS NOT NULL"
                f" AND {_R_HASH} = t.content_hash ORDER BY t.id",
                (self.backend_id, chat_id)).fetchall()
        return [(r[0], int(r[1]), r[2]) for r in rows]

    def chats_with_work(self, chat_ids: list[str] | None = None) -> set[str]:
        """Chats holding something to act on with this backend beyond agreement: a live
        message not confirmed with its current hash (new, changed, in conflict, rejected,
        restored from the trash), or a deleted one not remembered as deleted there (a
        delete to send, a conflict to settle, a deletion confirmed without a revision).
        One pass over the store (or over ``chat_ids``), so that sync and save skip the
        per-chat work for the rest."""
        if chat_ids is not None and not chat_ids:
            return set()
        args = _chats_arg(chat_ids)
        only, only_t = (_ONLY_M, _ONLY_T) if chat_ids is not None else ("1", "1")
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT m.chat_id{_WITH_STATE} WHERE {_UNSETTLED} AND {only}"
                " UNION SELECT t.chat_id FROM tombstones t JOIN remote_state r"
                f" ON r.backend_key = {KEY} AND r.chat_id = t.chat_id AND r.id = t.id"
                f" WHERE r.state != 'deleted' AND {only_t}",
                (self.backend_id, *args, self.backend_id, *args)).fetchall()
        return {r[0] for r in rows}

    def waiting_restores(self, chat_id: str) -> list[tuple[str, int]]:
        """Messages live here that this backend deleted (at a known revision): restored
        here from the trash, to be restored there against that revision. (id, rev)."""
        with self.store.errors():
            rows = self.store.conn.execute(
                "SELECT m.id, r.rev FROM messages m JOIN remote_state r"
                f" ON r.backend_key = {KEY} AND r.chat_id = m.chat_id AND r.id = m.id"
                " WHERE m.chat_id = ? AND r.state = 'deleted' AND r.rev IS NOT NULL"
                " AND m.evicted = 0 ORDER BY m.ord",
                (self.backend_id, chat_id)).fetchall()
        return [(r[0], int(r[1])) for r in rows]

    def rejections(self) -> list[tuple[str, str, str | None]]:
        """(chat, id, reason) of the messages held here that this backend rejected, the
        newest rejection first."""
        with self.store.errors():
            return self.store.conn.execute(
                "SELECT r.chat_id, r.id, r.reason FROM remote_state r JOIN messages m"
                f" ON m.chat_id = r.chat_id AND m.id = r.id WHERE r.backend_key = {KEY}"
                " AND r.state = 'rejected' ORDER BY r.updated_at DESC, r.chat_id, r.id",
                (self.backend_id,)).fetchall()

    def conflicts(self, chats: set[str]) -> list[tuple[str, str]]:
        """(chat, message) of every conflict this backend has with the store in ``chats``:
        messages held here (live or deleted) in conflict, in chat and id order."""
        with self.store.errors():
            rows = self.store.conn.execute(
                f"SELECT r.chat_id, r.id FROM remote_state r WHERE r.backend_key = {KEY}"
                " AND r.state = 'conflict' AND (EXISTS (SELECT 1 FROM messages m"
                " WHERE m.chat_id = r.chat_id AND m.id = r.id) OR EXISTS (SELECT 1 FROM"
                " tombstones t WHERE t.chat_id = r.chat_id AND t.id = r.id))"
                " ORDER BY r.chat_id, r.id", (self.backend_id,)).fetchall()
        return [(chat_id, mid) for chat_id, mid in rows if chat_id in chats]
