"""What AutoBot does to a chat's messages (docs/autobot.md), as pure functions over raw dicts.

The AutoBot remotes use this model to *predict* what a write would do before they make it
(chatsave.remote.autobot.planner: chatsave never sends something that makes AutoBot drop a
message it holds), and ``chatsave doctor`` uses it to name the traps in a chat. The
prediction is a precaution, never the proof: after every write the remotes read the chat
back and report what is really there.

Modelled: the ``/save`` merge (existing messages dropped by id, by signature, or when a
longer streaming message from the same sender exists; then runs of adjacent streaming
messages within 120 s collapse to the longest; then a sort on the timestamp *string*; if
the merge raises, only the new messages are kept; at most ``MAX_MESSAGES`` are stored) and
the dedupe every load runs (user messages with equal first 200 characters collapse to the
first; runs of adjacent ``llm_response``/``llm_response_chunk``/``response`` within 120 s
collapse to the longest; a naive/aware pair raises and the load returns nothing).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# /save: streaming types whose adjacent runs within 120 s collapse (api/chat.py).
MERGE_STREAMING = frozenset({"llm_response", "llm_response_chunk", "response",
                             "terminal_command", "terminal_output",
                             "command_approval_request", "terminal_interpretation"})
# Every load: the same, for these three only (chat_history/deduplication.py).
LOAD_STREAMING = frozenset({"llm_response", "llm_response_chunk", "response"})
STREAM_WINDOW_S = 120
USER_PREFIX = 200
MAX_MESSAGES = 10_000

# The timestamp kinds found in AutoBot chats (docs/autobot.md).
# The backend's own form, and chatsave's (the same plus milliseconds): one kind, since
# they sort as text in time order beside each other.
KIND_NAIVE = "naive"                # 2026-03-01 10:00:00 or 2026-03-01 10:00:00.123
KIND_NAIVE_ISO = "naive-iso"        # 2026-03-01T10:00:00.123 (no zone)
KIND_AWARE = "aware"                # 2026-03-01T10:00:00.123Z or +01:00 (the web client)
KIND_TIME_ONLY = "time-only"        # 9:41:03 AM (legacy localStorage)
KIND_OTHER = "other"                # numbers, missing, unreadable
_TIME_ONLY = re.compile(r"\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?\s*(?:[AaPp]\.?\s*[Mm]\.?)?")
_ZONE = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")


def timestamp_kind(value: Any) -> str:
    """Which kind of timestamp ``value`` is (the KIND_* names)."""
    if not isinstance(value, str) or not value.strip():
        return KIND_OTHER
    text = value.strip()
    if _TIME_ONLY.fullmatch(text):
        return KIND_TIME_ONLY
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return KIND_OTHER
    if parsed.tzinfo is not None or _ZONE.search(text):
        return KIND_AWARE
    return KIND_NAIVE_ISO if "T" in text else KIND_NAIVE


def autobot_time(value: Any) -> datetime | None:
    """A timestamp as AutoBot's merge and loader read it: ISO when it holds a ``T`` (aware
    with a zone, naive without), else exactly ``%Y-%m-%d %H:%M:%S``; None otherwise."""
    if not isinstance(value, str) or not value:
        return None
    return _autobot_time(value)


@functools.lru_cache(maxsize=65536)
def _autobot_time(value: str) -> datetime | None:
    try:
        if "T" in value:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except (ValueError, TypeError):
        return None


def text_of(raw: dict[str, Any]) -> Any:
    return raw.get("text", "") or raw.get("content", "")


def type_of(raw: dict[str, Any]) -> Any:
    return raw.get("messageType", raw.get("type", "default"))


def raw_id(raw: dict[str, Any]) -> Any:
    return raw.get("id") or raw.get("messageId")


def usable_id(value: Any) -> bool:
    """Whether a stored id names its message: not missing, and not a serialised nothing."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "null", "undefined", "none", "nan")
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(eq=False)
class Rec:
    """One stored message as AutoBot's code sees it; ``key`` names it across simulations."""

    raw: dict[str, Any]
    key: int
    label: str = ""  # how reports name it (its id, or a position)
    when: datetime | None = None

    def __post_init__(self) -> None:
        self.when = autobot_time(self.raw.get("timestamp", ""))
        if not self.label:
            mid = raw_id(self.raw)
            self.label = str(mid) if mid else f"#{self.key}"

    @property
    def sender(self) -> Any:
        return self.raw.get("sender", "")

    def length(self) -> int:
        value = text_of(self.raw)
        return len(value) if hasattr(value, "__len__") else 0


def recs(raws: Iterable[dict[str, Any]], labels: Sequence[str] | None = None) -> list[Rec]:
    return [Rec(raw, i, labels[i] if labels else "") for i, raw in enumerate(raws)]


def signature(raw: dict[str, Any]) -> tuple[Any, ...]:
    """The merge's identity of a message (api/chat.py ``_get_message_signature``)."""
    sender = raw.get("sender", "")
    text = text_of(raw)
    if sender == "user":
        return ("user", _prefix(text, USER_PREFIX))
    if sender == "assistant":
        stripped = text.strip() if isinstance(text, str) else text
        return ("assistant", _hashable(type_of(raw)), _prefix(stripped, 300))
    mid = raw_id(raw)
    if mid:
        return ("id", _hashable(mid))
    return (_hashable(raw.get("timestamp", "")), _hashable(sender), _prefix(text, 100))


def _prefix(value: Any, size: int) -> Any:
    return value[:size] if isinstance(value, str) else _hashable(value)


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


@dataclass
class Outcome:
    """What AutoBot keeps of a list of messages, and why it drops the others."""

    kept: list[Rec] = field(default_factory=list)
    # key -> (key of the message it was merged into or None, reason)
    dropped: dict[int, tuple[int | None, str]] = field(default_factory=dict)
    failed: str | None = None  # the exception AutoBot's code would raise

    def kept_keys(self) -> set[int]:
        return {r.key for r in self.kept}


def _collapse(items: list[Rec], types: frozenset[str], dropped: dict[int, tuple[int | None, str]],
              why: str) -> list[Rec]:
    """Runs of adjacent streaming messages within 120 s collapse to the longest (may raise
    TypeError on a naive/aware pair, as AutoBot's code does)."""
    others: list[Rec] = []
    groups: list[list[Rec]] = []
    current: list[Rec] = []
    last: datetime | None = None
    for rec in items:
        if _hashable(type_of(rec.raw)) not in types:
            if current:
                groups.append(current)
                current, last = [], None
            others.append(rec)
            continue
        now = rec.when
        if now is not None and last is not None and \
                abs((now - last).total_seconds()) > STREAM_WINDOW_S:
            groups.append(current)
            current = []
        if now is not None:
            last = now
        current.append(rec)
    if current:
        groups.append(current)
    out = list(others)
    for group in groups:
        longest = max(group, key=lambda r: r.length())
        out.append(longest)
        for rec in group:
            if rec is not longest:
                dropped[rec.key] = (longest.key, why.format(into=longest.label))
    return out


def _sort(items: list[Rec]) -> list[Rec]:
    # AutoBot sorts on the raw timestamp value: strings compare as text (' ' < 'T'), and a
    # number beside a string raises TypeError.
    return sorted(items, key=lambda r: r.raw.get("timestamp", ""))


def load(items: Sequence[Rec]) -> Outcome:
    """What a load returns (and writes back): AutoBot's dedupe on load."""
    out = Outcome()
    try:
        seen: dict[Any, Rec] = {}
        deduped = []
        for rec in items:
            if rec.sender == "user":
                key = text_of(rec.raw)[:USER_PREFIX]
                first = seen.get(key)
                if first is not None:
                    out.dropped[rec.key] = (first.key, "AutoBot keeps only the first user "
                                            "message that begins with the same 200 characters "
                                            f"({first.label})")
                    continue
                seen[key] = rec
            deduped.append(rec)
        collapsed = _collapse(deduped, LOAD_STREAMING, out.dropped,
                              "AutoBot merges replies less than 120 s apart into the "
                              "longest ({into})")
        out.kept = _sort(collapsed)
    except Exception as exc:  # AutoBot catches everything here and returns no messages
        out.kept = []
        out.dropped = {}
        out.failed = f"{type(exc).__name__}: {exc}"
    return out


def load_settled(items: Sequence[Rec]) -> Outcome:
    """Loads until nothing more drops: AutoBot's dedupe is not idempotent (its sort can make
    two replies adjacent that were not), and every load, the web client's too, runs it."""
    out = load(items)
    for _ in range(len(items)):
        if out.failed or not out.dropped:
            break
        again = load(out.kept)
        if again.failed:
            out.failed = f"{again.failed} (on a later load, once its sort moved messages)"
            break
        if not again.dropped:
            break
        out.dropped.update(again.dropped)
        out.kept = again.kept
    return out


def merge(existing: Sequence[Rec], new: Sequence[Rec],
          max_messages: int = MAX_MESSAGES) -> Outcome:
    """What ``POST /api/chats/{id}/save`` stores from ``existing`` and ``new``."""
    out = Outcome()
    new_ids = {_hashable(raw_id(r.raw)) for r in new if raw_id(r.raw)}
    new_sigs = {signature(r.raw) for r in new}
    both = [*existing, *new]
    preserved = []
    for rec in existing:
        mid = raw_id(rec.raw)
        if (mid and _hashable(mid) in new_ids) or signature(rec.raw) in new_sigs:
            continue  # replaced by the new version: not a loss
        if _hashable(type_of(rec.raw)) in MERGE_STREAMING:
            longer = next((o for o in both if o is not rec and o.sender == rec.sender
                           and _hashable(type_of(o.raw)) in MERGE_STREAMING
                           and o.length() > rec.length()), None)
            if longer is not None:
                out.dropped[rec.key] = (longer.key, "AutoBot's save keeps only the longest "
                                        f"streaming message of a sender ({longer.label})")
                continue
        preserved.append(rec)
    before = dict(out.dropped)
    try:
        merged = _collapse([*preserved, *new], MERGE_STREAMING, out.dropped,
                           "AutoBot's save merges adjacent streaming messages less than "
                           "120 s apart into the longest ({into})")
        stored = _sort(merged)
    except Exception as exc:
        # The endpoint logs it and saves only the new messages.
        out.failed = f"{type(exc).__name__}: {exc}"
        out.dropped = before
        out.dropped.update({r.key: (None, "dropped by AutoBot's save: its merge failed "
                                    f"({out.failed}) and it kept only the new messages")
                            for r in preserved})
        stored = list(new)
    if len(stored) > max_messages:
        for rec in stored[:len(stored) - max_messages]:
            out.dropped[rec.key] = (None, f"AutoBot keeps at most {max_messages} messages "
                                    "per chat and truncates the oldest")
        stored = stored[len(stored) - max_messages:]
    out.kept = stored
    return out


def stored_then_loaded(existing: Sequence[Rec], new: Sequence[Rec],
                       max_messages: int = MAX_MESSAGES) -> Outcome:
    """A save through the API followed by the next load: what AutoBot will show."""
    saved = merge(existing, new, max_messages)
    loaded = load_settled(saved.kept)
    loaded.dropped = {**saved.dropped, **loaded.dropped}
    return loaded


# ----------------------------------------------------------------------------- traps


@dataclass
class Trap:
    """One AutoBot trap found in a chat."""

    code: str
    detail: str
    ids: list[str] = field(default_factory=list)


def find_traps(raws: Sequence[dict[str, Any]], labels: Sequence[str] | None = None, *,
               through_save: bool = False) -> list[Trap]:
    """The traps in one chat's stored messages: what AutoBot's loader (and, with
    ``through_save``, its save) will collapse, and timestamp kinds that do not mix."""
    items = recs(raws, labels)
    traps: list[Trap] = []
    kinds: dict[str, list[str]] = {}
    for rec in items:
        kinds.setdefault(timestamp_kind(rec.raw.get("timestamp")), []).append(rec.label)
    if len(kinds) > 1:
        shown = ", ".join(f"{k} x{len(v)}" for k, v in sorted(kinds.items()))
        danger = KIND_AWARE in kinds and (KIND_NAIVE in kinds or KIND_NAIVE_ISO in kinds)
        traps.append(Trap(
            "mixed_timestamps",
            f"timestamps of {len(kinds)} kinds ({shown}): AutoBot sorts them as text, so the "
            "order breaks" + ("; a naive and an aware time on adjacent replies make its "
                              "loader fail and show the chat empty" if danger else ""),
            [label for k, v in sorted(kinds.items()) if k != _majority(kinds) for label in v]))
    missing = [r.label for r in items if not usable_id(raw_id(r.raw))]
    no_id = Trap("no_id", f"{len(missing)} message(s) without a usable id (none, or one like "
                 "'null'): the web client makes one up from sender, time and position, which "
                 "changes when messages move; chatsave doctor --repair gives each a derived "
                 "id", missing)
    loaded = load_settled(items)
    if loaded.failed:
        traps.append(Trap("failed_load", "AutoBot's loader fails on this chat "
                          f"({loaded.failed}): it shows it empty, and its next write "
                          "overwrites the file with only the new messages"))
        return [*traps, no_id] if missing else traps
    by_key = {r.key: r for r in items}
    repeats = [(by_key[k].label, why) for k, (into, why) in loaded.dropped.items()
               if by_key[k].sender == "user"]
    if repeats:
        traps.append(Trap("repeated_user_message",
                          f"{len(repeats)} user message(s) begin like an earlier one; AutoBot's "
                          "loader keeps only the first: " + "; ".join(f"{i}: {w}"
                                                                     for i, w in repeats[:5]),
                          [i for i, _ in repeats]))
    merged = [(by_key[k].label, why) for k, (into, why) in loaded.dropped.items()
              if by_key[k].sender != "user"]
    if merged:
        traps.append(Trap("adjacent_streaming",
                          f"{len(merged)} reply(ies) less than 120 s from the next; AutoBot's "
                          "loader keeps only the longest: " + "; ".join(f"{i}: {w}"
                                                                       for i, w in merged[:5]),
                          [i for i, _ in merged]))
    if through_save:
        saved = merge([], items)
        extra = [(by_key[k].label, why) for k, (_, why) in saved.dropped.items()
                 if k not in loaded.dropped]
        if saved.failed:
            traps.append(Trap("failed_save_merge", f"AutoBot's save merge fails on this "
                              f"chat ({saved.failed}) and keeps only the new messages"))
        elif extra:
            traps.append(Trap("adjacent_streaming_on_save",
                              f"{len(extra)} message(s) that any save through AutoBot's API "
                              "drops (terminal and streaming messages less than 120 s apart "
                              "collapse to the longest): " + "; ".join(
                                  f"{i}: {w}" for i, w in extra[:5]),
                              [i for i, _ in extra]))
    order = [r.key for r in loaded.kept]
    if order != sorted(order):
        traps.append(Trap("misordered", "AutoBot's sort on the timestamp text puts messages "
                          "out of their stored order",
                          [by_key[k].label for k in _out_of_order(order)]))
    if missing:
        traps.append(no_id)
    return traps


def _majority(kinds: dict[str, list[str]]) -> str:
    return max(kinds, key=lambda k: len(kinds[k]))


def _out_of_order(sequence: Sequence[int]) -> list[int]:
    """The members of ``sequence`` outside one longest increasing subsequence."""
    keep = set(longest_increasing(sequence))
    return [v for v in sequence if v not in keep]


def longest_increasing(sequence: Sequence[int]) -> list[int]:
    """One longest strictly increasing subsequence (patience sorting, O(n log n))."""
    import bisect

    tails: list[int] = []
    tail_idx: list[int] = []
    prev: list[int] = [-1] * len(sequence)
    for i, value in enumerate(sequence):
        pos = bisect.bisect_left(tails, value)
        if pos == len(tails):
            tails.append(value)
            tail_idx.append(i)
        else:
            tails[pos] = value
            tail_idx[pos] = i
        prev[i] = tail_idx[pos - 1] if pos else -1
    out: list[int] = []
    i = tail_idx[-1] if tail_idx else -1
    while i >= 0:
        out.append(sequence[i])
        i = prev[i]
    return out[::-1]
