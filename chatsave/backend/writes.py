"""Writes, inside one transaction each: executed exactly once per (user, Idempotency-Key),
or the stored answer replayed, and the steps that apply a save or a delete.

One transaction locks the chat, reads the key's record, applies the request and stores its
answer as the record; a request that dies midway commits nothing (docs/reliability.md,
"A server killed mid-request"; docs/protocol.md, "Idempotency").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chatsave.backend.answers import (
    Answer,
    RenderedAnswer,
    ServiceError,
    ack,
    answer_json,
    conflict,
    not_found,
)
from chatsave.backend.checks import Item
from chatsave.backend.storage.base import (
    STALE_DIGEST,
    ChatRow,
    IdempotencyRecord,
    MessageRow,
    Storage,
    StorageUnavailable,
    WriteTx,
)
from chatsave.model import format_time, message_id_problem
from chatsave.protocol import DeleteItem

#: times a write starts again after losing the race for a new key to a concurrent request
KEY_RACE_ATTEMPTS = 3


def now_text(now: float) -> str:
    return format_time(datetime.fromtimestamp(now, UTC))


@dataclass
class Outcome:
    saved: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


class Abort(Exception):
    """Roll the write transaction back and answer with ``answer`` (nothing is stored)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[1])
        self.result = answer


class _KeyRace(Exception):
    """A concurrent request committed a record for the key first; nothing was written."""


def execute_once(storage: Storage, clock: Callable[[], float], user: str, chat_id: str,
                 key: str, fingerprint: str,
                 apply: Callable[[WriteTx, ChatRow | None, float], Answer], *,
                 derived: bool = False) -> Answer:
    """Execute a write exactly once per (user, key), or replay its stored answer.

    One transaction: lock the chat, read the key's record, apply, store the answer as
    the record. A second request with the key queues on the chat's lock and then finds
    the first one's record. ``derived``: the key was derived from the request (alias
    save), so its answer is replayed only if the chat has not changed since.
    """
    return _execute(storage, clock, user, key, fingerprint,
                    lambda tx: tx.lock_chat(user, chat_id), apply, derived=derived)


def execute_once_many(storage: Storage, clock: Callable[[], float], user: str,
                      chat_ids: list[str], key: str, fingerprint: str,
                      apply: Callable[[WriteTx, dict[str, ChatRow | None], float], Answer]
                      ) -> Answer:
    """``execute_once`` for a write to several chats (POST /saves): the chats are locked
    in id order, so that two requests naming some of the same chats cannot deadlock."""
    return _execute(storage, clock, user, key, fingerprint,
                    lambda tx: {cid: tx.lock_chat(user, cid) for cid in sorted(chat_ids)},
                    apply)


def _execute(storage: Storage, clock: Callable[[], float], user: str, key: str,
             fingerprint: str, lock: Callable[[WriteTx], Any],
             apply: Callable[[WriteTx, Any, float], Answer], *,
             derived: bool = False) -> Answer:
    for _attempt in range(KEY_RACE_ATTEMPTS):
        try:
            with storage.write() as tx:
                now = clock()
                locked = lock(tx)
                record = tx.get_record(user, key)
                replay = _replay(record, key, fingerprint, locked, derived, now)
                if replay is not None:
                    return replay
                status, answer, headers = apply(tx, locked, now)
                if status != 200:
                    raise Abort((status, answer, headers))
                rendered = RenderedAnswer(answer, answer_json(answer))
                if not tx.put_record(user, key, fingerprint, status, rendered.text, now,
                                     replace=record is not None):
                    raise _KeyRace
            return status, rendered, headers
        except Abort as abort:
            return abort.result
        except _KeyRace:
            continue
    raise StorageUnavailable(f"idempotency key {key!r} of user {user!r}: lost "
                             f"{KEY_RACE_ATTEMPTS} races to concurrent requests")

def _replay(record: IdempotencyRecord | None, key: str, fingerprint: str,
            chat: ChatRow | None, derived: bool, now: float) -> Answer | None:
    """The stored answer to send again, None to execute, or a ServiceError."""
    if record is None:
        return None
    if record.state == "running":
        # A lease an earlier server version took before executing: honoured while
        # valid (its request may still finish), absent once expired.
        if record.lease_expires is None or record.lease_expires <= now:
            return None
        raise ServiceError(
            409, "idempotency_key_in_use",
            "a request with this Idempotency-Key is still running; retry later",
            {"idempotency_key": key},
            headers={"Retry-After": str(max(1, min(5, math.ceil(
                record.lease_expires - now))))})
    if record.fingerprint != fingerprint:
        raise ServiceError(
            422, "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request",
            {"idempotency_key": key})
    assert record.status is not None and record.answer is not None
    answer = json.loads(record.answer)
    if derived and answer.get("version") != (chat.version if chat else 0):
        return None  # the answer is no longer true: a deliberate save, not a retry
    return record.status, RenderedAnswer(answer, record.answer), \
        {"Idempotent-Replayed": "true"}

def apply_save(tx: WriteTx, chat: ChatRow | None, user: str, chat_id: str,
               items: list[Item], title: str | None, now: float) -> Answer:
    """Apply a save batch inside the write transaction (docs/protocol.md, "Save")."""
    out = Outcome()
    valid = [it for it in items if it.reject is None]
    if chat is None:
        if not valid and title is None:
            out.rejected = [{"id": it.id, "reason": it.reject} for it in items]
            return 200, save_answer(chat_id, 0, out), {}
        chat = tx.create_chat(user, chat_id, now_text(now))
    existing = tx.get_messages(user, chat_id, [it.id for it in valid if it.id])
    changed = False
    seen: set[str] = set()
    new_rows: list[MessageRow] = []
    restored = 0
    for it in items:
        if it.reject is not None:
            out.rejected.append({"id": it.id, "reason": it.reject})
            continue
        assert it.id is not None and it.content_hash is not None and it.body is not None
        if it.id in seen:
            out.rejected.append({"id": it.id, "reason": "duplicate id in this batch"})
            continue
        seen.add(it.id)
        current = existing.get(it.id)
        if current is None:
            row = MessageRow(id=it.id, seq=chat.next_seq, rev=1,
                             content_hash=it.content_hash, deleted=False, body=it.body,
                             updated_at=now)
            chat.next_seq += 1
            new_rows.append(row)
            out.saved.append(ack(row))
            changed = True
        elif it.base_rev is None:
            if current.deleted:
                out.conflicts.append(conflict(current, "deleted"))
            elif current.content_hash == it.content_hash:
                out.unchanged.append(ack(current))
            else:
                out.conflicts.append(conflict(current, "different_content"))
        elif it.base_rev != current.rev:
            out.conflicts.append(conflict(current, "stale_base_rev"))
        elif not current.deleted and current.body == it.body:
            out.unchanged.append(ack(current))
        else:  # the write wins: overwrite, or restore a tombstone
            row = MessageRow(id=it.id, seq=current.seq, rev=current.rev + 1,
                             content_hash=it.content_hash, deleted=False, body=it.body,
                             updated_at=now)
            tx.update_message(user, chat_id, row)
            out.saved.append(ack(row))
            restored += current.deleted
            changed = True
    tx.insert_messages(user, chat_id, new_rows)
    if title is not None and title != chat.title:
        chat.title = title
        changed = True
    if changed:
        _bump(tx, chat, now, len(new_rows) + restored)
    return 200, save_answer(chat_id, chat.version, out), {}

def apply_delete(tx: WriteTx, chat: ChatRow | None, user: str, chat_id: str,
                 targets: list[DeleteItem], now: float) -> Answer:
    """Turn messages into tombstones inside the write transaction."""
    if chat is None:
        raise Abort(not_found(chat_id).answer())
    ids = list(dict.fromkeys(t.id for t in targets))
    existing = tx.get_messages(user, chat_id,
                               [i for i in ids if message_id_problem(i) is None])
    deleted: list[dict[str, Any]] = []
    missing: list[str] = []
    conflicts: list[dict[str, Any]] = []
    changed = False
    removed = 0
    seen: set[str] = set()
    for target in targets:
        if target.id in seen:
            continue
        seen.add(target.id)
        current = existing.get(target.id)
        if current is None:
            missing.append(target.id)
        elif current.deleted:
            deleted.append(ack(current))  # already a tombstone: nothing to do
        elif target.base_rev is not None and target.base_rev != current.rev:
            conflicts.append(conflict(current, "stale_base_rev"))
        else:
            row = MessageRow(id=current.id, seq=current.seq, rev=current.rev + 1,
                             content_hash=current.content_hash, deleted=True, body=None,
                             updated_at=now, deleted_at=now)
            tx.update_message(user, chat_id, row)
            deleted.append(ack(row))
            changed = True
            removed += 1
    if changed:
        _bump(tx, chat, now, -removed)
    return 200, {"chat_id": chat_id, "version": chat.version, "deleted": deleted,
                 "missing": missing, "conflicts": conflicts}, {}

def _bump(tx: WriteTx, chat: ChatRow, now: float, live_delta: int) -> None:
    """A new version of the chat. Its digest is computed when it is next read, not on
    every write: a chat saved in many batches is hashed once, not once per batch."""
    chat.version += 1
    chat.message_count += live_delta
    chat.digest = STALE_DIGEST
    chat.updated_at = now_text(now)
    tx.save_chat(chat)


def save_answer(chat_id: str, version: int, out: Outcome) -> dict[str, Any]:
    return {"chat_id": chat_id, "version": version, "saved": out.saved,
            "unchanged": out.unchanged, "conflicts": out.conflicts,
            "rejected": out.rejected}
