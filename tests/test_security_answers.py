"""Untrusted answers: whatever a server (or what sits in front of it) answers, the client
reports a ChatsaveError or uses a validated answer; it never crashes.

Property tests over generated answers (status, headers, body: random bytes, truncated or
deeply nested JSON, near-valid protocol answers with one field broken, ...) for every
client call, through httpx.MockTransport in-process; then the same for the operations
that consume the answers (save, diff, sync, fetch), which must not trust a validated but
lying answer either.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsave.errors import ChatsaveError
from chatsave.ops.result import RunResult
from chatsave.protocol import (
    Capabilities,
    ChatPage,
    DeleteAnswer,
    DigestsAnswer,
    MessagePage,
    SaveAnswer,
)
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.store.base import hash_sql
from tests.conftest import examples

CAPS: dict[str, Any] = {"protocol": 1, "server": "chatsave/0.1", "backend_id": "b-1",
                        "max_batch_messages": 1000, "max_body_bytes": 8 << 20,
                        "max_page": 1000, "idempotency_retention_s": 86400, "features": []}
ACK = {"id": "m1", "rev": 1, "content_hash": "a" * 64}
VALID: dict[str, dict[str, Any]] = {
    "capabilities": CAPS,
    "chats": {"chats": [{"chat_id": "c1", "title": "t", "version": 1, "message_count": 1,
                         "digest": "d" * 64, "updated_at": "2026-01-01T00:00:00Z"}],
              "next": None},
    "digests": {"digests": {"c1": "d" * 64}, "versions": {"c1": 1}},
    "messages": {"chat_id": "c1", "version": 1, "next": None, "messages": [
        {"chat_id": "c1", "id": "m1", "seq": 1, "rev": 1, "content_hash": "a" * 64,
         "role": "user", "content": "hi", "created_at": "2026-01-01T00:00:00.000Z",
         "type": "message", "metadata": {}, "attachments": [], "extra": {}}]},
    "save": {"chat_id": "c1", "version": 2, "saved": [ACK], "unchanged": [],
             "conflicts": [{**ACK, "reason": "different_content"}],
             "rejected": [{"id": "m2", "reason": "bad"}]},
    "delete": {"chat_id": "c1", "version": 3, "deleted": [ACK], "missing": ["m9"],
               "conflicts": []},
}
MODELS: dict[str, type] = {"capabilities": Capabilities, "chats": ChatPage,
                           "digests": DigestsAnswer, "messages": MessagePage,
                           "save": SaveAnswer, "delete": DeleteAnswer}
CALLS: dict[str, Callable[[HttpRemote], Any]] = {
    "capabilities": lambda r: r.capabilities(),
    "chats": lambda r: r.list_chats(after="c0", limit=10),
    "digests": lambda r: r.digests(["c1", "c2"]),
    "messages": lambda r: r.messages("c1", after=0, include_deleted=True),
    "save": lambda r: r.save("c1", b'{"messages":[]}', "key-1"),
    "delete": lambda r: r.delete("c1", b'{"ids":[]}', "key-2"),
}
KEYS = sorted({k for doc in VALID.values() for k in doc}
              | {"chat_id", "id", "seq", "rev", "content_hash", "deleted", "role", "content",
                 "created_at", "reason", "error", "code", "message", "details"})

leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["", "c1", "m1", "null", "a" * 64, "../x", "\u202e", "\x00", "NaN"]),
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
    max_leaves=16,
)


@st.composite
def near_valid(draw: st.DrawFn, call: str) -> Any:
    """A valid answer for ``call`` with one to three places broken."""
    doc = json.loads(json.dumps(VALID[call]))
    for _ in range(draw(st.integers(1, 3))):
        # Walk to a random container and break one entry of it.
        node: Any = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["drop", "replace", "retype"]))
            if action == "drop" and isinstance(node, dict):
                del node[key]
            elif action == "retype":
                node[key] = draw(st.sampled_from([None, "x", -1, 1.5, [], {}, True,
                                                  2 ** 64, "9" * 50]))
            else:
                node[key] = draw(json_values)
            break
    return doc


def bodies(call: str) -> st.SearchStrategy[bytes]:
    valid = json.dumps(VALID[call]).encode()
    return st.one_of(
        near_valid(call).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=300),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated
        st.sampled_from([
            b"", b"null", b"[]", b"{}", b"NaN", b"Infinity", b"-Infinity", b"1e999999",
            b"9" * 5000, b"[" * 100 + b"]" * 100, b'{"a":' * 70 + b"1" + b"}" * 70,
            b"\xef\xbb\xbf" + valid, valid + b"garbage", b'"\\ud800"', b'{"chat_id":"\xff"}',
            valid.replace(b'"c1"', b'"\\ud83d"'), b'{"error": {"code": 1, "message": []}}',
            valid.replace(b"1", b"1" * 5000, 1), b"<html>502 Bad Gateway</html>",
        ]),
    )


STATUSES = st.one_of(st.sampled_from([200] * 6 + [201, 204, 206, 301, 302, 304, 400, 401,
                                                   403, 404, 409, 413, 422, 429, 431, 500,
                                                   502, 503, 504]),
                     st.integers(100, 599))
HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "application/json; charset=utf-8",
                                     "text/html", "text/plain", "application/problem+json",
                                     "", "APPLICATION/JSON", "application/x-ndjson"]),
    "retry-after": st.sampled_from(["", "0", "1", "-1", "1.5", "NaN", "1e3", "soon",
                                    "99999999999999999999", "Wed, 21 Oct 2015 07:28:00 GMT",
                                    "Wed, 21 Oct 2099 07:28:00 GMT", "Wed, 99 Foo 2015"]),
    "content-encoding": st.sampled_from(["gzip", "br", "deflate, gzip", "identity", "zstd",
                                         "x-unknown"]),
    "location": st.sampled_from(["https://elsewhere.example/", "/api/v1/x", "", "\\\\evil"]),
    "idempotent-replayed": st.sampled_from(["true", "maybe"]),
})


@st.composite
def answers(draw: st.DrawFn, call: str) -> tuple[int, dict[str, str], bytes]:
    status = draw(STATUSES)
    headers = {"content-type": "application/json", **draw(HEADERS)}
    return status, headers, draw(bodies(call))


class Replay:
    """A MockTransport handler answering the current example's answer, every attempt."""

    def __init__(self) -> None:
        self.answer: tuple[int, dict[str, str], bytes] = (200, {}, b"")
        self.count = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        status, headers, body = self.answer
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def _check(call: str, remote: HttpRemote) -> None:
    try:
        value = CALLS[call](remote)
    except ChatsaveError as exc:
        assert exc.message and isinstance(exc.message, str)
        assert int(exc.exit_code) in (2, 4, 8, 9), exc
        json.dumps(exc.to_json())  # reportable as --json
        return
    assert isinstance(value, MODELS[call])
    if call == "messages":
        assert value.chat_id == "c1"


def _run_property(call: str, example: tuple[int, dict[str, str], bytes], replay: Replay,
                  remote: HttpRemote) -> None:
    replay.answer = example
    replay.count = 0
    _check(call, remote)
    assert 1 <= replay.count <= 2


def _remote(replay: Replay) -> HttpRemote:
    return HttpRemote("http://127.0.0.1:9", token="t0ken", transport=httpx.MockTransport(replay),
                      policy=RetryPolicy(attempts=2, base=0, cap=0), max_answer_bytes=1 << 16)


# One property test over every call: 1,000 generated answers in all, no traceback.
@settings(max_examples=examples(1000), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), call=st.sampled_from(list(CALLS)))
def test_a_malformed_answer_is_a_clear_error_never_a_crash(data: st.DataObject,
                                                           call: str) -> None:
    example = data.draw(answers(call))
    replay = Replay()
    with mock.patch("chatsave.remote.http.time.sleep"), _remote(replay) as remote:
        _run_property(call, example, replay, remote)


def test_the_generator_reaches_every_kind_of_refusal() -> None:
    """The property test means something: its answers hit each way of refusing, and the
    untouched valid answers (the harness itself) are accepted."""
    seen: dict[str, set[str]] = {c: set() for c in CALLS}

    @settings(max_examples=examples(400), deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(data=st.data(), call=st.sampled_from(list(CALLS)))
    def probe(data: st.DataObject, call: str) -> None:
        replay = Replay()
        replay.answer = data.draw(answers(call))
        with mock.patch("chatsave.remote.http.time.sleep"), _remote(replay) as remote:
            try:
                CALLS[call](remote)
                seen[call].add("ok")
            except ChatsaveError as exc:
                seen[call].add(type(exc).__name__)

    probe()
    for call, kinds in seen.items():
        assert {"BadAnswerError", "RefusedError", "UnavailableError"} <= kinds, (call, kinds)
    for call in CALLS:
        replay = Replay()
        replay.answer = (200, {"content-type": "application/json"},
                         json.dumps(VALID[call]).encode())
        with _remote(replay) as remote:
            assert isinstance(CALLS[call](remote), MODELS[call])


# ------------------------------------------------------- answers the operations consume
def _lying_server(scripted: dict[str, Any]) -> Callable[[httpx.Request], httpx.Response]:
    """Valid-looking protocol answers, with what ``scripted`` replaces per endpoint."""

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        for name, suffix in (("capabilities", "/capabilities"), ("chats", "/chats"),
                             ("digests", "/digests"), ("messages", "/messages"),
                             ("save", "/save"), ("delete", "/delete")):
            if path.endswith(suffix):
                doc = scripted.get(name, VALID[name])
                return httpx.Response(200, json=doc)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    return answer


ids = st.sampled_from(["m0", "m1", "m2", "m-unknown", "", "../m0", "m0\u202e"])
hashes = st.sampled_from(["a" * 64, "0" * 64, "", "not-a-hash"])
acks = st.fixed_dictionaries({"id": ids, "rev": st.integers(-3, 3), "content_hash": hashes})
remote_messages = st.fixed_dictionaries(
    {"chat_id": st.sampled_from(["c1", "c2", "../c1"]), "id": ids,
     "seq": st.integers(-2, 5), "rev": st.integers(-2, 5), "content_hash": hashes},
    optional={"deleted": st.booleans(),
              "role": st.sampled_from(["user", "assistant", "hacker", "", None]),
              "content": st.one_of(st.none(), st.text(max_size=10)),
              "created_at": st.sampled_from(["2026-01-01T00:00:00.000Z", "yesterday", "",
                                             "2026-13-45T99:99:99Z", None, "12:00:00 PM"]),
              "type": st.sampled_from(["message", "", None]),
              "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=3),
                                                               leaves, max_size=2)),
              "attachments": st.one_of(st.none(), st.lists(leaves, max_size=2)),
              "extra": st.one_of(st.none(), st.just({"k": "v"}))})
lies = st.fixed_dictionaries({}, optional={
    "save": st.fixed_dictionaries({"chat_id": st.sampled_from(["c1", "c2"]),
                                   "version": st.integers(-1, 5),
                                   "saved": st.lists(acks, max_size=4),
                                   "unchanged": st.lists(acks, max_size=2),
                                   "conflicts": st.lists(acks.map(
                                       lambda a: {**a, "reason": "different_content"}),
                                       max_size=2),
                                   "rejected": st.lists(st.fixed_dictionaries(
                                       {"id": st.one_of(st.none(), ids),
                                        "reason": st.text(max_size=8)}), max_size=2)}),
    "chats": st.fixed_dictionaries({"chats": st.lists(st.fixed_dictionaries(
        {"chat_id": st.sampled_from(["c1", "c2", "../c1", "", "null", "a/b"]),
         "version": st.integers(-1, 5), "message_count": st.integers(-1, 5),
         "digest": hashes}), max_size=3), "next": st.sampled_from([None, "c1", ""])}),
    "digests": st.fixed_dictionaries({"digests": st.dictionaries(
        st.sampled_from(["c1", "c2", "zz"]), st.one_of(st.none(), hashes), max_size=3)}),
    "messages": st.fixed_dictionaries({"chat_id": st.just("c1"),
                                       "version": st.integers(-1, 5),
                                       "messages": st.lists(remote_messages, max_size=4),
                                       "next": st.sampled_from([None, None, 0, 1, -1])}),
    "delete": st.fixed_dictionaries({"chat_id": st.sampled_from(["c1", "c2"]),
                                     "version": st.integers(0, 3),
                                     "deleted": st.lists(acks, max_size=2),
                                     "missing": st.lists(ids, max_size=2)}),
})


def _seeded_store(root: Path) -> Any:
    from datetime import UTC, datetime, timedelta

    from chatsave.model import Message
    from chatsave.store.store import Store

    store = Store.open(root / "store.db")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with store.transaction():
        store.upsert_chat("c1", "chat one")
        store.add_messages("c1", [Message(chat_id="c1", id=f"m{i}", role="user",
                                          content=f"text {i}",
                                          created_at=t0 + timedelta(seconds=i))
                                  for i in range(3)])
    return store


@settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
@given(scripted=lies, op=st.sampled_from(["save", "diff", "sync", "pull", "fetch"]))
def test_operations_survive_answers_that_validate_but_lie(scripted: dict[str, Any],
                                                          op: str) -> None:
    from chatsave.ops.diff import diff
    from chatsave.ops.save import SaveOptions, save
    from chatsave.ops.sync import SyncOptions, sync

    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch("chatsave.remote.http.time.sleep"):
        store = _seeded_store(Path(tmp))
        remote = HttpRemote("http://127.0.0.1:9", transport=httpx.MockTransport(
            _lying_server(scripted)), policy=RetryPolicy(attempts=1))
        try:
            if op == "save":
                result = save(store, remote, None, SaveOptions(concurrency=1))
            elif op == "diff":
                result = diff(store, remote, None)
            elif op == "fetch":
                from chatsave.ops.fetch import fetch

                result = fetch(store, remote, None)
            else:
                options = SyncOptions(push=op == "sync", pull=True, concurrency=1)
                result = sync(store, remote, None, options)
            assert isinstance(result, RunResult)
            assert 0 <= int(result.exit_code) <= 10
            # Whatever was claimed, nothing is confirmed with a hash it does not have.
            rows = store.conn.execute(
                f"SELECT r.chat_id, r.id, {hash_sql('r.content_hash')}, m.content_hash"
                " FROM remote_state r "
                "JOIN messages m ON m.chat_id = r.chat_id AND m.id = r.id "
                "WHERE r.state = 'confirmed'").fetchall()
            for chat_id, mid, confirmed, local in rows:
                assert confirmed == local, (op, chat_id, mid, confirmed, local)
        except ChatsaveError as exc:
            json.dumps(exc.to_json())
        finally:
            remote.close()
            store.close()


def test_a_cursor_that_does_not_move_is_refused() -> None:
    """A server repeating its cursor would have diff/sync page forever (found by the
    property test above: it hung in ops.compare)."""
    cases = [
        ("chats", lambda r: r.list_chats(after="c5"), {"chats": [], "next": "c5"}),
        ("chats", lambda r: r.list_chats(), {**VALID["chats"], "next": "c0"}),
        ("chats", lambda r: r.list_chats(after="c1"), {**VALID["chats"], "next": "b"}),
        ("messages", lambda r: r.messages("c1", after=7), {**VALID["messages"], "next": 7}),
        ("messages", lambda r: r.messages("c1"), {**VALID["messages"], "next": 0}),
    ]
    for _name, call, doc in cases:
        replay = Replay()
        replay.answer = (200, {"content-type": "application/json"}, json.dumps(doc).encode())
        with _remote(replay) as remote:
            try:
                call(remote)
            except ChatsaveError as exc:
                assert "cursor does not move" in exc.message and exc.exit_code == 8
            else:
                raise AssertionError(f"accepted a cursor that does not move: {doc}")
    replay = Replay()
    replay.answer = (200, {"content-type": "application/json"},
                     json.dumps({**VALID["messages"], "next": 1}).encode())
    with _remote(replay) as remote:
        assert remote.messages("c1").next == 1
