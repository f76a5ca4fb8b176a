"""The adapter the two AutoBot remotes share: the Remote interface over AutoBot, made honest.

AutoBot (docs/autobot.md) has no versions, no idempotency, no per-message answers and a lossy
merge, so its remotes give the core the Remote interface's guarantees by other means.
AutobotBase reads, locks, saves and deletes; its subclasses reach the backend (``http``:
AutoBot's HTTP API, ``directory``: its chat files). What it reads and writes is shaped in
chatsave.remote.autobot.shapes, and what a save writes is decided by the pure planner
(chatsave.remote.autobot.planner):

- **Reading** presents a chat as AutoBot will show it: the stored list run through the
  model of AutoBot's loader (chatsave.remote.autobot.rules). What the backend stores but
  will not show (the next load drops it, or only a stale file holds it) is *held*: never
  counted as on the backend, but offered to sync (``held_only``) so that a copy is kept
  here. A message that has the same id, role and text as the local store's copy is the
  same message, whatever its time precision, type alias or metadata: it is listed with
  the local content hash, so the core sees it as equal ("identity rule"). A backend that
  answers an empty chat although its list says it holds messages failed to load it: that
  is an error (exit 5), never an empty chat.
- **Saving** reads the chat under a per-chat lock, has the planner merge the batch into
  the *full* list (never a delta) and leave out what AutoBot would drop or misplace, then
  writes, **reads the chat back** and has the planner answer per message: saved or
  unchanged, conflict, or rejected with the reason. Rejected messages stay in the local
  store (exit 4).
- **Revisions.** AutoBot keeps none; a message's ``rev`` is built from the chat's
  modification time (ms) and 20 bits of the message's own content hash, so revisions grow
  when a chat changes, and a ``base_rev`` still matches while the message is unchanged.
- What a remote cannot do is refused per batch (exit 9, the batch closed, its messages
  kept here), and a safety guard per chat (exit 5), with the reason and what to use.
"""

from __future__ import annotations

import logging
import threading
from datetime import tzinfo
from typing import Any

from pydantic import ValidationError

from chatsave.errors import InvalidItemError, RequestRejectedError, StoreError
from chatsave.model import Message, chat_id_problem, check_chat_id, fingerprint
from chatsave.normalize import MessageNormalizer
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
from chatsave.remote.autobot import planner, rules
from chatsave.remote.autobot.planner import Wanted
from chatsave.remote.autobot.shapes import (
    REV_MASK,
    TYPE_GROUPS,
    UNVERIFIED,
    AutobotGuard,
    AutobotUnsupported,
    ChatIds,
    ChatState,
    FailedLoadError,
    Item,
    Session,
    chat_where,
    repair_hint,
    settle,
)
from chatsave.remote.base import Remote

# Unconfigured (the CLI), a warning reaches stderr as its bare text.
log = logging.getLogger("chatsave.remote")


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
        return chat_where(self.url, original)

    def _target(self) -> planner.Target:
        """What the planner needs to know of this remote."""
        return planner.Target(url=self.url, tz=self.tz, max_messages=self.max_messages,
                              writes_merge=self.writes_merge, predict=self._predict)

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
                    hint=repair_hint(state.chat_id))
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
            target = self._target()
            plan = planner.plan_save(target, state, wanted)
            plan.rejected[:0] = rejected
            after = state
            if plan.write:
                self._write(state, plan.payload, self._title(body, state))
                after = self._state(chat_id, original)
            return planner.answer_save(target, state, after, plan)

    @staticmethod
    def _title(body: bytes, state: ChatState) -> str | None:
        try:
            title = SaveRequest.model_validate_json(body).title
        except ValidationError:
            title = None
        return state.name or title

    def _parse_save(self, chat_id: str, body: bytes) -> tuple[list[Wanted],
                                                               list[ItemRejected]]:
        try:
            request = SaveRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestRejectedError(f"{self.url}: not a save request ({exc.errors()[0]})"
                                       ) from None
        wanted: list[Wanted] = []
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
            wanted.append(Wanted(msg, msg.content_hash,
                                 base_rev if isinstance(base_rev, int) else None))
        return wanted, rejected

    def _guard(self, state: ChatState) -> None:
        if state.failed:
            raise AutobotGuard(
                f"{self._where(state.original)}: {state.failed}; saving on top of it would "
                "overwrite the chat with only the new messages, so chatsave refused "
                "(nothing written; the messages stay here)",
                hint=repair_hint(state.chat_id))

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

