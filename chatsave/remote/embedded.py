"""The embedded remote: a backend in a local SQLite file, served in-process by the server's code.

``--remote ./backend.db`` or ``--remote file:///srv/backend.db`` gives a zero-setup backend
with exactly the protocol semantics of a chatsave server (the same Service and Storage code
run here, without HTTP), for one user, "local", the user a server without tokens serves.
Answers that are not 200 become the same exceptions an HTTP client raises
(``error_for_answer``), so the core cannot tell the transports apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from chatsave.errors import (
    BadAnswerError,
    ChatsaveError,
    InputError,
    InvalidIdError,
    RefusedError,
    UnavailableError,
)
from chatsave.remote.base import Remote
from chatsave.remote.protocol import (
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DigestsAnswer,
    MessagePage,
    SaveAnswer,
)

_M = TypeVar("_M", bound=BaseModel)

#: answers a client should retry (after Retry-After): still running, rate, overload
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(headers: dict[str, str] | Any) -> float | None:
    """Retry-After in seconds (the delta-seconds form), or None."""
    value = None
    for name, val in (headers.items() if hasattr(headers, "items") else []):
        if str(name).lower() == "retry-after":
            value = val
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_for_answer(status: int, answer: Any, headers: dict[str, str] | Any = None, *,
                     where: str = "backend") -> ChatsaveError:
    """The exception for a non-2xx protocol answer, the same for every transport.

    - 409 (key still running), 429, 5xx -> UnavailableError (retryable; exit 8);
    - 401/403 -> RefusedError (auth; exit 9); 404 -> RefusedError with code ``not_found``
      (no such chat for this user, or no such endpoint);
    - 422 ``invalid_chat_id`` -> InvalidIdError; 400, 413 (``body_too_large`` /
      ``batch_too_large``: split and retry), other 422 -> InputError (exit 2);
    - 422 ``idempotency_key_reused`` -> RefusedError (a client bug, not the user's input).

    ``details`` of the exception: ``{"status", "code", "retry_after", "details"}``.
    """
    err = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or "error")
        message = str(err.get("message") or f"HTTP {status}")
        inner = err.get("details")
    else:
        code, message, inner = "error", f"HTTP {status} without an error envelope", None
    retry_after = retry_after_seconds(headers or {})
    details = {"status": status, "code": code, "retry_after": retry_after, "details": inner}
    text = f"{where}: {message} (HTTP {status}, {code})"
    if status in RETRYABLE_STATUSES:
        return UnavailableError(text, hint="retry later; progress is kept", details=details)
    if status in (401, 403):
        return RefusedError(text, hint="check the token (--token-file)", details=details)
    if status == 404:
        return RefusedError(text, details=details)
    if code == "invalid_chat_id":
        return InvalidIdError(text, details=details)
    if code == "idempotency_key_reused":
        return RefusedError(text, hint="a chatsave bug: please report it", details=details)
    if status in (400, 413, 422):
        return InputError(text, details=details)
    if status >= 500:
        return UnavailableError(text, details=details)
    return RefusedError(text, details=details)


class EmbeddedRemote(Remote):
    """A backend in the SQLite file ``location`` (a path or ``file:`` URL), for user "local".

    ``settings`` (chatsave.server.service.ServerSettings) sets limits and retention;
    the file is created on first use. Housekeeping runs when opened, at most once per
    ``housekeeping_interval_s`` across every process using the file.
    """

    def __init__(self, location: str | os.PathLike[str], *, settings: Any = None,
                 user: str | None = None) -> None:
        # Imported here: the server package is only needed when this remote is used.
        from chatsave.server.service import Service
        from chatsave.server.storage import StorageError, sqlite_path
        from chatsave.server.storage.sqlite import SqliteStorage
        from chatsave.server.tokens import LOCAL_USER

        self.url = os.fspath(location)
        self.path: Path = sqlite_path(location)
        self.user = user or LOCAL_USER
        try:
            self.storage = SqliteStorage(self.path)
        except StorageError as exc:
            raise UnavailableError(
                f"cannot open the embedded backend {self.path}: {exc.message}",
                hint="check the path and its permissions") from exc
        self.service = Service(self.storage, settings)
        self._storage_error = StorageError
        try:
            self.service.maybe_housekeep()
        except StorageError:
            pass  # housekeeping is best effort; the next open tries again

    def _call(self, model: type[_M], fn: Any, *args: Any, **kwargs: Any) -> _M:
        try:
            status, answer, headers = fn(*args, **kwargs)
        except self._storage_error as exc:
            raise UnavailableError(f"embedded backend {self.path}: {exc.message}") from exc
        if status != 200:
            raise error_for_answer(status, answer, headers, where=f"embedded backend {self.url}")
        try:
            return model.model_validate(answer)
        except ValidationError as exc:  # pragma: no cover - the service builds these
            raise BadAnswerError(f"embedded backend {self.url}: unexpected answer: {exc}") \
                from exc

    def capabilities(self) -> Capabilities:
        return self._call(Capabilities, self.service.capabilities)

    def list_chats(self, after: str | None = None, limit: int | None = None) -> ChatPage:
        return self._call(ChatPage, self.service.list_chats, self.user, after, limit)

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        import json

        body = json.dumps({"chat_ids": chat_ids}).encode("utf-8")
        return self._call(DigestsAnswer, self.service.digests, self.user, body)

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        return self._call(MessagePage, self.service.messages, self.user, chat_id, after, limit,
                          include_deleted)

    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        return self._call(SaveAnswer, self.service.save, self.user, chat_id, body,
                          idempotency_key)

    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        return self._call(DeleteAnswer, self.service.delete, self.user, chat_id, body,
                          idempotency_key)

    def close(self) -> None:
        self.storage.close()

    def __repr__(self) -> str:
        return f"EmbeddedRemote({self.url!r})"


__all__ = ["EmbeddedRemote", "InputError", "error_for_answer", "retry_after_seconds"]
