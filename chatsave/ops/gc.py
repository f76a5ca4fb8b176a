"""gc: bring the store under its budget without ever losing anything the backend has not confirmed.

First what is safe by nature (answered outbox records, trash past its retention, old run
records), then the bodies of messages the current backend confirmed by their hash,
oldest chats first, each kept as a stub (id, hash, time-free fingerprint, size) so diff
and dedupe still know it and ``fetch`` brings it back; then the file is compacted.
Pending, conflicting and rejected messages, and those confirmed only by another backend,
are never evicted; neither is anything while the backend cannot be asked (exit 8) or
looks wiped (exit 5). A dry run is never refused by these guards: it reports the plan and
the refusal the real run would meet. Nor is anything of a chat the backend cannot take at all
(ChatRefusedError): nothing of it can be confirmed there, nor fetched back; it is never
asked about, listed under ``refused``, and the run ends with exit 9.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from chatsave.errors import ChatRefusedError, ExitCode, GuardError, UsageError, would_refuse
from chatsave.model import format_time
from chatsave.ops.compare import Comparer
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.remote.base import Remote
from chatsave.store.backend import BackendView, replaced_backend
from chatsave.store.store import Store

Emit = Callable[..., None]
DEFAULT_BUDGET = 1_000_000_000
TRASH_RETENTION = timedelta(days=30)
RUNS_RETENTION = timedelta(days=90)
_STUB_BYTES = 96


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class GcOptions:
    budget: int = DEFAULT_BUDGET
    keep_within: timedelta | None = None
    keep_last: int | None = None
    dry_run: bool = False
    trash_retention: timedelta = TRASH_RETENTION
    runs_retention: timedelta = RUNS_RETENTION


@dataclass
class GcPlan:
    """What gc removes; the dry run prints it, the real run applies exactly it."""

    used_bytes: int = 0
    outbox: list[int] = field(default_factory=list)
    trash: list[int] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)
    evict: list[tuple[str, str]] = field(default_factory=list)
    estimate_freed: int = 0
    over_budget: bool = False
    nothing_safe: bool = False
    identity_only: bool = False
    # Chats the backend cannot take: none of their bodies is evicted.
    refused: dict[str, ChatRefusedError] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"outbox_records": len(self.outbox), "trash_entries": len(self.trash),
                "run_records": len(self.runs), "bodies_evicted": len(self.evict)}


def used_bytes(store: Store) -> int:
    """Bytes the store's pages hold (what compaction would leave), plus its WAL."""
    return store.used_bytes()


def _ago(delta: timedelta) -> str:
    return format_time(datetime.now(UTC) - delta)


class _Gc:
    def __init__(self, store: Store, remote: Remote | None, options: GcOptions,
                 emit: Emit, progress: Progress = no_progress) -> None:
        if options.keep_last is not None and options.keep_last < 0:
            raise GuardError("--keep-last must be 0 or more")
        self.store, self.remote, self.options, self.emit = store, remote, options, emit
        self.progress = progress
        self.refused: dict[str, ChatRefusedError] = {}
        # The guard a dry run met (the real run raises it instead).
        self.refusal: GuardError | None = None
        if options.budget <= 0:
            self._refuse(GuardError("a budget of 0 would evict every body; refusing",
                                    hint="give a budget the store can live in, such as 50MB"))

    def _refuse(self, guard: GuardError) -> None:
        """A safety guard: the real run stops here; a dry run notes it and plans on."""
        if not self.options.dry_run:
            raise guard
        self.refusal = self.refusal or guard

    def plan(self, current_run: int | None) -> GcPlan:
        store, options = self.store, self.options
        plan = GcPlan(used_bytes=used_bytes(store))
        freed = 0
        for batch_id, size in store.answered_batches():
            plan.outbox.append(batch_id)
            freed += int(size)
        for trash_id, size in store.trash_before(_ago(options.trash_retention)):
            plan.trash.append(trash_id)
            freed += int(size)
        for run_id, size in store.runs_before(_ago(options.runs_retention), current_run):
            plan.runs.append(run_id)
            freed += int(size)
        need = plan.used_bytes - freed - options.budget
        plan.over_budget = need > 0
        if need > 0 and options.budget > 0:  # no budget is no plan to evict (a dry run)
            freed += self._plan_evictions(plan, need)
            plan.nothing_safe = not plan.evict
        plan.refused = dict(self.refused)
        plan.estimate_freed = freed
        return plan

    def _plan_evictions(self, plan: GcPlan, need: int) -> int:
        if self.remote is None:
            raise UsageError("gc must evict message bodies and needs the backend to confirm "
                             "them by hash", hint="pass --remote (the backend you save to)")
        caps = self.remote.capabilities()
        previous = replaced_backend(self.store, self.remote.url, caps.backend_id)
        if previous is not None:
            self._refuse(GuardError(
                f"{self.remote.url} now answers as backend {caps.backend_id}, but this store "
                f"was synced with backend {previous} there; nothing is evicted",
                hint="chatsave sync --all with the new backend first; then gc again"))
        if "identity_hashes" in caps.features:
            # Such a backend (AutoBot) confirms a message by id, role and text, not by its
            # exact content hash: a body fetched back could differ. Nothing is evicted.
            plan.identity_only = True
            return 0
        view = BackendView(self.store, caps.backend_id)
        comparer = Comparer(self.store, self.remote, caps)
        self._guard_wiped(view, comparer)
        # Chats with bodies, oldest (by their newest message) first.
        chats = [c for c in self.store.chats_with_bodies() if not self._refuses(c)]
        newest_allowed = _ago(self.options.keep_within) if self.options.keep_within else None
        freed = 0
        local = comparer.local_digests(chats)
        remote = comparer.remote_chats(chats) if chats else {}
        self.progress(stage="checking", total=len(chats), unit="chat")
        for chat_id in chats:
            if freed >= need:
                break
            self.progress(1)
            try:
                held = self._held_by_backend(chat_id, local.get(chat_id), remote.get(chat_id),
                                             comparer)
            except ChatRefusedError as exc:  # a remote that says so only when asked
                self.refused[chat_id] = exc
                continue
            keep = self._kept(chat_id)
            for mid, size, chash, created in view.evictable(chat_id):
                if freed >= need:
                    break
                if mid in keep or (newest_allowed and created >= newest_allowed):
                    continue
                if held is not None and held.get(mid) != chash:
                    continue
                plan.evict.append((chat_id, mid))
                freed += max(0, int(size) - _STUB_BYTES)
        return freed

    def _refuses(self, chat_id: str) -> bool:
        """Whether the backend cannot take this chat at all (recorded; then it is never
        asked about, and none of its bodies is evicted)."""
        if chat_id not in self.refused:
            refused = self.remote.refusal(chat_id) if self.remote is not None else None
            if refused is None:
                return False
            self.refused[chat_id] = refused
        return True

    def _kept(self, chat_id: str) -> set[str]:
        keep_last = self.options.keep_last
        if not keep_last:
            return set()
        return self.store.newest_ids(chat_id, keep_last)

    def _held_by_backend(self, chat_id: str, local_digest: str | None, remote: Any,
                         comparer: Comparer) -> dict[str, str] | None:
        """None when the chat's digests agree (the backend holds all of it by hash); else
        id -> hash of what the backend holds live, fetched now."""
        if remote is not None and remote.digest is not None and remote.digest == local_digest:
            return None
        if remote is None or remote.digest is None:
            return {}
        comparer.fetch(chat_id)
        return comparer.copy.live_hashes(chat_id)

    def _guard_wiped(self, view: BackendView, comparer: Comparer) -> None:
        # A chat synced while it was empty may be unknown to the backend (sync's own
        # guard ignores those too): only chats that had messages count.
        synced = [c for c in view.synced_chats() if not self._refuses(c)]
        if not synced:
            return
        remote = comparer.remote_chats(synced)
        lost = [c for c in synced if remote.get(c) is None or remote[c].digest is None]
        if lost:
            self._refuse(GuardError(
                f"the backend no longer has {len(lost)} chat(s) this store synced with it; "
                "it looks wiped, so nothing is evicted",
                hint="chatsave sync --all pushes everything back; then gc again"))

    def apply(self, plan: GcPlan) -> None:
        self.store.drop_and_evict(plan.outbox, plan.trash, plan.runs, plan.evict)
        self.progress(stage="compacting", total=None)
        self.store.compact()


def gc(store: Store, remote: Remote | None, options: GcOptions, *, emit: Emit = _no_emit,
       run_id: int | None = None, progress: Progress = no_progress) -> RunResult:
    """Plan, then (unless a dry run) apply and compact. Returns bytes before, after, freed.
    ``progress`` counts the chats checked for bodies to evict, then shows the compaction."""
    runner = _Gc(store, remote, options, emit, progress)
    result = RunResult("gc")
    before = store.file_size()
    plan = runner.plan(run_id)
    result.report = [plan]
    result.details.update(budget=options.budget, bytes_before=before, dry_run=options.dry_run,
                          plan=plan.counts(), estimate_freed=plan.estimate_freed)
    for chat_id, mid in plan.evict:
        emit("evict", chat_id=chat_id, id=mid)
    for chat_id, refused in plan.refused.items():
        emit("refused", **result.refuse(chat_id, refused))
    if plan.identity_only:
        result.details["note"] = ("this backend confirms messages by id, role and text, not "
                                  "by their exact content, so no body is evicted")
    elif plan.nothing_safe:
        result.details["note"] = ("over budget, but nothing is safe to evict: every body left "
                                  "is pending, in conflict, rejected, kept by policy, or not "
                                  "confirmed by this backend")
    if options.dry_run:
        result.details["bytes_after"] = before
        if runner.refusal is not None:
            result.details["would_refuse"] = would_refuse(runner.refusal)
        if plan.over_budget or any(plan.counts().values()) or runner.refusal is not None:
            result.flag(ExitCode.DIFFERENCES)
        return result
    runner.apply(plan)
    after = store.file_size()
    result.details["bytes_after"] = after
    result.counters["bytes_freed"] = max(0, before - after)
    result.counters["evicted"] = len(plan.evict)
    if after > options.budget:
        result.flag(ExitCode.DIFFERENCES)
    return result
