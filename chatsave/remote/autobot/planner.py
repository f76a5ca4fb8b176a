"""The AutoBot save planner: what a save writes, and what its answer says (docs/autobot.md).

Pure functions, data in and plan out; no I/O. The remote adapter
(chatsave.remote.autobot.base) reads the chat, calls ``plan_save``, writes ``Plan.payload``
when ``Plan.write`` names anything, reads the chat back and calls ``answer_save``.

- ``plan_save`` merges the batch into the chat's *full* stored list: every stored message
  goes back exactly as stored (an overwrite with a matching ``base_rev`` in AutoBot's
  shape), each new one in AutoBot's own time form. It predicts with AutoBot's model
  (``Target.predict``: chatsave.remote.autobot.rules) what AutoBot will keep and in which
  order, and leaves out any message AutoBot would drop, show out of order, or whose saving
  would make it drop another, and any whose local time a clock change makes ambiguous.
  A chat where any write through AutoBot's merge would lose what it shows now, or that
  AutoBot could not load, is refused (AutobotGuard, exit 5).
- ``answer_save`` compares the chat read back with the plan, per message: saved or
  unchanged (with the hash the client sent: the identity rule), conflict (same id, other
  text), or rejected with the reason. The prediction is a precaution, never the proof.
- ``in_time_order`` and ``simulate`` are also what ``doctor --repair`` orders and checks a
  rewritten file with (chatsave.remote.autobot.directory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, NamedTuple

from chatsave.model import Message
from chatsave.protocol import ItemAck, ItemConflict, ItemRejected, SaveAnswer
from chatsave.remote.autobot import rules
from chatsave.remote.autobot.shapes import (
    REV_MASK,
    AutobotGuard,
    ChatState,
    Item,
    chat_where,
    clock_problem,
    repair_hint,
    to_autobot,
)

# What AutoBot will show after a payload (its records in time order) is written to a chat.
Predict = Callable[[ChatState, list[rules.Rec]], rules.Outcome]


class Entry(NamedTuple):
    """One message of a payload being planned."""

    when: datetime | None  # its time; None: right after the entry before it
    pos: int  # its place in the list it comes from: ties of equal times keep it
    raw: dict[str, Any]  # as it will be written
    id: str | None  # its id; None: a stored message chatsave cannot read


class Simulation(NamedTuple):
    """What AutoBot's model says of a payload."""

    outcome: rules.Outcome
    payload: list[rules.Rec]  # the payload's records, in time order


class Expected(NamedTuple):
    """What a save means to find under an id when it reads the chat back."""

    kind: str  # "saved" or "unchanged"
    msg: Message


@dataclass(frozen=True)
class Target:
    """What the planner needs to know of the remote it plans for."""

    url: str
    tz: tzinfo  # the AutoBot server's time zone
    max_messages: int  # how many messages AutoBot keeps per chat
    writes_merge: bool  # whether a write goes through AutoBot's merge (AutobotBase)
    predict: Predict


@dataclass
class Wanted:
    """A message of a save request: the message, the hash the client sent, its base_rev."""

    msg: Message
    sent: str
    base_rev: int | None


@dataclass
class Plan:
    payload: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # message ids in the intended order
    write: set[str] = field(default_factory=set)  # ids written (new or overwritten)
    sent: dict[str, Message] = field(default_factory=dict)  # their messages
    unchanged: dict[str, Wanted] = field(default_factory=dict)
    conflicts: list[ItemConflict] = field(default_factory=list)
    rejected: list[ItemRejected] = field(default_factory=list)
    predicted: dict[str, str] = field(default_factory=dict)  # id -> why AutoBot drops it


def plan_save(target: Target, state: ChatState, wanted: list[Wanted]) -> Plan:
    """What saving ``wanted`` into the chat ``state`` writes (see the module docstring)."""
    plan = Plan()
    stored = {i.msg.id: i for i in state.items if i.msg is not None}
    # Ids of stored messages chatsave cannot read: writing one of those ids would make
    # AutoBot replace a message nobody has seen.
    unread = {str(rules.raw_id(i.raw)) for i in state.items
              if i.msg is None and rules.raw_id(i.raw)}
    overwrite: dict[str, Message] = {}
    new: list[Wanted] = []
    for w in wanted:
        cur = stored.get(w.msg.id)
        if cur is None and w.msg.id in unread:
            plan.conflicts.append(ItemConflict(
                id=w.msg.id, reason="the backend holds a message under this id that "
                "chatsave cannot read", rev=0, content_hash=""))
            continue
        if (cur is None or w.base_rev is not None) and \
                (problem := clock_problem(w.msg.created_at, target.tz)) is not None:
            plan.rejected.append(ItemRejected(id=w.msg.id, reason=problem))
            continue
        if cur is None:
            new.append(w)  # with a base_rev too: nothing there to lose
            continue
        assert cur.msg is not None
        same = cur.msg.role == w.msg.role and cur.msg.content == w.msg.content
        if w.base_rev is not None:
            if (state.rev(cur) & REV_MASK) != (w.base_rev & REV_MASK):
                plan.conflicts.append(ItemConflict(
                    id=w.msg.id, reason="stale_base_rev", rev=state.rev(cur),
                    content_hash=cur.msg.content_hash))
            else:
                overwrite[w.msg.id] = w.msg
                plan.write.add(w.msg.id)
                plan.sent[w.msg.id] = w.msg
        elif not same:
            plan.conflicts.append(ItemConflict(
                id=w.msg.id, reason="different_content", rev=state.rev(cur),
                content_hash=cur.msg.content_hash))
        else:
            plan.unchanged[w.msg.id] = w

    def stored_raw(item: Item) -> dict[str, Any]:
        # A message chatsave does not change goes back exactly as stored.
        if item.msg is not None and item.msg.id in overwrite:
            return to_autobot(overwrite[item.msg.id], target.tz)
        return item.raw

    base = stored_entries(state.items, stored_raw)
    protected = _check_base(target, state, base)
    new.sort(key=lambda w: w.msg.created_at)
    accepted = _accept(target, state, base, new, plan, protected)
    entries = base + [Entry(w.msg.created_at, len(base) + n, to_autobot(w.msg, target.tz),
                            w.msg.id)
                      for n, w in enumerate(accepted)]
    entries = in_time_order(entries)
    plan.payload = [e.raw for e in entries]
    plan.order = [e.id for e in entries if e.id is not None]
    for w in accepted:
        plan.write.add(w.msg.id)
        plan.sent[w.msg.id] = w.msg
    return plan


def stored_entries(items: Iterable[Item], raw_of: Callable[[Item], dict[str, Any]]
                   ) -> list[Entry]:
    """A chat's stored messages as entries, in stored order, each written as ``raw_of``
    says; one chatsave cannot read (no time) stays right after the message before it."""
    entries: list[Entry] = []
    last: datetime | None = None
    for n, item in enumerate(items):
        when = item.msg.created_at if item.msg is not None else last
        last = when or last
        entries.append(Entry(when, n, raw_of(item), item.id))
    return entries


def simulate(predict: Predict, state: ChatState, entries: list[Entry]) -> Simulation:
    """What AutoBot will show of the chat ``state`` once ``entries`` are written to it."""
    ordered = in_time_order(entries)
    payload = rules.recs([e.raw for e in ordered],
                         [e.id or f"#{n}" for n, e in enumerate(ordered)])
    return Simulation(predict(state, payload), payload)


def _check_base(target: Target, state: ChatState, base: list[Entry]) -> set[str]:
    """Refuse a chat where any write would make AutoBot lose what it shows now (or be
    unable to load it); return the messages AutoBot keeps after such a write."""
    if not base:
        return set()
    outcome, payload = simulate(target.predict, state, base)
    if outcome.failed:
        raise AutobotGuard(
            f"{chat_where(target.url, state.original)}: AutoBot cannot load this chat "
            f"({outcome.failed}): its stored times mix forms its loader cannot compare, "
            "and chatsave writes AutoBot's messages back only as they are; nothing "
            "written",
            hint=repair_hint(state.chat_id))
    shown = {i.msg.id for i in state.visible if i.msg is not None}
    kept = {p.label for p in payload if p.key in outcome.kept_keys()}
    lost = [p for p in payload if p.label in shown and p.label not in kept]
    if lost and target.writes_merge:
        reasons = "; ".join(f"{p.label}: {outcome.dropped[p.key][1]}" for p in lost[:3])
        raise AutobotGuard(
            f"{chat_where(target.url, state.original)}: any save through AutoBot's API makes "
            f"it drop {len(lost)} message(s) it holds now ({reasons}); chatsave refused to "
            "save into this chat (nothing written; the messages stay here)",
            hint="on the AutoBot server, --remote autobot-dir:PATH writes the chat file "
            "without AutoBot's merge")
    return kept


def _accept(target: Target, state: ChatState, base: list[Entry], new: list[Wanted],
            plan: Plan, shown: set[str]) -> list[Wanted]:
    """The new messages AutoBot will keep without dropping anything else it keeps.

    All at once when that is fine (the usual case); else in chunks, and one by one
    only inside a chunk that is not, so a large batch costs few simulations.
    """
    if not new:
        return []
    room = max(0, target.max_messages - len(base))
    for w in new[room:]:
        plan.rejected.append(ItemRejected(id=w.msg.id, reason=(
            f"not sent: AutoBot keeps at most {target.max_messages} messages per chat and "
            "would drop the oldest to make room")))
    new = new[:room]
    raws = {w.msg.id: to_autobot(w.msg, target.tz) for w in new}

    def trial(candidates: list[Wanted]) -> tuple[rules.Outcome, dict[str, rules.Rec]]:
        entries = base + [Entry(w.msg.created_at, len(base) + n, raws[w.msg.id], w.msg.id)
                          for n, w in enumerate(candidates)]
        outcome, payload = simulate(target.predict, state, entries)
        return outcome, {p.label: p for p in payload}  # in time order

    def misplaced(outcome: rules.Outcome, by_label: dict[str, rules.Rec],
                  candidates: list[Wanted]) -> dict[str, str]:
        return _misplaced(list(by_label), [r.label for r in outcome.kept],
                          {w.msg.id for w in candidates})

    def fine(outcome: rules.Outcome, by_label: dict[str, rules.Rec],
             candidates: list[Wanted]) -> bool:
        kept = outcome.kept_keys()
        return not outcome.failed and all(
            by_label[label].key in kept for label in shown | {w.msg.id for w in candidates}
            if label in by_label) and not misplaced(outcome, by_label, candidates)

    accepted: list[Wanted] = []
    step = len(new)
    i = 0
    while i < len(new):
        chunk = new[i:i + step]
        outcome, by_label = trial([*accepted, *chunk])
        if fine(outcome, by_label, [*accepted, *chunk]):
            accepted.extend(chunk)
            i += len(chunk)
            continue
        if len(chunk) > 1:
            step = max(1, min(64, len(chunk) // 8))
            if step < len(chunk):
                continue
            step = 1
            continue
        w = chunk[0]
        i += 1
        step = min(64, len(new))  # past the trouble: big steps again
        kept = outcome.kept_keys()
        if outcome.failed:
            why = (f"saving it would leave AutoBot unable to load the chat "
                   f"({outcome.failed})")
        elif by_label[w.msg.id].key not in kept:
            why = outcome.dropped.get(by_label[w.msg.id].key, (None, "AutoBot would "
                                                             "drop it"))[1]
        elif misplaced(outcome, by_label, [w]):
            why = ("AutoBot would show it out of order: it sorts a chat on the timestamp "
                   "text, and the times stored in this chat are not all in one form (the "
                   "web client's 2026-03-01T10:00:00.000Z sorts after AutoBot's "
                   "2026-03-01 10:00:00 of the same day); chatsave doctor names them, and "
                   "on the AutoBot server chatsave doctor --repair with autobot-dir:PATH "
                   "rewrites them in one form")
        else:
            victims = [label for label in shown | {a.msg.id for a in accepted}
                       if label in by_label and by_label[label].key not in kept]
            why = (f"saving it would make AutoBot drop {', '.join(victims[:3])} "
                   f"({outcome.dropped[by_label[victims[0]].key][1]})")
        plan.predicted[w.msg.id] = why
        plan.rejected.append(ItemRejected(id=w.msg.id, reason=f"not sent: {why}"))
    return accepted


def answer_save(target: Target, before: ChatState, after: ChatState, plan: Plan
                ) -> SaveAnswer:
    """The answer to a save planned as ``plan`` on ``before``, from the chat read back
    (``after``; ``before`` again when nothing was written)."""
    answer = SaveAnswer(chat_id=before.chat_id, version=after.version,
                        conflicts=plan.conflicts, rejected=plan.rejected)
    shown = {i.msg.id: i for i in after.visible if i.msg is not None}
    expected: dict[str, Expected] = {}
    for mid, w in plan.unchanged.items():
        expected[mid] = Expected("unchanged", w.msg)
    for mid in plan.write:
        expected[mid] = Expected("saved", plan.sent[mid])
    present = []
    for mid, (_kind, msg) in expected.items():
        got = shown.get(mid)
        if got is None or got.msg is None:
            answer.rejected.append(ItemRejected(id=mid, reason=_why_missing(
                target, mid, before, after, plan)))
            continue
        if got.msg.role != msg.role or got.msg.content != msg.content:
            answer.rejected.append(ItemRejected(
                id=mid, reason="AutoBot holds other text under this id after the save"))
            continue
        present.append(mid)
    misplaced = _misplaced(plan.order, [i.msg.id for i in after.visible
                                        if i.msg is not None], set(present))
    for mid in present:
        kind, msg = expected[mid]
        if mid in misplaced:
            answer.rejected.append(ItemRejected(id=mid, reason=misplaced[mid]))
            continue
        ack = ItemAck(id=mid, rev=after.rev(shown[mid]), content_hash=msg.content_hash)
        (answer.saved if kind == "saved" else answer.unchanged).append(ack)
    return answer


def _why_missing(target: Target, mid: str, before: ChatState, after: ChatState,
                 plan: Plan) -> str:
    if not after.visible:
        if before.visible:
            return ("AutoBot returned the chat empty when it was read back after the save "
                    f"({after.failed or 'a failed load?'}); the message stays here")
        return ("AutoBot did not store it: the chat was still empty when read back after "
                "the save (its answer is 200 whatever happens)")
    if mid in plan.predicted:
        return plan.predicted[mid]
    if mid in after.held:
        return f"AutoBot will not show it: {after.held[mid].why}"
    outcome, payload = simulate(
        target.predict, before,
        [Entry(None, n, raw, raw.get("id") if isinstance(raw.get("id"), str) else None)
         for n, raw in enumerate(plan.payload)])
    for rec in payload:
        if rec.label == mid and rec.key in outcome.dropped:
            return f"dropped by AutoBot's save: {outcome.dropped[rec.key][1]}"
    return "dropped by AutoBot: not in the chat when it was read back after the save"


def in_time_order(entries: list[Entry]) -> list[Entry]:
    """Stable order by time; entries without one stay right after their predecessor."""
    keyed: list[tuple[datetime | None, Entry]] = []
    last: datetime | None = None
    for entry in sorted(entries, key=lambda e: e.pos):
        when = entry.when if entry.when is not None else last
        last = when if when is not None else last
        keyed.append((when, entry))
    if all(k is None for k, _ in keyed):
        return [e for _, e in keyed]
    floor = min(k for k, _ in keyed if k is not None)
    return [e for _, e in sorted(keyed, key=lambda p: (p[0] or floor, p[1].pos))]


def _misplaced(expected: list[str], actual: list[str], batch: set[str]) -> dict[str, str]:
    """Messages of ``batch`` that AutoBot put on the wrong side of another message."""
    position = {mid: n for n, mid in enumerate(actual)}
    placed = [(mid, position[mid]) for mid in expected if mid in position]
    before = [-1] * len(placed)  # the latest actual position among those meant to come first
    after = [len(actual)] * len(placed)  # the earliest among those meant to come later
    for k in range(1, len(placed)):
        before[k] = max(before[k - 1], placed[k - 1][1])
    for k in range(len(placed) - 2, -1, -1):
        after[k] = min(after[k + 1], placed[k + 1][1])
    out = {}
    for k, (mid, at) in enumerate(placed):
        if mid in batch and (before[k] > at or after[k] < at):
            out[mid] = ("reordered: AutoBot sorts a chat on the timestamp text and put it on "
                        "the wrong side of another message; it is stored, and stays listed "
                        "here until a sync confirms it")
    return out
