"""Deletions here: the trash (removed versions, to be restored), tombstones (ids deleted
here, never brought back by an import or a sync) and edits (a version replacing another)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chatsave.model import Message
from chatsave.store.base import Stub, now_text
from chatsave.store.messages import Messages

# What ``trash list`` shows of an entry.
TRASH_FIELDS = ("trash_id", "chat_id", "id", "content_hash", "deleted_at", "reason", "run_id")
# An entry as ``trash restore`` reads it: (trash_id, chat_id, id, message JSON, reason).
TrashEntry = tuple[int, str, str, str, str]


class Trash(Messages):
    """The ``trash`` and ``tombstones`` tables, and the moves of messages into and out of
    them."""

    # ------------------------------------------------------------- deletions
    def trash_messages(self, chat_id: str, ids: Sequence[str], reason: str,
                       run_id: int | None, *, tombstone: bool = True) -> list[tuple[str, str]]:
        """Move messages to the trash (inside a transaction); return (id, hash) of those moved.

        With ``tombstone`` the ids are also remembered as deleted here, so no import or
        sync brings them back; without it (a version replaced by another) only the old
        version is kept in the trash.
        """
        moved: list[tuple[str, str]] = []
        now = now_text()
        for message_id in ids:
            row = self.conn.execute(
                f"SELECT {self.columns()} FROM messages WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
            if row is None:
                continue
            item = self.row_to_message(row)
            if isinstance(item, Stub):
                body = {"chat_id": chat_id, "id": message_id, "evicted": True}
            else:
                body = item.to_wire()
            chash = row[10]
            self.conn.execute(
                "INSERT INTO trash (chat_id, id, content_hash, message, deleted_at, reason,"
                " run_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chat_id, message_id, chash, json.dumps(body, ensure_ascii=False), now, reason,
                 run_id))
            self.conn.execute("DELETE FROM messages WHERE chat_id = ? AND id = ?",
                              (chat_id, message_id))
            if tombstone:
                self.conn.execute(
                    "INSERT INTO tombstones (chat_id, id, content_hash, deleted_at, reason,"
                    " run_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (chat_id, id) DO UPDATE"
                    " SET content_hash = excluded.content_hash,"
                    " deleted_at = excluded.deleted_at, reason = excluded.reason,"
                    " run_id = excluded.run_id",
                    (chat_id, message_id, chash, now, reason, run_id))
            moved.append((message_id, chash))
        if moved:
            # A save still open that carries one of them would write what is no longer held
            # here; and once the message is restored from the trash, it would re-send that
            # old write (no base_rev) past the deletion the backend holds, and lose to it.
            # Abandoned now, not at its next send; what else it carried is planned again.
            self.conn.execute(
                "UPDATE outbox SET state = 'abandoned', last_error = ?, updated_at = ?"
                " WHERE chat_id = ? AND kind = 'save' AND state = 'open' AND EXISTS ("
                "   SELECT 1 FROM json_each(outbox.message_ids) j"
                "   WHERE json_extract(j.value, '$[0]') IN (SELECT value FROM json_each(?)))",
                ("a message it carries left the store (trash)", now, chat_id,
                 json.dumps([mid for mid, _ in moved])))
        return moved

    def replace_message(self, message: Message, run_id: int | None, reason: str) -> None:
        """Replace a message's content by another version of it (inside a transaction).

        The old version goes to the trash (undoable); the message keeps its place. A
        message deleted here comes back (``bring_back``), and the deleted version the
        trash holds is marked as replaced (``reason``).
        """
        old = self.conn.execute("SELECT ord FROM messages WHERE chat_id = ? AND id = ?",
                                (message.chat_id, message.id)).fetchone()
        if old is None:
            self.bring_back(message, run_id, replaced=reason)
            return
        self.trash_messages(message.chat_id, [message.id], reason, run_id, tombstone=False)
        self.conn.execute("DELETE FROM tombstones WHERE chat_id = ? AND id = ?",
                          (message.chat_id, message.id))
        self.add_messages(message.chat_id, [message], run_id)
        self.conn.execute("UPDATE messages SET ord = ? WHERE chat_id = ? AND id = ?",
                          (old[0], message.chat_id, message.id))

    def bring_back(self, message: Message, run_id: int | None, *,
                   replaced: str | None = None) -> None:
        """Make a message that left this store (deleted here) live again (inside a
        transaction): its tombstone goes, and it takes its place among the chat's messages
        by time, not after the last one recorded.

        The trash then stops saying it is deleted: an entry holding this very version is
        removed (it is live again), and with ``replaced`` (why another version came back)
        an entry holding another version says that it was replaced.
        """
        chat_id, mid = message.chat_id, message.id
        self.conn.execute("DELETE FROM tombstones WHERE chat_id = ? AND id = ?", (chat_id, mid))
        if self.add_messages(chat_id, [message], run_id) == [("added", None)]:
            self._place_by_time(chat_id, mid, message.created_at_text)
        self.conn.execute("DELETE FROM trash WHERE chat_id = ? AND id = ? AND content_hash = ?",
                          (chat_id, mid, message.content_hash))
        if replaced:
            self.conn.execute("UPDATE trash SET reason = COALESCE(reason || '; then ', '') || ?"
                              " WHERE chat_id = ? AND id = ?", (replaced, chat_id, mid))

    def _place_by_time(self, chat_id: str, message_id: str, created_at: str) -> None:
        """Move a message just recorded (the last of the local order) before the chat's
        first message, in local order, whose time is later than its own.

        ``ord`` is the store's rowid, shared by every chat: the message takes a free number
        between its neighbours (the one it had before it was deleted is free, unless
        reused); when there is none, the chat's messages that follow it move to the end.
        """
        conn = self.conn
        row = conn.execute("SELECT ord FROM messages INDEXED BY messages_chat_ord"
                           " WHERE chat_id = ? AND created_at > ? AND id != ? ORDER BY ord"
                           " LIMIT 1", (chat_id, created_at, message_id)).fetchone()
        following = row[0] if row is not None else None
        if following is None:
            return  # the latest of its chat: last is its place
        before = conn.execute("SELECT MAX(ord) FROM messages WHERE chat_id = ? AND ord < ?",
                              (chat_id, following)).fetchone()[0] or 0
        free = conn.execute(
            "SELECT MIN(x) FROM (SELECT ? + 1 AS x UNION ALL SELECT ord + 1 FROM messages"
            " WHERE ord > ? AND ord < ?) WHERE x < ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE ord = x)",
            (before, before, following, following)).fetchone()[0]
        if free is None:
            top = conn.execute("SELECT MAX(ord) FROM messages").fetchone()[0]
            later = [r[0] for r in conn.execute(
                "SELECT ord FROM messages WHERE chat_id = ? AND ord >= ? AND id != ?"
                " ORDER BY ord", (chat_id, following, message_id))]
            conn.executemany("UPDATE messages SET ord = ? WHERE ord = ?",
                             [(top + 1 + i, ord_) for i, ord_ in enumerate(later)])
            free = following
        conn.execute("UPDATE messages SET ord = ? WHERE chat_id = ? AND id = ?",
                     (free, chat_id, message_id))

    def keep_in_trash(self, message: Message, reason: str, run_id: int | None) -> bool:
        """Keep a version of a message that is not the one held here in the trash (inside
        a transaction), where ``trash restore`` can take it; False when it is there."""
        return self.add_trash(message.chat_id, message.id, message.content_hash,
                              json.dumps(message.to_wire(), ensure_ascii=False), now_text(),
                              reason, run_id)

    def add_trash(self, chat_id: str, message_id: str, content_hash: str, body: str,
                  deleted_at: str, reason: str | None, run_id: int | None) -> bool:
        """Record a trash entry as it is (inside a transaction), unless the trash holds this
        version of the message already; True when recorded."""
        cur = self.conn.execute(
            "INSERT INTO trash (chat_id, id, content_hash, message, deleted_at, reason, run_id)"
            " SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM trash"
            " WHERE chat_id = ? AND id = ? AND content_hash = ?)",
            (chat_id, message_id, content_hash, body, deleted_at, reason, run_id, chat_id,
             message_id, content_hash))
        return cur.rowcount == 1

    def add_tombstone(self, chat_id: str, message_id: str, content_hash: str | None,
                      deleted_at: str, reason: str | None, run_id: int | None) -> bool:
        """Remember a message as deleted here (inside a transaction), unless this store holds
        it live or remembers it already; True when recorded."""
        cur = self.conn.execute(
            "INSERT INTO tombstones (chat_id, id, content_hash, deleted_at, reason, run_id)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM messages"
            " WHERE chat_id = ? AND id = ?) ON CONFLICT (chat_id, id) DO NOTHING",
            (chat_id, message_id, content_hash, deleted_at, reason, run_id, chat_id,
             message_id))
        return cur.rowcount == 1

    # ------------------------------------------------------------ tombstones
    def tombstone(self, chat_id: str, message_id: str) -> str | None:
        """The content hash remembered for a message deleted here, or None."""
        with self.errors():
            row = self.conn.execute(
                "SELECT content_hash FROM tombstones WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return None if row is None else str(row[0])

    def tombstone_of(self, chat_id: str, message_id: str) -> tuple[bool, str | None]:
        """Whether a message is remembered as deleted here, and the hash of the version
        deleted (None where none is known)."""
        with self.errors():
            row = self.conn.execute(
                "SELECT content_hash FROM tombstones WHERE chat_id = ? AND id = ?",
                (chat_id, message_id)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def tombstone_hashes(self, chat_id: str) -> dict[str, str]:
        """id -> the hash its tombstone remembers (as ``tombstone`` reads it), of the
        messages of a chat deleted here."""
        with self.errors():
            rows = self.conn.execute(
                "SELECT id, content_hash FROM tombstones WHERE chat_id = ?",
                (chat_id,)).fetchall()
        return {mid: str(chash) for mid, chash in rows}

    # ------------------------------------------------------------------ edits
    # The trash reason of a version replaced by an edit made here; ``trash restore`` of such
    # an entry puts it back over the version that replaced it (which takes its place there).
    EDITED = "replaced by an edit here"

    def edit_message(self, message: Message, run_id: int | None,
                     reason: str = f"{EDITED} (import --update)") -> None:
        """Take ``message`` as an edit of the version held under its id (inside a
        transaction): the old version goes to the trash (an open save carrying it is
        abandoned), and what each backend said of it stays, so that the edit is sent
        against the revision a backend confirmed (``base_rev``); only a rejection, which
        was about the old content, is forgotten: the edit is sent like a new message."""
        self.replace_message(message, run_id, reason)
        self.conn.execute(
            "DELETE FROM remote_state WHERE chat_id = ? AND id = ? AND state = 'rejected'",
            (message.chat_id, message.id))

    # ------------------------------------------------------ the trash itself
    def trash_entries(self, chat_id: str | None = None) -> list[dict[str, Any]]:
        """What the trash holds (of one chat, or all), oldest first (``TRASH_FIELDS``)."""
        where, args = ("WHERE chat_id = ?", (chat_id,)) if chat_id else ("", ())
        with self.errors():
            rows = self.conn.execute(
                f"SELECT {', '.join(TRASH_FIELDS)} FROM trash {where} ORDER BY trash_id", args)
            return [dict(zip(TRASH_FIELDS, r, strict=True)) for r in rows]

    def trash_of_run(self, run_id: int) -> list[TrashEntry]:
        """The entries one run put in the trash, oldest first."""
        with self.errors():
            return self.conn.execute(
                "SELECT trash_id, chat_id, id, message, reason FROM trash"
                " WHERE run_id = ? ORDER BY trash_id", (run_id,)).fetchall()

    def trash_of_message(self, message_id: str, chat_id: str | None = None
                         ) -> list[TrashEntry]:
        """The entries holding a message id (in one chat, or any), oldest first."""
        with self.errors():
            return self.conn.execute(
                "SELECT trash_id, chat_id, id, message, reason FROM trash WHERE id = ?"
                + (" AND chat_id = ?" if chat_id else "") + " ORDER BY trash_id",
                (message_id, chat_id) if chat_id else (message_id,)).fetchall()

    def newest_trashed(self, chat_id: str, message_id: str) -> str | None:
        """The wire JSON of the newest version of a message in the trash, or None."""
        with self.errors():
            row = self.conn.execute(
                "SELECT message FROM trash WHERE chat_id = ? AND id = ?"
                " ORDER BY trash_id DESC LIMIT 1", (chat_id, message_id)).fetchone()
        return None if row is None else str(row[0])

    def remove_trash_entry(self, trash_id: int) -> None:
        """Drop one entry from the trash (inside a transaction)."""
        self.conn.execute("DELETE FROM trash WHERE trash_id = ?", (trash_id,))

    def trash_count_before(self, cutoff: str) -> int:
        """How many trash entries were deleted before ``cutoff`` (a time text)."""
        with self.errors():
            return int(self.conn.execute("SELECT COUNT(*) FROM trash WHERE deleted_at < ?",
                                         (cutoff,)).fetchone()[0])

    def empty_trash_before(self, cutoff: str) -> None:
        """Delete, for good, the trash entries deleted before ``cutoff`` (one transaction)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM trash WHERE deleted_at < ?", (cutoff,))
