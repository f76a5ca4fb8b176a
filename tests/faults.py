"""Fault injection for the tests: scripted misbehaviour of the server, one fault per request.

The server has no fault switch of its own: ``create_app(..., hooks=faults.hooks())`` wraps
its app (``FaultMiddleware``, outermost, so it holds the connection) and its storage (for
``hang``). A test holds the ``Faults`` object, or, for a server in another process started
by tests/fault_server.py, drives ``/_faults/*`` over HTTP, and scripts what the next
matching requests suffer::

    faults.script(Fault.error(503, retry_after=1), Fault.reset(), Fault.cut(100),
                  Fault.stall(2.0), Fault.ok(), path=r"/save$")

Each request takes the next fault of the first rule that matches it (method, path regex)
and still has faults; unmatched requests are served normally. Every request is logged
(``faults.log``) with its Idempotency-Key, the fault applied and the status sent, and
``faults.attempts(key)`` counts the requests seen per key.

Kinds:

- ``ok``: served normally (a placeholder in a sequence);
- ``error``: an envelope with the given status (and Retry-After), the app is not called;
- ``reset``: the request is read, then the connection is reset (TCP RST) before the app
  runs, so the client sees the reset while it waits for the answer;
- ``cut``: the app runs, the reply is cut after ``after_bytes`` bytes of its body (headers
  intact, then the connection closes);
- ``stall``: sleep ``seconds`` ``before_app`` (nothing happened yet), ``before_headers``
  (the app ran, the reply is held) or ``after_headers`` (status line sent, body held);
- ``lost_ack``: the app runs (the write commits), the reply is dropped and the connection
  reset: a lost acknowledgement;
- ``partial``: the first ``count`` items of the batch are committed on their own, without
  the request's idempotency record (deliberately breaking the one-transaction rule: the
  middleware sends the truncated batch under a key of its own), then the request fails
  with a 500 envelope (``then="500"``) or a reset (``then="reset"``);
- ``hang``: the write sleeps ``seconds`` inside its transaction, the chat locked and the
  Idempotency-Key's record read, before applying anything (the storage wrapper sleeps in
  ``get_record``): a retry with the key waits for it, and killing the server meanwhile
  shows that a dead request leaves nothing behind.

A reset needs the connection's transport: under uvicorn the middleware finds it through the
ASGI ``send`` callable; elsewhere (``httpx.ASGITransport``) it raises ``FaultAbort``, which
the in-process client sees as a transport failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, MutableMapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from chatsave.backend.storage import Storage
from chatsave.server.app import AppHooks
from chatsave.server.middleware import ASGIApp, Message, Receive, Scope, Send, send_error

#: seconds the current request's write sleeps once its idempotency record is read
_HANG: ContextVar[float] = ContextVar("chatsave_test_hang", default=0.0)
CONTROL_PREFIX = "/_faults/"
KINDS = ("ok", "error", "reset", "cut", "stall", "lost_ack", "partial", "hang")
WHERE = ("before_app", "before_headers", "after_headers")


class FaultAbort(ConnectionResetError):
    """Raised where a fault cannot reach the real connection (no transport)."""


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour; build it with the class methods."""

    kind: str
    status: int = 503
    retry_after: float | None = 1
    after_bytes: int = 0
    seconds: float = 0.0
    where: str = "before_headers"
    count: int = 0
    then: str = "500"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.where not in WHERE:
            raise ValueError(f"stall where must be one of {', '.join(WHERE)}")
        if self.then not in ("500", "reset"):
            raise ValueError('partial then must be "500" or "reset"')

    @classmethod
    def ok(cls) -> Fault:
        return cls("ok")

    @classmethod
    def error(cls, status: int = 503, retry_after: float | None = 1) -> Fault:
        return cls("error", status=status, retry_after=retry_after)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def cut(cls, after_bytes: int) -> Fault:
        return cls("cut", after_bytes=after_bytes)

    @classmethod
    def stall(cls, seconds: float, where: str = "before_headers") -> Fault:
        return cls("stall", seconds=seconds, where=where)

    @classmethod
    def lost_ack(cls) -> Fault:
        return cls("lost_ack")

    @classmethod
    def partial(cls, count: int, then: str = "500") -> Fault:
        return cls("partial", count=count, then=then)

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        return cls("hang", seconds=seconds)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Fault:
        return cls(**doc)


@dataclass
class RequestRecord:
    """One request the server saw while faults were enabled."""

    method: str
    path: str
    idempotency_key: str | None
    fault: str
    status: int | None = None
    at: float = field(default_factory=time.time)


@dataclass
class _Rule:
    method: str | None
    path: re.Pattern[str] | None
    queue: deque[Fault]

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and \
            (self.path is None or self.path.search(path) is not None)


class Faults:
    """The scripted faults and the request log; shared between a test and its server."""

    def __init__(self, *, http_control: bool = False) -> None:
        self.http_control = http_control
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[RequestRecord] = []

    def hooks(self) -> AppHooks:
        """What ``create_app(hooks=...)`` needs to apply these faults."""
        return AppHooks(middleware=[lambda app: FaultMiddleware(app, self)],
                        storage=lambda storage: _HangingStorage(storage))  # type: ignore[return-value]

    def script(self, *faults: Fault, method: str | None = None, path: str | None = None) -> None:
        """Queue ``faults`` for the next requests matching ``method`` and ``path`` (regex)."""
        rule = _Rule(method.upper() if method else None,
                     re.compile(path) if path else None, deque(faults))
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        """Forget scripted faults and the log."""
        with self._lock:
            self._rules.clear()
            self._log.clear()

    def pending(self) -> int:
        """Scripted faults not yet used."""
        with self._lock:
            return sum(len(r.queue) for r in self._rules)

    @property
    def log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def attempts(self, key: str) -> int:
        """Requests seen carrying Idempotency-Key ``key``."""
        with self._lock:
            return sum(1 for r in self._log if r.idempotency_key == key)

    def requests(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        """Logged requests matching ``method`` and ``path`` (regex)."""
        pattern = re.compile(path) if path else None
        with self._lock:
            return [r for r in self._log
                    if (method is None or r.method == method.upper())
                    and (pattern is None or pattern.search(r.path))]

    def _take(self, method: str, path: str, key: str | None) -> tuple[Fault, RequestRecord]:
        with self._lock:
            fault = Fault.ok()
            for rule in self._rules:
                if rule.queue and rule.matches(method, path):
                    fault = rule.queue.popleft()
                    break
            record = RequestRecord(method, path, key, fault.kind)
            self._log.append(record)
            return fault, record


def _transport(send: Send) -> Any:
    owner = getattr(send, "__self__", None)
    return getattr(owner, "transport", None)


async def _reset(send: Send) -> None:
    transport = _transport(send)
    if transport is None:
        raise FaultAbort("connection reset (injected fault)")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    for _ in range(3):  # let the server notice the connection is gone
        await asyncio.sleep(0)


async def _close(send: Send) -> None:
    transport = _transport(send)
    if transport is None:
        raise FaultAbort("connection closed mid-reply (injected fault)")
    transport.close()
    for _ in range(3):
        await asyncio.sleep(0)


class FaultMiddleware:
    """Applies the scripted faults; outermost, so it holds the server's own ``send``."""

    def __init__(self, app: ASGIApp, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.faults.http_control and path.startswith(CONTROL_PREFIX):
            await self._control(scope, receive, send)
            return
        key = None
        for name, value in scope.get("headers") or []:
            if name == b"idempotency-key":
                key = value.decode("latin-1")
        fault, record = self.faults._take(scope.get("method", ""), path, key)

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        kind = fault.kind
        if kind == "error":
            headers = {} if fault.retry_after is None else \
                {"Retry-After": f"{fault.retry_after:g}"}
            await send_error(watch, fault.status, "fault_injected",
                             f"injected fault: status {fault.status}", headers=headers)
        elif kind == "reset":
            await _drain(receive)  # the client has sent everything: it sees the reset
            await _reset(send)     # while it waits for the answer, as after a real crash
        elif kind == "cut":
            await self.app(scope, receive, _Cutter(send, watch, fault.after_bytes).send)
        elif kind == "stall":
            await self._stall(scope, receive, send, watch, fault)
        elif kind == "lost_ack":
            await self.app(scope, receive, _discard)
            await _reset(send)
        elif kind == "partial":
            await self._partial(scope, receive, fault.count)
            if fault.then == "reset":
                await _reset(send)
            else:
                await send_error(watch, 500, "fault_injected",
                                 f"fault injected: the first {fault.count} items were "
                                 "committed, then the request failed")
        elif kind == "hang":
            token = _HANG.set(fault.seconds)
            try:
                await self.app(scope, receive, watch)
            finally:
                _HANG.reset(token)
        else:
            await self.app(scope, receive, watch)

    async def _partial(self, scope: Scope, receive: Receive, count: int) -> None:
        """Run the request's first ``count`` items as a request of their own (its own key,
        its answer dropped): they commit without the request's idempotency record."""
        body = await read_body(receive)
        data = json.dumps(_truncated(json.loads(body), count)).encode("utf-8")
        headers = [(k, v) for k, v in scope.get("headers") or []
                   if k not in (b"idempotency-key", b"content-length")]
        headers += [(b"idempotency-key", f"fault-partial-{uuid.uuid4().hex}".encode()),
                    (b"content-length", str(len(data)).encode())]
        await self.app({**scope, "headers": headers}, replaying(data), _discard)

    async def _stall(self, scope: Scope, receive: Receive, send: Send, watch: Send,
                     fault: Fault) -> None:
        if fault.where == "before_app":
            await asyncio.sleep(fault.seconds)
            await self.app(scope, receive, watch)
            return
        stalled = False

        async def slow(message: Message) -> None:
            nonlocal stalled
            if not stalled and (
                    (fault.where == "before_headers" and message["type"] == "http.response.start")
                    or (fault.where == "after_headers"
                        and message["type"] == "http.response.body")):
                stalled = True
                await asyncio.sleep(fault.seconds)
            await watch(message)

        await self.app(scope, receive, slow)

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        action = scope["path"][len(CONTROL_PREFIX):]
        body = await read_body(receive)
        try:
            if action == "script" and scope["method"] == "POST":
                doc = json.loads(body or b"{}")
                self.faults.script(*(Fault.from_json(f) for f in doc.get("faults", [])),
                                   method=doc.get("method"), path=doc.get("path"))
                answer: dict[str, Any] = {"pending": self.faults.pending()}
            elif action == "clear" and scope["method"] == "POST":
                self.faults.clear()
                answer = {"pending": 0}
            elif action == "log" and scope["method"] == "GET":
                answer = {"requests": [asdict(r) for r in self.faults.log],
                          "pending": self.faults.pending()}
            else:
                await send_error(send, 404, "not_found", f"no fault control {action!r}")
                return
        except (ValueError, TypeError) as exc:
            await send_error(send, 422, "invalid_request", f"bad fault script: {exc}")
            return
        data = json.dumps(answer).encode("utf-8")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode("ascii"))]})
        await send({"type": "http.response.body", "body": data, "more_body": False})


async def read_body(receive: Receive) -> bytes:
    """A request's whole body, read from ``receive``."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def replaying(body: bytes) -> Receive:
    """A ``receive`` that gives ``body`` once, then a disconnect: a request read already,
    passed on."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _truncated(doc: Any, count: int) -> Any:
    """A save or delete body cut to its first ``count`` items, without its title."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict):  # a web client's shape
        return {"messages": doc["data"].get("messages", [])[:count]}
    if isinstance(doc, dict) and "ids" in doc:
        return {"ids": doc["ids"][:count]}
    return {"messages": doc.get("messages", [])[:count]}


class _HangingStorage:
    """A Storage whose write transactions sleep after reading an idempotency record while
    the current request carries a ``hang`` fault."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        with self._inner.write() as tx:
            yield _HangingTx(tx)


class _HangingTx:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_record(self, *args: Any, **kwargs: Any) -> Any:
        record = self._inner.get_record(*args, **kwargs)
        seconds = _HANG.get()
        if seconds > 0 and record is None:
            time.sleep(seconds)
        return record


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _discard(message: MutableMapping[str, Any]) -> None:
    return None


class _Cutter:
    """Forwards a reply until ``limit`` body bytes have gone, then closes the connection."""

    def __init__(self, raw: Send, watch: Send, limit: int) -> None:
        self.raw = raw
        self.watch = watch
        self.limit = limit
        self.sent = 0
        self.cut = False

    async def send(self, message: Message) -> None:
        if self.cut:
            return
        if message["type"] != "http.response.body":
            await self.watch(message)
            return
        chunk = message.get("body", b"")
        room = self.limit - self.sent
        if len(chunk) < room or (len(chunk) == room and not message.get("more_body")):
            self.sent += len(chunk)
            await self.watch(message)
            return
        self.cut = True
        await self.watch({"type": "http.response.body", "body": chunk[:room],
                          "more_body": True})
        await _close(self.raw)
