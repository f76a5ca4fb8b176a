"""Delete: remove messages or a whole chat on purpose: to the trash here, tombstones there."""

from __future__ import annotations

from chatsave.errors import ExitCode, UsageError
from chatsave.model import check_chat_id
from chatsave.ops.result import RunResult
from chatsave.store.store import Store

REASON = "deleted with chatsave delete"


def plan_delete(store: Store, chat_id: str, message_ids: list[str] | None) -> list[str]:
    """The ids a delete would remove (all of the chat's messages when none are named)."""
    check_chat_id(chat_id)
    if not store.has_chat(chat_id):
        raise UsageError(f"chat {chat_id!r} is not in the local store",
                         hint="chatsave sync CHAT_ID brings it here first")
    present = [mid for mid, _ in store.message_keys(chat_id)]
    if not message_ids:
        return present
    known = set(present)
    missing = [m for m in dict.fromkeys(message_ids) if m not in known]
    if missing:
        gone = [m for m in missing if store.tombstone(chat_id, m) is not None]
        hint = ("already deleted: " + ", ".join(map(repr, gone))) if gone else \
            "chatsave export CHAT_ID lists the chat's message ids"
        raise UsageError(f"not in chat {chat_id!r}: {', '.join(map(repr, missing))}", hint=hint)
    return list(dict.fromkeys(message_ids))


def delete(store: Store, chat_id: str, ids: list[str], *, dry_run: bool = False,
           run_id: int | None = None) -> RunResult:
    """Move ``ids`` of ``chat_id`` to the trash and remember them as deleted (undoable)."""
    result = RunResult("delete")
    result.details.update(chat_id=chat_id, ids=len(ids), dry_run=dry_run)
    if dry_run:
        result.counters["would_delete"] = len(ids)
        if ids:
            result.flag(ExitCode.DIFFERENCES)
        return result
    with store.transaction():
        moved = store.trash_messages(chat_id, ids, REASON, run_id)
        store.touch_chat(chat_id)
    result.counters["deleted"] = len(moved)
    result.chat_ids = [chat_id]
    return result
