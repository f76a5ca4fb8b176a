"""Remotes: the backends chatsave talks to, behind one interface (see base.py).

``open_remote`` picks the transport from how the remote is written, like git:
``http(s)://host`` is a chatsave server, a plain path or ``file:`` URL an embedded
backend (the server's storage code in-process, no server needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from chatsave.errors import UsageError
from chatsave.remote.base import Remote

REMOTE_KINDS = ("http(s)://host, a path or file: URL (embedded backend), autobot+http(s)://host "
                "(an AutoBot backend), autobot-dir:PATH (AutoBot chat files)")
# Remote kinds that carry a bearer token (an embedded backend needs none).
TOKEN_SCHEMES = ("http", "https", "autobot+http", "autobot+https")
_DEFAULT_PORTS = {"http": 80, "https": 443, "autobot+http": 80, "autobot+https": 443}
MAX_TOKEN_CHARS = 4096


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
    parts = urlsplit(spec.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid port in the remote URL {spec!r}") from None
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
    if remote and urlsplit(remote).scheme.lower() in TOKEN_SCHEMES:
        path = stored_token_path(remote)
        if path.exists():
            return read_token_file(path)
    return None


def open_remote(spec: str, *, token: str | None = None, **http_options: Any) -> Remote:
    """Open the remote named by ``spec`` (see REMOTE_KINDS)."""
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        from chatsave.remote.http import HttpRemote

        return HttpRemote(spec, token=token, **http_options)
    if scheme.startswith("autobot"):
        return _open_autobot(spec, scheme, token, http_options)
    if scheme == "file":
        path = Path(unquote(parts.path))
    elif scheme and len(scheme) > 1:
        raise UsageError(f"unknown remote kind {scheme!r} in {spec!r}",
                         hint=f"remote kinds: {REMOTE_KINDS}")
    else:
        path = Path(spec)
    from chatsave.remote.embedded import EmbeddedRemote

    return EmbeddedRemote(path.expanduser())


def _open_autobot(spec: str, scheme: str, token: str | None,
                  options: dict[str, Any]) -> Remote:
    """An AutoBot remote; the server's time zone and HTTP settings come from the settings
    (``CHATSAVE_TZ``/config ``tz``, request timeout, retry attempts) unless given."""
    from chatsave.config import resolve
    from chatsave.remote.autobot_base import parse_zone

    settings = resolve({})
    if options.get("tz") is None:
        options["tz"] = parse_zone(settings.tz)
    if scheme == "autobot-dir":
        from chatsave.remote.autobot_dir import AutobotDirRemote

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
        from chatsave.remote.autobot import AutobotRemote
        from chatsave.remote.retry import RetryPolicy

        options.setdefault("request_timeout", settings.request_timeout)
        options.setdefault("policy", RetryPolicy(attempts=settings.retry_attempts))
        return AutobotRemote(spec, token=token, **options)
    raise UsageError(f"unknown remote kind {scheme!r} in {spec!r}",
                     hint=f"remote kinds: {REMOTE_KINDS}")
