"""The exception tree and the exit codes: every failure chatsave reports has a class here.

::

    ChatsaveError                      (exit code carried by each class)
    ├── UsageError              2      a wrong call: bad flag, missing remote, no TTY to prompt on
    │   ├── MissingExtraError          an optional part (a pip extra) is not installed
    │   ├── ListenError                serve: the address is in use, not local, or not allowed
    │   └── StoreMissingError          a read-only command pointed at a store that does not exist
    ├── InputError              2      invalid input: ids, message shapes, files
    │   ├── InvalidIdError             a chat or message id that cannot be used
    │   └── InvalidItemError           one message that cannot be normalised
    ├── StoreError             10      the local store: corrupt, unreadable, newer schema, disk full
    │   ├── StoreNewerError            written by a newer chatsave
    │   └── StoreFullError             disk full / file size limit
    ├── LockedError             7      another live chatsave holds the store
    ├── GuardError              5      a safety guard refused; nothing destructive done
    ├── RemoteError                    anything the backend did
    │   ├── UnavailableError    8      unreachable, timeouts, 5xx after retries, circuit open
    │   │   ├── BadAnswerError         an answer that is not what the protocol promises
    │   │   └── TooLargeError          413: the request must be split
    │   ├── RequestRejectedError 4     422: the backend refused this request's content
    │   ├── RefusedError        9      auth, missing endpoint or capability, protocol mismatch
    │   └── ChatRefusedError    9      one chat the backend cannot take; the others go on
    └── Interrupted           130      SIGINT / SIGTERM; progress is saved

Exit codes that describe an *outcome* rather than an error (1 differences, 3 partial,
4 rejected, 6 conflicts) are computed from a run's counters, not raised.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes, as scripts rely on them (README, "Exit codes")."""

    OK = 0
    DIFFERENCES = 1
    USAGE = 2
    PARTIAL = 3
    REJECTED = 4
    GUARD = 5
    CONFLICTS = 6
    LOCKED = 7
    UNAVAILABLE = 8
    REFUSED = 9
    STORE = 10
    INTERRUPTED = 130


# Most severe first: when several apply, the first one found here wins.
SEVERITY: tuple[ExitCode, ...] = (
    ExitCode.INTERRUPTED,
    ExitCode.USAGE,
    ExitCode.STORE,
    ExitCode.REFUSED,
    ExitCode.LOCKED,
    ExitCode.GUARD,
    ExitCode.REJECTED,
    ExitCode.CONFLICTS,
    ExitCode.UNAVAILABLE,
    ExitCode.PARTIAL,
    ExitCode.DIFFERENCES,
    ExitCode.OK,
)
_RANK = {code: rank for rank, code in enumerate(SEVERITY)}


def most_severe(*codes: int) -> ExitCode:
    """Return the most severe of ``codes`` (``OK`` when given none)."""
    found = [ExitCode(c) for c in codes]
    if not found:
        return ExitCode.OK
    return min(found, key=lambda c: _RANK[c])


class ChatsaveError(Exception):
    """Root of every error chatsave reports; carries its exit code and a hint."""

    exit_code: ExitCode = ExitCode.USAGE
    code: str = "error"

    def __init__(self, message: str, *, hint: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message,
                               "hint": self.hint or None}
        if self.details is not None:
            out["details"] = self.details
        return out


class UsageError(ChatsaveError):
    exit_code = ExitCode.USAGE
    code = "usage"


class StoreMissingError(UsageError):
    """No store at the path yet: only a command that writes creates one."""

    code = "no_store"


class MissingExtraError(UsageError):
    """A command needs an optional part of chatsave (a pip extra) that is not installed."""

    code = "missing_extra"

    def __init__(self, what: str, extras: list[str], missing: str) -> None:
        names = ",".join(extras)
        super().__init__(
            f"{what} needs chatsave[{names}], which is not installed (no module {missing!r})",
            hint=f"pip install 'chatsave[{names}]' (in a clone of the repository: "
                 f"pip install -e '.[{names}]')",
            details={"extras": extras, "missing_module": missing})


class ListenError(UsageError):
    """``chatsave serve`` cannot listen where asked: the port is in use, the address is not
    this machine's, or the port needs privileges."""

    code = "listen"


class InputError(ChatsaveError):
    exit_code = ExitCode.USAGE
    code = "invalid_input"


class InvalidIdError(InputError):
    code = "invalid_id"


class InvalidItemError(InputError):
    code = "invalid_item"


class StoreError(ChatsaveError):
    exit_code = ExitCode.STORE
    code = "store"


class StoreNewerError(StoreError):
    code = "store_newer"


class StoreFullError(StoreError):
    code = "store_full"


class LockedError(ChatsaveError):
    exit_code = ExitCode.LOCKED
    code = "locked"


class GuardError(ChatsaveError):
    exit_code = ExitCode.GUARD
    code = "guard"


class RemoteError(ChatsaveError):
    exit_code = ExitCode.UNAVAILABLE
    code = "remote"


class UnavailableError(RemoteError):
    exit_code = ExitCode.UNAVAILABLE
    code = "unavailable"


class BadAnswerError(UnavailableError):
    code = "bad_answer"


class TooLargeError(UnavailableError):
    code = "too_large"


class RequestRejectedError(RemoteError):
    exit_code = ExitCode.REJECTED
    code = "rejected"


class RefusedError(RemoteError):
    exit_code = ExitCode.REFUSED
    code = "refused"


class ChatRefusedError(RemoteError):
    """The backend cannot take one chat at all (exit 9); nothing was sent for it.

    A remote raises it before any request for that chat (or answers it from ``refusal``).
    Unlike RefusedError it does not end the run: the operations leave that chat out (its
    messages stay here, pending), go on with the others, list it, and exit 9 at the end.
    """

    exit_code = ExitCode.REFUSED
    code = "chat_refused"


class Interrupted(ChatsaveError):
    exit_code = ExitCode.INTERRUPTED
    code = "interrupted"


def would_refuse(error: ChatsaveError) -> dict[str, Any]:
    """How a dry run reports a refusal the real run would meet (it is not refused itself):
    the error as a summary shows it, with the exit code the real run would end with."""
    return {**error.to_json(), "exit_code": int(error.exit_code)}
