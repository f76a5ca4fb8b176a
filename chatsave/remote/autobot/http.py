"""The ``autobot+http(s)://host`` remote: an AutoBot backend through its own HTTP API.

Requests go through HttpRemote's machinery (retries with backoff, total deadlines, bounded
answers) under ``/api``. AutoBot's API is used as its facts allow:

- list: ``GET /api/chats`` (a bare array, ``{"chats": [...]}`` or the success envelope
  with a list or ``{"sessions": [...]}``; falls back to ``GET /api/chat/sessions``);
- read: ``GET /api/chat/sessions/{id}/export?format=json``, the one endpoint that returns
  *every* message (``GET /api/chat/sessions/{id}`` keeps only the last 100);
- save: ``POST /api/chats/{id}/save`` with ``{"data": {"messages": [...], "name": ...}}``,
  always the full list; its answer (200, ``data: null``, even when nothing was written)
  proves nothing, so the chat is read back (chatsave.remote.autobot.base);
- delete a chat: ``DELETE /api/chat/sessions/{id}`` (``DELETE /api/chats/{id}`` is broken);
- a chat whose id these routes cannot carry (``unroutable``) is refused alone, before any
  request for it (ChatRefusedError: the run goes on with the other chats, exit 9).

Stored messages go back exactly as stored; a message chatsave adds carries its time in
AutoBot's own form (``2026-03-01 10:00:00``, plus ``.fff`` when it has milliseconds; the
server's local time, ``--tz``/``CHATSAVE_TZ``), which sorts as text in time order beside
AutoBot's own.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, tzinfo
from typing import Any
from urllib.parse import quote, urlsplit

from chatsave import strictjson
from chatsave.errors import (
    BadAnswerError,
    ChatRefusedError,
    RefusedError,
    RemoteError,
    UnavailableError,
    UsageError,
)
from chatsave.model import check_chat_id
from chatsave.normalize import TimeContext, parse_time
from chatsave.protocol import DeleteAnswer, DigestsAnswer, MessagePage, SaveAnswer
from chatsave.remote.autobot import rules
from chatsave.remote.autobot.base import AutobotBase
from chatsave.remote.autobot.shapes import (
    CHAT_FILE_SUFFIX,
    FILE_NAME_MAX,
    UNVERIFIED,
    ChatState,
    Session,
    backend_uuid,
    file_name_possible,
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
# AutoBot's validate_chat_session_id, which its session routes (read, export, delete) apply
# and its save route does not: at most 255 characters, none of these, and a UUID (with or
# without a suffix) or letters, digits, '_' and '-' (re.match with '$', as AutoBot has it).
SESSION_ID_MAX = 255
SESSION_ID_TRAPS = ("..", "/", "\\", "\0")
_SESSION_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
_SESSION_ID_OTHER = re.compile(r"[^a-zA-Z0-9_-]")


class AutobotRemote(AutobotBase):
    """An AutoBot backend at ``autobot+http(s)://host[:port][/prefix]``."""

    server_name = "autobot"

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

    # ------------------------------------------------ chats AutoBot's routes cannot carry
    def refusal(self, chat_id: str) -> ChatRefusedError | None:
        """Why this chat cannot go through AutoBot's HTTP API at all (None: it can).

        Known from the id alone, before any request: the operations leave such a chat out
        of the run (its messages stay here, pending) and go on with the others.
        """
        return self._refused(chat_id, self.ids.original(chat_id))

    def _refused(self, chat_id: str, original: str) -> ChatRefusedError | None:
        why = unroutable(original)
        if why is None:
            return None
        shown = repr(original) if original == chat_id else f"{original!r} (here {chat_id!r})"
        hint = ("on the AutoBot server, --remote autobot-dir:PATH reads and writes the chat "
                "files themselves, without AutoBot's routes")
        if not file_name_possible(original):
            hint += (" (it can edit a file that already holds this chat; no file name can be "
                     "made from this id for a new one)")
        return ChatRefusedError(
            f"{self.url} chat {shown}: AutoBot's HTTP API cannot reach this chat: {why}",
            hint=hint, details={"chat_id": chat_id, "original": original})

    def _reachable(self, chat_id: str) -> None:
        refused = self.refusal(chat_id)
        if refused is not None:
            raise refused

    def _segment(self, original: str) -> str:
        """``original`` as one path segment; a chat the routes cannot carry is refused here
        at the latest, so that no request is ever made for it."""
        refused = self._refused(self.ids.local(original), original)
        if refused is not None:
            raise refused
        return quote(original, safe="")

    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        self._reachable(check_chat_id(chat_id))
        return super().save(chat_id, body, idempotency_key)

    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        self._reachable(check_chat_id(chat_id))
        return super().delete(chat_id, body, idempotency_key)

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        self._reachable(chat_id)
        return super().messages(chat_id, after, limit, include_deleted)

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        refused = {c for c in chat_ids if self.refusal(c) is not None}
        answer = super().digests([c for c in chat_ids if c not in refused])
        if refused:
            listed = {self.ids.local(s.original): s for s in self._listing()}
            for chat_id in refused:
                # Not read (it cannot be): "held, unverified", so that a comparison asks for
                # its messages and meets the refusal of this one chat, instead of taking it
                # for a chat the backend does not have.
                session = listed.get(chat_id)
                answer.digests[chat_id] = UNVERIFIED
                answer.versions[chat_id] = session.version if session is not None else 0
        return answer

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
            return strictjson.loads(answer.body)
        except ValueError as exc:
            raise BadAnswerError(f"{answer.where} answered {answer.status} with "
                                 f"{answer.shown}, not valid JSON ({exc}); expected AutoBot's "
                                 f"JSON ({what})") from None

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
        doc = self._get(f"/chat/sessions/{self._segment(original)}/export",
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

    def _predict(self, state: ChatState, payload: list[rules.Rec]) -> rules.Outcome:
        existing = rules.recs([i.raw for i in state.items])
        for rec in existing:
            rec.key = -1 - rec.key
        return rules.stored_then_loaded(existing, payload, self.max_messages)

    # ---------------------------------------------------------------- writing
    def _write(self, state: ChatState, payload: list[dict[str, Any]], name: str | None
               ) -> None:
        body = json.dumps({"data": {"messages": payload, "name": name or ""}},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        answer = self.http.request("POST", f"/chats/{self._segment(state.original)}/save",
                                   content=body)
        if not 200 <= answer.status < 300:
            raise self._fail(answer, "save request")
        self._touched(state.original)

    def _drop_chat(self, state: ChatState) -> None:
        answer = self.http.request("DELETE", f"/chat/sessions/{self._segment(state.original)}")
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
        doc = strictjson.loads(answer.body)
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
    """The session items of any of AutoBot's list shapes (a bare list, ``{"chats": [...]}``,
    the success envelope around a list or ``{"sessions": [...]}``)."""
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


def session_id_accepted(session_id: str) -> bool:
    """Whether AutoBot's validate_chat_session_id accepts ``session_id`` (to the letter)."""
    if not session_id or len(session_id) > SESSION_ID_MAX:
        return False
    if any(trap in session_id for trap in SESSION_ID_TRAPS):
        return False
    try:
        uuid.UUID(session_id)
        return True
    except ValueError:
        pass
    parts = session_id.split("-")
    if len(parts) >= 5:  # a UUID with a suffix ("<uuid>-imported-123")
        try:
            uuid.UUID("-".join(parts[:5]))
            return True
        except ValueError:
            pass
    return _SESSION_ID_RE.match(session_id) is not None


def unroutable(original: str) -> str | None:
    """Why AutoBot's HTTP API cannot serve the chat AutoBot knows as ``original`` (None: it
    can), for the reason's text.

    chatsave reaches a chat through three routes: the export (every read, and before and
    after every save), the save and the session delete. The id goes percent-encoded into
    one path segment, so '#', '?', '%', spaces and the like reach AutoBot intact. What
    cannot work:

    - an empty id, or one with '/': AutoBot's server decodes %2F before routing, so the id
      is no longer one path segment and the request matches no route (404);
    - an id AutoBot's validate_chat_session_id refuses: the export and the delete apply
      it (the save does not), and a refused id is an unhandled error there (500);
    - an id whose file ``{id}_chat.json`` would have a name longer than 255 bytes: AutoBot
      cannot store the chat.
    """
    if not original:
        return "its id is empty, and no route of AutoBot's takes an empty path segment (404)"
    if "/" in original:
        return ("its id contains '/', and AutoBot's server decodes %2F before routing: the id "
                "no longer fits in one path segment and the request matches no route (404)")
    if not session_id_accepted(original):
        if len(original) > SESSION_ID_MAX:
            why = f"its id is longer than {SESSION_ID_MAX} characters"
        elif any(trap in original for trap in SESSION_ID_TRAPS):
            traps = [t for t in SESSION_ID_TRAPS if t in original]
            shown = ", ".join(repr(t) for t in traps)
            why = f"its id contains {shown}, which AutoBot takes for a path traversal"
        else:
            bad = sorted(set(_SESSION_ID_OTHER.findall(original)))
            shown = "".join(bad[:8]).encode("unicode_escape").decode("ascii")
            why = ("its id is not a UUID and has characters other than letters, digits, '_' "
                   f"and '-' ({shown!r})")
        return (f"{why}; AutoBot's session routes (the export chatsave reads every chat "
                "through, also before and after a save, and the delete) refuse such an id "
                "with an error (500)")
    if not file_name_possible(original):
        size = len((original + CHAT_FILE_SUFFIX).encode("utf-8", "surrogatepass"))
        return (f"AutoBot keeps a chat in the file <id>{CHAT_FILE_SUFFIX}, whose name would be "
                f"{size} bytes long, more than the {FILE_NAME_MAX} a file name can have: "
                "AutoBot cannot store it")
    return None
