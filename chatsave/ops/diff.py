"""Diff: how the local store and a backend differ, per chat and per message. Read-only.

Exit 0 when they agree, 1 when they differ; other codes only for errors (a difference is
never reported as an error, an error never as a difference).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

from chatsave.errors import ChatRefusedError, ExitCode, RefusedError, RemoteError
from chatsave.model import check_chat_id
from chatsave.ops.compare import (
    DUPLICATE,
    ERROR,
    SYMBOL_NAMES,
    ChatCompare,
    Comparer,
)
from chatsave.ops.duplicates import DEFAULT_WINDOW
from chatsave.ops.result import RunResult
from chatsave.remote.base import Remote
from chatsave.store.store import Store

Emit = Callable[..., None]


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class DiffOptions:
    window: timedelta = DEFAULT_WINDOW
    max_items: int = 10_000  # message events per run in --json (the combined file has all)


def chosen_chats(comparer: Comparer, store: Store, chat_ids: list[str] | None
                 ) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """(chat ids, local digests, remote chats) for the named chats or, with None, for all."""
    if chat_ids is not None:
        for chat_id in chat_ids:
            check_chat_id(chat_id)
        chat_ids = list(dict.fromkeys(chat_ids))
    remote = comparer.remote_chats(chat_ids)
    local = comparer.local_digests(chat_ids)
    if chat_ids is None:
        unlisted = [c for c in local if c not in remote]
        # Local chats the list did not show: ask for their digests in bulk.
        if unlisted:
            remote.update(comparer.remote_chats(unlisted))
        chat_ids = sorted(set(local) | {c for c, r in remote.items() if r.digest is not None})
    return chat_ids, local, remote


def diff(store: Store, remote: Remote, chat_ids: list[str] | None,
         options: DiffOptions | None = None, *, emit: Emit = _no_emit,
         combined: IO[str] | None = None) -> RunResult:
    """Compare the chosen chats (None: every chat known locally or on the backend)."""
    options = options or DiffOptions()
    result = RunResult("diff")
    caps = remote.capabilities()
    comparer = Comparer(store, remote, caps, window=options.window)
    chats, local, remote_chats = chosen_chats(comparer, store, chat_ids)
    totals: Counter[str] = Counter()
    differing = 0
    emitted = 0
    states: list[ChatCompare] = []
    for chat_id in chats:
        try:
            refusal = remote.refusal(chat_id)
            if refusal is not None:
                raise refusal
            state, rows = comparer.compare(chat_id, local.get(chat_id),
                                           remote_chats.get(chat_id))
            counts: Counter[str] = Counter()
            for row in rows:
                counts[row.symbol] += 1
                if combined is not None:
                    combined.write(f"{row.symbol} {chat_id} {row.id}\n")
                if row.symbol != "=" and emitted < options.max_items:
                    emitted += 1
                    emit("item", chat_id=chat_id, id=row.id, symbol=row.symbol,
                         category=SYMBOL_NAMES[row.symbol], local_hash=row.local_hash,
                         remote_hash=row.remote_hash, remote_rev=row.remote_rev)
            state.counts = dict(counts)
        except ChatRefusedError as exc:
            # A chat the backend cannot take at all: listed, the others compared.
            state = ChatCompare(chat_id, chat_id in local, local.get(chat_id), None,
                                error=exc.message)
            emit("refused", **result.refuse(chat_id, exc))
        except RefusedError:
            raise
        except RemoteError as exc:
            state = ChatCompare(chat_id, chat_id in local, local.get(chat_id), None,
                                error=exc.message)
            result.flag(exc.exit_code)
            result.error = exc
            if combined is not None:
                combined.write(f"{ERROR} {chat_id} -\n")
        states.append(state)
        totals.update(state.counts)
        if not state.in_agreement:
            differing += 1
        emit("chat", chat_id=chat_id, in_agreement=state.in_agreement,
             local=state.local, remote=state.remote is not None and state.remote.digest
             is not None, fetched=state.fetched, error=state.error,
             **{SYMBOL_NAMES[s]: n for s, n in sorted(state.counts.items())})
    result.counters["read"] = sum(totals.values())
    result.counters["unchanged"] = totals.get("=", 0)
    result.counters["conflicts"] = totals.get("*", 0)
    result.counters["duplicates_found"] = totals.get(DUPLICATE, 0)
    result.counters["pending_push"] = totals.get("+", 0)
    result.counters["pending_pull"] = totals.get("-", 0)
    result.counters["tombstones"] = totals.get("x", 0)
    result.details["chats"] = len(chats)
    result.details["differing_chats"] = differing
    result.details["requests"] = comparer.requests + 1
    result.details["backend_id"] = caps.backend_id
    result.details["remote"] = remote.url
    result.report = states
    if differing:
        result.flag(ExitCode.DIFFERENCES)
    return result
