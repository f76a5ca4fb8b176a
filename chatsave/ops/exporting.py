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
