"""The trash: what delete, dedupe and sync removed here, to be restored or emptied on purpose."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from chatsave.errors import ExitCode, UsageError
from chatsave.model import Message
from chatsave.ops.gc import _ago
from chatsave.ops.result import RunResult
from chatsave.ops.save import SaveOptions, _finish, _Saver
from chatsave.remote.base import Remote
from chatsave.store.store import Store
from chatsave.store.trash import TrashEntry

Emit = Callable[..., None]


def _no_emit(type_: str, **fields: Any) -> None:
    return None


def list_trash(store: Store, chat_id: str | None = None) -> list[dict[str, Any]]:
    return store.trash_entries(chat_id)


def _select(store: Store, run_id: int | None, ids: list[str] | None,
            chat_id: str | None) -> list[TrashEntry]:
    """(trash_id, chat_id, id, message json, reason) to restore: the newest entry per
    message."""
    if run_id is not None:
        rows = store.trash_of_run(run_id)
        if not rows:
            raise UsageError(f"nothing in the trash from run {run_id}",
                             hint="chatsave trash list shows what is there")
    else:
        rows = []
        for mid in dict.fromkeys(ids or []):
            found = store.trash_of_message(mid, chat_id)
            chats = {r[1] for r in found}
            if not found:
                raise UsageError(f"message {mid!r} is not in the trash",
                                 hint="chatsave trash list shows what is there")
            if len(chats) > 1:
                raise UsageError(f"message id {mid!r} is in the trash of several chats "
                                 f"({', '.join(sorted(chats))})", hint="add --chat CHAT_ID")
            rows.append(found[-1])
    newest: dict[tuple[str, str], TrashEntry] = {}
    for row in rows:
        newest[(row[1], row[2])] = row
    return list(newest.values())


def _restorable(store: Store, entry: TrashEntry) -> tuple[str, Message | None, str | None]:
    """What restoring one trash entry does: ("add", msg, None) puts a deleted message back,
    ("edit", msg, live hash) puts a replaced version back over the edit, ("drop", None,
    None) only removes the entry (the same version is live), ("skip", None, why) leaves it."""
    _, cid, mid, body, reason = entry
    doc = json.loads(body)
    if doc.get("evicted"):
        return "skip", None, ("its body was evicted; chatsave fetch cannot bring back what "
                              "the backend deleted")
    msg = Message.model_validate(doc)
    live = store.get_message(cid, mid)
    if live is None:
        return "add", msg, None
    if live.content_hash == msg.content_hash:
        return "drop", None, None
    if not (reason or "").startswith(Store.EDITED):
        return "skip", None, "another version of it is live"
    return "edit", msg, live.content_hash


def restore(store: Store, remote: Remote | None, *, run_id: int | None = None,
            ids: list[str] | None = None, chat_id: str | None = None,
            emit: Emit = _no_emit, this_run: int | None = None,
            dry_run: bool = False) -> RunResult:
    """Put messages back from the trash; on the backend, restore their tombstones
    (a save with ``base_rev``) at once when ``remote`` is given, else at the next sync.

    A version that an edit made here replaced (``import --update``) comes back over the
    version that replaced it, which goes to the trash in turn (undo, and redo); it is
    sent like the edit was, against the revision the backend confirmed. A version
    replaced or removed otherwise is not restored over another live version.

    ``dry_run`` changes nothing: it lists what would be restored (``planned`` events,
    ``would_restore``; exit 1 when there is some, 0 when there is none)."""
    if (run_id is None) == (not ids):
        raise UsageError("trash restore takes --run RUN_ID or message ids (not both)")
    result = RunResult("trash restore")
    entries = _select(store, run_id, ids, chat_id)
    if dry_run:
        planned: list[tuple[str, str]] = []
        for entry in entries:
            action, msg, why = _restorable(store, entry)
            if action == "skip":
                emit("skipped", chat_id=entry[1], id=entry[2], reason=why)
                result.counters["skipped"] += 1
            elif msg is not None:
                emit("planned", chat_id=msg.chat_id, id=msg.id, content_hash=msg.content_hash,
                     action="restore", **({"replaced_hash": why} if action == "edit" else {}))
                planned.append((msg.chat_id, msg.id))
        result.counters["would_restore"] = len(planned)
        result.details["dry_run"] = True
        result.report = planned
        if planned:
            result.flag(ExitCode.DIFFERENCES)
        return result
    restored: list[Message] = []
    with store.transaction():
        for entry in entries:
            trash_id, cid, mid = entry[:3]
            action, msg, why = _restorable(store, entry)
            if action == "skip":
                emit("skipped", chat_id=cid, id=mid, reason=why)
                result.counters["skipped"] += 1
                continue
            store.remove_trash_entry(trash_id)
            if msg is None:
                continue
            if action == "edit":
                store.edit_message(msg, this_run, f"{Store.EDITED} (trash restore)")
                emit("restored", chat_id=cid, id=mid, content_hash=msg.content_hash,
                     replaced_hash=why)
            else:
                store.upsert_chat(cid, None)
                store.bring_back(msg, this_run)
                emit("restored", chat_id=cid, id=mid, content_hash=msg.content_hash)
            restored.append(msg)
    result.counters["written"] = len(restored)
    if result.counters["skipped"]:
        result.flag(ExitCode.DIFFERENCES)
    if remote is None or not restored:
        return result
    # The backend deleted these at a known revision: restore them against it.
    caps = remote.capabilities()
    saver = _Saver(store, remote, caps, SaveOptions(), emit, this_run)
    # What each chat has pending goes: this run's messages, and any earlier restore the
    # backend did not take, are restored there against the deletion's revision.
    chats = sorted({msg.chat_id for msg in restored})
    with store.transaction():  # the plan is recorded before the first request
        works = [saver.plan_chat(cid, None, saver.view.open_batches({cid})) for cid in chats]
    saver.send_all(works)
    pushed = _finish(saver, chats)
    result.codes.extend(pushed.codes)
    result.counters["restored_on_backend"] = pushed.counters["written"]
    for key in ("pending_push", "conflicts", "rejected"):
        result.counters[key] = pushed.counters[key]
    result.details.update(pushed.details)
    return result


def empty(store: Store, older_than: timedelta, *, dry_run: bool = False) -> RunResult:
    """Delete trash entries older than ``older_than`` for good."""
    result = RunResult("trash empty")
    cutoff = _ago(older_than)
    count = store.trash_count_before(cutoff)
    result.details.update(older_than_s=older_than.total_seconds(), dry_run=dry_run)
    if dry_run:
        result.counters["would_delete"] = int(count)
        if count:
            result.flag(ExitCode.DIFFERENCES)
        return result
    store.empty_trash_before(cutoff)
    result.counters["deleted"] = int(count)
    return result
