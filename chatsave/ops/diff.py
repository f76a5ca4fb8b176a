"""Diff: how the local store and a backend differ, per chat and per message. Read-only.

Exit 0 when they agree, 1 when they differ; other codes only for errors (a difference is
never reported as an error, an error never as a difference). A named chat that neither
the store nor the backend has is a usage error (exit 2), for every command that compares.

``diff_message`` shows one message as each side holds it (fields, hashes, revisions), its
text only when asked for (``show_text``): the one way message text leaves a comparison.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

from chatsave.duplicates import DEFAULT_WINDOW
from chatsave.errors import ChatRefusedError, ExitCode, RefusedError, RemoteError, UsageError
from chatsave.model import (
    Message,
    chat_id_problem,
    check_chat_id,
    check_message_id,
)
from chatsave.ops.compare import (
    CONFLICT,
    DUPLICATE,
    ERROR,
    LOCAL,
    REMOTE,
    SAME,
    SYMBOL_NAMES,
    TOMBSTONE,
    ChatCompare,
    Comparer,
    Row,
)
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.remote.base import Remote
from chatsave.store.backend import BackendView
from chatsave.store.store import Store

Emit = Callable[..., None]


def _no_emit(type_: str, **fields: Any) -> None:
    return None


@dataclass
class DiffOptions:
    window: timedelta = DEFAULT_WINDOW
    max_items: int = 10_000  # message events per run in --json (the combined file has all)
    # Called with every message compared (diff --html: chatsave.ops.report.ReportBuilder);
    # keep_bodies keeps the backend's fetched bodies for it to read.
    on_row: Callable[[Comparer, ChatCompare, Row], None] | None = None
    keep_bodies: bool = False


# Message ids kept per chat and symbol, so that a report can name the first few.
EXAMPLES = 5


def _refuse_unknown(unknown: list[str], url: str) -> None:
    """A usage error naming the chats that neither side has (none: nothing to refuse)."""
    if not unknown:
        return
    named = (f"chat {unknown[0]!r} is" if len(unknown) == 1
             else f"chats {', '.join(map(repr, unknown))} are")
    raise UsageError(f"{named} neither in the local store nor on {url}",
                     hint="check the id: chatsave status lists the chats here, chatsave diff "
                     "--all the chats on either side")


def require_known(comparer: Comparer, store: Store, chat_ids: list[str]) -> None:
    """Refuse (exit 2) named chats that neither the store nor the backend has; asks the
    backend only about chats the store does not hold."""
    absent = [c for c in dict.fromkeys(chat_ids) if not store.has_chat(check_chat_id(c))]
    if absent:
        remote = comparer.remote_chats(absent)
        _refuse_unknown([c for c in absent if remote[c].digest is None], comparer.remote.url)


def chosen_chats(comparer: Comparer, store: Store, chat_ids: list[str] | None
                 ) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """(chat ids, local digests, remote chats) for the named chats or, with None, for all.

    A named chat that neither side has is refused (exit 2), naming it."""
    if chat_ids is not None:
        for chat_id in chat_ids:
            check_chat_id(chat_id)
        chat_ids = list(dict.fromkeys(chat_ids))
    remote = comparer.remote_chats(chat_ids)
    local = comparer.local_digests(chat_ids)
    if chat_ids is not None:
        _refuse_unknown([c for c in chat_ids if c not in local and (
            remote.get(c) is None or remote[c].digest is None)], comparer.remote.url)
    if chat_ids is None:
        unlisted = [c for c in local if c not in remote]
        # Local chats the list did not show: ask for their digests in bulk.
        if unlisted:
            remote.update(comparer.remote_chats(unlisted))
        chat_ids = sorted(set(local) | {c for c, r in remote.items() if r.digest is not None})
    return chat_ids, local, remote


def diff(store: Store, remote: Remote, chat_ids: list[str] | None,
         options: DiffOptions | None = None, *, emit: Emit = _no_emit,
         combined: IO[str] | None = None, progress: Progress = no_progress) -> RunResult:
    """Compare the chosen chats (None: every chat known locally or on the backend);
    ``progress`` counts the chats compared (chatsave.ops.progress)."""
    options = options or DiffOptions()
    result = RunResult("diff")
    caps = remote.capabilities()
    comparer = Comparer(store, remote, caps, window=options.window,
                        keep_bodies=options.keep_bodies, by_buckets=True)
    chats, local, remote_chats = chosen_chats(comparer, store, chat_ids)
    totals: Counter[str] = Counter()
    differing = 0
    emitted = 0
    states: list[ChatCompare] = []
    progress(stage="comparing", total=len(chats), unit="chat")
    for chat_id in chats:
        progress(1)
        try:
            refusal = remote.refusal(chat_id)
            if refusal is not None:
                raise refusal
            state, rows = comparer.compare(chat_id, local.get(chat_id),
                                           remote_chats.get(chat_id))
            counts: Counter[str] = Counter()
            for row in rows:
                counts[row.symbol] += 1
                if options.on_row is not None:
                    options.on_row(comparer, state, row)
                if row.symbol != SAME:
                    named = state.examples.setdefault(row.symbol, [])
                    if len(named) < EXAMPLES:
                        named.append(row.id)
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


# ------------------------------------------------------------------ one message
def message_target(store: Store, remote: Remote, args: list[str], show_text: bool
                   ) -> tuple[str, str] | None:
    """(chat, message) when ``diff A B`` names message B of chat A; None for chats.

    B is a message with ``show_text`` or when it cannot be a chat id. Otherwise B is a
    chat when either side has a chat B (as before), and a message of A when A is a chat
    on either side and B is not; when neither is a chat, both are refused as chats."""
    if len(args) != 2:
        return None
    chat_id, second = check_chat_id(args[0]), args[1]
    if show_text or chat_id_problem(second) is not None:
        return chat_id, check_message_id(second)
    if store.has_chat(second):
        return None
    comparer = Comparer(store, remote, remote.capabilities())
    asked = [second] if store.has_chat(chat_id) else [second, chat_id]
    found = comparer.remote_chats(asked)
    if found[second].digest is not None:
        return None
    if chat_id in found and found[chat_id].digest is None:
        return None
    return chat_id, check_message_id(second)


def _body_fields(body: dict[str, Any], show_text: bool) -> dict[str, Any]:
    """Role, type and time of a wire body; its text, metadata and attachments only with
    ``show_text`` (else how many keys and attachments it has)."""
    metadata = body.get("metadata") or {}
    attachments = body.get("attachments") or []
    out: dict[str, Any] = {"role": body.get("role"), "type": body.get("type") or "message",
                           "created_at": body.get("created_at")}
    if show_text:
        out.update(content=body.get("content"), metadata=metadata, attachments=attachments)
    else:
        out.update(metadata_keys=len(metadata) if isinstance(metadata, dict) else None,
                   attachments=len(attachments) if isinstance(attachments, list) else None)
    return out


def _trashed_body(store: Store, chat_id: str, message_id: str) -> dict[str, Any] | None:
    """The newest version of a message in the trash (None: none, or only a stub)."""
    body = store.newest_trashed(chat_id, message_id)
    doc = json.loads(body) if body is not None else None
    return None if not isinstance(doc, dict) or doc.get("evicted") else doc


def _here(store: Store, backend_id: str, chat_id: str, message_id: str, show_text: bool
          ) -> dict[str, Any] | None:
    """The message as this store holds it: live, evicted (a stub) or deleted (None: the
    store has never held it, or holds no trace of it)."""
    item = store.get_message(chat_id, message_id)
    side: dict[str, Any]
    if isinstance(item, Message):
        side = {"state": "live", **_body_fields(item.to_wire(), show_text),
                "content_hash": item.content_hash}
    elif item is not None:  # gc evicted its body: what is still known of it
        side = {"state": "evicted", "role": None, "type": None, "created_at": item.created_at,
                "content_hash": item.content_hash}
        if show_text:
            side["content"] = None
    else:
        deleted, deleted_hash = store.tombstone_of(chat_id, message_id)
        if not deleted:
            return None
        trashed = _trashed_body(store, chat_id, message_id)
        side = {"state": "deleted", **(_body_fields(trashed, show_text) if trashed else {}),
                "content_hash": deleted_hash}
    # What this store last agreed on with the backend about it (None: nothing).
    side["agreed"] = BackendView(store, backend_id).state_of(chat_id, message_id)
    return side


def _there(comparer: Comparer, chat_id: str, message_id: str, show_text: bool
           ) -> dict[str, Any] | None:
    """The message as the backend holds it, from the fetched chat (None: it has not)."""
    row = comparer.copy.entry(chat_id, message_id)
    if row is None:
        return None
    seq, rev, chash, deleted = row
    body = comparer.remote_body(chat_id, message_id)
    side: dict[str, Any] = {"state": "deleted" if deleted else "live"}
    if body is not None:
        side.update(_body_fields(body, show_text))
    side.update(content_hash=chash, rev=rev, seq=seq)
    return side


def _symbol(here: dict[str, Any] | None, there: dict[str, Any] | None) -> str:
    """The message's standing, in diff's symbols (D aside: one message is no copy)."""
    live_here = here["content_hash"] if here is not None and here["state"] != "deleted" \
        else None
    live_there = there["content_hash"] if there is not None and there["state"] != "deleted" \
        else None
    if live_here is not None and live_there is not None:
        return SAME if live_here == live_there else CONFLICT
    if live_here is not None:
        return TOMBSTONE if there is not None else LOCAL
    if live_there is not None:
        return TOMBSTONE if here is not None else REMOTE
    return SAME  # deleted wherever it is known: nothing live to disagree about


def diff_message(store: Store, remote: Remote, chat_id: str, message_id: str, *,
                 show_text: bool = False, emit: Emit = _no_emit) -> RunResult:
    """Both versions of one message: exit 0 the same on both sides, 1 they differ; a
    message (or chat) that neither side has is a usage error (exit 2).

    One ``message`` event carries both sides (``here`` and ``backend``, None where that
    side has no trace of it); their text only with ``show_text``."""
    check_chat_id(chat_id)
    check_message_id(message_id)
    result = RunResult("diff")
    caps = remote.capabilities()
    comparer = Comparer(store, remote, caps, keep_bodies=True)
    here = _here(store, caps.backend_id, chat_id, message_id, show_text)
    there: dict[str, Any] | None = None
    on_backend = False
    refusal = remote.refusal(chat_id)
    if refusal is None:
        try:
            on_backend = comparer.remote_chats([chat_id])[chat_id].digest is not None
            if on_backend:
                comparer.fetch(chat_id)
                there = _there(comparer, chat_id, message_id, show_text)
        except ChatRefusedError as exc:  # a remote that says so only when asked
            refusal = exc
    if refusal is not None:
        emit("refused", **result.refuse(chat_id, refusal))
    elif not on_backend and not store.has_chat(chat_id):
        _refuse_unknown([chat_id], remote.url)
    elif here is None and there is None:
        raise UsageError(f"message {message_id!r} is neither in chat {chat_id!r} here nor "
                         f"on {remote.url}",
                         hint=f"chatsave diff {chat_id} names the messages that differ; "
                         f"chatsave export {chat_id} lists every message held here")
    symbol = ERROR if refusal is not None else _symbol(here, there)
    emit("message", chat_id=chat_id, id=message_id, symbol=symbol,
         category=SYMBOL_NAMES[symbol], here=here, backend=there)
    c = result.counters
    c["read"] = (here is not None) + (there is not None)
    c["unchanged"] = int(symbol == SAME)
    c["conflicts"] = int(symbol == CONFLICT)
    c["pending_push"] = int(symbol == LOCAL)
    c["pending_pull"] = int(symbol == REMOTE)
    c["tombstones"] = int(symbol == TOMBSTONE)
    result.details.update(chat_id=chat_id, message_id=message_id, symbol=symbol,
                          category=SYMBOL_NAMES[symbol], remote=remote.url,
                          backend_id=caps.backend_id, show_text=show_text)
    # For the report only (never the summary, which a log may keep): it may hold text.
    result.report = [{"here": here, "backend": there}]
    if symbol not in (SAME, ERROR):
        result.flag(ExitCode.DIFFERENCES)
    return result
