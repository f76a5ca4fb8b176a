"""Dedupe: remove retry copies (the one definition, which diff marks D), carefully.

Copies are found on the union of the chat as this store and the backend hold it. Each
copy goes to the trash here and becomes a tombstone on the backend (through the outbox),
so no sync brings it back; ``trash restore --run`` undoes a run. A copy is removed here
only when the backend holds it, or holds the message it copies, by hash: nothing whose
text the backend has not confirmed is ever removed here. The plan is shown first, a cap
(``--max-delete``, a percentage rounded up) refuses runs that would remove more than
expected, and ``--fuzzy`` only reports near-duplicates and a person's single repeats. A
dry run is never refused: it reports the plan and the refusal the real run would meet.

A chat the backend cannot take at all (ChatRefusedError) is left out alone, before any
request for it: nothing of it is removed, the other chats are deduplicated, it is listed
under ``refused`` and the run ends with exit 9.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from chatsave.duplicates import DEFAULT_WINDOW, DupItem, find_copies
from chatsave.errors import (
    BadAnswerError,
    ChatRefusedError,
    ExitCode,
    GuardError,
    InvalidItemError,
    UsageError,
    would_refuse,
)
from chatsave.normalize import MessageNormalizer
from chatsave.ops.compare import Comparer
from chatsave.ops.diff import chosen_chats
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.ops.save import SaveOptions, _ChatWork, _Saver
from chatsave.remote.base import Remote
from chatsave.store.store import Store

Emit = Callable[..., None]
_SPACE = re.compile(r"\s+")


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class DedupeOptions:
    on: str = "both"  # local | backend | both
    keep: str = "first"  # first | last
    window: timedelta = DEFAULT_WINDOW
    fuzzy: bool = False
    dry_run: bool = False
    max_delete: str | None = None  # "N" or "P%"


@dataclass
class Removal:
    """One copy to remove, and where it lives."""

    chat_id: str
    id: str
    original: str
    content_hash: str
    here: bool = False
    there: bool = False
    remote_rev: int | None = None
    removable_here: bool = False


@dataclass
class _Entry:
    id: str
    fingerprint: str
    created_at: datetime
    order: int
    content_hash: str
    here: bool = False
    there: bool = False
    rev: int | None = None
    text: str = ""
    role: str = ""
    type: str = ""
    evicted: bool = False  # a stub here: gc evicted its body


@dataclass
class DedupePlan:
    removals: list[Removal] = field(default_factory=list)
    fuzzy: list[dict[str, Any]] = field(default_factory=list)
    scope: int = 0  # messages looked at

    def counts(self) -> dict[str, int]:
        return {"copies": len(self.removals),
                "here": sum(r.here and r.removable_here for r in self.removals),
                "on_backend": sum(r.there for r in self.removals),
                "kept_unconfirmed": sum(r.here and not r.removable_here
                                        for r in self.removals)}

    @property
    def removing(self) -> int:
        """Messages the run removes: copies removed here, on the backend, or both."""
        return sum(1 for r in self.removals if r.removable_here or r.there)


def delete_cap(spec: str | None, scope: int) -> int | None:
    """The most a run may remove: ``N``, or ``P%`` of the messages in scope rounded up (a
    cap never rounds down to nothing: 10% of 9 allows 1)."""
    if spec is None:
        return None
    text = spec.strip()
    try:
        if text.endswith("%"):
            percent = Decimal(text[:-1].strip())  # exact: 10% of 30 is 3, not 3.0000001
            if not percent.is_finite() or not 0 <= percent <= 100:
                raise ValueError
            return math.ceil(scope * percent / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except (ValueError, InvalidOperation):
        raise UsageError(f"--max-delete wants N or P% (like 50 or 10%), got {spec!r}") from None


def cap_refusal(options: DedupeOptions, plan: DedupePlan) -> GuardError | None:
    """Why ``--max-delete`` refuses this plan (None: it allows it)."""
    cap = delete_cap(options.max_delete, plan.scope)
    removing = plan.removing
    if cap is None or removing <= cap:
        return None
    return GuardError(
        f"dedupe would remove {removing} message(s), more than --max-delete "
        f"{options.max_delete} allows ({cap} of the {plan.scope} looked at)",
        hint=f"check the plan with --dry-run; if it is right, allow it with --max-delete "
        f"{removing}",
        details={"would_remove": removing, "cap": cap, "scope": plan.scope})


class _Deduper:
    def __init__(self, store: Store, remote: Remote, options: DedupeOptions, emit: Emit,
                 run_id: int | None, progress: Progress = no_progress) -> None:
        if options.on not in ("local", "backend", "both"):
            raise UsageError(f"--on takes local, backend or both, not {options.on!r}")
        if options.keep not in ("first", "last"):
            raise UsageError(f"--keep takes first or last, not {options.keep!r}")
        self.store, self.remote, self.options, self.emit = store, remote, options, emit
        caps = remote.capabilities()
        self.saver = _Saver(store, remote, caps, SaveOptions(dry_run=options.dry_run),
                            emit, run_id, progress)
        self.saver.result.command = "dedupe"
        self.view = self.saver.view
        # Bodies kept: a copy whose body gc evicted here is put back in full before it
        # goes to the trash, so that ``trash restore --run`` can undo the run.
        self.comparer = Comparer(store, remote, caps, keep_bodies=True, window=options.window)
        self.run_id = run_id

    def entries(self, chat_id: str) -> list[_Entry]:
        """The chat as both sides hold it (fetched from the backend), in time order."""
        self.comparer.fetch(chat_id)
        by_id: dict[str, _Entry] = {}
        with self.store.errors():
            for mid, fprint, created, ordinal, chash, content, role, type_, evicted in \
                    self.store.message_entries(chat_id):
                by_id[mid] = _Entry(mid, fprint, datetime.fromisoformat(created), ordinal,
                                    chash, here=True, text=content or "", role=role,
                                    type=type_, evicted=bool(evicted))
            for mid, fprint, created, seq, chash, rev in self.comparer.copy.live_entries(chat_id):
                entry = by_id.get(mid)
                if entry is None:
                    entry = by_id[mid] = _Entry(mid, fprint, datetime.fromisoformat(created),
                                                seq, chash)
                if entry.content_hash == chash:
                    entry.there, entry.rev = True, rev
                    entry.order = seq
        return sorted(by_id.values(), key=lambda e: (e.created_at, e.order))

    def plan_chat(self, chat_id: str, plan: DedupePlan) -> None:
        entries = self.entries(chat_id)
        plan.scope += len(entries)
        copies = find_copies((DupItem(e.id, e.fingerprint, e.created_at, e.order)
                              for e in entries), self.options.window)
        by_id = {e.id: e for e in entries}
        groups: dict[str, list[str]] = {}
        for copy, original in copies.items():
            groups.setdefault(original, [original]).append(copy)
        for members in groups.values():
            ordered = sorted(members, key=lambda m: (by_id[m].created_at, by_id[m].order))
            survivor = ordered[0] if self.options.keep == "first" else ordered[-1]
            for mid in ordered:
                if mid == survivor:
                    continue
                e = by_id[mid]
                removal = Removal(chat_id, mid, survivor, e.content_hash, here=e.here,
                                  there=e.there and self.options.on != "local",
                                  remote_rev=e.rev)
                # Never remove here what the backend does not hold: the copy itself, or
                # the message it copies (same role, type and text) held by its hash.
                held = e.there or by_id[survivor].there
                # A stub goes to the trash only with its body, which the backend must hold.
                removal.removable_here = e.here and held and self.options.on != "backend" \
                    and (not e.evicted or e.there)
                plan.removals.append(removal)
        if self.options.fuzzy:
            self._fuzzy(chat_id, entries, set(copies), plan)

    def _fuzzy(self, chat_id: str, entries: list[_Entry], copies: set[str],
               plan: DedupePlan) -> None:
        """Report (never remove) near-duplicates and single repeats within the window."""
        seen_exact: dict[str, _Entry] = {}
        seen_near: dict[tuple[str, str, str], _Entry] = {}
        for e in entries:
            if e.id in copies:
                continue
            near_key = (e.role, e.type, _SPACE.sub(" ", e.text).strip().lower())
            earlier = seen_exact.get(e.fingerprint)
            if earlier is not None and e.created_at - earlier.created_at <= self.options.window:
                plan.fuzzy.append({"chat_id": chat_id, "id": e.id, "like": earlier.id,
                                   "kind": "repeat"})
            elif e.here and near_key in seen_near and \
                    e.created_at - seen_near[near_key].created_at <= self.options.window:
                plan.fuzzy.append({"chat_id": chat_id, "id": e.id,
                                   "like": seen_near[near_key].id, "kind": "near"})
            seen_exact[e.fingerprint] = e
            if e.here:
                seen_near[near_key] = e

    def apply(self, plan: DedupePlan) -> None:
        by_chat: dict[str, list[Removal]] = {}
        for removal in plan.removals:
            by_chat.setdefault(removal.chat_id, []).append(removal)
        works = []
        for chat_id, removals in by_chat.items():
            with self.store.transaction():
                for r in removals:
                    if r.there:
                        # The backend holds this version: delete it against that revision.
                        self.view.set_states(chat_id, [(r.id, "confirmed", r.remote_rev,
                                                        r.content_hash, None)])
                    if r.removable_here:
                        self._unevict(chat_id, r)
                        self.store.trash_messages(chat_id, [r.id], f"duplicate of {r.original}",
                                                  self.run_id)
                        self.saver.result.counters["removed_here"] += 1
            deletes = [(r.id, int(r.remote_rev or 0), r.content_hash) for r in removals
                       if r.there]
            if deletes:
                work = _ChatWork(chat_id)
                self.saver.plan_deletes(work, deletes, "duplicate (chatsave dedupe)")
                works.append(work)
        self.saver.send_all(works)
        self._follow_backend(plan)

    def _unevict(self, chat_id: str, r: Removal) -> None:
        """Put an evicted copy's body back (from the backend, checked by hash), so the trash
        holds all of it (inside the transaction)."""
        if not self.store.is_evicted(chat_id, r.id):
            return
        body = self.comparer.remote_body(chat_id, r.id)
        try:
            msg = MessageNormalizer(chat_id).normalize(body) if body is not None else None
        except InvalidItemError:
            msg = None
        if msg is None or msg.content_hash != r.content_hash:
            raise BadAnswerError(f"{self.remote.url}: the backend's body of {r.id!r} does not "
                                 "match the hash it lists; nothing removed here")
        self.store.restore_bodies(chat_id, [(r.id, msg)])

    def _follow_backend(self, plan: DedupePlan) -> None:
        """Copies removed on the backend only, not here (``--on backend``, or copies this
        store does not hold): remembered as deleted there by this store while it holds them
        live (now, or after a later import of them), they would read to sync as "restored
        here from the trash" and be restored on the backend. They are remembered as
        confirmed at the revision they were deleted from, as if another client had deleted
        them: nothing is pending for them, and sync removes them here."""
        by_chat: dict[str, list[Removal]] = {}
        for r in plan.removals:
            if r.there and not r.removable_here:
                by_chat.setdefault(r.chat_id, []).append(r)
        for chat_id, removals in by_chat.items():
            states = self.view.states(chat_id)
            rows: list[tuple[str, str, int | None, str | None, str | None]] = [
                (r.id, "confirmed", r.remote_rev, r.content_hash, None) for r in removals
                if states.get(r.id, ("",))[0] == "deleted"]
            if rows:
                with self.store.transaction():
                    self.view.set_states(chat_id, rows)


def dedupe(store: Store, remote: Remote, chat_ids: list[str] | None, options: DedupeOptions,
           *, emit: Emit = _no_emit, run_id: int | None = None,
           confirm: Callable[[DedupePlan], bool] | None = None,
           progress: Progress = no_progress) -> RunResult:
    """Find retry copies in the chosen chats and remove them (see the module docstring);
    ``progress`` counts the chats examined, then the tombstones sent."""
    runner = _Deduper(store, remote, options, emit, run_id, progress)
    result = runner.saver.result
    chats, _, _ = chosen_chats(runner.comparer, store, chat_ids)
    plan = DedupePlan()
    progress(stage="examining", total=len(chats), unit="chat")
    for chat_id in chats:
        progress(1)
        if runner.saver.refuses(chat_id):
            continue
        try:
            runner.plan_chat(chat_id, plan)
        except ChatRefusedError as exc:  # a remote that says so only when asked
            runner.saver.refuse(chat_id, exc)
    counts = plan.counts()
    for removal in plan.removals:
        emit("duplicate", chat_id=removal.chat_id, id=removal.id, original=removal.original,
             content_hash=removal.content_hash, here=removal.here, on_backend=removal.there,
             removable_here=removal.removable_here)
    for item in plan.fuzzy:
        emit("fuzzy", **item)
    result.counters["read"] = plan.scope
    result.counters["duplicates_found"] = len(plan.removals)
    result.details.update(chats=len(chats), plan=counts, fuzzy=len(plan.fuzzy),
                          remote=remote.url, on=options.on, keep=options.keep,
                          dry_run=options.dry_run, would_remove=plan.removing)
    result.report = [plan]
    refusal = cap_refusal(options, plan)
    if refusal is not None and not options.dry_run:
        raise GuardError(f"{refusal.message}; nothing was removed", hint=refusal.hint,
                         details=refusal.details)
    if options.dry_run or not plan.removing:
        # A dry run is never refused: it shows the plan, and what the real run would meet.
        if refusal is not None:
            result.details["would_refuse"] = would_refuse(refusal)
        if plan.removals:
            result.flag(ExitCode.DIFFERENCES)
        if counts["kept_unconfirmed"]:
            result.flag(ExitCode.PARTIAL)
        return result
    if confirm is not None and not confirm(plan):
        raise UsageError("not confirmed; nothing removed")
    runner.apply(plan)
    saver = runner.saver
    c = result.counters
    c["duplicates_removed"] = sum(1 for r in plan.removals if r.removable_here or r.there)
    c["kept_unconfirmed"] = counts["kept_unconfirmed"]
    c["retried"] = int(getattr(remote, "retries", 0))
    c["conflicts"] = c.get("conflicts_now", 0)
    if c["conflicts"]:
        result.flag(ExitCode.CONFLICTS)
    if saver.failures:
        # Tombstones not sent stay in the outbox; the next run re-sends them.
        result.flag(ExitCode.UNAVAILABLE if not c.get("deleted_remote") else ExitCode.PARTIAL)
        if saver.last_error is not None:
            result.details["last_error"] = saver.last_error.message
    if counts["kept_unconfirmed"]:
        result.flag(ExitCode.PARTIAL)
    return result
