"""Export: write chats from the local store as JSONL or as a browser localStorage dump.

A localStorage image keeps the user's place: the chat the last imported dump named as
current (its ``currentSessionId``), else the most recent chat, is the image's current
session.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from chatsave.errors import ExitCode, GuardError, UsageError
from chatsave.formats.jsonl import write_jsonl
from chatsave.formats.localstorage import (
    browser_bytes,
    dump_values,
    list_entry_json,
    session_json,
    write_dump,
    write_localstorage,
)
from chatsave.model import Message, check_chat_id
from chatsave.ops.result import RunResult
from chatsave.store.backend import BackendView
from chatsave.store.store import ChatRow, Store, Stub

EXPORT_FORMATS = ("jsonl", "localstorage")


def _chosen(store: Store, chat_ids: Sequence[str]) -> list[str]:
    if not chat_ids:
        return store.chat_ids()
    missing = []
    for chat_id in chat_ids:
        check_chat_id(chat_id)
        if not store.has_chat(chat_id):
            missing.append(chat_id)
    if missing:
        raise UsageError(f"not in the local store: {', '.join(map(repr, missing))}",
                         hint="chatsave status lists the chats the store holds")
    return list(chat_ids)


def _recency(store: Store, chat_ids: Sequence[str]) -> dict[str, str]:
    """chat id -> when its newest message was written (chats without messages: when the
    chat was created, else recorded): a text that sorts in time order."""
    newest = store.newest_message_times()
    rows = {row.chat_id: row for row in store.chats(chat_ids)}
    return {c: newest.get(c) or rows[c].created_at or rows[c].updated_at for c in chat_ids}


def _current(store: Store, included: Collection[str], recency: dict[str, str]) -> str | None:
    """The image's current session: the recorded current chat, else the most recent one."""
    recorded = store.current_chat()
    if recorded in included:
        return recorded
    return max(included, key=lambda c: (recency.get(c) or "", c), default=None)


def export_chats(store: Store, chat_ids: Sequence[str], fmt: str, out: Any) -> RunResult:
    """Write the chosen chats (all when none are named) to ``out`` (an object with write())."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"cannot export as {fmt!r}", hint=f"formats: {', '.join(EXPORT_FORMATS)}")
    result = RunResult("export")
    chosen = _chosen(store, chat_ids)
    evicted: dict[str, int] = {}

    def bodies(chat_id: str) -> Iterator[Message]:
        for item in store.iter_messages(chat_id):
            if isinstance(item, Stub):
                evicted[chat_id] = evicted.get(chat_id, 0) + 1
                continue
            result.counters["read"] += 1
            yield item

    if fmt == "jsonl":
        for chat_id in chosen:
            result.counters["written"] += write_jsonl(bodies(chat_id), out)
    else:
        rows = {row.chat_id: row for row in store.chats(chosen)}
        current = _current(store, chosen, _recency(store, chosen))
        written = write_localstorage(
            ((cid, rows[cid].title, rows[cid].created_at, bodies(cid)) for cid in chosen), out,
            current=current)
        result.counters["written"] += written["messages"]
        result.details["current"] = current
    result.details["chats"] = len(chosen)
    result.details["format"] = fmt
    if evicted:
        result.details["evicted"] = evicted
        result.counters["skipped_evicted"] = sum(evicted.values())
        result.flag(ExitCode.DIFFERENCES)
    return result


class _Image:
    """A localStorage image being put together: sessions and chat_list entries per chat."""

    def __init__(self, rows: dict[str, ChatRow], order: list[str]) -> None:
        self.rows = rows
        self.order = order
        self.sessions: dict[str, tuple[str, int]] = {}
        self.listing: dict[str, str] = {}
        self.current: str | None = None

    def put(self, chat_id: str, messages: list[Message]) -> None:
        row = self.rows[chat_id]
        self.sessions[chat_id] = session_json(chat_id, row.title, row.created_at, messages,
                                              active=chat_id == self.current)
        self.listing[chat_id] = list_entry_json(chat_id, row.title)

    def drop(self, chat_id: str) -> None:
        self.sessions.pop(chat_id, None)
        self.listing.pop(chat_id, None)

    def values(self) -> dict[str, str]:
        return dump_values([self.sessions[c][0] for c in self.order if c in self.sessions],
                           [self.listing[c] for c in self.order if c in self.listing],
                           self.current if self.current in self.sessions else None)

    def size(self) -> int:
        return browser_bytes(self.values())

    def try_put(self, chat_id: str, messages: list[Message], budget: int) -> bool:
        """Put the chat in if the image still fits the budget with it; say whether."""
        self.put(chat_id, messages)
        if self.size() <= budget:
            return True
        self.drop(chat_id)
        return False

    def put_latest(self, chat_id: str, messages: list[Message], budget: int) -> int:
        """Put in as many of the chat's latest messages as fit (a cut chat); how many."""
        lo, hi = 0, len(messages)  # lo messages fit; more than hi do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.try_put(chat_id, messages[-mid:], budget):
                lo = mid
            else:
                hi = mid - 1
        if lo:
            self.put(chat_id, messages[-lo:])
        return lo


def _live(store: Store, chat_id: str) -> list[Message]:
    """The chat's messages whose bodies the store holds, in local order."""
    return [m for m in store.iter_messages(chat_id) if not isinstance(m, Stub)]


def _survey(store: Store, view: BackendView, chat_id: str) -> tuple[int, int]:
    """(messages the backend has not confirmed with their current hash, evicted bodies),
    read page by page: the bodies are not kept."""
    states = view.states(chat_id)
    unconfirmed = evicted = 0
    for item in store.iter_messages(chat_id):
        if isinstance(item, Stub):
            evicted += 1  # gc evicts only what the backend confirmed
            continue
        state, _rev, confirmed_hash = states.get(item.id, (None, None, None))
        if state != "confirmed" or confirmed_hash != item.content_hash:
            unconfirmed += 1
    return unconfirmed, evicted


def _settle_current(image: _Image, bodies: Callable[[str], list[Message]],
                    unsaved: dict[str, int], budget: int) -> None:
    """Not even the latest message of the chat meant to be current fits: make the most
    recent chat in the image current (whole: every chat but that one is), and make room
    for its id by leaving out the oldest chats the backend holds entirely."""
    image.current = next((c for c in image.order if c in image.sessions), None)
    if image.current is None:
        return
    image.put(image.current, bodies(image.current))
    for chat_id in reversed(image.order):
        if image.size() <= budget:
            return
        if chat_id in image.sessions and chat_id not in unsaved and chat_id != image.current:
            image.drop(chat_id)
    if image.size() > budget:
        chat_id, image.current = image.current, None
        image.put(chat_id, bodies(chat_id))


def export_budgeted(store: Store, chat_ids: Sequence[str], out: Any, budget: int,
                    backend_id: str, emit: Any = None) -> RunResult:
    """A localStorage image that fits ``budget`` bytes as a browser counts them.

    The web client opening a chat replaces its local messages by the backend's whenever
    the backend holds at least as many, so a chat that holds messages the backend has not
    confirmed goes in whole, or nothing is written (exit 5: save it first). Then the
    user's current chat, cut to its latest messages if it does not fit whole; then whole
    chats, most recent first, while they fit. Only chats the backend confirmed entirely
    are cut or left out; what is left out is listed.
    """
    result = RunResult("export")
    chosen = _chosen(store, chat_ids)
    rows = {row.chat_id: row for row in store.chats(chosen)}
    view = BackendView(store, backend_id)
    recency = _recency(store, chosen)
    order = sorted(chosen, key=lambda c: (recency.get(c) or "", c), reverse=True)
    image = _Image(rows, order)

    unsaved: dict[str, int] = {}
    evicted: set[str] = set()
    for chat_id in order:
        pending, stubs = _survey(store, view, chat_id)
        if pending:
            unsaved[chat_id] = pending
        if stubs:
            evicted.add(chat_id)

    def bodies(chat_id: str) -> list[Message]:
        return _live(store, chat_id)

    cannot = [c for c in order if c in unsaved and c in evicted]
    if cannot:
        raise GuardError(
            f"chat(s) {', '.join(map(repr, cannot))} hold messages the backend has not "
            "confirmed, and gc evicted some of their other messages here: the image could "
            "not hold them whole, and the browser would replace them by the backend's "
            "copy, losing the unconfirmed ones; nothing written",
            hint="save it first (chatsave save CHAT_ID), or bring the bodies back with "
                 "chatsave fetch CHAT_ID")
    recorded = store.current_chat()
    wanted = recorded if recorded in rows else next(iter(order), None)
    image.current = wanted
    for chat_id in order:
        if chat_id in unsaved:
            image.put(chat_id, bodies(chat_id))
    mandatory = image.size()
    if mandatory > budget:
        named = ", ".join(f"{c!r} ({unsaved[c]} unconfirmed)" for c in order if c in unsaved)
        raise GuardError(
            f"chat(s) {named} hold messages the backend has not confirmed; whole, they need "
            f"{mandatory} bytes of localStorage, more than the budget of {budget}, and cut "
            "the browser would replace them by the backend's copy, losing those messages; "
            "nothing written",
            hint="save it first (chatsave save CHAT_ID), or give a larger --budget")
    if wanted is not None and wanted not in image.sessions:
        messages = bodies(wanted)
        if not image.try_put(wanted, messages, budget):
            # The user's place matters more than older chats: as much of it as fits. The
            # backend holds all of it; the web client loads it from there when opened.
            image.put_latest(wanted, messages, budget)
    for chat_id in order:
        if chat_id not in image.sessions and chat_id != wanted:
            image.try_put(chat_id, bodies(chat_id), budget)
    if image.current not in image.sessions:
        _settle_current(image, bodies, unsaved, budget)
    left_out: dict[str, int] = {}
    for chat_id in order:
        total = store.counts(chat_id)["messages"]
        included = image.sessions[chat_id][1] if chat_id in image.sessions else 0
        if total > included:
            left_out[chat_id] = total - included
            if emit is not None:
                emit("left_out", chat_id=chat_id, messages=total - included,
                     whole_chat=chat_id not in image.sessions)
    values = image.values()
    write_dump(values, out)
    result.counters["written"] = sum(n for _, n in image.sessions.values())
    result.details.update(format="localstorage", chats=len(image.sessions), budget=budget,
                          browser_bytes=browser_bytes(values), backend_id=backend_id,
                          current=image.current if image.current in image.sessions else None,
                          left_out_chats=sum(1 for c in left_out if c not in image.sessions),
                          left_out_messages=sum(left_out.values()))
    result.report = [left_out]
    return result
