"""HttpRemote: protocol v1 over httpx, with retries, total deadlines and validated answers.

Every request has a total deadline (httpx's timeouts are per read: a reply trickled one
byte at a time would otherwise never end), a bounded answer size, and is retried with
full-jitter backoff when the failure is transient. Every answer is read with
``chatsave.strictjson`` (one meaning per document: no member named twice) and parsed with the
protocol's pydantic models before anything is trusted; what is not chatsave JSON is
reported with the URL, what was expected and what came back.

A final 4xx to a write in the backend's error envelope says what it thinks of that batch:
one it can never take (400, 410, 422, ...) is a RequestRejectedError, so the batch's
messages are recorded as rejected and the run goes on, never retried as if the backend
were down. A 4xx outside the envelope (a proxy's) refuses the run instead: the messages
stay pending.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from chatsave import __version__, strictjson
from chatsave.errors import (
    BadAnswerError,
    RefusedError,
    RemoteError,
    RequestRejectedError,
    TooLargeError,
    UnavailableError,
    UsageError,
)
from chatsave.netaddr import is_loopback
from chatsave.protocol import (
    API_PREFIX,
    PROTOCOL_VERSION,
    BucketsAnswer,
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DigestsAnswer,
    ErrorEnvelope,
    MessagePage,
    SaveAnswer,
    SavesAnswer,
)
from chatsave.remote.base import Remote, check_saves
from chatsave.remote.retry import (
    RETRYABLE_STATUS,
    RateLimiter,
    RetryPolicy,
    parse_retry_after,
    rejects_batch,
)

M = TypeVar("M", bound=BaseModel)
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64
OnRetry = Callable[[str, int, str, float], None]
#: a request id the server sent back that is safe to show (chatsave.server.observe)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: characters of a non-JSON answer's first line shown in messages
SHOWN_CHARS = 120
#: the code of a chatsave server's 409 for a key whose first request it still holds
KEY_IN_USE = "idempotency_key_in_use"


class _Deadline(Exception):
    pass




def _depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no value sits deeper than ``limit`` (the top value is at depth 1).

    Only containers with items are walked: a container at ``limit`` with any item is too
    deep, whatever the item is (profiled: walking every scalar of a save's answer was half
    of the client's time decoding it)."""
    if not isinstance(value, dict | list):
        return True
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth >= limit and children:
            return False
        for v in children:
            if v and isinstance(v, (dict, list)):  # a tuple: no UnionType built per call
                stack.append((v, depth + 1))
    return True


def _shown(body: bytes, content_type: str) -> str:
    """What a body that is not the expected JSON holds, for a message: its content type
    and first line, at most SHOWN_CHARS characters, quoted (control characters escaped)."""
    if not body.strip():
        return "an empty body"
    text = body.strip()
    head = text[:4 * SHOWN_CHARS].decode("utf-8", "replace")
    line = head.splitlines()[0][:SHOWN_CHARS].rstrip()
    more = "..." if len(text) > 4 * SHOWN_CHARS or line != head else ""
    return f"{content_type or 'no content type'} {line!r}{more}"


class Answer:
    """A finished HTTP exchange: status, headers, body (bounded, fully read)."""

    def __init__(self, method: str, url: str, status: int, headers: httpx.Headers,
                 body: bytes) -> None:
        self.method, self.url, self.status, self.headers, self.body = (
            method, url, status, headers, body)

    @property
    def where(self) -> str:
        return f"{self.method} {self.url}"

    @property
    def shown(self) -> str:
        return _shown(self.body, self.headers.get("content-type", ""))

    def error_envelope(self) -> ErrorEnvelope | None:
        """The answer's error envelope; None when it is not one (or names a member twice:
        an envelope that says two things is not believed)."""
        try:
            return ErrorEnvelope.model_validate(strictjson.loads(self.body))
        except ValueError:
            return None

    def held_key(self) -> bool:
        """Whether this is a chatsave server's 409 for a write's Idempotency-Key: a request
        with the same key (from a run or a server process interrupted mid-request) is still
        held there, until the backend releases it (a lease of a few seconds)."""
        if self.status != 409:
            return False
        env = self.error_envelope()
        return env is not None and env.error.code == KEY_IN_USE

    def describe_error(self) -> str:
        """The error as the backend put it; a server error also names the request id the
        server logged it under (X-Request-Id), for whoever reads that log."""
        env = self.error_envelope()
        text = f"{env.error.code}: {env.error.message}" if env is not None else self.shown
        rid = self.headers.get("x-request-id", "")
        if self.status >= 500 and _REQUEST_ID.fullmatch(rid):
            text += f"; request id {rid}"
        return text


class HttpRemote(Remote):
    """A chatsave server reached over HTTP(S)."""

    reads_in_background = True  # its own connection pool; nothing of the caller's store

    def __init__(self, url: str, *, token: str | None = None,
                 transport: httpx.BaseTransport | None = None,
                 policy: RetryPolicy | None = None, request_timeout: float = 60.0,
                 connect_timeout: float = 10.0, read_timeout: float = 20.0,
                 max_answer_bytes: int = MAX_ANSWER_BYTES, allow_insecure: bool = False,
                 limiter: RateLimiter | None = None, on_retry: OnRetry | None = None,
                 max_connections: int = 8) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"not an http(s) URL: {url!r}")
        if parts.username is not None or parts.password is not None or parts.query \
                or parts.fragment:
            # Whatever is in the URL ends up in messages, summaries and the store.
            raise UsageError("the remote URL carries user info, a query or a fragment; "
                             "chatsave keeps credentials out of URLs",
                             hint="give the base URL only, and the token with chatsave login, "
                             "--token-file or CHATSAVE_TOKEN")
        if token and parts.scheme == "http" and not is_loopback(parts.hostname) \
                and not allow_insecure:
            raise UsageError(
                f"refusing to send the token over plain http to {parts.hostname}",
                hint="use https://, or --allow-insecure if this network is trusted")
        self.url = url.rstrip("/")
        self.base = self.url + API_PREFIX
        self.policy = policy or RetryPolicy()
        self.request_timeout = request_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.max_answer_bytes = max_answer_bytes
        self.limiter = limiter or RateLimiter()
        self.on_retry = on_retry
        self.retries = 0
        headers = {"User-Agent": f"chatsave/{__version__}", "Accept": "application/json"}
        # Answers are untrusted: a server or proxy that echoes the request headers back
        # must not get the token into our messages, events, store or logs.
        self._secrets = [token, json.dumps(token)[1:-1]] if token else []
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            transport=transport, headers=headers, follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )

    def close(self) -> None:
        self._client.close()

    def redact(self, text: str) -> str:
        """``text`` with the token replaced (for anything that came from the network)."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    # ----------------------------------------------------------- one exchange
    def _once(self, method: str, url: str, *, content: bytes | None,
              headers: dict[str, str], params: dict[str, Any] | None) -> Answer:
        deadline = time.monotonic() + self.request_timeout
        timeout = httpx.Timeout(min(self.read_timeout, self.request_timeout),
                                connect=min(self.connect_timeout, self.request_timeout))
        with self._client.stream(method, url, content=content, headers=headers, params=params,
                                 timeout=timeout) as resp:
            if resp.headers.get("content-encoding", "identity") not in ("identity", ""):
                # We ask for no compression; an encoded answer is refused rather than
                # decompressed without bound.
                raise BadAnswerError(f"{method} {url}: unexpected content-encoding "
                                     f"{self.redact(resp.headers['content-encoding'])!r}")
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise BadAnswerError(
                        f"{method} {url}: the answer is larger than "
                        f"{self.max_answer_bytes} bytes; refusing to read more")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _Deadline
            body = b"".join(chunks)
            answered = resp.headers
            if self._secrets:
                for secret in self._secrets:
                    body = body.replace(secret.encode("utf-8"), b"[redacted]")
                answered = httpx.Headers([(k, self.redact(v))
                                          for k, v in answered.multi_items()])
            return Answer(method, url, resp.status_code, answered, body)

    def request(self, method: str, path: str, *, content: bytes | None = None,
                headers: dict[str, str] | None = None,
                params: dict[str, Any] | None = None) -> Answer:
        """Send with retries; return the final answer (any non-retryable status).

        A 409 for a key the backend still holds (``Answer.held_key``) is reported, in the
        retries and the final error, as waiting for it to release an interrupted request."""
        url = self.base + path
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        if content is not None:
            hdrs.setdefault("Content-Type", "application/json")
        key = hdrs.get("Idempotency-Key")
        last = ""
        held = False
        for attempt in range(1, self.policy.attempts + 1):
            self.limiter.wait()
            retry_after: float | None = None
            held = False
            try:
                answer = self._once(method, url, content=content, headers=hdrs, params=params)
            except _Deadline:
                last = f"no complete answer within {self.request_timeout:g}s"
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                # Some errors quote what was sent (h11: "Illegal header value ...").
                last = self.redact(f"{type(exc).__name__}: {exc}" if str(exc)
                                   else type(exc).__name__)
            else:
                if answer.status not in RETRYABLE_STATUS:
                    return answer
                retry_after = parse_retry_after(answer.headers.get("retry-after"))
                held = key is not None and answer.held_key()
                last = (f"waiting for the backend to release an interrupted request "
                        f"(Idempotency-Key {key})" if held
                        else f"HTTP {answer.status} ({answer.describe_error()})")
                if retry_after is not None and retry_after > self.policy.max_retry_after:
                    raise UnavailableError(
                        f"{method} {url}: {last}; the backend asks to retry after "
                        f"{retry_after:.0f}s", hint="rerun later")
            if attempt == self.policy.attempts:
                break
            delay = self.policy.delay(attempt, retry_after)
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry(f"{method} {path}", attempt, last, delay)
            time.sleep(delay)
        if held:
            raise UnavailableError(
                f"{method} {url}: still {last} after {self.policy.attempts} attempts",
                details={"idempotency_key": key},
                hint="a run or a server process stopped mid-request left it behind; the "
                "backend releases it after a short lease: rerun in a moment (progress is "
                "saved)")
        raise UnavailableError(
            f"{method} {url}: {last} (after {self.policy.attempts} attempts)",
            hint="the backend is unreachable or failing; rerun later (progress is saved)")

    # ----------------------------------------------------------------- decoding
    def _decode(self, answer: Answer, model: type[M], *, refuse: bool = False) -> M:
        """Validate a 2xx answer; ``refuse`` makes a non-chatsave answer exit 9 (else 8)."""
        error_cls = RefusedError if refuse else BadAnswerError
        expected = f"chatsave protocol v{PROTOCOL_VERSION} JSON ({model.__name__})"
        ctype = answer.headers.get("content-type", "")
        if "json" not in ctype.lower():
            raise error_cls(f"{answer.where} answered {answer.status} with {answer.shown}; "
                            f"expected {expected}",
                            hint="is --remote the URL of a chatsave server?")
        try:
            data = strictjson.loads(answer.body)
        except ValueError as exc:
            raise error_cls(f"{answer.where} answered {answer.status} with invalid JSON "
                            f"({exc}: {answer.shown}); expected {expected}") from None
        if not _depth_ok(data):
            raise error_cls(f"{answer.where}: the answer nests deeper than "
                            f"{MAX_JSON_DEPTH} levels")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise error_cls(f"{answer.where} answered JSON of the wrong shape "
                            f"({where}: {first.get('msg')}); expected {expected}") from None

    def _fail(self, answer: Answer, what: str, *, write: bool = False) -> RemoteError:
        """The error for a final non-2xx answer.

        ``write``: the answer is to a save or a delete, whose 4xx (the retryable ones left
        aside: they never get here) is the backend's verdict on that batch, except the ones
        about the credentials (401/403), the endpoint (404/405) or the size (413: split)."""
        detail = answer.describe_error()
        status = answer.status
        if status in (401, 403):
            return self._credentials_refused(answer, detail)
        if status == 413:
            return TooLargeError(f"{answer.where}: request too large ({detail})")
        env = answer.error_envelope()
        code = env.error.code if env else None
        # Only the backend's own verdict (its error envelope) rejects a batch: a 4xx from
        # something on the way (a proxy's text/plain) is about the way there, would meet
        # every batch alike, and leaves them pending for the next run (a refusal, exit 9).
        if status == 422 or (write and env is not None and rejects_batch(status, code)):
            return RequestRejectedError(
                f"{answer.where}: the backend rejected the {what} ({status} {detail})",
                details={"status": status, "code": code})
        if 300 <= status < 400:
            return RefusedError(f"{answer.where} answered a redirect ({status}) to "
                                f"{answer.headers.get('location')!r}; chatsave does not "
                                "follow redirects", hint="point --remote at the final URL")
        if status == 404:
            return RefusedError(f"{answer.where} answered 404 ({detail}): the backend has no "
                                f"such endpoint", hint="is --remote a chatsave server?",
                                details={"status": status, "code": code})
        if 400 <= status < 500:
            return RefusedError(f"{answer.where} refused the {what} ({status} {detail})",
                                details={"status": status, "code": code})
        return UnavailableError(f"{answer.where} failed ({status} {detail})")

    def _credentials_refused(self, answer: Answer, detail: str) -> RefusedError:
        """401/403: the way out depends on whether a token went with the request
        (``details``: the status, and ``token_sent``)."""
        where, status = answer.where, answer.status
        details = {"status": status, "token_sent": bool(self._secrets)}
        if not self._secrets:
            return RefusedError(
                f"{where}: the backend refused the credentials ({status} {detail}): no token "
                "was sent", details=details,
                hint=f"chatsave login --remote {self.url} stores one (or set CHATSAVE_TOKEN, "
                "or pass --token-file FILE)")
        return RefusedError(
            f"{where}: the backend refused the credentials ({status} {detail}): it does not "
            "accept the token sent", details=details,
            hint="check the token: CHATSAVE_TOKEN, else --token-file (CHATSAVE_TOKEN_FILE), "
            f"else the one chatsave login stored (chatsave login --remote {self.url} "
            "replaces it)")

    def _not_found_chat(self, answer: Answer) -> bool:
        if answer.status != 404:  # not parsed: a 200 page of messages is parsed once, later
            return False
        env = answer.error_envelope()
        return env is not None and env.error.code == "not_found"

    # ---------------------------------------------------------------- protocol
    def capabilities(self) -> Capabilities:
        answer = self.request("GET", "/capabilities")
        if answer.status != 200:
            if answer.status == 404:
                raise RefusedError(
                    f"{answer.where} answered 404 ({answer.shown}): no chatsave API here; "
                    f"expected chatsave protocol v{PROTOCOL_VERSION} capabilities",
                    hint="is --remote the base URL of a chatsave server (chatsave serve)?")
            raise self._fail(answer, "capabilities request")
        caps = self._decode(answer, Capabilities, refuse=True)
        if caps.protocol != PROTOCOL_VERSION:
            raise RefusedError(
                f"{answer.where}: the backend speaks protocol {caps.protocol}; this chatsave "
                f"speaks protocol {PROTOCOL_VERSION}",
                hint="upgrade chatsave or the server so they share a protocol version")
        return caps

    def list_chats(self, after: str | None = None, limit: int | None = None) -> ChatPage:
        params = {k: v for k, v in (("after", after), ("limit", limit)) if v is not None}
        answer = self.request("GET", "/chats", params=params)
        if answer.status != 200:
            raise self._fail(answer, "chat list request")
        page = self._decode(answer, ChatPage)
        # A cursor that does not move on would have the caller page forever.
        if page.next is not None and (page.next <= (after or "") or any(
                c.chat_id > page.next for c in page.chats)):
            raise BadAnswerError(f"{answer.where}: the next-page cursor does not move past "
                                 "this page; refusing to page forever")
        return page

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        body = json.dumps({"chat_ids": chat_ids}).encode()
        answer = self.request("POST", "/digests", content=body)
        if answer.status != 200:
            raise self._fail(answer, "digest request")
        return self._decode(answer, DigestsAnswer)

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        params: dict[str, Any] = {"include_deleted": 1} if include_deleted else {}
        return self._page(chat_id, params, after, limit)

    def buckets(self, chat_id: str) -> BucketsAnswer | None:
        # Asked only of a backend whose capabilities list the "buckets" feature.
        answer = self.request("GET", f"/chats/{quote(chat_id, safe='')}/buckets")
        if self._not_found_chat(answer):
            return BucketsAnswer(chat_id=chat_id, version=0, buckets={})
        if answer.status != 200:
            raise self._fail(answer, "bucket digest request")
        found = self._decode(answer, BucketsAnswer)
        if found.chat_id != chat_id:
            raise BadAnswerError(f"{answer.where} answered for chat {found.chat_id!r}")
        return found

    def bucket_messages(self, chat_id: str, buckets: list[str], after: int | None = None,
                        limit: int | None = None) -> MessagePage:
        params = {"include_deleted": 1, "buckets": ",".join(buckets)}
        return self._page(chat_id, params, after, limit)

    def _page(self, chat_id: str, params: dict[str, Any], after: int | None,
              limit: int | None) -> MessagePage:
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = limit
        answer = self.request("GET", f"/chats/{quote(chat_id, safe='')}/messages",
                              params=params)
        if self._not_found_chat(answer):
            return MessagePage(chat_id=chat_id, version=0, messages=[], next=None)
        if answer.status != 200:
            raise self._fail(answer, "message page request")
        page = self._decode(answer, MessagePage)
        if page.chat_id != chat_id:
            raise BadAnswerError(f"{answer.where} answered for chat {page.chat_id!r}")
        if page.next is not None and (page.next <= (after or 0) or any(
                m.seq > page.next for m in page.messages)):
            raise BadAnswerError(f"{answer.where}: the next-page cursor does not move past "
                                 "this page; refusing to page forever")
        return page

    def _write(self, kind: str, chat_id: str, body: bytes, key: str, model: type[M]) -> M:
        return self._post_write(f"/chats/{quote(chat_id, safe='')}/{kind}", kind, body, key,
                                model)[1]

    def _post_write(self, path: str, kind: str, body: bytes, key: str,
                    model: type[M]) -> tuple[Answer, M]:
        answer = self.request("POST", path, content=body, headers={"Idempotency-Key": key})
        if answer.status != 200:
            raise self._fail(answer, f"{kind} request", write=True)
        return answer, self._decode(answer, model)

    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        return self._write("save", chat_id, body, idempotency_key, SaveAnswer)

    def save_many(self, chat_ids: list[str], body: bytes,
                  idempotency_key: str) -> list[SaveAnswer]:
        answer, saves = self._post_write("/saves", "save", body, idempotency_key, SavesAnswer)
        return check_saves(answer.where, chat_ids, saves)

    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        return self._write("delete", chat_id, body, idempotency_key, DeleteAnswer)
