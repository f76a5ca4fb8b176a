"""fetch: bring bodies that gc evicted back from the backend, byte-identical (checked by hash).

A chat the backend cannot take at all (ChatRefusedError) is left out alone, before any
request for it: its stubs stay, the other chats are fetched, it is listed under
``refused`` and the run ends with exit 9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatsave.errors import ChatRefusedError, ExitCode, InvalidItemError
from chatsave.normalize import MessageNormalizer
from chatsave.ops.compare import Comparer
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.ops.save import select_chats
from chatsave.remote.base import Remote
from chatsave.store.store import Store

Emit = Callable[..., None]


def _no_emit(type_: str, **fields: Any) -> None:
    return None


def evicted_chats(store: Store, chat_ids: list[str] | None) -> list[str]:
    chosen = set(select_chats(store, chat_ids))
    return [chat_id for chat_id in store.evicted_chat_ids() if chat_id in chosen]


def _evicted_count(store: Store, chats: list[str]) -> int:
    """How many evicted bodies ``chats`` hold here."""
    wanted = set(chats)
    return sum(count for chat_id, count in store.evicted_counts().items() if chat_id in wanted)


def fetch(store: Store, remote: Remote, chat_ids: list[str] | None, *,
          emit: Emit = _no_emit, progress: Progress = no_progress) -> RunResult:
    """Restore every evicted body of the chosen chats (None: all) from ``remote``;
    ``progress`` counts the evicted messages looked at (chatsave.ops.progress)."""
    result = RunResult("fetch")
    caps = remote.capabilities()
    comparer = Comparer(store, remote, caps, keep_bodies=True)
    chats = evicted_chats(store, chat_ids)
    missing = 0
    progress(stage="fetching", total=_evicted_count(store, chats), unit="message")
    for chat_id in chats:
        refused = remote.refusal(chat_id)
        if refused is None:
            try:
                comparer.fetch(chat_id)
            except ChatRefusedError as exc:  # a remote that says so only when asked
                refused = exc
        stubs = store.stubs(chat_id)
        if refused is not None:
            emit("refused", **result.refuse(chat_id, refused))
            progress(len(stubs))
            continue
        restored = []
        for mid, chash in stubs:
            result.counters["read"] += 1
            body = comparer.remote_body(chat_id, mid)
            try:
                if body is None:
                    raise InvalidItemError("the backend does not hold it any more")
                msg = MessageNormalizer(chat_id).normalize(body)
                if msg.content_hash != chash:
                    raise InvalidItemError("the backend holds other content under this id")
            except InvalidItemError as exc:
                missing += 1
                emit("missing", chat_id=chat_id, id=mid, content_hash=chash, reason=exc.message)
                continue
            restored.append((mid, msg))
        store.restore_bodies(chat_id, restored)
        result.counters["written"] += len(restored)
        progress(len(stubs))
        emit("chat", chat_id=chat_id, restored=len(restored), missing=len(stubs) - len(restored))
    result.counters["missing"] = missing
    result.details.update(chats=len(chats), remote=remote.url, backend_id=caps.backend_id)
    if missing:
        # Bodies this store gave up because the backend had confirmed them, and the
        # backend no longer has: a person must look (the stubs keep their hashes).
        result.flag(ExitCode.REJECTED)
    return result
