"""Remotes: the backends chatsave talks to, behind one interface (see base.py).

``open_remote`` picks the transport from how the remote is written, like git:
``http(s)://host`` is a chatsave server, a plain path or ``file:`` URL an embedded
backend (the server's storage code in-process, no server needed).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from chatsave.errors import UsageError
from chatsave.remote.base import Remote

REMOTE_KINDS = "http(s)://host, a path or file: URL (embedded backend)"


def read_token_file(path: Path) -> str:
    """The token in ``path``; refused, like ssh and netrc do, if others can read it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the token file {path} is readable by others "
                         f"(mode {stat.filemode(info.st_mode)})",
                         hint=f"chmod 600 {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UsageError(f"the token file {path} belongs to another user",
                         hint="use a token file that you own")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


def resolve_token(token_file: Path | None) -> str | None:
    """CHATSAVE_TOKEN, else the token file, else none."""
    env = os.environ.get("CHATSAVE_TOKEN")
    if env:
        return env.strip()
    if token_file is not None:
        return read_token_file(token_file)
    return None


def open_remote(spec: str, *, token: str | None = None, **http_options: Any) -> Remote:
    """Open the remote named by ``spec`` (see REMOTE_KINDS)."""
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        from chatsave.remote.http import HttpRemote

        return HttpRemote(spec, token=token, **http_options)
    if scheme.startswith("autobot"):
        raise UsageError(f"remote kind {scheme}: is not supported yet",
                         hint=f"remote kinds: {REMOTE_KINDS}")
    if scheme == "file":
        path = Path(unquote(parts.path))
    elif scheme and len(scheme) > 1:
        raise UsageError(f"unknown remote kind {scheme!r} in {spec!r}",
                         hint=f"remote kinds: {REMOTE_KINDS}")
    else:
        path = Path(spec)
    from chatsave.remote.embedded import EmbeddedRemote

    return EmbeddedRemote(path.expanduser())
