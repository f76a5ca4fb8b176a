"""``chatsave doctor``'s examination: the AutoBot traps present in one chat, here and there.

Looks at the chat as the AutoBot backend holds it (its stored messages, through an AutoBot
remote) and at the local store's copy as AutoBot would hold it once saved, and names what
AutoBot will do to it: user messages its loader collapses, replies less than 120 s apart it
merges, timestamp kinds that do not mix (its sort on the text, the naive/aware pair that
makes its loader fail), a chat it cannot load at all, messages without ids, and the empty
second "New Chat" session a new chat leaves behind (docs/autobot.md); and the retry copies
``chatsave dedupe`` removes, by its own rule (chatsave.duplicates). Read-only.

A chat the remote cannot take at all (ChatRefusedError: an id AutoBot's HTTP routes cannot
carry, or a new chat no file name can be made for) is not asked for: the local copy is
examined, and the refusal is reported with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chatsave.duplicates import DupItem, find_copies
from chatsave.errors import ChatRefusedError, UsageError
from chatsave.model import Message, check_chat_id
from chatsave.normalize import TimeContext, parse_time
from chatsave.remote.autobot import rules
from chatsave.remote.autobot.base import AutobotBase
from chatsave.remote.autobot.shapes import Session, to_autobot

NEW_CHAT = "New Chat"
NEW_CHAT_WINDOW = timedelta(minutes=10)
# Local copies always carry ids and one time form: these traps cannot be there.
_NOT_LOCAL = {"no_id", "mixed_timestamps", "misordered"}


@dataclass
class Finding:
    """One trap, where it is (``backend`` or ``local``), the messages it concerns."""

    trap: str
    where: str
    detail: str
    ids: list[str] = field(default_factory=list)


@dataclass
class Examination:
    chat_id: str
    findings: list[Finding] = field(default_factory=list)
    local_messages: int = 0
    backend_messages: int | None = None
    remote: str | None = None
    # Why the remote cannot take this chat (its copy there was not examined).
    refused: ChatRefusedError | None = None


def examine(store: Any, remote: AutobotBase | None, chat_id: str) -> Examination:
    """The traps in ``chat_id`` (see the module docstring)."""
    check_chat_id(chat_id)
    report = Examination(chat_id, remote=remote.url if remote is not None else None)
    local = [m for m in store.iter_messages(chat_id) if isinstance(m, Message)] \
        if store.has_chat(chat_id) else []
    report.local_messages = len(local)
    tz = remote.tz if remote is not None else None
    state = None
    if remote is not None:
        remote.bind_store(store)
        report.refused = remote.refusal(chat_id)
        if report.refused is None:
            try:
                state = remote.raw_messages(chat_id)
            except ChatRefusedError as exc:  # a remote that says so only when asked
                report.refused = exc
        if report.refused is not None and not store.has_chat(chat_id):
            raise report.refused  # nothing to examine, here or there
    if remote is not None and state is not None:
        if not state.exists and not store.has_chat(chat_id):
            raise UsageError(f"chat {chat_id!r} is neither in the local store nor on "
                             f"{remote.url}")
        report.backend_messages = len(state.items)
        if state.failed:
            report.findings.append(Finding("failed_load", "backend", state.failed))
        unreadable = [f"#{i.pos}: {i.problem}" for i in state.items if i.msg is None]
        if unreadable:
            report.findings.append(Finding(
                "unreadable_message", "backend",
                f"{len(unreadable)} stored message(s) chatsave cannot read (kept as they are "
                "in every write): " + "; ".join(unreadable[:5]),
                [u.split(":", 1)[0] for u in unreadable]))
        if isinstance(state.doc, list) and len(state.doc) > 1:
            read, stale = state.doc[0], state.doc[1:]
            only = [mid for mid, (_, why) in state.held.items() if "stale legacy" in why]
            for old in stale:
                report.findings.append(Finding(
                    "stale_legacy_file", "backend",
                    f"{old.path.name} is a stale legacy file: AutoBot reads only "
                    f"{read.path.name} and never shows what is only in the old one "
                    f"({len(only)} message(s)); sync keeps a copy of those here, and save "
                    "writes them into the file AutoBot reads", only))
        copies = _retry_copies(state.items)
        if copies:
            report.findings.append(Finding(
                "retry_copies", "backend",
                f"{len(copies)} message(s) are retry copies of an earlier one (chatsave "
                "dedupe removes them)", sorted(copies)))
        if state.items and not state.failed:
            through_save = remote.server_name == "autobot"
            for trap in rules.find_traps([i.raw for i in state.items],
                                         [i.id or f"#{i.pos}" for i in state.items],
                                         through_save=through_save):
                report.findings.append(Finding(trap.code, "backend", trap.detail, trap.ids))
        report.findings.extend(_new_chat_sessions(remote, chat_id, state, local))
    elif remote is None and not store.has_chat(chat_id):
        raise UsageError(f"chat {chat_id!r} is not in the local store",
                         hint="name an AutoBot remote (--remote autobot+http://host or "
                         "autobot-dir:PATH) to examine the backend's copy")
    if local:
        from datetime import UTC

        raws = [to_autobot(m, tz or UTC) for m in local]
        for trap in rules.find_traps(raws, [m.id for m in local], through_save=True):
            if trap.code in _NOT_LOCAL:
                continue
            report.findings.append(Finding(trap.code, "local", "once saved to AutoBot: " +
                                           trap.detail, trap.ids))
    return report


def _retry_copies(items: list[Any]) -> dict[str, str]:
    """Copy id -> original id among the readable stored messages (dedupe's own rule)."""
    readable = [i.msg for i in items if i.msg is not None]
    return find_copies(DupItem(m.id, m.fingerprint, m.created_at, n)
                       for n, m in enumerate(readable))


def repair(store: Any, remote: Any, chat_id: str, run_id: int | None) -> dict[str, Any]:
    """``doctor --repair``: rewrite the chat file (AutobotDirRemote.repair) and record the
    ids it derived in the store's id mappings (kind ``message``), with where they came
    from, so that an id in a ticket can be traced to the message it was made for."""
    remote.bind_store(store)
    done: dict[str, Any] = remote.repair(chat_id)
    if done["changed"] and done["renamed"]:
        with store.transaction():
            for pos, was, new in done["renamed"]:
                if store.original_id(new, "message") is None:
                    store.record_mapping(
                        f"{chat_id} #{pos} {was!r}", new,
                        f"doctor --repair of chat {chat_id}: message #{pos} of its file had "
                        f"the id {was!r}", run_id, kind="message")
    return done


def _new_chat_sessions(remote: AutobotBase, chat_id: str, state: Any,
                       local: list[Message]) -> list[Finding]:
    sessions: list[Session] = list(getattr(remote, "sessions", lambda: [])())
    original = remote.ids.original(chat_id)
    times = TimeContext(tz=remote.tz)

    def when(value: Any) -> datetime | None:
        if not isinstance(value, str):
            return None
        try:
            return parse_time(value, times)[0]
        except ValueError:
            return None

    mine = next((s for s in sessions if s.original == original), None)
    found: list[Finding] = []
    if mine is not None and mine.name == NEW_CHAT and mine.count == 0 and not local:
        found.append(Finding("empty_new_chat", "backend", "this chat is an empty \"New "
                             "Chat\" session: what is left when the web client makes its "
                             "own id for a new chat and the backend another; nothing in it "
                             "to keep"))
        return found
    anchors = [t for t in (when(mine.created) if mine else None,
                           min((m.created_at for m in local), default=None),
                           min((i.msg.created_at for i in state.items if i.msg is not None),
                               default=None)) if t is not None]
    for session in sessions:
        if session.original == original or session.name != NEW_CHAT or session.count:
            continue
        created = when(session.created)
        if created is None or not any(abs(created - a) <= NEW_CHAT_WINDOW for a in anchors):
            continue
        found.append(Finding(
            "empty_new_chat", "backend",
            f"an empty \"New Chat\" session ({remote.ids.local(session.original)}) was created "
            "within 10 minutes of this chat: the second id AutoBot makes for a new chat; "
            "it holds nothing", [remote.ids.local(session.original)]))
    return found
