"""save against the real server on 127.0.0.1, through its fault hook: exactly once, honestly.

The server is the real FastAPI app under uvicorn (in a thread of the test process, so the
test scripts its faults); the client is chatsave's own, in-process through the library or
through the CLI, and as a real subprocess where the process boundary is the point
(kill -9, file size limits, deadlines).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.backend.settings import ServerSettings
from chatsave.errors import ExitCode
from chatsave.model import Message
from chatsave.ops.save import SaveOptions, save
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.store.backend import BackendView
from chatsave.store.base import hash_sql
from chatsave.store.store import Store
from tests.conftest import Soak, run_process, table_dump
from tests.faults import Fault, Faults

FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def make_messages(chat_id: str, n: int, start: int = 0, pad: int = 0) -> list[Message]:
    return [Message(chat_id=chat_id, id=f"{chat_id}-m{i}", role="user" if i % 2 else "assistant",
                    content=f"message {i} of {chat_id} " + "x" * (i % 50) + "y" * pad,
                    created_at=T0 + timedelta(seconds=i))
            for i in range(start, start + n)]


def seed(store: Store, chat_id: str, n: int, start: int = 0, pad: int = 0) -> list[Message]:
    msgs = make_messages(chat_id, n, start, pad)
    with store.transaction():
        store.upsert_chat(chat_id, f"Chat {chat_id}")
        for i in range(0, len(msgs), 500):
            store.add_messages(chat_id, msgs[i:i + 500])
    return msgs


def server_view(url: str, chat_id: str) -> list[tuple[str, str]]:
    """(id, content_hash) of every live message the server holds for a chat, in seq order."""
    out: list[tuple[str, str]] = []
    with HttpRemote(url, policy=FAST) as remote:
        after = None
        while True:
            page = remote.messages(chat_id, after=after)
            out += [(m.id, m.content_hash) for m in page.messages if not m.deleted]
            if page.next is None:
                return out
            after = page.next


def assert_exactly_once(url: str, msgs: list[Message]) -> None:
    held = server_view(url, msgs[0].chat_id)
    ids = [i for i, _ in held]
    assert len(ids) == len(set(ids)), "duplicates on the server"
    assert dict(held) == {m.id: m.content_hash for m in msgs}


def confirmed_rows(store: Store) -> dict[tuple[str, str], str]:
    rows = store.conn.execute(
        f"SELECT chat_id, id, {hash_sql('content_hash')} FROM remote_state"
        " WHERE state = 'confirmed'")
    return {(c, i): h for c, i, h in rows}


def assert_never_overclaims(store: Store, url: str) -> None:
    """Every message the store marks confirmed is on the server with that hash."""
    claimed = confirmed_rows(store)
    held: dict[tuple[str, str], str] = {}
    for chat_id in {c for c, _ in claimed}:
        held.update({(chat_id, i): h for i, h in server_view(url, chat_id)})
    for key, chash in claimed.items():
        assert held.get(key) == chash, f"{key} confirmed, but the server has {held.get(key)}"


@pytest.fixture
def small_batches(make_app: Callable[..., Any], start_server: Callable[[Any], Any]) -> Any:
    """A live server whose batches are small (many requests per save)."""
    settings = ServerSettings(max_batch_messages=20, rate_per_s=0, housekeeping_interval_s=0)
    return start_server(make_app(settings=settings, faults=Faults()))


def run_save(store: Store, url: str, chats: list[str] | None = None,
             policy: RetryPolicy = FAST, **options: Any) -> Any:
    with HttpRemote(url, policy=policy, request_timeout=options.pop("request_timeout", 10)
                    ) as remote:
        return save(store, remote, chats, SaveOptions(**options))


# ----------------------------------------------------------------------------- basics
def test_save_then_resave_sends_nothing(store: Store, live_server: Any) -> None:
    msgs = seed(store, "c1", 50)
    result = run_save(store, live_server.url)
    assert result.exit_code == ExitCode.OK
    assert result.counters["written"] == 50 and result.counters["pending_push"] == 0
    assert_exactly_once(live_server.url, msgs)
    before = len(live_server.faults.requests("POST", "/save$"))
    again = run_save(store, live_server.url)
    assert again.exit_code == ExitCode.OK and again.details["batches"] == 0
    assert len(live_server.faults.requests("POST", "/save$")) == before


def test_answered_batches_keep_their_key_not_their_body_nor_ids(
        store: Store, small_batches: Any) -> None:
    """The outbox keeps what a resume needs: an answered batch is never sent again, so its
    body and its (id, hash) pairs go (they were most of a store's size after a save; what
    the backend said of each message is in remote_state); its key stays."""
    for chat in ("c1", "c2"):
        seed(store, chat, 50)
    assert run_save(store, small_batches.url).exit_code == ExitCode.OK
    rows = store.conn.execute(
        "SELECT state, length(body), message_ids, idempotency_key FROM outbox").fetchall()
    assert len(rows) == 6, "20 messages a batch: 3 per chat"
    assert {(state, size, ids) for state, size, ids, _ in rows} == {("done", 0, "[]")}
    assert len({key for *_, key in rows}) == 6 and all(key for *_, key in rows)
    confirmed = store.conn.execute(
        "SELECT count(*) FROM remote_state r JOIN messages m USING (chat_id, id)"
        " WHERE r.state = 'confirmed' AND r.content_hash = m.content_hash").fetchone()[0]
    assert confirmed == 0, "a confirmation's hash is kept as bytes, not as its hex text"
    confirmed = store.conn.execute(
        "SELECT count(*) FROM remote_state r JOIN messages m USING (chat_id, id)"
        f" WHERE r.state = 'confirmed' AND {hash_sql('r.content_hash')} = m.content_hash"
        " AND typeof(r.content_hash) = 'blob' AND length(r.content_hash) = 32").fetchone()[0]
    assert confirmed == 100


def test_a_save_gives_the_pages_of_answered_bodies_back(store: Store,
                                                        small_batches: Any) -> None:
    """A store created now has incremental auto-vacuum; the pages answered batches left
    free are released at the end of the save (all but 1 MiB kept for reuse)."""
    assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    for chat in ("c1", "c2", "c3", "c4"):
        seed(store, chat, 50, pad=20_000)
    assert run_save(store, small_batches.url).exit_code == ExitCode.OK
    page = store.conn.execute("PRAGMA page_size").fetchone()[0]
    free = store.conn.execute("PRAGMA freelist_count").fetchone()[0] * page
    assert free <= 1 << 20, free
    # The emptied rows are packed together (an UPDATE that shrank each left it a page).
    rows, pages = store.conn.execute(
        "SELECT (SELECT count(*) FROM outbox), count(*) FROM dbstat WHERE name = 'outbox'"
    ).fetchone()
    assert rows >= 10 and pages <= 2, (rows, pages)
    used = store.used_bytes()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # 4 MB of bodies went through the outbox; the file holds the messages and records.
    assert Path(store.path).stat().st_size <= used + (1 << 20) + page


def test_cli_save_needs_a_remote_and_chats(cli: Any) -> None:
    ran = cli("save", "--all", "--json")
    assert ran.exit_code == 2 and "--remote" in ran.summary["error"]["hint"]
    ran = cli("save", "--remote", "x.db")
    assert ran.exit_code == 2 and "--all" in ran.stderr


def test_cli_save_from_file_over_http(cli: Any, tmp_path: Path, live_server: Any) -> None:
    lines = [json.dumps(m.to_wire()) for m in make_messages("c1", 30)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    ran = cli("save", "--from", str(source), "--remote", live_server.url, "--json")
    assert ran.exit_code == 0, ran.stderr
    s = ran.summary
    assert (s["written"], s["pending_push"], s["import"]["written"]) == (30, 0, 30)
    batches = [e for e in ran.json_lines() if e["type"] == "batch"]
    assert batches and all("content" not in json.dumps(e) for e in batches)
    assert_exactly_once(live_server.url, make_messages("c1", 30))
    status = cli("status", "--json").summary
    assert status["backends"][0]["pending_push"] == 0


def test_dry_run_sends_and_records_nothing(store: Store, live_server: Any,
                                           store_path: Path) -> None:
    seed(store, "c1", 45)
    before = table_dump(store_path)
    result = run_save(store, live_server.url, dry_run=True)
    assert result.exit_code == ExitCode.DIFFERENCES
    assert result.counters["would_send"] == 45
    assert live_server.faults.requests("POST", "/save$") == []
    after = table_dump(store_path)
    after.pop("backends"), before.pop("backends")
    assert after == before


def test_split_on_413_and_limits_respected(store: Store, make_app: Callable[..., Any],
                                           start_server: Callable[[Any], Any]) -> None:
    settings = ServerSettings(max_batch_messages=7, max_body_bytes=4096, rate_per_s=0,
                              housekeeping_interval_s=0)
    server = start_server(make_app(settings=settings, faults=Faults()))
    msgs = seed(store, "c1", 60)
    server.faults.script(Fault.error(413, retry_after=None), path="/save$")
    result = run_save(store, server.url)
    assert result.exit_code == ExitCode.OK, result.summary()
    assert_exactly_once(server.url, msgs)
    statuses = [r.status for r in server.faults.requests("POST", "/save$")]
    assert statuses[0] == 413 and set(statuses[1:]) == {200}


# ------------------------------------------------------------------ lost acknowledgements
def test_lost_acks_for_30_percent_of_requests(store: Store, small_batches: Any) -> None:
    msgs = seed(store, "c1", 1000)
    rng = random.Random(7)
    script = [Fault.lost_ack() if rng.random() < 0.3 else Fault.ok() for _ in range(400)]
    small_batches.faults.script(*script, path="/save$")
    result = run_save(store, small_batches.url, policy=RetryPolicy(attempts=8, base=0.01,
                                                                   cap=0.05))
    assert result.exit_code == ExitCode.OK, result.summary()
    assert_exactly_once(small_batches.url, msgs)
    log = small_batches.faults.requests("POST", "/save$")
    lost = [r for r in log if r.fault == "lost_ack"]
    assert len(lost) > 10
    keys = [r.idempotency_key for r in log]
    # Every lost acknowledgement was retried under the same key, and no key was new
    # for a batch already sent: 50 batches of 20, one key each.
    assert len(set(keys)) == 50
    for record in lost:
        assert small_batches.faults.attempts(record.idempotency_key) >= 2


# --------------------------------------------------------------------- transient faults
TRANSIENT = {
    "503": lambda: Fault.error(503, retry_after=None),
    "502": lambda: Fault.error(502, retry_after=None),
    "504": lambda: Fault.error(504, retry_after=None),
    "409": lambda: Fault.error(409, retry_after=None),
    "429-retry-after": lambda: Fault.error(429, retry_after=1),
    "reset": Fault.reset,
    "cut": lambda: Fault.cut(10),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", list(TRANSIENT))
def test_k_transient_faults_then_success(store: Store, live_server: Any, kind: str,
                                         k: int) -> None:
    msgs = seed(store, "c1", 10)
    live_server.faults.script(*[TRANSIENT[kind]() for _ in range(k)], path="/save$")
    result = run_save(store, live_server.url)
    assert result.exit_code == ExitCode.OK, result.summary()
    assert result.counters["retried"] == k
    log = live_server.faults.requests("POST", "/save$")
    assert len(log) == k + 1
    assert len({r.idempotency_key for r in log}) == 1
    assert_exactly_once(live_server.url, msgs)
    if kind == "429-retry-after":
        gaps = [b.at - a.at for a, b in itertools.pairwise(log)]
        assert all(gap >= 0.95 for gap in gaps), gaps


def test_past_max_attempts_exit_8_then_a_later_save_finishes(store: Store,
                                                            live_server: Any) -> None:
    msgs = seed(store, "c1", 10)
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 4, path="/save$")
    result = run_save(store, live_server.url)
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert result.counters["written"] == 0 and result.counters["pending_push"] == 10
    assert confirmed_rows(store) == {}
    assert server_view(live_server.url, "c1") == []
    again = run_save(store, live_server.url)
    assert again.exit_code == ExitCode.OK
    assert_exactly_once(live_server.url, msgs)


def test_partly_confirmed_run_exits_3(store: Store, small_batches: Any) -> None:
    msgs = seed(store, "c1", 60)  # three batches, sent one after another
    small_batches.faults.script(Fault.ok(), *[Fault.error(502, retry_after=None)] * 4,
                                path="/save$")
    result = run_save(store, small_batches.url)
    assert result.exit_code == ExitCode.PARTIAL
    assert result.counters["written"] == 20 and result.counters["pending_push"] == 40
    assert_never_overclaims(store, small_batches.url)
    assert run_save(store, small_batches.url).exit_code == ExitCode.OK
    assert_exactly_once(small_batches.url, msgs)


# ----------------------------------------------------------------- partial application
@pytest.mark.parametrize("applied", range(20))
def test_server_commits_part_of_a_batch_then_fails(store: Store, live_server: Any,
                                                   applied: int) -> None:
    msgs = seed(store, "c1", 20)
    live_server.faults.script(Fault.partial(applied), path="/save$")
    first = run_save(store, live_server.url, policy=RetryPolicy(attempts=1))
    assert first.exit_code == ExitCode.UNAVAILABLE
    assert_never_overclaims(store, live_server.url)
    assert len(server_view(live_server.url, "c1")) == applied
    again = run_save(store, live_server.url)
    assert again.exit_code == ExitCode.OK
    assert again.counters["written"] + again.counters["unchanged"] == 20
    assert_exactly_once(live_server.url, msgs)
    assert_never_overclaims(store, live_server.url)


# ------------------------------------------------------------------------ kill -9 soak
@pytest.mark.slow
@pytest.mark.parametrize("chats", [1, 50], ids=["one chat", "small chats sent together"])
def test_kill_9_at_random_moments_then_save_again(tmp_path: Path, make_app: Callable[..., Any],
                                                  start_server: Callable[[Any], Any],
                                                  soak: Soak, chats: int) -> None:
    settings = ServerSettings(max_batch_messages=10, rate_per_s=0, housekeeping_interval_s=0)
    server = start_server(make_app(settings=settings, faults=Faults()))
    # Every reply waits a little after the write committed: kills land mid-request too.
    server.faults.script(*[Fault.stall(0.02, "before_headers")] * 10_000, path="/saves?$")
    rng = random.Random(2026 + chats)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSAVE_")}
    cut_midway = 0
    rounds = soak.size(30, 10 if chats == 1 else 4)  # 2.5 - 5 s a round
    for round_ in range(rounds):
        home = tmp_path / f"home-{round_}"
        env["CHATSAVE_HOME"] = str(home)
        names = [f"chat-{round_}-{c}" for c in range(chats)]
        with Store.open(home / "store.db") as store:
            # 200 messages a round: one chat's 20 batches, or 50 chats' requests of two.
            msgs = {name: seed(store, name, 200 // chats) for name in names}

        proc = subprocess.Popen([sys.executable, "-m", "chatsave", "save", "--all", "--remote",
                                 server.url, "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if round_ % 2:
            # Half the rounds aim at the middle of the save: once its first batch is on the
            # server (the save takes at least 20 stalled requests), whatever the machine's
            # speed; the other half at any moment from the start.
            deadline = time.monotonic() + 20
            while not server_view(server.url, names[0]) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            time.sleep(rng.uniform(0.1, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if 0 < sum(len(server_view(server.url, name)) for name in names) < 200:
            cut_midway += 1
        done = run_process("save", "--all", "--remote", server.url, env=env)
        assert done.returncode == 0, done.stderr
        for sent in msgs.values():
            assert_exactly_once(server.url, sent)
        with Store.open(home / "store.db") as store:
            assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert_never_overclaims(store, server.url)
    # The kills really landed in the middle of saves, not only before or after them: in a
    # sixth of the rounds at least (5 of 30).
    print(f"cut midway in {cut_midway} of {rounds} rounds")
    assert cut_midway >= -(-rounds // 6), (cut_midway, rounds)
    if chats > 1:
        assert server.faults.requests("POST", "/saves$"), "the chats went together"


def test_ctrl_c_saves_progress_and_exits_130(store_path: Path, proc_env: dict[str, str],
                                             small_batches: Any) -> None:
    with Store.open(store_path) as store:
        msgs = seed(store, "c1", 200)
    small_batches.faults.script(*[Fault.stall(0.1, "before_headers")] * 1000, path="/save$")
    proc = subprocess.Popen([sys.executable, "-m", "chatsave", "save", "--all", "--remote",
                             small_batches.url, "--json", "--concurrency", "1"], env=proc_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(server_view(small_batches.url, "c1")) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert json.loads(out.splitlines()[-1])["exit_code"] == 130
    assert "interrupted" in err and "Traceback" not in err
    with Store.open(store_path) as store:
        # What was answered before the signal is kept (the batch in flight is resent).
        assert 20 <= len(confirmed_rows(store)) < 200
        assert_never_overclaims(store, small_batches.url)
    small_batches.faults.clear()
    again = run_process("save", "--all", "--remote", small_batches.url, env=proc_env)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(small_batches.url, msgs)


# -------------------------------------------------------------------- broken backends
class _RawServer:
    """A plain TCP server on 127.0.0.1 that answers every request with ``respond(conn)``."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.respond = respond
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                self.respond(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], _RawServer]]:
    servers: list[_RawServer] = []

    def factory(respond: Callable[[socket.socket], None]) -> _RawServer:
        servers.append(_RawServer(respond))
        return servers[-1]

    yield factory
    for s in servers:
        s.close()


def _reply(status: str, body: bytes, ctype: str = "text/html") -> Callable[[socket.socket], None]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    return respond


def _trickle(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    for _ in range(60):
        conn.sendall(b" ")
        time.sleep(0.25)


def _stall_after_headers(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n")
    time.sleep(15)


def _silence(conn: socket.socket) -> None:
    time.sleep(15)


@pytest.mark.parametrize("respond, code, says", [
    (_reply("404 Not Found", b"<html><body>Not Found</body></html>"), 9, "answered 404"),
    (_reply("200 OK", b"<html><body>Welcome</body></html>"), 9, "text/html"),
    (_reply("200 OK", b"", "application/json"), 9, "invalid JSON"),
    (_reply("200 OK", b'{"status": "ok"}', "application/json"), 9, "wrong shape"),
], ids=["404", "html-200", "empty-200", "wrong-schema-200"])
def test_not_a_chatsave_backend(raw_server: Any, proc_env: dict[str, str], tmp_path: Path,
                                store_path: Path, respond: Any, code: int, says: str) -> None:
    with Store.open(store_path) as store:
        seed(store, "c1", 5)
    before = table_dump(store_path)
    server = raw_server(respond)
    ran = run_process("save", "--all", "--remote", server.url, "--json", env=proc_env)
    assert ran.returncode == code, ran.stderr
    assert says in ran.stderr and f"{server.url}/api/v1/capabilities" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["exit_code"] == code
    after = table_dump(store_path)
    for table in ("messages", "remote_state", "outbox", "chats"):
        assert after[table] == before[table]


@pytest.mark.parametrize("respond", [_silence, _trickle, _stall_after_headers],
                         ids=["no-answer", "trickle", "stall-after-headers"])
def test_deadline_ends_the_command(raw_server: Any, proc_env: dict[str, str],
                                   store_path: Path, respond: Any) -> None:
    with Store.open(store_path) as store:
        seed(store, "c1", 5)
    server = raw_server(respond)
    env = {**proc_env, "CHATSAVE_REQUEST_TIMEOUT": "1", "CHATSAVE_RETRY_ATTEMPTS": "2"}
    start = time.monotonic()
    ran = run_process("save", "--all", "--remote", server.url, env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert ran.returncode == 8, ran.stderr
    assert "Traceback" not in ran.stderr
    assert elapsed < 20, f"took {elapsed:.1f}s"


def _ack(msgs: list[Message], **change: Any) -> bytes:
    saved = [{"id": m.id, "rev": 1, "content_hash": m.content_hash} for m in msgs]
    answer: dict[str, Any] = {"chat_id": "c1", "version": 1, "saved": saved}
    if "drop" in change:
        answer["saved"] = saved[:-change["drop"]]
    if "chat_id" in change:
        answer["chat_id"] = change["chat_id"]
    if "hash" in change:
        answer["saved"] = [dict(a, content_hash=change["hash"]) for a in saved]
    return json.dumps(answer).encode()


@pytest.mark.parametrize("change, code, unconfirmed", [
    ({"drop": 5}, ExitCode.REJECTED, 5),
    ({"drop": 2}, ExitCode.REJECTED, 2),
    ({"chat_id": "other"}, ExitCode.UNAVAILABLE, 5),
    ({"hash": "0" * 64}, ExitCode.REJECTED, 5),
], ids=["no-acks", "fewer-acks", "other-chat", "other-hash"])
def test_a_wrong_answer_to_a_save_confirms_nothing(store: Store, live_server: Any,
                                                   raw_server: Any, change: dict[str, Any],
                                                   code: ExitCode, unconfirmed: int) -> None:
    """The real server's capabilities, then a 200 that does not acknowledge the batch."""
    msgs = seed(store, "c1", 5)
    with HttpRemote(live_server.url) as real:
        caps = real.capabilities().model_dump_json().encode()
    answers = iter([caps, _ack(msgs, **change)])

    def scripted(conn: socket.socket) -> None:
        _reply("200 OK", next(answers, b"{}"), "application/json")(conn)

    server = raw_server(scripted)
    result = run_save(store, server.url, policy=RetryPolicy(attempts=1))
    assert result.exit_code == code
    assert result.counters["pending_push"] == unconfirmed
    assert len(confirmed_rows(store)) == 5 - unconfirmed
    if code == ExitCode.REJECTED:
        assert result.counters["unacknowledged"] == unconfirmed


# ---------------------------------------------------------------- full disk, bounded memory
def test_store_full_during_save_from(tmp_path: Path, proc_env: dict[str, str],
                                     store_path: Path, live_server: Any) -> None:
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps(make_messages("c0", 1)[0].to_wire()) + "\n")
    assert run_process("save", "--from", str(first), "--remote", live_server.url,
                       env=proc_env).returncode == 0
    before = table_dump(store_path)
    big = tmp_path / "big.jsonl"
    with big.open("w") as fh:
        for m in make_messages("c1", 3000):
            fh.write(json.dumps(m.to_wire() | {"content": m.content * 20}) + "\n")
    limit = store_path.stat().st_size + 200 * 1024

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    ran = run_process("save", "--from", str(big), "--remote", live_server.url, env=proc_env,
                      preexec_fn=cap)
    assert ran.returncode == 10, ran.stderr
    assert "Traceback" not in ran.stderr
    after = table_dump(store_path)
    for table in ("messages", "chats", "remote_state", "outbox"):
        assert after[table] == before[table]
    assert server_view(live_server.url, "c1") == []
    again = run_process("save", "--from", str(big), "--remote", live_server.url, env=proc_env)
    assert again.returncode == 0, again.stderr
    assert len(server_view(live_server.url, "c1")) == 3000


@pytest.mark.slow
def test_memory_bounded_on_a_100k_message_chat(store: Store, spawn_server: Any,
                                               tmp_path: Path, soak: Soak) -> None:
    import tracemalloc

    server = spawn_server(tmp_path / "server.db")
    n = soak.size(100_000, 25_000)
    seed(store, "big", n)
    tracemalloc.start()
    try:
        result = run_save(store, server.url, request_timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == ExitCode.OK, result.summary()
    assert result.counters["written"] == n
    # 100,000 messages are ~25 MB of JSON (~250 bytes each); the client holds a few batches
    # at a time, never the chat's JSON (its peak, ~3 MB, does not grow with the chat).
    assert peak < 250 * n, f"peak {peak} bytes for {n} messages"


def test_circuit_breaker_stops_hammering_a_failing_backend(store: Store,
                                                           small_batches: Any) -> None:
    for i in range(12):
        seed(store, f"c{i}", 25)  # two batches each: every chat's request goes alone
    small_batches.faults.script(*[Fault.error(503, retry_after=None)] * 500, path="/save$")
    result = run_save(store, small_batches.url, policy=RetryPolicy(attempts=2, base=0.01),
                      concurrency=1, breaker_threshold=5)
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert result.details["stopped"].startswith("circuit breaker")
    assert len(small_batches.faults.requests("POST", "/saves?$")) == 5 * 2
    assert result.counters["pending_push"] == 300


class _WatchedRemote(HttpRemote):
    """An HttpRemote that looks, before each save request goes out, at what another
    connection sees committed in the store's outbox."""

    def __init__(self, url: str, store_path: Path) -> None:
        super().__init__(url, policy=FAST)
        self.store_path = store_path
        self.seen: list[tuple[bool, int]] = []  # (this key committed, batches committed)
        self.lock = threading.Lock()

    def _look(self) -> dict[str, set[str]]:
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.store_path)) as other:
            rows = other.execute("SELECT idempotency_key, chat_id FROM outbox").fetchall()
        keys: dict[str, set[str]] = {}
        for key, chat in rows:
            keys.setdefault(chat, set()).add(key)
        return keys

    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> Any:
        keys = self._look()
        with self.lock:
            self.seen.append((idempotency_key in keys.get(chat_id, ()),
                              sum(map(len, keys.values()))))
        return super().save(chat_id, body, idempotency_key)

    def save_many(self, chat_ids: list[str], body: bytes, idempotency_key: str) -> Any:
        # Each chat's part is its own batch: one committed for each chat, per part.
        keys = self._look()
        with self.lock:
            self.seen += [(bool(keys.get(chat)), sum(map(len, keys.values())))
                          for chat in chat_ids]
        return super().save_many(chat_ids, body, idempotency_key)


def test_the_plan_is_committed_a_group_at_a_time_while_requests_go_out(
        store: Store, store_path: Path, live_server: Any) -> None:
    chats = [f"c{i:02d}" for i in range(40)]
    msgs = {chat: seed(store, chat, 3) for chat in chats}
    remote = _WatchedRemote(live_server.url, store_path)
    with remote:
        result = save(store, remote, None, SaveOptions(concurrency=2))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 120
    assert result.details["batches"] == 40 == len(remote.seen)
    # Every request's batch was committed before it went out, the first ones before the
    # rest of the plan was written (groups of 2, 4, 8, ... chats; the second group may be
    # planned before the first request starts, the third waits for an answer).
    assert all(committed for committed, _ in remote.seen)
    assert remote.seen[0][1] in (2, 6)
    assert max(n for _, n in remote.seen) == 40
    for chat in chats:
        assert_exactly_once(live_server.url, msgs[chat])


def test_the_halves_of_a_split_batch_are_committed_before_they_are_sent(
        store: Store, store_path: Path, live_server: Any, no_saves: None) -> None:
    msgs = {chat: seed(store, chat, 10) for chat in ("c1", "c2", "c3", "c4")}
    # The first request is too large for something on the way; the other chats' requests
    # are still in flight when its halves go out.
    live_server.faults.script(Fault.error(413, retry_after=None),
                              *[Fault.stall(0.5, "before_app")] * 3, path="/save$")
    remote = _WatchedRemote(live_server.url, store_path)
    with remote:
        result = save(store, remote, None, SaveOptions(concurrency=4))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 40
    assert len(remote.seen) == 6  # 4 batches, then the two halves of the one refused
    assert all(committed for committed, _ in remote.seen)
    for sent in msgs.values():
        assert_exactly_once(live_server.url, sent)


def test_a_chats_next_batch_travels_while_the_last_answer_is_recorded(
        store: Store, small_batches: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatsave.store.answers import Answers

    msgs = seed(store, "c1", 60)  # 3 batches of 20, sent in order
    sends: list[int] = []
    called = threading.Condition()
    overlapped: list[bool] = []

    class Counting(HttpRemote):
        def save(self, chat_id: str, body: bytes, idempotency_key: str) -> Any:
            with called:
                sends.append(len(json.loads(body)["messages"]))
                called.notify_all()
            return super().save(chat_id, body, idempotency_key)

    real = Answers.record_save

    def record_save(view: Any, batch: Any, answer: Any) -> Any:
        # Recording batch k waits (a little) for batch k+1's request to have started.
        recorded = len(overlapped) + 1
        with called:
            overlapped.append(called.wait_for(lambda: len(sends) > recorded, timeout=2)
                              if recorded < 3 else True)
        return real(view, batch, answer)

    monkeypatch.setattr(Answers, "record_save", record_save)
    with Counting(small_batches.url, policy=FAST) as remote:
        result = save(store, remote, None, SaveOptions(concurrency=1))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 60
    assert sends == [20, 20, 20] and overlapped == [True, True, True]
    assert [i for i, _ in server_view(small_batches.url, "c1")] == [m.id for m in msgs]


def test_a_run_stopped_early_leaves_what_it_did_not_plan_pending(
        store: Store, live_server: Any, no_saves: None) -> None:
    chats = [f"c{i:02d}" for i in range(30)]
    msgs = {chat: seed(store, chat, 2) for chat in chats}
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 2, path="/save$")
    result = run_save(store, live_server.url, policy=RetryPolicy(attempts=1, base=0.01),
                      concurrency=1, breaker_threshold=2)
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert result.counters["pending_push"] == 60
    # Only the groups planned before the breaker opened are in the outbox (1 + 2 chats).
    assert store.conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3
    again = run_save(store, live_server.url)
    assert again.exit_code == ExitCode.OK and again.counters["written"] == 60
    for chat in chats:
        assert_exactly_once(live_server.url, msgs[chat])


def test_max_duration_leaves_the_rest_pending(store: Store, small_batches: Any) -> None:
    msgs = seed(store, "c1", 200)
    small_batches.faults.script(*[Fault.stall(0.2, "before_app")] * 100, path="/save$")
    result = run_save(store, small_batches.url, max_duration=0.5, concurrency=1)
    assert result.exit_code == ExitCode.PARTIAL
    assert result.details["stopped"] == "--max-duration reached"
    assert 0 < result.counters["written"] < 200
    assert result.counters["pending_push"] == 200 - result.counters["written"]
    small_batches.faults.clear()
    assert run_save(store, small_batches.url).exit_code == ExitCode.OK
    assert_exactly_once(small_batches.url, msgs)


def test_rejected_messages_are_kept_and_resent_only_when_asked(store: Store,
                                                               make_app: Callable[..., Any],
                                                               start_server: Callable[[Any], Any]
                                                               ) -> None:
    settings = ServerSettings(max_content_bytes=100, rate_per_s=0, housekeeping_interval_s=0)
    server = start_server(make_app(settings=settings, faults=Faults()))
    msgs = seed(store, "c1", 5)
    big = Message(chat_id="c1", id="big", role="user", content="y" * 500, created_at=T0)
    with store.transaction():
        store.add_messages("c1", [big])
    result = run_save(store, server.url)
    assert result.exit_code == ExitCode.REJECTED
    assert result.counters["rejected"] == 1 and result.counters["written"] == 5
    assert store.get_message("c1", "big") is not None
    again = run_save(store, server.url)
    assert again.exit_code == ExitCode.REJECTED and again.details["batches"] == 0
    retried = run_save(store, server.url, retry_rejected=True)
    assert retried.exit_code == ExitCode.REJECTED and retried.details["batches"] == 1
    assert_exactly_once(server.url, msgs)


def test_pieces_from_stored_rows_are_the_wire_messages(store: Store) -> None:
    """save builds request bodies straight from stored columns: they must say exactly what
    the messages' own wire form says."""
    import json as _json

    from chatsave.ops.save import message_piece
    from chatsave.store.backend import BackendView

    messages = [
        Message(chat_id="c", id="plain", role="user", content="hi", created_at=T0),
        Message(chat_id="c", id="üñí \"quoted\" \\ back", role="assistant",
                content="line\nbreak \u2028 \U0001f600 \x00 nul", created_at=T0,
                type="llm_response", metadata={"z": 1, "a": [1.5, {"k": None}], "é": "x"},
                attachments=[{"name": "f.txt", "size": 3}], extra={"status": "sent"}),
        Message(chat_id="c", id="inexact", role="system", content="", created_at=T0,
                inexact=True),
    ]
    with store.transaction():
        store.upsert_chat("c", None)
        store.add_messages("c", messages)
    pieces = list(BackendView(store, "b").pending_pieces("c"))
    assert [(mid, chash) for mid, chash, _ in pieces] == \
        [(m.id, m.content_hash) for m in messages]
    for (_, _, piece), msg in zip(pieces, messages, strict=True):
        assert _json.loads(piece) == _json.loads(message_piece(msg))


def test_a_save_plans_only_the_chats_with_something_to_send(
        store: Store, make_app: Callable[..., Any], start_server: Callable[[Any], Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from chatsave.ops.save import _Saver

    settings = ServerSettings(max_content_bytes=200, rate_per_s=0, housekeeping_interval_s=0)
    server = start_server(make_app(settings=settings, faults=Faults()))
    chats = [f"c{i}" for i in range(1, 7)]
    msgs = {chat: seed(store, chat, 3) for chat in chats}
    big = Message(chat_id="c6", id="c6-big", role="user", content="z" * 300, created_at=T0)
    with store.transaction():
        store.add_messages("c6", [big])  # this backend rejects it: kept here, not resent
    first = run_save(store, server.url)
    assert first.exit_code == ExitCode.REJECTED and first.counters["written"] == 18
    # Something to send in two chats: a new message, a deletion.
    added = seed(store, "c1", 1, start=3)
    with store.transaction():
        store.trash_messages("c2", ["c2-m0"], "deleted here", None)
    # What a save reads of them, for the chats named only or for all.
    view = BackendView(store, first.details["backend_id"])
    every = view.chat_counts()
    assert every["c1"]["pending_push"] == every["c2"]["pending_push"] == 1
    assert view.chat_counts(["c2", "c6", "c9"]) == {c: every[c] for c in ("c2", "c6")}
    assert view.chat_counts([]) == {}
    assert view.chats_with_work() == {"c1", "c2", "c6"}
    assert view.chats_with_work(["c2", "c3", "c6"]) == {"c2", "c6"}
    planned: list[str] = []
    plan_chat = _Saver.plan_chat

    def watched(saver: Any, chat_id: str, *args: Any, **kwargs: Any) -> Any:
        planned.append(chat_id)
        return plan_chat(saver, chat_id, *args, **kwargs)

    monkeypatch.setattr(_Saver, "plan_chat", watched)
    again = run_save(store, server.url)
    # The chats in agreement are not planned (nor counted); the one holding a rejection
    # is looked at, and still counted and named.
    assert sorted(planned) == ["c1", "c2", "c6"]
    assert again.exit_code == ExitCode.REJECTED
    assert again.counters["written"] == 1 and again.counters["pending_push"] == 0
    assert again.counters["rejected"] == 1
    assert [r["id"] for r in again.details["rejections"]] == ["c6-big"]
    assert_exactly_once(server.url, msgs["c1"] + added)
    assert [i for i, _ in server_view(server.url, "c2")] == ["c2-m1", "c2-m2"]
    planned.clear()
    quiet = run_save(store, server.url, ["c3", "c4"])
    assert planned == [] and quiet.exit_code == ExitCode.OK
    assert quiet.details["batches"] == 0 and quiet.counters["rejected"] == 0


# ------------------------------------------------- several chats in one request (saves)
def _sent_alone(server: Any) -> list[str]:
    return [r.path.split("/")[-2] for r in server.faults.requests("POST", "/chats/.*/save$")]


def test_small_chats_go_together_in_a_few_requests(store: Store, live_server: Any,
                                                    store_path: Path) -> None:
    chats = [f"c{i:02d}" for i in range(50)]
    msgs = {chat: seed(store, chat, 3) for chat in chats}
    remote = _WatchedRemote(live_server.url, store_path)
    with remote:
        result = save(store, remote, None, SaveOptions(concurrency=4))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 150
    together = live_server.faults.requests("POST", "/saves$")
    # The plan comes a group of chats at a time (4, 8, 16, 22): a request for each.
    assert _sent_alone(live_server) == [] and 2 <= len(together) <= 8
    assert result.details["write_requests"] == len(together)
    assert result.details["batches"] == 50 == len(remote.seen)
    assert all(committed for committed, _ in remote.seen), "each part committed first"
    for chat in chats:
        assert_exactly_once(live_server.url, msgs[chat])
    assert len(confirmed_rows(store)) == 150
    assert store.conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'open'"
                              ).fetchone() == (0,)
    again = run_save(store, live_server.url)
    assert again.details["batches"] == 0
    assert len(live_server.faults.requests("POST", "/saves$")) == len(together)


def test_requests_of_several_chats_keep_to_the_backends_limits(store: Store,
                                                                 small_batches: Any) -> None:
    msgs = {f"c{i}": seed(store, f"c{i}", 6) for i in range(9)}  # 3 chats to a request
    result = run_save(store, small_batches.url, concurrency=1)
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 54
    assert len(small_batches.faults.requests("POST", "/saves$")) == 3
    assert _sent_alone(small_batches) == []
    for sent in msgs.values():
        assert_exactly_once(small_batches.url, sent)


@pytest.mark.parametrize("status", [413, 422, 400])
def test_a_request_of_several_chats_refused_whole_sends_each_chat_alone(
        store: Store, live_server: Any, status: int) -> None:
    msgs = {f"c{i}": seed(store, f"c{i}", 4) for i in range(3)}
    live_server.faults.script(Fault.error(status, retry_after=None), path="/saves$")
    events: list[dict[str, Any]] = []
    with HttpRemote(live_server.url, policy=FAST) as remote:
        result = save(store, remote, None, SaveOptions(concurrency=1),
                      emit=lambda event, **fields: events.append({"event": event, **fields}))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 12
    assert len(live_server.faults.requests("POST", "/saves$")) == 1
    assert sorted(_sent_alone(live_server)) == ["c0", "c1", "c2"]
    assert sorted(e["chat_id"] for e in events if e.get("outcome") == "split") == \
        ["c0", "c1", "c2"]
    assert result.details["write_requests"] == 4
    for sent in msgs.values():
        assert_exactly_once(live_server.url, sent)


def test_a_lost_answer_to_several_chats_is_replayed_not_repeated(store: Store,
                                                                 live_server: Any) -> None:
    msgs = {f"c{i}": seed(store, f"c{i}", 4) for i in range(3)}
    live_server.faults.script(Fault.lost_ack(), path="/saves$")
    result = run_save(store, live_server.url, concurrency=1)
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 12
    sent = live_server.faults.requests("POST", "/saves$")
    assert len(sent) == 2 and sent[0].idempotency_key == sent[1].idempotency_key
    assert _sent_alone(live_server) == []
    for chat_msgs in msgs.values():
        assert_exactly_once(live_server.url, chat_msgs)
    assert len(confirmed_rows(store)) == 12
    assert_never_overclaims(store, live_server.url)


def test_a_failed_request_of_several_chats_counts_once_and_is_sent_again_next_run(
        store: Store, live_server: Any) -> None:
    msgs = {f"c{i}": seed(store, f"c{i}", 4) for i in range(3)}
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 2, path="/saves$")
    first = run_save(store, live_server.url, policy=RetryPolicy(attempts=2, base=0.01),
                     concurrency=1, breaker_threshold=2)
    assert first.exit_code == ExitCode.UNAVAILABLE and first.counters["pending_push"] == 12
    assert "stopped" not in first.details, "one failed request is one failure"
    assert store.conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'open'"
                              ).fetchone() == (3,)
    again = run_save(store, live_server.url, concurrency=1)
    assert again.exit_code == ExitCode.OK and again.counters["written"] == 12
    keys = [r.idempotency_key for r in live_server.faults.requests("POST", "/saves$")]
    assert len(keys) == 3 and len(set(keys)) == 1, "the same batches, the same key"
    for chat_msgs in msgs.values():
        assert_exactly_once(live_server.url, chat_msgs)


def test_an_overwrite_goes_alone(store: Store, live_server: Any) -> None:
    for i in range(3):
        seed(store, f"c{i}", 2)
    run_save(store, live_server.url)
    before = len(live_server.faults.requests("POST", "/saves$"))
    edited = make_messages("c1", 1)[0].model_copy(update={"content": "edited here"})
    with store.transaction():
        store.edit_message(edited, None)  # sent with base_rev: the revision confirmed
    added = [seed(store, f"c{i}", 1, start=5)[0] for i in (0, 2)]
    result = run_save(store, live_server.url, concurrency=1)
    assert result.exit_code == ExitCode.OK, result.details
    assert _sent_alone(live_server) == ["c1"]
    assert len(live_server.faults.requests("POST", "/saves$")) == before + 1
    held = dict(server_view(live_server.url, "c1"))
    assert held["c1-m0"] == edited.content_hash
    assert all(dict(server_view(live_server.url, m.chat_id))[m.id] == m.content_hash
               for m in added)


def test_saves_blocked_on_the_way_sends_each_chat_alone_for_the_rest_of_the_run(
        store: Store, live_server: Any) -> None:
    """A proxy that routes known paths only answers 404 to POST /saves: the run goes on one
    request per chat (it does not stop, exit 9, on every run) and says so."""
    msgs = {f"c{i}": seed(store, f"c{i}", 4) for i in range(8)}
    live_server.faults.script(Fault.error(404, retry_after=None), path="/saves$")
    events: list[dict[str, Any]] = []
    with HttpRemote(live_server.url, policy=FAST) as remote:
        result = save(store, remote, None, SaveOptions(concurrency=1),
                      emit=lambda event, **fields: events.append({"event": event, **fields}))
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 32
    assert len(live_server.faults.requests("POST", "/saves$")) == 1
    assert sorted(_sent_alone(live_server)) == sorted(msgs)
    assert any(e["event"] == "warning" and "each chat is sent alone" in e["message"]
               for e in events)
    for sent in msgs.values():
        assert_exactly_once(live_server.url, sent)


def test_chats_too_large_to_go_together_are_sent_alone_as_they_are_planned(
        store: Store, small_batches: Any) -> None:
    """Chats of one batch each, no two of which fit in one request: each goes alone at
    once, the plan not waited for (the first request leaves before the rest is planned)."""
    for i in range(12):
        seed(store, f"c{i}", 15)  # 15 + 15 > 20: never together
    result = run_save(store, small_batches.url, concurrency=2)
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 180
    assert small_batches.faults.requests("POST", "/saves$") == []
    assert len(_sent_alone(small_batches)) == 12


def test_sync_pushes_small_chats_together_and_pulls_the_rest(store: Store,
                                                             live_server: Any) -> None:
    from chatsave.ops.sync import SyncOptions, sync

    msgs = {f"c{i}": seed(store, f"c{i}", 3) for i in range(6)}
    run_save(store, live_server.url)
    added = {chat: seed(store, chat, 2, start=3) for chat in msgs}  # two new ones each
    elsewhere = make_messages("c0", 1, start=9)  # and one written by another client
    with HttpRemote(live_server.url, policy=FAST) as other:
        other.save("c0", json.dumps({"messages": [m.to_wire() for m in elsewhere]}).encode(),
                   "another-client-key")
    before = len(live_server.faults.requests("POST", "/saves$"))
    alone = _sent_alone(live_server)
    with HttpRemote(live_server.url, policy=FAST) as remote:
        result = sync(store, remote, None, SyncOptions(concurrency=2))
    assert result.exit_code == ExitCode.OK, result.details
    assert result.counters["written"] == 12
    assert len(live_server.faults.requests("POST", "/saves$")) == before + 1
    assert _sent_alone(live_server) == alone == ["c0"]  # the other client's only
    for chat in msgs:
        assert_exactly_once(live_server.url, msgs[chat] + added[chat]
                            + (elsewhere if chat == "c0" else []))
    assert store.get_message("c0", elsewhere[0].id) is not None
