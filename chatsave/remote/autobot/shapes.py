"""What the AutoBot remotes share of AutoBot's data: ids, shapes and times (docs/autobot.md).

- **Times.** AutoBot keeps naive times in its server's local time zone (``parse_zone``);
  chatsave writes a new message's time in AutoBot's own form (``server_time``) and never
  one a clock change makes ambiguous (``clock_problem``).
- **Shapes.** A chatsave message in AutoBot's backend shape (``to_autobot``); a stored
  message as read (``Item``), a listed chat (``Session``), a chat as read (``ChatState``:
  what is stored, what AutoBot shows, what it holds but will not show), read with
  chatsave's normaliser (``read_items``) and AutoBot's loader model (``settle``, with
  chatsave.remote.autobot.rules).
- **Ids.** Chat ids as chatsave knows them and as AutoBot stores them (``ChatIds``), the
  file name AutoBot makes of one (``file_name_possible``), a backend id (``backend_uuid``),
  and a message's revision (``ChatState.rev``: AutoBot keeps none, so it is built from the
  chat's modification time and 20 bits of the message's content hash).
- **Refusals.** The errors the remotes raise for what AutoBot cannot take (exit 5, 9) and
  the hint that names ``chatsave doctor``.

No I/O: the remotes (chatsave.remote.autobot.base and its subclasses) read and write.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

from chatsave.errors import (
    ExitCode,
    InvalidItemError,
    RefusedError,
    RemoteError,
    RequestRejectedError,
    UsageError,
)
from chatsave.model import Message, chat_id_problem, renamed_chat_id
from chatsave.normalize import MessageNormalizer, TimeContext, wall_time_problem
from chatsave.remote.autobot import rules

# A chat digest AutoBot cannot give (it has no content hashes): never equal to a real one,
# so the core always compares such a chat message by message.
UNVERIFIED = "autobot:unverified"
REV_BITS = 20
REV_MASK = (1 << REV_BITS) - 1
TYPE_GROUPS = (frozenset({"llm_response", "llm_response_chunk", "response"}),
               frozenset({"message", "default"}))
_ALIAS_TYPES = {"message": "default"}
_AUTOBOT_KEYS = ("id", "sender", "text", "content", "messageType", "type", "metadata",
                 "rawData", "timestamp", "attachments", "inexact")
# AutoBot keeps a chat in the file "{id}_chat.json"; a file name holds at most 255 bytes
# (ext4, XFS, Btrfs).
CHAT_FILE_SUFFIX = "_chat.json"
FILE_NAME_MAX = 255


class AutobotGuard(RequestRejectedError, RefusedError):
    """A safety guard refused a write to one chat (exit 5); nothing was written.

    Raised from ``save``/``delete``: the core closes the batch (its messages are kept
    here as rejected, with this reason) and stops the run with this error.
    """

    exit_code = ExitCode.GUARD
    code = "guard"


class AutobotUnsupported(RequestRejectedError, RefusedError):
    """Something AutoBot cannot do (exit 9): the batch is closed, its messages kept here."""

    exit_code = ExitCode.REFUSED
    code = "unsupported"


class FailedLoadError(RemoteError):
    """AutoBot could not load a chat it lists with messages (exit 5; read side)."""

    exit_code = ExitCode.GUARD
    code = "failed_load"


def chat_where(url: str, original: str) -> str:
    """How messages name a chat of the backend at ``url``."""
    return f"{url} chat {original!r}"


def repair_hint(chat_id: str) -> str:
    """The hint for a chat AutoBot cannot load or order: what names and repairs the trap."""
    return (f"chatsave doctor {chat_id} names the trap; on the AutoBot server, "
            f"chatsave doctor {chat_id} --repair --remote autobot-dir:PATH rewrites "
            "the chat file in one time form (then save --retry-rejected)")


def parse_zone(value: str | None) -> tzinfo:
    """The AutoBot server's time zone: an IANA name, ``UTC`` or None (UTC)."""
    if not value or value.upper() in ("UTC", "Z"):
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {value!r} (CHATSAVE_TZ or the config's tz)",
                         hint="use an IANA name such as Europe/Berlin") from None


def server_time(when: datetime, tz: tzinfo) -> str:
    """``when`` as chatsave writes it into AutoBot: naive, in the server's local time ``tz``,
    in AutoBot's own form ``YYYY-MM-DD HH:MM:SS`` plus ``.fff`` when the instant has
    milliseconds. Text order is time order against AutoBot's own whole seconds, which its
    text sort needs; the fraction keeps the instant (hashes, gc and fetch stay exact)."""
    t = when.astimezone(tz)
    base = (f"{t.year:04d}-{t.month:02d}-{t.day:02d} "
            f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}")
    ms = t.microsecond // 1000
    return f"{base}.{ms:03d}" if ms else base


def clock_problem(when: datetime, tz: tzinfo) -> str | None:
    """Why ``when`` cannot be written as a naive local time in ``tz``: on a clock change
    the same wall time happens twice, and a naive time cannot say which one it is."""
    wall = when.astimezone(tz).replace(tzinfo=None)
    problem = wall_time_problem(wall, tz)
    if problem is None:
        return None
    return (f"its time is {wall:%Y-%m-%d %H:%M:%S} in {tz}, which {problem}: AutoBot keeps "
            "naive local times, so it could not tell this message's place from another's "
            "in that hour; not written (it stays here)")


def to_autobot(msg: Message, tz: tzinfo) -> dict[str, Any]:
    """A chatsave message in AutoBot's backend shape; its foreign fields kept verbatim."""
    out: dict[str, Any] = {k: v for k, v in msg.extra.items() if k not in _AUTOBOT_KEYS}
    out.update({
        "id": msg.id,
        "sender": msg.role,
        "text": msg.content,
        "messageType": _ALIAS_TYPES.get(msg.type, msg.type),
        "metadata": msg.metadata or None,
        "timestamp": server_time(msg.created_at, tz),
    })
    if msg.attachments:
        out["attachments"] = msg.attachments
    if msg.inexact:
        out["inexact"] = True
    return out


def file_name_possible(original: str) -> bool:
    """Whether ``{original}_chat.json`` can name a file in AutoBot's chats directory."""
    return bool(original) and original not in (".", "..") and \
        not any(c in original for c in "/\\\0") and \
        len((original + CHAT_FILE_SUFFIX).encode("utf-8", "surrogatepass")) <= FILE_NAME_MAX


def backend_uuid(name: str) -> str:
    """A stable backend id for an AutoBot backend that has none of its own."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


class ChatIds:
    """Chat ids as chatsave knows them <-> as AutoBot stores them.

    Ids chatsave cannot use (``null``, ``undefined`` ...) were renamed on import and the
    mapping recorded in the store; a remote writes back to the original. Without a store
    (or a recorded mapping) the rename is recomputed: it is deterministic.
    """

    def __init__(self) -> None:
        self._local: dict[str, str] = {}
        self._original: dict[str, str] = {}
        self._lock = threading.Lock()

    def bind(self, store: Any) -> None:
        with self._lock:
            for original, mapped, _ in store.mappings():
                self._local[original] = mapped
                self._original[mapped] = original

    def local(self, original: str) -> str:
        if chat_id_problem(original) is None:
            return original
        with self._lock:
            mapped = self._local.get(original) or renamed_chat_id(original)
            self._local.setdefault(original, mapped)
            self._original.setdefault(mapped, original)
        return mapped

    def original(self, chat_id: str) -> str:
        with self._lock:
            known = self._original.get(chat_id)
        if known is not None:
            return known
        stem = chat_id.rsplit("~", 1)[0]
        if "~" in chat_id and chat_id_problem(stem) is not None \
                and renamed_chat_id(stem) == chat_id:
            return stem
        return chat_id


@dataclass
class Item:
    """One stored message: the raw dict AutoBot holds, and what chatsave reads in it."""

    raw: dict[str, Any]
    pos: int
    msg: Message | None = None
    problem: str | None = None

    @property
    def id(self) -> str | None:
        return self.msg.id if self.msg is not None else None


class Held(NamedTuple):
    """A readable message the backend holds but AutoBot will not show, and why not."""

    item: Item
    why: str


@dataclass
class Session:
    """One chat as the backend lists it."""

    original: str
    name: str | None = None
    count: int = 0
    version: int = 0  # modification time in ms: grows when the chat changes
    size: int | None = None
    created: str | None = None
    updated: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatState:
    """A chat as read from the backend."""

    chat_id: str
    original: str
    exists: bool
    items: list[Item]  # every stored message AutoBot reads, as stored (a write's start)
    visible: list[Item]  # what AutoBot shows: its loader's result, in its order
    version: int = 0
    name: str | None = None
    failed: str | None = None  # why the read cannot be trusted (a failed load)
    doc: Any = None  # the dir remote: the whole file
    # Readable messages the backend holds but AutoBot will not show (its next load drops
    # them, or a stale file it no longer reads holds them): never counted as on the
    # backend, but pulled so that a copy is kept here. id -> the item and why it is not
    # shown.
    held: dict[str, Held] = field(default_factory=dict)

    def rev(self, item: Item) -> int:
        assert item.msg is not None
        return (self.version << REV_BITS) | (int(item.msg.content_hash[:5], 16) & REV_MASK)


def settle(state: ChatState) -> ChatState:
    """Decide what AutoBot shows of ``state.items`` with its loader's model: ``visible`` is
    what the loader keeps, in its order; what it drops joins ``held`` with the reason. A
    chat its loader fails on shows nothing (AutoBot answers it empty)."""
    if state.failed or not state.items:
        state.visible = [i for i in state.items if i.msg is not None]
        return state
    labels = [i.id or f"#{i.pos}" for i in state.items]
    outcome = rules.load_settled(rules.recs([i.raw for i in state.items], labels))
    if outcome.failed:
        why = (f"AutoBot's loader fails on this chat ({outcome.failed}) and shows it empty")
        state.visible = []
        dropped = {n: why for n in range(len(state.items))}
    else:
        state.visible = [state.items[r.key] for r in outcome.kept
                         if state.items[r.key].msg is not None]
        dropped = {k: why for k, (_, why) in outcome.dropped.items()}
    for key, why in dropped.items():
        item = state.items[key]
        if item.msg is not None:
            state.held.setdefault(item.msg.id, Held(item, why))
    return state


def read_items(chat_id: str, raws: list[Any], tz: tzinfo) -> list[Item]:
    """Normalise a chat's stored messages in order (ordinals make derived ids stable)."""
    normalizer = MessageNormalizer(chat_id, TimeContext(tz=tz))
    items = []
    for pos, raw in enumerate(raws):
        item = Item(raw if isinstance(raw, dict) else {"value": raw}, pos)
        if not isinstance(raw, dict):
            item.problem = f"not a JSON object ({type(raw).__name__})"
        else:
            try:
                item.msg = normalizer.normalize(raw)
            except InvalidItemError as exc:
                item.problem = exc.message
        items.append(item)
    return items

