"""The FastAPI app of protocol v1: a thin adapter from HTTP to the Service.

``create_app`` wires the routes, the error envelope for every error (unknown route, 405,
validation, exceptions), the ASGI middleware (access log, limits, auth) and housekeeping on
a schedule. ``AppHooks`` lets a caller wrap the app and its storage (the test suite scripts
misbehaviour that way, from tests/; the server itself has no such switch). The OpenAPI schema
it serves is the contract; its normalised snapshot lives in tests/data/openapi-v1.json
(``openapi_snapshot()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from chatsave.backend.answers import Answer, RenderedAnswer, envelope
from chatsave.backend.service import Service
from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage import Storage, open_storage
from chatsave.model import CHAT_ID_MAX
from chatsave.protocol import (
    API_PREFIX,
    PROTOCOL_VERSION,
    BucketsAnswer,
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DeleteRequest,
    DigestsAnswer,
    DigestsRequest,
    ErrorEnvelope,
    Health,
    MessagePage,
    SaveAnswer,
    SaveMessage,
    SavesAnswer,
)
from chatsave.server.middleware import USER_KEY, AccessLogMiddleware, GuardMiddleware
from chatsave.server.observe import (
    OUTCOME_KEY,
    OUTCOMES,
    RequestRecord,
    ServerMetrics,
    log_json,
    log_text,
)
from chatsave.server.tokens import TokenStore

log = logging.getLogger("chatsave.server")

CHAT_ID_SCHEMA = {"type": "string", "pattern": f"^[A-Za-z0-9._:@~-]{{1,{CHAT_ID_MAX}}}$"}
KEY_HEADER = {
    "name": "Idempotency-Key", "in": "header",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
    "description": "Unique per write; a retry of the same request reuses it (IETF "
                   "Idempotency-Key draft). Kept at least idempotency_retention_s.",
}
_STATUS_TEXT = {
    400: "Malformed request (bad JSON, missing or invalid Idempotency-Key)",
    401: "Missing or invalid bearer token",
    404: "No such chat for this user",
    409: "A request with this Idempotency-Key is still running; retry after Retry-After",
    413: "Body or batch too large; split it",
    422: "Invalid request (chat id, shape, key reused with another body)",
    429: "Rate limited; retry after Retry-After",
    431: "Request headers too large",
    503: "Overloaded or storage unavailable; retry after Retry-After",
}


class SaveRequestDoc(BaseModel):
    """Body of POST /chats/{chat_id}/save (items are validated one by one)."""

    model_config = ConfigDict(extra="forbid", title="SaveRequest")
    messages: list[SaveMessage]
    title: str | None = Field(default=None, max_length=1000)


class ChatSave(BaseModel):
    """One chat's part of POST /saves."""

    model_config = ConfigDict(extra="forbid")
    chat_id: str
    messages: list[SaveMessage]
    title: str | None = Field(default=None, max_length=1000)


class SavesRequestDoc(BaseModel):
    """Body of POST /saves: the saves of several chats, one transaction, one key; at most
    max_batch_messages messages (all chats together) and max_batch_messages chats."""

    model_config = ConfigDict(extra="forbid", title="SavesRequest")
    chats: list[ChatSave] = Field(min_length=1)


class AliasData(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]]
    name: str | None = None


class AliasSaveRequest(BaseModel):
    """Body of POST /api/chats/{chat_id}/save: web client shapes, normalised like import.

    Either ``{"messages": [...], "title": ...}`` or ``{"data": {"messages": [...],
    "name": ...}}``; messages may use role/sender/author, content/text/body, epoch or ISO
    times.
    """

    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] | None = None
    title: str | None = None
    data: AliasData | None = None


_DOC_MODELS: list[type[BaseModel]] = [SaveRequestDoc, SavesRequestDoc, DeleteRequest,
                                      DigestsRequest, AliasSaveRequest]


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorEnvelope, "description": _STATUS_TEXT[s]} for s in statuses}


def _body(ref: str, *, key: bool | None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}},
    }
    if key is not None:
        extra["parameters"] = [dict(KEY_HEADER, required=key)]
    return extra


class ProtocolJSONResponse(JSONResponse):
    """JSON that always renders: text the client sent with lone surrogates (JSON
    ``"\\ud800"`` escapes) and that an answer echoes (an unknown id) stays escaped
    instead of failing to encode as UTF-8."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode("ascii")


def _reply(answer: Answer) -> Response:
    status, body, headers = answer
    if isinstance(body, RenderedAnswer):  # its JSON text is made already
        return Response(body.text.encode("utf-8"), status_code=status, headers=headers,
                        media_type="application/json")
    return ProtocolJSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class AppHooks:
    """What a caller of ``create_app`` may wrap around the server's own parts.

    ``middleware``: ASGI wrappers applied around the whole stack, outermost last (they see
    every request before the limits, the access log and authentication do, and hold the
    server's own ``send``). ``storage``: wraps the Storage the Service writes through (the
    app's ``state.storage`` stays the unwrapped one). Empty by default; nothing the server
    installs uses them.
    """

    middleware: Sequence[Callable[[ASGIApp], ASGIApp]] = ()
    storage: Callable[[Storage], Storage] | None = None


LOG_FORMATS = ("text", "json")


def _note_write(request: Request, answer: Answer) -> None:
    """Leave what a write did (message counts, replay) for the access log and metrics; a
    replay did nothing again, so its messages are not counted twice."""
    status, body, headers = answer
    replayed = headers.get("Idempotent-Replayed") == "true"
    parts = body.get("chats") if isinstance(body, dict) else None
    parts = parts if isinstance(parts, list) else [body]  # POST /saves: every chat's
    counts = {} if replayed or status != 200 else \
        {k: sum(len(p[k]) for p in parts if isinstance(p.get(k), list)) for k in OUTCOMES
         if any(isinstance(p.get(k), list) for p in parts)}
    request.scope.setdefault("state", {})[OUTCOME_KEY] = {"messages": counts,
                                                         "replayed": replayed}


class ChatsaveApp(FastAPI):
    """FastAPI with the chatsave middleware wrapped *outside* Starlette's own stack, so the
    access log sees every answer and limits are refused before any framework code runs."""

    chatsave_wrap: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        inner = super().build_middleware_stack()
        return self.chatsave_wrap(inner) if self.chatsave_wrap else inner


def create_app(storage: Storage | str | os.PathLike[str], *,
               settings: ServerSettings | None = None,
               tokens: TokenStore | str | os.PathLike[str] | None = None,
               hooks: AppHooks | None = None, metrics: ServerMetrics | None = None,
               log_format: str = "text") -> ChatsaveApp:
    """The protocol v1 app over ``storage`` (a Storage, a SQLite path or a PostgreSQL URL).

    A storage given by location is opened now and closed at the app's shutdown; a Storage
    object stays the caller's. ``tokens`` (a tokens file or TokenStore) turns on bearer
    authentication; without it every request is the single user "local". ``hooks``: see
    ``AppHooks``. Each request is logged (``log_format`` "text" or "json") and, with
    ``metrics``, counted (chatsave.server.observe).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
    settings = settings or ServerSettings()
    owned = not isinstance(storage, Storage)
    store = open_storage(storage) if not isinstance(storage, Storage) else storage
    token_store = TokenStore(tokens) if tokens is not None and not isinstance(
        tokens, TokenStore) else tokens
    hooks = hooks or AppHooks()
    service = Service(hooks.storage(store) if hooks.storage else store, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if settings.housekeeping_interval_s > 0:
            task = asyncio.create_task(_housekeeping_loop(service))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if owned:
                store.close()

    app = ChatsaveApp(
        title="chatsave protocol", version=str(PROTOCOL_VERSION),
        summary="Reference backend of chatsave: idempotent, versioned chat persistence.",
        docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.storage = store
    app.state.settings = settings

    def wrap(inner: ASGIApp) -> ASGIApp:
        outer: Any = GuardMiddleware(inner, settings, token_store)
        observers: list[Callable[[RequestRecord], None]] = [
            log_json if log_format == "json" else log_text]
        if metrics is not None:
            observers.append(metrics)
        outer = AccessLogMiddleware(outer, observers, app.routes)
        for middleware in hooks.middleware:
            outer = middleware(outer)
        return outer

    app.chatsave_wrap = wrap
    _install_errors(app)
    _install_routes(app, service)
    _install_openapi(app)
    return app


async def _housekeeping_loop(service: Service) -> None:
    interval = service.settings.housekeeping_interval_s
    while True:
        try:
            await anyio.to_thread.run_sync(service.maybe_housekeep)
        except Exception:
            log.exception("housekeeping failed")
        await asyncio.sleep(min(interval, 300.0))


def _install_errors(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        return JSONResponse(envelope(code, message), status_code=exc.status_code,
                            headers=dict(exc.headers or {}))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")),
                    "type": str(e.get("type"))} for e in exc.errors()[:20]]
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        message = f"invalid request: {'.'.join(first['loc'])}: {first['msg']}"
        return JSONResponse(envelope("invalid_request", message, details), status_code=422)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(envelope("internal", "internal server error"), status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def _user(request: Request) -> str:
    user = request.scope.get("state", {}).get(USER_KEY)
    assert user, "GuardMiddleware sets the user"
    return str(user)


def _key(request: Request) -> str | None:
    return request.headers.get("idempotency-key")


class _ChatIdConvertor(PathConvertor):
    """The chat id segment of a route: anything up to the route's last part, line breaks
    included (Starlette's ``path`` stops at one), so a chat id holding a control character
    reaches the service and is answered 422 invalid_chat_id, not 404 by the router."""

    regex = "(?s:.*)"


register_url_convertor("chat", _ChatIdConvertor())


def _install_routes(app: FastAPI, service: Service) -> None:
    async def run(fn: Callable[..., Answer], *args: Any, **kwargs: Any) -> Response:
        return _reply(await anyio.to_thread.run_sync(partial(fn, *args, **kwargs)))

    async def write(request: Request, fn: Callable[..., Answer], *where: str) -> Response:
        answer = await anyio.to_thread.run_sync(
            partial(fn, _user(request), *where, await request.body(), _key(request)))
        _note_write(request, answer)
        return _reply(answer)

    @app.get(f"{API_PREFIX}/capabilities", response_model=Capabilities,
             responses=_responses(431, 503), tags=["protocol"])
    async def capabilities() -> Response:
        """What this backend is and its limits; no authentication needed."""
        return _reply(service.capabilities())

    @app.get(f"{API_PREFIX}/health", response_model=Health, responses=_responses(431, 503),
             tags=["protocol"])
    async def health() -> Response:
        """Liveness and storage reachability, for load balancers; no authentication."""
        return await run(service.health)

    @app.get(f"{API_PREFIX}/chats", response_model=ChatPage,
             responses=_responses(401, 422, 429, 431, 503), tags=["chats"])
    async def list_chats(request: Request, after: str | None = None,
                         limit: int | None = Query(None, ge=1)) -> Response:
        """A page of the caller's chats ordered by chat_id; pass ``next`` as ``after``."""
        return await run(service.list_chats, _user(request), after, limit)

    @app.post(f"{API_PREFIX}/digests", response_model=DigestsAnswer,
              responses=_responses(400, 401, 413, 422, 429, 431, 503), tags=["chats"],
              openapi_extra=_body("DigestsRequest", key=None))
    async def digests(request: Request) -> Response:
        """Digests and versions of up to max_page chats (null for unknown ones)."""
        return await run(service.digests, _user(request), await request.body())

    @app.get(API_PREFIX + "/chats/{chat_id:chat}/messages", response_model=MessagePage,
             responses=_responses(401, 404, 422, 429, 431, 503), tags=["messages"])
    async def messages(request: Request, chat_id: str,
                       after: int | None = Query(None, ge=0),
                       limit: int | None = Query(None, ge=1),
                       include_deleted: bool = False,
                       buckets: str | None = Query(
                           None, description="comma-separated buckets (two hex digits each):"
                           " only the live messages whose content_hash begins with one of"
                           " them, and every tombstone with include_deleted")) -> Response:
        """A page of a chat's messages in server order (seq); tombstones when asked."""
        return await run(service.messages, _user(request), chat_id, after, limit,
                         include_deleted, buckets)

    @app.get(API_PREFIX + "/chats/{chat_id:chat}/buckets", response_model=BucketsAnswer,
             responses=_responses(401, 404, 422, 429, 431, 503), tags=["messages"])
    async def buckets(request: Request, chat_id: str) -> Response:
        """The digest of each bucket of a chat's live messages (docs/protocol.md, "Buckets")."""
        return await run(service.buckets, _user(request), chat_id)

    @app.post(API_PREFIX + "/chats/{chat_id:chat}/save", response_model=SaveAnswer,
              responses=_responses(400, 401, 409, 413, 422, 429, 431, 503),
              tags=["messages"], openapi_extra=_body("SaveRequest", key=True))
    async def save(request: Request, chat_id: str) -> Response:
        """Bulk upsert by message id; idempotent per Idempotency-Key; base_rev to overwrite."""
        return await write(request, service.save, chat_id)

    @app.post(f"{API_PREFIX}/saves", response_model=SavesAnswer,
              responses=_responses(400, 401, 409, 413, 422, 429, 431, 503),
              tags=["messages"], openapi_extra=_body("SavesRequest", key=True))
    async def saves(request: Request) -> Response:
        """The saves of several chats in one request and one transaction (feature
        ``saves``); each chat's answer as its own save would give it, in request order."""
        return await write(request, service.save_many)

    @app.post(API_PREFIX + "/chats/{chat_id:chat}/delete", response_model=DeleteAnswer,
              responses=_responses(400, 401, 404, 409, 413, 422, 429, 431, 503),
              tags=["messages"], openapi_extra=_body("DeleteRequest", key=True))
    async def delete(request: Request, chat_id: str) -> Response:
        """Turn messages into tombstones; idempotent per Idempotency-Key."""
        return await write(request, service.delete, chat_id)

    @app.post("/api/chats/{chat_id:chat}/save", response_model=SaveAnswer,
              responses=_responses(400, 401, 409, 413, 422, 429, 431, 503),
              tags=["web clients"], openapi_extra=_body("AliasSaveRequest", key=False))
    async def alias_save(request: Request, chat_id: str) -> Response:
        """The path web clients were written against (no version prefix).

        Web message shapes are normalised like ``import``; without an Idempotency-Key the
        key is derived from the normalised messages, so a blind retry is a replay.
        """
        return await write(request, service.alias_save, chat_id)


def _install_openapi(app: FastAPI) -> None:
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = copy.deepcopy(base_openapi())
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in _DOC_MODELS:
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in doc.pop("$defs", {}).items():
                schemas[name] = sub
            schemas[doc.get("title", model.__name__)] = doc
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        public = {f"{API_PREFIX}/capabilities", f"{API_PREFIX}/health"}
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                if path not in public:
                    operation["security"] = [{"bearerAuth": []}]
                for param in operation.get("parameters", []):
                    if param.get("name") == "chat_id":
                        param["schema"] = dict(CHAT_ID_SCHEMA, title="Chat Id")
                for status, response in operation.get("responses", {}).items():
                    if status == "422":
                        response["description"] = _STATUS_TEXT[422]
                        response["content"] = {"application/json": {"schema": {
                            "$ref": "#/components/schemas/ErrorEnvelope"}}}
        schema["info"]["x-protocol-version"] = PROTOCOL_VERSION
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_snapshot(app: FastAPI | None = None) -> str:
    """The normalised OpenAPI schema text committed as tests/data/openapi-v1.json."""
    if app is None:
        import tempfile

        from chatsave.backend.storage.sqlite import SqliteStorage

        with tempfile.TemporaryDirectory() as tmp:
            storage = SqliteStorage(os.path.join(tmp, "schema.db"))
            try:
                schema = create_app(storage).openapi()
            finally:
                storage.close()
    else:
        schema = app.openapi()
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m chatsave.server.app > tests/data/openapi-v1.json
    import sys

    sys.stdout.write(openapi_snapshot())
