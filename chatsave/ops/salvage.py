"""Salvage: what SQLite can still read of a damaged store, recorded in a whole one.

Design: docs/reliability.md, "A damaged store".

The damaged file is never written: chatsave.store.salvage reads what SQLite can still
read of a private copy of it, table by table, and names by chat and id the messages that
could not be read.

Every message read is validated as ``import`` validates it (the model, and its content
hash against the hash it was stored with). Salvaged messages are pending: never
confirmed here, they are pushed again by save or sync, and the backend's save, an upsert
by id, keeps one copy. A message the target store already holds is not added again; one
it holds with other content keeps the target's version and the salvaged one goes to the
trash. Evicted messages have no body to salvage: the backend confirmed them, and sync
brings them back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chatsave.errors import ExitCode
from chatsave.model import Message, chat_id_problem
from chatsave.ops.result import RunResult
from chatsave.store.salvage import DamagedStore, MessageRecord, TableRead, damaged_copy
from chatsave.store.store import Store

Emit = Callable[..., None]
SALVAGED_REASON = "salvaged: another version of it is in this store"


def _no_emit(type_: str, **fields: Any) -> None:
    return None


def _message(row: MessageRecord) -> tuple[Message | None, str | None]:
    """The message a row of the damaged store holds, or why it is invalid (the fields at
    fault, never their values)."""
    try:
        message = Message.model_validate({
            "chat_id": row.chat_id, "id": row.id, "role": row.role, "content": row.content,
            "created_at": row.created_at, "type": row.type,
            "metadata": json.loads(row.metadata), "attachments": json.loads(row.attachments),
            "extra": json.loads(row.extra), "inexact": bool(row.inexact)})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return None, f"invalid {', '.join(fields)}"
    except (ValueError, TypeError):
        return None, "damaged metadata, attachments or extra (not JSON)"
    if message.content_hash != row.content_hash:
        return None, "its content does not match the hash it was stored with"
    return message, None


@dataclass
class _Salvager:
    store: Store
    source: Path
    emit: Emit
    run_id: int | None
    result: RunResult = field(default_factory=lambda: RunResult("salvage"))

    def run(self, damaged: DamagedStore) -> None:
        damaged.check()
        titles = self._chats(damaged.chats())
        self._messages(damaged, titles)
        trash = damaged.trash()
        if trash is not None:
            self._trash(trash)
        tombstones = damaged.tombstones()
        if tombstones is not None:
            self._tombstones(tombstones)

    def _unreadable_table(self, table: str) -> None:
        self.result.details.setdefault("unreadable_tables", []).append(table)
        self.emit("unreadable", table=table)

    def _chats(self, read: TableRead | None) -> dict[str, tuple[str | None, str | None]]:
        """(title, created_at) per readable chat."""
        if read is None:
            return {}
        if read.whole_table_unreadable:
            self._unreadable_table(read.table)
        self.result.counters["unreadable_chats"] += len(read.unreadable)
        return {str(r.chat_id): (r.title, r.created_at) for r in read.rows
                if isinstance(r.chat_id, str) and chat_id_problem(r.chat_id) is None}

    def _messages(self, damaged: DamagedStore,
                  titles: dict[str, tuple[str | None, str | None]]) -> None:
        c = self.result.counters
        read = damaged.messages()
        if read.whole_table_unreadable:
            self._unreadable_table(read.table)
        names = damaged.message_names()
        for rowid in read.unreadable:
            c["unreadable"] += 1
            chat_id, id_ = names.get(rowid, (None, None))
            self.emit("unreadable", table=read.table, chat_id=chat_id, id=id_)
            self.result.details.setdefault("unreadable_messages", []).append(
                {"chat_id": chat_id, "id": id_})
        by_chat: dict[str, list[Message]] = {}
        for row in read.rows:
            c["read"] += 1
            if row.evicted:
                c["evicted"] += 1
                continue
            message, why = _message(row)
            if message is None:
                c["invalid"] += 1
                shown = {"chat_id": row.chat_id if isinstance(row.chat_id, str) else None,
                         "id": row.id if isinstance(row.id, str) else None, "reason": why}
                self.emit("invalid", **shown)
                self.result.details.setdefault("invalid_messages", []).append(shown)
                continue
            by_chat.setdefault(message.chat_id, []).append(message)
        for chat_id, messages in by_chat.items():
            title, created_at = titles.get(chat_id, (None, None))
            self.store.upsert_chat(chat_id, title, created_at)
            for message, (outcome, _) in zip(
                    messages, self.store.add_messages(chat_id, messages, self.run_id),
                    strict=True):
                self._outcome(message, outcome)
        self.result.details["chats"] = len(by_chat)

    def _outcome(self, message: Message, outcome: str) -> None:
        c = self.result.counters
        if outcome == "added":
            c["salvaged"] += 1
            c["written"] += 1
            c["pending_push"] += 1
        elif outcome == "unchanged":
            c["unchanged"] += 1
        elif outcome == "deleted":
            c["deleted_here"] += 1
        else:
            c["conflicts"] += 1
            self.store.keep_in_trash(message, SALVAGED_REASON, self.run_id)
            self.emit("conflict", chat_id=message.chat_id, id=message.id,
                      content_hash=message.content_hash, kept="trash")

    def _trash(self, read: TableRead) -> None:
        if read.whole_table_unreadable:
            self._unreadable_table(read.table)
        self.result.counters["unreadable_trash"] += len(read.unreadable)
        for r in read.rows:
            if not all(isinstance(v, str) for v in (r.chat_id, r.id, r.content_hash, r.message,
                                                    r.deleted_at)):
                self.result.counters["invalid_trash"] += 1
                continue
            if self.store.add_trash(r.chat_id, r.id, r.content_hash, r.message, r.deleted_at,
                                    r.reason, self.run_id):
                self.result.counters["trash_salvaged"] += 1

    def _tombstones(self, read: TableRead) -> None:
        if read.whole_table_unreadable:
            self._unreadable_table(read.table)
            return
        for r in read.rows:
            if self.store.add_tombstone(r.chat_id, r.id, r.content_hash, r.deleted_at,
                                        r.reason, self.run_id):
                self.result.counters["tombstones_salvaged"] += 1


def salvage(store: Store, source: Path, *, dry_run: bool = False, emit: Emit = _no_emit,
            run_args: dict[str, Any] | None = None) -> RunResult:
    """Record in ``store`` what can still be read of the damaged store at ``source``.

    Exit 0 when every row was read and salvaged (or already held); 1 when rows could not be
    read or were invalid (skipped input, listed); 6 when some held other content here (the
    salvaged version is in the trash). One transaction: all of it is recorded, or none.
    """
    recording = store.rolled_back() if dry_run else store.transaction()
    with damaged_copy(source) as damaged, recording:
        run_id = None if dry_run else store.start_run("salvage", run_args or {})
        salvager = _Salvager(store, source, emit, run_id)
        salvager.run(damaged)
        result = salvager.result
        _finish(result, source, dry_run)
        if run_id is not None:
            store.finish_run(run_id, int(result.exit_code), result.summary())
    return result


def _finish(result: RunResult, source: Path, dry_run: bool) -> None:
    c, d = result.counters, result.details
    for name in ("salvaged", "unreadable", "invalid", "evicted", "conflicts"):
        c[name] += 0
    d.update(source=str(source), dry_run=dry_run)
    if dry_run:
        c["would_write"] = c.pop("written", 0)
    lost = c["unreadable"] + c["invalid"] + c["unreadable_chats"] + c["unreadable_trash"]
    if lost or d.get("unreadable_tables"):
        result.flag(ExitCode.DIFFERENCES)
    if c["conflicts"]:
        result.flag(ExitCode.CONFLICTS)
