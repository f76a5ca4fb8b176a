"""The Storage interface: what the service layer needs from a database engine (SQL lives below it).

Everything is keyed by (user, chat_id). An engine offers two kinds of work:

- reads (``list_chats``, ``get_chats``, ``read_messages``), each a consistent snapshot;
- one write transaction per request (``write()`` yields a ``WriteTx``): the service locks
  the chat, reads the idempotency record, upserts messages and stores the answer as the
  record, and all of that commits together or not at all. A request that dies midway
  leaves nothing behind, its key included.

The engines keep nothing that matters in process memory, so any number of server processes
may share one database (PostgreSQL); correctness comes from the database's locks.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

from chatsave.errors import StoreError
from chatsave.model import EMPTY_DIGEST as EMPTY_DIGEST  # re-exported for the engines

#: what a write leaves in a chat's digest column: computed again when next read
STALE_DIGEST = ""


class StorageError(StoreError):
    """The server's database failed in a way that is not the caller's fault."""

    code = "storage"


class StorageUnavailable(StorageError):
    """The database is unreachable or busy right now; the request may be retried."""

    code = "storage_unavailable"


@dataclass
class ChatRow:
    """A chat as stored: the per-(user, chat) counters and digest."""

    user: str
    chat_id: str
    title: str | None
    version: int
    message_count: int
    digest: str
    next_seq: int
    created_at: str
    updated_at: str


@dataclass
class MessageRow:
    """A message as stored. ``body`` is the JSON text of the wire fields; None on tombstones."""

    id: str
    seq: int
    rev: int
    content_hash: str
    deleted: bool
    body: str | None
    updated_at: float
    deleted_at: float | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    """The stored record of an idempotency key.

    ``done``: the request executed; ``status`` and ``answer`` (JSON text) are its answer.
    ``running``: written only by servers that claimed keys with a lease before executing
    (earlier chatsave versions wrote these); ``lease_expires`` says until when the claim holds.
    """

    fingerprint: str
    state: Literal["running", "done"]
    lease_expires: float | None
    status: int | None
    answer: str | None


class WriteTx(abc.ABC):
    """One write transaction. Commits when the ``write()`` block ends normally."""

    @abc.abstractmethod
    def get_record(self, user: str, key: str) -> IdempotencyRecord | None:
        """The idempotency record of (user, key), locked until the transaction ends."""

    @abc.abstractmethod
    def put_record(self, user: str, key: str, fingerprint: str, status: int, answer: str,
                   now: float, *, replace: bool) -> bool:
        """Store a finished request's answer as the record of (user, key).

        ``replace``: overwrite the record ``get_record`` found in this transaction.
        Otherwise insert one; False if a concurrent transaction committed a record for the
        key first (the caller rolls back and starts again, to find that record).
        """

    @abc.abstractmethod
    def lock_chat(self, user: str, chat_id: str) -> ChatRow | None:
        """The chat row, locked against concurrent writers; None if it does not exist."""

    @abc.abstractmethod
    def create_chat(self, user: str, chat_id: str, now_text: str) -> ChatRow:
        """Create the chat (or find the one a concurrent writer just created) and lock it."""

    @abc.abstractmethod
    def get_messages(self, user: str, chat_id: str, ids: list[str]) -> dict[str, MessageRow]:
        """The stored rows (live and tombstones) for ``ids``."""

    @abc.abstractmethod
    def insert_messages(self, user: str, chat_id: str, rows: list[MessageRow]) -> None:
        """Insert new message rows (one statement for the batch)."""

    @abc.abstractmethod
    def update_message(self, user: str, chat_id: str, row: MessageRow) -> None:
        """Replace rev, hash, deleted flag and body of an existing row (seq never changes)."""

    @abc.abstractmethod
    def save_chat(self, row: ChatRow) -> None:
        """Write back the chat row's title, counters, digest and times."""


class Storage(abc.ABC):
    """A server database: SQLite (one file) or PostgreSQL. Safe to share between threads."""

    #: UUID fixed when the database was created; clients key their sync state by it.
    backend_id: str
    #: "sqlite" or "postgresql"
    engine: str

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[WriteTx]:
        """A write transaction; commits on normal exit, rolls back on an exception."""

    @abc.abstractmethod
    def compute_digest(self, user: str, chat_id: str) -> tuple[int, str] | None:
        """(version, digest) of a chat from its live messages, streamed; None if unknown."""

    @abc.abstractmethod
    def store_digests(self, user: str, digests: list[tuple[str, int, str]]) -> None:
        """Remember computed (chat_id, version, digest), each unless the chat changed since
        that version; one transaction for all."""

    @abc.abstractmethod
    def list_chats(self, user: str, after: str | None, limit: int) -> list[ChatRow]:
        """Up to ``limit`` chats of ``user`` with chat_id > ``after``, ordered by chat_id."""

    @abc.abstractmethod
    def get_chats(self, user: str, chat_ids: list[str]) -> dict[str, ChatRow]:
        """The chats of ``user`` among ``chat_ids``."""

    @abc.abstractmethod
    def read_messages(self, user: str, chat_id: str, after: int, limit: int,
                      include_deleted: bool, buckets: list[str] | None = None
                      ) -> tuple[ChatRow | None, list[MessageRow]]:
        """The chat and up to ``limit`` messages with seq > ``after``, in seq order; with
        ``buckets``, only the live messages whose content hash begins with one of them
        (and, with ``include_deleted``, every tombstone)."""

    @abc.abstractmethod
    def bucket_digests(self, user: str, chat_id: str) -> tuple[int, dict[str, str]] | None:
        """The chat's version and the digest of each bucket of its live messages
        (model.bucket_digests), from one snapshot; None: no such chat."""

    @abc.abstractmethod
    def purge_idempotency(self, before: float) -> int:
        """Delete records finished (or whose lease expired) before ``before``."""

    @abc.abstractmethod
    def purge_tombstones(self, before: float) -> int:
        """Delete tombstones deleted before ``before``."""

    @abc.abstractmethod
    def housekeeping_due(self, interval_s: float, now: float) -> bool:
        """Atomically claim the next housekeeping run if ``interval_s`` has passed."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The number of the last migration applied."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    """Split ``items`` into lists of at most ``size`` (SQL parameter limits)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
