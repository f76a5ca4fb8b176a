"""Protocol v1 semantics over a Storage: validation, idempotency, limits, base_rev rules, answers.

Both transports share this code: the FastAPI app (app.py) is a thin adapter around it and
the embedded remote (chatsave/remote/embedded.py) calls it in-process. Every method takes the
user, the path parameters and the raw request body, and returns ``(status, answer, headers)``
where ``answer`` is the JSON object the protocol promises (an error envelope for non-2xx).

Write requests (save, delete, alias save) are exactly-once per (user, Idempotency-Key):
each executes in one write transaction (chatsave.backend.writes). What a request must be
before it gets there is checked by chatsave.backend.checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from chatsave import __version__
from chatsave.backend.answers import Answer, ServiceError, not_found
from chatsave.backend.checks import (
    Item,
    check_batch,
    check_body_size,
    check_chat_id,
    check_key,
    check_title,
    item_from_message,
    page_size,
    parse_json,
    parse_model,
    prepare_items,
)
from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage.base import (
    STALE_DIGEST,
    ChatRow,
    MessageRow,
    Storage,
    StorageError,
    StorageUnavailable,
)
from chatsave.backend.validation import (
    MAX_ITEM_DEPTH,
    alias_shape,
    depth,
    has_surrogate,
    quote,
    save_shape,
    saves_shape,
)
from chatsave.backend.validation import fingerprint as request_fingerprint
from chatsave.backend.writes import apply_delete, apply_save, execute_once, execute_once_many
from chatsave.errors import InvalidItemError
from chatsave.model import MESSAGE_ID_MAX, canonical_json, chat_id_problem
from chatsave.normalize import MessageNormalizer
from chatsave.protocol import (
    API_PREFIX,
    PROTOCOL_VERSION,
    DeleteItem,
    DeleteRequest,
    DigestsRequest,
)

log = logging.getLogger("chatsave.server")

FEATURES = ["base_rev", "tombstones", "include_deleted", "digests", "idempotency",
            "alias_save", "buckets", "saves"]
#: a bucket: the first two hex digits of a content hash (docs/protocol.md, "Buckets")
_BUCKET = re.compile(r"[0-9a-f]{2}")
ALIAS_KEY_PREFIX = "derived:"
#: the largest seq (and rev) the storages hold: 64-bit signed integers
SEQ_MAX = 2**63 - 1


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
        size = page_size(limit, self.settings)
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
        check_body_size(body, self.settings)
        req = parse_model(DigestsRequest, parse_json(body))
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

    def buckets(self, user: str, chat_id: str) -> Answer:
        """GET /chats/{id}/buckets: the digest of each bucket of the chat's live messages."""
        return self._guard(lambda: self._buckets(user, chat_id))

    def _buckets(self, user: str, chat_id: str) -> Answer:
        check_chat_id(chat_id)
        found = self.storage.bucket_digests(user, chat_id)
        if found is None:
            raise not_found(chat_id)
        version, digests = found
        return 200, {"chat_id": chat_id, "version": version, "buckets": digests}, {}

    def messages(self, user: str, chat_id: str, after: int | None = None,
                 limit: int | None = None, include_deleted: bool = False,
                 buckets: str | None = None) -> Answer:
        return self._guard(lambda: self._messages(user, chat_id, after, limit, include_deleted,
                                                  buckets))

    def _messages(self, user: str, chat_id: str, after: int | None, limit: int | None,
                  include_deleted: bool, buckets: str | None = None) -> Answer:
        check_chat_id(chat_id)
        if after is not None and not 0 <= after <= SEQ_MAX:
            raise ServiceError(422, "invalid_request",
                               f"after must be a seq from 0 to {SEQ_MAX}")
        size = page_size(limit, self.settings)
        chosen = None if buckets is None else _bucket_list(buckets)
        chat, rows = self.storage.read_messages(user, chat_id, after or 0, size + 1,
                                                include_deleted, chosen)
        if chat is None:
            raise not_found(chat_id)
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
        check_chat_id(chat_id)
        key = check_key(key)
        check_body_size(body, self.settings)
        raw_messages, title = save_shape(parse_json(body))
        check_batch(len(raw_messages), self.settings)
        title = check_title(title, self.settings)
        items = prepare_items(chat_id, raw_messages, self.settings)
        fingerprint = request_fingerprint("POST", f"{API_PREFIX}/chats/{chat_id}/save", body)
        return execute_once(
            self.storage, self.clock, user, chat_id, key, fingerprint,
            lambda tx, chat, now: apply_save(tx, chat, user, chat_id, items, title, now))

    def save_many(self, user: str, body: bytes, idempotency_key: str | None) -> Answer:
        """POST /saves: the saves of several chats in one request (docs/protocol.md, "Saves").

        Each chat's part is checked and applied as POST /chats/{id}/save would; a part that
        such a request would refuse (an invalid chat id, a bad title) refuses the whole
        request, so that nothing of it is applied. The limits count every chat's messages."""
        return self._guard(lambda: self._save_many(user, body, idempotency_key))

    def _save_many(self, user: str, body: bytes, key: str | None) -> Answer:
        key = check_key(key)
        check_body_size(body, self.settings)
        parts = saves_shape(parse_json(body), self.settings.max_batch_messages)
        check_batch(sum(len(raws) for _, raws, _ in parts), self.settings)
        prepared: list[tuple[str, list[Item], str | None]] = []
        for chat_id, raws, title in parts:
            check_chat_id(chat_id)
            prepared.append((chat_id, prepare_items(chat_id, raws, self.settings),
                             check_title(title, self.settings)))
        fingerprint = request_fingerprint("POST", f"{API_PREFIX}/saves", body)

        def apply(tx: Any, chats: dict[str, ChatRow | None], now: float) -> Answer:
            # Applied in chat id order too (a chat created here is locked by its insert),
            # answered in the request's order.
            answers = {chat_id: apply_save(tx, chats[chat_id], user, chat_id, items, title,
                                           now)[1]
                       for chat_id, items, title in sorted(prepared, key=lambda p: p[0])}
            return 200, {"chats": [answers[chat_id] for chat_id, _, _ in prepared]}, {}

        return execute_once_many(self.storage, self.clock, user,
                                 [chat_id for chat_id, _, _ in prepared], key, fingerprint,
                                 apply)

    def delete(self, user: str, chat_id: str, body: bytes, idempotency_key: str | None) -> Answer:
        """POST /chats/{id}/delete: turn messages into tombstones."""
        return self._guard(lambda: self._delete(user, chat_id, body, idempotency_key))

    def _delete(self, user: str, chat_id: str, body: bytes, key: str | None) -> Answer:
        check_chat_id(chat_id)
        key = check_key(key)
        check_body_size(body, self.settings)
        req = parse_model(DeleteRequest, parse_json(body))
        check_batch(len(req.ids), self.settings)
        targets = [DeleteItem(id=i) if isinstance(i, str) else i for i in req.ids]
        fingerprint = request_fingerprint("POST", f"{API_PREFIX}/chats/{chat_id}/delete", body)
        return execute_once(
            self.storage, self.clock, user, chat_id, key, fingerprint,
            lambda tx, chat, now: apply_delete(tx, chat, user, chat_id, targets, now))

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
        check_chat_id(chat_id)
        check_body_size(body, self.settings)
        doc = parse_json(body)
        raw_messages, title = alias_shape(doc)
        check_batch(len(raw_messages), self.settings)
        title = check_title(title, self.settings)
        normalizer = MessageNormalizer(chat_id)
        items: list[Item] = []
        for raw in raw_messages:
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            shown_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MESSAGE_ID_MAX \
                else None
            if depth(raw) > MAX_ITEM_DEPTH:
                items.append(Item(id=shown_id,
                                   reject=f"nested deeper than {MAX_ITEM_DEPTH} levels"))
                continue
            try:
                message = normalizer.normalize(raw)
            except InvalidItemError as exc:
                items.append(Item(id=shown_id, reject=exc.message))
                continue
            items.append(item_from_message(message, None, None, self.settings))
        canonical = canonical_json({
            "chat_id": chat_id, "title": title,
            "messages": [[it.id, it.content_hash, it.body, it.reject] for it in items],
        }).encode("utf-8", "surrogatepass")
        fingerprint = request_fingerprint("POST", f"/api/chats/{chat_id}/save", canonical)
        derived = key is None or not key.strip()
        if derived:
            key = ALIAS_KEY_PREFIX + hashlib.sha256(canonical).hexdigest()
        else:
            key = check_key(key)
        assert key is not None
        return execute_once(
            self.storage, self.clock, user, chat_id, key, fingerprint,
            lambda tx, chat, now: apply_save(tx, chat, user, chat_id, items, title, now),
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


def _bucket_list(text: str) -> list[str]:
    """The buckets of ``?buckets=``: comma-separated pairs of lowercase hex digits."""
    chosen = list(dict.fromkeys(text.split(",")))
    wrong = [b for b in chosen if not _BUCKET.fullmatch(b)]
    if wrong or not text:
        raise ServiceError(422, "invalid_request",
                           "buckets must be pairs of lowercase hex digits separated by commas "
                           f"(00 to ff), not {quote(wrong[0] if wrong else text)}")
    return chosen
