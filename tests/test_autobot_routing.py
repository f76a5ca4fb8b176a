"""Chats whose id AutoBot's HTTP routes cannot carry: refused alone, before any request for them.

An id with '/' splits the path once AutoBot's server has decoded %2F (404); an id AutoBot's
validate_chat_session_id refuses is a 500 on the session routes chatsave reads through. Such
a chat is left out of save, sync and diff with the reason and the way out (autobot-dir on
the server); the other chats are done; the run ends with exit 9; its messages stay here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatsave.errors import ChatRefusedError, ExitCode
from chatsave.model import renamed_chat_id
from chatsave.remote.autobot import AutobotRemote, unroutable
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
            "SELECT m.id FROM messages m LEFT JOIN remote_state r ON r.backend_id = ?"
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
    assert ran.summary["error"]["code"] == "chat_refused"
    assert "autobot-dir:PATH" in ran.summary["error"]["hint"]
    assert asked_for(fake, *ASKED) == []


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
