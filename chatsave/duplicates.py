"""What a duplicate is: one function serves diff's ``D``, dedupe and ``chatsave doctor``.

Two messages of one chat with the same role, type and content (the same fingerprint) but
different ids are the same message when the later one is a *retry copy*: it carries the
same ``created_at``, or it belongs to a run of two or more consecutive messages that
reappears in the same order within the window. A retried non-idempotent save re-sends
whole runs with fresh ids and often fresh server times, so copies usually differ in time
and hash. A single message a person repeats ("yes", later "yes" again) is not a copy.

The search streams over the chat in time order and keeps only what the window needs.

Pure functions of message metadata, importing nothing of chatsave: ``ops`` (dedupe, diff,
compare, sync) and ``remote.autobot.doctor`` both use it, and neither package imports the
other for it (docs/architecture.md, "Imports today").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

DEFAULT_WINDOW = timedelta(minutes=10)


@dataclass(frozen=True)
class DupItem:
    """What duplicate detection needs of a message (no body)."""

    id: str
    fingerprint: str
    created_at: datetime
    order: int  # local order or server seq: breaks ties of equal times


def find_copies(items: Iterable[DupItem], window: timedelta = DEFAULT_WINDOW
                ) -> dict[str, str]:
    """Map each retry copy's id to the id of the message it copies (never a copy itself).

    ``items`` must come in (created_at, order) order.
    """
    copy_of: dict[str, str] = {}
    # Same fingerprint and same time: everything after the first is a copy.
    same_time: dict[str, str] = {}
    current_time: datetime | None = None
    # Recent consecutive pairs within the window: (fp_a, fp_b) -> [(time_a, id_a, id_b)]
    recent: dict[tuple[str, str], deque[tuple[datetime, str, str]]] = {}
    expiry: deque[tuple[datetime, tuple[str, str]]] = deque()
    previous: DupItem | None = None

    def root(mid: str) -> str:
        while mid in copy_of:
            mid = copy_of[mid]
        return mid

    for item in items:
        if item.created_at != current_time:
            current_time, same_time = item.created_at, {}
        first = same_time.get(item.fingerprint)
        if first is not None:
            copy_of[item.id] = root(first)
        else:
            same_time[item.fingerprint] = item.id
        if previous is not None:
            # Forget pairs that started before the window.
            while expiry and item.created_at - expiry[0][0] > window:
                _, old_key = expiry.popleft()
                bucket = recent.get(old_key)
                if bucket:
                    bucket.popleft()
                    if not bucket:
                        del recent[old_key]
            key = (previous.fingerprint, item.fingerprint)
            for _, id_a, id_b in recent.get(key, ()):
                if id_b == previous.id or id_a in (previous.id, item.id):
                    continue
                copy_of.setdefault(previous.id, root(id_a))
                copy_of.setdefault(item.id, root(id_b))
                break
            recent.setdefault(key, deque()).append((previous.created_at, previous.id, item.id))
            expiry.append((previous.created_at, key))
        previous = item
    # A copy never points at a copy.
    return {cid: root(oid) for cid, oid in copy_of.items() if root(oid) != cid}


def groups(copy_of: dict[str, str]) -> dict[str, list[str]]:
    """Original id -> its copies' ids."""
    out: dict[str, list[str]] = {}
    for copy, original in copy_of.items():
        out.setdefault(original, []).append(copy)
    return out
