"""Sync: make the local store and a backend agree both ways, without loss or resurrection.

Plan, then apply. The plan comes from the comparison (chat digests first, messages only
where they differ) and from what this store remembers of the backend (per-message
revisions), so it knows which side changed:

- only here: pushed through the same outbox as ``save``; only on the backend: pulled;
- deleted on one side: deleted on the other (here: to the trash), never brought back;
  a message restored here from the trash after the backend deleted it is restored there;
- the backend's newer version of a message this store did not change: taken;
- same id, different content, neither side known to be newer: a conflict, both kept,
  until ``--prefer local`` (a save with ``base_rev``: it wins only over the version seen)
  or ``--prefer backend``.

A backend that looks wiped (it lacks chats this store synced with it) or that answers
with another backend id than the one synced at its address gets no deletions and no
overwrites (exit 5); pushing what is only here stays allowed. A dry run is never refused:
it reports the guard the real run would meet (``would_refuse``) and exits 1.

A named chat that neither this store nor the backend has is a usage error (exit 2),
refused before anything is sent.

A chat the backend cannot take at all (ChatRefusedError) is left out alone, before any
request for it: neither compared nor written, its messages pending here, listed under
``refused``; the other chats are synced, and the run ends with exit 9.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from chatsave.duplicates import DEFAULT_WINDOW
from chatsave.errors import (
    ChatRefusedError,
    ExitCode,
    GuardError,
    InvalidItemError,
    RefusedError,
    RemoteError,
    would_refuse,
)
from chatsave.model import EMPTY_DIGEST, Message, chat_digest
from chatsave.normalize import MessageNormalizer
from chatsave.ops.compare import Comparer, RemoteChat
from chatsave.ops.diff import chosen_chats, require_known
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.ops.save import SaveOptions, _ChatWork, _finish, _Saver
from chatsave.ops.sync_decide import (
    Action,
    Base,
    Effect,
    Modes,
    Prefer,
    Remembered,
    Standing,
    decide,
)
from chatsave.ops.sync_plan import ChatPlan
from chatsave.protocol import RemoteMessage
from chatsave.remote.base import Remote
from chatsave.store.backend import BackendView, BatchRef, replaced_backend
from chatsave.store.store import Store, now_text

Emit = Callable[..., None]


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class SyncOptions:
    push: bool = True
    pull: bool = True
    prefer: str | None = None  # "local" | "backend"
    dry_run: bool = False
    concurrency: int = 4
    max_duration: float | None = None
    shard: tuple[int, int] | None = None  # (I, N), I from 1 to N
    window: timedelta = DEFAULT_WINDOW


def in_shard(chat_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether sha256(chat_id) falls in slice I of N (so N hosts split the chats)."""
    if shard is None:
        return True
    index, count = shard
    value = int.from_bytes(hashlib.sha256(chat_id.encode("utf-8")).digest(), "big")
    return (value * count) >> 256 == index - 1


class _Sync:
    def __init__(self, store: Store, remote: Remote, options: SyncOptions, emit: Emit,
                 run_id: int | None, progress: Progress) -> None:
        self.store = store
        self.remote = remote
        self.options = options
        self.emit = emit
        caps = remote.capabilities()
        self.caps = caps
        self.guard_reasons: list[str] = []
        self._check_backend_identity()
        self.saver = _Saver(store, remote, caps,
                            SaveOptions(dry_run=options.dry_run, concurrency=options.concurrency,
                                        max_duration=options.max_duration),
                            emit, run_id, progress)
        self.saver.result.command = "sync"
        self.view: BackendView = self.saver.view
        # A large chat is read by the buckets that differ (docs/protocol.md, "Buckets"),
        # and by those of the messages not confirmed here with their current hash: what
        # sync records of them takes the backend's revision. A message of a bucket not
        # read is then in agreement and already confirmed: nothing to do, as read whole.
        self.comparer = Comparer(store, remote, caps, keep_bodies=True,
                                 window=options.window, by_buckets=True,
                                 also_read=self.view.unsettled_buckets)
        self.run_id = run_id
        self.with_work: set[str] | None = None  # BackendView.chats_with_work, once

    @property
    def guarded(self) -> bool:
        return bool(self.guard_reasons)

    # ------------------------------------------------------------- the guard
    def _check_backend_identity(self) -> None:
        known = replaced_backend(self.store, self.remote.url, self.caps.backend_id)
        if known is not None:
            self.guard_reasons.append(
                f"{self.remote.url} now answers as backend {self.caps.backend_id}, but this "
                f"store was synced with backend {known} at that address")

    def _check_wiped(self, chats: list[str], remote: dict[str, RemoteChat]) -> None:
        synced = self.view.synced_digests()
        lost = [c for c in chats if synced.get(c) not in (None, EMPTY_DIGEST)
                and (remote.get(c) is None or remote[c].digest is None)]
        if lost:
            shown = ", ".join(repr(c) for c in lost[:5]) + (" ..." if len(lost) > 5 else "")
            self.guard_reasons.append(
                f"the backend no longer has {len(lost)} chat(s) this store synced with it "
                f"({shown}): it looks wiped or replaced")

    # --------------------------------------------------------------- planning
    def plan_chat(self, chat_id: str, local_digest: str | None,
                  remote_chat: RemoteChat | None) -> ChatPlan:
        plan = ChatPlan(chat_id, title=remote_chat.title if remote_chat else None,
                        remote_version=remote_chat.version if remote_chat else 0)
        if self.with_work is None:
            self.with_work = self.view.chats_with_work()
        if remote_chat is not None and remote_chat.digest is not None \
                and remote_chat.digest == local_digest and chat_id not in self.with_work:
            # In agreement, and nothing remembered to act on: the comparison would find
            # every message the same and confirmed (a cron run over 10,000 such chats).
            return plan
        _, rows = self.comparer.compare(chat_id, local_digest, remote_chat)
        known = {mid: Remembered.of(st) for mid, st in self.view.states(chat_id).items()}
        trashed = self._trashed(chat_id)
        # Whether a body was evicted matters to --prefer local only.
        evicted = self._evicted(chat_id) if self.options.prefer == Prefer.LOCAL else set()
        modes = Modes(push=self.options.push, pull=self.options.pull,
                      prefer=self.options.prefer, guarded=self.guarded)
        seen: set[str] = set()
        for row in rows:
            seen.add(row.id)
            standing = Standing(Base.of(row.base), row.local_hash, row.remote_hash,
                                row.remote_rev, row.remote_deleted, trashed.get(row.id),
                                row.id in evicted)
            self._apply(plan, row.id, decide(standing, known.get(row.id), modes))
        # Messages the comparison lists no row for (a row decided each of the others).
        if modes.pull and not modes.guarded:  # else not asked: a request
            held = [msg for msg, _ in self.remote.held_only(chat_id) if msg.id not in seen]
            live = self._live(chat_id) if held else {}
            for msg in held:
                standing = Standing(Base.HELD_ONLY, live.get(msg.id), msg.content_hash,
                                    msg.rev, trashed_hash=trashed.get(msg.id))
                self._apply(plan, msg.id, decide(standing, known.get(msg.id), modes), msg)
        for mid, remembered in known.items():
            if mid not in seen:
                standing = Standing(Base.NEITHER, trashed_hash=trashed.get(mid))
                self._apply(plan, mid, decide(standing, remembered, modes))
        return plan

    def _apply(self, plan: ChatPlan, mid: str, action: Action,
               held: RemoteMessage | None = None) -> None:
        """Put one message's action into the chat's plan (and report what it reports)."""
        if action.effect in (Effect.REPUSH, Effect.REPORT_MISSING):
            self.emit("missing_on_backend", chat_id=plan.chat_id, id=mid,
                      content_hash=action.hash)
        plan.add(mid, action, held)

    def _trashed(self, chat_id: str) -> dict[str, str]:
        """id -> the hash its tombstone remembers, of the messages deleted here."""
        return self.store.tombstone_hashes(chat_id)

    def _evicted(self, chat_id: str) -> set[str]:
        """The messages whose bodies gc evicted here (stubs: nothing to write with)."""
        return {mid for mid, _ in self.store.stubs(chat_id)}

    def _live(self, chat_id: str) -> dict[str, str]:
        """id -> hash of the messages live here (stubs included)."""
        return dict(self.store.message_keys(chat_id))

    # ----------------------------------------------------------------- apply
    def resume(self, chat_ids: list[str] | None) -> set[str]:
        """Re-send, under their keys, the batches an interrupted run left open, before
        anything is compared: their answers (replayed or new) are the state the comparison
        must start from. Compared first, a batch whose answer was lost hides a newer
        version written there since (the replayed answer confirms an older revision).

        Returns the chats whose batches are still open (the backend did not answer): no
        other write of theirs goes before them, so they get none in this run."""
        wanted = None if chat_ids is None else set(chat_ids)
        self.view.abandon_stale(wanted)
        by_chat: dict[str, deque[BatchRef]] = {}
        for ref in self.view.open_batches(wanted):
            if in_shard(ref.chat_id, self.options.shard) and \
                    not self.saver.refuses(ref.chat_id):
                by_chat.setdefault(ref.chat_id, deque()).append(ref)
        if not by_chat:
            return set()
        self.saver.send_all([_ChatWork(cid, refs) for cid, refs in by_chat.items()],
                            stage="resending")
        return {ref.chat_id for ref in self.view.open_batches(set(by_chat))}

    def _remote_message(self, chat_id: str, message_id: str, expected_hash: str) -> Message:
        body = self.comparer.remote_body(chat_id, message_id)
        if body is None:
            raise InvalidItemError(f"the backend's message {message_id!r} came without a body")
        msg = MessageNormalizer(chat_id).normalize(body)
        if msg.content_hash != expected_hash:
            raise InvalidItemError(f"the backend's message {message_id!r} does not match the "
                                   f"content hash it lists ({expected_hash[:12]})")
        return msg

    def apply_local(self, plan: ChatPlan) -> None:
        """Everything this chat's plan changes here, in one transaction."""
        if not plan.records:
            return  # a chat in agreement: no transaction of its own
        chat_id = plan.chat_id
        with self.store.transaction():
            if plan.pull or plan.take_backend or plan.keep:
                self.store.upsert_chat(chat_id, plan.title)
            confirmed: list[tuple[str, str, int | None, str | None, str | None]] = [
                (mid, "confirmed", rev, chash, None) for mid, rev, chash in plan.confirm]
            pulled = []
            for mid in plan.pull:
                try:
                    msg = self._remote_message(chat_id, mid, self._hash(chat_id, mid))
                except InvalidItemError as exc:
                    self.emit("error", chat_id=chat_id, id=mid,
                              reason=f"cannot pull: {exc.message}")
                    self.saver.result.counters["pull_failed"] += 1
                    continue
                pulled.append(msg)
            outcomes = self.store.add_messages(chat_id, pulled, self.run_id)
            for msg, (outcome, _) in zip(pulled, outcomes, strict=True):
                if outcome in ("added", "unchanged"):
                    rev = self._rev(chat_id, msg.id)
                    confirmed.append((msg.id, "confirmed", rev, msg.content_hash, None))
                    self.saver.result.counters["pulled"] += outcome == "added"
            kept = []
            for held in plan.keep:
                try:
                    kept.append(MessageNormalizer(chat_id).normalize(held.model_dump(
                        exclude={"seq", "rev", "content_hash", "deleted"}, exclude_none=True)))
                except InvalidItemError as exc:
                    self.emit("error", chat_id=chat_id, id=held.id,
                              reason=f"cannot keep a copy: {exc.message}")
            for msg, (outcome, _) in zip(kept, self.store.add_messages(chat_id, kept,
                                                                       self.run_id),
                                         strict=True):
                if outcome == "added":
                    self.saver.result.counters["kept_from_backend"] += 1
                    self.emit("kept_from_backend", chat_id=chat_id, id=msg.id,
                              content_hash=msg.content_hash)
            for mid, rev, chash in plan.take_backend:
                try:
                    msg = self._remote_message(chat_id, mid, chash)
                except InvalidItemError as exc:
                    self.emit("error", chat_id=chat_id, id=mid,
                              reason=f"cannot take the backend's version: {exc.message}")
                    continue
                self.store.replace_message(msg, self.run_id, "replaced by the backend's version")
                confirmed.append((mid, "confirmed", rev, chash, None))
                self.saver.result.counters["taken_from_backend"] += 1
            for mid, rev, chash in plan.delete_local:
                self.store.trash_messages(chat_id, [mid], "deleted on the backend", self.run_id)
                confirmed.append((mid, "deleted", rev, chash, None))
                self.saver.result.counters["deleted_here"] += 1
            for mid, chash in plan.deleted_both:
                confirmed.append((mid, "deleted", None, chash, "deleted on the backend too"))
            for mid, rev, chash in plan.delete_remote:
                # The backend holds the version deleted here: delete it against that rev.
                confirmed.append((mid, "confirmed", rev, chash, None))
            for mid, rev in plan.overwrite_remote:
                confirmed.append((mid, "conflict", rev, None, "overwriting with --prefer local"))
            for mid, rev, chash in plan.delete_contested:
                confirmed.append((mid, "conflict", rev, chash, "deleting with --prefer local"))
            for conflict in plan.conflicts:
                confirmed.append((conflict["id"], "conflict", conflict["rev"],
                                  conflict["remote_hash"], conflict["reason"]))
            self.view.forget(chat_id, plan.repush + plan.settled)
            self.view.set_states(chat_id, confirmed)

    def _fetched(self, chat_id: str, message_id: str) -> tuple[int, str]:
        """(rev, hash) of a message of the backend's, as the comparison fetched it."""
        row = self.comparer.copy.entry(chat_id, message_id)
        assert row is not None  # the comparison listed it
        return int(row[1]), str(row[2])

    def _rev(self, chat_id: str, message_id: str) -> int:
        return self._fetched(chat_id, message_id)[0]

    def _hash(self, chat_id: str, message_id: str) -> str:
        return self._fetched(chat_id, message_id)[1]

    def queue_writes(self, plan: ChatPlan) -> Any:
        sends = (plan.push or plan.repush or plan.delete_remote
                 or plan.overwrite_remote or plan.restore_remote or plan.delete_contested
                 or ((plan.records or plan.chat_id in (self.with_work or ()))
                     and self.view.pending_deletes(plan.chat_id)))  # deleted there too
        if not self.options.push or not sends:
            return None  # nothing to send: a chat in agreement costs no outbox work
        work = self.saver.plan_chat(plan.chat_id, plan.title, [], restores=False)
        overwrites = []
        for mid, base_rev in plan.overwrite_remote + plan.restore_remote:
            msg = self.store.get_message(plan.chat_id, mid)
            if isinstance(msg, Message):
                overwrites.append((msg, base_rev))
        if overwrites:
            self.saver.plan_overwrites(work, plan.title, overwrites)
        if plan.delete_contested:
            self.saver.plan_deletes(work, plan.delete_contested,
                                    "deleted with chatsave (--prefer local)")
        return work


def sync(store: Store, remote: Remote, chat_ids: list[str] | None, options: SyncOptions, *,
         emit: Emit = _no_emit, run_id: int | None = None,
         progress: Progress = no_progress) -> RunResult:
    """Reconcile the chosen chats (None: every chat known here or on the backend).
    ``progress`` counts the chats compared, then the messages sent (chatsave.ops.progress)."""
    runner = _Sync(store, remote, options, emit, run_id, progress)
    result = runner.saver.result
    if chat_ids is not None:
        require_known(runner.comparer, store, chat_ids)  # before anything is re-sent
    blocked = runner.resume(chat_ids) if options.push and not options.dry_run else set()
    chats, local, remote_chats = chosen_chats(runner.comparer, store, chat_ids)
    chats = [c for c in chats if in_shard(c, options.shard)]
    runner._check_wiped(chats, remote_chats)
    for reason in runner.guard_reasons:
        emit("guard", reason=reason)
    plans: list[ChatPlan] = []
    progress(stage="comparing", total=len(chats), unit="chat")
    for chat_id in chats:
        progress(1)
        if runner.saver.refuses(chat_id):
            continue
        try:
            plan = runner.plan_chat(chat_id, local.get(chat_id), remote_chats.get(chat_id))
        except ChatRefusedError as exc:
            runner.saver.refuse(chat_id, exc)
            continue
        except RefusedError:
            raise
        except RemoteError as exc:
            emit("error", chat_id=chat_id, reason=exc.message)
            result.flag(exc.exit_code)
            result.error = exc
            continue
        plans.append(plan)
        for conflict in plan.conflicts:
            emit("conflict", chat_id=chat_id, **conflict)
        if plan.changes or plan.conflicts or plan.guarded:
            emit("chat", chat_id=chat_id, dry_run=options.dry_run, **plan.actions())
    totals = dict.fromkeys(ChatPlan("").actions(), 0)
    for plan in plans:
        for key, value in plan.actions().items():
            totals[key] += value
    result.details.update(chats=len(chats), plan=totals, remote=remote.url,
                          backend_id=runner.caps.backend_id, requests=runner.comparer.requests + 1)
    if runner.guard_reasons:
        result.details["guard"] = runner.guard_reasons
        if options.dry_run:
            # Not refused itself: it says what the real run would meet.
            result.details["would_refuse"] = would_refuse(GuardError(
                "; ".join(runner.guard_reasons),
                hint="the real run pushes what is only here, makes no deletions or "
                "overwrites, and exits 5; check that the backend is the one this store "
                "synced with"))
            result.flag(ExitCode.DIFFERENCES)
        else:
            result.flag(ExitCode.GUARD)
    if options.dry_run:
        result.counters["pending_push"] = totals["push"]
        result.counters["pending_pull"] = totals["pull"]
        result.counters["conflicts"] = totals["conflicts"]
        result.report = [(p.chat_id, c["id"]) for p in plans for c in p.conflicts]
        if any(p.changes for p in plans):
            result.flag(ExitCode.DIFFERENCES)
        if totals["conflicts"]:
            result.flag(ExitCode.CONFLICTS)
        return result
    for plan in plans:
        runner.apply_local(plan)
    # Open batches were re-sent by resume(); those still open block their chats.
    works = [w for w in (runner.queue_writes(p) for p in plans if p.chat_id not in blocked)
             if w is not None]
    runner.saver.send_all(works)
    done = [*(p.chat_id for p in plans), *runner.saver.refused]
    per_chat = runner.view.chat_counts(done)  # one pass over the store, for both
    final = _finish(runner.saver, done, per_chat)
    final.counters["pending_pull"] = 0
    _remember(runner, plans, local, per_chat)
    if final.counters["conflicts"]:
        final.report = conflicts_left(store, runner.caps.backend_id,
                                      {p.chat_id for p in plans})
    return final


def conflicts_left(store: Store, backend_id: str, chats: set[str]) -> list[tuple[str, str]]:
    """(chat, message) of every conflict a backend has with the store in ``chats``:
    messages held here (live or deleted) in conflict, in chat and id order."""
    return BackendView(store, backend_id).conflicts(chats)


def _remember(runner: _Sync, plans: list[ChatPlan], local: dict[str, str],
              per_chat: dict[str, dict[str, int]]) -> None:
    """Record, per chat in agreement now (``per_chat``: their ``chat_counts`` after the
    run's writes), the digest and version agreed on."""
    agreed = runner.view.agreements()
    now = now_text()
    rows = []
    for plan in plans:
        counts = per_chat.get(plan.chat_id, {"pending_push": 0, "conflicts": 0})
        if counts["pending_push"] or counts["conflicts"] or plan.conflicts:
            continue
        # A chat whose messages here did not change keeps the digest computed at the start.
        digest = local.get(plan.chat_id) if not plan.changes_here else None
        if digest is None:
            digest = chat_digest(runner.store.message_keys(plan.chat_id))
        if (plan.chat_id, plan.remote_version, digest) in agreed:
            continue  # agreed as before: not rewritten (a cron run over 10,000 chats)
        rows.append((plan.chat_id, plan.remote_version, digest))
    runner.view.record_agreements(rows, now, runner.saver.result.exit_code == ExitCode.OK)
