"""Export: write chats from the local store as JSONL or as a browser localStorage dump."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from chatsave.errors import ExitCode, UsageError
from chatsave.formats.jsonl import write_jsonl
from chatsave.formats.localstorage import write_localstorage
from chatsave.model import Message, check_chat_id
from chatsave.ops.result import RunResult
from chatsave.store.store import Store, Stub

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
        written = write_localstorage(
            ((cid, rows[cid].title, rows[cid].created_at, bodies(cid)) for cid in chosen), out)
        result.counters["written"] += written["messages"]
    result.details["chats"] = len(chosen)
    result.details["format"] = fmt
    if evicted:
        result.details["evicted"] = evicted
        result.counters["skipped_evicted"] = sum(evicted.values())
        result.flag(ExitCode.DIFFERENCES)
    return result


def export_budgeted(store: Store, chat_ids: Sequence[str], out: Any, budget: int,
                    backend_id: str, emit: Any = None) -> RunResult:
    """A localStorage image that fits ``budget`` bytes as a browser counts them.

    Every message the backend has not confirmed goes in; then whole chats, most recent
    first, while they fit. What is left out is listed: all of it is safe on the backend.
    Nothing is written when even the unconfirmed messages do not fit (exit 5).
    """
    from chatsave.errors import GuardError
    from chatsave.formats.localstorage import (
        browser_bytes,
        dump_values,
        list_entry_json,
        session_json,
        write_dump,
    )
    from chatsave.store.backend import BackendView

    result = RunResult("export")
    chosen = _chosen(store, chat_ids)
    rows = {row.chat_id: row for row in store.chats(chosen)}
    view = BackendView(store, backend_id)
    with store.errors():
        recency = dict(store.conn.execute(
            "SELECT chat_id, MAX(created_at) FROM messages GROUP BY chat_id").fetchall())
    order = sorted(chosen, key=lambda c: (recency.get(c) or "", c), reverse=True)

    def bodies(chat_id: str, only_pending: bool) -> list[Message]:
        states = view.states(chat_id) if only_pending else {}
        out_: list[Message] = []
        for item in store.iter_messages(chat_id):
            if isinstance(item, Stub):
                continue
            if only_pending:
                st = states.get(item.id)
                if st is not None and st[0] == "confirmed" and st[2] == item.content_hash:
                    continue
            out_.append(item)
        return out_

    sessions: dict[str, tuple[str, int]] = {}
    listing: dict[str, str] = {}
    for chat_id in order:
        pending = bodies(chat_id, only_pending=True)
        if pending:
            row = rows[chat_id]
            sessions[chat_id] = session_json(chat_id, row.title, row.created_at, pending)
            listing[chat_id] = list_entry_json(chat_id, row.title)

    def size() -> int:
        return browser_bytes(dump_values([sessions[c][0] for c in order if c in sessions],
                                         [listing[c] for c in order if c in listing]))

    mandatory = size()
    if mandatory > budget:
        raise GuardError(
            f"the messages the backend has not confirmed need {mandatory} bytes of "
            f"localStorage, more than the budget of {budget}; nothing written",
            hint="chatsave save first, or give a larger --budget")
    for chat_id in order:
        row = rows[chat_id]
        full = session_json(chat_id, row.title, row.created_at, bodies(chat_id, False))
        kept = sessions.get(chat_id)
        sessions[chat_id] = full
        listing[chat_id] = list_entry_json(chat_id, row.title)
        if size() > budget:
            if kept is None:
                del sessions[chat_id], listing[chat_id]
            else:
                sessions[chat_id] = kept
    left_out: dict[str, int] = {}
    for chat_id in order:
        total = store.counts(chat_id)["messages"]
        included = sessions[chat_id][1] if chat_id in sessions else 0
        if total > included:
            left_out[chat_id] = total - included
            if emit is not None:
                emit("left_out", chat_id=chat_id, messages=total - included,
                     whole_chat=chat_id not in sessions)
    values = dump_values([sessions[c][0] for c in order if c in sessions],
                         [listing[c] for c in order if c in listing])
    write_dump(values, out)
    result.counters["written"] = sum(n for _, n in sessions.values())
    result.details.update(format="localstorage", chats=len(sessions), budget=budget,
                          browser_bytes=browser_bytes(values), backend_id=backend_id,
                          left_out_chats=sum(1 for c in left_out if c not in sessions),
                          left_out_messages=sum(left_out.values()))
    result.report = [left_out]
    return result
