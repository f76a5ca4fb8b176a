"""Remotes: the backends chatsave talks to, behind one interface (see base.py).

``open_remote`` picks the transport from how the remote is written, like git:
``http(s)://host`` is a chatsave server, a path with a ``/`` in it (``./backend.db``,
``/srv/chats.db``, ``~/chats.db``) or a ``file:`` URL an embedded backend (the server's
storage code in-process, no server needed). A bare word (``backend.db``,
``127.0.0.1:8000``) is refused: it is as likely a server's name missing its ``http://``
as a file, and taking it as a file saved a typo'd cron job into a new local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from chatsave.errors import UsageError
from chatsave.remote.base import Remote

REMOTE_KINDS = ("http(s)://host, a path with a / or a file: URL (embedded backend: ./backend.db), "
                "autobot+http(s)://host (an AutoBot backend), autobot-dir:PATH (AutoBot chat "
                "files)")
# Remote kinds that carry a bearer token (an embedded backend needs none).
TOKEN_SCHEMES = ("http", "https", "autobot+http", "autobot+https")
_DEFAULT_PORTS = {"http": 80, "https": 443, "autobot+http": 80, "autobot+https": 443}
MAX_TOKEN_CHARS = 4096
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# HOST:PORT, optionally followed by a path: a server's address without its scheme.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}(/.*)?",
                        re.DOTALL)


def scheme_of(spec: str) -> str:
    """The lower-case scheme ``spec`` is written with ("" for none); never raises."""
    found = _SCHEME.match(spec)
    return found.group(1).lower() if found else ""


def is_bare_name(spec: str) -> bool:
    """Whether ``spec`` is a bare word: no scheme and no path separator."""
    seps = {"/", os.sep, os.altsep or "/"}
    return not any(sep in spec for sep in seps) and len(scheme_of(spec)) <= 1


def check_url(spec: str) -> None:
    """Refuse (UsageError, exit 2) a server URL that cannot be parsed or names no host."""
    import httpx

    why = None
    try:
        parts = urlsplit(spec)
        parts.port  # noqa: B018 - parsing the port is what may fail
        host = parts.hostname
        httpx.URL(spec)
    except (ValueError, httpx.InvalidURL) as exc:
        why = str(exc)
    else:
        if not host:
            why = "no host"
        elif not host.isprintable() or any(ch.isspace() for ch in host):
            why = "spaces or control characters in the host"
    if why is not None:
        raise UsageError(f"malformed remote URL {spec!r}: {why}",
                         hint="write it as scheme://HOST[:PORT], like http://127.0.0.1:8000 "
                         "or https://chats.example.com")


def check_token(token: str, source: str) -> str:
    """``token`` if it can travel in an Authorization header; the error never quotes it."""
    token = token.strip()
    if not token:
        raise UsageError(f"the token from {source} is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise UsageError(f"the token from {source} is longer than {MAX_TOKEN_CHARS} characters")
    if not all("!" <= ch <= "~" for ch in token):
        raise UsageError(f"the token from {source} contains spaces, control or non-ASCII "
                         "characters, which cannot travel in an HTTP header",
                         hint="check that the whole token, and only the token, was given")
    return token


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
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the token file {path}: {why}") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return check_token(token, f"the token file {path}")


def credentials_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where ``chatsave login`` keeps tokens: $CHATSAVE_HOME/credentials, else the
    platform's user config dir (the directory is 0700, each token file 0600)."""
    from chatsave.config import APP, home_dir

    home = home_dir(env)
    if home is not None:
        return home / "credentials"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP, appauthor=False)) / "credentials"


def remote_key(spec: str) -> str:
    """The remote a stored token belongs to: ``scheme://host[:port]/path``, lower-case host,
    default port, user info, query and trailing slash dropped."""
    check_url(spec.strip())
    parts = urlsplit(spec.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def stored_token_path(spec: str, env: Mapping[str, str] = os.environ) -> Path:
    """The file ``chatsave login`` stores the token of remote ``spec`` in (named by a hash of
    the remote, so nothing from the URL reaches a file name)."""
    digest = hashlib.sha256(remote_key(spec).encode("utf-8")).hexdigest()[:32]
    return credentials_dir(env) / f"{digest}.token"


def _private_dir(path: Path) -> None:
    """Create ``path`` as a directory only we can enter (0700 whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is not a directory (a symbolic link?); refusing to keep "
                         "tokens there", hint=f"remove {path}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UsageError(f"{path} belongs to another user; refusing to keep tokens there",
                         hint=f"remove {path}, or set CHATSAVE_HOME to a directory you own")
    os.chmod(path, 0o700)


def store_token(spec: str, token: str, env: Mapping[str, str] = os.environ) -> Path:
    """Write the token of remote ``spec`` to its file, atomically, 0600 in a 0700 dir."""
    token = check_token(token, "the input")
    path = stored_token_path(spec, env)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _private_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only take bits away; make it exact
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UsageError(f"cannot store the token in {path.parent}: {exc.strerror}") from None
    return path


def forget_token(spec: str, env: Mapping[str, str] = os.environ) -> Path | None:
    """Remove the stored token of remote ``spec``; its former path, or None if none."""
    path = stored_token_path(spec, env)
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot remove {path}: {exc.strerror}") from None
    return path


def resolve_token(token_file: Path | None, remote: str | None = None) -> str | None:
    """CHATSAVE_TOKEN, else the token file, else the token ``chatsave login`` stored for
    ``remote``, else none."""
    env = os.environ.get("CHATSAVE_TOKEN")
    if env:
        return check_token(env, "CHATSAVE_TOKEN")
    if token_file is not None:
        return read_token_file(token_file)
    if remote and scheme_of(remote) in TOKEN_SCHEMES:
        path = stored_token_path(remote)
        if path.exists():
            return read_token_file(path)
    return None


@dataclass(frozen=True)
class Spelling:
    """How a remote is to be opened: ``spec``, and a warning for the user (or None)."""

    spec: str
    warning: str | None = None


def check_remote(spec: str, recorded: Collection[str] = ()) -> Spelling:
    """Check how ``spec`` is written: a malformed URL, a bare word or HOST:PORT is refused
    (UsageError, exit 2), quoting it.

    ``recorded``: the backend URLs the local store has used, so that an embedded backend
    recorded under a bare file name (accepted until 0.2) keeps working, with a warning.
    """
    scheme = scheme_of(spec)
    if scheme in ("http", "https", "autobot+http", "autobot+https"):
        check_url(spec)
        return Spelling(spec)
    if scheme.startswith("autobot") or scheme == "file":
        return Spelling(spec)
    if _HOST_PORT.fullmatch(spec):
        raise UsageError(f"the remote {spec!r} has no scheme; did you mean http://{spec}?",
                         hint=f"a server is written http://{spec} (or https://); an embedded "
                         "backend file is a path with a /, like ./backend.db")
    if len(scheme) > 1:
        raise UsageError(f"unknown remote kind {scheme!r} in {spec!r}",
                         hint=f"remote kinds: {REMOTE_KINDS}")
    if not is_bare_name(spec):
        return Spelling(spec)
    if not spec.strip():
        raise UsageError("the remote is empty",
                         hint="pass --remote URL|PATH (./backend.db for an embedded backend)")
    spelled = embedded_url(Path(spec))
    used = {os.path.normpath(u) for u in recorded if len(scheme_of(u)) <= 1}
    if os.path.normpath(spec) in used and Path(spec).expanduser().is_file():
        return Spelling(spelled, f"the remote {spec!r} is a bare name, read as the embedded "
                        f"backend {spelled} that this store already saved to; write it as "
                        f"{spelled} (a bare name is refused for any other backend)")
    raise UsageError(f"the remote {spec!r} is neither a URL nor a path",
                     hint=f"for an embedded backend file write {spelled}; for a server, "
                     f"http://{spec} (or https://)")


def embedded_url(path: Path) -> str:
    """How an embedded backend's file is written as a remote: with a ``/`` in it."""
    text = os.fspath(path)
    return text if "/" in text or os.sep in text else f"./{text}"


def open_remote(spec: str, *, token: str | None = None, create: bool = True,
                **http_options: Any) -> Remote:
    """Open the remote named by ``spec`` (see REMOTE_KINDS; checked by check_remote).

    An embedded backend that did not exist is created (its ``created`` says so), unless
    ``create`` is False: then an empty one stands in for it (its ``absent`` says so).
    """
    spec = check_remote(spec).spec
    scheme = scheme_of(spec)
    if scheme in ("http", "https"):
        from chatsave.remote.http import HttpRemote

        return HttpRemote(spec, token=token, **http_options)
    if scheme.startswith("autobot"):
        return _open_autobot(spec, scheme, token, http_options)
    from chatsave.backend.storage import sqlite_path
    from chatsave.remote.embedded import EmbeddedRemote

    return EmbeddedRemote(embedded_url(sqlite_path(spec).expanduser()), create=create)


def _open_autobot(spec: str, scheme: str, token: str | None,
                  options: dict[str, Any]) -> Remote:
    """An AutoBot remote; the server's time zone and HTTP settings come from the settings
    (``CHATSAVE_TZ``/config ``tz``, request timeout, retry attempts) unless given."""
    from chatsave.config import resolve
    from chatsave.remote.autobot.shapes import parse_zone

    settings = resolve({})
    if options.get("tz") is None:
        options["tz"] = parse_zone(settings.tz)
    if scheme == "autobot-dir":
        from chatsave.remote.autobot.directory import AutobotDirRemote

        location = spec[len("autobot-dir:"):]
        if location.startswith("//"):
            location = unquote(urlsplit(spec).path)
        if not location:
            raise UsageError("autobot-dir: needs a directory, like autobot-dir:/srv/autobot/"
                             "data/chats")
        cache = options.get("autobot_cache") or settings.autobot_cache
        return AutobotDirRemote(Path(location).expanduser(), tz=options["tz"],
                                cache_off=cache == "off")
    if scheme in ("autobot+http", "autobot+https"):
        from chatsave.remote.autobot.http import AutobotRemote
        from chatsave.remote.retry import RetryPolicy

        options.setdefault("request_timeout", settings.request_timeout)
        options.setdefault("policy", RetryPolicy(attempts=settings.retry_attempts))
        return AutobotRemote(spec, token=token, **options)
    raise UsageError(f"unknown remote kind {scheme!r} in {spec!r}",
                     hint=f"remote kinds: {REMOTE_KINDS}")
