"""Load: a 9:00 stampede of 100 clients, and 200 saves whose replies break, against one real
server (uvicorn on 127.0.0.1 in this process).

- 100 clients save at once to a server that answers 503 + Retry-After for its first 2
  seconds, then recovers: every message is saved exactly once; no client retries before
  its Retry-After allows (per-client request times from the server's own log); after
  recovery each client sends exactly what the retry policy promises (counts per client,
  not wall-clock rates, so a busy machine cannot make it flaky);
- 200 saves whose replies are cut or reset at random points leave open file descriptors
  and connections as they found them, with no ResourceWarning.

Both are soaks (marked ``slow``): a plain run sends 25 clients and 50 saves, ``-m slow``
the full 100 and 200.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import random
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.backend.settings import ServerSettings
from chatsave.errors import ExitCode
from chatsave.model import Message
from chatsave.ops.save import SaveOptions, save
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RETRYABLE_STATUS, RetryPolicy
from chatsave.store.store import Store
from tests.conftest import Soak
from tests.faults import Fault, Faults

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
CLIENTS = 100            # 25 in a plain run (the full 100 with -m slow)
MESSAGES = 25            # per client: 3 batches of at most 10
BATCH = 10
WINDOW_S = 2.0           # the server answers 503 for this long ...
RETRY_AFTER_S = 1        # ... asking every client to come back after this long
LOGICAL = 1 + -(-MESSAGES // BATCH)  # capabilities + save batches, per client
# Time measured on both sides of one process's monotonic clock: no skew to allow for.
EPSILON = 1e-3


def seed(store: Store, chat_id: str, n: int) -> list[Message]:
    msgs = [Message(chat_id=chat_id, id=f"{chat_id}-m{i}", role="user" if i % 2 else "assistant",
                    content=f"message {i} of {chat_id}", created_at=T0 + timedelta(seconds=i))
            for i in range(n)]
    with store.transaction():
        store.upsert_chat(chat_id, None)
        store.add_messages(chat_id, msgs)
    return msgs


def server_view(url: str, chat_id: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    with HttpRemote(url, policy=RetryPolicy(attempts=3, base=0.01)) as remote:
        after = None
        while True:
            page = remote.messages(chat_id, after=after)
            out += [(m.id, m.content_hash) for m in page.messages if not m.deleted]
            if page.next is None:
                return out
            after = page.next


# ------------------------------------------------------------------------- the gate
@dataclass
class Seen:
    client: str
    method: str
    path: str
    key: str | None
    arrived: float
    answered: float = 0.0
    status: int = 0
    retry_after: float | None = None


class Stampede:
    """ASGI wrapper: 503 + Retry-After for everything during the first ``window`` seconds
    after ``open()``, the real app afterwards; logs who asked what, when, and the answer."""

    def __init__(self, app: Any, window: float, retry_after: int) -> None:
        self.app = app
        self.window = window
        self.retry_after = retry_after
        self.t0 = float("inf")
        self.log: list[Seen] = []
        self._lock = threading.Lock()

    @property
    def state(self) -> Any:  # LiveServer looks for app.state
        return self.app.state

    def open(self) -> None:
        self.t0 = time.monotonic()

    @property
    def recovered_at(self) -> float:
        return self.t0 + self.window

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        seen = Seen(client=headers.get(b"authorization", b"-").decode()[len("Bearer "):],
                    method=scope["method"], path=scope["path"],
                    key=(headers.get(b"idempotency-key") or b"").decode() or None,
                    arrived=time.monotonic())
        with self._lock:
            self.log.append(seen)

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                seen.answered = time.monotonic()
                for name, value in message.get("headers", []):
                    if name.lower() == b"retry-after":
                        seen.retry_after = float(value)
            await send(message)

        if seen.arrived < self.recovered_at:
            while True:  # read the request body, then refuse
                message = await receive()
                if not message.get("more_body"):
                    break
            body = json.dumps({"error": {"code": "overloaded",
                                         "message": "the server is busy; retry later"}}).encode()
            await watch({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, watch)


def test_retry_after_is_a_floor_with_jitter_on_top() -> None:
    """Clients told the same Retry-After do not all come back in the same instant."""
    policy = RetryPolicy()
    rng = random.Random(9)
    waits = [policy.delay(1, retry_after=1.0, rng=rng) for _ in range(500)]
    assert min(waits) >= 1.0 and max(waits) <= 1.0 + policy.base
    assert max(waits) - min(waits) > policy.base * 0.9
    later = [policy.delay(3, retry_after=2.0, rng=rng) for _ in range(500)]
    assert min(later) >= 2.0 and max(later) <= 2.0 + policy.base * 4


@pytest.mark.slow
def test_a_9am_stampede_of_100_clients(tmp_path: Path, make_app: Callable[..., Any],
                                       start_server: Callable[[Any], Any], soak: Soak) -> None:
    clients = soak.size(CLIENTS, 25)
    settings = ServerSettings(max_batch_messages=BATCH, rate_per_s=0,
                              housekeeping_interval_s=0, max_in_flight=4 * clients)
    gate = Stampede(make_app(settings=settings), WINDOW_S, RETRY_AFTER_S)
    server = start_server(gate)
    policy = RetryPolicy()  # what chatsave ships: 5 attempts, full jitter from 0.5 s
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    sent: dict[str, list[Message]] = {}
    for i in range(clients):
        with Store.open(tmp_path / f"client-{i:03d}.db") as store:
            sent[f"client-{i:03d}"] = seed(store, f"chat-{i:03d}", MESSAGES)
    # The outage starts when the stampede does: as the last client is ready, not while the
    # others still set up (100 TLS contexts alone can take longer than the window).
    start = threading.Barrier(clients + 1, action=gate.open)

    def client(i: int) -> None:
        name = f"client-{i:03d}"
        try:
            with Store.open(tmp_path / f"{name}.db") as store, \
                    HttpRemote(server.url, token=name, policy=policy, request_timeout=30) as r:
                start.wait(30)
                results[name] = save(store, r, None, SaveOptions(concurrency=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), name=f"load-{i}")
               for i in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    start.wait(30)
    for t in threads:
        t.join(max(0.1, began + 60 - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"clients still running after 60 s: {alive[:5]}"
    assert errors == []
    elapsed = time.monotonic() - began

    # Every message saved exactly once.
    assert sorted(results) == sorted(sent)
    for name, result in results.items():
        assert result.exit_code == ExitCode.OK, (name, result.summary())
        assert result.counters["written"] == MESSAGES and result.counters["pending_push"] == 0
    for name, msgs in sent.items():
        held = server_view(server.url, msgs[0].chat_id)
        assert len(held) == len({i for i, _ in held}) == MESSAGES, name
        assert dict(held) == {m.id: m.content_hash for m in msgs}

    log = [s for s in gate.log if s.client.startswith("client-")]
    by_client: dict[str, list[Seen]] = defaultdict(list)
    for seen in sorted(log, key=lambda s: s.arrived):
        by_client[seen.client].append(seen)
    assert sorted(by_client) == sorted(sent)
    refused_then_retried = 0
    for name, seen in by_client.items():
        assert all(s.status for s in seen), f"{name}: a request was never answered"
        # Never back before the Retry-After it was given (one client = one connection
        # at a time here: concurrency 1, so its requests are strictly sequential).
        for earlier, later in itertools.pairwise(seen):
            if earlier.status in RETRYABLE_STATUS and earlier.retry_after is not None:
                assert later.arrived - earlier.answered >= earlier.retry_after - EPSILON, \
                    (name, earlier, later)
                refused_then_retried += 1
        # During the outage: at most one try per Retry-After, plus the first.
        during = [s for s in seen if s.arrived < gate.recovered_at]
        assert len(during) <= 1 + int(WINDOW_S // RETRY_AFTER_S), (name, during)
        assert all(s.status == 503 for s in during)
        # After recovery: exactly the requests the work needs, each answered once, and
        # every logical request within the policy's attempts.
        after = [s for s in seen if s.arrived >= gate.recovered_at]
        assert [s.status for s in after] == [200] * len(after), (name, after)
        assert len(after) == LOGICAL - sum(1 for s in during if s.status == 200), name
        attempts: dict[tuple[str, str | None], int] = defaultdict(int)
        for s in seen:
            attempts[(s.path, s.key)] += 1
        assert len(attempts) == LOGICAL, (name, sorted(attempts))
        assert max(attempts.values()) <= policy.attempts
        saves = [s for s in seen if s.path.endswith("/save")]
        # A batch keeps its Idempotency-Key across retries: one key per batch.
        assert len({s.key for s in saves}) == LOGICAL - 1
    # The wave really hit the outage (a thread that a busy machine started late may
    # have missed it; most cannot have).
    hit = sum(1 for seen in by_client.values() if seen[0].arrived < gate.recovered_at)
    assert hit >= clients // 2 and refused_then_retried >= hit
    assert elapsed < 60, f"the stampede took {elapsed:.1f}s"


# ------------------------------------------------------------------ replies that break
def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _connections(port: int) -> list[str]:
    """TCP connections (with a file descriptor: established or closing) to or from port."""
    found = []
    held = {"01", "02", "03", "08", "0B"}  # ESTABLISHED SYN_SENT SYN_RECV CLOSE_WAIT CLOSING
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                parts = line.split()
                local, remote, state = parts[1], parts[2], parts[3]
                ports = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
                if port in ports and state in held:
                    found.append(line.strip())
    return found


def _settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if check():
            return True
        time.sleep(0.05)
    return check()


@contextlib.contextmanager
def _no_resource_warnings() -> Iterator[list[str]]:
    """Collects ResourceWarnings and unraisable exceptions (a socket closed by __del__)."""
    problems: list[str] = []
    old_hook = sys.unraisablehook

    def hook(info: Any) -> None:
        problems.append(f"unraisable: {info.exc_type.__name__}: {info.exc_value}")

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            yield problems
            gc.collect()
        problems += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    finally:
        sys.unraisablehook = old_hook


@pytest.mark.slow
def test_200_saves_with_broken_replies_leak_nothing(tmp_path: Path,
                                                    make_app: Callable[..., Any],
                                                    start_server: Callable[[Any], Any],
                                                    soak: Soak) -> None:
    saves = soak.size(200, 50)
    server = start_server(make_app(faults=Faults()))
    rng = random.Random(200)
    policy = RetryPolicy(attempts=6, base=0.01, cap=0.05)

    def faults_for_one_save() -> list[Fault]:
        kind = rng.choice(["cut", "cut", "reset", "lost_ack", "stall-cut"])
        if kind == "cut":
            return [Fault.cut(rng.randint(0, 400)), Fault.ok()]
        if kind == "reset":
            return [Fault.reset(), Fault.ok()]
        if kind == "lost_ack":
            return [Fault.lost_ack(), Fault.ok()]
        return [Fault.cut(rng.randint(0, 40)), Fault.cut(rng.randint(40, 400)), Fault.ok()]

    store = Store.open(tmp_path / "store.db")
    try:
        seed(store, "warm-up", 3)
        with HttpRemote(server.url, policy=policy) as remote:
            assert save(store, remote, None, SaveOptions()).exit_code == ExitCode.OK
        assert _settle(lambda: not _connections(server.port))
        fds_before = _open_fds()
        script: list[Fault] = []
        caps: list[Fault] = []
        for _ in range(saves):
            script += faults_for_one_save()
            caps += [Fault.reset(), Fault.ok()] if rng.random() < 0.2 else [Fault.ok()]
        server.faults.script(*script, path=r"/save$")
        server.faults.script(*caps, path=r"/capabilities$")
        sent = {}
        with _no_resource_warnings() as problems:
            for i in range(saves):
                chat = f"chat-{i:03d}"
                sent[chat] = seed(store, chat, 5)
                with HttpRemote(server.url, policy=policy, request_timeout=10) as remote:
                    result = save(store, remote, [chat], SaveOptions(concurrency=2))
                assert result.exit_code == ExitCode.OK, (chat, result.summary())
        assert server.faults.pending() == 0, "every scripted fault was used"
        assert problems == []
        # The client's sockets, and the server's ends of them, are all closed again.
        assert _settle(lambda: not _connections(server.port)), _connections(server.port)
        assert _settle(lambda: _open_fds() <= fds_before), \
            [os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - fds_before
             if os.path.exists(f"/proc/self/fd/{fd}")]
    finally:
        store.close()
    log = server.faults.requests("POST", r"/save$")
    assert sum(1 for r in log if r.fault in ("cut", "reset", "lost_ack")) >= saves
    for chat, msgs in list(sent.items())[::20]:
        held = server_view(server.url, chat)
        assert dict(held) == {m.id: m.content_hash for m in msgs} and len(held) == 5
