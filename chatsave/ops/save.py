"""Save: push every pending message to the backend exactly once, through the durable outbox.

Plan, then apply. The plan turns pending messages into batches bounded by the backend's
advertised limits; each batch is committed to the outbox with its Idempotency-Key before
its first attempt, so any interruption is resumed by re-sending the same body under the
same key. A message is confirmed only when an answer lists its id with the hash sent.
The plan is made here, a group of chats at a time, each group committed before its
batches are sent and the next planned while they are in flight; the batches are sent and
their answers recorded by chatsave.ops.save_send.

Before planning, the backend is asked whether it still holds what it confirmed to this
store (chatsave.ops.recheck): what it lost is planned again with the rest, and a backend
that looks wiped is refused before anything is sent (exit 5).

A chat the backend cannot take at all (ChatRefusedError: known from the remote's
``refusal`` before planning, or raised by it before any request) is left out alone: no
request for it, its messages stay pending here, the other chats go on, and the run ends
with the refusal's exit code (9), the chat listed under ``refused``.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from chatsave.errors import (
    ChatRefusedError,
    ExitCode,
    RemoteError,
    UsageError,
)
from chatsave.model import Message, check_chat_id
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.recheck import Recheck, mark_resent, recheck
from chatsave.ops.result import RunResult
from chatsave.ops.save_send import _ChatWork, _Sender
from chatsave.protocol import Capabilities
from chatsave.remote.base import Remote
from chatsave.remote.retry import CircuitBreaker
from chatsave.store.backend import BackendView, BatchRef
from chatsave.store.store import Store

Emit = Callable[..., None]
# Leave room under the advertised body limit for the envelope and for proxies' accounting.
BODY_HEADROOM = 0.9
# Rejected messages named in a run's result (with their reasons); the rest are counted.
SHOWN_REJECTIONS = 5
TOO_LARGE, REFUSED, DROPPED = "too_large", "refused", "dropped"
# The most chats planned in one transaction while requests are in flight (save.planned).
PLAN_GROUP_MAX = 128


def rejection_kind(reason: str | None) -> str:
    """What the backend's rejection of a message, recorded with ``reason``, was:

    - ``too_large``: over the backend's limits (a request or content size);
    - ``dropped``: the backend did not keep it as it stands now: AutoBot's loader or save
      merge, its order by timestamp text, a clock change, its session cache, a backend
      that lost it again after it was sent back; a repair there, or the next hour, lets
      it through (``save --retry-rejected``);
    - ``refused``: anything else its validation refused (a whole request answered 422, a
      message it cannot read), or a message with no copy left to send.

    Only a dropped one may go through when sent again as it is.
    """
    text = reason or ""
    if "too large" in text or "larger than" in text:
        return TOO_LARGE
    if "the backend rejected the" in text:  # 422: the whole request was refused
        return REFUSED
    if "AutoBot" in text or "vanished from the backend again" in text:
        return DROPPED
    return REFUSED


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class SaveOptions:
    retry_rejected: bool = False
    dry_run: bool = False
    concurrency: int = 4
    max_duration: float | None = None
    jitter_start: float = 0.0
    breaker_threshold: int = 5


@dataclass
class PlannedBatch:
    chat_id: str
    messages: int
    bytes: int
    kind: str = "save"


def message_piece(msg: Message, base_rev: int | None = None) -> str:
    """One message of a save body, as JSON text (wire shape plus content_hash, base_rev)."""
    wire = msg.to_wire()
    wire["content_hash"] = msg.content_hash
    if base_rev is not None:
        wire["base_rev"] = base_rev
    return json.dumps(wire, ensure_ascii=False, separators=(",", ":"))


def assemble(pieces: list[str], title: str | None) -> bytes:
    """The exact JSON body of a save request from its message pieces."""
    tail = ',"title":' + json.dumps(title, ensure_ascii=False) + "}" if title else "}"
    return ('{"messages":[' + ",".join(pieces) + "]" + tail).encode("utf-8")


def encode_delete(items: list[tuple[str, int, str]], reason: str) -> bytes:
    """The exact JSON body of a delete request: ids with the revision they must still be."""
    ids = [{"id": mid, "base_rev": rev} for mid, rev, _ in items]
    return json.dumps({"ids": ids, "reason": reason}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def select_chats(store: Store, chat_ids: list[str] | None) -> list[str]:
    """The chats a command works on: the named ones (which must be known), or all local ones."""
    if chat_ids is None:
        return store.chat_ids()
    missing = [c for c in chat_ids if not store.has_chat(check_chat_id(c))]
    if missing:
        raise UsageError(f"not in the local store: {', '.join(map(repr, missing))}",
                         hint="chatsave status lists the chats the store holds")
    return list(dict.fromkeys(chat_ids))


class _Saver(_Sender):
    """A save's plan (here) and its sending (chatsave.ops.save_send)."""

    def __init__(self, store: Store, remote: Remote, caps: Capabilities, options: SaveOptions,
                 emit: Emit, run_id: int | None, progress: Progress = no_progress) -> None:
        self.store = store
        self.remote = remote
        self.caps = caps
        self.options = options
        self.emit = emit
        self.run_id = run_id
        self.progress = progress
        # A dry run records nothing, not even the backend it looked at.
        self.view = (BackendView(store, caps.backend_id) if options.dry_run
                     else BackendView.register(store, caps.backend_id, remote.url))
        bind = getattr(remote, "bind_store", None)  # remotes that map ids (AutoBot)
        if bind is not None:
            bind(store)
        self.result = RunResult("save")
        self.breaker = CircuitBreaker(options.breaker_threshold)
        self.failures = 0
        self.unacknowledged = 0
        self.confirmed = 0
        self.last_error: RemoteError | None = None
        self.deadline = (time.monotonic() + options.max_duration
                         if options.max_duration is not None else None)
        self.plan: list[PlannedBatch] = []
        # Write requests sent: every batch, every half of a split one, every retry.
        self.write_requests = 0
        self.touched: set[str] = set()
        self.refused: dict[str, ChatRefusedError] = {}
        # Chats whose batch goes alone from now on (a request of several chats was refused
        # whole, or the batch overwrites a revision): chatsave.ops.save_send.
        self.alone: set[str] = set()
        # Small chats go together (POST /saves) while the backend takes that request.
        self.saves_on = "saves" in caps.features
        # The chats with something to send, confirm or settle once the backend was checked
        # (BackendView.chats_with_work); the others have nothing pending, in conflict or
        # rejected, before the run or after it. None: not read (the run ended before).
        self.with_work: set[str] | None = None

    # ------------------------------------------------------------------- plan
    def _batches(self, chat_id: str, entries: Iterable[tuple[str, str, str]],
                 title: str | None) -> Iterator[tuple[bytes, list[tuple[str, str]]]]:
        """Bodies of at most max_batch_messages and max_body_bytes (with headroom), from
        (id, hash, JSON text) entries."""
        max_n = self.caps.max_batch_messages
        max_bytes = int(self.caps.max_body_bytes * BODY_HEADROOM)
        overhead = len(assemble([], title))
        pieces: list[str] = []
        items: list[tuple[str, str]] = []
        size = overhead
        for mid, chash, piece in entries:
            self.result.counters["read"] += 1
            length = len(piece.encode("utf-8")) + 1
            if overhead + length > max_bytes:
                reason = (f"too large for this backend ({overhead + length} bytes; it takes "
                          f"at most {self.caps.max_body_bytes} per request)")
                if not self.options.dry_run:
                    self.view.reject_local(chat_id, mid, chash, reason)
                self.emit("rejected", chat_id=chat_id, id=mid, content_hash=chash,
                          reason=reason)
                self.result.counters["rejected_now"] += 1
                continue
            if pieces and (len(pieces) >= max_n or size + length > max_bytes):
                yield assemble(pieces, title), items
                pieces, items, size = [], [], overhead
            pieces.append(piece)
            items.append((mid, chash))
            size += length
        if pieces:
            yield assemble(pieces, title), items

    def _queue(self, work: _ChatWork, kind: str, body: bytes,
               items: list[tuple[str, str]]) -> None:
        self.plan.append(PlannedBatch(work.chat_id, len(items), len(body), kind))
        if not self.options.dry_run:
            work.queue.append(self.view.add_batch(work.chat_id, kind, body, items, self.run_id))

    def plan_chat(self, chat_id: str, title: str | None, open_batches: list[BatchRef],
                  *, restores: bool = True) -> _ChatWork:
        """Queue what is pending for a chat: open batches first, then new saves, restores
        from the trash (against the revision of the deletion this store saw; sync plans
        its own, with what it just read: ``restores=False``) and deletes."""
        work = _ChatWork(chat_id, deque(open_batches))
        for ref in open_batches:
            self.plan.append(PlannedBatch(chat_id, ref.messages, ref.size, ref.kind))
        in_flight = self.view.ids_in(open_batches)
        self.result.counters["read"] += len(in_flight)
        pending = self.view.pending_pieces(chat_id, retry_rejected=self.options.retry_rejected,
                                           exclude=in_flight)
        for body, items in self._batches(chat_id, pending, title):
            self._queue(work, "save", body, items)
        if restores:
            waiting = [(self.store.get_message(chat_id, mid), rev)
                       for mid, rev in self.view.waiting_restores(chat_id)
                       if mid not in in_flight]
            self.plan_overwrites(work, title, [(m, rev) for m, rev in waiting
                                               if isinstance(m, Message)])
        deletes = [d for d in self.view.pending_deletes(chat_id) if d[0] not in in_flight]
        self.plan_deletes(work, deletes)
        return work

    def planned(self, chat_ids: list[str], titles: dict[str, str | None],
                open_by_chat: dict[str, list[BatchRef]]) -> Iterator[list[_ChatWork]]:
        """The chats' work, a group of chats at a time: each group's batches are recorded in
        one transaction, committed before the group is yielded (so before any of its requests
        is sent). Groups start small, so that the first requests go out at once, and double
        up to PLAN_GROUP_MAX chats (one commit per group, not per chat)."""
        size = max(1, self.options.concurrency)
        start = 0
        while start < len(chat_ids):
            group = chat_ids[start:start + size]
            if self.store.conn.in_transaction:  # joined, it would not be committed first
                raise RuntimeError("a save's plan must be committed in its own transaction")
            with self.store.transaction():
                works = [self.plan_chat(cid, titles.get(cid), open_by_chat.get(cid, []))
                         for cid in group]
            yield works
            start += len(group)
            size = min(size * 2, PLAN_GROUP_MAX)

    def plan_deletes(self, work: _ChatWork, items: list[tuple[str, int, str]],
                     reason: str = "deleted with chatsave") -> None:
        step = self.caps.max_batch_messages
        for i in range(0, len(items), step):
            chunk = items[i:i + step]
            self._queue(work, "delete", encode_delete(chunk, reason),
                        [(mid, chash) for mid, _, chash in chunk])

    def plan_overwrites(self, work: _ChatWork, title: str | None,
                        messages: list[tuple[Message, int]]) -> None:
        """Saves that replace the backend's version they name (``base_rev``): --prefer local."""
        entries = ((m.id, m.content_hash, message_piece(m, rev)) for m, rev in messages)
        for body, items in self._batches(work.chat_id, entries, title):
            self._queue(work, "save", body, items)

def save(store: Store, remote: Remote, chat_ids: list[str] | None, options: SaveOptions, *,
         emit: Emit = _no_emit, run_id: int | None = None,
         progress: Progress = no_progress) -> RunResult:
    """Push pending messages of the chosen chats (None: every local chat) to ``remote``;
    ``progress`` counts the messages sent (chatsave.ops.progress)."""
    chats = select_chats(store, chat_ids)
    if options.jitter_start > 0 and not options.dry_run:
        time.sleep(random.uniform(0, options.jitter_start))
    caps = remote.capabilities()
    saver = _Saver(store, remote, caps, options, emit, run_id, progress)
    wanted = set(chats)
    if not options.dry_run:
        saver.view.abandon_stale(wanted)
    open_by_chat: dict[str, list[BatchRef]] = {}
    for batch in saver.view.open_batches(wanted):
        open_by_chat.setdefault(batch.chat_id, []).append(batch)
    titles = {row.chat_id: row.title for row in store.chats(chats)}
    sendable = [cid for cid in chats if not saver.refuses(cid)]
    result = saver.result
    # Does the backend still hold what it confirmed? (chatsave.ops.recheck: before
    # planning, so that what it lost is planned and sent with the rest.)
    check = Recheck() if options.dry_run else recheck(store, remote, saver.view, caps,
                                                       sendable, emit)
    result.details["check_requests"] = check.requests
    result.counters["resent_lost"] = len(check.resent)
    if check.resent:
        emit("warning", message=f"{len(check.resent)} message(s) the backend had confirmed "
             "were gone from it; sent again")
    if check.error is not None:
        # Not checked this time: the next run checks; what was sent is confirmed anyway.
        emit("error", reason=check.error.message)
        result.details["check_error"] = check.error.message
        result.flag(ExitCode.PARTIAL)
    result.details["backend_id"] = caps.backend_id
    result.details["remote"] = remote.url
    result.details["chats"] = len(chats)
    if check.guard is not None:
        emit("guard", reason=check.guard.message)
        result.fail(check.guard)
        result.details["batches"] = result.details["write_requests"] = 0
        return _finish(saver, chats)
    # Only chats holding something to send are planned: one read of the store finds them
    # (chats in agreement cost a query each otherwise, and a cron run finds most so).
    saver.with_work = saver.view.chats_with_work(chats) | set(open_by_chat)
    sendable = [cid for cid in sendable if cid in saver.with_work]
    if options.dry_run:
        for cid in sendable:
            saver.plan_chat(cid, titles.get(cid), open_by_chat.get(cid, []))
        result.details["batches"] = len(saver.plan)
        result.details["plan"] = [p.__dict__ for p in saver.plan]
        result.counters["would_send"] = sum(p.messages for p in saver.plan)
        for planned in saver.plan:
            emit("planned", chat_id=planned.chat_id, messages=planned.messages,
                 bytes=planned.bytes)
        if saver.plan:
            result.flag(ExitCode.DIFFERENCES)
        return result
    # The plan is recorded a group of chats at a time, each group's batches committed in one
    # transaction before the first of them is sent; the next group is planned while the
    # requests of the last are in flight (docs/store.md, "File and connection").
    saver.send_all([], more=saver.planned(sendable, titles, open_by_chat))
    result.details["batches"] = len(saver.plan)
    result.details["write_requests"] = saver.write_requests
    mark_resent(store, saver.view, check.resent)
    return _finish(saver, chats)


def _name_rejections(view: BackendView, result: RunResult, chats: set[str]) -> None:
    """Name the messages of ``chats`` this backend rejected (the newest first, a few), with
    their reasons, and count them by kind (``rejection_kind``): in ``rejections`` and
    ``rejected_kinds``."""
    shown: list[dict[str, Any]] = []
    kinds = dict.fromkeys((TOO_LARGE, REFUSED, DROPPED), 0)
    for chat_id, message_id, reason in view.rejections():
        if chat_id not in chats:
            continue
        kind = rejection_kind(reason)
        kinds[kind] += 1
        if len(shown) < SHOWN_REJECTIONS:
            shown.append({"chat_id": chat_id, "id": message_id, "reason": reason,
                          "kind": kind})
    result.details["rejections"] = shown
    result.details["rejected_kinds"] = kinds


def _finish(saver: _Saver, chats: list[str],
            per_chat: dict[str, dict[str, int]] | None = None) -> RunResult:
    """The run's counts and exit code; ``per_chat``: the chats' ``chat_counts`` as the
    caller read them after its last write (sync reads them once for this and its
    agreements), else read here."""
    result = saver.result
    # Answered batches left their bodies' pages free: given back now, so that a store
    # is not left at twice its data after a save (docs/store.md, "Size").
    saver.store.release_free_pages()
    if per_chat is None:
        counted = chats if saver.with_work is None else \
            [cid for cid in chats if cid in saver.with_work]
        per_chat = saver.view.chat_counts(counted)
    final = {k: sum(v[k] for v in per_chat.values())
             for k in ("pending_push", "conflicts", "rejected")}
    for chat_id, counts in per_chat.items():
        if chat_id in saver.touched or any(counts[k] for k in final):
            saver.emit("chat", chat_id=chat_id, **counts)
    # What waits in refused chats is pending too, but no rerun sends it (exit 9 says so).
    for entry in result.details.get("refused", []):
        entry["pending_push"] = per_chat.get(entry["chat_id"], {}).get("pending_push", 0)
    retryable = final["pending_push"] - sum(
        per_chat.get(cid, {}).get("pending_push", 0) for cid in saver.refused)
    c = result.counters
    c["pending_push"] = final["pending_push"]
    c["conflicts"] = final["conflicts"]
    c["rejected"] = final["rejected"]
    if final["rejected"]:
        _name_rejections(saver.view, result, set(chats))
    c["retried"] = int(getattr(saver.remote, "retries", 0))
    c["unacknowledged"] = saver.unacknowledged
    if final["conflicts"]:
        result.flag(ExitCode.CONFLICTS)
    if final["rejected"] or saver.unacknowledged:
        result.flag(ExitCode.REJECTED)
    if retryable:
        if saver.failures and saver.confirmed == 0:
            result.flag(ExitCode.UNAVAILABLE)
        else:
            result.flag(ExitCode.PARTIAL)
        if saver.breaker.open:
            result.details["stopped"] = "circuit breaker: too many consecutive failures"
        elif saver._expired():
            result.details["stopped"] = "--max-duration reached"
        if saver.last_error is not None:
            result.details["last_error"] = saver.last_error.message
    return result
