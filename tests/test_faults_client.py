"""The client under the fault campaign of issue 14: answers it must not believe, batches a
backend can never take, answers outside the envelope, a key held by an interrupted request.

The backend is the real server on 127.0.0.1 wherever it can produce the answer. What it
never sends (a duplicated member, a 451, a text/plain 400 from something in front of it, a
409 held key on demand) comes from ``Scripted``: a tiny HTTP server on 127.0.0.1 that
answers the requests its script names and hands every other one to the real server, so the
rest of each exchange is real.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.errors import (
    BadAnswerError,
    ExitCode,
    RefusedError,
    RequestRejectedError,
    TooLargeError,
    UnavailableError,
    UsageError,
)
from chatsave.remote.autobot.http import AutobotRemote
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.tokens import TokenStore, add_token
from tests.conftest import Ran, table_dump

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
HELD = "waiting for the backend to release an interrupted request"

Reply = tuple[int, dict[str, str], bytes]


def envelope(status: int, code: str, message: str, **headers: str) -> Reply:
    body = json.dumps({"error": {"code": code, "message": message, "details": None}})
    return status, {"content-type": "application/json", **headers}, body.encode()


def plain(status: int, text: bytes) -> Reply:
    return status, {"content-type": "text/plain; charset=utf-8"}, text


class Scripted:
    """HTTP/1.1 on 127.0.0.1: a request matching a rule (method, path regex) that still has
    replies gets the next one; every other request goes to ``upstream`` (the real server)
    and its answer comes back as it was. ``log`` holds (method, path, status) of each."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=10)
        self.rules: list[tuple[str, re.Pattern[str], list[Reply]]] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers, content = scripted.answer(self.command, self.path,
                                                           dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def script(self, method: str, path: str, *replies: Reply) -> None:
        with self.lock:
            self.rules.append((method, re.compile(path), list(replies)))

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self.lock:
            for want, pattern, replies in self.rules:
                if want == method and pattern.search(path.split("?")[0]) and replies:
                    reply = replies.pop(0)
                    self.log.append((method, path, reply[0]))
                    return reply
        keep = {k: v for k, v in headers.items()
                if k.lower() not in ("host", "content-length", "connection")}
        got = self.upstream.request(method, path, headers=keep, content=body)
        with self.lock:
            self.log.append((method, path, got.status_code))
        passed = {k: v for k, v in got.headers.items()
                  if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                       "content-encoding", "date", "server")}
        return got.status_code, passed, got.content

    def posts(self, pattern: str) -> list[int]:
        """Statuses answered to the POSTs whose path matches ``pattern``."""
        with self.lock:
            return [s for m, p, s in self.log if m == "POST" and re.search(pattern, p)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.upstream.close()
        assert not self.thread.is_alive()


@pytest.fixture
def scripted(live_server: Any) -> Iterator[Scripted]:
    server = Scripted(live_server.url)
    yield server
    server.close()


def wire(chat_id: str, mid: str, content: str, minute: int = 0) -> dict[str, Any]:
    return {"chat_id": chat_id, "id": mid, "role": "user", "content": content,
            "created_at": (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z")}


def imported(cli: Callable[..., Ran], path: Path, *rows: dict[str, Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ran = cli("import", str(path))
    assert ran.exit_code == 0, ran.stderr


def held_on_server(url: str, chat_id: str) -> set[str]:
    with HttpRemote(url, policy=FAST) as remote:
        return {m.id for m in remote.messages(chat_id).messages if not m.deleted}


# ================================================== A. one meaning per JSON document
def test_an_answer_naming_a_member_twice_is_a_bad_answer(scripted: Scripted) -> None:
    """A save answer whose ``saved`` comes twice (the first listing every message, the
    second none) confirms nothing, whichever reading a parser would pick."""
    ack = '{"id":"m1","rev":1,"content_hash":"' + "a" * 64 + '"}'
    twice = ('{"chat_id":"c1","version":1,"saved":[' + ack + '],"saved":[]}').encode()
    scripted.script("POST", "/save$", (200, {"content-type": "application/json"}, twice))
    with HttpRemote(scripted.url, policy=FAST) as remote, \
            pytest.raises(BadAnswerError) as err:
        remote.save("c1", b'{"messages":[]}', "key-dup-1")
    assert "invalid JSON" in err.value.message and "'saved' twice" in err.value.message
    assert err.value.exit_code == ExitCode.UNAVAILABLE


def test_a_refusal_naming_its_error_twice_is_not_believed(scripted: Scripted) -> None:
    """A 404 envelope saying first one thing, then "not_found": a chat the backend does not
    have is an empty page only when the backend says so unambiguously."""
    body = (b'{"error":{"code":"forbidden","message":"no"},'
            b'"error":{"code":"not_found","message":"no chat"}}')
    scripted.script("GET", "/messages$", (404, {"content-type": "application/json"}, body))
    with HttpRemote(scripted.url, policy=FAST) as remote, pytest.raises(RefusedError) as err:
        remote.messages("c1")
    assert "404" in err.value.message


def test_an_autobot_answer_naming_a_member_twice_is_a_bad_answer(scripted: Scripted) -> None:
    body = b'{"chats":[{"id":"c1","name":"kept"}],"chats":[]}'
    scripted.script("GET", "^/api/chats$", (200, {"content-type": "application/json"}, body))
    remote = AutobotRemote("autobot+" + scripted.url, policy=FAST)
    with remote, pytest.raises(BadAnswerError) as err:
        remote.list_chats()
    assert "'chats' twice" in err.value.message


def test_a_tokens_file_naming_a_member_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    add_token(path, "alice")
    doc = json.loads(path.read_text())
    # The same file, but a second, empty "tokens" list after the real one.
    text = json.dumps(doc)[:-1] + ', "tokens": []}'
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        TokenStore(path)
    assert "'tokens' twice" in err.value.message and str(path) in err.value.message


def _dump(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


DUPLICATES = {
    "jsonl": ("in.jsonl", '{"chat_id":"c","id":"m1","role":"user","content":"a",'
              '"created_at":"2026-03-01T10:00:00.000Z"}\n'
              '{"chat_id":"c","id":"m2","role":"user","content":"b","content":"c",'
              '"created_at":"2026-03-01T10:01:00.000Z"}\n',
              "line 2", "'content' twice"),
    "autobot-file": ("c_chat.json", '{"chatId":"c","name":"n","messages":[{"id":"m1",'
                     '"sender":"user","content":"a","timestamp":"2026-03-01 10:00:00"}],'
                     '"messages":[]}', "file c_chat.json", "'messages' twice"),
    "localstorage-string": ("dump.json", json.dumps({"chat_c_messages": json.dumps(
        [{"id": "m1", "sender": "user", "content": "a"}])[:-2] + ', "content": "b"}]'}),
        "key 'chat_c_messages'", "'content' twice"),
    "localstorage-parsed": ("dump.json", '{"chat_c_messages":[{"id":"m1","sender":"user",'
                            '"content":"a","content":"b"}]}', "key 'chat_c_messages'",
                            "'content' twice"),
    "localstorage-key": ("dump.json", '{"chat_c_messages":"[]","chat_c_messages":'
                         '"[{\\"id\\":\\"m1\\",\\"sender\\":\\"user\\",\\"content\\":\\"a\\"}]"}',
                         "key 'chat_c_messages'", "holds this key twice"),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_an_import_naming_a_member_twice_fails_and_changes_nothing(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path, case: str) -> None:
    """As any invalid item: exit 2, the item named with its position and why, nothing
    recorded (``--on-invalid skip`` would import the rest)."""
    imported(cli, tmp_path / "first.jsonl", wire("other", "o1", "already here"))
    before = table_dump(store_path)
    name, text, position, why = DUPLICATES[case]
    ran = cli("import", str(_dump(tmp_path / name, text)), "--json")
    assert ran.exit_code == ExitCode.USAGE, ran.stdout
    summary = ran.summary
    assert any(r.startswith(position) and why in r for r in summary["rejections"]), summary
    assert "nothing was imported" in summary["error"]["message"]
    assert "Traceback" not in ran.stderr
    after = table_dump(store_path)
    assert {t: rows for t, rows in after.items() if t != "runs"} == \
        {t: rows for t, rows in before.items() if t != "runs"}


# ================================================== B. a batch the backend never takes
def test_a_real_400_to_a_write_is_a_rejection_with_the_status_and_message(
        live_server: Any) -> None:
    with HttpRemote(live_server.url, policy=FAST) as remote:
        with pytest.raises(RequestRejectedError) as err:
            remote.save("c1", b'{"messages": [', "key-malformed")
        assert "400" in err.value.message and "malformed_json" in err.value.message
        assert err.value.details == {"status": 400, "code": "malformed_json"}
        assert err.value.exit_code == ExitCode.REJECTED
        # A key the backend cannot take is about how this client writes, not the batch:
        # every batch would meet it, so the run is refused (exit 9).
        with pytest.raises(RefusedError, match="400 idempotency_key_invalid") as key_err:
            remote.delete("c1", b'{"ids": []}', "k" * 300)
        assert key_err.value.exit_code == ExitCode.REFUSED
    assert len(live_server.faults.requests("POST", "/save$")) == 1, "never retried"


def _poison(store_path: Path, chat_id: str) -> None:
    """Make the open save batch of ``chat_id`` one no backend can take: its recorded body
    cut short (as a buggy chatsave might have recorded it), its key and messages as they were."""
    conn = sqlite3.connect(store_path)
    try:
        with conn:
            changed = conn.execute(
                "UPDATE outbox SET body = substr(body, 1, 20) WHERE chat_id = ? AND "
                "state = 'open' AND kind = 'save'", (chat_id,)).rowcount
    finally:
        conn.close()
    assert changed == 1


def test_a_poison_batch_is_rejected_not_retried_and_the_others_go_on(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path, live_server: Any,
        monkeypatch: pytest.MonkeyPatch, no_saves: None) -> None:
    """The real server answers 400 malformed_json to the recorded batch: exit 4, its
    messages listed as rejected with the reason, the other chat saved; the next save does
    not send it again; ``save --retry-rejected`` sends the messages (in a new batch)."""
    from tests.faults import Fault

    monkeypatch.setenv("CHATSAVE_RETRY_ATTEMPTS", "2")
    imported(cli, tmp_path / "in.jsonl", wire("bad", "b1", "one"), wire("bad", "b2", "two"),
             wire("good", "g1", "fine"))
    # A first save fails (503) for chat "bad": its batch stays open in the outbox.
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 2,
                              path="/chats/bad/save$")
    first = cli("save", "--all", "--remote", live_server.url)
    assert first.exit_code == ExitCode.PARTIAL, first.stderr
    _poison(store_path, "bad")

    ran = cli("save", "--all", "--remote", live_server.url, "--json")
    assert ran.exit_code == ExitCode.REJECTED, ran.stdout
    summary = ran.summary
    assert summary["rejected"] == 2, summary
    rejected = {r["id"]: r for r in summary["rejections"]}
    assert set(rejected) == {"b1", "b2"}
    assert all("400" in r["reason"] and "malformed_json" in r["reason"]
               for r in rejected.values())
    assert len(live_server.faults.requests("POST", "/chats/bad/save$")) == 3, \
        "two 503s, then the one 400: never retried"
    assert held_on_server(live_server.url, "good") == {"g1"}

    again = cli("save", "--all", "--remote", live_server.url)
    assert again.exit_code == ExitCode.REJECTED
    assert "message 'b1'" in again.stderr and "malformed_json" in again.stderr
    assert len(live_server.faults.requests("POST", "/chats/bad/save$")) == 3, "not resent"

    retried = cli("save", "--all", "--remote", live_server.url, "--retry-rejected")
    assert retried.exit_code == ExitCode.OK, retried.stderr
    assert held_on_server(live_server.url, "bad") == {"b1", "b2"}


@pytest.mark.parametrize("reply", [
    envelope(400, "bad", "Bad Request\r\nfrom the backend"),
    envelope(410, "gone", "this chat was archived"),
    envelope(451, "legal", "unavailable for legal reasons"),
    envelope(418, "teapot", "I refuse"),
], ids=["400", "410", "451", "418"])
def test_a_final_4xx_to_a_save_is_a_rejection(
        cli: Callable[..., Ran], tmp_path: Path, scripted: Scripted, reply: Reply) -> None:
    """Statuses the real server never sends, in the backend's error envelope."""
    imported(cli, tmp_path / "in.jsonl", wire("c1", "m1", "one"), wire("c1", "m2", "two"))
    scripted.script("POST", "/chats/c1/save$", reply)
    ran = cli("save", "--all", "--remote", scripted.url, "--json")
    assert ran.exit_code == ExitCode.REJECTED, ran.stdout
    summary = ran.summary
    status = str(reply[0])
    first_line = reply[2].split(b"\r\n")[0].decode()
    assert {r["id"] for r in summary["rejections"]} == {"m1", "m2"}
    for entry in summary["rejections"]:
        assert status in entry["reason"] and "the backend rejected the save" in entry["reason"]
        assert (first_line if reply[1]["content-type"].startswith("text") else
                json.loads(reply[2])["error"]["message"]) in entry["reason"]
    assert scripted.posts("/chats/c1/save$") == [reply[0]]

    again = cli("save", "--all", "--remote", scripted.url)
    assert again.exit_code == ExitCode.REJECTED
    assert scripted.posts("/chats/c1/save$") == [reply[0]], "a second run does not resend"

    retried = cli("save", "--all", "--remote", scripted.url, "--retry-rejected")
    assert retried.exit_code == ExitCode.OK, retried.stderr
    assert scripted.posts("/chats/c1/save$") == [reply[0], 200]
    assert held_on_server(scripted.url, "c1") == {"m1", "m2"}


@pytest.mark.parametrize("status, error", [
    (401, RefusedError), (403, RefusedError), (404, RefusedError), (405, RefusedError),
    (413, TooLargeError), (400, RequestRejectedError), (422, RequestRejectedError),
    (407, RefusedError), (421, RefusedError), (426, RefusedError), (431, RefusedError),
    (410, RequestRejectedError), (408, UnavailableError), (409, UnavailableError),
    (425, UnavailableError), (429, UnavailableError),
])
def test_which_4xx_to_a_write_are_rejections(scripted: Scripted, status: int,
                                             error: type[Exception]) -> None:
    """Credentials, the endpoint and the size keep their meaning; 408/409/425/429 are
    retried, then the batch stays pending (UnavailableError, exit 8)."""
    scripted.script("POST", "/delete$", *[envelope(status, "scripted", "no")] * 3)
    with HttpRemote(scripted.url, policy=RetryPolicy(attempts=2, base=0.01, cap=0.02)) \
            as remote, pytest.raises(error):
        remote.delete("c1", b'{"ids":[]}', f"key-{status}")
    assert len(scripted.posts("/delete$")) == (2 if error is UnavailableError else 1)


@pytest.mark.parametrize("reply", [
    plain(400, b"Bad Request\r\nfrom the proxy in front"),
    plain(407, b"Proxy Authentication Required"),
], ids=["400-text-plain", "407"])
def test_a_4xx_from_the_way_there_refuses_the_run_and_keeps_the_batch_pending(
        cli: Callable[..., Ran], tmp_path: Path, scripted: Scripted, reply: Reply) -> None:
    """A 4xx outside the backend's envelope is not its verdict on the batch: nothing is
    recorded as rejected, the run is refused (exit 9), and the next run, once the way is
    clear, sends the messages without --retry-rejected."""
    imported(cli, tmp_path / "in.jsonl", wire("c1", "m1", "one"), wire("c1", "m2", "two"))
    scripted.script("POST", "/chats/c1/save$", reply)
    ran = cli("save", "--all", "--remote", scripted.url, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout
    first_line = reply[2].split(b"\r\n")[0].decode()
    assert str(reply[0]) in ran.summary["error"]["message"]
    assert first_line in ran.summary["error"]["message"]
    assert "from the proxy" not in ran.stdout, "only the first line of a body is shown"
    assert not ran.summary.get("rejections") and ran.summary.get("rejected", 0) == 0
    assert cli("status", "--json").summary["pending_push"] == 2

    later = cli("save", "--all", "--remote", scripted.url, "--json")
    assert later.exit_code == ExitCode.OK, later.stdout
    assert later.summary["written"] == 2
    assert held_on_server(scripted.url, "c1") == {"m1", "m2"}


# ================================================== C. answers outside the envelope
@pytest.mark.parametrize("body, shown", [
    (b"Invalid HTTP request received.", "'Invalid HTTP request received.'"),
    (b"first line\nsecond line\nthird", "'first line'..."),
    (b"bell\x07 escape\x1b[31m red\r\nnext", "'bell\\x07 escape\\x1b[31m red'..."),
    (b"x" * 10_000, "'" + "x" * 120 + "'..."),
], ids=["uvicorn", "lines", "control", "long"])
def test_a_text_plain_4xx_is_reported_by_status_and_first_line(
        scripted: Scripted, body: bytes, shown: str) -> None:
    scripted.script("GET", "/capabilities$", plain(400, body))
    scripted.script("POST", "/save$", plain(400, body))
    with HttpRemote(scripted.url, policy=FAST) as remote:
        with pytest.raises(RefusedError) as refused:
            remote.capabilities()
        with pytest.raises(RefusedError) as rejected:
            remote.save("c1", b'{"messages":[]}', "key-plain")
    for err in (refused.value, rejected.value):
        assert "400 text/plain; charset=utf-8 " + shown in err.message
        assert len(err.message) < 400
        assert "second" not in err.message and "\x1b" not in err.message


def test_the_cli_reports_a_text_plain_400_without_a_traceback(
        cli: Callable[..., Ran], tmp_path: Path, scripted: Scripted) -> None:
    imported(cli, tmp_path / "in.jsonl", wire("c1", "m1", "one"))
    scripted.script("GET", "/capabilities$", plain(400, b"Invalid HTTP request received."))
    ran = cli("save", "--all", "--remote", scripted.url)
    assert ran.exit_code == ExitCode.REFUSED
    assert "400 text/plain; charset=utf-8 'Invalid HTTP request received.'" in ran.stderr
    assert "Traceback" not in ran.stderr and "JSONDecodeError" not in ran.stderr


# ================================================== D. a key held by an interrupted request
def _held(key: str) -> Reply:
    body = json.dumps({"error": {"code": "idempotency_key_in_use", "message": "a request "
                                 "with this Idempotency-Key is still running; retry later",
                                 "details": {"idempotency_key": key}}})
    return 409, {"content-type": "application/json", "retry-after": "1"}, body.encode()


def test_a_held_key_is_waited_for_then_the_save_goes_through(scripted: Scripted) -> None:
    key = "key-held-then-free"
    scripted.script("POST", "/save$", _held(key), _held(key))
    said: list[str] = []
    body = json.dumps({"messages": [wire("c1", "m1", "hi")]}).encode()
    started = time.monotonic()
    with HttpRemote(scripted.url, policy=RetryPolicy(attempts=5, base=0.01, cap=0.05),
                    on_retry=lambda what, n, why, delay: said.append(why)) as remote:
        answer = remote.save("c1", body, key)
    assert time.monotonic() - started >= 2, "Retry-After: 1 honoured twice"
    assert [a.id for a in answer.saved] == ["m1"]
    assert said == [f"{HELD} (Idempotency-Key {key})"] * 2
    assert scripted.posts("/save$") == [409, 409, 200]


def test_a_key_held_throughout_names_the_interrupted_request(scripted: Scripted) -> None:
    key = "key-held-always"
    scripted.script("POST", "/save$", *[_held(key)] * 3)
    with HttpRemote(scripted.url, policy=RetryPolicy(attempts=3, base=0.01, cap=0.05)) \
            as remote, pytest.raises(UnavailableError) as err:
        remote.save("c1", b'{"messages":[]}', key)
    assert f"still {HELD} (Idempotency-Key {key}) after 3 attempts" in err.value.message
    assert err.value.details == {"idempotency_key": key}
    assert "stopped mid-request" in (err.value.hint or "")


def test_the_cli_says_it_waits_for_an_interrupted_request(
        cli: Callable[..., Ran], tmp_path: Path, scripted: Scripted,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSAVE_RETRY_ATTEMPTS", "2")
    imported(cli, tmp_path / "in.jsonl", wire("c1", "m1", "one"))
    scripted.script("POST", "/save$", *[_held("any")] * 2)
    ran = cli("save", "--all", "--remote", scripted.url)
    assert ran.exit_code == ExitCode.UNAVAILABLE, ran.stderr
    retrying = [line for line in ran.stderr.splitlines() if line.startswith("retrying")]
    assert len(retrying) == 1 and HELD in retrying[0], ran.stderr
    assert f"still {HELD}" in ran.stderr and "rerun chatsave save" in ran.stderr
