"""import, export and status through the front door: exit codes, output channels, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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
    cli("status")
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
