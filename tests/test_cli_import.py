"""import, export and status through the front door: exit codes, output channels, bad input."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from chatsave.store.store import Store
from tests.conftest import Ran, table_dump

INVALID_IDS = ["null", "undefined", "None", "NaN", "", "   ", "x" * 129, "test/chat#1", "../x",
               "a?b=c", "nul\x00byte"]


def dump(**keys: Any) -> str:
    """A localStorage dump: every value is a JSON string, as a browser stores it."""
    return json.dumps({k: v if isinstance(v, str) else json.dumps(v) for k, v in keys.items()})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MSGS = [
    {"id": "m1", "sender": "user", "content": "hi", "timestamp": "2026-03-01T10:00:05.120Z"},
    {"id": "m2", "sender": "assistant", "content": "Hello!", "type": "response",
     "timestamp": "2026-03-01T10:00:09.877Z", "metadata": {"version": 12}},
]


def store_session(chat_id: Any, messages: list[dict[str, Any]] = MSGS) -> dict[str, Any]:
    return {"sessions": [{"id": chat_id, "title": "T", "messages": messages}]}


@pytest.fixture
def good_dump(tmp_path: Path) -> Path:
    return write(tmp_path / "dump.json", dump(**{"autobot-chat-store": store_session("c-1")}))


def test_import_then_again_adds_nothing(cli: Any, good_dump: Path) -> None:
    first = cli("import", str(good_dump), "--json")
    assert first.exit_code == 0, first.stderr
    assert first.summary["written"] == 2 and first.summary["read"] == 2
    again = cli("import", str(good_dump), "--json")
    assert again.exit_code == 0
    assert again.summary["written"] == 0 and again.summary["unchanged"] == 2
    human = cli("import", str(good_dump))
    assert "nothing new" in human.stderr
    assert human.stdout == ""


@pytest.mark.parametrize("bad", INVALID_IDS, ids=repr)
def test_invalid_chat_id_refused_and_store_unchanged(cli: Any, tmp_path: Path, good_dump: Path,
                                                     store_path: Path, bad: str) -> None:
    assert cli("import", str(good_dump)).exit_code == 0
    before = table_dump(store_path)
    source = write(tmp_path / "bad.json", dump(**{"autobot-chat-store": store_session(bad)}))
    ran = cli("import", str(source), "--json")
    assert ran.exit_code == 2
    summary = ran.summary
    assert summary["exit_code"] == 2 and summary["error"]["code"] == "invalid_input"
    rejected = [e for e in ran.json_lines() if e["type"] == "rejected"]
    assert len(rejected) == 2
    assert all("invalid chat id" in e["reason"] for e in rejected)
    assert repr(bad)[:40] in ran.stderr or repr(bad)[:40] in json.dumps(rejected)
    assert table_dump(store_path) == before


@pytest.mark.parametrize("bad", INVALID_IDS, ids=repr)
def test_invalid_chat_id_in_legacy_key_refused(cli: Any, tmp_path: Path, store_path: Path,
                                               bad: str) -> None:
    legacy = [{"sender": "user", "text": "hi", "timestamp": "2025-08-04 10:00:00"}]
    source = write(tmp_path / "bad.json", dump(**{f"chat_{bad}_messages": legacy}))
    ran = cli("import", str(source))
    assert ran.exit_code == 2
    assert "invalid chat id" in ran.stderr
    assert table_dump(store_path).get("messages", []) == []


def test_rename_invalid_maps_and_records(cli: Any, tmp_path: Path) -> None:
    source = write(tmp_path / "bad.json", dump(**{
        "autobot-chat-store": store_session("test/chat#1"),
        "chat_null_messages": [{"sender": "user", "text": "hi", "timestamp": 1724200000000}],
    }))
    ran = cli("import", str(source), "--rename-invalid", "--json")
    assert ran.exit_code == 0, ran.stderr
    renamed = {e["original"]: e["chat_id"] for e in ran.json_lines() if e["type"] == "renamed"}
    assert set(renamed) == {"test/chat#1", "null"}
    from chatsave.model import check_chat_id

    for new in renamed.values():
        check_chat_id(new)
    again = cli("import", str(source), "--rename-invalid", "--json")
    assert again.summary["written"] == 0 and again.summary["unchanged"] == 3
    again_renamed = {e["original"]: e["chat_id"] for e in again.json_lines()
                     if e["type"] == "renamed"}
    assert again_renamed == renamed
    status = cli("status", "--json")
    assert status.summary["chats"] == 2 and status.summary["messages"] == 3


def test_skip_mode_imports_valid_lists_rest_and_writes_rejects(cli: Any, tmp_path: Path) -> None:
    bad_msgs = [*MSGS,
                {"id": "m3", "role": "user", "sender": "assistant", "content": "x",
                 "timestamp": "2026-03-01T10:00:10Z"},
                {"id": "m4", "sender": "user", "timestamp": "2026-03-01T10:00:11Z"}]
    source = write(tmp_path / "mixed.json", dump(**{"autobot-chat-store": store_session(
        "c-1", bad_msgs)}))
    rejects = tmp_path / "rejects.jsonl"
    ran = cli("import", str(source), "--on-invalid", "skip", "--rejects", str(rejects), "--json")
    assert ran.exit_code == 1
    s = ran.summary
    assert (s["read"], s["written"], s["rejected"]) == (4, 2, 2)
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["m3", "m4"]
    assert "conflicting role" in lines[0]["reason"] and "no content" in lines[1]["reason"]
    assert lines[0]["item"]["sender"] == "assistant"
    assert "sessions[0].messages[2]" in lines[0]["position"]


def test_default_fail_lists_every_problem_with_position(cli: Any, tmp_path: Path,
                                                       store_path: Path) -> None:
    lines = [json.dumps({"chat_id": "c", "id": "a", "role": "user", "content": "ok",
                         "created_at": "2026-01-01T10:00:00.000Z"}),
             "{not json",
             json.dumps({"chat_id": "c", "id": "b", "role": "robot", "content": "x",
                         "created_at": "2026-01-01T10:00:00.000Z"})]
    source = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    ran = cli("import", str(source))
    assert ran.exit_code == 2
    assert "line 2: not valid JSON" in ran.stderr
    assert "line 3: unknown role role='robot'" in ran.stderr
    assert "nothing was imported" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert table_dump(store_path)["messages"] == []


def test_dry_run_changes_nothing(cli: Any, good_dump: Path, store_path: Path) -> None:
    Store.open(store_path).close()  # an empty store (status no longer creates one)
    before = table_dump(store_path)
    ran = cli("import", str(good_dump), "--dry-run", "--json")
    assert ran.exit_code == 1
    assert ran.summary["would_write"] == 2 and ran.summary["written"] == 0
    assert table_dump(store_path) == before


def test_conflicting_content_for_existing_id_is_rejected(cli: Any, tmp_path: Path,
                                                       good_dump: Path) -> None:
    assert cli("import", str(good_dump)).exit_code == 0
    changed = [dict(MSGS[0], content="edited"), MSGS[1]]
    source = write(tmp_path / "changed.json", dump(**{"autobot-chat-store": store_session(
        "c-1", changed)}))
    ran = cli("import", str(source))
    assert ran.exit_code == 2
    assert "already holds different content" in ran.stderr


def test_stdin_and_export_round_trip(cli: Any, good_dump: Path, tmp_path: Path) -> None:
    ran = cli("import", "-", input=good_dump.read_bytes())
    assert ran.exit_code == 0, ran.stderr
    exported = cli("export")
    assert exported.exit_code == 0
    rows = [json.loads(x) for x in exported.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["m1", "m2"]
    assert set(rows[0]) == {"chat_id", "id", "role", "content", "created_at", "type",
                            "metadata", "attachments", "extra"}
    assert rows[1]["metadata"] == {"version": 12} and rows[1]["type"] == "response"
    # Importing our own export into a fresh store reproduces it exactly.
    out = tmp_path / "export.jsonl"
    assert cli("export", "--output", str(out)).exit_code == 0
    other = tmp_path / "other.db"
    assert cli("import", str(out), "--store", str(other)).exit_code == 0
    again = cli("export", "--store", str(other))
    assert again.stdout == exported.stdout


def test_export_localstorage_reads_back(cli: Any, good_dump: Path, tmp_path: Path) -> None:
    assert cli("import", str(good_dump)).exit_code == 0
    out = tmp_path / "ls.json"
    ran = cli("export", "--format", "localstorage", "--output", str(out))
    assert ran.exit_code == 0
    data = json.loads(out.read_text())
    state = json.loads(data["autobot-chat-store"])
    assert all(isinstance(s["messages"], list) for s in state["sessions"])
    assert json.loads(data["chat_list"]) == [{"chatId": "c-1", "name": "T"}]
    other = tmp_path / "other.db"
    assert cli("import", str(out), "--store", str(other)).exit_code == 0
    assert cli("export", "--store", str(other)).stdout == cli("export").stdout


def test_export_json_needs_output_and_unknown_chat(cli: Any, good_dump: Path) -> None:
    cli("import", str(good_dump))
    ran = cli("export", "--json")
    assert ran.exit_code == 2 and ran.summary["error"]["code"] == "usage"
    missing = cli("export", "nope")
    assert missing.exit_code == 2 and "not in the local store" in missing.stderr
    bad = cli("export", "test/chat#1")
    assert bad.exit_code == 2 and "invalid chat id 'test/chat#1'" in bad.stderr


def test_status_reports_counts(cli: Any, good_dump: Path) -> None:
    cli("import", str(good_dump))
    ran = cli("status", "--json")
    assert ran.exit_code == 0
    events = ran.json_lines()
    assert events[0]["type"] == "status"
    s = ran.summary
    assert (s["chats"], s["messages"], s["backends"]) == (1, 2, [])
    assert s["runs"][0]["command"] == "import" and s["runs"][0]["exit_code"] == 0
    human = cli("status")
    assert "messages  2" in human.stdout and "none yet" in human.stdout
    one = cli("status", "c-1")
    assert one.exit_code == 0 and "c-1" in one.stdout


def test_usage_error_with_json_still_ends_with_a_summary(cli: Any) -> None:
    ran = cli("import", "--json", "--format", "nope", "x")
    assert ran.exit_code == 2
    assert ran.summary["error"]["code"] == "usage"
    missing = cli("import", "/no/such/file", "--json")
    assert missing.exit_code == 2
    assert "no such file" in missing.summary["error"]["message"]


def test_config_file_and_precedence(cli: Any, home: Path, tmp_path: Path, good_dump: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from_config = tmp_path / "from-config.db"
    from_env = tmp_path / "from-env.db"
    from_flag = tmp_path / "from-flag.db"
    (home / "config.toml").write_text(f'store = "{from_config}"\n')
    assert cli("status", "--json").summary["store"] == str(from_config)
    monkeypatch.setenv("CHATSAVE_STORE", str(from_env))
    assert cli("status", "--json").summary["store"] == str(from_env)
    assert cli("status", "--json", "--store", str(from_flag)).summary["store"] == str(from_flag)
    (home / "config.toml").write_text("stor = 1\n")
    ran = cli("status")
    assert ran.exit_code == 2 and "unknown key" in ran.stderr


def test_corrupt_store_exits_10(cli: Any, store_path: Path) -> None:
    store_path.write_bytes(b"this is not a database" * 100)
    ran = cli("status", "--json")
    assert ran.exit_code == 10
    assert ran.summary["error"]["code"] == "store"
    assert "corrupt or not a chatsave store" in ran.stderr


def test_newer_store_refused(cli: Any, store_path: Path) -> None:
    import sqlite3

    Store.open(store_path).close()  # a store (status no longer creates one)
    assert cli("status").exit_code == 0
    conn = sqlite3.connect(store_path)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', '2030-01-01')")
    conn.commit()
    conn.close()
    ran = cli("status")
    assert ran.exit_code == 10
    assert "newer than this chatsave understands" in ran.stderr
    assert "hint:" in ran.stderr


def test_json_mode_keeps_stdout_pure(cli: Any, tmp_path: Path) -> None:
    source = write(tmp_path / "d.json", dump(**{
        "autobot-chat-store": store_session("c-1"), "autobot_auth": {"token": "SECRET-x"}}))
    ran: Ran = cli("import", str(source), "--json")
    assert ran.exit_code == 0
    for event in ran.json_lines():
        assert "type" in event
        assert "Hello!" not in json.dumps(event)  # no message bodies in events
    assert "SECRET-x" not in ran.stdout + ran.stderr


def test_unreadable_groups_create_no_chats(cli: Any, tmp_path: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "broken_chat.json").write_text('{"chatId": "broken", "messages": [')
    (folder / "ok_chat.json").write_text(json.dumps({"chatId": "ok", "name": "Ok", "messages": [
        {"sender": "user", "text": "hi", "timestamp": "2026-03-01 10:00:00"}]}))
    ran = cli("import", str(folder), "--on-invalid", "skip", "--rename-invalid", "--json")
    assert ran.exit_code == 1
    status = cli("status", "--json").summary
    assert (status["chats"], status["messages"]) == (1, 1)


def test_localstorage_dump_named_like_an_autobot_file(cli: Any, tmp_path: Path) -> None:
    source = write(tmp_path / "chat_backup.json", dump(**{
        "autobot-chat-store": store_session("c-1")}))
    ran = cli("import", str(source), "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["format"] == "localstorage" and ran.summary["written"] == 2


def test_integral_floats_hash_like_javascript_writes_them() -> None:
    from datetime import UTC, datetime

    from chatsave.model import Message

    base = {"chat_id": "c", "id": "m", "role": "user", "content": "x",
            "created_at": datetime(2026, 1, 1, tzinfo=UTC)}
    a = Message(**base, metadata={"version": 1.0, "t": [2.0, 0.5]})
    b = Message(**base, metadata={"version": 1, "t": [2, 0.5]})
    c = Message(**base, metadata={"version": 1.5, "t": [2, 0.5]})
    assert a.content_hash == b.content_hash != c.content_hash


# ------------------------------------------------------- browser sessions without an id
AUTOBOT_ID = re.compile(r"[a-zA-Z0-9_-]+")  # what AutoBot's validate_chat_session_id takes
MISSING = object()
CREATED = "2026-03-01T09:59:58.000Z"


def session(chat_id: Any, messages: list[dict[str, Any]] = MSGS, title: str = "T",
            created: str | None = CREATED, **more: Any) -> dict[str, Any]:
    out = {"title": title, "messages": messages, **more}
    if created is not None:
        out["createdAt"] = created
    if chat_id is not MISSING:
        out["id"] = chat_id
    return out


def derived_events(ran: Ran) -> list[dict[str, Any]]:
    return [e for e in ran.json_lines() if e["type"] == "derived"]


def mappings(store_path: Path, kind: str) -> list[tuple[str, str, str | None]]:
    from chatsave.store.store import Store

    with Store.open(store_path) as store:
        return store.mappings(kind)


@pytest.mark.parametrize(("raw", "shown"), [(None, "null"), (MISSING, "null"),
                                            ("undefined", '"undefined"'), ("", '""')],
                         ids=["null", "missing", "undefined", "blank"])
def test_session_without_an_id_gets_one_derived_from_its_content(
        cli: Any, tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch,
        raw: Any, shown: str) -> None:
    first = write(tmp_path / "first.json", dump(**{"autobot-chat-store": {
        "sessions": [session(raw)], "currentSessionId": None}}))
    ran = cli("import", str(first), "--rename-invalid", "--json")
    assert ran.exit_code == 0, ran.stderr
    [event] = derived_events(ran)
    chat_id = event["chat_id"]
    # A UUID: a chatsave chat id and an AutoBot chat id alike; where the chat was found
    # is in the mapping's source column, never in the id.
    assert str(uuid.UUID(chat_id)) == chat_id
    assert AUTOBOT_ID.fullmatch(chat_id)
    assert event["source"] == f"{shown} at key 'autobot-chat-store' sessions[0]"
    assert [e for e in ran.json_lines() if e["type"] == "renamed"] == []
    [(basis, mapped, source)] = mappings(store_path, "derived")
    assert (mapped, source) == (chat_id, f"{shown} at key 'autobot-chat-store' sessions[0]")
    assert json.loads(basis) == {"createdAt": CREATED}  # not the session's position
    # Nothing for a remote to write back to: the chat is saved under its new id.
    assert mappings(store_path, "chat") == []

    # The same dump again, and a later dump where the session moved down the list and
    # grew: the same chat, nothing twice.
    again = cli("import", str(first), "--rename-invalid", "--json")
    assert [e["chat_id"] for e in derived_events(again)] == [chat_id]
    assert again.summary["written"] == 0 and again.summary["unchanged"] == 2
    later = [*MSGS, {"id": "m3", "sender": "user", "content": "more",
                     "timestamp": "2026-03-01T10:05:00.000Z"}]
    moved = write(tmp_path / "moved.json", dump(**{"autobot-chat-store": {"sessions": [
        session("c-other", [dict(MSGS[0], id="o1")], created="2026-03-02T08:00:00.000Z"),
        session(raw, later, title="Renamed later")]}}))
    third = cli("import", str(moved), "--rename-invalid", "--json")
    assert third.exit_code == 0, third.stderr
    assert [e["chat_id"] for e in derived_events(third)] == [chat_id]
    assert third.summary["written"] == 2  # o1 in c-other, m3 here
    status = cli("status", "--json").summary
    assert (status["chats"], status["messages"]) == (2, 4)

    # The id is what the image and an AutoBot chats directory use: a sane file name.
    image = tmp_path / "image.json"
    assert cli("export", chat_id, "--format", "localstorage", "--output",
               str(image)).exit_code == 0
    state = json.loads(json.loads(image.read_text())["autobot-chat-store"])
    assert [s["id"] for s in state["sessions"]] == [chat_id]
    chats = tmp_path / "autobot-chats"
    chats.mkdir()
    monkeypatch.setenv("CHATSAVE_AUTOBOT_CACHE", "off")  # AutoBot is not running here
    saved = cli("save", chat_id, "--remote", f"autobot-dir:{chats}")
    assert saved.exit_code == 0, saved.stderr
    assert [p.name for p in chats.iterdir()] == [f"{chat_id}_chat.json"]
    written = json.loads((chats / f"{chat_id}_chat.json").read_text())
    assert written["chatId"] == chat_id
    assert [m["id"] for m in written["messages"]] == ["m1", "m2", "m3"]


def test_a_null_session_and_a_null_key_stay_apart(cli: Any, tmp_path: Path,
                                                 store_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``chat_null_messages`` names AutoBot's chat "null" (null_chat.json): renamed, and
    written back there. A session whose id is null names nothing: it gets its own id."""
    legacy = [{"sender": "user", "text": "is this saved?", "timestamp": 1724200000000}]
    source = write(tmp_path / "both.json", dump(**{
        "chat_null_messages": legacy,
        "autobot-chat-store": {"sessions": [session(None)]}}))
    ran = cli("import", str(source), "--rename-invalid", "--json")
    assert ran.exit_code == 0, ran.stderr
    renamed = {e["original"]: e["chat_id"] for e in ran.json_lines() if e["type"] == "renamed"}
    assert list(renamed) == ["null"] and renamed["null"].startswith("null~")
    [derived] = [e["chat_id"] for e in derived_events(ran)]
    assert mappings(store_path, "chat") == [("null", renamed["null"], "key 'chat_null_messages'")]
    chats = tmp_path / "autobot-chats"
    chats.mkdir()
    monkeypatch.setenv("CHATSAVE_AUTOBOT_CACHE", "off")
    saved = cli("save", "--all", "--remote", f"autobot-dir:{chats}")
    assert saved.exit_code == 0, saved.stderr
    assert sorted(p.name for p in chats.iterdir()) == sorted(
        ["null_chat.json", f"{derived}_chat.json"])
    assert json.loads((chats / "null_chat.json").read_text())["chatId"] == "null"


def test_sessions_without_an_id_that_look_alike_stay_two(cli: Any, tmp_path: Path) -> None:
    """No createdAt: the title and first messages stand in; two sessions alike in those
    are two chats still, and the same two again on a second import."""
    other = [dict(MSGS[0], id="x1")]
    source = write(tmp_path / "alike.json", dump(**{"autobot-chat-store": {"sessions": [
        session(None, created=None), session(None, created=None),
        session(None, other, created=None)]}}))
    first = cli("import", str(source), "--rename-invalid", "--json")
    assert first.exit_code == 0, first.stderr
    ids = [e["chat_id"] for e in derived_events(first)]
    assert len(set(ids)) == 3
    again = cli("import", str(source), "--rename-invalid", "--json")
    assert [e["chat_id"] for e in derived_events(again)] == ids
    assert cli("status", "--json").summary["chats"] == 3


def test_session_without_an_id_is_refused_without_rename_invalid(cli: Any, tmp_path: Path,
                                                                 store_path: Path) -> None:
    source = write(tmp_path / "null.json", dump(**{"autobot-chat-store": {"sessions": [
        session(None)]}}))
    ran = cli("import", str(source))
    assert ran.exit_code == 2 and "--rename-invalid" in ran.stderr
    assert table_dump(store_path)["chats"] == []


def test_chat_list_entry_without_an_id_is_a_note_not_a_chat(cli: Any, tmp_path: Path) -> None:
    source = write(tmp_path / "list.json", dump(chat_list=[{"chatId": None, "name": "n"},
                                                           {"name": "no id"}]))
    ran = cli("import", str(source), "--rename-invalid", "--json")
    # Notes only, no chat: the input held nothing to import (exit 1, not success).
    assert ran.exit_code == 1, ran.stderr
    assert ran.summary["empty"] is True
    assert [e["position"] for e in ran.json_lines() if e["type"] == "skipped"] == [
        "key 'chat_list'[0]", "key 'chat_list'[1]"]
    assert cli("status", "--json").summary["chats"] == 0


# ------------------------------------------------------------- the user's current chat
def image_state(path: Path) -> dict[str, Any]:
    return json.loads(json.loads(path.read_text())["autobot-chat-store"])


def active(state: dict[str, Any]) -> list[str]:
    return [s["id"] for s in state["sessions"] if s["isActive"]]


def test_export_keeps_the_current_session(cli: Any, tmp_path: Path) -> None:
    older = [dict(m, id=f"old-{m['id']}", timestamp="2026-02-01T10:00:00.000Z") for m in MSGS]
    source = write(tmp_path / "dump.json", dump(**{"autobot-chat-store": {
        "sessions": [session("c-new"), session("c-old", older, isActive=True)],
        "currentSessionId": "c-old"}}))
    assert cli("import", str(source)).exit_code == 0
    image = tmp_path / "image.json"
    ran = cli("export", "--format", "localstorage", "--output", str(image))
    assert ran.exit_code == 0, ran.stderr
    state = image_state(image)
    assert state["currentSessionId"] == "c-old"
    assert active(state) == ["c-old"]
    # Read back into another store, the image names the same current chat.
    other = tmp_path / "other.db"
    assert cli("import", str(image), "--store", str(other)).exit_code == 0
    again = tmp_path / "again.json"
    assert cli("export", "--format", "localstorage", "--store", str(other), "--output",
               str(again)).exit_code == 0
    assert image_state(again)["currentSessionId"] == "c-old"
    # A later dump that names another current chat moves the user's place.
    newer = write(tmp_path / "newer.json", dump(**{"autobot-chat-store": {
        "sessions": [session("c-new")], "currentSessionId": "c-new"}}))
    assert cli("import", str(newer)).exit_code == 0
    assert cli("export", "--format", "localstorage", "--output", str(image)).exit_code == 0
    assert image_state(image)["currentSessionId"] == "c-new"
    assert active(image_state(image)) == ["c-new"]


def test_current_session_without_an_id_and_no_current_recorded(cli: Any, tmp_path: Path) -> None:
    # currentSessionId is null with the session's id: isActive tells which one it was.
    source = write(tmp_path / "dump.json", dump(**{"autobot-chat-store": {
        "sessions": [session("c-1", [dict(m, id=f"c-{m['id']}") for m in MSGS],
                             created="2026-03-02T00:00:00.000Z"),
                     session(None, isActive=True)],
        "currentSessionId": None}}))
    ran = cli("import", str(source), "--rename-invalid", "--json")
    [derived] = [e["chat_id"] for e in derived_events(ran)]
    image = tmp_path / "image.json"
    assert cli("export", "--format", "localstorage", "--output", str(image)).exit_code == 0
    assert image_state(image)["currentSessionId"] == derived
    assert active(image_state(image)) == [derived]
    # A store that never saw a current chat: the most recent chat is the current one.
    lines = [{"chat_id": c, "id": f"{c}-m", "role": "user", "content": "hi",
              "created_at": when} for c, when in (("a", "2026-01-02T00:00:00.000Z"),
                                                  ("b", "2026-01-03T00:00:00.000Z"),
                                                  ("c", "2026-01-01T00:00:00.000Z"))]
    jsonl = write(tmp_path / "in.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    other = tmp_path / "other.db"
    assert cli("import", str(jsonl), "--store", str(other)).exit_code == 0
    assert cli("export", "--format", "localstorage", "--store", str(other), "--output",
               str(image)).exit_code == 0
    assert image_state(image)["currentSessionId"] == "b"
    assert active(image_state(image)) == ["b"]


# -------------------------------------------------------------- the budgeted image
def chat_lines(chat_id: str, count: int, start: int, size: int = 400) -> str:
    return "".join(json.dumps({
        "chat_id": chat_id, "id": f"{chat_id}-{i}", "role": "user" if i % 2 else "assistant",
        "content": f"{chat_id} message {i} " + "é" * size,
        "created_at": f"2026-03-01T10:{(start + i) // 60:02d}:{(start + i) % 60:02d}.000Z"})
        + "\n" for i in range(count))


def test_budget_takes_a_chat_with_unconfirmed_messages_whole_or_refuses(
        cli: Any, tmp_path: Path) -> None:
    backend = ("--remote", str(tmp_path / "backend.db"))
    saved = write(tmp_path / "saved.jsonl", chat_lines("s", 10, 0))
    assert cli("save", "--from", str(saved), *backend).exit_code == 0
    # Five more messages of chat s, only here: the backend holds ten, the browser would
    # keep its own copy of s only if it held more than ten.
    more = write(tmp_path / "more.jsonl", chat_lines("s", 15, 0))
    assert cli("import", str(more)).exit_code == 0
    image = tmp_path / "image.json"
    tight = cli("export", "--format", "localstorage", "--budget", "8KB", *backend,
                "--output", str(image), "--json")
    assert tight.exit_code == 5, tight.stdout
    error = tight.summary["error"]
    assert error["code"] == "guard" and "'s' (5 unconfirmed)" in error["message"]
    assert "save it first" in error["hint"]
    assert not image.exists()  # nothing written
    roomy = cli("export", "--format", "localstorage", "--budget", "40KB", *backend,
                "--output", str(image), "--json")
    assert roomy.exit_code == 0, roomy.stderr
    state = image_state(image)
    assert [len(s["messages"]) for s in state["sessions"]] == [15]
    assert state["currentSessionId"] == "s"
    # Saved, the same chat may be cut: its latest messages, the rest on the backend.
    assert cli("save", "--all", *backend).exit_code == 0
    cut = cli("export", "--format", "localstorage", "--budget", "8KB", *backend,
              "--output", str(image), "--json")
    assert cut.exit_code == 0, cut.stderr
    [left] = [e for e in cut.json_lines() if e["type"] == "left_out"]
    assert left["chat_id"] == "s" and not left["whole_chat"]
    kept = [m["id"] for m in image_state(image)["sessions"][0]["messages"]]
    assert 0 < len(kept) < 15 and kept == [f"s-{i}" for i in range(15 - len(kept), 15)]
    values = json.loads(image.read_text())
    assert sum(2 * (len(k) + len(v)) for k, v in values.items()) <= 8000


def test_budget_keeps_the_current_chat_before_more_recent_ones(cli: Any, tmp_path: Path) -> None:
    backend = ("--remote", str(tmp_path / "backend.db"))
    lines = chat_lines("old", 12, 0) + chat_lines("new", 4, 100)
    source = write(tmp_path / "in.jsonl", lines)
    assert cli("save", "--from", str(source), *backend).exit_code == 0
    # The user's dump names "old" as the current chat (its messages are known already).
    marker = write(tmp_path / "dump.json", dump(**{"autobot-chat-store": {
        "sessions": [session("old", [], created=None)], "currentSessionId": "old"}}))
    assert cli("import", str(marker)).exit_code == 0
    image = tmp_path / "image.json"
    ran = cli("export", "--format", "localstorage", "--budget", "7KB", *backend,
              "--output", str(image), "--json")
    assert ran.exit_code == 0, ran.stderr
    state = image_state(image)
    assert state["currentSessionId"] == "old" and active(state) == ["old"]
    sessions = {s["id"]: s for s in state["sessions"]}
    assert "old" in sessions and 0 < len(sessions["old"]["messages"]) < 12
    left = {e["chat_id"]: e for e in ran.json_lines() if e["type"] == "left_out"}
    assert left["old"]["whole_chat"] is False


def test_budget_refuses_a_chat_with_unconfirmed_and_evicted_messages(cli: Any,
                                                                    tmp_path: Path) -> None:
    """gc evicted some bodies of a chat that then got messages only here: the image cannot
    hold the chat whole, so nothing is written, however large the budget."""
    backend = ("--remote", str(tmp_path / "backend.db"))
    assert cli("save", "--from", str(write(tmp_path / "a.jsonl", chat_lines("s", 6, 0))),
               *backend).exit_code == 0
    gc = cli("gc", "--budget", "1KB", "--keep-last", "0", *backend, "--json")
    assert gc.exit_code in (0, 1), gc.stdout
    assert cli("status", "--json").summary["evicted"] > 0
    # Two more messages of chat s (the first six are known: unchanged).
    assert cli("import", str(write(tmp_path / "b.jsonl", chat_lines("s", 8, 0)))
               ).exit_code == 0
    image = tmp_path / "image.json"
    ran = cli("export", "--format", "localstorage", "--budget", "10MB", *backend,
              "--output", str(image), "--json")
    assert ran.exit_code == 5, ran.stdout
    assert "'s'" in ran.summary["error"]["message"] and "evicted" in ran.summary["error"]["message"]
    assert "save it first" in ran.summary["error"]["hint"]
    assert not image.exists()


def test_autobot_file_without_an_id_on_stdin_gets_a_derived_id(cli: Any,
                                                               store_path: Path) -> None:
    body = json.dumps({"name": "No id", "created_time": "2026-03-01 10:00:00", "messages": [
        {"id": "u1", "sender": "user", "text": "hi", "timestamp": "2026-03-01 10:00:01"}]})
    first = cli("import", "-", "--format", "autobot-file", "--rename-invalid", "--json",
                input=body)
    assert first.exit_code == 0, first.stderr
    [event] = derived_events(first)
    assert str(uuid.UUID(event["chat_id"])) == event["chat_id"]
    assert event["source"] == "null at file <stdin>"
    again = cli("import", "-", "--format", "autobot-file", "--rename-invalid", "--json",
                input=body)
    assert [e["chat_id"] for e in derived_events(again)] == [event["chat_id"]]
    assert again.summary["unchanged"] == 1
    assert [m[1] for m in mappings(store_path, "derived")] == [event["chat_id"]]
