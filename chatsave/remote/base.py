"""The Remote interface: what every backend kind offers the core, whatever its transport.

A remote is named like a git remote: ``http(s)://host`` is a chatsave server over HTTP,
a plain path or ``file:`` URL is an embedded backend (the server's own storage code,
in-process). Both give the same protocol v1 semantics; the core only sees this class.
"""

from __future__ import annotations

import abc

from chatsave.errors import BadAnswerError, ChatRefusedError
from chatsave.protocol import (
    BucketsAnswer,
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DigestsAnswer,
    MessagePage,
    RemoteMessage,
    SaveAnswer,
    SavesAnswer,
)


def check_saves(where: str, chat_ids: list[str], answer: SavesAnswer) -> list[SaveAnswer]:
    """The answers of a save of several chats, if they answer those chats in their order."""
    got = [a.chat_id for a in answer.chats]
    if got != chat_ids:
        raise BadAnswerError(f"{where}: the answer to a save of {len(chat_ids)} chat(s) "
                             f"answered for {len(got)} other or reordered chat(s)")
    return answer.chats


class Remote(abc.ABC):
    """One backend, for one user. Methods raise RemoteError subclasses on failure."""

    url: str
    #: Whether ``messages`` may be called from another thread while the caller works with
    #: its store: true for a remote that touches nothing of the caller's (a chatsave server
    #: over HTTP). Comparing then asks for a chat's next page while it reads this one.
    reads_in_background: bool = False

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What the backend is and its limits (checked before any write)."""

    @abc.abstractmethod
    def list_chats(self, after: str | None = None, limit: int | None = None) -> ChatPage:
        """One page of the user's chats, with version and digest."""

    @abc.abstractmethod
    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        """Digests of up to ``max_page`` chats in one call (unknown ids -> None)."""

    @abc.abstractmethod
    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        """One page of a chat's messages in server order (``seq``)."""

    def buckets(self, chat_id: str) -> BucketsAnswer | None:
        """The digest of each bucket of a chat's live messages (docs/protocol.md,
        "Buckets"), asked only of a backend whose capabilities list the ``buckets``
        feature; None: this remote cannot tell, read the whole chat."""
        return None

    def bucket_messages(self, chat_id: str, buckets: list[str], after: int | None = None,
                        limit: int | None = None) -> MessagePage:
        """One page of the live messages of these buckets and every tombstone, in server
        order (only where ``buckets`` answers)."""
        raise NotImplementedError(f"{type(self).__name__} does not read buckets")

    @abc.abstractmethod
    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        """Bulk upsert. ``body`` is the exact JSON of a SaveRequest, as recorded in the outbox."""

    def save_many(self, chat_ids: list[str], body: bytes,
                  idempotency_key: str) -> list[SaveAnswer]:
        """The saves of several chats in one request, asked only of a backend whose
        capabilities list the ``saves`` feature. ``body`` is the exact JSON of a
        SavesRequest naming ``chat_ids`` in this order; the answers come in the same order
        (an answer that does not is a BadAnswerError)."""
        raise NotImplementedError(f"{type(self).__name__} does not save several chats at once")

    @abc.abstractmethod
    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        """Turn messages into tombstones. ``body`` is the exact JSON of a DeleteRequest."""

    def refusal(self, chat_id: str) -> ChatRefusedError | None:
        """Why this backend cannot take this chat at all (None: it can), decided from the
        id alone, before any request for it. The operations leave a refused chat out of
        the run (reported with the reason, exit 9) and go on with the others."""
        return None

    def held_only(self, chat_id: str) -> list[tuple[RemoteMessage, str]]:
        """Messages the backend stores but will not show, with why (none for a chatsave
        backend). They never count as on the backend; sync keeps a copy of them here."""
        return []

    def close(self) -> None:  # noqa: B027 - optional for remotes without resources
        """Release connections and files."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
