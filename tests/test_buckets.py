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

import httpx
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


def change_there(remote: EmbeddedRemote, base: list[dict[str, Any]], added: int,
                 edited: list[int], copied: list[int], deleted: list[int]) -> None:
    """The backend's changes to chat "c" since ``base``: messages added, edited (over rev
    1), retry copies of some, some deleted."""
    later = [wire("c", 200 + i) for i in range(added)]
    later += [wire("c", i, f"edited there {i}", base_rev=1) for i in edited]
    later += [{**base[i], "id": f"copy-there-{i}"} for i in copied]
    if later:
        remote.save("c", save_body(*later), "later")
    if deleted:
        remote.delete("c", json.dumps({"ids": [f"m{i}" for i in deleted]}).encode(),
                      "deleted")


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
        change_there(remote, base, there, edited, copied_there, deleted)

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


def big_chat_saved_then_edited_here(cli: Callable[..., Ran], home: Path, url: str) -> None:
    """Chat "big" of 3,000 messages (three pages of the server's 1,000) saved to ``url``,
    then message m1234 edited here."""
    lines = [json.dumps(wire("big", n)) for n in range(3000)]
    (home / "big.jsonl").write_text("\n".join(lines) + "\n")
    assert cli("import", str(home / "big.jsonl"), "-q").exit_code == 0
    assert cli("save", "--all", "--remote", url, "-q").exit_code == 0
    (home / "edit.jsonl").write_text(json.dumps(wire("big", 1234, "edited here")) + "\n")
    assert cli("import", "--update", str(home / "edit.jsonl"), "-q").exit_code == 0


def test_diff_of_a_big_chat_reads_only_the_bucket_that_differs(
        cli: Callable[..., Ran], home: Path, live_server: LiveServer) -> None:
    """3,000 messages (three pages of the server's 1,000): one edited here, so diff asks
    for the digests, the buckets and one page of one bucket, not the three pages."""
    big_chat_saved_then_edited_here(cli, home, live_server.url)
    ran = cli("diff", "--all", "--remote", live_server.url, "--json")
    assert ran.exit_code == 1, ran.stderr
    summary = ran.summary
    assert summary["unchanged"] == 2999 and summary["conflicts"] == 1
    items = [x for x in ran.json_lines() if x["type"] == "item"]
    assert [(x["id"], x["symbol"]) for x in items] == [("m1234", "*")]
    # The chat list, the buckets, one page of the edited message's two buckets, and the
    # capabilities (counted as one): reading the whole chat would take three pages.
    assert summary["requests"] == 4, summary


# -------------------------------------------------------------------------------- sync
def _sync_end(tmp: Path, by_buckets: bool) -> tuple[Any, ...]:
    """Sync a copy of the scenario in ``tmp``; what the run said and what both sides hold."""
    from unittest import mock

    from chatsave.ops import compare
    from chatsave.ops.sync import SyncOptions, sync
    from chatsave.store.base import hash_sql

    used: list[list[str] | None] = []
    read = Comparer.fetch_buckets

    def spy(self: Comparer, chat_id: str) -> list[str] | None:
        used.append(read(self, chat_id))
        return used[-1]

    with mock.patch.object(compare, "BUCKETS_FROM", 0 if by_buckets else 10 ** 9), \
            mock.patch.object(Comparer, "fetch_buckets", spy), \
            EmbeddedRemote(tmp / "backend.db", settings=SETTINGS) as remote, \
            Store.open(tmp / "store.db") as store:
        result = sync(store, remote, None, SyncOptions())
        here = sorted(store.message_keys("c"))
        tombstones = sorted(store.tombstone_hashes("c").items())
        states = sorted(store.conn.execute(
            f"SELECT id, state, rev, {hash_sql('content_hash')}, reason FROM remote_state"))
        there: list[tuple[str, str, bool]] = []
        after = None
        while True:
            page = remote.messages("c", after=after, include_deleted=True)
            there += [(m.id, m.content_hash, m.deleted) for m in page.messages]
            if page.next is None:
                break
            after = page.next
    counters = {k: v for k, v in result.counters.items() if v}
    return result.exit_code, counters, here, tombstones, states, there, used


@given(n=st.integers(12, 40), here=st.integers(0, 3), there=st.integers(0, 3),
       both=st.integers(0, 3), edited=ids, deleted=ids, deleted_here=ids, edited_here=ids,
       copied_there=ids)
def test_sync_of_a_chat_read_by_buckets_ends_as_reading_the_whole_chat(
        n: int, here: int, there: int, both: int, edited: list[int], deleted: list[int],
        deleted_here: list[int], edited_here: list[int], copied_there: list[int]) -> None:
    """Both sides changed since they last agreed: added, edited, deleted on either side,
    the same message added on both (in agreement, not confirmed here yet), a retry copy
    there. Sync by buckets pulls, pushes, deletes, confirms (with the backend's revision)
    and reports as sync reading the whole chat, and leaves both sides the same."""
    import shutil

    from chatsave.ops.sync import SyncOptions, sync

    pick = sorted({i for i in edited + deleted + deleted_here + edited_here if i < n})
    # One change per message, each side's kind by where it was drawn first.
    edited, deleted = [i for i in pick if i in edited], []
    for i in pick:
        if i not in edited and i in deleted:
            deleted.append(i)
    taken = set(edited) | set(deleted)
    deleted_here = [i for i in pick if i in deleted_here and i not in taken]
    edited_here = [i for i in pick if i in edited_here and i not in taken
                   and i not in deleted_here]
    copied_there = [i for i in copied_there if i < n]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with EmbeddedRemote(root / "backend.db", settings=SETTINGS) as remote, \
                Store.open(root / "store.db") as store:
            base = [wire("c", i) for i in range(n)]
            with store.transaction():
                store.upsert_chat("c", None)
                store.add_messages("c", [Message.model_validate(m) for m in base])
            assert sync(store, remote, None, SyncOptions()).exit_code == 0
            alike = [wire("c", 300 + i) for i in range(both)]
            if alike:
                remote.save("c", save_body(*alike), "alike")
            with store.transaction():
                store.add_messages("c", [Message.model_validate(wire("c", 100 + i))
                                         for i in range(here)])
                store.add_messages("c", [Message.model_validate(m) for m in alike])
                if deleted_here:
                    store.trash_messages("c", [f"m{i}" for i in deleted_here], "test", None)
                for i in edited_here:
                    store.replace_message(Message.model_validate(
                        wire("c", i, f"edited here {i}")), None, "test")
            change_there(remote, base, there, edited, copied_there, deleted)
        for name in ("whole", "parts"):
            (root / name).mkdir()
            for f in ("backend.db", "store.db"):
                shutil.copy(root / f, root / name / f)
        *whole, not_used = _sync_end(root / "whole", by_buckets=False)
        *parts, used = _sync_end(root / "parts", by_buckets=True)
        assert not any(not_used)
        assert parts == whole
        exit_code, _, here_end, _, _, there_end = parts
        assert exit_code == 0
        assert here_end == sorted((m, h) for m, h, d in there_end if not d)
        changed = here or there or edited or deleted or deleted_here or edited_here
        if changed and not copied_there:
            assert any(used), "read by buckets"


def test_sync_of_a_big_chat_reads_only_the_buckets_that_differ(
        cli: Callable[..., Ran], home: Path, live_server: LiveServer) -> None:
    """3,000 messages: one edited here and one added there since they agreed; sync reads
    the two buckets of the edit and the bucket of the addition, not the three pages, sends
    the edit, pulls the addition, and both sides agree after."""
    big_chat_saved_then_edited_here(cli, home, live_server.url)
    added = httpx.post(f"{live_server.url}/api/v1/chats/big/save", timeout=10,
                       content=save_body(wire("big", 5000)), headers={"Idempotency-Key": "k"})
    assert added.status_code == 200, added.text
    ran = cli("sync", "--all", "--remote", live_server.url, "--json")
    assert ran.exit_code == 0, ran.stderr
    summary = ran.summary
    assert summary["pulled"] == 1 and summary["written"] == 1, summary
    # The capabilities, the chat list, the buckets and one page of the three that differ
    # (six when the whole chat is read).
    assert summary["requests"] == 4, summary
    again = cli("diff", "--all", "--remote", live_server.url, "--json")
    assert again.exit_code == 0 and again.summary["unchanged"] == 3001, again.summary
