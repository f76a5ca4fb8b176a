"""What the two AutoBot remotes share: ids, shapes and times, and save/delete/read made honest.

AutoBot (docs/autobot.md) has no versions, no idempotency, no per-message answers and a lossy
merge, so its remotes give the core the Remote interface's guarantees by other means:

- **Reading** presents a chat as AutoBot will show it: the stored list run through the
  model of AutoBot's loader (chatsave.remote.autobot_rules). What the backend stores but
  will not show (the next load drops it, or only a stale file holds it) is *held*: never
  counted as on the backend, but offered to sync (``held_only``) so that a copy is kept
  here. A message that has the same id, role and text as the local store's copy is the
  same message, whatever its time precision, type alias or metadata: it is listed with
  the local content hash, so the core sees it as equal ("identity rule"). A backend that
  answers an empty chat although its list says it holds messages failed to load it: that
  is an error (exit 5), never an empty chat.
- **Saving** reads the chat, merges the batch into the *full* list (never a delta),
  writes every stored message back exactly as it was and each new one in AutoBot's own
  time form (``server_time``), predicts what AutoBot will keep and in which order, and
  leaves out any message AutoBot would drop, show out of order, or whose saving would
  make it drop another, and any whose local time a clock change makes ambiguous; then it
  writes, **reads the chat back** and answers per message: saved or unchanged (with the
  hash the client sent, by the identity rule), conflict (same id, other text), or
  rejected with the reason. Rejected messages stay in the local store (exit 4).
- **Revisions.** AutoBot keeps none; a message's ``rev`` is built from the chat's
  modification time (ms) and 20 bits of the message's own content hash, so revisions grow
  when a chat changes, and a ``base_rev`` still matches while the message is unchanged.
- What a remote cannot do is refused per batch (exit 9, the batch closed, its messages
  kept here), and a safety guard per chat (exit 5), with the reason and what to use.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from pydantic import ValidationError

from chatsave.errors import (
    ExitCode,
    InvalidItemError,
    RefusedError,
    RemoteError,
    RequestRejectedError,
    StoreError,
    UsageError,
)
from chatsave.model import (
    Message,
    chat_id_problem,
    check_chat_id,
    fingerprint,
    renamed_chat_id,
)
from chatsave.normalize import MessageNormalizer, TimeContext, wall_time_problem
from chatsave.protocol import (
    PROTOCOL_VERSION,
    Capabilities,
    ChatInfo,
    ChatPage,
    DeleteAnswer,
    DeleteItem,
    DeleteRequest,
    DigestsAnswer,
    ItemAck,
    ItemConflict,
    ItemRejected,
    MessagePage,
    RemoteMessage,
    SaveAnswer,
    SaveRequest,
)
from chatsave.remote import autobot_rules as rules
from chatsave.remote.base import Remote

# Unconfigured (the CLI), a warning reaches stderr as its bare text.
log = logging.getLogger("chatsave.remote")

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
    # backend, but pulled so that a copy is kept here. id -> (item, why it is not shown).
    held: dict[str, tuple[Item, str]] = field(default_factory=dict)

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
            state.held.setdefault(item.msg.id, (item, why))
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


@dataclass
class _Wanted:
    msg: Message
    sent: str
    base_rev: int | None


@dataclass
class _Plan:
    payload: list[dict[str, Any]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # message ids in the intended order
    write: set[str] = field(default_factory=set)  # ids written (new or overwritten)
    sent: dict[str, Message] = field(default_factory=dict)  # their messages
    unchanged: dict[str, _Wanted] = field(default_factory=dict)
    conflicts: list[ItemConflict] = field(default_factory=list)
    rejected: list[ItemRejected] = field(default_factory=list)
    predicted: dict[str, str] = field(default_factory=dict)  # id -> why AutoBot drops it


class AutobotBase(Remote):
    """The Remote interface over an AutoBot backend (see the module docstring)."""

    server_name = "autobot"
    supports_overwrite = False
    supports_message_delete = False
    # Whether a write goes through AutoBot's merge (it may then drop what it holds now);
    # a file written directly only meets AutoBot's loader later, as it would anyway.
    writes_merge = True
    max_messages = rules.MAX_MESSAGES
    backend_id: str
    tz: tzinfo

    def __init__(self) -> None:
        self.ids = ChatIds()
        self._store: Any = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._pages: dict[str, tuple[ChatState, list[RemoteMessage]]] = {}

    # -------------------------------------------------------- for subclasses
    def _listing(self, fresh: bool = False) -> list[Session]:
        raise NotImplementedError

    def _read(self, chat_id: str, original: str) -> ChatState:
        raise NotImplementedError

    def _write(self, state: ChatState, payload: list[dict[str, Any]], name: str | None
               ) -> None:
        raise NotImplementedError

    def _drop_chat(self, state: ChatState) -> None:
        raise NotImplementedError

    def _probe(self) -> None:
        """Check that the backend answers (and is AutoBot) before anything else."""

    def _state(self, chat_id: str, original: str) -> ChatState:
        """The chat as read, with what AutoBot shows of it decided by its loader's model."""
        return settle(self._read(chat_id, original))

    def _predict(self, state: ChatState, payload: list[rules.Rec]) -> rules.Outcome:
        """What AutoBot will show after ``payload`` is written."""
        return rules.load_settled(payload)

    def _where(self, original: str) -> str:
        return f"{self.url} chat {original!r}"

    # ---------------------------------------------------------------- doctor
    def sessions(self) -> list[Session]:
        """Every chat the backend lists (for ``chatsave doctor``)."""
        return list(self._listing(fresh=True))

    def raw_messages(self, chat_id: str) -> ChatState:
        """The chat as the backend holds it (for ``chatsave doctor``)."""
        return self._state(chat_id, self.ids.original(chat_id))

    # --------------------------------------------------------------- binding
    def bind_store(self, store: Any) -> None:
        """Called by the operations with the local store: id mappings, identity hashes."""
        self._store = store
        self.ids.bind(store)

    def _lock(self, chat_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(chat_id, threading.Lock())

    # --------------------------------------------------------------- reading
    def capabilities(self) -> Capabilities:
        self._probe()
        # identity_hashes: a hash this backend confirms vouches for the id, role and text;
        # its copy may differ in time precision, type alias or metadata (gc and fetch:
        # a body fetched back may not hash the same).
        features = ["autobot", "identity_hashes"]
        if self.supports_overwrite:
            features.append("overwrite")
        if self.supports_message_delete:
            features.append("delete_messages")
        return Capabilities(protocol=PROTOCOL_VERSION, server=self.server_name,
                            backend_id=self.backend_id, max_batch_messages=self.max_messages,
                            max_body_bytes=256 * 1024 * 1024, max_page=1000,
                            idempotency_retention_s=0, features=features)

    def list_chats(self, after: str | None = None, limit: int | None = None) -> ChatPage:
        if after is not None:
            return ChatPage(chats=[], next=None)
        found: dict[str, ChatInfo] = {}
        for session in self._listing():
            chat_id = self.ids.local(session.original)
            if chat_id_problem(chat_id) is not None:
                continue
            known = found.get(chat_id)
            if known is not None:
                known.message_count = max(known.message_count, session.count)
                continue
            found[chat_id] = ChatInfo(chat_id=chat_id, title=session.name,
                                      version=session.version, message_count=session.count,
                                      digest=UNVERIFIED, updated_at=session.updated)
        return ChatPage(chats=list(found.values()), next=None)

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        listed = {self.ids.local(s.original): s for s in self._listing()}
        digests: dict[str, str | None] = {}
        versions: dict[str, int | None] = {}
        for chat_id in chat_ids:
            session = listed.get(chat_id)
            if session is None:
                state = self._state(chat_id, self.ids.original(chat_id))
                exists = state.exists and bool(state.items)
                digests[chat_id] = UNVERIFIED if exists else None
                versions[chat_id] = state.version if exists else None
            else:
                digests[chat_id] = UNVERIFIED
                versions[chat_id] = session.version
        return DigestsAnswer(digests=digests, versions=versions)

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        cached = self._pages.get(chat_id) if after is not None else None
        if cached is None:
            state = self._state(chat_id, self.ids.original(chat_id))
            if state.failed:
                raise FailedLoadError(
                    f"{self._where(state.original)}: {state.failed}; chatsave will not "
                    "treat it as an empty chat, nor save on top of it",
                    hint=self._repair_hint(state))
            listed = self._listed(state)
            # Only the chat being paged through is kept (bounded memory over many chats).
            self._pages = {chat_id: (state, listed)}
            cached = self._pages[chat_id]
        state, listed = cached
        start = int(after or 0)
        size = limit if limit and limit > 0 else len(listed) or 1
        page = listed[start:start + size]
        following = start + size if start + size < len(listed) else None
        return MessagePage(chat_id=chat_id, version=state.version, messages=page,
                           next=following)

    def _repair_hint(self, state: ChatState) -> str:
        return (f"chatsave doctor {state.chat_id} names the trap; on the AutoBot server, "
                f"chatsave doctor {state.chat_id} --repair --remote autobot-dir:PATH rewrites "
                "the chat file in one time form (then save --retry-rejected)")

    def _listed(self, state: ChatState) -> list[RemoteMessage]:
        local = self._local_copies(state.chat_id)
        return [self._wire(state, item, seq, local)
                for seq, item in enumerate((i for i in state.visible if i.msg is not None),
                                           start=1)]

    def held_only(self, chat_id: str) -> list[tuple[RemoteMessage, str]]:
        cached = self._pages.get(chat_id)
        state = cached[0] if cached else self._state(chat_id, self.ids.original(chat_id))
        local = self._local_copies(chat_id)
        return [(self._wire(state, item, 0, local), why) for item, why in state.held.values()]

    def _wire(self, state: ChatState, item: Item, seq: int, local: dict[str, Any]
              ) -> RemoteMessage:
        msg = item.msg
        assert msg is not None
        wire = msg.to_wire()
        return RemoteMessage(
            chat_id=state.chat_id, id=msg.id, seq=seq, rev=state.rev(item),
            content_hash=self._reported_hash(msg, local.get(msg.id)),
            role=msg.role, content=msg.content, created_at=wire["created_at"],
            type=msg.type, metadata=msg.metadata, attachments=msg.attachments,
            extra=msg.extra, inexact=msg.inexact)

    def _local_copies(self, chat_id: str) -> dict[str, Any]:
        """id -> the local store's message (or its evicted stub), for the identity rule."""
        if self._store is None:
            return {}
        try:
            if not self._store.has_chat(chat_id):
                return {}
            return {item.id: item for item in self._store.iter_messages(chat_id)}
        except StoreError as exc:
            # The store is only a helper here: a store that cannot be read (busy, damaged,
            # a row it cannot decode; Store raises StoreError for each) never fails a read
            # of the backend, which is then listed with its own hashes. Anything else is a
            # bug and is raised.
            log.warning("warning: chat %r: the local store could not be read to match "
                        "the backend's messages with their local copies (%s); they are "
                        "compared by their own content hashes", chat_id, exc)
            return {}

    @staticmethod
    def _reported_hash(msg: Message, local: Any) -> str:
        """The local hash when the local copy has the same id, role and text (identity)."""
        if local is None:
            return msg.content_hash
        if isinstance(local, Message):
            same = local.role == msg.role and local.content == msg.content
            return local.content_hash if same else msg.content_hash
        group = next((g for g in TYPE_GROUPS if msg.type in g), frozenset({msg.type}))
        for type_ in group | {msg.type}:
            if fingerprint(msg.role, type_, msg.content) == getattr(local, "fingerprint", None):
                return str(local.content_hash)
        return msg.content_hash

    # ---------------------------------------------------------------- saving
    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        check_chat_id(chat_id)
        wanted, rejected = self._parse_save(chat_id, body)
        original = self.ids.original(chat_id)
        if any(w.base_rev is not None for w in wanted) and not self.supports_overwrite:
            raise AutobotUnsupported(
                f"{self._where(original)}: AutoBot keeps no versions of messages, so "
                "chatsave cannot overwrite one only if it is still the version it saw "
                "(sync --prefer local, trash restore); refused, nothing written",
                hint="on the AutoBot server, --remote autobot-dir:PATH can do it")
        self._pages.pop(chat_id, None)
        with self._lock(chat_id):
            state = self._state(chat_id, original)
            self._guard(state)
            plan = self._plan(state, wanted)
            plan.rejected[:0] = rejected
            after = state
            if plan.write:
                self._write(state, plan.payload, self._title(body, state))
                after = self._state(chat_id, original)
            return self._answer(state, after, plan)

    @staticmethod
    def _title(body: bytes, state: ChatState) -> str | None:
        try:
            title = SaveRequest.model_validate_json(body).title
        except ValidationError:
            title = None
        return state.name or title

    def _parse_save(self, chat_id: str, body: bytes) -> tuple[list[_Wanted],
                                                               list[ItemRejected]]:
        try:
            request = SaveRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestRejectedError(f"{self.url}: not a save request ({exc.errors()[0]})"
                                       ) from None
        wanted: list[_Wanted] = []
        rejected: list[ItemRejected] = []
        seen: set[str] = set()
        for raw in request.messages:
            item = dict(raw)
            mid = item.get("id") if isinstance(item.get("id"), str) else None
            sent = item.pop("content_hash", None)
            base_rev = item.pop("base_rev", None)
            try:
                msg = MessageNormalizer(chat_id).normalize(item)
            except InvalidItemError as exc:
                rejected.append(ItemRejected(id=mid, reason=exc.message))
                continue
            if sent is not None and sent != msg.content_hash:
                rejected.append(ItemRejected(id=msg.id, reason="content_hash does not match "
                                             "the content"))
                continue
            if msg.id in seen:
                rejected.append(ItemRejected(id=msg.id, reason="the same id twice in one "
                                             "request"))
                continue
            seen.add(msg.id)
            wanted.append(_Wanted(msg, msg.content_hash,
                                  base_rev if isinstance(base_rev, int) else None))
        return wanted, rejected

    def _guard(self, state: ChatState) -> None:
        if state.failed:
            raise AutobotGuard(
                f"{self._where(state.original)}: {state.failed}; saving on top of it would "
                "overwrite the chat with only the new messages, so chatsave refused "
                "(nothing written; the messages stay here)",
                hint=self._repair_hint(state))

    def _plan(self, state: ChatState, wanted: list[_Wanted]) -> _Plan:
        plan = _Plan()
        stored = {i.msg.id: i for i in state.items if i.msg is not None}
        # Ids of stored messages chatsave cannot read: writing one of those ids would make
        # AutoBot replace a message nobody has seen.
        unread = {str(rules.raw_id(i.raw)) for i in state.items
                  if i.msg is None and rules.raw_id(i.raw)}
        overwrite: dict[str, Message] = {}
        new: list[_Wanted] = []
        for w in wanted:
            cur = stored.get(w.msg.id)
            if cur is None and w.msg.id in unread:
                plan.conflicts.append(ItemConflict(
                    id=w.msg.id, reason="the backend holds a message under this id that "
                    "chatsave cannot read", rev=0, content_hash=""))
                continue
            if (cur is None or w.base_rev is not None) and \
                    (problem := clock_problem(w.msg.created_at, self.tz)) is not None:
                plan.rejected.append(ItemRejected(id=w.msg.id, reason=problem))
                continue
            if cur is None:
                new.append(w)  # with a base_rev too: nothing there to lose
                continue
            assert cur.msg is not None
            same = cur.msg.role == w.msg.role and cur.msg.content == w.msg.content
            if w.base_rev is not None:
                if (state.rev(cur) & REV_MASK) != (w.base_rev & REV_MASK):
                    plan.conflicts.append(ItemConflict(
                        id=w.msg.id, reason="stale_base_rev", rev=state.rev(cur),
                        content_hash=cur.msg.content_hash))
                else:
                    overwrite[w.msg.id] = w.msg
                    plan.write.add(w.msg.id)
                    plan.sent[w.msg.id] = w.msg
            elif not same:
                plan.conflicts.append(ItemConflict(
                    id=w.msg.id, reason="different_content", rev=state.rev(cur),
                    content_hash=cur.msg.content_hash))
            else:
                plan.unchanged[w.msg.id] = w
        base: list[tuple[datetime | None, int, dict[str, Any], str | None]] = []
        last: datetime | None = None
        for item in state.items:
            # A message chatsave does not change goes back exactly as stored.
            if item.msg is not None and item.msg.id in overwrite:
                raw = to_autobot(overwrite[item.msg.id], self.tz)
            else:
                raw = item.raw
            when = item.msg.created_at if item.msg is not None else last
            last = when or last
            base.append((when, len(base), raw, item.id))
        protected = self._check_base(state, base)
        new.sort(key=lambda w: w.msg.created_at)
        accepted = self._accept(state, base, new, plan, protected)
        entries = base + [(w.msg.created_at, len(base) + n,
                           to_autobot(w.msg, self.tz), w.msg.id)
                          for n, w in enumerate(accepted)]
        entries = in_time_order(entries)
        plan.payload = [raw for _, _, raw, _ in entries]
        plan.order = [mid for _, _, _, mid in entries if mid is not None]
        for w in accepted:
            plan.write.add(w.msg.id)
            plan.sent[w.msg.id] = w.msg
        return plan

    def _simulate(self, state: ChatState, entries: list[tuple[Any, int, dict[str, Any],
                                                              str | None]]
                  ) -> tuple[rules.Outcome, list[rules.Rec]]:
        ordered = in_time_order(entries)
        payload = rules.recs([raw for _, _, raw, _ in ordered],
                             [mid or f"#{n}" for n, (_, _, _, mid) in enumerate(ordered)])
        return self._predict(state, payload), payload

    def _check_base(self, state: ChatState, base: list[Any]) -> set[str]:
        """Refuse a chat where any write would make AutoBot lose what it shows now (or be
        unable to load it); return the messages AutoBot keeps after such a write."""
        if not base:
            return set()
        outcome, payload = self._simulate(state, base)
        if outcome.failed:
            raise AutobotGuard(
                f"{self._where(state.original)}: AutoBot cannot load this chat "
                f"({outcome.failed}): its stored times mix forms its loader cannot compare, "
                "and chatsave writes AutoBot's messages back only as they are; nothing "
                "written",
                hint=self._repair_hint(state))
        shown = {i.msg.id for i in state.visible if i.msg is not None}
        kept = {p.label for p in payload if p.key in outcome.kept_keys()}
        lost = [p for p in payload if p.label in shown and p.label not in kept]
        if lost and self.writes_merge:
            reasons = "; ".join(f"{p.label}: {outcome.dropped[p.key][1]}" for p in lost[:3])
            raise AutobotGuard(
                f"{self._where(state.original)}: any save through AutoBot's API makes it drop "
                f"{len(lost)} message(s) it holds now ({reasons}); chatsave refused to save "
                "into this chat (nothing written; the messages stay here)",
                hint="on the AutoBot server, --remote autobot-dir:PATH writes the chat file "
                "without AutoBot's merge")
        return kept

    def _accept(self, state: ChatState, base: list[Any], new: list[_Wanted],
                plan: _Plan, shown: set[str]) -> list[_Wanted]:
        """The new messages AutoBot will keep without dropping anything else it keeps.

        All at once when that is fine (the usual case); else in chunks, and one by one
        only inside a chunk that is not, so a large batch costs few simulations.
        """
        if not new:
            return []
        room = max(0, self.max_messages - len(base))
        for w in new[room:]:
            plan.rejected.append(ItemRejected(id=w.msg.id, reason=(
                f"not sent: AutoBot keeps at most {self.max_messages} messages per chat and "
                "would drop the oldest to make room")))
        new = new[:room]
        raws = {w.msg.id: to_autobot(w.msg, self.tz) for w in new}

        def trial(candidates: list[_Wanted]) -> tuple[rules.Outcome, dict[str, rules.Rec]]:
            entries = base + [(w.msg.created_at, len(base) + n, raws[w.msg.id], w.msg.id)
                              for n, w in enumerate(candidates)]
            outcome, payload = self._simulate(state, entries)
            return outcome, {p.label: p for p in payload}  # in time order

        def misplaced(outcome: rules.Outcome, by_label: dict[str, rules.Rec],
                      candidates: list[_Wanted]) -> dict[str, str]:
            return _misplaced(list(by_label), [r.label for r in outcome.kept],
                              {w.msg.id for w in candidates})

        def fine(outcome: rules.Outcome, by_label: dict[str, rules.Rec],
                 candidates: list[_Wanted]) -> bool:
            kept = outcome.kept_keys()
            return not outcome.failed and all(
                by_label[label].key in kept for label in shown | {w.msg.id for w in candidates}
                if label in by_label) and not misplaced(outcome, by_label, candidates)

        accepted: list[_Wanted] = []
        step = len(new)
        i = 0
        while i < len(new):
            chunk = new[i:i + step]
            outcome, by_label = trial([*accepted, *chunk])
            if fine(outcome, by_label, [*accepted, *chunk]):
                accepted.extend(chunk)
                i += len(chunk)
                continue
            if len(chunk) > 1:
                step = max(1, min(64, len(chunk) // 8))
                if step < len(chunk):
                    continue
                step = 1
                continue
            w = chunk[0]
            i += 1
            step = min(64, len(new))  # past the trouble: big steps again
            kept = outcome.kept_keys()
            if outcome.failed:
                why = (f"saving it would leave AutoBot unable to load the chat "
                       f"({outcome.failed})")
            elif by_label[w.msg.id].key not in kept:
                why = outcome.dropped.get(by_label[w.msg.id].key, (None, "AutoBot would "
                                                                 "drop it"))[1]
            elif misplaced(outcome, by_label, [w]):
                why = ("AutoBot would show it out of order: it sorts a chat on the timestamp "
                       "text, and the times stored in this chat are not all in one form (the "
                       "web client's 2026-03-01T10:00:00.000Z sorts after AutoBot's "
                       "2026-03-01 10:00:00 of the same day); chatsave doctor names them, and "
                       "on the AutoBot server chatsave doctor --repair with autobot-dir:PATH "
                       "rewrites them in one form")
            else:
                victims = [label for label in shown | {a.msg.id for a in accepted}
                           if label in by_label and by_label[label].key not in kept]
                why = (f"saving it would make AutoBot drop {', '.join(victims[:3])} "
                       f"({outcome.dropped[by_label[victims[0]].key][1]})")
            plan.predicted[w.msg.id] = why
            plan.rejected.append(ItemRejected(id=w.msg.id, reason=f"not sent: {why}"))
        return accepted

    def _answer(self, before: ChatState, after: ChatState, plan: _Plan) -> SaveAnswer:
        answer = SaveAnswer(chat_id=before.chat_id, version=after.version,
                            conflicts=plan.conflicts, rejected=plan.rejected)
        shown = {i.msg.id: i for i in after.visible if i.msg is not None}
        targets: dict[str, tuple[str, Message]] = {}
        for mid, w in plan.unchanged.items():
            targets[mid] = ("unchanged", w.msg)
        for mid in plan.write:
            targets[mid] = ("saved", plan.sent[mid])
        present = []
        for mid, (_kind, msg) in targets.items():
            got = shown.get(mid)
            if got is None or got.msg is None:
                answer.rejected.append(ItemRejected(id=mid, reason=self._why_missing(
                    mid, before, after, plan)))
                continue
            if got.msg.role != msg.role or got.msg.content != msg.content:
                answer.rejected.append(ItemRejected(
                    id=mid, reason="AutoBot holds other text under this id after the save"))
                continue
            present.append(mid)
        misplaced = _misplaced(plan.order, [i.msg.id for i in after.visible
                                            if i.msg is not None], set(present))
        for mid in present:
            kind, msg = targets[mid]
            if mid in misplaced:
                answer.rejected.append(ItemRejected(id=mid, reason=misplaced[mid]))
                continue
            ack = ItemAck(id=mid, rev=after.rev(shown[mid]), content_hash=msg.content_hash)
            (answer.saved if kind == "saved" else answer.unchanged).append(ack)
        return answer

    def _why_missing(self, mid: str, before: ChatState, after: ChatState, plan: _Plan) -> str:
        if not after.visible:
            if before.visible:
                return ("AutoBot returned the chat empty when it was read back after the save "
                        f"({after.failed or 'a failed load?'}); the message stays here")
            return ("AutoBot did not store it: the chat was still empty when read back after "
                    "the save (its answer is 200 whatever happens)")
        if mid in plan.predicted:
            return plan.predicted[mid]
        if mid in after.held:
            return f"AutoBot will not show it: {after.held[mid][1]}"
        outcome, payload = self._simulate(
            before, [(None, n, raw, raw.get("id") if isinstance(raw.get("id"), str) else None)
                    for n, raw in enumerate(plan.payload)])
        for rec in payload:
            if rec.label == mid and rec.key in outcome.dropped:
                return f"dropped by AutoBot's save: {outcome.dropped[rec.key][1]}"
        return "dropped by AutoBot: not in the chat when it was read back after the save"

    # -------------------------------------------------------------- deleting
    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        check_chat_id(chat_id)
        try:
            request = DeleteRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestRejectedError(f"{self.url}: not a delete request "
                                       f"({exc.errors()[0]})") from None
        original = self.ids.original(chat_id)
        wanted = [(e, None) if isinstance(e, str) else (e.id, e.base_rev)
                  for e in request.ids if isinstance(e, str | DeleteItem)]
        self._pages.pop(chat_id, None)
        with self._lock(chat_id):
            state = self._state(chat_id, original)
            self._guard(state)
            stored = {i.msg.id: i for i in state.items if i.msg is not None}
            answer = DeleteAnswer(chat_id=chat_id, version=state.version)
            doomed: dict[str, Item] = {}
            for mid, base_rev in wanted:
                cur = stored.get(mid)
                if cur is None:
                    answer.missing.append(mid)
                elif base_rev is not None and (state.rev(cur) & REV_MASK) != \
                        (base_rev & REV_MASK):
                    assert cur.msg is not None
                    answer.conflicts.append(ItemConflict(
                        id=mid, reason="changed on the backend", rev=state.rev(cur),
                        content_hash=cur.msg.content_hash))
                else:
                    doomed[mid] = cur
            if not doomed:
                return answer
            if self.supports_message_delete:
                remaining = [i for i in state.items if i.id not in doomed]
                self._write(state, [i.raw for i in remaining], state.name)
            else:
                self._delete_whole(state, doomed, answer)
            after = self._state(chat_id, original)
            still = {i.msg.id for i in after.items if i.msg is not None}
            for mid, item in doomed.items():
                if mid not in still:
                    assert item.msg is not None
                    answer.deleted.append(ItemAck(id=mid, rev=state.rev(item),
                                                  content_hash=item.msg.content_hash))
            answer.version = after.version
            return answer

    def _delete_whole(self, state: ChatState, doomed: dict[str, Item],
                      answer: DeleteAnswer) -> None:
        others = [i for i in state.items if i.id not in doomed]
        if others or answer.conflicts:
            raise AutobotUnsupported(
                f"{self._where(state.original)}: AutoBot has no way to delete single "
                f"messages over HTTP (it can only delete a whole chat, and this one holds "
                f"{len(others)} other message(s)); refused, nothing deleted on the backend",
                hint="the messages are deleted here; to delete them on the backend, run the "
                "same command on the AutoBot server with --remote autobot-dir:PATH (or "
                "chatsave trash restore to bring them back here)")
        self._drop_chat(state)


def in_time_order(entries: list[tuple[Any, int, dict[str, Any], str | None]]
                   ) -> list[tuple[Any, int, dict[str, Any], str | None]]:
    """Stable order by time; entries without one stay right after their predecessor."""
    keyed = []
    last: Any = None
    for entry in sorted(entries, key=lambda e: e[1]):
        when = entry[0] if entry[0] is not None else last
        last = when if when is not None else last
        keyed.append((when, entry))
    if all(k is None for k, _ in keyed):
        return [e for _, e in keyed]
    floor = min(k for k, _ in keyed if k is not None)
    return [e for _, e in sorted(keyed, key=lambda p: (p[0] or floor, p[1][1]))]


def _misplaced(expected: list[str], actual: list[str], batch: set[str]) -> dict[str, str]:
    """Messages of ``batch`` that AutoBot put on the wrong side of another message."""
    position = {mid: n for n, mid in enumerate(actual)}
    placed = [(mid, position[mid]) for mid in expected if mid in position]
    before = [-1] * len(placed)  # the latest actual position among those meant to come first
    after = [len(actual)] * len(placed)  # the earliest among those meant to come later
    for k in range(1, len(placed)):
        before[k] = max(before[k - 1], placed[k - 1][1])
    for k in range(len(placed) - 2, -1, -1):
        after[k] = min(after[k + 1], placed[k + 1][1])
    out = {}
    for k, (mid, at) in enumerate(placed):
        if mid in batch and (before[k] > at or after[k] < at):
            out[mid] = ("reordered: AutoBot sorts a chat on the timestamp text and put it on "
                        "the wrong side of another message; it is stored, and stays listed "
                        "here until a sync confirms it")
    return out
