"""Checks of a write request before it reaches the storage: ids, key, sizes, title, and each
message of a batch turned into an ``Item`` (valid, or rejected with its reason).

Functions of the request and the ServerSettings; the Service calls them (docs/protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from chatsave import strictjson
from chatsave.backend.answers import ServiceError
from chatsave.backend.settings import ServerSettings
from chatsave.backend.validation import MAX_ITEM_DEPTH, depth, errors, quote, validation_reason
from chatsave.model import (
    MESSAGE_ID_MAX,
    ROLES,
    STORED_TIME,
    TYPE_MAX,
    Message,
    chat_id_problem,
    message_id_problem,
    message_texts,
)

_M = TypeVar("_M", bound=BaseModel)

#: the longest Idempotency-Key accepted
KEY_MAX = 255


@dataclass
class Item:
    """One message of a save batch after validation (``reject`` set if it failed)."""

    id: str | None
    reject: str | None = None
    body: str | None = None
    content_hash: str | None = None
    base_rev: int | None = None


def body_json(message: Message) -> str:
    """The stored body: the wire object without chat_id and id (model.message_texts)."""
    return message_texts(message.role, message.content, message.created_at_text,
                         message.type, message.metadata, message.attachments, message.extra,
                         message.inexact)[0]


#: the members a message of a save batch may have (Message's fields, content_hash, base_rev)
_WIRE_KEYS = frozenset(Message.model_fields) | {"content_hash", "base_rev"}
_ROLES = frozenset(ROLES)
#: a member left out (None is a value, and not one a message may hold)
_NONE: Any = object()


def prepare_items(chat_id: str, raws: list[Any], settings: ServerSettings) -> list[Item]:
    """The items of a save batch, each valid or with the reason it is rejected.

    A message in the shape chatsave's own clients send (every field of its type, its time
    as chatsave writes times) is checked by ``plain_item`` without building a Message;
    anything else, and anything that fails there, takes ``prepare_item``, which decides
    and words the rejection (docs/protocol.md, "Save").
    """
    limit = settings.max_content_bytes
    return [plain_item(chat_id, raw, limit) or prepare_item(chat_id, raw, settings)
            for raw in raws]

def plain_item(chat_id: str, raw: Any, max_content_bytes: int) -> Item | None:
    """The valid Item of a message that needs no conversion, or None for ``prepare_item``
    to decide. It accepts a subset of what the Message model accepts, with the same
    stored body and content hash (tests/test_backend_items.py compares the two paths):
    strings that are strings, the time already in its stored form, containers of their
    type, booleans and integers that are exactly that."""
    if type(raw) is not dict or not raw.keys() <= _WIRE_KEYS:
        return None
    get = raw.get
    mid, role, content, created = get("id"), get("role"), get("content"), get("created_at")
    type_, metadata = get("type", "message"), get("metadata", _NONE)
    attachments, extra = get("attachments", _NONE), get("extra", _NONE)
    inexact, claimed, base_rev = get("inexact", False), get("content_hash"), get("base_rev")
    if (type(mid) is not str or type(role) is not str or role not in _ROLES
            or type(content) is not str or type(created) is not str
            or type(type_) is not str or not 1 <= len(type_) <= TYPE_MAX
            or get("chat_id", chat_id) != chat_id
            or type(inexact) is not bool
            or not (claimed is None or type(claimed) is str)
            or not (base_rev is None or (type(base_rev) is int and base_rev >= 0))
            or message_id_problem(mid) is not None
            or STORED_TIME.fullmatch(created) is None):
        return None
    metadata = {} if metadata is _NONE else metadata
    attachments = [] if attachments is _NONE else attachments
    extra = {} if extra is _NONE else extra
    if type(metadata) is not dict or type(attachments) is not list \
            or type(extra) is not dict or depth(raw) > MAX_ITEM_DEPTH:
        return None
    try:
        datetime.fromisoformat(created)  # a real day and time
        if len(content.encode("utf-8")) > max_content_bytes:
            return None
        body, chash = message_texts(role, content, created, type_, metadata, attachments,
                                    extra, inexact)
        body.encode("utf-8")
    except ValueError:  # not a time, a lone surrogate, a number JSON cannot carry
        return None
    if claimed is not None and claimed != chash:
        return None
    return Item(id=mid, body=body, content_hash=chash, base_rev=base_rev)

def prepare_item(chat_id: str, raw: Any, settings: ServerSettings) -> Item:
    if not isinstance(raw, dict):
        return Item(id=None, reject=f"not a JSON object ({type(raw).__name__})")
    raw_id = raw.get("id")
    problem = message_id_problem(raw_id)
    if problem is not None:
        shown = raw_id if isinstance(raw_id, str) and len(raw_id) <= MESSAGE_ID_MAX \
            else None
        return Item(id=shown, reject=f"invalid message id {quote(raw_id)}: {problem}")
    if depth(raw) > MAX_ITEM_DEPTH:
        return Item(id=raw_id, reject=f"nested deeper than {MAX_ITEM_DEPTH} levels")
    fields = dict(raw)
    base_rev = fields.pop("base_rev", None)
    claimed = fields.pop("content_hash", None)
    if base_rev is not None and (not isinstance(base_rev, int) or isinstance(base_rev, bool)
                                 or base_rev < 0):
        return Item(id=raw_id, reject=f"base_rev must be an integer >= 0, not "
                                      f"{quote(base_rev)}")
    if claimed is not None and not isinstance(claimed, str):
        return Item(id=raw_id, reject="content_hash must be a string")
    own = fields.get("chat_id")
    if own is None:
        fields["chat_id"] = chat_id
    elif own != chat_id:
        return Item(id=raw_id, reject=f"says it belongs to chat {quote(own)}, sent to "
                                      f"chat {chat_id!r}")
    content = fields.get("content")
    if isinstance(content, str) and \
            len(content.encode("utf-8", "surrogatepass")) > settings.max_content_bytes:
        return Item(id=raw_id, reject=f"content larger than "
                                      f"{settings.max_content_bytes} bytes")
    try:
        message = Message.model_validate(fields)
    except ValidationError as exc:
        return Item(id=raw_id, reject=validation_reason(exc))
    # A valid message's content is the string whose size was checked above.
    return item_from_message(message, base_rev, claimed, settings, size_checked=True)

def item_from_message(message: Message, base_rev: int | None, claimed: str | None,
                      settings: ServerSettings, *, size_checked: bool = False) -> Item:
    if not size_checked and len(message.content.encode("utf-8", "surrogatepass")) > \
            settings.max_content_bytes:
        return Item(id=message.id,
                     reject=f"content larger than {settings.max_content_bytes} bytes")
    try:
        body = body_json(message)
        body.encode("utf-8")
        message.id.encode("utf-8")
        chash = message.content_hash
    except (UnicodeEncodeError, ValueError):
        return Item(id=message.id, reject="contains text that is not valid Unicode (an "
                                          "unpaired surrogate) or a number JSON cannot "
                                           "carry (NaN, Infinity)")
    if claimed is not None and claimed != chash:
        return Item(id=message.id, reject=f"content_hash {quote(claimed, 20)} does not "
                                          f"match the content (computed {chash})")
    return Item(id=message.id, body=body, content_hash=chash, base_rev=base_rev)

def check_chat_id(chat_id: str) -> None:
    problem = chat_id_problem(chat_id)
    if problem is not None:
        raise ServiceError(422, "invalid_chat_id",
                           f"invalid chat id {quote(chat_id)}: {problem}",
                           {"chat_id": chat_id if len(chat_id) <= 512 else None})

def check_key(key: str | None) -> str:
    if key is None or not key.strip():
        raise ServiceError(400, "idempotency_key_missing",
                           "write requests need an Idempotency-Key header")
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]  # the draft's sf-string form
    if not 1 <= len(key) <= KEY_MAX or not all(" " <= ch <= "~" for ch in key):
        raise ServiceError(400, "idempotency_key_invalid",
                           f"Idempotency-Key must be 1-{KEY_MAX} printable ASCII "
                           "characters")
    return key

def check_body_size(body: bytes, settings: ServerSettings) -> None:
    limit = settings.max_body_bytes
    if len(body) > limit:
        raise ServiceError(413, "body_too_large",
                           f"request body larger than {limit} bytes; split the batch",
                           {"limit": limit})

def check_batch(count: int, settings: ServerSettings) -> None:
    limit = settings.max_batch_messages
    if count > limit:
        raise ServiceError(413, "batch_too_large",
                           f"{count} items in one request; the limit is {limit}; split "
                           "the batch", {"limit": limit})

def check_title(title: Any, settings: ServerSettings) -> str | None:
    if title is None:
        return None
    if not isinstance(title, str):
        raise ServiceError(422, "invalid_request", "title must be a string")
    if len(title) > settings.max_title_chars:
        raise ServiceError(422, "invalid_request",
                           f"title longer than {settings.max_title_chars} characters")
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:
        raise ServiceError(422, "invalid_request",
                           "title is not valid Unicode (an unpaired surrogate)") from None
    return title

def page_size(limit: int | None, settings: ServerSettings) -> int:
    if limit is None:
        return settings.max_page
    if limit < 1:
        raise ServiceError(422, "invalid_request", "limit must be at least 1")
    return min(limit, settings.max_page)

def parse_json(body: bytes) -> Any:
    """The body's JSON value; 400 for anything with two meanings or none (duplicate
    member names, NaN/Infinity, bad syntax or encoding, nesting too deep)."""
    try:
        return strictjson.loads(body)
    except ValueError as exc:
        raise ServiceError(400, "malformed_json",
                           f"the request body is not valid JSON: {exc}") from None

def parse_model(model: type[_M], doc: Any) -> _M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ServiceError(422, "invalid_request",
                           f"the request body does not fit: {validation_reason(exc)}",
                           errors(exc)) from None

