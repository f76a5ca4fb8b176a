"""Pure ASGI middleware of the server: access log, catch-all errors, and every request limit.

Limits are enforced here, before FastAPI sees a request, and answered in the protocol's JSON
error envelope (uvicorn's own limits answer in plain text, so ours are set below them):

- header size (431), checked first;
- authentication (401) when a tokens file is configured;
- per-token request rate (429 + Retry-After): a token bucket **per server process**; with
  N workers or N servers behind a balancer the effective rate is up to N times the setting.
  It protects a process from one noisy client; it is not a shared quota;
- overload (503 + Retry-After): a bounded number of requests in flight per process;
- body size (413): ``Content-Length`` is checked before reading, and a streamed body is
  counted as it arrives and refused as soon as it passes the limit, so no more than the
  limit is ever buffered. The rest of a refused body is discarded by the server as it
  arrives (uvicorn keeps reading and drops it), so the client can read the 413.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from chatsave.backend import LOCAL_USER
from chatsave.backend.answers import envelope
from chatsave.backend.settings import ServerSettings
from chatsave.protocol import API_PREFIX
from chatsave.server.observe import (
    OUTCOME_KEY,
    RequestRecord,
    error_code,
    log_text,
    request_id,
)
from chatsave.server.tokens import TokenStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("chatsave.server")

#: paths answered without a token (the client checks capabilities before it has one in use)
PUBLIC_PATHS = frozenset({f"{API_PREFIX}/capabilities", f"{API_PREFIX}/health",
                          "/openapi.json"})
USER_KEY = "chatsave_user"


async def send_error(send: Send, status: int, code: str, message: str, details: Any = None,
                     headers: dict[str, str] | None = None) -> None:
    """Send one complete error response in the envelope."""
    body = json.dumps(envelope(code, message, details)).encode("utf-8")
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(body)).encode("ascii"))]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AccessLogMiddleware:
    """One record per request (chatsave.server.observe: method, route template, status,
    duration, user, request id; never bodies or tokens) for each observer (the access log,
    metrics); the request id goes back in X-Request-Id. Turns an exception that escaped
    everything else into a 500 envelope."""

    def __init__(self, app: ASGIApp, observers: Sequence[Callable[[RequestRecord], None]] = (),
                 routes: Sequence[Any] = ()) -> None:
        self.app = app
        self.observers = list(observers) or [log_text]
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope.get("headers") or [])
        status = 0
        error_start = b""

        async def watch(message: Message) -> None:
            nonlocal status, error_start
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [
                    *message.get("headers", []), (b"x-request-id", rid.encode("ascii"))]}
            elif message["type"] == "http.response.body" and status >= 400 and \
                    len(error_start) < 512:
                error_start += message.get("body", b"")[:512]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("error while answering %s %s (request %s)", scope.get("method"),
                          self._route(scope), rid)
            if status == 0:
                status = 500
                error_start = b'"code":"internal"'
                try:
                    await send_error(send, 500, "internal", "internal server error",
                                     headers={"X-Request-Id": rid})
                except Exception:  # the client is gone
                    log.debug("could not send the 500 answer", exc_info=True)
        finally:
            state = scope.get("state", {})
            outcome = state.get(OUTCOME_KEY) or {}
            record = RequestRecord(
                method=str(scope.get("method")), route=self._route(scope),
                path=str(scope.get("path", "")), status=status,
                duration_s=time.perf_counter() - started,
                user=str(state.get(USER_KEY) or "-"), request_id=rid,
                error=error_code(error_start) if status >= 400 else None,
                outcome=outcome.get("messages", {}), replayed=bool(outcome.get("replayed")))
            for observe in self.observers:
                try:
                    observe(record)
                except Exception:  # an observer never breaks a request
                    log.exception("could not record request %s", rid)

    def _route(self, scope: Scope) -> str:
        """The template of the route that served (or would serve) the request."""
        route = scope.get("route")
        if route is None:  # answered before routing (401, 413, 429, ...): match it now
            from starlette.routing import Match

            for candidate in self.routes:
                if candidate.matches(scope)[0] != Match.NONE:
                    route = candidate
                    break
        # path_format: the template as the OpenAPI document writes it, without converters
        path = getattr(route, "path_format", None)
        return path if isinstance(path, str) else "unmatched"


class RateLimiter:
    """Token buckets keyed by token (per process; see the module docstring)."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


class GuardMiddleware:
    """Headers, authentication, rate, overload and body limits, in that order."""

    def __init__(self, app: ASGIApp, settings: ServerSettings,
                 tokens: TokenStore | None = None) -> None:
        self.app = app
        self.settings = settings
        self.tokens = tokens
        self.rate = RateLimiter(settings.rate_per_s, settings.rate_burst) \
            if settings.rate_per_s > 0 else None
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.settings
        state = scope.setdefault("state", {})
        retry = {"Retry-After": str(s.retry_after_s)}
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(k) + len(v) + 4 for k, v in headers)
        if size > s.max_header_bytes:
            await send_error(send, 431, "headers_too_large",
                             f"request headers larger than {s.max_header_bytes} bytes",
                             {"limit": s.max_header_bytes})
            return

        path = scope.get("path", "")
        public = path in PUBLIC_PATHS
        bucket = LOCAL_USER
        if self.tokens is None:
            state[USER_KEY] = LOCAL_USER
        else:
            token = _bearer(headers)
            found = self.tokens.verify(token) if token else None
            if found is not None:
                state[USER_KEY], bucket = found
            elif not public:
                challenge = 'Bearer error="invalid_token"' if token else "Bearer"
                await send_error(send, 401, "unauthorized",
                                 "a valid bearer token is needed (Authorization: Bearer TOKEN)",
                                 headers={"WWW-Authenticate": challenge})
                return

        if self.rate is not None and not public:
            wait = self.rate.take(bucket)
            if wait > 0:
                await send_error(send, 429, "rate_limited",
                                 "too many requests for this token; slow down",
                                 {"retry_after": wait},
                                 headers={"Retry-After": str(max(1, math.ceil(wait)))})
                return

        if self.in_flight >= s.max_in_flight:
            await send_error(send, 503, "overloaded", "the server is busy; retry later",
                             headers=retry)
            return
        self.in_flight += 1
        try:
            await self._with_body(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    async def _with_body(self, scope: Scope, receive: Receive, send: Send,
                         headers: list[tuple[bytes, bytes]]) -> None:
        limit = self.settings.max_body_bytes
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await send_error(send, 400, "bad_request", "invalid Content-Length")
                    return
                if declared > limit:
                    await _too_large(send, limit)
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                chunks.clear()
                await _too_large(send, limit)
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        delivered = False

        async def replay() -> Message:
            nonlocal delivered, body
            if not delivered:
                delivered = True
                out = {"type": "http.request", "body": body, "more_body": False}
                body = b""
                return out
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await send_error(send, 413, "body_too_large",
                     f"request body larger than {limit} bytes; split the batch",
                     {"limit": limit})


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
