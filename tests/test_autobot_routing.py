"""Chats whose id AutoBot's HTTP routes cannot carry: refused alone, before any request for them.

An id with '/' splits the path once AutoBot's server has decoded %2F (404); an id AutoBot's
validate_chat_session_id refuses is a 500 on the session routes chatsave reads through. Such
a chat is left out of save, sync and diff with the reason and the way out (autobot-dir on
the server); the other chats are done; the run ends with exit 9; its messages stay here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.errors import ChatRefusedError, ExitCode
from chatsave.model import renamed_chat_id
from chatsave.protocol import DigestsAnswer, MessagePage
from chatsave.remote.autobot.http import AutobotRemote, unroutable
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.store.store import Store
from tests.autobot_fake import FakeAutobot
from tests.conftest import Ran

BAD = "test/chat#1"  # as the web client had it; chatsave renames it on import
BAD_HERE = renamed_chat_id(BAD)
HASHED = "my#chat"  # routable once percent-encoded, refused by AutoBot's id validation
HASHED_HERE = renamed_chat_id(HASHED)
DOTTED = "my.chat"  # a valid id here, and one AutoBot's validation refuses
UUID = "3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f"
ASKED = ("chat#1", "test/", HASHED, DOTTED)  # in the fake's log of (decoded) paths


@pytest.fixture
def fake(tmp_path: Path, home: Path, start_server: Callable[[Any], Any],
         monkeypatch: pytest.MonkeyPatch) -> FakeAutobot:
    monkeypatch.setenv("CHATSAVE_RETRY_ATTEMPTS", "1")  # a 500 fails at once
    return FakeAutobot(tmp_path / "chats").serve(start_server)


def wire(chat_id: str, mid: str, text: str, minute: int) -> dict[str, Any]:
    return {"chat_id": chat_id, "id": mid, "role": "user", "content": text,
            "created_at": f"2026-03-01T10:{minute:02d}:00.000Z"}


def import_chats(cli: Callable[..., Ran], tmp_path: Path, *lines: dict[str, Any]) -> None:
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ran = cli("import", str(dump), "--rename-invalid")
    assert ran.exit_code == 0, ran.stderr


def events(ran: Ran, type_: str) -> list[dict[str, Any]]:
    return [e for e in ran.json_lines() if e["type"] == type_]


def asked_for(fake: FakeAutobot, *originals: str) -> list[tuple[str, str]]:
    """Requests the fake saw for these chats (its log holds decoded paths)."""
    return [(method, path) for method, path in fake.log
            if any(o in path for o in originals)]


def pending_here(home: Path, chat_id: str, backend_id: str) -> list[str]:
    with Store.open(home / "store.db") as store:
        rows = store.conn.execute(
            "SELECT m.id FROM messages m LEFT JOIN remote_state r ON r.backend_key ="
            " (SELECT backend_key FROM backends WHERE backend_id = ?)"
            " AND r.chat_id = m.chat_id AND r.id = m.id WHERE m.chat_id = ?"
            " AND r.state IS NULL ORDER BY m.ord", (backend_id, chat_id)).fetchall()
    return [r[0] for r in rows]


# ------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("original", [
    "c1", "null", "undefined", "default", "chat_1724200000000", "chat-1740823200123-4c086981",
    UUID, f"{UUID}-imported-123", f"{UUID}-a#b?c%d e", "x" * 245,
])
def test_ids_autobot_serves_are_not_refused(original: str) -> None:
    assert unroutable(original) is None


@pytest.mark.parametrize(("original", "why"), [
    ("", "empty"),
    (BAD, "'/'"),
    ("a%2Fb", "not a UUID"),  # a literal %2F: it reaches AutoBot as '%', then validation
    (HASHED, "not a UUID"),
    ("what?", "not a UUID"),
    ("my.chat", "not a UUID"),
    ("..", "path traversal"),
    ("a\\b", "path traversal"),
    ("a\0b", "path traversal"),
    ("x" * 256, "longer than 255"),
    ("x" * 246, "bytes long"),
    (f"{UUID}-" + "é" * 120, "bytes long"),
])
def test_ids_autobot_cannot_serve_are_refused_with_the_reason(original: str, why: str) -> None:
    reason = unroutable(original)
    assert reason is not None and why in reason


def test_the_fake_routes_and_validates_ids_as_autobot_does(fake: FakeAutobot) -> None:
    with httpx.Client(base_url=fake.url) as http:
        body = {"data": {"messages": [], "name": ""}}
        assert http.post("/api/chats/test%2Fchat%231/save", json=body).status_code == 404
        assert http.get("/api/chat/sessions/test%2Fchat%231/export").status_code == 404
        assert http.get("/api/chat/sessions/my%23chat/export").status_code == 500
        assert http.delete("/api/chat/sessions/my%23chat").status_code == 500
        assert http.post("/api/chats/my%23chat/save", json=body).status_code == 200
        assert http.get(f"/api/chat/sessions/{UUID}-a%23b/export").status_code == 200


# ------------------------------------------------------------------ the front door


def test_save_refuses_that_chat_alone_before_any_request(
        cli: Callable[..., Ran], tmp_path: Path, home: Path, fake: FakeAutobot) -> None:
    import_chats(cli, tmp_path, wire("c1", "u1", "hello", 0), wire(BAD, "b1", "lost?", 1),
                 wire(HASHED, "h1", "and me?", 2), wire(DOTTED, "d1", "me too?", 3))
    ran = cli("save", "--all", "--remote", fake.remote, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    assert [m["id"] for m in fake.stored("c1")] == ["u1"]  # the good chat is saved
    refused = {e["chat_id"]: e for e in events(ran, "refused")}
    assert set(refused) == {BAD_HERE, HASHED_HERE, DOTTED}
    assert "'/'" in refused[BAD_HERE]["reason"] and repr(BAD) in refused[BAD_HERE]["reason"]
    assert "not a UUID" in refused[HASHED_HERE]["reason"] and "'#'" in \
        refused[HASHED_HERE]["reason"]
    assert "not a UUID" in refused[DOTTED]["reason"]
    assert all("autobot-dir:PATH" in e["hint"] for e in refused.values())
    summary = ran.summary
    assert summary["written"] == 1 and summary["pending_push"] == 3
    assert {e["chat_id"]: e["pending_push"] for e in summary["refused"]} == \
        {BAD_HERE: 1, HASHED_HERE: 1, DOTTED: 1}
    assert asked_for(fake, *ASKED) == []
    backend = AutobotRemote(fake.remote).backend_id
    assert pending_here(home, BAD_HERE, backend) == ["b1"]
    assert pending_here(home, HASHED_HERE, backend) == ["h1"]
    assert pending_here(home, DOTTED, backend) == ["d1"]

    # Again, for a person: each refused chat named on stderr, with the reason and the way
    # out; the rest says it is done. Still no request for them.
    again = cli("save", "--all", "--remote", fake.remote)
    assert again.exit_code == ExitCode.REFUSED
    assert f"chat {BAD_HERE!r} was not saved (1 message(s) stay here, pending)" in again.stderr
    assert "autobot-dir:PATH" in again.stderr and "still pending" not in again.stderr
    assert asked_for(fake, *ASKED) == []


def test_sync_refuses_that_chat_alone_and_syncs_the_others(
        cli: Callable[..., Ran], tmp_path: Path, home: Path, fake: FakeAutobot) -> None:
    fake.put("c2", [{"id": "t1", "sender": "user", "text": "from the web client",
                     "messageType": "default", "metadata": None,
                     "timestamp": "2026-03-01 09:00:00"}])
    import_chats(cli, tmp_path, wire("c1", "u1", "hello", 0), wire("c2", "u2", "more", 3),
                 wire(BAD, "b1", "lost?", 1))
    for chats in (["c1", "c2", BAD_HERE], ["--all"]):
        ran = cli("sync", *chats, "--remote", fake.remote, "--json")
        assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
        assert [e["chat_id"] for e in events(ran, "refused")] == [BAD_HERE]
        assert [e["chat_id"] for e in ran.summary["refused"]] == [BAD_HERE]
        assert ran.summary["pending_push"] == 1
        assert asked_for(fake, *ASKED) == []
    assert [m["id"] for m in fake.stored("c1")] == ["u1"]
    assert [m["id"] for m in fake.stored("c2")] == ["t1", "u2"]
    with Store.open(home / "store.db") as store:
        assert store.get_message("c2", "t1") is not None  # pulled
    assert pending_here(home, BAD_HERE, AutobotRemote(fake.remote).backend_id) == ["b1"]

    human = cli("sync", "--all", "--remote", fake.remote)
    assert human.exit_code == ExitCode.REFUSED
    assert f"chat {BAD_HERE!r} was not synced" in human.stderr and "'/'" in human.stderr
    assert "autobot-dir:PATH" in human.stderr


def test_diff_reports_that_chat_and_compares_the_others(
        cli: Callable[..., Ran], tmp_path: Path, fake: FakeAutobot) -> None:
    fake.put("c1", [])
    import_chats(cli, tmp_path, wire("c1", "u1", "hello", 0), wire(BAD, "b1", "lost?", 1))
    ran = cli("diff", "--all", "--remote", fake.remote, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    chats = {e["chat_id"]: e for e in events(ran, "chat")}
    assert chats["c1"]["only_local"] == 1 and chats["c1"]["error"] is None
    assert "'/'" in chats[BAD_HERE]["error"]
    [refused] = ran.summary["refused"]
    assert refused["chat_id"] == BAD_HERE and "autobot-dir:PATH" in refused["hint"]
    assert [e["chat_id"] for e in events(ran, "refused")] == [BAD_HERE]
    assert "error" not in ran.summary  # the run itself did not fail
    assert asked_for(fake, *ASKED) == []
    human = cli("diff", "--all", "--remote", fake.remote)
    assert f"chat {BAD_HERE!r} was not compared" in human.stderr


def test_delete_keeps_the_tombstone_here_for_that_chat(
        cli: Callable[..., Ran], tmp_path: Path, fake: FakeAutobot) -> None:
    import_chats(cli, tmp_path, wire(BAD, "b1", "lost?", 1), wire(BAD, "b2", "again", 2))
    ran = cli("delete", BAD_HERE, "b1", "--yes", "--remote", fake.remote, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    assert [e["chat_id"] for e in ran.summary["refused"]] == [BAD_HERE]
    assert asked_for(fake, *ASKED) == []


def test_the_remote_never_sends_a_request_for_such_a_chat(fake: FakeAutobot) -> None:
    with AutobotRemote(fake.remote) as remote:
        here = remote.ids.local(BAD)
        assert here == BAD_HERE
        body = json.dumps({"messages": [wire(here, "b1", "x", 0)]}).encode()
        with pytest.raises(ChatRefusedError):
            remote.save(here, body, "key")
        with pytest.raises(ChatRefusedError):
            remote.messages(here)
        with pytest.raises(ChatRefusedError):
            remote.delete(here, b'{"ids": ["b1"]}', "key")
        answer = remote.digests([here, "c9"])
        assert answer.digests == {here: "autobot:unverified", "c9": None}
        assert remote.refusal("c9") is None
    assert asked_for(fake, *ASKED) == []


def test_a_refusal_met_only_on_the_way_leaves_that_chat_alone_too(
        fake: FakeAutobot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote that says nothing beforehand and refuses the chat when asked for it (here:
    AutoBot with its ``refusal`` silenced): the same outcome, per chat; a save's batch for
    it stays open under its key."""
    from datetime import UTC, datetime

    from chatsave.model import Message
    from chatsave.ops.save import SaveOptions, save
    from chatsave.ops.sync import SyncOptions, sync

    def message(chat_id: str, mid: str) -> Message:
        return Message(chat_id=chat_id, id=mid, role="user", content=f"text of {mid}",
                       created_at=datetime(2026, 3, 1, 10, tzinfo=UTC))

    fake.put(DOTTED, [])  # listed by AutoBot: its digest needs no read
    with Store.open(tmp_path / "store.db") as store, AutobotRemote(fake.remote) as remote:
        with store.transaction():
            for chat_id, mid in (("c1", "u1"), (DOTTED, "d1")):
                store.upsert_chat(chat_id, None)
                store.add_messages(chat_id, [message(chat_id, mid)])
        monkeypatch.setattr(remote, "refusal", lambda chat_id: None)

        synced = sync(store, remote, None, SyncOptions())  # refused while comparing
        assert synced.exit_code == ExitCode.REFUSED
        assert [e["chat_id"] for e in synced.details["refused"]] == [DOTTED]
        assert synced.counters["pending_push"] == 1
        assert [m["id"] for m in fake.stored("c1")] == ["u1"]

        with store.transaction():
            store.add_messages("c1", [message("c1", "u2")])
        seen: list[tuple[str, dict[str, Any]]] = []
        saved = save(store, remote, None, SaveOptions(),  # refused while sending
                     emit=lambda type_, **f: seen.append((type_, f)))
        assert saved.exit_code == ExitCode.REFUSED
        assert [f["chat_id"] for t, f in seen if t == "refused"] == [DOTTED]
        assert [m["id"] for m in fake.stored("c1")] == ["u1", "u2"]
        batches = store.conn.execute(
            "SELECT state, last_error FROM outbox WHERE chat_id = ?", (DOTTED,)).fetchall()
        assert [state for state, _ in batches] == ["open"] and "not a UUID" in batches[0][1]
    assert asked_for(fake, *ASKED) == []


# ------------------------------------------------ the other operations: one chat at a time


def refusals(ran: Ran) -> dict[str, dict[str, Any]]:
    """The ``refused`` events by chat, checked against the summary's ``refused`` list."""
    found = {e["chat_id"]: e for e in events(ran, "refused")}
    assert {e["chat_id"] for e in ran.summary.get("refused", [])} == set(found)
    for entry in found.values():
        assert set(entry) >= {"chat_id", "reason", "hint"}
    return found


def test_every_remote_says_whether_it_refuses_a_chat(tmp_path: Path) -> None:
    """The Remote interface asks it of every backend; a chatsave backend refuses none."""
    from chatsave.remote.base import Remote
    from chatsave.remote.http import HttpRemote

    assert "refusal" in vars(Remote)
    with EmbeddedRemote(tmp_path / "backend.db") as embedded:
        assert embedded.refusal("c1") is None
    with HttpRemote("http://127.0.0.1:9") as http:  # nothing listens: no request is made
        assert http.refusal("c1") is None


def test_fetch_brings_back_the_other_chats_bodies(
        cli: Callable[..., Ran], tmp_path: Path, home: Path, fake: FakeAutobot) -> None:
    import_chats(cli, tmp_path, wire("c1", "u1", "hello " + "x" * 4000, 0),
                 wire(BAD, "b1", "lost? " + "y" * 4000, 1))
    assert cli("save", "--all", "--remote", fake.remote).exit_code == ExitCode.REFUSED
    backend = str(tmp_path / "backend.db")
    assert cli("save", "--all", "--remote", backend).exit_code == 0
    assert cli("gc", "--budget", "1KB", "--remote", backend).exit_code in (0, 1)
    with Store.open(home / "store.db") as store:
        evicted = store.conn.execute("SELECT chat_id FROM messages WHERE evicted = 1"
                                     ).fetchall()
    assert sorted(c for c, in evicted) == sorted(["c1", BAD_HERE])

    ran = cli("fetch", "--all", "--remote", fake.remote, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    refused = refusals(ran)
    assert set(refused) == {BAD_HERE}
    assert "'/'" in refused[BAD_HERE]["reason"]
    assert "autobot-dir:PATH" in refused[BAD_HERE]["hint"]
    assert "error" not in ran.summary  # a chat left out, not a run that failed
    assert {e["chat_id"]: e["restored"] for e in events(ran, "chat")} == {"c1": 1}
    with Store.open(home / "store.db") as store:
        still = store.conn.execute("SELECT chat_id, id FROM messages WHERE evicted = 1"
                                   ).fetchall()
    assert still == [(BAD_HERE, "b1")]  # its stub stays
    assert asked_for(fake, *ASKED) == []

    human = cli("fetch", "--all", "--remote", fake.remote)
    assert human.exit_code == ExitCode.REFUSED
    assert f"chat {BAD_HERE!r} was not fetched" in human.stderr and "'/'" in human.stderr
    assert "autobot-dir:PATH" in human.stderr


def test_dedupe_removes_the_other_chats_copies(
        cli: Callable[..., Ran], tmp_path: Path, home: Path, fake: FakeAutobot) -> None:
    fake.put("c1", [{"id": "u1", "sender": "user", "text": "hello",
                     "messageType": "default", "metadata": None,
                     "timestamp": "2026-03-01 10:00:00"}])
    copy = wire("c1", "u1b", "hello", 0)  # the same text at the same time: a retry copy
    import_chats(cli, tmp_path, wire("c1", "u1", "hello", 0), copy,
                 wire(BAD, "b1", "lost?", 1), wire(BAD, "b1b", "lost?", 1))
    ran = cli("dedupe", "--all", "--remote", fake.remote, "--yes", "--max-delete", "50%",
              "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    refused = refusals(ran)
    assert set(refused) == {BAD_HERE} and "'/'" in refused[BAD_HERE]["reason"]
    assert [(e["chat_id"], e["id"]) for e in events(ran, "duplicate")] == [("c1", "u1b")]
    assert ran.summary["removed_here"] == 1
    with Store.open(home / "store.db") as store:
        assert store.get_message("c1", "u1b") is None  # to the trash
        assert store.get_message(BAD_HERE, "b1b") is not None  # left alone
    assert asked_for(fake, *ASKED) == []

    human = cli("dedupe", "--all", "--remote", fake.remote, "--dry-run")
    assert human.exit_code == ExitCode.REFUSED
    assert f"chat {BAD_HERE!r} was left out" in human.stderr
    assert "autobot-dir:PATH" in human.stderr


def test_doctor_examines_the_local_copy_and_reports_the_refusal(
        cli: Callable[..., Ran], tmp_path: Path, fake: FakeAutobot) -> None:
    import_chats(cli, tmp_path, wire(BAD, "b1", "yes", 0), wire(BAD, "b2", "yes", 30))
    ran = cli("doctor", BAD_HERE, "--remote", fake.remote, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    refused = refusals(ran)
    assert set(refused) == {BAD_HERE} and "'/'" in refused[BAD_HERE]["reason"]
    assert "autobot-dir:PATH" in refused[BAD_HERE]["hint"]
    traps = {(e["where"], e["trap"]) for e in events(ran, "trap")}
    assert ("local", "repeated_user_message") in traps  # the local copy was examined
    assert all(where == "local" for where, _ in traps)
    assert ran.summary["local_messages"] == 2 and ran.summary["backend_messages"] is None
    assert asked_for(fake, *ASKED) == []

    human = cli("doctor", BAD_HERE, "--remote", fake.remote)
    assert human.exit_code == ExitCode.REFUSED
    assert f"chat {BAD_HERE!r} was examined here only" in human.stderr
    assert "autobot-dir:PATH" in human.stderr

    # Not here either: nothing to examine; the refusal says why the backend was not asked.
    elsewhere = renamed_chat_id("other/chat")
    gone = cli("doctor", elsewhere, "--remote", fake.remote, "--json")
    assert gone.exit_code == ExitCode.REFUSED
    assert gone.summary["error"]["code"] == "chat_refused"
    assert asked_for(fake, *ASKED, "other/") == []


def _refused(chat_id: str) -> ChatRefusedError | None:
    if chat_id != "bad":
        return None
    return ChatRefusedError("this backend cannot take chat 'bad'",
                            hint="use another backend for it")


class _Picky(EmbeddedRemote):
    """A chatsave backend (embedded) that cannot take chat ``bad``, and says so either
    beforehand (``refusal``; asked anything about it then, it fails) or, as AutoBot with its
    ``refusal`` silenced, only when asked for its messages (its digest: one that never
    matches). Records the chats it was asked about."""

    def __init__(self, path: Path, *, says_beforehand: bool = True) -> None:
        super().__init__(path)
        self.says_beforehand = says_beforehand
        self.asked: list[str] = []

    def refusal(self, chat_id: str) -> ChatRefusedError | None:
        return _refused(chat_id) if self.says_beforehand else None

    def digests(self, chat_ids: list[str]) -> DigestsAnswer:
        self.asked.extend(chat_ids)
        refused = [c for c in chat_ids if _refused(c) is not None]
        if refused and self.says_beforehand:
            raise AssertionError(f"asked about {refused} after refusing them")
        answer = super().digests([c for c in chat_ids if c not in refused])
        for chat_id in refused:
            answer.digests[chat_id], answer.versions[chat_id] = "unverified", 0
        return answer

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        self.asked.append(chat_id)
        refused = _refused(chat_id)
        if refused is not None:
            raise refused
        return super().messages(chat_id, after, limit, include_deleted)


def _confirmed_store(tmp_path: Path) -> Store:
    """Chats ``s`` and ``bad`` with large bodies, both confirmed by the embedded backend."""
    from datetime import UTC, datetime, timedelta

    from chatsave.model import Message
    from chatsave.ops.save import SaveOptions, save

    store = Store.open(tmp_path / "store.db")
    t0 = datetime(2026, 3, 1, 10, tzinfo=UTC)
    with store.transaction():
        for chat_id in ("bad", "s"):
            store.upsert_chat(chat_id, None)
            store.add_messages(chat_id, [
                Message(chat_id=chat_id, id=f"{chat_id}{i}", role="user",
                        content=f"{chat_id} {i} " + "x" * 3000,
                        created_at=t0 + timedelta(seconds=i)) for i in range(10)])
    with EmbeddedRemote(tmp_path / "backend.db") as plain:
        assert save(store, plain, None, SaveOptions()).exit_code == ExitCode.OK
    return store


def test_gc_evicts_nothing_of_a_refused_chat_and_never_asks_for_it(tmp_path: Path) -> None:
    """A chat the backend cannot take has nothing there to fetch back: gc keeps its bodies,
    asks the backend nothing about it, and evicts the other chats' as it would."""
    from chatsave.ops.gc import GcOptions, gc

    store = _confirmed_store(tmp_path)
    with store, _Picky(tmp_path / "backend.db") as remote:
        # Synced once (say, before the backend's rules changed): gc's check that the
        # backend was not wiped does not ask about it either.
        store.conn.execute(
            "INSERT INTO sync_state (backend_id, chat_id, version, digest, synced_at)"
            " VALUES (?, 'bad', 1, 'some digest', 'now')", (remote.capabilities().backend_id,))
        seen: list[tuple[str, dict[str, Any]]] = []
        result = gc(store, remote, GcOptions(budget=1000),
                    emit=lambda type_, **f: seen.append((type_, f)))
        assert result.exit_code == ExitCode.REFUSED
        assert [f for t, f in seen if t == "refused"] == result.details["refused"] == [
            {"chat_id": "bad", "reason": "this backend cannot take chat 'bad'",
             "hint": "use another backend for it"}]
        evicted = {c for c, in store.conn.execute(
            "SELECT chat_id FROM messages WHERE evicted = 1")}
        assert evicted == {"s"} and result.counters["evicted"] > 0
        assert "bad" not in remote.asked


def test_a_refusal_met_only_on_the_way_leaves_that_chat_alone_in_every_operation(
        fake: FakeAutobot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch, dedupe, gc and doctor, with a remote that refuses a chat only when asked for
    it: the same outcome as a refusal known beforehand, per chat."""
    from datetime import UTC, datetime

    from chatsave.model import Message
    from chatsave.ops.dedupe import DedupeOptions, dedupe
    from chatsave.ops.fetch import fetch
    from chatsave.ops.gc import GcOptions, gc
    from chatsave.remote.autobot.doctor import examine

    def message(chat_id: str, mid: str) -> Message:
        return Message(chat_id=chat_id, id=mid, role="user", content=f"text of {mid}",
                       created_at=datetime(2026, 3, 1, 10, tzinfo=UTC))

    fake.put(DOTTED, [])  # listed by AutoBot: its digest needs no read
    fake.put("c1", [])
    with Store.open(tmp_path / "store.db") as store, AutobotRemote(fake.remote) as remote:
        with store.transaction():
            for chat_id in ("c1", DOTTED):
                store.upsert_chat(chat_id, None)
                store.add_messages(chat_id, [message(chat_id, "m1")])
            store.conn.execute("UPDATE messages SET evicted = 1")
        monkeypatch.setattr(remote, "refusal", lambda chat_id: None)

        fetched = fetch(store, remote, None)
        assert fetched.exit_code == ExitCode.REFUSED
        assert [e["chat_id"] for e in fetched.details["refused"]] == [DOTTED]
        assert fetched.counters["missing"] == 1  # c1 was asked for (the fake lacks m1)
        with store.transaction():
            store.conn.execute("UPDATE messages SET evicted = 0")

        deduped = dedupe(store, remote, None, DedupeOptions(dry_run=True))
        assert deduped.exit_code == ExitCode.REFUSED
        assert [e["chat_id"] for e in deduped.details["refused"]] == [DOTTED]

        report = examine(store, remote, DOTTED)
        assert report.refused is not None and "not a UUID" in report.refused.message
        assert report.backend_messages is None and report.local_messages == 1
    assert asked_for(fake, *ASKED) == []

    store = _confirmed_store(tmp_path / "gc")
    with store, _Picky(tmp_path / "gc" / "backend.db", says_beforehand=False) as picky:
        result = gc(store, picky, GcOptions(budget=1000))
        assert result.exit_code == ExitCode.REFUSED
        assert [e["chat_id"] for e in result.details["refused"]] == ["bad"]
        evicted = {c for c, in store.conn.execute(
            "SELECT chat_id FROM messages WHERE evicted = 1")}
        assert evicted == {"s"}


def test_gc_names_the_chat_it_left_whole(cli: Callable[..., Ran], tmp_path: Path, home: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import_chats(cli, tmp_path, wire("c1", "u1", "hello " + "x" * 4000, 0),
                 wire("bad", "b1", "lost? " + "y" * 4000, 1))
    backend = str(tmp_path / "backend.db")
    assert cli("save", "--all", "--remote", backend).exit_code == 0
    monkeypatch.setattr(EmbeddedRemote, "refusal", lambda self, chat_id: _refused(chat_id))
    ran = cli("gc", "--budget", "1KB", "--remote", backend, "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    assert refusals(ran)["bad"]["reason"] == "this backend cannot take chat 'bad'"
    assert [e["chat_id"] for e in events(ran, "evict")] == ["c1"]
    human = cli("gc", "--budget", "1KB", "--remote", backend, "--dry-run")
    assert human.exit_code == ExitCode.REFUSED
    assert "chat 'bad' was left out (none of its bodies evicted)" in human.stderr
    assert "use another backend for it" in human.stderr


# ----------------------------------------------------------------------------- autobot-dir

LONG = "x" * 246  # a valid AutoBot session id; "{id}_chat.json" is 256 bytes
TEAM = "team/x"  # cannot name a file, but a file already holds it


def test_autobot_dir_refuses_alone_a_new_chat_no_file_can_be_made_for(
        cli: Callable[..., Ran], tmp_path: Path, home: Path) -> None:
    chats = tmp_path / "chats"
    chats.mkdir()
    (chats / "teamx_chat.json").write_text(json.dumps(
        {"chatId": TEAM, "name": "Team", "messages": [
            {"id": "t0", "sender": "user", "text": "from the web client",
             "messageType": "default", "timestamp": "2026-03-01 09:00:00"}],
         "last_modified": "2026-03-01 09:00:00", "created_time": "2026-03-01 09:00:00"}))
    import_chats(cli, tmp_path, wire("c1", "u1", "hello", 0), wire(BAD, "b1", "lost?", 1),
                 wire(LONG, "l1", "long?", 2), wire(TEAM, "t1", "and on", 3))
    long_here, team_here = renamed_chat_id(LONG), renamed_chat_id(TEAM)
    remote = f"autobot-dir:{chats}"
    ran = cli("save", "--all", "--remote", remote, "--autobot-cache", "off", "--json")
    assert ran.exit_code == ExitCode.REFUSED, ran.stdout + ran.stderr
    refused = refusals(ran)
    assert set(refused) == {BAD_HERE, long_here}
    assert "'/'" in refused[BAD_HERE]["reason"] and repr(BAD) in refused[BAD_HERE]["reason"]
    assert "256 bytes long" in refused[long_here]["reason"]
    assert all("<id>_chat.json" in e["hint"] for e in refused.values())
    assert {e["chat_id"]: e["pending_push"] for e in ran.summary["refused"]} == \
        {BAD_HERE: 1, long_here: 1}
    # The other chats are written; a file that already holds a chat is written in place.
    assert sorted(p.name for p in chats.iterdir()) == ["c1_chat.json", "teamx_chat.json"]
    assert [m["id"] for m in json.loads((chats / "c1_chat.json").read_text())["messages"]] \
        == ["u1"]
    team = json.loads((chats / "teamx_chat.json").read_text())
    assert team["chatId"] == TEAM and [m["id"] for m in team["messages"]] == ["t0", "t1"]

    synced = cli("sync", "--all", "--remote", remote, "--autobot-cache", "off", "--json")
    assert synced.exit_code == ExitCode.REFUSED, synced.stdout + synced.stderr
    assert set(refusals(synced)) == {BAD_HERE, long_here}
    with Store.open(home / "store.db") as store:
        assert store.get_message(team_here, "t0") is not None  # pulled from its file
    assert sorted(p.name for p in chats.iterdir()) == ["c1_chat.json", "teamx_chat.json"]


def test_autobot_dir_refusal_follows_the_file_name_rule(tmp_path: Path) -> None:
    """From the id alone, without writing anything: what cannot make ``{id}_chat.json``."""
    from chatsave.remote.autobot.directory import AutobotDirRemote

    remote = AutobotDirRemote(tmp_path)
    for fine in ("c1", "my#chat", "a?b", "._x", "x" * 245, f"{UUID}-" + "é" * 104):
        assert remote.refusal(fine) is None, fine
    for bad, why in (("..", "path component"), (".", "path component"),
                     ("a\\b", "'\\\\'"), ("a\0b", "'\\x00'"), (LONG, "256 bytes"),
                     (f"{UUID}-" + "é" * 105, "257 bytes")):
        error = remote.refusal(bad)
        assert error is not None and why in error.message, (bad, error)
        assert error.details["chat_id"] == bad
    assert os.listdir(tmp_path) == []


def test_the_readme_documents_refused_chats() -> None:
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    output = text.split("## `--json` output", 1)[1].split("\n## ", 1)[0]
    events_part, summary_part = output.split("The summary's fields", 1)
    assert "`refused`" in events_part and '"chat_id", "reason", "hint"' in events_part
    row = next(line for line in summary_part.splitlines() if line.startswith("| `refused` |"))
    assert all(name in row for name in ("chat_id", "reason", "hint", "pending_push"))
    autobot = text.split("## AutoBot backends", 1)[1].split("\n## ", 1)[0]
    bullet = autobot.split("cannot take is refused alone", 1)[1].split("\n- ", 1)[0]
    for needle in ("`/`", "UUID", "255", "`..`", "exit 9", "autobot-dir:PATH"):
        assert needle in bullet, needle
