"""Bearer tokens and users: minting, the tokens file, no user reaching another's chats."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import InputError, UsageError
from chatsave.server.app import ChatsaveApp
from chatsave.server.run import add_token
from chatsave.server.tokens import TokenStore, token_hash
from tests.server_fixtures import AsgiClient


def test_add_token_stores_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokens.json"
    first = add_token(path, "alice")
    second = add_token(path, "bob")
    assert first != second and len(first) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert first not in text and second not in text
    doc = json.loads(text)
    assert [(t["user"], t["sha256"]) for t in doc["tokens"]] == \
        [("alice", token_hash(first)), ("bob", token_hash(second))]
    store = TokenStore(path)
    assert store.verify(first) == ("alice", token_hash(first))
    assert store.verify(second)[0] == "bob"  # type: ignore[index]
    assert store.verify("x" + first) is None
    assert [p.name for p in path.parent.iterdir()] == ["tokens.json"], "no temp files left"


def test_bad_users_and_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="invalid user name"):
        add_token(tmp_path / "t.json", "a b")
    with pytest.raises(UsageError, match="no tokens file"):
        TokenStore(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": 3}')
    with pytest.raises(UsageError, match="not a chatsave tokens file"):
        TokenStore(bad)
    with pytest.raises(UsageError, match="not a chatsave tokens file"):
        add_token(bad, "alice")


def test_tokens_added_while_running_work(tmp_path: Path, make_app: Callable[..., ChatsaveApp],
                                         asgi_client: Callable[..., AsgiClient]) -> None:
    path = tmp_path / "tokens.json"
    add_token(path, "alice")
    app = make_app(tokens=TokenStore(path, recheck_s=0))
    late = add_token(path, "carol")
    r = asgi_client(app, late).get("/api/v1/chats")
    assert r.status_code == 200


def test_without_tokens_everyone_is_local(make_app: Callable[..., ChatsaveApp],
                                          asgi_client: Callable[..., AsgiClient]) -> None:
    app = make_app()
    client = asgi_client(app, "whatever")
    r = client.post("/api/v1/chats/c1/save", headers={"Idempotency-Key": "k"},
                    json={"messages": [{"id": "m1", "role": "user", "content": "x",
                                        "created_at": "2026-01-01T00:00:00Z"}]})
    assert r.status_code == 200
    assert list(app.state.storage.get_chats("local", ["c1"])) == ["c1"]


def _state(app: ChatsaveApp, user: str) -> Any:
    service = app.state.service
    return (service.list_chats(user)[1], service.digests(user, b'{"chat_ids": ["c1"]}')[1],
            service.messages(user, "c1", include_deleted=True)[1])


def test_second_user_reaches_nothing_of_the_first(make_app: Callable[..., ChatsaveApp],
                                                  asgi_client: Callable[..., AsgiClient],
                                                  tokens_file: Callable[..., Any]) -> None:
    path, tokens = tokens_file("alice", "bob")
    app = make_app(tokens=path)
    alice, bob = asgi_client(app, tokens["alice"]), asgi_client(app, tokens["bob"])
    save = {"messages": [{"id": f"m{i}", "role": "user", "content": f"secret {i}",
                          "created_at": "2026-01-01T00:00:00Z"} for i in range(3)],
            "title": "alice only"}
    assert alice.post("/api/v1/chats/c1/save", json=save,
                      headers={"Idempotency-Key": "save-key"}).status_code == 200
    assert alice.post("/api/v1/chats/c1/delete", json={"ids": ["m2"]},
                      headers={"Idempotency-Key": "del-key"}).status_code == 200
    before = _state(app, "alice")
    walked: set[tuple[str, str]] = set()

    def call(method: str, template: str, url: str, **kwargs: Any) -> Any:
        walked.add((method.lower(), template))
        r = bob.request(method, url, **kwargs)
        text = r.text
        assert "secret" not in text and "alice" not in text, f"{method} {url} leaked: {text}"
        return r

    chats = "/api/v1/chats"
    msgs = "/api/v1/chats/{chat_id}/messages"
    r = call("GET", chats, chats)
    assert r.status_code == 200 and r.json()["chats"] == []
    r = call("POST", "/api/v1/digests", "/api/v1/digests", json={"chat_ids": ["c1"]})
    assert r.json() == {"digests": {"c1": None}, "versions": {"c1": None}}
    for query in ("", "?include_deleted=1", "?after=0&limit=1", "?buckets=00,ff"):
        r = call("GET", msgs, "/api/v1/chats/c1/messages" + query)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = call("GET", "/api/v1/chats/{chat_id}/buckets", "/api/v1/chats/c1/buckets")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for body, key in (({"ids": ["m2"]}, "del-key"), ({"ids": ["m0", "m1"]}, "new-key")):
        r = call("POST", "/api/v1/chats/{chat_id}/delete", "/api/v1/chats/c1/delete",
                 json=body, headers={"Idempotency-Key": key})
        assert r.status_code == 404, "delete of another user's chat (and key replay): 404"
    assert call("GET", "/api/v1/capabilities", "/api/v1/capabilities").status_code == 200
    assert call("GET", "/api/v1/health", "/api/v1/health").status_code == 200
    assert _state(app, "alice") == before

    # Writes go to bob's own namespace: replaying alice's key and body executes for bob,
    # and nothing in the answer or in alice's chat changes.
    r = call("POST", "/api/v1/chats/{chat_id}/save", "/api/v1/chats/c1/save", json=save,
             headers={"Idempotency-Key": "save-key"})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers
    assert r.json()["version"] == 1 and len(r.json()["saved"]) == 3
    r = call("POST", "/api/chats/{chat_id}/save", "/api/chats/c1/save",
             json={"messages": [{"text": "bob", "sender": "user", "timestamp": 1}]})
    assert r.status_code == 200 and r.json()["version"] == 2
    r = call("POST", "/api/v1/saves", "/api/v1/saves",
             json={"chats": [{"chat_id": "c1", "messages": save["messages"][:1]}]},
             headers={"Idempotency-Key": "saves-key"})
    assert r.status_code == 200 and [a["id"] for a in r.json()["chats"][0]["unchanged"]] \
        == ["m0"]
    assert _state(app, "alice") == before, "nothing of alice's changed"
    bob_chats = bob.get(chats).json()["chats"]
    assert [(c["chat_id"], c["title"], c["message_count"]) for c in bob_chats] == \
        [("c1", "alice only", 4)]

    schema = app.openapi()
    every = {(method, path) for path, item in schema["paths"].items() for method in item}
    assert every <= walked, f"not walked: {every - walked}"
