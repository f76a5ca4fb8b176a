"""Protocol v1 on the wire: the request and answer shapes shared by client and server.

The server builds its answers from these models and the client validates every answer
with them before trusting it. docs/protocol.md is the prose; the server's
OpenAPI schema (snapshot in tests/data/openapi-v1.json) is the contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
API_PREFIX = "/api/v1"


class _Answer(BaseModel):
    # Answers may grow fields in later minor versions: ignore unknown ones.
    model_config = ConfigDict(extra="ignore")


class Capabilities(_Answer):
    protocol: int
    server: str
    backend_id: str
    max_batch_messages: int = Field(ge=1)
    max_body_bytes: int = Field(ge=1024)
    max_page: int = Field(ge=1)
    idempotency_retention_s: int = Field(ge=0)
    features: list[str] = Field(default_factory=list)
    # Added (still protocol 1): per-message content limit, in UTF-8 bytes; None if unknown.
    max_content_bytes: int | None = None


class Health(_Answer):
    """GET /health: the server runs and its storage answers."""

    status: str
    storage: str


class ChatInfo(_Answer):
    chat_id: str
    title: str | None = None
    version: int
    message_count: int
    digest: str
    updated_at: str | None = None


class ChatPage(_Answer):
    chats: list[ChatInfo]
    next: str | None = None  # cursor for ?after=, None on the last page


class DigestsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chat_ids: list[str]


class DigestsAnswer(_Answer):
    # chat_id -> digest; None for a chat the backend does not have (for this user)
    digests: dict[str, str | None]
    versions: dict[str, int | None] = Field(default_factory=dict)


class RemoteMessage(_Answer):
    """A message as the server lists it: the wire fields plus seq, rev, content_hash.

    A tombstone has ``deleted: true`` and no body fields (role, content, ... are None);
    its content_hash is the hash of the version that was deleted.
    """

    chat_id: str
    id: str
    seq: int
    rev: int
    content_hash: str
    deleted: bool = False
    role: str | None = None
    content: str | None = None
    created_at: str | None = None
    type: str | None = None
    metadata: dict[str, Any] | None = None
    attachments: list[Any] | None = None
    extra: dict[str, Any] | None = None
    inexact: bool = False


class BucketsAnswer(_Answer):
    """GET /chats/{id}/buckets: the digest of each bucket of the chat's live messages
    (those whose content_hash begins with the bucket's two hex digits; empty ones left
    out), so that a client reads only the buckets that differ (docs/protocol.md, "Buckets")."""

    chat_id: str
    version: int
    buckets: dict[str, str]


class MessagePage(_Answer):
    chat_id: str
    version: int
    messages: list[RemoteMessage]
    next: int | None = None  # seq for ?after=, None on the last page


class SaveMessage(BaseModel):
    """One message of a save request as the server accepts it: the flat wire object
    (chatsave.model.Message's fields, strict) plus optional ``base_rev`` and
    ``content_hash``. ``chat_id`` may be left out (the path names the chat); a
    ``content_hash`` that does not match the content is rejected.

    The server validates items one by one: an item that does not fit is listed in the
    answer's ``rejected`` and the valid items of the batch are still saved.
    """

    model_config = ConfigDict(extra="forbid")
    chat_id: str | None = None
    id: str = Field(min_length=1, max_length=256)
    role: Literal["user", "assistant", "system", "tool"]
    content: str
    created_at: str = Field(description="ISO 8601 with a zone; stored as UTC milliseconds")
    type: str = Field(default="message", min_length=1, max_length=128)
    metadata: dict[str, Any] = Field(default_factory=dict)
    attachments: list[Any] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)
    inexact: bool = False
    base_rev: int | None = Field(default=None, ge=0)
    content_hash: str | None = None


class SaveRequest(BaseModel):
    """Body of POST /chats/{id}/save: wire messages, each may carry ``base_rev``."""

    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]]
    title: str | None = None


class ChatSave(BaseModel):
    """One chat's part of POST /saves: a SaveRequest naming its chat."""

    model_config = ConfigDict(extra="forbid")
    chat_id: str
    messages: list[dict[str, Any]]
    title: str | None = None


class SavesRequest(BaseModel):
    """Body of POST /saves (feature ``saves``): the saves of several chats, applied in one
    transaction under one Idempotency-Key; at most max_batch_messages messages and chats."""

    model_config = ConfigDict(extra="forbid")
    chats: list[ChatSave]


class ItemAck(_Answer):
    id: str
    rev: int
    content_hash: str


class ItemConflict(_Answer):
    id: str
    reason: Literal["different_content", "deleted", "stale_base_rev"] | str
    rev: int
    content_hash: str


class ItemRejected(_Answer):
    id: str | None
    reason: str


class SaveAnswer(_Answer):
    chat_id: str
    version: int
    saved: list[ItemAck] = Field(default_factory=list)
    unchanged: list[ItemAck] = Field(default_factory=list)
    conflicts: list[ItemConflict] = Field(default_factory=list)
    rejected: list[ItemRejected] = Field(default_factory=list)


class SavesAnswer(_Answer):
    """The answer to POST /saves: each chat's SaveAnswer, in the order of the request."""

    chats: list[SaveAnswer]


class DeleteItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    base_rev: int | None = None


class DeleteRequest(BaseModel):
    """Body of POST /chats/{id}/delete; ``ids`` items are ids or {"id", "base_rev"}."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str | DeleteItem]
    reason: str | None = None


class DeleteAnswer(_Answer):
    chat_id: str
    version: int
    deleted: list[ItemAck] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    conflicts: list[ItemConflict] = Field(default_factory=list)


class ErrorBody(_Answer):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(_Answer):
    error: ErrorBody
