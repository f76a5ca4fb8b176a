"""The store's size: what gc drops and evicts, what fetch brings back, compaction.

A message whose body gc evicted keeps its row (a stub: id, hash, fingerprint, time,
size); ``restore_bodies`` puts a body back. What gc may drop or evict is chosen by
chatsave.ops.gc; these are its reads and its one write transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatsave.model import Message, canonical_json
from chatsave.store.base import StoreBase


class Housekeeping(StoreBase):
    """Evicted bodies, and the records gc drops (answered outbox, old trash, old runs)."""

    def used_bytes(self) -> int:
        """Bytes the store's pages hold (what compaction would leave), plus its WAL."""
        with self.errors():
            page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    # ------------------------------------------------------- safe by nature
    def answered_batches(self) -> list[tuple[int, int]]:
        """(batch_id, bytes) of the outbox records answered or abandoned, oldest first."""
        with self.errors():
            return self.conn.execute(
                "SELECT batch_id, length(body) + length(message_ids) FROM outbox"
                " WHERE state IN ('done', 'abandoned') ORDER BY batch_id").fetchall()

    def trash_before(self, cutoff: str) -> list[tuple[int, int]]:
        """(trash_id, bytes) of the trash entries deleted before ``cutoff``, oldest first."""
        with self.errors():
            return self.conn.execute(
                "SELECT trash_id, length(message) FROM trash WHERE deleted_at < ?"
                " ORDER BY trash_id", (cutoff,)).fetchall()

    def runs_before(self, cutoff: str, current: int | None) -> list[tuple[int, int]]:
        """(run_id, bytes) of the finished runs started before ``cutoff``, but ``current``,
        oldest first."""
        with self.errors():
            return self.conn.execute(
                "SELECT run_id, length(args) + coalesce(length(summary), 0) FROM runs"
                " WHERE started_at < ? AND finished_at IS NOT NULL AND run_id != ?"
                " ORDER BY run_id", (cutoff, current or -1)).fetchall()

    # ------------------------------------------------------------- eviction
    def chats_with_bodies(self) -> list[str]:
        """The chats holding bodies not evicted, oldest (by their newest message) first."""
        with self.errors():
            return [r[0] for r in self.conn.execute(
                "SELECT m.chat_id FROM messages m GROUP BY m.chat_id"
                " HAVING SUM(m.evicted = 0) > 0 ORDER BY MAX(m.created_at), m.chat_id")]

    def newest_ids(self, chat_id: str, count: int) -> set[str]:
        """The ids of a chat's ``count`` newest messages."""
        with self.errors():
            return {r[0] for r in self.conn.execute(
                "SELECT id FROM messages WHERE chat_id = ? ORDER BY created_at DESC, ord DESC"
                " LIMIT ?", (chat_id, count))}

    def drop_and_evict(self, outbox: Sequence[int], trash: Sequence[int], runs: Sequence[int],
                       evict: Sequence[tuple[str, str]]) -> None:
        """Drop these outbox records, trash entries and runs, and evict the bodies of these
        (chat, id) messages: one transaction."""
        with self.transaction() as conn:
            conn.executemany("DELETE FROM outbox WHERE batch_id = ?", [(b,) for b in outbox])
            conn.executemany("DELETE FROM trash WHERE trash_id = ?", [(t,) for t in trash])
            conn.executemany("DELETE FROM runs WHERE run_id = ?", [(r,) for r in runs])
            conn.executemany(
                "UPDATE messages SET content = NULL, metadata = NULL, attachments = NULL,"
                " extra = NULL, evicted = 1 WHERE chat_id = ? AND id = ?", evict)

    def release_free_pages(self, *, keep_bytes: int = 1 << 20) -> int:
        """Give the store's free pages beyond ``keep_bytes`` back to the file system (a
        store created with incremental auto-vacuum; others keep them for reuse until gc
        compacts). Bytes released (the file shrinks when the WAL is next checkpointed)."""
        if self.conn.in_transaction:  # executescript would commit it first
            return 0
        with self.errors():
            if self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                return 0
            page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
            free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
            release = free - keep_bytes // page_size
            if release <= 0:
                return 0
            # executescript: it steps the statement to its end (one page per step; the
            # sqlite3 module's execute() steps a statement without result columns once).
            # One statement: atomic on its own.
            self.conn.executescript(f"PRAGMA incremental_vacuum({int(release)});")
        return int(release * page_size)

    def compact(self) -> None:
        """Checkpoint the WAL and rewrite the file without its free pages."""
        with self.errors():
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------- evicted bodies
    def evicted_chat_ids(self) -> list[str]:
        """The chats holding stubs, in id order."""
        with self.errors():
            return [r[0] for r in self.conn.execute(
                "SELECT DISTINCT chat_id FROM messages WHERE evicted = 1 ORDER BY chat_id")]

    def evicted_counts(self) -> dict[str, int]:
        """chat id -> how many stubs it holds (chats holding some)."""
        with self.errors():
            return {chat_id: int(count) for chat_id, count in self.conn.execute(
                "SELECT chat_id, COUNT(*) FROM messages WHERE evicted = 1 GROUP BY chat_id")}

    def stubs(self, chat_id: str) -> list[tuple[str, str]]:
        """(id, content hash) of a chat's stubs."""
        with self.errors():
            return self.conn.execute(
                "SELECT id, content_hash FROM messages WHERE chat_id = ? AND evicted = 1",
                (chat_id,)).fetchall()

    def is_evicted(self, chat_id: str, message_id: str) -> bool:
        """Whether a message here is a stub (inside a transaction)."""
        row = self.conn.execute("SELECT evicted FROM messages WHERE chat_id = ? AND id = ?",
                                (chat_id, message_id)).fetchone()
        return row is not None and bool(row[0])

    def restore_bodies(self, chat_id: str, bodies: Sequence[tuple[str, Message]]) -> None:
        """Put evicted bodies back: (id, the message it holds) of a chat (one transaction, or
        inside one). The caller checked each by the stub's hash."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE messages SET content = ?, metadata = ?, attachments = ?, extra = ?,"
                " evicted = 0 WHERE chat_id = ? AND id = ?",
                [(msg.content, canonical_json(msg.metadata), canonical_json(msg.attachments),
                  canonical_json(msg.extra), chat_id, mid) for mid, msg in bodies])
