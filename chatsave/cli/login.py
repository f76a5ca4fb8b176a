"""``chatsave login``: keep a backend's bearer token in a private file (never in argv)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from chatsave.cli.runtime import Runtime, command
from chatsave.errors import RefusedError, UsageError
from chatsave.ops.result import RunResult

# A token is one line; more than this on stdin is not a token.
MAX_INPUT = 8192


def _read_token(rt: Runtime, where: str) -> str:
    """The token from a no-echo prompt on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        import getpass

        try:
            return getpass.getpass(f"Token for {where} (not shown): ")
        except EOFError:
            raise UsageError("no token given") from None
    data = sys.stdin.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise UsageError(f"more than {MAX_INPUT} characters on stdin; expected one token")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if not lines:
        raise UsageError("no token on stdin and no terminal to ask on",
                         hint="pipe it in: chatsave login --remote URL < token.txt")
    if len(lines) > 1:
        raise UsageError("several lines on stdin; expected one token")
    return lines[0]


def login_cmd(
    rt: Runtime,
    forget: Annotated[bool, typer.Option(
        "--forget", help="Remove the token stored for this backend.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Check the token with the backend before storing it.")
    ] = True,
) -> RunResult:
    """Store the bearer token of a backend, read from a prompt or stdin (never from argv).

    The token goes to a file only you can read (0600, in a 0700 directory), and later
    commands with this --remote use it when neither CHATSAVE_TOKEN nor --token-file is set.

    Example: chatsave login --remote https://chats.example.com < token.txt
    """
    from chatsave.remote import (
        TOKEN_SCHEMES,
        check_token,
        check_url,
        forget_token,
        remote_key,
        store_token,
    )
    from chatsave.remote.http import is_loopback

    spec = rt.settings.remote
    if not spec:
        raise UsageError("chatsave login needs the backend the token is for",
                         hint="pass --remote https://host (or set CHATSAVE_REMOTE)")
    from urllib.parse import urlsplit

    if "://" in spec:
        check_url(spec)  # malformed (http://[::1): a usage error quoting it, before parsing
    parts = urlsplit(spec)
    if parts.scheme.lower() not in TOKEN_SCHEMES or not parts.hostname:
        raise UsageError(f"{spec!r} is not a backend that takes a token",
                         hint="login is for http(s):// backends; an embedded backend (a path) "
                         "needs none")
    key = remote_key(spec)
    result = RunResult("login")
    result.details["remote"] = key
    if forget:
        removed = forget_token(spec)
        result.details["token_file"] = str(removed) if removed else None
        rt.out.info(f"forgot the token for {key}" if removed
                    else f"no token was stored for {key}")
        return result
    if parts.scheme.lower().endswith("http") and not is_loopback(parts.hostname) \
            and not rt.allow_insecure:
        raise UsageError(f"refusing to keep a token for plain http to {parts.hostname}: "
                         "it would travel unencrypted",
                         hint="use https://, or --allow-insecure if this network is trusted")
    given = "the prompt" if sys.stdin.isatty() else "stdin"
    token = check_token(_read_token(rt, key), "the input")
    rt.secrets.append(token)
    if verify:
        _verify(rt, spec, token, given)
    path = store_token(spec, token)
    result.details["token_file"] = str(path)
    result.details["verified"] = verify
    rt.out.info(f"token for {key} stored in {path}"
                + ("" if verify else " (not checked with the backend)"))
    return result


def _verify(rt: Runtime, spec: str, token: str, given: str) -> None:
    """Ask the backend something that needs the token (a refusal exits 9, nothing stored)."""
    from chatsave.remote import open_remote
    from chatsave.remote.retry import RetryPolicy

    options: dict[str, Any] = {"request_timeout": rt.settings.request_timeout,
                               "policy": RetryPolicy(attempts=rt.settings.retry_attempts),
                               "allow_insecure": rt.allow_insecure}
    with open_remote(spec, token=token, **options) as remote:
        remote.capabilities()
        try:
            remote.list_chats(limit=1)
        except RefusedError as exc:
            if (exc.details or {}).get("status") in (401, 403):
                # The token is the one given on the prompt or stdin, not one from the
                # environment or a file: say so, and that nothing was stored.
                exc.hint = (f"the token read from {given} was not stored; check it (on the "
                            "server, chatsave serve token add USER mints a new one), or "
                            "store it unchecked with --no-verify")
            raise


def register(app: typer.Typer) -> None:
    command(app, "login")(login_cmd)
