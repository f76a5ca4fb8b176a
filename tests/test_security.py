"""Client secrets and transport: where the token lives, and that it never leaks.

- ``chatsave login`` keeps the token in a 0600 file in a 0700 directory whatever the umask,
  reads it from a no-echo prompt or stdin (never argv), and checks it with the backend;
- token files readable by others or owned by someone else are refused (like ssh, netrc);
- a canary token run through every command (real server, answers that echo the request
  headers back, forced crashes with and without --traceback) never appears in stdout,
  stderr, --json lines, the store or any other file;
- no token over plain http to anything but loopback without --allow-insecure, no redirect
  followed, no credentials in remote URLs.

Transport tests use httpx.MockTransport (every HttpRemote the CLI opens gets it): no
non-loopback address is ever on the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.errors import (
    ChatsaveError,
    ExitCode,
    RefusedError,
    UnavailableError,
    UsageError,
)
from chatsave.remote import (
    credentials_dir,
    read_token_file,
    remote_key,
    resolve_token,
    store_token,
    stored_token_path,
)
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RETRYABLE_STATUS, RetryPolicy
from tests.conftest import Ran
from tests.faults import Faults

# A token that must never be seen anywhere but where it is given and stored.
CANARY = "cnry-Q7hX2pLw9VzK4mTb8RfY3dNc"  # pragma: allowlist secret
CAPS = {"protocol": 1, "server": "chatsave/0.1", "backend_id": "b-mock",
        "max_batch_messages": 1000, "max_body_bytes": 8 << 20, "max_page": 1000,
        "idempotency_retention_s": 86400, "features": []}
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------ helpers
class Network:
    """Stands in for the network of every HttpRemote: records requests, answers them."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Callable[[httpx.Request], httpx.Response] = capabilities_then(
            echo(500))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)

    @property
    def hosts(self) -> set[str]:
        return {r.url.host for r in self.requests}


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    """Every HttpRemote gets a MockTransport (no sockets); retries do not sleep."""
    net = Network()
    original = HttpRemote.__init__

    def init(self: HttpRemote, url: str, **kwargs: Any) -> None:
        kwargs["transport"] = httpx.MockTransport(net)
        original(self, url, **kwargs)

    monkeypatch.setattr(HttpRemote, "__init__", init)
    monkeypatch.setattr("chatsave.remote.http.time.sleep", lambda s: None)
    return net


def _headers_text(request: httpx.Request) -> str:
    return "\n".join(f"{k}: {v}" for k, v in request.headers.multi_items())


def echo(status: int, kind: str = "json") -> Callable[[httpx.Request], httpx.Response]:
    """An answer that echoes every request header back (as debug servers and proxies do)."""

    def answer(request: httpx.Request) -> httpx.Response:
        sent = _headers_text(request)
        auth = request.headers.get("authorization", "")
        headers = {"X-Echo-Authorization": auth, "WWW-Authenticate": f'Bearer realm="{auth}"'}
        if status in (301, 302, 303, 307, 308):
            headers["Location"] = f"https://collector.invalid/?h={auth.split()[-1]}"
        if kind == "json":
            body = json.dumps({"error": {"code": "echo", "message": f"you sent {sent}",
                                         "details": {"headers": dict(request.headers)}}})
            headers["Content-Type"] = "application/json"
        else:
            body = f"<html><body><pre>{sent}</pre></body></html>"
            headers["Content-Type"] = "text/html"
        return httpx.Response(status, content=body.encode(), headers=headers)

    return answer


def capabilities_then(then: Callable[[httpx.Request], httpx.Response]
                      ) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/capabilities"):
            return httpx.Response(200, json=CAPS)
        return then(request)

    return answer


def tokens_file_for(path: Path, **users: str) -> Path:
    """A server tokens file holding the hashes of the given tokens (user=token)."""
    doc = {"format": "chatsave-tokens", "version": 1,
           "tokens": [{"user": u, "sha256": hashlib.sha256(t.encode()).hexdigest(),
                       "created_at": "2026-01-01T00:00:00+00:00"} for u, t in users.items()]}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def wire(chat_id: str, mid: str, i: int, content: str | None = None) -> dict[str, Any]:
    return {"chat_id": chat_id, "id": mid, "role": "user" if i % 2 else "assistant",
            "content": content or f"message {i} of {chat_id}",
            "created_at": (T0 + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")}


def write_dump(path: Path) -> Path:
    lines = [wire("c1", f"m{i}", i) for i in range(6)]
    lines += [wire("c2", f"n{i}", i) for i in range(4)]
    # A retry copy (same role, content and time, another id): something for dedupe.
    lines.append(wire("c2", "n3-copy", 3))
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield path


def assert_no_canary(ran: Ran, *roots: Path, allowed: tuple[Path, ...] = ()) -> None:
    """The canary is in none of the outputs and no file under ``roots`` but ``allowed``."""
    assert CANARY not in ran.stdout, ran.stdout
    assert CANARY not in ran.stderr, ran.stderr
    for path in files_under(*roots):
        if path in allowed:
            continue
        assert CANARY.encode() not in path.read_bytes(), f"the token is in {path}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- login
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_login_stores_0600_in_0700_whatever_the_umask(cli: Any, home: Path,
                                                      umask: int) -> None:
    old = os.umask(umask)
    try:
        ran = cli("login", "--remote", "https://chats.example.com", "--no-verify", "--json",
                  input=CANARY + "\n")
    finally:
        os.umask(old)
    assert ran.exit_code == 0, ran.stderr
    path = stored_token_path("https://chats.example.com")
    assert path.parent == home / "credentials"
    assert mode(path.parent) == 0o700 and mode(path) == 0o600
    assert path.read_text().strip() == CANARY
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp files left"
    assert ran.summary["token_file"] == str(path)
    assert_no_canary(ran, home, allowed=(path,))


def test_login_tightens_a_loose_directory_and_refuses_a_link(cli: Any, home: Path,
                                                            tmp_path: Path) -> None:
    creds = credentials_dir()
    creds.mkdir(mode=0o777)
    creds.chmod(0o777)
    ran = cli("login", "--remote", "https://a.example", "--no-verify", input=CANARY)
    assert ran.exit_code == 0, ran.stderr
    assert mode(creds) == 0o700
    # A link planted where the directory goes is not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for child in creds.iterdir():
        child.unlink()
    creds.rmdir()
    creds.symlink_to(elsewhere, target_is_directory=True)
    ran = cli("login", "--remote", "https://b.example", "--no-verify", input=CANARY)
    assert ran.exit_code == 2 and "not a directory" in ran.stderr
    assert list(elsewhere.iterdir()) == []


def test_login_never_takes_the_token_from_argv(cli: Any, home: Path) -> None:
    ran = cli("login", "--remote", "https://chats.example.com", CANARY)
    assert ran.exit_code == 2
    assert not stored_token_path("https://chats.example.com").exists()
    helptext = cli("login", "--help").stdout
    assert "--token " not in helptext and "stdin" in helptext


@pytest.mark.parametrize("given, says", [
    ("", "no token on stdin"),
    ("\n\n", "no token on stdin"),
    (f"{CANARY}\nsecond-line\n", "several lines"),
    (f"{CANARY} with spaces", "spaces"),
    (f"{CANARY}\x1b[2J", "control"),
    ("x" * 9000, "more than"),
], ids=["empty", "blank-lines", "two-lines", "spaces", "escape", "too-long"])
def test_login_refuses_what_is_not_one_token(cli: Any, home: Path, given: str,
                                             says: str) -> None:
    ran = cli("login", "--remote", "https://chats.example.com", "--no-verify", "--json",
              input=given)
    assert ran.exit_code == 2 and says in ran.stderr
    assert ran.summary["exit_code"] == 2
    assert not stored_token_path("https://chats.example.com").exists()
    assert_no_canary(ran, home)


def test_login_prompts_without_echo_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatsave.cli import login
    from chatsave.cli.runtime import Runtime

    class Tty:
        def isatty(self) -> bool:
            return True

        def read(self, n: int = -1) -> str:
            raise AssertionError("a terminal is asked through getpass, not read")

    prompts: list[str] = []
    monkeypatch.setattr(login.sys, "stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or CANARY)
    assert login._read_token(Runtime("login"), "https://x.example") == CANARY
    assert prompts and "not shown" in prompts[0] and CANARY not in prompts[0]


def test_login_checks_the_token_with_the_backend(cli: Any, home: Path, tmp_path: Path,
                                                 make_app: Callable[..., Any],
                                                 start_server: Callable[[Any], Any]) -> None:
    tokens = tokens_file_for(tmp_path / "tokens.json", alice=CANARY)
    server = start_server(make_app(tokens=tokens))
    wrong = cli("login", "--remote", server.url, "--json", input="not-the-token")
    assert wrong.exit_code == 9 and "refused the credentials" in wrong.stderr
    assert not stored_token_path(server.url).exists()
    ran = cli("login", "--remote", server.url + "/", "--json", input=CANARY)
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["verified"] is True
    # Later commands use it (same remote, written another way) ...
    write_dump(tmp_path / "in.jsonl")
    assert cli("import", str(tmp_path / "in.jsonl")).exit_code == 0
    saved = cli("save", "--all", "--remote", server.url + "/", "--json")
    assert saved.exit_code == 0, saved.stderr
    assert saved.summary["written"] == 11
    # ... until it is forgotten.
    assert cli("login", "--remote", server.url, "--forget").exit_code == 0
    assert not stored_token_path(server.url).exists()
    refused = cli("diff", "--all", "--remote", server.url)
    assert refused.exit_code == 9
    assert_no_canary(refused, home)


def test_stored_token_readable_by_others_is_refused(cli: Any, home: Path) -> None:
    url = "http://127.0.0.1:9"
    path = store_token(url, CANARY)
    path.chmod(0o640)
    ran = cli("diff", "--all", "--remote", url, "--json")
    assert ran.exit_code == 2
    assert "readable by others" in ran.stderr and f"chmod 600 {path}" in ran.stderr
    assert_no_canary(ran, home, allowed=(path,))


def test_token_file_of_another_user_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(CANARY)
    path.chmod(0o600)
    assert read_token_file(path) == CANARY
    monkeypatch.setattr(os, "getuid", lambda: os.stat(path).st_uid + 1)
    with pytest.raises(UsageError, match="belongs to another user") as err:
        read_token_file(path)
    assert CANARY not in str(err.value.to_json())


def test_token_precedence(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://chats.example.com"
    store_token(url, "from-login")
    token_file = tmp_path / "t"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    assert resolve_token(None, remote=url) == "from-login"
    assert resolve_token(None, remote="https://other.example") is None
    assert resolve_token(None, remote=str(tmp_path / "backend.db")) is None
    assert resolve_token(token_file, remote=url) == "from-file"
    monkeypatch.setenv("CHATSAVE_TOKEN", "from-env")
    assert resolve_token(token_file, remote=url) == "from-env"


def test_remote_key_names_one_backend_one_way() -> None:
    same = ["https://Chats.Example.com", "https://chats.example.com:443/",
            "https://user@chats.example.com/", "https://chats.example.com?x=1"]
    assert {remote_key(s) for s in same} == {"https://chats.example.com"}
    assert remote_key("https://chats.example.com:8443") == "https://chats.example.com:8443"
    assert remote_key("http://chats.example.com") != remote_key("https://chats.example.com")
    assert remote_key("https://h.example/api/") == "https://h.example/api"
    assert remote_key("http://[::1]:80/") == "http://[::1]"
    # The file name comes from a hash: nothing of the URL reaches the file system.
    path = stored_token_path("https://../../etc/passwd%00/..")
    assert path.parent == credentials_dir() and path.name.endswith(".token")
    assert set(path.stem) <= set("0123456789abcdef")


@pytest.mark.parametrize("bad, says", [
    (f"{CANARY}\nX-Injected: 1", "control"),
    (f"{CANARY} {CANARY}", "spaces"),
    (f"{CANARY}é", "non-ASCII"),
])
def test_a_token_that_cannot_be_a_header_is_refused_unquoted(cli: Any, home: Path,
                                                             network: Network,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             bad: str, says: str) -> None:
    monkeypatch.setenv("CHATSAVE_TOKEN", bad)
    ran = cli("diff", "--all", "--remote", "http://127.0.0.1:9", "--json")
    assert ran.exit_code == 2 and says in ran.stderr
    assert network.requests == []
    assert_no_canary(ran, home)


# ------------------------------------------------------------------------ transport
@pytest.mark.parametrize("url", ["http://chats.example.com", "http://10.0.0.7:8787",
                                 "http://127.0.0.1.nip.io", "http://localhost.evil.example",
                                 "http://[::ffff:7f00:1]:80", "http://2130706433"])
def test_no_token_over_plain_http_to_other_hosts(cli: Any, home: Path, network: Network,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 url: str) -> None:
    monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)
    ran = cli("diff", "--all", "--remote", url, "--json")
    assert ran.exit_code == 2 and "plain http" in ran.stderr
    assert "--allow-insecure" in ran.stderr
    assert network.requests == [], "nothing was sent"
    assert_no_canary(ran, home)


def test_allow_insecure_sends_it_when_told(cli: Any, home: Path, network: Network,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)
    network.handler = capabilities_then(lambda r: httpx.Response(
        200, json={"chats": [], "next": None}))
    ran = cli("diff", "--all", "--remote", "http://chats.example.com", "--allow-insecure",
              "--json")
    assert ran.exit_code == 0, ran.stderr
    assert network.hosts == {"chats.example.com"}
    assert {r.headers["authorization"] for r in network.requests} == {f"Bearer {CANARY}"}
    assert_no_canary(ran, home)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9", "http://localhost:9",
                                 "http://[::1]:9", "http://127.8.9.10:9",
                                 "https://chats.example.com"])
def test_loopback_and_https_need_no_permission(url: str, network: Network) -> None:
    network.handler = lambda r: httpx.Response(200, json=CAPS)
    with HttpRemote(url, token=CANARY) as remote:
        assert remote.capabilities().backend_id == "b-mock"


@pytest.mark.parametrize("url", [f"https://alice:{CANARY}@chats.example.com",
                                 f"https://chats.example.com/?token={CANARY}",
                                 f"https://chats.example.com/#{CANARY}"])
def test_credentials_in_the_remote_url_are_refused(cli: Any, home: Path, network: Network,
                                                   url: str) -> None:
    with pytest.raises(UsageError) as err:
        HttpRemote(url)
    assert "keeps credentials out of URLs" in err.value.message
    assert CANARY not in err.value.message
    ran = cli("status", "--refresh", "--remote", url, "--json")
    assert ran.exit_code == 2 and network.requests == []
    assert "keeps credentials out" in ran.stderr


CALLS: dict[str, Callable[[HttpRemote], Any]] = {
    "capabilities": lambda r: r.capabilities(),
    "chats": lambda r: r.list_chats(),
    "digests": lambda r: r.digests(["c1"]),
    "messages": lambda r: r.messages("c1"),
    "save": lambda r: r.save("c1", b'{"messages":[]}', "key-1"),
    "delete": lambda r: r.delete("c1", b'{"ids":[]}', "key-2"),
}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("call", list(CALLS))
def test_redirects_are_never_followed(network: Network, call: str, status: int) -> None:
    network.handler = echo(status)
    with HttpRemote("https://chats.example.com", token=CANARY,
                    policy=RetryPolicy(attempts=3)) as remote, \
            pytest.raises(RefusedError) as err:
        CALLS[call](remote)
    assert len(network.requests) == 1, "one request, no redirect followed, no retry"
    assert network.hosts == {"chats.example.com"}
    assert "redirect" in err.value.message or str(status) in err.value.message
    assert CANARY not in err.value.message and CANARY not in str(err.value.hint)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503])
@pytest.mark.parametrize("kind", ["json", "html"])
@pytest.mark.parametrize("call", list(CALLS))
def test_answers_echoing_the_headers_never_put_the_token_in_an_error(
        network: Network, call: str, status: int, kind: str) -> None:
    network.handler = echo(status, kind)
    with HttpRemote("https://chats.example.com", token=CANARY,
                    policy=RetryPolicy(attempts=2, base=0)) as remote, \
            pytest.raises(ChatsaveError) as err:
        CALLS[call](remote)
    assert network.requests, "the request was made"
    text = json.dumps(err.value.to_json()) + str(err.value)
    assert CANARY not in text
    if kind == "json" and status in (401, 403, 422, 500):
        # The echoed message is shown (it explains the failure), with the token cut out.
        assert "[redacted]" in text and "you sent" in text


def test_an_error_quoting_the_header_sent_is_redacted(network: Network) -> None:
    """h11 quotes header values it refuses ("Illegal header value ..."); so may others."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(
            f"Illegal header value {request.headers['authorization']!r}")

    network.handler = fail
    with HttpRemote("https://chats.example.com", token=CANARY,
                    policy=RetryPolicy(attempts=2, base=0)) as remote, \
            pytest.raises(UnavailableError) as err:
        remote.list_chats()
    assert "Illegal header value" in err.value.message
    assert CANARY not in err.value.message and "[redacted]" in err.value.message


# ------------------------------------------------------------------ the canary, end to end
ALL_COMMANDS = {"import", "export", "login", "dedupe", "gc", "fetch", "save", "diff", "sync",
                "delete", "status", "trash list", "trash restore", "trash empty", "doctor",
                "salvage"}
# Commands with no part in the client's secrets: the server, and the one that prints a
# freshly minted token by design.
NOT_CLIENT = {"serve", "serve token", "serve token add", "trash"}


def test_the_canary_matrix_covers_every_command() -> None:
    from tests.test_meta import _commands

    names = {" ".join(c) for c in _commands()}
    missing = names - ALL_COMMANDS - NOT_CLIENT
    assert not missing, f"add {sorted(missing)} to the canary runs in {__name__}"


@pytest.fixture
def canary_server(tmp_path: Path, make_app: Callable[..., Any],
                  start_server: Callable[[Any], Any]) -> Any:
    """A real server (uvicorn on 127.0.0.1) for which the canary is a valid token."""
    tokens = tokens_file_for(tmp_path / "server-tokens.json", alice=CANARY)
    return start_server(make_app(tokens=tokens, faults=Faults()))


def _session(cli: Any, url: str, dump: Path, out: Path, extra: tuple[str, ...],
             store: Path) -> list[Ran]:
    """Every client command once, in an order where each has something to do."""
    runs: list[Ran] = []

    def run(*args: str, input: str | None = None, ok: tuple[int, ...] = (0, 1)) -> Ran:
        ran = cli(*args, *extra, input=input)
        assert ran.exit_code in ok, (args, ran.exit_code, ran.stderr)
        runs.append(ran)
        return ran

    remote = ("--remote", url)
    run("import", str(dump))
    run("doctor", "c1", *remote, ok=(2,))  # opens the remote, refuses a non-AutoBot one
    run("save", "--all", *remote)
    run("diff", "--all", *remote)
    run("status", "--refresh", *remote)
    run("sync", "--all", *remote)
    run("delete", "c1", "m1", "--yes", *remote)
    run("dedupe", "--all", "--yes", "--max-delete", "100%", *remote)
    run("trash", "list")
    run("trash", "restore", "--chat", "c1", "m1", *remote)
    run("gc", "--budget", "1KB", "--keep-last", "0", *remote)
    run("fetch", "--all", *remote)
    run("trash", "empty", "--older-than", "0s", "--yes")
    run("status")
    # A copy of the store (the token must not be in it either), salvaged back into it.
    copy = out.with_name("copy.db")
    source, target = sqlite3.connect(store), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    run("salvage", str(copy))
    run("export", "--output", str(out))
    if "--json" not in extra:
        run("export")
    run("sync", "--all", *remote)
    return runs


@pytest.mark.parametrize("source", ["env", "token-file", "login"])
@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "human"])
def test_canary_through_every_command_against_a_real_server(
        cli: Any, home: Path, tmp_path: Path, canary_server: Any,
        monkeypatch: pytest.MonkeyPatch, source: str, json_mode: bool) -> None:
    allowed: tuple[Path, ...] = ()
    extra: tuple[str, ...] = ("--json",) if json_mode else ()
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    token_file = secret_dir / "token"
    if source == "env":
        monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)
    elif source == "token-file":
        token_file.write_text(CANARY + "\n")
        token_file.chmod(0o600)
        extra += ("--token-file", str(token_file))
        allowed = (token_file,)
    else:
        ran = cli("login", "--remote", canary_server.url, *extra, input=CANARY + "\n")
        assert ran.exit_code == 0, ran.stderr
        assert_no_canary(ran, tmp_path, allowed=(stored_token_path(canary_server.url),))
        allowed = (stored_token_path(canary_server.url),)
    runs = _session(cli, canary_server.url, write_dump(tmp_path / "in.jsonl"),
                    tmp_path / "out.jsonl", extra, home / "store.db")
    assert len(runs) >= 15
    # The server saw the canary as the credential: it was really in use.
    assert canary_server.faults.requests("POST", "/save$")
    for ran in runs:
        assert_no_canary(ran, tmp_path, allowed=allowed)
        if json_mode:
            lines = ran.json_lines()
            assert lines[-1]["type"] == "summary"
    store_bytes = b"".join(p.read_bytes() for p in home.glob("store.db*"))
    assert store_bytes and CANARY.encode() not in store_bytes


REMOTE_RUNS: dict[str, tuple[str, ...]] = {
    "save": ("save", "--all"),
    "diff": ("diff", "--all"),
    "sync": ("sync", "--all"),
    "delete": ("delete", "c1", "m1", "--yes"),
    "status": ("status", "--refresh"),
    "dedupe": ("dedupe", "--all", "--yes", "--on", "backend", "--max-delete", "100%"),
    "fetch": ("fetch", "--all"),
    # Over a tiny budget, gc must have the backend confirm the bodies it would evict.
    "gc": ("gc", "--budget", "1KB", "--keep-last", "0"),
    "trash restore": ("trash", "restore", "--chat", "c1", "m1"),
}


def expected_exit(status: int) -> int:
    """The exit code of a run whose backend answers ``status`` (chatsave.remote.http):
    401/403 refuse the credentials and a 3xx is never followed (9 REFUSED); a 5xx is
    retried, then the backend is unavailable (8 UNAVAILABLE)."""
    if status in (401, 403) or 300 <= status < 400:
        return ExitCode.REFUSED
    assert status in RETRYABLE_STATUS, status
    return ExitCode.UNAVAILABLE


@pytest.mark.parametrize("where", ["capabilities", "after"])
@pytest.mark.parametrize("status", [401, 403, 500, 503, 307])
@pytest.mark.parametrize("command", list(REMOTE_RUNS))
def test_canary_against_answers_that_echo_the_headers(
        cli: Any, home: Path, tmp_path: Path, network: Network,
        monkeypatch: pytest.MonkeyPatch, command: str, status: int, where: str) -> None:
    monkeypatch.setenv("CHATSAVE_RETRY_ATTEMPTS", "2")
    network.handler = echo(status) if where == "capabilities" else capabilities_then(
        echo(status, "html" if status == 500 else "json"))
    # Each run on a store of its own: a failed delete is still done locally, and running
    # it again on the same store would be a usage error that never reaches the backend.
    for n, flags in enumerate((("--json",), ("--traceback",), ())):
        monkeypatch.delenv("CHATSAVE_TOKEN", raising=False)
        monkeypatch.setenv("CHATSAVE_STORE", str(home / f"store-{n}.db"))
        assert cli("import", str(write_dump(tmp_path / "in.jsonl"))).exit_code == 0
        if command == "trash restore":
            assert cli("delete", "c1", "m1", "--yes").exit_code == 0
        monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)
        before = len(network.requests)
        ran = cli(*REMOTE_RUNS[command], "--remote", "http://127.0.0.1:9", *flags)
        sent = [r.url.path for r in network.requests[before:]]
        if where == "capabilities":
            # Every command asks for them first; only a 5xx is asked again (2 attempts).
            attempts = 2 if status in RETRYABLE_STATUS else 1
            assert sent == ["/api/v1/capabilities"] * attempts, sent
            assert ran.exit_code == expected_exit(status), (flags, ran.exit_code, ran.stderr)
        elif command == "fetch":
            # Nothing was evicted: fetch has nothing to ask for after the capabilities.
            assert sent == ["/api/v1/capabilities"], sent
            assert ran.exit_code == ExitCode.OK, (flags, ran.exit_code, ran.stderr)
        else:
            assert sent[0] == "/api/v1/capabilities" and len(sent) > 1, sent
            assert ran.exit_code == expected_exit(status), (flags, ran.exit_code, ran.stderr)
        if "--json" in flags:
            assert ran.summary["exit_code"] == ran.exit_code
        if "--traceback" not in flags:
            assert "Traceback" not in ran.stderr
        assert_no_canary(ran, tmp_path)


def test_login_against_answers_that_echo_the_headers(cli: Any, home: Path, tmp_path: Path,
                                                     network: Network) -> None:
    for handler, status in ((echo(401), 401), (capabilities_then(echo(401)), 401),
                            (capabilities_then(echo(500)), 500), (echo(302, "html"), 302)):
        network.handler = handler
        ran = cli("login", "--remote", "https://chats.example.com", "--json",
                  input=CANARY)
        assert ran.exit_code == expected_exit(status), (status, ran.exit_code, ran.stderr)
        assert_no_canary(ran, tmp_path)
        assert not stored_token_path("https://chats.example.com").exists()


@pytest.mark.parametrize("traceback", [True, False], ids=["traceback", "no-traceback"])
@pytest.mark.parametrize("where", ["open", "request"])
@pytest.mark.parametrize("command", list(REMOTE_RUNS))
def test_canary_through_a_crash(cli: Any, home: Path, tmp_path: Path, network: Network,
                                monkeypatch: pytest.MonkeyPatch, command: str, where: str,
                                traceback: bool) -> None:
    """A bug in the client whose message quotes the credential it was holding."""
    assert cli("import", str(write_dump(tmp_path / "in.jsonl"))).exit_code == 0
    if command == "trash restore":
        assert cli("delete", "c1", "m1", "--yes").exit_code == 0
    monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)

    def crash(self: HttpRemote, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"unexpected state; client headers {dict(self._client.headers)}")

    def crash_open(spec: str, *, token: str | None = None, **kwargs: Any) -> Any:
        raise RuntimeError(f"cannot open {spec} with Bearer {token}")

    if where == "open":
        monkeypatch.setattr("chatsave.remote.open_remote", crash_open)
    else:
        monkeypatch.setattr(HttpRemote, "capabilities", crash)
        monkeypatch.setattr(HttpRemote, "list_chats", crash)
    flags = ("--json", "--traceback") if traceback else ("--json",)
    ran = cli(*REMOTE_RUNS[command], "--remote", "http://127.0.0.1:9", *flags)
    assert_no_canary(ran, tmp_path)
    # Every run of REMOTE_RUNS asks the backend (gc over its budget must have it confirm).
    assert ran.exit_code == 70, (ran.exit_code, ran.stderr)
    assert "internal error (RuntimeError" in ran.stderr
    assert ("Traceback (most recent call last)" in ran.stderr) is traceback
    assert "[redacted]" in ran.stderr
    assert ran.summary["error"]["code"] == "internal"


@pytest.mark.parametrize("traceback", [True, False], ids=["traceback", "no-traceback"])
@pytest.mark.parametrize("command", ["import", "export", "status", "trash list", "login"])
def test_local_commands_crash_without_the_canary(cli: Any, home: Path, tmp_path: Path,
                                                 network: Network,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 command: str, traceback: bool) -> None:
    from chatsave.store.store import Store

    dump = write_dump(tmp_path / "in.jsonl")
    monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("simulated bug")

    if command == "login":
        monkeypatch.delenv("CHATSAVE_TOKEN")
        monkeypatch.setattr("chatsave.remote.store_token", boom)
        network.handler = capabilities_then(lambda r: httpx.Response(
            200, json={"chats": [], "next": None}))
        args: tuple[str, ...] = ("login", "--remote", "http://127.0.0.1:9")
    else:
        monkeypatch.setattr(Store, "open", classmethod(boom))
        args = {"import": ("import", str(dump)),
                "export": ("export", "--output", str(tmp_path / "out.jsonl")),
                "status": ("status",), "trash list": ("trash", "list")}[command]
    flags = ("--json", "--traceback") if traceback else ("--json",)
    ran = cli(*args, *flags, input=CANARY if command == "login" else None)
    assert ran.exit_code == 70, (ran.exit_code, ran.stderr)
    assert "internal error (KeyError" in ran.stderr
    assert ("Traceback (most recent call last)" in ran.stderr) is traceback
    assert_no_canary(ran, tmp_path)


def test_subprocess_run_with_the_canary_leaves_no_trace(proc_env: dict[str, str],
                                                        home: Path, tmp_path: Path,
                                                        canary_server: Any) -> None:
    """The same through a real process: its whole stdout/stderr, every file it wrote."""
    from tests.conftest import run_process

    env = {**proc_env, "CHATSAVE_TOKEN": CANARY, "CHATSAVE_DEBUG": "1"}
    dump = write_dump(tmp_path / "in.jsonl")
    for args in (("import", str(dump)), ("save", "--all", "--remote", canary_server.url),
                 ("sync", "--all", "--remote", canary_server.url, "--json"),
                 ("diff", "--all", "--remote", canary_server.url + "/nope")):
        done = run_process(*args, env=env)
        # The last one: no chatsave server under /nope (404 without its envelope).
        expected = ExitCode.REFUSED if args[0] == "diff" else ExitCode.OK
        assert done.returncode == expected, (args, done.returncode, done.stderr)
        ran = Ran(done.returncode, done.stdout, done.stderr)
        assert_no_canary(ran, tmp_path)


# ------------------------------------------------------------------------------ hygiene
def test_secret_scanner_baseline_is_audited() -> None:
    """Every finding accepted in .secrets.baseline was looked at and is not a secret, and
    still points at a tracked file (.ci/run fails on any finding not in it)."""
    from tests.conftest import ROOT

    doc = json.loads((ROOT / ".secrets.baseline").read_text())
    results = [r for items in doc["results"].values() for r in items]
    assert results, "the baseline holds the audited fixtures"
    for r in results:
        assert r.get("is_secret") is False, f"not audited as a false positive: {r}"
        assert (ROOT / r["filename"]).is_file(), r["filename"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bandit -q -r chatsave --severity-level medium" in ci
    assert "detect-secrets-hook --baseline" in ci


# ----------------------------------------------------------- the AutoBot HTTP remote
def test_autobot_http_remote_keeps_the_same_rules(cli: Any, home: Path, tmp_path: Path,
                                                  network: Network,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """autobot+http(s) goes through HttpRemote: plain http refused without
    --allow-insecure, no redirect followed, echoed headers redacted."""
    assert cli("import", str(write_dump(tmp_path / "in.jsonl"))).exit_code == 0
    monkeypatch.setenv("CHATSAVE_TOKEN", CANARY)
    monkeypatch.setenv("CHATSAVE_RETRY_ATTEMPTS", "2")
    ran = cli("diff", "--all", "--remote", "autobot+http://bot.example.com", "--json")
    assert ran.exit_code == 2 and "plain http" in ran.stderr and network.requests == []
    for status in (401, 500, 302):
        network.handler = echo(status)
        for args in (("diff", "--all"), ("save", "--all"), ("sync", "--all")):
            ran = cli(*args, "--remote", "autobot+http://bot.example.com", "--allow-insecure",
                      "--json")
            assert ran.exit_code == expected_exit(status), (args, ran.exit_code, ran.stderr)
            assert_no_canary(ran, tmp_path)
    assert network.requests and network.hosts == {"bot.example.com"}
    assert all(r.headers.get("authorization") == f"Bearer {CANARY}" for r in network.requests)
