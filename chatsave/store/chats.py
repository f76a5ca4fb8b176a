"""The store's chats: their rows, digests, id mappings and the user's current chat."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from chatsave.model import EMPTY_DIGEST, digest_of_sorted_lines
from chatsave.store.base import ChatRow, StoreBase, now_text


class Chats(StoreBase):
    """The ``chats``, ``id_mappings`` and ``current_chat`` tables."""

    def upsert_chat(self, chat_id: str, title: str | None = None,
                    created_at: str | None = None) -> None:
        """Record a chat (inside a transaction); a known title is only replaced by a new one."""
        self.conn.execute(
            "INSERT INTO chats (chat_id, title, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (chat_id) DO UPDATE SET "
            "title = COALESCE(excluded.title, chats.title), "
            "created_at = COALESCE(chats.created_at, excluded.created_at)",
            (chat_id, title, created_at, now_text()),
        )

    def touch_chat(self, chat_id: str) -> None:
        self.conn.execute("UPDATE chats SET updated_at = ? WHERE chat_id = ?",
                          (now_text(), chat_id))

    def chat_ids(self) -> list[str]:
        with self.errors():
            return [r[0] for r in self.conn.execute("SELECT chat_id FROM chats ORDER BY chat_id")]

    def chats(self, chat_ids: Sequence[str] | None = None) -> list[ChatRow]:
        sql = ("SELECT c.chat_id, c.title, c.created_at, c.updated_at, "
               "(SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.chat_id) FROM chats c")
        with self.errors():
            if chat_ids is None:
                rows = self.conn.execute(sql + " ORDER BY c.chat_id").fetchall()
            else:
                rows = [r for cid in chat_ids
                        for r in self.conn.execute(sql + " WHERE c.chat_id = ?", (cid,))]
        return [ChatRow(*r) for r in rows]

    def has_chat(self, chat_id: str) -> bool:
        with self.errors():
            return self.conn.execute("SELECT 1 FROM chats WHERE chat_id = ?",
                                     (chat_id,)).fetchone() is not None

    def chat_digests(self, chat_ids: list[str] | None) -> dict[str, str]:
        """Digest of every chat (or of the chosen ones this store has) over its live
        messages (chatsave.model.chat_digest).

        The lines are sorted by SQLite (byte order, as sorted() sorts them) and hashed as
        they stream: memory stays flat however large a chat is.
        """
        out: dict[str, str] = {}
        conn = self.conn
        with self.errors():
            if chat_ids is None:
                cur = conn.execute(
                    "SELECT chat_id, id || ':' || content_hash AS line FROM messages"
                    " ORDER BY chat_id, line")
                for chat_id, lines in itertools.groupby(cur, key=lambda r: r[0]):
                    out[chat_id] = digest_of_sorted_lines(line for _, line in lines)
                for chat_id in self.chat_ids():
                    out.setdefault(chat_id, EMPTY_DIGEST)
                return out
            for chat_id in chat_ids:
                if self.has_chat(chat_id):
                    out[chat_id] = digest_of_sorted_lines(self.chat_lines(chat_id))
        return out

    def chat_lines(self, chat_id: str) -> Iterator[str]:
        """The ``id:content_hash`` lines of a chat's messages in byte-wise order, streamed
        (a cursor: read it inside ``errors()``)."""
        cur = self.conn.execute("SELECT id || ':' || content_hash AS line FROM messages"
                                " WHERE chat_id = ? ORDER BY line", (chat_id,))
        return (line for line, in cur)

    def bucket_lines(self, chat_id: str) -> Iterator[tuple[str, str]]:
        """(bucket, line) of a chat's messages as model.bucket_digests reads them, streamed
        (a cursor: read it inside ``errors()``)."""
        return iter(self.conn.execute(
            "SELECT substr(content_hash, 1, 2) AS bucket, id || ':' || content_hash AS line"
            " FROM messages WHERE chat_id = ? ORDER BY bucket, line", (chat_id,)))

    # ------------------------------------------------------------- id mappings
    def mapped_id(self, original: str, kind: str = "chat") -> str | None:
        with self.errors():
            row = self.conn.execute(
                "SELECT mapped FROM id_mappings WHERE kind = ? AND original = ?",
                (kind, original)).fetchone()
        return None if row is None else str(row[0])

    def original_id(self, mapped: str, kind: str = "chat") -> str | None:
        with self.errors():
            row = self.conn.execute(
                "SELECT original FROM id_mappings WHERE kind = ? AND mapped = ?",
                (kind, mapped)).fetchone()
        return None if row is None else str(row[0])

    def record_mapping(self, original: str, mapped: str, source: str | None,
                       run_id: int | None, kind: str = "chat") -> None:
        """Record original -> mapped (inside a transaction); the first mapping stays."""
        self.conn.execute(
            "INSERT INTO id_mappings (kind, original, mapped, source, created_at, run_id)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, original) DO NOTHING",
            (kind, original, mapped, source, now_text(), run_id),
        )

    def mappings(self, kind: str = "chat") -> list[tuple[str, str, str | None]]:
        """(original, mapped, source) of every mapping of one kind.

        Kinds: ``chat``, an id a backend uses that chatsave cannot (a remote writes back
        to the original); ``derived``, an id made for a chat found without one (the
        original is what it was derived from, the source where the chat was found).
        """
        with self.errors():
            return [(r[0], r[1], r[2]) for r in self.conn.execute(
                "SELECT original, mapped, source FROM id_mappings WHERE kind = ? "
                "ORDER BY original", (kind,))]

    # ------------------------------------------------------------ current chat
    def set_current_chat(self, chat_id: str, source: str | None, run_id: int | None,
                         place: str = "browser") -> None:
        """Record the user's current chat in ``place`` (inside a transaction)."""
        self.conn.execute(
            "INSERT INTO current_chat (place, chat_id, source, recorded_at, run_id)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (place) DO UPDATE SET"
            " chat_id = excluded.chat_id, source = excluded.source,"
            " recorded_at = excluded.recorded_at, run_id = excluded.run_id",
            (place, chat_id, source, now_text(), run_id))

    def current_chat(self, place: str = "browser") -> str | None:
        """The current chat last recorded for ``place``, or None."""
        with self.errors():
            row = self.conn.execute("SELECT chat_id FROM current_chat WHERE place = ?",
                                    (place,)).fetchone()
        return None if row is None else str(row[0])
