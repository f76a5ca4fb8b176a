"""A fake AutoBot backend (FastAPI) reproducing docs/autobot.md, over a chats directory.

The facts were read from AutoBot's source (github.com/mrveiss/AutoBot-AI) at commit
``4ccc9286`` (main, 2026-03). Written from the facts, independently of chatsave's own model
of AutoBot (chatsave/remote/autobot/rules.py), so that the tests check chatsave against the
facts:

- files ``{id}_chat.json``, written atomically (``.tmp_chat_*.json``, rename) with mode
  0600; the legacy ``chat_{id}.json`` is read only while ``{id}_chat.json`` does not exist,
  and a save migrates the chat to the new name *without* deleting the legacy file (only a
  session delete removes both), so stale legacy files stay behind;
- the Redis session cache, on by default (``redis_cache``): a load returns the cached
  session (raw, without the dedupe) when there is one, else reads the file, dedupes and
  caches it; a save writes the file and the cache. A file edited behind AutoBot's back is
  therefore overwritten by the cached copy at AutoBot's next ``add_message``
  (``flush_cache()`` is ``redis-cli DEL chat:session:*``);
- times as AutoBot writes them: naive ``%Y-%m-%d %H:%M:%S`` in the server's zone, and the
  sort on the timestamp *text* (a space sorts before ``T``);
- the dedupe every load runs (user messages with equal first 200 characters collapse to
  the first; adjacent ``llm_response``/``llm_response_chunk``/``response`` within 120 s
  collapse to the longest; the cleaned list is written back), and a naive/aware pair that
  makes it raise: the load then returns ``[]``;
- ``POST /api/chats/{id}/save``: always 200 with ``data: null``; merge semantics (existing
  dropped by id, signature or a longer streaming message of the same sender; adjacent
  streaming runs within 120 s collapse; lexicographic sort on the timestamp string; when
  the merge raises, only the new messages are saved); ``fail_writes`` answers the same 200
  and writes nothing;
- ``GET /api/chats`` (three list shapes), ``GET /api/chat/sessions``,
  ``GET /api/chat/sessions/{id}`` (the last ``per_page`` <= 100, ``page`` ignored, 200 with
  ``[]`` for an unknown id), ``.../export`` (every message), ``DELETE /api/chats/{id}``
  (500, nothing deleted), ``DELETE /api/chat/sessions/{id}`` (works; 500 for a missing
  id), ``PUT /api/chat/sessions/{id}`` (500), ``POST /api/chat/sessions`` (201, a new
  uuid and an empty "New Chat"), ``POST /api/chats/{id}/message`` (SSE; stores a user
  message and a reply in the backend's own shape), ``POST /api/chat/reset``;
- auth: with a token set, every route but export answers 401 ``{"detail"}`` without
  ``Authorization: Bearer TOKEN``;
- routing: paths are matched after percent-decoding, so an id with ``/`` (sent as ``%2F``)
  matches no route (404); the ``/api/chat/sessions/{id}`` routes (read, export, delete,
  update) check the id with AutoBot's ``validate_chat_session_id`` and answer a bare 500
  for one it refuses (its ValidationError is unhandled); ``/api/chats/{id}/save`` does not.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

MERGE_STREAMING = {"llm_response", "llm_response_chunk", "response", "terminal_command",
                   "terminal_output", "command_approval_request", "terminal_interpretation"}
LOAD_STREAMING = {"llm_response", "llm_response_chunk", "response"}
SESSION_ROUTE = re.compile(r"/api/chat/sessions/([^/]+)(?:/export)?")


def session_id_valid(session_id: str) -> bool:
    """AutoBot's validate_chat_session_id (utils/chat_utils.py)."""
    if not session_id or len(session_id) > 255:
        return False
    if any(p in session_id for p in ("..", "/", "\\", "\0")):
        return False
    candidates = [session_id]
    if len(session_id.split("-")) >= 5:  # a UUID with a suffix
        candidates.append("-".join(session_id.split("-")[:5]))
    for candidate in candidates:
        try:
            uuid.UUID(candidate)
            return True
        except ValueError:
            pass
    return re.match(r"^[a-zA-Z0-9_-]+$", session_id) is not None


def _ts(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        if "T" in value:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def _text(msg: dict[str, Any]) -> Any:
    return msg.get("text", "") or msg.get("content", "")


def _type(msg: dict[str, Any]) -> Any:
    return msg.get("messageType", msg.get("type", "default"))


def _longest_per_run(messages: list[dict[str, Any]], types: set[str]) -> list[dict[str, Any]]:
    """Adjacent messages of ``types`` within 120 s of the previous one keep only the longest."""
    plain: list[dict[str, Any]] = []
    runs: list[list[dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    previous: datetime | None = None
    for msg in messages:
        if _type(msg) not in types:
            if run:
                runs.append(run)
            run, previous = [], None
            plain.append(msg)
            continue
        when = _ts(msg.get("timestamp", ""))
        if when is not None and previous is not None and \
                abs((when - previous).total_seconds()) > 120:  # naive - aware raises here
            runs.append(run)
            run = []
        if when is not None:
            previous = when
        run.append(msg)
    if run:
        runs.append(run)
    return plain + [max(r, key=lambda m: len(_text(m))) for r in runs]


def dedupe_on_load(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[Any] = set()
    kept = []
    for msg in messages:
        if msg.get("sender", "") == "user":
            key = _text(msg)[:200]
            if key in seen:
                continue
            seen.add(key)
        kept.append(msg)
    out = _longest_per_run(kept, LOAD_STREAMING)
    out.sort(key=lambda m: m.get("timestamp", ""))
    return out


def _signature(msg: dict[str, Any]) -> tuple[Any, ...]:
    sender = msg.get("sender", "")
    text = _text(msg)
    if sender == "user":
        return ("user", text[:200])
    if sender == "assistant":
        return ("assistant", _type(msg), text.strip()[:300])
    mid = msg.get("id") or msg.get("messageId")
    if mid:
        return ("id", mid)
    return (msg.get("timestamp", ""), sender, text[:100])


def merge_messages(existing: list[dict[str, Any]], new: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    new_ids = {m.get("id") or m.get("messageId") for m in new} - {None, ""}
    new_sigs = {_signature(m) for m in new}
    everything = existing + new
    preserved = []
    for msg in existing:
        mid = msg.get("id") or msg.get("messageId")
        if mid and mid in new_ids:
            continue
        if _signature(msg) in new_sigs:
            continue
        if _type(msg) in MERGE_STREAMING and any(
                other is not msg and other.get("sender", "") == msg.get("sender", "")
                and _type(other) in MERGE_STREAMING and len(_text(other)) > len(_text(msg))
                for other in everything):
            continue
        preserved.append(msg)
    merged = _longest_per_run(preserved + new, MERGE_STREAMING)
    merged.sort(key=lambda m: m.get("timestamp", ""))
    return merged


class FakeAutobot:
    """The fake backend's state and app. Tests reach into ``dir`` and the helpers."""

    def __init__(self, root: Path, *, token: str | None = None, list_shape: str = "envelope",
                 tz: tzinfo = UTC, max_messages: int = 10_000,
                 redis_cache: bool = True) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.list_shape = list_shape  # envelope | bare | chats
        self.tz = tz
        self.max_messages = max_messages
        self.redis_cache = redis_cache
        self.cache: dict[str, dict[str, Any]] = {}  # chat:session:{id}
        self.fail_writes = False
        self.faults: list[tuple[str, str, int]] = []  # (method, path fragment, status)
        self.log: list[tuple[str, str]] = []
        self.clock: Callable[[], datetime] = lambda: datetime.now(self.tz)
        self.url = ""  # set once served: http://127.0.0.1:PORT
        self._lock = threading.RLock()
        self.app = self._build()

    @property
    def remote(self) -> str:
        """The chatsave remote spec for this server."""
        return f"autobot+{self.url}"

    def serve(self, start_server: Callable[[Any], Any]) -> FakeAutobot:
        """Serve with the ``start_server`` fixture (uvicorn on 127.0.0.1, in a thread)."""
        self.url = start_server(self.app).url
        return self

    # ------------------------------------------------------------- storage
    def new_path(self, chat_id: str) -> Path:
        return self.dir / f"{chat_id}_chat.json"

    def legacy_path(self, chat_id: str) -> Path:
        return self.dir / f"chat_{chat_id}.json"

    def naive_now(self) -> str:
        return self.clock().astimezone(self.tz).strftime("%Y-%m-%d %H:%M:%S")

    def read_doc(self, chat_id: str) -> Any:
        for path in (self.new_path(chat_id), self.legacy_path(chat_id)):
            if path.exists():
                return json.loads(path.read_text(encoding="utf-8"))
        return None

    def put(self, chat_id: str, messages: list[dict[str, Any]], name: str = "Chat",
            *, legacy: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write a chat file as the backend would (tests set up state with this)."""
        doc = {"chatId": chat_id, "name": name, "messages": messages,
               "last_modified": self.naive_now(), "created_time": self.naive_now(),
               **(extra or {})}
        path = self.legacy_path(chat_id) if legacy else self.new_path(chat_id)
        self._atomic(path, doc)
        return path

    def stored(self, chat_id: str) -> list[dict[str, Any]]:
        """The messages in the file, as stored (no dedupe)."""
        doc = self.read_doc(chat_id)
        return list(doc["messages"]) if isinstance(doc, dict) else []

    def _atomic(self, path: Path, doc: Any) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp_chat_", suffix=".json", dir=self.dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, ensure_ascii=False, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def save_session(self, chat_id: str, messages: list[dict[str, Any]],
                     name: str | None = None) -> None:
        doc = self.read_doc(chat_id)
        old = doc if isinstance(doc, dict) else {}
        messages = messages[-self.max_messages:]
        out = {"chatId": chat_id, "name": name or old.get("name") or f"Chat {chat_id[:8]}",
               "messages": messages, "last_modified": self.naive_now(),
               "created_time": old.get("created_time") or self.naive_now()}
        self._atomic(self.new_path(chat_id), out)
        if self.redis_cache:
            self.cache[chat_id] = json.loads(json.dumps(out))
        # The legacy chat_{id}.json stays: AutoBot never reads it again, never deletes it.

    def flush_cache(self) -> None:
        self.cache.clear()

    def load_session(self, chat_id: str) -> list[dict[str, Any]]:
        cached = self.cache.get(chat_id) if self.redis_cache else None
        if cached is not None:
            return list(cached["messages"])  # a cache hit: raw, no dedupe
        doc = self.read_doc(chat_id)
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
            return []
        messages = doc["messages"]
        try:
            cleaned = dedupe_on_load(messages)
        except Exception:
            return []  # the error is logged and an empty chat is returned
        if cleaned != messages:
            self.save_session(chat_id, cleaned, doc.get("name"))
        elif self.redis_cache:
            self.cache[chat_id] = json.loads(json.dumps(doc))
        return cleaned

    def add_message(self, chat_id: str, message: dict[str, Any]) -> None:
        messages = self.load_session(chat_id)
        messages.append(message)
        self.save_session(chat_id, messages)

    def chat_ids(self) -> list[str]:
        found = []
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if name.startswith(".tmp_chat_") or not name.endswith(".json"):
                continue
            if name.endswith("_chat.json"):
                found.append(name[:-len("_chat.json")])
            elif name.startswith("chat_"):
                found.append(name[len("chat_"):-len(".json")])
        return found

    def _entry(self, chat_id: str) -> dict[str, Any]:
        path = self.new_path(chat_id)
        if not path.exists():
            path = self.legacy_path(chat_id)
        info = path.stat()
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            doc = None
        fallback = f"Chat {chat_id[-8:]}" if chat_id.startswith("chat-") else \
            f"Chat {chat_id[:8]}"
        name = doc.get("name") if isinstance(doc, dict) and doc.get("name") else fallback
        count = len(doc["messages"]) if isinstance(doc, dict) and \
            isinstance(doc.get("messages"), list) else 0

        def local(ts: float) -> str:
            return datetime.fromtimestamp(ts, self.tz).replace(tzinfo=None).isoformat()

        return {"id": chat_id, "chatId": chat_id, "title": name, "name": name, "messages": [],
                "messageCount": count, "createdAt": local(info.st_ctime),
                "createdTime": local(info.st_ctime), "updatedAt": local(info.st_mtime),
                "lastModified": local(info.st_mtime), "isActive": False,
                "fileSize": info.st_size, "fast_mode": True}

    def entries(self) -> list[dict[str, Any]]:
        items = [self._entry(c) for c in self.chat_ids()]
        return sorted(items, key=lambda e: e["lastModified"], reverse=True)

    # ----------------------------------------------------------------- app
    def _envelope(self, data: Any, message: str, status: int = 200) -> JSONResponse:
        return JSONResponse({"success": True, "data": data, "message": message,
                             "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
                             "request_id": str(uuid.uuid4())}, status_code=status)

    def _build(self) -> FastAPI:
        app = FastAPI()
        fake = self

        @app.middleware("http")
        async def gate(request: Request, call_next: Any) -> Response:
            path = request.url.path
            fake.log.append((request.method, path))
            for n, (method, fragment, status) in enumerate(fake.faults):
                if method == request.method and fragment in path:
                    del fake.faults[n]
                    return PlainTextResponse("Internal Server Error", status_code=status)
            if fake.token is not None and not path.endswith("/export") and \
                    request.headers.get("authorization") != f"Bearer {fake.token}":
                return JSONResponse({"detail": "Not authenticated"}, status_code=401)
            session = SESSION_ROUTE.fullmatch(path)
            if session and not session_id_valid(session[1]):
                return PlainTextResponse("Internal Server Error", status_code=500)
            response: Response = await call_next(request)
            return response

        def boom() -> PlainTextResponse:
            return PlainTextResponse("Internal Server Error", status_code=500)

        @app.get("/api/chats")
        @app.get("/api/chat/chats")
        def list_chats() -> Any:
            with fake._lock:
                items = fake.entries()
            if fake.list_shape == "bare":
                return JSONResponse(items)
            if fake.list_shape == "chats":
                return JSONResponse({"chats": [{"chatId": i["chatId"], "name": i["name"],
                                                "messageCount": i["messageCount"],
                                                "createdTime": i["createdTime"],
                                                "lastModified": i["lastModified"]}
                                               for i in items]})
            return fake._envelope(items, "Chat sessions retrieved successfully")

        @app.get("/api/chat/sessions")
        def list_sessions() -> Any:
            with fake._lock:
                items = fake.entries()
            return fake._envelope({"sessions": items, "count": len(items)},
                                  "Sessions retrieved successfully")

        @app.post("/api/chat/sessions")
        async def create_session(request: Request) -> Any:
            try:
                body = await request.json()
            except ValueError:
                body = {}
            title = body.get("title") if isinstance(body, dict) else None
            chat_id = str(uuid.uuid4())
            now = fake.naive_now()
            with fake._lock:
                fake.save_session(chat_id, [], title or "New Chat")
            return fake._envelope({"id": chat_id, "chatId": chat_id, "title": title or
                                   "New Chat", "name": title or "New Chat", "messages": [],
                                   "createdAt": now, "createdTime": now, "updatedAt": now,
                                   "lastModified": now, "isActive": True, "metadata": {}},
                                  "Session created", status=201)

        @app.get("/api/chat/sessions/{chat_id}/export")
        def export(chat_id: str, format: str = "json") -> Any:
            with fake._lock:
                messages = fake.load_session(chat_id)
            if format == "json":
                return JSONResponse(messages)
            if format == "txt":
                lines = [f"[{m.get('timestamp')}] {m.get('sender')}: {_text(m)}"
                         for m in messages]
                return PlainTextResponse("\n".join(lines))
            return boom()

        @app.get("/api/chat/sessions/{chat_id}")
        def session_messages(chat_id: str, page: int = 1, per_page: int = 50) -> Any:
            if not 1 <= per_page <= 100:
                return JSONResponse({"detail": "per_page must be 1..100"}, status_code=422)
            with fake._lock:
                messages = fake.load_session(chat_id)
            return fake._envelope({"messages": messages[-per_page:], "session_id": chat_id,
                                   "total_count": len(messages), "page": page,
                                   "per_page": per_page},
                                  "Session messages retrieved successfully")

        @app.put("/api/chat/sessions/{chat_id}")
        def update_session(chat_id: str) -> Any:
            return boom()  # update_session(session_id=, title=, metadata=): wrong signature

        @app.delete("/api/chat/sessions/{chat_id}")
        def delete_session(chat_id: str) -> Any:
            with fake._lock:
                paths = [p for p in (fake.new_path(chat_id), fake.legacy_path(chat_id))
                         if p.exists()]
                if not paths:
                    return boom()
                for path in paths:
                    path.unlink()
                fake.cache.pop(chat_id, None)
            return fake._envelope({"session_id": chat_id, "deleted": True,
                                   "file_handling": None, "terminal_cleanup": None,
                                   "kb_cleanup": None, "transcript_cleanup": None},
                                  "Session deleted")

        @app.delete("/api/chats/{chat_id}")
        def delete_chat(chat_id: str) -> Any:
            return boom()  # delete_session() is async and not awaited

        @app.post("/api/chats/{chat_id}/save")
        async def save_chat(chat_id: str, request: Request) -> Any:
            body = await request.json()
            data = body.get("data") if isinstance(body, dict) else None
            data = data if isinstance(data, dict) else {}
            new = data.get("messages") or []
            name = data.get("name") or None
            with fake._lock:
                if not fake.fail_writes:
                    existing = fake.load_session(chat_id)
                    try:
                        merged = merge_messages(existing, new)
                    except Exception:
                        merged = list(new)  # logged; only the new messages are saved
                    fake.save_session(chat_id, merged, name)
            return JSONResponse({"success": True, "data": None,
                                 "message": "Chat saved successfully",
                                 "request_id": str(uuid.uuid4())})

        @app.post("/api/chats/{chat_id}/message")
        async def send_message(chat_id: str, request: Request) -> Any:
            body = await request.json()
            text = str(body.get("message", ""))
            with fake._lock:
                now = fake.naive_now()
                fake.add_message(chat_id, {"id": str(uuid.uuid4()), "sender": "user",
                                           "text": text, "messageType": "default",
                                           "metadata": None, "timestamp": now})
                fake.add_message(chat_id, {"id": str(uuid.uuid4()), "sender": "assistant",
                                           "text": f"You said: {text}",
                                           "messageType": "llm_response", "metadata": None,
                                           "timestamp": now})

            def events() -> Any:
                yield f"data: {json.dumps({'type': 'start', 'session_id': chat_id})}\n\n"
                yield f"data: {json.dumps({'type': 'end'})}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/api/chat/reset")
        async def reset(request: Request) -> Any:
            body = await request.json()
            if isinstance(body, dict) and body.get("session_id"):
                return boom()  # clear_session does not exist
            return fake._envelope({"session_id": str(uuid.uuid4())}, "reset")

        return app
