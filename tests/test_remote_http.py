"""HttpRemote against scripted answers (httpx.MockTransport): what a real server cannot produce.

Malformed answers, redirects, encodings and retry timing are scripted here; everything a
real chatsave server does is tested against the real server elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from chatsave.errors import (
    BadAnswerError,
    RefusedError,
    RequestRejectedError,
    TooLargeError,
    UnavailableError,
    UsageError,
)
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy, parse_retry_after

CAPS = {"protocol": 1, "server": "chatsave/0.1", "backend_id": "b-1",
        "max_batch_messages": 1000, "max_body_bytes": 8 << 20, "max_page": 1000,
        "idempotency_retention_s": 86400, "features": []}
SAVE = {"chat_id": "c1", "version": 1, "saved": [], "unchanged": [], "conflicts": [],
        "rejected": []}


def json_answer(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(),
                          headers={"content-type": "application/json", **headers})


class Script:
    """Answers requests in order from a list; records what was asked and when."""

    def __init__(self, answers: list[Callable[[httpx.Request], httpx.Response] | httpx.Response]
                 ) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        return answer(request) if callable(answer) else answer


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr("chatsave.remote.http.time.sleep", slept.append)
    return slept


def remote(script: Script, **kwargs: Any) -> HttpRemote:
    kwargs.setdefault("policy", RetryPolicy(attempts=4, base=0.01, cap=0.05))
    return HttpRemote("http://127.0.0.1:9", transport=httpx.MockTransport(script), **kwargs)


@pytest.mark.parametrize("answer, expect", [
    (httpx.Response(404, text="<html>Not Found</html>", headers={"content-type": "text/html"}),
     "answered 404"),
    (httpx.Response(200, text="<html>hello</html>", headers={"content-type": "text/html"}),
     "text/html"),
    (httpx.Response(200, content=b"", headers={"content-type": "application/json"}),
     "invalid JSON"),
    (httpx.Response(200, content=b""), "an empty body"),
    (json_answer(200, {"hello": "world"}), "wrong shape"),
    (json_answer(200, {**CAPS, "protocol": 2}), "speaks protocol 2"),
])
def test_capabilities_refuses_what_is_not_chatsave(answer: httpx.Response, expect: str) -> None:
    with remote(Script([answer])) as r, pytest.raises(RefusedError) as err:
        r.capabilities()
    assert expect in err.value.message
    assert "http://127.0.0.1:9/api/v1/capabilities" in err.value.message
    assert err.value.exit_code == 9


@pytest.mark.parametrize("answer, expect", [
    (httpx.Response(200, text="<html>ok</html>", headers={"content-type": "text/html"}),
     "text/html"),
    (httpx.Response(200, content=b"", headers={"content-type": "application/json"}),
     "invalid JSON"),
    (json_answer(200, {"ok": True}), "wrong shape"),
])
def test_bad_save_answers_confirm_nothing(answer: httpx.Response, expect: str) -> None:
    with remote(Script([answer])) as r, pytest.raises(BadAnswerError) as err:
        r.save("c1", b"{}", "k1")
    assert expect in err.value.message and err.value.exit_code == 8


def test_retry_after_is_honoured_and_attempts_counted(sleeps: list[float]) -> None:
    script = Script([json_answer(503, {"error": {"code": "overloaded", "message": "busy"}},
                                 **{"Retry-After": "2"}),
                     json_answer(429, {"error": {"code": "rate", "message": "slow"}},
                                 **{"Retry-After": "1"}),
                     json_answer(200, SAVE)])
    with remote(script) as r:
        answer = r.save("c1", b"{}", "key-1")
        assert r.retries == 2
    assert answer.chat_id == "c1"
    assert sleeps[0] >= 2 and sleeps[1] >= 1
    assert [q.headers["idempotency-key"] for q in script.requests] == ["key-1"] * 3
    assert len({q.content for q in script.requests}) == 1


@pytest.mark.parametrize("status, error", [(400, RequestRejectedError), (401, RefusedError),
                                           (403, RefusedError), (404, RefusedError),
                                           (422, RequestRejectedError), (413, TooLargeError)])
def test_final_statuses_are_not_retried(sleeps: list[float], status: int,
                                        error: type[Exception]) -> None:
    script = Script([json_answer(status, {"error": {"code": "x", "message": "no"}})] * 4)
    with remote(script) as r, pytest.raises(error):
        r.save("c1", b"{}", "k")
    assert len(script.requests) == 1 and sleeps == []


def test_transport_errors_retry_then_give_up(sleeps: list[float]) -> None:
    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    script = Script([reset] * 4)
    with remote(script) as r, pytest.raises(UnavailableError) as err:
        r.capabilities()
    assert len(script.requests) == 4 and len(sleeps) == 3
    assert "after 4 attempts" in err.value.message and err.value.exit_code == 8


def test_an_hour_of_retry_after_gives_up_at_once(sleeps: list[float]) -> None:
    script = Script([json_answer(503, {"error": {"code": "x", "message": "down"}},
                                 **{"Retry-After": "3600"})])
    with remote(script) as r, pytest.raises(UnavailableError, match="retry after 3600s"):
        r.capabilities()
    assert sleeps == []


def test_oversized_answer_and_deep_json_refused() -> None:
    big = httpx.Response(200, content=b"[" + b"1," * 10_000 + b"1]",
                         headers={"content-type": "application/json"})
    with remote(Script([big]), max_answer_bytes=1000) as r, \
            pytest.raises(BadAnswerError, match="larger than 1000 bytes"):
        r.list_chats()
    deep = httpx.Response(200, content=b"[" * 200 + b"]" * 200,
                          headers={"content-type": "application/json"})
    with remote(Script([deep])) as r, pytest.raises(BadAnswerError, match="nests deeper"):
        r.list_chats()


def test_compressed_answer_refused() -> None:
    gz = httpx.Response(200, stream=httpx.ByteStream(b"\x1f\x8b...."), headers={
        "content-type": "application/json", "content-encoding": "gzip"})
    with remote(Script([gz])) as r, pytest.raises(BadAnswerError, match="content-encoding"):
        r.list_chats()


def test_redirects_are_not_followed() -> None:
    script = Script([httpx.Response(302, headers={"location": "http://elsewhere.example/x"})])
    with remote(script, token="tok") as r, pytest.raises(RefusedError, match="redirect"):
        r.capabilities()
    assert len(script.requests) == 1


def test_token_not_sent_over_plain_http_to_other_hosts() -> None:
    with pytest.raises(UsageError, match="plain http"):
        HttpRemote("http://chats.example.com", token="t")
    HttpRemote("http://chats.example.com", token="t", allow_insecure=True).close()
    HttpRemote("https://chats.example.com", token="t").close()
    HttpRemote("http://localhost:8000", token="t").close()


def test_answer_for_another_chat_is_refused() -> None:
    page = {"chat_id": "other", "version": 1, "messages": [], "next": None}
    with remote(Script([json_answer(200, page)])) as r, pytest.raises(BadAnswerError):
        r.messages("c1")


def test_unknown_chat_reads_as_empty() -> None:
    nf = json_answer(404, {"error": {"code": "not_found", "message": "no such chat"}})
    with remote(Script([nf])) as r:
        assert r.messages("c1").messages == []


def test_a_page_of_messages_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200 page is not first read as a possible "not found" envelope (that parsed every
    page of a big chat's diff twice); a 404 still is."""
    from chatsave import strictjson

    parsed: list[int] = []
    real = strictjson.loads

    def counting(data: str | bytes) -> Any:
        parsed.append(len(data))
        return real(data)

    monkeypatch.setattr(strictjson, "loads", counting)
    page = {"chat_id": "c1", "version": 1, "next": None, "messages": [
        {"chat_id": "c1", "id": "m1", "seq": 1, "rev": 1, "content_hash": "h",
         "role": "user", "content": "hi", "created_at": "2024-01-02T03:04:05.678Z"}]}
    nf = json_answer(404, {"error": {"code": "not_found", "message": "no such chat"}})
    with remote(Script([json_answer(200, page), nf])) as r:
        assert [m.id for m in r.messages("c1").messages] == ["m1"]
        assert len(parsed) == 1
        assert r.messages("c2").messages == []
        assert len(parsed) == 2


def test_chat_ids_travel_percent_encoded() -> None:
    script = Script([json_answer(200, SAVE | {"chat_id": "a:b@c~d"})])
    with remote(script) as r:
        r.save("a:b@c~d", b"{}", "k")
    assert script.requests[0].url.raw_path == b"/api/v1/chats/a%3Ab%40c~d/save"


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
