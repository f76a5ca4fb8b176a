"""Reading a large chat by buckets (docs/protocol.md, "Buckets"): the server's digest of
each bucket and its pages of some buckets, on both storage engines; a client comparing a
chat by buckets sees every message as it would reading the whole chat, and reads the whole
chat wherever buckets could not show the same (retry copies, a chat changed meanwhile).

The comparison runs against the embedded backend (the server's own code, in-process) with
pages of five messages, so that small chats take the bucket path; the command-line test
reads a real server on 127.0.0.1 with its real page size."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsave.backend.settings import ServerSettings
from chatsave.model import Message, bucket_digests, chat_digest
from chatsave.ops.compare import SAME, Comparer, RemoteChat, Row
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.server.app import ChatsaveApp
from chatsave.store.store import Store
from tests.conftest import Ran
from tests.server_fixtures import AsgiClient, LiveServer

SETTINGS = ServerSettings(rate_per_s=0, housekeeping_interval_s=0)
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def wire(chat: str, n: int, text: str | None = None, **extra: Any) -> dict[str, Any]:
    minute, second = divmod(n, 60)
    return {"chat_id": chat, "id": f"m{n}", "role": "user" if n % 2 else "assistant",
            "content": text if text is not None else f"message {n}",
            "created_at": f"2026-01-01T{minute // 60:02d}:{minute % 60:02d}:{second:02d}Z",
            **extra}


def save_body(*messages: dict[str, Any]) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8),
                         st.binary(min_size=32, max_size=32).map(bytes.hex)),
                unique_by=lambda p: p[0], max_size=40))
def test_a_bucket_digest_is_the_chat_digest_of_its_messages(
        pairs: list[tuple[str, str]]) -> None:
    rows = sorted((h[:2], f"{mid}:{h}") for mid, h in pairs)
    assert bucket_digests(rows) == {
        b: chat_digest(p for p in pairs if p[1][:2] == b) for b in {h[:2] for _, h in pairs}}


# ------------------------------------------------------------------------ the server
@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres",
                                                           marks=pytest.mark.postgres)])
def test_the_server_answers_bucket_digests_and_pages_of_some_buckets(
        engine: str, request: pytest.FixtureRequest, tmp_path: Path,
        make_app: Callable[..., ChatsaveApp], asgi_client: Callable[..., AsgiClient]) -> None:
    location = request.getfixturevalue("pg_url") if engine == "postgres" \
        else str(tmp_path / "s.db")
    client = asgi_client(make_app(location))
    assert "buckets" in client.get("/api/v1/capabilities").json()["features"]
    assert client.post("/api/v1/chats/c/save", content=save_body(*(
        wire("c", n) for n in range(300))), headers={"Idempotency-Key": "k1"}).status_code == 200
    deleted = client.post("/api/v1/chats/c/delete", content=json.dumps(
        {"ids": ["m3", "m150", "m299"]}).encode(), headers={"Idempotency-Key": "k2"})
    assert deleted.status_code == 200, deleted.text
    rows = client.get("/api/v1/chats/c/messages",
                      params={"include_deleted": 1, "limit": 1000}).json()["messages"]
    live = [r for r in rows if not r["deleted"]]
    tombstones = [r["id"] for r in rows if r["deleted"]]
    assert len(live) == 297 and tombstones == ["m3", "m150", "m299"]

    answer = client.get("/api/v1/chats/c/buckets").json()
    expected = {b: chat_digest((r["id"], r["content_hash"]) for r in live
                               if r["content_hash"][:2] == b)
                for b in {r["content_hash"][:2] for r in live}}
    assert answer == {"chat_id": "c", "version": 2, "buckets": expected}
    assert 100 < len(expected) <= 256  # 297 messages spread over the 256 buckets

    chosen = sorted(expected)[::40]
    want_live = [r["id"] for r in live if r["content_hash"][:2] in chosen]
    read: list[dict[str, Any]] = []
    after = None
    while True:  # pages of 2: the filter and the cursor work together
        page = client.get("/api/v1/chats/c/messages", params={
            "buckets": ",".join(chosen), "include_deleted": 1, "limit": 2,
            **({"after": after} if after else {})}).json()
        read += page["messages"]
        if page["next"] is None:
            break
        after = page["next"]
    assert [r["id"] for r in read] == [r["id"] for r in rows if r["id"] in want_live
                                       or r["deleted"]], "every tombstone, in seq order"
    assert [r["seq"] for r in read] == sorted(r["seq"] for r in read)
    only_live = client.get("/api/v1/chats/c/messages",
                           params={"buckets": ",".join(chosen), "limit": 1000}).json()
    assert [r["id"] for r in only_live["messages"]] == want_live

    for wrong in ("zz", "", "0", "00,0g", "AB"):
        refused = client.get("/api/v1/chats/c/messages", params={"buckets": wrong})
        assert refused.status_code == 422, wrong
        assert refused.json()["error"]["code"] == "invalid_request"
    assert client.get("/api/v1/chats/nothing/buckets").status_code == 404


# ------------------------------------------------------------------------ the client
def _rows(store: Store, remote: EmbeddedRemote, by_buckets: bool
          ) -> tuple[list[tuple[Any, ...]], list[str] | None]:
    caps = remote.capabilities().model_copy(update={"max_page": 5})
    comparer = Comparer(store, remote, caps, by_buckets=by_buckets)
    used: list[list[str] | None] = []
    read = comparer.fetch_buckets

    def spy(chat_id: str) -> list[str] | None:
        used.append(read(chat_id))
        return used[-1]

    comparer.fetch_buckets = spy  # type: ignore[method-assign]
    local = store.chat_digests(["c"])["c"]
    answer = remote.digests(["c"])
    state, rows = comparer.compare("c", local, RemoteChat(answer.versions["c"] or 0,
                                                          answer.digests["c"]))
    assert state.fetched is (local != answer.digests["c"])

    def key(row: Row) -> tuple[Any, ...]:
        # A message in agreement has no backend revision when its bucket was not read.
        rev = None if row.base == SAME else row.remote_rev
        return (row.symbol, row.id, row.local_hash, row.remote_hash, row.remote_deleted,
                row.local_deleted, row.base, row.copy_of, rev)

    return [key(r) for r in rows], used[0] if used else None


ids = st.lists(st.integers(0, 39), unique=True, max_size=6)


@given(n=st.integers(12, 40), here=st.integers(0, 3), there=st.integers(0, 3),
       edited=ids, deleted=ids, copied_there=ids, copied_here=ids)
def test_a_chat_read_by_buckets_compares_as_the_whole_chat(
        n: int, here: int, there: int, edited: list[int], deleted: list[int],
        copied_there: list[int], copied_here: list[int]) -> None:
    edited, deleted = [i for i in edited if i < n], [i for i in deleted if i < n]
    copied_there = [i for i in copied_there if i < n]
    copied_here = [i for i in copied_here if i < n]
    deleted = [i for i in deleted if i not in edited]
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedRemote(Path(tmp) / "backend.db", settings=SETTINGS) as remote, \
            Store.open(Path(tmp) / "store.db") as store:
        base = [wire("c", i) for i in range(n)]
        remote.save("c", save_body(*base), "base")
        local = [Message.model_validate(m) for m in base]
        local += [Message.model_validate(wire("c", 100 + i)) for i in range(here)]
        local += [Message.model_validate({**base[i], "id": f"copy-here-{i}"})
                  for i in copied_here]
        with store.transaction():
            store.upsert_chat("c", None)
            store.add_messages("c", local)
        later = [wire("c", 200 + i) for i in range(there)]
        later += [wire("c", i, f"edited there {i}", base_rev=1) for i in edited]
        later += [{**base[i], "id": f"copy-there-{i}"} for i in copied_there]
        if later:
            remote.save("c", save_body(*later), "later")
        if deleted:
            remote.delete("c", json.dumps({"ids": [f"m{i}" for i in deleted]}).encode(),
                          "deleted")

        whole, not_used = _rows(store, remote, by_buckets=False)
        parts, used = _rows(store, remote, by_buckets=True)
        assert not_used is None
        assert parts == whole
        differs = here or there or edited or deleted or copied_there or copied_here
        if not differs:
            assert used is None  # digests agree: nothing is read at all
        elif copied_here or copied_there:
            assert used is None, "a search for retry copies needs the whole chat"
        else:
            assert used, "read by buckets"
            assert len(used) <= 2 * (here + there + len(edited) + len(deleted))


def test_a_chat_changed_between_its_buckets_and_its_pages_is_read_whole(
        tmp_path: Path) -> None:
    with EmbeddedRemote(tmp_path / "backend.db", settings=SETTINGS) as remote, \
            Store.open(tmp_path / "store.db") as store:
        base = [wire("c", i) for i in range(30)]
        remote.save("c", save_body(*base), "base")
        with store.transaction():
            store.upsert_chat("c", None)
            store.add_messages("c", [Message.model_validate(m) for m in base[:-1]])
        caps = remote.capabilities().model_copy(update={"max_page": 5})
        comparer = Comparer(store, remote, caps, by_buckets=True)
        pages = remote.bucket_messages

        def changing(*args: Any, **kwargs: Any) -> Any:
            remote.save("c", save_body(wire("c", 500)), f"meanwhile-{comparer.requests}")
            return pages(*args, **kwargs)

        remote.bucket_messages = changing  # type: ignore[method-assign]
        assert comparer.fetch_buckets("c") is None
        assert store.conn.execute("SELECT COUNT(*) FROM temp.remote_msgs").fetchone()[0] == 0


def test_diff_of_a_big_chat_reads_only_the_bucket_that_differs(
        cli: Callable[..., Ran], home: Path, live_server: LiveServer) -> None:
    """3,000 messages (three pages of the server's 1,000): one edited here, so diff asks
    for the digests, the buckets and one page of one bucket, not the three pages."""
    lines = [json.dumps(wire("big", n)) for n in range(3000)]
    (home / "big.jsonl").write_text("\n".join(lines) + "\n")
    assert cli("import", str(home / "big.jsonl"), "-q").exit_code == 0
    assert cli("save", "--all", "--remote", live_server.url, "-q").exit_code == 0
    (home / "edit.jsonl").write_text(json.dumps(wire("big", 1234, "edited here")) + "\n")
    assert cli("import", "--update", str(home / "edit.jsonl"), "-q").exit_code == 0
    ran = cli("diff", "--all", "--remote", live_server.url, "--json")
    assert ran.exit_code == 1, ran.stderr
    summary = ran.summary
    assert summary["unchanged"] == 2999 and summary["conflicts"] == 1
    items = [x for x in ran.json_lines() if x["type"] == "item"]
    assert [(x["id"], x["symbol"]) for x in items] == [("m1234", "*")]
    # The chat list, the buckets, one page of the edited message's two buckets, and the
    # capabilities (counted as one): reading the whole chat would take three pages.
    assert summary["requests"] == 4, summary
