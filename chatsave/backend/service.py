"""Protocol v1 semantics over a Storage: validation, idempotency, limits, base_rev rules, answers.

Both transports share this code: the FastAPI app (app.py) is a thin adapter around it and
the embedded remote (chatsave/remote/embedded.py) calls it in-process. Every method takes the
user, the path parameters and the raw request body, and returns ``(status, answer, headers)``
where ``answer`` is the JSON object the protocol promises (an error envelope for non-2xx).

Write requests (save, delete, alias save) are exactly-once per (user, Idempotency-Key):
each executes in one write transaction that locks the chat, reads the key's record (a
replay returns the stored answer), applies the request and stores its answer as the record.
A request that dies midway (its server killed) commits nothing, so it leaves no trace that
could hold up its retry; two requests with one key serialise on the chat's lock
(docs/reliability.md, "A server killed mid-request").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from chatsave import __version__, strictjson
from chatsave.backend.answers import (
    Answer,
    RenderedAnswer,
    ServiceError,
    ack,
    answer_json,
    conflict,
)
from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage.base import (
    STALE_DIGEST,
    ChatRow,
    IdempotencyRecord,
    MessageRow,
    Storage,
    StorageError,
    StorageUnavailable,
    WriteTx,
)
from chatsave.backend.validation import (
    MAX_ITEM_DEPTH,
    alias_shape,
    depth,
    errors,
    has_surrogate,
    quote,
    save_shape,
    validation_reason,
)
from chatsave.backend.validation import fingerprint as request_fingerprint
from chatsave.errors import InvalidItemError
from chatsave.model import (
    MESSAGE_ID_MAX,
    Message,
    canonical_json,
    chat_id_problem,
    format_time,
    message_id_problem,
)
from chatsave.normalize import MessageNormalizer
from chatsave.protocol import (
    API_PREFIX,
    PROTOCOL_VERSION,
    DeleteItem,
    DeleteRequest,
    DigestsRequest,
)

log = logging.getLogger("chatsave.server")

_M = TypeVar("_M", bound=BaseModel)

FEATURES = ["base_rev", "tombstones", "include_deleted", "digests", "idempotency",
            "alias_save"]
_KEY_MAX = 255
ALIAS_KEY_PREFIX = "derived:"
#: the largest seq (and rev) the storages hold: 64-bit signed integers
SEQ_MAX = 2**63 - 1
#: times a write starts again after losing the race for a new key to a concurrent request
_KEY_RACE_ATTEMPTS = 3


def _now_text(now: float) -> str:
    return format_time(datetime.fromtimestamp(now, UTC))


@dataclass
class _Item:
    """One message of a save batch after validation (``reject`` set if it failed)."""

    id: str | None
    reject: str | None = None
    message: Message | None = None
    body: str | None = None
    content_hash: str | None = None
    base_rev: int | None = None


@dataclass
class _Outcome:
    saved: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


class _Abort(Exception):
    """Roll the write transaction back and answer with ``answer`` (nothing is stored)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer[1])
        self.result = answer


class _KeyRace(Exception):
    """A concurrent request committed a record for the key first; nothing was written."""


def _body_json(message: Message) -> str:
    """The stored body: the wire object without chat_id and id (built directly, not from
    ``to_wire`` minus two keys: this runs once per message saved)."""
    body: dict[str, Any] = {
        "role": message.role, "content": message.content,
        "created_at": message.created_at_text, "type": message.type,
        "metadata": message.metadata, "attachments": message.attachments,
        "extra": message.extra,
    }
    if message.inexact:
        body["inexact"] = True
    return canonical_json(body)


class Service:
    """Protocol v1 over one Storage. Thread-safe; holds no state that matters."""

    def __init__(self, storage: Storage, settings: ServerSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.settings = settings or ServerSettings()
        self.clock = clock
        self._housekeeping_lock = threading.Lock()

    # -- read-only endpoints -----------------------------------------------------------

    def capabilities(self) -> Answer:
        s = self.settings
        return 200, {
            "protocol": PROTOCOL_VERSION,
            "server": f"chatsave/{__version__}",
            "backend_id": self.storage.backend_id,
            "max_batch_messages": s.max_batch_messages,
            "max_body_bytes": s.max_body_bytes,
            "max_page": s.max_page,
            "idempotency_retention_s": s.idempotency_retention_s,
            "features": list(FEATURES),
            "max_content_bytes": s.max_content_bytes,
        }, {}

    def health(self) -> Answer:
        try:
            self.storage.ping()
        except StorageError as exc:
            log.warning("health: storage unavailable: %s", exc)
            return ServiceError(503, "storage_unavailable", "the storage does not answer",
                                headers=self._retry_after()).answer()
        return 200, {"status": "ok", "storage": "ok"}, {}

    def list_chats(self, user: str, after: str | None = None,
                   limit: int | None = None) -> Answer:
        return self._guard(lambda: self._list_chats(user, after, limit))

    def _list_chats(self, user: str, after: str | None, limit: int | None) -> Answer:
        if after is not None and ("\0" in after or has_surrogate(after)):
            # No chat id contains either; PostgreSQL text cannot even hold U+0000.
            raise ServiceError(422, "invalid_request",
                               "after must be a chat id (the next of a page), not "
                               f"{quote(after)}")
        size = self._page_size(limit)
        rows = self.storage.list_chats(user, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return 200, {
            "chats": [self._chat_info(r) for r in self._fresh(user, rows)],
            "next": rows[-1].chat_id if more and rows else None,
        }, {}

    def digests(self, user: str, body: bytes) -> Answer:
        return self._guard(lambda: self._digests(user, body))

    def _digests(self, user: str, body: bytes) -> Answer:
        self._check_body_size(body)
        req = self._model(DigestsRequest, self._json(body))
        if len(req.chat_ids) > self.settings.max_page:
            raise ServiceError(
                413, "batch_too_large",
                f"{len(req.chat_ids)} chat ids in one request; the limit is "
                f"{self.settings.max_page}", {"limit": self.settings.max_page})
        wanted = [c for c in dict.fromkeys(req.chat_ids) if chat_id_problem(c) is None]
        found = self.storage.get_chats(user, wanted)
        self._fresh(user, list(found.values()))
        digests: dict[str, str | None] = {}
        versions: dict[str, int | None] = {}
        for chat_id in req.chat_ids:
            row = found.get(chat_id)
            digests[chat_id] = row.digest if row else None
            versions[chat_id] = row.version if row else None
        return 200, {"digests": digests, "versions": versions}, {}

    def messages(self, user: str, chat_id: str, after: int | None = None,
                 limit: int | None = None, include_deleted: bool = False) -> Answer:
        return self._guard(lambda: self._messages(user, chat_id, after, limit, include_deleted))

    def _messages(self, user: str, chat_id: str, after: int | None, limit: int | None,
                  include_deleted: bool) -> Answer:
        self._check_chat_id(chat_id)
        if after is not None and not 0 <= after <= SEQ_MAX:
            raise ServiceError(422, "invalid_request",
                               f"after must be a seq from 0 to {SEQ_MAX}")
        size = self._page_size(limit)
        chat, rows = self.storage.read_messages(user, chat_id, after or 0, size + 1,
                                                include_deleted)
        if chat is None:
            raise self._not_found(chat_id)
        more = len(rows) > size
        rows = rows[:size]
        return 200, {
            "chat_id": chat_id,
            "version": chat.version,
            "messages": [self._remote_message(chat_id, r) for r in rows],
            "next": rows[-1].seq if more and rows else None,
        }, {}

    # -- writes ------------------------------------------------------------------------

    def save(self, user: str, chat_id: str, body: bytes, idempotency_key: str | None) -> Answer:
        """POST /chats/{id}/save: bulk upsert of wire messages (docs/protocol.md, "Save")."""
        return self._guard(lambda: self._save(user, chat_id, body, idempotency_key))

    def _save(self, user: str, chat_id: str, body: bytes, key: str | None) -> Answer:
        self._check_chat_id(chat_id)
        key = self._check_key(key)
        self._check_body_size(body)
        raw_messages, title = save_shape(self._json(body))
        self._check_batch(len(raw_messages))
        title = self._check_title(title)
        items = self._prepare_items(chat_id, raw_messages)
        fingerprint = request_fingerprint("POST", f"{API_PREFIX}/chats/{chat_id}/save", body)
        return self._idempotent(
            user, chat_id, key, fingerprint,
            lambda tx, chat, now: self._apply_save(tx, chat, user, chat_id, items, title, now))

    def delete(self, user: str, chat_id: str, body: bytes, idempotency_key: str | None) -> Answer:
        """POST /chats/{id}/delete: turn messages into tombstones."""
        return self._guard(lambda: self._delete(user, chat_id, body, idempotency_key))

    def _delete(self, user: str, chat_id: str, body: bytes, key: str | None) -> Answer:
        self._check_chat_id(chat_id)
        key = self._check_key(key)
        self._check_body_size(body)
        req = self._model(DeleteRequest, self._json(body))
        self._check_batch(len(req.ids))
        targets = [DeleteItem(id=i) if isinstance(i, str) else i for i in req.ids]
        fingerprint = request_fingerprint("POST", f"{API_PREFIX}/chats/{chat_id}/delete", body)
        return self._idempotent(
            user, chat_id, key, fingerprint,
            lambda tx, chat, now: self._apply_delete(tx, chat, user, chat_id, targets, now))

    def alias_save(self, user: str, chat_id: str, body: bytes,
                   idempotency_key: str | None) -> Answer:
        """POST /api/chats/{id}/save: the web clients' path and body shapes.

        Accepts ``{"messages": [...]}`` and ``{"data": {"messages": [...], "name": ...}}``;
        messages are normalised with the same code as ``import``. Without an
        Idempotency-Key the key is derived from the normalised request (ids, content
        hashes, all fields), so a web client's blind retry is a replay, never a duplicate.
        A derived key replays only while the chat is as that answer left it: the same body
        sent again after the chat changed (a message deleted) is a new, deliberate save,
        executed and answered truthfully. The request fingerprint is the normalised request.
        """
        return self._guard(lambda: self._alias_save(user, chat_id, body, idempotency_key))

    def _alias_save(self, user: str, chat_id: str, body: bytes, key: str | None) -> Answer:
        self._check_chat_id(chat_id)
        self._check_body_size(body)
        doc = self._json(body)
        raw_messages, title = alias_shape(doc)
        self._check_batch(len(raw_messages))
        title = self._check_title(title)
        normalizer = MessageNormalizer(chat_id)
        items: list[_Item] = []
        for raw in raw_messages:
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            shown_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MESSAGE_ID_MAX \
                else None
            if depth(raw) > MAX_ITEM_DEPTH:
                items.append(_Item(id=shown_id,
                                   reject=f"nested deeper than {MAX_ITEM_DEPTH} levels"))
                continue
            try:
                message = normalizer.normalize(raw)
            except InvalidItemError as exc:
                items.append(_Item(id=shown_id, reject=exc.message))
                continue
            items.append(self._item_from_message(message, None, None))
        canonical = canonical_json({
            "chat_id": chat_id, "title": title,
            "messages": [[it.id, it.content_hash, it.body, it.reject] for it in items],
        }).encode("utf-8", "surrogatepass")
        fingerprint = request_fingerprint("POST", f"/api/chats/{chat_id}/save", canonical)
        derived = key is None or not key.strip()
        if derived:
            key = ALIAS_KEY_PREFIX + hashlib.sha256(canonical).hexdigest()
        else:
            key = self._check_key(key)
        assert key is not None
        return self._idempotent(
            user, chat_id, key, fingerprint,
            lambda tx, chat, now: self._apply_save(tx, chat, user, chat_id, items, title, now),
            derived=derived)

    # -- housekeeping ------------------------------------------------------------------

    def housekeeping(self, now: float | None = None) -> dict[str, int]:
        """Purge idempotency records past retention and tombstones past theirs."""
        now = self.clock() if now is None else now
        s = self.settings
        with self._housekeeping_lock:
            idem = self.storage.purge_idempotency(now - s.idempotency_retention_s)
            tombs = 0
            if s.tombstone_retention_s is not None:
                tombs = self.storage.purge_tombstones(now - s.tombstone_retention_s)
        if idem or tombs:
            log.info("housekeeping: purged %d idempotency records, %d tombstones", idem, tombs)
        return {"idempotency_records": idem, "tombstones": tombs}

    def maybe_housekeep(self, now: float | None = None) -> dict[str, int] | None:
        """Run housekeeping if its interval has passed since the last run (any process)."""
        interval = self.settings.housekeeping_interval_s
        if interval <= 0:
            return None
        now = self.clock() if now is None else now
        if not self.storage.housekeeping_due(interval, now):
            return None
        return self.housekeeping(now)

    # -- idempotent execution ----------------------------------------------------------

    def _idempotent(self, user: str, chat_id: str, key: str, fingerprint: str,
                    apply: Callable[[WriteTx, ChatRow | None, float], Answer], *,
                    derived: bool = False) -> Answer:
        """Execute a write exactly once per (user, key), or replay its stored answer.

        One transaction: lock the chat, read the key's record, apply, store the answer as
        the record. A second request with the key queues on the chat's lock and then finds
        the first one's record. ``derived``: the key was derived from the request (alias
        save), so its answer is replayed only if the chat has not changed since.
        """
        for _attempt in range(_KEY_RACE_ATTEMPTS):
            try:
                with self.storage.write() as tx:
                    now = self.clock()
                    chat = tx.lock_chat(user, chat_id)
                    record = tx.get_record(user, key)
                    replay = self._replay(record, key, fingerprint, chat, derived, now)
                    if replay is not None:
                        return replay
                    status, answer, headers = apply(tx, chat, now)
                    if status != 200:
                        raise _Abort((status, answer, headers))
                    rendered = RenderedAnswer(answer, answer_json(answer))
                    if not tx.put_record(user, key, fingerprint, status, rendered.text, now,
                                         replace=record is not None):
                        raise _KeyRace
                return status, rendered, headers
            except _Abort as abort:
                return abort.result
            except _KeyRace:
                continue
        raise StorageUnavailable(f"idempotency key {key!r} of user {user!r}: lost "
                                 f"{_KEY_RACE_ATTEMPTS} races to concurrent requests")

    def _replay(self, record: IdempotencyRecord | None, key: str, fingerprint: str,
                chat: ChatRow | None, derived: bool, now: float) -> Answer | None:
        """The stored answer to send again, None to execute, or a ServiceError."""
        if record is None:
            return None
        if record.state == "running":
            # A lease an earlier server version took before executing: honoured while
            # valid (its request may still finish), absent once expired.
            if record.lease_expires is None or record.lease_expires <= now:
                return None
            raise ServiceError(
                409, "idempotency_key_in_use",
                "a request with this Idempotency-Key is still running; retry later",
                {"idempotency_key": key},
                headers={"Retry-After": str(max(1, min(5, math.ceil(
                    record.lease_expires - now))))})
        if record.fingerprint != fingerprint:
            raise ServiceError(
                422, "idempotency_key_reused",
                "this Idempotency-Key was already used for a different request",
                {"idempotency_key": key})
        assert record.status is not None and record.answer is not None
        answer = json.loads(record.answer)
        if derived and answer.get("version") != (chat.version if chat else 0):
            return None  # the answer is no longer true: a deliberate save, not a retry
        return record.status, RenderedAnswer(answer, record.answer), \
            {"Idempotent-Replayed": "true"}

    # -- applying writes (inside the transaction) --------------------------------------

    def _apply_save(self, tx: WriteTx, chat: ChatRow | None, user: str, chat_id: str,
                    items: list[_Item], title: str | None, now: float) -> Answer:
        out = _Outcome()
        valid = [it for it in items if it.reject is None]
        if chat is None:
            if not valid and title is None:
                out.rejected = [{"id": it.id, "reason": it.reject} for it in items]
                return 200, self._save_answer(chat_id, 0, out), {}
            chat = tx.create_chat(user, chat_id, _now_text(now))
        existing = tx.get_messages(user, chat_id, [it.id for it in valid if it.id])
        changed = False
        seen: set[str] = set()
        new_rows: list[MessageRow] = []
        restored = 0
        for it in items:
            if it.reject is not None:
                out.rejected.append({"id": it.id, "reason": it.reject})
                continue
            assert it.id is not None and it.content_hash is not None and it.body is not None
            if it.id in seen:
                out.rejected.append({"id": it.id, "reason": "duplicate id in this batch"})
                continue
            seen.add(it.id)
            current = existing.get(it.id)
            if current is None:
                row = MessageRow(id=it.id, seq=chat.next_seq, rev=1,
                                 content_hash=it.content_hash, deleted=False, body=it.body,
                                 updated_at=now)
                chat.next_seq += 1
                new_rows.append(row)
                out.saved.append(ack(row))
                changed = True
            elif it.base_rev is None:
                if current.deleted:
                    out.conflicts.append(conflict(current, "deleted"))
                elif current.content_hash == it.content_hash:
                    out.unchanged.append(ack(current))
                else:
                    out.conflicts.append(conflict(current, "different_content"))
            elif it.base_rev != current.rev:
                out.conflicts.append(conflict(current, "stale_base_rev"))
            elif not current.deleted and current.body == it.body:
                out.unchanged.append(ack(current))
            else:  # the write wins: overwrite, or restore a tombstone
                row = MessageRow(id=it.id, seq=current.seq, rev=current.rev + 1,
                                 content_hash=it.content_hash, deleted=False, body=it.body,
                                 updated_at=now)
                tx.update_message(user, chat_id, row)
                out.saved.append(ack(row))
                restored += current.deleted
                changed = True
        tx.insert_messages(user, chat_id, new_rows)
        if title is not None and title != chat.title:
            chat.title = title
            changed = True
        if changed:
            self._bump(tx, chat, now, len(new_rows) + restored)
        return 200, self._save_answer(chat_id, chat.version, out), {}

    def _apply_delete(self, tx: WriteTx, chat: ChatRow | None, user: str, chat_id: str,
                      targets: list[DeleteItem], now: float) -> Answer:
        if chat is None:
            raise _Abort(self._not_found(chat_id).answer())
        ids = list(dict.fromkeys(t.id for t in targets))
        existing = tx.get_messages(user, chat_id,
                                   [i for i in ids if message_id_problem(i) is None])
        deleted: list[dict[str, Any]] = []
        missing: list[str] = []
        conflicts: list[dict[str, Any]] = []
        changed = False
        removed = 0
        seen: set[str] = set()
        for target in targets:
            if target.id in seen:
                continue
            seen.add(target.id)
            current = existing.get(target.id)
            if current is None:
                missing.append(target.id)
            elif current.deleted:
                deleted.append(ack(current))  # already a tombstone: nothing to do
            elif target.base_rev is not None and target.base_rev != current.rev:
                conflicts.append(conflict(current, "stale_base_rev"))
            else:
                row = MessageRow(id=current.id, seq=current.seq, rev=current.rev + 1,
                                 content_hash=current.content_hash, deleted=True, body=None,
                                 updated_at=now, deleted_at=now)
                tx.update_message(user, chat_id, row)
                deleted.append(ack(row))
                changed = True
                removed += 1
        if changed:
            self._bump(tx, chat, now, -removed)
        return 200, {"chat_id": chat_id, "version": chat.version, "deleted": deleted,
                     "missing": missing, "conflicts": conflicts}, {}

    def _bump(self, tx: WriteTx, chat: ChatRow, now: float, live_delta: int) -> None:
        """A new version of the chat. Its digest is computed when it is next read, not on
        every write: a chat saved in many batches is hashed once, not once per batch."""
        chat.version += 1
        chat.message_count += live_delta
        chat.digest = STALE_DIGEST
        chat.updated_at = _now_text(now)
        tx.save_chat(chat)

    def _fresh(self, user: str, rows: list[ChatRow]) -> list[ChatRow]:
        """The chat rows with the digests a write left stale computed (and remembered, all
        in one transaction)."""
        computed: list[tuple[str, int, str]] = []
        for row in rows:
            if row.digest != STALE_DIGEST:
                continue
            found = self.storage.compute_digest(user, row.chat_id)
            if found is not None:
                row.version, row.digest = found
                computed.append((row.chat_id, row.version, row.digest))
        if computed:
            try:
                self.storage.store_digests(user, computed)
            except StorageError as exc:  # computed again next time
                log.warning("could not remember digests: %s", exc)
        return rows

    # -- validation --------------------------------------------------------------------

    def _prepare_items(self, chat_id: str, raws: list[Any]) -> list[_Item]:
        return [self._prepare_item(chat_id, raw) for raw in raws]

    def _prepare_item(self, chat_id: str, raw: Any) -> _Item:
        if not isinstance(raw, dict):
            return _Item(id=None, reject=f"not a JSON object ({type(raw).__name__})")
        raw_id = raw.get("id")
        problem = message_id_problem(raw_id)
        if problem is not None:
            shown = raw_id if isinstance(raw_id, str) and len(raw_id) <= MESSAGE_ID_MAX \
                else None
            return _Item(id=shown, reject=f"invalid message id {quote(raw_id)}: {problem}")
        if depth(raw) > MAX_ITEM_DEPTH:
            return _Item(id=raw_id, reject=f"nested deeper than {MAX_ITEM_DEPTH} levels")
        fields = dict(raw)
        base_rev = fields.pop("base_rev", None)
        claimed = fields.pop("content_hash", None)
        if base_rev is not None and (not isinstance(base_rev, int) or isinstance(base_rev, bool)
                                     or base_rev < 0):
            return _Item(id=raw_id, reject=f"base_rev must be an integer >= 0, not "
                                           f"{quote(base_rev)}")
        if claimed is not None and not isinstance(claimed, str):
            return _Item(id=raw_id, reject="content_hash must be a string")
        own = fields.get("chat_id")
        if own is None:
            fields["chat_id"] = chat_id
        elif own != chat_id:
            return _Item(id=raw_id, reject=f"says it belongs to chat {quote(own)}, sent to "
                                           f"chat {chat_id!r}")
        content = fields.get("content")
        if isinstance(content, str) and \
                len(content.encode("utf-8", "surrogatepass")) > self.settings.max_content_bytes:
            return _Item(id=raw_id, reject=f"content larger than "
                                           f"{self.settings.max_content_bytes} bytes")
        try:
            message = Message.model_validate(fields)
        except ValidationError as exc:
            return _Item(id=raw_id, reject=validation_reason(exc))
        # A valid message's content is the string whose size was checked above.
        return self._item_from_message(message, base_rev, claimed, size_checked=True)

    def _item_from_message(self, message: Message, base_rev: int | None,
                           claimed: str | None, *, size_checked: bool = False) -> _Item:
        if not size_checked and len(message.content.encode("utf-8", "surrogatepass")) > \
                self.settings.max_content_bytes:
            return _Item(id=message.id,
                         reject=f"content larger than {self.settings.max_content_bytes} bytes")
        try:
            body = _body_json(message)
            body.encode("utf-8")
            message.id.encode("utf-8")
            chash = message.content_hash
        except (UnicodeEncodeError, ValueError):
            return _Item(id=message.id, reject="contains text that is not valid Unicode (an "
                                               "unpaired surrogate) or a number JSON cannot "
                                               "carry (NaN, Infinity)")
        if claimed is not None and claimed != chash:
            return _Item(id=message.id, reject=f"content_hash {quote(claimed, 20)} does not "
                                               f"match the content (computed {chash})")
        return _Item(id=message.id, message=message, body=body, content_hash=chash,
                     base_rev=base_rev)

    def _check_chat_id(self, chat_id: str) -> None:
        problem = chat_id_problem(chat_id)
        if problem is not None:
            raise ServiceError(422, "invalid_chat_id",
                               f"invalid chat id {quote(chat_id)}: {problem}",
                               {"chat_id": chat_id if len(chat_id) <= 512 else None})

    def _check_key(self, key: str | None) -> str:
        if key is None or not key.strip():
            raise ServiceError(400, "idempotency_key_missing",
                               "write requests need an Idempotency-Key header")
        key = key.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1]  # the draft's sf-string form
        if not 1 <= len(key) <= _KEY_MAX or not all(" " <= ch <= "~" for ch in key):
            raise ServiceError(400, "idempotency_key_invalid",
                               f"Idempotency-Key must be 1-{_KEY_MAX} printable ASCII "
                               "characters")
        return key

    def _check_body_size(self, body: bytes) -> None:
        limit = self.settings.max_body_bytes
        if len(body) > limit:
            raise ServiceError(413, "body_too_large",
                               f"request body larger than {limit} bytes; split the batch",
                               {"limit": limit})

    def _check_batch(self, count: int) -> None:
        limit = self.settings.max_batch_messages
        if count > limit:
            raise ServiceError(413, "batch_too_large",
                               f"{count} items in one request; the limit is {limit}; split "
                               "the batch", {"limit": limit})

    def _check_title(self, title: Any) -> str | None:
        if title is None:
            return None
        if not isinstance(title, str):
            raise ServiceError(422, "invalid_request", "title must be a string")
        if len(title) > self.settings.max_title_chars:
            raise ServiceError(422, "invalid_request",
                               f"title longer than {self.settings.max_title_chars} characters")
        try:
            title.encode("utf-8")
        except UnicodeEncodeError:
            raise ServiceError(422, "invalid_request",
                               "title is not valid Unicode (an unpaired surrogate)") from None
        return title

    def _page_size(self, limit: int | None) -> int:
        if limit is None:
            return self.settings.max_page
        if limit < 1:
            raise ServiceError(422, "invalid_request", "limit must be at least 1")
        return min(limit, self.settings.max_page)

    @staticmethod
    def _json(body: bytes) -> Any:
        """The body's JSON value; 400 for anything with two meanings or none (duplicate
        member names, NaN/Infinity, bad syntax or encoding, nesting too deep)."""
        try:
            return strictjson.loads(body)
        except ValueError as exc:
            raise ServiceError(400, "malformed_json",
                               f"the request body is not valid JSON: {exc}") from None

    @staticmethod
    def _model(model: type[_M], doc: Any) -> _M:
        try:
            return model.model_validate(doc)
        except ValidationError as exc:
            raise ServiceError(422, "invalid_request",
                               f"the request body does not fit: {validation_reason(exc)}",
                               errors(exc)) from None

    def _not_found(self, chat_id: str) -> ServiceError:
        return ServiceError(404, "not_found", f"no chat {chat_id!r}", {"chat_id": chat_id})

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def _guard(self, work: Callable[[], Answer]) -> Answer:
        try:
            return work()
        except ServiceError as exc:
            return exc.answer()
        except StorageUnavailable as exc:
            log.warning("storage unavailable: %s", exc)
            return ServiceError(503, "storage_unavailable", "the storage is unavailable; "
                                "retry later", headers=self._retry_after()).answer()

    # -- answers -----------------------------------------------------------------------

    def _chat_info(self, row: ChatRow) -> dict[str, Any]:
        return {"chat_id": row.chat_id, "title": row.title, "version": row.version,
                "message_count": row.message_count, "digest": row.digest,
                "updated_at": row.updated_at}

    @staticmethod
    def _remote_message(chat_id: str, row: MessageRow) -> dict[str, Any]:
        out: dict[str, Any] = {"chat_id": chat_id, "id": row.id, "seq": row.seq,
                               "rev": row.rev, "content_hash": row.content_hash,
                               "deleted": row.deleted}
        if not row.deleted and row.body is not None:
            out.update(json.loads(row.body))
        return out

    @staticmethod
    def _save_answer(chat_id: str, version: int, out: _Outcome) -> dict[str, Any]:
        return {"chat_id": chat_id, "version": version, "saved": out.saved,
                "unchanged": out.unchanged, "conflicts": out.conflicts,
                "rejected": out.rejected}
