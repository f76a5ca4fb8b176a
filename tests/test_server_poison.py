"""Poison input: no request reaches a 500, and both engines accept and return the same.

Titles, contents, metadata and ids drawn from all of Unicode (U+0000 and lone surrogates
included) go to a SQLite and a PostgreSQL server over HTTP: never a 5xx, the same answer
from both, and what is read back is what was sent. Query parameters out of range are
refused in the envelope; a body naming a member twice is malformed JSON on every route.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chatsave.server.app import ChatsaveApp
from tests.server_fixtures import LiveServer

API = "/api/v1"
FORTY_NINES = "9" * 40


@pytest.fixture
def servers(tmp_path: Path, pg_url: str, make_app: Callable[..., ChatsaveApp],
            start_server: Callable[[Any], LiveServer]) -> Iterator[dict[str, httpx.Client]]:
    """An HTTP client per engine: {"sqlite": ..., "postgresql": ...}."""
    clients = {
        "sqlite": httpx.Client(base_url=start_server(make_app(str(tmp_path / "s.db"))).url,
                               timeout=30),
        "postgresql": httpx.Client(base_url=start_server(make_app(pg_url)).url, timeout=30),
    }
    yield clients
    for client in clients.values():
        client.close()


def _send(client: httpx.Client, method: str, path: str, doc: Any = None,
          key: str | None = None) -> httpx.Response:
    # ensure_ascii: a lone surrogate travels as a JSON "\ud800" escape, as a client sends it
    content = None if doc is None else json.dumps(doc).encode("ascii")
    headers = {"Idempotency-Key": key} if key else {}
    return client.request(method, path, content=content, headers=headers)


def _envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code, error
    return error


# -- the two reported inputs, over HTTP on both engines --------------------------------------


@pytest.mark.postgres
def test_title_with_nul_is_stored_faithfully(servers: dict[str, httpx.Client]) -> None:
    title = "before\x00after \\0 \\\\"
    answers = {}
    for engine, client in servers.items():
        saved = _send(client, "POST", f"{API}/chats/c1/save",
                      {"title": title, "messages": [{"id": "m1", "role": "user",
                                                     "content": "hi\x00", "created_at": 0}]},
                      key="k1")
        assert saved.status_code == 200, (engine, saved.text)
        [chat] = client.get(f"{API}/chats").json()["chats"]
        assert chat["title"] == title, engine
        replay = _send(client, "POST", f"{API}/chats/c1/save",
                       {"title": title, "messages": [{"id": "m1", "role": "user",
                                                      "content": "hi\x00", "created_at": 0}]},
                       key="k1")
        assert replay.headers["idempotent-replayed"] == "true" and replay.content == \
            saved.content
        answers[engine] = (saved.content, client.get(f"{API}/chats/c1/messages").content)
    assert answers["sqlite"] == answers["postgresql"], "the same bytes from both engines"


@pytest.mark.postgres
def test_query_parameters_out_of_range_are_refused(servers: dict[str, httpx.Client]) -> None:
    for engine, client in servers.items():
        assert _send(client, "POST", f"{API}/chats/c1/save", {"messages": [
            {"id": "m1", "role": "user", "content": "x", "created_at": 0}]}, "k").is_success
        for after in (FORTY_NINES, str(2**63), "-1", "1e3", "x"):
            r = client.get(f"{API}/chats/c1/messages", params={"after": after})
            _envelope(r, 422, "invalid_request")
        last = client.get(f"{API}/chats/c1/messages", params={"after": str(2**63 - 1)})
        assert last.status_code == 200 and last.json()["messages"] == [], engine
        for limit in ("0", "-5", "x"):
            _envelope(client.get(f"{API}/chats/c1/messages", params={"limit": limit}), 422,
                      "invalid_request")
            _envelope(client.get(f"{API}/chats", params={"limit": limit}), 422,
                      "invalid_request")
        huge = client.get(f"{API}/chats/c1/messages", params={"limit": FORTY_NINES})
        assert huge.status_code == 200 and len(huge.json()["messages"]) == 1, engine
        assert client.get(f"{API}/chats", params={"limit": FORTY_NINES}).status_code == 200
        _envelope(client.get(f"{API}/chats", params={"after": "c\x00"}), 422, "invalid_request")
        page = client.get(f"{API}/chats", params={"after": "c"})
        assert [c["chat_id"] for c in page.json()["chats"]] == ["c1"], engine


# -- duplicate member names ----------------------------------------------------------------


MESSAGE = '{"id": "m1", "role": "user", "content": "hi", "created_at": 0}'
DUPLICATES = [
    ("POST", f"{API}/chats/c1/save", '{"messages": [], "messages": [' + MESSAGE + ']}',
     "messages"),
    ("POST", f"{API}/chats/c1/save",
     '{"messages": [{"id": "m1", "id": "m2", "role": "user", "content": "hi", '
     '"created_at": 0}]}', "id"),
    ("POST", f"{API}/chats/c1/save",
     '{"messages": [{"id": "m1", "role": "user", "content": "hi", "created_at": 0, '
     '"metadata": {"a": {"b": 1, "b": 2}}}]}', "b"),
    ("POST", f"{API}/chats/c1/delete", '{"ids": ["m1"], "ids": []}', "ids"),
    ("POST", f"{API}/chats/c1/delete", '{"ids": [{"id": "m1", "base_rev": 1, "base_rev": 2}]}',
     "base_rev"),
    ("POST", f"{API}/digests", '{"chat_ids": ["c1"], "chat_ids": []}', "chat_ids"),
    ("POST", "/api/chats/c1/save", '{"messages": [], "messages": [' + MESSAGE + ']}', "messages"),
    ("POST", "/api/chats/c1/save",
     '{"data": {"name": "a", "name": "b", "messages": [' + MESSAGE + ']}}', "name"),
]


@pytest.mark.parametrize(("method", "path", "body", "member"), DUPLICATES,
                         ids=[f"{p.split('/')[-1]}-{m}" for _, p, _, m in DUPLICATES])
def test_duplicate_member_names_are_malformed_json(
        live_server: LiveServer, method: str, path: str, body: str, member: str) -> None:
    with httpx.Client(base_url=live_server.url, timeout=10) as client:
        if path.endswith("/delete"):  # a chat to delete from: the body is the only problem
            assert _send(client, "POST", f"{API}/chats/c1/save", json.loads(
                '{"messages": [' + MESSAGE + ']}'), "setup").is_success
        r = client.request(method, path, content=body.encode(),
                           headers={"Idempotency-Key": "dup"})
        error = _envelope(r, 400, "malformed_json")
        assert repr(member) in error["message"], error
        nan = client.post(f"{API}/chats/c1/save", content=b'{"messages": [], "title": NaN}',
                          headers={"Idempotency-Key": "nan"})
        _envelope(nan, 400, "malformed_json")
        page = client.get(f"{API}/chats/c1/messages?include_deleted=true").json()
    expected = [("m1", 1)] if path.endswith("/delete") else []
    assert [(m["id"], m["rev"]) for m in page.get("messages", [])] == expected, \
        "neither meaning of the body was applied"


# -- the property: any text, both engines, never a 5xx, the same answers ---------------------


_TRICKY = st.sampled_from(["\x00", "\ud800", "\udfff", "\udbff\udc00", "\\", "\\0",
                           "\\u0000", "\x7f", "\u2028", "\ufeff", "\U0010ffff", "😀"])
#: all of Unicode, lone surrogates included, with the characters that broke things often
TEXT = st.lists(st.one_of(_TRICKY, st.characters(exclude_categories=())),
                max_size=12).map("".join)
MESSAGES = st.lists(st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["m1", "m2"]), TEXT), "content": TEXT},
    optional={"metadata": st.dictionaries(TEXT, TEXT, max_size=3)}),
    max_size=3, unique_by=lambda m: m["id"])
_chat_ids = itertools.count()


@pytest.mark.postgres
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(title=st.one_of(st.none(), TEXT), messages=MESSAGES)
def test_any_text_gets_the_same_faithful_answer_from_both_engines(
        servers: dict[str, httpx.Client], title: str | None,
        messages: list[dict[str, Any]]) -> None:
    chat_id = f"p{next(_chat_ids)}"
    doc: dict[str, Any] = {"messages": [
        {"role": "user", "created_at": "2026-01-01T00:00:00.000Z", **m} for m in messages]}
    if title is not None:
        doc["title"] = title
    # What the server reads: JSON cannot tell two escaped lone surrogates that happen to
    # form a pair ("\udbff\udc00") from the character they encode.
    doc = json.loads(json.dumps(doc))
    sent, title = doc["messages"], doc.get("title")
    assume(len({m["id"] for m in sent}) == len(sent))  # a repeated id is another test's
    seen: dict[str, tuple[int, bytes, bytes]] = {}
    for engine, client in servers.items():
        saved = _send(client, "POST", f"{API}/chats/{chat_id}/save", doc, key=chat_id)
        assert saved.status_code < 500, (engine, saved.text)
        read = client.get(f"{API}/chats/{chat_id}/messages")
        assert read.status_code < 500, (engine, read.text)
        seen[engine] = (saved.status_code, saved.content, read.content)
        if saved.status_code != 200:
            continue
        answer = saved.json()
        if read.status_code == 200:
            stored = {m["id"]: m for m in read.json()["messages"]}
            for ack in answer["saved"]:
                original = next(m for m in sent if m["id"] == ack["id"])
                assert stored[ack["id"]]["content"] == original["content"], engine
                assert stored[ack["id"]]["metadata"] == original.get("metadata", {}), engine
            chats = client.post(f"{API}/digests", json={"chat_ids": [chat_id]}).json()
            assert chats["versions"][chat_id] == answer["version"]
            if title is not None:
                titles = {c["chat_id"]: c["title"]
                          for c in client.get(f"{API}/chats").json()["chats"]}
                assert titles[chat_id] == title, engine
    assert seen["sqlite"] == seen["postgresql"], "both engines answer the same bytes"
