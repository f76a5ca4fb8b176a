"""Sending a save's batches and recording the backend's answers (chatsave.ops.save).

The batches of each chat go in order, a few chats at once; each answer is recorded in the
store as it comes (in groups, one commit per group: ``Store.group_commit``), and a 413
splits a batch in two. A chat's next batch is sent as soon as the answer to the last one
is in, and that answer is recorded while the next one travels; a failure, a split or a
refusal is handled first. A chat the backend cannot take at all is left out of the run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatsave.errors import (
    BadAnswerError,
    ChatRefusedError,
    RefusedError,
    RemoteError,
    RequestRejectedError,
    TooLargeError,
    UnavailableError,
)
from chatsave.ops.progress import Progress
from chatsave.ops.result import RunResult
from chatsave.protocol import Capabilities, DeleteAnswer, SaveAnswer
from chatsave.remote.base import Remote
from chatsave.remote.retry import CircuitBreaker
from chatsave.store.backend import BackendView, Batch, BatchRef
from chatsave.store.store import Store

if TYPE_CHECKING:
    from chatsave.ops.save import SaveOptions

Emit = Callable[..., None]


@dataclass
class _ChatWork:
    chat_id: str
    queue: deque[BatchRef] = field(default_factory=deque)
    stopped: bool = False


def _applied(batch: Batch, outcome: Any) -> bool:
    """Whether ``outcome`` is the backend's answer to ``batch`` (its chat's next batch may go)."""
    return isinstance(outcome, SaveAnswer | DeleteAnswer) and outcome.chat_id == batch.chat_id


#: a save batch that overwrites a revision it names: never sent with other chats' (a part
#: of a request of several chats may be sent again alone, and a second overwrite of the
#: same revision would be a conflict)
_BASE_REV = b'"base_rev":'
#: the share of the backend's body limit a request of several chats fills at most
SAVES_HEADROOM = 0.9
#: the chats waiting to be sent that are looked at for a request of several chats
SAVES_LOOK = 256


def _ref(batch: Batch) -> BatchRef:
    """The queue's reference to a loaded save batch (put back to be sent again)."""
    return BatchRef(batch.batch_id, batch.chat_id, len(batch.items), len(batch.body))


def saves_body(batches: list[Batch]) -> bytes:
    """The exact body of POST /saves for these save batches, in this order: each chat's
    part is its batch's body with the chat id in front (docs/protocol.md, "Saves")."""
    parts = [b'{"chat_id":' + json.dumps(b.chat_id).encode() + b"," + b.body[1:]
             for b in batches]
    return b'{"chats":[' + b",".join(parts) + b"]}"


def saves_key(batches: list[Batch]) -> str:
    """The Idempotency-Key of a request of several chats, derived from its batches' keys:
    the same batches in the same order are the same body (each batch's body is recorded
    once, unchanged), so a retry or a rerun that sends them together again replays."""
    digest = hashlib.sha256("\n".join(b.key for b in batches).encode()).hexdigest()
    return f"saves-{digest}"


class _Sender:
    """The sending half of a save (``_Saver`` in chatsave.ops.save sets its state up)."""

    store: Store
    remote: Remote
    caps: Capabilities
    options: SaveOptions
    emit: Emit
    run_id: int | None
    progress: Progress
    view: BackendView
    result: RunResult
    breaker: CircuitBreaker
    failures: int
    unacknowledged: int
    confirmed: int
    last_error: RemoteError | None
    deadline: float | None
    write_requests: int
    touched: set[str]
    refused: dict[str, ChatRefusedError]
    alone: set[str]
    saves_on: bool

    # ------------------------------------------------------ chats left out
    def refuses(self, chat_id: str) -> bool:
        """Whether the backend cannot take this chat at all, as the remote knows before any
        request (remotes whose routes cannot carry some ids: AutoBot); recorded once."""
        if chat_id in self.refused:
            return True
        refused = self.remote.refusal(chat_id)
        if refused is None:
            return False
        self.refuse(chat_id, refused)
        return True

    def refuse(self, chat_id: str, error: ChatRefusedError) -> None:
        """Leave one chat out of the run: nothing sent for it, its messages stay pending
        here, the other chats go on; listed, and the run's exit code is the refusal's."""
        if chat_id in self.refused:
            return
        self.refused[chat_id] = error
        self.emit("refused", **self.result.refuse(chat_id, error))

    # ------------------------------------------------------------------ send
    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def handle(self, work: _ChatWork, batch: Batch,
               outcome: Any) -> None:
        """Record one batch's outcome (main thread only: the store is not shared)."""
        if isinstance(outcome, SaveAnswer | DeleteAnswer) and outcome.chat_id != batch.chat_id:
            outcome = UnavailableError(
                f"{self.remote.url}: the answer to a {batch.kind} of chat {batch.chat_id!r} "
                f"was for chat {outcome.chat_id!r}; nothing confirmed")
        if isinstance(outcome, SaveAnswer | DeleteAnswer):
            if isinstance(outcome, SaveAnswer):
                tally, problems = self.view.record_save(batch, outcome)
            else:
                tally, problems = self.view.record_delete(batch, outcome)
                self.result.counters["deleted_remote"] += tally.saved + tally.unchanged
            self.breaker.success()
            c = self.result.counters
            if batch.kind == "save":
                c["written"] += tally.saved
                c["unchanged"] += tally.unchanged
            c["conflicts_now"] += tally.conflicts
            c["rejected_now"] += tally.rejected
            self.unacknowledged += tally.unacknowledged
            self.confirmed += tally.saved + tally.unchanged
            for problem in problems:
                kind = problem.pop("type")
                self.emit(kind, chat_id=batch.chat_id, **problem)
            self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id, kind=batch.kind,
                      messages=len(batch.items), outcome="answered", saved=tally.saved,
                      unchanged=tally.unchanged, conflicts=tally.conflicts,
                      rejected=tally.rejected, unacknowledged=tally.unacknowledged)
            self.progress(len(batch.items))
            self.touched.add(batch.chat_id)
            return
        if isinstance(outcome, TooLargeError):
            self._split(work, batch, str(outcome))
            return
        if isinstance(outcome, ChatRefusedError):
            # Nothing was sent: the batch stays open under its key, its messages pending;
            # the chat's other batches wait with it, and no other chat is held up.
            self.view.note_attempt(batch, outcome.message)
            work.stopped = True
            self.refuse(batch.chat_id, outcome)
            self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id,
                      kind=batch.kind, messages=len(batch.items), outcome="refused",
                      error=outcome.message)
            return
        if isinstance(outcome, RequestRejectedError):
            self.view.reject_batch(batch, outcome.message)
            self.result.counters["rejected_now"] += len(batch.items)
            self.progress(len(batch.items))
            self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id,
                      messages=len(batch.items), outcome="rejected", error=outcome.message)
            return
        if isinstance(outcome, RemoteError):
            self.view.note_attempt(batch, outcome.message)
            self.breaker.failure()
            self.failures += 1
            work.stopped = True
            self.last_error = outcome
            self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id,
                      messages=len(batch.items), outcome="failed", error=outcome.message)
            return
        raise outcome

    def _split(self, work: _ChatWork, batch: Batch, reason: str) -> None:
        """A 413 from anything on the way: the request was not applied; halve and re-record.

        The halves keep every entry of the original body as it was (base_rev included).
        """
        doc = json.loads(batch.body)
        key = "messages" if batch.kind == "save" else "ids"
        entries = doc[key]
        sent = dict(batch.items)
        self.view.abandon(batch, reason)
        if len(entries) <= 1:
            for mid in sent:
                self.view.reject_local(batch.chat_id, mid, sent[mid],
                                       f"too large for the backend: {reason}")
                self.result.counters["rejected_now"] += 1
                self.emit("rejected", chat_id=batch.chat_id, id=mid, content_hash=sent[mid],
                          reason=reason)
            return
        half = len(entries) // 2
        halves = []
        for part in (entries[:half], entries[half:]):
            body = json.dumps({**doc, key: part}, ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8")
            items = [(e["id"], sent[e["id"]]) for e in part]
            halves.append(self.view.add_batch(batch.chat_id, batch.kind, body, items,
                                              self.run_id))
        work.queue.extendleft(reversed(halves))
        self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id, kind=batch.kind,
                  messages=len(batch.items), outcome="split", error=reason)

    def handle_many(self, parts: list[tuple[_ChatWork, Batch]], outcome: Any
                    ) -> list[_ChatWork]:
        """Record the outcome of one request carrying several chats' batches; returns the
        chats whose batch goes again alone (the request was refused whole, or its answer
        could not be read: each part then meets the backend's verdict on its own)."""
        if isinstance(outcome, list):
            for (work, batch), answer in zip(parts, outcome, strict=True):
                self.handle(work, batch, answer)
            return []
        unrouted = self._saves_unrouted(outcome)
        if unrouted:
            self.saves_on = False
            self.emit("warning", message=f"{self.remote.url} lists the saves feature but "
                      f"POST /saves did not reach it ({outcome.message}); each chat is sent "
                      "alone")
        if unrouted or isinstance(outcome, TooLargeError | RequestRejectedError
                                  | BadAnswerError):
            again = []
            for work, batch in parts:
                self.alone.add(batch.chat_id)
                work.queue.appendleft(_ref(batch))
                again.append(work)
                self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id,
                          kind=batch.kind, messages=len(batch.items), outcome="split",
                          error=str(outcome))
            return again
        if isinstance(outcome, RemoteError):
            # One request failed: one failure for the breaker, each batch stays open.
            self.breaker.failure()
            self.failures += 1
            self.last_error = outcome
            for work, batch in parts:
                self.view.note_attempt(batch, outcome.message)
                work.stopped = True
                self.emit("batch", chat_id=batch.chat_id, batch_id=batch.batch_id,
                          messages=len(batch.items), outcome="failed", error=outcome.message)
            return []
        raise outcome

    def _joins(self, work: _ChatWork) -> bool:
        """Whether this chat's work may go in a request with other chats': it is one save
        batch, to a backend listing ``saves``, and nothing sent it alone yet."""
        return (self.saves_on and len(work.queue) == 1 and work.queue[0].kind == "save"
                and work.chat_id not in self.alone)

    def _together(self, ready: deque[_ChatWork]) -> list[_ChatWork]:
        """Chats from the first ``SAVES_LOOK`` of ``ready`` whose whole remaining work is
        one save batch, as many as one request of several chats may carry (none unless at
        least two): taken out of ``ready``, the others left in their order. Only for a
        backend listing ``saves``; the look is bounded, so that a long queue of chats that
        cannot go together (a sync of many large chats) costs no more per request."""
        if not self.saves_on or len(ready) < 2:
            return []
        max_n = self.caps.max_batch_messages
        max_bytes = int(self.caps.max_body_bytes * SAVES_HEADROOM)
        look = [ready.popleft() for _ in range(min(SAVES_LOOK, len(ready)))]
        take: list[_ChatWork] = []
        rest: list[_ChatWork] = []
        messages = size = 0
        for work in look:
            ref = work.queue[0] if self._joins(work) else None
            if (ref is None or len(take) >= max_n or messages + ref.messages > max_n
                    or size + ref.size + len(work.chat_id) + 16 > max_bytes):
                rest.append(work)
                continue
            take.append(work)
            messages += ref.messages
            size += ref.size + len(work.chat_id) + 16
        if len(take) < 2:
            rest = look
            take = []
        ready.extendleft(reversed(rest))
        return take

    def _lone(self, ready: deque[_ChatWork]) -> bool:
        """Whether ``ready`` is one chat that could go with others (worth waiting for the
        next plan group rather than sending it alone)."""
        return len(ready) == 1 and self._joins(ready[0])

    def _saves_unrouted(self, outcome: Any) -> bool:
        """A 404 or 405 to POST /saves from a backend listing the feature: something on the
        way (a proxy routing known paths only) does not pass the route. The rest of the
        run sends each chat alone."""
        return isinstance(outcome, RefusedError) and isinstance(outcome.details, dict) \
            and outcome.details.get("status") in (404, 405)

    def send_all(self, works: list[_ChatWork], stage: str = "sending",
                 more: Iterator[list[_ChatWork]] | None = None) -> None:
        """Send the queued batches (a few chats at once, each chat's in order); progress
        counts their messages as their answers come.

        ``more``: further work, planned a group at a time (``_Saver.planned``) whenever fewer
        chats are ready than requests may be in flight; each group arrives committed. The
        answers recorded so far are committed before a group is planned, so that the plan
        is not joined to them. Planning stops with the sending (the breaker, the deadline):
        what was not planned stays pending here, outside the outbox.
        """
        ready = deque(w for w in works if w.queue)
        total = sum(ref.messages for w in ready for ref in w.queue)
        started = False
        # A request's chats and batches: one, or several sent together (POST /saves).
        running: dict[Future[Any], list[tuple[_ChatWork, Batch]]] = {}
        # Only writes are sent meanwhile: the remote's retries from here on are theirs.
        retries = int(getattr(self.remote, "retries", 0))
        # Only batches in flight are held in memory; queues hold references.
        workers = max(1, self.options.concurrency)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chatsave-save")
        group = self.store.group_commit()

        def stopping() -> bool:
            return self.breaker.open or self._expired()

        def announce() -> None:
            # The stage begins with the first work to send; its total grows with the plan.
            nonlocal started
            if started:
                self.progress(total=total)
            elif ready:
                self.progress(stage=stage, unit="message", total=total)
                started = True

        def plan_more() -> None:
            nonlocal more, total
            assert more is not None
            group.commit()
            planned = next(more, None)
            if planned is None:
                more = None
                return
            fresh = [w for w in planned if w.queue]
            ready.extend(fresh)
            total += sum(ref.messages for w in fresh for ref in w.queue)
            announce()

        def submit(work: _ChatWork) -> None:
            with group:
                batch = self.view.load(work.queue.popleft())
            send = self.remote.save if batch.kind == "save" else self.remote.delete
            future = pool.submit(send, batch.chat_id, batch.body, batch.key)
            self.write_requests += 1
            running[future] = [(work, batch)]

        def submit_together(chats: list[_ChatWork]) -> None:
            parts: list[tuple[_ChatWork, Batch]] = []
            with group:
                for work in chats:
                    parts.append((work, self.view.load(work.queue.popleft())))
            for work, batch in [p for p in parts if _BASE_REV in p[1].body]:
                parts.remove((work, batch))  # an overwrite goes alone
                work.queue.appendleft(_ref(batch))
                self.alone.add(work.chat_id)
                ready.append(work)
            if len(parts) < 2:
                for work, batch in parts:
                    work.queue.appendleft(_ref(batch))
                    ready.append(work)
                return
            batches = [batch for _, batch in parts]
            future = pool.submit(self.remote.save_many, [b.chat_id for b in batches],
                                 saves_body(batches), saves_key(batches))
            self.write_requests += 1
            running[future] = parts

        split = False
        try:
            announce()
            while True:
                waiting = False  # a chat that could go with others waits for the plan
                while ready and len(running) < workers and not stopping():
                    together = self._together(ready)
                    if together:
                        submit_together(together)
                        continue
                    if more is not None and self._lone(ready):
                        waiting = True
                        break
                    submit(ready.popleft())
                if more is not None and (len(ready) < workers or waiting) and not stopping():
                    plan_more()
                    continue
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                with group:
                    for future in done:
                        parts = running.pop(future)
                        exc = future.exception()
                        outcome = exc if exc is not None else future.result()
                        if len(parts) > 1:
                            ready.extend(self.handle_many(parts, outcome))
                            if isinstance(exc, RefusedError) and \
                                    not self._saves_unrouted(exc):
                                raise exc
                            continue
                        ((work, batch),) = parts
                        # A chat's next batch goes out as soon as this one is known to be
                        # applied, and its answer is recorded while the next one travels
                        # (each chat's batches stay in order: only an answer, not a
                        # failure, a split or a refusal, lets the next one go first).
                        going = bool(work.queue) and _applied(batch, outcome) \
                            and not stopping()
                        if going:
                            submit(work)
                        self.handle(work, batch, outcome)
                        if isinstance(exc, RefusedError):
                            raise exc
                        if work.queue and not work.stopped and not going:
                            ready.append(work)
                        split = split or isinstance(outcome, TooLargeError)
                if not running or split:
                    # A split's halves are new batches: committed before they are sent.
                    group.commit()
                    split = False
        except BaseException as exc:
            # Stop at once: abandon queued work (it stays in the outbox) and cut requests
            # in flight; their batches are re-sent under the same keys next time. What was
            # recorded of answers already received is kept on Ctrl-C (they are facts);
            # after a failure inside the store it is rolled back (and asked for again).
            if isinstance(exc, KeyboardInterrupt | RefusedError):
                group.commit()
            else:
                group.rollback()
            pool.shutdown(wait=False, cancel_futures=True)
            self.remote.close()
            raise
        group.commit()
        pool.shutdown(wait=True)
        self.write_requests += int(getattr(self.remote, "retries", 0)) - retries
