"""The embedded remote: a backend in a local SQLite file, served in-process by the server's code.

``--remote ./backend.db`` or ``--remote file:///srv/backend.db`` gives a zero-setup backend
with exactly the protocol semantics of a chatsave server (the same Service and Storage code
run here, without HTTP), for one user, "local", the user a server without tokens serves.
Answers that are not 200 become the exceptions HttpRemote raises for them
(``error_for_answer``), and what HttpRemote retries (409, 429, 503) is retried here too,
so the core cannot tell the transports apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from chatsave.errors import (
    BadAnswerError,
    ChatsaveError,
    RefusedError,
    RequestRejectedError,
    TooLargeError,
    UnavailableError,
)
from chatsave.protocol import (
    BucketsAnswer,
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DigestsAnswer,
    MessagePage,
    SaveAnswer,
    SavesAnswer,
)
from chatsave.remote.base import Remote, check_saves
from chatsave.remote.retry import RETRYABLE_STATUS, RetryPolicy, parse_retry_after, rejects_batch

_M = TypeVar("_M", bound=BaseModel)


def error_for_answer(status: int, answer: Any, headers: dict[str, str] | None = None, *,
                     where: str = "backend", what: str = "request",
                     write: bool = False) -> ChatsaveError:
    """The exception for a final non-2xx protocol answer, as HttpRemote raises it.

    401/403 -> RefusedError; 413 -> TooLargeError (split and retry); 422, and for a
    ``write`` (save, delete) every 4xx that is the backend's verdict on the batch
    (``rejects_batch``) -> RequestRejectedError; other 4xx (404 included) -> RefusedError;
    retryable statuses
    (409 key still running, 429, 5xx) after the retries -> UnavailableError.
    ``details``: ``{"status", "code", "retry_after", "details"}`` of the envelope.
    """
    err = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or "error")
        detail = f"{code}: {err.get('message')}"
        inner = err.get("details")
    else:
        code, detail, inner = "error", f"HTTP {status} without an error envelope", None
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    details = {"status": status, "code": code, "retry_after": retry_after, "details": inner}
    if status in (401, 403):
        return RefusedError(f"{where}: the backend refused the credentials ({status} {detail})",
                            details=details)
    if status == 413:
        return TooLargeError(f"{where}: request too large ({detail})", details=details)
    if status == 422 or (write and rejects_batch(status, code)):
        return RequestRejectedError(f"{where}: the backend rejected the {what} ({detail})",
                                    details=details)
    if 400 <= status < 500 and status not in RETRYABLE_STATUS:
        return RefusedError(f"{where} refused the {what} ({status} {detail})", details=details)
    return UnavailableError(f"{where} failed ({status} {detail})",
                            hint="rerun later (progress is saved)", details=details)


def _create_private(path: Path) -> bool:
    """Create ``path`` as an empty file only its owner can read, unless it exists; True
    when this call created it."""
    from chatsave.config import make_private_dirs

    if path.exists():
        return False
    try:
        make_private_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise UnavailableError(f"cannot create the embedded backend {path}: {exc.strerror}",
                               hint="check the path and its permissions") from exc
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


class EmbeddedRemote(Remote):
    """A backend in the SQLite file ``location`` (a path or ``file:`` URL), for user "local".

    ``settings`` (chatsave.backend.settings.ServerSettings) sets limits and retention;
    the file is created on first use, 0600 in directories created 0700 (it holds
    conversations), and ``created`` says so. Housekeeping runs when opened, at most once
    per ``housekeeping_interval_s`` across every process using the file.

    With ``create=False`` a file that does not exist is not created: an empty backend
    with the same settings stands in for it (in a temporary directory, removed on close),
    and ``absent`` says so (a dry run, a read-only command).
    """

    def __init__(self, location: str | os.PathLike[str], *, settings: Any = None,
                 user: str | None = None, policy: RetryPolicy | None = None,
                 create: bool = True) -> None:
        # Imported here: the server package is only needed when this remote is used.
        from chatsave.backend import LOCAL_USER
        from chatsave.backend.service import Service
        from chatsave.backend.storage import StorageError, sqlite_path
        from chatsave.backend.storage.sqlite import SqliteStorage

        self.url = os.fspath(location)
        self.path: Path = sqlite_path(location)
        self.user = user or LOCAL_USER
        self.policy = policy or RetryPolicy()
        self.absent = not create and not self.path.exists()
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        storage_path = self.path
        if self.absent:
            self._scratch = tempfile.TemporaryDirectory(prefix="chatsave-absent-")
            storage_path = Path(self._scratch.name) / "backend.db"
        self.created = False if self.absent else _create_private(self.path)
        try:
            self.storage = SqliteStorage(storage_path)
        except StorageError as exc:
            if self.created:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise UnavailableError(
                f"cannot open the embedded backend {self.path}: {exc.message}",
                hint="check the path and its permissions") from exc
        self.service = Service(self.storage, settings)
        self._storage_error = StorageError
        with contextlib.suppress(StorageError):  # best effort; the next open tries again
            self.service.maybe_housekeep()

    def _answer(self, what: str, fn: Any, *args: Any,
                write: bool = False) -> tuple[int, Any, dict[str, str]]:
        """Call the service, retrying what HttpRemote retries (409 running, 429, 503)."""
        for attempt in range(1, self.policy.attempts + 1):
            try:
                status, answer, headers = fn(*args)
            except self._storage_error as exc:
                raise UnavailableError(f"embedded backend {self.path}: {exc.message}",
                                       hint="rerun later (progress is saved)") from exc
            if status not in RETRYABLE_STATUS or attempt == self.policy.attempts:
                break
            time.sleep(self.policy.delay(attempt, parse_retry_after(headers.get("Retry-After"))))
        if status != 200:
            raise error_for_answer(status, answer, headers, where=f"embedded backend {self.url}",
                                   what=what, write=write)
        return status, answer, headers

    def _call(self, model: type[_M], what: str, fn: Any, *args: Any, write: bool = False) -> _M:
        _status, answer, _headers = self._answer(what, fn, *args, write=write)
        try:
            return model.model_validate(answer)
        except ValidationError as exc:  # pragma: no cover - the service builds these
            raise BadAnswerError(f"embedded backend {self.url}: unexpected answer: {exc}") \
                from exc

    def capabilities(self) -> Capabilities:
        return self._call(Capabilities, "capabilities request", self.service.capabilities)

    def list_chats(self, after: str | None = None, limit: int | None = None) -> ChatPage:
        return self._call(ChatPage, "chat list request", self.service.list_chats, self.user,
                          after, limit)

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        body = json.dumps({"chat_ids": chat_ids}).encode("utf-8")
        return self._call(DigestsAnswer, "digest request", self.service.digests, self.user,
                          body)

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        return self._page(chat_id, self.service.messages(self.user, chat_id, after, limit,
                                                         include_deleted))

    def buckets(self, chat_id: str) -> BucketsAnswer | None:
        answer = self.service.buckets(self.user, chat_id)
        if _not_found(answer):
            return BucketsAnswer(chat_id=chat_id, version=0, buckets={})
        return self._call(BucketsAnswer, "bucket digest request", lambda: answer)

    def bucket_messages(self, chat_id: str, buckets: list[str], after: int | None = None,
                        limit: int | None = None) -> MessagePage:
        return self._page(chat_id, self.service.messages(self.user, chat_id, after, limit,
                                                         True, ",".join(buckets)))

    def _page(self, chat_id: str, answer: tuple[int, Any, dict[str, str]]) -> MessagePage:
        if _not_found(answer):
            # As HttpRemote: a chat the backend does not have is an empty page, version 0.
            return MessagePage(chat_id=chat_id, version=0, messages=[], next=None)
        return self._call(MessagePage, "message page request", lambda: answer)

    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        return self._call(SaveAnswer, "save request", self.service.save, self.user, chat_id,
                          body, idempotency_key, write=True)

    def save_many(self, chat_ids: list[str], body: bytes,
                  idempotency_key: str) -> list[SaveAnswer]:
        answer = self._call(SavesAnswer, "save request", self.service.save_many, self.user,
                            body, idempotency_key, write=True)
        return check_saves(f"embedded backend {self.url}", chat_ids, answer)

    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        return self._call(DeleteAnswer, "delete request", self.service.delete, self.user,
                          chat_id, body, idempotency_key, write=True)

    def close(self) -> None:
        self.storage.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def __repr__(self) -> str:
        return f"EmbeddedRemote({self.url!r})"



def _not_found(answer: tuple[int, Any, dict[str, str]]) -> bool:
    """Whether the service answered that the chat does not exist (404 not_found)."""
    status, body, _headers = answer
    return status == 404 and body.get("error", {}).get("code") == "not_found"
