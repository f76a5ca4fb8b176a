"""The store's messages: recording them, and reading them back whole or in part."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from chatsave.errors import StoreError
from chatsave.model import Message, canonical_json
from chatsave.store.base import FINGERPRINT, StoreBase, Stub, hash_sql, hash_value

# A message's fingerprint read as hex (docs/store.md, "Size"), where ``columns`` puts a
# table alias in place of ``{alias}``.
_FINGERPRINT_OF = hash_sql("{alias}fingerprint")


class Messages(StoreBase):
    """The ``messages`` table (one row per message; a stub once gc evicted its body)."""

    def add_messages(self, chat_id: str, messages: Sequence[Message],
                     run_id: int | None = None) -> list[tuple[str, str | None]]:
        """Record messages of one chat (inside a transaction).

        Returns one outcome per message: ("added", None), ("unchanged", None),
        ("conflict", existing_hash) when the id already holds other content, or
        ("deleted", None) when the id was deleted here earlier (never resurrected).
        """
        outcomes: list[tuple[str, str | None]] = []
        if not messages:
            return outcomes
        conn = self.conn
        tomb = {r[0] for r in conn.execute("SELECT id FROM tombstones WHERE chat_id = ?",
                                           (chat_id,))}
        for msg in messages:
            if msg.id in tomb:
                outcomes.append(("deleted", None))
                continue
            meta = canonical_json(msg.metadata)
            att = canonical_json(msg.attachments)
            extra = canonical_json(msg.extra)
            size = len(msg.content.encode("utf-8")) + len(meta) + len(att) + len(extra) + 96
            cur = conn.execute(
                "INSERT INTO messages (chat_id, id, role, content, created_at, type, metadata,"
                " attachments, extra, inexact, content_hash, fingerprint, size, run_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (chat_id, id) DO NOTHING",
                (chat_id, msg.id, msg.role, msg.content, msg.created_at_text, msg.type, meta,
                 att, extra, int(msg.inexact), msg.content_hash, hash_value(msg.fingerprint),
                 size, run_id),
            )
            if cur.rowcount == 1:
                outcomes.append(("added", None))
                continue
            row = conn.execute("SELECT content_hash FROM messages WHERE chat_id = ? AND id = ?",
                               (chat_id, msg.id)).fetchone()
            if row[0] == msg.content_hash:
                outcomes.append(("unchanged", None))
            else:
                outcomes.append(("conflict", row[0]))
        return outcomes

    _FIELDS = ("chat_id", "id", "role", "content", "created_at", "type", "metadata",
               "attachments", "extra", "inexact", "content_hash", "fingerprint", "size",
               "evicted")

    @classmethod
    def columns(cls, alias: str = "") -> str:
        """The message columns that row_to_message reads, optionally table-qualified."""
        prefix = f"{alias}." if alias else ""
        return ", ".join(_FINGERPRINT_OF.replace("{alias}", prefix) if f == "fingerprint"
                         else prefix + f for f in cls._FIELDS)

    @staticmethod
    def row_to_message(row: Sequence[Any]) -> Message | Stub:
        (chat_id, id_, role, content, created_at, type_, meta, att, extra, inexact, chash,
         fprint, size, evicted) = row
        if evicted:
            return Stub(chat_id, id_, chash, fprint, created_at, size)
        try:
            return Message.model_construct(
                chat_id=chat_id, id=id_, role=role, content=content,
                created_at=datetime.fromisoformat(created_at), type=type_,
                metadata=json.loads(meta), attachments=json.loads(att), extra=json.loads(extra),
                inexact=bool(inexact),
            )
        except (ValueError, TypeError) as exc:
            # Not str(exc): the parsers quote the value they could not read.
            raise StoreError(
                f"message {id_!r} of chat {chat_id!r} in the local store cannot be read "
                f"(a damaged time, metadata, attachments or extra: {type(exc).__name__})",
                hint="the store is damaged: chatsave salvage --help says how to recover it",
                details={"chat_id": chat_id, "id": id_}) from None

    def iter_messages(self, chat_id: str, *, page: int = 1000) -> Iterator[Message | Stub]:
        """The messages of one chat in local order, read page by page (bounded memory)."""
        last = 0
        while True:
            with self.errors():
                rows = self.conn.execute(
                    f"SELECT ord, {self.columns()} FROM messages WHERE chat_id = ? AND ord > ? "
                    "ORDER BY ord LIMIT ?", (chat_id, last, page)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self.row_to_message(row[1:])
            last = rows[-1][0]

    def get_message(self, chat_id: str, message_id: str) -> Message | Stub | None:
        with self.errors():
            row = self.conn.execute(
                f"SELECT {self.columns()} FROM messages WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return None if row is None else self.row_to_message(row)

    def message_keys(self, chat_id: str) -> Iterable[tuple[str, str]]:
        """(id, content_hash) of every message of a chat, in local order."""
        with self.errors():
            yield from self.conn.execute(
                "SELECT id, content_hash FROM messages WHERE chat_id = ? ORDER BY ord",
                (chat_id,))

    def message_count(self, chat_id: str) -> int:
        """How many messages (stubs included) a chat holds."""
        with self.errors():
            return int(self.conn.execute("SELECT COUNT(*) FROM messages WHERE chat_id = ?",
                                         (chat_id,)).fetchone()[0])

    def newest_message_times(self) -> dict[str, str]:
        """chat id -> the time of its newest message (chats holding messages)."""
        with self.errors():
            return dict(self.conn.execute(
                "SELECT chat_id, MAX(created_at) FROM messages GROUP BY chat_id").fetchall())

    # ------------------------------------------------------- duplicate search
    def has_repeats(self, chat_id: str) -> bool:
        """Whether two messages of a chat share a fingerprint (it may hold retry copies)."""
        with self.errors():
            return self.conn.execute(
                "SELECT 1 FROM messages WHERE chat_id = ? GROUP BY fingerprint "
                "HAVING COUNT(*) > 1 LIMIT 1", (chat_id,)).fetchone() is not None

    def fingerprints(self, chat_id: str) -> Iterator[tuple[Any, ...]]:
        """(id, fingerprint, created_at, ord) of a chat's messages in time order: a cursor,
        streamed (read it inside ``errors()``)."""
        with self.errors():
            return self.conn.execute(
                f"SELECT id, {FINGERPRINT}, created_at, ord FROM messages WHERE chat_id = ? "
                "ORDER BY created_at, ord", (chat_id,))

    def message_entries(self, chat_id: str) -> Iterator[tuple[Any, ...]]:
        """(id, fingerprint, created_at, ord, content_hash, content, role, type, evicted) of
        a chat's messages, unordered: a cursor (read it inside ``errors()``)."""
        with self.errors():
            return self.conn.execute(
                f"SELECT id, {FINGERPRINT}, created_at, ord, content_hash, content, role,"
                " type, evicted FROM messages WHERE chat_id = ?", (chat_id,))
