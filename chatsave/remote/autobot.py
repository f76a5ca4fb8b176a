"""The ``autobot+http(s)://host`` remote: an AutoBot backend through its own HTTP API.

Requests go through HttpRemote's machinery (retries with backoff, total deadlines, bounded
answers) under ``/api``. AutoBot's API (AUTOBOT.md 2) is used as its facts allow:

- list: ``GET /api/chats`` (a bare array, ``{"chats": [...]}`` or the success envelope
  with a list or ``{"sessions": [...]}``; falls back to ``GET /api/chat/sessions``);
- read: ``GET /api/chat/sessions/{id}/export?format=json``, the one endpoint that returns
  *every* message (``GET /api/chat/sessions/{id}`` keeps only the last 100);
- save: ``POST /api/chats/{id}/save`` with ``{"data": {"messages": [...], "name": ...}}``,
  always the full list; its answer (200, ``data: null``, even when nothing was written)
  proves nothing, so the chat is read back (autobot_base);
- delete a chat: ``DELETE /api/chat/sessions/{id}`` (``DELETE /api/chats/{id}`` is broken).

Timestamps are written in the backend's own form (``2026-03-01 10:00:00``, server local
time, ``--tz``/``CHATSAVE_TZ``), which AutoBot's merge and loader both parse. A stored
message AutoBot's merge could not recognise after a rewrite (no id, and a sender other than
user or assistant) is sent back exactly as stored.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, tzinfo
from typing import Any
from urllib.parse import quote, urlsplit

from chatsave.errors import BadAnswerError, RefusedError, RemoteError, UnavailableError, UsageError
from chatsave.normalize import TimeContext, parse_time
from chatsave.remote.autobot_base import (
    FORM_BACKEND,
    AutobotBase,
    ChatState,
    Item,
    Session,
    backend_uuid,
    read_items,
)
from chatsave.remote.http import Answer, HttpRemote
from chatsave.remote.retry import RateLimiter, RetryPolicy

SCHEMES = ("autobot+http", "autobot+https")
# A listed chat that AutoBot answers empty is a failed load when its list counts messages,
# or (encrypted files cannot be counted) when its file is larger than an empty chat's.
EMPTY_FILE_BYTES = 1024
# How old the cached chat list may be when an empty chat is checked against it.
LIST_FRESH_S = 5.0


class AutobotRemote(AutobotBase):
    """An AutoBot backend at ``autobot+http(s)://host[:port][/prefix]``."""

    server_name = "autobot"
    time_form = FORM_BACKEND

    def __init__(self, url: str, *, token: str | None = None, tz: tzinfo | None = None,
                 transport: Any = None, policy: RetryPolicy | None = None,
                 request_timeout: float = 60.0, connect_timeout: float = 10.0,
                 read_timeout: float = 20.0, allow_insecure: bool = False,
                 limiter: RateLimiter | None = None, on_retry: Any = None,
                 max_connections: int = 8) -> None:
        super().__init__()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES or not parts.hostname:
            raise UsageError(f"not an AutoBot URL: {url!r}",
                             hint="write it as autobot+http://host:8001 or autobot+https://host")
        if parts.query or parts.fragment or parts.username is not None:
            raise UsageError("the AutoBot URL carries user info, a query or a fragment",
                             hint="give the base URL only; the token with --token-file or "
                             "CHATSAVE_TOKEN, the server's time zone with CHATSAVE_TZ")
        path = parts.path.rstrip("/")
        self.url = f"{scheme}://{parts.netloc}{path}"
        self.http = HttpRemote(f"{scheme.removeprefix('autobot+')}://{parts.netloc}{path}",
                               token=token, transport=transport, policy=policy,
                               request_timeout=request_timeout,
                               connect_timeout=connect_timeout, read_timeout=read_timeout,
                               allow_insecure=allow_insecure, limiter=limiter,
                               on_retry=on_retry, max_connections=max_connections)
        self.http.base = self.http.url + "/api"
        self.tz = tz or UTC
        self.backend_id = backend_uuid(f"{scheme}://{(parts.hostname or '').lower()}:"
                                       f"{parts.port or ''}{path}")
        self._sessions: list[Session] | None = None
        self._listed_at = 0.0
        self._sessions_lock = threading.Lock()
        self._list_path = "/chats"

    @property
    def retries(self) -> int:
        return self.http.retries

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"AutobotRemote({self.url!r})"

    # ------------------------------------------------------------------ HTTP
    def _fail(self, answer: Answer, what: str) -> RemoteError:
        detail = _shown(answer)
        status = answer.status
        if status in (401, 403):
            return RefusedError(f"{answer.where}: AutoBot refused the credentials ({status} "
                                f"{detail})", hint="AutoBot wants a login: give its JWT with "
                                "--token-file FILE or CHATSAVE_TOKEN")
        if status == 404:
            return RefusedError(f"{answer.where} answered 404 ({detail}): no AutoBot API here",
                                hint="is --remote the base URL of an AutoBot backend "
                                "(autobot+http://host:8001)?")
        if 300 <= status < 400:
            return RefusedError(f"{answer.where} answered a redirect ({status}); chatsave "
                                "does not follow redirects", hint="point --remote at the "
                                "final URL")
        if 400 <= status < 500:
            return RefusedError(f"{answer.where} refused the {what} ({status} {detail})")
        return UnavailableError(f"{answer.where} failed ({status} {detail})",
                                hint="rerun later (progress is saved)")

    def _json(self, answer: Answer, what: str) -> Any:
        if not 200 <= answer.status < 300:
            raise self._fail(answer, what)
        try:
            return json.loads(answer.body)
        except ValueError:
            raise BadAnswerError(f"{answer.where} answered {answer.status} with "
                                 f"{answer.shown}; expected AutoBot's JSON ({what})") from None

    def _get(self, path: str, what: str, params: dict[str, Any] | None = None) -> Any:
        return self._json(self.http.request("GET", path, params=params), what)

    # ---------------------------------------------------------------- listing
    def _probe(self) -> None:
        self._listing(fresh=True)

    def _listing(self, fresh: bool = False) -> list[Session]:
        with self._sessions_lock:
            if self._sessions is not None and not fresh:
                return self._sessions
            answer = self.http.request("GET", self._list_path)
            if answer.status == 404 and self._list_path == "/chats":
                # Older or trimmed deployments: the session list the web client also reads.
                self._list_path = "/chat/sessions"
                answer = self.http.request("GET", self._list_path)
            doc = self._json(answer, "chat list")
            self._listed_at = time.monotonic()
            self._sessions = [self._session(item) for item in _list_items(doc, answer.where)]
            self._sessions = [s for s in self._sessions if s.original]
            return self._sessions

    def _session(self, item: dict[str, Any]) -> Session:
        raw_id = item.get("id") or item.get("chatId") or item.get("session_id")
        original = str(raw_id) if isinstance(raw_id, str | int) and \
            not isinstance(raw_id, bool) else ""
        count = item.get("messageCount")
        if not isinstance(count, int) or isinstance(count, bool):
            messages = item.get("messages")
            count = len(messages) if isinstance(messages, list) else 0
        name = item.get("name") or item.get("title")
        updated = item.get("lastModified") or item.get("updatedAt") or \
            item.get("last_modified")
        created = item.get("createdAt") or item.get("createdTime") or item.get("created_time")
        size = item.get("fileSize")
        return Session(original=original, name=name if isinstance(name, str) else None,
                       count=count, version=self._version(updated),
                       size=size if isinstance(size, int) else None,
                       created=created if isinstance(created, str) else None,
                       updated=updated if isinstance(updated, str) else None, raw=item)

    def _version(self, value: Any) -> int:
        if value is None:
            return 0
        try:
            when, _ = parse_time(value, TimeContext(tz=self.tz))
        except ValueError:
            return 0
        return max(0, int(when.timestamp() * 1000))

    def _session_for(self, original: str, fresh: bool = False) -> Session | None:
        return next((s for s in self._listing(fresh) if s.original == original), None)

    # ---------------------------------------------------------------- reading
    def _export(self, original: str) -> list[Any]:
        doc = self._get(f"/chat/sessions/{quote(original, safe='')}/export",
                        "chat export", params={"format": "json"})
        if isinstance(doc, dict):  # tolerate an envelope around the array
            inner = doc.get("data", doc)
            doc = inner.get("messages") if isinstance(inner, dict) else inner
        if not isinstance(doc, list):
            raise BadAnswerError(f"{self.url}: the export of chat {original!r} is not a "
                                 "JSON array of messages")
        return doc

    def _read(self, chat_id: str, original: str) -> ChatState:
        raws = self._export(original)
        session = self._session_for(original)
        if not raws and ((session is not None and session.count > 0) or
                         time.monotonic() - self._listed_at > LIST_FRESH_S):
            # An empty answer: ask the list again before calling it a failed load (or a
            # chat that is not there).
            session = self._session_for(original, fresh=True)
        failed = None
        if not raws and session is not None:
            if session.count > 0:
                failed = (f"AutoBot answered the chat empty although its list says it holds "
                          f"{session.count} message(s): it could not load it (its loader "
                          "fails on a chat that mixes naive and aware times)")
            elif (session.size or 0) > EMPTY_FILE_BYTES:
                failed = (f"AutoBot answered the chat empty, its list cannot count the "
                          f"messages (an encrypted file?) and the file holds {session.size} "
                          "bytes: it could not load it")
        items = read_items(chat_id, raws, self.tz)
        return ChatState(chat_id=chat_id, original=original,
                         exists=session is not None or bool(raws), items=items,
                         visible=list(items), version=session.version if session else 0,
                         name=session.name if session else None, failed=failed)

    def _may_rewrite(self, item: Item) -> bool:
        # AutoBot's merge replaces a stored message by ours when the ids match, or (without
        # an id) when the signature matches: user and assistant signatures ignore time and
        # id; any other sender's uses the timestamp, so those go back exactly as stored.
        if item.msg is None:
            return False
        if item.raw.get("sender") in ("user", "assistant"):
            return True
        rid = item.raw.get("id")
        return isinstance(rid, str | int) and not isinstance(rid, bool) and \
            str(rid) == item.msg.id

    def _predict(self, state: ChatState, payload: Any) -> Any:
        from chatsave.remote import autobot_rules as rules

        existing = rules.recs([i.raw for i in state.items])
        for rec in existing:
            rec.key = -1 - rec.key
        return rules.stored_then_loaded(existing, payload, self.max_messages)

    # ---------------------------------------------------------------- writing
    def _write(self, state: ChatState, payload: list[dict[str, Any]], name: str | None
               ) -> None:
        body = json.dumps({"data": {"messages": payload, "name": name or ""}},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        answer = self.http.request("POST", f"/chats/{quote(state.original, safe='')}/save",
                                   content=body)
        if not 200 <= answer.status < 300:
            raise self._fail(answer, "save request")
        self._touched(state.original)

    def _drop_chat(self, state: ChatState) -> None:
        answer = self.http.request("DELETE", f"/chat/sessions/{quote(state.original, safe='')}")
        if not 200 <= answer.status < 300:
            raise self._fail(answer, "chat delete request")
        self._listing(fresh=True)

    def _touched(self, original: str) -> None:
        """After a write: the chat's version grows (AutoBot's list would show the new mtime)."""
        with self._sessions_lock:
            for session in self._sessions or []:
                if session.original == original:
                    session.version = max(session.version + 1, int(time.time() * 1000))
                    return
            if self._sessions is not None:
                self._sessions.append(Session(original=original,
                                              version=int(time.time() * 1000)))


def _shown(answer: Answer) -> str:
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return answer.shown
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            return f"{err.get('code')}: {err.get('message')}"
        if "detail" in doc:
            return str(doc["detail"])[:200]
    return answer.shown


def _list_items(doc: Any, where: str) -> list[dict[str, Any]]:
    """The session items of any of AutoBot's list shapes (AUTOBOT.md 2, 3b, 7)."""
    items: Any = None
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict):
        if doc.get("success") is False:
            err = doc.get("error")
            message = err.get("message") if isinstance(err, dict) else err
            raise UnavailableError(f"{where}: AutoBot answered an error ({message})")
        data = doc.get("data", doc)
        if isinstance(data, list):
            items = data
        elif isinstance(data, dict):
            items = data.get("sessions", data.get("chats"))
    if not isinstance(items, list):
        raise BadAnswerError(f"{where}: not an AutoBot chat list (expected a list, "
                             "{\"chats\": [...]} or the success envelope)",
                             hint="is --remote the base URL of an AutoBot backend?")
    return [item for item in items if isinstance(item, dict)]
