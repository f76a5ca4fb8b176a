"""Bearer tokens of the server: minting (``serve token add``), the tokens file, verification.

The file holds only sha256 hashes of the tokens (they are 256-bit random strings, so a fast
hash is enough), is written atomically with mode 0600, and is re-read when it changes, so a
token added while the server runs works without a restart. A file that names a member twice
(two ``tokens`` lists, say) is refused rather than read as its last one: which tokens are
valid must not depend on a reader's choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatsave import strictjson
from chatsave.errors import InputError, UsageError

log = logging.getLogger("chatsave.server")

FORMAT = "chatsave-tokens"
USER_RE = re.compile(r"[A-Za-z0-9._@~-]{1,64}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_user(user: str) -> str:
    if not USER_RE.fullmatch(user):
        raise InputError(f"invalid user name {user!r}",
                         hint="user names are 1-64 characters from A-Z a-z 0-9 . _ @ ~ -")
    return user


@dataclass(frozen=True)
class TokenEntry:
    user: str
    sha256: str
    created_at: str


def _read(path: Path) -> list[TokenEntry]:
    try:
        doc = strictjson.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no tokens file {path}",
                         hint=f"create one with: chatsave serve token add USER --tokens {path}"
                         ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the tokens file {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT \
            or not isinstance(doc.get("tokens"), list):
        raise UsageError(f"{path} is not a chatsave tokens file")
    out = []
    for item in doc["tokens"]:
        try:
            out.append(TokenEntry(user=check_user(item["user"]), sha256=str(item["sha256"]),
                                  created_at=str(item.get("created_at", ""))))
        except (KeyError, TypeError, InputError) as exc:
            raise UsageError(f"{path}: bad entry {item!r}: {exc}") from None
    return out


def _write(path: Path, entries: list[TokenEntry]) -> None:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "tokens": [{"user": e.user, "sha256": e.sha256, "created_at": e.created_at}
                   for e in entries],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_token(tokens_file: str | os.PathLike[str], user: str) -> str:
    """Mint a token for ``user``, store its hash in ``tokens_file`` (0600), return the token.

    The token is shown once by the caller and never stored in clear.
    """
    path = Path(tokens_file)
    check_user(user)
    entries = _read(path) if path.exists() else []
    token = secrets.token_urlsafe(32)
    entries.append(TokenEntry(user=user, sha256=token_hash(token),
                              created_at=datetime.now(UTC).isoformat(timespec="seconds")))
    try:
        _write(path, entries)
    except OSError as exc:
        raise UsageError(f"cannot write the tokens file {path}: {exc}") from exc
    return token


class TokenStore:
    """The tokens file, re-read when it changes (checked at most once a second)."""

    def __init__(self, path: str | os.PathLike[str], *, recheck_s: float = 1.0) -> None:
        self.path = Path(path)
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._entries = _read(self.path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._recheck_s:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._entries = _read(self.path)
                self._stamp = stamp
            except UsageError as exc:  # keep serving with the tokens we know
                log.error("tokens file not reloaded: %s", exc.message)

    def verify(self, token: str) -> tuple[str, str] | None:
        """(user, token hash) for a valid token, None otherwise (constant time per entry)."""
        self._refresh()
        digest = token_hash(token)
        found: tuple[str, str] | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = (entry.user, entry.sha256)
        return found
