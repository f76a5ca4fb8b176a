"""Protocol v1 contract, one suite over three back ends: embedded, HTTP/SQLite, HTTP/PostgreSQL.

Each test talks to the backend through the Remote interface the client core uses
(EmbeddedRemote, or HttpRemote against a real uvicorn server), so every semantic is checked
on both transports and both storage engines.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage import open_storage
from chatsave.errors import BadAnswerError, RefusedError, RequestRejectedError, TooLargeError
from chatsave.model import Message, chat_digest
from chatsave.remote.base import Remote
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.app import create_app
from tests.server_fixtures import LiveServer, PgCluster

SETTINGS = ServerSettings(rate_per_s=0, housekeeping_interval_s=0, max_batch_messages=50,
                          max_content_bytes=4096)
FAST = RetryPolicy(attempts=2, base=0.01, cap=0.05)


@dataclass
class Backend:
    kind: str
    open: Callable[[str], Remote]  # user -> Remote for that user


@pytest.fixture(params=["embedded", "http-sqlite",
                        pytest.param("http-postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            tokens_file: Callable[..., tuple[Path, dict[str, str]]],
            start_server: Callable[[Any], LiveServer]) -> Iterator[Backend]:
    remotes: list[Remote] = []
    kind = request.param
    if kind == "embedded":
        path = tmp_path / "backend.db"

        def open_embedded(user: str) -> Remote:
            remote = EmbeddedRemote(path, settings=SETTINGS, user=user, policy=FAST)
            remotes.append(remote)
            return remote

        yield Backend(kind, open_embedded)
    else:
        if kind == "http-postgres":
            cluster: PgCluster = request.getfixturevalue("pg_cluster")
            storage = open_storage(cluster.create_database())
        else:
            storage = open_storage(tmp_path / "server.db")
        tokens, by_user = tokens_file("alice", "bob")
        server = start_server(create_app(storage, settings=SETTINGS, tokens=tokens))

        def open_http(user: str) -> Remote:
            remote = HttpRemote(server.url, token=by_user[user], policy=FAST)
            remotes.append(remote)
            return remote

        try:
            yield Backend(kind, open_http)
        finally:
            server.stop()
            storage.close()
    for remote in remotes:
        remote.close()


@pytest.fixture
def alice(backend: Backend) -> Remote:
    return backend.open("alice")


@pytest.fixture
def bob(backend: Backend) -> Remote:
    return backend.open("bob")


def msg(mid: str, content: str = "hello", chat: str = "c1", **extra: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {"chat_id": chat, "id": mid, "role": "user", "content": content,
                            "created_at": "2026-01-01T10:00:00.000Z"}
    wire.update(extra)
    return wire


def chash(wire: dict[str, Any]) -> str:
    fields = {k: v for k, v in wire.items() if k not in ("base_rev", "content_hash")}
    return Message.model_validate(fields).content_hash


def body(*messages: dict[str, Any], title: str | None = None) -> bytes:
    doc: dict[str, Any] = {"messages": list(messages)}
    if title is not None:
        doc["title"] = title
    return json.dumps(doc).encode()


def key() -> str:
    return uuid.uuid4().hex


def save(remote: Remote, *messages: dict[str, Any], chat: str = "c1",
         title: str | None = None) -> Any:
    return remote.save(chat, body(*messages, title=title), key())


def delete(remote: Remote, *ids: str | dict[str, Any], chat: str = "c1") -> Any:
    return remote.delete(chat, json.dumps({"ids": list(ids)}).encode(), key())


def live(remote: Remote, chat: str = "c1") -> dict[str, Any]:
    return {m.id: m for m in remote.messages(chat, include_deleted=True).messages}


# -- capabilities ----------------------------------------------------------------------------


def test_capabilities(alice: Remote, backend: Backend) -> None:
    caps = alice.capabilities()
    assert caps.protocol == 1
    assert caps.server.startswith("chatsave/")
    assert str(uuid.UUID(caps.backend_id)) == caps.backend_id
    assert caps.max_page >= 1000
    assert caps.max_batch_messages == 50
    assert caps.idempotency_retention_s >= 24 * 3600
    assert caps.max_content_bytes == 4096
    assert backend.open("bob").capabilities().backend_id == caps.backend_id


# -- save semantics --------------------------------------------------------------------------


def test_insert_then_unchanged(alice: Remote) -> None:
    m1, m2 = msg("m1"), msg("m2", "second")
    first = save(alice, m1, m2, title="Chat one")
    assert [(a.id, a.rev, a.content_hash) for a in first.saved] == \
        [("m1", 1, chash(m1)), ("m2", 1, chash(m2))]
    assert first.version == 1 and not first.unchanged and not first.conflicts

    again = save(alice, m1, m2)
    assert again.saved == [] and [a.id for a in again.unchanged] == ["m1", "m2"]
    assert again.version == 1, "a request that changed nothing does not bump the version"

    page = alice.messages("c1")
    assert [(m.id, m.seq, m.rev, m.content) for m in page.messages] == \
        [("m1", 1, 1, "hello"), ("m2", 2, 1, "second")]
    assert page.version == 1 and page.next is None
    info = alice.list_chats().chats
    assert [(c.chat_id, c.title, c.version, c.message_count) for c in info] == \
        [("c1", "Chat one", 1, 2)]
    assert info[0].digest == chat_digest([("m1", chash(m1)), ("m2", chash(m2))])


def test_wire_fields_round_trip(alice: Remote) -> None:
    wire = msg("m1", "body", type="tool_call", metadata={"k": [1, 2]}, attachments=[{"a": 1}],
               extra={"sender": "bot", "x": None}, inexact=True)
    wire["role"] = "assistant"
    save(alice, wire)
    got = alice.messages("c1").messages[0]
    assert (got.role, got.content, got.type, got.metadata, got.attachments, got.extra,
            got.inexact, got.created_at) == \
        ("assistant", "body", "tool_call", {"k": [1, 2]}, [{"a": 1}],
         {"sender": "bot", "x": None}, True, "2026-01-01T10:00:00.000Z")
    assert got.content_hash == chash(wire)


def test_conflict_different_content_changes_nothing(alice: Remote) -> None:
    original = msg("m1", "original")
    save(alice, original)
    answer = save(alice, msg("m1", "changed"), msg("m2"))
    assert [(c.id, c.reason, c.rev, c.content_hash) for c in answer.conflicts] == \
        [("m1", "different_content", 1, chash(original))]
    assert [a.id for a in answer.saved] == ["m2"]
    assert live(alice)["m1"].content == "original"


def test_base_rev_overwrite_and_stale(alice: Remote) -> None:
    save(alice, msg("m1", "v1"))
    v2 = msg("m1", "v2", base_rev=1)
    answer = save(alice, v2)
    assert [(a.id, a.rev, a.content_hash) for a in answer.saved] == [("m1", 2, chash(v2))]
    assert answer.version == 2
    assert live(alice)["m1"].content == "v2"

    stale = save(alice, msg("m1", "v3", base_rev=1))
    assert [(c.id, c.reason, c.rev) for c in stale.conflicts] == [("m1", "stale_base_rev", 2)]
    assert live(alice)["m1"].content == "v2" and stale.version == 2

    same = save(alice, msg("m1", "v2", base_rev=2))
    assert [a.rev for a in same.unchanged] == [2], "identical body with base_rev: no new rev"


def test_tombstones_and_restore(alice: Remote) -> None:
    m1, m2 = msg("m1", "keep"), msg("m2", "remove")
    save(alice, m1, m2)
    answer = delete(alice, "m2", "nope")
    assert [(a.id, a.rev, a.content_hash) for a in answer.deleted] == [("m2", 2, chash(m2))]
    assert answer.missing == ["nope"] and answer.version == 2

    assert [m.id for m in alice.messages("c1").messages] == ["m1"]
    tomb = alice.messages("c1", include_deleted=True).messages[1]
    assert (tomb.id, tomb.deleted, tomb.rev, tomb.seq, tomb.content_hash) == \
        ("m2", True, 2, 2, chash(m2))
    assert tomb.content is None and tomb.role is None, "tombstones carry no body"
    info = alice.digests(["c1"])
    assert info.digests["c1"] == chat_digest([("m1", chash(m1))])
    assert alice.list_chats().chats[0].message_count == 1

    resurrect = save(alice, m2)
    assert [(c.id, c.reason, c.rev) for c in resurrect.conflicts] == [("m2", "deleted", 2)]
    assert resurrect.version == 2

    restored = save(alice, dict(m2, base_rev=2))
    assert [(a.id, a.rev) for a in restored.saved] == [("m2", 3)]
    entry = live(alice)["m2"]
    assert (entry.deleted, entry.content, entry.seq) == (False, "remove", 2), \
        "restore keeps the seq"
    assert alice.digests(["c1"]).digests["c1"] == \
        chat_digest([("m1", chash(m1)), ("m2", chash(m2))])


def test_delete_semantics(alice: Remote) -> None:
    save(alice, msg("m1"), msg("m2"))
    stale = delete(alice, {"id": "m1", "base_rev": 7})
    assert [(c.id, c.reason, c.rev) for c in stale.conflicts] == [("m1", "stale_base_rev", 1)]
    assert stale.deleted == [] and stale.version == 1
    ok = delete(alice, {"id": "m1", "base_rev": 1})
    assert [(a.id, a.rev) for a in ok.deleted] == [("m1", 2)] and ok.version == 2
    again = delete(alice, "m1")
    assert [(a.id, a.rev) for a in again.deleted] == [("m1", 2)], "already a tombstone"
    assert again.version == 2, "deleting a tombstone changes nothing"


def test_version_counts_changing_requests(alice: Remote) -> None:
    versions = [save(alice, msg("a")).version, save(alice, msg("a")).version,
                save(alice, msg("b")).version, delete(alice, "a").version,
                save(alice, msg("b"), title="t").version, save(alice, title="t").version]
    assert versions == [1, 1, 2, 3, 4, 4]


def test_rejected_items_do_not_block_the_batch(alice: Remote) -> None:
    good = msg("ok")
    items: list[Any] = [
        good,
        msg("r1", role="robot"),
        {"id": "r2", "role": "user", "content": "x"},  # no created_at
        msg("r3", chat="other"),
        msg("r4", content_hash="0" * 64),
        msg("r5", "x" * 5000),
        msg("r6", unknown_field=1),
        msg("bad\nid"),
        "not an object",
        msg("r7", base_rev="1"),
        msg("ok2", content_hash=chash(msg("ok2"))),
    ]
    answer = alice.save("c1", json.dumps({"messages": items}).encode(), key())
    assert [a.id for a in answer.saved] == ["ok", "ok2"]
    rejected = {r.id: r.reason for r in answer.rejected}
    assert set(rejected) == {"r1", "r2", "r3", "r4", "r5", "r6", "r7", "bad\nid", None}
    assert "control characters" in rejected["bad\nid"]
    assert "content_hash" in rejected["r4"] and "4096" in rejected["r5"]
    assert "other" in rejected["r3"]
    assert len(answer.rejected) == 9 and rejected[None].startswith("not a JSON object")
    assert sorted(live(alice)) == ["ok", "ok2"]


def test_all_rejected_creates_no_chat(alice: Remote) -> None:
    answer = save(alice, msg("bad", role="nobody"), chat="ghost")
    assert answer.version == 0 and len(answer.rejected) == 1
    assert alice.digests(["ghost"]).digests == {"ghost": None}


def test_duplicate_id_in_batch(alice: Remote) -> None:
    answer = save(alice, msg("m1", "one"), msg("m1", "two"))
    assert [a.id for a in answer.saved] == ["m1"]
    assert [(r.id, r.reason) for r in answer.rejected] == [("m1", "duplicate id in this batch")]


# -- paging ----------------------------------------------------------------------------------


def test_message_paging_by_seq(alice: Remote) -> None:
    save(alice, *[msg(f"m{i:02d}", f"text {i}") for i in range(7)])
    delete(alice, "m03")
    seen, after, pages = [], None, 0
    while True:
        page = alice.messages("c1", after=after, limit=3)
        pages += 1
        seen += [(m.id, m.seq) for m in page.messages]
        if page.next is None:
            break
        after = page.next
        assert pages < 10
    assert [s for _, s in seen] == [1, 2, 3, 5, 6, 7]
    with_tombs = alice.messages("c1", limit=1000, include_deleted=True).messages
    assert [m.seq for m in with_tombs] == list(range(1, 8))


def test_chat_list_paging_and_digests(alice: Remote) -> None:
    chats = [f"chat-{i}" for i in range(5)]
    for chat in chats:
        save(alice, msg("m", chat=chat), chat=chat)
    seen, after = [], None
    for _ in range(10):
        page = alice.list_chats(after=after, limit=2)
        seen += [c.chat_id for c in page.chats]
        if page.next is None:
            break
        after = page.next
    assert seen == chats
    digests = alice.digests([*chats[:2], "unknown"])
    assert digests.digests["unknown"] is None and digests.versions["unknown"] is None
    assert digests.digests["chat-0"] == chat_digest([("m", chash(msg("m", chat="chat-0")))])
    assert digests.versions["chat-1"] == 1


# -- idempotency -----------------------------------------------------------------------------


def test_replay_returns_the_stored_answer(alice: Remote) -> None:
    k = key()
    payload = body(msg("m1"), msg("m2"))
    first = alice.save("c1", payload, k)
    delete(alice, "m1")
    replay = alice.save("c1", payload, k)
    assert replay == first, "the replay is the first answer, not a re-execution"
    assert live(alice)["m1"].deleted, "the replay changed nothing"


def test_key_reused_with_another_body(alice: Remote) -> None:
    k = key()
    alice.save("c1", body(msg("m1")), k)
    with pytest.raises(RequestRejectedError) as err:
        alice.save("c1", body(msg("m2")), k)
    assert err.value.details is None or "idempotency" in str(err.value)
    assert "m2" not in live(alice)


def test_missing_key_is_refused(alice: Remote) -> None:
    with pytest.raises(RefusedError, match="idempotency_key_missing"):
        alice.save("c1", body(msg("m1")), "")
    assert alice.digests(["c1"]).digests["c1"] is None


# -- request-level errors --------------------------------------------------------------------


def test_invalid_chat_id(alice: Remote) -> None:
    for bad in ("null", "a/b", "x" * 129, " "):
        with pytest.raises(RequestRejectedError, match="invalid_chat_id"):
            alice.save(bad, body(msg("m1", chat=bad)), key())


def test_batch_too_large(alice: Remote) -> None:
    with pytest.raises(TooLargeError, match="batch_too_large"):
        save(alice, *[msg(f"m{i}") for i in range(51)])
    with pytest.raises(TooLargeError, match="batch_too_large"):
        delete(alice, *[f"m{i}" for i in range(51)])


def test_malformed_bodies(alice: Remote) -> None:
    # A body no backend can read is that batch's rejection (exit 4), not the backend's
    # refusal of the run.
    with pytest.raises(RequestRejectedError, match="malformed_json"):
        alice.save("c1", b"{not json", key())
    with pytest.raises(RequestRejectedError, match="invalid_request"):
        alice.save("c1", b'{"messages": {}}', key())
    with pytest.raises(RequestRejectedError, match="invalid_request"):
        alice.save("c1", b'{"messages": [], "surprise": 1}', key())


# -- users -----------------------------------------------------------------------------------


def test_users_are_isolated(alice: Remote, bob: Remote) -> None:
    save(alice, msg("m1", "alice's"), title="private")
    assert bob.list_chats().chats == []
    assert bob.digests(["c1"]).digests == {"c1": None}
    page = bob.messages("c1", include_deleted=True)
    assert page.messages == [] and page.version == 0
    with pytest.raises(RefusedError, match="not_found"):
        delete(bob, "m1")

    mine = save(bob, msg("m1", "bob's own"))
    assert [a.rev for a in mine.saved] == [1] and mine.version == 1, \
        "the same chat id is a different chat for another user"
    assert live(alice)["m1"].content == "alice's"
    assert live(bob)["m1"].content == "bob's own"
    assert alice.list_chats().chats[0].title == "private"
    assert bob.list_chats().chats[0].title is None


def test_unusual_text_round_trips(alice: Remote) -> None:
    odd = msg("odd", "nul\u0000 tab\t emoji \U0001f600 rtl \u05e9\u05dc\u05d5\u05dd",
              metadata={"big": 123456789012345678901234567890, "k\u00e9y": [None, True, 1.5]},
              extra={"\u65e5\u672c": "\u0000"})
    answer = save(alice, odd, msg("m:1@x~y.z-_", "id characters"))
    assert [a.id for a in answer.saved] == ["odd", "m:1@x~y.z-_"]
    got = live(alice)["odd"]
    assert (got.content, got.metadata, got.extra) == \
        (odd["content"], odd["metadata"], odd["extra"])
    assert got.content_hash == chash(odd)


def test_items_json_cannot_carry_are_rejected(alice: Remote) -> None:
    deep: Any = 1
    for _ in range(40):
        deep = {"a": deep}
    head = '"role": "user", "created_at": "2026-01-01T00:00:00Z"'
    raw = ('{"messages": ['
           f'{{"id": "sur", "content": "\\ud800", {head}}},'
           f'{{"id": "inf", "content": "x", {head}, "metadata": {{"n": 1e400}}}},'
           f'{{"id": "deep", "content": "x", {head}, "metadata": {json.dumps(deep)}}},'
           f'{{"id": "ok", "content": "x", {head}}}]}}')
    answer = alice.save("c1", raw.encode(), key())
    assert [a.id for a in answer.saved] == ["ok"]
    reasons = {r.id: r.reason for r in answer.rejected}
    assert set(reasons) == {"sur", "inf", "deep"}
    assert "Unicode" in reasons["sur"] and "Infinity" in reasons["inf"]
    assert "nested deeper" in reasons["deep"]
    unknown = alice.delete("c1", b'{"ids": ["\\ud800"]}', key())
    assert unknown.missing == ["\ud800"], "echoed back escaped, not a 500"
    assert alice.digests(["\ud800"]).digests == {"\ud800": None}


# -- saves of several chats (feature "saves") -------------------------------------------------


def saves(*parts: tuple[str, list[dict[str, Any]]], title: str | None = None) -> bytes:
    chats = []
    for chat, messages in parts:
        part: dict[str, Any] = {"chat_id": chat, "messages": messages}
        if title is not None:
            part["title"] = title
        chats.append(part)
    return json.dumps({"chats": chats}).encode()


def test_saves_answers_each_chat_as_its_own_save_would(alice: Remote) -> None:
    assert "saves" in alice.capabilities().features
    save(alice, msg("a0", chat="c1"), chat="c1")
    save(alice, msg("b2", "first", chat="c2"), chat="c2")
    payload = saves(("c2", [msg("b1", chat="c2"), msg("b2", "second", chat="c2"),
                            msg("b3", chat="c2", role="robot")]),
                    ("c1", [msg("a0", chat="c1"), msg("a1", chat="c1")]),
                    ("c3", [msg("n1", chat="c3")]), title="Shared")
    k = key()
    c2, c1, c3 = alice.save_many(["c2", "c1", "c3"], payload, k)
    assert [a.id for a in c2.saved] == ["b1"]
    assert [(c.id, c.reason) for c in c2.conflicts] == [("b2", "different_content")]
    assert [r.id for r in c2.rejected] == ["b3"]
    assert [a.id for a in c1.unchanged] == ["a0"] and [a.id for a in c1.saved] == ["a1"]
    assert [a.id for a in c3.saved] == ["n1"] and c3.version == 1
    assert c1.saved[0].content_hash == chash(msg("a1", chat="c1"))
    assert set(live(alice, "c1")) == {"a0", "a1"} and set(live(alice, "c2")) == {"b1", "b2"}
    assert live(alice, "c2")["b2"].content_hash == chash(msg("b2", "first", chat="c2"))
    titles = {c.chat_id: c.title for c in alice.list_chats().chats}
    assert titles == {"c1": "Shared", "c2": "Shared", "c3": "Shared"}
    # The same request again is the first answer, replayed; the key with another body is
    # refused; the answers must name the chats asked, in order.
    delete(alice, "a1", chat="c1")
    assert alice.save_many(["c2", "c1", "c3"], payload, k) == [c2, c1, c3]
    assert live(alice, "c1")["a1"].deleted, "the replay changed nothing"
    with pytest.raises(RequestRejectedError, match="idempotency_key_reused"):
        alice.save_many(["c1"], saves(("c1", [msg("a9", chat="c1")])), k)
    with pytest.raises(BadAnswerError, match="other or reordered"):
        alice.save_many(["c1", "c2"], saves(("c2", [msg("x1", chat="c2")]),
                                            ("c1", [msg("x2", chat="c1")])), key())


@pytest.mark.parametrize("parts, error, code", [
    ((("c1", [msg("m1")]), ("a/b", [msg("m2", chat="a/b")])), RequestRejectedError,
     "invalid_chat_id"),
    ((("c1", [msg("m1")]), ("c1", [msg("m2")])), RequestRejectedError, "named twice"),
    ((("c1", [msg(f"m{i}") for i in range(30)]),
      ("c2", [msg(f"m{i}", chat="c2") for i in range(21)])), TooLargeError, "batch_too_large"),
    ((), RequestRejectedError, "at least one chat"),
], ids=["invalid chat id", "chat twice", "messages over the limit", "no chat"])
def test_saves_refused_whole_applies_nothing(alice: Remote, parts: Any, error: type,
                                             code: str) -> None:
    with pytest.raises(error, match=code):
        alice.save_many([chat for chat, _ in parts], saves(*parts), key())
    assert alice.list_chats().chats == []


def test_saves_keeps_users_apart(alice: Remote, bob: Remote) -> None:
    k = key()
    payload = saves(("c1", [msg("m1")]))
    alice.save_many(["c1"], payload, k)
    assert bob.list_chats().chats == []
    (answer,) = bob.save_many(["c1"], payload, k)  # the same key is bob's own
    assert [a.id for a in answer.saved] == ["m1"]


def test_saves_naming_the_same_new_chats_in_opposite_orders_both_apply(
        backend: Backend) -> None:
    """Two writers creating the same chats at once, naming them in opposite orders: both
    apply whole, each chat holding both messages. (The service locks and creates chats in
    id order whatever the request's order, so that no two such transactions wait for each
    other in a cycle; this run did not produce a deadlock without that order either.)"""
    import threading

    errors: list[BaseException] = []
    rounds = 8

    def writer(name: str, reverse: bool) -> None:
        remote = backend.open("alice")
        try:
            for r in range(rounds):
                chats = [f"r{r}-c{i}" for i in range(6)]
                chats = chats[::-1] if reverse else chats
                parts = [(c, [msg(f"{name}-{c}", chat=c)]) for c in chats]
                answers = remote.save_many(chats, saves(*parts), key())
                assert [a.chat_id for a in answers] == chats
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n, n == "b")) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    reader = backend.open("alice")
    for r in range(rounds):
        for i in range(6):
            assert set(live(reader, f"r{r}-c{i}")) == {f"a-r{r}-c{i}", f"b-r{r}-c{i}"}
