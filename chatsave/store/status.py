"""What the store says of itself: the audit log of runs, counts, size, per-backend standing."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

from chatsave import __version__
from chatsave.store.base import StoreBase, hash_sql, now_text


class Status(StoreBase):
    """The ``runs`` table, and the counts ``status`` shows."""

    # -------------------------------------------------------------------- runs
    def start_run(self, command: str, args: dict[str, Any]) -> int:
        """Record the start of a mutating command (its own transaction unless inside one)."""
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (command, args, started_at, pid, host, version)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (command, json.dumps(args, sort_keys=True, default=str), now_text(),
                 os.getpid(), socket.gethostname(), __version__),
            )
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET finished_at = ?, exit_code = ?, summary = ? WHERE run_id = ?",
                (now_text(), exit_code, json.dumps(summary, sort_keys=True, default=str),
                 run_id),
            )

    def runs(self, limit: int = 5) -> list[dict[str, Any]]:
        with self.errors():
            rows = self.conn.execute(
                "SELECT run_id, command, started_at, finished_at, exit_code FROM runs "
                "ORDER BY run_id DESC LIMIT ?", (limit,)).fetchall()
        keys = ("run_id", "command", "started_at", "finished_at", "exit_code")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------- stats
    def file_size(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(str(self.path) + suffix)
        return total

    def counts(self, chat_id: str | None = None) -> dict[str, int]:
        """Counts of what the store holds (all chats, or one)."""
        where, args = ("WHERE chat_id = ?", (chat_id,)) if chat_id else ("", ())
        with self.errors():
            chats = self.conn.execute(f"SELECT COUNT(*) FROM chats {where}", args).fetchone()[0]
            msg = self.conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(evicted), 0), COALESCE(SUM(size), 0),"
                f" COALESCE(SUM(inexact), 0) FROM messages {where}", args).fetchone()
            trash = self.conn.execute(f"SELECT COUNT(*) FROM trash {where}", args).fetchone()[0]
            tomb = self.conn.execute(f"SELECT COUNT(*) FROM tombstones {where}",
                                     args).fetchone()[0]
        return {"chats": int(chats), "messages": int(msg[0]), "evicted": int(msg[1]),
                "message_bytes": int(msg[2]), "inexact_times": int(msg[3]),
                "in_trash": int(trash), "tombstones": int(tomb)}

    def backend_states(self, chat_id: str | None = None) -> list[dict[str, Any]]:
        """Per known backend: pending push, conflicts, rejected, tombstones to send, last sync."""
        chat_filter = "AND m.chat_id = :chat" if chat_id else ""
        sql = f"""
            SELECT b.backend_id, b.url, b.last_sync,
              (SELECT COUNT(*) FROM messages m WHERE 1 {chat_filter} AND NOT EXISTS (
                  SELECT 1 FROM remote_state r WHERE r.backend_key = b.backend_key
                   AND r.chat_id = m.chat_id AND r.id = m.id
                   AND ((r.state = 'confirmed' AND {hash_sql('r.content_hash')} = m.content_hash)
                        OR r.state IN ('conflict', 'rejected')))),
              (SELECT COUNT(*) FROM remote_state r WHERE r.backend_key = b.backend_key
                   AND r.state = 'conflict' {chat_filter.replace('m.', 'r.')}),
              (SELECT COUNT(*) FROM remote_state r WHERE r.backend_key = b.backend_key
                   AND r.state = 'rejected' {chat_filter.replace('m.', 'r.')}),
              (SELECT COUNT(*) FROM tombstones m WHERE 1 {chat_filter} AND NOT EXISTS (
                  SELECT 1 FROM remote_state r WHERE r.backend_key = b.backend_key
                   AND r.chat_id = m.chat_id AND r.id = m.id AND r.state = 'deleted'))
            FROM backends b ORDER BY b.last_seen DESC"""
        with self.errors():
            rows = self.conn.execute(sql, {"chat": chat_id}).fetchall()
        keys = ("backend_id", "url", "last_sync", "pending_push", "conflicts", "rejected",
                "pending_deletes")
        return [dict(zip(keys, r, strict=True)) for r in rows]
